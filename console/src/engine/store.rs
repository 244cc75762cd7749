//! The console's redb store: enrolled hosts, the last known VMs of each host, the event log.
//!
//! Reads happen once at start. Writes go to a dedicated thread in order and are committed in
//! batches, so a commit's fsync never blocks the engine.

use std::{path::Path, sync::mpsc, thread};

use dunes_shared::{
    model::{HostId, HostInventory, VmName, VmStatus},
    pki::Fingerprint,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");

/// Events kept in the store; older ones are pruned.
pub const EVENTS_KEPT: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store {path} is in use by another console")]
    InUse { path: String },
    #[error("store operation failed")]
    Redb(#[from] redb::Error),
    #[error("a stored record does not decode")]
    Decode(#[from] postcard::Error),
    #[error("the store writer stopped")]
    WriterGone,
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(e.into())
            }
        }
    )*};
}
redb_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// An enrolled host, as the operator added it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub id: HostId,
    /// `host:port` as the operator typed it.
    pub address: String,
    /// The agent's key, pinned at enrollment.
    pub fingerprint: Fingerprint,
    pub enrolled_at_ms: u64,
    /// Last inventory seen, so an unreachable host still shows what it is.
    pub inventory: Option<HostInventory>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warning,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub seq: u64,
    pub time_ms: u64,
    pub level: Level,
    pub host: Option<HostId>,
    pub message: String,
}

/// What the store held at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub hosts: Vec<HostRecord>,
    pub vms: Vec<(HostId, VmStatus)>,
    pub events: Vec<EventRecord>,
}

enum Op {
    PutHost(Box<HostRecord>),
    PutVm(HostId, VmStatus),
    DeleteVm(HostId, VmName),
    ReplaceVms(HostId, Vec<VmStatus>),
    PutEvent(EventRecord),
    Flush(oneshot::Sender<Result<(), String>>),
}

/// Sends writes to the store thread.
#[derive(Clone)]
pub struct Store {
    ops: mpsc::Sender<Op>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

fn vm_key(host: &HostId, vm: &VmName) -> String {
    format!("{host}/{vm}")
}

impl Store {
    /// Opens (or creates) the store, reads it, and starts the writer thread.
    pub fn open(path: &Path) -> Result<(Store, Loaded), StoreError> {
        let db = match Database::create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::InUse {
                    path: path.display().to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        {
            let tx = db.begin_write()?;
            tx.open_table(HOSTS)?;
            tx.open_table(VMS)?;
            tx.open_table(EVENTS)?;
            tx.commit()?;
        }
        let loaded = load(&db)?;
        let (ops, rx) = mpsc::channel();
        thread::Builder::new()
            .name("store".into())
            .spawn(move || writer(db, rx))
            .map_err(|e| StoreError::Redb(redb::Error::Io(e)))?;
        Ok((Store { ops }, loaded))
    }

    fn send(&self, op: Op) {
        // A dead writer is noticed at the next flush.
        let _ = self.ops.send(op);
    }

    pub fn put_host(&self, host: HostRecord) {
        self.send(Op::PutHost(Box::new(host)));
    }
    pub fn put_vm(&self, host: HostId, vm: VmStatus) {
        self.send(Op::PutVm(host, vm));
    }
    pub fn delete_vm(&self, host: HostId, vm: VmName) {
        self.send(Op::DeleteVm(host, vm));
    }
    pub fn replace_vms(&self, host: HostId, vms: Vec<VmStatus>) {
        self.send(Op::ReplaceVms(host, vms));
    }
    pub fn put_event(&self, event: EventRecord) {
        self.send(Op::PutEvent(event));
    }

    /// Waits until everything sent so far is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.ops
            .send(Op::Flush(tx))
            .map_err(|_| StoreError::WriterGone)?;
        rx.await
            .map_err(|_| StoreError::WriterGone)?
            .map_err(|e| StoreError::Redb(redb::Error::Io(std::io::Error::other(e))))
    }
}

fn load(db: &Database) -> Result<Loaded, StoreError> {
    let tx = db.begin_read()?;
    let mut loaded = Loaded::default();
    for item in tx.open_table(HOSTS)?.iter()? {
        let (_, v) = item?;
        loaded.hosts.push(postcard::from_bytes(v.value())?);
    }
    for item in tx.open_table(VMS)?.iter()? {
        let (k, v) = item?;
        let Some(host) = k
            .value()
            .split_once('/')
            .and_then(|(h, _)| HostId::new(h).ok())
        else {
            continue;
        };
        loaded.vms.push((host, postcard::from_bytes(v.value())?));
    }
    let events = tx.open_table(EVENTS)?;
    for item in events.iter()?.rev().take(1000) {
        let (_, v) = item?;
        loaded.events.push(postcard::from_bytes(v.value())?);
    }
    loaded.events.reverse();
    Ok(loaded)
}

fn writer(db: Database, rx: mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let mut flushes = Vec::new();
        let result = apply(&db, batch, &mut flushes);
        if let Err(e) = &result {
            tracing::error!("store write failed: {}", dunes_shared::error_chain(e));
        }
        for f in flushes {
            let _ = f.send(
                result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| dunes_shared::error_chain(e)),
            );
        }
    }
}

fn apply(
    db: &Database,
    batch: Vec<Op>,
    flushes: &mut Vec<oneshot::Sender<Result<(), String>>>,
) -> Result<(), StoreError> {
    let tx = db.begin_write()?;
    {
        let mut hosts = tx.open_table(HOSTS)?;
        let mut vms = tx.open_table(VMS)?;
        let mut events = tx.open_table(EVENTS)?;
        for op in batch {
            match op {
                Op::PutHost(h) => {
                    hosts.insert(h.id.as_str(), postcard::to_allocvec(&h)?.as_slice())?;
                }
                Op::PutVm(host, vm) => {
                    vms.insert(
                        vm_key(&host, &vm.name).as_str(),
                        postcard::to_allocvec(&vm)?.as_slice(),
                    )?;
                }
                Op::DeleteVm(host, name) => {
                    vms.remove(vm_key(&host, &name).as_str())?;
                }
                Op::ReplaceVms(host, list) => {
                    let prefix = format!("{host}/");
                    let end = format!("{host}0"); // '0' sorts right after '/'
                    let old: Vec<String> = vms
                        .range(prefix.as_str()..end.as_str())?
                        .filter_map(|i| i.ok().map(|(k, _)| k.value().to_string()))
                        .collect();
                    for k in old {
                        vms.remove(k.as_str())?;
                    }
                    for vm in list {
                        vms.insert(
                            vm_key(&host, &vm.name).as_str(),
                            postcard::to_allocvec(&vm)?.as_slice(),
                        )?;
                    }
                }
                Op::PutEvent(e) => {
                    events.insert(e.seq, postcard::to_allocvec(&e)?.as_slice())?;
                    if e.seq >= EVENTS_KEPT {
                        events.remove(e.seq - EVENTS_KEPT)?;
                    }
                }
                Op::Flush(tx) => flushes.push(tx),
            }
        }
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dunes_shared::model::VmState;

    fn vm(name: &str, state: VmState) -> VmStatus {
        VmStatus {
            uuid: format!("u-{name}"),
            name: VmName::new(name).unwrap(),
            state,
            vcpus: 1,
            memory_mib: 64,
            template: None,
            disk_bytes: 0,
        }
    }

    #[tokio::test]
    async fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let h1 = HostId::new("h1").unwrap();
        let h10 = HostId::new("h10").unwrap();
        {
            let (store, loaded) = Store::open(&path).unwrap();
            assert!(loaded.hosts.is_empty());
            store.put_host(HostRecord {
                id: h1.clone(),
                address: "127.0.0.1:1".into(),
                fingerprint: Fingerprint([1; 32]),
                enrolled_at_ms: 5,
                inventory: None,
            });
            store.put_vm(h1.clone(), vm("a", VmState::Running));
            store.put_vm(h1.clone(), vm("b", VmState::Running));
            store.put_vm(h10.clone(), vm("c", VmState::Shutoff));
            store.replace_vms(
                h1.clone(),
                vec![vm("b", VmState::Shutoff), vm("d", VmState::Running)],
            );
            store.delete_vm(h1.clone(), VmName::new("d").unwrap());
            for seq in 0..3 {
                store.put_event(EventRecord {
                    seq,
                    time_ms: seq,
                    level: Level::Info,
                    host: Some(h1.clone()),
                    message: format!("e{seq}"),
                });
            }
            store.flush().await.unwrap();
            // A second open of the same file is refused with a clear error.
            let err = Store::open(&path).unwrap_err();
            assert!(matches!(err, StoreError::InUse { .. }), "{err}");
        }
        // The writer thread holds the database until its channel closes.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let (_, loaded) = loop {
            match Store::open(&path) {
                Ok(r) => break r,
                Err(StoreError::InUse { .. }) if std::time::Instant::now() < deadline => {
                    tokio::task::yield_now().await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(loaded.hosts.len(), 1);
        assert_eq!(loaded.hosts[0].address, "127.0.0.1:1");
        let mut vms: Vec<(String, String, VmState)> = loaded
            .vms
            .iter()
            .map(|(h, v)| (h.to_string(), v.name.to_string(), v.state))
            .collect();
        vms.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        assert_eq!(
            vms,
            vec![
                ("h1".into(), "b".into(), VmState::Shutoff),
                ("h10".into(), "c".into(), VmState::Shutoff),
            ]
        );
        assert_eq!(
            loaded.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
    }
}
