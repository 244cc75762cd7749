//! A service application's cloud-init user-data for one instance: its placeholders filled in
//! with the instance's name, index, service and application, and the addresses of the
//! instances of the applications it depends on, as their guest agents report them.

use dunes_shared::model::AppName;

use crate::engine::{
    EngineError,
    actor::Actor,
    records::{InstanceRecord, InstanceState},
    services::state::StartInputs,
};

/// How long an instance's start waits for its dependencies to report their addresses, as
/// long as for its readiness: a guest agent answers before the guest's network is up (a
/// slow guest's DHCP comes a minute or more later), and it is asked for them on the agent's
/// own clock.
pub const ADDRESS_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// One address per instance, in index order: its first IPv4 address without the prefix
/// length, or its first address. `strict`: an instance that reported none is refused;
/// otherwise it is left out.
pub fn instance_addresses(
    app: &AppName,
    instances: &[(u32, Option<&[String]>)],
    strict: bool,
) -> Result<Vec<String>, String> {
    let mut sorted: Vec<&(u32, Option<&[String]>)> = instances.iter().collect();
    sorted.sort_by_key(|(index, _)| *index);
    let mut out = Vec::new();
    for (index, addresses) in sorted {
        let plain: Vec<&str> = addresses
            .unwrap_or_default()
            .iter()
            .map(|a| a.split('/').next().unwrap_or(a))
            .collect();
        let chosen = plain
            .iter()
            .find(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
            .or(plain.first());
        match chosen {
            Some(a) => out.push(a.to_string()),
            None if strict => {
                return Err(format!(
                    "{app}-{index} has reported no address yet (its guest agent reports it while it runs)"
                ));
            }
            None => {}
        }
    }
    if strict && out.is_empty() {
        return Err(format!("{app} has no instance with an address"));
    }
    Ok(out)
}

impl Actor {
    /// The user-data `instance` starts with. `strict` (when it starts): every instance of a
    /// dependency it names must have reported its address; otherwise (when it is created,
    /// before its dependencies may run) what is not known is left out.
    pub(in crate::engine) fn instance_user_data(
        &self,
        instance: &InstanceRecord,
        strict: bool,
    ) -> StartInputs {
        let spec = match self.readable_spec(&instance.service) {
            Ok(spec) => spec,
            Err(e) => return StartInputs::Refused(e),
        };
        let Some(template) = spec
            .application(&instance.app)
            .and_then(|a| Some((a, a.user_data.as_ref()?)))
        else {
            return StartInputs::Ready(None);
        };
        let (app, template) = template;
        let instances = self.services.instances_of(&instance.service);
        let mut waiting = false;
        let filled = app.fill_user_data(
            template,
            instance.vm.as_str(),
            instance.index,
            instance.service.as_str(),
            |dep| {
                let statuses: Vec<(u32, Option<Vec<String>>)> = instances
                    .iter()
                    .filter(|i| &i.app == dep && i.state == InstanceState::Created)
                    .map(|i| {
                        // On a service network the console chose the address; otherwise
                        // the guest agent reports what the guest has.
                        let addresses = match &i.address {
                            Some(a) => Some(vec![a.ip.to_string()]),
                            None => self
                                .fleet
                                .hosts
                                .get(&i.host)
                                .and_then(|h| h.view.vm(&i.vm))
                                .and_then(|v| v.addresses.clone()),
                        };
                        (i.index, addresses)
                    })
                    .collect();
                let borrowed: Vec<(u32, Option<&[String]>)> =
                    statuses.iter().map(|(i, a)| (*i, a.as_deref())).collect();
                instance_addresses(dep, &borrowed, strict).inspect_err(|_| waiting = true)
            },
        );
        match filled {
            Ok(text) => StartInputs::Ready(Some(text)),
            Err(e) => {
                let why = format!("{}-{}'s {e}", instance.app, instance.index);
                if waiting {
                    StartInputs::Waiting(why)
                } else {
                    StartInputs::Refused(EngineError::Invalid(why))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_instance_gives_its_ipv4_address_in_index_order() {
        let db = AppName::new("db").unwrap();
        let one = vec!["fd00::5/64".to_string(), "10.0.2.15/24".to_string()];
        let two = vec!["fd00::6/64".to_string()];
        let instances = [(1, Some(two.as_slice())), (0, Some(one.as_slice()))];
        assert_eq!(
            instance_addresses(&db, &instances, true),
            Ok(vec!["10.0.2.15".to_string(), "fd00::6".to_string()])
        );
        let silent = [(0, Some(one.as_slice())), (1, None)];
        assert_eq!(
            instance_addresses(&db, &silent, true),
            Err(
                "db-1 has reported no address yet (its guest agent reports it while it runs)"
                    .into()
            )
        );
        assert_eq!(
            instance_addresses(&db, &silent, false),
            Ok(vec!["10.0.2.15".to_string()])
        );
        assert_eq!(
            instance_addresses(&db, &[], true),
            Err("db has no instance with an address".into())
        );
        assert_eq!(instance_addresses(&db, &[], false), Ok(vec![]));
    }
}
