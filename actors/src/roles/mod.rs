//! The roles, as ractor actors. Every actor has the same shape: a zero-sized actor
//! type, `…Args` given at spawn, `…State` built in `pre_start`, a `…Msg` enum; requests
//! to another role go over NATS with a timeout, never through its code.

pub mod archivist;
pub mod audit;
pub mod executor;
pub mod governor;
pub mod intake;
pub mod knowledge;
pub mod leases;
pub mod membership;
pub mod planner;
pub mod relay;
pub mod scheduler;
pub mod secrets;
pub mod supervisor;
pub mod task;
pub mod task_api;
pub mod task_supervisor;
pub mod verifier;

use ractor::{ActorRef, registry};

/// Registered name of a node's singleton actor: `tasks@laptop`. Node-qualified so
/// several nodes can share one process in tests.
pub fn actor_name(role: &str, node_id: &str) -> String {
    // Built on every lookup, several times per task: concatenated, not `format!`ted.
    let mut name = String::with_capacity(role.len() + 1 + node_id.len());
    name.push_str(role);
    name.push('@');
    name.push_str(node_id);
    name
}

/// Looks a singleton up by name; `None` while it restarts.
pub fn lookup<M: ractor::Message>(role: &str, node_id: &str) -> Option<ActorRef<M>> {
    registry::where_is(actor_name(role, node_id)).map(ActorRef::from)
}

pub const RELAY: &str = "relay";
pub const TASKS: &str = "tasks";
pub const PLANNER: &str = "planner";
pub const EXECUTOR: &str = "executor";
pub const VERIFIER: &str = "verifier";
pub const ARCHIVIST: &str = "archivist";
pub const TASK_API: &str = "task-api";
pub const INTAKE: &str = "intake";
pub const AUDIT: &str = "audit";
pub const GOVERNOR: &str = "governor";
pub const MEMBERSHIP: &str = "membership";
pub const LEASES: &str = "leases";
pub const KNOWLEDGE: &str = "knowledge";
pub const SCHEDULER: &str = "scheduler";
pub const SECRETS: &str = "secrets";

/// Every singleton a node runs: all must be up for the node to be ready.
pub const NODE_ROLES: &[&str] = &[
    RELAY, AUDIT, GOVERNOR, TASKS, LEASES, PLANNER, EXECUTOR, VERIFIER, ARCHIVIST, INTAKE,
    TASK_API, MEMBERSHIP, KNOWLEDGE, SCHEDULER, SECRETS,
];
