//! The engine's API: one request type per operation, its response type tied to it by
//! [`Operation`], and one [`EngineClient`] that carries them to an engine in this process or
//! through the control socket of a console that runs elsewhere on this machine. `ctl`, its
//! `--json` output and the tests go through it.

pub mod credential;
pub mod feed;
pub mod ops;
pub mod remote;
pub mod views;

use std::{
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::engine::{EngineError, EngineHandle, audit, operators::access};

/// One operation of the engine: its request (this type) and its response.
pub trait Operation: Serialize + DeserializeOwned + Send + 'static {
    /// Its name on the wire, as `ctl` spells the command (`vm-start`).
    const NAME: &'static str;
    /// What it does, as a refusal names it: "may not {ACTION}" ("stop VMs").
    const ACTION: &'static str;
    type Response: Serialize + DeserializeOwned + Send + 'static;

    /// Whether it changes anything (reads answer from what the engine holds).
    fn changes(&self) -> bool;

    /// What a change touches, as `snap` has it, for operators limited to a scope: by
    /// default the fleet as a whole, which no scope covers. A target that does not exist
    /// is left out, so the operation itself says so.
    fn targets(&self, snap: &crate::engine::Snapshot) -> Vec<access::Target> {
        let _ = snap;
        vec![access::Target::Fleet]
    }

    /// Runs it on the engine of this process.
    fn execute(
        self,
        engine: &EngineHandle,
    ) -> impl Future<Output = Result<Self::Response, ApiError>> + Send;

    /// Runs it for `caller` (`None`: the local administrator); only an operation about the
    /// caller themself needs to know who that is.
    fn execute_as(
        self,
        engine: &EngineHandle,
        caller: Option<&remote::Caller>,
    ) -> impl Future<Output = Result<Self::Response, ApiError>> + Send {
        let _ = caller;
        self.execute(engine)
    }
}

/// Why a request failed: a code a program can act on, and a sentence for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ApiErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApiErrorCode {
    /// The request is malformed or names something that does not exist.
    Invalid,
    /// What it names does not exist on its host.
    NotFound,
    /// What it would create exists.
    Exists,
    /// What it names is in a state that does not allow it (a running VM to clone).
    Conflict,
    /// A host it needs is unreachable or not enrolled.
    Unreachable,
    /// An agent took the request but did not answer in time: what it did is not known.
    NoAnswer,
    /// An agent refused or failed it.
    Agent,
    /// Enrolling a host failed.
    Enroll,
    /// The engine could not save the change.
    Store,
    /// The engine's queue is full.
    Busy,
    /// The operator's role does not allow it.
    Forbidden,
    /// The engine has stopped, or the link to it failed.
    Unavailable,
    /// A code from a newer engine.
    #[serde(other)]
    Other,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError {
            code: ApiErrorCode::Invalid,
            message: message.into(),
        }
    }

    fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            code: ApiErrorCode::Unavailable,
            message: message.into(),
        }
    }
}

impl From<String> for ApiError {
    fn from(message: String) -> ApiError {
        ApiError::invalid(message)
    }
}

impl From<&str> for ApiError {
    fn from(message: &str) -> ApiError {
        ApiError::invalid(message)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        let code = match &e {
            EngineError::UnknownHost(_) | EngineError::Invalid(_) => ApiErrorCode::Invalid,
            EngineError::Unreachable(_) => ApiErrorCode::Unreachable,
            EngineError::Agent { code, .. } => match code {
                dunes_shared::protocol::ErrorCode::NotFound => ApiErrorCode::NotFound,
                dunes_shared::protocol::ErrorCode::AlreadyExists => ApiErrorCode::Exists,
                dunes_shared::protocol::ErrorCode::Conflict => ApiErrorCode::Conflict,
                dunes_shared::protocol::ErrorCode::BadRequest => ApiErrorCode::Invalid,
                _ => ApiErrorCode::Agent,
            },
            EngineError::NoAnswer { .. } => ApiErrorCode::NoAnswer,
            EngineError::Enroll(_) => ApiErrorCode::Enroll,
            EngineError::Store(_) => ApiErrorCode::Store,
            EngineError::Busy => ApiErrorCode::Busy,
            EngineError::Stopped => ApiErrorCode::Unavailable,
        };
        ApiError {
            code,
            message: e.to_string(),
        }
    }
}

/// One request on the control socket: the operation's name beside its fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub cmd: String,
    #[serde(flatten)]
    pub fields: serde_json::Map<String, Value>,
}

impl Envelope {
    pub fn new<O: Operation>(request: &O) -> Result<Envelope, ApiError> {
        let fields = match serde_json::to_value(request) {
            Ok(Value::Object(fields)) => fields,
            Ok(_) => serde_json::Map::new(),
            Err(e) => return Err(ApiError::invalid(format!("cannot encode the request: {e}"))),
        };
        Ok(Envelope {
            cmd: O::NAME.to_string(),
            fields,
        })
    }
}

/// The answer to one request on the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

impl Answer {
    pub fn from_result(result: Result<Value, ApiError>) -> Answer {
        match result {
            Ok(data) => Answer {
                ok: true,
                data: Some(data),
                error: None,
            },
            Err(error) => Answer {
                ok: false,
                data: None,
                error: Some(error),
            },
        }
    }
}

async fn run<O: Operation>(
    engine: &EngineHandle,
    fields: serde_json::Map<String, Value>,
    caller: Option<&remote::Caller>,
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
pub(crate) async fn run_checked<O: Operation>(
    engine: &EngineHandle,
    request: O,
    caller: Option<&remote::Caller>,
) -> Result<O::Response, ApiError> {
    let changes = request.changes();
    let permitted = match caller {
        Some(caller) => caller.check(O::NAME, O::ACTION, changes).and_then(|()| {
            match changes && !caller.scopes.is_empty() {
                true => caller.check_scope(O::ACTION, &request.targets(&engine.snapshot())),
                false => Ok(()),
            }
        }),
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

/// Declares every operation once: the dispatch of a request by name, and the client's
/// method for it.
macro_rules! operations {
    ($($method:ident => $op:ident,)*) => {
        /// Runs the request named in `envelope` on `engine` for `caller` (`None`: the local
        /// administrator), answering its serde form.
        pub async fn dispatch_as(
            engine: &EngineHandle,
            envelope: Envelope,
            caller: Option<&remote::Caller>,
        ) -> Result<Value, ApiError> {
            match envelope.cmd.as_str() {
                $(<ops::$op as Operation>::NAME => run::<ops::$op>(engine, envelope.fields, caller).await,)*
                other => Err(ApiError::invalid(format!("no operation {other:?}"))),
            }
        }

        /// Every operation's name.
        pub const OPERATION_NAMES: &[&str] = &[$(<ops::$op as Operation>::NAME,)*];

        impl EngineClient {
            $(
                pub async fn $method(
                    &self,
                    request: ops::$op,
                ) -> Result<<ops::$op as Operation>::Response, ApiError> {
                    self.call(request).await
                }
            )*
        }
    };
}

operations! {
    hosts => ListHosts,
    vms => ListVms,
    events => ListEvents,
    probe_host => ProbeHost,
    add_host => AddHost,
    drain_host => DrainHost,
    pause_drain => PauseDrain,
    undrain_host => UndrainHost,
    create_vm => CreateVm,
    start_vm => StartVm,
    power_vm => PowerVm,
    stop_vm => StopVm,
    configure_vm => ConfigureVm,
    clone_vm => CloneVm,
    snapshot_vm => SnapshotVm,
    exec_in_vm => GuestExec,
    delete_vm => DeleteVm,
    migrate_vm => MigrateVm,
    check_migration => CheckMigration,
    migrations => ListMigrations,
    cancel_migration => CancelMigration,
    forecast => Forecast,
    stats => Stats,
    latest_values => LatestValues,
    cost => Cost,
    set_autoscale => SetAutoscale,
    remove_autoscale => RemoveAutoscale,
    autoscaling => ListAutoscale,
    replay_autoscale => ReplayAutoscale,
    what_if_drain => WhatIfDrain,
    what_if_deploy => WhatIfDeploy,
    services => ListServices,
    show_service => ShowService,
    define_service => DefineService,
    plan_service => PlanService,
    deploy_service => DeployService,
    start_service => StartService,
    stop_service => StopService,
    delete_service => DeleteService,
    adopt_vm => AdoptVm,
    move_service => MoveService,
    add_operator => AddOperator,
    operators => ListOperators,
    revoke_operator => RevokeOperator,
    renew_operator => RenewOperator,
    engine_info => EngineInfo,
    audit => ListAudit,
    verify_audit => VerifyAudit,
}

/// Runs the request named in `envelope` as the local administrator.
pub async fn dispatch(engine: &EngineHandle, envelope: Envelope) -> Result<Value, ApiError> {
    dispatch_as(engine, envelope, None).await
}

/// The way to an engine: the one in this process, the one behind a console's control
/// socket on this machine, or one elsewhere through its operator endpoint.
#[derive(Debug, Clone)]
pub enum EngineClient {
    InProcess(EngineHandle),
    Socket {
        path: PathBuf,
        /// How long one request may take, answer included.
        timeout: Duration,
    },
    Remote {
        session: std::sync::Arc<remote::RemoteEngine>,
        timeout: Duration,
    },
}

impl EngineClient {
    /// The control socket of the console running on `data_dir`.
    pub fn local_socket(data_dir: &Path, timeout: Duration) -> EngineClient {
        EngineClient::Socket {
            path: crate::ctl::socket_path(data_dir),
            timeout,
        }
    }

    /// The engine's snapshot as it changes: the engine's own in this process, or a full
    /// snapshot then deltas from an engine elsewhere (not over the control socket).
    pub async fn snapshots(
        &self,
    ) -> Result<tokio::sync::watch::Receiver<std::sync::Arc<crate::engine::Snapshot>>, ApiError>
    {
        match self {
            EngineClient::InProcess(engine) => Ok(engine.subscribe()),
            EngineClient::Socket { .. } => Err(ApiError::invalid(
                "the control socket answers requests; a window follows an engine in its process or through --connect",
            )),
            EngineClient::Remote { session, .. } => session.watch().await,
        }
    }

    /// Sends `request` and waits for its response.
    pub async fn call<O: Operation>(&self, request: O) -> Result<O::Response, ApiError> {
        match self {
            EngineClient::InProcess(engine) => run_checked(engine, request, None).await,
            EngineClient::Socket { .. } | EngineClient::Remote { .. } => {
                let envelope = Envelope::new(&request)?;
                let answer = match self {
                    EngineClient::Socket { path, timeout } => {
                        crate::ctl::exchange(path, &envelope, *timeout).await?
                    }
                    EngineClient::Remote { session, timeout } => {
                        session.exchange(&envelope, *timeout).await?
                    }
                    EngineClient::InProcess(_) => unreachable!("matched above"),
                };
                match answer {
                    Answer { ok: true, data, .. } => {
                        serde_json::from_value(data.unwrap_or(Value::Null)).map_err(|e| {
                            ApiError::unavailable(format!(
                                "the console's answer does not parse: {e}"
                            ))
                        })
                    }
                    Answer { error, .. } => Err(error
                        .unwrap_or_else(|| ApiError::unavailable("the console gave no reason"))),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_names_are_unique() {
        let mut names = OPERATION_NAMES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), OPERATION_NAMES.len());
    }

    #[test]
    fn a_request_travels_as_its_name_beside_its_fields() {
        let envelope = Envelope::new(&ops::StopVm {
            vm: "web".into(),
            force: true,
        })
        .unwrap();
        assert_eq!(
            serde_json::to_string(&envelope).unwrap(),
            r#"{"cmd":"vm-stop","force":true,"vm":"web"}"#
        );
        let empty = Envelope::new(&ops::ListHosts {}).unwrap();
        assert_eq!(serde_json::to_string(&empty).unwrap(), r#"{"cmd":"hosts"}"#);
        let back: Envelope =
            serde_json::from_str(r#"{"cmd":"vm-stop","vm":"web","force":true}"#).unwrap();
        assert_eq!(back, envelope);
    }

    #[test]
    fn an_unknown_error_code_still_reads() {
        let e: ApiError =
            serde_json::from_str(r#"{"code":"quota-exceeded","message":"no room"}"#).unwrap();
        assert_eq!(e.code, ApiErrorCode::Other);
        assert_eq!(e.to_string(), "no room");
    }
}
