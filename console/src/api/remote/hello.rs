//! What both ends of the operator endpoint agree on: the hello, its limits, the close codes.

use std::time::Duration;

use dunes_shared::model::OperatorName;
use serde::{Deserialize, Serialize};

use crate::api::types::ApiError;

/// The version of the hello; a newer client's unknown fields are ignored.
pub(super) const HELLO_VERSION: u32 = 1;
/// Before its hello is answered a connection may send this much, within this long.
pub(super) const HELLO_BYTES: usize = 4 * 1024;
pub(super) const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes and hellos in progress at once; more are refused before any crypto.
pub(super) const UNAUTHENTICATED_CONCURRENT: usize = 32;
/// Requests one session may have in flight.
pub(super) const STREAMS_PER_SESSION: u32 = 64;
/// The largest request (a service file travels in one) and the largest answer.
pub const MAX_REQUEST_BYTES: usize = crate::api::socket::MAX_REQUEST_BYTES;
pub(super) const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

pub(super) mod close {
    use quinn::VarInt;
    pub const DONE: VarInt = VarInt::from_u32(0);
    pub const REFUSED: VarInt = VarInt::from_u32(1);
    pub const REVOKED: VarInt = VarInt::from_u32(2);
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Hello {
    pub(super) version: u32,
    /// What the client can do beyond the version (none yet).
    #[serde(default)]
    pub(super) features: Vec<String>,
}

/// The engine's answer to a hello: who it is and who it takes the client for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The engine's name (its data dir's name) and version.
    pub engine: String,
    pub version: String,
    pub operator: OperatorName,
    pub role: String,
    /// What their changes are limited to (`service:shop`); empty: everything.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Whether they may open VMs' consoles and screens; absent from older engines (then as
    /// their role gives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consoles: Option<bool>,
    #[serde(default)]
    pub features: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct HelloAnswer {
    #[serde(default)]
    pub(super) welcome: Option<Welcome>,
    #[serde(default)]
    pub(super) error: Option<ApiError>,
}

/// The request that turns its stream into the snapshot's feed.
pub const WATCH: &str = "watch";

/// Reads a request or an answer: up to its newline (a console session's request and answer
/// end with one, and the stream goes on with the console's bytes, returned as the rest), or
/// to the end of the stream (every other request). At most `max` bytes.
pub(super) async fn read_message(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<(Vec<u8>, Vec<u8>), String> {
    let mut message = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match recv.read(&mut chunk).await.map_err(|e| e.to_string())? {
            None => return Ok((message, Vec::new())),
            Some(n) => {
                message.extend_from_slice(&chunk[..n]);
                if let Some(at) = message.iter().position(|b| *b == b'\n') {
                    let rest = message.split_off(at + 1);
                    message.pop();
                    return Ok((message, rest));
                }
                if message.len() > max {
                    return Err(format!("longer than {max} bytes"));
                }
            }
        }
    }
}
