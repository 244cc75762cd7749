//! The host's readings for statistics, from /proc: CPU time, memory, block devices' and
//! network interfaces' byte counters. Workloads are read by their runtimes. Counters are
//! sent as they are; the console takes the differences.

use dunes_shared::model::Counters;

/// /proc/stat counts in USER_HZ ticks, which Linux fixes at 100 per second for userspace.
const NS_PER_TICK: u64 = 10_000_000;

/// The host's counters now. A file that cannot be read leaves its fields at zero.
pub fn host_counters() -> Counters {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let (cpu_ns, cpus) = cpu_from_stat(&read("/proc/stat"));
    let (memory_used_mib, memory_total_mib) = memory_from_meminfo(&read("/proc/meminfo"));
    let (disk_read_bytes, disk_write_bytes) = disks_from_diskstats(&read("/proc/diskstats"));
    let (net_rx_bytes, net_tx_bytes) = network_from_net_dev(&read("/proc/net/dev"));
    Counters {
        cpu_ns,
        cpus,
        memory_used_mib,
        memory_total_mib,
        disk_read_bytes,
        disk_write_bytes,
        net_rx_bytes,
        net_tx_bytes,
        net_tx_out_of_site_bytes: None,
    }
}

/// Busy CPU time of all CPUs (every field of the `cpu` line but idle and iowait), and how
/// many CPUs there are.
pub fn cpu_from_stat(stat: &str) -> (u64, u32) {
    let mut busy_ticks = 0u64;
    let mut cpus = 0u32;
    for line in stat.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("cpu") => {
                // user nice system idle iowait irq softirq steal (guest time is in user).
                busy_ticks = fields
                    .take(8)
                    .enumerate()
                    .filter(|(i, _)| *i != 3 && *i != 4)
                    .filter_map(|(_, v)| v.parse::<u64>().ok())
                    .sum();
            }
            Some(name) if name.starts_with("cpu") => cpus += 1,
            _ => {}
        }
    }
    (busy_ticks.saturating_mul(NS_PER_TICK), cpus)
}

/// (used, total) memory in MiB: used is what is not available to new work.
pub fn memory_from_meminfo(meminfo: &str) -> (u64, u64) {
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    let total_kib = field("MemTotal").unwrap_or(0);
    let available_kib = field("MemAvailable").unwrap_or(total_kib);
    (
        total_kib.saturating_sub(available_kib) / 1024,
        total_kib / 1024,
    )
}

/// Whether a block device is a whole disk worth counting: not a partition (whose bytes its
/// disk counts already), nor a loop, RAM or device-mapper device stacked on another.
fn counted_disk(name: &str) -> bool {
    let virtual_dev = ["loop", "ram", "dm-", "zram", "md", "sr"]
        .iter()
        .any(|p| name.starts_with(p));
    let partition = if name.starts_with("nvme") || name.starts_with("mmcblk") {
        name.rsplit_once('p').is_some_and(|(head, n)| {
            head.ends_with(|c: char| c.is_ascii_digit())
                && !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
        })
    } else {
        name.ends_with(|c: char| c.is_ascii_digit())
    };
    !virtual_dev && !partition
}

/// Bytes read and written by the host's whole disks since boot.
pub fn disks_from_diskstats(diskstats: &str) -> (u64, u64) {
    let mut read = 0u64;
    let mut written = 0u64;
    for line in diskstats.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // major minor name reads merged sectors_read ms writes merged sectors_written ...
        if fields.len() < 10 || !counted_disk(fields[2]) {
            continue;
        }
        let sectors = |i: usize| fields[i].parse::<u64>().unwrap_or(0);
        read = read.saturating_add(sectors(5).saturating_mul(512));
        written = written.saturating_add(sectors(9).saturating_mul(512));
    }
    (read, written)
}

/// Bytes received and sent by every interface but loopback since it appeared.
pub fn network_from_net_dev(net_dev: &str) -> (u64, u64) {
    let mut rx = 0u64;
    let mut tx = 0u64;
    for line in net_dev.lines().skip(2) {
        let Some((name, counters)) = line.split_once(':') else {
            continue;
        };
        if name.trim() == "lo" {
            continue;
        }
        let fields: Vec<u64> = counters
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        if fields.len() >= 9 {
            rx = rx.saturating_add(fields[0]);
            tx = tx.saturating_add(fields[8]);
        }
    }
    (rx, tx)
}

/// A process instance's counters from its cgroup v2 group (all its processes), else from
/// /proc of its main process. `None` when neither can be read (it is not running).
pub fn process_counters(group: Option<&std::path::Path>, pid: Option<u32>) -> Option<Counters> {
    let mut counters = Counters {
        cpus: 1,
        ..Counters::default()
    };
    if let Some(group) = group
        && let Ok(cpu_stat) = std::fs::read_to_string(group.join("cpu.stat"))
    {
        let usage_usec = cpu_stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse::<u64>().ok())?;
        counters.cpu_ns = usage_usec.saturating_mul(1000);
        counters.memory_used_mib = std::fs::read_to_string(group.join("memory.current"))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(0, |b| b / (1024 * 1024));
        if let Some(pid) = pid {
            (counters.disk_read_bytes, counters.disk_write_bytes) = process_io(pid);
        }
        return Some(counters);
    }
    let pid = pid?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    counters.cpu_ns = cpu_of_proc_stat(&stat)?;
    counters.memory_used_mib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024);
    (counters.disk_read_bytes, counters.disk_write_bytes) = process_io(pid);
    Some(counters)
}

/// CPU time of a process and its waited-for children, from `/proc/PID/stat`.
pub fn cpu_of_proc_stat(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state(0) ... utime(11) stime(12) cutime(13) cstime(14).
    let ticks: u64 = (11..15)
        .map(|i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum::<Option<u64>>()?;
    Some(ticks.saturating_mul(NS_PER_TICK))
}

/// Bytes a process read from and wrote to storage, from `/proc/PID/io` (zero if hidden).
fn process_io(pid: u32) -> (u64, u64) {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let field = |name: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("read_bytes:"), field("write_bytes:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_files_read_as_counters() {
        let stat = "cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\ncpu1 50 3 25 500 10 2 1 1 0 0\nintr 5\n";
        // user+nice+system+irq+softirq+steal = 161 ticks.
        assert_eq!(cpu_from_stat(stat), (161 * NS_PER_TICK, 2));
        let meminfo = "MemTotal:       4096000 kB\nMemFree:  100 kB\nMemAvailable:   1024000 kB\n";
        assert_eq!(memory_from_meminfo(meminfo), (3000, 4000));
        let diskstats = "\
 253       0 vda 100 0 8 0 50 0 16 0 0 0 0\n\
 253       1 vda1 100 0 8 0 50 0 16 0 0 0 0\n\
   7       0 loop0 9 0 9999 0 0 0 0 0 0 0 0\n\
 259       0 nvme0n1 1 0 2 0 1 0 4 0 0 0 0\n\
 259       1 nvme0n1p1 1 0 2 0 1 0 4 0 0 0 0\n";
        assert_eq!(disks_from_diskstats(diskstats), (10 * 512, 20 * 512));
        let net_dev = "Inter-|   Receive |  Transmit\n face |bytes packets errs drop fifo frame compressed multicast|bytes\n    lo: 500 5 0 0 0 0 0 0 500 5 0 0 0 0 0 0\n  eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n  veth1: 1 1 0 0 0 0 0 0 2 1 0 0 0 0 0 0\n";
        assert_eq!(network_from_net_dev(net_dev), (1001, 2002));
        // Garbage reads as nothing, never a panic.
        assert_eq!(cpu_from_stat("cpu x y\n"), (0, 0));
        assert_eq!(disks_from_diskstats("1 2 sda x"), (0, 0));
        assert_eq!(network_from_net_dev("a\nb\nc: d"), (0, 0));
        let now = host_counters();
        assert!(now.cpus >= 1 && now.memory_total_mib > 0, "{now:?}");
    }

    #[test]
    fn a_process_reads_from_proc() {
        let stat = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15\n";
        // utime 11, stime 12, cutime 13, cstime 14.
        assert_eq!(cpu_of_proc_stat(stat), Some(50 * NS_PER_TICK));
        assert_eq!(cpu_of_proc_stat("garbage"), None);
        let me = process_counters(None, Some(std::process::id())).unwrap();
        assert!(me.memory_used_mib > 0, "{me:?}");
        assert!(process_counters(None, Some(u32::MAX)).is_none());
        assert!(process_counters(None, None).is_none());
    }
}
