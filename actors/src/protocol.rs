//! The wire protocol: every NATS subject Cadre uses and every payload on it.
//!
//! Architecture invariant: this is the only module that names subjects or defines wire
//! messages. Public subjects (`cadre.tasks.*`, `cadre.events.*`) carry plain JSON so the
//! `nats` CLI and any client can drive Cadre. Internal role hops (`cadre.plan`,
//! `cadre.exec.*`, `cadre.verify`, `cadre.archive`) carry postcard: they are spoken
//! only by Cadre nodes and sit on the hot path of every step.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod knowledge;

use crate::model::{
    ApprovalDecision, ApprovalKind, ApprovalState, Criteria, DecisionKind, JsonText, StepSpec,
    StepStatus, TaskStatus,
};

/// Subject names. Functions where the subject carries an identifier.
pub mod subject {
    pub const TASKS_SUBMIT: &str = "cadre.tasks.submit";
    pub const TASKS_ENQUEUE: &str = "cadre.tasks.enqueue";
    pub const TASKS_GET: &str = "cadre.tasks.get";
    pub const TASKS_LIST: &str = "cadre.tasks.list";
    pub const TASKS_CANCEL: &str = "cadre.tasks.cancel";
    pub const TASKS_RESOLVE: &str = "cadre.tasks.resolve";
    pub const TASKS_TRACE: &str = "cadre.tasks.trace";
    /// Request: an event for a task's `wait` step (`SignalRequest` → `TaskStatusReply`).
    pub const TASKS_SIGNAL: &str = "cadre.tasks.signal";
    /// Request: an operator decides an approval (`DecideRequest` → `DecideReply`).
    pub const APPROVALS_DECIDE: &str = "cadre.approvals.decide";
    /// Request: approvals of this node's active tasks (`ApprovalListRequest`).
    pub const APPROVALS_LIST: &str = "cadre.approvals.list";
    /// Request: one approval (`ApprovalRef` → `ApprovalView`).
    pub const APPROVALS_GET: &str = "cadre.approvals.get";
    /// Events: every approval requested (`ApprovalView`, state `pending`).
    pub const APPROVALS_REQUESTED_ALL: &str = "cadre.approvals.requested.>";
    /// Events: every approval decided, expired or voided (`ApprovalView`).
    pub const APPROVALS_DECIDED_ALL: &str = "cadre.approvals.decided.>";
    /// Request: today's spend against the caps, and the cost per verified task
    /// (`{}` → `BudgetReply`).
    pub const BUDGET_STATUS: &str = "cadre.budget.status";
    /// Request: every node the cluster knows, with its last heartbeat
    /// (`ClusterStatusRequest` → `ClusterStatusReply`).
    pub const CLUSTER_STATUS: &str = "cadre.cluster.status";
    /// The NATS micro service every node is an instance of (`nats micro ls`).
    pub const SERVICE_NAME: &str = "cadre";
    /// JetStream KV bucket: each node's latest heartbeat (`NodeStatus`), keyed by node id.
    pub const NODES_BUCKET: &str = "CADRE_NODES";
    /// JetStream KV bucket of task ownership: key = task id, value = `Lease` (JSON), each
    /// entry written with a TTL. Its revision at the claim is the owner's fencing token.
    pub const LEASES_BUCKET: &str = "CADRE_LEASES";
    /// JetStream KV bucket: the cluster-wide ledger of `unsafe` effects, key
    /// `<task>.<step>.<attempt>`, value the executor's `Effect` (JSON).
    pub const EFFECTS_BUCKET: &str = "CADRE_EFFECTS";
    /// JetStream stream of replicated task checkpoints, one message (the latest) per task.
    pub const CHECKPOINT_STREAM: &str = "CADRE_CHECKPOINTS";
    pub const CHECKPOINTS_ALL: &str = "cadre.checkpoint.*";
    /// Headers on a replicated checkpoint: the owner that wrote it and its fencing token.
    pub const OWNER_HEADER: &str = "Cadre-Owner";
    pub const TOKEN_HEADER: &str = "Cadre-Fencing-Token";
    /// Request: engage, release or read the kill switch (`KillSwitchRequest`).
    pub const CONTROL_KILLSWITCH: &str = "cadre.control.killswitch";
    pub const QUEUE_CONTROL: &str = "cadre-control";
    /// JetStream KV bucket of cluster-wide control state, and the kill switch's key.
    pub const CONTROL_BUCKET: &str = "CADRE_CONTROL";
    pub const KILLSWITCH_KEY: &str = "killswitch";
    /// Publishes a policy set to every node of a cluster (or reads the one published).
    pub const CONTROL_POLICIES: &str = "cadre.control.policies";
    /// Key of the cluster's policy set in `CADRE_CONTROL`.
    pub const POLICIES_KEY: &str = "policies";
    pub const PLAN: &str = "cadre.plan";
    pub const VERIFY: &str = "cadre.verify";
    pub const ARCHIVE: &str = "cadre.archive";
    pub const EVENTS_ALL: &str = "cadre.events.>";
    /// Enqueued messages that failed validation (nobody waits for a reply there).
    pub const INTAKE_REJECTED: &str = "cadre.events.intake.rejected";

    /// The subject an executor for `tool` serves: `cadre.exec.file.write`.
    pub fn exec(tool: &str) -> String {
        format!("cadre.exec.{tool}")
    }

    /// `tool` on one node only: `cadre.exec.file.write.node.laptop`.
    pub fn exec_on_node(tool: &str, node_id: &str) -> String {
        format!("cadre.exec.{tool}.node.{node_id}")
    }

    /// `tool` on a node with a tag: `cadre.exec.file.write.tag.location.laptop`.
    pub fn exec_on_tag(tool: &str, key: &str, value: &str) -> String {
        format!("cadre.exec.{tool}.tag.{key}.{value}")
    }

    /// The plan and archive hops of a node's own tasks: `cadre.plan.node.laptop`. A task
    /// actor asks its own node's roles, so a frozen peer in the queue group (which takes
    /// requests and answers none) never delays it, and no hop crosses the internet.
    pub fn plan_on_node(node_id: &str) -> String {
        format!("cadre.plan.node.{node_id}")
    }

    pub fn archive_on_node(node_id: &str) -> String {
        format!("cadre.archive.node.{node_id}")
    }

    /// Verification on one node: a node's own tasks' verdicts, and those that must read
    /// that node's disk (file criteria of a step it executed): `cadre.verify.node.laptop`.
    pub fn verify_on_node(node_id: &str) -> String {
        format!("cadre.verify.node.{node_id}")
    }

    /// Where a step with `placement` is sent by a task owned by `owner`. A step placed
    /// nowhere runs on the owner's own executor: a peer that the server still counts in
    /// the queue group but that cannot answer (frozen, or cut off with its connection
    /// not yet timed out) would otherwise take its share of the calls and black-hole
    /// them, one step timeout each.
    pub fn exec_for(
        tool: &str,
        placement: Option<&crate::model::Placement>,
        owner: &str,
    ) -> String {
        match placement {
            None => exec_on_node(tool, owner),
            Some(crate::model::Placement::Node(node)) => exec_on_node(tool, node),
            Some(crate::model::Placement::Tag(k, v)) => exec_on_tag(tool, k, v),
        }
    }

    /// A task's replicated checkpoint: `cadre.checkpoint.<task_id>` (postcard `Task`).
    pub fn checkpoint(task_id: &str) -> String {
        format!("cadre.checkpoint.{task_id}")
    }

    /// `cadre.events.task.<task_id>.<kind>`.
    pub fn task_event(task_id: &str, kind: &str) -> String {
        // Built by hand: one per event, and `format!` costs ten times as much.
        const PREFIX: &str = "cadre.events.task.";
        let mut s = String::with_capacity(PREFIX.len() + task_id.len() + 1 + kind.len());
        s.push_str(PREFIX);
        s.push_str(task_id);
        s.push('.');
        s.push_str(kind);
        s
    }

    /// Every event of one task.
    pub fn task_events(task_id: &str) -> String {
        format!("cadre.events.task.{task_id}.>")
    }

    /// A node's own copy of a public control subject, where another node forwards a
    /// request about a task this one owns: `cadre.node.vps.tasks.cancel`.
    pub fn on_node(node_id: &str, public: &str) -> String {
        let rest = public.strip_prefix("cadre.").unwrap_or(public);
        format!("cadre.node.{node_id}.{rest}")
    }

    /// Header on a forwarded request: handle it here, do not forward it again.
    pub const FORWARDED_HEADER: &str = "Cadre-Forwarded";

    /// A node's secrets: `cadre.node.<id>.secrets.set|rotate|list|delete` (secrets are
    /// per node; only that node answers).
    pub fn secrets(node_id: &str, op: &str) -> String {
        format!("cadre.node.{node_id}.secrets.{op}")
    }

    /// A node's own status endpoint, in the micro service (`{}` → `NodeStatus`).
    pub fn node_status(node_id: &str) -> String {
        format!("cadre.node.{node_id}.status")
    }

    /// Event: a step waits for an approval (`ApprovalView`, state `pending`).
    pub fn approval_requested(approval_id: &str) -> String {
        format!("cadre.approvals.requested.{approval_id}")
    }

    /// Event: an approval was decided, expired or voided (`ApprovalView`).
    pub fn approval_decided(approval_id: &str) -> String {
        format!("cadre.approvals.decided.{approval_id}")
    }

    /// Where a node publishes its audit records: `cadre.audit.<node_id>`
    /// (`cadre.audit.*` collects every node's).
    pub fn audit(node_id: &str) -> String {
        format!("cadre.audit.{node_id}")
    }

    /// Every node's audit records (one token after `cadre.audit`, so requests below
    /// are not matched).
    pub const AUDIT_ALL: &str = "cadre.audit.*";

    /// Request: read a node's audit records (`AuditReadRequest`).
    pub fn audit_read(node_id: &str) -> String {
        format!("cadre.audit.{node_id}.read")
    }

    /// Request: walk a node's audit chain (`{}` → `AuditVerifyReply`).
    pub fn audit_verify(node_id: &str) -> String {
        format!("cadre.audit.{node_id}.verify")
    }

    /// Header on internal replies naming the responding actor (`executor@laptop`), so
    /// the task's timeline can say who did what, where.
    pub const FROM_HEADER: &str = "Cadre-From";

    /// Queue groups: one member of each group answers a request.
    pub const QUEUE_INTAKE: &str = "cadre-intake";
    pub const QUEUE_TASKS: &str = "cadre-tasks";
    pub const QUEUE_ROLES: &str = "cadre-roles";

    /// Requests on schedules (`ScheduleSpec`, `ScheduleRef`, `{}` for list).
    pub const SCHEDULES_LIST: &str = "cadre.schedules.list";
    pub const SCHEDULES_ADD: &str = "cadre.schedules.add";
    pub const SCHEDULES_PAUSE: &str = "cadre.schedules.pause";
    pub const SCHEDULES_RESUME: &str = "cadre.schedules.resume";
    pub const SCHEDULES_REMOVE: &str = "cadre.schedules.remove";
    pub const QUEUE_SCHEDULES: &str = "cadre-schedules";
    /// JetStream KV bucket of schedules (`ScheduleRecord`, JSON, keyed by name) and the
    /// scheduler's lease (`SCHEDULER_LEASE_KEY`, a `Lease`).
    pub const SCHEDULES_BUCKET: &str = "CADRE_SCHEDULES";
    pub const SCHEDULER_LEASE_KEY: &str = "_lease";

    /// JetStream stream and durable consumer that hold `cadre.tasks.enqueue`.
    pub const INTAKE_STREAM: &str = "CADRE_INTAKE";
    pub const INTAKE_CONSUMER: &str = "cadre-intake";

    /// A task id or step id is used inside subjects, so it must be one subject token.
    pub fn is_token(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }
}

// ---------------------------------------------------------------------------------------
// Public JSON API
// ---------------------------------------------------------------------------------------

/// `cadre.tasks.submit` request, and the body published on `cadre.tasks.enqueue`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    #[serde(default)]
    pub playbook: Option<String>,
    /// A goal in plain words, planned by the LLM planner (without a `playbook`). A node
    /// with no LLM configured answers `goal_not_supported`.
    #[serde(default)]
    pub goal: Option<String>,
    #[serde(default = "empty_object")]
    pub input: Value,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Plan it no earlier than this: RFC 3339 text or milliseconds since the epoch. The
    /// task is `scheduled` until then.
    #[serde(default)]
    pub run_at: Option<Value>,
    /// …or this long from now: `90s`, `10m`, `2h`, `3d`, or milliseconds.
    #[serde(default)]
    pub run_after: Option<Value>,
    /// Why the task exists, for its `accepted` event and trace (a schedule's firing, a
    /// webhook's delivery); at most 500 characters.
    #[serde(default)]
    pub reason: Option<String>,
    /// `high`, `normal` or `low`; default: the playbook's `priority`, else `normal`.
    #[serde(default)]
    pub priority: Option<crate::model::Priority>,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitReply {
    pub task_id: String,
    pub status: TaskStatus,
    pub duplicate: bool,
}

/// `cadre.tasks.get` and `cadre.tasks.cancel` identify a task.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRef {
    pub task_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    pub task_id: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListRequest {
    #[serde(default)]
    pub status: Option<TaskStatus>,
    #[serde(default)]
    pub playbook: Option<String>,
    /// Page size; default 20, at most [`LIST_LIMIT_MAX`].
    #[serde(default)]
    pub limit: Option<usize>,
    /// Continue below this task id (the `next` of the previous page).
    #[serde(default)]
    pub before: Option<String>,
}

pub const LIST_LIMIT_DEFAULT: usize = 20;
pub const LIST_LIMIT_MAX: usize = 500;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListReply {
    pub tasks: Vec<TaskSummary>,
    /// Pass as `before` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub next: Option<String>,
    /// In a cluster: live nodes that did not answer in time, whose tasks are missing.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub unanswered: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskSummary {
    pub task_id: String,
    pub playbook: String,
    pub status: TaskStatus,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub failure: Option<String>,
}

/// `cadre.tasks.resolve`: the operator's decision on a step whose outcome is unknown.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    pub task_id: String,
    pub step_id: String,
    pub decision: DecisionKind,
    #[serde(default)]
    pub by: Option<String>,
    #[serde(default)]
    pub note: Option<String>,
}

/// `cadre.tasks.signal`: the event a `wait` step of the task waits for (a reply came,
/// a payment cleared). Committed with the step, so it is not lost to a crash.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    pub task_id: String,
    /// The `event` the wait step names.
    pub event: String,
    /// What came with it: the step's output carries it (`steps.<id>.output.payload`).
    #[serde(default)]
    pub payload: Option<Value>,
    #[serde(default)]
    pub by: Option<String>,
}

/// `cadre.approvals.decide`: an operator's decision on an approval request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecideRequest {
    pub approval_id: String,
    /// `approve`/`deny` a dispatch; `retry`/`mark_done`/`abort` an unknown outcome.
    pub decision: ApprovalDecision,
    /// Who decides; recorded in the audit log.
    pub by: String,
    #[serde(default)]
    pub note: Option<String>,
}

/// Reply to `cadre.approvals.decide`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecideReply {
    pub approval_id: String,
    pub task_id: String,
    /// The approval after the decision: `approved`, `denied`, or `void` when the action
    /// changed since it was requested (then `next_approval_id` is the new request).
    pub state: ApprovalState,
    pub task_status: TaskStatus,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub next_approval_id: Option<String>,
}

/// `cadre.approvals.get`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRef {
    pub approval_id: String,
}

/// `cadre.approvals.list`: `{}` lists pending approvals.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalListRequest {
    /// `pending` (the default) or `all` (every approval of the node's active tasks).
    #[serde(default)]
    pub state: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApprovalListReply {
    pub approvals: Vec<ApprovalView>,
    /// In a cluster: live nodes that did not answer in time, whose approvals are missing.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub unanswered: Vec<String>,
}

/// An approval request: what will be done, why it needs a person, what it costs, and
/// what became of it. Params are redacted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalView {
    pub approval_id: String,
    /// `dispatch` (decide approve or deny) or `outcome_unknown` (retry, mark_done, abort).
    pub kind: ApprovalKind,
    pub task_id: String,
    pub playbook: String,
    pub step_id: String,
    pub attempt: u32,
    pub tool: String,
    pub params: Value,
    pub args_hash: String,
    pub policy_version: String,
    pub reason: String,
    pub cost_usd: f64,
    pub requested_at_ms: u64,
    pub expires_at_ms: u64,
    pub state: ApprovalState,
    pub node_id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub decided_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub decided_at_ms: Option<u64>,
}

/// `cadre.cluster.status`: `{}` (an empty payload too).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterStatusRequest {}

/// Reply to `cadre.cluster.status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatusReply {
    /// The node that read the bucket.
    pub answered_by: String,
    pub at_ms: u64,
    /// By node id.
    pub nodes: Vec<NodeStatus>,
}

/// A node as its heartbeat describes it (also its micro service endpoint's answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: String,
    pub version: String,
    /// `location=laptop`, … (config `tags`).
    pub tags: std::collections::BTreeMap<String, String>,
    /// The tools its executor serves.
    pub tools: Vec<String>,
    pub started_at_ms: u64,
    pub heartbeat_at_ms: u64,
    pub tasks_in_flight: i64,
    pub steps_in_flight: i64,
    pub approvals_pending: i64,
    pub killswitch_engaged: bool,
    /// Tasks holding a step back while the kill switch is engaged.
    #[serde(default)]
    pub tasks_held: i64,
    pub policy_version: String,
    /// Heard of within three heartbeats (as of the reply).
    pub alive: bool,
}

/// `cadre.budget.status`: `{}` (an empty payload too).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetRequest {}

/// Reply to `cadre.budget.status`: one node's spend (budgets are per node).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetReply {
    pub node_id: String,
    /// The UTC day the daily caps apply to.
    pub day: String,
    /// Caps in US dollars; 0: none.
    pub task_cap_usd: f64,
    pub day_cap_usd: f64,
    pub spent_today_usd: f64,
    /// Per playbook with a cap or spend today.
    pub playbooks: Vec<PlaybookBudget>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlaybookBudget {
    pub playbook: String,
    pub day_cap_usd: f64,
    pub spent_today_usd: f64,
    /// Tasks of this playbook that succeeded (were verified), ever, on this node.
    pub verified_tasks: u64,
    /// What those cost, and per task.
    pub verified_cost_usd: f64,
    pub cost_per_verified_task_usd: f64,
}

/// Reply to cancel and resolve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStatusReply {
    pub task_id: String,
    pub status: TaskStatus,
}

/// The whole task, as `cadre.tasks.get` answers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskView {
    pub task_id: String,
    pub playbook: String,
    pub status: TaskStatus,
    pub input: Value,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub idempotency_key: Option<String>,
    pub node_id: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub steps: Vec<StepView>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub failure: Option<String>,
    /// Present while the task waits for an operator: which step and why.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attention: Option<Attention>,
    /// Cost charged so far: planning and all steps.
    pub cost_usd: f64,
    /// The goal, for a task submitted as one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub goal: Option<String>,
    /// A delayed task is not planned before this (`run_at`/`run_after`, or a low
    /// priority's batch window).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub not_before_ms: Option<u64>,
    pub priority: crate::model::Priority,
    /// How the LLM planner made the plan, if it did.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub planning: Option<PlanningView>,
}

/// An LLM plan's making, as `cadre.tasks.get` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanningView {
    pub model: String,
    pub drafts: u32,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    /// Why each refused draft was refused, oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub refused: Vec<String>,
    pub prompt_chars: u64,
}

impl From<&crate::model::Planning> for PlanningView {
    fn from(p: &crate::model::Planning) -> Self {
        PlanningView {
            model: p.model.clone(),
            drafts: p.drafts,
            prompt_tokens: p.prompt_tokens,
            completion_tokens: p.completion_tokens,
            cost_usd: crate::budget::usd(p.cost_micros),
            refused: p.refused.clone(),
            prompt_chars: p.prompt_chars,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attention {
    pub step_id: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepView {
    pub id: String,
    pub tool: String,
    pub params: Value,
    pub verify: Value,
    pub depends_on: Vec<String>,
    pub status: StepStatus,
    pub attempts: u32,
    pub idempotency_key: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub output: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub verdict: Option<Verdict>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub started_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub finished_at_ms: Option<u64>,
    /// Cost charged for its dispatched attempts.
    pub cost_usd: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub approval: Option<ApprovalView>,
}

/// Published on `cadre.events.task.<task_id>.<kind>` for every committed transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    pub task_id: String,
    /// Per-task sequence, gap-free in commit order: a consumer can order and dedupe.
    pub seq: u64,
    pub kind: String,
    pub status: TaskStatus,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub step_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
    pub at_ms: u64,
    pub node_id: String,
}

impl TaskEvent {
    /// The event's JSON, as published: byte for byte what `serde_json` writes for it
    /// (tested against it), written by hand because a task publishes 14 of them and
    /// `serde_json`'s escape scan of every byte was 2 % of a task's instructions
    /// ([`crate::json_write`]).
    pub fn to_json(&self) -> Vec<u8> {
        use crate::json_write::{field_num, field_str, number, string};
        let mut out = Vec::with_capacity(160 + self.detail.as_ref().map_or(0, String::len));
        out.extend_from_slice(b"{\"task_id\":");
        string(&mut out, &self.task_id);
        out.extend_from_slice(b",\"seq\":");
        number(&mut out, self.seq);
        field_str(&mut out, b",\"kind\":", Some(&self.kind));
        field_str(&mut out, b",\"status\":", Some(self.status.as_str()));
        field_str(&mut out, b",\"step_id\":", self.step_id.as_deref());
        field_num(&mut out, b",\"attempt\":", self.attempt);
        field_str(&mut out, b",\"detail\":", self.detail.as_deref());
        out.extend_from_slice(b",\"at_ms\":");
        number(&mut out, self.at_ms);
        field_str(&mut out, b",\"node_id\":", Some(&self.node_id));
        out.push(b'}');
        out
    }
}

/// What an audit record says: who did what, why, with what outcome. Stored as the
/// payload of a hash-chained link (postcard, so no field is skipped when absent) and
/// published as JSON inside an [`AuditEntry`], where absent fields are left out (see
/// [`AuditRecordJson`]). Params are never stored here: only their hash, and a redacted
/// copy (`crate::redact`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at_ms: u64,
    /// The node that committed the record.
    pub node_id: String,
    /// Who acted: `<role>@<node>` (`executor@vps`) or `operator`.
    pub actor: String,
    /// The person, for operator actions (`by` of a cancel or resolve).
    #[serde(default)]
    pub operator: Option<String>,
    /// What happened: the task event kind (`step_started`, `cancelled`, …) or
    /// `step_executed` for an adapter call.
    pub action: String,
    #[serde(default)]
    pub task_id: Option<String>,
    #[serde(default)]
    pub step_id: Option<String>,
    #[serde(default)]
    pub attempt: Option<u32>,
    /// Why: the plan the action belongs to, `<playbook>@<version>`.
    #[serde(default)]
    pub plan: Option<String>,
    #[serde(default)]
    pub tool: Option<String>,
    /// sha256 of the params as sent (the effect ledger's `args_hash`).
    #[serde(default)]
    pub args_hash: Option<String>,
    /// The params as sent, redacted (JSON text).
    #[serde(default)]
    pub params: Option<String>,
    /// Pointer to the input context: `tasks/<task_id>#input sha256:<hex>`.
    #[serde(default)]
    pub input_ref: Option<String>,
    /// `ok`, `failed`, `retry`, `unknown`, `cancelled`, … or the new status.
    pub outcome: String,
    /// Redacted free text: the reason, the verdict, the error.
    #[serde(default)]
    pub detail: Option<String>,
    #[serde(default)]
    pub duration_ms: Option<u64>,
    #[serde(default)]
    pub cost_usd: Option<f64>,
}

impl AuditRecord {
    /// A record of `action` with `outcome`, by `actor` on `node_id`; every optional
    /// field absent.
    pub fn new(at_ms: u64, node_id: &str, actor: &str, action: &str, outcome: &str) -> Self {
        AuditRecord {
            at_ms,
            node_id: node_id.into(),
            actor: actor.into(),
            operator: None,
            action: action.into(),
            task_id: None,
            step_id: None,
            attempt: None,
            plan: None,
            tool: None,
            args_hash: None,
            params: None,
            input_ref: None,
            outcome: outcome.into(),
            detail: None,
            duration_ms: None,
            cost_usd: None,
        }
    }
}

/// An audit record with its place in the chain, as answered by
/// `cadre.audit.<node_id>.read` and `cadre.tasks.trace`, and published on
/// `cadre.audit.<node_id>` (in batches: each message is a JSON array of consecutive
/// entries). Consumers dedupe on `(record.node_id, seq)`. Written as JSON through
/// [`AuditEntryJson`], its one shape.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub hash: String,
    pub prev_hash: String,
    pub record: AuditRecord,
}

impl Serialize for AuditEntry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        AuditEntryJson {
            seq: self.seq,
            hash: &self.hash,
            prev_hash: &self.prev_hash,
            record: AuditRecordJson::from(&self.record),
        }
        .serialize(s)
    }
}

/// An [`AuditEntry`] as JSON, borrowing its strings. The publisher writes the same text
/// by hand from a stored link (`audit::LinkEntry::write_json`, tested against this).
#[derive(Serialize)]
pub struct AuditEntryJson<'a> {
    pub seq: u64,
    pub hash: &'a str,
    pub prev_hash: &'a str,
    pub record: AuditRecordJson<'a>,
}

/// An [`AuditRecord`] as JSON: the same fields, absent ones left out. (The record
/// itself cannot skip fields: postcard is not self-describing.) It also decodes a
/// stored record in place, borrowing its strings, so its fields must stay in the
/// record's order (`actors::audit` tests that both decode alike).
#[derive(Clone, Copy, Serialize, Deserialize)]
pub struct AuditRecordJson<'a> {
    pub at_ms: u64,
    pub node_id: &'a str,
    pub actor: &'a str,
    #[serde(skip_serializing_if = "Option::is_none", borrow)]
    pub operator: Option<&'a str>,
    pub action: &'a str,
    #[serde(skip_serializing_if = "Option::is_none", borrow)]
    pub task_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none", borrow)]
    pub step_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", borrow)]
    pub plan: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none", borrow)]
    pub tool: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none", borrow)]
    pub args_hash: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none", borrow)]
    pub params: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none", borrow)]
    pub input_ref: Option<&'a str>,
    pub outcome: &'a str,
    #[serde(skip_serializing_if = "Option::is_none", borrow)]
    pub detail: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

impl<'a> From<&'a AuditRecord> for AuditRecordJson<'a> {
    fn from(r: &'a AuditRecord) -> Self {
        // Destructured, so a field added to the record fails to compile here until it
        // is added to the JSON form too (in the same place).
        let AuditRecord {
            at_ms,
            node_id,
            actor,
            operator,
            action,
            task_id,
            step_id,
            attempt,
            plan,
            tool,
            args_hash,
            params,
            input_ref,
            outcome,
            detail,
            duration_ms,
            cost_usd,
        } = r;
        AuditRecordJson {
            at_ms: *at_ms,
            node_id,
            actor,
            operator: operator.as_deref(),
            action,
            task_id: task_id.as_deref(),
            step_id: step_id.as_deref(),
            attempt: *attempt,
            plan: plan.as_deref(),
            tool: tool.as_deref(),
            args_hash: args_hash.as_deref(),
            params: params.as_deref(),
            input_ref: input_ref.as_deref(),
            outcome,
            detail: detail.as_deref(),
            duration_ms: *duration_ms,
            cost_usd: *cost_usd,
        }
    }
}

/// `cadre.tasks.trace` reply: the task's timeline, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TraceReply {
    pub task_id: String,
    pub playbook: String,
    pub status: TaskStatus,
    pub created_at_ms: u64,
    pub entries: Vec<AuditEntry>,
    /// In a cluster: live nodes that did not answer in time, whose records are missing.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub unanswered: Vec<String>,
}

/// `cadre.audit.<node_id>.read` request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditReadRequest {
    /// Records with a sequence above this one (0: from the start).
    #[serde(default)]
    pub after_seq: Option<u64>,
    /// The last N records instead (ignored when `after_seq` is given).
    #[serde(default)]
    pub last: Option<u64>,
    /// Page size; default 100, at most [`AUDIT_READ_MAX`].
    #[serde(default)]
    pub limit: Option<usize>,
}

pub const AUDIT_READ_DEFAULT: usize = 100;
pub const AUDIT_READ_MAX: usize = 1000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditReadReply {
    pub node_id: String,
    pub entries: Vec<AuditEntry>,
    /// The chain's head when read.
    pub head_seq: u64,
}

/// `cadre.audit.<node_id>.verify` reply (and `cadre audit verify --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditVerifyReply {
    pub node_id: String,
    /// Records examined.
    pub records: u64,
    /// The last record that holds.
    pub head_seq: u64,
    pub head_hash: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub broken: Option<AuditBreak>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditBreak {
    /// The first record that does not hold.
    pub seq: u64,
    pub reason: String,
}

/// `cadre.control.killswitch` request. Without `engaged` it only reads the state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillSwitchRequest {
    #[serde(default)]
    pub engaged: Option<bool>,
    /// Who decided (recorded in the audit log).
    #[serde(default)]
    pub by: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

/// The kill switch as stored in the `CADRE_CONTROL` bucket (key `killswitch`) and
/// answered on `cadre.control.killswitch`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KillSwitchState {
    pub engaged: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it was last set (0: never).
    #[serde(default)]
    pub at_ms: u64,
    /// The node that set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The bucket's revision of this state (0: never set).
    #[serde(default)]
    pub revision: u64,
}

/// `cadre.control.policies`: `files` (file name → Cedar text) is validated as one set and
/// published to every node; without `files`, the set published last is returned.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoliciesRequest {
    #[serde(default)]
    pub files: Option<std::collections::BTreeMap<String, String>>,
    /// Who published (recorded in the audit log).
    #[serde(default)]
    pub by: Option<String>,
}

/// The cluster's policy set as stored in `CADRE_CONTROL` (key `policies`) and answered on
/// `cadre.control.policies`. Every node of the cluster enforces it instead of its own
/// policies directory, from the moment it sees it (at start, for a node that was away).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterPolicies {
    /// The set's content hash, as `cadre cluster status` shows for each node.
    pub version: String,
    pub files: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default)]
    pub at_ms: u64,
    /// The node that took the request.
    #[serde(default)]
    pub node_id: String,
    /// The bucket's revision of this set.
    #[serde(default)]
    pub revision: u64,
}

/// Published on `cadre.events.intake.rejected` for an enqueued message that was
/// refused and dropped (terminated in JetStream, never redelivered).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntakeRejected {
    pub stream_sequence: Option<u64>,
    pub error: ErrorBody,
}

/// `cadre.node.<id>.secrets.set|rotate`: the value travels once, to the node that keeps
/// it, and is never answered back.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretPut {
    pub name: String,
    pub value: String,
    /// Who (recorded in the node's log; never the value).
    #[serde(default)]
    pub by: Option<String>,
}

impl std::fmt::Debug for SecretPut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretPut")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// `cadre.node.<id>.secrets.delete`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    pub name: String,
}

/// A secret as `list` shows it: its name, version and age, never its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretInfo {
    pub name: String,
    pub version: u32,
    pub created_at_ms: u64,
    pub rotated_at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SecretListReply {
    pub node_id: String,
    pub secrets: Vec<SecretInfo>,
}

/// What a schedule does with firings missed while no node could fire them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Missed {
    /// Fire once, for the latest missed time, and say how many were missed.
    #[default]
    CatchUpOnce,
    /// Fire none of them; the next firing is the next on the schedule.
    Skip,
}

/// `cadre.schedules.add`: a recurring task. The same name again replaces the schedule
/// (keeping when it last fired).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// One subject token.
    pub name: String,
    pub playbook: String,
    /// 5 fields (`min hour day month weekday`), or 6 with seconds first.
    pub cron: String,
    /// IANA time zone the cron is read in; `UTC` when empty.
    #[serde(default)]
    pub tz: String,
    #[serde(default = "empty_object")]
    pub input: Value,
    #[serde(default)]
    pub missed: Missed,
}

/// `cadre.schedules.pause|resume|remove`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRef {
    pub name: String,
}

/// A schedule as the `CADRE_SCHEDULES` bucket keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleRecord {
    #[serde(flatten)]
    pub spec: ScheduleSpecStored,
    pub paused: bool,
    /// `playbook` (its `[schedule]` section) or `operator` (`cadre schedule add`).
    pub source: String,
    pub created_at_ms: u64,
    /// The scheduled time of the last firing handled (fired or skipped).
    pub last_fire_ms: u64,
    pub fired: u64,
    pub skipped: u64,
    /// What the last tick that did something did, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_note: Option<String>,
}

/// The spec inside a stored record (the same fields, without `deny_unknown_fields`, so
/// a record with later fields still reads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleSpecStored {
    pub name: String,
    pub playbook: String,
    pub cron: String,
    #[serde(default)]
    pub tz: String,
    #[serde(default = "empty_object")]
    pub input: Value,
    #[serde(default)]
    pub missed: Missed,
}

/// A schedule with its next firing, as `cadre.schedules.list` answers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleView {
    #[serde(flatten)]
    pub record: ScheduleRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_fire_ms: Option<u64>,
    /// The next firing in the schedule's time zone (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_fire: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleListReply {
    pub schedules: Vec<ScheduleView>,
    /// The node holding the scheduler's lease (the one that fires), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fired_by: Option<String>,
}

/// Every error reply on every subject: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// On a context store `conflict`: the key's version now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The payload is not valid JSON.
    BadJson,
    /// Valid JSON, but a field is missing, unknown or of the wrong type.
    InvalidRequest,
    UnknownPlaybook,
    /// The input does not satisfy the playbook (a template names a missing field).
    InvalidInput,
    PayloadTooLarge,
    /// A free-text goal needs the LLM planner, and this node has no LLM configured.
    GoalNotSupported,
    NotFound,
    /// The request conflicts with the task's state (e.g. resolving a step that is not
    /// waiting for a decision).
    Conflict,
    /// The node is shutting down or a dependency is unreachable; retry later.
    Unavailable,
    Internal,
    /// The LLM planner's plan stayed invalid through its repairs.
    PlanInvalid,
    /// A budget cap is already reached: the work would only add to it.
    OverBudget,
    /// (Console HTTP only.) No session, or an expired one: log in.
    Unauthenticated,
    /// (Console HTTP only.) A session, but the request did not come from the console's
    /// own page (CSRF token or origin), or a login arrived from another origin.
    Forbidden,
    /// (Console HTTP only.) Too many failed logins: wait, then try again.
    RateLimited,
}

impl ErrorCode {
    /// The wire spelling (`bad_json`), for metric labels and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnknownPlaybook => "unknown_playbook",
            ErrorCode::InvalidInput => "invalid_input",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::GoalNotSupported => "goal_not_supported",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::PlanInvalid => "plan_invalid",
            ErrorCode::OverBudget => "over_budget",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
        }
    }
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
        ErrorReply {
            error: ErrorBody {
                code,
                message: message.into(),
                current_version: None,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------
// Internal role hops (postcard)
// ---------------------------------------------------------------------------------------

/// `cadre.plan`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanRequest {
    pub task_id: String,
    pub playbook: String,
    pub input: JsonText,
    /// A free-text goal (playbook `goal`): the LLM planner makes the plan.
    pub goal: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PlanReply {
    Planned {
        steps: Vec<StepSpec>,
        checks: Vec<TaskCheck>,
        playbook_version: String,
        /// Who the plan acts as, for the policies.
        persona: String,
        /// How the LLM planner made it, if it did.
        planning: Option<crate::model::Planning>,
    },
    Rejected {
        code: ErrorCode,
        message: String,
        /// What the LLM planner tried, if it did: refused drafts cost tokens too.
        planning: Option<crate::model::Planning>,
    },
}

/// Who owns a task, in the `CADRE_LEASES` bucket (JSON, so `nats kv get` reads it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub owner: String,
    /// The owner's process incarnation.
    pub boot_id: u64,
    /// The fencing token: the revision of the write that claimed the lease. Absent on
    /// the claim itself (whose revision it is), written by every renewal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
    pub claimed_at_ms: u64,
}

impl Lease {
    /// The token of the lease stored at `revision`.
    pub fn token_at(&self, revision: u64) -> u64 {
        self.token.unwrap_or(revision)
    }
}

/// A task-level success criterion over one step's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskCheck {
    pub step: String,
    pub criteria: Criteria,
}

/// `cadre.exec.<tool>`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRequest {
    pub task_id: String,
    pub step_id: String,
    pub attempt: u32,
    pub tool: String,
    pub params: JsonText,
    /// Stable for the step across attempts: what the outside world dedupes on.
    pub idempotency_key: String,
    /// The owner's lease token (`Lease::token`); 0 on a node without leases. An
    /// executor runs the effect only while it is the task's current lease.
    pub fencing_token: u64,
    pub timeout_ms: u64,
    /// The step's checks. With them, an executor whose step is done forwards the outcome
    /// to its own node's verifier under the task's reply subject, and the verifier's
    /// `ExecReply::Verified` answers the task: one hop fewer than a reply and a second
    /// request. `None` (an LLM judge, whose budget the exec timeout does not cover): the
    /// executor answers `Done` and the task asks the verifier itself.
    pub verify: Option<StepChecks>,
}

/// What the verifier checks of a step's outcome, carried by its `ExecRequest`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepChecks {
    pub criteria: Criteria,
    /// The task's checks, when this is the last step left: a passing step's verdict
    /// then decides the task too. `outputs` holds the other steps'; the verifier adds
    /// this one's.
    pub task: Option<TaskChecks>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ExecReply {
    Done {
        output: JsonText,
        duration_us: u64,
        replayed: bool,
    },
    Failed {
        kind: FailureKind,
        message: String,
        output: Option<JsonText>,
    },
    /// `Done` and its verdict, sent by the verifier the executor forwarded the outcome to
    /// (see `ExecRequest::verify`). Never recorded in the effect ledger.
    Verified {
        output: JsonText,
        duration_us: u64,
        replayed: bool,
        /// Who ran the step (`executor@<node>`): the message itself comes from the verifier.
        executor: String,
        verdict: VerifyReply,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Worth another attempt: 5xx, 429, timeouts of re-runnable tools, no responder.
    Retryable,
    /// Another attempt would fail the same way: bad params, 4xx, refused path.
    Permanent,
    /// An `unsafe` effect may or may not have happened; an operator decides.
    OutcomeUnknown,
    /// Not run: the request's fencing token is not the task's current lease. The sender
    /// no longer owns the task and must stand down.
    Fenced,
}

/// `cadre.verify`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum VerifyRequest {
    Step {
        task_id: String,
        step_id: String,
        tool: String,
        params: JsonText,
        criteria: Criteria,
        output: JsonText,
        /// Set when this is the task's last step: if the step passes, check the task
        /// too, in the same round trip.
        task: Option<TaskChecks>,
    },
    Task {
        task_id: String,
        task: TaskChecks,
    },
    /// A step's outcome, forwarded by the executor that ran it (on its own node) with
    /// the task's reply subject: checked as `Step`, and answered with
    /// `ExecReply::Verified`, not a `VerifyReply`.
    Executed {
        task_id: String,
        step_id: String,
        tool: String,
        params: JsonText,
        checks: StepChecks,
        output: JsonText,
        duration_us: u64,
        replayed: bool,
        executor: String,
    },
}

/// Task-level criteria and the outputs they read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskChecks {
    pub checks: Vec<TaskCheck>,
    /// `(step_id, output)` of every step.
    pub outputs: Vec<(String, JsonText)>,
}

/// Reply on `cadre.verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReply {
    /// The step's verdict (for `VerifyRequest::Task`, the task's).
    pub verdict: Verdict,
    /// The task's verdict, when asked for with a passing step.
    pub task: Option<Verdict>,
    /// What judging cost (an LLM judge's tokens), in millionths of a US dollar.
    pub cost_micros: u64,
    /// No verdict could be reached now (the LLM judge is unreachable): ask again later.
    pub unavailable: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub passed: bool,
    /// One line per criterion checked, saying what was expected and what was found.
    pub reasons: Vec<String>,
}

/// `cadre.archive`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchiveRequest {
    pub task_id: String,
    pub playbook: String,
    pub playbook_version: String,
    pub input: JsonText,
    pub steps: Vec<crate::model::EpisodeStep>,
    pub task_verdict: Option<Verdict>,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ArchiveReply {
    Archived,
    Failed { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published event is what `serde_json` writes: every status (each variant
    /// postcard knows, so a new one is covered), every optional field present or absent,
    /// odd characters in every string, and 500 random details from a printed seed.
    #[test]
    fn a_task_event_writes_what_serde_json_writes() {
        use rand::{Rng, SeedableRng};
        let statuses: Vec<TaskStatus> = (0u8..=255)
            .map_while(|i| storage::codec::from_wire(&[i]).ok())
            .collect();
        assert!(statuses.len() >= 12, "{statuses:?}");
        let full = TaskEvent {
            task_id: "01JTASK\"q\"".into(),
            seq: u64::MAX,
            kind: "step_started".into(),
            status: TaskStatus::Running,
            step_id: Some("crm\t\u{1}".into()),
            attempt: Some(u32::MAX),
            detail: Some("allowed by policies — ünïcode \\ \u{2028} \u{7f} 😀".into()),
            at_ms: 1_765_000_000_123,
            node_id: "laptop\n".into(),
        };
        let sparse = TaskEvent {
            step_id: None,
            attempt: None,
            detail: None,
            seq: 0,
            at_ms: 0,
            ..full.clone()
        };
        let same = |e: &TaskEvent, why: &str| {
            assert_eq!(
                String::from_utf8(e.to_json()).unwrap(),
                serde_json::to_string(e).unwrap(),
                "{why}"
            );
        };
        for status in statuses {
            same(
                &TaskEvent {
                    status,
                    ..full.clone()
                },
                "full",
            );
            same(
                &TaskEvent {
                    status,
                    ..sparse.clone()
                },
                "sparse",
            );
        }
        let seed = crate::test_seed(0x000e_7e47);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let alphabet = ['a', ' ', '"', '\\', '\u{0}', '\n', '\u{1f}', 'é', '😀'];
        for _ in 0..500 {
            let detail: String = (0..rng.random_range(0..30))
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            let e = TaskEvent {
                detail: Some(detail),
                attempt: rng.random_bool(0.5).then(|| rng.random()),
                ..full.clone()
            };
            same(&e, &format!("seed {seed}"));
        }
    }

    #[test]
    fn submit_defaults_and_rejections() {
        let r: SubmitRequest = serde_json::from_str(r#"{"playbook":"x"}"#).unwrap();
        assert_eq!(r.input, serde_json::json!({}));
        assert!(serde_json::from_str::<SubmitRequest>(r#"{"playbook":"x","bogus":1}"#).is_err());
    }

    #[test]
    fn error_code_spelling_matches_serde() {
        for code in [
            ErrorCode::BadJson,
            ErrorCode::InvalidRequest,
            ErrorCode::UnknownPlaybook,
            ErrorCode::InvalidInput,
            ErrorCode::PayloadTooLarge,
            ErrorCode::GoalNotSupported,
            ErrorCode::NotFound,
            ErrorCode::Conflict,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
            ErrorCode::PlanInvalid,
            ErrorCode::OverBudget,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }

    #[test]
    fn error_reply_shape() {
        let e = ErrorReply::new(ErrorCode::UnknownPlaybook, "no playbook named `x`");
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"error": {"code": "unknown_playbook", "message": "no playbook named `x`"}})
        );
    }

    #[test]
    fn tokens() {
        assert!(subject::is_token("01JABC-step_1"));
        assert!(!subject::is_token("a.b"));
        assert!(!subject::is_token("a b"));
        assert!(!subject::is_token(""));
        assert_eq!(
            subject::task_event("t1", "succeeded"),
            "cadre.events.task.t1.succeeded"
        );
    }
}
