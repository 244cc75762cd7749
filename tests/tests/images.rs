//! The image library: `ctl image import` copies a file into the console's images directory
//! with its format found from its bytes and its BLAKE3; what is no image, or a qcow2 that
//! would read another file, is refused with one line and leaves nothing behind. A push sends
//! an image to hosts that do not hold it, and goes on from where a cut one stopped.

use std::{
    io::{Seek, SeekFrom, Write},
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use dunes_tests::{
    console_binary,
    demo::{Console, ctl, demo_ready, demo_with_env, json},
    poll_until,
};

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn refusal(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr
}

/// `ctl image import FILE --name NAME`, run from `cwd` so that FILE may be relative.
fn import(data: &Path, cwd: &Path, file: &str, name: &str) -> Output {
    Command::new(console_binary())
        .current_dir(cwd)
        .args(["ctl", "--data-dir"])
        .arg(data)
        .args(["--json", "image", "import", file, "--name", name])
        .output()
        .unwrap()
}

/// The files in the console's images directory.
fn copies(data: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data.join("images"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn images_are_imported_checked_listed_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    // A data dir given relative to where the operator stands, as a new user would.
    let _console = Console(
        Command::new(console_binary())
            .current_dir(dir.path())
            .args(["--demo", "--headless", "--data-dir", "console"])
            .stderr(std::fs::File::create(dir.path().join("console.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let data = dir.path().join("console");
    demo_ready(&data);
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    let at = |name: &str| files.join(name).to_string_lossy().into_owned();
    qemu_img(&["create", "-q", "-f", "qcow2", &at("base.qcow2"), "64M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &at("base.qcow2"),
        "-F",
        "qcow2",
        &at("over.qcow2"),
    ]);
    // A header this console reads but qemu-img does not: clusters of 2^40 bytes.
    std::fs::copy(files.join("base.qcow2"), files.join("broken.qcow2")).unwrap();
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(files.join("broken.qcow2"))
            .unwrap();
        f.seek(SeekFrom::Start(20)).unwrap();
        f.write_all(&40u32.to_be_bytes()).unwrap();
    }
    // A raw disk: a partition table's signature and a little data in 16 MiB.
    {
        let mut f = std::fs::File::create(files.join("disk.raw")).unwrap();
        f.set_len(16 << 20).unwrap();
        f.seek(SeekFrom::Start(510)).unwrap();
        f.write_all(&[0x55, 0xaa]).unwrap();
        f.seek(SeekFrom::Start(5 << 20)).unwrap();
        f.write_all(&[9u8; 65536]).unwrap();
    }
    std::fs::write(files.join("notes.txt"), "not a disk\n").unwrap();

    // A relative path, from where the operator stands.
    let base = json(&import(&data, &files, "base.qcow2", "base"));
    assert_eq!(base["name"], "base");
    assert_eq!(base["format"], "qcow2");
    assert_eq!(base["virtual_bytes"], 64u64 << 20);
    let digest = base["blake3"].as_str().unwrap().to_string();
    let bytes = std::fs::read(files.join("base.qcow2")).unwrap();
    assert_eq!(digest, blake3::hash(&bytes).to_hex().to_string());
    let raw = json(&import(&data, &files, &at("disk.raw"), "disk"));
    assert_eq!(raw["format"], "raw");
    assert_eq!(raw["virtual_bytes"], 16u64 << 20);
    assert!(raw["allocated_bytes"].as_u64().unwrap() < 4 << 20, "{raw}");

    let listed = json(&ctl(&data, &["--json", "images"]));
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["base", "disk"]);
    let table = String::from_utf8(ctl(&data, &["images"]).stdout).unwrap();
    assert!(
        table.contains("qcow2") && table.contains(&digest[..16]),
        "{table}"
    );
    let before = copies(&data);
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(before.contains(&format!("{digest}.qcow2")));

    // Each bad input: one line, nothing recorded, no copy left behind.
    let cases = [
        (
            "base.qcow2",
            "base",
            "an image named base is in the library",
        ),
        (
            "base.qcow2",
            "again",
            "holds these bytes already, as image base",
        ),
        ("over.qcow2", "over", "builds on the backing file"),
        (
            "broken.qcow2",
            "broken",
            "qemu-img cannot read the qcow2 header",
        ),
        ("notes.txt", "notes", "not a disk image"),
        ("missing.qcow2", "missing", "cannot read"),
        ("base.qcow2", "Not_A_Name", "image name"),
    ];
    for (file, name, says) in cases {
        let line = refusal(&import(&data, &files, file, name));
        assert!(line.contains(says), "{file} as {name}: {line}");
    }
    assert_eq!(copies(&data), before);
    assert_eq!(
        json(&ctl(&data, &["--json", "images"]))
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // A delete removes the record and the copy; the other image stays.
    let deleted = json(&ctl(&data, &["--json", "image", "delete", "base"]));
    assert_eq!(deleted["name"], "base");
    assert_eq!(
        copies(&data),
        [format!("{}.raw", raw["blake3"].as_str().unwrap())]
    );
    let line = refusal(&ctl(&data, &["image", "delete", "base"]));
    assert!(line.contains("there is no image named base"), "{line}");
    // Gone for good: the name is free again.
    json(&import(&data, &files, "base.qcow2", "base"));

    // Each import and delete is in the audit log, by image, refusals with their reason.
    let audit = json(&ctl(&data, &["--json", "audit"]));
    let records: Vec<(&str, &str, &str)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["operation"].as_str().unwrap(),
                r["target"].as_str().unwrap(),
                r["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(
        records.contains(&("image-delete", "image base", "ok")),
        "{records:?}"
    );
    assert!(
        records
            .iter()
            .any(|(op, target, outcome)| *op == "image-import"
                && *target == "image over"
                && outcome.contains("backing file")),
        "{records:?}"
    );
}

/// A raw disk of `size_mib` with a partition table's signature and `data_mib` of varied bytes
/// from its second MiB on.
fn raw_disk(path: &Path, size_mib: u64, data_mib: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size_mib << 20).unwrap();
    f.seek(SeekFrom::Start(510)).unwrap();
    f.write_all(&[0x55, 0xaa]).unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    let mut block = vec![0u8; 1 << 20];
    for mib in 0..data_mib {
        for (i, b) in block.iter_mut().enumerate() {
            *b = (i as u64 * 7 + mib * 13 + 1) as u8 | 1;
        }
        f.write_all(&block).unwrap();
    }
}

#[test]
fn an_image_goes_to_each_host_once_and_a_cut_push_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (_console, data) = demo_with_env(
        dir.path(),
        &[],
        &[("DUNES_FAILPOINT", "image-push-cut-after:24")],
    );
    let file = dir.path().join("os.raw");
    raw_disk(&file, 64, 40);
    let imported = json(&ctl(
        &data,
        &[
            "--json",
            "image",
            "import",
            file.to_str().unwrap(),
            "--name",
            "os",
        ],
    ));
    let digest = imported["blake3"].as_str().unwrap().to_string();
    let agent = |host: &str| data.join("demo-agents").join(host).join("storage");

    // The first push is cut after 24 chunks, once the host has acknowledged some.
    let line = refusal(&ctl(&data, &["image", "push", "os", "--host", "lsn-1"]));
    assert!(
        line.contains("lsn-1") && line.contains("link to the host broke"),
        "{line}"
    );
    assert!(!agent("lsn-1").join("images/os").exists());
    // The next goes on from what the host kept.
    let pushed = json(&ctl(
        &data,
        &["--json", "image", "push", "os", "--host", "lsn-1"],
    ));
    let report = &pushed[0];
    assert_eq!(report["host"], "lsn-1");
    assert_eq!(report["held"], false);
    let resumed = report["resumed_from"].as_u64().unwrap();
    let sent = report["sent_bytes"].as_u64().unwrap();
    assert!(resumed >= 16 << 20, "{report}");
    assert!(sent < 40 << 20 && sent > 0, "{report}");
    // The host keeps the image as a template of its name, byte for byte, and nothing of the
    // transfer is left over.
    let copy = std::fs::read(agent("lsn-1").join("images/os/disk.img")).unwrap();
    assert_eq!(blake3::hash(&copy).to_hex().to_string(), digest);
    assert_eq!(
        std::fs::read_dir(agent("lsn-1").join("incoming"))
            .unwrap()
            .count(),
        0
    );

    // Again: the host holds it, nothing is sent.
    let again = json(&ctl(
        &data,
        &["--json", "image", "push", "os", "--host", "lsn-1"],
    ));
    assert_eq!(again[0]["held"], true, "{again}");
    assert_eq!(again[0]["sent_bytes"], 0);
    // To a site: only the host without it receives the image, all of it.
    let site = json(&ctl(
        &data,
        &["--json", "image", "push", "os", "--site", "lausanne"],
    ));
    let by_host: Vec<(&str, bool, u64)> = site
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["host"].as_str().unwrap(),
                r["held"].as_bool().unwrap(),
                r["sent_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(by_host.len(), 2, "{site}");
    assert_eq!(by_host[0], ("lsn-1", true, 0));
    assert_eq!(by_host[1].0, "lsn-2");
    assert!(by_host[1].2 >= 40 << 20, "{site}");
    // The library says who holds it.
    poll_until(Duration::from_secs(60), "the image's hosts listed", || {
        let listed = json(&ctl(&data, &["--json", "images"]));
        listed[0]["hosts"] == serde_json::json!(["lsn-1", "lsn-2"])
    });

    // Bad input: one line each, nothing sent.
    for (args, says) in [
        (
            &["image", "push", "nothing", "--host", "lsn-1"][..],
            "there is no image named nothing",
        ),
        (
            &["image", "push", "os", "--host", "nowhere"][..],
            "host nowhere is not enrolled",
        ),
        (
            &["image", "push", "os", "--site", "mars"][..],
            "site mars has no hosts",
        ),
    ] {
        let line = refusal(&ctl(&data, args));
        assert!(line.contains(says), "{args:?}: {line}");
    }
    assert!(!agent("gva-1").join("images/os").exists());
}

#[test]
fn vms_are_made_from_images_with_the_disk_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (_console, data) = demo_with_env(dir.path(), &[], &[]);
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    raw_disk(&files.join("os.raw"), 64, 4);
    // A disk image bigger than the disks asked below, and an installer.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        files.join("big.qcow2").to_str().unwrap(),
        "5G",
    ]);
    let iso = dunes_agent::cidata::build_seed(&dunes_agent::cidata::Seed {
        meta_data: "instance-id: x\n".into(),
        user_data: "#cloud-config\n".into(),
        network_config: None,
    })
    .unwrap();
    std::fs::write(files.join("installer.iso"), iso).unwrap();
    for (file, name) in [
        ("os.raw", "os"),
        ("big.qcow2", "big"),
        ("installer.iso", "installer"),
    ] {
        json(&import(&data, &files, file, name));
    }
    let create = |name: &str, image: &str, extra: &[&str]| {
        let mut args = vec![
            "--json", "vm", "create", "--name", name, "--image", image, "--host", "lsn-2",
        ];
        args.extend_from_slice(extra);
        ctl(&data, &args)
    };

    // The host does not hold the image: it goes there first, then the VM boots from an
    // overlay on it, grown to the size asked.
    let vm = json(&create("from-os", "os", &["--disk-gib", "2"]));
    assert_eq!(vm["template"], "os", "{vm}");
    let disk = &vm["disks"][0];
    assert_eq!(disk["format"], "qcow2", "{vm}");
    assert_eq!(disk["virtual_bytes"], 2u64 << 30, "{vm}");
    assert_eq!(disk["backing"], "os", "{vm}");
    let agent = data.join("demo-agents/lsn-2/storage");
    assert!(agent.join("images/os/disk.img").exists());
    // The definition names the image by its digest, the same on every host.
    let record = std::fs::read_to_string(agent.join("definitions/from-os.toml")).unwrap();
    let digest = json(&ctl(&data, &["--json", "images"]))[2]["blake3"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        record.contains(&format!("image_blake3 = \"{digest}\"")),
        "{record}"
    );
    // Without a size: the image's.
    let same = json(&create("same-size", "os", &[]));
    assert_eq!(same["disks"][0]["virtual_bytes"], 64u64 << 20, "{same}");

    // An installer: an empty disk of the size asked, and the ISO as a CD-ROM booted first.
    let installed = json(&create("from-iso", "installer", &["--disk-gib", "3"]));
    assert_eq!(installed["disks"][0]["format"], "raw", "{installed}");
    assert_eq!(installed["disks"][0]["virtual_bytes"], 3u64 << 30);
    let record = std::fs::read_to_string(agent.join("definitions/from-iso.toml")).unwrap();
    assert!(record.contains("cdrom = \"disk.iso\""), "{record}");
    assert_eq!(installed["installer"], "installer", "{installed}");
    // Ejected, it boots from its disk from then on; a second eject has nothing to take.
    let ejected = json(&ctl(&data, &["--json", "vm", "eject", "lsn-2/from-iso"]));
    assert!(
        ejected.get("installer").is_some_and(|v| v.is_null()),
        "{ejected}"
    );
    let record = std::fs::read_to_string(agent.join("definitions/from-iso.toml")).unwrap();
    assert!(!record.contains("cdrom"), "{record}");
    assert_eq!(
        refusal(&ctl(&data, &["vm", "eject", "lsn-2/from-iso"])),
        "dunes-console: VM from-iso has no installer in its CD-ROM drive"
    );
    // An installer gets no cloud-init seed unless asked; a disk image's VM always does.
    assert!(!agent.join("disks/from-iso.cidata.iso").exists());
    let seed = std::fs::read(agent.join("disks/same-size.cidata.iso")).unwrap();
    assert!(contains(&seed, b"local-hostname: \"same-size\""));

    // cloud-init: the usual user with a key, and user-data of the operator's.
    let key = ssh_key_line();
    std::fs::write(files.join("id.pub"), format!("{key}\n")).unwrap();
    std::fs::write(
        files.join("user-data.yaml"),
        "#cloud-config\npackages: [htop]\n",
    )
    .unwrap();
    std::fs::write(
        files.join("bad.yaml"),
        "#cloud-config\nusers:\n  - name: a\n b: [\n",
    )
    .unwrap();
    std::fs::write(files.join("notakey.pub"), "hello\n").unwrap();
    let at = |f: &str| files.join(f).to_string_lossy().into_owned();
    let vm = json(&create(
        "with-key",
        "os",
        &["--user", "ops", "--ssh-key", &at("id.pub")],
    ));
    assert_eq!(vm["name"], "with-key");
    let seed = std::fs::read(agent.join("disks/with-key.cidata.iso")).unwrap();
    assert!(contains(&seed, key.as_bytes()), "the key is on the seed");
    assert!(contains(&seed, b"name: \"ops\""));
    let record = std::fs::read_to_string(agent.join("definitions/with-key.toml")).unwrap();
    assert!(record.contains("[cloud_init]") && record.contains("hostname = \"with-key\""));
    json(&create(
        "with-data",
        "os",
        &["--user-data", &at("user-data.yaml")],
    ));
    let seed = std::fs::read(agent.join("disks/with-data.cidata.iso")).unwrap();
    assert!(contains(&seed, b"packages: [htop]"));
    // Deleting the VM takes its seed.
    ctl(&data, &["vm", "delete", "lsn-2/with-data"]);
    assert!(!agent.join("disks/with-data.cidata.iso").exists());

    // A migration to a host without the image sends the image first, then moves the
    // overlay alone; the VM keeps its cloud-init data on the target.
    let other = data.join("demo-agents/lsn-1/storage");
    assert!(!other.join("images/os/disk.img").exists());
    let started = json(&ctl(
        &data,
        &["--json", "vm", "migrate", "lsn-2/with-key", "--to", "lsn-1"],
    ));
    assert_eq!(started["disk"], "overlay", "{started}");
    let id = started["id"].as_u64().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let done = loop {
        let all = json(&ctl(&data, &["--json", "migrations"]));
        let m = all
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .cloned()
            .unwrap();
        if m["state"] == "source-deleted" || m["state"] == "rolled-back" {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "{m}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(done["state"], "source-deleted", "{done}");
    assert!(other.join("images/os/disk.img").exists());
    assert_eq!(
        blake3::hash(&std::fs::read(other.join("images/os/disk.img")).unwrap())
            .to_hex()
            .to_string(),
        digest
    );
    let seed = std::fs::read(other.join("disks/with-key.cidata.iso")).unwrap();
    assert!(contains(&seed, key.as_bytes()), "the key went with the VM");

    // Bad input: one line each, and no VM, disk or definition left behind.
    for (name, image, extra, says) in [
        (
            "no-size",
            "installer",
            &[][..],
            "image installer is an installer: give the size of the disk it installs to",
        ),
        (
            "too-small",
            "big",
            &["--disk-gib", "2"][..],
            "the disk asked (2 GiB) is smaller than image big (5120 MiB): ask for at least 5 GiB",
        ),
        (
            "no-image",
            "nothing",
            &[][..],
            "there is no image named nothing",
        ),
        (
            "huge",
            "os",
            &["--disk-gib", "999999"][..],
            "a disk is 1 to 65536 GiB",
        ),
        (
            "bad-yaml",
            "os",
            &["--user-data", &at("bad.yaml")][..],
            "user-data line",
        ),
        (
            "bad-key",
            "os",
            &["--user", "ops", "--ssh-key", &at("notakey.pub")][..],
            "not an SSH public key",
        ),
        (
            "bad-user",
            "os",
            &["--user", "Root", "--ssh-key", &at("id.pub")][..],
            "is not a user name",
        ),
        (
            "no-key-file",
            "os",
            &["--user", "ops", "--ssh-key", &at("missing.pub")][..],
            "cannot read",
        ),
    ] {
        let line = refusal(&create(name, image, extra));
        assert!(line.contains(says), "{name}: {line}");
        assert!(!agent.join(format!("definitions/{name}.toml")).exists());
        assert!(!agent.join(format!("disks/{name}.qcow2")).exists());
        assert!(!agent.join(format!("disks/{name}.img")).exists());
        assert!(!agent.join(format!("disks/{name}.cidata.iso")).exists());
    }
    let line = refusal(&ctl(
        &data,
        &[
            "vm",
            "create",
            "--name",
            "both",
            "--image",
            "os",
            "--template",
            "demo",
            "--host",
            "lsn-2",
        ],
    ));
    assert!(line.contains("cannot be used with"), "{line}");

    // An image a VM is made from cannot be deleted; the refusal names the VMs.
    let line = refusal(&ctl(&data, &["image", "delete", "os"]));
    assert!(
        line.contains("lsn-2/from-os") && line.contains("lsn-2/same-size"),
        "{line}"
    );
    let line = refusal(&ctl(&data, &["image", "delete", "installer"]));
    assert!(line.contains("lsn-2/from-iso"), "{line}");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// An ed25519 public key line: its type, then 32 bytes, as ssh-keygen writes one.
fn ssh_key_line() -> String {
    use base64::Engine as _;
    let mut data = Vec::new();
    data.extend_from_slice(&11u32.to_be_bytes());
    data.extend_from_slice(b"ssh-ed25519");
    data.extend_from_slice(&32u32.to_be_bytes());
    data.extend_from_slice(&[7u8; 32]);
    format!(
        "ssh-ed25519 {} ops@laptop",
        base64::engine::general_purpose::STANDARD.encode(data)
    )
}

/// A service application made from a library image: each instance's VM boots from an overlay
/// on the image, pushed to its host, with the application's user-data filled in for it; a
/// start writes the user-data again, as the service says then.
#[test]
fn a_service_application_boots_from_an_image_with_its_user_data_filled_in() {
    let dir = tempfile::tempdir().unwrap();
    let (_console, data) = demo_with_env(dir.path(), &[], &[]);
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    raw_disk(&files.join("os.raw"), 64, 4);
    json(&import(&data, &files, "os.raw", "os"));
    let service = |said: &str| {
        format!(
            r##"name = "shop"

[[application]]
name = "db"
runtime = "libvirt"
template = "tiny"
vcpus = 1
memory_mib = 256

[[application]]
name = "web"
runtime = "libvirt"
image = "os"
disk_gib = 1
vcpus = 1
memory_mib = 256
instances = 2
depends_on = ["db"]
user_data = """#cloud-config
write_files:
  - path: /etc/shop-web
    content: "{said} {{{{name}}}} {{{{ index }}}} {{{{service}}}}/{{{{application}}}}"
"""

[rules]
distinct_hosts = ["web"]
"##
        )
    };
    let file = files.join("shop.toml");
    std::fs::write(&file, service("first")).unwrap();
    json(&ctl(
        &data,
        &["--json", "service", "create", "-f", file.to_str().unwrap()],
    ));
    // The plan sends the image to each web host first (no host holds it), once per host,
    // with its time over the host's link.
    let plan = ctl(&data, &["--json", "service", "plan", "shop"]);
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    let webs: Vec<&serde_json::Value> = plan["placements"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["application"] == "web")
        .collect();
    assert_eq!(webs.len(), 2, "{plan}");
    let allocated = json(&ctl(&data, &["--json", "images"]))[0]["allocated_bytes"]
        .as_u64()
        .unwrap();
    let mib = allocated.div_ceil(1 << 20);
    for web in &webs {
        let sent = &web["image_transfer"];
        assert_eq!(sent["image"], "os", "{plan}");
        assert_eq!(sent["mib"], mib, "the image's allocated bytes: {plan}");
        assert!(sent["secs"].as_u64().is_some(), "{plan}");
    }
    let text = String::from_utf8(ctl(&data, &["service", "plan", "shop"]).stdout).unwrap();
    assert!(
        text.contains(&format!("(sends image os, {mib} MiB, about ")),
        "{text}"
    );
    assert!(
        text.contains(&format!("images to send first: {} MiB", 2 * mib)),
        "{text}"
    );

    let deployed = json(&ctl(&data, &["--json", "service", "deploy", "shop"]));
    assert!(deployed.get("failed").is_none(), "{deployed}");
    assert_eq!(
        deployed["done"].as_array().map(Vec::len),
        Some(3),
        "{deployed}"
    );

    // Each web instance's seed, wherever it was placed.
    let seed = |vm: &str| {
        std::fs::read_dir(data.join("demo-agents"))
            .unwrap()
            .map(|e| {
                e.unwrap()
                    .path()
                    .join(format!("storage/disks/{vm}.cidata.iso"))
            })
            .find(|p| p.exists())
            .map(|p| std::fs::read(p).unwrap())
            .unwrap_or_else(|| panic!("no seed for {vm}"))
    };
    for index in 0..2 {
        let vm = format!("shop-web-{index}");
        let bytes = seed(&vm);
        let filled = format!("\"first {vm} {index} shop/web\"");
        assert!(
            contains(&bytes, filled.as_bytes()),
            "{vm}'s seed has {filled}"
        );
        assert!(contains(
            &bytes,
            format!("local-hostname: \"{vm}\"").as_bytes()
        ));
    }
    // Each on an overlay of the image on its own host, which received the image.
    let vms = json(&ctl(&data, &["--json", "vms"]));
    let webs: Vec<&serde_json::Value> = vms
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| {
            v["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("shop-web-"))
        })
        .collect();
    assert_eq!(webs.len(), 2, "{vms}");
    assert_ne!(webs[0]["host"], webs[1]["host"], "{vms}");
    for web in &webs {
        assert_eq!(web["template"], "os", "{web}");
        assert_eq!(web["disks"][0]["backing"], "os", "{web}");
    }

    // The operator changes the user-data: the next start writes it before the VMs boot.
    std::fs::write(&file, service("second")).unwrap();
    json(&ctl(
        &data,
        &[
            "--json",
            "service",
            "create",
            "--replace",
            "-f",
            file.to_str().unwrap(),
        ],
    ));
    let started = json(&ctl(&data, &["--json", "service", "start", "shop"]));
    assert!(started.get("failed").is_none(), "{started}");
    let bytes = seed("shop-web-1");
    assert!(contains(&bytes, b"\"second shop-web-1 1 shop/web\""));
    assert!(!contains(&bytes, b"first"));

    // User-data that does not read, or names what the application does not depend on, is
    // refused with its line, and the service stays as it was.
    let refused = |text: String| {
        std::fs::write(&file, text).unwrap();
        refusal(&ctl(
            &data,
            &[
                "service",
                "create",
                "--replace",
                "-f",
                file.to_str().unwrap(),
            ],
        ))
    };
    let line = refused(service("second").replace("{{service}}", "{{services}}"));
    assert!(
        line.contains("line 11: application web: user-data line 4: {{services}} is not a value"),
        "{line}"
    );
    let line = refused(service("x").replace("{{name}}", "{{addresses.web}}"));
    assert!(
        line.contains("names web, which web does not depend on"),
        "{line}"
    );
    let line = refused(service("x").replace("  - path", " - path: ["));
    assert!(line.contains("user-data line"), "{line}");
    let shown = String::from_utf8(ctl(&data, &["service", "show", "shop"]).stdout).unwrap();
    assert!(shown.contains("second"), "{shown}");
}

/// A push under way shows in `ctl images`: the host it goes to and the bytes through (the
/// test build sends an image of this name a chunk each 100 ms); once it is there, the host
/// holds it and nothing is under way.
#[test]
fn an_image_on_its_way_shows_how_far_it_got() {
    let dir = tempfile::tempdir().unwrap();
    let (_console, data) = demo_with_env(dir.path(), &[], &[]);
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    raw_disk(&files.join("slow.raw"), 64, 40);
    json(&import(&data, &files, "slow.raw", "failpoint-slow-os"));
    let pushing = {
        let data = data.clone();
        std::thread::spawn(move || {
            ctl(
                &data,
                &[
                    "--json",
                    "image",
                    "push",
                    "failpoint-slow-os",
                    "--host",
                    "lsn-1",
                ],
            )
        })
    };
    let mut seen = serde_json::Value::Null;
    poll_until(
        Duration::from_secs(60),
        "the push under way in ctl images",
        || {
            let images = json(&ctl(&data, &["--json", "images"]));
            seen = images[0]["sending"][0].clone();
            seen["done_bytes"].as_u64().is_some_and(|done| done > 0)
        },
    );
    assert_eq!(seen["host"], "lsn-1", "{seen}");
    let total = seen["total_bytes"].as_u64().unwrap();
    assert!(seen["done_bytes"].as_u64().unwrap() <= total, "{seen}");
    let table = String::from_utf8(ctl(&data, &["images"]).stdout).unwrap();
    assert!(table.contains("SENDING"), "{table}");
    let pushed = json(&pushing.join().unwrap());
    assert_eq!(pushed[0]["sent_bytes"], total, "{pushed}");
    let images = json(&ctl(&data, &["--json", "images"]));
    assert!(images[0].get("sending").is_none(), "{images}");
    assert_eq!(images[0]["hosts"], serde_json::json!(["lsn-1"]), "{images}");
}
