//! Networks in the engine: chosen when a service is defined (and written with it), dropped
//! when no service is on them any more, and an address handed to each instance deployed.

use std::{collections::BTreeSet, net::Ipv4Addr};

use dunes_shared::{
    model::{NetworkName, ServiceName},
    network::mac_of,
    service::ServiceSpec,
};

use std::hash::{Hash, Hasher};

use dunes_shared::{error_chain, protocol::features};

use crate::engine::{
    EngineError,
    actor::{Actor, Internal},
    networks::{
        hosts::{HostFacts, host_descriptions, network_hosts},
        plan::{
            DefinedService, NetworkChoice, choose_network, free_address, free_address_from_top,
            network_name,
        },
    },
    records::{InstanceAddress, InstanceKey, now_ms},
};

impl Actor {
    /// What defining `spec` does to the networks, checked against every other service.
    pub(in crate::engine) fn network_for(
        &self,
        spec: &ServiceSpec,
    ) -> Result<NetworkChoice, EngineError> {
        let specs: Vec<(&ServiceName, &ServiceSpec)> = self
            .services
            .entries
            .iter()
            .filter_map(|(name, e)| Some((name, e.spec.as_ref().ok()?)))
            .collect();
        let this = specs
            .iter()
            .find(|(name, _)| **name == spec.name)
            .map(|&(name, spec)| self.defined(name, spec));
        let others: Vec<DefinedService> = specs
            .iter()
            .filter(|(name, _)| **name != spec.name)
            .map(|&(name, spec)| self.defined(name, spec))
            .collect();
        choose_network(
            spec,
            this.as_ref(),
            &others,
            &self.networks.records,
            |host| {
                self.fleet
                    .hosts
                    .get(host)
                    .and_then(|h| h.view.inventory())
                    .map(|i| i.site.name.clone())
            },
            now_ms(),
        )
        .map_err(EngineError::Invalid)
    }

    fn defined<'a>(&self, name: &'a ServiceName, spec: &'a ServiceSpec) -> DefinedService<'a> {
        DefinedService {
            name,
            network: spec.network.as_ref(),
            network_name: network_name(spec),
            has_instances: self.services.instances.values().any(|i| &i.service == name),
        }
    }

    /// Keeps a network made for a service being defined; written in the definition's batch.
    pub(in crate::engine) fn keep_network(&mut self, choice: NetworkChoice) {
        if let NetworkChoice::Create(record) = choice {
            self.store.put_network(&record);
            self.networks.records.insert(record.name.clone(), record);
            self.networks.dirty = true;
        }
    }

    /// Drops the networks no defined service is on any more.
    pub(in crate::engine) fn forget_unused_networks(&mut self) {
        let used: BTreeSet<NetworkName> = self
            .services
            .entries
            .values()
            .filter_map(|e| network_name(e.spec.as_ref().ok()?))
            .collect();
        let unused: Vec<NetworkName> = self
            .networks
            .records
            .keys()
            .filter(|n| !used.contains(*n))
            .cloned()
            .collect();
        for name in unused {
            self.store.delete_network(&name);
            self.networks.records.remove(&name);
            self.networks.dirty = true;
        }
    }

    /// An instance's NIC on its network, as its agent sets it up.
    pub(in crate::engine) fn instance_nic(
        &self,
        address: &InstanceAddress,
    ) -> Option<dunes_shared::network::InstanceNic> {
        let record = self.networks.records.get(&address.network)?;
        Some(dunes_shared::network::InstanceNic {
            network: address.network.clone(),
            vni: record.vni,
            address: address.ip,
            prefix_len: record.subnet.prefix_len(),
            mac: address.mac.clone(),
            gateway: dunes_shared::network::gateway(record.subnet),
            mtu: crate::engine::networks::hosts::NETWORK_MTU,
            search: self.search_domains(&address.network),
        })
    }

    /// The domains a short name is looked up in, on `network`: each of its services'.
    fn search_domains(&self, network: &NetworkName) -> Vec<String> {
        self.services
            .entries
            .values()
            .filter_map(|e| {
                let spec = e.spec.as_ref().ok()?;
                (network_name(spec).as_ref() == Some(network))
                    .then(|| format!("{}.{}", spec.name, dunes_shared::network::DNS_DOMAIN))
            })
            .collect()
    }

    /// Refuses to delete a service that another connects to.
    pub(in crate::engine) fn not_connected_to(
        &self,
        name: &ServiceName,
    ) -> Result<(), EngineError> {
        match self.services.entries.iter().find(|(other, e)| {
            *other != name
                && e.spec
                    .as_ref()
                    .ok()
                    .and_then(|s| s.network.as_ref())
                    .is_some_and(|n| n.connect.contains(name))
        }) {
            Some((other, _)) => Err(EngineError::Invalid(format!(
                "service {other} connects to {name}: take {name} out of its connect first"
            ))),
            None => Ok(()),
        }
    }

    /// The addresses taken on `network`: its instances' and its hosts'.
    pub(in crate::engine) fn addresses_on(&self, network: &NetworkName) -> BTreeSet<Ipv4Addr> {
        let mut taken: BTreeSet<Ipv4Addr> = self
            .services
            .instances
            .values()
            .filter_map(|i| i.address.as_ref())
            .filter(|a| &a.network == network)
            .map(|a| a.ip)
            .collect();
        if let Some(record) = self.networks.records.get(network) {
            taken.extend(record.hosts.values().copied());
        }
        taken
    }

    /// Every host as the networks see it: its site, and its address as the others reach it.
    fn host_facts(&self) -> Vec<HostFacts> {
        self.fleet
            .hosts
            .iter()
            .map(|(id, entry)| HostFacts {
                id: id.clone(),
                site: entry.view.inventory().map(|i| i.site.name.clone()),
                underlay: entry.reached_at(),
            })
            .collect()
    }

    /// Tells every online agent that takes service networks what its networks are now,
    /// when that changed since it was last told; each host of a network gets its own
    /// address on it first (kept in the store).
    pub(in crate::engine) fn tell_networks(&mut self) {
        let facts = self.host_facts();
        let spans = network_hosts(&self.networks.records, &self.services.published, &facts);
        let names: Vec<NetworkName> = self.networks.records.keys().cloned().collect();
        for name in names {
            let span = spans.get(&name).cloned().unwrap_or_default();
            let mut taken = self.addresses_on(&name);
            let Some(record) = self.networks.records.get_mut(&name) else {
                continue;
            };
            let before = record.hosts.clone();
            record.hosts.retain(|h, _| span.contains(h));
            for host in &span {
                if record.hosts.contains_key(host) {
                    continue;
                }
                match free_address_from_top(record.subnet, &taken) {
                    Some(address) => {
                        taken.insert(address);
                        record.hosts.insert(host.clone(), address);
                    }
                    None => tracing::warn!(
                        "network {name} has no address left for host {host}: give it a larger subnet"
                    ),
                }
            }
            if record.hosts != before {
                let record = record.clone();
                self.store.put_network(&record);
                self.networks.dirty = true;
            }
        }
        let described = host_descriptions(
            &self.networks.records,
            &self.services.published,
            &facts,
            &spans,
        );
        for (id, description) in described {
            let Some(entry) = self.fleet.hosts.get_mut(&id) else {
                continue;
            };
            let Some(peer) = entry.peer.clone() else {
                continue;
            };
            if !peer.offers(features::SERVICE_NETWORKS) {
                continue;
            }
            let digest = {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                format!("{description:?}").hash(&mut hasher);
                hasher.finish()
            };
            if entry.networks_told == Some(digest) {
                continue;
            }
            // Marked told now; a refusal clears the mark and a later round tells it again.
            entry.networks_told = Some(digest);
            let internal = self.internal_tx.clone();
            let stable_id = peer.conn.stable_id();
            tokio::spawn(async move {
                let Err(e) = peer.call(description).await else {
                    return;
                };
                let refused = Internal::NetworksRefused {
                    host: id,
                    stable_id,
                    digest,
                    reason: error_chain(&e),
                };
                let _ = internal.send(refused).await;
            });
        }
    }

    /// An agent did not take its networks: told again at the next round, and said once.
    pub(in crate::engine) fn networks_refused(
        &mut self,
        host: &dunes_shared::model::HostId,
        stable_id: usize,
        digest: u64,
        reason: &str,
    ) {
        let Some(entry) = self.fleet.hosts.get_mut(host) else {
            return;
        };
        let same_link = entry
            .peer
            .as_ref()
            .is_some_and(|p| p.conn.stable_id() == stable_id);
        if same_link && entry.networks_told == Some(digest) {
            entry.networks_told = None;
            tracing::warn!("{host}: its service networks could not be set up: {reason}");
            if self.networks.refusals.get(host).map(String::as_str) != Some(reason) {
                self.networks
                    .refusals
                    .insert(host.clone(), reason.to_string());
                let message = format!("its service networks could not be set up: {reason}");
                self.log(
                    crate::engine::records::Level::Warning,
                    Some(host.clone()),
                    message,
                );
            }
        }
    }

    /// The address of instance `key` of a service defined as `spec`: the one it has (a
    /// deploy cut short made it already), or the lowest free one, then taken.
    pub(in crate::engine) fn address_for(
        &self,
        spec: &ServiceSpec,
        key: &InstanceKey,
        taken: &mut BTreeSet<Ipv4Addr>,
    ) -> Result<Option<InstanceAddress>, EngineError> {
        let Some(network) = network_name(spec) else {
            return Ok(None);
        };
        if let Some(kept) = self
            .services
            .instances
            .get(key)
            .and_then(|i| i.address.clone())
            .filter(|a| a.network == network)
        {
            return Ok(Some(kept));
        }
        let record = self.networks.records.get(&network).ok_or_else(|| {
            EngineError::Invalid(format!(
                "network {network} is not known: define service {} again",
                spec.name
            ))
        })?;
        let ip = free_address(record.subnet, taken).ok_or_else(|| {
            EngineError::Invalid(format!(
                "network {network} ({}) has no free address for {key}: give it a larger subnet",
                record.subnet
            ))
        })?;
        taken.insert(ip);
        Ok(Some(InstanceAddress {
            network,
            ip,
            mac: mac_of(ip),
        }))
    }
}
