//! The `cadre` binary's library: configuration, the local broker, wiring
//! ([`run::run`]), the HTTP server and the CLI client.

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
