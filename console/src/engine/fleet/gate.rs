//! The enrollment gate: the engine answers whether an agent may take a host id, with its live
//! host list, and records an enrolled host before anyone is told it is added.

use crate::engine::{
    HostAdded, Reply,
    actor::Actor,
    fleet::enroll::Enrolled,
    records::{HostRecord, Level, now_ms},
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
}
