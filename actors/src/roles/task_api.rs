//! `cadre.tasks.get|list|trace|cancel|resolve`: reads answer from the store (the committed
//! truth); cancel and resolve go to the task's own actor, the only writer of its state.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use storage::Cf;
use tokio::task::JoinHandle;

use crate::audit;
use crate::bus::{self, Inbound};
use crate::context::NodeContext;
use crate::model::{JsonText, Task, TaskStatus};
use crate::protocol::{
    Attention, CancelRequest, ErrorCode, ErrorReply, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, ListReply,
    ListRequest, ResolveRequest, StepView, TaskRef, TaskStatusReply, TaskSummary, TaskView,
    TraceReply, subject,
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

pub enum TaskApiMsg {
    Get(Inbound),
    List(Inbound),
    Cancel(Inbound),
    Resolve(Inbound),
    Trace(Inbound),
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
                nats.queue_subscribe(subject::TASKS_TRACE, q()).await?,
                myself.clone(),
                depth,
                TaskApiMsg::Trace,
            ),
        ];
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
                let reply = parse_json::<TaskRef>(&inbound.msg.payload, max)
                    .and_then(|r| get(ctx, &r.task_id));
                ctx.respond(subject::TASKS_GET, inbound.msg.reply, reply)
                    .await;
            }
            TaskApiMsg::List(inbound) => {
                // An empty payload means "no filter", like `{}`.
                let payload: &[u8] = if inbound.msg.payload.is_empty() {
                    b"{}"
                } else {
                    &inbound.msg.payload
                };
                let reply = parse_json::<ListRequest>(payload, max).and_then(|r| list(ctx, &r));
                ctx.respond(subject::TASKS_LIST, inbound.msg.reply, reply)
                    .await;
            }
            TaskApiMsg::Cancel(inbound) => {
                spawn_control::<CancelRequest>(ctx, inbound, subject::TASKS_CANCEL)
            }
            TaskApiMsg::Resolve(inbound) => {
                spawn_control::<ResolveRequest>(ctx, inbound, subject::TASKS_RESOLVE)
            }
            TaskApiMsg::Trace(inbound) => {
                let reply = parse_json::<TaskRef>(&inbound.msg.payload, max)
                    .and_then(|r| trace(ctx, &r.task_id));
                ctx.respond(subject::TASKS_TRACE, inbound.msg.reply, reply)
                    .await;
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

fn get(ctx: &NodeContext, task_id: &str) -> Result<TaskView, ErrorReply> {
    load(ctx, task_id).map(|task| view(&task))
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
    Ok(ListReply { tasks, next })
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
            Ok(request) => control(&ctx, request).await,
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
    }
}
