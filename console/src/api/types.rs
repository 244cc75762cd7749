//! The API's types: an operation with its response, who asks, the errors, and the form a
//! request and its answer take on a stream.

use std::future::Future;

use dunes_shared::{model::OperatorName, pki::Fingerprint};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::engine::{
    EngineError, EngineHandle,
    operators::{Role, access},
};

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
        caller: Option<&Caller>,
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

    pub(super) fn unavailable(message: impl Into<String>) -> ApiError {
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

/// Who a request comes from, when it comes from an operator.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: OperatorName,
    pub fingerprint: Fingerprint,
    pub role: Role,
    pub scopes: Vec<access::Scope>,
    /// May open VMs' consoles and screens.
    pub consoles: bool,
}

impl Caller {
    /// Whether this caller may run `request` on the fleet `snapshot` shows: their role, then
    /// (for a change) their scopes. The engine checks this on every request; a window
    /// checks it first to grey out what would be refused.
    pub fn permits<O: Operation>(
        &self,
        request: &O,
        snapshot: &crate::engine::Snapshot,
    ) -> Result<(), ApiError> {
        let changes = request.changes();
        self.check(O::NAME, O::ACTION, changes)?;
        match changes && !self.scopes.is_empty() {
            true => self.check_scope(O::ACTION, &request.targets(snapshot)),
            false => Ok(()),
        }
    }

    pub(super) fn check_scope(
        &self,
        action: &str,
        targets: &[access::Target],
    ) -> Result<(), ApiError> {
        access::check_scope(&self.name, self.role, &self.scopes, action, targets).map_err(
            |message| ApiError {
                code: ApiErrorCode::Forbidden,
                message,
            },
        )
    }

    /// Whether the caller's role allows `operation` (scopes aside).
    pub fn check(&self, operation: &str, action: &str, changes: bool) -> Result<(), ApiError> {
        access::check(
            &self.name,
            self.role,
            self.consoles,
            operation,
            action,
            changes,
        )
        .map_err(|message| ApiError {
            code: ApiErrorCode::Forbidden,
            message,
        })
    }
}
