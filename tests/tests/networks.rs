//! Service networks as the console keeps them: a service file's `[network]` gets a subnet
//! (given or chosen), each deployed instance an address and a MAC that stay through stops,
//! starts, migrations and a console restart; `ctl networks --json` lists them; a bad
//! declaration is refused with one line before anything is made.

use std::{path::Path, process::Output, time::Duration};

use dunes_tests::{
    demo::{ctl, demo, headless, json},
    poll_until,
};
use serde_json::Value;

/// A service of two web VMs and a database on the demo's test driver, with a network.
fn service_file(name: &str, network: &str) -> String {
    format!(
        r#"name = "{name}"

[[application]]
name = "db"
runtime = "libvirt"
template = "tiny"
vcpus = 1
memory_mib = 256

[[application]]
name = "web"
runtime = "libvirt"
template = "tiny"
vcpus = 1
memory_mib = 256
instances = 2
depends_on = ["db"]

[rules]
distinct_hosts = ["web"]

{network}
"#
    )
}

fn define(data: &Path, dir: &Path, name: &str, text: &str) -> Output {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, text).unwrap();
    ctl(
        data,
        &["--json", "service", "create", "-f", file.to_str().unwrap()],
    )
}

fn refusal(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

fn networks(data: &Path) -> Value {
    json(&ctl(data, &["--json", "networks"]))
}

fn network<'a>(all: &'a Value, name: &str) -> &'a Value {
    all.as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no network {name} in {all}"))
}

/// Each member's instance name, host and address.
fn members(all: &Value, name: &str) -> Vec<(String, String, String)> {
    network(all, name)["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["dns_name"].as_str().unwrap().to_string(),
                m["host"].as_str().unwrap().to_string(),
                m["address"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn deploy(data: &Path, name: &str) {
    let report = json(&ctl(data, &["--json", "service", "deploy", name]));
    assert!(
        report["failed"].as_array().is_none_or(|f| f.is_empty()),
        "{report}"
    );
}

#[test]
fn instances_keep_their_addresses_on_their_service_network() {
    let dir = tempfile::tempdir().unwrap();
    let (console, data) = demo(dir.path());
    let files = dir.path();

    // pay: a subnet of its own choosing; shop: one the console chooses, connected to pay.
    json(&define(
        &data,
        files,
        "pay",
        &service_file("pay", "[network]\nsubnet = \"10.77.0.0/24\""),
    ));
    let shop_network = "[network]\nconnect = [\"pay\"]\npublish = [{ app = \"web\", port = 80, host_port = 8080, hosts = \"site:lausanne\" }]";
    // Bad declarations, each refused with one line, and no network made of any of them.
    for (name, network, says) in [
        (
            "shop",
            "[network]\nconnect = [\"payments\"]",
            "connect names service payments, which does not exist",
        ),
        (
            "shop",
            "[network]\nsubnet = \"10.77.0.128/25\"",
            "overlaps network pay's subnet 10.77.0.0/24",
        ),
        (
            "shop",
            "[network]\nsubnet = \"10.78.0.5/24\"",
            "did you mean 10.78.0.0/24",
        ),
        ("shop", "[network]\nconect = [\"pay\"]", "conect"),
    ] {
        let said = refusal(&define(&data, files, name, &service_file(name, network)));
        assert!(said.contains(says), "{said}");
    }
    let long = "w".repeat(64);
    let said = refusal(&define(
        &data,
        files,
        "shop",
        &service_file("shop", shop_network).replace("\"web\"", &format!("\"{long}\"")),
    ));
    assert!(said.contains("1 to 63 characters"), "{said}");
    assert_eq!(
        network(&networks(&data), "pay")["subnet"],
        "10.77.0.0/24",
        "only pay's network"
    );
    assert_eq!(networks(&data).as_array().unwrap().len(), 1);

    json(&define(
        &data,
        files,
        "shop",
        &service_file("shop", shop_network),
    ));
    // A host port another service publishes on the same hosts is refused.
    let said = refusal(&define(
        &data,
        files,
        "outlet",
        &service_file(
            "outlet",
            "[network]\npublish = [{ app = \"web\", port = 80, host_port = 8080 }]",
        ),
    ));
    assert!(
        said.contains("host port 8080 is published by service shop already"),
        "{said}"
    );
    // Deleted, a service's network goes with it.
    json(&define(
        &data,
        files,
        "spare",
        &service_file("spare", "[network]"),
    ));
    assert_eq!(
        network(&networks(&data), "spare")["subnet"],
        "10.200.1.0/24"
    );
    json(&ctl(&data, &["--json", "service", "delete", "spare"]));
    assert_eq!(networks(&data).as_array().unwrap().len(), 2);
    // A service others connect to stays while they do.
    let said = refusal(&ctl(&data, &["service", "delete", "pay"]));
    assert!(said.contains("service shop connects to pay"), "{said}");

    deploy(&data, "shop");
    deploy(&data, "pay");
    let all = networks(&data);
    let shop = network(&all, "shop");
    assert_eq!(shop["subnet"], "10.200.0.0/24", "{shop}");
    assert_eq!(shop["gateway"], "10.200.0.1", "{shop}");
    assert_eq!(shop["services"], serde_json::json!(["shop"]));
    assert_eq!(shop["connect"], serde_json::json!(["pay"]));
    assert_eq!(shop["published"][0]["host_port"], 8080, "{shop}");
    assert_eq!(shop["published"][0]["hosts"], "site:lausanne", "{shop}");
    assert_ne!(shop["vni"], network(&all, "pay")["vni"]);
    let before = members(&all, "shop");
    let mut names: Vec<&str> = before.iter().map(|m| m.0.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        ["0.db.shop.dunes", "0.web.shop.dunes", "1.web.shop.dunes"]
    );
    let mut addresses: Vec<&str> = before.iter().map(|m| m.2.as_str()).collect();
    addresses.sort();
    assert_eq!(addresses, ["10.200.0.2", "10.200.0.3", "10.200.0.4"]);
    for m in shop["members"].as_array().unwrap() {
        let ip: std::net::Ipv4Addr = m["address"].as_str().unwrap().parse().unwrap();
        let [a, b, c, d] = ip.octets();
        assert_eq!(
            m["mac"],
            format!("02:d5:{a:02x}:{b:02x}:{c:02x}:{d:02x}"),
            "{m}"
        );
    }
    let hosts: Vec<&str> = shop["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert!(hosts.len() >= 2, "the web instances on two hosts: {shop}");
    let pay = members(&all, "pay");
    assert!(pay.iter().all(|m| m.2.starts_with("10.77.0.")), "{pay:?}");

    // Started and stopped, the addresses stay.
    json(&ctl(&data, &["--json", "service", "start", "shop"]));
    poll_until(Duration::from_secs(30), "shop's instances ready", || {
        network(&networks(&data), "shop")["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["ready"] == true)
    });
    json(&ctl(&data, &["--json", "service", "stop", "shop"]));
    assert_eq!(members(&networks(&data), "shop"), before);

    // Migrated, the database keeps its address on its new host.
    let (db_name, db_host, db_address) = before
        .iter()
        .find(|m| m.0 == "0.db.shop.dunes")
        .cloned()
        .unwrap();
    let to = ["lsn-1", "lsn-2", "gva-1"]
        .into_iter()
        .find(|h| *h != db_host)
        .unwrap();
    let started = json(&ctl(
        &data,
        &[
            "--json",
            "vm",
            "migrate",
            &format!("{db_host}/shop-db-0"),
            "--to",
            to,
        ],
    ));
    let id = started["id"].as_u64().unwrap();
    poll_until(Duration::from_secs(60), "the migration's end", || {
        json(&ctl(&data, &["--json", "migrations"]))
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == id && m["state"] == "source-deleted")
    });
    let moved = members(&networks(&data), "shop");
    assert!(
        moved.contains(&(db_name.clone(), to.to_string(), db_address.clone())),
        "{moved:?}"
    );

    // A console restarted reads them back from its store.
    drop(console);
    let _console = headless(&data, &dir.path().join("console-2.log"));
    poll_until(Duration::from_secs(30), "the console back", || {
        ctl(&data, &["--json", "networks"]).status.success()
    });
    assert_eq!(members(&networks(&data), "shop"), moved);
    // The text form: one table of networks, one of instances, one of published ports.
    let text = String::from_utf8_lossy(&ctl(&data, &["networks"]).stdout).into_owned();
    assert!(text.contains("10.200.0.0/24"), "{text}");
    let line_with = |words: &[&str]| {
        text.lines()
            .any(|l| words.iter().all(|w| l.split_whitespace().any(|x| x == *w)))
    };
    assert!(
        line_with(&["shop", "0.db.shop.dunes", to, &db_address]),
        "{text}"
    );
    assert!(
        line_with(&["shop", "8080", "web.shop:80", "site:lausanne"]),
        "{text}"
    );
}
