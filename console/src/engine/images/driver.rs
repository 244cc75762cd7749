//! The image library's driver: an import copies off the engine's thread and is recorded
//! once its copy is whole; a delete is refused while a VM's disk builds on the image.

use std::path::PathBuf;

use dunes_shared::{error_chain, model::ImageName};

use super::{library, state::ImageRecord};
use crate::engine::{
    EngineError, Reply,
    actor::{Actor, Internal},
    records::{Level, now_ms},
};

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
                        vm.disks.iter().flatten().any(|disk| {
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
