//! Archivist (`cadre.archive`): after verification only, writes the task's episode.
//! Consolidated memory and the context store come with the knowledge issue.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use storage::{Batch, Cf};
use tokio::task::JoinHandle;

use crate::bus::{self, Inbound};
use crate::context::NodeContext;
use crate::model::Episode;
use crate::protocol::{ArchiveReply, ArchiveRequest, subject};

#[derive(Clone, Copy)]
pub struct Archivist;

pub struct ArchivistArgs {
    pub ctx: Arc<NodeContext>,
}

pub struct ArchivistState {
    ctx: Arc<NodeContext>,
    pumps: Vec<JoinHandle<()>>,
}

pub enum ArchivistMsg {
    Request(Inbound),
}

impl Actor for Archivist {
    type Msg = ArchivistMsg;
    type State = ArchivistState;
    type Arguments = ArchivistArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ArchivistMsg>,
        args: ArchivistArgs,
    ) -> Result<ArchivistState, ActorProcessingErr> {
        // Any node's requests, and this node's own tasks' (`subject::archive_on_node`).
        let pumps = bus::spawn_role_pumps(
            &args.ctx.nats,
            [
                subject::ARCHIVE.to_string(),
                subject::archive_on_node(&args.ctx.settings.node_id),
            ],
            &myself,
            args.ctx.settings.mailbox_depth_max,
            ArchivistMsg::Request,
        )
        .await?;
        Ok(ArchivistState {
            ctx: args.ctx,
            pumps,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<ArchivistMsg>,
        msg: ArchivistMsg,
        state: &mut ArchivistState,
    ) -> Result<(), ActorProcessingErr> {
        let ArchivistMsg::Request(inbound) = msg;
        state.ctx.settings.faults.maybe_panic(super::ARCHIVIST);
        let reply = match storage::codec::from_wire::<ArchiveRequest>(&inbound.msg.payload) {
            Ok(req) => archive(&state.ctx, req),
            Err(e) => ArchiveReply::Failed {
                message: format!("undecodable archive request: {e}"),
            },
        };
        bus::reply_wire(
            &state.ctx.nats,
            inbound.msg.reply,
            &reply,
            &state.ctx.from(super::ARCHIVIST),
        )
        .await;
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<ArchivistMsg>,
        state: &mut ArchivistState,
    ) -> Result<(), ActorProcessingErr> {
        for pump in &state.pumps {
            pump.abort();
        }
        Ok(())
    }
}

fn archive(ctx: &NodeContext, req: ArchiveRequest) -> ArchiveReply {
    let episode = Episode {
        task_id: req.task_id,
        playbook: req.playbook,
        input: req.input,
        steps: req.steps,
        started_at_ms: req.started_at_ms,
        finished_at_ms: req.finished_at_ms,
        archived_at_ms: ctx.now_ms(),
    };
    let mut batch = Batch::new();
    if let Err(e) = batch.put(Cf::Episodes, episode.task_id.as_bytes(), &episode) {
        return ArchiveReply::Failed {
            message: e.to_string(),
        };
    }
    // Keyed by task id, so a repeated archive overwrites rather than duplicates. Not
    // synced here: the task's `succeeded` commit that follows syncs the shared WAL.
    match ctx.store.write_unsynced(batch) {
        Ok(()) => ArchiveReply::Archived,
        Err(e) => ArchiveReply::Failed {
            message: e.to_string(),
        },
    }
}
