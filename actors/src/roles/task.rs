//! TaskActor: one per in-flight task, the only writer of that task's state.
//!
//! It feeds inputs to the pure state machine (`crate::machine`), commits each
//! transition with its events in one synced batch, and only then acts: sends the next
//! request, arms a timer. Replies come back as messages, so the actor stays responsive
//! to cancel while a step runs. It stops itself when the task ends or parks waiting for
//! an operator; its checkpoint is all that is needed to start it again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use storage::{Batch, Cf};
use tracing::Instrument;

use crate::audit;
use crate::bus::{self, HopError, Replied};
use crate::context::NodeContext;
use crate::governance::{Governor, step_params};
use crate::machine::{self, Action, Input, Rejected};
use crate::metrics::reason;
use crate::model::{
    ApprovalDecision, ApprovalState, DecisionKind, EpisodeStep, JsonText, StepStatus, Task,
    TaskStatus,
};
use crate::protocol::{
    ArchiveReply, ArchiveRequest, AuditRecord, ExecReply, ExecRequest, FailureKind, PlanReply,
    PlanRequest, StepChecks, TaskChecks, TaskEvent, VerifyReply, VerifyRequest, subject,
};
use crate::roles::relay::RelayMsg;
use crate::roles::{RELAY, lookup};

pub struct TaskActor;

pub struct TaskArgs {
    pub ctx: Arc<NodeContext>,
    pub task_id: String,
    /// Fail the task with this reason on start (its actor kept crashing).
    pub abandon: Option<String>,
    /// Started to receive a cancel/resolve: stay up after `Start` even if parked, or
    /// the control message that follows would find the actor gone.
    pub hold_after_start: bool,
    /// The store group that wrote the task as accepted (with its `Cf::Active` entry, not
    /// parked), if it may not be synced yet: steps are dispatched only once it is.
    pub accepted_ticket: Option<u64>,
}

pub struct TaskState {
    ctx: Arc<NodeContext>,
    task: Task,
    rng: StdRng,
    /// Per step: the attempt in flight, for its duration and its audit record.
    sent: Vec<Option<Sent>>,
    hold_after_start: bool,
    /// Events of transitions not committed on their own (see `machine::Transition`).
    held_events: Vec<TaskEvent>,
    /// Their audit records, and `step_executed` records, committed with the next commit.
    held_audit: Vec<AuditRecord>,
    /// Steps in `outcome_unknown` as of the last commit (for the node-wide gauge).
    unknown_committed: i64,
    /// Approvals pending as of the last commit (for the node-wide gauge).
    pending_committed: i64,
    /// `(UTC day, cost)` charged by transitions not yet committed.
    uncommitted_charges: Vec<(String, u64)>,
    /// Per step, the node whose executor answered its current attempt: a verdict that
    /// reads files must be given there. (In memory: after a restart the attempt is sent
    /// again, through the ledger, and answers again.)
    ran_on: HashMap<String, String>,
    /// What each of this task's audit records repeats.
    facts: audit::TaskFacts,
    /// `task@<node>`: this actor, as audit records name it.
    me: String,
    /// Set when another node owns the task: the actor issues nothing more and stops.
    standing_down: bool,
    /// A low-priority task's slot, held from planning until the actor stops (dropped
    /// with it): at most `low_priority_concurrency_max` such tasks run at once.
    low_slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// See [`TaskArgs::accepted_ticket`].
    accepted_ticket: Option<u64>,
    /// What `Cf::Active` holds for the task (its parked flag) as of this actor's last
    /// commit; `None`: not known yet. A commit writes it only when it changes.
    active_committed: Option<bool>,
}

/// An attempt in flight.
struct Sent {
    at: Instant,
    args_hash: String,
}

pub enum TaskMsg {
    Input(Input),
    /// Another role's answer, with the actor that sent it (`executor@vps`).
    Reply {
        input: Input,
        from: Option<String>,
    },
    /// The kill switch was released: send the steps held back while it was engaged.
    Released,
    /// NATS reconnected: re-send the hops in flight, whose requests or replies may have
    /// been lost with the connection (the executor's ledger makes a re-send safe).
    Reconnected,
    /// An event for a waiting step (`cadre.tasks.signal`).
    Signal {
        event: String,
        payload: Option<serde_json::Value>,
        by: String,
        reply: RpcReplyPort<Result<TaskStatus, Rejected>>,
    },
    /// A low-priority slot came free for this task: plan it now.
    LowSlot(tokio::sync::OwnedSemaphorePermit),
    /// Another node owns the task (or this node could not claim it yet, `retry`): issue
    /// nothing more and stop. The checkpoint stays; only its `active` mark goes, unless
    /// the claim is to be tried again.
    StandDown {
        reason: String,
        retry: bool,
    },
    Cancel {
        reason: String,
        reply: RpcReplyPort<Result<TaskStatus, Rejected>>,
    },
    Resolve {
        step: String,
        decision: DecisionKind,
        by: String,
        note: Option<String>,
        reply: RpcReplyPort<Result<TaskStatus, Rejected>>,
    },
    Decide {
        approval_id: String,
        decision: ApprovalDecision,
        by: String,
        note: Option<String>,
        reply: RpcReplyPort<Result<TaskStatus, Rejected>>,
    },
}

impl Actor for TaskActor {
    type Msg = TaskMsg;
    type State = TaskState;
    type Arguments = TaskArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<TaskMsg>,
        args: TaskArgs,
    ) -> Result<TaskState, ActorProcessingErr> {
        let local: Option<Task> = args.ctx.store.get(Cf::Tasks, args.task_id.as_bytes())?;
        let (task, first_inputs, stand_down) = match args.ctx.ownership() {
            None => (
                local.ok_or_else(|| format!("task {} has no checkpoint", args.task_id))?,
                Vec::new(),
                None,
            ),
            Some(own) => claim(&args.ctx, own, &args.task_id, local).await?,
        };
        let seed = args.ctx.settings.seed ^ fxhash(&task.id);
        let sent = task.steps.iter().map(|_| None).collect();
        let unknown_committed = unknown_steps(&task);
        let pending_committed = pending_approvals(&task);
        let facts = audit::TaskFacts::of(&task);
        let me = args.ctx.from("task");
        if let Some((reason, retry)) = stand_down {
            myself.cast(TaskMsg::StandDown { reason, retry })?;
        } else {
            for input in first_inputs {
                myself.cast(TaskMsg::Input(input))?;
            }
            let first = match args.abandon {
                Some(reason) => Input::Abandon { reason },
                None => Input::Start,
            };
            myself.cast(TaskMsg::Input(first))?;
        }
        Ok(TaskState {
            ctx: args.ctx,
            task,
            rng: StdRng::seed_from_u64(seed),
            sent,
            hold_after_start: args.hold_after_start,
            held_events: Vec::new(),
            held_audit: Vec::new(),
            unknown_committed,
            pending_committed,
            uncommitted_charges: Vec::new(),
            ran_on: HashMap::new(),
            facts,
            me,
            standing_down: false,
            low_slot: None,
            accepted_ticket: args.accepted_ticket,
            // A task just accepted here: the intake's batch wrote its entry (not parked).
            active_committed: args.accepted_ticket.map(|_| false),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<TaskMsg>,
        msg: TaskMsg,
        state: &mut TaskState,
    ) -> Result<(), ActorProcessingErr> {
        state.ctx.settings.faults.maybe_panic("task");
        let span = tracing::info_span!("task", task_id = %state.task.id);
        async move {
            let mut hold = false;
            if state.standing_down {
                return Ok(());
            }
            match msg {
                TaskMsg::Input(input) => {
                    // Started for a control message: stay up through the inputs before
                    // `Start` (a takeover) and `Start` itself, whatever they leave.
                    hold = state.hold_after_start;
                    if matches!(input, Input::Start) {
                        state.hold_after_start = false;
                    }
                    // Inputs the state does not allow are programming errors in the
                    // machine's callers; they are only produced by Cancel/Resolve.
                    let _ = state.apply(&myself, input, None).await?;
                }
                TaskMsg::Reply {
                    input:
                        Input::Executed {
                            reply:
                                ExecReply::Failed {
                                    kind: FailureKind::Fenced,
                                    message,
                                    ..
                                },
                            ..
                        },
                    ..
                } => state.stand_down(&myself, message, true),
                TaskMsg::StandDown { reason, retry } => state.stand_down(&myself, reason, retry),
                TaskMsg::Reply { input, from } => {
                    if let (Input::Executed { step, .. }, Some(node)) =
                        (&input, from.as_deref().and_then(|f| f.split_once('@')))
                    {
                        state.ran_on.insert(step.clone(), node.1.to_string());
                    }
                    let _ = state.apply(&myself, input, from).await?;
                }
                TaskMsg::Released => state.send_held(&myself),
                TaskMsg::Signal {
                    event,
                    payload,
                    by,
                    reply,
                } => {
                    let input = Input::Signal { event, payload, by };
                    let result = state.apply(&myself, input, None).await?;
                    let _ = reply.send(result.map(|()| state.task.status));
                }
                TaskMsg::LowSlot(permit) => {
                    state.low_slot = Some(permit);
                    state.act(&myself, Action::RequestPlan, None);
                }
                TaskMsg::Reconnected => state.resend_in_flight(&myself),
                TaskMsg::Cancel { reason, reply } => {
                    let result = state.apply(&myself, Input::Cancel { reason }, None).await?;
                    let _ = reply.send(result.map(|()| state.task.status));
                }
                TaskMsg::Resolve {
                    step,
                    decision,
                    by,
                    note,
                    reply,
                } => {
                    let input = Input::Resolve {
                        step,
                        decision,
                        by,
                        note,
                    };
                    let result = state.apply(&myself, input, None).await?;
                    let _ = reply.send(result.map(|()| state.task.status));
                }
                TaskMsg::Decide {
                    approval_id,
                    decision,
                    by,
                    note,
                    reply,
                } => {
                    let input = Input::Decide {
                        approval_id,
                        decision,
                        by,
                        note,
                    };
                    let result = state.apply(&myself, input, None).await?;
                    let _ = reply.send(result.map(|()| state.task.status));
                }
            }
            if state.standing_down {
                return Ok(());
            }
            if !hold && state.should_stop() {
                // Ended or parked: nobody needs to take it over.
                if let Some(own) = state.ctx.ownership().cloned() {
                    let id = state.task.id.clone();
                    tokio::spawn(async move { own.release(&id).await });
                }
                myself.stop(Some(state.task.status.to_string()));
            }
            Ok(())
        }
        .instrument(span)
        .await
    }
}

impl TaskState {
    /// One input: transition, commit, then act. A commit error fails the actor, whose
    /// supervisor restarts it from the last checkpoint. `from` is the actor whose reply
    /// this input is; it is named in the audit records the transition produces.
    async fn apply(
        &mut self,
        myself: &ActorRef<TaskMsg>,
        input: Input,
        from: Option<String>,
    ) -> Result<Result<(), Rejected>, ActorProcessingErr> {
        let executed = self.executed_record(&input, from.as_deref());
        let why = failure_reason(&input);
        let (actor, operator) = match &input {
            Input::Cancel { .. } => ("operator".to_string(), None),
            Input::Resolve { by, .. } | Input::Decide { by, .. } | Input::Signal { by, .. } => {
                ("operator".to_string(), Some(by.clone()))
            }
            Input::Abandon { .. } => (self.ctx.from(crate::roles::TASKS), None),
            _ => (from.unwrap_or_else(|| self.me.clone()), None),
        };
        let now = self.ctx.now_ms();
        let jitter: f64 = self.rng.random();
        let cost_before: Vec<u64> = self.task.steps.iter().map(|s| s.cost_micros).collect();
        let total_before = self.task.cost_micros();
        let gate = Governor { ctx: &self.ctx };
        let transition = match machine::apply(
            &mut self.task,
            input,
            now,
            jitter,
            &self.ctx.settings.limits,
            &gate,
        ) {
            Ok(t) => t,
            Err(rejected) => return Ok(Err(rejected)),
        };
        // Exec requests are built before the commit: their params go into the audit
        // record of `step_started`, and the same request is sent after the commit.
        let mut prepared: HashMap<String, Result<Prepared, String>> = HashMap::new();
        for action in &transition.actions {
            if let Action::Exec { step, attempt } = action
                && let Some(i) = self.task.step_index(step)
            {
                prepared.insert(
                    step.clone(),
                    self.exec_request(i, *attempt).map(Prepared::of),
                );
            }
        }
        // What the gate charged for the steps this transition dispatched.
        let charged: HashMap<&str, u64> = self
            .task
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let before = cost_before.get(i).copied().unwrap_or(0);
                (s.spec.id.as_str(), s.cost_micros.saturating_sub(before))
            })
            .filter(|(_, c)| *c > 0)
            .collect();
        let total = self.task.cost_micros().saturating_sub(total_before);
        if transition.reported_cost_micros > 0 {
            // The gate charged dispatches as it allowed them; what calls reported
            // afterwards joins today's spend now, so the next cap check sees it.
            self.ctx.ledger.record(
                &crate::budget::day_of(now),
                &self.task.playbook,
                transition.reported_cost_micros,
            );
        }
        if total > 0 {
            self.uncommitted_charges
                .push((crate::budget::day_of(now), total));
        }
        self.held_audit.extend(executed);
        self.facts.refresh(&self.task);
        for event in &transition.events {
            self.count_failure(event, why);
            // A dispatch is the task actor's own doing, whatever caused the transition.
            let mut record = if event.kind == "step_started" {
                audit::of_event(&self.facts, &self.task, event, &self.me)
            } else {
                let mut r = audit::of_event(&self.facts, &self.task, event, &actor);
                r.operator = operator.clone();
                r
            };
            if event.kind == "step_started"
                && let Some(Ok(p)) = event.step_id.as_ref().and_then(|s| prepared.get(s))
            {
                record.args_hash = Some(p.args_hash.clone());
                record.params = Some(audit::redacted_params(&p.request.params));
            }
            if event.kind == "step_started"
                && let Some(c) = event.step_id.as_deref().and_then(|s| charged.get(s))
            {
                record.cost_usd = Some(crate::budget::usd(*c));
            }
            self.held_audit.push(record);
        }
        // A lapsed lease may already be another node's: commit nothing (no event goes
        // out under it) and claim again, which resumes from the checkpoint if it is not.
        if transition.commit
            && let Some(own) = self.ctx.ownership()
            && own.token(&self.task.id).is_none()
        {
            self.stand_down(myself, "the task's lease lapsed".into(), true);
            return Ok(Err(Rejected(
                "this node's lease on the task lapsed; retry".into(),
            )));
        }
        if transition.commit {
            let mut events = std::mem::take(&mut self.held_events);
            events.extend(transition.events);
            let records = std::mem::take(&mut self.held_audit);
            // What the task's own work can redo after a power loss commits once written
            // (its fsync follows at once, and its events wait for it); what a person was
            // told, a parked task and the task's end wait for the fsync. In a cluster every
            // commit waits: its checkpoint is replicated next.
            let redoable = self.ctx.ownership().is_none()
                && actor != "operator"
                && !self.task.status.is_terminal()
                && !is_parked(&self.task);
            self.commit(&events, &records, redoable).await?;
            if let Err(why) = self.replicate().await {
                self.stand_down(myself, why.clone(), true);
                return Ok(Err(Rejected(format!("{why}; retry"))));
            }
        } else {
            self.held_events.extend(transition.events);
        }
        for action in transition.actions {
            let request = match &action {
                Action::Exec { step, .. } => prepared.remove(step),
                _ => None,
            };
            self.act(myself, action, request);
        }
        Ok(Ok(()))
    }

    async fn commit(
        &mut self,
        events: &[TaskEvent],
        records: &[AuditRecord],
        written_is_enough: bool,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = &self.ctx;
        let task = &self.task;
        let mut batch = Batch::new();
        let mut approvals = Vec::new();
        batch.put(Cf::Tasks, task.id.as_bytes(), task)?;
        let active = (!task.status.is_terminal()).then(|| is_parked(task));
        match active {
            None => {
                batch.delete(Cf::Active, task.id.as_bytes());
            }
            Some(parked) if self.active_committed != Some(parked) => {
                batch.put(Cf::Active, task.id.as_bytes(), &parked)?;
            }
            Some(_) => {}
        }
        let mut outgoing = Vec::with_capacity(events.len());
        for event in events {
            // Event details carry tool errors, which may quote a URL or a header. Most
            // hold nothing like a secret: those are not copied.
            let redacted;
            let event = match event.detail.as_deref().and_then(crate::redact::masked) {
                Some(masked) => {
                    redacted = TaskEvent {
                        detail: Some(masked),
                        ..event.clone()
                    };
                    &redacted
                }
                None => event,
            };
            let payload = event.to_json();
            outgoing.push(ctx.stage_outbox(
                &mut batch,
                subject::task_event(&task.id, &event.kind),
                payload,
            )?);
            if let Some(out) = approval_event(task, event) {
                approvals.push(out);
            }
        }
        for (subject, payload) in approvals {
            outgoing.push(ctx.stage_outbox(&mut batch, subject, payload)?);
        }
        let charges = std::mem::take(&mut self.uncommitted_charges);
        for (day, cost) in &charges {
            crate::budget::stage_charge(&mut batch, day, &task.playbook, *cost);
        }
        let verified = task.status == TaskStatus::Succeeded;
        if verified {
            let [count, cost] = crate::budget::verified_keys(&task.playbook);
            batch.add(Cf::Spend, count.into_bytes(), 1);
            batch.add(Cf::Spend, cost.into_bytes(), task.cost_micros());
        }
        for record in records {
            batch.append_audit(record, Some(task.id.as_bytes()))?;
        }
        let started = Instant::now();
        let ticket = if written_is_enough {
            Some(ctx.store.commit_written(batch).await?)
        } else {
            ctx.store.commit(batch).await?;
            None
        };
        self.active_committed = active;
        ctx.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        let unknown = unknown_steps(task);
        ctx.metrics
            .effects_outcome_unknown
            .add(unknown - self.unknown_committed);
        self.unknown_committed = unknown;
        let pending = pending_approvals(task);
        ctx.metrics
            .approvals_pending
            .add(pending - self.pending_committed);
        self.pending_committed = pending;
        for event in events {
            count_approval(ctx, task, event);
        }
        if let Some(relay) = lookup::<RelayMsg>(RELAY, &ctx.settings.node_id) {
            // If the relay is restarting, it sends these from the outbox when it starts.
            let _ = relay.cast(match ticket {
                Some(ticket) => RelayMsg::PublishWhenSynced(ticket, outgoing),
                None => RelayMsg::Publish(outgoing),
            });
        }
        let usd = crate::budget::usd;
        for (day, cost) in &charges {
            ctx.metrics
                .cost_usd_total
                .with_label_values(&[&task.playbook])
                .inc_by(usd(*cost));
            let spent = |scope: &str| usd(ctx.ledger.spent(day, scope));
            ctx.metrics
                .budget_spent_usd
                .with_label_values(&["global"])
                .set(spent("*"));
            ctx.metrics
                .budget_spent_usd
                .with_label_values(&[&format!("playbook:{}", task.playbook)])
                .set(spent(&task.playbook));
        }
        if verified {
            ctx.metrics
                .task_cost_usd
                .with_label_values(&[&task.playbook])
                .observe(usd(task.cost_micros()));
        }
        if task.status.is_terminal() {
            let status = task.status.as_str();
            ctx.metrics
                .tasks_finished_total
                .with_label_values(&[&task.playbook, status])
                .inc();
            let secs = task.updated_at_ms.saturating_sub(task.created_at_ms) as f64 / 1000.0;
            ctx.metrics
                .task_duration_seconds
                .with_label_values(&[&task.playbook, status])
                .observe(secs);
        }
        Ok(())
    }

    /// Publishes the checkpoint just committed to the cluster (if the node is in one).
    /// `Err`: a newer owner has written it; this actor must stand down. A publish that
    /// fails otherwise is counted and left to the next commit, which carries the whole
    /// record: a takeover in between starts from the older checkpoint, and the effect
    /// ledger keeps a re-sent attempt from running twice.
    async fn replicate(&mut self) -> Result<(), String> {
        let Some(own) = self.ctx.ownership() else {
            return Ok(());
        };
        match own.publish_checkpoint(&self.task).await {
            Ok(()) => Ok(()),
            Err(crate::ownership::OwnershipError::Fenced) => {
                Err("a newer owner wrote the task's checkpoint".into())
            }
            Err(e) => {
                self.ctx.metrics.checkpoint_publish_failures_total.inc();
                tracing::warn!(error = %e, "checkpoint not replicated");
                Ok(())
            }
        }
    }

    /// Stops driving the task: another node owns it (`retry`: could not tell yet; the
    /// supervisor starts it again shortly). Nothing more is sent or committed.
    fn stand_down(&mut self, myself: &ActorRef<TaskMsg>, reason: String, retry: bool) {
        self.standing_down = true;
        let ctx = &self.ctx;
        if let Some(own) = ctx.ownership() {
            own.forget(&self.task.id);
        }
        let label = if retry {
            "unclaimed"
        } else {
            "owned_elsewhere"
        };
        ctx.metrics
            .task_stand_downs_total
            .with_label_values(&[label])
            .inc();
        if retry {
            tracing::warn!(%reason, "cannot claim the task yet; trying again");
            let (ctx, task_id) = (ctx.clone(), self.task.id.clone());
            let delay = ctx
                .ownership()
                .map_or(Duration::from_secs(1), |o| o.ttl / 3);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Some(tasks) = lookup::<crate::roles::task_supervisor::TaskSupervisorMsg>(
                    crate::roles::TASKS,
                    &ctx.settings.node_id,
                ) {
                    let _ = tasks.cast(crate::roles::task_supervisor::TaskSupervisorMsg::Start {
                        task_id,
                        accepted_ticket: None,
                    });
                }
            });
        } else {
            tracing::info!(%reason, "standing down: another node owns the task");
            // Not resumed here at the next start; a takeover brings it back if needed.
            let mut batch = Batch::new();
            batch.delete(Cf::Active, self.task.id.as_bytes());
            self.active_committed = None;
            if let Err(e) = ctx.store.write_unsynced(batch) {
                tracing::warn!(error = %e, "cannot unmark a task owned elsewhere");
            }
        }
        myself.stop(Some(format!("stood down: {reason}")));
    }

    /// The `step_executed` record of an executor's reply to the attempt in flight (none
    /// for a stale or duplicate reply), and the step-duration metric.
    fn executed_record(&mut self, input: &Input, from: Option<&str>) -> Option<AuditRecord> {
        let Input::Executed {
            step,
            attempt,
            reply,
        } = input
        else {
            return None;
        };
        let i = self.task.step_index(step)?;
        let s = &self.task.steps[i];
        if s.status != StepStatus::Running || s.attempts != *attempt {
            return None;
        }
        let tool = s.spec.tool.clone();
        let sent = self.sent.get_mut(i).and_then(Option::take);
        let elapsed = sent.as_ref().map(|s| s.at.elapsed());
        if let Some(elapsed) = elapsed {
            self.ctx
                .metrics
                .step_duration_seconds
                .with_label_values(&[&tool])
                .observe(elapsed.as_secs_f64());
        }
        let now = self.ctx.now_ms();
        // A verdict forwarded by the executor comes from the verifier; it names the executor.
        let actor = match reply {
            ExecReply::Verified { executor, .. } => executor.clone(),
            _ => from.map_or_else(|| self.ctx.from(crate::roles::EXECUTOR), str::to_string),
        };
        let mut r = self
            .facts
            .record(&self.task, &self.ctx.settings.node_id, &actor, now);
        r.action = "step_executed".into();
        r.step_id = Some(step.clone());
        r.attempt = Some(*attempt);
        r.tool = Some(tool);
        r.args_hash = sent.map(|s| s.args_hash);
        let (outcome, detail, duration_us) = match reply {
            ExecReply::Done {
                duration_us,
                replayed,
                ..
            }
            | ExecReply::Verified {
                duration_us,
                replayed,
                ..
            } => (
                "ok",
                replayed.then(|| "replayed from the effect ledger".to_string()),
                Some(*duration_us),
            ),
            ExecReply::Failed { kind, message, .. } => {
                let outcome = match kind {
                    FailureKind::Retryable => "retryable_error",
                    FailureKind::Permanent => "permanent_error",
                    FailureKind::OutcomeUnknown => "unknown",
                    FailureKind::Fenced => "fenced",
                };
                (outcome, Some(crate::redact::text(message)), None)
            }
        };
        r.outcome = outcome.into();
        r.detail = detail;
        // An unknown outcome has no duration: the run it describes was another process's.
        let unknown = matches!(
            reply,
            ExecReply::Failed {
                kind: FailureKind::OutcomeUnknown,
                ..
            }
        );
        r.duration_ms = duration_us
            .map(|us| us / 1000)
            .or(elapsed.filter(|_| !unknown).map(|e| e.as_millis() as u64));
        Some(r)
    }

    /// Counts a retry or a final failure of a step, by tool and why.
    fn count_failure(&self, event: &TaskEvent, why: Option<&'static str>) {
        let counter = match event.kind.as_str() {
            "step_retry" | "step_redelivery" => &self.ctx.metrics.step_retries_total,
            "step_failed" => &self.ctx.metrics.step_failures_total,
            _ => return,
        };
        let tool = event
            .step_id
            .as_deref()
            .and_then(|s| self.task.step(s))
            .map_or("unknown", |s| s.spec.tool.as_str());
        counter
            .with_label_values(&[tool, why.unwrap_or("other")])
            .inc();
    }

    fn should_stop(&self) -> bool {
        self.task.status.is_terminal() || is_parked(&self.task)
    }

    fn act(
        &mut self,
        myself: &ActorRef<TaskMsg>,
        action: Action,
        prepared: Option<Result<Prepared, String>>,
    ) {
        let ctx = &self.ctx;
        let hop_timeout = ctx.settings.hop_timeout;
        match action {
            Action::RequestPlan => {
                if self.task.priority == crate::model::Priority::Low && self.low_slot.is_none() {
                    match ctx.low_slots.clone().try_acquire_owned() {
                        Ok(permit) => self.low_slot = Some(permit),
                        // All slots busy: wait for one, then plan (`TaskMsg::LowSlot`).
                        Err(_) => {
                            let (slots, me) = (ctx.low_slots.clone(), myself.clone());
                            tokio::spawn(async move {
                                if let Ok(permit) = slots.acquire_owned().await {
                                    let _ = me.cast(TaskMsg::LowSlot(permit));
                                }
                            });
                            return;
                        }
                    }
                }
                let req = PlanRequest {
                    task_id: self.task.id.clone(),
                    playbook: self.task.playbook.clone(),
                    input: self.task.input.clone(),
                    goal: self.task.goal.clone(),
                };
                // An LLM plan takes drafts, each a call that may be retried.
                let timeout = match ctx.llm() {
                    Some(llm) => hop_timeout + crate::llm::plan::budget(llm.settings()),
                    None => hop_timeout,
                };
                hop(
                    ctx,
                    myself,
                    None,
                    subject::plan_on_node(&ctx.settings.node_id),
                    req,
                    timeout,
                    |r: Result<PlanReply, HopError>| match r {
                        Ok(reply) => Input::Planned(reply),
                        Err(e) => Input::PlanUnavailable(e.to_string()),
                    },
                );
            }
            Action::Exec { step, attempt } => {
                // Draining: leave the step as checkpointed (running); the next start
                // re-sends it through the ledger.
                if ctx.is_draining() {
                    return;
                }
                // Kill switch: the same, until `Released` (or a restart) sends it.
                if ctx.pause_if_engaged(&self.task.id, myself) {
                    return;
                }
                let Some(i) = self.task.step_index(&step) else {
                    return;
                };
                let prepared =
                    prepared.unwrap_or_else(|| self.exec_request(i, attempt).map(Prepared::of));
                // Lease lapsed (renewals failing): hold the step until one succeeds.
                let token = match ctx.ownership() {
                    None => 0,
                    Some(own) => match own.token(&self.task.id) {
                        Some(token) => token,
                        None => {
                            own.wait_for_renewal(&self.task.id, myself);
                            return;
                        }
                    },
                };
                let Prepared {
                    request: mut req,
                    args_hash,
                } = match prepared {
                    Ok(p) => p,
                    Err(message) => {
                        let reply = ExecReply::Failed {
                            kind: FailureKind::Permanent,
                            message,
                            output: None,
                        };
                        let _ = myself.cast(TaskMsg::Input(Input::Executed {
                            step,
                            attempt,
                            reply,
                        }));
                        return;
                    }
                };
                req.fencing_token = token;
                // The plan may have arrived after this actor started.
                if self.sent.len() < self.task.steps.len() {
                    self.sent.resize_with(self.task.steps.len(), || None);
                }
                if let Some(slot) = self.sent.get_mut(i) {
                    *slot = Some(Sent {
                        at: Instant::now(),
                        args_hash,
                    });
                }
                let timeout =
                    Duration::from_millis(req.timeout_ms) + ctx.settings.exec_timeout_margin;
                let placement = self.task.steps[i].spec.placement.as_ref();
                let subject = subject::exec_for(&req.tool, placement, &ctx.settings.node_id);
                hop(
                    ctx,
                    myself,
                    self.accepted_ticket,
                    subject,
                    req,
                    timeout,
                    move |r: Result<ExecReply, HopError>| match r {
                        Ok(reply) => Input::Executed {
                            step,
                            attempt,
                            reply,
                        },
                        Err(e) => Input::ExecUnanswered {
                            step,
                            attempt,
                            error: e.to_string(),
                        },
                    },
                );
            }
            Action::Verify { step, attempt } => {
                let Some(i) = self.task.step_index(&step) else {
                    return;
                };
                let s = &self.task.steps[i];
                // The params the step ran with, as its forwarded outcome is checked.
                let params = step_params(&self.task, i).unwrap_or_else(|_| s.spec.params.clone());
                let req = VerifyRequest::Step {
                    task_id: self.task.id.clone(),
                    step_id: step.clone(),
                    tool: s.spec.tool.clone(),
                    params,
                    criteria: s.spec.verify.clone(),
                    output: s.output.clone().unwrap_or_else(JsonText::null),
                    task: self.is_last(i).then(|| self.task_checks()),
                };
                // File criteria read the disk of the node that ran the step.
                let reads_disk =
                    s.spec.verify.file_exists.is_some() || s.spec.verify.file_contains.is_some();
                let subject = match self.ran_on.get(&step) {
                    Some(node) if reads_disk => subject::verify_on_node(node),
                    _ => subject::verify_on_node(&ctx.settings.node_id),
                };
                let timeout = match (&s.spec.verify.llm_judge, ctx.llm()) {
                    (Some(_), Some(llm)) => hop_timeout + llm.settings().call_budget(),
                    _ => hop_timeout,
                };
                hop(
                    ctx,
                    myself,
                    None,
                    subject,
                    req,
                    timeout,
                    move |r: Result<VerifyReply, HopError>| match r {
                        Ok(VerifyReply {
                            unavailable: Some(error),
                            ..
                        }) => Input::VerifyUnavailable {
                            step,
                            attempt,
                            error,
                        },
                        Ok(reply) => Input::Verified {
                            step,
                            attempt,
                            verdict: reply.verdict,
                            task_verdict: reply.task,
                            cost_micros: reply.cost_micros,
                        },
                        Err(e) => Input::VerifyUnavailable {
                            step,
                            attempt,
                            error: e.to_string(),
                        },
                    },
                );
            }
            Action::VerifyTask => {
                let req = VerifyRequest::Task {
                    task_id: self.task.id.clone(),
                    task: self.task_checks(),
                };
                hop(
                    ctx,
                    myself,
                    None,
                    subject::verify_on_node(&ctx.settings.node_id),
                    req,
                    hop_timeout,
                    |r: Result<VerifyReply, HopError>| match r {
                        Ok(reply) => Input::TaskVerified(reply.verdict),
                        Err(e) => Input::TaskVerifyUnavailable(e.to_string()),
                    },
                );
            }
            Action::Archive => {
                let req = ArchiveRequest {
                    task_id: self.task.id.clone(),
                    playbook: self.task.playbook.clone(),
                    playbook_version: self.task.playbook_version.clone(),
                    input: self.task.input.clone(),
                    steps: self
                        .task
                        .steps
                        .iter()
                        .enumerate()
                        .map(|(i, s)| EpisodeStep {
                            id: s.spec.id.clone(),
                            tool: s.spec.tool.clone(),
                            params: crate::governance::step_params(&self.task, i)
                                .unwrap_or_else(|_| s.spec.params.clone()),
                            output: s.output.clone().unwrap_or_else(JsonText::null),
                            verdict: s.verdict.clone(),
                            attempts: s.attempts,
                            started_at_ms: s.started_at_ms,
                            finished_at_ms: s.finished_at_ms,
                        })
                        .collect(),
                    task_verdict: self.task.task_verdict.clone(),
                    started_at_ms: self.task.created_at_ms,
                    finished_at_ms: self.task.updated_at_ms,
                };
                hop(
                    ctx,
                    myself,
                    None,
                    subject::archive_on_node(&ctx.settings.node_id),
                    req,
                    hop_timeout,
                    |r: Result<ArchiveReply, HopError>| {
                        Input::Archived(r.unwrap_or_else(|e| ArchiveReply::Failed {
                            message: e.to_string(),
                        }))
                    },
                );
            }
            Action::RetryAt {
                step,
                attempt,
                at_ms,
            } => deliver_at(ctx, myself, at_ms, Input::RetryDue { step, attempt }),
            Action::VerifyAt {
                step,
                attempt,
                at_ms,
            } => deliver_at(ctx, myself, at_ms, Input::VerifyDue { step, attempt }),
            Action::HopAt { at_ms } => deliver_at(ctx, myself, at_ms, Input::HopDue),
            Action::ApprovalAt {
                step,
                approval_id,
                at_ms,
            } => deliver_at(ctx, myself, at_ms, Input::ApprovalDue { step, approval_id }),
        }
    }

    /// After the kill switch is released: dispatch every running step that was held
    /// back (running, and not sent). Nothing changes state, so nothing is committed.
    fn send_held(&mut self, myself: &ActorRef<TaskMsg>) {
        let held: Vec<(String, u32)> = self
            .task
            .steps
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                s.status == StepStatus::Running && self.sent.get(*i).is_none_or(Option::is_none)
            })
            .map(|(_, s)| (s.spec.id.clone(), s.attempts))
            .collect();
        for (step, attempt) in held {
            self.act(myself, Action::Exec { step, attempt }, None);
        }
    }

    /// After a reconnect: every attempt sent and not answered is sent again, and every
    /// verdict asked for is asked again. Nothing changes state, so nothing is committed;
    /// a late answer to the first send is stale and ignored.
    fn resend_in_flight(&mut self, myself: &ActorRef<TaskMsg>) {
        let in_flight: Vec<(String, u32, StepStatus)> = self
            .task
            .steps
            .iter()
            .enumerate()
            .filter(|(i, s)| match s.status {
                StepStatus::Running => self.sent.get(*i).is_some_and(Option::is_some),
                StepStatus::Verifying => true,
                _ => false,
            })
            .map(|(_, s)| (s.spec.id.clone(), s.attempts, s.status))
            .collect();
        for (step, attempt, status) in in_flight {
            let action = if status == StepStatus::Running {
                Action::Exec { step, attempt }
            } else {
                Action::Verify { step, attempt }
            };
            self.act(myself, action, None);
        }
    }

    /// The exec request for step `i`, with `{{steps.<id>.output…}}` filled in from the
    /// outputs of the steps it depends on.
    fn exec_request(&self, i: usize, attempt: u32) -> Result<ExecRequest, String> {
        let spec = &self.task.steps[i].spec;
        Ok(ExecRequest {
            task_id: self.task.id.clone(),
            step_id: spec.id.clone(),
            attempt,
            tool: spec.tool.clone(),
            params: step_params(&self.task, i)?,
            idempotency_key: self.task.step_key(&spec.id),
            fencing_token: 0,
            timeout_ms: spec.timeout_ms,
            verify: self.forwarded_checks(i),
        })
    }

    /// The checks step `i`'s executor forwards its outcome with (`ExecRequest::verify`):
    /// all but an LLM judge, whose budget is the verify hop's own.
    fn forwarded_checks(&self, i: usize) -> Option<StepChecks> {
        let spec = &self.task.steps[i].spec;
        if spec.verify.llm_judge.is_some() {
            return None;
        }
        Some(StepChecks {
            criteria: spec.verify.clone(),
            task: self.is_last(i).then(|| self.task_checks()),
        })
    }

    /// Whether step `i` is the last left: its verification carries the task's checks,
    /// so one round trip decides both. (Not an undo step: a compensating task has no
    /// verdict to reach.)
    fn is_last(&self, i: usize) -> bool {
        self.task.steps[i].spec.compensates.is_none()
            && self
                .task
                .steps
                .iter()
                .enumerate()
                .all(|(j, o)| j == i || o.status == StepStatus::Succeeded)
    }

    fn task_checks(&self) -> TaskChecks {
        TaskChecks {
            checks: self.task.checks.clone(),
            outputs: self.outputs(),
        }
    }

    fn outputs(&self) -> Vec<(String, JsonText)> {
        self.task
            .steps
            .iter()
            .map(|s| {
                (
                    s.spec.id.clone(),
                    s.output.clone().unwrap_or_else(JsonText::null),
                )
            })
            .collect()
    }
}

/// What a TaskActor starts from on a node in a cluster: the task, inputs to apply
/// before `Start`, and, if it must not drive the task, why and whether to try again.
type Claimed = (Task, Vec<Input>, Option<(String, bool)>);

/// Claims the task's lease and picks the record to resume from: the replicated
/// checkpoint when another node wrote it last (the stream is fenced, so that node
/// owned the task after this one) or when it is newer than the local one; else the
/// local record, which may be ahead of what this node managed to replicate.
async fn claim(
    ctx: &Arc<NodeContext>,
    own: &crate::ownership::Ownership,
    task_id: &str,
    local: Option<Task>,
) -> Result<Claimed, ActorProcessingErr> {
    use crate::ownership::OwnershipError;
    let me = ctx.settings.node_id.clone();
    let placeholder = |local: Option<Task>| {
        local.unwrap_or_else(|| {
            Task::new(
                task_id.to_string(),
                String::new(),
                JsonText::null(),
                None,
                me.clone(),
                ctx.now_ms(),
            )
        })
    };
    let claim = match own.claim(task_id, ctx.now_ms()).await {
        Ok(claim) => claim,
        Err(OwnershipError::HeldBy { owner, token }) => {
            let why = format!("owned by {owner} under fencing token {token}");
            return Ok((placeholder(local), Vec::new(), Some((why, false))));
        }
        Err(e) => return Ok((placeholder(local), Vec::new(), Some((e.to_string(), true)))),
    };
    let adopt = match (&local, &claim.checkpoint) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(l), Some((remote, writer))) => *writer != me || remote.event_seq > l.event_seq,
    };
    let (task, from) = match (local, claim.checkpoint) {
        (_, Some((remote, writer))) if adopt => {
            let mut batch = Batch::new();
            batch.put(Cf::Tasks, task_id.as_bytes(), &remote)?;
            if remote.status.is_terminal() {
                batch.delete(Cf::Active, task_id.as_bytes());
            } else {
                batch.put(Cf::Active, task_id.as_bytes(), &is_parked(&remote))?;
            }
            ctx.store.commit(batch).await?;
            (remote, (writer != me).then_some(writer))
        }
        (Some(local), _) => (local, None),
        (None, _) => {
            own.release(task_id).await;
            let why = "no checkpoint of the task on this node or in the cluster".to_string();
            return Ok((placeholder(None), Vec::new(), Some((why, false))));
        }
    };
    let mut inputs = Vec::new();
    if let Some(from) = from
        && !task.status.is_terminal()
    {
        ctx.metrics.task_takeovers_total.inc();
        tracing::info!(task_id, from, token = claim.token, "taking the task over");
        inputs.push(Input::TakenOver {
            from,
            by: me,
            token: claim.token,
        });
    }
    Ok((task, inputs, None))
}

/// Sends `req` to another role without blocking the actor; the reply (or why there
/// was none) comes back to it as an input. With `after_sync`, only once that store
/// ticket is synced (a step of a task whose accepted record may not be yet).
///
/// "No responders" means nobody subscribes to the subject right now: on the task's own
/// node, its role is between a crash and its supervisor's restart (100 ms, then
/// longer). That is retried within the hop's timeout, rather than spending one of the
/// task's hop or step attempts on every few milliseconds of a restart.
fn hop<Req, Rep>(
    ctx: &Arc<NodeContext>,
    me: &ActorRef<TaskMsg>,
    after_sync: Option<u64>,
    subject: String,
    req: Req,
    timeout: Duration,
    to_input: impl FnOnce(Result<Rep, HopError>) -> Input + Send + 'static,
) where
    Req: serde::Serialize + Send + Sync + 'static,
    Rep: serde::de::DeserializeOwned + Send + 'static,
{
    let (ctx, me) = (ctx.clone(), me.clone());
    tokio::spawn(async move {
        if let Some(ticket) = after_sync
            && let Err(e) = ctx.store.wait_synced(ticket).await
        {
            let input = to_input(Err(HopError::Transport(e.to_string())));
            let _ = me.cast(TaskMsg::Reply { input, from: None });
            return;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(20);
        let (reply, from) = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match bus::request_wire::<_, Rep>(&ctx.nats, subject.clone(), &req, left).await {
                Ok(Replied { value, from }) => break (Ok(value), from),
                Err(HopError::NoResponders(_)) if left > pause => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(250));
                }
                Err(e) => break (Err(e), None),
            }
        };
        let input = to_input(reply);
        let _ = me.cast(TaskMsg::Reply { input, from });
    });
}

/// Delivers `input` to the actor at `at_ms` (by the injected clock).
fn deliver_at(ctx: &NodeContext, me: &ActorRef<TaskMsg>, at_ms: u64, input: Input) {
    let delay = Duration::from_millis(at_ms.saturating_sub(ctx.now_ms()));
    let me = me.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = me.cast(TaskMsg::Input(input));
    });
}

/// Parked: waiting for an operator with nothing in flight and no timer. Its actor can
/// stop; the task costs only its checkpoint until a decision arrives. (A step awaiting
/// approval keeps the actor: its expiry is a timer.)
pub fn is_parked(task: &Task) -> bool {
    task.status == TaskStatus::AwaitingOperator
        && !task.steps.iter().any(|s| {
            matches!(
                s.status,
                StepStatus::Running
                    | StepStatus::Verifying
                    | StepStatus::RetryWait
                    | StepStatus::AwaitingApproval
            )
        })
}

/// An exec request and the hash of its params (the audit record's and the ledger's).
struct Prepared {
    request: ExecRequest,
    args_hash: String,
}

impl Prepared {
    fn of(request: ExecRequest) -> Prepared {
        let args_hash = audit::args_hash(&request.params);
        Prepared { request, args_hash }
    }
}

/// Approvals of `task` waiting for a decision.
pub fn pending_approvals(task: &Task) -> i64 {
    task.steps
        .iter()
        .filter(|s| {
            s.approval
                .as_ref()
                .is_some_and(|a| a.state == ApprovalState::Pending)
        })
        .count() as i64
}

/// The `cadre.approvals.*` message an approval event publishes, with the approval as
/// it stands after the transition.
fn approval_event(task: &Task, event: &TaskEvent) -> Option<(String, Vec<u8>)> {
    let requested = match event.kind.as_str() {
        "approval_requested" => true,
        "approval_granted" | "approval_denied" | "approval_expired" => false,
        // A void approval is not the step's current one: find it by the detail's id.
        "approval_void" => false,
        _ => return None,
    };
    let step = task.step(event.step_id.as_deref()?)?;
    let approval = step.approval.as_ref()?;
    let mut view = crate::roles::task_api::approval_view(task, step, approval);
    if event.kind == "approval_void" {
        let id = event.detail.as_deref()?.split(' ').next()?.to_string();
        view.approval_id = id;
        view.state = ApprovalState::Void;
    }
    let subject = if requested {
        subject::approval_requested(&view.approval_id)
    } else {
        subject::approval_decided(&view.approval_id)
    };
    serde_json::to_vec(&view).ok().map(|p| (subject, p))
}

/// Counts a decided approval and how long it waited.
fn count_approval(ctx: &NodeContext, task: &Task, event: &TaskEvent) {
    let decision = match event.kind.as_str() {
        "approval_granted" => "approve",
        "approval_denied" => "deny",
        "approval_expired" => "expired",
        "approval_void" => "void",
        _ => return,
    };
    ctx.metrics
        .approvals_decided_total
        .with_label_values(&[decision])
        .inc();
    if let Some(a) = event
        .step_id
        .as_deref()
        .and_then(|s| task.step(s))
        .and_then(|s| s.approval.as_ref())
        .filter(|_| decision != "void")
    {
        let waited = a
            .decided_at_ms
            .unwrap_or(event.at_ms)
            .saturating_sub(a.requested_at_ms);
        ctx.metrics
            .approval_wait_seconds
            .observe(waited as f64 / 1000.0);
    }
}

/// Steps of `task` whose effect's outcome is unknown.
pub fn unknown_steps(task: &Task) -> i64 {
    task.steps
        .iter()
        .filter(|s| s.status == StepStatus::OutcomeUnknown)
        .count() as i64
}

/// Why an input fails or retries a step, for the `reason` label.
fn failure_reason(input: &Input) -> Option<&'static str> {
    Some(match input {
        Input::Executed {
            reply: ExecReply::Failed { kind, .. },
            ..
        } => match kind {
            FailureKind::Retryable => reason::TOOL_ERROR,
            FailureKind::Permanent => reason::PERMANENT,
            FailureKind::OutcomeUnknown | FailureKind::Fenced => return None,
        },
        Input::ExecUnanswered { .. } => reason::UNANSWERED,
        Input::Verified { verdict, .. } if !verdict.passed => reason::VERIFY_FAILED,
        Input::VerifyUnavailable { .. } => reason::VERIFIER_UNANSWERED,
        Input::Resolve {
            decision: DecisionKind::Abort,
            ..
        } => reason::ABORTED,
        _ => return None,
    })
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}
