//! The image library's driver: an import copies off the engine's thread and is recorded
//! once its copy is whole; a delete is refused while a VM's disk builds on the image.

use std::path::PathBuf;

use dunes_shared::{
    cloud_init::CloudInitData,
    error_chain,
    model::{DISK_GIB_MAX, HostId, ImageDisk, ImageFormat, ImageName, TemplateName, VmName},
    protocol::features,
};

use super::{
    library,
    push::{PushJob, Pushed, push_image},
    state::{
        CreateFromImage, ImagePushReport, ImageRecord, ImageTransferProgress, PushedForMigration,
        PushedForVm,
    },
};
use crate::engine::{
    EngineError, Reply,
    actor::{Actor, Internal},
    migration::{MigrationJournal, MigrationOptions},
    records::{Level, now_ms},
};

const MIB: u64 = 1024 * 1024;

impl Actor {
    /// Imports the file at `path` (on the engine's machine) as `name`.
    pub(in crate::engine) fn import_image(
        &mut self,
        name: ImageName,
        path: PathBuf,
        reply: Reply<ImageRecord>,
    ) {
        if let Some(why) = self.images.name_taken(&name) {
            let _ = reply.send(Err(EngineError::Invalid(why)));
            return;
        }
        self.images.importing.insert(name.clone());
        self.log(
            Level::Info,
            None,
            format!("importing image {name} from {}", path.display()),
        );
        let dir = self.images.dir.clone();
        let internal = self.internal_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = library::import_file(&path, &dir).map_err(|e| error_chain(&e));
            // A stopped engine has no one to tell.
            let _ = internal.blocking_send(Internal::ImageCopied {
                name,
                result,
                reply,
            });
        });
    }

    /// An import's copy is whole (or failed): the image is recorded, and the caller hears
    /// once that is committed.
    pub(in crate::engine) fn image_copied(
        &mut self,
        name: ImageName,
        result: Result<library::Copied, String>,
        reply: Reply<ImageRecord>,
    ) {
        self.images.importing.remove(&name);
        let copied = match result {
            Ok(copied) => copied,
            Err(e) => {
                self.log(
                    Level::Error,
                    None,
                    format!("importing image {name} failed: {e}"),
                );
                let _ = reply.send(Err(EngineError::Invalid(e)));
                return;
            }
        };
        if let Some(other) = self.images.by_digest(&copied.blake3) {
            // Its copy is that image's file: it stays.
            let _ = reply.send(Err(EngineError::Invalid(format!(
                "the library holds these bytes already, as image {}",
                other.name
            ))));
            return;
        }
        let record = ImageRecord {
            name: name.clone(),
            format: copied.detected.format,
            virtual_bytes: copied.detected.virtual_bytes,
            allocated_bytes: copied.allocated_bytes,
            blake3: copied.blake3,
            imported_ms: now_ms(),
            hosts: Vec::new(),
        };
        self.store.put_image(&record);
        self.images.records.insert(name.clone(), record.clone());
        self.log(
            Level::Info,
            None,
            format!(
                "image {name} imported: {}, {} bytes for the guest, BLAKE3 {}",
                record.format.as_str(),
                record.virtual_bytes,
                &record.blake3[..16]
            ),
        );
        self.reply_after_commit(reply, record);
    }

    /// Removes an image from the library, and its copy once that is committed.
    pub(in crate::engine) fn delete_image(&mut self, name: ImageName, reply: Reply<ImageRecord>) {
        let Some(record) = self.images.records.get(&name).cloned() else {
            let _ = reply.send(Err(EngineError::Invalid(format!(
                "there is no image named {name}"
            ))));
            return;
        };
        let users = self.image_users(&name);
        if !users.is_empty() {
            let _ = reply.send(Err(EngineError::Invalid(format!(
                "image {name} is in use by {}: delete {} first",
                users.join(", "),
                if users.len() == 1 {
                    "that VM"
                } else {
                    "those VMs"
                }
            ))));
            return;
        }
        self.images.records.remove(&name);
        self.store.delete_image(&name);
        let file = self.images.dir.join(record.file_name());
        self.store.after_commit(Box::new(move |committed| {
            if committed.is_ok()
                && let Err(e) = std::fs::remove_file(&file)
            {
                tracing::warn!("removing {} failed: {e}", file.display());
            }
        }));
        self.log(Level::Info, None, format!("image {name} deleted"));
        self.reply_after_commit(reply, record);
    }

    /// Pushes the image to each of `hosts` that does not hold it; answered once every push
    /// has ended. A host whose agent cannot take images, or whose storage is too small, is
    /// refused before anything is sent.
    pub(in crate::engine) fn push_image(
        &mut self,
        name: ImageName,
        hosts: Vec<HostId>,
        reply: Reply<Vec<ImagePushReport>>,
    ) {
        let Some(record) = self.images.records.get(&name).cloned() else {
            let _ = reply.send(Err(EngineError::Invalid(format!(
                "there is no image named {name}"
            ))));
            return;
        };
        if hosts.is_empty() {
            let _ = reply.send(Err(EngineError::Invalid(
                "no host to push the image to".into(),
            )));
            return;
        }
        let mut jobs = Vec::new();
        for host in hosts {
            match self.image_target(&record, &host) {
                Ok(conn) => jobs.push((host, conn)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            }
        }
        let names: Vec<String> = jobs.iter().map(|(h, _)| h.to_string()).collect();
        self.log(
            Level::Info,
            None,
            format!("pushing image {name} to {}", names.join(", ")),
        );
        let job = self.push_job(&record);
        let internal = self.internal_tx.clone();
        tokio::spawn(async move {
            let mut set = tokio::task::JoinSet::new();
            for (host, conn) in jobs {
                let (job, internal, image) = (job.clone(), internal.clone(), name.clone());
                set.spawn(async move {
                    let result = push_reported(&internal, &conn, job, image, host.clone()).await;
                    (host, result)
                });
            }
            let mut results = Vec::new();
            while let Some(joined) = set.join_next().await {
                if let Ok(done) = joined {
                    results.push(done);
                }
            }
            results.sort_by(|a, b| a.0.cmp(&b.0));
            let _ = internal
                .send(Internal::ImagePushed {
                    name,
                    results,
                    reply,
                })
                .await;
        });
    }

    /// Creates a VM from a library image: at once where the host holds the image under its
    /// name, after a push of it otherwise (which sends nothing where the host holds the
    /// bytes under another name).
    pub(in crate::engine) fn create_vm_from_image(&mut self, create: CreateFromImage) {
        let checked = self
            .may_create_vm(&create.host, &create.spec)
            .and_then(|()| {
                let record = self.images.records.get(&create.image).ok_or_else(|| {
                    EngineError::Invalid(format!("there is no image named {}", create.image))
                })?;
                check_image_disk(record, &create.disk).map_err(EngineError::Invalid)?;
                Ok(record.clone())
            });
        let record = match checked {
            Ok(r) => r,
            Err(e) => {
                let _ = create.reply.send(Err(e));
                return;
            }
        };
        if self.host_holds_image(&record, &create.host) {
            return self.create_from(&record, create);
        }
        let conn = match self.image_target(&record, &create.host) {
            Ok(conn) => conn,
            Err(e) => {
                let _ = create.reply.send(Err(e));
                return;
            }
        };
        self.log(
            Level::Info,
            Some(create.host.clone()),
            format!(
                "image {} goes to {} first, for VM {}",
                create.image, create.host, create.spec.name
            ),
        );
        let job = self.push_job(&record);
        let internal = self.internal_tx.clone();
        let (image, host) = (record.name.clone(), create.host.clone());
        tokio::spawn(async move {
            let result = push_reported(&internal, &conn, job, image, host).await;
            let _ = internal
                .send(Internal::ImagePushedForVm(Box::new(PushedForVm {
                    create,
                    result,
                })))
                .await;
        });
    }

    /// Sends the library image `vm`'s overlay builds on to `to` first, when `to` does not
    /// hold it, so that the migration moves the overlay alone; the migration starts once the
    /// image is there. Gives `reply` back when there is nothing to send.
    pub(in crate::engine) fn send_image_before_migration(
        &mut self,
        host: &HostId,
        vm: &VmName,
        to: &HostId,
        options: MigrationOptions,
        reply: Reply<MigrationJournal>,
    ) -> Option<Reply<MigrationJournal>> {
        let base = self
            .fleet
            .hosts
            .get(host)
            .and_then(|entry| entry.view.vm(vm))
            .and_then(|status| status.overlay_on.clone());
        let record = base.and_then(|base| {
            self.images
                .records
                .values()
                .find(|r| r.name.as_str() == base.template.as_str() && r.blake3 == base.blake3)
                .cloned()
        });
        let Some(record) = record.filter(|r| {
            !self.host_holds_image(r, to)
                && !self.images.sent.contains(&(to.clone(), r.blake3.clone()))
        }) else {
            return Some(reply);
        };
        let conn = match self.image_target(&record, to) {
            Ok(conn) => conn,
            Err(e) => {
                let _ = reply.send(Err(EngineError::Invalid(format!(
                    "{vm} builds on image {}, which cannot go to {to}: {e}",
                    record.name
                ))));
                return None;
            }
        };
        self.log(
            Level::Info,
            Some(to.clone()),
            format!(
                "image {} goes to {to} first, for the migration of {vm}",
                record.name
            ),
        );
        let job = self.push_job(&record);
        let internal = self.internal_tx.clone();
        let waiting = (
            host.clone(),
            vm.clone(),
            to.clone(),
            record.name,
            record.blake3,
        );
        tokio::spawn(async move {
            let result =
                push_reported(&internal, &conn, job, waiting.3.clone(), waiting.2.clone()).await;
            let (host, vm, to, image, blake3) = waiting;
            let _ = internal
                .send(Internal::ImagePushedForMigration(Box::new(
                    PushedForMigration {
                        host,
                        vm,
                        to,
                        options,
                        reply,
                        image,
                        blake3,
                        result,
                    },
                )))
                .await;
        });
        None
    }

    /// The push a migration waited for has ended: the migration starts (moving the overlay
    /// alone), or the caller hears why not.
    pub(in crate::engine) fn image_pushed_for_migration(&mut self, done: PushedForMigration) {
        let PushedForMigration {
            host,
            vm,
            to,
            options,
            reply,
            image,
            blake3,
            result,
        } = done;
        match result {
            Ok(pushed) => {
                self.log(
                    Level::Info,
                    Some(to.clone()),
                    format!(
                        "image {image} is on {to}: {} MiB sent",
                        pushed.sent_bytes.div_ceil(MIB)
                    ),
                );
                self.images.sent.insert((to.clone(), blake3));
                self.migrate_vm(&host, &vm, &to, options, reply);
            }
            Err(e) => {
                self.log(
                    Level::Error,
                    Some(to.clone()),
                    format!("pushing image {image} to {to} failed: {e}"),
                );
                let _ = reply.send(Err(EngineError::Invalid(format!(
                    "sending image {image} to {to} failed, so {vm} did not move: {e}"
                ))));
            }
        }
    }

    /// The push a VM waited for has ended: the VM is created, or the caller hears why not.
    pub(in crate::engine) fn image_pushed_for_vm(&mut self, done: PushedForVm) {
        let PushedForVm { create, result } = done;
        let (host, image) = (create.host.clone(), create.image.clone());
        let record = self.images.records.get(&image).cloned();
        match (result, record) {
            (Ok(pushed), Some(record)) => {
                self.log(
                    Level::Info,
                    Some(host.clone()),
                    format!(
                        "image {image} is on {host}: {} MiB sent",
                        pushed.sent_bytes.div_ceil(MIB)
                    ),
                );
                self.create_from(&record, create);
            }
            (Ok(_), None) => {
                let _ = create.reply.send(Err(EngineError::Invalid(format!(
                    "image {image} was deleted while it went to {host}"
                ))));
            }
            (Err(e), _) => {
                self.log(
                    Level::Error,
                    Some(host.clone()),
                    format!("pushing image {image} to {host} failed: {e}"),
                );
                let _ = create.reply.send(Err(EngineError::Invalid(format!(
                    "pushing image {image} to {host} failed, so VM {} was not created: {e}",
                    create.spec.name
                ))));
            }
        }
    }

    /// Asks the host that holds `record` for the VM, with its cloud-init data: a disk image's
    /// VM always gets a seed (its host name at least), an installer's only with user-data.
    fn create_from(&mut self, record: &ImageRecord, create: CreateFromImage) {
        let installer = record.format == ImageFormat::Iso;
        let cloud_init = match (create.user_data, installer) {
            (None, true) => None,
            (user_data, _) => Some(CloudInitData {
                hostname: create.spec.name.to_string(),
                user_data: user_data.unwrap_or_else(|| "#cloud-config\n".into()),
                // The agent writes DHCP on the VM's NIC, whose MAC address it chooses.
                network_config: None,
            }),
        };
        self.create_vm(
            create.host,
            create.spec,
            create.start,
            Some((create.disk, cloud_init)),
            create.network,
            create.reply,
        );
    }

    /// Whether `host` holds the image as the template of its name.
    fn host_holds_image(&self, record: &ImageRecord, host: &HostId) -> bool {
        self.fleet
            .hosts
            .get(host)
            .and_then(|entry| entry.view.inventory())
            .is_some_and(|i| {
                i.template_disks.iter().any(|d| {
                    d.blake3 == record.blake3 && d.template.as_str() == record.name.as_str()
                })
            })
    }

    /// The link an image goes over to `host`, once the host can take it.
    fn image_target(
        &self,
        record: &ImageRecord,
        host: &HostId,
    ) -> Result<quinn::Connection, EngineError> {
        let client = self.fleet.client(host)?;
        if !client.peer.offers(features::IMAGES) {
            return Err(EngineError::Invalid(format!(
                "host {host}'s agent cannot take images: update it"
            )));
        }
        if let Some(why) = self.image_does_not_fit(record, host) {
            return Err(EngineError::Invalid(why));
        }
        Ok(client.peer.conn.clone())
    }

    /// What a push of `record` sends: the console's copy, as the template of its name.
    fn push_job(&self, record: &ImageRecord) -> PushJob {
        PushJob {
            file: self.images.dir.join(record.file_name()),
            template: TemplateName::new(record.name.as_str())
                .expect("image names are template names"),
            format: record.format,
            blake3: record.blake3.clone(),
        }
    }

    /// Why `host` cannot take `record`, if it cannot: a host that holds it takes nothing.
    pub(in crate::engine) fn image_does_not_fit(
        &self,
        record: &ImageRecord,
        host: &HostId,
    ) -> Option<String> {
        let entry = self.fleet.hosts.get(host)?;
        let inventory = entry.view.inventory()?;
        if inventory
            .template_disks
            .iter()
            .any(|d| d.blake3 == record.blake3)
        {
            return None;
        }
        let free_mib = storage_free_mib(&entry.view)?;
        let needed_mib = record.allocated_bytes.div_ceil(MIB);
        let others: Vec<(HostId, u64)> = self
            .fleet
            .hosts
            .values()
            .filter(|e| e.view.id() != host && e.view.link == crate::engine::LinkState::Online)
            .filter_map(|e| Some((e.view.id().clone(), storage_free_mib(&e.view)?)))
            .collect();
        (needed_mib > free_mib).then(|| {
            format!(
                "host {host} has {free_mib} MiB of storage free; image {} needs {needed_mib} MiB; {}",
                record.name,
                elsewhere(needed_mib, &others)
            )
        })
    }

    /// How far a push got (`None`: it ended), for the window.
    pub(in crate::engine) fn image_transfer(
        &mut self,
        image: ImageName,
        host: HostId,
        progress: Option<(u64, u64)>,
    ) {
        let key = (image.clone(), host.clone());
        match progress {
            Some((done_bytes, total_bytes)) => {
                let entry =
                    self.images
                        .transfers
                        .entry(key)
                        .or_insert_with(|| ImageTransferProgress {
                            image,
                            host,
                            done_bytes,
                            total_bytes,
                            started_ms: now_ms(),
                        });
                entry.done_bytes = done_bytes;
                entry.total_bytes = total_bytes;
            }
            None => {
                self.images.transfers.remove(&key);
            }
        }
        self.images.transfers_dirty = true;
    }

    /// Every push has ended: each host's outcome is logged, and the caller hears them all, or
    /// which hosts failed.
    pub(in crate::engine) fn image_pushed(
        &mut self,
        name: ImageName,
        results: Vec<(HostId, Result<Pushed, String>)>,
        reply: Reply<Vec<ImagePushReport>>,
    ) {
        let mut reports = Vec::new();
        let mut failed = Vec::new();
        let blake3 = self.images.records.get(&name).map(|r| r.blake3.clone());
        for (host, result) in results {
            match result {
                Ok(pushed) => {
                    let message = if pushed.held {
                        format!("host {host} holds image {name} already: nothing sent")
                    } else {
                        format!(
                            "image {name} pushed to {host}: {} MiB sent{}",
                            pushed.sent_bytes.div_ceil(MIB),
                            if pushed.resumed_from > 0 {
                                format!(", going on from {} MiB", pushed.resumed_from / MIB)
                            } else {
                                String::new()
                            }
                        )
                    };
                    self.log(Level::Info, Some(host.clone()), message);
                    if let Some(blake3) = &blake3 {
                        self.images.sent.insert((host.clone(), blake3.clone()));
                    }
                    reports.push(ImagePushReport { host, pushed });
                }
                Err(e) => {
                    self.log(
                        Level::Error,
                        Some(host.clone()),
                        format!("pushing image {name} to {host} failed: {e}"),
                    );
                    failed.push(format!("{host}: {e}"));
                }
            }
        }
        let _ = reply.send(if failed.is_empty() {
            Ok(reports)
        } else {
            Err(EngineError::Invalid(format!(
                "pushing image {name} failed on {}",
                failed.join("; ")
            )))
        });
    }

    /// The hosts whose agent holds the image's bytes, under any template name.
    pub(in crate::engine) fn image_hosts(&self, record: &ImageRecord) -> Vec<HostId> {
        self.fleet
            .hosts
            .values()
            .filter(|entry| {
                entry
                    .view
                    .inventory()
                    .is_some_and(|i| i.template_disks.iter().any(|d| d.blake3 == record.blake3))
            })
            .map(|entry| entry.view.id().clone())
            .collect()
    }

    /// The VMs whose disk builds on the image, as `HOST/VM`: a host holds an image as the
    /// template of its name.
    fn image_users(&self, name: &ImageName) -> Vec<String> {
        self.fleet
            .hosts
            .values()
            .flat_map(|entry| {
                entry
                    .view
                    .vms
                    .iter()
                    .filter(|vm| {
                        // Made from it (an installer's CD-ROM too), or an overlay on it.
                        vm.template
                            .as_ref()
                            .is_some_and(|t| t.as_str() == name.as_str())
                            || vm.disks.iter().flatten().any(|disk| {
                                disk.backing
                                    .as_ref()
                                    .is_some_and(|b| b.as_str() == name.as_str())
                            })
                    })
                    .map(|vm| format!("{}/{}", entry.view.id(), vm.name))
            })
            .collect()
    }
}

/// Whether a VM from `record` can have `disk`: an installer needs a size, and a disk is never
/// smaller than its image.
/// Pushes `job` to `host`, telling the engine how far it got (at each whole percent) and when
/// it ended, so that the window shows the transfer.
async fn push_reported(
    internal: &tokio::sync::mpsc::Sender<Internal>,
    conn: &quinn::Connection,
    job: PushJob,
    image: ImageName,
    host: HostId,
) -> Result<Pushed, String> {
    let last_percent = std::sync::atomic::AtomicU64::new(u64::MAX);
    let report = |done: u64, total: u64| {
        let percent = done.saturating_mul(100).checked_div(total).unwrap_or(100);
        if last_percent.swap(percent, std::sync::atomic::Ordering::Relaxed) != percent {
            // Progress is news, not state: a step the busy engine has no room for is skipped.
            let _ = internal.try_send(Internal::ImageTransfer {
                image: image.clone(),
                host: host.clone(),
                progress: Some((done, total)),
            });
        }
    };
    let result = push_image(conn, job, report)
        .await
        .map_err(|e| error_chain(&e));
    let _ = internal
        .send(Internal::ImageTransfer {
            image,
            host,
            progress: None,
        })
        .await;
    result
}

fn check_image_disk(record: &ImageRecord, disk: &ImageDisk) -> Result<(), String> {
    const GIB: u64 = 1 << 30;
    match disk.disk_gib {
        None if record.format == ImageFormat::Iso => Err(format!(
            "image {} is an installer: give the size of the disk it installs to (--disk-gib)",
            record.name
        )),
        Some(gib) if !(1..=DISK_GIB_MAX).contains(&gib) => {
            Err(format!("a disk is 1 to {DISK_GIB_MAX} GiB, not {gib}"))
        }
        Some(gib) if record.format != ImageFormat::Iso && gib * GIB < record.virtual_bytes => {
            Err(format!(
                "the disk asked ({gib} GiB) is smaller than image {} ({} MiB): ask for at least {} GiB",
                record.name,
                record.virtual_bytes.div_ceil(MIB),
                record.virtual_bytes.div_ceil(GIB)
            ))
        }
        _ => Ok(()),
    }
}

/// What a host has free on its storage, as it last said.
fn storage_free_mib(view: &crate::engine::HostView) -> Option<u64> {
    let inventory = view.inventory()?;
    Some(
        view.status
            .as_ref()
            .map_or(inventory.storage_free_mib, |s| s.storage_free_mib),
    )
}

/// Where else an image of `needed_mib` would go, among `hosts` (online, with their free
/// storage): the host with the most room, and whether even it is too small.
fn elsewhere(needed_mib: u64, hosts: &[(HostId, u64)]) -> String {
    match hosts
        .iter()
        .max_by_key(|(id, free)| (*free, std::cmp::Reverse(id.clone())))
    {
        None => "no other host is online".into(),
        Some((id, free)) if *free >= needed_mib => {
            format!("host {id} has room ({free} MiB free)")
        }
        Some((id, free)) => {
            format!("no host has room: {id} comes closest, with {free} MiB free")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_too_large_for_its_host_names_where_it_would_fit_or_comes_closest() {
        let host = |id: &str, free: u64| (HostId::new(id).unwrap(), free);
        assert_eq!(
            elsewhere(500, &[host("a", 100), host("b", 800), host("c", 600)]),
            "host b has room (800 MiB free)"
        );
        assert_eq!(
            elsewhere(5000, &[host("a", 100), host("b", 800)]),
            "no host has room: b comes closest, with 800 MiB free"
        );
        // A tie goes to the first by name, so the sentence is the same every time.
        assert_eq!(
            elsewhere(5000, &[host("b", 800), host("a", 800)]),
            "no host has room: a comes closest, with 800 MiB free"
        );
        assert_eq!(elsewhere(1, &[]), "no other host is online");
    }
}
