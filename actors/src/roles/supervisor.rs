//! The node's root supervisor. ractor has no restart strategy (its default supervisor
//! stops when a child fails), so this one provides it: a failed child is restarted
//! after a backoff; more than `restarts_max` failures of one child within `window` is
//! fatal, and the node exits non-zero so systemd or Docker restarts the process, which
//! resumes every task from its checkpoint.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SpawnErr, SupervisionEvent};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

pub type SpawnFn =
    Arc<dyn Fn(ActorCell) -> BoxFuture<'static, Result<ActorCell, SpawnErr>> + Send + Sync>;

/// One supervised child: how to (re)start it, linked to the supervisor.
#[derive(Clone)]
pub struct ChildSpec {
    pub name: &'static str,
    pub spawn: SpawnFn,
}

#[derive(Debug, Clone)]
pub struct RestartPolicy {
    pub restarts_max: u32,
    pub window: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            restarts_max: 5,
            window: Duration::from_secs(60),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

impl RestartPolicy {
    /// Records a failure at `now`; `Some(delay)` to restart after, `None` when the
    /// child failed too often and the failure must escalate.
    pub fn on_failure(&self, history: &mut VecDeque<Instant>, now: Instant) -> Option<Duration> {
        while history
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            history.pop_front();
        }
        history.push_back(now);
        if history.len() as u32 > self.restarts_max {
            return None;
        }
        let exp = 1u32 << (history.len() as u32 - 1).min(16);
        Some((self.backoff_base * exp).min(self.backoff_max))
    }
}

pub struct NodeSupervisor;

pub struct NodeSupervisorArgs {
    pub children: Vec<ChildSpec>,
    pub policy: RestartPolicy,
    pub metrics: Arc<Metrics>,
    /// Told once, with the reason, when a child exceeds its restart limit.
    pub fatal: mpsc::UnboundedSender<String>,
}

pub struct NodeSupervisorState {
    specs: HashMap<&'static str, ChildSpec>,
    running: HashMap<ActorId, &'static str>,
    history: HashMap<&'static str, VecDeque<Instant>>,
    policy: RestartPolicy,
    metrics: Arc<Metrics>,
    fatal: mpsc::UnboundedSender<String>,
    stopping: bool,
}

pub enum NodeSupervisorMsg {
    Restart(&'static str),
    /// Stop restarting children: the node is shutting down. A call, not a cast: ractor
    /// hands an actor its children's exits before its messages, so the shutdown must
    /// know this was taken before it stops a child, or the exit reads as a failure
    /// (an `error` line per stopped role, and a restart scheduled).
    Stopping(ractor::RpcReplyPort<()>),
}

impl Actor for NodeSupervisor {
    type Msg = NodeSupervisorMsg;
    type State = NodeSupervisorState;
    type Arguments = NodeSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: NodeSupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state = NodeSupervisorState {
            specs: HashMap::new(),
            running: HashMap::new(),
            history: HashMap::new(),
            policy: args.policy,
            metrics: args.metrics,
            fatal: args.fatal,
            stopping: false,
        };
        // Children start in the order given; a child that cannot start fails the node.
        for spec in args.children {
            let cell = (spec.spawn)(myself.get_cell())
                .await
                .map_err(|e| format!("cannot start {}: {e}", spec.name))?;
            state.running.insert(cell.get_id(), spec.name);
            state.specs.insert(spec.name, spec);
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeSupervisorMsg::Stopping(taken) => {
                state.stopping = true;
                let _ = taken.send(());
            }
            NodeSupervisorMsg::Restart(name) if !state.stopping => {
                let Some(spec) = state.specs.get(name).cloned() else {
                    return Ok(());
                };
                match (spec.spawn)(myself.get_cell()).await {
                    Ok(cell) => {
                        tracing::info!(actor = name, "restarted");
                        state.running.insert(cell.get_id(), name);
                    }
                    Err(e) => {
                        tracing::error!(actor = name, error = %e, "restart failed");
                        self.child_failed(&myself, state, name, e.to_string());
                    }
                }
            }
            NodeSupervisorMsg::Restart(_) => {}
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, format!("failed: {err}")),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell,
                format!("stopped: {}", reason.unwrap_or_else(|| "no reason".into())),
            ),
            _ => return Ok(()),
        };
        let Some(name) = state.running.remove(&cell.get_id()) else {
            return Ok(());
        };
        if state.stopping {
            return Ok(());
        }
        tracing::error!(actor = name, %reason, "supervised actor ended");
        self.child_failed(&myself, state, name, reason);
        Ok(())
    }
}

impl NodeSupervisor {
    fn child_failed(
        &self,
        myself: &ActorRef<NodeSupervisorMsg>,
        state: &mut NodeSupervisorState,
        name: &'static str,
        reason: String,
    ) {
        state
            .metrics
            .actor_restarts_total
            .with_label_values(&[name])
            .inc();
        let history = state.history.entry(name).or_default();
        match state.policy.on_failure(history, Instant::now()) {
            Some(delay) => {
                let myself = myself.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = myself.cast(NodeSupervisorMsg::Restart(name));
                });
            }
            None => {
                state.stopping = true;
                let _ = state.fatal.send(format!(
                    "actor `{name}` failed more than {} times in {:?}; last: {reason}",
                    state.policy.restarts_max, state.policy.window
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_escalates() {
        let policy = RestartPolicy {
            restarts_max: 3,
            window: Duration::from_secs(10),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(250),
        };
        let mut h = VecDeque::new();
        let t0 = Instant::now();
        assert_eq!(
            policy.on_failure(&mut h, t0),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            policy.on_failure(&mut h, t0),
            Some(Duration::from_millis(200))
        );
        assert_eq!(
            policy.on_failure(&mut h, t0),
            Some(Duration::from_millis(250))
        );
        assert_eq!(policy.on_failure(&mut h, t0), None);
        // Failures older than the window are forgotten.
        let mut h = VecDeque::new();
        for i in 0..10 {
            assert!(
                policy
                    .on_failure(&mut h, t0 + Duration::from_secs(11 * i))
                    .is_some()
            );
        }
    }
}
