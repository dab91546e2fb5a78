//! The task state machine, as a pure function: `(task, input) → (task', actions, events)`.
//!
//! The TaskActor feeds it inputs (a plan arrived, an executor answered, a timer fired),
//! commits the new task and its events in one synced batch, and only then performs the
//! actions. Keeping it pure makes every transition unit-testable and replayable.

use crate::model::{
    Approval, ApprovalDecision, ApprovalKind, ApprovalState, DecisionKind, JsonText, Step,
    StepStatus, Task, TaskStatus,
};
use crate::policy::Ruling;
use crate::protocol::{ArchiveReply, ExecReply, FailureKind, PlanReply, TaskEvent, Verdict};

/// Bounds and timings the machine needs; times are injected, never read from a clock.
#[derive(Debug, Clone)]
pub struct Limits {
    pub retry_delay_ms_base: u64,
    pub retry_delay_ms_max: u64,
    /// Re-sends of one attempt when no executor answers, before the step fails.
    pub redeliveries_max: u32,
    /// Retries of a plan/verify/archive hop before the task fails.
    pub hop_retries_max: u32,
    /// How long an approval request waits for a person.
    pub approval_ttl_ms: u64,
    /// What an approval nobody decided in time becomes.
    pub approval_default: ApprovalDecision,
    /// Every commit's checkpoint is replicated to the cluster, where the next owner
    /// resumes from: nothing effect-free is held uncommitted past a hop that may fail.
    pub checkpoints_replicated: bool,
}

/// The Governor's answer for one step about to be dispatched: the policies' ruling
/// and what it was about, so that an approval can be bound to exactly that.
#[derive(Debug, Clone, PartialEq)]
pub struct Gated {
    pub ruling: Ruling,
    /// Why (for deny and require_approval), naming the policies' version.
    pub reason: String,
    pub policy_version: String,
    /// sha256 of the params that would be sent.
    pub args_hash: String,
    /// Estimated cost of the attempt, in millionths of a US dollar: what the policies
    /// and an approval request see.
    pub cost_micros: u64,
    /// What the gate charged for it: the estimate, or 0 for a tool that reports its
    /// cost once it ran (`llm.generate`), which is charged then.
    pub charged_micros: u64,
}

/// Consulted by the machine before every dispatch (`crate::governance::Governor`). It
/// reads the task as it stands, with the outputs of the steps this one depends on.
pub trait Gate {
    fn check(&self, task: &Task, step: usize, now_ms: u64) -> Gated;
}

/// A gate that lets everything through (machine tests of the spine).
pub struct AllowAll;

impl Gate for AllowAll {
    fn check(&self, _: &Task, _: usize, _: u64) -> Gated {
        Gated {
            ruling: Ruling::Allow,
            reason: String::new(),
            policy_version: "none".into(),
            args_hash: String::new(),
            cost_micros: 0,
            charged_micros: 0,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            retry_delay_ms_base: 200,
            retry_delay_ms_max: 10_000,
            redeliveries_max: 8,
            hop_retries_max: 5,
            approval_ttl_ms: 24 * 3_600_000,
            approval_default: ApprovalDecision::Deny,
            checkpoints_replicated: false,
        }
    }
}

/// What happened to the task.
#[derive(Debug, Clone)]
pub enum Input {
    /// The actor (re)started from its checkpoint.
    Start,
    Planned(PlanReply),
    /// The plan hop failed (timeout, no planner).
    PlanUnavailable(String),
    Executed {
        step: String,
        attempt: u32,
        reply: ExecReply,
    },
    /// No executor answered the request for this attempt (timeout, no responders).
    ExecUnanswered {
        step: String,
        attempt: u32,
        error: String,
    },
    Verified {
        step: String,
        attempt: u32,
        verdict: Verdict,
        /// The task's verdict, when the last step was verified with the task's checks.
        task_verdict: Option<Verdict>,
        /// What judging cost (an LLM judge), in millionths of a US dollar.
        cost_micros: u64,
    },
    VerifyUnavailable {
        step: String,
        attempt: u32,
        error: String,
    },
    TaskVerified(Verdict),
    TaskVerifyUnavailable(String),
    Archived(ArchiveReply),
    RetryDue {
        step: String,
        attempt: u32,
    },
    /// A step's verification is due again (the verifier did not answer).
    VerifyDue {
        step: String,
        attempt: u32,
    },
    /// A delayed plan/verify/archive hop is due again.
    HopDue,
    Cancel {
        reason: String,
    },
    /// The task's actor kept crashing; give up on the task with this reason.
    Abandon {
        reason: String,
    },
    Resolve {
        step: String,
        decision: DecisionKind,
        by: String,
        /// The operator's note, kept in the event that records the decision.
        note: Option<String>,
    },
    /// An operator's decision on an approval request.
    Decide {
        approval_id: String,
        decision: ApprovalDecision,
        by: String,
        note: Option<String>,
    },
    /// An event for a `wait` step that waits for it.
    Signal {
        event: String,
        payload: Option<serde_json::Value>,
        by: String,
    },
    /// An approval request's expiry is due.
    ApprovalDue {
        step: String,
        approval_id: String,
    },
    /// Node `by` took the task over from `from`, whose lease expired; its effects carry
    /// `token` from now on.
    TakenOver {
        from: String,
        by: String,
        token: u64,
    },
}

/// What the actor must do after committing.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    RequestPlan,
    Exec {
        step: String,
        attempt: u32,
    },
    Verify {
        step: String,
        attempt: u32,
    },
    VerifyTask,
    Archive,
    /// Deliver `Input::RetryDue { step, attempt }` at `at_ms`.
    RetryAt {
        step: String,
        attempt: u32,
        at_ms: u64,
    },
    /// Deliver `Input::VerifyDue { step, attempt }` at `at_ms`.
    VerifyAt {
        step: String,
        attempt: u32,
        at_ms: u64,
    },
    /// Deliver `Input::HopDue` at `at_ms`.
    HopAt {
        at_ms: u64,
    },
    /// Deliver `Input::ApprovalDue { step, approval_id }` at `at_ms`.
    ApprovalAt {
        step: String,
        approval_id: String,
        at_ms: u64,
    },
}

/// The result of one input.
#[derive(Debug, Default)]
pub struct Transition {
    pub actions: Vec<Action>,
    /// Events of this transition. When `commit` is false they are held by the caller
    /// and committed (and so published) with the next transition that commits.
    pub events: Vec<TaskEvent>,
    /// False when nothing durable changed (a stale reply, an in-memory step).
    pub commit: bool,
    /// Cost that calls reported after the fact (LLM planning, an `llm.generate`
    /// outcome, an LLM judge), in millionths of a US dollar: already on the task, not
    /// yet on the budget ledger (the gate charged dispatches itself).
    pub reported_cost_micros: u64,
}

/// A request that the task's state does not allow (answered as `conflict`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

struct Cx<'a> {
    task: &'a mut Task,
    now_ms: u64,
    jitter: f64,
    limits: &'a Limits,
    gate: &'a dyn Gate,
    out: Transition,
    /// The input answers one of the task's own calls (an executor's or a verifier's
    /// reply): nobody outside the task has been told anything, so what follows from it
    /// may be held uncommitted where it is effect-free and redone after a crash. Not so
    /// for an operator's input, whose answer waits for its commit.
    own_reply: bool,
}

/// Applies `input` to `task`. `jitter` in `[0, 1)` comes from the actor's seeded RNG;
/// `gate` is asked before every dispatch.
pub fn apply(
    task: &mut Task,
    input: Input,
    now_ms: u64,
    jitter: f64,
    limits: &Limits,
    gate: &dyn Gate,
) -> Result<Transition, Rejected> {
    let mut cx = Cx {
        task,
        now_ms,
        jitter,
        limits,
        gate,
        out: Transition::default(),
        own_reply: matches!(
            input,
            Input::Executed { .. } | Input::Verified { .. } | Input::TaskVerified(_)
        ),
    };
    cx.input(input)?;
    // Also when the events are held: the time the task last changed is now, whenever
    // it is committed (the archivist records it as the task's finish).
    if cx.out.commit || !cx.out.events.is_empty() {
        cx.task.updated_at_ms = now_ms;
    }
    Ok(cx.out)
}

impl Cx<'_> {
    fn input(&mut self, input: Input) -> Result<(), Rejected> {
        match input {
            Input::Start => self.start(),
            Input::Cancel { reason } => return self.cancel(reason),
            Input::Abandon { reason } => {
                if self.task.ends_as.is_some() && !self.task.status.is_terminal() {
                    // Its actor kept crashing while undoing: stop undoing.
                    self.note_failure(format!("compensation abandoned: {reason}"));
                    self.skip_unfinished();
                    self.finish_compensation();
                } else if !self.task.status.is_terminal() {
                    self.fail(reason);
                }
            }
            Input::Resolve {
                step,
                decision,
                by,
                note,
            } => return self.resolve(&step, decision, &by, note.as_deref()),
            Input::Decide {
                approval_id,
                decision,
                by,
                note,
            } => return self.decide(&approval_id, decision, &by, note),
            _ if self.task.status.is_terminal() => {}
            Input::TakenOver { from, by, token } => {
                // Events name the node that drives the task from here on.
                self.task.node_id = by;
                self.event(
                    "taken_over",
                    None,
                    None,
                    Some(format!("from {from}, under fencing token {token}")),
                );
            }
            Input::ApprovalDue { step, approval_id } => self.approval_due(&step, &approval_id),
            Input::Signal { event, payload, by } => return self.signal(&event, payload, &by),
            Input::Planned(reply) => self.planned(reply),
            Input::PlanUnavailable(error) => self.hop_failed(TaskStatus::Planning, error),
            Input::Executed {
                step,
                attempt,
                reply,
            } => self.executed(&step, attempt, reply),
            Input::ExecUnanswered {
                step,
                attempt,
                error,
            } => self.unanswered(&step, attempt, error),
            Input::Verified {
                step,
                attempt,
                verdict,
                task_verdict,
                cost_micros,
            } => self.verified(&step, attempt, verdict, task_verdict, cost_micros),
            Input::VerifyUnavailable {
                step,
                attempt,
                error,
            } => self.verifier_unanswered(&step, attempt, error),
            Input::VerifyDue { step, attempt } => {
                if self
                    .current(&step, attempt, StepStatus::Verifying)
                    .is_some()
                {
                    self.out.actions.push(Action::Verify { step, attempt });
                }
            }
            Input::TaskVerified(verdict) => self.task_verified(verdict),
            Input::TaskVerifyUnavailable(error) => self.hop_failed(TaskStatus::Verifying, error),
            Input::Archived(reply) => self.archived(reply),
            Input::RetryDue { step, attempt } => self.retry_due(&step, attempt),
            Input::HopDue => self.hop_due(),
        }
        Ok(())
    }

    // --- lifecycle -----------------------------------------------------------------

    fn start(&mut self) {
        match self.task.status {
            TaskStatus::Accepted | TaskStatus::Scheduled
                if self.task.not_before_ms.is_some_and(|t| t > self.now_ms) =>
            {
                let at_ms = self.task.not_before_ms.unwrap_or(self.now_ms);
                if self.task.status == TaskStatus::Accepted {
                    let detail = format!("runs at {}", crate::schedule::show_utc(at_ms));
                    self.set_status(TaskStatus::Scheduled, Some(detail));
                }
                self.out.actions.push(Action::HopAt { at_ms });
            }
            TaskStatus::Accepted | TaskStatus::Scheduled => {
                // Not committed on its own: planning is effect-free and redone after a
                // crash. Its event is held and committed with the plan (or the failure).
                self.set_status(TaskStatus::Planning, None);
                self.out.commit = false;
                self.out.actions.push(Action::RequestPlan);
            }
            TaskStatus::Planning => self.out.actions.push(Action::RequestPlan),
            TaskStatus::Running
            | TaskStatus::AwaitingOperator
            | TaskStatus::AwaitingApproval
            | TaskStatus::Compensating => self.resume_steps(),
            TaskStatus::Verifying => self.out.actions.push(Action::VerifyTask),
            TaskStatus::Archiving => self.out.actions.push(Action::Archive),
            TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Cancelled => {}
        }
    }

    /// After a restart: re-send what was in flight, re-arm timers, dispatch what is ready.
    fn resume_steps(&mut self) {
        for i in 0..self.task.steps.len() {
            let step = &mut self.task.steps[i];
            let id = step.spec.id.clone();
            match step.status {
                // Verifying is never checkpointed, but an actor restarted in-process may
                // hold it: go back through the ledger, which replays the recorded outcome.
                StepStatus::Running | StepStatus::Verifying => {
                    step.status = StepStatus::Running;
                    self.out.actions.push(Action::Exec {
                        step: id,
                        attempt: step.attempts,
                    });
                }
                StepStatus::RetryWait => {
                    let at_ms = step.retry_at_ms.unwrap_or(self.now_ms);
                    self.out.actions.push(Action::RetryAt {
                        step: id,
                        attempt: step.next_attempt,
                        at_ms,
                    });
                }
                // A durable timer: re-armed for the time it was set for, however long
                // the node was down (a time already past fires at once).
                StepStatus::Waiting => {
                    let at_ms = step.retry_at_ms.unwrap_or(self.now_ms);
                    self.out.actions.push(Action::RetryAt {
                        step: id,
                        attempt: step.attempts,
                        at_ms,
                    });
                }
                StepStatus::AwaitingApproval => {
                    if let Some(a) = &step.approval
                        && a.state == ApprovalState::Pending
                    {
                        self.out.actions.push(Action::ApprovalAt {
                            step: id,
                            approval_id: a.id.clone(),
                            at_ms: a.expires_at_ms,
                        });
                    }
                }
                _ => {}
            }
        }
        if self.is_dispatching() {
            self.dispatch_ready();
        }
    }

    fn planned(&mut self, reply: PlanReply) {
        if self.task.status != TaskStatus::Planning {
            return;
        }
        match reply {
            PlanReply::Planned {
                steps,
                checks,
                playbook_version,
                persona,
                planning,
            } => {
                self.report_planning(planning);
                self.task.steps = steps.into_iter().map(Step::new).collect();
                self.task.persona = persona;
                self.task.checks = checks;
                self.task.playbook_version = playbook_version;
                self.task.hop_retries = 0;
                let detail = format!("{} steps", self.task.steps.len());
                self.set_status(TaskStatus::Running, Some(detail));
                self.dispatch_ready();
            }
            PlanReply::Rejected {
                code,
                message,
                planning,
            } => {
                self.report_planning(planning);
                self.fail(format!("planner rejected the task ({code:?}): {message}"));
            }
        }
    }

    fn report_planning(&mut self, planning: Option<crate::model::Planning>) {
        if let Some(p) = &planning {
            self.out.reported_cost_micros += p.cost_micros;
        }
        self.task.planning = planning;
    }

    fn cancel(&mut self, reason: String) -> Result<(), Rejected> {
        if self.task.status.is_terminal() {
            return Err(Rejected(format!("task is already {}", self.task.status)));
        }
        if self.task.ends_as.is_some() {
            return Err(Rejected(
                "task is compensating: its undo steps run to the end (the kill switch stops them)"
                    .into(),
            ));
        }
        self.skip_unfinished();
        self.task.failure = Some(format!("cancelled: {reason}"));
        self.task.attention = None;
        if !self.begin_compensation(TaskStatus::Cancelled, &reason) {
            self.set_status(TaskStatus::Cancelled, Some(reason));
        }
        Ok(())
    }

    // --- compensation (saga) --------------------------------------------------------

    /// Undo steps for the done steps that declared one, newest first. False if there
    /// is nothing to undo (the task ends at once).
    fn begin_compensation(&mut self, ends_as: TaskStatus, why: &str) -> bool {
        let mut done: Vec<(u64, usize)> = self
            .task
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.status == StepStatus::Succeeded && s.spec.compensate.is_some())
            .map(|(i, s)| (s.finished_at_ms.unwrap_or(0), i))
            .collect();
        if done.is_empty() {
            return false;
        }
        // Newest first; steps that finished in the same millisecond, later in the plan first.
        done.sort_by(|a, b| b.cmp(a));
        let undo: Vec<Step> = done
            .iter()
            .filter_map(|&(_, i)| self.task.steps[i].spec.compensate.as_deref().cloned())
            .map(Step::new)
            .collect();
        let names: Vec<String> = undo
            .iter()
            .filter_map(|s| s.spec.compensates.clone())
            .collect();
        self.task.steps.extend(undo);
        self.task.ends_as = Some(ends_as);
        self.set_status(
            TaskStatus::Compensating,
            Some(format!("{why}; undoing {}", names.join(", "))),
        );
        self.dispatch_ready();
        true
    }

    /// An undo step gave up (failed, denied, aborted): say so and go on with the others.
    fn compensation_failed(&mut self, reason: String) {
        self.note_failure(format!("compensation failed: {reason}"));
        self.task.attention = None;
        self.refresh_attention();
        self.continue_compensation();
    }

    fn continue_compensation(&mut self) {
        let all_done = self
            .task
            .steps
            .iter()
            .filter(|s| s.spec.compensates.is_some())
            .all(|s| s.status.is_done());
        if all_done {
            self.finish_compensation();
        } else if self.is_dispatching() {
            self.dispatch_ready();
        }
    }

    fn finish_compensation(&mut self) {
        let ends_as = self.task.ends_as.unwrap_or(TaskStatus::Failed);
        let undone = self
            .task
            .steps
            .iter()
            .filter(|s| s.spec.compensates.is_some())
            .filter(|s| s.status == StepStatus::Succeeded)
            .count();
        let total = self
            .task
            .steps
            .iter()
            .filter(|s| s.spec.compensates.is_some())
            .count();
        self.task.attention = None;
        self.set_status(ends_as, Some(format!("{undone} of {total} steps undone")));
    }

    fn note_failure(&mut self, more: String) {
        self.task.failure = Some(match self.task.failure.take() {
            Some(f) => format!("{f}; {more}"),
            None => more,
        });
    }

    /// Running, or compensating: steps may be dispatched.
    fn is_dispatching(&self) -> bool {
        matches!(
            self.task.status,
            TaskStatus::Running | TaskStatus::Compensating
        )
    }

    fn resolve(
        &mut self,
        step_id: &str,
        decision: DecisionKind,
        by: &str,
        note: Option<&str>,
    ) -> Result<(), Rejected> {
        let Some(i) = self.task.step_index(step_id) else {
            return Err(Rejected(format!("task has no step `{step_id}`")));
        };
        if self.task.steps[i].status != StepStatus::OutcomeUnknown {
            return Err(Rejected(format!(
                "step `{step_id}` is {}, not waiting for a decision",
                self.task.steps[i].status.as_str()
            )));
        }
        let by = if by.is_empty() { "operator" } else { by };
        // The approval that asked the same question (the two ways to answer are one).
        let now = self.now_ms;
        if let Some(a) = self.task.steps[i].approval.as_mut()
            && a.state == ApprovalState::Pending
            && a.kind == ApprovalKind::OutcomeUnknown
        {
            a.state = if decision == DecisionKind::Abort {
                ApprovalState::Denied
            } else {
                ApprovalState::Approved
            };
            a.decided_by = Some(by.to_string());
            a.decided_at_ms = Some(now);
            a.note = note.filter(|n| !n.is_empty()).map(str::to_string);
            let (kind, id, attempt) = (
                if decision == DecisionKind::Abort {
                    "approval_denied"
                } else {
                    "approval_granted"
                },
                a.id.clone(),
                a.attempt,
            );
            let word = match decision {
                DecisionKind::Retry => "retry",
                DecisionKind::MarkDone => "mark_done",
                DecisionKind::Abort => "abort",
            };
            self.event(
                kind,
                Some(step_id),
                Some(attempt),
                Some(format!("{id}: {word} by {by}")),
            );
        }
        let note = note
            .filter(|n| !n.is_empty())
            .map(|n| format!(": {n}"))
            .unwrap_or_default();
        match decision {
            DecisionKind::Abort => {
                let step = &mut self.task.steps[i];
                step.status = StepStatus::Failed;
                step.finished_at_ms = Some(self.now_ms);
                step.error = Some(format!("aborted by {by} after an unknown outcome"));
                self.event(
                    "step_failed",
                    Some(step_id),
                    Some(self.task.steps[i].attempts),
                    Some(format!("aborted by {by}{note}")),
                );
                self.step_gave_up(
                    i,
                    format!("step `{step_id}` aborted by {by} (outcome unknown)"),
                );
            }
            DecisionKind::Retry => {
                let attempt = self.task.steps[i].attempts + 1;
                self.event(
                    "step_resolved",
                    Some(step_id),
                    Some(attempt),
                    Some(format!("retry by {by}{note}")),
                );
                self.task.steps[i].status = StepStatus::Pending;
                self.refresh_attention();
                self.begin_attempt(i, attempt);
            }
            DecisionKind::MarkDone => {
                let step = &mut self.task.steps[i];
                step.status = StepStatus::Succeeded;
                step.finished_at_ms = Some(self.now_ms);
                step.output.get_or_insert_with(JsonText::null);
                step.verdict = Some(Verdict {
                    passed: true,
                    reasons: vec![format!("marked done by {by}")],
                });
                let attempt = step.attempts;
                self.event(
                    "step_succeeded",
                    Some(step_id),
                    Some(attempt),
                    Some(format!("marked done by {by}{note}")),
                );
                self.refresh_attention();
                self.advance(None);
            }
        }
        Ok(())
    }

    // --- steps ---------------------------------------------------------------------

    /// Starts every pending step whose dependencies have succeeded; while compensating,
    /// the next undo step once the one before it is done (one at a time, in order).
    fn dispatch_ready(&mut self) {
        if self.task.ends_as.is_some() {
            let undo = |s: &Step| s.spec.compensates.is_some();
            let busy = self
                .task
                .steps
                .iter()
                .any(|s| undo(s) && !s.status.is_done() && s.status != StepStatus::Pending);
            let next = self
                .task
                .steps
                .iter()
                .position(|s| undo(s) && s.status == StepStatus::Pending);
            if let (false, Some(i)) = (busy, next) {
                self.begin_attempt(i, 1);
            }
            return;
        }
        let ready: Vec<usize> = (0..self.task.steps.len())
            .filter(|&i| {
                let step = &self.task.steps[i];
                step.status == StepStatus::Pending
                    && step.spec.compensates.is_none()
                    && step.spec.depends_on.iter().all(|d| {
                        self.task
                            .step(d)
                            .is_some_and(|s| s.status == StepStatus::Succeeded)
                    })
            })
            .collect();
        for i in ready {
            self.begin_attempt(i, 1);
        }
    }

    /// Dispatches attempt `attempt` of step `i` if the Governor allows it: its ruling,
    /// or an approval of exactly this action, is committed with `step_started`.
    fn begin_attempt(&mut self, i: usize, attempt: u32) {
        if self.task.steps[i].spec.tool == crate::tools::WAIT {
            self.begin_wait(i, attempt);
            return;
        }
        let gated = self.gate.check(self.task, i, self.now_ms);
        let granted = self.task.steps[i]
            .approval
            .as_ref()
            .filter(|a| approval_grants(a, &gated.args_hash, &gated.policy_version));
        let detail = match (gated.ruling, granted) {
            (Ruling::Deny, _) => return self.deny(i, attempt, &gated.reason),
            (Ruling::RequireApproval, None) => return self.request_approval(i, attempt, &gated),
            (Ruling::RequireApproval, Some(a)) => format!(
                "approved by {} ({}); policies {}",
                a.decided_by.as_deref().unwrap_or("operator"),
                a.id,
                gated.policy_version
            ),
            (Ruling::Allow, _) => format!("allowed by policies {}", gated.policy_version),
        };
        let now = self.now_ms;
        let step = &mut self.task.steps[i];
        step.status = StepStatus::Running;
        step.attempts = attempt;
        step.redeliveries = 0;
        step.retry_at_ms = None;
        step.started_at_ms.get_or_insert(now);
        step.cost_micros += gated.charged_micros;
        let id = step.spec.id.clone();
        self.event("step_started", Some(&id), Some(attempt), Some(detail));
        self.out.actions.push(Action::Exec { step: id, attempt });
    }

    /// A `wait` step: no effect, so no gate and no executor. Its wake time is fixed
    /// now and committed, so a restart re-arms the same timer.
    fn begin_wait(&mut self, i: usize, attempt: u32) {
        let now = self.now_ms;
        let params = self.task.steps[i]
            .spec
            .params
            .to_value()
            .unwrap_or_default();
        let id = self.task.steps[i].spec.id.clone();
        match crate::schedule::wake_at(&params, now) {
            Ok(at_ms) => {
                let step = &mut self.task.steps[i];
                step.status = StepStatus::Waiting;
                step.attempts = attempt;
                step.started_at_ms.get_or_insert(now);
                step.retry_at_ms = Some(at_ms);
                let detail = format!("until {}", crate::schedule::show_utc(at_ms));
                self.event("step_waiting", Some(&id), Some(attempt), Some(detail));
                self.out.actions.push(Action::RetryAt {
                    step: id,
                    attempt,
                    at_ms,
                });
            }
            Err(e) => {
                let step = &mut self.task.steps[i];
                step.status = StepStatus::Failed;
                step.attempts = attempt;
                step.finished_at_ms = Some(now);
                step.error = Some(e.clone());
                self.event("step_failed", Some(&id), Some(attempt), Some(e.clone()));
                self.step_gave_up(i, format!("step `{id}` failed: {e}"));
            }
        }
    }

    /// An event a waiting step waits for: the step succeeds with it, before its timeout.
    fn signal(
        &mut self,
        event: &str,
        payload: Option<serde_json::Value>,
        by: &str,
    ) -> Result<(), Rejected> {
        let waits_for = |s: &Step| {
            s.status == StepStatus::Waiting
                && s.spec
                    .params
                    .to_value()
                    .ok()
                    .and_then(|p| p.get("event").and_then(|e| e.as_str()).map(|e| e == event))
                    == Some(true)
        };
        let Some(i) = self.task.steps.iter().position(waits_for) else {
            return Err(Rejected(format!(
                "no step of this task waits for event `{event}` now"
            )));
        };
        let now = self.now_ms;
        let step = &mut self.task.steps[i];
        step.retry_at_ms = None;
        step.status = StepStatus::Succeeded;
        step.finished_at_ms = Some(now);
        step.output = Some(JsonText::from_value(&serde_json::json!({
            "arrived": true, "event": event, "payload": payload, "at_ms": now, "by": by,
        })));
        step.verdict = Some(Verdict {
            passed: true,
            reasons: vec![format!("ok: event `{event}` arrived")],
        });
        let (id, attempt) = (step.spec.id.clone(), step.attempts);
        self.event(
            "step_succeeded",
            Some(&id),
            Some(attempt),
            Some(format!("event `{event}` from {by}")),
        );
        self.advance(None);
        Ok(())
    }

    /// A `wait` step's time came: it succeeded (an event wait, without its event).
    fn wait_over(&mut self, i: usize) {
        let now = self.now_ms;
        let step = &mut self.task.steps[i];
        let until = step.retry_at_ms.take().unwrap_or(now);
        let event = step
            .spec
            .params
            .to_value()
            .ok()
            .and_then(|p| p.get("event").and_then(|e| e.as_str()).map(str::to_string));
        step.status = StepStatus::Succeeded;
        step.finished_at_ms = Some(now);
        let output = match &event {
            Some(e) => {
                serde_json::json!({"arrived": false, "event": e, "timed_out": true, "waited_until_ms": until, "woke_at_ms": now})
            }
            None => serde_json::json!({"waited_until_ms": until, "woke_at_ms": now}),
        };
        step.output = Some(JsonText::from_value(&output));
        let line = match &event {
            Some(e) => format!(
                "ok: event `{e}` did not come by {}: timed out",
                crate::schedule::show_utc(until)
            ),
            None => format!("ok: waited until {}", crate::schedule::show_utc(until)),
        };
        step.verdict = Some(Verdict {
            passed: true,
            reasons: vec![line],
        });
        let (id, attempt) = (step.spec.id.clone(), step.attempts);
        self.out.commit = true;
        self.event("step_succeeded", Some(&id), Some(attempt), None);
        self.advance(None);
    }

    /// The policies forbid the step: it fails without running, and so does the task.
    fn deny(&mut self, i: usize, attempt: u32, reason: &str) {
        let step = &mut self.task.steps[i];
        step.status = StepStatus::Failed;
        step.finished_at_ms = Some(self.now_ms);
        step.error = Some(format!("denied: {reason}"));
        let id = step.spec.id.clone();
        self.event(
            "step_denied",
            Some(&id),
            Some(attempt),
            Some(reason.to_string()),
        );
        self.step_gave_up(i, format!("step `{id}` denied: {reason}"));
    }

    /// The policies want a person to look first: the step waits, bound to exactly the
    /// action that was checked. An earlier approval that no longer matches is void.
    fn request_approval(&mut self, i: usize, attempt: u32, gated: &Gated) {
        self.task.approvals_requested += 1;
        let approval_id = format!("{}-a{}", self.task.id, self.task.approvals_requested);
        let step_id = self.task.steps[i].spec.id.clone();
        if let Some(old) = self.task.steps[i].approval.as_mut()
            && granted(old)
        {
            let why = if old.policy_version != gated.policy_version {
                format!(
                    "policies changed from {} to {}",
                    old.policy_version, gated.policy_version
                )
            } else {
                "the params changed".to_string()
            };
            old.state = ApprovalState::Void;
            let detail = format!("{} is void: {why}", old.id);
            self.event("approval_void", Some(&step_id), Some(attempt), Some(detail));
        }
        let step = &mut self.task.steps[i];
        step.status = StepStatus::AwaitingApproval;
        step.approval = Some(Approval {
            id: approval_id.clone(),
            kind: ApprovalKind::Dispatch,
            attempt,
            args_hash: gated.args_hash.clone(),
            policy_version: gated.policy_version.clone(),
            reason: gated.reason.clone(),
            cost_micros: gated.cost_micros,
            requested_at_ms: self.now_ms,
            expires_at_ms: self.now_ms.saturating_add(self.limits.approval_ttl_ms),
            state: ApprovalState::Pending,
            decided_by: None,
            note: None,
            decided_at_ms: None,
        });
        let at_ms = self.now_ms.saturating_add(self.limits.approval_ttl_ms);
        self.event(
            "approval_requested",
            Some(&step_id),
            Some(attempt),
            Some(format!("{approval_id}: {}", gated.reason)),
        );
        if self.is_dispatching() {
            self.set_status(
                TaskStatus::AwaitingApproval,
                Some(format!("step `{step_id}` needs approval {approval_id}")),
            );
        }
        self.out.actions.push(Action::ApprovalAt {
            step: step_id,
            approval_id,
            at_ms,
        });
    }

    /// An `unsafe` step's outcome is unknown: the same approval flow asks a person
    /// whether to retry it, mark it done or abort (no expiry: nothing safe to default to).
    fn ask_about_outcome(&mut self, i: usize, attempt: u32, message: &str) {
        self.task.approvals_requested += 1;
        let approval_id = format!("{}-a{}", self.task.id, self.task.approvals_requested);
        let step = &mut self.task.steps[i];
        let step_id = step.spec.id.clone();
        step.approval = Some(Approval {
            id: approval_id.clone(),
            kind: ApprovalKind::OutcomeUnknown,
            attempt,
            args_hash: String::new(),
            policy_version: String::new(),
            reason: format!("outcome unknown: {message}"),
            cost_micros: 0,
            requested_at_ms: self.now_ms,
            expires_at_ms: 0,
            state: ApprovalState::Pending,
            decided_by: None,
            note: None,
            decided_at_ms: None,
        });
        self.event(
            "approval_requested",
            Some(&step_id),
            Some(attempt),
            Some(format!("{approval_id}: retry, mark_done or abort")),
        );
    }

    fn decide(
        &mut self,
        approval_id: &str,
        decision: ApprovalDecision,
        by: &str,
        note: Option<String>,
    ) -> Result<(), Rejected> {
        let Some(i) = self.task.step_of_approval(approval_id) else {
            return Err(Rejected(format!("task has no approval `{approval_id}`")));
        };
        let step = &mut self.task.steps[i];
        let Some(approval) = step.approval.as_mut() else {
            return Err(Rejected(format!("task has no approval `{approval_id}`")));
        };
        if approval.state != ApprovalState::Pending {
            return Err(Rejected(format!(
                "approval `{approval_id}` is already {}",
                approval.state.as_str()
            )));
        }
        if approval.kind == ApprovalKind::OutcomeUnknown {
            let Some(resolution) = decision.as_resolution() else {
                return Err(Rejected(format!(
                    "approval `{approval_id}` is about an unknown outcome: decide retry, mark_done or abort"
                )));
            };
            let step_id = step.spec.id.clone();
            return self.resolve(&step_id, resolution, by, note.as_deref());
        }
        if decision.as_resolution().is_some() {
            return Err(Rejected(format!(
                "approval `{approval_id}` asks whether the step may run: decide approve or deny"
            )));
        }
        let by = if by.is_empty() { "operator" } else { by };
        let note = note.filter(|n| !n.is_empty());
        approval.decided_by = Some(by.to_string());
        approval.decided_at_ms = Some(self.now_ms);
        approval.note = note.clone();
        let attempt = approval.attempt;
        let step_id = step.spec.id.clone();
        let note = note.map(|n| format!(": {n}")).unwrap_or_default();
        match decision {
            ApprovalDecision::Deny
            | ApprovalDecision::Retry
            | ApprovalDecision::MarkDone
            | ApprovalDecision::Abort => {
                approval.state = ApprovalState::Denied;
                step.status = StepStatus::Failed;
                step.finished_at_ms = Some(self.now_ms);
                step.error = Some(format!("approval {approval_id} denied by {by}"));
                self.event(
                    "approval_denied",
                    Some(&step_id),
                    Some(attempt),
                    Some(format!("{approval_id} denied by {by}{note}")),
                );
                self.step_gave_up(i, format!("step `{step_id}` denied by {by}"));
            }
            ApprovalDecision::Approve => {
                approval.state = ApprovalState::Approved;
                step.status = StepStatus::Pending;
                self.event(
                    "approval_granted",
                    Some(&step_id),
                    Some(attempt),
                    Some(format!("{approval_id} approved by {by}{note}")),
                );
                self.proceed(i, attempt);
            }
        }
        Ok(())
    }

    /// An approval request's time is up: the configured default decides.
    fn approval_due(&mut self, step_id: &str, approval_id: &str) {
        let Some(i) = self.task.step_index(step_id) else {
            return;
        };
        let now = self.now_ms;
        let default = self.limits.approval_default;
        let step = &mut self.task.steps[i];
        let Some(approval) = step.approval.as_mut() else {
            return;
        };
        if approval.id != approval_id || approval.state != ApprovalState::Pending {
            return;
        }
        if now < approval.expires_at_ms {
            // Early (a timer armed before a clock step): wait the rest.
            self.out.actions.push(Action::ApprovalAt {
                step: step_id.to_string(),
                approval_id: approval_id.to_string(),
                at_ms: approval.expires_at_ms,
            });
            return;
        }
        approval.state = ApprovalState::Expired;
        approval.decided_at_ms = Some(now);
        approval.decided_by = Some("expiry".into());
        let attempt = approval.attempt;
        match default {
            // (The configuration only allows approve or deny.)
            ApprovalDecision::Deny
            | ApprovalDecision::Retry
            | ApprovalDecision::MarkDone
            | ApprovalDecision::Abort => {
                step.status = StepStatus::Failed;
                step.finished_at_ms = Some(now);
                step.error = Some(format!("approval {approval_id} expired (default: deny)"));
                self.event(
                    "approval_expired",
                    Some(step_id),
                    Some(attempt),
                    Some(format!("{approval_id} expired; default: deny")),
                );
                self.step_gave_up(
                    i,
                    format!("step `{step_id}`: approval {approval_id} expired undecided"),
                );
            }
            ApprovalDecision::Approve => {
                step.status = StepStatus::Pending;
                self.event(
                    "approval_expired",
                    Some(step_id),
                    Some(attempt),
                    Some(format!("{approval_id} expired; default: approve")),
                );
                self.proceed(i, attempt);
            }
        }
    }

    /// After an approval: the task runs again unless something else still waits, the
    /// step is dispatched (the Governor checks the action is still the approved one),
    /// and so is whatever became ready meanwhile.
    fn proceed(&mut self, i: usize, attempt: u32) {
        self.refresh_attention();
        self.begin_attempt(i, attempt);
        if self.task.status == TaskStatus::Running {
            self.dispatch_ready();
        }
    }

    /// A step gave up for good: the task fails, or, for an undo step, the compensation
    /// notes it and goes on.
    fn step_gave_up(&mut self, i: usize, reason: String) {
        if self.task.steps[i].spec.compensates.is_some() {
            self.compensation_failed(reason);
        } else {
            self.fail(reason);
        }
    }

    /// The step index if `attempt` is the step's current attempt in `status`.
    fn current(&self, step_id: &str, attempt: u32, status: StepStatus) -> Option<usize> {
        let i = self.task.step_index(step_id)?;
        let step = &self.task.steps[i];
        (step.attempts == attempt && step.status == status).then_some(i)
    }

    /// Step `i` ran: its output is kept, and it waits for its verdict.
    fn done(&mut self, i: usize, output: JsonText) {
        let step = &mut self.task.steps[i];
        // What the call itself reported costing (LLM tokens), charged as the task
        // records the outcome: once, replayed or not.
        if crate::tools::reports_cost(&step.spec.tool)
            && let Ok(value) = output.to_value()
        {
            let cost = crate::tools::output_cost_micros(&step.spec.tool, &value);
            step.cost_micros += cost;
            self.out.reported_cost_micros += cost;
        }
        step.output = Some(output);
        step.error = None;
        step.redeliveries = 0;
        step.status = StepStatus::Verifying;
    }

    fn executed(&mut self, step_id: &str, attempt: u32, reply: ExecReply) {
        let Some(i) = self.current(step_id, attempt, StepStatus::Running) else {
            return;
        };
        match reply {
            ExecReply::Done { output, .. } => {
                self.done(i, output);
                // Not committed: the verdict commits output and verdict together.
                self.out.actions.push(Action::Verify {
                    step: step_id.to_string(),
                    attempt,
                });
            }
            // The executor forwarded the outcome to the verifier, which answered.
            ExecReply::Verified {
                output, verdict, ..
            } => {
                self.done(i, output);
                match verdict.unavailable {
                    Some(error) => self.verifier_unanswered(step_id, attempt, error),
                    None => self.verified(
                        step_id,
                        attempt,
                        verdict.verdict,
                        verdict.task,
                        verdict.cost_micros,
                    ),
                }
            }
            ExecReply::Failed {
                kind: FailureKind::OutcomeUnknown,
                message,
                output,
            } => {
                let step = &mut self.task.steps[i];
                step.status = StepStatus::OutcomeUnknown;
                step.output = output;
                step.error = Some(message.clone());
                self.task.attention = Some((step_id.to_string(), message.clone()));
                self.event(
                    "step_outcome_unknown",
                    Some(step_id),
                    Some(attempt),
                    Some(message.clone()),
                );
                self.ask_about_outcome(i, attempt, &message);
                if self.is_dispatching() {
                    self.set_status(
                        TaskStatus::AwaitingOperator,
                        Some(format!("step `{step_id}`: {message}")),
                    );
                }
            }
            ExecReply::Failed {
                kind,
                message,
                output,
            } => {
                let step = &mut self.task.steps[i];
                step.output = output;
                // `Fenced` never reaches here (the actor stands down); if it did, the
                // attempt did not run, so another is safe.
                let retryable = matches!(kind, FailureKind::Retryable | FailureKind::Fenced);
                self.attempt_failed(i, retryable, message);
            }
        }
    }

    fn unanswered(&mut self, step_id: &str, attempt: u32, error: String) {
        let Some(i) = self.current(step_id, attempt, StepStatus::Running) else {
            return;
        };
        let limits = self.limits.clone();
        let step = &mut self.task.steps[i];
        if step.redeliveries >= limits.redeliveries_max {
            let message = format!(
                "no executor answered for `{}` after {} tries: {error}",
                step.spec.tool,
                step.redeliveries + 1
            );
            self.attempt_failed(i, false, message);
            return;
        }
        // Re-send the same attempt: the executor's ledger makes that safe for every class.
        step.redeliveries += 1;
        let redeliveries = step.redeliveries;
        let delay = self.backoff(redeliveries);
        let step = &mut self.task.steps[i];
        step.status = StepStatus::RetryWait;
        step.next_attempt = attempt;
        step.retry_at_ms = Some(self.now_ms + delay);
        step.error = Some(error.clone());
        let at_ms = self.now_ms + delay;
        self.event("step_redelivery", Some(step_id), Some(attempt), Some(error));
        self.out.actions.push(Action::RetryAt {
            step: step_id.to_string(),
            attempt,
            at_ms,
        });
    }

    /// No verdict came back. The effect already happened, so this must not cost an
    /// attempt (a new attempt would run the effect again): ask again with backoff, and
    /// fail the step, without re-running it, if the verifier stays away.
    fn verifier_unanswered(&mut self, step_id: &str, attempt: u32, error: String) {
        let Some(i) = self.current(step_id, attempt, StepStatus::Verifying) else {
            return;
        };
        let step = &mut self.task.steps[i];
        step.redeliveries += 1;
        let tries = step.redeliveries;
        if tries > self.limits.redeliveries_max {
            self.attempt_failed(i, false, format!("no verdict after {tries} tries: {error}"));
            return;
        }
        let at_ms = self.now_ms + self.backoff(tries);
        self.out.actions.push(Action::VerifyAt {
            step: step_id.to_string(),
            attempt,
            at_ms,
        });
    }

    fn verified(
        &mut self,
        step_id: &str,
        attempt: u32,
        verdict: Verdict,
        task_verdict: Option<Verdict>,
        cost_micros: u64,
    ) {
        let Some(i) = self.current(step_id, attempt, StepStatus::Verifying) else {
            return;
        };
        self.task.steps[i].cost_micros += cost_micros;
        self.out.reported_cost_micros += cost_micros;
        if verdict.passed {
            let step = &mut self.task.steps[i];
            step.status = StepStatus::Succeeded;
            step.finished_at_ms = Some(self.now_ms);
            step.verdict = Some(verdict);
            self.event("step_succeeded", Some(step_id), Some(attempt), None);
            self.advance(task_verdict);
        } else {
            let message = format!("verification failed: {}", verdict.reasons.join("; "));
            self.task.steps[i].verdict = Some(verdict);
            self.attempt_failed(i, true, message);
        }
    }

    /// A failed attempt: retry with backoff while attempts remain and it is worth it,
    /// else the step fails and so does the task.
    fn attempt_failed(&mut self, i: usize, retryable: bool, message: String) {
        let step = &self.task.steps[i];
        let id = step.spec.id.clone();
        let attempt = step.attempts;
        if retryable && attempt < step.spec.max_attempts {
            let delay = self.backoff(attempt);
            let at_ms = self.now_ms + delay;
            let step = &mut self.task.steps[i];
            step.status = StepStatus::RetryWait;
            step.next_attempt = attempt + 1;
            step.retry_at_ms = Some(at_ms);
            step.error = Some(message.clone());
            self.event(
                "step_retry",
                Some(&id),
                Some(attempt),
                Some(format!("{message}; retry in {delay} ms")),
            );
            self.out.actions.push(Action::RetryAt {
                step: id,
                attempt: attempt + 1,
                at_ms,
            });
            return;
        }
        let step = &mut self.task.steps[i];
        step.status = StepStatus::Failed;
        step.finished_at_ms = Some(self.now_ms);
        step.error = Some(message.clone());
        self.event(
            "step_failed",
            Some(&id),
            Some(attempt),
            Some(message.clone()),
        );
        let tries = if attempt == 1 {
            "1 attempt".to_string()
        } else {
            format!("{attempt} attempts")
        };
        self.step_gave_up(i, format!("step `{id}` failed after {tries}: {message}"));
    }

    fn retry_due(&mut self, step_id: &str, attempt: u32) {
        let Some(i) = self.task.step_index(step_id) else {
            return;
        };
        let step = &self.task.steps[i];
        if step.status == StepStatus::Waiting && step.attempts == attempt {
            self.wait_over(i);
            return;
        }
        if step.status != StepStatus::RetryWait || step.next_attempt != attempt {
            return;
        }
        if step.attempts == attempt {
            // A redelivery of the same attempt.
            let step = &mut self.task.steps[i];
            step.status = StepStatus::Running;
            step.retry_at_ms = None;
            self.out.commit = true;
            self.out.actions.push(Action::Exec {
                step: step_id.to_string(),
                attempt,
            });
        } else {
            self.begin_attempt(i, attempt);
        }
    }

    /// After a step succeeds: more steps, or on to task-level verification.
    /// With the task's verdict already in hand (it came with the last step's), the task
    /// goes through `verifying` within the same commit.
    fn advance(&mut self, task_verdict: Option<Verdict>) {
        if self.task.ends_as.is_some() {
            self.continue_compensation();
            return;
        }
        if self
            .task
            .steps
            .iter()
            .all(|s| s.status == StepStatus::Succeeded)
        {
            self.task.hop_retries = 0;
            self.set_status(TaskStatus::Verifying, None);
            match task_verdict {
                Some(verdict) => self.task_verified(verdict),
                None => self.out.actions.push(Action::VerifyTask),
            }
        } else if self.task.status == TaskStatus::Running {
            self.dispatch_ready();
        }
    }

    // --- task level ----------------------------------------------------------------

    fn task_verified(&mut self, verdict: Verdict) {
        if self.task.status != TaskStatus::Verifying {
            return;
        }
        let passed = verdict.passed;
        let reasons = verdict.reasons.join("; ");
        self.task.task_verdict = Some(verdict);
        if passed {
            self.task.hop_retries = 0;
            self.set_status(TaskStatus::Archiving, None);
            self.out.actions.push(Action::Archive);
            // Not committed on its own, as `planning` is not: archiving is effect-free
            // and redone after a crash, and a last step that ran again goes through the
            // effect ledger like any re-sent step. So the last step's success, the
            // verdicts and `archiving` commit with `succeeded`: one commit fewer per
            // task. A failed archive hop commits them (`hop_failed`). Not in a cluster:
            // that commit would come after a partition failed the hop, unreplicated, and
            // the next owner would run the last step and its verdicts again.
            if self.own_reply && !self.limits.checkpoints_replicated {
                self.out.commit = false;
            }
        } else {
            self.fail(format!("task verification failed: {reasons}"));
        }
    }

    fn archived(&mut self, reply: ArchiveReply) {
        if self.task.status != TaskStatus::Archiving {
            return;
        }
        match reply {
            ArchiveReply::Archived => self.set_status(TaskStatus::Succeeded, None),
            ArchiveReply::Failed { message } => self.hop_failed(TaskStatus::Archiving, message),
        }
    }

    /// A plan/verify/archive hop failed: these are side-effect free, so retry with
    /// backoff (not committed), then fail the task.
    fn hop_failed(&mut self, during: TaskStatus, error: String) {
        if self.task.status != during {
            return;
        }
        self.task.hop_retries += 1;
        if self.task.hop_retries > self.limits.hop_retries_max {
            self.fail(format!(
                "{} hop failed {} times: {error}",
                during, self.task.hop_retries
            ));
            return;
        }
        let at_ms = self.now_ms + self.backoff(self.task.hop_retries);
        self.out.actions.push(Action::HopAt { at_ms });
        // A task that waits for the archivist shows where it is: what was held for
        // the archive's answer (see `task_verified`) is committed now.
        if during == TaskStatus::Archiving {
            self.out.commit = true;
        }
    }

    fn hop_due(&mut self) {
        match self.task.status {
            // A delayed task's time came (or a restart found it come): plan it.
            TaskStatus::Scheduled => self.start(),
            TaskStatus::Planning => self.out.actions.push(Action::RequestPlan),
            TaskStatus::Verifying => self.out.actions.push(Action::VerifyTask),
            TaskStatus::Archiving => self.out.actions.push(Action::Archive),
            _ => {}
        }
    }

    // --- helpers -------------------------------------------------------------------

    /// The task fails: what has not run is skipped and the done steps are undone.
    fn fail(&mut self, reason: String) {
        self.skip_unfinished();
        self.task.attention = None;
        self.task.failure = Some(reason.clone());
        if !self.begin_compensation(TaskStatus::Failed, &reason) {
            self.set_status(TaskStatus::Failed, Some(reason));
        }
    }

    fn skip_unfinished(&mut self) {
        for step in &mut self.task.steps {
            if !step.status.is_done() {
                step.status = StepStatus::Skipped;
                step.retry_at_ms = None;
                // A pending approval dies with its task.
                if let Some(a) = step.approval.as_mut()
                    && a.state == ApprovalState::Pending
                {
                    a.state = ApprovalState::Void;
                }
            }
        }
    }

    /// After a decision: the task keeps waiting while another step's outcome is unknown
    /// (and says which) or another step awaits approval, else it runs again.
    fn refresh_attention(&mut self) {
        self.task.attention = self
            .task
            .steps
            .iter()
            .find(|s| s.status == StepStatus::OutcomeUnknown)
            .map(|s| {
                (
                    s.spec.id.clone(),
                    s.error.clone().unwrap_or_else(|| "outcome unknown".into()),
                )
            });
        if !matches!(
            self.task.status,
            TaskStatus::AwaitingOperator | TaskStatus::AwaitingApproval
        ) {
            return;
        }
        let next = if self.task.attention.is_some() {
            TaskStatus::AwaitingOperator
        } else if self
            .task
            .steps
            .iter()
            .any(|s| s.status == StepStatus::AwaitingApproval)
        {
            TaskStatus::AwaitingApproval
        } else if self.task.ends_as.is_some() {
            TaskStatus::Compensating
        } else {
            TaskStatus::Running
        };
        if next != self.task.status {
            self.set_status(next, None);
        }
    }

    fn set_status(&mut self, status: TaskStatus, detail: Option<String>) {
        self.task.status = status;
        self.event(status.as_str(), None, None, detail);
    }

    fn event(
        &mut self,
        kind: &str,
        step: Option<&str>,
        attempt: Option<u32>,
        detail: Option<String>,
    ) {
        self.task.event_seq += 1;
        self.out.commit = true;
        self.out.events.push(TaskEvent {
            task_id: self.task.id.clone(),
            seq: self.task.event_seq,
            kind: kind.to_string(),
            status: self.task.status,
            step_id: step.map(str::to_string),
            attempt,
            detail,
            at_ms: self.now_ms,
            node_id: self.task.node_id.clone(),
        });
    }

    /// Exponential backoff with jitter: `base·2^(n-1)`, capped, scaled into [½, 1).
    fn backoff(&self, n: u32) -> u64 {
        let exp = self
            .limits
            .retry_delay_ms_base
            .saturating_mul(1u64 << (n.saturating_sub(1)).min(20));
        let capped = exp.min(self.limits.retry_delay_ms_max) as f64;
        (capped * (0.5 + self.jitter.clamp(0.0, 1.0) / 2.0)) as u64
    }
}

/// An approval that lets its step run: approved, or expired with approve as default.
fn granted(a: &Approval) -> bool {
    matches!(a.state, ApprovalState::Approved | ApprovalState::Expired)
}

/// Whether `a` lets its step run now, as the action is (`args_hash`) under the policies
/// in force (`policy_version`). The gate asks it too: a step that runs on an approval may
/// cross a budget cap.
pub fn approval_grants(a: &Approval, args_hash: &str, policy_version: &str) -> bool {
    granted(a) && a.args_hash == args_hash && a.policy_version == policy_version
}

#[cfg(test)]
mod tests;
