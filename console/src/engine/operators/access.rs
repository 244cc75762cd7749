//! Who may do what: roles, and the check every request of an operator passes before it
//! runs. Pure: no I/O.

use dunes_shared::{
    model::{OperatorName, ServiceName},
    pki::Fingerprint,
};
use serde::{Deserialize, Serialize};

/// What an operator may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything, changes nothing.
    Viewer,
    /// Runs VM and service lifecycle, migrations and autoscaling.
    Operator,
    /// Does everything, hosts, service definitions and operators included.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// What a scoped operator's changes are limited to: a service's instances and the service
/// itself, or what runs on a site's hosts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Service(ServiceName),
    Site(String),
}

impl Scope {
    /// `service:NAME` or `site:NAME`.
    pub fn parse(text: &str) -> Result<Scope, String> {
        let bad = || format!("scope {text:?}: write service:NAME or site:NAME");
        let (kind, name) = text.split_once(':').ok_or_else(bad)?;
        match kind {
            "service" => Ok(Scope::Service(
                ServiceName::new(name).map_err(|e| format!("scope {text:?}: {e}"))?,
            )),
            "site" if !name.is_empty() => Ok(Scope::Site(name.to_string())),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Service(name) => write!(f, "service:{name}"),
            Scope::Site(name) => write!(f, "site:{name}"),
        }
    }
}

/// What a change touches, for the scope check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The fleet as a whole (operators, definitions): no scope covers it.
    Fleet,
    /// A service, as a whole.
    Service(ServiceName),
    /// A VM or process: on a site, an instance of a service or not.
    Workload {
        name: String,
        site: String,
        service: Option<ServiceName>,
    },
    /// A host, on a site.
    Host { name: String, site: String },
    /// An operator: no scope covers who may do what.
    Operator(String),
    /// An image of the library: no scope covers it.
    Image(String),
}

impl Target {
    fn covered_by(&self, scope: &Scope) -> bool {
        match (self, scope) {
            (Target::Service(s), Scope::Service(allowed)) => s == allowed,
            (Target::Workload { site, .. }, Scope::Site(allowed))
            | (Target::Host { site, .. }, Scope::Site(allowed)) => site == allowed,
            (Target::Workload { service, .. }, Scope::Service(allowed)) => {
                service.as_ref() == Some(allowed)
            }
            _ => false,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Target::Fleet => "the fleet as a whole".into(),
            Target::Service(name) => format!("service {name}"),
            Target::Workload { name, .. } => name.clone(),
            Target::Host { name, .. } => format!("host {name}"),
            Target::Operator(name) => format!("operator {name}"),
            Target::Image(name) => format!("image {name}"),
        }
    }
}

/// What a request touches, in words for the audit log.
pub fn describe_targets(targets: &[Target]) -> String {
    if targets.is_empty() {
        return "-".into();
    }
    targets
        .iter()
        .map(Target::describe)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether an operator limited to `scopes` may change every one of `targets`; an operator
/// without scopes may change anything their role allows.
pub fn check_scope(
    operator: &OperatorName,
    role: Role,
    scopes: &[Scope],
    action: &str,
    targets: &[Target],
) -> Result<(), String> {
    if scopes.is_empty() {
        return Ok(());
    }
    match targets
        .iter()
        .find(|t| !scopes.iter().any(|s| t.covered_by(s)))
    {
        None => Ok(()),
        Some(outside) => Err(format!(
            "{} {operator} may not {action} on {}: outside {}",
            role.as_str(),
            outside.describe(),
            scopes
                .iter()
                .map(Scope::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Operations only an admin may run: they change the fleet itself, what services are, or
/// who may do what.
const ADMIN_ONLY: &[&str] = &[
    "host-probe",
    "host-add",
    "host-drain",
    "host-drain-pause",
    "host-undrain",
    "service-create",
    "service-delete",
    "operator-add",
    "operator-revoke",
    "image-import",
    "image-delete",
];

/// What a console permission gives: a shell on a guest or its screen, granted apart from
/// the role (`operator add --consoles`); operators and admins have it unless refused it.
const CONSOLE_ACCESS: &[&str] = &["vm-console", "vm-screen", "vm-screenshot"];

/// Whether a role has the console permission when the operator's record does not say.
pub fn consoles_by_default(role: Role) -> bool {
    role >= Role::Operator
}

/// Changes every operator may make about themself.
const OWN: &[&str] = &["operator-renew"];

/// Whether `role` may run `operation`; the refusal names who, what, and the role it needs.
pub fn check(
    operator: &OperatorName,
    role: Role,
    consoles: bool,
    operation: &str,
    action: &str,
    changes: bool,
) -> Result<(), String> {
    if CONSOLE_ACCESS.contains(&operation) {
        return match consoles {
            true => Ok(()),
            false => Err(format!(
                "{} {operator} may not {action}: they have no console permission (operator add --consoles gives it)",
                role.as_str()
            )),
        };
    }
    let needed = if ADMIN_ONLY.contains(&operation) {
        Role::Admin
    } else if OWN.contains(&operation) {
        Role::Viewer
    } else if changes {
        Role::Operator
    } else {
        Role::Viewer
    };
    if role >= needed {
        return Ok(());
    }
    let why = match needed {
        Role::Admin => "admin only",
        _ => "operators and admins only",
    };
    Err(format!(
        "{} {operator} may not {action}: {why}",
        role.as_str()
    ))
}

/// An operator as the engine keeps them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatorRecord {
    pub name: OperatorName,
    pub role: Role,
    /// What their changes are limited to; none: everything their role allows.
    #[serde(default)]
    pub scopes: Vec<Scope>,
    /// The key of their certificate: a certificate for another key does not let them in.
    pub fingerprint: Fingerprint,
    pub added_ms: u64,
    /// Set once revoked: their sessions end and their certificate opens none again.
    #[serde(default)]
    pub revoked_ms: Option<u64>,
    /// Whether they may open VMs' consoles and screens; `None` (and records written before
    /// there was a choice): as their role gives ([`consoles_by_default`]).
    #[serde(default)]
    pub consoles: Option<bool>,
}

impl OperatorRecord {
    pub fn is_active(&self) -> bool {
        self.revoked_ms.is_none()
    }

    /// Whether they may open VMs' consoles and screens.
    pub fn may_use_consoles(&self) -> bool {
        self.consoles
            .unwrap_or_else(|| consoles_by_default(self.role))
    }
}

/// What an admitted operator may do.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub role: Role,
    pub scopes: Vec<Scope>,
    pub consoles: bool,
}

/// Why an operator's session is refused at its hello, if it is; else their role and scopes.
pub fn admit(
    records: &[OperatorRecord],
    name: &OperatorName,
    fingerprint: &Fingerprint,
) -> Result<Grant, String> {
    let record = records
        .iter()
        .find(|r| &r.name == name)
        .ok_or_else(|| format!("no operator {name}"))?;
    if !record.is_active() {
        return Err(format!("operator {name} is revoked"));
    }
    if &record.fingerprint != fingerprint {
        return Err(format!(
            "operator {name} presents another key than the one they were given"
        ));
    }
    Ok(Grant {
        role: record.role,
        scopes: record.scopes.clone(),
        consoles: record.may_use_consoles(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> OperatorName {
        OperatorName::new(n).unwrap()
    }

    #[test]
    fn each_role_runs_what_it_may_and_the_refusal_says_why() {
        let alice = name("alice");
        for role in [Role::Viewer, Role::Operator, Role::Admin] {
            assert!(check(&alice, role, true, "hosts", "list hosts", false).is_ok());
        }
        assert_eq!(
            check(&alice, Role::Viewer, true, "vm-stop", "stop VMs", true).unwrap_err(),
            "viewer alice may not stop VMs: operators and admins only"
        );
        assert!(check(&alice, Role::Operator, true, "vm-stop", "stop VMs", true).is_ok());
        assert_eq!(
            check(
                &alice,
                Role::Operator,
                true,
                "host-drain",
                "drain hosts",
                true
            )
            .unwrap_err(),
            "operator alice may not drain hosts: admin only"
        );
        assert!(check(&alice, Role::Admin, true, "host-drain", "drain hosts", true).is_ok());
        // Admin-only holds even for an operation that reads (a probe reaches out to a host).
        assert!(
            check(
                &alice,
                Role::Operator,
                true,
                "host-probe",
                "probe hosts",
                false
            )
            .is_err()
        );
        // Consoles go by their own permission, whatever the role.
        assert_eq!(
            check(
                &alice,
                Role::Admin,
                false,
                "vm-screen",
                "see VM screens",
                true
            )
            .unwrap_err(),
            "admin alice may not see VM screens: they have no console permission (operator add --consoles gives it)"
        );
        assert!(
            check(
                &alice,
                Role::Viewer,
                true,
                "vm-console",
                "open VM consoles",
                true
            )
            .is_ok()
        );
    }

    #[test]
    fn a_scope_limits_changes_to_its_service_or_site() {
        let olga = name("olga");
        let shop = ServiceName::new("shop").unwrap();
        let scopes = [Scope::parse("service:shop").unwrap()];
        let instance = Target::Workload {
            name: "shop-web-0".into(),
            site: "geneva".into(),
            service: Some(shop.clone()),
        };
        let other = Target::Workload {
            name: "wiki".into(),
            site: "geneva".into(),
            service: None,
        };
        assert!(
            check_scope(
                &olga,
                Role::Operator,
                &scopes,
                "stop VMs",
                std::slice::from_ref(&instance)
            )
            .is_ok()
        );
        assert!(
            check_scope(
                &olga,
                Role::Operator,
                &scopes,
                "deploy services",
                &[Target::Service(shop)]
            )
            .is_ok()
        );
        assert_eq!(
            check_scope(
                &olga,
                Role::Operator,
                &scopes,
                "stop VMs",
                std::slice::from_ref(&other)
            )
            .unwrap_err(),
            "operator olga may not stop VMs on wiki: outside service:shop"
        );
        // A site scope covers what runs there and its hosts; both ends of a move count.
        let geneva = [Scope::parse("site:geneva").unwrap()];
        assert!(
            check_scope(
                &olga,
                Role::Operator,
                &geneva,
                "stop VMs",
                std::slice::from_ref(&other)
            )
            .is_ok()
        );
        let lausanne_host = Target::Host {
            name: "lsn-1".into(),
            site: "lausanne".into(),
        };
        assert!(
            check_scope(
                &olga,
                Role::Operator,
                &geneva,
                "migrate VMs",
                &[other, lausanne_host]
            )
            .unwrap_err()
            .contains("on host lsn-1: outside site:geneva")
        );
        assert!(
            check_scope(
                &olga,
                Role::Admin,
                &geneva,
                "add operators",
                &[Target::Fleet]
            )
            .is_err()
        );
        // No scope: anything the role allows.
        assert!(check_scope(&olga, Role::Admin, &[], "add operators", &[Target::Fleet]).is_ok());
        for bad in ["shop", "service:", "pool:x", "site:", "service:Bad Name"] {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Scope::parse("site:geneva").unwrap().to_string(),
            "site:geneva"
        );
    }

    #[test]
    fn a_session_is_admitted_for_an_active_operator_with_their_key() {
        let key = Fingerprint([1; 32]);
        let mut records = vec![OperatorRecord {
            name: name("bob"),
            role: Role::Viewer,
            scopes: Vec::new(),
            fingerprint: key,
            added_ms: 1,
            revoked_ms: None,
            consoles: None,
        }];
        assert_eq!(
            admit(&records, &name("bob"), &key),
            Ok(Grant {
                role: Role::Viewer,
                scopes: Vec::new(),
                consoles: false,
            })
        );
        assert!(
            admit(&records, &name("bob"), &Fingerprint([2; 32]))
                .unwrap_err()
                .contains("another key")
        );
        assert!(admit(&records, &name("eve"), &key).is_err());
        records[0].revoked_ms = Some(2);
        assert_eq!(
            admit(&records, &name("bob"), &key).unwrap_err(),
            "operator bob is revoked"
        );
    }
}
