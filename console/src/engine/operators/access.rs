//! Who may do what: roles, and the check every request of an operator passes before it
//! runs. Pure: no I/O.

use dunes_shared::{model::OperatorName, pki::Fingerprint};
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
];

/// Whether `role` may run `operation`; the refusal names who, what, and the role it needs.
pub fn check(
    operator: &OperatorName,
    role: Role,
    operation: &str,
    action: &str,
    changes: bool,
) -> Result<(), String> {
    let needed = if ADMIN_ONLY.contains(&operation) {
        Role::Admin
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
    /// The key of their certificate: a certificate for another key does not let them in.
    pub fingerprint: Fingerprint,
    pub added_ms: u64,
    /// Set once revoked: their sessions end and their certificate opens none again.
    #[serde(default)]
    pub revoked_ms: Option<u64>,
}

impl OperatorRecord {
    pub fn is_active(&self) -> bool {
        self.revoked_ms.is_none()
    }
}

/// Why an operator's session is refused at its hello, if it is.
pub fn admit(
    records: &[OperatorRecord],
    name: &OperatorName,
    fingerprint: &Fingerprint,
) -> Result<Role, String> {
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
    Ok(record.role)
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
            assert!(check(&alice, role, "hosts", "list hosts", false).is_ok());
        }
        assert_eq!(
            check(&alice, Role::Viewer, "vm-stop", "stop VMs", true).unwrap_err(),
            "viewer alice may not stop VMs: operators and admins only"
        );
        assert!(check(&alice, Role::Operator, "vm-stop", "stop VMs", true).is_ok());
        assert_eq!(
            check(&alice, Role::Operator, "host-drain", "drain hosts", true).unwrap_err(),
            "operator alice may not drain hosts: admin only"
        );
        assert!(check(&alice, Role::Admin, "host-drain", "drain hosts", true).is_ok());
        // Admin-only holds even for an operation that reads (a probe reaches out to a host).
        assert!(check(&alice, Role::Operator, "host-probe", "probe hosts", false).is_err());
    }

    #[test]
    fn a_session_is_admitted_for_an_active_operator_with_their_key() {
        let key = Fingerprint([1; 32]);
        let mut records = vec![OperatorRecord {
            name: name("bob"),
            role: Role::Viewer,
            fingerprint: key,
            added_ms: 1,
            revoked_ms: None,
        }];
        assert_eq!(admit(&records, &name("bob"), &key), Ok(Role::Viewer));
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
