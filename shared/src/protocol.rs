//! Wire protocol v1: one request per bidirectional stream, the response type tied to the
//! request, status pushed by the agent on one long-lived unidirectional stream.
//!
//! Every enum here is append-only: new variants go at the end, and the golden-bytes tests
//! below keep old messages decodable.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::model::{HostId, HostInventory, HostStatus, TemplateInfo, VmName, VmSpec, VmStatus};

/// ALPN of the control protocol between console and agent.
pub const ALPN_CONTROL: &[u8] = b"dunes/1";
/// ALPN of the enrollment protocol: a console proves a join token and installs a certificate.
pub const ALPN_ENROLL: &[u8] = b"dunes-enroll/1";
/// Version carried by the application-level hello.
pub const PROTOCOL_VERSION: u32 = 1;

/// QUIC application error codes on connections and streams.
pub mod codes {
    use quinn::VarInt;
    /// Orderly close.
    pub const CLOSE_NORMAL: VarInt = VarInt::from_u32(0);
    /// The peer did not present an acceptable certificate for this protocol.
    pub const CLOSE_UNAUTHENTICATED: VarInt = VarInt::from_u32(0x10);
    /// The first stream was not a valid hello.
    pub const CLOSE_BAD_HELLO: VarInt = VarInt::from_u32(0x11);
    /// A frame exceeded the size limit.
    pub const STREAM_FRAME_TOO_LARGE: VarInt = VarInt::from_u32(0x20);
    /// A frame did not decode.
    pub const STREAM_UNDECODABLE: VarInt = VarInt::from_u32(0x21);
}

/// Why a request failed, as sent on the wire: a code plus a human sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    BadRequest,
    NotFound,
    AlreadyExists,
    Conflict,
    Unauthorized,
    InvalidToken,
    Runtime,
    Storage,
    Internal,
    WrongProtocol,
    Unsupported,
}

/// Opens every control connection; the connection is trusted only once this is answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub console_name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloReply {
    pub protocol_version: u32,
    pub inventory: HostInventory,
    pub status: HostStatus,
    pub vms: Vec<VmStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListVms;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListTemplates;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateVm {
    pub spec: VmSpec,
    pub start: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartVm {
    pub name: VmName,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopVm {
    pub name: VmName,
    /// Pull the plug at once instead of asking the guest to shut down.
    pub force: bool,
    /// How long the guest gets to shut down before the plug is pulled.
    pub timeout_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeleteVm {
    pub name: VmName,
}

/// First step of enrollment: prove the join token, hand over the cluster CA, get a CSR.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollBegin {
    pub token: String,
    pub ca_cert_der: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollBeginReply {
    pub host_id: HostId,
    pub csr_der: Vec<u8>,
}

/// Second step: install the CA-signed certificate; the token is spent on success.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollFinish {
    pub token: String,
    pub cert_der: Vec<u8>,
}

/// Every request, as it travels on a bidirectional stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    Hello(Hello),
    ListVms(ListVms),
    ListTemplates(ListTemplates),
    CreateVm(CreateVm),
    StartVm(StartVm),
    StopVm(StopVm),
    DeleteVm(DeleteVm),
    EnrollBegin(EnrollBegin),
    EnrollFinish(EnrollFinish),
}

impl Request {
    /// Short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Hello(_) => "hello",
            Request::ListVms(_) => "list-vms",
            Request::ListTemplates(_) => "list-templates",
            Request::CreateVm(_) => "create-vm",
            Request::StartVm(_) => "start-vm",
            Request::StopVm(_) => "stop-vm",
            Request::DeleteVm(_) => "delete-vm",
            Request::EnrollBegin(_) => "enroll-begin",
            Request::EnrollFinish(_) => "enroll-finish",
        }
    }
}

/// Ties a request type to its response type; the wire carries `Result<Response, WireError>`.
pub trait Rpc: Into<Request> {
    type Response: Serialize + DeserializeOwned + Send + 'static;
}

macro_rules! rpc {
    ($($req:ident => $resp:ty),* $(,)?) => {
        $(
            impl Rpc for $req {
                type Response = $resp;
            }
            impl From<$req> for Request {
                fn from(value: $req) -> Request {
                    Request::$req(value)
                }
            }
        )*
    };
}

rpc! {
    Hello => HelloReply,
    ListVms => Vec<VmStatus>,
    ListTemplates => Vec<TemplateInfo>,
    CreateVm => VmStatus,
    StartVm => VmStatus,
    StopVm => VmStatus,
    DeleteVm => (),
    EnrollBegin => EnrollBeginReply,
    EnrollFinish => (),
}

/// What an agent pushes on its event stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AgentEvent {
    HostStatus(HostStatus),
    VmChanged(VmStatus),
    VmRemoved {
        name: VmName,
    },
    Inventory(HostInventory),
    /// The whole VM list, replacing what the console holds (sent when events were dropped).
    VmList(Vec<VmStatus>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{TemplateName, VmState};

    fn golden<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
        value: &T,
        hex_bytes: &str,
    ) {
        let bytes = postcard::to_allocvec(value).unwrap();
        assert_eq!(
            hex::encode(&bytes),
            hex_bytes,
            "encoding of {value:?} changed"
        );
        let decoded: T = postcard::from_bytes(&hex::decode(hex_bytes).unwrap()).unwrap();
        assert_eq!(&decoded, value);
    }

    #[test]
    fn golden_requests() {
        golden(
            &Request::Hello(Hello {
                protocol_version: 1,
                console_name: "c".into(),
            }),
            "00010163",
        );
        golden(&Request::ListVms(ListVms), "01");
        golden(
            &Request::CreateVm(CreateVm {
                spec: VmSpec {
                    name: VmName::new("web").unwrap(),
                    template: TemplateName::new("tiny").unwrap(),
                    vcpus: Some(2),
                    memory_mib: None,
                },
                start: true,
            }),
            "03037765620474696e7901020001",
        );
        golden(
            &Request::StopVm(StopVm {
                name: VmName::new("a").unwrap(),
                force: false,
                timeout_secs: 300,
            }),
            "050161 00ac02".replace(' ', "").as_str(),
        );
        golden(
            &Request::EnrollFinish(EnrollFinish {
                token: "t".into(),
                cert_der: vec![1, 2],
            }),
            "0801740201 02".replace(' ', "").as_str(),
        );
    }

    #[test]
    fn golden_responses_and_events() {
        let vm = VmStatus {
            uuid: "u".into(),
            name: VmName::new("a").unwrap(),
            state: VmState::Shutoff,
            vcpus: 1,
            memory_mib: 128,
            template: None,
            disk_bytes: 0,
        };
        golden(
            &AgentEvent::VmChanged(vm.clone()),
            "01017501610101800100 00".replace(' ', "").as_str(),
        );
        golden(
            &AgentEvent::VmRemoved {
                name: VmName::new("a").unwrap(),
            },
            "020161",
        );
        let err: Result<(), WireError> = Err(WireError::new(ErrorCode::NotFound, "x"));
        golden(&err, "01010178");
        let ok: Result<Vec<VmStatus>, WireError> = Ok(vec![vm]);
        golden(&ok, "0001017501610101800100 00".replace(' ', "").as_str());
    }
}
