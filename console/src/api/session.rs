//! Requests whose answer opens a session (a VM's console, its screen): the request line,
//! its answer line, and then what the session carries, on the request's own connection.
//! The opening is the same for every kind of session, here once; what each carries is in
//! its own module (`api::console`, `api::screen`).

use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{
    dispatch::{self, SessionEnd},
    ops::{ConsoleVm, ScreenVm},
    types::{Answer, ApiError, Caller, Envelope, Operation},
    views::{ConsoleSession, ScreenSession},
};
use crate::engine::{
    EngineHandle,
    consoles::{ConsoleAttach, ScreenAttach},
};

/// An operation whose response is a session: what the session carries travels beside the
/// response (`Attach`), never in its serde form.
pub trait SessionOperation: Operation + Sync {
    type Attach: Send + 'static;

    /// Takes what the session carries, and the audit of its end, out of an opened session.
    fn detach(session: &mut Self::Response) -> (Option<Self::Attach>, Option<SessionEnd>);

    /// Gives a session opened through an engine elsewhere what it carries: the stream's
    /// halves, after `early` (what came behind the answer line).
    fn relay(
        session: &mut Self::Response,
        early: Vec<u8>,
        recv: quinn::RecvStream,
        send: quinn::SendStream,
    );
}

impl SessionOperation for ConsoleVm {
    type Attach = ConsoleAttach;

    fn detach(session: &mut ConsoleSession) -> (Option<ConsoleAttach>, Option<SessionEnd>) {
        (session.attach.take(), session.end.take())
    }

    fn relay(
        session: &mut ConsoleSession,
        early: Vec<u8>,
        recv: quinn::RecvStream,
        send: quinn::SendStream,
    ) {
        session.attach = Some(ConsoleAttach::relayed(early, recv, send, session.typing));
    }
}

impl SessionOperation for ScreenVm {
    type Attach = ScreenAttach;

    fn detach(session: &mut ScreenSession) -> (Option<ScreenAttach>, Option<SessionEnd>) {
        (session.attach.take(), session.end.take())
    }

    fn relay(
        session: &mut ScreenSession,
        early: Vec<u8>,
        recv: quinn::RecvStream,
        send: quinn::SendStream,
    ) {
        session.attach = Some(ScreenAttach::relayed(early, recv, send, session.typing));
    }
}

/// An opened session on the serving side: what it carries, and the audit of its end, which
/// is written when this is dropped.
pub struct Served<A> {
    pub attach: A,
    pub end: Option<SessionEnd>,
}

/// Runs the session request in `envelope` for `caller` and writes its answer line to
/// `write`. `None`: it was refused (the answer said why) and nothing follows; the stream is
/// finished.
pub async fn open_served<O: SessionOperation>(
    engine: &EngineHandle,
    envelope: Envelope,
    caller: Option<&Caller>,
    write: &mut (impl AsyncWrite + Unpin),
) -> std::io::Result<Option<Served<O::Attach>>> {
    let request = serde_json::from_value::<O>(serde_json::Value::Object(envelope.fields))
        .map_err(|e| ApiError::invalid(format!("bad {} request: {e}", O::NAME)));
    let opened = match request {
        Ok(request) => dispatch::run_checked(engine, request, caller).await,
        Err(e) => Err(e),
    };
    let (answer, served) = match opened {
        Ok(mut session) => {
            let (attach, end) = O::detach(&mut session);
            let value = serde_json::to_value(&session).unwrap_or_default();
            (
                Answer::from_result(Ok(value)),
                attach.map(|attach| Served { attach, end }),
            )
        }
        Err(e) => (Answer::from_result(Err(e)), None),
    };
    let mut line = serde_json::to_vec(&answer).unwrap_or_default();
    line.push(b'\n');
    write.write_all(&line).await?;
    if served.is_none() {
        write.shutdown().await?;
    }
    Ok(served)
}
