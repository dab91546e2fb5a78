//! Planner (`cadre.plan`): playbook + input → a bounded plan with success criteria.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;

use crate::bus::{self, Inbound};
use crate::context::NodeContext;
use serde_json::{Map, Value};

use crate::knowledge::{self, recall};
use crate::playbook::{Catalog, Known, LlmRouting, Playbook};
use crate::protocol::{ErrorCode, PlanReply, PlanRequest, subject};

#[derive(Clone, Copy)]
pub struct Planner;

pub struct PlannerArgs {
    pub ctx: Arc<NodeContext>,
    pub catalog: Arc<Catalog>,
}

pub struct PlannerState {
    ctx: Arc<NodeContext>,
    catalog: Arc<Catalog>,
    pumps: Vec<JoinHandle<()>>,
}

pub enum PlannerMsg {
    Request(Inbound),
}

impl Actor for Planner {
    type Msg = PlannerMsg;
    type State = PlannerState;
    type Arguments = PlannerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<PlannerMsg>,
        args: PlannerArgs,
    ) -> Result<PlannerState, ActorProcessingErr> {
        // Any node's requests, and this node's own tasks' (`subject::plan_on_node`).
        let pumps = bus::spawn_role_pumps(
            &args.ctx.nats,
            [
                subject::PLAN.to_string(),
                subject::plan_on_node(&args.ctx.settings.node_id),
            ],
            &myself,
            args.ctx.settings.mailbox_depth_max,
            PlannerMsg::Request,
        )
        .await?;
        Ok(PlannerState {
            ctx: args.ctx,
            catalog: args.catalog,
            pumps,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<PlannerMsg>,
        msg: PlannerMsg,
        state: &mut PlannerState,
    ) -> Result<(), ActorProcessingErr> {
        let PlannerMsg::Request(inbound) = msg;
        state.ctx.settings.faults.maybe_panic(super::PLANNER);
        let reply = match storage::codec::from_wire::<PlanRequest>(&inbound.msg.payload) {
            // An LLM plan takes seconds to minutes: planned off the actor, so playbook
            // plans are never queued behind it.
            Ok(req) if needs_llm(&state.catalog, &req) => {
                let ctx = state.ctx.clone();
                let catalog = state.catalog.clone();
                tokio::spawn(async move {
                    let Inbound { msg, permit } = inbound;
                    let reply = plan_with_llm(&ctx, &catalog, &req).await;
                    bus::reply_wire(&ctx.nats, msg.reply, &reply, &ctx.from(super::PLANNER)).await;
                    drop(permit);
                });
                return Ok(());
            }
            Ok(req) => plan(&state.ctx, &state.catalog, &req),
            Err(e) => PlanReply::Rejected {
                code: ErrorCode::InvalidRequest,
                message: format!("undecodable plan request: {e}"),
                planning: None,
            },
        };
        bus::reply_wire(
            &state.ctx.nats,
            inbound.msg.reply,
            &reply,
            &state.ctx.from(super::PLANNER),
        )
        .await;
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<PlannerMsg>,
        state: &mut PlannerState,
    ) -> Result<(), ActorProcessingErr> {
        for pump in &state.pumps {
            pump.abort();
        }
        Ok(())
    }
}

/// A free-text goal, or a playbook with a goal template.
fn needs_llm(catalog: &Catalog, req: &PlanRequest) -> bool {
    req.goal.is_some() || catalog.get(&req.playbook).is_some_and(|p| p.goal.is_some())
}

/// Plans a goal with the LLM planner: the free-text goal as given, or the playbook's
/// goal template rendered for the input, with the playbook's routing and recall.
async fn plan_with_llm(ctx: &NodeContext, catalog: &Catalog, req: &PlanRequest) -> PlanReply {
    let rejected = |code, message: String| PlanReply::Rejected {
        code,
        message,
        planning: None,
    };
    let Some(provider) = ctx.llm() else {
        return rejected(
            ErrorCode::GoalNotSupported,
            crate::llm::LlmError::NotConfigured.to_string(),
        );
    };
    let input = match req.input.to_value() {
        Ok(v) => v,
        Err(e) => return rejected(ErrorCode::InvalidInput, format!("input is not JSON: {e}")),
    };
    let free_text = LlmRouting::default();
    let (text, routing, persona_name, recall) = match (&req.goal, catalog.get(&req.playbook)) {
        (Some(goal), _) => (goal.clone(), &free_text, "operator", None),
        (None, Some(pb)) => {
            let text = match pb.goal_text(&req.task_id, &input, catalog.persona()) {
                Ok(Some(t)) => t,
                Ok(None) => {
                    return rejected(ErrorCode::Internal, "the playbook has no goal".into());
                }
                Err(e) => return rejected(ErrorCode::InvalidInput, e.to_string()),
            };
            let recall = match pb.recall_query(&req.task_id, &input, catalog.persona()) {
                Ok(r) => r,
                Err(e) => return rejected(ErrorCode::InvalidInput, e.to_string()),
            };
            (text, &pb.llm, pb.persona.as_str(), recall)
        }
        (None, None) => {
            return rejected(
                ErrorCode::UnknownPlaybook,
                format!("no playbook named `{}`", req.playbook),
            );
        }
    };
    crate::llm::plan::plan(
        ctx,
        provider,
        &ctx.settings.step_defaults,
        crate::llm::plan::Goal {
            task_id: &req.task_id,
            playbook: &req.playbook,
            persona_name,
            text,
            input: &input,
            persona: catalog.persona(),
            routing,
            recall,
        },
    )
    .await
}

pub fn plan(ctx: &NodeContext, catalog: &Catalog, req: &PlanRequest) -> PlanReply {
    let Some(playbook) = catalog.get(&req.playbook) else {
        return PlanReply::Rejected {
            code: ErrorCode::UnknownPlaybook,
            message: format!(
                "no playbook named `{}` (known: {})",
                req.playbook,
                catalog.names().join(", ")
            ),
            planning: None,
        };
    };
    let input = match req.input.to_value() {
        Ok(v) => v,
        Err(e) => {
            return PlanReply::Rejected {
                code: ErrorCode::InvalidInput,
                message: format!("input is not JSON: {e}"),
                planning: None,
            };
        }
    };
    let known = match gather(ctx, playbook, &req.task_id, &input, catalog.persona()) {
        Ok(k) => k,
        Err(message) => {
            return PlanReply::Rejected {
                code: ErrorCode::InvalidInput,
                message,
                planning: None,
            };
        }
    };
    match playbook.plan_with(&req.task_id, &input, catalog.persona(), &known) {
        Ok((mut steps, checks)) => {
            crate::llm::plan::route_models(
                &mut steps,
                &playbook.llm.executor_model,
                &playbook.llm.judge_model,
            );
            PlanReply::Planned {
                steps,
                checks,
                playbook_version: playbook.version.clone(),
                persona: playbook.persona.clone(),
                planning: None,
            }
        }
        Err(e) => PlanReply::Rejected {
            code: ErrorCode::InvalidInput,
            message: e.to_string(),
            planning: None,
        },
    }
}

/// What the plan reads from knowledge: the context keys its templates name (latest
/// versions, from this node's copy) and its `[recall]` retrieval — bounded, never the
/// full history.
pub(crate) fn gather(
    ctx: &NodeContext,
    playbook: &Playbook,
    task_id: &str,
    input: &Value,
    persona: &Value,
) -> Result<Known, String> {
    let mut known = Known::default();
    if !playbook.context_paths().is_empty() {
        let mut root = Map::new();
        for path in playbook.context_paths() {
            // The longest prefix of the path that is a key; the rest reads into its value.
            let tokens: Vec<&str> = path.split('.').collect();
            for n in (2..=tokens.len()).rev() {
                let key = tokens[..n].join(".");
                if let Some(value) =
                    knowledge::value(&ctx.store, &key).map_err(|e| e.to_string())?
                {
                    insert_at(&mut root, &tokens[..n], value);
                    break;
                }
            }
        }
        known.context = Some(Value::Object(root));
    }
    if let Some((query, bounds)) = playbook
        .recall_query(task_id, input, persona)
        .map_err(|e| e.to_string())?
    {
        let shared = ctx
            .knowledge()
            .ok_or("memory is not open on this node yet")?;
        let timer = ctx.metrics.memory_search_seconds.start_timer();
        let reply = recall::search(&ctx.store, &shared.index, &query, bounds, ctx.now_ms())
            .map_err(|e| format!("recall: {e}"))?;
        timer.observe_duration();
        known.recall = Some(recall::to_template_value(&reply));
    }
    Ok(known)
}

/// Puts `value` at the dotted `path` in `root`, making objects on the way.
fn insert_at(root: &mut Map<String, Value>, path: &[&str], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut map = root;
    for p in parents {
        let slot = map
            .entry(p.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let Value::Object(next) = slot else { return };
        map = next;
    }
    map.insert(last.to_string(), value);
}
