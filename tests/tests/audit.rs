//! The audit log: every change and every refusal, recorded before the answer, in a chain
//! that `ctl audit verify` checks.

use std::path::Path;

use dunes_tests::demo::{ctl, demo_with, demo_with_env, headless, json};
use redb::ReadableTable;
use serde_json::Value;

const AUDIT: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("audit");

/// Changes a stored record's outcome, or removes the record, as someone with the file would.
fn tamper(store: &Path, seq: u64, remove: bool) {
    let db = redb::Database::open(store).unwrap();
    let tx = db.begin_write().unwrap();
    {
        let mut table = tx.open_table(AUDIT).unwrap();
        if remove {
            table.remove(seq).unwrap();
        } else {
            let bytes = table.get(seq).unwrap().unwrap().value().to_vec();
            let mut record: Value = rmp_serde::from_slice(&bytes).unwrap();
            record["entry"]["outcome"] = Value::String("ok".into());
            record["entry"]["operator"] = Value::String("someone-else".into());
            table
                .insert(seq, rmp_serde::to_vec_named(&record).unwrap().as_slice())
                .unwrap();
        }
    }
    tx.commit().unwrap();
}

fn verify(data: &Path) -> (Option<i32>, Value) {
    let out = ctl(data, &["--json", "audit", "verify"]);
    (
        out.status.code(),
        serde_json::from_slice(&out.stdout).unwrap(),
    )
}

#[test]
fn changes_and_refusals_are_recorded_and_an_edit_or_a_removal_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let (console, data) = demo_with(dir.path(), &["--operator-listen", "127.0.0.1:0"]);
    let alice = dir.path().join("alice.toml");
    json(&ctl(
        &data,
        &[
            "--json",
            "operator",
            "add",
            "alice",
            "--role",
            "viewer",
            "--out",
            alice.to_str().unwrap(),
        ],
    ));
    let refused = ctl(
        Path::new("/nonexistent"),
        &["--connect", alice.to_str().unwrap(), "vm", "stop", "wiki"],
    );
    assert!(!refused.status.success());
    json(&ctl(&data, &["--json", "vm", "stop", "--force", "wiki"]));
    let failed = ctl(&data, &["vm", "start", "no-such-vm"]);
    assert!(!failed.status.success());
    json(&ctl(&data, &["--json", "vm", "start", "wiki"]));
    // Reads are not recorded.
    json(&ctl(&data, &["--json", "vms"]));

    let lines = json(&ctl(&data, &["--json", "audit"]));
    let lines = lines.as_array().unwrap();
    let summary: Vec<(String, String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["operator"].as_str().unwrap().to_string(),
                l["operation"].as_str().unwrap().to_string(),
                l["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected = [
        ("local", "operator-add", "ok"),
        (
            "alice",
            "vm-stop",
            "refused: viewer alice may not stop VMs: operators and admins only",
        ),
        ("local", "vm-stop", "ok"),
        ("local", "vm-start", "failed: no VM named no-such-vm"),
        ("local", "vm-start", "ok"),
    ];
    assert_eq!(
        summary,
        expected.map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())),
        "{lines:?}"
    );
    let stop = &lines[2];
    assert_eq!(stop["target"], "wiki");
    assert!(
        stop["parameters"]
            .as_str()
            .unwrap()
            .contains("\"force\":true")
    );
    assert!(stop["duration_ms"].is_u64(), "{stop}");
    assert!(
        lines[1]["fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    // The operator's request carries the CSR as a hash, not the text.
    assert!(
        lines[0]["parameters"]
            .as_str()
            .unwrap()
            .contains("\"csr_pem\":\"sha256:")
    );
    // Filters and the export.
    let of_alice = json(&ctl(&data, &["--json", "audit", "--operator", "alice"]));
    assert_eq!(of_alice.as_array().unwrap().len(), 1);
    let recent = json(&ctl(&data, &["--json", "audit", "--since", "1h"]));
    assert_eq!(recent.as_array().unwrap().len(), 5);
    let jsonl = ctl(&data, &["audit", "--jsonl"]);
    let exported: Vec<Value> = String::from_utf8(jsonl.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(exported.len(), 5);
    let (code, check) = verify(&data);
    assert_eq!(code, Some(0), "{check}");
    // Two records per change (its request, then its outcome), one per refusal.
    assert_eq!(check["records"], 9, "{check}");
    assert_eq!(check["intact"], true);

    // Someone with the store file rewrites the refusal; a copy loses a record instead.
    drop(console);
    let copy = dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(data.join("store.redb"), copy.join("store.redb")).unwrap();
    tamper(&data.join("store.redb"), 3, false);
    tamper(&copy.join("store.redb"), 5, true);
    {
        let _console = headless(&data, &dir.path().join("console-2.log"));
        let (code, check) = verify(&data);
        assert_eq!(code, Some(1), "{check}");
        assert_eq!(check["first_bad"], 3, "{check}");
        assert_eq!(
            check["problem"], "record 3 was changed after it was written",
            "{check}"
        );
        let text = ctl(&data, &["audit", "verify"]);
        assert!(String::from_utf8_lossy(&text.stdout).contains("record 3 was changed"));
        // New records still chain on.
        json(&ctl(&data, &["--json", "operator", "revoke", "alice"]));
    }
    let _console = headless(&copy, &dir.path().join("console-3.log"));
    let (code, check) = verify(&copy);
    assert_eq!(code, Some(1), "{check}");
    assert_eq!(check["problem"], "record 5 is missing", "{check}");
}

#[test]
fn a_change_whose_audit_record_cannot_be_written_is_not_done() {
    let dir = tempfile::tempdir().unwrap();
    let (_console, data) = demo_with_env(dir.path(), &[], &[("DUNES_FAILPOINT", "audit-write")]);
    let out = ctl(&data, &["vm", "stop", "--force", "wiki"]);
    assert!(!out.status.success());
    let line = String::from_utf8_lossy(&out.stderr);
    assert!(
        line.contains("nothing was done: the audit log cannot record it"),
        "{line}"
    );
    let vms = json(&ctl(&data, &["--json", "vms"]));
    let wiki = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "wiki")
        .unwrap();
    assert_eq!(wiki["state"], "running", "{wiki}");
}
