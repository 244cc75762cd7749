//! Which traffic leaves a site: each online agent that can tell is told the addresses of its
//! site's hosts, as this console reaches them, whenever they change; the agent counts what
//! its process instances and user-network VMs send anywhere else as leaving the site.

use std::{
    collections::BTreeMap,
    hash::{Hash, Hasher},
    net::IpAddr,
    sync::Arc,
};

use dunes_shared::{
    error_chain,
    protocol::{SiteAddresses, features},
};

use crate::engine::actor::{Actor, Internal};

/// One site's host addresses, sorted and without repeats, and a digest of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteAddressList {
    pub addresses: Arc<Vec<String>>,
    pub digest: u64,
}

/// Each site's host addresses, from every host's site and address: built once per round, so
/// that a round costs in proportion to the hosts, however large one site is.
pub fn site_address_lists<'a>(
    hosts: impl IntoIterator<Item = (&'a str, Option<IpAddr>)>,
) -> BTreeMap<&'a str, SiteAddressList> {
    let mut by_site: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (site, ip) in hosts {
        let list = by_site.entry(site).or_default();
        if let Some(ip) = ip {
            list.push(ip.to_string());
        }
    }
    by_site
        .into_iter()
        .map(|(site, mut addresses)| {
            addresses.sort();
            addresses.dedup();
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            addresses.hash(&mut hasher);
            let list = SiteAddressList {
                addresses: Arc::new(addresses),
                digest: hasher.finish(),
            };
            (site, list)
        })
        .collect()
}

impl Actor {
    /// Tells every online agent whose site's addresses changed since it was last told.
    pub(in crate::engine) fn tell_site_addresses(&mut self) {
        let hosts: Vec<(String, Option<IpAddr>)> = self
            .fleet
            .hosts
            .values()
            .filter_map(|entry| {
                let site = entry.view.inventory()?.site.name.to_string();
                Some((site, entry.reached_at()))
            })
            .collect();
        let lists = site_address_lists(hosts.iter().map(|(site, ip)| (site.as_str(), *ip)));
        for (id, entry) in &mut self.fleet.hosts {
            let Some(peer) = entry.peer.clone() else {
                continue;
            };
            if !peer.offers(features::SITE_TRAFFIC) {
                continue;
            }
            let Some(list) = entry
                .view
                .inventory()
                .and_then(|i| lists.get(i.site.name.as_str()))
            else {
                continue;
            };
            if entry.site_addresses_told == Some(list.digest) {
                continue;
            }
            // Marked told now, so that the next tick does not send it again meanwhile; a
            // failure clears the mark and the tick after tries again.
            entry.site_addresses_told = Some(list.digest);
            let digest = list.digest;
            let addresses = list.addresses.clone();
            let internal = self.internal_tx.clone();
            let host = id.clone();
            let stable_id = peer.conn.stable_id();
            tokio::spawn(async move {
                let result = peer
                    .call(SiteAddresses {
                        addresses: addresses.as_ref().clone(),
                    })
                    .await;
                let Err(e) = result else {
                    return;
                };
                let refused = Internal::SiteAddressesRefused {
                    host,
                    stable_id,
                    digest,
                    reason: error_chain(&e),
                };
                let _ = internal.send(refused).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_site_gets_one_sorted_list_of_its_hosts() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let hosts = [
            ("lausanne", ip("10.1.0.12")),
            ("lausanne", ip("10.1.0.11")),
            ("lausanne", None),
            ("lausanne", ip("10.1.0.12")),
            ("geneva", ip("10.2.0.11")),
            ("zurich", None),
        ];
        let lists = site_address_lists(hosts);
        assert_eq!(
            *lists["lausanne"].addresses,
            vec!["10.1.0.11".to_string(), "10.1.0.12".to_string()]
        );
        assert_eq!(*lists["geneva"].addresses, vec!["10.2.0.11".to_string()]);
        assert!(lists["zurich"].addresses.is_empty());
        assert_ne!(lists["lausanne"].digest, lists["geneva"].digest);
        // The same hosts in another order digest the same; one more host changes the digest.
        let again =
            site_address_lists([("lausanne", ip("10.1.0.11")), ("lausanne", ip("10.1.0.12"))]);
        assert_eq!(again["lausanne"], lists["lausanne"]);
        let more = site_address_lists([
            ("lausanne", ip("10.1.0.11")),
            ("lausanne", ip("10.1.0.12")),
            ("lausanne", ip("10.1.0.13")),
        ]);
        assert_ne!(more["lausanne"].digest, lists["lausanne"].digest);
    }
}
