//! The resolver each service network has on every host of it: it answers `APP.SERVICE.dunes`
//! with the addresses of the application's ready instances and `INDEX.APP.SERVICE.dunes` with
//! one instance's, from the names the console last sent, with a short time to live so that
//! readiness shows within seconds. Messages are read and written by hickory-proto; a name
//! outside `dunes.` is refused (the instance's other resolvers answer it).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, ResponseCode},
    rr::{DNSClass, Name, RData, Record, RecordType, rdata::A, rdata::SOA},
};
use tokio::net::UdpSocket;

/// Seconds a client may keep an answer: readiness changes show within this.
pub const TTL_SECS: u32 = 5;
/// The largest answer sent over UDP to a client that says nothing of its size.
const PLAIN_UDP_BYTES: usize = 512;
/// The largest answer sent over UDP at all (the DNS flag day's figure).
const EDNS_UDP_BYTES: u16 = 1232;

/// The names of the `dunes.` zone and their addresses, shared by a network's resolvers
/// and replaced whole when the console sends new ones.
#[derive(Debug, Clone, Default)]
pub struct Names(Arc<RwLock<BTreeMap<Name, Vec<Ipv4Addr>>>>);

impl Names {
    /// Replaces every name: `names` as `web.shop.dunes` (without the final dot), any case.
    /// A name that does not read, or lies outside `dunes.`, is left out.
    pub fn replace(&self, names: impl IntoIterator<Item = (String, Vec<Ipv4Addr>)>) {
        let apex = apex();
        let table = names
            .into_iter()
            .filter_map(|(name, addresses)| {
                let mut name = Name::from_ascii(&name).ok()?.to_lowercase();
                name.set_fqdn(true);
                apex.zone_of(&name).then_some((name, addresses))
            })
            .collect();
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = table;
    }

    /// The answer to one DNS message, or nothing for what is no question (a response, or
    /// bytes that do not read). `udp`: the answer is cut to what the client can take, and
    /// says it was cut (TC), so that it asks again over TCP.
    pub fn answer(&self, packet: &[u8], udp: bool) -> Option<Vec<u8>> {
        let request = Message::from_vec(packet).ok()?;
        if request.message_type != MessageType::Query {
            return None;
        }
        let mut response = Message::response(request.id, request.op_code);
        response.metadata.recursion_desired = request.recursion_desired;
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_UDP_BYTES);
            response.edns = Some(edns);
        }
        let query = match (request.op_code, request.queries.as_slice()) {
            (OpCode::Query, [query]) => query,
            (OpCode::Query, _) => {
                response.metadata.response_code = ResponseCode::FormErr;
                return response.to_vec().ok();
            }
            _ => {
                response.metadata.response_code = ResponseCode::NotImp;
                return response.to_vec().ok();
            }
        };
        response.add_query(query.clone());
        let apex = apex();
        if query.query_class != DNSClass::IN || !apex.zone_of(&query.name) {
            response.metadata.response_code = ResponseCode::Refused;
            return response.to_vec().ok();
        }
        response.metadata.authoritative = true;
        let table = self.0.read().unwrap_or_else(|p| p.into_inner());
        let mut wanted = query.name.to_lowercase();
        wanted.set_fqdn(true);
        match table.get(&wanted) {
            Some(addresses) if query.query_type == RecordType::A => {
                response.add_answers(
                    addresses.iter().map(|ip| {
                        Record::from_rdata(query.name.clone(), TTL_SECS, RData::A(A(*ip)))
                    }),
                );
            }
            // A name that exists without an address of that type (AAAA), or one with names
            // below it (`shop.dunes`): no data, but no error, or resolvers would take the
            // names below for missing too.
            _ if wanted == apex || table.keys().any(|k| wanted.zone_of(k)) => {}
            _ => response.metadata.response_code = ResponseCode::NXDomain,
        }
        drop(table);
        if response.answers.is_empty() {
            response.add_authority(soa(&apex));
        }
        let bytes = response.to_vec().ok()?;
        let limit = if request.edns.is_some() {
            usize::from(request.max_payload().min(EDNS_UDP_BYTES))
        } else {
            PLAIN_UDP_BYTES
        };
        if udp && bytes.len() > limit {
            response.truncate().to_vec().ok()
        } else {
            Some(bytes)
        }
    }
}

fn apex() -> Name {
    let mut apex =
        Name::from_ascii(dunes_shared::network::DNS_DOMAIN).unwrap_or_else(|_| Name::root());
    apex.set_fqdn(true);
    apex
}

/// The zone's start of authority: its negative answers are kept as briefly as its others.
fn soa(apex: &Name) -> Record {
    let named = |label: &str| {
        Name::from_ascii(label)
            .and_then(|n| n.append_domain(apex))
            .unwrap_or_else(|_| apex.clone())
    };
    Record::from_rdata(
        apex.clone(),
        TTL_SECS,
        RData::SOA(SOA::new(
            named("ns"),
            named("hostmaster"),
            1,
            60,
            60,
            600,
            TTL_SECS,
        )),
    )
}

/// Answers on `socket` until it fails.
pub async fn serve_udp(socket: UdpSocket, names: Names) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, from): (usize, SocketAddr) = socket.recv_from(&mut buf).await?;
        if let Some(answer) = names.answer(&buf[..len], true) {
            // A client gone before its answer is no failure of the resolver.
            let _ = socket.send_to(&answer, from).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;

    use super::*;

    fn ask(names: &Names, name: &str, kind: RecordType) -> Message {
        let mut query = Message::query();
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        let answer = names.answer(&query.to_vec().unwrap(), true).unwrap();
        let answer = Message::from_vec(&answer).unwrap();
        assert_eq!(answer.id, query.id);
        answer
    }

    fn addresses(answer: &Message) -> Vec<Ipv4Addr> {
        answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(A(ip)) => Some(*ip),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn names_are_answered_from_the_table_any_case() {
        let names = Names::default();
        let web = vec![Ipv4Addr::new(10, 200, 0, 3), Ipv4Addr::new(10, 200, 0, 4)];
        names.replace([
            ("web.shop.dunes".to_string(), web.clone()),
            ("0.web.shop.dunes".to_string(), web[..1].to_vec()),
            ("elsewhere.example".to_string(), web.clone()),
        ]);
        let answer = ask(&names, "WEB.shop.dunes.", RecordType::A);
        assert_eq!(answer.response_code, ResponseCode::NoError);
        assert!(answer.authoritative);
        assert_eq!(addresses(&answer), web);
        assert!(answer.answers.iter().all(|r| r.ttl == TTL_SECS));
        assert_eq!(
            addresses(&ask(&names, "0.web.shop.dunes.", RecordType::A)),
            web[..1]
        );
        let zero = ask(&names, "0.web.shop.dunes.", RecordType::AAAA);
        assert_eq!(zero.response_code, ResponseCode::NoError);
        // No IPv6 address, and names above others: no data, no error.
        for (name, kind) in [
            ("web.shop.dunes.", RecordType::AAAA),
            ("shop.dunes.", RecordType::A),
            ("dunes.", RecordType::A),
        ] {
            let answer = ask(&names, name, kind);
            assert_eq!(answer.response_code, ResponseCode::NoError, "{name}");
            assert!(answer.answers.is_empty(), "{name}");
            assert_eq!(answer.authorities.len(), 1, "{name}: the SOA");
        }
        assert_eq!(
            ask(&names, "db.shop.dunes.", RecordType::A).response_code,
            ResponseCode::NXDomain
        );
        // Outside the zone: refused, whatever the table held.
        assert_eq!(
            ask(&names, "elsewhere.example.", RecordType::A).response_code,
            ResponseCode::Refused
        );
        // Replaced whole: a name gone is gone.
        names.replace([("web.shop.dunes".to_string(), web[1..].to_vec())]);
        assert_eq!(
            ask(&names, "0.web.shop.dunes.", RecordType::A).response_code,
            ResponseCode::NXDomain
        );
    }

    #[test]
    fn what_is_no_question_gets_no_answer() {
        let names = Names::default();
        assert_eq!(names.answer(b"\x00\x01garbage", true), None);
        let mut response = Message::response(7, OpCode::Query);
        response.add_query(Query::query(
            Name::from_ascii("web.shop.dunes.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(names.answer(&response.to_vec().unwrap(), true), None);
    }

    #[test]
    fn a_long_answer_over_udp_says_it_was_cut() {
        let names = Names::default();
        let many: Vec<Ipv4Addr> = (0..100).map(|i| Ipv4Addr::new(10, 200, 0, i)).collect();
        names.replace([("web.shop.dunes".to_string(), many.clone())]);
        let mut query = Message::query();
        query.add_query(Query::query(
            Name::from_ascii("web.shop.dunes.").unwrap(),
            RecordType::A,
        ));
        let cut =
            Message::from_vec(&names.answer(&query.to_vec().unwrap(), true).unwrap()).unwrap();
        assert!(cut.truncation);
        let whole =
            Message::from_vec(&names.answer(&query.to_vec().unwrap(), false).unwrap()).unwrap();
        assert_eq!(addresses(&whole), many);
    }
}
