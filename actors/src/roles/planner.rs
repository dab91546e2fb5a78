//! Planner (`cadre.plan`): playbook + input → a bounded plan with success criteria.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;

use crate::bus::{self, Inbound};
use crate::context::NodeContext;
use crate::playbook::Catalog;
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
            Ok(req) => plan(&state.catalog, &req),
            Err(e) => PlanReply::Rejected {
                code: ErrorCode::InvalidRequest,
                message: format!("undecodable plan request: {e}"),
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

pub fn plan(catalog: &Catalog, req: &PlanRequest) -> PlanReply {
    let Some(playbook) = catalog.get(&req.playbook) else {
        return PlanReply::Rejected {
            code: ErrorCode::UnknownPlaybook,
            message: format!(
                "no playbook named `{}` (known: {})",
                req.playbook,
                catalog.names().join(", ")
            ),
        };
    };
    let input = match req.input.to_value() {
        Ok(v) => v,
        Err(e) => {
            return PlanReply::Rejected {
                code: ErrorCode::InvalidInput,
                message: format!("input is not JSON: {e}"),
            };
        }
    };
    match playbook.plan(&req.task_id, &input, catalog.persona()) {
        Ok((steps, checks)) => PlanReply::Planned {
            steps,
            checks,
            playbook_version: playbook.version.clone(),
            persona: playbook.persona.clone(),
        },
        Err(e) => PlanReply::Rejected {
            code: ErrorCode::InvalidInput,
            message: e.to_string(),
        },
    }
}
