//! Pure types and functions shared by the Dunes console and agents: the model, the wire
//! protocol and its codec, PKI helpers and the request/response helpers over QUIC.
//!
//! Nothing here creates a runtime, talks to libvirt, or touches a database.

pub mod codec;
pub mod model;
pub mod pki;
pub mod protocol;
pub mod rpc;
pub mod token;

/// An error with its sources, as one line: "outer: inner: innermost".
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}
