//! Which traffic leaves a site: each online agent that can tell is told the addresses of its
//! site's other hosts, as this console reaches them, whenever they change; the agent counts
//! what its process instances send anywhere else as leaving the site.

use std::{collections::BTreeMap, net::IpAddr};

use dunes_shared::{
    error_chain,
    model::HostId,
    protocol::{SiteAddresses, features},
};

use super::actor::{Actor, Internal};

/// The addresses of `host`'s site's other hosts, sorted, from every host's site and address.
pub fn site_addresses_of(
    hosts: &BTreeMap<HostId, (String, Option<IpAddr>)>,
    host: &HostId,
) -> Vec<String> {
    let Some((site, _)) = hosts.get(host) else {
        return Vec::new();
    };
    let mut out: Vec<String> = hosts
        .iter()
        .filter(|(id, (s, _))| *id != host && s == site)
        .filter_map(|(_, (_, ip))| ip.map(|ip| ip.to_string()))
        .collect();
    out.sort();
    out.dedup();
    out
}

impl Actor {
    /// Tells every online agent whose site's addresses changed since it was last told.
    pub(super) fn tell_site_addresses(&mut self) {
        // A host's address: where its live connection comes from, else its recorded
        // address when that is a literal one.
        let hosts: BTreeMap<HostId, (String, Option<IpAddr>)> = self
            .hosts
            .iter()
            .filter_map(|(id, entry)| {
                let site = entry.view.inventory()?.site.name.to_string();
                let ip = entry
                    .peer
                    .as_ref()
                    .map(|p| p.conn.remote_address().ip().to_canonical())
                    .or_else(|| {
                        entry
                            .view
                            .record
                            .address
                            .parse::<std::net::SocketAddr>()
                            .ok()
                            .map(|a| a.ip().to_canonical())
                    });
                Some((id.clone(), (site, ip)))
            })
            .collect();
        for (id, entry) in &mut self.hosts {
            let Some(peer) = entry.peer.clone() else {
                continue;
            };
            if !peer.offers(features::SITE_TRAFFIC) {
                continue;
            }
            let addresses = site_addresses_of(&hosts, id);
            if entry.site_addresses_told.as_ref() == Some(&addresses) {
                continue;
            }
            // Marked told now, so that the next tick does not send it again meanwhile; a
            // failure clears the mark and the tick after tries again.
            entry.site_addresses_told = Some(addresses.clone());
            let internal = self.internal_tx.clone();
            let host = id.clone();
            let stable_id = peer.conn.stable_id();
            tokio::spawn(async move {
                let result = peer
                    .call(SiteAddresses {
                        addresses: addresses.clone(),
                    })
                    .await;
                let Err(e) = result else {
                    return;
                };
                let reason = error_chain(&e);
                let done = move |actor: &mut Actor| {
                    let Some(entry) = actor.hosts.get_mut(&host) else {
                        return;
                    };
                    let same_link = entry
                        .peer
                        .as_ref()
                        .is_some_and(|p| p.conn.stable_id() == stable_id);
                    if same_link && entry.site_addresses_told.as_ref() == Some(&addresses) {
                        entry.site_addresses_told = None;
                        tracing::debug!("{host}: site addresses not taken: {reason}");
                    }
                };
                let _ = internal.send(Internal::CallDone(Box::new(done))).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_told_its_sites_other_hosts() {
        let id = |s: &str| HostId::new(s).unwrap();
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let hosts: BTreeMap<HostId, (String, Option<IpAddr>)> = [
            (id("lsn-1"), ("lausanne".to_string(), ip("10.1.0.11"))),
            (id("lsn-2"), ("lausanne".to_string(), ip("10.1.0.12"))),
            (id("lsn-3"), ("lausanne".to_string(), None)),
            (id("lsn-4"), ("lausanne".to_string(), ip("10.1.0.12"))),
            (id("gva-1"), ("geneva".to_string(), ip("10.2.0.11"))),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            site_addresses_of(&hosts, &id("lsn-1")),
            vec!["10.1.0.12".to_string()]
        );
        assert_eq!(
            site_addresses_of(&hosts, &id("lsn-2")),
            vec!["10.1.0.11".to_string(), "10.1.0.12".to_string()]
        );
        assert!(site_addresses_of(&hosts, &id("gva-1")).is_empty());
        assert!(site_addresses_of(&hosts, &id("nowhere")).is_empty());
    }
}
