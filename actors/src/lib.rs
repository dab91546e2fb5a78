//! Cadre's roles as supervised ractor actors, and the wire protocol.
//!
//! - [`protocol`]: every subject and payload (the only place that defines them).
//! - [`model`] and [`machine`]: the task record and its pure state machine.
//! - [`playbook`], [`template`], [`criteria`], [`tools`]: what plans are made of.
//! - [`roles`]: Intake, Planner, Executor, Verifier, Archivist, TaskActor and their
//!   supervisors, the outbox relay, the audit log's publisher.
//! - [`audit`] and [`redact`]: what an audit record holds, with secrets masked.
//! - [`policy`] and [`governance`]: the Cedar policies and the gate every dispatch
//!   passes (allow, deny, approval; cost).

// Tests unwrap: a failed unwrap is a failed test, with its location.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod audit;
pub mod budget;
pub mod bus;
pub mod clock;
pub mod context;
pub mod criteria;
pub mod faults;
pub mod governance;
pub mod json_write;
pub mod knowledge;
pub mod llm;
pub mod machine;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod ownership;
pub mod persona;
pub mod playbook;
pub mod policy;
pub mod protocol;
pub mod rate;
pub mod redact;
pub mod roles;
pub mod schedule;
pub mod secrets;
pub mod template;
pub mod tools;

/// A randomised test's seed: `CADRE_TEST_SEED` if set, else `default`; printed, so a
/// failure can be replayed.
#[cfg(test)]
pub(crate) fn test_seed(default: u64) -> u64 {
    let seed = std::env::var("CADRE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    println!("seed {seed} (CADRE_TEST_SEED to replay)");
    seed
}
