//! `cadre.tasks.get|list|trace|cancel|resolve` and `cadre.approvals.decide|list|get`:
//! reads answer from the store (the committed truth); cancel, resolve and decide go to
//! the task's own actor, the only writer of its state.

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use storage::Cf;
use tokio::task::JoinHandle;

use crate::audit;
use crate::budget::usd;
use crate::bus::{self, Inbound};
use crate::context::NodeContext;
use crate::model::{Approval, ApprovalState, JsonText, Step, Task, TaskStatus, task_of_approval};
use crate::protocol::{
    ApprovalListReply, ApprovalListRequest, ApprovalRef, ApprovalView, Attention, BudgetReply,
    BudgetRequest, CancelRequest, DecideReply, DecideRequest, ErrorCode, ErrorReply,
    LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, ListReply, ListRequest, PlaybookBudget, ResolveRequest,
    SignalRequest, StepView, TaskRef, TaskStatusReply, TaskSummary, TaskView, TraceReply, subject,
};
use crate::roles::intake::parse_json;
use crate::roles::task_supervisor::{ControlError, TaskSupervisorMsg};
use crate::roles::{TASKS, lookup};

/// Entries a trace answers at most (a task with many retries keeps its latest).
const TRACE_ENTRIES_MAX: usize = 2000;
/// Keys a filtered list examines per page at most.
const LIST_SCAN_MAX: usize = 20_000;

#[derive(Clone, Copy)]
pub struct TaskApi;

pub struct TaskApiArgs {
    pub ctx: Arc<NodeContext>,
}

pub struct TaskApiState {
    ctx: Arc<NodeContext>,
    pumps: Vec<JoinHandle<()>>,
}

/// What a request on a subject becomes for the actor.
type ToMsg = fn(Inbound) -> TaskApiMsg;

pub enum TaskApiMsg {
    Get(Inbound),
    List(Inbound),
    Cancel(Inbound),
    Resolve(Inbound),
    Signal(Inbound),
    Trace(Inbound),
    Decide(Inbound),
    ApprovalsList(Inbound),
    ApprovalsGet(Inbound),
    Budget(Inbound),
}

impl Actor for TaskApi {
    type Msg = TaskApiMsg;
    type State = TaskApiState;
    type Arguments = TaskApiArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<TaskApiMsg>,
        args: TaskApiArgs,
    ) -> Result<TaskApiState, ActorProcessingErr> {
        let ctx = args.ctx;
        let depth = ctx.settings.mailbox_depth_max;
        let q = || subject::QUEUE_TASKS.to_string();
        let nats = &ctx.nats;
        let pumps = vec![
            bus::spawn_pump(
                nats.queue_subscribe(subject::TASKS_GET, q()).await?,
                myself.clone(),
                depth,
                TaskApiMsg::Get,
            ),
            bus::spawn_pump(
                nats.queue_subscribe(subject::TASKS_LIST, q()).await?,
                myself.clone(),
                depth,
                TaskApiMsg::List,
            ),
            bus::spawn_pump(
                nats.queue_subscribe(subject::TASKS_CANCEL, q()).await?,
                myself.clone(),
                depth,
                TaskApiMsg::Cancel,
            ),
            bus::spawn_pump(
                nats.queue_subscribe(subject::TASKS_RESOLVE, q()).await?,
                myself.clone(),
                depth,
                TaskApiMsg::Resolve,
            ),
            bus::spawn_pump(
                nats.queue_subscribe(subject::TASKS_SIGNAL, q()).await?,
                myself.clone(),
                depth,
                TaskApiMsg::Signal,
            ),
            bus::spawn_pump(
                nats.queue_subscribe(subject::TASKS_TRACE, q()).await?,
                myself.clone(),
                depth,
                TaskApiMsg::Trace,
            ),
            bus::spawn_pump(
                nats.queue_subscribe(subject::APPROVALS_DECIDE, q()).await?,
                myself.clone(),
                depth,
                TaskApiMsg::Decide,
            ),
            bus::spawn_pump(
                nats.queue_subscribe(subject::APPROVALS_LIST, q()).await?,
                myself.clone(),
                depth,
                TaskApiMsg::ApprovalsList,
            ),
            bus::spawn_pump(
                nats.queue_subscribe(subject::APPROVALS_GET, q()).await?,
                myself.clone(),
                depth,
                TaskApiMsg::ApprovalsGet,
            ),
            bus::spawn_pump(
                nats.queue_subscribe(subject::BUDGET_STATUS, q()).await?,
                myself.clone(),
                depth,
                TaskApiMsg::Budget,
            ),
        ];
        let mut pumps = pumps;
        // Budgets are per node: a console asks each node of the cluster for its own.
        pumps.push(bus::spawn_pump(
            nats.subscribe(subject::on_node(
                &ctx.settings.node_id,
                subject::BUDGET_STATUS,
            ))
            .await?,
            myself.clone(),
            depth,
            TaskApiMsg::Budget,
        ));
        // In a cluster, a request about a task another node owns is forwarded to that
        // node's own copy of the subject (no queue group: exactly that node), and a list
        // is asked of every node's copy.
        if ctx.ownership().is_some() {
            let node = &ctx.settings.node_id;
            let owned: [(&str, ToMsg); 7] = [
                (subject::TASKS_CANCEL, TaskApiMsg::Cancel),
                (subject::TASKS_RESOLVE, TaskApiMsg::Resolve),
                (subject::TASKS_SIGNAL, TaskApiMsg::Signal),
                (subject::APPROVALS_DECIDE, TaskApiMsg::Decide),
                // Lists and traces are gathered from every node by whichever answers.
                (subject::TASKS_LIST, TaskApiMsg::List),
                (subject::APPROVALS_LIST, TaskApiMsg::ApprovalsList),
                (subject::TASKS_TRACE, TaskApiMsg::Trace),
            ];
            for (public, msg) in owned {
                pumps.push(bus::spawn_pump(
                    nats.subscribe(subject::on_node(node, public)).await?,
                    myself.clone(),
                    depth,
                    msg,
                ));
            }
        }
        Ok(TaskApiState { ctx, pumps })
    }

    async fn handle(
        &self,
        _: ActorRef<TaskApiMsg>,
        msg: TaskApiMsg,
        state: &mut TaskApiState,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = &state.ctx;
        let max = ctx.settings.payload_bytes_max;
        match msg {
            TaskApiMsg::Get(inbound) => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let Inbound { msg, permit } = inbound;
                    let reply = match parse_json::<TaskRef>(&msg.payload, max) {
                        Ok(r) => get(&ctx, &r.task_id).await,
                        Err(e) => Err(e),
                    };
                    ctx.respond(subject::TASKS_GET, msg.reply, reply).await;
                    drop(permit);
                });
            }
            TaskApiMsg::List(inbound) => {
                let request = parse_json::<ListRequest>(payload_of(&inbound.msg), max);
                let limit = request
                    .as_ref()
                    .ok()
                    .and_then(|r| r.limit)
                    .unwrap_or(LIST_LIMIT_DEFAULT);
                let reply = request.and_then(|r| list(ctx, &r));
                match (reply, gathering(ctx, &inbound.msg)) {
                    (Ok(local), Some(req)) => {
                        let ctx = ctx.clone();
                        tokio::spawn(async move {
                            let Inbound { msg, permit } = inbound;
                            let (others, unanswered) =
                                gather::<ListReply>(&ctx, subject::TASKS_LIST, req).await;
                            let reply = merge_lists(local, others, unanswered, limit);
                            ctx.respond(subject::TASKS_LIST, msg.reply, reply).await;
                            drop(permit);
                        });
                    }
                    (reply, _) => {
                        ctx.respond(subject::TASKS_LIST, inbound.msg.reply, reply)
                            .await
                    }
                }
            }
            TaskApiMsg::Cancel(inbound) => {
                spawn_control::<CancelRequest>(ctx, inbound, subject::TASKS_CANCEL)
            }
            TaskApiMsg::Resolve(inbound) => {
                spawn_control::<ResolveRequest>(ctx, inbound, subject::TASKS_RESOLVE)
            }
            TaskApiMsg::Signal(inbound) => {
                spawn_control::<SignalRequest>(ctx, inbound, subject::TASKS_SIGNAL)
            }
            TaskApiMsg::Trace(inbound) => {
                let request = parse_json::<TaskRef>(&inbound.msg.payload, max);
                if let (Ok(r), Some(req)) = (&request, gathering(ctx, &inbound.msg)) {
                    let (ctx, task_id) = (ctx.clone(), r.task_id.clone());
                    tokio::spawn(async move {
                        let Inbound { msg, permit } = inbound;
                        let local = trace(&ctx, &task_id);
                        let (others, unanswered) =
                            gather::<TraceReply>(&ctx, subject::TASKS_TRACE, req).await;
                        let reply = merge_traces(&ctx, &task_id, local, others, unanswered).await;
                        ctx.respond(subject::TASKS_TRACE, msg.reply, reply).await;
                        drop(permit);
                    });
                    return Ok(());
                }
                let reply = request.and_then(|r| trace(ctx, &r.task_id));
                ctx.respond(subject::TASKS_TRACE, inbound.msg.reply, reply)
                    .await;
            }
            TaskApiMsg::Decide(inbound) => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let Inbound { msg, permit } = inbound;
                    let reply = match parse_json::<DecideRequest>(&msg.payload, max) {
                        Ok(request) => {
                            let task_id = task_of_approval(&request.approval_id).unwrap_or("");
                            if forwarded(&ctx, &msg, task_id, subject::APPROVALS_DECIDE).await {
                                drop(permit);
                                return;
                            }
                            decide(&ctx, request).await
                        }
                        Err(e) => Err(e),
                    };
                    ctx.respond(subject::APPROVALS_DECIDE, msg.reply, reply)
                        .await;
                    drop(permit);
                });
            }
            TaskApiMsg::ApprovalsList(inbound) => {
                let reply = parse_json::<ApprovalListRequest>(payload_of(&inbound.msg), max)
                    .and_then(|r| list_approvals(ctx, &r));
                match (reply, gathering(ctx, &inbound.msg)) {
                    (Ok(local), Some(req)) => {
                        let ctx = ctx.clone();
                        tokio::spawn(async move {
                            let Inbound { msg, permit } = inbound;
                            let (others, unanswered) =
                                gather::<ApprovalListReply>(&ctx, subject::APPROVALS_LIST, req)
                                    .await;
                            let reply =
                                merge_approvals(&ctx.settings.node_id, local, others, unanswered);
                            ctx.respond(subject::APPROVALS_LIST, msg.reply, Ok(reply))
                                .await;
                            drop(permit);
                        });
                    }
                    (reply, _) => {
                        ctx.respond(subject::APPROVALS_LIST, inbound.msg.reply, reply)
                            .await
                    }
                }
            }
            TaskApiMsg::Budget(inbound) => {
                let reply = parse_json::<BudgetRequest>(payload_of(&inbound.msg), max)
                    .and_then(|_| budget(ctx));
                ctx.respond(subject::BUDGET_STATUS, inbound.msg.reply, reply)
                    .await;
            }
            TaskApiMsg::ApprovalsGet(inbound) => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let Inbound { msg, permit } = inbound;
                    let reply = match parse_json::<ApprovalRef>(&msg.payload, max) {
                        Ok(r) => get_approval(&ctx, &r.approval_id).await,
                        Err(e) => Err(e),
                    };
                    ctx.respond(subject::APPROVALS_GET, msg.reply, reply).await;
                    drop(permit);
                });
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<TaskApiMsg>,
        state: &mut TaskApiState,
    ) -> Result<(), ActorProcessingErr> {
        for pump in &state.pumps {
            pump.abort();
        }
        Ok(())
    }
}

fn load(ctx: &NodeContext, task_id: &str) -> Result<Task, ErrorReply> {
    if !subject::is_token(task_id) {
        return Err(ErrorReply::new(
            ErrorCode::InvalidRequest,
            "task_id must be letters, digits, `-` or `_`",
        ));
    }
    match ctx.store.get::<Task>(Cf::Tasks, task_id.as_bytes()) {
        Ok(Some(task)) => Ok(task),
        Ok(None) => Err(ErrorReply::new(
            ErrorCode::NotFound,
            format!("no task `{task_id}`"),
        )),
        Err(e) => Err(ErrorReply::new(ErrorCode::Internal, e.to_string())),
    }
}

/// The task as the cluster knows it last: in a cluster, the replicated checkpoint when
/// it is newer than this node's record (or this node has none).
async fn get(ctx: &NodeContext, task_id: &str) -> Result<TaskView, ErrorReply> {
    latest(ctx, task_id).await.map(|task| view(&task))
}

/// The task as last committed anywhere: in a cluster, the newer of this node's record and
/// the replicated checkpoint (the task may run, or have ended, on another node).
async fn latest(ctx: &NodeContext, task_id: &str) -> Result<Task, ErrorReply> {
    let local = load(ctx, task_id);
    let Some(own) = ctx.ownership() else {
        return local;
    };
    if matches!(&local, Err(e) if e.error.code == ErrorCode::InvalidRequest) {
        return local;
    }
    match (local, own.load_checkpoint(task_id).await) {
        (Ok(l), Ok(Some((r, _, _)))) if r.event_seq > l.event_seq => Ok(r),
        (Ok(l), _) => Ok(l),
        (Err(_), Ok(Some((r, _, _)))) => Ok(r),
        (Err(e), _) => Err(e),
    }
}

/// In a cluster, hands a control request about a task another node owns to that node
/// and relays its answer; true if it did. The owner handles it as if it came to it.
async fn forwarded(
    ctx: &NodeContext,
    msg: &async_nats::Message,
    task_id: &str,
    public: &str,
) -> bool {
    let Some(own) = ctx.ownership() else {
        return false;
    };
    if task_id.is_empty()
        || !subject::is_token(task_id)
        || msg
            .headers
            .as_ref()
            .is_some_and(|h| h.get(subject::FORWARDED_HEADER).is_some())
    {
        return false;
    }
    let owner = match own.owner_of(task_id).await {
        Ok(Some((owner, _))) if owner != ctx.settings.node_id => owner,
        _ => return false,
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(subject::FORWARDED_HEADER, ctx.settings.node_id.as_str());
    let request = async_nats::Request::new()
        .payload(msg.payload.clone())
        .headers(headers)
        .timeout(Some(ctx.settings.hop_timeout * 2));
    let answer = ctx
        .nats
        .send_request(subject::on_node(&owner, public), request)
        .await;
    let Some(reply) = msg.reply.clone() else {
        return true;
    };
    match answer {
        Ok(answer) => {
            let _ = ctx.nats.publish(reply, answer.payload).await;
        }
        Err(e) => {
            let error = ErrorReply::new(
                ErrorCode::Unavailable,
                format!("the task's owner {owner} did not answer: {e}; retry"),
            );
            ctx.respond(public, Some(reply), Err::<(), _>(error)).await;
        }
    }
    true
}

/// The request to pass on to the other nodes, when this one answers a list for the
/// cluster: in cluster mode, unless it was itself passed on.
fn gathering(ctx: &NodeContext, msg: &async_nats::Message) -> Option<bytes::Bytes> {
    let passed_on = msg
        .headers
        .as_ref()
        .is_some_and(|h| h.get(subject::FORWARDED_HEADER).is_some());
    (ctx.ownership().is_some() && !passed_on).then(|| msg.payload.clone())
}

/// An empty payload means "no filter", like `{}`.
fn payload_of(msg: &async_nats::Message) -> &[u8] {
    if msg.payload.is_empty() {
        b"{}"
    } else {
        &msg.payload
    }
}

/// Asks every other live node's own copy of `public` at once; their answers that parse
/// as `R` (with who gave each) and the nodes that gave none within the hop timeout. An
/// answer that is not an `R` (an error: the node does not have the task) is left out.
async fn gather<R: serde::de::DeserializeOwned>(
    ctx: &NodeContext,
    public: &str,
    payload: bytes::Bytes,
) -> (Vec<(String, R)>, Vec<String>) {
    let me = &ctx.settings.node_id;
    let nodes = match crate::roles::membership::alive_nodes(ctx).await {
        Ok(nodes) => nodes,
        Err(e) => {
            tracing::warn!(error = %e.error.message, "cannot list the cluster's nodes");
            return (Vec::new(), vec!["(the nodes bucket)".into()]);
        }
    };
    let asks = nodes.into_iter().filter(|n| n != me).map(|node| {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(subject::FORWARDED_HEADER, me.as_str());
        let request = async_nats::Request::new()
            .payload(payload.clone())
            .headers(headers)
            .timeout(Some(ctx.settings.hop_timeout));
        let subject = subject::on_node(&node, public);
        async move {
            let answer = ctx.nats.send_request(subject, request).await;
            (
                node,
                answer.map(|m| serde_json::from_slice::<R>(&m.payload).ok()),
            )
        }
    });
    let (mut answers, mut unanswered) = (Vec::new(), Vec::new());
    for (node, answer) in futures::future::join_all(asks).await {
        match answer {
            Ok(Some(r)) => answers.push((node, r)),
            Ok(None) => {}
            Err(_) => unanswered.push(node),
        }
    }
    (answers, unanswered)
}

/// Pages from every node as one page, newest first. A task in two stores (taken over)
/// counts once, as last updated. Each node's page ends at its own cursor; below the
/// newest of those cursors some node has not been read yet, so the merged page stops
/// there and continues from it.
fn merge_lists(
    local: ListReply,
    others: Vec<(String, ListReply)>,
    unanswered: Vec<String>,
    limit: usize,
) -> Result<ListReply, ErrorReply> {
    let mut cursor: Option<String> = local.next.clone();
    let mut by_id: std::collections::BTreeMap<String, TaskSummary> = Default::default();
    for page in std::iter::once(local).chain(others.into_iter().map(|(_, p)| p)) {
        if let Some(next) = page.next
            && cursor.as_ref().is_none_or(|c| next > *c)
        {
            cursor = Some(next);
        }
        for t in page.tasks {
            match by_id.get(&t.task_id) {
                Some(seen) if seen.updated_at_ms >= t.updated_at_ms => {}
                _ => {
                    by_id.insert(t.task_id.clone(), t);
                }
            }
        }
    }
    let mut tasks: Vec<TaskSummary> = by_id
        .into_values()
        .rev()
        .filter(|t| cursor.as_ref().is_none_or(|c| t.task_id >= *c))
        .collect();
    let next = if tasks.len() > limit {
        tasks.truncate(limit);
        tasks.last().map(|t| t.task_id.clone())
    } else {
        cursor
    };
    Ok(ListReply {
        tasks,
        next,
        unanswered,
    })
}

/// A task's timeline from every node's audit chain (a task taken over has records on
/// each owner's), in time order, the most recent [`TRACE_ENTRIES_MAX`]; the header as
/// last committed anywhere.
async fn merge_traces(
    ctx: &NodeContext,
    task_id: &str,
    local: Result<TraceReply, ErrorReply>,
    others: Vec<(String, TraceReply)>,
    unanswered: Vec<String>,
) -> Result<TraceReply, ErrorReply> {
    let task = latest(ctx, task_id).await;
    let mut pages: Vec<TraceReply> = others.into_iter().map(|(_, t)| t).collect();
    let local_error = match local {
        Ok(t) => {
            pages.push(t);
            None
        }
        Err(e) => Some(e),
    };
    let mut entries: Vec<crate::protocol::AuditEntry> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for page in &mut pages {
        for e in page.entries.drain(..) {
            if seen.insert((e.record.node_id.clone(), e.seq)) {
                entries.push(e);
            }
        }
    }
    entries.sort_by(|a, b| {
        (a.record.at_ms, &a.record.node_id, a.seq).cmp(&(b.record.at_ms, &b.record.node_id, b.seq))
    });
    let cut = entries.len().saturating_sub(TRACE_ENTRIES_MAX);
    entries.drain(..cut);
    let (playbook, status, created_at_ms) = match (&task, pages.first()) {
        (Ok(t), _) => (t.playbook.clone(), t.status, t.created_at_ms),
        (Err(_), Some(p)) => (p.playbook.clone(), p.status, p.created_at_ms),
        (Err(e), None) => return Err(local_error.unwrap_or_else(|| e.clone())),
    };
    Ok(TraceReply {
        task_id: task_id.to_string(),
        playbook,
        status,
        created_at_ms,
        entries,
        unanswered,
    })
}

/// Every node's approvals as one list, oldest request first. One in two stores (its task
/// taken over) counts once, as its owner, the node the task names, has it.
fn merge_approvals(
    me: &str,
    local: ApprovalListReply,
    others: Vec<(String, ApprovalListReply)>,
    unanswered: Vec<String>,
) -> ApprovalListReply {
    let mut by_id: HashMap<String, ApprovalView> = HashMap::new();
    let pages = std::iter::once((me.to_string(), local)).chain(others);
    for (node, page) in pages {
        for a in page.approvals {
            let owner_says = a.node_id == node;
            match by_id.get(&a.approval_id) {
                Some(_) if !owner_says => {}
                _ => {
                    by_id.insert(a.approval_id.clone(), a);
                }
            }
        }
    }
    let mut approvals: Vec<ApprovalView> = by_id.into_values().collect();
    approvals.sort_by(|a, b| {
        (a.requested_at_ms, &a.approval_id).cmp(&(b.requested_at_ms, &b.approval_id))
    });
    ApprovalListReply {
        approvals,
        unanswered,
    }
}

/// The task's timeline: its audit records, oldest first (at most [`TRACE_ENTRIES_MAX`],
/// the most recent).
fn trace(ctx: &NodeContext, task_id: &str) -> Result<TraceReply, ErrorReply> {
    let task = load(ctx, task_id)?;
    let internal = |e: String| ErrorReply::new(ErrorCode::Internal, e);
    let links = ctx
        .store
        .audit_links_for(task.id.as_bytes(), TRACE_ENTRIES_MAX)
        .map_err(|e| internal(e.to_string()))?;
    let entries = links
        .iter()
        .map(audit::entry)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            internal(format!(
                "undecodable audit record: {e}; run `cadre audit verify`"
            ))
        })?;
    Ok(TraceReply {
        task_id: task.id,
        playbook: task.playbook,
        status: task.status,
        created_at_ms: task.created_at_ms,
        entries,
        unanswered: Vec::new(),
    })
}

fn list(ctx: &NodeContext, req: &ListRequest) -> Result<ListReply, ErrorReply> {
    let limit = req.limit.unwrap_or(LIST_LIMIT_DEFAULT);
    if limit == 0 || limit > LIST_LIMIT_MAX {
        return Err(ErrorReply::new(
            ErrorCode::InvalidRequest,
            format!("limit must be 1 to {LIST_LIMIT_MAX}"),
        ));
    }
    // Task ids are ULIDs, so key order is creation order: newest first is a reverse scan.
    let before = req.before.as_deref();
    let page = ctx
        .store
        .scan::<Task>(
            Cf::Tasks,
            before.map(str::as_bytes),
            true,
            limit + 1,
            LIST_SCAN_MAX,
            |key, task| {
                before.is_none_or(|b| key != b.as_bytes())
                    && req.status.is_none_or(|s| s == task.status)
                    && req.playbook.as_deref().is_none_or(|p| p == task.playbook)
            },
        )
        .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))?;
    let rows = page.rows;
    // More to read: a full page, or a filtered scan that stopped at its cap (then the
    // cursor is where it stopped, and the page may be short or even empty).
    let next = if rows.len() > limit {
        Some(rows[limit - 1].1.id.clone())
    } else {
        page.cut_at
            .map(|k| String::from_utf8_lossy(&k).into_owned())
    };
    let tasks = rows
        .into_iter()
        .take(limit)
        .map(|(_, t)| TaskSummary {
            task_id: t.id,
            playbook: t.playbook,
            status: t.status,
            created_at_ms: t.created_at_ms,
            updated_at_ms: t.updated_at_ms,
            failure: t.failure,
        })
        .collect();
    Ok(ListReply {
        tasks,
        next,
        unanswered: Vec::new(),
    })
}

/// A request that goes to the task's own actor (through the task supervisor).
trait ControlRequest: serde::de::DeserializeOwned + Send + 'static {
    fn task_id(&self) -> &str;
    fn into_msg(
        self,
        reply: ractor::RpcReplyPort<Result<TaskStatus, ControlError>>,
    ) -> TaskSupervisorMsg;
}

impl ControlRequest for CancelRequest {
    fn task_id(&self) -> &str {
        &self.task_id
    }
    fn into_msg(
        self,
        reply: ractor::RpcReplyPort<Result<TaskStatus, ControlError>>,
    ) -> TaskSupervisorMsg {
        let reason = self
            .reason
            .unwrap_or_else(|| "cancelled by operator".into());
        TaskSupervisorMsg::Cancel {
            task_id: self.task_id,
            reason,
            reply,
        }
    }
}

impl ControlRequest for ResolveRequest {
    fn task_id(&self) -> &str {
        &self.task_id
    }
    fn into_msg(
        self,
        reply: ractor::RpcReplyPort<Result<TaskStatus, ControlError>>,
    ) -> TaskSupervisorMsg {
        TaskSupervisorMsg::Resolve {
            task_id: self.task_id,
            step: self.step_id,
            decision: self.decision,
            by: self.by.unwrap_or_default(),
            note: self.note,
            reply,
        }
    }
}

impl ControlRequest for SignalRequest {
    fn task_id(&self) -> &str {
        &self.task_id
    }
    fn into_msg(
        self,
        reply: ractor::RpcReplyPort<Result<TaskStatus, ControlError>>,
    ) -> TaskSupervisorMsg {
        TaskSupervisorMsg::Signal {
            task_id: self.task_id,
            event: self.event,
            payload: self.payload,
            by: self.by.unwrap_or_else(|| "operator".into()),
            reply,
        }
    }
}

impl ControlRequest for DecideRequest {
    fn task_id(&self) -> &str {
        task_of_approval(&self.approval_id).unwrap_or("")
    }
    fn into_msg(
        self,
        reply: ractor::RpcReplyPort<Result<TaskStatus, ControlError>>,
    ) -> TaskSupervisorMsg {
        TaskSupervisorMsg::Decide {
            task_id: self.task_id().to_string(),
            approval_id: self.approval_id,
            decision: self.decision,
            by: self.by,
            note: self.note,
            reply,
        }
    }
}

/// An operator's decision: to the task's actor, then the approval as it now stands.
async fn decide(ctx: &NodeContext, request: DecideRequest) -> Result<DecideReply, ErrorReply> {
    let approval_id = request.approval_id.clone();
    let Some(task_id) = task_of_approval(&approval_id).map(str::to_string) else {
        return Err(ErrorReply::new(
            ErrorCode::InvalidRequest,
            format!("`{approval_id}` is not an approval id (`<task_id>-a<n>`)"),
        ));
    };
    if request.by.trim().is_empty() {
        return Err(ErrorReply::new(
            ErrorCode::InvalidRequest,
            "`by` must name who decides",
        ));
    }
    let status = control(ctx, request).await?.status;
    let task = load(ctx, &task_id)?;
    // A void approval is replaced, in the same transition, by the step's new request:
    // the newest pending one.
    let (state, next_approval_id) = match task.step_of_approval(&approval_id) {
        Some(i) => (
            task.steps[i]
                .approval
                .as_ref()
                .map_or(ApprovalState::Void, |a| a.state),
            None,
        ),
        None => (
            ApprovalState::Void,
            task.steps
                .iter()
                .filter_map(|s| s.approval.as_ref())
                .filter(|a| a.state == ApprovalState::Pending)
                .max_by_key(|a| a.requested_at_ms)
                .map(|a| a.id.clone()),
        ),
    };
    Ok(DecideReply {
        approval_id,
        task_id,
        state,
        task_status: status,
        next_approval_id,
    })
}

fn list_approvals(
    ctx: &NodeContext,
    req: &ApprovalListRequest,
) -> Result<ApprovalListReply, ErrorReply> {
    let all = match req.state.as_deref() {
        None | Some("pending") => false,
        Some("all") => true,
        Some(other) => {
            return Err(ErrorReply::new(
                ErrorCode::InvalidRequest,
                format!("state must be `pending` or `all`, not `{other}`"),
            ));
        }
    };
    let internal = |e: storage::StoreError| ErrorReply::new(ErrorCode::Internal, e.to_string());
    let mut approvals = Vec::new();
    for key in ctx.store.keys(Cf::Active).map_err(internal)? {
        let Some(task) = ctx.store.get::<Task>(Cf::Tasks, &key).map_err(internal)? else {
            continue;
        };
        for step in &task.steps {
            if let Some(a) = &step.approval
                && (all || a.state == ApprovalState::Pending)
            {
                approvals.push(approval_view(&task, step, a));
            }
        }
    }
    approvals.sort_by_key(|a| a.requested_at_ms);
    Ok(ApprovalListReply {
        approvals,
        unanswered: Vec::new(),
    })
}

async fn get_approval(ctx: &NodeContext, approval_id: &str) -> Result<ApprovalView, ErrorReply> {
    let not_found = || ErrorReply::new(ErrorCode::NotFound, format!("no approval `{approval_id}`"));
    let task_id = task_of_approval(approval_id).ok_or_else(not_found)?;
    let task = latest(ctx, task_id).await?;
    let i = task.step_of_approval(approval_id).ok_or_else(not_found)?;
    let step = &task.steps[i];
    let a = step.approval.as_ref().ok_or_else(not_found)?;
    Ok(approval_view(&task, step, a))
}

/// An approval as the operator sees it: the step's params (redacted), why, what it costs.
pub fn approval_view(task: &Task, step: &Step, a: &Approval) -> ApprovalView {
    let params = crate::governance::step_params(task, task.step_index(&step.spec.id).unwrap_or(0))
        .unwrap_or_else(|_| step.spec.params.clone());
    ApprovalView {
        approval_id: a.id.clone(),
        kind: a.kind,
        task_id: task.id.clone(),
        playbook: task.playbook.clone(),
        step_id: step.spec.id.clone(),
        attempt: a.attempt,
        tool: step.spec.tool.clone(),
        params: crate::redact::value(&params.to_value_lossy()),
        args_hash: a.args_hash.clone(),
        policy_version: a.policy_version.clone(),
        reason: a.reason.clone(),
        cost_usd: usd(a.cost_micros),
        requested_at_ms: a.requested_at_ms,
        expires_at_ms: a.expires_at_ms,
        state: a.state,
        node_id: task.node_id.clone(),
        decided_by: a.decided_by.clone(),
        note: a.note.clone(),
        decided_at_ms: a.decided_at_ms,
    }
}

/// Today's spend against the caps, and what verified tasks cost, per playbook.
fn budget(ctx: &NodeContext) -> Result<BudgetReply, ErrorReply> {
    let internal = |e: storage::StoreError| ErrorReply::new(ErrorCode::Internal, e.to_string());
    let day = crate::budget::day_of(ctx.now_ms());
    let caps = &ctx.settings.caps;
    let mut names: Vec<String> = caps.playbook_day.keys().cloned().collect();
    for key in ctx.store.keys(Cf::Spend).map_err(internal)? {
        let key = String::from_utf8_lossy(&key).into_owned();
        let name = match key.split('/').collect::<Vec<_>>()[..] {
            [d, pb] if d == day && pb != "*" => pb.to_string(),
            ["verified", pb, _] => pb.to_string(),
            _ => continue,
        };
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names.sort();
    let mut playbooks = Vec::with_capacity(names.len());
    for playbook in names {
        let [count, cost] = crate::budget::verified_keys(&playbook);
        let tasks = ctx
            .store
            .counter(Cf::Spend, count.as_bytes())
            .map_err(internal)?;
        let cost = ctx
            .store
            .counter(Cf::Spend, cost.as_bytes())
            .map_err(internal)?;
        playbooks.push(PlaybookBudget {
            day_cap_usd: usd(caps.playbook_day.get(&playbook).copied().unwrap_or(0)),
            spent_today_usd: usd(ctx.ledger.spent(&day, &playbook)),
            verified_tasks: tasks,
            verified_cost_usd: usd(cost),
            cost_per_verified_task_usd: if tasks == 0 {
                0.0
            } else {
                usd(cost) / tasks as f64
            },
            playbook,
        });
    }
    Ok(BudgetReply {
        node_id: ctx.settings.node_id.clone(),
        task_cap_usd: usd(caps.task),
        day_cap_usd: usd(caps.day),
        spent_today_usd: usd(ctx.ledger.spent(&day, "*")),
        day,
        playbooks,
    })
}

/// Handles a control request off the actor's mailbox: the answer waits on the task's actor.
fn spawn_control<R: ControlRequest>(
    ctx: &Arc<NodeContext>,
    inbound: Inbound,
    subject: &'static str,
) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let Inbound { msg, permit } = inbound;
        let reply = match parse_json::<R>(&msg.payload, ctx.settings.payload_bytes_max) {
            Ok(request) => {
                if forwarded(&ctx, &msg, request.task_id(), subject).await {
                    drop(permit);
                    return;
                }
                control(&ctx, request).await
            }
            Err(e) => Err(e),
        };
        ctx.respond(subject, msg.reply, reply).await;
        drop(permit);
    });
}

async fn control<R: ControlRequest>(
    ctx: &NodeContext,
    request: R,
) -> Result<TaskStatusReply, ErrorReply> {
    let task_id = request.task_id().to_string();
    if !subject::is_token(&task_id) {
        return Err(ErrorReply::new(
            ErrorCode::InvalidRequest,
            "task_id must be letters, digits, `-` or `_`",
        ));
    }
    let Some(tasks) = lookup::<TaskSupervisorMsg>(TASKS, &ctx.settings.node_id) else {
        return Err(ErrorReply::new(
            ErrorCode::Unavailable,
            "the task supervisor is restarting; retry",
        ));
    };
    match tasks
        .call(
            |reply| request.into_msg(reply),
            Some(ctx.settings.hop_timeout * 2),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(Ok(status))) => Ok(TaskStatusReply { task_id, status }),
        Ok(ractor::rpc::CallResult::Success(Err(e))) => Err(match e {
            ControlError::NotFound(_) => ErrorReply::new(ErrorCode::NotFound, e.to_string()),
            ControlError::Conflict(_) => ErrorReply::new(ErrorCode::Conflict, e.to_string()),
            ControlError::Unavailable(_) => ErrorReply::new(ErrorCode::Unavailable, e.to_string()),
        }),
        _ => Err(ErrorReply::new(
            ErrorCode::Unavailable,
            "no answer from the task supervisor; retry",
        )),
    }
}

/// The public view of a stored task.
pub fn view(task: &Task) -> TaskView {
    TaskView {
        task_id: task.id.clone(),
        playbook: task.playbook.clone(),
        status: task.status,
        input: task.input.to_value_lossy(),
        idempotency_key: task.idempotency_key.clone(),
        node_id: task.node_id.clone(),
        created_at_ms: task.created_at_ms,
        updated_at_ms: task.updated_at_ms,
        steps: task
            .steps
            .iter()
            .map(|s| StepView {
                id: s.spec.id.clone(),
                tool: s.spec.tool.clone(),
                params: s.spec.params.to_value_lossy(),
                verify: s.spec.verify.to_view(),
                depends_on: s.spec.depends_on.clone(),
                status: s.status,
                attempts: s.attempts,
                idempotency_key: task.step_key(&s.spec.id),
                output: s.output.as_ref().map(JsonText::to_value_lossy),
                error: s.error.clone(),
                verdict: s.verdict.clone(),
                started_at_ms: s.started_at_ms,
                finished_at_ms: s.finished_at_ms,
                cost_usd: usd(s.cost_micros),
                approval: s.approval.as_ref().map(|a| approval_view(task, s, a)),
            })
            .collect(),
        result: task
            .task_verdict
            .as_ref()
            .filter(|_| task.status == TaskStatus::Succeeded)
            .map(|v| serde_json::json!({"verdict": v.reasons, "archived": true})),
        failure: task.failure.clone(),
        attention: task.attention.as_ref().map(|(step_id, reason)| Attention {
            step_id: step_id.clone(),
            reason: reason.clone(),
        }),
        cost_usd: usd(task.cost_micros()),
        goal: task.goal.clone(),
        not_before_ms: task.not_before_ms,
        priority: task.priority,
        planning: task.planning.as_ref().map(Into::into),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(ids: &[(&str, u64)], next: Option<&str>) -> ListReply {
        ListReply {
            tasks: ids
                .iter()
                .map(|(id, updated)| TaskSummary {
                    task_id: id.to_string(),
                    playbook: "p".into(),
                    status: TaskStatus::Running,
                    created_at_ms: 0,
                    updated_at_ms: *updated,
                    failure: None,
                })
                .collect(),
            next: next.map(String::from),
            unanswered: Vec::new(),
        }
    }

    fn ids(reply: &ListReply) -> Vec<&str> {
        reply.tasks.iter().map(|t| t.task_id.as_str()).collect()
    }

    #[test]
    fn merged_pages_stop_where_a_node_was_not_read_further() {
        // a read down to 07 (more below), b down to 05 (more below): below 07, b's 06
        // and a's unread ones are not known yet, so the page stops at 07.
        let a = page(&[("09", 1), ("08", 1), ("07", 1)], Some("07"));
        let b = page(&[("10", 1), ("06", 1), ("05", 1)], Some("05"));
        let Ok(m) = merge_lists(a, vec![("b".into(), b)], vec![], 3) else {
            panic!("merge failed");
        };
        assert_eq!(ids(&m), ["10", "09", "08"]);
        assert_eq!(m.next.as_deref(), Some("08"));
        // Fewer than a page above the cursor: the page ends at it.
        let a = page(&[("09", 1), ("07", 1)], Some("07"));
        let b = page(&[("06", 1)], None);
        let Ok(m) = merge_lists(a, vec![("b".into(), b)], vec!["c".into()], 3) else {
            panic!("merge failed");
        };
        assert_eq!(ids(&m), ["09", "07"]);
        assert_eq!(m.next.as_deref(), Some("07"));
        assert_eq!(m.unanswered, ["c"]);
    }

    #[test]
    fn a_task_in_two_stores_counts_once_as_last_updated() {
        let a = page(&[("05", 10)], None);
        let b = page(&[("05", 20), ("04", 1)], None);
        let Ok(m) = merge_lists(a, vec![("b".into(), b)], vec![], 20) else {
            panic!("merge failed");
        };
        assert_eq!(ids(&m), ["05", "04"]);
        assert_eq!(m.tasks[0].updated_at_ms, 20);
        assert_eq!(m.next, None);
    }
}
