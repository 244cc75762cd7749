//! Changes to one VM that its agent carries out (new resources, a copy), checked first
//! against what the engine knows of its host, so a change that cannot fit is refused with
//! its reason before anything is asked of an agent.

use dunes_shared::model::{HostId, RuntimeKind, VmName, VmState, VmStatus};

use crate::engine::{
    EngineError, HostView, Reply, VmCloned,
    actor::{Actor, Internal},
    fleet::state::VmCopied,
    migration::{MigrationOptions, MigrationOrigin},
    records::Level,
    services::views::host_offer,
};

/// Why `vm` on `host` cannot get these vCPUs and memory, if it cannot.
pub fn resize_refusal(
    vm: &VmStatus,
    host: &HostView,
    vcpus: Option<u32>,
    memory_mib: Option<u64>,
) -> Option<String> {
    if vm.runtime != RuntimeKind::Libvirt {
        return Some(format!(
            "{} is a process instance: its vCPUs and memory are its application's, set in its service",
            vm.name
        ));
    }
    let id = host.id();
    let offer = host_offer(host)?;
    let cpus = host.inventory().map_or(0, |i| i.cpus);
    if let Some(vcpus) = vcpus.filter(|&v| cpus > 0 && v > cpus) {
        return Some(format!(
            "{id} has {cpus} CPUs, fewer than the {vcpus} vCPUs asked for {}",
            vm.name
        ));
    }
    if let Some(memory_mib) = memory_mib {
        // A running VM's memory is counted as taken already; it gives that back.
        let held = if vm.state.is_active() {
            vm.memory_mib
        } else {
            0
        };
        let available = offer.free.memory_mib.saturating_add(held);
        if memory_mib > available {
            return Some(format!(
                "{id} has {available} MiB of memory free for {}, less than the {memory_mib} MiB asked",
                vm.name
            ));
        }
    }
    None
}

/// Why `vm` on `from` cannot be copied as `new_name` onto `to` (its own host, or another
/// where the copy migrates after it is made), if it cannot: every reason at once.
pub fn clone_refusals(
    vm: &VmStatus,
    from: &HostView,
    to: &HostView,
    new_name: &VmName,
) -> Vec<String> {
    let mut reasons = Vec::new();
    if vm.runtime != RuntimeKind::Libvirt {
        reasons.push(format!(
            "{} is a process instance; only VMs are cloned",
            vm.name
        ));
        return reasons;
    }
    if vm.disks.as_ref().is_some_and(Vec::is_empty) {
        reasons.push(format!(
            "{} has no disk in {}'s storage (it was defined outside Dunes)",
            vm.name,
            from.id()
        ));
    }
    if vm.state != VmState::Shutoff {
        reasons.push(format!(
            "{} is {}; stop it first: a clone copies its disks at rest",
            vm.name,
            vm.state.as_str()
        ));
    }
    if let Some(n) = vm.snapshots.filter(|&n| n > 0) {
        reasons.push(format!(
            "{} has {n} snapshot(s), which its disk holds and a copy would carry unseen; delete them first",
            vm.name
        ));
    }
    let disk_mib = vm.disk_bytes.div_ceil(1024 * 1024);
    for host in [from, to] {
        let id = host.id();
        if host.vm(new_name).is_some() {
            reasons.push(format!("{id} already has a VM named {new_name}"));
        }
        match host_offer(host) {
            None => reasons.push(format!("{id}: its inventory is not known yet")),
            Some(offer) => {
                if !offer.online {
                    reasons.push(format!("{id}: unreachable"));
                }
                if offer.free.storage_mib < disk_mib {
                    reasons.push(format!(
                        "{id}: storage {} MiB free < {disk_mib} MiB needed for the copy",
                        offer.free.storage_mib
                    ));
                }
            }
        }
        if from.id() == to.id() {
            break;
        }
    }
    if from.id() != to.id() && to.record.maintenance.is_some() {
        reasons.push(format!("{}: in maintenance, takes nothing new", to.id()));
    }
    reasons
}

impl Actor {
    /// Copies a stopped VM on its host, then, when `to` is another host, migrates the copy
    /// there: the disk travels the way every migration's does, journaled.
    pub(in crate::engine) fn clone_vm(
        &mut self,
        host: HostId,
        name: VmName,
        new_name: VmName,
        to: Option<HostId>,
        reply: Reply<VmCloned>,
    ) {
        let to = to.unwrap_or_else(|| host.clone());
        let checked = self.vm_of(&host, &name).and_then(|vm| {
            let target = self
                .fleet
                .hosts
                .get(&to)
                .ok_or_else(|| EngineError::UnknownHost(to.clone()))?;
            let from = &self.fleet.hosts[&host].view;
            let mut reasons = clone_refusals(&vm, from, &target.view, &new_name);
            if reasons.is_empty() && to != host {
                // What the copy's migration will check, checked before it is made.
                let mut copy = vm.clone();
                copy.name = new_name.clone();
                if let Err(more) = crate::engine::migration::precheck(
                    &copy,
                    from,
                    &target.view,
                    &self.service_views(),
                    &self.migrations.open(),
                ) {
                    reasons.extend(more);
                }
            }
            if reasons.is_empty() {
                self.client(&host)
            } else {
                Err(EngineError::Invalid(format!(
                    "{name} cannot be cloned as {new_name}: {}",
                    reasons.join("; ")
                )))
            }
        });
        let client = match checked {
            Ok(client) => client,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let onto = if to == host {
            String::new()
        } else {
            format!(", to go to {to}")
        };
        let what = format!("cloning VM {name} as {new_name}{onto}");
        self.log(Level::Info, Some(host.clone()), what.clone());
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            let result = client
                .call(dunes_shared::protocol::CloneVm {
                    name: name.clone(),
                    new_name,
                })
                .await;
            let copied = VmCopied {
                host,
                source: name,
                to,
                what,
                result,
                reply,
            };
            let _ = internal.send(Internal::VmCopied(copied)).await;
        });
    }

    /// Takes in a copy its agent made (or its failure); a copy for another host starts its
    /// migration there.
    pub(in crate::engine) fn vm_copied(&mut self, copied: VmCopied) {
        let VmCopied {
            host,
            source,
            to,
            what,
            result,
            reply,
        } = copied;
        match result {
            Ok(status) => {
                self.apply_vm(&host, &status);
                self.log(
                    Level::Info,
                    Some(host.clone()),
                    format!("VM {} is a copy of {source}", status.name),
                );
                let migration = if to == host {
                    None
                } else {
                    match self.start_migration(
                        &host,
                        &status.name,
                        &to,
                        MigrationOrigin::Operator,
                        MigrationOptions::default(),
                    ) {
                        Ok(journal) => Some(journal),
                        Err(e) => {
                            let e = format!(
                                "the copy {} stays on {host}: its move to {to} cannot start: {e}",
                                status.name
                            );
                            self.log(Level::Error, Some(host), e.clone());
                            self.store.after_commit(Box::new(move |_| {
                                let _ = reply.send(Err(EngineError::Invalid(e)));
                            }));
                            return;
                        }
                    }
                };
                self.reply_after_commit(
                    reply,
                    VmCloned {
                        host,
                        status,
                        migration,
                    },
                );
            }
            Err(e) => {
                self.log(Level::Error, Some(host), format!("{what} failed: {e}"));
                self.store.after_commit(Box::new(move |_| {
                    let _ = reply.send(Err(e));
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::statistics::capacity::tests::host;

    #[test]
    fn memory_beyond_what_the_host_has_free_is_refused() {
        // 8 GiB, of which vm0 holds 2 GiB and vm1 4 GiB while they run.
        let mut h = host("a1", "lsn", 4, 8192, &[(2, 2048), (1, 4096)]);
        let vm0 = h.vms[0].clone();
        // vm0 may grow into the 2 GiB nobody holds, plus its own.
        assert_eq!(resize_refusal(&vm0, &h, Some(4), Some(4096)), None);
        assert_eq!(
            resize_refusal(&vm0, &h, None, Some(4097)).unwrap(),
            "a1 has 4096 MiB of memory free for vm0, less than the 4097 MiB asked"
        );
        assert_eq!(
            resize_refusal(&vm0, &h, Some(5), None).unwrap(),
            "a1 has 4 CPUs, fewer than the 5 vCPUs asked for vm0"
        );
        // Off, it holds nothing: the 4 GiB vm1 leaves is all there is for it.
        h.vms[0].state = VmState::Shutoff;
        let off = h.vms[0].clone();
        assert!(resize_refusal(&off, &h, None, Some(4097)).is_some());
        assert_eq!(resize_refusal(&off, &h, None, Some(4096)), None);
    }

    #[test]
    fn a_clone_needs_a_stopped_vm_a_free_name_and_room_for_its_disk() {
        let mut a = host("a1", "lsn", 4, 8192, &[(1, 512), (1, 512)]);
        let b = host("b1", "gva", 4, 8192, &[(1, 512)]);
        let copy = VmName::new("copy").unwrap();
        let running = a.vms[0].clone();
        assert_eq!(
            clone_refusals(&running, &a, &a, &copy),
            vec!["vm0 is running; stop it first: a clone copies its disks at rest"]
        );
        a.vms[0].state = VmState::Shutoff;
        let vm0 = a.vms[0].clone();
        assert!(clone_refusals(&vm0, &a, &a, &copy).is_empty());
        assert!(clone_refusals(&vm0, &a, &b, &copy).is_empty());
        // The copy is made on its source's host first: a name must be free on both.
        assert_eq!(
            clone_refusals(&vm0, &a, &b, &VmName::new("vm1").unwrap()),
            vec!["a1 already has a VM named vm1"]
        );
        assert_eq!(
            clone_refusals(&vm0, &a, &b, &VmName::new("vm0").unwrap()),
            vec![
                "a1 already has a VM named vm0",
                "b1 already has a VM named vm0"
            ]
        );
        // 600 MiB free on each host; a 700 MiB disk fits on neither.
        let mut big = vm0.clone();
        big.disk_bytes = 700 << 20;
        assert_eq!(
            clone_refusals(&big, &a, &b, &copy),
            vec![
                "a1: storage 600 MiB free < 700 MiB needed for the copy",
                "b1: storage 600 MiB free < 700 MiB needed for the copy",
            ]
        );
        let mut snapped = vm0;
        snapped.snapshots = Some(2);
        assert_eq!(clone_refusals(&snapped, &a, &a, &copy).len(), 1);
    }
}
