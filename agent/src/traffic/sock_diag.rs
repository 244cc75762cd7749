//! The TCP sockets of this network namespace with their byte counters, from the kernel's
//! sock_diag netlink interface (what `ss -ti` reads): each socket's inode (to find its
//! process), its peer, and from its `tcp_info` the bytes the peer acknowledged and the bytes
//! received.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use rustix::net::{
    AddressFamily, RecvFlags, SendFlags, SocketType, netlink, recv, sendto, socket,
    sockopt::{Timeout, set_socket_timeout},
};

/// One TCP socket as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    pub inode: u32,
    pub peer: IpAddr,
    /// Bytes sent and acknowledged by the peer (`tcpi_bytes_acked`).
    pub bytes_acked: u64,
    /// Bytes received (`tcpi_bytes_received`).
    pub bytes_received: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("the kernel's socket diagnostics cannot be opened")]
    Open(#[source] std::io::Error),
    #[error("the socket dump failed")]
    Io(#[source] std::io::Error),
    #[error("the kernel refused the socket dump (errno {0})")]
    Refused(i32),
    #[error("the kernel's answer does not parse")]
    Malformed,
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const INET_DIAG_INFO: u16 = 2;
const IPPROTO_TCP: u8 = 6;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// Every state but LISTEN (10), TIME_WAIT (6) and CLOSE (7): those carry no one's bytes.
const STATES: u32 = !((1 << 10) | (1 << 6) | (1 << 7));
const HEADER_BYTES: usize = 16;
/// `struct inet_diag_msg`.
const DIAG_MSG_BYTES: usize = 72;
/// Where `tcpi_bytes_acked` and `tcpi_bytes_received` sit in `struct tcp_info` (Linux 4.1+).
const BYTES_ACKED_AT: usize = 120;
const BYTES_RECEIVED_AT: usize = 128;
/// A dump that stalls this long is given up.
const RECV_TIMEOUT: Duration = Duration::from_secs(2);

/// Every TCP socket of this network namespace that holds a connection, IPv4 and IPv6.
pub fn tcp_sockets() -> Result<Vec<TcpSocket>, SockDiagError> {
    let fd = socket(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        Some(netlink::SOCK_DIAG),
    )
    .map_err(|e| SockDiagError::Open(e.into()))?;
    set_socket_timeout(&fd, Timeout::Recv, Some(RECV_TIMEOUT))
        .map_err(|e| SockDiagError::Open(e.into()))?;
    let kernel = netlink::SocketAddrNetlink::new(0, 0);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for (seq, family) in [(1, AF_INET), (2, AF_INET6)] {
        sendto(&fd, &dump_request(family, seq), SendFlags::empty(), &kernel)
            .map_err(|e| SockDiagError::Io(e.into()))?;
        loop {
            let (read, _) = recv(&fd, &mut buf[..], RecvFlags::empty())
                .map_err(|e| SockDiagError::Io(e.into()))?;
            // An empty datagram would repeat forever: the kernel never sends one.
            if read == 0 {
                return Err(SockDiagError::Malformed);
            }
            if parse_messages(&buf[..read], &mut out)? {
                break;
            }
        }
    }
    Ok(out)
}

/// A dump request for the TCP sockets of `family`, with their `tcp_info`.
fn dump_request(family: u8, seq: u32) -> Vec<u8> {
    let len = HEADER_BYTES + 56;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // struct inet_diag_req_v2: family, protocol, extensions wanted, pad, states, and a
    // socket id of zeros (any socket).
    m.extend_from_slice(&[family, IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0]);
    m.extend_from_slice(&STATES.to_ne_bytes());
    m.resize(len, 0);
    m
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Adds the sockets of one datagram of a dump to `out`; true once the dump is done.
pub fn parse_messages(buf: &[u8], out: &mut Vec<TcpSocket>) -> Result<bool, SockDiagError> {
    let mut at = 0;
    while at + HEADER_BYTES <= buf.len() {
        let len = u32_at(buf, at).ok_or(SockDiagError::Malformed)? as usize;
        let kind = u16_at(buf, at + 4).ok_or(SockDiagError::Malformed)?;
        if len < HEADER_BYTES || at + len > buf.len() {
            return Err(SockDiagError::Malformed);
        }
        let body = &buf[at + HEADER_BYTES..at + len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = u32_at(body, 0).ok_or(SockDiagError::Malformed)? as i32;
                return if code == 0 {
                    Ok(true)
                } else {
                    Err(SockDiagError::Refused(code.wrapping_neg()))
                };
            }
            SOCK_DIAG_BY_FAMILY => out.extend(parse_socket(body)),
            _ => {}
        }
        at += align4(len);
    }
    Ok(false)
}

/// One `inet_diag_msg` and its attributes; `None` for a socket with no inode (no process
/// holds it) or no `tcp_info`.
fn parse_socket(body: &[u8]) -> Option<TcpSocket> {
    if body.len() < DIAG_MSG_BYTES {
        return None;
    }
    // family(1) state(1) timer(1) retrans(1), then the socket id: sport(2) dport(2)
    // src(16) dst(16) if(4) cookie(8), then expires rqueue wqueue uid inode (4 each).
    let dst = &body[24..40];
    let peer = match body[0] {
        AF_INET => IpAddr::V4(Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3])),
        AF_INET6 => {
            let octets: [u8; 16] = dst.try_into().ok()?;
            IpAddr::V6(Ipv6Addr::from(octets)).to_canonical()
        }
        _ => return None,
    };
    let inode = u32_at(body, 68)?;
    if inode == 0 {
        return None;
    }
    let mut at = DIAG_MSG_BYTES;
    while at + 4 <= body.len() {
        let len = usize::from(u16_at(body, at)?);
        let kind = u16_at(body, at + 2)?;
        if len < 4 || at + len > body.len() {
            return None;
        }
        if kind == INET_DIAG_INFO {
            let info = &body[at + 4..at + len];
            return Some(TcpSocket {
                inode,
                peer,
                bytes_acked: u64_at(info, BYTES_ACKED_AT)?,
                bytes_received: u64_at(info, BYTES_RECEIVED_AT)?,
            });
        }
        at += align4(len);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dump message for one socket, as the kernel writes it.
    fn message(family: u8, peer: &[u8], inode: u32, acked: u64, received: u64) -> Vec<u8> {
        let mut body = vec![0u8; DIAG_MSG_BYTES];
        body[0] = family;
        body[24..24 + peer.len()].copy_from_slice(peer);
        body[68..72].copy_from_slice(&inode.to_ne_bytes());
        let mut info = vec![0u8; 232];
        info[BYTES_ACKED_AT..BYTES_ACKED_AT + 8].copy_from_slice(&acked.to_ne_bytes());
        info[BYTES_RECEIVED_AT..BYTES_RECEIVED_AT + 8].copy_from_slice(&received.to_ne_bytes());
        // Another attribute first: it is skipped.
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&1u16.to_ne_bytes());
        body.extend_from_slice(&[0; 4]);
        body.extend_from_slice(&((4 + info.len()) as u16).to_ne_bytes());
        body.extend_from_slice(&INET_DIAG_INFO.to_ne_bytes());
        body.extend_from_slice(&info);
        let mut m = Vec::new();
        m.extend_from_slice(&((HEADER_BYTES + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn a_dump_parses_into_sockets() {
        let mut buf = message(AF_INET, &[10, 1, 0, 12], 77, 1000, 20);
        let mut mapped = [0u8; 16];
        mapped[10..12].copy_from_slice(&[0xff, 0xff]);
        mapped[12..].copy_from_slice(&[192, 0, 2, 1]);
        buf.extend(message(AF_INET6, &mapped, 78, 5, 6));
        // A socket no process holds is left out.
        buf.extend(message(AF_INET, &[10, 1, 0, 13], 0, 9, 9));
        let mut out = Vec::new();
        assert!(!parse_messages(&buf, &mut out).unwrap());
        assert_eq!(
            out,
            vec![
                TcpSocket {
                    inode: 77,
                    peer: "10.1.0.12".parse().unwrap(),
                    bytes_acked: 1000,
                    bytes_received: 20,
                },
                // A v4-mapped IPv6 peer reads as its IPv4 address.
                TcpSocket {
                    inode: 78,
                    peer: "192.0.2.1".parse().unwrap(),
                    bytes_acked: 5,
                    bytes_received: 6,
                },
            ]
        );
        let mut done = 20u32.to_ne_bytes().to_vec();
        done.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        done.resize(20, 0);
        assert!(parse_messages(&done, &mut out).unwrap());
        // A length running past the datagram is an error, never a panic.
        let mut bad = buf.clone();
        bad[0..4].copy_from_slice(&10_000u32.to_ne_bytes());
        assert!(matches!(
            parse_messages(&bad, &mut Vec::new()),
            Err(SockDiagError::Malformed)
        ));
        for cut in 0..buf.len() {
            let _ = parse_messages(&buf[..cut], &mut Vec::new());
        }
    }

    /// The kernel's real answer: a connection this test makes is in it, with its bytes.
    #[test]
    fn the_kernel_lists_a_connection_with_its_bytes() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(&[7u8; 100_000]).unwrap();
        let mut got = vec![0u8; 100_000];
        server.read_exact(&mut got).unwrap();
        let inodes = crate::traffic::socket_inodes(&[std::process::id()]).unwrap();
        // The last acknowledgement may still be on its way: look again for a while.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mine: Vec<TcpSocket> = tcp_sockets()
                .unwrap()
                .into_iter()
                .filter(|s| inodes.contains(&s.inode))
                .collect();
            let sent = mine
                .iter()
                .any(|s| s.bytes_acked >= 100_000 && s.peer.is_loopback());
            let received = mine.iter().any(|s| s.bytes_received >= 100_000);
            if sent && received {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{mine:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        drop((client, server));
    }
}
