//! What the image library holds: every image by name, and the names imports under way have
//! taken.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use dunes_shared::model::{HostId, ImageName};
use serde::{Deserialize, Serialize};

use crate::engine::images::format::ImageFormat;

/// An image as the console keeps it (and its store holds it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: ImageName,
    pub format: ImageFormat,
    /// What a guest sees: the disk's size, or the volume's.
    pub virtual_bytes: u64,
    /// What the console's copy takes on its storage.
    pub allocated_bytes: u64,
    /// BLAKE3 of the whole file, in hex; the copy is `images/DIGEST.FORMAT`.
    pub blake3: String,
    pub imported_ms: u64,
    /// Hosts that hold a copy.
    #[serde(default)]
    pub hosts: Vec<HostId>,
}

/// An image on its way to a host, as the window shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageTransferProgress {
    pub image: ImageName,
    pub host: HostId,
    /// The image's allocated bytes through so far, of `total_bytes` (a resumed push starts
    /// where the host's copy ended).
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub started_ms: u64,
}

/// How a push of an image to one host went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePushReport {
    pub host: HostId,
    #[serde(flatten)]
    pub pushed: super::push::Pushed,
}

/// A migration waiting for the image its VM's disk builds on to reach the target.
#[derive(Debug)]
pub(in crate::engine) struct PushedForMigration {
    pub(in crate::engine) host: HostId,
    pub(in crate::engine) vm: dunes_shared::model::VmName,
    pub(in crate::engine) to: HostId,
    pub(in crate::engine) options: crate::engine::migration::MigrationOptions,
    pub(in crate::engine) reply: crate::engine::Reply<crate::engine::migration::MigrationJournal>,
    pub(in crate::engine) image: ImageName,
    pub(in crate::engine) blake3: String,
    pub(in crate::engine) result: Result<super::push::Pushed, String>,
}

/// A VM to make from a library image.
#[derive(Debug)]
pub struct CreateFromImage {
    pub host: HostId,
    pub spec: dunes_shared::model::VmSpec,
    pub image: ImageName,
    pub disk: dunes_shared::model::ImageDisk,
    /// The operator's user-data (checked already), if any.
    pub user_data: Option<String>,
    pub start: bool,
    /// Its place on its service's network, for a service instance on one.
    pub network: Option<dunes_shared::network::InstanceNic>,
    pub reply: crate::engine::Reply<dunes_shared::model::VmStatus>,
}

/// A VM that waited for its image to reach its host, with how the push went.
#[derive(Debug)]
pub(in crate::engine) struct PushedForVm {
    pub(in crate::engine) create: CreateFromImage,
    pub(in crate::engine) result: Result<super::push::Pushed, String>,
}

impl ImageRecord {
    /// The file name of the console's copy in its images directory.
    pub fn file_name(&self) -> String {
        format!("{}.{}", self.blake3, self.format.as_str())
    }
}

#[derive(Debug)]
pub(in crate::engine) struct ImagesState {
    /// Where the console keeps its copies: `DATA_DIR/images`.
    pub(in crate::engine) dir: PathBuf,
    pub(in crate::engine) records: BTreeMap<ImageName, ImageRecord>,
    /// Names whose import is under way: a second import of one of them is refused.
    pub(in crate::engine) importing: BTreeSet<ImageName>,
    /// Hosts this console sent an image to, by the image's BLAKE3: a migration right after
    /// moves the overlay alone even before the host's next inventory says it holds it.
    pub(in crate::engine) sent: BTreeSet<(HostId, String)>,
    /// Pushes under way, by image and host.
    pub(in crate::engine) transfers: BTreeMap<(ImageName, HostId), ImageTransferProgress>,
    pub(in crate::engine) transfers_dirty: bool,
    pub(in crate::engine) published_transfers: std::sync::Arc<Vec<ImageTransferProgress>>,
    /// The library as placement counts it, as last published.
    pub(in crate::engine) published: std::sync::Arc<crate::engine::services::placement::ImageNeeds>,
}

impl ImagesState {
    pub(in crate::engine) fn new(dir: PathBuf, loaded: Vec<ImageRecord>) -> ImagesState {
        ImagesState {
            dir,
            records: loaded.into_iter().map(|r| (r.name.clone(), r)).collect(),
            importing: BTreeSet::new(),
            sent: BTreeSet::new(),
            transfers: BTreeMap::new(),
            transfers_dirty: false,
            published_transfers: Default::default(),
            published: Default::default(),
        }
    }

    /// Each image's digest and the storage a host's copy takes, for placement.
    pub(in crate::engine) fn needs(&self) -> crate::engine::services::placement::ImageNeeds {
        self.records
            .values()
            .map(|r| {
                let need = crate::engine::services::placement::ImageNeed {
                    blake3: r.blake3.clone(),
                    mib: r.allocated_bytes.div_ceil(1024 * 1024),
                };
                (r.name.clone(), need)
            })
            .collect()
    }

    /// Why `name` cannot be taken by a new import, if it cannot.
    pub(in crate::engine) fn name_taken(&self, name: &ImageName) -> Option<String> {
        if self.records.contains_key(name) {
            Some(format!(
                "an image named {name} is in the library: delete it first or choose another name"
            ))
        } else if self.importing.contains(name) {
            Some(format!("an import of {name} is under way"))
        } else {
            None
        }
    }

    /// The image with these bytes, under whatever name.
    pub(in crate::engine) fn by_digest(&self, blake3: &str) -> Option<&ImageRecord> {
        self.records.values().find(|r| r.blake3 == blake3)
    }
}
