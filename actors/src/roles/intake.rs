//! Intake: `cadre.tasks.submit` (request/reply) and `cadre.tasks.enqueue` (JetStream).
//!
//! Validates, dedupes by idempotency key, commits the task as `accepted` (synced, with
//! its first event), and only then answers: an acknowledged task is never lost. A
//! second submission with a key still being committed waits for that commit and gets
//! the same task id.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::de::DeserializeOwned;
use serde_json::Value;
use storage::{Batch, Cf, StoreError};
use tokio::task::JoinHandle;

use crate::bus::{self, Inbound};
use crate::context::{NodeContext, OutboxEntry};
use crate::model::{GOAL_PLAYBOOK, JsonText, Task, TaskStatus};
use crate::playbook::Catalog;
use crate::protocol::{
    ErrorCode, ErrorReply, IntakeRejected, SubmitReply, SubmitRequest, TaskEvent, subject,
};
use crate::roles::relay::RelayMsg;
use crate::roles::task_supervisor::TaskSupervisorMsg;
use crate::roles::{RELAY, TASKS, lookup};

/// Longest client idempotency key accepted.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 256;
/// Longest free-text goal, in characters.
pub const GOAL_CHARS_MAX: usize = 8_000;

#[derive(Clone, Copy)]
pub struct Intake;

pub struct IntakeArgs {
    pub ctx: Arc<NodeContext>,
    pub catalog: Arc<Catalog>,
}

pub struct IntakeState {
    ctx: Arc<NodeContext>,
    catalog: Arc<Catalog>,
    rng: StdRng,
    /// Keys being committed → waiters for the same task.
    pending: HashMap<String, Vec<Waiter>>,
    pumps: Vec<JoinHandle<()>>,
}

pub enum IntakeMsg {
    Submit(Inbound),
    /// Boxed as it arrives: a JetStream message is large, and its waiter keeps the box.
    Enqueued(Box<jetstream::Message>),
    Committed {
        key: String,
        task_id: String,
        ok: bool,
    },
}

/// Someone waiting for a submission's outcome.
enum Waiter {
    Reply(Option<Subject>),
    Ack(Box<jetstream::Message>),
}

impl Actor for Intake {
    type Msg = IntakeMsg;
    type State = IntakeState;
    type Arguments = IntakeArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<IntakeMsg>,
        args: IntakeArgs,
    ) -> Result<IntakeState, ActorProcessingErr> {
        let ctx = args.ctx;
        let depth = ctx.settings.mailbox_depth_max;
        let sub = ctx
            .nats
            .queue_subscribe(subject::TASKS_SUBMIT, subject::QUEUE_INTAKE.into())
            .await?;
        let mut pumps = vec![bus::spawn_pump(
            sub,
            myself.clone(),
            depth,
            IntakeMsg::Submit,
        )];
        let js = ctx.jetstream();
        let stream = ensure_intake_stream(&js, ctx.settings.payload_bytes_max).await?;
        let consumer = stream
            .get_or_create_consumer(
                subject::INTAKE_CONSUMER,
                consumer::pull::Config {
                    durable_name: Some(subject::INTAKE_CONSUMER.into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: depth as i64,
                    ..Default::default()
                },
            )
            .await?;
        let mut messages = consumer.messages().await?;
        let me = myself.clone();
        pumps.push(tokio::spawn(async move {
            while let Some(next) = messages.next().await {
                match next {
                    Ok(msg) => {
                        if me.cast(IntakeMsg::Enqueued(Box::new(msg))).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "intake stream"),
                }
            }
        }));
        let seed = ctx.settings.seed ^ ctx.boot_id;
        Ok(IntakeState {
            ctx,
            catalog: args.catalog,
            rng: StdRng::seed_from_u64(seed),
            pending: HashMap::new(),
            pumps,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<IntakeMsg>,
        msg: IntakeMsg,
        state: &mut IntakeState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            IntakeMsg::Submit(inbound) => {
                let msg = inbound.msg;
                match state.validate(&msg.payload) {
                    Ok((req, pb_name, received)) => {
                        let key = req.idempotency_key.clone();
                        state
                            .accept(
                                &myself,
                                req,
                                pb_name,
                                received,
                                key,
                                Waiter::Reply(msg.reply),
                            )
                            .await?;
                    }
                    Err(e) => {
                        state.rejected(subject::TASKS_SUBMIT, &e);
                        bus::reply_json(&state.ctx.nats, msg.reply, &e).await;
                    }
                }
            }
            IntakeMsg::Enqueued(msg) => match state.validate(&msg.payload) {
                Ok((req, pb_name, received)) => {
                    // Dedupe key: the client's, else the Nats-Msg-Id, else the stream
                    // sequence (so a redelivery after a crash never makes a second task).
                    let key = req
                        .idempotency_key
                        .clone()
                        .or_else(|| msg_id(msg.headers.as_ref()))
                        .or_else(|| {
                            msg.info().ok().map(|i| {
                                format!(
                                    "jetstream:{}:{}",
                                    subject::INTAKE_STREAM,
                                    i.stream_sequence
                                )
                            })
                        });
                    state
                        .accept(&myself, req, pb_name, received, key, Waiter::Ack(msg))
                        .await?;
                }
                Err(e) => {
                    state.rejected(subject::TASKS_ENQUEUE, &e);
                    let report = IntakeRejected {
                        stream_sequence: msg.info().ok().map(|i| i.stream_sequence),
                        error: e.error,
                    };
                    let _ = state
                        .ctx
                        .nats
                        .publish(
                            subject::INTAKE_REJECTED,
                            Bytes::from(serde_json::to_vec(&report)?),
                        )
                        .await;
                    // Terminate: a bad message would be just as bad on redelivery.
                    let _ = msg.ack_with(jetstream::AckKind::Term).await;
                }
            },
            IntakeMsg::Committed { key, task_id, ok } => {
                for waiter in state.pending.remove(&key).unwrap_or_default() {
                    if ok {
                        answer(&state.ctx, waiter, &task_id, TaskStatus::Accepted, true).await;
                    } else {
                        fail(&state.ctx, waiter).await;
                    }
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<IntakeMsg>,
        state: &mut IntakeState,
    ) -> Result<(), ActorProcessingErr> {
        for pump in &state.pumps {
            pump.abort();
        }
        Ok(())
    }
}

impl IntakeState {
    /// Parses and validates a submission: the request, its playbook's name and when it
    /// may run (`run_at`/`run_after`, against one reading of the clock, here); `Err` is
    /// the reply to send.
    fn validate(&self, payload: &[u8]) -> Result<(SubmitRequest, String, Received), ErrorReply> {
        let req: SubmitRequest = parse_json(payload, self.ctx.settings.payload_bytes_max)?;
        let now_ms = self.ctx.now_ms();
        let run_at =
            not_before(&req, now_ms).map_err(|e| ErrorReply::new(ErrorCode::InvalidRequest, e))?;
        let received = Received { now_ms, run_at };
        if req.reason.as_ref().is_some_and(|r| r.chars().count() > 500) {
            return Err(ErrorReply::new(
                ErrorCode::InvalidRequest,
                "reason must be at most 500 characters",
            ));
        }
        let name = match (&req.playbook, &req.goal) {
            (Some(_), Some(_)) => {
                return Err(ErrorReply::new(
                    ErrorCode::InvalidRequest,
                    "give a `playbook` or a `goal`, not both (a playbook may carry its own goal template)",
                ));
            }
            (Some(name), None) => name.clone(),
            (None, Some(goal)) => {
                if self.ctx.llm().is_none() {
                    return Err(ErrorReply::new(
                        ErrorCode::GoalNotSupported,
                        format!(
                            "free-text goals need the LLM planner: {}; or name a `playbook`",
                            crate::llm::LlmError::NotConfigured
                        ),
                    ));
                }
                let chars = goal.chars().count();
                if goal.trim().is_empty() || chars > GOAL_CHARS_MAX {
                    return Err(ErrorReply::new(
                        ErrorCode::InvalidRequest,
                        format!("goal must be 1 to {GOAL_CHARS_MAX} characters (it has {chars})"),
                    ));
                }
                if !req.input.is_object() {
                    return Err(ErrorReply::new(
                        ErrorCode::InvalidInput,
                        "input must be a JSON object",
                    ));
                }
                if let Some(key) = &req.idempotency_key
                    && (key.is_empty() || key.len() > IDEMPOTENCY_KEY_BYTES_MAX)
                {
                    return Err(ErrorReply::new(
                        ErrorCode::InvalidRequest,
                        format!("idempotency_key must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} bytes"),
                    ));
                }
                return Ok((req, GOAL_PLAYBOOK.to_string(), received));
            }
            (None, None) => {
                return Err(ErrorReply::new(
                    ErrorCode::InvalidRequest,
                    "give a `playbook` (and its `input`)",
                ));
            }
        };
        let Some(playbook) = self.catalog.get(&name) else {
            return Err(ErrorReply::new(
                ErrorCode::UnknownPlaybook,
                format!(
                    "no playbook named `{name}` (known: {})",
                    self.catalog.names().join(", ")
                ),
            ));
        };
        if let Some(key) = &req.idempotency_key
            && (key.is_empty() || key.len() > IDEMPOTENCY_KEY_BYTES_MAX)
        {
            return Err(ErrorReply::new(
                ErrorCode::InvalidRequest,
                format!("idempotency_key must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} bytes"),
            ));
        }
        // Check the input against the plan now (what rendering it would say) so a
        // missing input field is the submitter's error, not a failed task later.
        let persona = self.catalog.persona();
        if playbook.goal.is_some() && self.ctx.llm().is_none() {
            return Err(ErrorReply::new(
                ErrorCode::GoalNotSupported,
                format!(
                    "playbook `{name}` is a goal for the LLM planner: {}",
                    crate::llm::LlmError::NotConfigured
                ),
            ));
        }
        playbook
            .goal_text("validation", &req.input, persona)
            .and_then(|_| playbook.check_input(&req.input, persona))
            .map_err(|e| {
                ErrorReply::new(ErrorCode::InvalidInput, format!("playbook `{name}`: {e}"))
            })?;
        Ok((req, name, received))
    }

    fn rejected(&self, subject: &str, e: &ErrorReply) {
        self.ctx.metrics.rejected(subject, e.error.code);
    }

    async fn accept(
        &mut self,
        myself: &ActorRef<IntakeMsg>,
        req: SubmitRequest,
        playbook: String,
        received: Received,
        key: Option<String>,
        waiter: Waiter,
    ) -> Result<(), ActorProcessingErr> {
        let Received {
            now_ms: now,
            run_at,
        } = received;
        if let Some(key) = &key {
            if let Some(waiters) = self.pending.get_mut(key) {
                waiters.push(waiter);
                return Ok(());
            }
            if let Some(task_id) = self
                .ctx
                .store
                .get::<String>(Cf::IntakeKeys, key.as_bytes())?
            {
                let status = self
                    .ctx
                    .store
                    .get::<Task>(Cf::Tasks, task_id.as_bytes())?
                    .map(|t| t.status)
                    .unwrap_or(TaskStatus::Accepted);
                answer(&self.ctx, waiter, &task_id, status, true).await;
                return Ok(());
            }
        }
        let task_id = ulid::Ulid::from_parts(now, self.rng.random::<u128>()).to_string();
        let mut task = Task::new(
            task_id.clone(),
            playbook.clone(),
            JsonText::from_value(&req.input),
            key.clone(),
            self.ctx.settings.node_id.clone(),
            now,
        );
        task.event_seq = 1;
        if playbook == GOAL_PLAYBOOK {
            task.goal = req.goal.clone();
        }
        task.priority = req
            .priority
            .or_else(|| self.catalog.get(&playbook).map(|p| p.priority))
            .unwrap_or_default();
        // Low priority waits for the next batch window: low tasks start together, at
        // window boundaries, under their own cap (the TaskActor's low slot).
        task.not_before_ms = match task.priority {
            crate::model::Priority::Low => {
                let window = (self.ctx.settings.low_priority_window.as_millis() as u64).max(1);
                let from = run_at.unwrap_or(now);
                Some(from.div_ceil(window) * window).filter(|t| *t > now)
            }
            _ => run_at,
        };
        let detail = match &req.reason {
            Some(why) => format!("playbook {playbook}; {why}"),
            None => format!("playbook {playbook}"),
        };
        let event = TaskEvent {
            task_id: task_id.clone(),
            seq: 1,
            kind: TaskStatus::Accepted.as_str().into(),
            status: TaskStatus::Accepted,
            step_id: None,
            attempt: None,
            detail: Some(detail),
            at_ms: now,
            node_id: task.node_id.clone(),
        };
        let mut batch = Batch::new();
        batch.put(Cf::Tasks, task_id.as_bytes(), &task)?;
        batch.put(Cf::Active, task_id.as_bytes(), &false)?;
        if let Some(key) = &key {
            batch.put(Cf::IntakeKeys, key.as_bytes(), &task_id)?;
        }
        let facts = crate::audit::TaskFacts::of(&task);
        let record = crate::audit::of_event(&facts, &task, &event, &self.ctx.from(super::INTAKE));
        batch.append_audit(&record, Some(task_id.as_bytes()))?;
        let outgoing = self.ctx.stage_outbox(
            &mut batch,
            subject::task_event(&task_id, "accepted"),
            event.to_json(),
        )?;
        if let Some(key) = &key {
            self.pending.insert(key.clone(), Vec::new());
        }
        self.ctx
            .metrics
            .tasks_submitted_total
            .with_label_values(&[&playbook])
            .inc();
        let ctx = self.ctx.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            let committed = match ctx.ownership() {
                None => start_while_syncing(&ctx, batch, &task_id, outgoing).await,
                Some(own) => start_when_replicated(&ctx, own, batch, &task, now, outgoing).await,
            };
            let ok = committed.is_ok();
            match committed {
                Ok(()) => answer(&ctx, waiter, &task_id, TaskStatus::Accepted, false).await,
                Err(e) => {
                    tracing::error!(error = %e, "cannot commit a new task");
                    fail(&ctx, waiter).await;
                }
            }
            if let Some(key) = key {
                let _ = me.cast(IntakeMsg::Committed { key, task_id, ok });
            }
        });
        Ok(())
    }
}

/// Commits a new task on a single node, starts its actor as soon as the record is
/// written, and returns once it is synced (then it may be acknowledged). The actor plans
/// meanwhile but dispatches no step before that fsync (its `accepted_ticket`): a power
/// loss before it loses a task that was never acknowledged and never acted on, and the
/// plan hop hides the fsync's latency.
async fn start_while_syncing(
    ctx: &NodeContext,
    batch: Batch,
    task_id: &str,
    outgoing: (u64, OutboxEntry),
) -> Result<(), StoreError> {
    let ticket = ctx.store.commit_syncing(batch).await?;
    // The relay first: `accepted` goes out before any event of the actor's.
    if let Some(relay) = lookup::<RelayMsg>(RELAY, &ctx.settings.node_id) {
        let _ = relay.cast(RelayMsg::PublishWhenSynced(ticket, vec![outgoing]));
    }
    if let Some(tasks) = lookup::<TaskSupervisorMsg>(TASKS, &ctx.settings.node_id) {
        let _ = tasks.cast(TaskSupervisorMsg::Start {
            task_id: task_id.to_string(),
            accepted_ticket: Some(ticket),
        });
    }
    ctx.store.wait_synced(ticket).await
}

/// Commits a new task in a cluster: synced, owned and replicated before its actor starts
/// and it is acknowledged, so another node can take it over if this one dies.
async fn start_when_replicated(
    ctx: &NodeContext,
    own: &crate::ownership::Ownership,
    batch: Batch,
    task: &Task,
    now: u64,
    outgoing: (u64, OutboxEntry),
) -> Result<(), StoreError> {
    ctx.store.commit(batch).await?;
    let replicated = match own.claim(&task.id, now).await {
        Ok(_) => own.publish_checkpoint(task).await,
        Err(e) => Err(e),
    };
    if let Err(e) = replicated {
        // Durable here all the same; its actor claims and replicates it at its first
        // transition.
        ctx.metrics.checkpoint_publish_failures_total.inc();
        tracing::warn!(task_id = task.id, error = %e, "new task not replicated");
    }
    if let Some(relay) = lookup::<RelayMsg>(RELAY, &ctx.settings.node_id) {
        let _ = relay.cast(RelayMsg::Publish(vec![outgoing]));
    }
    if let Some(tasks) = lookup::<TaskSupervisorMsg>(TASKS, &ctx.settings.node_id) {
        let _ = tasks.cast(TaskSupervisorMsg::Start {
            task_id: task.id.clone(),
            accepted_ticket: None,
        });
    }
    Ok(())
}

async fn answer(
    ctx: &NodeContext,
    waiter: Waiter,
    task_id: &str,
    status: TaskStatus,
    duplicate: bool,
) {
    match waiter {
        Waiter::Reply(reply) => {
            bus::reply_json(
                &ctx.nats,
                reply,
                &SubmitReply {
                    task_id: task_id.to_string(),
                    status,
                    duplicate,
                },
            )
            .await;
        }
        Waiter::Ack(msg) => {
            if let Err(e) = msg.double_ack().await {
                tracing::warn!(error = %e, task_id, "enqueue ack failed; a redelivery will dedupe");
            }
        }
    }
}

async fn fail(ctx: &NodeContext, waiter: Waiter) {
    match waiter {
        Waiter::Reply(reply) => {
            bus::reply_error(
                &ctx.nats,
                reply,
                ErrorCode::Unavailable,
                "the task could not be committed; retry",
            )
            .await;
        }
        // Not acked: JetStream redelivers it.
        Waiter::Ack(_) => {}
    }
}

/// Farthest ahead a task may be delayed: a year.
const DELAY_MS_MAX: u64 = 366 * 86_400_000;

/// When a request was read, and when it asked to run: one clock reading for both, so a
/// `run_after` of 4 s is exactly 4 s after the task's `created_at_ms`.
struct Received {
    now_ms: u64,
    run_at: Option<u64>,
}

/// When a submitted task may be planned: `run_at`, or `run_after` from `now_ms`; `None`
/// for at once (or a time already past).
fn not_before(req: &SubmitRequest, now_ms: u64) -> Result<Option<u64>, String> {
    let at = match (&req.run_at, &req.run_after) {
        (Some(_), Some(_)) => return Err("give `run_at` or `run_after`, not both".into()),
        (Some(t), None) => crate::schedule::parse_instant(t).map_err(|e| format!("run_at: {e}"))?,
        (None, Some(d)) => now_ms.saturating_add(
            crate::schedule::parse_duration(d).map_err(|e| format!("run_after: {e}"))?,
        ),
        (None, None) => return Ok(None),
    };
    if at > now_ms.saturating_add(DELAY_MS_MAX) {
        return Err("run_at/run_after is more than a year ahead; use a schedule".into());
    }
    Ok((at > now_ms).then_some(at))
}

fn msg_id(headers: Option<&HeaderMap>) -> Option<String> {
    headers?
        .get("Nats-Msg-Id")
        .map(|v| format!("nats-msg-id:{v}"))
}

/// Parses a JSON request, telling malformed JSON apart from a wrong shape.
pub fn parse_json<T: DeserializeOwned>(payload: &[u8], bytes_max: usize) -> Result<T, ErrorReply> {
    if payload.len() > bytes_max {
        return Err(ErrorReply::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "payload is {} bytes; the maximum is {bytes_max}",
                payload.len()
            ),
        ));
    }
    let value: Value = serde_json::from_slice(payload).map_err(|e| {
        ErrorReply::new(
            ErrorCode::BadJson,
            format!("payload is not valid JSON: {e}"),
        )
    })?;
    serde_json::from_value(value)
        .map_err(|e| ErrorReply::new(ErrorCode::InvalidRequest, e.to_string()))
}

/// Declares the durable intake stream (idempotent): file storage, work-queue retention,
/// a deduplication window for `Nats-Msg-Id`.
pub async fn ensure_intake_stream(
    js: &jetstream::Context,
    payload_bytes_max: usize,
) -> Result<stream::Stream, ActorProcessingErr> {
    let config = stream::Config {
        name: subject::INTAKE_STREAM.into(),
        subjects: vec![subject::TASKS_ENQUEUE.into()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::WorkQueue,
        duplicate_window: Duration::from_secs(120),
        max_message_size: i32::try_from(payload_bytes_max).unwrap_or(i32::MAX),
        max_messages: 1_000_000,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    Ok(js.get_or_create_stream(config).await?)
}
