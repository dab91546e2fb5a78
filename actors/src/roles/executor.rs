//! Executor (`cadre.exec.<tool>`): runs one step through its tool, behind the effect
//! ledger.
//!
//! Ledger key: `<task>/<step>/<attempt>`. Before a `keyed` or `unsafe` tool touches the
//! world, the intent is recorded (synced for `unsafe`); after, the outcome. A request
//! for an attempt whose outcome is recorded gets that outcome back without running
//! again; one already running here waits for it. An intent left by an earlier process
//! is an outcome unknown: `keyed` runs again with the same key (the target dedupes),
//! `unsafe` is reported to the task, which waits for an operator. `idempotent` tools
//! keep no ledger: running them again is the definition of safe.

use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use storage::{Batch, Cf};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::bus::{self, Inbound};
use crate::context::NodeContext;
use crate::model::JsonText;
use crate::protocol::{ExecReply, ExecRequest, FailureKind, StepChecks, VerifyRequest, subject};
use crate::tools::{Call, IdempotencyClass, Tool, ToolError};

#[derive(Clone, Copy)]
pub struct Executor;

pub struct ExecutorArgs {
    pub ctx: Arc<NodeContext>,
    pub tools: Vec<Arc<dyn Tool>>,
    /// Effects running on this node. Owned by whoever spawns the executor, so it
    /// outlives an executor restart: the runs themselves (tokio tasks) go on, and a
    /// re-sent request must still find them rather than take them for an earlier
    /// process's (outcome unknown).
    pub in_flight: EffectsInFlight,
}

/// A run's reply; `None`: it was not started because the node is stopping.
type Running = Shared<BoxFuture<'static, Option<ExecReply>>>;

/// Ledger key → the running effect, for coalescing re-sent requests.
#[derive(Clone, Default)]
pub struct EffectsInFlight(Arc<Mutex<HashMap<String, Running>>>);

impl EffectsInFlight {
    /// Effects running now: what a stopping node waits for. Read here rather than
    /// asked of the executor, which may be stopped or not started while they run.
    pub fn count(&self) -> usize {
        self.0.lock().map_or_else(
            |poisoned| poisoned.into_inner().len(),
            |running| running.len(),
        )
    }
}

pub struct ExecutorState {
    ctx: Arc<NodeContext>,
    tools: HashMap<&'static str, (Arc<dyn Tool>, Arc<Semaphore>)>,
    running: Arc<Mutex<HashMap<String, Running>>>,
    pumps: Vec<JoinHandle<()>>,
}

pub enum ExecutorMsg {
    Request(Inbound),
}

/// One effect-ledger entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Effect {
    pub tool: String,
    pub class: IdempotencyClass,
    pub idempotency_key: String,
    /// sha256 of the rendered params: the exact action.
    pub args_hash: String,
    pub fencing_token: u64,
    pub boot_id: u64,
    pub started_at_ms: u64,
    /// `None` while the effect is in `intent`.
    pub outcome: Option<ExecReply>,
    pub finished_at_ms: Option<u64>,
}

impl Actor for Executor {
    type Msg = ExecutorMsg;
    type State = ExecutorState;
    type Arguments = ExecutorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ExecutorMsg>,
        args: ExecutorArgs,
    ) -> Result<ExecutorState, ActorProcessingErr> {
        let ctx = args.ctx;
        let mut tools = HashMap::new();
        let mut pumps = Vec::new();
        for tool in args.tools {
            let name = tool.info().name;
            // Any node's work, this node's own, and its tags' (steps placed with
            // `on_node` / `on_tag`): one queue group each, so one node takes each call.
            let mut subjects = vec![
                subject::exec(name),
                subject::exec_on_node(name, &ctx.settings.node_id),
            ];
            subjects.extend(
                ctx.settings
                    .tags
                    .iter()
                    .map(|(k, v)| subject::exec_on_tag(name, k, v)),
            );
            for s in subjects {
                let sub = ctx
                    .nats
                    .queue_subscribe(s, subject::QUEUE_ROLES.into())
                    .await?;
                pumps.push(bus::spawn_pump(
                    sub,
                    myself.clone(),
                    ctx.settings.mailbox_depth_max,
                    ExecutorMsg::Request,
                ));
            }
            let slots = ctx
                .settings
                .tool_concurrency_max
                .get(name)
                .copied()
                .unwrap_or(ctx.settings.exec_concurrency_max);
            ctx.metrics
                .tool_concurrency_max
                .with_label_values(&[name])
                .set(slots as i64);
            tools.insert(name, (tool, Arc::new(Semaphore::new(slots))));
        }
        Ok(ExecutorState {
            ctx,
            tools,
            running: args.in_flight.0,
            pumps,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<ExecutorMsg>,
        msg: ExecutorMsg,
        state: &mut ExecutorState,
    ) -> Result<(), ActorProcessingErr> {
        let ExecutorMsg::Request(inbound) = msg;
        state.ctx.settings.faults.maybe_panic(super::EXECUTOR);
        state.request(inbound);
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<ExecutorMsg>,
        state: &mut ExecutorState,
    ) -> Result<(), ActorProcessingErr> {
        for pump in &state.pumps {
            pump.abort();
        }
        Ok(())
    }
}

impl ExecutorState {
    fn request(&mut self, inbound: Inbound) {
        let Inbound { msg, permit } = inbound;
        let ctx = self.ctx.clone();
        let req = match storage::codec::from_wire::<ExecRequest>(&msg.payload) {
            Ok(req) => req,
            Err(e) => {
                let reply = failed(
                    FailureKind::Permanent,
                    format!("undecodable exec request: {e}"),
                );
                tokio::spawn(async move {
                    bus::reply_wire(&ctx.nats, msg.reply, &reply, &ctx.from(super::EXECUTOR)).await
                });
                return;
            }
        };
        let Some((tool, slots)) = self.tools.get(req.tool.as_str()).cloned() else {
            let reply = failed(
                FailureKind::Permanent,
                format!("this node has no tool `{}`", req.tool),
            );
            tokio::spawn(async move {
                bus::reply_wire(&ctx.nats, msg.reply, &reply, &ctx.from(super::EXECUTOR)).await
            });
            return;
        };
        let running = self.running.clone();
        let span = tracing::info_span!(
            "step",
            task_id = %req.task_id,
            step_id = %req.step_id,
            attempt = req.attempt,
            tool = %req.tool
        );
        tokio::spawn(async move {
            let mut req = req;
            let forward = req.verify.take().map(|checks| Forward {
                checks,
                task_id: req.task_id.clone(),
                step_id: req.step_id.clone(),
                tool: req.tool.clone(),
                params: req.params.clone(),
            });
            let Some(reply) = execute(ctx.clone(), running, tool, slots, req)
                .instrument(span)
                .await
            else {
                // Not started (the node is stopping) and not answered: the task's next
                // start sends it again, as it does a step it held back while draining.
                drop(permit);
                return;
            };
            let from = ctx.from(super::EXECUTOR);
            if let (Some(forward), Some(reply_to), ExecReply::Done { .. }) =
                (forward, &msg.reply, &reply)
            {
                match forward.send(&ctx, reply_to.clone(), &reply, &from).await {
                    Ok(()) => {
                        drop(permit);
                        return;
                    }
                    // The task gets `Done` and asks the verifier itself.
                    Err(why) => tracing::warn!(%why, "outcome not forwarded to the verifier"),
                }
            }
            bus::reply_wire(&ctx.nats, msg.reply, &reply, &from).await;
            drop(permit);
        });
    }
}

/// A step whose outcome goes to the verifier, not back to the task (`ExecRequest::verify`).
struct Forward {
    checks: StepChecks,
    task_id: String,
    step_id: String,
    tool: String,
    params: JsonText,
}

impl Forward {
    /// Sends a done step's outcome to this node's verifier (file checks read the disk
    /// the step wrote) with the task's reply subject, so the verdict answers the task.
    async fn send(
        self,
        ctx: &NodeContext,
        reply_to: async_nats::Subject,
        done: &ExecReply,
        executor: &str,
    ) -> Result<(), String> {
        let ExecReply::Done {
            output,
            duration_us,
            replayed,
        } = done
        else {
            return Err("only a done step is verified".into());
        };
        let request = VerifyRequest::Executed {
            task_id: self.task_id,
            step_id: self.step_id,
            tool: self.tool,
            params: self.params,
            checks: self.checks,
            output: output.clone(),
            duration_us: *duration_us,
            replayed: *replayed,
            executor: executor.to_string(),
        };
        let payload = storage::codec::to_wire(&request).map_err(|e| e.to_string())?;
        ctx.nats
            .publish_with_reply(
                subject::verify_on_node(&ctx.settings.node_id),
                reply_to,
                bytes::Bytes::from(payload),
            )
            .await
            .map_err(|e| e.to_string())
    }
}

fn failed(kind: FailureKind, message: String) -> ExecReply {
    ExecReply::Failed {
        kind,
        message,
        output: None,
    }
}

/// Runs `req` once per ledger key, however many times it is delivered.
async fn execute(
    ctx: Arc<NodeContext>,
    running: Arc<Mutex<HashMap<String, Running>>>,
    tool: Arc<dyn Tool>,
    slots: Arc<Semaphore>,
    req: ExecRequest,
) -> Option<ExecReply> {
    let class = tool.info().class;
    let ledger_key = format!("{}/{}/{}", req.task_id, req.step_id, req.attempt);
    let job = {
        let Ok(mut map) = running.lock() else {
            return Some(failed(
                FailureKind::Retryable,
                "executor state poisoned".into(),
            ));
        };
        if let Some(job) = map.get(&ledger_key) {
            job.clone()
        } else {
            if class != IdempotencyClass::Idempotent {
                match ctx.store.get::<Effect>(Cf::Effects, ledger_key.as_bytes()) {
                    Ok(Some(Effect {
                        outcome: Some(outcome),
                        ..
                    })) => return Some(replayed(outcome)),
                    Ok(Some(effect)) if class == IdempotencyClass::Unsafe => {
                        ctx.metrics
                            .effects_outcome_unknown_total
                            .with_label_values(&[&req.tool])
                            .inc();
                        return Some(failed(
                            FailureKind::OutcomeUnknown,
                            format!(
                                "`{}` was started at {} ms by an earlier process and its outcome is unknown; \
                                 resolve with retry, mark_done or abort",
                                effect.tool, effect.started_at_ms
                            ),
                        ));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Some(failed(
                            FailureKind::Retryable,
                            format!("effect ledger unreadable: {e}"),
                        ));
                    }
                }
            }
            let job = unless_draining(ctx.clone(), tool, slots, req, ledger_key.clone())
                .boxed()
                .shared();
            map.insert(ledger_key.clone(), job.clone());
            job
        }
    };
    let reply = job.await;
    if let Ok(mut map) = running.lock() {
        map.remove(&ledger_key);
    }
    reply
}

fn replayed(outcome: ExecReply) -> ExecReply {
    match outcome {
        ExecReply::Done {
            output,
            duration_us,
            ..
        } => ExecReply::Done {
            output,
            duration_us,
            replayed: true,
        },
        other => other,
    }
}

/// Runs the step unless the node has begun to stop. Checked here, once the job is in
/// `running`: the shutdown sets draining, then waits for `running` to empty, so a step
/// is either counted there (and waited for) or sees draining and never starts. Without
/// it, a request that arrived just as the node stopped could record an `unsafe` intent
/// and be dropped with the process: outcome unknown after the restart.
async fn unless_draining(
    ctx: Arc<NodeContext>,
    tool: Arc<dyn Tool>,
    slots: Arc<Semaphore>,
    req: ExecRequest,
    ledger_key: String,
) -> Option<ExecReply> {
    if ctx.is_draining() {
        tracing::info!("not started: the node is stopping");
        return None;
    }
    Some(run(ctx, tool, slots, req, ledger_key).await)
}

async fn run(
    ctx: Arc<NodeContext>,
    tool: Arc<dyn Tool>,
    slots: Arc<Semaphore>,
    req: ExecRequest,
    ledger_key: String,
) -> ExecReply {
    let info = tool.info();
    // Rate limits first: nothing is recorded or held while a step waits for a token.
    if let Err(reply) = wait_for_rate(&ctx, info.name, &req).await {
        return reply;
    }
    let Ok(_slot) = slots.acquire().await else {
        return failed(FailureKind::Retryable, "executor is stopping".into());
    };
    let mut killswitch = ctx.killswitch_watch();
    if *killswitch.borrow() {
        // Nothing was started: another attempt after the release is safe for any class.
        return failed(
            FailureKind::Retryable,
            "not started: the kill switch is engaged".into(),
        );
    }
    let params = match req.params.to_value() {
        Ok(v) => v,
        Err(e) => return failed(FailureKind::Permanent, format!("params are not JSON: {e}")),
    };
    // Secrets are opened here, at the last moment, only where the params still say
    // `{{secret.<name>}}`; the ledger, the audit and the reply keep the reference.
    // Most steps name no secret: a scan of the text spares walking their params.
    let (params, opened) = if req.params.0.contains("{{secret.") {
        match open_secrets(&ctx, params) {
            Ok(p) => p,
            Err(e) => return failed(FailureKind::Permanent, e),
        }
    } else {
        (params, Vec::new())
    };
    let mut effect = Effect {
        tool: req.tool.clone(),
        class: info.class,
        idempotency_key: req.idempotency_key.clone(),
        // An `idempotent` effect is never written (see `record`): nothing reads its hash.
        args_hash: if info.class == IdempotencyClass::Idempotent {
            String::new()
        } else {
            storage::codec::to_hex(&Sha256::digest(req.params.0.as_bytes()))
        },
        fencing_token: req.fencing_token,
        boot_id: ctx.boot_id,
        started_at_ms: ctx.now_ms(),
        outcome: None,
        finished_at_ms: None,
    };
    // Fencing: the last moment before the effect at which a stale owner can be refused.
    if let Some(own) = ctx.ownership()
        && req.fencing_token != 0
        && let Err(why) = own.check_token(&req.task_id, req.fencing_token).await
    {
        ctx.metrics
            .effects_fenced_total
            .with_label_values(&[&req.tool])
            .inc();
        tracing::warn!(%why, "effect refused");
        return failed(FailureKind::Fenced, why);
    }
    if let Err(e) = record(&ctx, &ledger_key, &effect).await {
        return failed(FailureKind::Retryable, format!("cannot record intent: {e}"));
    }
    // An `unsafe` attempt is started once across the cluster: after a takeover it may be
    // re-sent to another node, whose own ledger has never seen it.
    if info.class == IdempotencyClass::Unsafe
        && let Some(own) = ctx.ownership()
    {
        match own
            .begin_effect(&ledger_key, serde_json::to_vec(&effect).unwrap_or_default())
            .await
        {
            Ok(None) => {}
            Ok(Some(earlier)) => {
                let earlier: Option<Effect> = serde_json::from_slice(&earlier).ok();
                let reply = match earlier.as_ref().and_then(|e| e.outcome.clone()) {
                    Some(outcome) => replayed(outcome),
                    None => {
                        ctx.metrics
                            .effects_outcome_unknown_total
                            .with_label_values(&[&req.tool])
                            .inc();
                        failed(
                            FailureKind::OutcomeUnknown,
                            format!(
                                "`{}` was started at {} ms by another node or process and its outcome is unknown; \
                                 resolve with retry, mark_done or abort",
                                req.tool,
                                earlier.map_or(0, |e| e.started_at_ms)
                            ),
                        )
                    }
                };
                effect.outcome = Some(reply.clone());
                effect.finished_at_ms = Some(ctx.now_ms());
                let _ = record(&ctx, &ledger_key, &effect).await;
                return reply;
            }
            Err(e) => {
                // Not started anywhere as far as is known, and nothing ran here.
                effect.outcome = Some(failed(
                    FailureKind::Retryable,
                    format!("cannot record intent cluster-wide: {e}"),
                ));
                let _ = record(&ctx, &ledger_key, &effect).await;
                return failed(
                    FailureKind::Retryable,
                    format!("cannot record intent cluster-wide: {e}"),
                );
            }
        }
    }
    let gauge = ctx.metrics.steps_in_flight.with_label_values(&[info.name]);
    gauge.inc();
    let started = Instant::now();
    let call = Call {
        params,
        idempotency_key: req.idempotency_key.clone(),
        fencing_token: req.fencing_token,
        timeout: Duration::from_millis(req.timeout_ms),
    };
    // The kill switch aborts the call: dropping the tool's future cancels an HTTP
    // request and kills a child process (`kill_on_drop`).
    let result = tokio::select! {
        result = tool.run(call) => Some(result),
        _ = killswitch.wait_for(|engaged| *engaged) => None,
    };
    gauge.dec();
    let Some(result) = result else {
        let reply = match info.class {
            // It ran for a while and was killed: what it did is not known.
            IdempotencyClass::Unsafe => failed(
                FailureKind::OutcomeUnknown,
                format!(
                    "`{}` was aborted by the kill switch while running; what it did before is unknown: resolve with retry, mark_done or abort",
                    req.tool
                ),
            ),
            // Safe to run again after the release (same idempotency key).
            _ => failed(
                FailureKind::Retryable,
                "aborted by the kill switch while running".into(),
            ),
        };
        effect.outcome = Some(reply.clone());
        effect.finished_at_ms = Some(ctx.now_ms());
        if let Err(e) = record(&ctx, &ledger_key, &effect).await {
            tracing::error!(ledger_key, error = %e, "cannot record an aborted effect");
        }
        return reply;
    };
    let duration_us = started.elapsed().as_micros() as u64;
    // Whatever the tool returns (an echo, an error quoting a header) is scrubbed of the
    // secrets it was given before anything keeps it.
    let clean = |mut v: Value| {
        crate::secrets::scrub(&mut v, &opened);
        JsonText::from_value(&v)
    };
    let reply = match result {
        Ok(output) => ExecReply::Done {
            output: clean(output),
            duration_us,
            replayed: false,
        },
        Err(ToolError::Retryable { message, output }) => ExecReply::Failed {
            kind: FailureKind::Retryable,
            message: crate::secrets::scrub_text(&message, &opened),
            output: output.map(clean),
        },
        Err(ToolError::Permanent { message, output }) => ExecReply::Failed {
            kind: FailureKind::Permanent,
            message: crate::secrets::scrub_text(&message, &opened),
            output: output.map(clean),
        },
    };
    if info.class == IdempotencyClass::Idempotent {
        return reply;
    }
    effect.outcome = Some(reply.clone());
    effect.finished_at_ms = Some(ctx.now_ms());
    if info.class == IdempotencyClass::Unsafe
        && let Some(own) = ctx.ownership()
        && let Err(e) = own
            .finish_effect(&ledger_key, serde_json::to_vec(&effect).unwrap_or_default())
            .await
    {
        tracing::error!(ledger_key, error = %e, "cannot record the outcome cluster-wide");
    }
    if let Err(e) = record(&ctx, &ledger_key, &effect).await {
        // The effect happened; failing to record it only means a redelivery may find
        // it in `intent`. Report the real outcome now.
        tracing::error!(ledger_key, error = %e, "cannot record outcome");
    }
    reply
}

/// `params` with each `{{secret.<name>}}` rendered from this node's secrets, and the
/// values opened (to scrub what comes back).
fn open_secrets(
    ctx: &NodeContext,
    params: Value,
) -> Result<(Value, Vec<(String, String)>), String> {
    let names = crate::secrets::referenced(&params);
    if names.is_empty() {
        return Ok((params, Vec::new()));
    }
    let store = ctx
        .secrets()
        .ok_or_else(|| format!("node {} has no secrets store", ctx.settings.node_id))?;
    let mut opened = Vec::with_capacity(names.len());
    for name in names {
        let value = store
            .open_value(&name)
            .map_err(|e| format!("{e} (node {}: `cadre secret set`)", ctx.settings.node_id))?;
        opened.push((name, value));
    }
    let scope = Value::Object(
        opened
            .iter()
            .map(|(n, v)| (n.clone(), Value::String(v.clone())))
            .collect(),
    );
    let rendered = crate::template::render(&params, &[("secret", &scope)][..])
        .map_err(|e| format!("secrets: {e}"))?;
    Ok((rendered, opened))
}

/// Waits until the tool's and the target host's buckets both have a token, within the
/// step's timeout; past it the attempt fails as retryable (nothing ran).
async fn wait_for_rate(ctx: &NodeContext, tool: &str, req: &ExecRequest) -> Result<(), ExecReply> {
    if ctx.rate.is_empty() {
        return Ok(());
    }
    let mut keys = vec![format!("tool:{tool}")];
    if let Some(host) = req
        .params
        .to_value()
        .ok()
        .and_then(|p| crate::rate::target_host(&p))
    {
        keys.push(format!("host:{host}"));
    }
    let deadline = Instant::now() + Duration::from_millis(req.timeout_ms);
    let mut counted = false;
    loop {
        let Err((limit, wait_ms)) = ctx.rate.try_take(&keys, ctx.now_ms()) else {
            return Ok(());
        };
        if !counted {
            ctx.metrics
                .rate_limited_total
                .with_label_values(&[&limit])
                .inc();
            counted = true;
        }
        let wait = Duration::from_millis(wait_ms);
        if Instant::now() + wait > deadline {
            return Err(failed(
                FailureKind::Retryable,
                format!("rate limit `{limit}` leaves no room within the step's timeout"),
            ));
        }
        tokio::time::sleep(wait).await;
        ctx.metrics
            .rate_limit_wait_seconds_total
            .with_label_values(&[&limit])
            .inc_by(wait.as_secs_f64());
    }
}

/// `unsafe`: synced, since a lost intent would let a crash re-run it blindly. `keyed`:
/// unsynced, since re-running with the same key is safe. `idempotent`: not recorded.
async fn record(ctx: &NodeContext, key: &str, effect: &Effect) -> Result<(), storage::StoreError> {
    let mut batch = Batch::new();
    batch.put(Cf::Effects, key.as_bytes(), effect)?;
    match effect.class {
        IdempotencyClass::Unsafe => ctx.store.commit(batch).await,
        IdempotencyClass::Keyed => ctx.store.write_unsynced(batch),
        IdempotencyClass::Idempotent => Ok(()),
    }
}
