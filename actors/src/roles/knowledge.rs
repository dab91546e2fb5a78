//! Knowledge (`cadre.context.*`, `cadre.memory.*`): applies the knowledge stream to this
//! node's store and search index, publishes the writes made here, answers reads from
//! the local copy, and prunes old episodes.
//!
//! Three loops besides the actor: the applier follows `CADRE_KNOWLEDGE` from the last
//! sequence applied (an ordered consumer: no acks, recreated on a gap); the publisher
//! sends `Cf::KnowledgeOutbox` to the stream, each write with its id as `Nats-Msg-Id`,
//! and deletes what the stream acknowledged; a ticker asks for pruning. A write made
//! while the stream is unreachable waits in the outbox: it is never lost, and it is
//! applied or rejected when it arrives.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use storage::{Batch, Cf};
use tokio::task::JoinHandle;

use crate::bus::{self, Inbound};
use crate::context::NodeContext;
use crate::knowledge::{self, At, Shared, recall};
use crate::protocol::knowledge::{
    self as kp, Author, CheckpointRequest, ContextGetRequest, ContextHistoryReply,
    ContextHistoryRequest, ContextListReply, ContextListRequest, ContextPutRequest, KnowledgeWrite,
    MemoryHistoryReply, MemoryHistoryRequest, MemorySearchRequest, RollbackRequest, WriteOp,
    WriteReply, WriteStatus, WriteView, WritesReply, WritesRequest,
};
use crate::protocol::{
    ErrorCode, ErrorReply, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, TaskRef, subject,
};
use crate::roles::intake::parse_json;

/// Writes the publisher sends before awaiting their acknowledgements.
const PUBLISH_WINDOW: usize = 128;
/// The stream drops a re-published write id within this window; the appliers beyond.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(3600);
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Outcomes `cadre.context.writes` looks through for rejected writes.
const REJECTED_SCAN_MAX: usize = 10_000;
/// The subjects that write (through the stream); the others read this node's copy.
const WRITE_SUBJECTS: [&str; 3] = [
    kp::CONTEXT_PUT,
    kp::CONTEXT_CHECKPOINT,
    kp::CONTEXT_ROLLBACK,
];
/// Facts a topic's history answers at most.
const TOPIC_HISTORY_MAX: usize = 200;

#[derive(Clone, Copy)]
pub struct Knowledge;

pub struct KnowledgeArgs {
    pub ctx: Arc<NodeContext>,
    pub shared: Arc<Shared>,
}

pub struct KnowledgeState {
    ctx: Arc<NodeContext>,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

pub enum KnowledgeMsg {
    Request(Inbound),
    Prune,
}

impl Actor for Knowledge {
    type Msg = KnowledgeMsg;
    type State = KnowledgeState;
    type Arguments = KnowledgeArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<KnowledgeMsg>,
        args: KnowledgeArgs,
    ) -> Result<KnowledgeState, ActorProcessingErr> {
        let KnowledgeArgs { ctx, shared } = args;
        if let Some(n) = knowledge::reconcile_index(&ctx.store, &shared.index)? {
            tracing::info!(facts = n, "memory index rebuilt from the store");
        }
        ctx.metrics.memory_facts.set(shared.index.len() as i64);
        let depth = ctx.settings.mailbox_depth_max;
        let mut tasks = Vec::new();
        for s in [
            kp::CONTEXT_GET,
            kp::CONTEXT_PUT,
            kp::CONTEXT_HISTORY,
            kp::CONTEXT_LIST,
            kp::CONTEXT_CHECKPOINT,
            kp::CONTEXT_ROLLBACK,
            kp::CONTEXT_WRITES,
            kp::MEMORY_SEARCH,
            kp::MEMORY_HISTORY,
            kp::MEMORY_EPISODE,
        ] {
            let sub = ctx
                .nats
                .queue_subscribe(s, kp::QUEUE_KNOWLEDGE.into())
                .await?;
            tasks.push(bus::spawn_pump(
                sub,
                myself.clone(),
                depth,
                KnowledgeMsg::Request,
            ));
            // This node by name (`cadre.node.<id>.context.get`): its own copy, and the
            // writes waiting here.
            let own = ctx
                .nats
                .subscribe(subject::on_node(&ctx.settings.node_id, s))
                .await?;
            tasks.push(bus::spawn_pump(
                own,
                myself.clone(),
                depth,
                KnowledgeMsg::Request,
            ));
        }
        tasks.push(tokio::spawn(applier(ctx.clone(), shared.clone())));
        tasks.push(tokio::spawn(publisher(ctx.clone(), shared.clone())));
        let interval = ctx.settings.knowledge.prune_interval;
        let me = myself.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                if me.cast(KnowledgeMsg::Prune).is_err() {
                    return;
                }
            }
        }));
        Ok(KnowledgeState { ctx, shared, tasks })
    }

    async fn handle(
        &self,
        _: ActorRef<KnowledgeMsg>,
        msg: KnowledgeMsg,
        state: &mut KnowledgeState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            KnowledgeMsg::Request(inbound) => handle_request(state, inbound).await,
            KnowledgeMsg::Prune => {
                let ctx = &state.ctx;
                let pruned = knowledge::prune_episodes(
                    &ctx.store,
                    ctx.settings.knowledge.retention,
                    ctx.now_ms(),
                )?;
                for (cap, n) in [
                    ("age", pruned.age),
                    ("count", pruned.count),
                    ("bytes", pruned.bytes),
                ] {
                    if n > 0 {
                        ctx.metrics
                            .episodes_pruned_total
                            .with_label_values(&[cap])
                            .inc_by(n as u64);
                    }
                }
                // Keep the on-disk index close to the store between searches.
                state.shared.index.commit()?;
                ctx.metrics
                    .memory_facts
                    .set(state.shared.index.len() as i64);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<KnowledgeMsg>,
        state: &mut KnowledgeState,
    ) -> Result<(), ActorProcessingErr> {
        for task in &state.tasks {
            task.abort();
        }
        state.shared.index.commit()?;
        Ok(())
    }
}

async fn handle_request(state: &mut KnowledgeState, inbound: Inbound) {
    let ctx = state.ctx.clone();
    let msg = inbound.msg;
    let public = msg
        .subject
        .as_str()
        .strip_prefix(&format!("cadre.node.{}.", ctx.settings.node_id))
        .map(|rest| format!("cadre.{rest}"))
        .unwrap_or_else(|| msg.subject.to_string());
    let max = ctx.settings.payload_bytes_max;
    let payload = &msg.payload;
    match public.as_str() {
        kp::CONTEXT_GET => {
            let r =
                parse_json::<ContextGetRequest>(payload, max).and_then(|r| context_get(&ctx, r));
            ctx.respond(kp::CONTEXT_GET, msg.reply, r).await
        }
        kp::CONTEXT_HISTORY => {
            let r = parse_json::<ContextHistoryRequest>(payload, max)
                .and_then(|r| context_history(&ctx, r));
            ctx.respond(kp::CONTEXT_HISTORY, msg.reply, r).await
        }
        kp::CONTEXT_LIST => {
            let r =
                parse_json::<ContextListRequest>(payload, max).and_then(|r| context_list(&ctx, r));
            ctx.respond(kp::CONTEXT_LIST, msg.reply, r).await
        }
        kp::CONTEXT_WRITES => {
            let r = parse_json::<WritesRequest>(payload, max).and_then(|r| writes(&ctx, r));
            ctx.respond(kp::CONTEXT_WRITES, msg.reply, r).await
        }
        kp::MEMORY_SEARCH => {
            let r = parse_json::<MemorySearchRequest>(payload, max)
                .and_then(|r| memory_search(&ctx, &state.shared, r));
            ctx.respond(kp::MEMORY_SEARCH, msg.reply, r).await
        }
        kp::MEMORY_EPISODE => {
            let r = parse_json::<TaskRef>(payload, max).and_then(|r| episode(&ctx, r));
            ctx.respond(kp::MEMORY_EPISODE, msg.reply, r).await
        }
        kp::MEMORY_HISTORY => {
            let r = parse_json::<MemoryHistoryRequest>(payload, max)
                .and_then(|r| memory_history(&ctx, r));
            ctx.respond(kp::MEMORY_HISTORY, msg.reply, r).await
        }
        other => match WRITE_SUBJECTS.into_iter().find(|s| *s == other) {
            Some(subject) => match write_of(&ctx, subject, payload) {
                Ok(write) => {
                    let shared = state.shared.clone();
                    submit(ctx, shared, subject, write, msg.reply, inbound.permit).await
                }
                Err(e) => ctx.respond::<()>(subject, msg.reply, Err(e)).await,
            },
            None => {
                let e = ErrorReply::new(
                    ErrorCode::InvalidRequest,
                    format!("no handler for `{other}`"),
                );
                ctx.respond::<()>(kp::CONTEXT_GET, msg.reply, Err(e)).await
            }
        },
    }
}

fn bad(message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(ErrorCode::InvalidRequest, message)
}

fn internal(e: impl std::fmt::Display) -> ErrorReply {
    ErrorReply::new(ErrorCode::Internal, e.to_string())
}

fn context_get(ctx: &NodeContext, r: ContextGetRequest) -> Result<kp::ContextEntry, ErrorReply> {
    knowledge::check_key(&r.key).map_err(|e| bad(e.message))?;
    let at = match (r.version, r.at_ms) {
        (Some(_), Some(_)) => return Err(bad("give `version` or `at_ms`, not both")),
        (Some(v), None) => At::Version(v),
        (None, Some(t)) => At::Time(t),
        (None, None) => At::Latest,
    };
    knowledge::get(&ctx.store, &r.key, at)
        .map_err(internal)?
        .ok_or_else(|| {
            let what = match at {
                At::Latest => String::new(),
                At::Version(v) => format!(" at version {v}"),
                At::Time(t) => format!(" at {t} ms"),
            };
            ErrorReply::new(
                ErrorCode::NotFound,
                format!("key `{}` has no version{what}", r.key),
            )
        })
}

fn limit(requested: Option<usize>) -> Result<usize, ErrorReply> {
    match requested.unwrap_or(LIST_LIMIT_DEFAULT) {
        n @ 1..=LIST_LIMIT_MAX => Ok(n),
        n => Err(bad(format!("limit {n} must be 1 to {LIST_LIMIT_MAX}"))),
    }
}

fn context_history(
    ctx: &NodeContext,
    r: ContextHistoryRequest,
) -> Result<ContextHistoryReply, ErrorReply> {
    knowledge::check_key(&r.key).map_err(|e| bad(e.message))?;
    let n = limit(r.limit)?;
    let versions = knowledge::history(&ctx.store, &r.key, r.before_version, n).map_err(internal)?;
    let next = (versions.len() == n)
        .then(|| versions.last().map(|v| v.version))
        .flatten()
        .filter(|v| *v > 1);
    Ok(ContextHistoryReply {
        key: r.key,
        versions,
        next,
    })
}

fn context_list(ctx: &NodeContext, r: ContextListRequest) -> Result<ContextListReply, ErrorReply> {
    let n = limit(r.limit)?;
    let prefix = r.prefix.unwrap_or_default();
    let (entries, next) =
        knowledge::list(&ctx.store, &prefix, r.after.as_deref(), n, r.deleted).map_err(internal)?;
    Ok(ContextListReply { entries, next })
}

fn writes(ctx: &NodeContext, r: WritesRequest) -> Result<WritesReply, ErrorReply> {
    let n = limit(r.limit)?;
    let pending_view = |w: &KnowledgeWrite| {
        let (op, name) = knowledge::op_name(&w.op);
        WriteView {
            write_id: w.id.clone(),
            status: WriteStatus::Pending,
            op: op.into(),
            name: name.into(),
            version: None,
            seq: None,
            error: None,
            current_version: None,
        }
    };
    if let Some(id) = r.write_id {
        if let Some(o) = knowledge::outcome(&ctx.store, &id).map_err(internal)? {
            return Ok(WritesReply {
                writes: vec![o.view(&id)],
            });
        }
        return match knowledge::staged_write(&ctx.store, &id).map_err(internal)? {
            Some(w) => Ok(WritesReply {
                writes: vec![pending_view(&w)],
            }),
            None => Err(ErrorReply::new(
                ErrorCode::NotFound,
                format!("no write `{id}` here (neither applied nor waiting on this node)"),
            )),
        };
    }
    let mut writes: Vec<WriteView> = knowledge::staged(&ctx.store, n)
        .map_err(internal)?
        .iter()
        .map(pending_view)
        .collect();
    writes.extend(knowledge::rejected(&ctx.store, n, REJECTED_SCAN_MAX).map_err(internal)?);
    Ok(WritesReply { writes })
}

fn memory_search(
    ctx: &NodeContext,
    shared: &Shared,
    r: MemorySearchRequest,
) -> Result<kp::MemorySearchReply, ErrorReply> {
    if r.query.trim().is_empty() {
        return Err(bad("query must not be empty"));
    }
    let bounds = recall::Bounds::new(r.top_k, r.chars_max).map_err(bad)?;
    let timer = ctx.metrics.memory_search_seconds.start_timer();
    let reply = recall::search(&ctx.store, &shared.index, &r.query, bounds, ctx.now_ms())
        .map_err(internal)?;
    timer.observe_duration();
    ctx.metrics.memory_facts.set(shared.index.len() as i64);
    Ok(reply)
}

fn episode(ctx: &NodeContext, r: TaskRef) -> Result<serde_json::Value, ErrorReply> {
    match ctx
        .store
        .get::<crate::model::Episode>(Cf::Episodes, r.task_id.as_bytes())
    {
        Ok(Some(e)) => Ok(e.view()),
        Ok(None) => Err(ErrorReply::new(
            ErrorCode::NotFound,
            format!(
                "no episode of task `{}` on this node (not verified here, or past the retention caps)",
                r.task_id
            ),
        )),
        Err(e) => Err(internal(e)),
    }
}

fn memory_history(
    ctx: &NodeContext,
    r: MemoryHistoryRequest,
) -> Result<MemoryHistoryReply, ErrorReply> {
    knowledge::check_topic(&r.topic).map_err(|e| bad(e.message))?;
    let (current, facts) =
        knowledge::topic_history(&ctx.store, &r.topic, TOPIC_HISTORY_MAX).map_err(internal)?;
    if facts.is_empty() {
        return Err(ErrorReply::new(
            ErrorCode::NotFound,
            format!("no fact on topic `{}`", r.topic),
        ));
    }
    Ok(MemoryHistoryReply {
        topic: r.topic,
        current,
        facts,
    })
}

/// The stream message a write request asks for, checked.
fn write_of(
    ctx: &NodeContext,
    subject: &str,
    payload: &[u8],
) -> Result<KnowledgeWrite, ErrorReply> {
    let max = ctx.settings.payload_bytes_max;
    let new_id = || ulid::Ulid::from_parts(ctx.now_ms(), rand::random()).to_string();
    let write = match subject {
        kp::CONTEXT_PUT => {
            let r: ContextPutRequest = parse_json(payload, max)?;
            KnowledgeWrite {
                id: r.write_id.unwrap_or_else(new_id),
                author: r.author.unwrap_or_else(Author::operator),
                made_at_ms: ctx.now_ms(),
                reason: r.reason.unwrap_or_default(),
                op: WriteOp::Put {
                    key: r.key,
                    value: r.value,
                    expected_version: r.expected_version,
                },
            }
        }
        kp::CONTEXT_CHECKPOINT => {
            let r: CheckpointRequest = parse_json(payload, max)?;
            KnowledgeWrite {
                id: new_id(),
                author: Author::operator(),
                made_at_ms: ctx.now_ms(),
                reason: r.reason.unwrap_or_default(),
                op: WriteOp::Checkpoint { name: r.name },
            }
        }
        _ => {
            let r: RollbackRequest = parse_json(payload, max)?;
            KnowledgeWrite {
                id: new_id(),
                author: Author::operator(),
                made_at_ms: ctx.now_ms(),
                reason: r.reason.unwrap_or_default(),
                op: WriteOp::Rollback {
                    checkpoint: r.checkpoint,
                },
            }
        }
    };
    knowledge::check_write(&write).map_err(|e| bad(e.message))?;
    // Cheap checks against this node's copy, so the usual mistakes answer at once; the
    // appliers decide for good.
    match &write.op {
        WriteOp::Checkpoint { name }
            if knowledge::checkpoint_exists(&ctx.store, name).map_err(internal)? =>
        {
            Err(ErrorReply::new(
                ErrorCode::Conflict,
                format!("checkpoint `{name}` exists; checkpoints are never replaced"),
            ))
        }
        WriteOp::Rollback { checkpoint }
            if !knowledge::checkpoint_exists(&ctx.store, checkpoint).map_err(internal)? =>
        {
            Err(ErrorReply::new(
                ErrorCode::NotFound,
                format!("no checkpoint named `{checkpoint}`"),
            ))
        }
        _ => Ok(write),
    }
}

/// Stages `write`, wakes the publisher, and answers once this node has applied it (or
/// `pending` after the configured wait). The wait runs off the actor.
async fn submit(
    ctx: Arc<NodeContext>,
    shared: Arc<Shared>,
    subject: &'static str,
    write: KnowledgeWrite,
    reply: Option<async_nats::Subject>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    // A retried write id: answer what became of it.
    match knowledge::outcome(&ctx.store, &write.id) {
        Ok(Some(o)) => return ctx.respond(subject, reply, answer(&write, &o)).await,
        Ok(None) => {}
        Err(e) => return ctx.respond::<()>(subject, reply, Err(internal(e))).await,
    }
    let applied = shared.wait(&write.id);
    let mut batch = Batch::new();
    let staged = knowledge::stage(&mut batch, &write);
    let committed = match staged {
        Ok(()) => ctx.store.commit(batch).await,
        Err(e) => Err(e),
    };
    if let Err(e) = committed {
        shared.forget(&write.id);
        return ctx.respond::<()>(subject, reply, Err(internal(e))).await;
    }
    shared.wake_publisher();
    let wait = ctx.settings.knowledge.write_wait;
    tokio::spawn(async move {
        let _permit = permit;
        let result = match tokio::time::timeout(wait, applied).await {
            Ok(Ok(outcome)) => answer(&write, &outcome),
            _ => {
                shared.forget(&write.id);
                Ok(WriteReply {
                    write_id: write.id.clone(),
                    status: WriteStatus::Pending,
                    key: None,
                    version: None,
                    seq: None,
                    changed: Vec::new(),
                })
            }
        };
        ctx.respond(subject, reply, result).await;
    });
}

fn answer(write: &KnowledgeWrite, o: &knowledge::Outcome) -> Result<WriteReply, ErrorReply> {
    if !o.applied {
        let mut e = ErrorReply::new(
            o.code.unwrap_or(ErrorCode::Conflict),
            o.error.clone().unwrap_or_default(),
        );
        e.error.current_version = o.current_version;
        return Err(e);
    }
    Ok(WriteReply {
        write_id: write.id.clone(),
        status: WriteStatus::Applied,
        key: match &write.op {
            WriteOp::Put { key, .. } => Some(key.clone()),
            _ => None,
        },
        version: o.version,
        seq: Some(o.seq),
        changed: o.changed(),
    })
}

// ---------------------------------------------------------------------------------------
// The stream
// ---------------------------------------------------------------------------------------

async fn ensure_stream(js: &jetstream::Context) -> Result<stream::Stream, String> {
    js.get_or_create_stream(stream::Config {
        name: kp::KNOWLEDGE_STREAM.into(),
        description: Some("every knowledge write, in the order every node applies it".into()),
        subjects: vec![kp::KNOWLEDGE_ALL.into()],
        storage: stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        allow_direct: true,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("knowledge stream: {e}"))
}

/// Follows the stream for as long as the node runs, reconnecting with backoff.
async fn applier(ctx: Arc<NodeContext>, shared: Arc<Shared>) {
    let mut delay = RETRY_MIN;
    loop {
        match follow(&ctx, &shared).await {
            Ok(()) => delay = RETRY_MIN,
            Err(e) => {
                tracing::warn!(error = %e, "knowledge applier: retrying");
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
        tokio::time::sleep(delay).await;
    }
}

async fn follow(ctx: &NodeContext, shared: &Shared) -> Result<(), String> {
    let stream = ensure_stream(&ctx.jetstream()).await?;
    let mut applied = knowledge::applied_seq(&ctx.store).map_err(|e| e.to_string())?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: applied + 1,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| format!("knowledge consumer: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("knowledge consumer: {e}"))?;
    while let Some(msg) = messages.next().await {
        let msg = msg.map_err(|e| format!("knowledge stream: {e}"))?;
        let info = msg.info().map_err(|e| format!("knowledge stream: {e}"))?;
        let seq = info.stream_sequence;
        if seq <= applied {
            continue;
        }
        let at_ms = u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        apply_one(ctx, shared, seq, at_ms, &msg.payload).map_err(|e| e.to_string())?;
        applied = seq;
    }
    Ok(())
}

fn apply_one(
    ctx: &NodeContext,
    shared: &Shared,
    seq: u64,
    at_ms: u64,
    payload: &[u8],
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let m = &ctx.metrics;
    match serde_json::from_slice::<KnowledgeWrite>(payload) {
        Err(e) => {
            tracing::warn!(seq, error = %e, "knowledge stream: not a knowledge write; skipped");
            m.knowledge_writes_total
                .with_label_values(&["unknown", "malformed"])
                .inc();
            knowledge::skip(&ctx.store, seq)?;
        }
        Ok(write) => {
            if let Some(applied) = knowledge::apply(&ctx.store, seq, at_ms, &write)? {
                shared.index.apply(&applied.index, seq)?;
                let result = if applied.outcome.applied {
                    "applied"
                } else {
                    "rejected"
                };
                m.knowledge_writes_total
                    .with_label_values(&[applied.outcome.op.as_str(), result])
                    .inc();
                shared.applied(&applied.write_id, &applied.outcome);
            } else {
                shared.index.apply(&[], seq)?;
            }
        }
    }
    m.knowledge_applied_seq.set(seq as i64);
    Ok(())
}

/// Sends staged writes to the stream, oldest first, for as long as the node runs.
async fn publisher(ctx: Arc<NodeContext>, shared: Arc<Shared>) {
    let mut delay = RETRY_MIN;
    loop {
        match publish_staged(&ctx).await {
            Ok(0) => {
                delay = RETRY_MIN;
                // Staged writes wake it; the timeout re-checks after a failed pass.
                let _ = tokio::time::timeout(RETRY_MAX, shared.publisher_woken()).await;
            }
            Ok(_) => delay = RETRY_MIN,
            Err(e) => {
                tracing::warn!(error = %e, "knowledge publisher: the stream is unreachable; writes wait");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}

/// One pass: up to [`PUBLISH_WINDOW`] writes sent, then their acks awaited in order.
/// Returns how many were acknowledged.
async fn publish_staged(ctx: &NodeContext) -> Result<usize, String> {
    let staged = knowledge::staged(&ctx.store, PUBLISH_WINDOW).map_err(|e| e.to_string())?;
    ctx.metrics.knowledge_outbox.set(staged.len() as i64);
    if staged.is_empty() {
        return Ok(0);
    }
    let js = ctx.jetstream();
    let mut acks = Vec::with_capacity(staged.len());
    for write in &staged {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", write.id.as_str());
        let payload = serde_json::to_vec(write).map_err(|e| e.to_string())?;
        match js
            .publish_with_headers(kp::knowledge_subject(write), headers, Bytes::from(payload))
            .await
        {
            Ok(ack) => acks.push((write.id.clone(), ack)),
            Err(e) => {
                if acks.is_empty() {
                    return Err(e.to_string());
                }
                break;
            }
        }
    }
    let mut done = Batch::new();
    let mut n = 0;
    let mut failed = None;
    for (id, ack) in acks {
        match ack.await {
            Ok(_) => {
                done.delete(Cf::KnowledgeOutbox, id.into_bytes());
                n += 1;
            }
            Err(e) => {
                failed = Some(e.to_string());
                break;
            }
        }
    }
    if !done.is_empty() {
        // Unsynced: a delete lost to a crash re-publishes an id the stream (or the
        // appliers) drops.
        ctx.store.write_unsynced(done).map_err(|e| e.to_string())?;
    }
    match failed {
        Some(e) if n == 0 => Err(e),
        _ => Ok(n),
    }
}
