//! Snapshots of a VM as libvirt and qemu-img describe them: the facts the window lists, read
//! from libvirt's snapshot XML and from `qemu-img info`'s JSON.

use std::collections::HashMap;

use dunes_shared::model::VmState;
use quick_xml::{Reader, events::Event};
use serde::Deserialize;

/// What a snapshot's XML says of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotFacts {
    pub created_unix_secs: u64,
    pub state: VmState,
}

/// Reads `<creationTime>` and `<state>` of a `<domainsnapshot>` (not those of the domain
/// definition it embeds).
pub fn snapshot_facts(xml: &str) -> SnapshotFacts {
    let mut reader = Reader::from_str(xml);
    let mut path: Vec<String> = Vec::new();
    let mut facts = SnapshotFacts {
        created_unix_secs: 0,
        state: VmState::Unknown,
    };
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                path.push(String::from_utf8_lossy(e.local_name().as_ref()).into_owned())
            }
            Ok(Event::End(_)) => {
                path.pop();
            }
            Ok(Event::Text(t)) if path.len() == 2 && path[0] == "domainsnapshot" => {
                let text = t.decode().map(|c| c.trim().to_string()).unwrap_or_default();
                match path[1].as_str() {
                    "creationTime" => facts.created_unix_secs = text.parse().unwrap_or(0),
                    "state" => facts.state = state_named(&text),
                    _ => {}
                }
            }
            Ok(Event::Eof) | Err(_) => return facts,
            _ => {}
        }
    }
}

/// libvirt's names of the states a snapshot is taken in.
fn state_named(text: &str) -> VmState {
    match text {
        "running" => VmState::Running,
        "paused" => VmState::Paused,
        "shutoff" | "disk-snapshot" => VmState::Shutoff,
        _ => VmState::Unknown,
    }
}

#[derive(Deserialize)]
struct ImageInfo {
    #[serde(default)]
    snapshots: Vec<ImageSnapshot>,
}

#[derive(Deserialize)]
struct ImageSnapshot {
    name: String,
    #[serde(rename = "vm-state-size", default)]
    vm_state_size: u64,
}

/// The memory state each internal snapshot of a qcow2 image holds, by name, from
/// `qemu-img info --output=json`; nothing from output that does not parse.
pub fn memory_state_sizes(json: &str) -> HashMap<String, u64> {
    serde_json::from_str::<ImageInfo>(json)
        .map(|info| {
            info.snapshots
                .into_iter()
                .map(|s| (s.name, s.vm_state_size))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `qemu-img info` on a disk in use (`-U`: it only reads the header and tables).
pub fn image_info_json(path: &std::path::Path) -> Option<String> {
    let output = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshots_own_time_and_state_are_read_not_its_domains() {
        let xml = "<domainsnapshot><name>before-upgrade</name><state>running</state>\
            <creationTime>1765000000</creationTime><memory snapshot='internal'/>\
            <domain type='qemu'><name>web</name><state>shutoff</state><creationTime>1</creationTime></domain>\
            </domainsnapshot>";
        assert_eq!(
            snapshot_facts(xml),
            SnapshotFacts {
                created_unix_secs: 1_765_000_000,
                state: VmState::Running,
            }
        );
        let off =
            "<domainsnapshot><state>shutoff</state><creationTime>7</creationTime></domainsnapshot>";
        assert_eq!(snapshot_facts(off).state, VmState::Shutoff);
        assert_eq!(snapshot_facts("not xml <").created_unix_secs, 0);
    }

    #[test]
    fn memory_state_sizes_come_from_qemu_img_json() {
        let json = r#"{"virtual-size": 1073741824, "format": "qcow2", "snapshots": [
            {"icount": 0, "vm-state-size": 52428800, "date-sec": 1765000000, "name": "a", "id": "1"},
            {"vm-state-size": 0, "name": "b", "id": "2"}]}"#;
        let sizes = memory_state_sizes(json);
        assert_eq!(sizes.get("a"), Some(&52_428_800));
        assert_eq!(sizes.get("b"), Some(&0));
        assert!(memory_state_sizes(r#"{"format": "raw"}"#).is_empty());
        assert!(memory_state_sizes("garbage").is_empty());
    }
}
