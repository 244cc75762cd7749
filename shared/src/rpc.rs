//! Request/response over QUIC: one request per bidirectional stream.

use std::{collections::BTreeSet, sync::Arc};

use serde::Serialize;

use crate::{
    codec::{
        Decoded, FrameError, MAX_FRAME_BYTES, decode_message, encode_frame, read_frame_limited,
        read_payload, write_frame,
    },
    protocol::{ErrorCode, Request, Rpc, WireError, codes},
};

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("connection lost")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream closed early")]
    Closed(#[from] quinn::ClosedStream),
    #[error("bad frame")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Remote(WireError),
    /// Refused before sending: the peer did not announce what the request needs.
    #[error("the peer does not offer {feature} (needed for {request}); update it")]
    NotOffered {
        request: &'static str,
        feature: &'static str,
    },
}

impl CallError {
    /// The agent's own answer, when it gave one.
    pub fn remote(&self) -> Option<&WireError> {
        match self {
            CallError::Remote(e) => Some(e),
            _ => None,
        }
    }
}

/// Sends one request and waits for its typed response.
pub async fn call<R: Rpc>(conn: &quinn::Connection, request: R) -> Result<R::Response, CallError> {
    call_limited(conn, request, MAX_FRAME_BYTES).await
}

/// As [`call`], with a limit on the response's size (small before the peer is trusted).
pub async fn call_limited<R: Rpc>(
    conn: &quinn::Connection,
    request: R,
    limit: usize,
) -> Result<R::Response, CallError> {
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(&mut send, &request.into()).await?;
        send.finish()?;
        let response: Result<R::Response, WireError> = read_frame_limited(&mut recv, limit)
            .await?
            .ok_or(FrameError::Truncated)?;
        response.map_err(CallError::Remote)
    };
    match exchange.await {
        // A stream error on a closed connection is best told by why the connection closed.
        Err(CallError::Frame(_) | CallError::Closed(_)) if conn.close_reason().is_some() => {
            Err(CallError::Connection(conn.close_reason().expect("checked")))
        }
        other => other,
    }
}

/// A connection whose hello is done, with the features its peer announced.
#[derive(Debug, Clone)]
pub struct Peer {
    pub conn: quinn::Connection,
    features: Arc<BTreeSet<String>>,
}

impl Peer {
    pub fn new(conn: quinn::Connection, features: &[String]) -> Self {
        Peer {
            conn,
            features: Arc::new(features.iter().cloned().collect()),
        }
    }

    pub fn offers(&self, feature: &str) -> bool {
        self.features.contains(feature)
    }

    pub fn features(&self) -> impl Iterator<Item = &str> {
        self.features.iter().map(String::as_str)
    }

    /// Sends `request` if the peer announced its feature; refuses it locally otherwise.
    pub async fn call<R: Rpc>(&self, request: R) -> Result<R::Response, CallError> {
        if let Some(feature) = R::FEATURE
            && !self.offers(feature)
        {
            return Err(CallError::NotOffered {
                request: R::KIND,
                feature,
            });
        }
        call(&self.conn, request).await
    }
}

/// Encodes the response to a request of type `R`; the type parameter keeps a handler from
/// answering with the wrong response type.
pub fn encode_reply<R: Rpc>(result: Result<R::Response, WireError>) -> Result<Vec<u8>, FrameError> {
    encode_frame(&result)
}

/// A request as read from a stream.
#[derive(Debug)]
pub enum Incoming {
    Request(Request),
    /// A request a newer peer added: answer [`unsupported_reply`].
    Unknown(String),
}

/// Reads the request on a freshly accepted stream, at most `limit` bytes. A bad frame stops
/// the stream with a named code and is returned, so the caller can log it; it never panics.
pub async fn read_request(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<Incoming, FrameError> {
    let read = async {
        let payload = read_payload(recv, limit)
            .await?
            .ok_or(FrameError::Truncated)?;
        decode_message::<Request>(&payload)
    };
    match read.await {
        Ok(Decoded::Known(request)) => Ok(Incoming::Request(request)),
        Ok(Decoded::Unknown(kind)) => Ok(Incoming::Unknown(kind)),
        Err(err) => {
            if let Some(code) = frame_error_code(&err) {
                let _ = recv.stop(code);
                let _ = send.reset(code);
            }
            Err(err)
        }
    }
}

/// The code a bad frame is refused with, when it is the peer's fault.
pub fn frame_error_code(err: &FrameError) -> Option<quinn::VarInt> {
    match err {
        FrameError::TooLarge { .. } => Some(codes::STREAM_FRAME_TOO_LARGE),
        FrameError::Undecodable(_) => Some(codes::STREAM_UNDECODABLE),
        _ => None,
    }
}

/// The answer to a request this release does not know; an `Err` decodes whatever response
/// type the sender expects.
pub fn unsupported_reply(kind: &str) -> Result<Vec<u8>, FrameError> {
    encode_frame(&Err::<(), _>(WireError::new(
        ErrorCode::Unsupported,
        format!("this peer does not know the request {kind}; update it"),
    )))
}

/// Writes an encoded reply and finishes the stream.
pub async fn send_reply(send: &mut quinn::SendStream, frame: &[u8]) -> Result<(), FrameError> {
    send.write_all(frame).await.map_err(std::io::Error::from)?;
    let _ = send.finish();
    Ok(())
}

/// Pushes one event on a unidirectional stream.
pub async fn push_event<T: Serialize>(
    send: &mut quinn::SendStream,
    event: &T,
) -> Result<(), FrameError> {
    write_frame(send, event).await
}
