//! The agent's storage directory: templates and VM disks, every path confined to it.

use std::{
    collections::HashMap,
    fs::File,
    io::Read,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use dunes_shared::model::{ImageFormat, TemplateDisk, TemplateInfo, TemplateName, VmName};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("template {0} does not exist")]
    NoTemplate(TemplateName),
    #[error("template {name} is not usable: {message}")]
    BadTemplate { name: TemplateName, message: String },
    #[error("a disk for {0} already exists")]
    DiskExists(VmName),
    #[error("disk {0} is not here (it has not arrived)")]
    MissingDisk(String),
    #[error(
        "template {0} gives overlay disks, and qemu-img is not installed (apt-get install qemu-utils)"
    )]
    NoQemuImg(TemplateName),
    #[error("overlay {file} is not one of this agent's: {message}")]
    ForeignOverlay { file: String, message: String },
    #[error("qemu-img {action} failed: {message}")]
    QemuImg {
        action: &'static str,
        message: String,
    },
    #[error(
        "template {0} here holds another image: delete the VMs on it, or push under another name"
    )]
    TemplateTaken(TemplateName),
    #[error(
        "the disk asked ({asked_gib} GiB) is smaller than image {template} ({image_mib} MiB): ask for at least {least_gib} GiB"
    )]
    DiskTooSmall {
        template: TemplateName,
        asked_gib: u64,
        image_mib: u64,
        least_gib: u64,
    },
    #[error("installer {0} needs the size of the disk it installs to (--disk-gib)")]
    NoDiskSize(TemplateName),
    #[error("{action} {path} failed")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StorageError {
    let path = path.display().to_string();
    move |source| StorageError::Io {
        action,
        path,
        source,
    }
}

/// What a template directory's `template.toml` says.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateManifest {
    pub description: String,
    pub default_vcpus: u32,
    pub default_memory_mib: u64,
    /// Direct kernel boot, relative to the template directory.
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    /// An empty disk with nothing to boot: enough for libvirt's test driver only.
    #[serde(default)]
    pub placeholder: bool,
    /// Where the guest files were copied from, with their sizes and times, so another or a
    /// rebuilt guest replaces them.
    #[serde(default)]
    pub source: Option<String>,
    /// VM disks are qcow2 overlays on the template's image instead of copies of it (needs
    /// qemu-img). A migration moves such a disk as an overlay where the target holds the
    /// same image, and flattened elsewhere.
    #[serde(default)]
    pub overlay: bool,
    /// The NIC its VMs get on QEMU: `user` (QEMU's user-mode network) or `none`.
    #[serde(default)]
    pub network: TemplateNetwork,
    /// The image's format; its file is `disk.img` (raw), `disk.qcow2` or `disk.iso`.
    #[serde(default = "raw_format")]
    pub format: ImageFormat,
    /// The console's library image this template holds (its BLAKE3), for one pushed there.
    #[serde(default)]
    pub image_blake3: Option<String>,
}

fn raw_format() -> ImageFormat {
    ImageFormat::Raw
}

/// The file name of a template's image in its directory.
fn template_disk_name(format: ImageFormat) -> String {
    format!("disk.{}", format.extension())
}

/// The NIC a template's VMs get on QEMU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateNetwork {
    /// A virtio NIC on QEMU's user-mode network: the guest (10.0.2.15) reaches out through
    /// the QEMU process's sockets, and reaches the host's loopback at 10.0.2.2; nothing
    /// reaches in.
    #[default]
    User,
    /// No NIC at all.
    None,
}

/// A template resolved to absolute paths inside the storage directory.
#[derive(Debug, Clone)]
pub struct Template {
    pub info: TemplateInfo,
    pub disk: PathBuf,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    /// Nothing to boot: only libvirt's test driver can run it.
    pub placeholder: bool,
    /// New disks are qcow2 overlays on `disk`.
    pub overlay: bool,
    pub network: TemplateNetwork,
    /// The image's format: an overlay names it for its backing file.
    pub format: ImageFormat,
    /// The console's library image this template holds (its BLAKE3), for one pushed there.
    pub image_blake3: Option<String>,
}

/// How a VM's disk file is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// A whole image, sparse.
    Raw,
    /// A qcow2 overlay on a template's image.
    Qcow2,
}

impl DiskFormat {
    /// libvirt's name of the format.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }

    fn extension(self) -> &'static str {
        match self {
            DiskFormat::Raw => "img",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// A VM's disk as it is in the storage directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDisk {
    pub path: PathBuf,
    pub format: DiskFormat,
}

const TEMPLATE_DISK: &str = "disk.img";
const TINY_DISK_BYTES: u64 = 64 * 1024 * 1024;

/// A template image's digest with what it was computed from (size, modification time).
type DigestCache = HashMap<TemplateName, ((u64, i64, i64), TemplateDisk)>;

#[derive(Debug, Clone)]
pub struct Storage {
    root: PathBuf,
    digests: Arc<Mutex<DigestCache>>,
}

impl Storage {
    /// Opens (and creates) the storage layout under the data dir.
    pub fn open(data_dir: &Path) -> Result<Self, StorageError> {
        let root = data_dir.join("storage");
        for dir in [
            root.join("images"),
            root.join("incoming"),
            root.join("disks"),
            root.join("definitions"),
        ] {
            std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        }
        Ok(Storage {
            root,
            digests: Arc::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn template_dir(&self, name: &TemplateName) -> PathBuf {
        // A validated name holds no '/' and no "..", so this stays inside the root.
        self.root.join("images").join(name.as_str())
    }

    /// Where images pushed from the console are received, by digest, until they are whole.
    pub fn incoming_dir(&self) -> PathBuf {
        self.root.join("incoming")
    }

    /// The file an image with `blake3` in `format` is received into, in [`Self::incoming_dir`].
    pub fn incoming_file_name(blake3: &str, format: ImageFormat) -> String {
        format!("{blake3}.{}", format.extension())
    }

    /// The template that holds the library image `blake3`, if one does.
    pub fn template_with_image(&self, blake3: &str) -> Option<Template> {
        let infos = self.templates().ok()?;
        infos
            .iter()
            .filter_map(|t| self.template(&t.name).ok())
            .find(|t| t.image_blake3.as_deref() == Some(blake3))
    }

    /// Makes `file` (a verified image in [`Self::incoming_dir`], or the disk of another
    /// template with the same bytes, which is linked, not copied) the template `name`. A
    /// template of that name that holds the same image is left as it is; one that holds
    /// another is refused.
    pub fn install_image(
        &self,
        name: &TemplateName,
        format: ImageFormat,
        blake3: &str,
        file: &Path,
        link: bool,
    ) -> Result<Template, StorageError> {
        match self.template(name) {
            Ok(t) if t.image_blake3.as_deref() == Some(blake3) => return Ok(t),
            Ok(_) => return Err(StorageError::TemplateTaken(name.clone())),
            Err(StorageError::NoTemplate(_)) => {}
            Err(StorageError::BadTemplate { .. }) => {}
            Err(e) => return Err(e),
        }
        let dir = self.template_dir(name);
        if dir.join("template.toml").exists() {
            return Err(StorageError::TemplateTaken(name.clone()));
        }
        std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let disk = dir.join(template_disk_name(format));
        let _ = std::fs::remove_file(&disk);
        if link {
            std::fs::hard_link(file, &disk).map_err(io_err("linking", &disk))?;
        } else {
            std::fs::rename(file, &disk).map_err(io_err("renaming", file))?;
        }
        let manifest = TemplateManifest {
            description: format!("Image {name} ({})", format.as_str()),
            default_vcpus: 1,
            default_memory_mib: 1024,
            kernel: None,
            initrd: None,
            cmdline: None,
            placeholder: false,
            source: None,
            // A disk image gives overlay disks; an installer is a CD-ROM beside an empty disk.
            overlay: format != ImageFormat::Iso,
            network: TemplateNetwork::User,
            format,
            image_blake3: Some(blake3.to_string()),
        };
        let text = toml::to_string(&manifest).expect("manifest serializes");
        let path = dir.join("template.toml");
        // The manifest is written last: a template without one is not there.
        dunes_shared::durable::write_file(&path, text.as_bytes(), 0o644)
            .map_err(io_err("writing", &path))?;
        sync_parent(&dir)?;
        self.template(name)
    }

    pub fn disks_dir(&self) -> PathBuf {
        self.root.join("disks")
    }

    /// A disk by file name; the caller has checked it is a plain file name.
    pub fn disk_file(&self, file: &str) -> PathBuf {
        self.disks_dir().join(file)
    }

    /// The file name of a VM's first disk inside [`Storage::disks_dir`], in `format`.
    pub fn disk_file_name(vm: &VmName, format: DiskFormat) -> String {
        format!("{vm}.{}", format.extension())
    }

    /// The VM's disk here, an overlay or a whole image, if it has one.
    pub fn vm_disk(&self, vm: &VmName) -> Option<VmDisk> {
        [DiskFormat::Qcow2, DiskFormat::Raw]
            .into_iter()
            .map(|format| VmDisk {
                path: self.disk_file(&Self::disk_file_name(vm, format)),
                format,
            })
            .find(|d| d.path.exists())
    }

    /// Copies disk files (`from`, `to`: names in the disks directory), holes kept; a copy
    /// that fails removes what it wrote.
    pub fn copy_disk_files(&self, pairs: &[(String, String)]) -> Result<(), StorageError> {
        for (i, (from, to)) in pairs.iter().enumerate() {
            if let Err(e) = sparse_copy(&self.disk_file(from), &self.disk_file(to)) {
                for (_, done) in &pairs[..i] {
                    let _ = std::fs::remove_file(self.disk_file(done));
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// The digest of a template's image, hashed once per version of the file.
    pub fn template_disk(&self, name: &TemplateName) -> Result<TemplateDisk, StorageError> {
        let template = self.template(name)?;
        let path = template.disk;
        let meta = std::fs::metadata(&path).map_err(io_err("reading", &path))?;
        // A pushed image was verified chunk by chunk against the console's copy, whose
        // digest this is: no need to read it all again.
        if let Some(blake3) = template.image_blake3 {
            return Ok(TemplateDisk {
                template: name.clone(),
                blake3,
                allocated_bytes: meta.blocks() * 512,
            });
        }
        let stamp = (meta.len(), meta.mtime(), meta.mtime_nsec());
        if let Some((at, disk)) = lock(&self.digests).get(name)
            && *at == stamp
        {
            return Ok(disk.clone());
        }
        let mut hasher = blake3::Hasher::new();
        let file = File::open(&path).map_err(io_err("opening", &path))?;
        hasher
            .update_reader(file)
            .map_err(io_err("reading", &path))?;
        let disk = TemplateDisk {
            template: name.clone(),
            blake3: hasher.finalize().to_hex().to_string(),
            allocated_bytes: meta.blocks() * 512,
        };
        lock(&self.digests).insert(name.clone(), (stamp, disk.clone()));
        Ok(disk)
    }

    /// The digests of every template that gives overlay disks or holds a library image.
    pub fn overlay_template_disks(&self) -> Vec<TemplateDisk> {
        let Ok(infos) = self.templates() else {
            return Vec::new();
        };
        infos
            .iter()
            .filter(|t| {
                self.template(&t.name)
                    .is_ok_and(|t| t.overlay || t.image_blake3.is_some())
            })
            .filter_map(|t| match self.template_disk(&t.name) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::warn!("template {}: {e}", t.name);
                    None
                }
            })
            .collect()
    }

    /// Makes sure the built-in `tiny` template exists. Without a guest image it gets an empty
    /// sparse disk, which is all libvirt's test driver needs.
    pub fn ensure_tiny_template(&self, guest_dir: Option<&Path>) -> Result<(), StorageError> {
        let name = TemplateName::new("tiny").expect("valid literal");
        let dir = self.template_dir(&name);
        let manifest_path = dir.join("template.toml");
        let wanted = guest_dir.map(guest_stamp).transpose()?;
        if manifest_path.exists() {
            let installed: Option<TemplateManifest> = std::fs::read_to_string(&manifest_path)
                .ok()
                .and_then(|t| toml::from_str(&t).ok());
            let current = installed.is_some_and(|m| wanted.is_none() || m.source == wanted);
            if current {
                return Ok(());
            }
            // A guest given now (or rebuilt since) replaces the placeholder or the old guest.
            // VM disks are copies; defined VMs boot the new kernel and initrd on their next
            // start, running ones keep what they booted.
            tracing::info!(
                "installing the tiny guest from {}",
                guest_dir
                    .map(|d| d.display().to_string())
                    .unwrap_or_default()
            );
        }
        std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let mut manifest = TemplateManifest {
            description: "Tiny guest: Debian kernel, busybox, qemu-guest-agent".into(),
            default_vcpus: 1,
            default_memory_mib: 256,
            kernel: None,
            initrd: None,
            cmdline: None,
            placeholder: guest_dir.is_none(),
            source: wanted,
            overlay: false,
            network: TemplateNetwork::User,
            format: ImageFormat::Raw,
            image_blake3: None,
        };
        match guest_dir {
            Some(src) => {
                for file in ["vmlinuz", "initrd.img", TEMPLATE_DISK] {
                    let from = src.join(file);
                    sparse_copy(&from, &dir.join(file))?;
                }
                manifest.kernel = Some("vmlinuz".into());
                manifest.initrd = Some("initrd.img".into());
                manifest.cmdline = Some("console=ttyS0 quiet".into());
            }
            None => {
                let disk = dir.join(TEMPLATE_DISK);
                let file = File::create(&disk).map_err(io_err("creating", &disk))?;
                file.set_len(TINY_DISK_BYTES)
                    .map_err(io_err("sizing", &disk))?;
            }
        }
        let text = toml::to_string(&manifest).expect("manifest serializes");
        let path = dir.join("template.toml");
        dunes_shared::durable::write_file(&path, text.as_bytes(), 0o644)
            .map_err(io_err("writing", &path))
    }

    pub fn template(&self, name: &TemplateName) -> Result<Template, StorageError> {
        let dir = self.template_dir(name);
        let path = dir.join("template.toml");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StorageError::NoTemplate(name.clone()));
            }
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        let bad = |message: String| StorageError::BadTemplate {
            name: name.clone(),
            message,
        };
        let manifest: TemplateManifest =
            toml::from_str(&text).map_err(|e| bad(e.message().to_string()))?;
        let inside = |rel: &Option<String>| -> Result<Option<PathBuf>, StorageError> {
            match rel {
                None => Ok(None),
                Some(r) if is_plain_file_name(r) => Ok(Some(dir.join(r))),
                Some(r) => Err(bad(format!("{r:?} is not a file name inside the template"))),
            }
        };
        let disk = dir.join(template_disk_name(manifest.format));
        let disk_bytes = std::fs::metadata(&disk)
            .map_err(io_err("reading", &disk))?
            .len();
        Ok(Template {
            info: TemplateInfo {
                name: name.clone(),
                description: manifest.description.clone(),
                default_vcpus: manifest.default_vcpus,
                default_memory_mib: manifest.default_memory_mib,
                disk_mib: disk_bytes.div_ceil(1024 * 1024),
            },
            kernel: inside(&manifest.kernel)?,
            initrd: inside(&manifest.initrd)?,
            cmdline: manifest.cmdline,
            // Manifests from before `placeholder` existed: no kernel and no source means the
            // empty built-in disk.
            placeholder: manifest.placeholder
                || (manifest.kernel.is_none()
                    && manifest.source.is_none()
                    && name.as_str() == "tiny"),
            overlay: manifest.overlay,
            network: manifest.network,
            format: manifest.format,
            image_blake3: manifest.image_blake3,
            disk,
        })
    }

    pub fn templates(&self) -> Result<Vec<TemplateInfo>, StorageError> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let entry = entry.map_err(io_err("listing", &dir))?;
            let Some(name) = entry
                .file_name()
                .to_str()
                .and_then(|n| TemplateName::new(n).ok())
            else {
                continue;
            };
            if let Ok(t) = self.template(&name) {
                out.push(t.info);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// A new VM's disk: a qcow2 overlay on the template's image if the template says so
    /// (grown to `disk_gib` when asked), an empty sparse disk of `disk_gib` beside an
    /// installer's ISO, else a copy of the image that keeps holes as holes.
    pub fn create_disk(
        &self,
        vm: &VmName,
        template: &Template,
        disk_gib: Option<u64>,
    ) -> Result<VmDisk, StorageError> {
        if self.vm_disk(vm).is_some() {
            return Err(StorageError::DiskExists(vm.clone()));
        }
        let format = if template.overlay {
            DiskFormat::Qcow2
        } else {
            DiskFormat::Raw
        };
        let path = self.disk_file(&Self::disk_file_name(vm, format));
        let size_bytes = self.disk_size_bytes(template, disk_gib)?;
        match (format, size_bytes) {
            (DiskFormat::Raw, Some(bytes)) if template.format == ImageFormat::Iso => {
                let tmp = path.with_extension("partial");
                let made = File::create(&tmp)
                    .and_then(|f| f.set_len(bytes).and_then(|()| f.sync_all()))
                    .and_then(|()| std::fs::rename(&tmp, &path));
                if let Err(e) = made {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(io_err("creating", &path)(e));
                }
                sync_parent(&path)?;
            }
            (DiskFormat::Raw, _) => sparse_copy(&template.disk, &path)?,
            (DiskFormat::Qcow2, size) => self.create_overlay(template, &path, size)?,
        }
        Ok(VmDisk { path, format })
    }

    /// The size a new disk on `template` gets: none (the image's) unless asked; an installer
    /// needs one, and a disk image's overlay is never smaller than the image.
    fn disk_size_bytes(
        &self,
        template: &Template,
        disk_gib: Option<u64>,
    ) -> Result<Option<u64>, StorageError> {
        const GIB: u64 = 1 << 30;
        let name = &template.info.name;
        if template.format == ImageFormat::Iso {
            return disk_gib
                .map(|g| Some(g * GIB))
                .ok_or_else(|| StorageError::NoDiskSize(name.clone()));
        }
        let Some(gib) = disk_gib else {
            return Ok(None);
        };
        let image_bytes = match template.format {
            ImageFormat::Qcow2 => qcow2_virtual_size(&template.disk).unwrap_or(0),
            _ => std::fs::metadata(&template.disk)
                .map_err(io_err("reading", &template.disk))?
                .len(),
        };
        if gib * GIB < image_bytes {
            return Err(StorageError::DiskTooSmall {
                template: name.clone(),
                asked_gib: gib,
                image_mib: image_bytes.div_ceil(1 << 20),
                least_gib: image_bytes.div_ceil(GIB),
            });
        }
        Ok(Some(gib * GIB))
    }

    /// A qcow2 overlay whose backing file is named relative to the disks directory, so the
    /// file is the same on every host that keeps the template under the same name.
    fn create_overlay(
        &self,
        template: &Template,
        path: &Path,
        size_bytes: Option<u64>,
    ) -> Result<(), StorageError> {
        let name = &template.info.name;
        let backing = format!("../images/{name}/{}", template_disk_name(template.format));
        let tmp = path.with_extension("partial");
        let output = std::process::Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                template.format.as_str(),
            ])
            .args(["-b", &backing])
            .arg(&tmp)
            .args(size_bytes.map(|b| b.to_string()))
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => StorageError::NoQemuImg(name.clone()),
                _ => io_err("running qemu-img for", &tmp)(e),
            })?;
        if !output.status.success() {
            let _ = std::fs::remove_file(&tmp);
            return Err(StorageError::QemuImg {
                action: "create",
                message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(io_err("writing", &tmp))?;
        sync_parent(path)
    }

    /// Checks that the overlay `file` (in the disks directory) that came from another host
    /// is backed by this host's image of `template`, named as this agent names it, and by
    /// nothing else: its header decides what QEMU opens.
    pub fn check_overlay(&self, file: &str, template: &TemplateName) -> Result<(), StorageError> {
        let path = self.disk_file(file);
        let foreign = |message: String| StorageError::ForeignOverlay {
            file: file.to_string(),
            message,
        };
        let output = std::process::Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "qcow2"])
            .arg(&path)
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => StorageError::NoQemuImg(template.clone()),
                _ => io_err("running qemu-img for", &path)(e),
            })?;
        if !output.status.success() {
            return Err(StorageError::QemuImg {
                action: "info",
                message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        let info: serde_json::Value = serde_json::from_slice(&output.stdout)
            .map_err(|e| foreign(format!("qemu-img info: {e}")))?;
        let format = self.template(template)?.format;
        let wanted = format!("../images/{template}/{}", template_disk_name(format));
        let backing = info["backing-filename"].as_str().unwrap_or_default();
        if backing != wanted {
            return Err(foreign(format!("backed by {backing:?}, not {wanted:?}")));
        }
        if info["backing-filename-format"].as_str() != Some(format.as_str()) {
            return Err(foreign(format!(
                "its backing file is not given as {}",
                format.as_str()
            )));
        }
        if !info["format-specific"]["data"]["data-file"].is_null() {
            return Err(foreign("it keeps its data in another file".into()));
        }
        Ok(())
    }

    /// Deletes the VM's disk, whichever its format, and its cloud-init seed.
    pub fn delete_disk(&self, vm: &VmName) -> Result<(), StorageError> {
        let files = [DiskFormat::Raw, DiskFormat::Qcow2]
            .map(|format| self.disk_file(&Self::disk_file_name(vm, format)));
        for path in files.into_iter().chain([self.seed_file(vm)]) {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io_err("deleting", &path)(e));
                }
                _ => sync_parent(&path)?,
            }
        }
        Ok(())
    }

    fn definition_path(&self, vm: &VmName) -> PathBuf {
        self.root.join("definitions").join(format!("{vm}.toml"))
    }

    /// Keeps a VM's definition record (see `runtime::libvirt::definition`), durably.
    pub fn save_definition(&self, vm: &VmName, record: &str) -> Result<(), StorageError> {
        let path = self.definition_path(vm);
        dunes_shared::durable::write_file(&path, record.as_bytes(), 0o644)
            .map_err(io_err("writing", &path))
    }

    pub fn delete_definition(&self, vm: &VmName) -> Result<(), StorageError> {
        let path = self.definition_path(vm);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("deleting", &path)(e)),
            // On disk before the VM is undefined: a crash must not bring it back.
            _ => dunes_shared::durable::sync_dir(&self.root.join("definitions"))
                .map_err(io_err("syncing", &path)),
        }
    }

    pub fn definition(&self, vm: &VmName) -> Result<Option<String>, StorageError> {
        let path = self.definition_path(vm);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }

    /// Every definition record, by VM name.
    pub fn definitions(&self) -> Vec<(VmName, String)> {
        read_named_files(&self.root.join("definitions"), ".toml")
    }

    /// Domain XML files the first release kept in `storage/domains`, to be turned into
    /// records once.
    pub fn legacy_definitions(&self) -> Vec<(VmName, PathBuf, String)> {
        let dir = self.root.join("domains");
        read_named_files(&dir, ".xml")
            .into_iter()
            .map(|(name, text)| {
                let path = dir.join(format!("{name}.xml"));
                (name, path, text)
            })
            .collect()
    }

    /// A VM's cloud-init seed (made from its definition record, so it goes where the VM goes).
    pub fn seed_file(&self, vm: &VmName) -> PathBuf {
        self.disks_dir().join(format!("{vm}.cidata.iso"))
    }

    /// Writes a VM's cloud-init seed, durably.
    pub fn write_seed(&self, vm: &VmName, bytes: &[u8]) -> Result<(), StorageError> {
        let path = self.seed_file(vm);
        dunes_shared::durable::write_file(&path, bytes, 0o644).map_err(io_err("writing", &path))
    }

    /// Where a VM's serial console is logged.
    pub fn console_log_path(&self, vm: &VmName) -> PathBuf {
        self.root.join("disks").join(format!("{vm}.console.log"))
    }

    /// The VM's disks as the window and ctl show them: none for a VM whose disk is not in
    /// this storage directory (defined outside Dunes).
    pub fn vm_disk_infos(
        &self,
        vm: &VmName,
        backing: Option<&TemplateName>,
    ) -> Vec<dunes_shared::model::VmDiskInfo> {
        use dunes_shared::model::{DiskImageFormat, VmDiskInfo};
        let Some(disk) = self.vm_disk(vm) else {
            return Vec::new();
        };
        let Ok(meta) = std::fs::metadata(&disk.path) else {
            return Vec::new();
        };
        let (format, virtual_bytes) = match disk.format {
            DiskFormat::Raw => (DiskImageFormat::Raw, meta.len()),
            DiskFormat::Qcow2 => (
                DiskImageFormat::Qcow2,
                qcow2_virtual_size(&disk.path).unwrap_or(0),
            ),
        };
        vec![VmDiskInfo {
            file: disk
                .path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            format,
            virtual_bytes,
            allocated_bytes: meta.blocks() * 512,
            backing: match disk.format {
                DiskFormat::Qcow2 => backing.cloned(),
                DiskFormat::Raw => None,
            },
        }]
    }

    /// Bytes really allocated for a VM's disk (an overlay's own, without its template's).
    pub fn disk_allocated_bytes(&self, vm: &VmName) -> u64 {
        self.vm_disk(vm)
            .and_then(|d| std::fs::metadata(d.path).ok())
            .map_or(0, |m| m.blocks() * 512)
    }
}

/// The size a qcow2 image gives its guest: the big-endian u64 at byte 24 of its header,
/// after the magic `QFI\xfb`.
fn qcow2_virtual_size(path: &Path) -> Option<u64> {
    let mut header = [0u8; 32];
    File::open(path).ok()?.read_exact(&mut header).ok()?;
    if &header[..4] != b"QFI\xfb" {
        return None;
    }
    Some(u64::from_be_bytes(header[24..32].try_into().ok()?))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Files `NAME{suffix}` of a directory whose NAME is a valid VM name, with their contents.
fn read_named_files(dir: &Path, suffix: &str) -> Vec<(VmName, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(VmName, String)> = entries
        .flatten()
        .filter_map(|e| {
            let file = e.file_name();
            let name = VmName::new(file.to_str()?.strip_suffix(suffix)?).ok()?;
            Some((name, std::fs::read_to_string(e.path()).ok()?))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Copies a file, seeking over all-zero blocks so the copy stays sparse.
/// Identifies a guest build: its directory and each file's size and modification time.
fn guest_stamp(dir: &Path) -> Result<String, StorageError> {
    let mut stamp = dir.display().to_string();
    for file in ["vmlinuz", "initrd.img", TEMPLATE_DISK] {
        let path = dir.join(file);
        let meta = std::fs::metadata(&path).map_err(io_err("reading", &path))?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        stamp.push_str(&format!(" {file}:{}:{modified}", meta.len()));
    }
    Ok(stamp)
}

pub fn sparse_copy(from: &Path, to: &Path) -> Result<(), StorageError> {
    let tmp = to.with_extension("partial");
    let result = copy_holes_kept(from, &tmp)
        .and_then(|()| std::fs::rename(&tmp, to).map_err(io_err("renaming", &tmp)))
        .and_then(|()| sync_parent(to));
    if result.is_err() {
        // A half-written copy is worth nothing; leave no clutter in the storage dir.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Syncs the directory holding `path`: a name created, renamed or removed there is on disk.
fn sync_parent(path: &Path) -> Result<(), StorageError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    dunes_shared::durable::sync_dir(dir).map_err(io_err("syncing", dir))
}

fn copy_holes_kept(from: &Path, tmp: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::FileExt;
    const BLOCK: usize = 1024 * 1024;
    let src = File::open(from).map_err(io_err("opening", from))?;
    let len = src.metadata().map_err(io_err("reading", from))?.len();
    let dst = File::create(tmp).map_err(io_err("creating", tmp))?;
    // Only what the source holds is read: its holes stay holes without being read.
    let extents =
        crate::transfer::extents::allocated_extents(&src).map_err(io_err("reading", from))?;
    let mut buf = vec![0u8; BLOCK];
    for (start, extent_len) in extents {
        let end = start.saturating_add(extent_len).min(len);
        let mut offset = start;
        while offset < end {
            let want = BLOCK.min((end - offset) as usize);
            src.read_exact_at(&mut buf[..want], offset)
                .map_err(io_err("reading", from))?;
            // Zeros written out are holes in the copy too.
            if buf[..want].iter().any(|b| *b != 0) {
                dst.write_all_at(&buf[..want], offset)
                    .map_err(io_err("writing", tmp))?;
            }
            offset += want as u64;
        }
    }
    dst.set_len(len).map_err(io_err("sizing", tmp))?;
    dst.sync_all().map_err(io_err("syncing", tmp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn tiny_template_and_disks() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        storage.ensure_tiny_template(None).unwrap();
        let tiny = storage
            .template(&TemplateName::new("tiny").unwrap())
            .unwrap();
        assert_eq!(tiny.info.disk_mib, 64);
        assert_eq!(storage.templates().unwrap().len(), 1);
        let vm = VmName::new("web").unwrap();
        let disk = storage.create_disk(&vm, &tiny, None).unwrap().path;
        assert!(disk.starts_with(dir.path()));
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), 64 * 1024 * 1024);
        // Sparse: almost nothing allocated.
        assert!(storage.disk_allocated_bytes(&vm) < 1024 * 1024);
        assert!(matches!(
            storage.create_disk(&vm, &tiny, None),
            Err(StorageError::DiskExists(_))
        ));
        storage.delete_disk(&vm).unwrap();
        assert!(!disk.exists());
        storage.delete_disk(&vm).unwrap();
        let missing = TemplateName::new("nope").unwrap();
        assert_eq!(
            storage.template(&missing).unwrap_err().to_string(),
            "template nope does not exist"
        );
    }

    #[test]
    fn a_guest_dir_replaces_the_placeholder() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&dir.path().join("data")).unwrap();
        let tiny_name = TemplateName::new("tiny").unwrap();
        storage.ensure_tiny_template(None).unwrap();
        let tiny = storage.template(&tiny_name).unwrap();
        assert!(tiny.placeholder && tiny.kernel.is_none());

        let guest = dir.path().join("guest");
        std::fs::create_dir(&guest).unwrap();
        for (file, text) in [("vmlinuz", "k"), ("initrd.img", "i"), ("disk.img", "d")] {
            std::fs::write(guest.join(file), text).unwrap();
        }
        storage.ensure_tiny_template(Some(&guest)).unwrap();
        let tiny = storage.template(&tiny_name).unwrap();
        assert!(!tiny.placeholder);
        let kernel = tiny.kernel.expect("direct kernel boot");
        assert!(kernel.starts_with(dir.path().join("data")));
        assert_eq!(std::fs::read_to_string(kernel).unwrap(), "k");

        // Restarting without --guest-dir keeps the installed guest.
        storage.ensure_tiny_template(None).unwrap();
        assert!(!storage.template(&tiny_name).unwrap().placeholder);

        // A guest rebuilt in the same place is installed again.
        std::fs::write(guest.join("vmlinuz"), "k2").unwrap();
        storage.ensure_tiny_template(Some(&guest)).unwrap();
        let kernel = storage.template(&tiny_name).unwrap().kernel.unwrap();
        assert_eq!(std::fs::read_to_string(kernel).unwrap(), "k2");

        // A manifest written before `placeholder` existed still counts as the empty disk.
        let old = dir.path().join("old");
        let old_storage = Storage::open(&old).unwrap();
        old_storage.ensure_tiny_template(None).unwrap();
        let manifest = old.join("storage/images/tiny/template.toml");
        let text = std::fs::read_to_string(&manifest).unwrap();
        let legacy: String = text
            .lines()
            .filter(|l| !l.starts_with("placeholder"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&manifest, legacy).unwrap();
        assert!(old_storage.template(&tiny_name).unwrap().placeholder);
    }

    #[test]
    fn overlays_name_their_template_relatively_and_foreign_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let name = TemplateName::new("base").unwrap();
        let tdir = storage.template_dir(&name);
        std::fs::create_dir_all(&tdir).unwrap();
        File::create(tdir.join("disk.img"))
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        std::fs::write(
            tdir.join("template.toml"),
            "description = \"b\"\ndefault_vcpus = 1\ndefault_memory_mib = 64\nplaceholder = true\noverlay = true\n",
        )
        .unwrap();
        let template = storage.template(&name).unwrap();
        assert!(template.overlay);
        let vm = VmName::new("web").unwrap();
        let disk = storage.create_disk(&vm, &template, None).unwrap();
        assert_eq!(disk.format, DiskFormat::Qcow2);
        assert_eq!(storage.vm_disk(&vm), Some(disk.clone()));
        storage.check_overlay("web.qcow2", &name).unwrap();
        // The digest is of the image, and cached until the file changes.
        let digest = storage.template_disk(&name).unwrap();
        assert_eq!(storage.overlay_template_disks(), vec![digest.clone()]);
        std::fs::write(tdir.join("disk.img"), b"other").unwrap();
        assert_ne!(storage.template_disk(&name).unwrap().blake3, digest.blake3);

        // An overlay whose header names a file elsewhere is not opened.
        let outside = dir.path().join("elsewhere.img");
        File::create(&outside).unwrap().set_len(8 << 20).unwrap();
        let status = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&outside)
            .arg(storage.disk_file("evil.qcow2"))
            .status()
            .unwrap();
        assert!(status.success());
        let err = storage.check_overlay("evil.qcow2", &name).unwrap_err();
        assert!(
            err.to_string().contains("is not one of this agent's"),
            "{err}"
        );
        storage.delete_disk(&vm).unwrap();
        assert_eq!(storage.vm_disk(&vm), None);
    }

    #[test]
    fn template_paths_cannot_escape() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let name = TemplateName::new("evil").unwrap();
        let tdir = storage.root().join("images/evil");
        std::fs::create_dir_all(&tdir).unwrap();
        std::fs::write(tdir.join("disk.img"), b"").unwrap();
        std::fs::write(
            tdir.join("template.toml"),
            "description = \"x\"\ndefault_vcpus = 1\ndefault_memory_mib = 64\nkernel = \"../../../etc/passwd\"\n",
        )
        .unwrap();
        let err = storage.template(&name).unwrap_err().to_string();
        assert!(err.contains("not a file name inside the template"), "{err}");
    }

    #[test]
    fn a_template_says_which_nic_its_vms_get() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        storage.ensure_tiny_template(None).unwrap();
        let tiny = TemplateName::new("tiny").unwrap();
        assert_eq!(
            storage.template(&tiny).unwrap().network,
            TemplateNetwork::User
        );
        let name = TemplateName::new("sealed").unwrap();
        let tdir = storage.root().join("images/sealed");
        std::fs::create_dir_all(&tdir).unwrap();
        std::fs::write(tdir.join("disk.img"), b"").unwrap();
        let manifest = |network: &str| {
            format!("description = \"x\"\ndefault_vcpus = 1\ndefault_memory_mib = 64\n{network}")
        };
        std::fs::write(tdir.join("template.toml"), manifest("")).unwrap();
        assert_eq!(
            storage.template(&name).unwrap().network,
            TemplateNetwork::User
        );
        std::fs::write(tdir.join("template.toml"), manifest("network = \"none\"\n")).unwrap();
        assert_eq!(
            storage.template(&name).unwrap().network,
            TemplateNetwork::None
        );
        std::fs::write(
            tdir.join("template.toml"),
            manifest("network = \"bridge\"\n"),
        )
        .unwrap();
        let err = storage.template(&name).unwrap_err().to_string();
        assert!(err.contains("unknown variant"), "{err}");
    }

    #[test]
    fn sparse_copy_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a");
        let mut f = File::create(&src).unwrap();
        f.set_len(1024 * 1024).unwrap();
        f.seek(SeekFrom::Start(300_000)).unwrap();
        f.write_all(b"hello").unwrap();
        drop(f);
        let dst = dir.path().join("b");
        sparse_copy(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    }

    #[test]
    fn a_pushed_image_becomes_a_template_once_and_its_name_stays_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let os = TemplateName::new("os").unwrap();
        let incoming = storage
            .incoming_dir()
            .join(Storage::incoming_file_name("aa", ImageFormat::Qcow2));
        std::fs::write(&incoming, b"QFI\xfbimage").unwrap();
        let template = storage
            .install_image(&os, ImageFormat::Qcow2, "aa", &incoming, false)
            .unwrap();
        assert!(template.overlay);
        assert_eq!(template.disk, storage.template_dir(&os).join("disk.qcow2"));
        assert!(!incoming.exists());
        // Its digest is the library's, without reading the file again.
        assert_eq!(storage.template_disk(&os).unwrap().blake3, "aa");
        assert_eq!(
            storage.template_with_image("aa").map(|t| t.info.name),
            Some(os.clone())
        );
        // Under another name, the same bytes are linked, not copied.
        let again = TemplateName::new("os-again").unwrap();
        storage
            .install_image(&again, ImageFormat::Qcow2, "aa", &template.disk, true)
            .unwrap();
        let linked = std::fs::metadata(storage.template_dir(&again).join("disk.qcow2")).unwrap();
        assert_eq!(linked.nlink(), 2);
        // The same image again changes nothing; another image under the name is refused.
        storage
            .install_image(&os, ImageFormat::Qcow2, "aa", &template.disk, true)
            .unwrap();
        let other = storage.incoming_dir().join("bb.qcow2");
        std::fs::write(&other, b"other").unwrap();
        assert!(matches!(
            storage.install_image(&os, ImageFormat::Qcow2, "bb", &other, false),
            Err(StorageError::TemplateTaken(_))
        ));
        assert_eq!(std::fs::read(&template.disk).unwrap(), b"QFI\xfbimage");
    }
}
