//! CPU and memory limits for process instances, through the agent's own control group.
//!
//! The agent never creates groups anywhere but below the group it was started in (its
//! delegated subtree, as systemd's `Delegate=yes` gives a service): one group per agent,
//! named after a hash of its data dir so that two agents on a machine keep apart, and one
//! group per instance inside it. cgroup v2 is used where its `cpu` and `memory`
//! controllers are available; a machine that keeps those controllers on cgroup v1 (a hybrid
//! layout) gets the same limits through v1; otherwise no limits are applied and the
//! inventory says why.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// cgroup v1 and v2 both count CPU time in periods of this length.
const CPU_PERIOD_US: u64 = 100_000;

/// How this agent applies limits.
#[derive(Debug, Clone, PartialEq)]
pub enum CgroupLimits {
    /// `base` is this agent's own group below its starting group.
    V2 { base: PathBuf },
    /// One base per controller hierarchy.
    V1 { cpu: PathBuf, memory: PathBuf },
    /// No limits, and the reason an operator reads in the inventory.
    Unavailable(String),
}

/// The groups of one instance, created by [`CgroupLimits::instance`].
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceGroups {
    /// Every group the instance's processes join (one for v2, two for v1).
    dirs: Vec<PathBuf>,
}

/// A line of /proc/self/mountinfo: mount point, file-system type, super-block options.
fn mounts(mountinfo: &str) -> Vec<(PathBuf, String, String)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            let point = fields.get(4)?;
            let fstype = fields.get(dash + 1)?;
            let options = fields.get(dash + 3).copied().unwrap_or("");
            Some((
                PathBuf::from(point.replace("\\040", " ")),
                fstype.to_string(),
                options.to_string(),
            ))
        })
        .collect()
}

/// The agent's group in the hierarchy that holds `controller` ("" for v2), from
/// /proc/self/cgroup.
fn own_group(proc_cgroup: &str, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        let matches = if controller.is_empty() {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        matches.then(|| path.to_string())
    })
}

fn join_group(mount: &Path, group: &str) -> PathBuf {
    mount.join(group.trim_start_matches('/'))
}

/// The name of this agent's group: a hash of its data dir.
fn agent_group_name(data_dir: &Path) -> String {
    let digest = Sha256::digest(data_dir.as_os_str().as_encoded_bytes());
    format!("dunes-agent-{}", &hex::encode(digest)[..12])
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("writing {}: {e}", path.display()))
}

fn mkdir(path: &Path) -> Result<(), String> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("creating {}: {e}", path.display())),
    }
}

impl CgroupLimits {
    /// Finds how limits can be applied on this machine for the agent with `data_dir`, by
    /// creating the agent's own group once (it is made again for the first instance).
    pub fn detect(data_dir: &Path) -> Self {
        let (Ok(mountinfo), Ok(proc_cgroup)) = (
            std::fs::read_to_string("/proc/self/mountinfo"),
            std::fs::read_to_string("/proc/self/cgroup"),
        ) else {
            return CgroupLimits::Unavailable("this machine shows no control groups".into());
        };
        let name = agent_group_name(data_dir);
        let mounts = mounts(&mountinfo);
        let v2 = mounts
            .iter()
            .find(|(_, fstype, _)| fstype == "cgroup2")
            .and_then(|(point, _, _)| Some(join_group(point, &own_group(&proc_cgroup, "")?)));
        let v2_reason = match &v2 {
            Some(own) => match Self::setup_v2(own, &name) {
                Ok(base) => {
                    let limits = CgroupLimits::V2 { base };
                    limits.release();
                    return limits;
                }
                Err(reason) => reason,
            },
            None => "cgroup v2 is not mounted".to_string(),
        };
        let v1 = |controller: &str| {
            mounts
                .iter()
                .find(|(_, fstype, options)| {
                    fstype == "cgroup" && options.split(',').any(|o| o == controller)
                })
                .and_then(|(point, _, _)| {
                    Some(join_group(point, &own_group(&proc_cgroup, controller)?))
                })
        };
        if let (Some(cpu), Some(memory)) = (v1("cpu"), v1("memory")) {
            let cpu = cpu.join(&name);
            let memory = memory.join(&name);
            match mkdir(&cpu).and_then(|()| mkdir(&memory)) {
                Ok(()) => {
                    let limits = CgroupLimits::V1 { cpu, memory };
                    // Made again with the first instance: an agent that runs no process
                    // leaves no group behind.
                    limits.release();
                    return limits;
                }
                Err(e) => return CgroupLimits::Unavailable(format!("{v2_reason}; cgroup v1: {e}")),
            }
        }
        CgroupLimits::Unavailable(v2_reason)
    }

    /// Creates the agent's group below `own`, with the cpu and memory controllers enabled
    /// for its children.
    fn setup_v2(own: &Path, name: &str) -> Result<PathBuf, String> {
        let available = std::fs::read_to_string(own.join("cgroup.controllers"))
            .map_err(|e| format!("cgroup v2: {e}"))?;
        let has = |c: &str| available.split_whitespace().any(|a| a == c);
        if !has("cpu") || !has("memory") {
            return Err(format!(
                "cgroup v2 offers no cpu and memory controllers here (it offers: {})",
                if available.trim().is_empty() {
                    "none"
                } else {
                    available.trim()
                }
            ));
        }
        let enable = |dir: &Path| write(&dir.join("cgroup.subtree_control"), "+cpu +memory");
        if enable(own).is_err() {
            // A group with member processes cannot hand controllers to its children (the
            // "no internal processes" rule): the agent moves itself into a leaf first.
            let leaf = own.join("dunes-agents");
            mkdir(&leaf)?;
            write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
            enable(own).map_err(|e| format!("cgroup v2: {e}"))?;
        }
        let base = own.join(name);
        mkdir(&base)?;
        enable(&base)?;
        Ok(base)
    }

    /// How the inventory describes these limits.
    pub fn describe(&self) -> String {
        match self {
            CgroupLimits::V2 { .. } => "CPU and memory limits through cgroup v2".into(),
            CgroupLimits::V1 { .. } => {
                "CPU and memory limits through cgroup v1 (this machine keeps its cpu and memory controllers on cgroup v1)".into()
            }
            CgroupLimits::Unavailable(reason) => {
                format!("no CPU or memory limits: {reason}")
            }
        }
    }

    /// Creates (or finds) the groups of instance `name` with its limits set.
    pub fn instance(
        &self,
        name: &str,
        vcpus: u32,
        memory_mib: u64,
    ) -> Result<Option<InstanceGroups>, String> {
        let memory_bytes = memory_mib.saturating_mul(1024 * 1024);
        let quota_us = u64::from(vcpus.max(1)) * CPU_PERIOD_US;
        match self {
            CgroupLimits::V2 { base } => {
                let dir = base.join(name);
                mkdir(base)?;
                write(&base.join("cgroup.subtree_control"), "+cpu +memory")?;
                mkdir(&dir)?;
                write(&dir.join("memory.max"), &memory_bytes.to_string())?;
                write(&dir.join("cpu.max"), &format!("{quota_us} {CPU_PERIOD_US}"))?;
                Ok(Some(InstanceGroups { dirs: vec![dir] }))
            }
            CgroupLimits::V1 { cpu, memory } => {
                mkdir(cpu)?;
                mkdir(memory)?;
                let cpu = cpu.join(name);
                let memory = memory.join(name);
                mkdir(&cpu)?;
                mkdir(&memory)?;
                write(
                    &memory.join("memory.limit_in_bytes"),
                    &memory_bytes.to_string(),
                )?;
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(&cpu.join("cpu.cfs_quota_us"), &quota_us.to_string())?;
                Ok(Some(InstanceGroups {
                    dirs: vec![cpu, memory],
                }))
            }
            CgroupLimits::Unavailable(_) => Ok(None),
        }
    }

    /// Removes the agent's own group if it holds no instance group.
    pub fn release(&self) {
        let dirs = match self {
            CgroupLimits::V2 { base } => vec![base.clone()],
            CgroupLimits::V1 { cpu, memory } => vec![cpu.clone(), memory.clone()],
            CgroupLimits::Unavailable(_) => Vec::new(),
        };
        for dir in dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// Removes the groups of instance `name`, which must hold no process any more; says
    /// whether they are gone.
    pub fn remove_instance(&self, name: &str) -> bool {
        let dirs = match self {
            CgroupLimits::V2 { base } => vec![base.join(name)],
            CgroupLimits::V1 { cpu, memory } => vec![cpu.join(name), memory.join(name)],
            CgroupLimits::Unavailable(_) => Vec::new(),
        };
        let gone = dirs.iter().all(|dir| match std::fs::remove_dir(dir) {
            Ok(()) => true,
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        });
        // The agent's group goes with its last instance's.
        if gone {
            self.release();
        }
        gone
    }
}

impl InstanceGroups {
    /// Moves process `pid` into every group of the instance.
    pub fn join(&self, pid: u32) -> Result<(), String> {
        for dir in &self.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The processes still in the instance's groups (a child the main process left behind).
    pub fn members(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills whatever is left in the groups.
    pub fn kill_all(&self) {
        for pid in self.members() {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }

    /// The files that show the limits, for tests and diagnostics.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_CGROUP: &str = "\
4:memory:/process_api/abc
1:cpu:/
0::/
";

    #[test]
    fn finds_each_hierarchy_and_the_agents_group_in_it() {
        let mounts = mounts(HYBRID_MOUNTINFO);
        assert_eq!(mounts.len(), 4);
        assert_eq!(mounts[3].0, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(mounts[3].1, "cgroup2");
        assert_eq!(mounts[1].2, "rw,cpu");
        assert_eq!(
            own_group(HYBRID_CGROUP, "memory").as_deref(),
            Some("/process_api/abc")
        );
        assert_eq!(own_group(HYBRID_CGROUP, "cpu").as_deref(), Some("/"));
        assert_eq!(own_group(HYBRID_CGROUP, "").as_deref(), Some("/"));
        assert_eq!(own_group(HYBRID_CGROUP, "pids"), None);
        assert_eq!(
            join_group(Path::new("/sys/fs/cgroup/memory"), "/process_api/abc"),
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc")
        );
        assert_eq!(
            join_group(Path::new("/sys/fs/cgroup/cpu"), "/"),
            PathBuf::from("/sys/fs/cgroup/cpu/")
        );
    }

    #[test]
    fn two_agents_get_groups_of_their_own() {
        let a = agent_group_name(Path::new("/var/lib/dunes/a"));
        let b = agent_group_name(Path::new("/var/lib/dunes/b"));
        assert_ne!(a, b);
        assert_eq!(a, agent_group_name(Path::new("/var/lib/dunes/a")));
        assert!(a.starts_with("dunes-agent-") && a.len() == "dunes-agent-".len() + 12);
    }

    #[test]
    fn v2_limits_are_written_as_the_kernel_reads_them() {
        // A directory stands in for a group here: the files are what the kernel reads.
        let dir = tempfile::tempdir().unwrap();
        let limits = CgroupLimits::V2 {
            base: dir.path().to_path_buf(),
        };
        let groups = limits.instance("web-1", 2, 512).unwrap().unwrap();
        let group = dir.path().join("web-1");
        assert_eq!(groups.dirs(), std::slice::from_ref(&group));
        assert_eq!(
            std::fs::read_to_string(group.join("memory.max")).unwrap(),
            "536870912"
        );
        assert_eq!(
            std::fs::read_to_string(group.join("cpu.max")).unwrap(),
            "200000 100000"
        );
    }

    #[test]
    fn no_limits_says_why() {
        let limits = CgroupLimits::Unavailable("cgroup v2 is not mounted".into());
        assert_eq!(
            limits.describe(),
            "no CPU or memory limits: cgroup v2 is not mounted"
        );
        assert_eq!(limits.instance("x", 1, 64).unwrap(), None);
    }
}
