//! The `cadre` binary's library: configuration, the local broker, wiring
//! ([`run::run`]), the HTTP server and the CLI client.

// Tests unwrap: a failed unwrap is a failed test, with its location.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cli;
pub mod config;
pub mod console;
pub mod hooks;
pub mod http;
pub mod local_nats;
pub mod nats_url;
pub mod run;

pub use config::Config;
pub use run::run;
