//! Supervises the TaskActors: starts one per task, resumes every non-terminal task when
//! the node starts, restarts a crashed one with backoff from its checkpoint, and gives
//! up on (fails) a task whose actor keeps crashing rather than taking the node down.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use storage::Cf;

use crate::context::NodeContext;
use crate::machine::Rejected;
use crate::model::{ApprovalDecision, DecisionKind, Task, TaskStatus};
use crate::roles::supervisor::RestartPolicy;
use crate::roles::task::{TaskActor, TaskArgs, TaskMsg};

#[derive(Clone, Copy)]
pub struct TaskSupervisor;

pub struct TaskSupervisorArgs {
    pub ctx: Arc<NodeContext>,
    /// Resume every non-terminal task as soon as it starts. False at node start (the
    /// node resumes once every role is up); true when restarted after a crash, since
    /// its TaskActors died with it.
    pub resume_on_start: bool,
}

pub struct TaskSupervisorState {
    ctx: Arc<NodeContext>,
    running: HashMap<String, ActorRef<TaskMsg>>,
    by_actor: HashMap<ActorId, String>,
    crashes: HashMap<String, VecDeque<Instant>>,
    policy: RestartPolicy,
}

/// Why a cancel or resolve could not be done.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ControlError {
    #[error("no task `{0}`")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
}

pub type ControlReply = RpcReplyPort<Result<TaskStatus, ControlError>>;

pub enum TaskSupervisorMsg {
    /// A task was just committed as accepted: drive it. `accepted_ticket`: the store
    /// group that wrote it, when it is not yet synced; no step is dispatched before.
    Start {
        task_id: String,
        accepted_ticket: Option<u64>,
    },
    /// Resume every non-terminal, non-parked task from the store; replies with the count.
    ResumeAll(RpcReplyPort<usize>),
    /// The same, with no one waiting for the count.
    Resume,
    Cancel {
        task_id: String,
        reason: String,
        reply: ControlReply,
    },
    Resolve {
        task_id: String,
        step: String,
        decision: DecisionKind,
        by: String,
        note: Option<String>,
        reply: ControlReply,
    },
    Signal {
        task_id: String,
        event: String,
        payload: Option<serde_json::Value>,
        by: String,
        reply: ControlReply,
    },
    Decide {
        task_id: String,
        approval_id: String,
        decision: ApprovalDecision,
        by: String,
        note: Option<String>,
        reply: ControlReply,
    },
    /// NATS reconnected: requests in flight may have been lost with the connection.
    Reconnected,
    /// Another node's lease on this task expired: try to take it over.
    TakeOver(String),
    /// This node lost the task's lease: its actor stops, then claims again (which
    /// either finds the new owner and stays down, or takes the task back).
    LeaseLost(String),
    /// Start a crashed task's actor again (after its backoff), or abandon it.
    Respawn {
        task_id: String,
        abandon: Option<String>,
    },
    /// How many TaskActors run now.
    Count(RpcReplyPort<usize>),
}

impl Actor for TaskSupervisor {
    type Msg = TaskSupervisorMsg;
    type State = TaskSupervisorState;
    type Arguments = TaskSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: TaskSupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        if args.resume_on_start {
            myself.cast(TaskSupervisorMsg::Resume)?;
        }
        let policy = RestartPolicy {
            restarts_max: args.ctx.settings.task_restarts_max,
            window: args.ctx.settings.restart_window,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
        };
        Ok(TaskSupervisorState {
            ctx: args.ctx,
            running: HashMap::new(),
            by_actor: HashMap::new(),
            crashes: HashMap::new(),
            policy,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TaskSupervisorMsg::Start {
                task_id,
                accepted_ticket,
            } => {
                state.start(&myself, &task_id, accepted_ticket).await;
            }
            TaskSupervisorMsg::ResumeAll(reply) => {
                let started = state.resume_all(&myself).await?;
                let _ = reply.send(started);
            }
            TaskSupervisorMsg::Resume => {
                state.resume_all(&myself).await?;
            }
            TaskSupervisorMsg::Cancel {
                task_id,
                reason,
                reply,
            } => {
                state
                    .control(&myself, &task_id, reply, move |port| TaskMsg::Cancel {
                        reason,
                        reply: port,
                    })
                    .await;
            }
            TaskSupervisorMsg::Signal {
                task_id,
                event,
                payload,
                by,
                reply,
            } => {
                state
                    .control(&myself, &task_id, reply, move |port| TaskMsg::Signal {
                        event,
                        payload,
                        by,
                        reply: port,
                    })
                    .await;
            }
            TaskSupervisorMsg::Resolve {
                task_id,
                step,
                decision,
                by,
                note,
                reply,
            } => {
                state
                    .control(&myself, &task_id, reply, move |port| TaskMsg::Resolve {
                        step,
                        decision,
                        by,
                        note,
                        reply: port,
                    })
                    .await;
            }
            TaskSupervisorMsg::Decide {
                task_id,
                approval_id,
                decision,
                by,
                note,
                reply,
            } => {
                state
                    .control(&myself, &task_id, reply, move |port| TaskMsg::Decide {
                        approval_id,
                        decision,
                        by,
                        note,
                        reply: port,
                    })
                    .await;
            }
            TaskSupervisorMsg::Reconnected => {
                for task in state.running.values() {
                    let _ = task.cast(TaskMsg::Reconnected);
                }
            }
            TaskSupervisorMsg::TakeOver(task_id) => {
                state.ensure(&myself, &task_id, None).await;
            }
            TaskSupervisorMsg::LeaseLost(task_id) => {
                if let Some(task) = state.running.get(&task_id) {
                    let _ = task.cast(TaskMsg::StandDown {
                        reason: "the task's lease was lost".into(),
                        retry: true,
                    });
                }
            }
            TaskSupervisorMsg::Respawn { task_id, abandon } => {
                state.ensure(&myself, &task_id, abandon).await;
            }
            TaskSupervisorMsg::Count(reply) => {
                let _ = reply.send(state.running.len());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if let Some(task_id) = state.by_actor.remove(&cell.get_id()) {
                    state.running.remove(&task_id);
                    state.crashes.remove(&task_id);
                }
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(task_id) = state.by_actor.remove(&cell.get_id()) else {
                    return Ok(());
                };
                state.running.remove(&task_id);
                state
                    .ctx
                    .metrics
                    .actor_restarts_total
                    .with_label_values(&["task"])
                    .inc();
                let history = state.crashes.entry(task_id.clone()).or_default();
                let (delay, abandon) = match state.policy.on_failure(history, Instant::now()) {
                    Some(delay) => {
                        tracing::warn!(task_id, error = %err, ?delay, "task actor failed; restarting from checkpoint");
                        (delay, None)
                    }
                    None => {
                        let reason = format!(
                            "task actor failed {} times within {:?}; last error: {err}",
                            history.len(),
                            state.policy.window
                        );
                        tracing::error!(task_id, %reason, "abandoning task");
                        history.clear();
                        (Duration::ZERO, Some(reason))
                    }
                };
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = myself.cast(TaskSupervisorMsg::Respawn { task_id, abandon });
                });
            }
            _ => {}
        }
        state
            .ctx
            .metrics
            .tasks_in_flight
            .set(state.running.len() as i64);
        Ok(())
    }
}

impl TaskSupervisorState {
    /// Starts an actor for every non-terminal task that is not parked.
    async fn resume_all(
        &mut self,
        myself: &ActorRef<TaskSupervisorMsg>,
    ) -> Result<usize, ActorProcessingErr> {
        let active = self.ctx.store.keys(Cf::Active)?;
        let mut started = 0;
        for key in active {
            if self.ctx.store.get::<bool>(Cf::Active, &key)? == Some(true) {
                continue; // parked: waits for an operator, costs no actor
            }
            let task_id = String::from_utf8_lossy(&key).into_owned();
            if self.ensure(myself, &task_id, None).await.is_some() {
                started += 1;
            }
        }
        tracing::info!(tasks = started, "resumed non-terminal tasks");
        Ok(started)
    }

    /// The task's actor, starting it if needed. `None` if it cannot be started.
    async fn ensure(
        &mut self,
        myself: &ActorRef<TaskSupervisorMsg>,
        task_id: &str,
        abandon: Option<String>,
    ) -> Option<ActorRef<TaskMsg>> {
        self.spawn(myself, task_id, abandon, false, None).await
    }

    /// Drives a task just accepted (see [`TaskSupervisorMsg::Start`]).
    async fn start(
        &mut self,
        myself: &ActorRef<TaskSupervisorMsg>,
        task_id: &str,
        accepted_ticket: Option<u64>,
    ) {
        self.spawn(myself, task_id, None, false, accepted_ticket)
            .await;
    }

    async fn spawn(
        &mut self,
        myself: &ActorRef<TaskSupervisorMsg>,
        task_id: &str,
        abandon: Option<String>,
        hold_after_start: bool,
        accepted_ticket: Option<u64>,
    ) -> Option<ActorRef<TaskMsg>> {
        if let Some(actor) = self.running.get(task_id) {
            return Some(actor.clone());
        }
        let args = TaskArgs {
            ctx: self.ctx.clone(),
            task_id: task_id.to_string(),
            abandon,
            hold_after_start,
            accepted_ticket,
        };
        match Actor::spawn_linked(None, TaskActor, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.by_actor.insert(actor.get_id(), task_id.to_string());
                self.running.insert(task_id.to_string(), actor.clone());
                self.ctx
                    .metrics
                    .tasks_in_flight
                    .set(self.running.len() as i64);
                Some(actor)
            }
            Err(e) => {
                tracing::error!(task_id, error = %e, "cannot start task actor");
                None
            }
        }
    }

    /// Forwards a cancel/resolve to the task's actor (starting a parked one), answering
    /// from the store when the task is unknown or already over.
    async fn control(
        &mut self,
        myself: &ActorRef<TaskSupervisorMsg>,
        task_id: &str,
        reply: ControlReply,
        build: impl FnOnce(RpcReplyPort<Result<TaskStatus, Rejected>>) -> TaskMsg + Send + 'static,
    ) {
        if !self.running.contains_key(task_id) {
            let mut stored = self.ctx.store.get::<Task>(Cf::Tasks, task_id.as_bytes());
            // In a cluster the task may be known only to the replicated checkpoints (it
            // parked on another node, which released it); its actor adopts that record.
            if let (Ok(None), Some(own)) = (&stored, self.ctx.ownership()) {
                match own.load_checkpoint(task_id).await {
                    Ok(found) => stored = Ok(found.map(|(task, _, _)| task)),
                    Err(e) => {
                        let _ = reply.send(Err(ControlError::Unavailable(e.to_string())));
                        return;
                    }
                }
            }
            match stored {
                Ok(None) => {
                    let _ = reply.send(Err(ControlError::NotFound(task_id.to_string())));
                    return;
                }
                Ok(Some(task)) if task.status.is_terminal() => {
                    let _ = reply.send(Err(ControlError::Conflict(format!(
                        "task is already {}",
                        task.status
                    ))));
                    return;
                }
                Ok(Some(_)) => {}
                Err(e) => {
                    let _ = reply.send(Err(ControlError::Unavailable(e.to_string())));
                    return;
                }
            }
        }
        // A parked task's actor is started to take this message: it must not passivate
        // before the message arrives.
        let Some(actor) = self.spawn(myself, task_id, None, true, None).await else {
            let _ = reply.send(Err(ControlError::Unavailable(
                "cannot start the task's actor".into(),
            )));
            return;
        };
        let timeout = self.ctx.settings.hop_timeout;
        tokio::spawn(async move {
            let result = match actor.call(build, Some(timeout)).await {
                Ok(ractor::rpc::CallResult::Success(Ok(status))) => Ok(status),
                Ok(ractor::rpc::CallResult::Success(Err(Rejected(why)))) => {
                    Err(ControlError::Conflict(why))
                }
                Ok(_) | Err(_) => Err(ControlError::Unavailable(
                    "the task's actor did not answer; retry".into(),
                )),
            };
            let _ = reply.send(result);
        });
    }
}

/// Over the node's active tasks: steps whose outcome is unknown, and approvals pending.
/// The gauges of both start from these at boot; each TaskActor then moves them by what
/// its commits change.
pub fn waiting_on_people(store: &storage::Store) -> Result<(i64, i64), storage::StoreError> {
    let (mut unknown, mut pending) = (0, 0);
    for key in store.keys(Cf::Active)? {
        if let Some(task) = store.get::<crate::model::Task>(Cf::Tasks, &key)? {
            unknown += crate::roles::task::unknown_steps(&task);
            pending += crate::roles::task::pending_approvals(&task);
        }
    }
    Ok((unknown, pending))
}
