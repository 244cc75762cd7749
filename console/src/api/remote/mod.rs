//! The engine's API over the network: QUIC with mutual TLS under the cluster CA, ALPN
//! `dunes-operator/1`. An operator's certificate opens a session once its hello is
//! answered; then each request travels on a bidirectional stream of its own, as the JSON of
//! its [`Envelope`], and its [`Answer`] comes back on the same stream. A console session's
//! request and answer end with a newline instead, and its stream then carries the console's
//! bytes both ways. The engine checks the operator's role on every request.

mod client;
mod hello;
mod server;

pub use client::{ConnectError, RemoteEngine, SessionStreams};
pub use hello::{MAX_REQUEST_BYTES, WATCH, Welcome};
pub use server::{OperatorEndpoint, OperatorEndpointError, serve};
