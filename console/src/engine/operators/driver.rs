//! The operators' driver: adds, renews and revokes them, and publishes who they are to the
//! operator endpoint.

use dunes_shared::{model::OperatorName, pki::Fingerprint};

use super::{OperatorIssued, OperatorRecord, Role, access};
use crate::engine::{EngineError, Reply, actor::Actor, records::Level, snapshot::unix_ms};

impl Actor {
    /// Signs the operator's key request and records them with `role`.
    pub(in crate::engine) fn add_operator(
        &mut self,
        name: OperatorName,
        (role, scopes, consoles): (Role, Vec<access::Scope>, Option<bool>),
        csr_der: Vec<u8>,
        reply: Reply<OperatorIssued>,
    ) {
        if self
            .operators
            .records
            .get(&name)
            .is_some_and(OperatorRecord::is_active)
        {
            let _ = reply.send(Err(EngineError::Invalid(format!(
                "operator {name} exists; revoke them first to give the name a new key"
            ))));
            return;
        }
        let signed = self
            .pki
            .ca
            .sign_operator_csr(&csr_der, &name)
            .map_err(|e| dunes_shared::error_chain(&e))
            .and_then(|cert| {
                Fingerprint::of_certificate(&cert)
                    .map(|f| (cert, f))
                    .map_err(|e| dunes_shared::error_chain(&e))
            });
        let (cert, fingerprint) = match signed {
            Ok(signed) => signed,
            Err(e) => {
                let _ = reply.send(Err(EngineError::Invalid(format!(
                    "the certificate request of {name} is refused: {e}"
                ))));
                return;
            }
        };
        let record = OperatorRecord {
            name: name.clone(),
            role,
            scopes,
            fingerprint,
            added_ms: unix_ms(std::time::SystemTime::now()),
            revoked_ms: None,
            consoles,
        };
        self.operators.records.insert(name.clone(), record.clone());
        self.store.put_operator(&record);
        let limited = if record.scopes.is_empty() {
            String::new()
        } else {
            format!(
                " limited to {}",
                record
                    .scopes
                    .iter()
                    .map(access::Scope::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        self.log(
            Level::Info,
            None,
            format!(
                "operator {name} added as {}{limited}{}",
                role.as_str(),
                match (consoles, record.may_use_consoles()) {
                    (Some(_), true) => ", with consoles",
                    (Some(_), false) => ", without consoles",
                    (None, _) => "",
                }
            ),
        );
        let issued = OperatorIssued {
            record,
            cert_der: cert.to_vec(),
            ca_der: self.pki.ca.cert_der().to_vec(),
        };
        self.publish_operators_after_commit(reply, issued);
    }

    /// Signs a fresh certificate for an active operator's own key: the key stays, so their
    /// record does not change.
    pub(in crate::engine) fn renew_operator(
        &mut self,
        name: OperatorName,
        csr_der: Vec<u8>,
        reply: Reply<OperatorIssued>,
    ) {
        let Some(record) = self
            .operators
            .records
            .get(&name)
            .filter(|r| r.is_active())
            .cloned()
        else {
            let _ = reply.send(Err(EngineError::Invalid(format!(
                "no operator {name} to renew"
            ))));
            return;
        };
        let signed = self
            .pki
            .ca
            .sign_operator_csr(&csr_der, &name)
            .map_err(|e| dunes_shared::error_chain(&e))
            .and_then(|cert| {
                Fingerprint::of_certificate(&cert)
                    .map(|f| (cert, f))
                    .map_err(|e| dunes_shared::error_chain(&e))
            });
        let cert = match signed {
            Ok((cert, key)) if key == record.fingerprint => cert,
            Ok(_) => {
                let _ = reply.send(Err(EngineError::Invalid(format!(
                    "a renewal keeps the key: {name}'s request is for another one"
                ))));
                return;
            }
            Err(e) => {
                let _ = reply.send(Err(EngineError::Invalid(format!(
                    "the certificate request of {name} is refused: {e}"
                ))));
                return;
            }
        };
        self.log(
            Level::Info,
            None,
            format!("operator {name}'s certificate renewed"),
        );
        let issued = OperatorIssued {
            record,
            cert_der: cert.to_vec(),
            ca_der: self.pki.ca.cert_der().to_vec(),
        };
        self.reply_after_commit(reply, issued);
    }

    /// Ends an operator's sessions and refuses their certificate from now on.
    pub(in crate::engine) fn revoke_operator(
        &mut self,
        name: OperatorName,
        reply: Reply<OperatorRecord>,
    ) {
        let Some(record) = self
            .operators
            .records
            .get_mut(&name)
            .filter(|r| r.is_active())
        else {
            let _ = reply.send(Err(EngineError::Invalid(format!(
                "no operator {name} to revoke"
            ))));
            return;
        };
        record.revoked_ms = Some(unix_ms(std::time::SystemTime::now()));
        let record = record.clone();
        self.store.put_operator(&record);
        self.log(Level::Info, None, format!("operator {name} revoked"));
        self.publish_operators_after_commit(reply, record);
    }

    /// Once the change is committed: the endpoint learns of it, then the caller.
    fn publish_operators_after_commit<T: Send + 'static>(&mut self, reply: Reply<T>, value: T) {
        let list = self.operators.list();
        let published = self.operators.published.clone();
        self.store.after_commit(Box::new(move |committed| {
            if committed.is_ok() {
                published.send_replace(list);
            }
            let _ = reply.send(committed.map(|()| value).map_err(EngineError::Store));
        }));
    }
}
