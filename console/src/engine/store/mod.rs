//! The console's redb store: enrolled hosts, the last known VMs of each host, the event log.
//!
//! Reads happen once at start. The engine collects its writes while it handles a message
//! and hands them over as one batch at the end ([`Store::submit`]); a dedicated thread commits
//! batches in order, then runs their acknowledgements, so a reply that waits for one is sent
//! only once its record is on disk. The queue of batches is bounded: when the writer falls
//! behind, `submit` waits, the engine stops taking messages, and the links' bounded queues and
//! QUIC flow control slow the agents down. Nothing is dropped.
//!
//! Records are storage types ([`rows`]), never wire types; the `meta` table holds the schema
//! version, and an older store is upgraded when it is opened.

mod rows;
mod stats;
mod v1;

pub use self::stats::StatsReader;

use std::{
    path::Path,
    sync::{Arc, Condvar, Mutex, PoisonError},
    thread,
    time::Duration,
};

use dunes_shared::{
    error_chain,
    model::{HostId, VmName, VmStatus},
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::mpsc;

use self::rows::{EventRow, HostRow, VmRow};
use super::records::{EventRecord, HostRecord, InstanceRecord, ServiceRecord};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// Services, by name: the operator's file as written (a table an older console ignores).
const SERVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("services");
/// Instances of services, by `service/application/index`: written before the VM is created
/// or removed, so a deploy cut short is known for what it did.
const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
/// Migration journals by id; a finished one stays as history.
const MIGRATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("migrations");
/// Autoscaling of applications, by `service/app`: the rule and the instance count it set.
const AUTOSCALE: TableDefinition<&str, &[u8]> = TableDefinition::new("autoscale");
/// Workloads that were deleted, by `(when, name)`: what their cost needs after they went.
const DEPARTED: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("departed");
/// Operators, by name: their role and key; a revoked one stays, marked (a table an older
/// console ignores).
const OPERATORS: TableDefinition<&str, &[u8]> = TableDefinition::new("operators");
/// The audit log, by sequence number from 1: appended to, never rewritten (a table an
/// older console ignores).
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// The image library, by name (a table an older console ignores).
const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");
/// Service networks by name.
const NETWORKS: TableDefinition<&str, &[u8]> = TableDefinition::new("networks");
/// How long a departed workload is remembered: as long as its hourly series.
const DEPARTED_KEPT_SECS: u64 = 366 * 86_400;

const SCHEMA_KEY: &str = "schema_version";
/// 1: postcard records of the model types (the first release, no `meta` table).
/// 2: MessagePack storage rows.
pub const SCHEMA_VERSION: u64 = 2;

/// Events kept in the store; older ones are pruned.
pub const EVENTS_KEPT: u64 = 10_000;
/// Batches waiting for the writer; `submit` waits beyond this.
const BATCH_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store {path} is in use by another console")]
    InUse { path: String },
    #[error(
        "the store was written by a newer console (schema {found}); this one reads up to {SCHEMA_VERSION}"
    )]
    TooNew { found: u64 },
    #[error("store operation failed")]
    Redb(#[from] redb::Error),
    #[error("a stored record does not decode: {0}")]
    Decode(String),
    #[error("a record does not encode")]
    Encode(#[from] rmp_serde::encode::Error),
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

/// What the store held at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub hosts: Vec<HostRecord>,
    pub vms: Vec<(HostId, VmStatus)>,
    pub events: Vec<EventRecord>,
    pub services: Vec<ServiceRecord>,
    pub instances: Vec<InstanceRecord>,
    pub migrations: Vec<crate::engine::migration::MigrationJournal>,
    pub autoscale: Vec<AutoscaleRecord>,
    pub operators: Vec<crate::engine::operators::OperatorRecord>,
    pub images: Vec<crate::engine::images::ImageRecord>,
    pub networks: Vec<crate::engine::networks::NetworkRecord>,
    /// The audit log's last record, which the next one follows.
    pub audit_last: Option<crate::engine::audit::AuditRecord>,
    /// What each time series had open at the last flush.
    pub stats_open: Vec<crate::engine::statistics::series::OpenState>,
    /// The schema the file had before this open upgraded it, if it did.
    pub upgraded_from: Option<u64>,
}

/// An application's autoscaling: its rule, the instance count it last set, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoscaleRecord {
    pub service: dunes_shared::model::ServiceName,
    pub app: dunes_shared::model::AppName,
    pub rule: crate::engine::autoscale::AutoscaleRule,
    pub desired: u32,
    #[serde(default)]
    pub last_change_secs: Option<u64>,
}

/// A workload that was deleted, as it was then: where it ran, what it held and whose it was,
/// so that cost reports over a range it was part of still count it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepartedRecord {
    pub vm: VmName,
    pub host: HostId,
    pub site: String,
    pub vcpus: u32,
    pub disk_bytes: u64,
    pub prices: dunes_shared::model::Prices,
    #[serde(default)]
    pub owner: Option<(
        dunes_shared::model::ServiceName,
        dunes_shared::model::AppName,
    )>,
    pub removed_at_secs: u64,
}

impl AutoscaleRecord {
    pub fn key(&self) -> String {
        format!("{}/{}", self.service, self.app)
    }
}

enum Op {
    PutInstance(rows::InstanceRow),
    PutMigration(rows::MigrationRow),
    DeleteInstance(String),
    PutService(rows::ServiceRow),
    DeleteService(String),
    PutHost(Box<HostRow>),
    PutVm(HostId, VmRow),
    DeleteVm(HostId, VmName),
    ReplaceVms(HostId, Vec<VmRow>),
    PutEvent(EventRow),
    Stats(crate::engine::statistics::series::StatsWrite),
    PutAutoscale(Box<AutoscaleRecord>),
    PutOperator(Box<crate::engine::operators::OperatorRecord>),
    PutAudit(Box<crate::engine::audit::AuditRecord>),
    DeleteAutoscale(String),
    PutDeparted(Box<DepartedRecord>),
    PutImage(Box<crate::engine::images::ImageRecord>),
    DeleteImage(dunes_shared::model::ImageName),
    PutNetwork(Box<crate::engine::networks::NetworkRecord>),
    DeleteNetwork(dunes_shared::model::NetworkName),
}

/// Runs once the batch it came with is committed (or failed), with the error as one line.
pub type Ack = Box<dyn FnOnce(Result<(), String>) + Send>;

struct Batch {
    /// Batches are numbered as they are submitted, from 1.
    seq: u64,
    ops: Vec<Op>,
    acks: Vec<Ack>,
}

/// How far the writer has got: the last batch it committed (or failed), and whether it has
/// stopped. A reader waits on it for the writes the engine handed out before the reader was
/// made, so that a query never misses what the engine no longer holds in memory.
#[derive(Debug, Default)]
pub struct Committed {
    through: Mutex<(u64, bool)>,
    changed: Condvar,
}

impl Committed {
    fn update(&self, f: impl FnOnce(&mut (u64, bool))) {
        f(&mut self.through.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.notify_all();
    }

    /// Blocks (off the engine's thread) until batch `seq` is through the writer, the writer
    /// has stopped, or `limit` has passed; then a read goes on with what is committed.
    pub fn wait_through(&self, seq: u64, limit: Duration) {
        let through = self.through.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = self
            .changed
            .wait_timeout_while(through, limit, |(done, stopped)| *done < seq && !*stopped);
    }
}

/// Marks the writer stopped when its thread ends, however it ends.
struct StoppedOnDrop(Arc<Committed>);

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        self.0.update(|t| t.1 = true);
    }
}

/// The engine's side of the store: collects writes, submits them as batches.
pub struct Store {
    db: Arc<Database>,
    batches: mpsc::Sender<Batch>,
    pending: Vec<Op>,
    acks: Vec<Ack>,
    /// The number of the last batch submitted.
    submitted: u64,
    committed: Arc<Committed>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// Reads the audit log off the engine's thread.
#[derive(Debug)]
pub struct AuditReader {
    db: Arc<Database>,
    written: (Arc<Committed>, u64),
}

impl AuditReader {
    /// Every record by its key, each decoded or with why it does not; blocking.
    #[allow(clippy::type_complexity)]
    pub fn read_all(
        &self,
    ) -> Result<Vec<(u64, Result<crate::engine::audit::AuditRecord, String>)>, StoreError> {
        self.written
            .0
            .wait_through(self.written.1, std::time::Duration::from_secs(10));
        let tx = self.db.begin_read()?;
        let table = tx.open_table(AUDIT)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            out.push((
                k.value(),
                decode::<crate::engine::audit::AuditRecord>(v.value()).map_err(|e| e.to_string()),
            ));
        }
        Ok(out)
    }
}

fn vm_key(host: &HostId, vm: &VmName) -> String {
    format!("{host}/{vm}")
}

fn encode<T: Serialize>(row: &T) -> Result<Vec<u8>, StoreError> {
    Ok(rmp_serde::to_vec_named(row)?)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Decode(e.to_string()))
}

impl Store {
    /// Opens (or creates) the store, upgrades an older schema, reads it, and starts the
    /// writer thread.
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
        let upgraded_from = prepare(&db)?;
        let mut loaded = load(&db)?;
        loaded.upgraded_from = upgraded_from;
        let (batches, rx) = mpsc::channel(BATCH_QUEUE);
        let db = Arc::new(db);
        let for_writer = db.clone();
        let committed = Arc::new(Committed::default());
        let progress = committed.clone();
        thread::Builder::new()
            .name("store".into())
            .spawn(move || writer(for_writer, rx, progress))
            .map_err(|e| StoreError::Redb(redb::Error::Io(e)))?;
        Ok((
            Store {
                db,
                batches,
                pending: Vec::new(),
                acks: Vec::new(),
                submitted: 0,
                committed,
            },
            loaded,
        ))
    }

    pub fn put_autoscale(&mut self, record: &AutoscaleRecord) {
        self.pending
            .push(Op::PutAutoscale(Box::new(record.clone())));
    }
    pub fn put_audit(&mut self, record: &crate::engine::audit::AuditRecord) {
        self.pending.push(Op::PutAudit(Box::new(record.clone())));
    }

    /// Reads the audit log as committed, once what was handed out before is written.
    pub fn audit_reader(&self) -> AuditReader {
        let unsent = !self.pending.is_empty() || !self.acks.is_empty();
        AuditReader {
            db: self.db.clone(),
            written: (self.committed.clone(), self.submitted + u64::from(unsent)),
        }
    }

    pub fn put_operator(&mut self, record: &crate::engine::operators::OperatorRecord) {
        self.pending.push(Op::PutOperator(Box::new(record.clone())));
    }

    pub fn put_image(&mut self, record: &crate::engine::images::ImageRecord) {
        self.pending.push(Op::PutImage(Box::new(record.clone())));
    }

    pub fn delete_image(&mut self, name: &dunes_shared::model::ImageName) {
        self.pending.push(Op::DeleteImage(name.clone()));
    }

    pub fn put_network(&mut self, record: &crate::engine::networks::NetworkRecord) {
        self.pending.push(Op::PutNetwork(Box::new(record.clone())));
    }

    pub fn delete_network(&mut self, name: &dunes_shared::model::NetworkName) {
        self.pending.push(Op::DeleteNetwork(name.clone()));
    }

    pub fn delete_autoscale(&mut self, key: String) {
        self.pending.push(Op::DeleteAutoscale(key));
    }

    pub fn put_departed(&mut self, record: DepartedRecord) {
        self.pending.push(Op::PutDeparted(Box::new(record)));
    }

    /// Time-series rows that closed (or a flush of what is open).
    pub fn put_stats(&mut self, writes: Vec<crate::engine::statistics::series::StatsWrite>) {
        self.pending.extend(writes.into_iter().map(Op::Stats));
    }

    /// A reader of the time series, for queries off the engine's thread.
    /// It reads once the writes collected so far are committed, those of the engine's
    /// current turn included (submitted at the end of the turn): a minute of seconds handed
    /// to the store is no longer in memory, and must not be missed while it is on its way.
    /// Use it off the engine's thread only.
    pub fn stats_reader(&self) -> StatsReader {
        let unsent = !self.pending.is_empty() || !self.acks.is_empty();
        StatsReader {
            db: self.db.clone(),
            written: Some((self.committed.clone(), self.submitted + u64::from(unsent))),
            waited: Default::default(),
        }
    }

    pub fn put_host(&mut self, host: &HostRecord) {
        self.pending.push(Op::PutHost(Box::new(host.into())));
    }
    pub fn put_vm(&mut self, host: HostId, vm: &VmStatus) {
        self.pending.push(Op::PutVm(host, vm.into()));
    }
    pub fn delete_vm(&mut self, host: HostId, vm: VmName) {
        self.pending.push(Op::DeleteVm(host, vm));
    }
    pub fn replace_vms(&mut self, host: HostId, vms: &[VmStatus]) {
        self.pending
            .push(Op::ReplaceVms(host, vms.iter().map(VmRow::from).collect()));
    }
    pub fn put_migration(&mut self, journal: &crate::engine::migration::MigrationJournal) {
        self.pending.push(Op::PutMigration(journal.into()));
    }

    pub fn put_instance(&mut self, instance: &InstanceRecord) {
        self.pending.push(Op::PutInstance(instance.into()));
    }
    pub fn delete_instance(&mut self, instance: &InstanceRecord) {
        self.pending
            .push(Op::DeleteInstance(instance.key().to_string()));
    }
    pub fn put_service(&mut self, service: &ServiceRecord) {
        self.pending.push(Op::PutService(service.into()));
    }
    pub fn delete_service(&mut self, name: &dunes_shared::model::ServiceName) {
        self.pending.push(Op::DeleteService(name.to_string()));
    }
    pub fn put_event(&mut self, event: &EventRecord) {
        self.pending.push(Op::PutEvent(event.into()));
    }

    /// Runs `ack` once every write collected so far is committed.
    pub fn after_commit(&mut self, ack: Ack) {
        self.acks.push(ack);
    }

    /// Hands the collected writes to the writer; waits while its queue is full. A dead
    /// writer fails the acknowledgements waiting, so no caller is told "saved".
    pub async fn submit(&mut self) {
        if self.pending.is_empty() && self.acks.is_empty() {
            return;
        }
        self.submitted += 1;
        let batch = Batch {
            seq: self.submitted,
            ops: std::mem::take(&mut self.pending),
            acks: std::mem::take(&mut self.acks),
        };
        if let Err(mpsc::error::SendError(batch)) = self.batches.send(batch).await {
            tracing::error!("the store writer stopped: changes are no longer saved");
            for ack in batch.acks {
                ack(Err(StoreError::WriterGone.to_string()));
            }
        }
    }

    /// Submits what is collected and waits until it is committed.
    pub async fn flush(&mut self) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.after_commit(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        self.submit().await;
        rx.await
            .map_err(|_| StoreError::WriterGone)?
            .map_err(|e| StoreError::Redb(redb::Error::Io(std::io::Error::other(e))))
    }
}

/// Creates the tables of a new store, or upgrades an older one. Returns the schema it had,
/// when it was upgraded.
fn prepare(db: &Database) -> Result<Option<u64>, StoreError> {
    let tx = db.begin_write()?;
    let found = {
        let meta = tx.open_table(META)?;
        meta.get(SCHEMA_KEY)?.map(|v| v.value())
    };
    let found = match found {
        Some(v) => v,
        // No version: the first release wrote it, or it is new (no hosts table yet).
        None => {
            let existing: Vec<String> = tx.list_tables()?.map(|t| t.name().to_string()).collect();
            if existing.iter().any(|t| t == HOSTS.name()) {
                1
            } else {
                SCHEMA_VERSION
            }
        }
    };
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew { found });
    }
    tx.open_table(HOSTS)?;
    tx.open_table(VMS)?;
    tx.open_table(EVENTS)?;
    tx.open_table(SERVICES)?;
    tx.open_table(INSTANCES)?;
    tx.open_table(MIGRATIONS)?;
    tx.open_table(stats::STATS)?;
    tx.open_table(AUTOSCALE)?;
    tx.open_table(OPERATORS)?;
    tx.open_table(AUDIT)?;
    tx.open_table(IMAGES)?;
    tx.open_table(NETWORKS)?;
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    stats::prune_open(&tx, now_secs)?;
    tx.open_table(DEPARTED)?.retain_in(
        (0u64, "")..(now_secs.saturating_sub(DEPARTED_KEPT_SECS), ""),
        |_, _| false,
    )?;
    if found == 1 {
        upgrade_from_v1(&tx)?;
    }
    tx.open_table(META)?.insert(SCHEMA_KEY, SCHEMA_VERSION)?;
    tx.commit()?;
    Ok((found < SCHEMA_VERSION).then_some(found))
}

/// Rewrites every postcard record of schema 1 as a storage row, in the same transaction that
/// sets the new version: a crash leaves the old store as it was.
fn upgrade_from_v1(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut hosts = tx.open_table(HOSTS)?;
    let old: Vec<(String, Vec<u8>)> = hosts
        .iter()?
        .map(|i| i.map(|(k, v)| (k.value().to_string(), v.value().to_vec())))
        .collect::<Result<_, _>>()?;
    for (key, bytes) in old {
        if let Some(old) = readable_v1::<v1::Host>("host", &key, &bytes) {
            hosts.insert(key.as_str(), encode(&HostRow::from(old))?.as_slice())?;
        }
    }
    let mut vms = tx.open_table(VMS)?;
    let old: Vec<(String, Vec<u8>)> = vms
        .iter()?
        .map(|i| i.map(|(k, v)| (k.value().to_string(), v.value().to_vec())))
        .collect::<Result<_, _>>()?;
    for (key, bytes) in old {
        if let Some(old) = readable_v1::<v1::Vm>("VM", &key, &bytes) {
            vms.insert(key.as_str(), encode(&VmRow::from(old))?.as_slice())?;
        }
    }
    let mut events = tx.open_table(EVENTS)?;
    let old: Vec<(u64, Vec<u8>)> = events
        .iter()?
        .map(|i| i.map(|(k, v)| (k.value(), v.value().to_vec())))
        .collect::<Result<_, _>>()?;
    for (key, bytes) in old {
        if let Some(old) = readable_v1::<v1::Event>("event", &key.to_string(), &bytes) {
            events.insert(key, encode(&EventRow::from(old))?.as_slice())?;
        }
    }
    Ok(())
}

/// A schema 1 record, or `None` with a warning: one unreadable row must not keep the console
/// from starting (it stays as it was, and `load` skips it too).
fn readable_v1<T: DeserializeOwned>(what: &str, key: &str, bytes: &[u8]) -> Option<T> {
    match postcard::from_bytes(bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!("skipping {what} {key} of schema 1: it does not decode ({e})");
            None
        }
    }
}

/// Reads every record. A row that no longer makes a valid record is skipped with a warning:
/// one bad row must not keep the console from starting.
fn load(db: &Database) -> Result<Loaded, StoreError> {
    let tx = db.begin_read()?;
    let mut loaded = Loaded::default();
    for item in tx.open_table(HOSTS)?.iter()? {
        let (k, v) = item?;
        match decode::<HostRow>(v.value()).map(HostRecord::try_from) {
            Ok(Ok(host)) => loaded.hosts.push(host),
            Ok(Err(e)) => tracing::warn!("skipping host {}: {e}", k.value()),
            Err(e) => tracing::warn!("skipping host {}: {}", k.value(), error_chain(&e)),
        }
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
        match decode::<VmRow>(v.value()).map(VmStatus::try_from) {
            Ok(Ok(vm)) => loaded.vms.push((host, vm)),
            Ok(Err(e)) => tracing::warn!("skipping VM {}: {e}", k.value()),
            Err(e) => tracing::warn!("skipping VM {}: {}", k.value(), error_chain(&e)),
        }
    }
    for item in tx.open_table(SERVICES)?.iter()? {
        let (k, v) = item?;
        match decode::<rows::ServiceRow>(v.value()).map(ServiceRecord::try_from) {
            Ok(Ok(service)) => loaded.services.push(service),
            Ok(Err(e)) => tracing::warn!("skipping service {}: {e}", k.value()),
            Err(e) => tracing::warn!("skipping service {}: {}", k.value(), error_chain(&e)),
        }
    }
    for item in tx.open_table(INSTANCES)?.iter()? {
        let (k, v) = item?;
        match decode::<rows::InstanceRow>(v.value()).map(InstanceRecord::try_from) {
            Ok(Ok(instance)) => loaded.instances.push(instance),
            Ok(Err(e)) => tracing::warn!("skipping instance {}: {e}", k.value()),
            Err(e) => tracing::warn!("skipping instance {}: {}", k.value(), error_chain(&e)),
        }
    }
    loaded.stats_open = stats::load_open(&tx)?;
    for item in tx.open_table(AUTOSCALE)?.iter()? {
        let (k, v) = item?;
        match decode::<AutoscaleRecord>(v.value()) {
            Ok(record) => loaded.autoscale.push(record),
            Err(e) => tracing::warn!("skipping autoscaling {}: {}", k.value(), error_chain(&e)),
        }
    }
    if let Some(last) = tx.open_table(AUDIT)?.last()? {
        // A last record that does not decode is the checker's to report; the chain goes on
        // from what reads.
        match decode::<crate::engine::audit::AuditRecord>(last.1.value()) {
            Ok(record) => loaded.audit_last = Some(record),
            Err(e) => tracing::error!(
                "the audit log's last record {} does not decode: {}",
                last.0.value(),
                error_chain(&e)
            ),
        }
    }
    for item in tx.open_table(OPERATORS)?.iter()? {
        let (k, v) = item?;
        match decode::<crate::engine::operators::OperatorRecord>(v.value()) {
            Ok(record) => loaded.operators.push(record),
            Err(e) => tracing::warn!("skipping operator {}: {}", k.value(), error_chain(&e)),
        }
    }
    for item in tx.open_table(IMAGES)?.iter()? {
        let (k, v) = item?;
        match decode::<crate::engine::images::ImageRecord>(v.value()) {
            Ok(record) => loaded.images.push(record),
            Err(e) => tracing::warn!("skipping image {}: {}", k.value(), error_chain(&e)),
        }
    }
    for item in tx.open_table(NETWORKS)?.iter()? {
        let (k, v) = item?;
        match decode::<crate::engine::networks::NetworkRecord>(v.value()) {
            Ok(record) => loaded.networks.push(record),
            Err(e) => tracing::warn!("skipping network {}: {}", k.value(), error_chain(&e)),
        }
    }
    for item in tx.open_table(MIGRATIONS)?.iter()? {
        let (k, v) = item?;
        match decode::<rows::MigrationRow>(v.value())
            .map(crate::engine::migration::MigrationJournal::try_from)
        {
            Ok(Ok(journal)) => loaded.migrations.push(journal),
            Ok(Err(e)) => tracing::warn!("skipping migration {}: {e}", k.value()),
            Err(e) => tracing::warn!("skipping migration {}: {}", k.value(), error_chain(&e)),
        }
    }
    let events = tx.open_table(EVENTS)?;
    for item in events.iter()?.rev().take(1000) {
        let (_, v) = item?;
        if let Ok(row) = decode::<EventRow>(v.value()) {
            loaded.events.push(row.into());
        }
    }
    loaded.events.reverse();
    Ok(loaded)
}

fn writer(db: Arc<Database>, mut rx: mpsc::Receiver<Batch>, committed: Arc<Committed>) {
    let _stopped = StoppedOnDrop(committed.clone());
    while let Some(first) = rx.blocking_recv() {
        // Commit whatever else is waiting with it: one fsync for many batches.
        let mut batches = vec![first];
        while let Ok(more) = rx.try_recv() {
            batches.push(more);
        }
        let together = apply(&db, batches.iter().flat_map(|b| &b.ops));
        let last = batches.last().map_or(0, |b| b.seq);
        for batch in batches {
            // A failed commit is retried batch by batch, so one bad write fails only the
            // command that made it.
            let result = match &together {
                Ok(()) => Ok(()),
                Err(_) => apply(&db, batch.ops.iter()).map_err(|e| error_chain(&e)),
            };
            if let Err(e) = &result {
                tracing::error!("store write failed: {e}");
            }
            for ack in batch.acks {
                ack(result.clone());
            }
        }
        committed.update(|t| t.0 = t.0.max(last));
    }
}

fn apply<'a>(db: &Database, ops: impl Iterator<Item = &'a Op>) -> Result<(), StoreError> {
    let tx = db.begin_write()?;
    {
        let mut hosts = tx.open_table(HOSTS)?;
        let mut vms = tx.open_table(VMS)?;
        let mut events = tx.open_table(EVENTS)?;
        let mut services = tx.open_table(SERVICES)?;
        let mut instances = tx.open_table(INSTANCES)?;
        let mut migrations = tx.open_table(MIGRATIONS)?;
        let mut stats_table = tx.open_table(stats::STATS)?;
        let mut stats_open = tx.open_table(stats::STATS_OPEN)?;
        let mut autoscale = tx.open_table(AUTOSCALE)?;
        let mut departed = tx.open_table(DEPARTED)?;
        let mut operators = tx.open_table(OPERATORS)?;
        let mut audit = tx.open_table(AUDIT)?;
        let mut images = tx.open_table(IMAGES)?;
        let mut networks = tx.open_table(NETWORKS)?;
        for op in ops {
            match op {
                Op::PutAudit(record) => {
                    audit.insert(record.seq, encode(record)?.as_slice())?;
                }
                Op::PutImage(record) => {
                    images.insert(record.name.as_str(), encode(record)?.as_slice())?;
                }
                Op::DeleteImage(name) => {
                    images.remove(name.as_str())?;
                }
                Op::PutNetwork(record) => {
                    networks.insert(record.name.as_str(), encode(record)?.as_slice())?;
                }
                Op::DeleteNetwork(name) => {
                    networks.remove(name.as_str())?;
                }
                Op::PutOperator(record) => {
                    operators.insert(record.name.as_str(), encode(record)?.as_slice())?;
                }
                Op::PutDeparted(record) => {
                    departed.insert(
                        (record.removed_at_secs, record.vm.as_str()),
                        encode(record)?.as_slice(),
                    )?;
                }
                Op::PutAutoscale(record) => {
                    autoscale.insert(record.key().as_str(), encode(record)?.as_slice())?;
                }
                Op::DeleteAutoscale(key) => {
                    autoscale.remove(key.as_str())?;
                }
                Op::Stats(w) => stats::write(&mut stats_table, &mut stats_open, w)?,
                Op::PutMigration(row) => {
                    migrations.insert(row.id, encode(row)?.as_slice())?;
                }
                Op::PutInstance(row) => {
                    let key = format!("{}/{}/{}", row.service, row.app, row.index);
                    instances.insert(key.as_str(), encode(row)?.as_slice())?;
                }
                Op::DeleteInstance(key) => {
                    instances.remove(key.as_str())?;
                }
                Op::PutService(row) => {
                    services.insert(row.name.as_str(), encode(row)?.as_slice())?;
                }
                Op::DeleteService(name) => {
                    services.remove(name.as_str())?;
                }
                Op::PutHost(h) => {
                    hosts.insert(h.id.as_str(), encode(&h)?.as_slice())?;
                }
                Op::PutVm(host, vm) => {
                    vms.insert(
                        format!("{host}/{}", vm.name).as_str(),
                        encode(&vm)?.as_slice(),
                    )?;
                }
                Op::DeleteVm(host, name) => {
                    vms.remove(vm_key(host, name).as_str())?;
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
                            format!("{host}/{}", vm.name).as_str(),
                            encode(&vm)?.as_slice(),
                        )?;
                    }
                }
                Op::PutEvent(e) => {
                    events.insert(e.seq, encode(&e)?.as_slice())?;
                    if e.seq >= EVENTS_KEPT {
                        events.remove(e.seq - EVENTS_KEPT)?;
                    }
                }
            }
        }
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::records::Level;
    use dunes_shared::{model::VmState, pki::Fingerprint};

    fn vm(name: &str, state: VmState) -> VmStatus {
        VmStatus {
            uuid: format!("u-{name}"),
            name: VmName::new(name).unwrap(),
            state,
            vcpus: 1,
            memory_mib: 64,
            template: None,
            disk_bytes: 0,
            runtime: Default::default(),
            // Rows keep what an overlay's template image is.
            overlay_on: Some(dunes_shared::model::TemplateDisk {
                template: dunes_shared::model::TemplateName::new("base").unwrap(),
                blake3: "ab".repeat(32),
                allocated_bytes: 4096,
            }),
            disks: None,
            nics: None,
            autostart: None,
            next_start: None,
            addresses: None,
            snapshots: None,
            installer: None,
            screen: false,
        }
    }

    #[tokio::test]
    async fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let h1 = HostId::new("h1").unwrap();
        let h10 = HostId::new("h10").unwrap();
        {
            let (mut store, loaded) = Store::open(&path).unwrap();
            assert!(loaded.hosts.is_empty());
            store.put_host(&HostRecord {
                id: h1.clone(),
                address: "127.0.0.1:1".into(),
                fingerprint: Fingerprint([1; 32]),
                enrolled_at_ms: 5,
                inventory: None,
                cert_expires_ms: None,
                maintenance: None,
            });
            store.put_vm(h1.clone(), &vm("a", VmState::Running));
            store.put_vm(h1.clone(), &vm("b", VmState::Running));
            store.put_vm(h10.clone(), &vm("c", VmState::Shutoff));
            store.replace_vms(
                h1.clone(),
                &[vm("b", VmState::Shutoff), vm("d", VmState::Running)],
            );
            store.delete_vm(h1.clone(), VmName::new("d").unwrap());
            for seq in 0..3 {
                store.put_event(&EventRecord {
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

    fn copy_fixture(dir: &Path) -> std::path::PathBuf {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1.redb");
        let path = dir.join("store.redb");
        std::fs::copy(&fixture, &path).unwrap();
        path
    }

    async fn reopen(path: &Path) -> (Store, Loaded) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(path) {
                Ok(r) => return r,
                Err(StoreError::InUse { .. }) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// The fixture was written by the first release (schema 1, postcard records, no `meta`).
    #[tokio::test]
    async fn a_store_of_the_first_release_opens_with_nothing_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = copy_fixture(dir.path());
        let (store, loaded) = Store::open(&path).unwrap();
        assert_eq!(loaded.upgraded_from, Some(1));
        let check = |loaded: &Loaded| {
            let ids: Vec<&str> = loaded.hosts.iter().map(|h| h.id.as_str()).collect();
            assert_eq!(ids, ["node-1", "node-2"]);
            let h = &loaded.hosts[0];
            assert_eq!(h.address, "127.0.0.1:7443");
            assert_eq!(h.fingerprint, Fingerprint([7; 32]));
            assert_eq!(h.enrolled_at_ms, 1_700_000_000_000);
            let inv = h.inventory.as_ref().unwrap();
            assert_eq!(inv.host_id.as_str(), "node-1");
            assert_eq!((inv.cpus, inv.memory_mib), (4, 8192));
            assert_eq!(inv.site.name.as_str(), "geneva");
            assert!(inv.site.remote);
            assert_eq!(inv.site.link_bandwidth_mbps, 200);
            assert_eq!(inv.prices.per_cpu_hour, 0.015);
            assert_eq!(inv.network[0].mac, "52:54:00:00:00:01");
            assert_eq!(
                inv.runtimes[0].kind,
                dunes_shared::model::RuntimeKind::Libvirt
            );
            assert_eq!(inv.security_level, 2);
            assert!(loaded.hosts[1].inventory.is_none());
            let mut vms: Vec<(String, String, VmState, u64)> = loaded
                .vms
                .iter()
                .map(|(h, v)| (h.to_string(), v.name.to_string(), v.state, v.memory_mib))
                .collect();
            vms.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
            assert_eq!(
                vms,
                [
                    ("node-1".into(), "db-1".into(), VmState::Shutoff, 256),
                    ("node-1".into(), "web-1".into(), VmState::Running, 512),
                ]
            );
            let web = &loaded
                .vms
                .iter()
                .find(|(_, v)| v.name.as_str() == "web-1")
                .unwrap()
                .1;
            assert_eq!(web.template.as_ref().unwrap().as_str(), "tiny");
            assert_eq!(web.uuid, "11111111-2222-3333-4444-555555555555");
            let events: Vec<(u64, Level, Option<&str>, &str)> = loaded
                .events
                .iter()
                .map(|e| {
                    (
                        e.seq,
                        e.level,
                        e.host.as_ref().map(|h| h.as_str()),
                        e.message.as_str(),
                    )
                })
                .collect();
            assert_eq!(
                events,
                [
                    (0, Level::Info, None, "event 0"),
                    (1, Level::Info, Some("node-1"), "event 1"),
                    (2, Level::Warning, Some("node-1"), "event 2"),
                ]
            );
        };
        check(&loaded);
        drop(store);
        // Upgraded once: the next open reads schema 2 as it is.
        let (_store, again) = reopen(&path).await;
        assert_eq!(again.upgraded_from, None);
        check(&again);
    }

    #[tokio::test]
    async fn a_store_from_a_newer_console_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert(SCHEMA_KEY, SCHEMA_VERSION + 1)
                .unwrap();
            tx.commit().unwrap();
        }
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::TooNew { found } if found == SCHEMA_VERSION + 1));
        assert!(err.to_string().contains("newer console"), "{err}");
        let db = Database::create(&path).unwrap();
        let tx = db.begin_read().unwrap();
        assert_eq!(
            tx.open_table(META)
                .unwrap()
                .get(SCHEMA_KEY)
                .unwrap()
                .unwrap()
                .value(),
            SCHEMA_VERSION + 1
        );
    }

    #[tokio::test]
    async fn an_acknowledgement_runs_after_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let (mut store, _) = Store::open(&path).unwrap();
        store.put_vm(HostId::new("h").unwrap(), &vm("a", VmState::Running));
        let (tx, rx) = tokio::sync::oneshot::channel();
        store.after_commit(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        store.submit().await;
        rx.await.unwrap().unwrap();
        drop(store);
        let (_, loaded) = reopen(&path).await;
        assert_eq!(loaded.vms.len(), 1);
    }

    #[tokio::test]
    async fn a_stats_read_waits_for_the_writes_handed_out_before_it() {
        use crate::engine::statistics::series::StatsWrite;
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = Store::open(&dir.path().join("store.redb")).unwrap();
        // A minute of seconds leaves the engine's memory for the store in this turn; a query
        // made in the same turn reads before the turn's writes are even submitted.
        store.put_stats(vec![StatsWrite::Seconds {
            series: "host/h/cpu".into(),
            minute_start_secs: 600,
            values: vec![(1, 0.5), (2, 0.25)],
        }]);
        let reader = store.stats_reader();
        let read = std::thread::spawn(move || reader.buckets("host/h/cpu", 0, 600, 660).unwrap());
        // The engine's turn ends a while later; until then the read waits for it (up to its
        // 10 s limit), where a read that did not wait would be over long before.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !read.is_finished(),
            "the read did not wait for the turn's writes"
        );
        store.submit().await;
        let seconds: Vec<u64> = tokio::task::spawn_blocking(move || read.join().unwrap())
            .await
            .unwrap()
            .iter()
            .map(|b| b.start_secs)
            .collect();
        assert_eq!(seconds, vec![601, 602]);
        // A batch that will never come (the store goes before its turn ends): the stopped
        // writer lets the reader go on with what is committed, well before its 10 s limit.
        store.put_stats(vec![StatsWrite::Seconds {
            series: "host/h/cpu".into(),
            minute_start_secs: 660,
            values: vec![(1, 0.5)],
        }]);
        let reader = store.stats_reader();
        drop(store);
        let began = std::time::Instant::now();
        let again = tokio::task::spawn_blocking(move || reader.buckets("host/h/cpu", 0, 600, 720))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.len(), 2);
        assert!(
            began.elapsed() < Duration::from_secs(8),
            "held by a stopped writer"
        );
    }

    #[tokio::test]
    async fn services_survive_reopen_and_deletion_sticks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let record = |name: &str| ServiceRecord {
            name: dunes_shared::model::ServiceName::new(name).unwrap(),
            source: format!("name = \"{name}\"\n"),
            defined_at_ms: 7,
            moving: None,
        };
        {
            let (mut store, _) = Store::open(&path).unwrap();
            store.put_service(&record("shop"));
            store.put_service(&record("blog"));
            store.delete_service(&record("blog").name);
            store.flush().await.unwrap();
        }
        let (_, loaded) = reopen(&path).await;
        assert_eq!(loaded.services, vec![record("shop")]);
    }
}
