//! Hosts and their links: what an agent says (hello, events) becomes the host's view and its
//! stored record; a VM as an agent's reply reports it too.

use std::sync::Arc;

use dunes_shared::{
    model::{HostId, HostStatus, VmName, VmStatus},
    protocol::AgentEvent,
};
use tokio::sync::watch;

use crate::engine::{
    HostView, LinkState,
    actor::Actor,
    fleet::link::{LinkMessage, run_link},
    fleet::state::HostEntry,
    records::{HostRecord, Level},
    snapshot::{rfc3339, unix_ms},
};

impl Actor {
    pub(in crate::engine) fn add_host_entry(&mut self, record: HostRecord, vms: Vec<VmStatus>) {
        let (address_tx, address_rx) = watch::channel(record.address.clone());
        let link_task = tokio::spawn(run_link(
            record.id.clone(),
            address_rx,
            record.fingerprint,
            self.links.clone(),
        ));
        let view = HostView {
            record,
            link: LinkState::Connecting,
            link_error: None,
            status: None,
            vms,
            skipped_events: Default::default(),
        };
        self.fleet.hosts.insert(
            view.record.id.clone(),
            HostEntry {
                published: Arc::new(view.clone()),
                view,
                dirty: true,
                readings_dirty: false,
                peer: None,
                skipped_kinds: Default::default(),
                address: address_tx,
                link_task,
                site_addresses_told: None,
                networks_told: None,
            },
        );
    }

    pub(in crate::engine) fn link(&mut self, msg: LinkMessage) {
        match msg {
            LinkMessage::Connected {
                host,
                peer,
                hello,
                cert_expires,
            } => {
                let Some(entry) = self.fleet.hosts.get_mut(&host) else {
                    return;
                };
                let was = entry.view.link;
                entry.peer = Some(peer);
                entry.site_addresses_told = None;
                entry.networks_told = None;
                entry.view.link = LinkState::Online;
                entry.view.link_error = None;
                entry.view.skipped_events.clear();
                entry.view.status = Some(hello.status);
                let cert_expires_ms = cert_expires.map(unix_ms);
                if entry.view.record.inventory.as_ref() != Some(&hello.inventory)
                    || entry.view.record.cert_expires_ms != cert_expires_ms
                {
                    entry.view.record.inventory = Some(hello.inventory);
                    entry.view.record.cert_expires_ms = cert_expires_ms;
                    self.store.put_host(&entry.view.record);
                }
                self.store.replace_vms(host.clone(), &hello.vms);
                entry.view.vms = hello.vms;
                entry.dirty = true;
                if was != LinkState::Online {
                    self.log(Level::Info, Some(host), "online".into());
                }
            }
            LinkMessage::Event { host, event } => self.agent_event(host, event),
            LinkMessage::CertRenewed { host, expires } => {
                let Some(entry) = self.fleet.hosts.get_mut(&host) else {
                    return;
                };
                entry.view.record.cert_expires_ms = Some(unix_ms(expires));
                entry.dirty = true;
                self.store.put_host(&entry.view.record);
                self.log(
                    Level::Info,
                    Some(host),
                    format!("certificate renewed, valid until {}", rfc3339(expires)),
                );
            }
            LinkMessage::RenewalFailed {
                host,
                reason,
                expires,
            } => self.log(
                Level::Warning,
                Some(host),
                format!(
                    "certificate renewal failed ({reason}); it expires at {}",
                    rfc3339(expires)
                ),
            ),
            LinkMessage::Skipped { host, kind, count } => {
                let Some(entry) = self.fleet.hosts.get_mut(&host) else {
                    return;
                };
                entry.view.skipped_events.insert(kind.clone(), count);
                entry.dirty = true;
                if entry.skipped_kinds.insert(kind.clone()) {
                    self.log(
                        Level::Warning,
                        Some(host),
                        format!("the agent sends {kind} events, which this console does not know; they are skipped (update the console)"),
                    );
                }
            }
            LinkMessage::Lost {
                host,
                stable_id,
                reason,
            } => {
                let Some(entry) = self.fleet.hosts.get_mut(&host) else {
                    return;
                };
                let current = entry.peer.as_ref().map(|p| p.conn.stable_id());
                if stable_id.is_some() && current != stable_id {
                    return;
                }
                entry.peer = None;
                let was = entry.view.link;
                entry.view.link = LinkState::Unreachable;
                // Known expired: no retry will help, only enrolling the host again.
                let reason = if entry.view.cert_expired() {
                    format!(
                        "certificate expired: re-enroll (on the host: dunes-agent token; then: dunes-console ctl host add {} --token TOKEN); last error: {reason}",
                        entry.view.record.address
                    )
                } else {
                    reason
                };
                entry.view.link_error = Some(reason.clone());
                entry.dirty = true;
                if was != LinkState::Unreachable {
                    self.log(Level::Warning, Some(host), format!("unreachable: {reason}"));
                }
            }
        }
    }

    fn agent_event(&mut self, host: HostId, event: AgentEvent) {
        if let AgentEvent::TransferProgress {
            ticket,
            bytes_done,
            bytes_total,
        } = &event
        {
            self.migrations
                .transfer_progress(ticket, *bytes_done, *bytes_total);
            return;
        }
        if let AgentEvent::Samples(samples) = &event {
            // Only from a host the engine knows: a removed host's last batch is dropped.
            if self.fleet.hosts.contains_key(&host) {
                let writes = self.statistics.series.ingest(&host, samples);
                self.store.put_stats(writes);
            }
            return;
        }
        // A VM that leaves its source at the end of a migration moved; it was not deleted.
        let migrated_to = match &event {
            AgentEvent::VmRemoved { name } => {
                self.note_departed(&host, name);
                self.migrations
                    .journals
                    .values()
                    .filter(|m| &m.vm == name)
                    .max_by_key(|m| m.id)
                    .filter(|m| m.from == host && m.step.is_committed())
                    .map(|m| m.to.clone())
            }
            _ => None,
        };
        let Some(entry) = self.fleet.hosts.get_mut(&host) else {
            return;
        };
        let mut note = None;
        let mut readings_only = false;
        match event {
            AgentEvent::HostStatus(status) => {
                readings_only = entry
                    .view
                    .status
                    .is_some_and(|old| same_but_readings(&old, &status));
                entry.view.status = Some(status);
            }
            AgentEvent::VmChanged(vm) => {
                match entry.view.vms.iter_mut().find(|v| v.name == vm.name) {
                    Some(old) => {
                        if old.state != vm.state {
                            note = Some(format!("{} {} is {}", workload(&vm), vm.name, vm.state));
                        }
                        *old = vm.clone();
                    }
                    None => {
                        note = Some(format!(
                            "{} {} appeared ({})",
                            workload(&vm),
                            vm.name,
                            vm.state
                        ));
                        entry.view.vms.push(vm.clone());
                        entry.view.vms.sort_by(|a, b| a.name.cmp(&b.name));
                    }
                }
                self.store.put_vm(host.clone(), &vm);
            }
            AgentEvent::VmRemoved { name } => {
                let what = entry.view.vm(&name).map_or("VM", workload);
                entry.view.vms.retain(|v| v.name != name);
                note = Some(match migrated_to {
                    Some(to) => format!("{what} {name} left this host: it runs on {to} now"),
                    None => format!("{what} {name} was deleted"),
                });
                self.store.delete_vm(host.clone(), name);
            }
            AgentEvent::Inventory(inventory) => {
                entry.view.record.inventory = Some(*inventory);
                self.store.put_host(&entry.view.record);
            }
            AgentEvent::VmList(vms) => {
                self.store.replace_vms(host.clone(), &vms);
                entry.view.vms = vms;
            }
            _ => {}
        }
        if readings_only {
            entry.readings_dirty = true;
        } else {
            entry.dirty = true;
        }
        if let Some(message) = note {
            self.log(Level::Info, Some(host), message);
        }
    }

    /// A VM as an agent's reply reports it: into the view and the store.
    pub(in crate::engine) fn apply_vm(&mut self, host: &HostId, vm: &VmStatus) {
        let Some(entry) = self.fleet.hosts.get_mut(host) else {
            return;
        };
        match entry.view.vms.iter_mut().find(|v| v.name == vm.name) {
            Some(old) => *old = vm.clone(),
            None => {
                entry.view.vms.push(vm.clone());
                entry.view.vms.sort_by(|a, b| a.name.cmp(&b.name));
            }
        }
        entry.dirty = true;
        self.store.put_vm(host.clone(), vm);
    }

    /// Keeps what a cost report needs of a workload about to go from `host`'s view.
    fn note_departed(&mut self, host: &HostId, name: &VmName) {
        let Some(entry) = self.fleet.hosts.get(host) else {
            return;
        };
        let (Some(vm), Some(inv)) = (entry.view.vm(name), entry.view.inventory()) else {
            return;
        };
        let owner = self
            .services
            .instances
            .values()
            .find(|i| &i.host == host && &i.vm == name)
            .map(|i| (i.service.clone(), i.app.clone()));
        let record = crate::engine::store::DepartedRecord {
            vm: name.clone(),
            host: host.clone(),
            site: inv.site.name.to_string(),
            vcpus: vm.vcpus,
            disk_bytes: vm.disk_bytes,
            prices: inv.prices,
            owner,
            removed_at_secs: crate::engine::records::now_ms() / 1000,
        };
        self.store.put_departed(record);
        // Everything it measured is stored now: a report right after it went counts all.
        let writes = self.statistics.series.flush_subject(
            &crate::engine::statistics::series::Subject::Workload(name.clone()),
            crate::engine::records::now_ms() / 1000,
        );
        self.store.put_stats(writes);
    }

    pub(in crate::engine) fn remove_vm(&mut self, host: &HostId, name: &VmName) {
        self.note_departed(host, name);
        let Some(entry) = self.fleet.hosts.get_mut(host) else {
            return;
        };
        entry.view.vms.retain(|v| &v.name != name);
        entry.dirty = true;
        self.store.delete_vm(host.clone(), name.clone());
    }
}

/// Whether two statuses of a host differ only in what changes every second (CPU load,
/// memory in use, uptime) and not in what its card shows: its running VMs, and its storage
/// in use to the GiB.
fn same_but_readings(old: &HostStatus, new: &HostStatus) -> bool {
    old.vms_running == new.vms_running
        && old.storage_free_mib / 1024 == new.storage_free_mib / 1024
        && old.memory_total_mib == new.memory_total_mib
}

/// What the operator calls a workload: a VM, or a process of the process runtime.
fn workload(vm: &VmStatus) -> &'static str {
    match vm.runtime {
        dunes_shared::model::RuntimeKind::Process => "process",
        _ => "VM",
    }
}
