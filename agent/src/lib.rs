//! The Dunes host agent: owns the runtimes of one host, reports status and executes the
//! console's commands over QUIC with mutual TLS.

pub mod cidata;
pub mod cli;
pub mod config;
pub mod identity;
pub mod inventory;
pub mod network;
pub mod runtime;
pub mod sampling;
pub mod server;
pub mod storage;
pub mod traffic;
pub mod transfer;
