//! What process instances (and VMs on QEMU's user-mode network, whose guests' connections
//! are their QEMU process's sockets) send and receive over TCP, and how much of it leaves
//! the site:
//! each second the kernel's list of TCP sockets (see [`sock_diag`]) is matched to the
//! sockets an instance's processes hold, and each socket's growth since the last look is
//! added to the instance's totals, as staying in the site when its peer is this host, one of
//! the site's networks (the agent's config) or another host of the site (the console says
//! which), and as leaving it otherwise.
//!
//! What is not seen: UDP, and the bytes a socket moved in the second before it closed. A
//! bridged VM's connections are its guest's, out of the host's sight.

pub mod sock_diag;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    str::FromStr,
};

use dunes_shared::model::VmName;

use sock_diag::TcpSocket;

/// An IP network, as `10.1.0.0/16` or `fd00::/8`; a bare address is a network of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a network (write it as 10.1.0.0/16, fd00::/8 or one address)")]
pub struct NetworkError(String);

impl FromStr for Network {
    type Err = NetworkError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || NetworkError(text.to_string());
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Network { addr, prefix })
    }
}

impl TryFrom<String> for Network {
    type Error = NetworkError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |a: IpAddr| match a {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32u32),
            IpAddr::V6(v6) => (u128::from(v6), 128u32),
        };
        let (mine, width) = bits(self.addr);
        let (theirs, their_width) = bits(ip.to_canonical());
        if width != their_width {
            return false;
        }
        let host_bits = width - u32::from(self.prefix);
        host_bits >= width || (mine >> host_bits) == (theirs >> host_bits)
    }
}

/// What a process instance sent and received over TCP since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrafficTotals {
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// Of `sent_bytes`, what went to peers outside the site.
    pub sent_out_of_site_bytes: u64,
}

#[derive(Debug, Default)]
struct InstanceTraffic {
    /// Each socket's counters at the last look, by inode.
    sockets: HashMap<u32, (u64, u64)>,
    totals: TrafficTotals,
}

/// The TCP traffic of every process instance, and where the site ends.
#[derive(Debug, Default)]
pub struct TrafficMeter {
    /// The site's networks, from the agent's config.
    declared: Vec<Network>,
    /// The site's hosts, as the console last said; `None` before it has.
    site_hosts: Option<std::collections::BTreeSet<IpAddr>>,
    instances: BTreeMap<VmName, InstanceTraffic>,
}

impl TrafficMeter {
    pub fn new(declared: Vec<Network>) -> Self {
        TrafficMeter {
            declared,
            ..Default::default()
        }
    }

    /// The console's word on the site's hosts; it replaces the last one.
    pub fn set_site_hosts(&mut self, addresses: Vec<IpAddr>) {
        self.site_hosts = Some(addresses.into_iter().map(|a| a.to_canonical()).collect());
    }

    /// Whether traffic to `peer` stays in the site.
    pub fn in_site(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        peer.is_loopback()
            || self.declared.iter().any(|n| n.contains(peer))
            || self
                .site_hosts
                .as_ref()
                .is_some_and(|hosts| hosts.contains(&peer))
    }

    /// Whether what leaves the site can be told: once the console has named the site's
    /// hosts (before that, a neighbour's traffic would count as leaving).
    pub fn knows_site(&self) -> bool {
        self.site_hosts.is_some()
    }

    /// Adds what each instance's sockets (`owned`: the inodes its processes hold) moved
    /// since the last look, from the kernel's `sockets`. Instances not in `owned` are
    /// forgotten: one that starts again counts from zero.
    pub fn account(&mut self, owned: Vec<(VmName, Vec<u32>)>, sockets: &[TcpSocket]) {
        let by_inode: HashMap<u32, &TcpSocket> = sockets.iter().map(|s| (s.inode, s)).collect();
        let mut next = BTreeMap::new();
        for (name, inodes) in owned {
            let mut instance = self.instances.remove(&name).unwrap_or_default();
            let mut seen = HashMap::with_capacity(inodes.len());
            for inode in inodes {
                let Some(socket) = by_inode.get(&inode) else {
                    continue;
                };
                // A socket first seen counts from its start: its bytes are this instance's.
                let (acked_before, received_before) =
                    instance.sockets.get(&inode).copied().unwrap_or((0, 0));
                let sent = socket.bytes_acked.saturating_sub(acked_before);
                let received = socket.bytes_received.saturating_sub(received_before);
                let totals = &mut instance.totals;
                totals.sent_bytes = totals.sent_bytes.saturating_add(sent);
                totals.received_bytes = totals.received_bytes.saturating_add(received);
                if !self.in_site(socket.peer) {
                    totals.sent_out_of_site_bytes =
                        totals.sent_out_of_site_bytes.saturating_add(sent);
                }
                seen.insert(inode, (socket.bytes_acked, socket.bytes_received));
            }
            instance.sockets = seen;
            next.insert(name, instance);
        }
        self.instances = next;
    }

    /// Every instance's totals as they stand.
    pub fn totals(&self) -> impl Iterator<Item = (&VmName, TrafficTotals)> {
        self.instances.iter().map(|(n, i)| (n, i.totals))
    }
}

/// Which sockets each instance holds, listed from /proc again only when it may have
/// changed: the instances' processes changed, the kernel lists a socket it did not list the
/// round before (any process's), the last listing could not read an instance, or
/// [`RELIST_EVERY_ROUNDS`] rounds went by (a socket the kernel listed a moment before its
/// process held it, or one passed in from another process). Listing costs microseconds per
/// descriptor, and a VM's QEMU process holds dozens; a host whose connections last pays
/// mostly for the kernel's list.
#[derive(Debug, Default)]
pub struct SocketOwners {
    pids: Vec<(VmName, Vec<u32>)>,
    /// The inodes of the kernel's last list, sorted.
    listed: Vec<u32>,
    owned: Vec<(VmName, Vec<u32>)>,
    /// Some instance's processes could not be read at the last listing.
    incomplete: bool,
    rounds_since_listing: u32,
    listings: u64,
}

/// The most rounds between two listings of descriptors.
pub const RELIST_EVERY_ROUNDS: u32 = 30;

impl SocketOwners {
    /// Each instance's socket inodes, for the processes `pids` of each and the kernel's
    /// current `sockets`. An instance whose processes cannot be read is left out.
    pub fn owned(
        &mut self,
        mut pids: Vec<(VmName, Vec<u32>)>,
        sockets: &[TcpSocket],
    ) -> Vec<(VmName, Vec<u32>)> {
        // Runtimes list processes in no set order: compared sorted.
        for (_, p) in &mut pids {
            p.sort_unstable();
        }
        pids.sort();
        let mut listed: Vec<u32> = sockets.iter().map(|s| s.inode).collect();
        listed.sort_unstable();
        listed.dedup();
        let new_socket = listed
            .iter()
            .any(|inode| self.listed.binary_search(inode).is_err());
        self.rounds_since_listing += 1;
        if new_socket
            || pids != self.pids
            || self.incomplete
            || self.listings == 0
            || self.rounds_since_listing >= RELIST_EVERY_ROUNDS
        {
            self.owned = pids
                .iter()
                .filter_map(|(name, pids)| Some((name.clone(), socket_inodes(pids)?)))
                .collect();
            self.incomplete = self.owned.len() < pids.len();
            self.pids = pids;
            self.listings += 1;
            self.rounds_since_listing = 0;
        }
        self.listed = listed;
        self.owned.clone()
    }

    /// How many rounds listed descriptors.
    pub fn listings(&self) -> u64 {
        self.listings
    }
}

/// The socket inodes the processes `pids` hold, from `/proc/PID/fd`; `None` when no
/// process's descriptors can be read (gone, or hidden from this agent).
pub fn socket_inodes(pids: &[u32]) -> Option<Vec<u32>> {
    use rustix::fs::{Mode, OFlags};
    let mut out = Vec::new();
    let mut readable = false;
    for pid in pids {
        // Each link read relative to the open directory: no path walk through /proc per
        // descriptor.
        let Ok(dir) = rustix::fs::open(
            format!("/proc/{pid}/fd"),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            continue;
        };
        let Ok(entries) = rustix::fs::Dir::read_from(&dir) else {
            continue;
        };
        readable = true;
        let mut target = Vec::with_capacity(32);
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_bytes().first() == Some(&b'.') {
                continue;
            }
            // The link's text, not the open file: a stat would reach a disk image's file
            // system (NFS, FUSE) for every descriptor.
            let Ok(link) = rustix::fs::readlinkat(&dir, name, std::mem::take(&mut target)) else {
                continue;
            };
            if let Some(inode) = link
                .to_bytes()
                .strip_prefix(b"socket:[")
                .and_then(|t| t.strip_suffix(b"]"))
                .and_then(|t| std::str::from_utf8(t).ok())
                .and_then(|t| t.parse().ok())
            {
                out.push(inode);
            }
            target = link.into_bytes();
            target.clear();
        }
    }
    out.sort_unstable();
    out.dedup();
    readable.then_some(out)
}

/// Every process's children, from one walk of `/proc/*/stat`: for instances without a
/// cgroup of their own, whose processes only their parentage ties together. One walk serves
/// every instance of a round.
#[derive(Debug, Default)]
pub struct ProcessChildren(HashMap<u32, Vec<u32>>);

impl ProcessChildren {
    pub fn read() -> Self {
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                if let Some(ppid) = std::fs::read_to_string(entry.path().join("stat"))
                    .ok()
                    .and_then(|stat| parent_in_stat(&stat))
                {
                    children.entry(ppid).or_default().push(pid);
                }
            }
        }
        ProcessChildren(children)
    }

    /// `root` and every process descended from it.
    pub fn tree(&self, root: u32) -> Vec<u32> {
        let mut tree = vec![root];
        let mut seen = std::collections::HashSet::from([root]);
        let mut i = 0;
        while i < tree.len() {
            for &child in self.0.get(&tree[i]).into_iter().flatten() {
                // A pid listed under two parents (reused mid-walk) is taken once.
                if seen.insert(child) {
                    tree.push(child);
                }
            }
            i += 1;
        }
        tree
    }
}

/// The parent pid in `/proc/PID/stat` (the field after the state, past the command name,
/// which may hold spaces and parentheses).
fn parent_in_stat(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_contain() {
        let lan: Network = "10.1.0.0/16".parse().unwrap();
        assert!(lan.contains(ip("10.1.200.3")));
        assert!(!lan.contains(ip("10.2.0.1")));
        // An IPv4-mapped IPv6 peer is its IPv4 address.
        assert!(lan.contains(ip("::ffff:10.1.0.9")));
        let one: Network = "192.0.2.7".parse().unwrap();
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));
        let v6: Network = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("10.1.0.1")));
        let all: Network = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.5")));
        for bad in ["10.1.0.0/33", "lan", "10.1.0.0/", "::/129", ""] {
            let err = bad.parse::<Network>().unwrap_err();
            assert!(err.to_string().contains("is not a network"), "{err}");
        }
    }

    fn socket(inode: u32, peer: &str, acked: u64, received: u64) -> TcpSocket {
        TcpSocket {
            inode,
            peer: ip(peer),
            bytes_acked: acked,
            bytes_received: received,
        }
    }

    #[test]
    fn traffic_adds_up_by_socket_and_splits_at_the_site() {
        let web = VmName::new("web").unwrap();
        let mut meter = TrafficMeter::new(vec!["10.1.0.0/16".parse().unwrap()]);
        assert!(!meter.knows_site());
        meter.set_site_hosts(vec![ip("192.0.2.10")]);
        assert!(meter.knows_site());
        let owned = |inodes: &[u32]| vec![(web.clone(), inodes.to_vec())];
        // To the site's network, to a host of the site, to elsewhere, to itself; a socket
        // that is not the instance's does not count.
        meter.account(
            owned(&[1, 2, 3, 4]),
            &[
                socket(1, "10.1.4.4", 100, 1),
                socket(2, "192.0.2.10", 200, 2),
                socket(3, "198.51.100.1", 300, 3),
                socket(4, "127.0.0.1", 400, 4),
                socket(5, "198.51.100.1", 9000, 9),
            ],
        );
        let totals = |m: &TrafficMeter| m.totals().map(|(_, t)| t).next().unwrap();
        assert_eq!(
            totals(&meter),
            TrafficTotals {
                sent_bytes: 1000,
                received_bytes: 10,
                sent_out_of_site_bytes: 300,
            }
        );
        // Growth counts once; a closed socket keeps what it added; a new one counts whole.
        meter.account(
            owned(&[1, 3, 6]),
            &[
                socket(1, "10.1.4.4", 150, 1),
                socket(3, "198.51.100.1", 310, 3),
                socket(6, "203.0.113.9", 40, 0),
            ],
        );
        assert_eq!(
            totals(&meter),
            TrafficTotals {
                sent_bytes: 1100,
                received_bytes: 10,
                sent_out_of_site_bytes: 350,
            }
        );
        // A host that leaves the site: its traffic leaves the site from now on.
        meter.set_site_hosts(Vec::new());
        meter.account(
            owned(&[1, 2]),
            &[
                socket(1, "10.1.4.4", 150, 1),
                socket(2, "192.0.2.10", 250, 2),
            ],
        );
        assert_eq!(totals(&meter).sent_out_of_site_bytes, 350 + 250);
        // An instance that stops is forgotten: it counts from zero when it runs again.
        meter.account(Vec::new(), &[]);
        assert_eq!(meter.totals().count(), 0);
    }

    #[test]
    fn descriptors_are_listed_again_only_when_a_socket_is_new() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let connect = || {
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            (client, server)
        };
        let me = vec![(VmName::new("me").unwrap(), vec![std::process::id()])];
        let listed = |inodes: &[u32]| -> Vec<TcpSocket> {
            inodes
                .iter()
                .map(|&inode| TcpSocket {
                    inode,
                    peer: ip("127.0.0.1"),
                    bytes_acked: 0,
                    bytes_received: 0,
                })
                .collect()
        };
        // This test's own sockets, whatever other tests of this process open meanwhile.
        let inodes_of = |(client, server): &(std::net::TcpStream, std::net::TcpStream)| {
            [client, server].map(|s| rustix::fs::fstat(s).unwrap().st_ino as u32)
        };
        let first = connect();
        let first_inodes = inodes_of(&first);
        let mut owners = SocketOwners::default();
        let owned = owners.owned(me.clone(), &listed(&first_inodes));
        assert!(first_inodes.iter().all(|i| owned[0].1.contains(i)));
        assert_eq!(owners.listings(), 1);
        // Nothing new in the kernel's list: the descriptors are not read again, so a socket
        // made meanwhile is not seen yet.
        let second = connect();
        let second_inodes = inodes_of(&second);
        let again = owners.owned(me.clone(), &listed(&first_inodes));
        assert_eq!(again, owned);
        assert_eq!(owners.listings(), 1);
        assert!(!second_inodes.iter().any(|i| again[0].1.contains(i)));
        // Once the kernel lists it, it is.
        let both = [first_inodes, second_inodes].concat();
        let owned = owners.owned(me.clone(), &listed(&both));
        assert_eq!(owners.listings(), 2);
        assert!(second_inodes.iter().all(|i| owned[0].1.contains(i)));
        // A while later they are listed again, even with nothing new.
        for _ in 1..RELIST_EVERY_ROUNDS {
            owners.owned(me.clone(), &listed(&both));
        }
        assert_eq!(owners.listings(), 2);
        owners.owned(me.clone(), &listed(&both));
        assert_eq!(owners.listings(), 3);
        // An instance whose processes cannot be read: tried again the next round.
        let gone = vec![(VmName::new("gone").unwrap(), vec![u32::MAX])];
        assert!(owners.owned(gone.clone(), &listed(&both)).is_empty());
        assert_eq!(owners.listings(), 4);
        assert!(owners.owned(gone, &listed(&both)).is_empty());
        assert_eq!(owners.listings(), 5);
        drop((first, second));
    }

    #[test]
    fn a_process_tree_holds_its_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let tree = ProcessChildren::read().tree(std::process::id());
        assert!(tree.contains(&std::process::id()) && tree.contains(&child.id()));
        let _ = child.kill();
        let _ = child.wait();
        // Grandchildren too, and each process once even if the map has a cycle.
        let map = ProcessChildren(HashMap::from([
            (1, vec![2, 3]),
            (3, vec![4, 1]),
            (4, vec![3]),
        ]));
        assert_eq!(map.tree(1), vec![1, 2, 3, 4]);
        assert_eq!(map.tree(9), vec![9]);
        assert_eq!(parent_in_stat("7 (a) b) S 42 7 7"), Some(42));
        assert_eq!(parent_in_stat("garbage"), None);
        assert_eq!(socket_inodes(&[u32::MAX]), None);
    }
}
