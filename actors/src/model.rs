//! Domain records: tasks and steps as the TaskActor checkpoints them.
//!
//! These are stored with postcard (see `storage::codec`), which cannot hold a free-form
//! `serde_json::Value`; dynamic JSON (inputs, params, outputs) travels as [`JsonText`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::protocol::{TaskCheck, Verdict};

/// JSON kept as its text, so records stay postcard-encodable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JsonText(pub String);

/// `value` as compact JSON: the same text as `value.to_string()`, written straight
/// into the buffer instead of through `fmt::Write` one fragment at a time (a third of
/// the instructions for a step's params).
pub fn compact_json(value: &Value) -> String {
    // A `Value` always serialises (its map keys are strings); the fallback is never taken.
    serde_json::to_string(value).unwrap_or_else(|_| value.to_string())
}

impl JsonText {
    pub fn from_value(value: &Value) -> JsonText {
        JsonText(compact_json(value))
    }

    pub fn null() -> JsonText {
        JsonText("null".into())
    }

    /// Parses the text. Cadre wrote it from a `Value`, so failure means corruption; the
    /// caller reports it rather than guessing.
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_str(&self.0)
    }

    /// For views: a corrupt text shows as a string rather than failing the whole reply.
    pub fn to_value_lossy(&self) -> Value {
        self.to_value()
            .unwrap_or_else(|_| Value::String(self.0.clone()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Accepted,
    Planning,
    Running,
    /// Waiting for an operator decision on a step (`cadre.tasks.resolve`).
    AwaitingOperator,
    Verifying,
    Archiving,
    Succeeded,
    Failed,
    Cancelled,
    /// A step waits for an operator's approval (`cadre.approvals.decide`). Appended last:
    /// postcard stores a variant's index, so earlier records keep their meaning.
    AwaitingApproval,
    /// Cancelled or failed: the `compensate` actions of the done steps run, newest first;
    /// then the task ends as `Task::ends_as`.
    Compensating,
    /// Submitted with `run_at`/`run_after`: waits for `Task::not_before_ms` to plan.
    Scheduled,
}

impl TaskStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Accepted => "accepted",
            TaskStatus::Planning => "planning",
            TaskStatus::Running => "running",
            TaskStatus::AwaitingOperator => "awaiting_operator",
            TaskStatus::Verifying => "verifying",
            TaskStatus::Archiving => "archiving",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::AwaitingApproval => "awaiting_approval",
            TaskStatus::Compensating => "compensating",
            TaskStatus::Scheduled => "scheduled",
        }
    }

    pub fn parse(s: &str) -> Option<TaskStatus> {
        serde_json::from_value(Value::String(s.to_string())).ok()
    }

    /// Order along the happy path; used to check that a task never moves backwards.
    pub fn rank(self) -> u8 {
        match self {
            TaskStatus::Accepted | TaskStatus::Scheduled => 0,
            TaskStatus::Planning => 1,
            TaskStatus::Running
            | TaskStatus::AwaitingOperator
            | TaskStatus::AwaitingApproval
            | TaskStatus::Compensating => 2,
            TaskStatus::Verifying => 3,
            TaskStatus::Archiving => 4,
            TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Cancelled => 5,
        }
    }
}

impl std::fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    Running,
    /// Executed; the verdict is being computed (never checkpointed: a restart re-runs
    /// the step through the effect ledger, which replays a recorded outcome).
    Verifying,
    /// Waiting to be dispatched again at `retry_at_ms`.
    RetryWait,
    Succeeded,
    Failed,
    /// An `unsafe` effect was in flight during a crash; waiting for an operator.
    OutcomeUnknown,
    /// Never run: the task ended first.
    Skipped,
    /// The policies require an operator's approval before it is dispatched.
    AwaitingApproval,
    /// A `wait` step: parked until `retry_at_ms`, then it succeeds.
    Waiting,
}

impl StepStatus {
    /// The wire spelling (`outcome_unknown`).
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running => "running",
            StepStatus::Verifying => "verifying",
            StepStatus::RetryWait => "retry_wait",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::OutcomeUnknown => "outcome_unknown",
            StepStatus::Skipped => "skipped",
            StepStatus::AwaitingApproval => "awaiting_approval",
            StepStatus::Waiting => "waiting",
        }
    }

    pub fn is_done(self) -> bool {
        matches!(
            self,
            StepStatus::Succeeded | StepStatus::Failed | StepStatus::Skipped
        )
    }
}

/// What an operator decides for a step whose outcome is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    /// Run the step again as a new attempt.
    Retry,
    /// The effect happened; treat the step as succeeded.
    MarkDone,
    /// Fail the task.
    Abort,
}

/// Success criteria for a step (and, in a `TaskCheck`, for a task). All given criteria
/// must hold. Unknown keys are refused when a playbook loads. (No
/// `skip_serializing_if` here: postcard is not self-describing; views strip nulls.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Criteria {
    #[serde(default)]
    pub exit_code: Option<i64>,
    #[serde(default)]
    pub status_in: Option<Vec<u16>>,
    #[serde(default)]
    pub file_exists: Option<bool>,
    #[serde(default)]
    pub file_contains: Option<String>,
    #[serde(default)]
    pub json_path_equals: Option<JsonPathEquals>,
    #[serde(default)]
    pub output_contains: Option<String>,
    /// A rubric an LLM judges the output against, for what rules cannot check (brand
    /// voice). Its score, verdict and reasoning are kept in the step's verdict.
    #[serde(default)]
    pub llm_judge: Option<Judge>,
}

/// An LLM judge's criterion: the output passes if the judge scores it at least
/// `threshold` (0 to 1) against `rubric`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Judge {
    pub rubric: String,
    #[serde(default = "Judge::default_threshold")]
    pub threshold: f64,
    /// Empty: the node's judge model.
    #[serde(default)]
    pub model: String,
}

impl Judge {
    pub const DEFAULT_THRESHOLD: f64 = 0.7;
    fn default_threshold() -> f64 {
        Judge::DEFAULT_THRESHOLD
    }
}

/// How an LLM plan was made: the model, the drafts it took, what they cost. Kept with
/// the task whether the plan was accepted or not (a refused plan cost tokens too).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Planning {
    pub model: String,
    /// Drafts asked for: 1, plus one per repair.
    pub drafts: u32,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Millionths of a US dollar.
    pub cost_micros: u64,
    /// Why each refused draft was refused, oldest first.
    pub refused: Vec<String>,
    /// Characters of the first draft's prompt (capped by `llm_prompt_chars_max`).
    pub prompt_chars: u64,
}

impl Criteria {
    pub fn is_empty(&self) -> bool {
        *self == Criteria::default()
    }

    /// As JSON with unset criteria left out, for views.
    pub fn to_view(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let serde_json::Value::Object(map) = &mut v {
            map.retain(|_, x| !x.is_null());
            if let Some(serde_json::Value::Object(j)) = map.get_mut("json_path_equals")
                && let Some(serde_json::Value::String(text)) = j.get("value").cloned()
            {
                j.insert(
                    "value".into(),
                    serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
                );
            }
        }
        v
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonPathEquals {
    /// `$.a.b[0].c` over the step's output.
    pub path: String,
    /// Expected value, as JSON text (stored records cannot hold a `Value`).
    pub value: JsonText,
}

/// An operator's approval of one step, bound to the exact action: the hash of the
/// params that will be sent and the version of the policies that asked for it. If
/// either differs when the step is dispatched, the approval is void.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// `<task_id>-a<n>`: names the task, so a decision finds its node and actor.
    pub id: String,
    pub kind: ApprovalKind,
    /// The attempt it was requested for.
    pub attempt: u32,
    pub args_hash: String,
    pub policy_version: String,
    /// Why the policies (or a budget) asked for it.
    pub reason: String,
    /// The step's estimated cost, in millionths of a US dollar.
    pub cost_micros: u64,
    pub requested_at_ms: u64,
    pub expires_at_ms: u64,
    pub state: ApprovalState,
    pub decided_by: Option<String>,
    pub note: Option<String>,
    pub decided_at_ms: Option<u64>,
}

/// What an approval asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalKind {
    /// May this step run? (`approve` or `deny`; it expires.)
    Dispatch,
    /// An `unsafe` effect's outcome is unknown: `retry`, `mark_done` or `abort`? (It
    /// waits for a person: no expiry.)
    OutcomeUnknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    Pending,
    Approved,
    Denied,
    /// Nobody decided in time; the configured default was applied.
    Expired,
    /// The action changed (params, plan or policies) or the task ended first.
    Void,
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Approved => "approved",
            ApprovalState::Denied => "denied",
            ApprovalState::Expired => "expired",
            ApprovalState::Void => "void",
        }
    }
}

/// What an operator decides on an approval request: `approve`/`deny` a dispatch, or
/// `retry`/`mark_done`/`abort` a step whose outcome is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalDecision {
    Approve,
    Deny,
    Retry,
    MarkDone,
    Abort,
}

impl ApprovalDecision {
    /// The same decision as `cadre.tasks.resolve` spells it, for an unknown outcome.
    pub fn as_resolution(self) -> Option<DecisionKind> {
        match self {
            ApprovalDecision::Retry => Some(DecisionKind::Retry),
            ApprovalDecision::MarkDone => Some(DecisionKind::MarkDone),
            ApprovalDecision::Abort => Some(DecisionKind::Abort),
            ApprovalDecision::Approve | ApprovalDecision::Deny => None,
        }
    }
}

/// One step of a plan, with its templates over `input.*` already rendered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSpec {
    pub id: String,
    pub tool: String,
    /// Params with `input.*`/`task.*` filled in: what is sent, unless the step reads an
    /// earlier step's output (then this is for display and `params_template` is sent).
    pub params: JsonText,
    /// The playbook's own params, for steps that read `steps.<id>.output…`: rendered once,
    /// at dispatch, with input, task and step outputs together. One pass, so text that
    /// came from the input is never read as a template.
    pub params_template: Option<JsonText>,
    pub verify: Criteria,
    pub depends_on: Vec<String>,
    pub max_attempts: u32,
    pub timeout_ms: u64,
    /// What undoes this step once it succeeded (`<id>.undo`), run if the task is
    /// cancelled or fails later.
    pub compensate: Option<Box<StepSpec>>,
    /// On an undo step: the step it undoes.
    pub compensates: Option<String>,
    /// Where it must run; `None`: any node with the tool.
    pub placement: Option<Placement>,
}

/// Where a step runs: next to what it touches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Placement {
    /// On this node.
    Node(String),
    /// On any node with this tag (`location=laptop`).
    Tag(String, String),
}

impl StepSpec {
    /// The id of the step that undoes step `id`. The dot keeps it apart from every
    /// playbook step id (those are subject tokens).
    pub fn undo_id(id: &str) -> String {
        format!("{id}.undo")
    }
}

/// A step's checkpointed state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub spec: StepSpec,
    pub status: StepStatus,
    /// Attempts started so far (the current attempt's number once running).
    pub attempts: u32,
    /// Times the current attempt was re-sent because no executor answered.
    pub redeliveries: u32,
    pub output: Option<JsonText>,
    pub error: Option<String>,
    pub verdict: Option<Verdict>,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub retry_at_ms: Option<u64>,
    /// The attempt a `RetryWait` will dispatch.
    pub next_attempt: u32,
    /// The step's latest approval request, if the policies asked for one.
    pub approval: Option<Approval>,
    /// Cost charged for its dispatched attempts, in millionths of a US dollar.
    pub cost_micros: u64,
}

impl Step {
    pub fn new(spec: StepSpec) -> Step {
        Step {
            spec,
            status: StepStatus::Pending,
            attempts: 0,
            redeliveries: 0,
            output: None,
            error: None,
            verdict: None,
            started_at_ms: None,
            finished_at_ms: None,
            retry_at_ms: None,
            next_attempt: 0,
            approval: None,
            cost_micros: 0,
        }
    }
}

/// A task's checkpoint: everything needed to resume it after a crash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub playbook: String,
    pub playbook_version: String,
    pub input: JsonText,
    pub idempotency_key: Option<String>,
    pub node_id: String,
    pub status: TaskStatus,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub steps: Vec<Step>,
    pub checks: Vec<TaskCheck>,
    pub task_verdict: Option<Verdict>,
    pub failure: Option<String>,
    /// `(step_id, reason)` while the task waits for an operator.
    pub attention: Option<(String, String)>,
    /// Sequence of the last event emitted; events are numbered 1, 2, 3 … per task.
    pub event_seq: u64,
    /// Retries of the current plan/verify/archive hop.
    pub hop_retries: u32,
    /// Who the playbook runs as, for the policies (`Persona::"..."`).
    pub persona: String,
    /// While compensating, and after: how the task ends (`cancelled` or `failed`).
    pub ends_as: Option<TaskStatus>,
    /// Approvals requested so far: numbers the next approval id.
    pub approvals_requested: u32,
    /// A goal in plain words, planned by the LLM planner (playbook [`GOAL_PLAYBOOK`]).
    pub goal: Option<String>,
    /// How the LLM planner made the plan, when it did.
    pub planning: Option<Planning>,
    /// Not planned before this time (`run_at`/`run_after` on submit, or a low-priority
    /// task's batch window).
    pub not_before_ms: Option<u64>,
    pub priority: Priority,
}

/// How urgent a task is. `low` work waits for the next batch window and runs under its
/// own concurrency cap, so background work never holds up the operator's tasks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

/// The playbook name of tasks submitted as a free-text `goal`: budgets, metrics and
/// lists count them under it. No playbook file may take the name.
pub const GOAL_PLAYBOOK: &str = "goal";

impl Task {
    pub fn new(
        id: String,
        playbook: String,
        input: JsonText,
        idempotency_key: Option<String>,
        node_id: String,
        now_ms: u64,
    ) -> Task {
        Task {
            id,
            playbook,
            playbook_version: String::new(),
            input,
            idempotency_key,
            node_id,
            status: TaskStatus::Accepted,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            steps: Vec::new(),
            checks: Vec::new(),
            task_verdict: None,
            failure: None,
            attention: None,
            event_seq: 0,
            hop_retries: 0,
            persona: String::new(),
            ends_as: None,
            approvals_requested: 0,
            goal: None,
            planning: None,
            not_before_ms: None,
            priority: Priority::Normal,
        }
    }

    pub fn step(&self, id: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.spec.id == id)
    }

    pub fn step_index(&self, id: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.spec.id == id)
    }

    /// The idempotency key of a step: stable across attempts and restarts, so a target
    /// that dedupes sees one logical request.
    pub fn step_key(&self, step_id: &str) -> String {
        format!("{}.{}", self.id, step_id)
    }

    /// Cost charged so far: its planning and all its steps.
    pub fn cost_micros(&self) -> u64 {
        self.planning.as_ref().map_or(0, |p| p.cost_micros)
            + self.steps.iter().map(|s| s.cost_micros).sum::<u64>()
    }

    /// The step whose pending or latest approval is `approval_id`.
    pub fn step_of_approval(&self, approval_id: &str) -> Option<usize> {
        self.steps
            .iter()
            .position(|s| s.approval.as_ref().is_some_and(|a| a.id == approval_id))
    }
}

/// The task an approval id names (`<task_id>-a<n>`).
pub fn task_of_approval(approval_id: &str) -> Option<&str> {
    let (task, n) = approval_id.rsplit_once("-a")?;
    (!task.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then_some(task)
}

/// An episode: a verified task as memory keeps it — input, plan, outcomes, verdicts and
/// timestamps — under the retention caps (`episodes_max`, …). Layout 2 (see
/// `migrate.rs` for layout 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Episode {
    pub task_id: String,
    pub playbook: String,
    pub playbook_version: String,
    pub input: JsonText,
    /// In plan order.
    pub steps: Vec<EpisodeStep>,
    pub task_verdict: Option<Verdict>,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    pub archived_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeStep {
    pub id: String,
    pub tool: String,
    /// The params as sent.
    pub params: JsonText,
    pub output: JsonText,
    pub verdict: Option<Verdict>,
    pub attempts: u32,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
}

impl Episode {
    /// As `cadre.memory.episode` answers it (JSON values parsed back).
    pub fn view(&self) -> Value {
        serde_json::json!({
            "task_id": self.task_id,
            "playbook": self.playbook,
            "playbook_version": self.playbook_version,
            "input": self.input.to_value_lossy(),
            "steps": self.steps.iter().map(|s| serde_json::json!({
                "id": s.id,
                "tool": s.tool,
                "params": s.params.to_value_lossy(),
                "output": s.output.to_value_lossy(),
                "verdict": s.verdict,
                "attempts": s.attempts,
                "started_at_ms": s.started_at_ms,
                "finished_at_ms": s.finished_at_ms,
            })).collect::<Vec<_>>(),
            "task_verdict": self.task_verdict,
            "started_at_ms": self.started_at_ms,
            "finished_at_ms": self.finished_at_ms,
            "archived_at_ms": self.archived_at_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stored params and outputs, hashed into `args_hash` and the ledger, must not change
    /// text with the way they are written.
    #[test]
    fn compact_json_writes_what_display_writes() {
        let values = [
            serde_json::json!(null),
            serde_json::json!({"path": "/srv/acme/README.md", "content": "# Acme\n\t\"quoted\" \\ é 😀 \u{1}"}),
            serde_json::json!({"n": [1, -2, 3.5, 1e300, 0.1], "nested": {"b": true, "a": [[], {}]}, "": ""}),
            serde_json::json!("plain"),
            serde_json::json!(18446744073709551615u64),
        ];
        for v in &values {
            assert_eq!(compact_json(v), v.to_string());
            assert_eq!(JsonText::from_value(v).0, v.to_string());
        }
    }
}
