//! The enrollment gate: the engine answers whether an agent may take a host id, with its live
//! host list, and records an enrolled host before anyone is told it is added.

use dunes_shared::pki::Fingerprint;

use crate::engine::{
    HostAdded, Reply,
    actor::{Actor, now_ms},
    fleet::enroll::{self, Enrolled},
    records::{HostRecord, Level},
};

impl Actor {
    /// An enrollment finished: the host is recorded, linked and published; the caller hears
    /// of it once the record is committed.
    pub(in crate::engine) fn enrolled(
        &mut self,
        enrolled: Enrolled,
        address: String,
        reply: Reply<HostAdded>,
    ) {
        let Enrolled {
            host_id,
            fingerprint,
            hold,
        } = enrolled;
        if let Some(old) = self.fleet.hosts.remove(&host_id)
            && old.view.record.fingerprint != fingerprint
        {
            self.log(
                Level::Warning,
                Some(host_id.clone()),
                format!("host replaced: now pinned to the new key {fingerprint}"),
            );
        }
        let record = HostRecord {
            id: host_id.clone(),
            address: address.clone(),
            fingerprint,
            enrolled_at_ms: now_ms(),
            inventory: None,
            cert_expires_ms: None,
            maintenance: None,
        };
        self.store.put_host(&record);
        self.add_host_entry(record, Vec::new());
        self.log(
            Level::Info,
            Some(host_id.clone()),
            format!("enrolled at {address}, key {fingerprint}"),
        );
        // Whoever awaits the reply finds the host in the snapshot, and on disk.
        self.publish();
        self.reply_after_commit(
            reply,
            HostAdded {
                host_id,
                fingerprint,
            },
        );
        // Released only now that the host is in the list the gate checks.
        drop(hold);
    }

    /// May this enrollment take its host id? Not if another enrollment holds it, nor if an
    /// enrolled host has it with another key (unless the operator asked to replace it).
    pub(in crate::engine) fn gate(&mut self, request: enroll::GateRequest) {
        let enroll::GateRequest {
            host_id,
            fingerprint,
            replace,
            answer,
        } = request;
        let taken_by: Option<Fingerprint> = self
            .fleet
            .hosts
            .get(&host_id)
            .map(|e| e.view.record.fingerprint)
            .filter(|enrolled| *enrolled != fingerprint && !replace);
        let verdict = match taken_by {
            Some(enrolled) => Err(enroll::EnrollError::HostIdTaken {
                host: host_id,
                enrolled,
            }),
            None => enroll::HostIdHold::take(host_id.clone(), &self.fleet.enrolling)
                .ok_or(enroll::EnrollError::HostIdBusy(host_id)),
        };
        // If the enrollment is gone already, its hold is dropped here and released.
        let _ = answer.send(verdict);
    }
}
