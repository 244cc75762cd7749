//! A VM's definition as data: what the VM is (spec, disks by name, devices), with no path that
//! only one agent understands, so another agent can define the same VM from it. The domain
//! XML is generated from it, and libvirt's XML read back, with `quick-xml`.

use std::path::Path;

use dunes_shared::model::{
    Firmware, MEMORY_MIB_MAX, MEMORY_MIB_MIN, TemplateName, VCPUS_MAX, VmName,
};
use quick_xml::{
    Reader, Writer,
    events::{BytesText, Event},
};
use serde::{Deserialize, Serialize};

use crate::storage::Storage;

/// Namespace of Dunes' own metadata inside a domain definition.
pub const METADATA_NS: &str = "https://dunes.invalid/xmlns/vm/1";

#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("the domain XML does not parse: {0}")]
    Xml(String),
    #[error("the domain XML has no {0}")]
    Missing(&'static str),
    #[error("{0}")]
    Invalid(String),
    #[error("the definition record does not parse: {0}")]
    Record(String),
}

/// How a hypervisor is told to run the VM; chosen by the agent that defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainType {
    /// libvirt's mock hypervisor.
    Test,
    /// QEMU without KVM (TCG): what the machines of this project run.
    Qemu,
}

impl DomainType {
    fn as_str(self) -> &'static str {
        match self {
            DomainType::Test => "test",
            DomainType::Qemu => "qemu",
        }
    }
}

/// A disk of the VM: a file in the agent's `storage/disks`, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDefinition {
    /// File name inside `storage/disks` (no directory).
    pub file: String,
    /// `raw` (a whole image) or `qcow2` (an overlay on the template's image).
    pub format: String,
    /// The guest's device name (`vda`).
    pub target: String,
}

/// Direct kernel boot from files of the VM's template (in `storage/images/TEMPLATE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectBoot {
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
}

/// What the VM has besides its disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Devices {
    /// A serial console, logged to `storage/disks/NAME.console.log` (QEMU only).
    pub serial_log: bool,
    /// The qemu-guest-agent channel (QEMU only).
    pub guest_agent: bool,
    /// A virtio NIC on QEMU's user-mode network (QEMU only): the guest reaches out through
    /// the QEMU process's own sockets, which the agent measures like a process instance's.
    /// Absent from records written before VMs had one.
    #[serde(default)]
    pub user_network: bool,
    /// The NIC's MAC address, kept so a VM redefined (resized, moved) keeps it; absent from
    /// records written before, where libvirt chose one.
    #[serde(default)]
    pub mac: Option<String>,
    /// A VGA display on VNC that listens nowhere: the agent hands libvirt's connections to
    /// it to the console (QEMU only). Absent from records written before VMs had screens.
    #[serde(default)]
    pub screen: bool,
    /// A NIC on a service network's bridge instead of the user-mode one; the VM keeps its
    /// address and MAC wherever it is defined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_nic: Option<dunes_shared::network::InstanceNic>,
}

/// A VM's definition, portable between agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDefinition {
    pub name: VmName,
    /// Kept across agents, so the VM is the same VM wherever it is defined.
    pub uuid: String,
    pub template: TemplateName,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<DiskDefinition>,
    #[serde(default)]
    pub boot: Option<DirectBoot>,
    pub devices: Devices,
    /// Started by the agent whenever the agent starts.
    #[serde(default)]
    pub autostart: bool,
    /// What boots it: the PC BIOS, or UEFI (OVMF). Left out for the BIOS.
    #[serde(default, skip_serializing_if = "Firmware::is_bios")]
    pub firmware: Firmware,
    /// An installer's ISO in the template's directory, a read-only CD-ROM booted before the
    /// disk until it is ejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdrom: Option<String>,
    /// The library image the VM was made from, by its BLAKE3: the same on every host,
    /// whatever the template there is called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_blake3: Option<String>,
    /// cloud-init's data: the seed (`storage/disks/NAME.cidata.iso`) is made from it on every
    /// host that defines the VM, with the VM's UUID as the instance id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInitRecord>,
}

/// cloud-init's data as a VM's record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudInitRecord {
    pub hostname: String,
    pub user_data: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<String>,
}

impl From<dunes_shared::cloud_init::CloudInitData> for CloudInitRecord {
    fn from(d: dunes_shared::cloud_init::CloudInitData) -> Self {
        CloudInitRecord {
            hostname: d.hostname,
            user_data: d.user_data,
            network_config: d.network_config,
        }
    }
}

impl CloudInitRecord {
    /// The NoCloud seed of the VM `uuid` whose NIC has MAC address `mac`: without
    /// network-config of the console's, DHCP on that NIC.
    pub fn seed(&self, uuid: &str, mac: Option<&str>) -> crate::cidata::Seed {
        crate::cidata::Seed {
            meta_data: dunes_shared::cloud_init::meta_data(uuid, &self.hostname),
            user_data: self.user_data.clone(),
            network_config: self
                .network_config
                .clone()
                .or_else(|| mac.map(dunes_shared::cloud_init::dhcp_network_config)),
        }
    }
}

/// The host's end of a VM's NIC on a service network: `dnt` and its address in hex (libvirt
/// takes a name given, and the agent finds the device by it).
pub fn tap_name(nic: &dunes_shared::network::InstanceNic) -> String {
    format!("dnt{:08x}", u32::from(nic.address))
}

/// The kernel's command line of a directly booted VM: the template's, and on a service
/// network the address for the guest's init (the tiny guest reads `dunes.ip`, `dunes.gw`
/// and `dunes.mtu`).
pub fn kernel_cmdline(
    template: Option<&str>,
    nic: Option<&dunes_shared::network::InstanceNic>,
) -> Option<String> {
    match (template, nic) {
        (t, None) => t.map(str::to_string),
        (t, Some(nic)) => {
            let network = format!(
                "dunes.ip={}/{} dunes.gw={} dunes.mtu={}",
                nic.address, nic.prefix_len, nic.gateway, nic.mtu
            );
            Some(match t {
                Some(t) if !t.is_empty() => format!("{t} {network}"),
                _ => network,
            })
        }
    }
}

/// A random MAC address in QEMU's locally administered range (`52:54:00`).
pub fn random_mac() -> String {
    let b = uuid::Uuid::new_v4().into_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

fn is_mac(text: &str) -> bool {
    let parts: Vec<&str> = text.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && name.len() <= 255
}

impl VmDefinition {
    /// Refuses a record whose file names would leave the storage directory.
    pub fn validate(&self) -> Result<(), DefinitionError> {
        let bad = |what: &str, name: &str| {
            Err(DefinitionError::Invalid(format!(
                "{what} {name:?} is not a plain file name"
            )))
        };
        for disk in &self.disks {
            if !is_plain_file_name(&disk.file) {
                return bad("disk", &disk.file);
            }
            if disk.format != "raw" && disk.format != "qcow2" {
                return Err(DefinitionError::Invalid(format!(
                    "disk format {:?} is not supported",
                    disk.format
                )));
            }
            if !disk.target.bytes().all(|b| b.is_ascii_lowercase()) || disk.target.is_empty() {
                return bad("disk target", &disk.target);
            }
        }
        if let Some(boot) = &self.boot {
            if !is_plain_file_name(&boot.kernel) {
                return bad("kernel", &boot.kernel);
            }
            if let Some(initrd) = boot.initrd.as_deref().filter(|i| !is_plain_file_name(i)) {
                return bad("initrd", initrd);
            }
        }
        if let Some(cdrom) = self.cdrom.as_deref().filter(|c| !is_plain_file_name(c)) {
            return bad("CD-ROM image", cdrom);
        }
        if self.cdrom.is_some() && self.boot.is_some() {
            return Err(DefinitionError::Invalid(
                "a VM boots from its kernel or from a CD-ROM, not both".into(),
            ));
        }
        if let Some(ci) = &self.cloud_init {
            dunes_shared::cloud_init::check_user_data(&ci.user_data)
                .map_err(|e| DefinitionError::Invalid(e.to_string()))?;
            // The host name goes into the seed's YAML quoted; it is a plain name all the same.
            if VmName::new(&ci.hostname).is_err() {
                return Err(DefinitionError::Invalid(format!(
                    "{:?} is not a host name",
                    ci.hostname
                )));
            }
        }
        if let Some(mac) = self.devices.mac.as_deref().filter(|m| !is_mac(m)) {
            return Err(DefinitionError::Invalid(format!(
                "{mac:?} is not a MAC address"
            )));
        }
        if !(1..=VCPUS_MAX).contains(&self.vcpus) {
            return Err(DefinitionError::Invalid(format!(
                "vcpus must be between 1 and {VCPUS_MAX}, not {}",
                self.vcpus
            )));
        }
        if !(MEMORY_MIB_MIN..=MEMORY_MIB_MAX).contains(&self.memory_mib) {
            return Err(DefinitionError::Invalid(format!(
                "memory must be between {MEMORY_MIB_MIN} and {MEMORY_MIB_MAX} MiB, not {}",
                self.memory_mib
            )));
        }
        if uuid::Uuid::parse_str(&self.uuid).is_err() {
            return Err(DefinitionError::Invalid(format!(
                "{:?} is not a UUID",
                self.uuid
            )));
        }
        Ok(())
    }

    /// The definition over the raw image a flattened transfer makes of its overlay disk.
    pub fn flattened(mut self) -> Self {
        for disk in &mut self.disks {
            if disk.format == "qcow2" {
                disk.file = Storage::disk_file_name(&self.name, crate::storage::DiskFormat::Raw);
                disk.format = "raw".into();
            }
        }
        self
    }

    pub fn to_toml(&self) -> Result<String, DefinitionError> {
        self.validate()?;
        toml::to_string(self).map_err(|e| DefinitionError::Record(e.to_string()))
    }

    pub fn from_toml(text: &str) -> Result<Self, DefinitionError> {
        let def: VmDefinition =
            toml::from_str(text).map_err(|e| DefinitionError::Record(e.message().to_string()))?;
        def.validate()?;
        Ok(def)
    }

    /// The domain XML for this agent: file names resolved inside `storage`.
    pub fn domain_xml(
        &self,
        domain_type: DomainType,
        storage: &Storage,
    ) -> Result<String, DefinitionError> {
        self.validate()?;
        let mut w = Writer::new(Vec::new());
        let xml_err = |e: std::io::Error| DefinitionError::Xml(e.to_string());
        let path_text = |p: &Path| p.display().to_string();
        let qemu = domain_type == DomainType::Qemu;
        let template_dir = storage.template_dir(&self.template);
        w.create_element("domain")
            .with_attribute(("type", domain_type.as_str()))
            .write_inner_content(|w| {
                text_element(w, "name", self.name.as_str())?;
                text_element(w, "uuid", &self.uuid)?;
                w.create_element("metadata").write_inner_content(|w| {
                    w.create_element("dunes:vm")
                        .with_attribute(("xmlns:dunes", METADATA_NS))
                        .write_inner_content(|w| {
                            text_element(w, "dunes:template", self.template.as_str())
                        })?;
                    Ok(())
                })?;
                w.create_element("memory")
                    .with_attribute(("unit", "MiB"))
                    .write_text_content(BytesText::new(&self.memory_mib.to_string()))?;
                text_element(w, "vcpu", &self.vcpus.max(1).to_string())?;
                let os = w.create_element("os");
                // libvirt picks the OVMF build from the firmware descriptors QEMU installs.
                let os = if qemu && self.firmware == Firmware::Uefi {
                    os.with_attribute(("firmware", "efi"))
                } else {
                    os
                };
                os.write_inner_content(|w| {
                    let os_type = w.create_element("type").with_attribute(("arch", "x86_64"));
                    let os_type = if qemu {
                        os_type.with_attribute(("machine", "pc"))
                    } else {
                        os_type
                    };
                    os_type.write_text_content(BytesText::new("hvm"))?;
                    if let Some(boot) = &self.boot {
                        text_element(w, "kernel", &path_text(&template_dir.join(&boot.kernel)))?;
                        if let Some(initrd) = &boot.initrd {
                            text_element(w, "initrd", &path_text(&template_dir.join(initrd)))?;
                        }
                        if let Some(cmdline) = kernel_cmdline(
                            boot.cmdline.as_deref(),
                            self.devices.service_nic.as_ref(),
                        ) {
                            text_element(w, "cmdline", &cmdline)?;
                        }
                    }
                    if self.cdrom.is_some() {
                        // The installer first; once it is ejected the disk boots.
                        w.create_element("boot")
                            .with_attribute(("dev", "cdrom"))
                            .write_empty()?;
                        w.create_element("boot")
                            .with_attribute(("dev", "hd"))
                            .write_empty()?;
                    }
                    Ok(())
                })?;
                if qemu {
                    // ACPI lets a graceful stop press the power button.
                    w.create_element("features").write_inner_content(|w| {
                        w.create_element("acpi").write_empty()?;
                        w.create_element("apic").write_empty()?;
                        Ok(())
                    })?;
                }
                text_element(w, "on_poweroff", "destroy")?;
                text_element(w, "on_reboot", "restart")?;
                text_element(w, "on_crash", "destroy")?;
                w.create_element("devices").write_inner_content(|w| {
                    for disk in &self.disks {
                        w.create_element("disk")
                            .with_attributes([("type", "file"), ("device", "disk")])
                            .write_inner_content(|w| {
                                w.create_element("driver")
                                    .with_attributes([
                                        ("name", "qemu"),
                                        ("type", disk.format.as_str()),
                                    ])
                                    .write_empty()?;
                                let source = path_text(&storage.disk_file(&disk.file));
                                w.create_element("source")
                                    .with_attribute(("file", source.as_str()))
                                    .write_empty()?;
                                w.create_element("target")
                                    .with_attributes([
                                        ("dev", disk.target.as_str()),
                                        ("bus", "virtio"),
                                    ])
                                    .write_empty()?;
                                Ok(())
                            })?;
                    }
                    if let Some(iso) = &self.cdrom {
                        let source = path_text(&template_dir.join(iso));
                        w.create_element("disk")
                            .with_attributes([("type", "file"), ("device", "cdrom")])
                            .write_inner_content(|w| {
                                w.create_element("driver")
                                    .with_attributes([("name", "qemu"), ("type", "raw")])
                                    .write_empty()?;
                                w.create_element("source")
                                    .with_attribute(("file", source.as_str()))
                                    .write_empty()?;
                                // The PC machine type has IDE, not SATA.
                                w.create_element("target")
                                    .with_attributes([("dev", "hdc"), ("bus", "ide")])
                                    .write_empty()?;
                                w.create_element("readonly").write_empty()?;
                                Ok(())
                            })?;
                    }
                    if self.cloud_init.is_some() {
                        let source = path_text(&storage.seed_file(&self.name));
                        w.create_element("disk")
                            .with_attributes([("type", "file"), ("device", "cdrom")])
                            .write_inner_content(|w| {
                                w.create_element("driver")
                                    .with_attributes([("name", "qemu"), ("type", "raw")])
                                    .write_empty()?;
                                w.create_element("source")
                                    .with_attribute(("file", source.as_str()))
                                    .write_empty()?;
                                w.create_element("target")
                                    .with_attributes([("dev", "hdd"), ("bus", "ide")])
                                    .write_empty()?;
                                w.create_element("readonly").write_empty()?;
                                Ok(())
                            })?;
                    }
                    if qemu && self.devices.serial_log {
                        let log = path_text(&storage.console_log_path(&self.name));
                        w.create_element("serial")
                            .with_attribute(("type", "pty"))
                            .write_inner_content(|w| {
                                w.create_element("log")
                                    .with_attributes([("file", log.as_str()), ("append", "off")])
                                    .write_empty()?;
                                w.create_element("target")
                                    .with_attribute(("port", "0"))
                                    .write_empty()?;
                                Ok(())
                            })?;
                        w.create_element("console")
                            .with_attribute(("type", "pty"))
                            .write_inner_content(|w| {
                                w.create_element("target")
                                    .with_attributes([("type", "serial"), ("port", "0")])
                                    .write_empty()?;
                                Ok(())
                            })?;
                    }
                    if qemu && self.devices.guest_agent {
                        w.create_element("channel")
                            .with_attribute(("type", "unix"))
                            .write_inner_content(|w| {
                                w.create_element("target")
                                    .with_attributes([
                                        ("type", "virtio"),
                                        ("name", "org.qemu.guest_agent.0"),
                                    ])
                                    .write_empty()?;
                                Ok(())
                            })?;
                    }
                    if let Some(nic) = &self.devices.service_nic {
                        let bridge = dunes_shared::network::bridge_name(nic.vni);
                        let tap = tap_name(nic);
                        let mtu = nic.mtu.to_string();
                        w.create_element("interface")
                            .with_attribute(("type", "bridge"))
                            .write_inner_content(|w| {
                                w.create_element("source")
                                    .with_attribute(("bridge", bridge.as_str()))
                                    .write_empty()?;
                                w.create_element("mac")
                                    .with_attribute(("address", nic.mac.as_str()))
                                    .write_empty()?;
                                w.create_element("target")
                                    .with_attribute(("dev", tap.as_str()))
                                    .write_empty()?;
                                w.create_element("model")
                                    .with_attribute(("type", "virtio"))
                                    .write_empty()?;
                                w.create_element("mtu")
                                    .with_attribute(("size", mtu.as_str()))
                                    .write_empty()?;
                                Ok(())
                            })?;
                    } else if qemu && self.devices.user_network {
                        w.create_element("interface")
                            .with_attribute(("type", "user"))
                            .write_inner_content(|w| {
                                if let Some(mac) = &self.devices.mac {
                                    w.create_element("mac")
                                        .with_attribute(("address", mac.as_str()))
                                        .write_empty()?;
                                }
                                w.create_element("model")
                                    .with_attribute(("type", "virtio"))
                                    .write_empty()?;
                                Ok(())
                            })?;
                    }
                    if qemu && self.devices.screen {
                        // No listen address at all: QEMU takes clients only from libvirt
                        // (virDomainOpenGraphicsFD), so the screen is never on a port.
                        w.create_element("graphics")
                            .with_attribute(("type", "vnc"))
                            .write_inner_content(|w| {
                                w.create_element("listen")
                                    .with_attribute(("type", "none"))
                                    .write_empty()?;
                                Ok(())
                            })?;
                        w.create_element("video").write_inner_content(|w| {
                            w.create_element("model")
                                .with_attribute(("type", "vga"))
                                .write_empty()?;
                            Ok(())
                        })?;
                    }
                    if qemu {
                        w.create_element("controller")
                            .with_attributes([("type", "usb"), ("model", "none")])
                            .write_empty()?;
                        w.create_element("memballoon")
                            .with_attribute(("model", "none"))
                            .write_empty()?;
                    }
                    Ok(())
                })?;
                Ok(())
            })
            .map_err(xml_err)?;
        String::from_utf8(w.into_inner()).map_err(|e| DefinitionError::Xml(e.to_string()))
    }

    /// Reads a domain XML this agent (or the first release) wrote back into a definition.
    /// Disk paths must lie in `storage`'s disk directory; they become file names again.
    pub fn from_domain_xml(xml: &str, storage: &Storage) -> Result<Self, DefinitionError> {
        Self::from_parsed(DomainXml::parse(xml)?, storage)
    }

    /// As [`VmDefinition::from_domain_xml`], from XML already parsed.
    pub fn from_parsed(doc: DomainXml, storage: &Storage) -> Result<Self, DefinitionError> {
        let name = VmName::new(doc.name.ok_or(DefinitionError::Missing("name"))?)
            .map_err(|e| DefinitionError::Invalid(e.to_string()))?;
        let template = TemplateName::new(
            doc.template
                .ok_or(DefinitionError::Missing("Dunes template in its metadata"))?,
        )
        .map_err(|e| DefinitionError::Invalid(e.to_string()))?;
        let memory_mib = match (doc.memory, doc.memory_unit.as_deref()) {
            (Some(m), Some("MiB")) => m,
            (Some(m), Some("GiB")) => m.saturating_mul(1024),
            (Some(m), Some("KiB") | None) => m / 1024,
            (Some(_), Some(unit)) => {
                return Err(DefinitionError::Invalid(format!(
                    "memory unit {unit} is not supported"
                )));
            }
            (None, _) => return Err(DefinitionError::Missing("memory")),
        };
        let disks_dir = storage.disks_dir();
        let mut disks = Vec::new();
        for (source, target) in doc.disks {
            let file = Path::new(&source)
                .strip_prefix(&disks_dir)
                .ok()
                .and_then(|rel| rel.to_str())
                .filter(|rel| is_plain_file_name(rel))
                .ok_or_else(|| {
                    DefinitionError::Invalid(format!(
                        "disk {source} is not in this agent's storage"
                    ))
                })?;
            disks.push(DiskDefinition {
                file: file.to_string(),
                format: "raw".into(),
                target,
            });
        }
        let template_dir = storage.template_dir(&template);
        let in_template = |path: String| {
            Path::new(&path)
                .strip_prefix(&template_dir)
                .ok()
                .and_then(|rel| rel.to_str())
                .filter(|rel| is_plain_file_name(rel))
                .map(str::to_string)
                .ok_or_else(|| {
                    DefinitionError::Invalid(format!("{path} is not in template {template}"))
                })
        };
        let boot = match doc.kernel {
            Some(kernel) => Some(DirectBoot {
                kernel: in_template(kernel)?,
                initrd: doc.initrd.map(in_template).transpose()?,
                cmdline: doc.cmdline,
            }),
            None => None,
        };
        let def = VmDefinition {
            name,
            uuid: doc.uuid.ok_or(DefinitionError::Missing("uuid"))?,
            template,
            vcpus: doc.vcpus.ok_or(DefinitionError::Missing("vcpu"))?,
            memory_mib,
            disks,
            boot,
            devices: Devices {
                serial_log: doc.serial_log,
                guest_agent: doc.guest_agent,
                user_network: doc.user_network,
                mac: doc
                    .nics
                    .iter()
                    .find(|n| n.network == "user-mode")
                    .and_then(|n| n.mac.clone()),
                screen: doc.screen,
                service_nic: None,
            },
            autostart: false,
            firmware: Firmware::Bios,
            cdrom: None,
            image_blake3: None,
            cloud_init: None,
        };
        def.validate()?;
        Ok(def)
    }
}

/// The installer's drive, empty: what a running VM's CD-ROM becomes when it is ejected
/// (libvirt finds the drive by its target).
pub const EMPTY_CDROM_XML: &str = "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='hdc' bus='ide'/><readonly/></disk>";

fn text_element<W: std::io::Write>(
    w: &mut Writer<W>,
    name: &str,
    text: &str,
) -> std::io::Result<()> {
    w.create_element(name)
        .write_text_content(BytesText::new(text))?;
    Ok(())
}

/// The parts of a domain XML Dunes reads back.
#[derive(Debug, Default)]
pub struct DomainXml {
    pub name: Option<String>,
    pub uuid: Option<String>,
    pub template: Option<String>,
    pub memory: Option<u64>,
    pub memory_unit: Option<String>,
    pub vcpus: Option<u32>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    /// (source file, target device) of each file disk.
    pub disks: Vec<(String, String)>,
    /// Host-side device of each network interface (`vnet0`), where it has one.
    pub interfaces: Vec<String>,
    pub serial_log: bool,
    pub guest_agent: bool,
    /// Whether it has a VNC display.
    pub screen: bool,
    /// Whether it has a NIC on QEMU's user-mode network.
    pub user_network: bool,
    /// Each network interface as the window shows it.
    pub nics: Vec<dunes_shared::model::VmNicInfo>,
}

impl DomainXml {
    pub fn parse(xml: &str) -> Result<Self, DefinitionError> {
        let mut reader = Reader::from_str(xml);
        let mut out = DomainXml::default();
        // Local names of the open elements, outermost first.
        let mut path: Vec<String> = Vec::new();
        let mut text = String::new();
        let mut disk: Option<(Option<String>, Option<String>)> = None;
        let bad = |e: quick_xml::Error| DefinitionError::Xml(e.to_string());
        loop {
            let event = reader.read_event().map_err(bad)?;
            let (start, empty) = match &event {
                Event::Start(e) => (Some(e), false),
                Event::Empty(e) => (Some(e), true),
                _ => (None, false),
            };
            if let Some(e) = start {
                let local = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                let attr = |key: &str| -> Result<Option<String>, DefinitionError> {
                    for a in e.attributes() {
                        let a = a.map_err(|e| DefinitionError::Xml(e.to_string()))?;
                        if a.key.as_ref() == key.as_bytes() {
                            return a
                                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                                .map(|v| Some(v.into_owned()))
                                .map_err(bad);
                        }
                    }
                    Ok(None)
                };
                let parent = path.last().map(String::as_str);
                match (parent, local.as_str()) {
                    (Some("domain"), "memory") => out.memory_unit = attr("unit")?,
                    (Some("devices"), "disk") => disk = Some((None, None)),
                    (Some("disk"), "source") => {
                        if let Some(d) = disk.as_mut() {
                            d.0 = attr("file")?;
                        }
                    }
                    (Some("disk"), "target") => {
                        if let Some(d) = disk.as_mut() {
                            d.1 = attr("dev")?;
                        }
                    }
                    (Some("devices"), "interface") => {
                        let kind = attr("type")?;
                        out.user_network |= kind.as_deref() == Some("user");
                        out.nics.push(dunes_shared::model::VmNicInfo {
                            model: "default".into(),
                            network: match kind.as_deref() {
                                Some("user") => "user-mode".into(),
                                Some(other) => other.to_string(),
                                None => "unknown".into(),
                            },
                            mac: None,
                        });
                    }
                    (Some("interface"), "mac") => {
                        if let Some(nic) = out.nics.last_mut() {
                            nic.mac = attr("address")?;
                        }
                    }
                    (Some("interface"), "model") => {
                        if let (Some(nic), Some(model)) = (out.nics.last_mut(), attr("type")?) {
                            nic.model = model;
                        }
                    }
                    (Some("interface"), "source") => {
                        let named = match (attr("network")?, attr("bridge")?) {
                            (Some(n), _) => Some(format!("network {n}")),
                            (None, Some(b)) => Some(format!("bridge {b}")),
                            (None, None) => None,
                        };
                        if let (Some(nic), Some(named)) = (out.nics.last_mut(), named) {
                            nic.network = named;
                        }
                    }
                    (Some("interface"), "target") => {
                        if let Some(dev) = attr("dev")? {
                            out.interfaces.push(dev);
                        }
                    }
                    (Some("serial"), "log") => out.serial_log = true,
                    (Some("devices"), "graphics") => {
                        out.screen |= attr("type")?.as_deref() == Some("vnc");
                    }
                    (Some("channel"), "target") => {
                        out.guest_agent |=
                            attr("name")?.as_deref() == Some("org.qemu.guest_agent.0");
                    }
                    _ => {}
                }
                if !empty {
                    path.push(local);
                    text.clear();
                } else if local == "disk" {
                    disk = None;
                }
                continue;
            }
            match event {
                Event::Text(t) => text.push_str(
                    &t.xml10_content()
                        .map_err(|e| DefinitionError::Xml(e.to_string()))?,
                ),
                Event::GeneralRef(r) => {
                    if let Some(c) = r.resolve_char_ref().map_err(bad)? {
                        text.push(c);
                    } else {
                        let name = String::from_utf8_lossy(r.as_ref()).into_owned();
                        let resolved = quick_xml::escape::resolve_predefined_entity(&name)
                            .ok_or_else(|| {
                                DefinitionError::Xml(format!("unknown entity &{name};"))
                            })?;
                        text.push_str(resolved);
                    }
                }
                Event::End(_) => {
                    let local = path.pop().unwrap_or_default();
                    let parent = path.last().map(String::as_str);
                    let value = std::mem::take(&mut text).trim().to_string();
                    match (parent, local.as_str()) {
                        (Some("domain"), "name") => out.name = Some(value),
                        (Some("domain"), "uuid") => out.uuid = Some(value),
                        (Some("domain"), "memory") => {
                            out.memory = Some(value.parse().map_err(|_| {
                                DefinitionError::Invalid(format!("memory {value:?}"))
                            })?)
                        }
                        (Some("domain"), "vcpu") => {
                            out.vcpus =
                                Some(value.parse().map_err(|_| {
                                    DefinitionError::Invalid(format!("vcpu {value:?}"))
                                })?)
                        }
                        (Some("os"), "kernel") => out.kernel = Some(value),
                        (Some("os"), "initrd") => out.initrd = Some(value),
                        (Some("os"), "cmdline") => out.cmdline = Some(value),
                        (Some("vm"), "template") => out.template = Some(value),
                        (Some("devices"), "disk") => {
                            if let Some((Some(source), Some(target))) = disk.take() {
                                out.disks.push((source, target));
                            }
                        }
                        _ => {}
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        Ok(out)
    }
}

/// The template a domain was made from, from its Dunes metadata.
pub fn template_of(xml: &str) -> Option<TemplateName> {
    DomainXml::parse(xml)
        .ok()?
        .template
        .and_then(|t| TemplateName::new(t).ok())
}

/// What a domain's XML says once about its VM: the template it was made from, and its NICs.
pub fn learned_from(xml: &str) -> (Option<TemplateName>, Vec<dunes_shared::model::VmNicInfo>) {
    match DomainXml::parse(xml) {
        Ok(doc) => (
            doc.template.and_then(|t| TemplateName::new(t).ok()),
            doc.nics,
        ),
        Err(_) => (None, Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition() -> VmDefinition {
        VmDefinition {
            name: VmName::new("web-1").unwrap(),
            uuid: "6f1c2a4e-9a55-4b0e-8f4d-2f3c1a2b3c4d".into(),
            template: TemplateName::new("tiny").unwrap(),
            vcpus: 2,
            memory_mib: 256,
            disks: vec![DiskDefinition {
                file: "web-1.img".into(),
                format: "raw".into(),
                target: "vda".into(),
            }],
            boot: Some(DirectBoot {
                kernel: "vmlinuz".into(),
                initrd: Some("initrd.img".into()),
                cmdline: Some("console=ttyS0 quiet & more".into()),
            }),
            devices: Devices {
                serial_log: true,
                guest_agent: true,
                user_network: true,
                mac: Some("52:54:00:0a:1b:2c".into()),
                screen: true,
                service_nic: None,
            },
            autostart: false,
            firmware: Firmware::Bios,
            cdrom: None,
            image_blake3: None,
            cloud_init: None,
        }
    }

    #[test]
    fn the_xml_round_trips_and_names_only_this_agents_paths() {
        let dir = tempfile::tempdir().unwrap();
        // A data dir with characters XML must escape.
        let data = dir.path().join("data & <more>");
        let storage = Storage::open(&data).unwrap();
        let def = definition();
        let xml = def.domain_xml(DomainType::Qemu, &storage).unwrap();
        assert!(xml.contains("data &amp; &lt;more&gt;"), "{xml}");
        assert!(
            xml.contains("<dunes:template>tiny</dunes:template>"),
            "{xml}"
        );
        assert!(xml.contains("org.qemu.guest_agent.0"));
        assert!(
            xml.contains(
                r#"<interface type="user"><mac address="52:54:00:0a:1b:2c"/><model type="virtio"/></interface>"#
            ),
            "{xml}"
        );
        let back = VmDefinition::from_domain_xml(&xml, &storage).unwrap();
        assert_eq!(back, def);
        assert_eq!(template_of(&xml).unwrap().as_str(), "tiny");

        // The test driver gets no QEMU devices, and the same definition back.
        let xml = def.domain_xml(DomainType::Test, &storage).unwrap();
        assert!(
            !xml.contains("serial") && !xml.contains("machine=") && !xml.contains("interface"),
            "{xml}"
        );

        // The record has no absolute path: another agent's storage reads it as its own.
        let record = def.to_toml().unwrap();
        assert!(!record.contains(&*data.to_string_lossy()), "{record}");
        // A record from before VMs had a NIC reads as one without.
        // A record from before MACs were kept, or autostart was asked, reads as one without.
        let older = record
            .replace("mac = \"52:54:00:0a:1b:2c\"\n", "")
            .replace("autostart = false\n", "");
        let older = VmDefinition::from_toml(&older).unwrap();
        assert!(older.devices.mac.is_none() && !older.autostart);
        let older = record.replace("user_network = true\n", "");
        assert_ne!(older, record);
        let older = VmDefinition::from_toml(&older).unwrap();
        assert!(!older.devices.user_network);
        assert!(
            !older
                .domain_xml(DomainType::Qemu, &storage)
                .unwrap()
                .contains("interface")
        );
        let other = Storage::open(&dir.path().join("other")).unwrap();
        let there = VmDefinition::from_toml(&record)
            .unwrap()
            .domain_xml(DomainType::Qemu, &other)
            .unwrap();
        assert!(
            there.contains(&*other.disks_dir().to_string_lossy()),
            "{there}"
        );
    }

    #[test]
    fn each_nic_is_read_with_its_model_network_and_mac() {
        let xml = "<domain type='qemu'><name>n</name><devices>\
            <interface type='user'><mac address='52:54:00:aa:bb:cc'/><model type='virtio'/></interface>\
            <interface type='bridge'><source bridge='br0'/><target dev='vnet3'/><model type='e1000'/></interface>\
            <interface type='network'><source network='default'/></interface>\
            </devices></domain>";
        let (template, nics) = learned_from(xml);
        assert_eq!(template, None);
        let shown: Vec<(&str, &str, Option<&str>)> = nics
            .iter()
            .map(|n| (n.model.as_str(), n.network.as_str(), n.mac.as_deref()))
            .collect();
        assert_eq!(
            shown,
            [
                ("virtio", "user-mode", Some("52:54:00:aa:bb:cc")),
                ("e1000", "bridge br0", None),
                ("default", "network default", None),
            ]
        );
        let doc = DomainXml::parse(xml).unwrap();
        assert!(doc.user_network);
        assert_eq!(doc.interfaces, ["vnet3"]);
        // XML that does not parse tells nothing, and breaks nothing.
        assert_eq!(learned_from("<domain><devices>"), (None, Vec::new()));
    }

    #[test]
    fn records_that_would_leave_the_storage_dir_are_refused() {
        let mut def = definition();
        def.disks[0].file = "../../etc/passwd".into();
        let record = toml::to_string(&def).unwrap();
        let err = VmDefinition::from_toml(&record).unwrap_err();
        assert!(err.to_string().contains("not a plain file name"), "{err}");
        let mut def = definition();
        def.boot.as_mut().unwrap().kernel = "/boot/vmlinuz".into();
        assert!(def.validate().is_err());
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let foreign = definition()
            .domain_xml(DomainType::Test, &storage)
            .unwrap()
            .replace(
                &*storage.disks_dir().to_string_lossy(),
                "/var/lib/elsewhere",
            );
        let err = VmDefinition::from_domain_xml(&foreign, &storage).unwrap_err();
        assert!(
            err.to_string().contains("not in this agent's storage"),
            "{err}"
        );
        assert!(matches!(
            DomainXml::parse("<domain><name>a</nam></domain>"),
            Err(DefinitionError::Xml(_))
        ));
    }

    #[test]
    fn the_first_releases_xml_is_read_back() {
        // As the first release wrote it with format!, for the test driver.
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let disk = storage.disks_dir().join("old.img");
        let xml = format!(
            "<domain type='test'><name>old</name>\
             <metadata><dunes:vm xmlns:dunes='{METADATA_NS}'><dunes:template>tiny</dunes:template></dunes:vm></metadata>\
             <memory unit='MiB'>128</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os>\
             <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>\
             <devices><disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
            disk.display()
        );
        // The first release let libvirt pick the UUID: the XML libvirt hands back has one.
        let xml = xml.replace(
            "<name>old</name>",
            "<name>old</name><uuid>0e9d7b8a-1c2d-4e5f-8a9b-0c1d2e3f4a5b</uuid>",
        );
        let def = VmDefinition::from_domain_xml(&xml, &storage).unwrap();
        assert_eq!(def.name.as_str(), "old");
        assert_eq!((def.vcpus, def.memory_mib), (1, 128));
        assert_eq!(def.disks[0].file, "old.img");
        assert!(def.boot.is_none());
    }

    #[test]
    fn a_vm_from_an_image_has_its_firmware_installer_and_seed() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let mut def = definition();
        def.boot = None;
        def.firmware = Firmware::Uefi;
        def.cdrom = Some("disk.iso".into());
        def.image_blake3 = Some("ab".repeat(32));
        def.cloud_init = Some(CloudInitRecord {
            hostname: "web-1".into(),
            user_data: "#cloud-config\n".into(),
            network_config: None,
        });
        let xml = def.domain_xml(DomainType::Qemu, &storage).unwrap();
        assert!(xml.contains(r#"<os firmware="efi">"#), "{xml}");
        assert!(
            xml.contains(r#"<boot dev="cdrom"/><boot dev="hd"/>"#),
            "{xml}"
        );
        let installer = storage.template_dir(&def.template).join("disk.iso");
        assert!(
            xml.contains(&format!(
                r#"<source file="{}"/><target dev="hdc" bus="ide"/><readonly/>"#,
                installer.display()
            )),
            "{xml}"
        );
        let seed = storage.seed_file(&def.name);
        assert!(
            xml.contains(&format!(
                r#"<source file="{}"/><target dev="hdd" bus="ide"/><readonly/>"#,
                seed.display()
            )),
            "{xml}"
        );
        // The record keeps all of it; one without any of it reads as before.
        let back = VmDefinition::from_toml(&def.to_toml().unwrap()).unwrap();
        assert_eq!(back, def);
        let plain = definition().to_toml().unwrap();
        assert!(
            !plain.contains("firmware") && !plain.contains("cloud_init"),
            "{plain}"
        );
        // The test driver has no UEFI to ask for.
        let xml = def.domain_xml(DomainType::Test, &storage).unwrap();
        assert!(!xml.contains("efi"), "{xml}");

        // Bad records are refused: a CD-ROM outside the template, both boots, bad user-data.
        let mut bad = def.clone();
        bad.cdrom = Some("../../etc/passwd".into());
        assert!(bad.validate().is_err());
        let mut bad = def.clone();
        bad.boot = definition().boot;
        assert!(bad.validate().is_err());
        let mut bad = def.clone();
        bad.cloud_init.as_mut().unwrap().user_data = "no header".into();
        assert!(bad.validate().is_err());
    }
}
