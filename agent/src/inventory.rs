//! What the real machine says about itself: host name, CPU model, network, disk space, load.

use std::path::Path;

use dunes_shared::model::NetworkInterface;

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default()
}

pub fn network_interfaces() -> Vec<NetworkInterface> {
    let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    let mut out: Vec<NetworkInterface> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            if name == "lo" {
                return None;
            }
            let read = |f: &str| {
                std::fs::read_to_string(e.path().join(f))
                    .ok()
                    .map(|s| s.trim().to_string())
            };
            Some(NetworkInterface {
                mac: read("address").unwrap_or_default(),
                speed_mbps: read("speed")
                    .and_then(|s| s.parse::<i64>().ok())
                    .filter(|s| *s > 0)
                    .map(|s| s as u32),
                name,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Total and free MiB of the file system holding `path`; zeros when it cannot be read.
pub fn storage_mib(path: &Path) -> (u64, u64) {
    let Ok(stat) = rustix::fs::statvfs(path) else {
        return (0, 0);
    };
    let unit = stat.f_frsize;
    let mib = 1024 * 1024;
    (
        stat.f_blocks.saturating_mul(unit) / mib,
        stat.f_bavail.saturating_mul(unit) / mib,
    )
}

/// Total and free MiB Dunes plans with: with a declared capacity, that capacity less what
/// `root` holds, capped by the file system's free space unless `sparse_stand_ins` (libvirt's
/// test driver, whose disks stand in for a host that is not this machine); without one, the
/// file system's.
pub fn planned_storage_mib(
    root: &Path,
    capacity_gib: Option<u64>,
    sparse_stand_ins: bool,
) -> (u64, u64) {
    let (fs_total, fs_free) = storage_mib(root);
    let Some(capacity_gib) = capacity_gib else {
        return (fs_total, fs_free);
    };
    let total = capacity_gib.saturating_mul(1024);
    let free = total.saturating_sub(allocated_bytes(root) / (1024 * 1024));
    if sparse_stand_ins {
        (total, free)
    } else {
        (total, free.min(fs_free))
    }
}

/// Bytes the files under `path` occupy on disk (a sparse file counts what it holds), without
/// following symbolic links; unreadable entries count nothing.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.blocks().saturating_mul(512);
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| allocated_bytes(&e.path()))
                .fold(0u64, u64::saturating_add)
        })
        .unwrap_or(0)
}

/// Logical CPUs of the machine, from /proc/cpuinfo (not this process's affinity).
pub fn cpu_count() -> u32 {
    let counted = std::fs::read_to_string("/proc/cpuinfo")
        .map(|text| {
            text.lines()
                .filter(|l| l.starts_with("processor") && l.contains(':'))
                .count() as u32
        })
        .unwrap_or(0);
    if counted > 0 {
        counted
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    }
}

/// (used, total) memory of the machine in MiB.
pub fn memory_mib() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let total = field("MemTotal:") / 1024;
    let available = field("MemAvailable:") / 1024;
    (total.saturating_sub(available), total)
}

pub fn uptime_secs() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// CPU busy share between two calls, from /proc/stat.
#[derive(Debug, Default)]
pub struct CpuLoad {
    last: Option<(u64, u64)>,
}

impl CpuLoad {
    pub fn sample_percent(&mut self) -> f32 {
        let Some((busy, total)) = read_cpu_times() else {
            return 0.0;
        };
        let percent = match self.last {
            Some((b0, t0)) if total > t0 => {
                (busy.saturating_sub(b0)) as f32 * 100.0 / (total - t0) as f32
            }
            _ => 0.0,
        };
        self.last = Some((busy, total));
        percent.clamp(0.0, 100.0)
    }
}

fn read_cpu_times() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let total = values
        .iter()
        .take(8)
        .fold(0u64, |n, v| n.saturating_add(*v));
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_machine() {
        let (total, free) = storage_mib(Path::new("/"));
        assert!(total > 0 && free <= total);
        let (used, total) = memory_mib();
        assert!(total > 0 && used <= total);
        let mut load = CpuLoad::default();
        load.sample_percent();
        assert!((0.0..=100.0).contains(&load.sample_percent()));
        assert!(storage_mib(Path::new("/nonexistent/dir")) == (0, 0));
    }

    #[test]
    fn a_declared_capacity_counts_what_the_storage_holds() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("images")).unwrap();
        std::fs::write(dir.path().join("images/disk"), vec![1u8; 3 << 20]).unwrap();
        // A sparse file counts only its data.
        let sparse = std::fs::File::create(dir.path().join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        let held = allocated_bytes(dir.path());
        assert!((3 << 20..1 << 30).contains(&held), "{held}");
        let (total, free) = planned_storage_mib(dir.path(), Some(10), true);
        assert_eq!(total, 10 * 1024);
        assert_eq!(free, 10 * 1024 - held / (1024 * 1024));
        // Without one, the file system's figures.
        assert_eq!(
            planned_storage_mib(dir.path(), None, false),
            storage_mib(dir.path())
        );
        // On a real hypervisor the file system's free space caps it.
        let (_, capped) = planned_storage_mib(dir.path(), Some(u64::MAX / 2048), false);
        assert!(capped <= storage_mib(dir.path()).1);
        let cpus = cpu_count();
        assert!(cpus >= 1);
        assert!(cpus as usize >= std::thread::available_parallelism().unwrap().get());
    }
}
