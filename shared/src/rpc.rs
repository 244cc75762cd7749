//! Request/response over QUIC: one request per bidirectional stream.

use serde::Serialize;

use crate::{
    codec::{FrameError, encode_frame, read_frame, write_frame},
    protocol::{Request, Rpc, WireError, codes},
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
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(&mut send, &request.into()).await?;
        send.finish()?;
        let response: Result<R::Response, WireError> = read_frame(&mut recv).await?;
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

/// Encodes the response to a request of type `R`; the type parameter keeps a handler from
/// answering with the wrong response type.
pub fn encode_reply<R: Rpc>(result: Result<R::Response, WireError>) -> Result<Vec<u8>, FrameError> {
    encode_frame(&result)
}

/// Reads the request on a freshly accepted stream. A bad frame stops the stream with a named
/// code and is returned, so the caller can log it; it never panics.
pub async fn read_request(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<Request, FrameError> {
    match read_frame::<_, Request>(recv).await {
        Ok(request) => Ok(request),
        Err(err) => {
            let code = match err {
                FrameError::TooLarge { .. } => Some(codes::STREAM_FRAME_TOO_LARGE),
                FrameError::Undecodable(_) => Some(codes::STREAM_UNDECODABLE),
                _ => None,
            };
            if let Some(code) = code {
                let _ = recv.stop(code);
                let _ = send.reset(code);
            }
            Err(err)
        }
    }
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
