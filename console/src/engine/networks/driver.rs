//! Networks in the engine: chosen when a service is defined (and written with it), dropped
//! when no service is on them any more, and an address handed to each instance deployed.

use std::{collections::BTreeSet, net::Ipv4Addr};

use dunes_shared::{
    model::{NetworkName, ServiceName},
    network::mac_of,
    service::ServiceSpec,
};

use crate::engine::{
    EngineError,
    actor::Actor,
    networks::plan::{DefinedService, NetworkChoice, choose_network, free_address, network_name},
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

    /// The addresses taken on `network`.
    pub(in crate::engine) fn addresses_on(&self, network: &NetworkName) -> BTreeSet<Ipv4Addr> {
        self.services
            .instances
            .values()
            .filter_map(|i| i.address.as_ref())
            .filter(|a| &a.network == network)
            .map(|a| a.ip)
            .collect()
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
