//! Disk transfers between two agents in two network namespaces over veth, against the ways
//! others move local disks: `ssh HOST 'cat > FILE'` (Proxmox's offline move of a local disk)
//! and TLS over TCP (`openssl s_client` to `openssl s_server`), on the same link and image.
//! Run as root: `cargo bench -p dunes-tests --bench transfer` (build the release binaries
//! first: `cargo build --release --workspace --bins`; needs iproute2, tc, openssh-server and
//! openssl). Method and results: docs/BENCHMARKS.md.
//!
//! Cases: (a) a 4 GiB fully allocated raw image; (b) a 16 GiB image with 2 GiB allocated;
//! (c) that image again over a link shaped to 200 Mbit/s, with and without compression;
//! (z) image (a) with compression on the unshaped link.
//! The images are filled with bytes of this machine's own files under /usr (a typical OS
//! image's content). Each Dunes figure is one cold migration's transfer step (from
//! `transferring` until `verifying`); CPU is this machine's whole user + system time in that
//! window (/proc/stat), so it counts both ends.

use std::{
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    process::{Command as Process, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use dunes_console::engine::{
    Command, EngineHandle,
    migration::{MigrationOptions, MigrationStep},
};
use dunes_shared::model::{TemplateName, VmName, VmSpec};
use dunes_tests::{AgentProcess, enroll_online, netns::Lab, spawn_lab_agent, start_engine};

const GIB: u64 = 1 << 30;

/// Machine-wide CPU seconds (user + system, every core) so far, and the seconds the
/// hypervisor took from this VM (steal): counted apart, since they are not this work's.
fn cpu_and_steal_secs() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user, nice, system, idle, iowait, irq, softirq, steal: all but idle, iowait and steal.
    let busy: f64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| fields.get(i)).sum();
    let steal = fields.get(7).copied().unwrap_or(0.0);
    (busy / 100.0, steal / 100.0)
}

/// CPU and steal seconds since a mark.
struct CpuMark(f64, f64);

impl CpuMark {
    fn now() -> Self {
        let (cpu, steal) = cpu_and_steal_secs();
        CpuMark(cpu, steal)
    }

    fn since(&self) -> (f64, f64) {
        let (cpu, steal) = cpu_and_steal_secs();
        (cpu - self.0, steal - self.1)
    }
}

/// Bytes of this machine's files under /usr, round and round: what an OS image holds.
struct OsBytes {
    files: Vec<PathBuf>,
    next: usize,
    current: Option<std::fs::File>,
}

impl OsBytes {
    fn new() -> Self {
        let mut files = Vec::new();
        let mut dirs = vec![PathBuf::from("/usr/lib"), PathBuf::from("/usr/share")];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(kind) = e.file_type() else { continue };
                if kind.is_dir() {
                    dirs.push(e.path());
                } else if kind.is_file() {
                    files.push(e.path());
                }
            }
        }
        files.sort();
        OsBytes {
            files,
            next: 0,
            current: None,
        }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut at = 0;
        while at < buf.len() {
            if self.current.is_none() {
                let path = &self.files[self.next % self.files.len()];
                self.next += 1;
                self.current = std::fs::File::open(path).ok();
                continue;
            }
            match self.current.as_mut().map(|f| f.read(&mut buf[at..])) {
                Some(Ok(0)) | Some(Err(_)) | None => self.current = None,
                Some(Ok(n)) => at += n,
            }
        }
    }
}

/// Writes an image of `size` bytes with `allocated` bytes of OS content, in 64 MiB extents
/// spread evenly (the rest holes).
fn write_image(path: &Path, size: u64, allocated: u64, os: &mut OsBytes) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let extent = 64u64 << 20;
    let extents = allocated / extent;
    let stride = size / extents.max(1);
    let mut buf = vec![0u8; extent as usize];
    for i in 0..extents {
        os.fill(&mut buf);
        f.seek(SeekFrom::Start(i * stride))?;
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    Ok(())
}

struct Figure {
    what: String,
    bytes: u64,
    secs: f64,
    cpu_secs: f64,
    steal_secs: f64,
}

impl Figure {
    fn new(what: &str, bytes: u64, began: Instant, cpu: &CpuMark) -> Self {
        let (cpu_secs, steal_secs) = cpu.since();
        Figure {
            what: what.into(),
            bytes,
            secs: began.elapsed().as_secs_f64(),
            cpu_secs,
            steal_secs,
        }
    }

    fn rate_mb_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.secs
    }

    fn line(&self) -> String {
        let gb = self.bytes as f64 / 1e9;
        format!(
            "| {} | {:.2} GB | {:.1} s | {:.1} MB/s | {:.2} CPU s/GB | {:.1} s stolen |",
            self.what,
            gb,
            self.secs,
            self.rate_mb_s(),
            self.cpu_secs / gb,
            self.steal_secs
        )
    }
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Process::new(program).args(args).status()?;
    if !status.success() {
        bail!("{program} {args:?} failed");
    }
    Ok(())
}

/// Writes back what is dirty (the images just written, the source's copy), then drops the
/// page cache: every run starts from the disk with the disk idle.
fn drop_caches() {
    let _ = Process::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// One cold migration of a shut-off VM whose disk is `image`; the transfer step's figures.
async fn dunes(
    engine: &EngineHandle,
    source: &AgentProcess,
    target: &AgentProcess,
    image: &Path,
    what: &str,
    options: MigrationOptions,
    n: usize,
) -> anyhow::Result<Figure> {
    let name = VmName::new(format!("bench-{n}"))?;
    let template = TemplateName::new("tiny")?;
    engine
        .request(|reply| Command::CreateVm {
            host: source.host_id.clone(),
            spec: VmSpec {
                name: name.clone(),
                template,
                vcpus: Some(1),
                memory_mib: Some(64),
            },
            start: false,
            reply,
        })
        .await?;
    let disk = source
        .data_dir
        .canonicalize()?
        .join("storage/disks")
        .join(format!("{name}.img"));
    // A reflink-free copy that keeps the holes.
    run(
        "cp",
        &[
            "--sparse=always",
            image.to_str().context("path")?,
            disk.to_str().context("path")?,
        ],
    )?;
    drop_caches();
    let journal = engine
        .request(|reply| Command::MigrateVm {
            host: source.host_id.clone(),
            vm: name.clone(),
            to: target.host_id.clone(),
            options,
            reply,
        })
        .await?;
    let mut updates = engine.subscribe();
    let mut began = None;
    loop {
        let step = updates
            .borrow_and_update()
            .migrations
            .iter()
            .find(|m| m.id == journal.id)
            .map(|m| (m.step, m.bytes_total));
        match step {
            Some((MigrationStep::Transferring, _)) if began.is_none() => {
                began = Some((Instant::now(), CpuMark::now()));
            }
            Some((MigrationStep::Verifying | MigrationStep::Defining, bytes))
            | Some((MigrationStep::Starting | MigrationStep::Confirmed, bytes))
            | Some((MigrationStep::SourceDeleted, bytes)) => {
                let (began, cpu) = began.as_ref().context("the transfer step was not seen")?;
                let figure = Figure::new(what, bytes, *began, cpu);
                // Let it finish before the next case.
                engine
                    .wait_for(Duration::from_secs(600), |s| {
                        s.migrations
                            .iter()
                            .any(|m| m.id == journal.id && m.step.is_finished())
                    })
                    .await
                    .map_err(|_| anyhow::anyhow!("the migration did not end"))?;
                // The copy goes, so that every run starts with the same memory in use.
                if let Err(e) = engine
                    .request(|reply| Command::DeleteVm {
                        host: target.host_id.clone(),
                        name: name.clone(),
                        reply,
                    })
                    .await
                {
                    println!("(the copy of {name} stays on the target: {e:#})");
                }
                return Ok(figure);
            }
            Some((MigrationStep::RolledBack | MigrationStep::RollingBack, _)) => {
                bail!("the migration rolled back")
            }
            _ => {}
        }
        updates.changed().await?;
    }
}

/// `ssh B 'cat > FILE' < image`, from namespace A to an sshd in namespace B.
fn ssh_cat(
    lab: &Lab,
    dir: &Path,
    image: &Path,
    allocated: u64,
    what: &str,
) -> anyhow::Result<Figure> {
    let out = dir.join("ssh-copy");
    let _ = std::fs::remove_file(&out);
    drop_caches();
    let cpu = CpuMark::now();
    let began = Instant::now();
    let status = Process::new("ip")
        .args(["netns", "exec", &lab.hosts[0].netns, "ssh"])
        .args(["-F", "/dev/null", "-i"])
        .arg(dir.join("id"))
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-p",
            "2222",
            &format!("root@{}", lab.hosts[1].ip),
            &format!("cat > {}", out.display()),
        ])
        .stdin(std::fs::File::open(image)?)
        .status()?;
    if !status.success() {
        bail!("ssh failed");
    }
    // Every byte of the image crosses, holes too: that is what cat sends.
    let bytes = std::fs::metadata(image)?.len().max(allocated);
    let figure = Figure::new(what, bytes, began, &cpu);
    // The copy is not needed any more: room for the next case.
    let _ = std::fs::remove_file(&out);
    Ok(figure)
}

/// `openssl s_client < image` in namespace A to `openssl s_server > FILE` in namespace B.
fn tls_tcp(lab: &Lab, dir: &Path, image: &Path, what: &str) -> anyhow::Result<Figure> {
    let out = dir.join("tls-copy");
    let mut server = Process::new("ip")
        .args(["netns", "exec", &lab.hosts[1].netns, "openssl", "s_server"])
        .args(["-quiet", "-naccept", "1", "-accept"])
        .arg(format!("{}:9443", lab.hosts[1].ip))
        .arg("-cert")
        .arg(dir.join("tls.crt"))
        .arg("-key")
        .arg(dir.join("tls.key"))
        // s_server ends at the end of its stdin: it gets one that stays open.
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&out)?)
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    drop_caches();
    let cpu = CpuMark::now();
    let began = Instant::now();
    let status = Process::new("ip")
        .args(["netns", "exec", &lab.hosts[0].netns, "openssl", "s_client"])
        .args(["-quiet", "-no_ign_eof", "-nocommands", "-connect"])
        .arg(format!("{}:9443", lab.hosts[1].ip))
        .stdin(std::fs::File::open(image)?)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    // The server exits once the client's connection has closed and it wrote what came.
    let keep_open = server.stdin.take();
    let deadline = Instant::now() + Duration::from_secs(120);
    while server.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Timed when the server has written the last byte, not after the cleanup.
    let figure_at_end = Figure::new(what, 0, began, &cpu);
    drop(keep_open);
    let _ = server.kill();
    let _ = server.wait();
    if !status.success() {
        bail!("s_client failed");
    }
    let bytes = std::fs::metadata(&out)?.len();
    let _ = std::fs::remove_file(&out);
    Ok(Figure {
        bytes,
        ..figure_at_end
    })
}

/// sshd in namespace B on port 2222, a key for root, and a certificate for s_server.
fn baselines_setup(lab: &Lab, dir: &Path) -> anyhow::Result<std::process::Child> {
    let key = dir.join("id");
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            key.to_str().context("path")?,
        ],
    )?;
    let host_key = dir.join("host_key");
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            host_key.to_str().context("path")?,
        ],
    )?;
    let authorized = dir.join("authorized_keys");
    std::fs::copy(key.with_extension("pub"), &authorized)?;
    std::fs::create_dir_all("/run/sshd")?;
    let sshd = Process::new("ip")
        .args([
            "netns",
            "exec",
            &lab.hosts[1].netns,
            "/usr/sbin/sshd",
            "-D",
            "-e",
        ])
        .args(["-f", "/dev/null", "-p", "2222", "-h"])
        .arg(&host_key)
        .args(["-o", "PermitRootLogin=yes", "-o"])
        .arg(format!("AuthorizedKeysFile={}", authorized.display()))
        .args(["-o", "StrictModes=no"])
        .stderr(Stdio::null())
        .spawn()?;
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=bench",
            "-keyout",
            dir.join("tls.key").to_str().context("path")?,
            "-out",
            dir.join("tls.crt").to_str().context("path")?,
        ],
    )?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(sshd)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if let Some(why) = dunes_tests::netns::unavailable() {
        bail!("this benchmark needs a lab: {why}");
    }
    let lab = Lab::new(2)?;
    let base = std::env::var_os("DUNES_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base)?;
    let agent = |i: usize, name: &str| spawn_lab_agent(&lab, i, dir.path(), name);
    let source = agent(0, "bench-a")?;
    let target = agent(1, "bench-b")?;
    let engine = start_engine(&dir.path().join("console")).await?;
    for a in [&source, &target] {
        enroll_online(&engine, a).await?;
    }
    // DUNES_BENCH_GRO=1: the veth pairs get GRO, as physical NICs have it.
    if std::env::var_os("DUNES_BENCH_GRO").is_some() {
        lab.enable_gro()?;
    }
    let sshd = baselines_setup(&lab, dir.path())?;
    // DUNES_BENCH_CASES=ab runs only cases (a) and (b), for instance; `z` is case (a) with
    // zstd on the unshaped link.
    let wanted = |c: char| std::env::var("DUNES_BENCH_CASES").map_or(true, |v| v.contains(c));
    // Only the images the chosen cases move are written.
    let mut os = OsBytes::new();
    let full = dir.path().join("full.img");
    if wanted('a') || wanted('z') {
        write_image(&full, 4 * GIB, 4 * GIB, &mut os)?;
    }
    let sparse = dir.path().join("sparse.img");
    if wanted('b') || wanted('c') {
        write_image(&sparse, 16 * GIB, 2 * GIB, &mut os)?;
    }
    // For the shaped link, the baselines get only the data (as if they knew the holes):
    // 16 GiB through cat at 200 Mbit/s would take 11 minutes.
    let dense = dir.path().join("dense.img");
    if wanted('c') {
        write_image(&dense, 2 * GIB, 2 * GIB, &mut os)?;
    }
    let plain = MigrationOptions {
        limit_mbps: None,
        compress: Some(false),
    };
    let packed = MigrationOptions {
        limit_mbps: None,
        compress: Some(true),
    };
    let mut lines = Vec::new();
    let mut n = 0;
    // The rate of each figure, or None when the case failed.
    let mut case = |f: anyhow::Result<Figure>| match f {
        Ok(f) => {
            println!("{}", f.line());
            lines.push(f.line());
            Some(f.rate_mb_s())
        }
        Err(e) => {
            println!("| failed: {e:#} |");
            None
        }
    };
    // DUNES_BENCH_ROUNDS=N runs case (a) N times, the three methods in a new order each
    // round (this VM's speed drifts over minutes, which would favour whichever runs first).
    let rounds: usize = std::env::var("DUNES_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    // DUNES_BENCH_METHODS=d (or any of d, s, t) runs only Dunes (ssh cat, TLS over TCP).
    let methods = std::env::var("DUNES_BENCH_METHODS").unwrap_or_else(|_| "dst".into());
    let mut rates: [Vec<f64>; 3] = Default::default();
    let mut ratios = Vec::new();
    for round in 0..if wanted('a') { rounds } else { 0 } {
        let mut this = [None; 3];
        for turn in 0..3 {
            let method = (round + turn) % 3;
            if !methods.contains(['d', 's', 't'][method]) {
                continue;
            }
            this[method] = match method {
                0 => {
                    let vm = n;
                    n += 1;
                    case(
                        dunes(
                            &engine,
                            &source,
                            &target,
                            &full,
                            "(a) 4 GiB allocated: Dunes",
                            plain,
                            vm,
                        )
                        .await,
                    )
                }
                1 => case(ssh_cat(&lab, dir.path(), &full, 4 * GIB, "(a) ssh cat")),
                _ => case(tls_tcp(&lab, dir.path(), &full, "(a) TLS over TCP")),
            };
        }
        for (all, rate) in rates.iter_mut().zip(this) {
            all.extend(rate);
        }
        if let [Some(d), Some(s), _] = this {
            ratios.push(d / s);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => "—".to_string(),
            n if n % 2 == 1 => format!("{:.1}", v[n / 2]),
            n => format!("{:.1}", (v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    };
    let case_a_summary = (rounds > 1 && wanted('a')).then(|| {
        format!(
            "case (a), {rounds} rounds, medians: Dunes {} MB/s, ssh cat {}, TLS over TCP {}; Dunes ÷ ssh by round: {}",
            median(&rates[0]),
            median(&rates[1]),
            median(&rates[2]),
            ratios
                .iter()
                .map(|r| format!("{r:.2}×"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    });
    if wanted('z') {
        case(
            dunes(
                &engine,
                &source,
                &target,
                &full,
                "(a) 4 GiB allocated, unshaped link: Dunes, zstd",
                packed,
                n,
            )
            .await,
        );
        n += 1;
    }
    if wanted('b') {
        case(
            dunes(
                &engine,
                &source,
                &target,
                &sparse,
                "(b) 16 GiB, 2 GiB allocated: Dunes",
                plain,
                n,
            )
            .await,
        );
        n += 1;
        case(ssh_cat(&lab, dir.path(), &sparse, 16 * GIB, "(b) ssh cat"));
        case(tls_tcp(&lab, dir.path(), &sparse, "(b) TLS over TCP"));
    }
    if wanted('c') {
        lab.shape(1, 200)?;
        case(
            dunes(
                &engine,
                &source,
                &target,
                &sparse,
                "(c) 200 Mbit/s: Dunes",
                plain,
                n,
            )
            .await,
        );
        n += 1;
        case(
            dunes(
                &engine,
                &source,
                &target,
                &sparse,
                "(c) 200 Mbit/s: Dunes, zstd",
                packed,
                n,
            )
            .await,
        );
        case(ssh_cat(
            &lab,
            dir.path(),
            &dense,
            2 * GIB,
            "(c) ssh cat, the 2 GiB of data only",
        ));
        case(tls_tcp(
            &lab,
            dir.path(),
            &dense,
            "(c) TLS over TCP, the 2 GiB of data only",
        ));
    }
    drop(sshd);
    let _ = Process::new("pkill")
        .args(["-f", "sshd -D -e -f /dev/null -p 2222"])
        .status();
    println!("\n{}", lines.join("\n"));
    if let Some(summary) = case_a_summary {
        println!("\n{summary}");
    }
    Ok(())
}
