//! Pure types and functions shared by the Dunes console and agents: the model, the wire
//! protocol and its codec, PKI helpers and the request/response helpers over QUIC.
//!
//! Nothing here creates a runtime, talks to libvirt, or touches a database.

pub mod cloud_init;
pub mod codec;
pub mod durable;
pub mod extents;
pub mod model;
pub mod network;
pub mod pki;
pub mod protocol;
pub mod rpc;
pub mod service;
pub mod token;
pub mod transfer;

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

/// A command-line parser's error as rendered (the message, perhaps a tip, then a usage block)
/// turned into one line: the message and the tip, without the usage and the "error: " prefix.
pub fn usage_error_line(rendered: &str) -> String {
    let parts: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    let line = parts.join(" ");
    line.strip_prefix("error: ").unwrap_or(&line).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn usage_errors_become_one_line() {
        let rendered = "error: the following required arguments were not provided:\n  --token <TOKEN>\n\nUsage: dunes-console ctl host add --token <TOKEN> <ADDRESS>\n\nFor more information, try '--help'.\n";
        assert_eq!(
            super::usage_error_line(rendered),
            "the following required arguments were not provided: --token <TOKEN>"
        );
    }
}
