//! The engine's side of every request: decoded by name, checked against the caller's role
//! and scope, written to the audit log when it changes something or is refused, then run.

use serde::Serialize;
use serde_json::Value;

use super::{
    ops,
    types::{ApiError, ApiErrorCode, Caller, Envelope, Operation},
};
use crate::engine::{EngineHandle, audit, operators::access};

async fn run<O: Operation>(
    engine: &EngineHandle,
    fields: serde_json::Map<String, Value>,
    caller: Option<&Caller>,
) -> Result<Value, ApiError> {
    let request: O = serde_json::from_value(Value::Object(fields))
        .map_err(|e| ApiError::invalid(format!("bad {} request: {e}", O::NAME)))?;
    let response = run_checked(engine, request, caller).await?;
    serde_json::to_value(response)
        .map_err(|e| ApiError::invalid(format!("cannot encode the answer: {e}")))
}

/// Fields whose values the audit log leaves out: secrets, and texts it keeps a hash of.
const SECRET_FIELDS: &[&str] = &["token"];
const HASHED_FIELDS: &[&str] = &["source", "csr_pem"];

/// A request's fields as the audit log keeps them.
fn audited_parameters(request: &impl Serialize) -> String {
    use sha2::Digest;
    let mut value = serde_json::to_value(request).unwrap_or(Value::Null);
    if let Value::Object(fields) = &mut value {
        for (name, field) in fields.iter_mut() {
            if SECRET_FIELDS.contains(&name.as_str()) {
                *field = Value::String("(left out)".into());
            } else if HASHED_FIELDS.contains(&name.as_str())
                && let Value::String(text) = field
            {
                *field = Value::String(format!(
                    "sha256:{}",
                    hex::encode(sha2::Sha256::digest(text.as_bytes()))
                ));
            }
        }
    }
    value.to_string()
}

async fn append_audit(engine: &EngineHandle, entry: audit::AuditEntry) -> Result<u64, ApiError> {
    Ok(engine
        .request(|reply| crate::engine::Command::Audit { entry, reply })
        .await?)
}

/// Runs a request for `caller` (`None`: the local administrator): its role and scope are
/// checked, and a change or a refusal is written to the audit log before the answer; a
/// change whose record cannot be written is not done.
pub(super) async fn run_checked<O: Operation>(
    engine: &EngineHandle,
    request: O,
    caller: Option<&Caller>,
) -> Result<O::Response, ApiError> {
    let changes = request.changes();
    let permitted = match caller {
        Some(caller) => caller.permits(&request, &engine.snapshot()),
        None => Ok(()),
    };
    if !changes && permitted.is_ok() {
        return request.execute_as(engine, caller).await;
    }
    let target = access::describe_targets(&request.targets(&engine.snapshot()));
    let parameters = audited_parameters(&request);
    let (operator, fingerprint) = match caller {
        Some(c) => (c.name.to_string(), Some(c.fingerprint.to_string())),
        None => ("local".to_string(), None),
    };
    let entry =
        |outcome: String, duration_ms: Option<u64>, request: Option<u64>| audit::AuditEntry {
            time_ms: crate::engine::snapshot::unix_ms(std::time::SystemTime::now()),
            operator: operator.clone(),
            fingerprint: fingerprint.clone(),
            operation: O::NAME.to_string(),
            target: target.clone(),
            parameters: parameters.clone(),
            outcome,
            duration_ms,
            request,
        };
    if let Err(refusal) = permitted {
        // The refusal stands whether or not its record can be written.
        if let Err(e) = append_audit(
            engine,
            entry(format!("refused: {}", refusal.message), None, None),
        )
        .await
        {
            tracing::error!("a refusal of {} was not audited: {e}", O::NAME);
        }
        return Err(refusal);
    }
    let seq = append_audit(engine, entry("started".into(), None, None))
        .await
        .map_err(|e| ApiError {
            code: ApiErrorCode::Store,
            message: format!(
                "nothing was done: the audit log cannot record it ({})",
                e.message
            ),
        })?;
    let started = std::time::Instant::now();
    let result = request.execute_as(engine, caller).await;
    let outcome = match &result {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("failed: {}", e.message),
    };
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    append_audit(engine, entry(outcome.clone(), Some(duration_ms), Some(seq)))
        .await
        .map_err(|e| ApiError {
            code: ApiErrorCode::Store,
            message: format!(
                "{} ran ({outcome}), but the audit log cannot record its outcome ({})",
                O::NAME,
                e.message
            ),
        })?;
    result
}

/// The end of a session (a console or a screen) still to be audited: dropping it, wherever
/// the viewer lets go of the session, records who had it open on what and for how long.
pub struct SessionEnd {
    engine: EngineHandle,
    caller: Option<Caller>,
    operation: &'static str,
    target: String,
    began: std::time::Instant,
    /// The engine's runtime: a window drops its sessions on its own thread.
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionEnd")
            .field("operation", &self.operation)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl SessionEnd {
    /// A session of `request` for `caller` begins now. Called where the operation runs,
    /// inside the engine's runtime.
    pub(super) fn begin<O: Operation>(
        engine: &EngineHandle,
        caller: Option<&Caller>,
        request: &O,
    ) -> SessionEnd {
        SessionEnd {
            engine: engine.clone(),
            caller: caller.cloned(),
            operation: O::NAME,
            target: access::describe_targets(&request.targets(&engine.snapshot())),
            began: std::time::Instant::now(),
            runtime: tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for SessionEnd {
    fn drop(&mut self) {
        let engine = self.engine.clone();
        let caller = self.caller.take();
        let operation = self.operation;
        let target = std::mem::take(&mut self.target);
        let lasted = self.began.elapsed();
        self.runtime.spawn(async move {
            audit_session_end(&engine, caller.as_ref(), operation, target, lasted).await;
        });
    }
}

/// Records the end of a session (a console) that `caller` opened on `target`, with how long
/// it lasted; a record that cannot be written is logged.
async fn audit_session_end(
    engine: &EngineHandle,
    caller: Option<&Caller>,
    operation: &str,
    target: String,
    lasted: std::time::Duration,
) {
    let (operator, fingerprint) = match caller {
        Some(c) => (c.name.to_string(), Some(c.fingerprint.to_string())),
        None => ("local".to_string(), None),
    };
    let duration_ms = u64::try_from(lasted.as_millis()).unwrap_or(u64::MAX);
    let entry = audit::AuditEntry {
        time_ms: crate::engine::snapshot::unix_ms(std::time::SystemTime::now()),
        operator,
        fingerprint,
        operation: operation.to_string(),
        target,
        parameters: "{}".into(),
        outcome: format!("session ended after {} s", duration_ms / 1000),
        duration_ms: Some(duration_ms),
        request: None,
    };
    if let Err(e) = append_audit(engine, entry).await {
        tracing::error!("the end of a {operation} session was not audited: {e}");
    }
}

macro_rules! dispatch_fns {
    ($($method:ident => $op:ident,)*) => {
        /// Runs the request named in `envelope` on `engine` for `caller` (`None`: the local
        /// administrator), answering its serde form.
        pub async fn dispatch_as(
            engine: &EngineHandle,
            envelope: Envelope,
            caller: Option<&Caller>,
        ) -> Result<Value, ApiError> {
            match envelope.cmd.as_str() {
                $(<ops::$op as Operation>::NAME => run::<ops::$op>(engine, envelope.fields, caller).await,)*
                other => Err(ApiError::invalid(format!("no operation {other:?}"))),
            }
        }

        /// Every operation's name.
        pub const OPERATION_NAMES: &[&str] = &[$(<ops::$op as Operation>::NAME,)*];
    };
}

with_operations!(dispatch_fns);

/// Runs the request named in `envelope` as the local administrator.
pub async fn dispatch(engine: &EngineHandle, envelope: Envelope) -> Result<Value, ApiError> {
    dispatch_as(engine, envelope, None).await
}
