//! Archivist (`cadre.archive`): after verification only, writes the task's episode and
//! stages the facts its playbook's `[[remember]]` rules yield for the knowledge stream,
//! in one write: a verified task's lessons are never lost, even offline.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use storage::{Batch, Cf};
use tokio::task::JoinHandle;

use crate::bus::{self, Inbound};
use crate::context::NodeContext;
use serde_json::{Map, Value, json};

use crate::knowledge;
use crate::model::Episode;
use crate::playbook::{Catalog, Playbook};
use crate::protocol::knowledge::{Author, FactProposal, KnowledgeWrite, WriteOp};
use crate::protocol::{ArchiveReply, ArchiveRequest, subject};
use crate::template;

#[derive(Clone, Copy)]
pub struct Archivist;

pub struct ArchivistArgs {
    pub ctx: Arc<NodeContext>,
    pub catalog: Arc<Catalog>,
}

pub struct ArchivistState {
    ctx: Arc<NodeContext>,
    catalog: Arc<Catalog>,
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
            catalog: args.catalog,
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
            Ok(req) => archive(&state.ctx, &state.catalog, req),
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

fn archive(ctx: &NodeContext, catalog: &Catalog, req: ArchiveRequest) -> ArchiveReply {
    let facts = match catalog.get(&req.playbook) {
        Some(pb) => lessons(ctx, pb, catalog.persona(), &req),
        None => Vec::new(),
    };
    let episode = Episode {
        task_id: req.task_id,
        playbook: req.playbook,
        playbook_version: req.playbook_version,
        input: req.input,
        steps: req.steps,
        task_verdict: req.task_verdict,
        started_at_ms: req.started_at_ms,
        finished_at_ms: req.finished_at_ms,
        archived_at_ms: ctx.now_ms(),
    };
    let mut batch = Batch::new();
    let staged = batch
        .put(Cf::Episodes, episode.task_id.as_bytes(), &episode)
        .map(|_| ())
        .and_then(|()| {
            facts
                .iter()
                .try_for_each(|w| knowledge::stage(&mut batch, w))
        });
    if let Err(e) = staged {
        return ArchiveReply::Failed {
            message: e.to_string(),
        };
    }
    // Keyed by task id (and the facts by task id and rule), so a repeated archive
    // overwrites rather than duplicates. Not synced here: the task's `succeeded`
    // commit that follows syncs the shared WAL.
    match ctx.store.write_unsynced(batch) {
        Ok(()) => {
            if !facts.is_empty()
                && let Some(k) = ctx.knowledge()
            {
                k.wake_publisher();
            }
            ArchiveReply::Archived
        }
        Err(e) => ArchiveReply::Failed {
            message: e.to_string(),
        },
    }
}

/// The facts the playbook's `[[remember]]` rules yield from this verified run. A rule
/// whose rendering fails (a missing field, a topic that is not one) is skipped with a
/// warning: what was learned otherwise still counts.
fn lessons(
    ctx: &NodeContext,
    playbook: &Playbook,
    persona: &Value,
    req: &ArchiveRequest,
) -> Vec<KnowledgeWrite> {
    if playbook.remember.is_empty() {
        return Vec::new();
    }
    let input = req.input.to_value_lossy();
    let task = json!({"id": req.task_id, "playbook": req.playbook});
    let steps: Map<String, Value> = req
        .steps
        .iter()
        .map(|s| (s.id.clone(), json!({"output": s.output.to_value_lossy()})))
        .collect();
    let steps = Value::Object(steps);
    let scope: &[(&str, &Value)] = &[
        ("input", &input),
        ("task", &task),
        ("persona", persona),
        ("steps", &steps),
    ];
    let mut out = Vec::new();
    for (i, rule) in playbook.remember.iter().enumerate() {
        let rendered = (|| -> Result<FactProposal, String> {
            let text_of = |template: &str| -> Result<String, String> {
                match template::render(&Value::String(template.to_string()), scope)
                    .map_err(|e| e.to_string())?
                {
                    Value::String(s) => Ok(s),
                    other => Ok(other.to_string()),
                }
            };
            let proposal = FactProposal {
                topic: text_of(&rule.topic)?,
                kind: rule.kind,
                text: text_of(&rule.text)?,
                value: template::render(&rule.value, scope).map_err(|e| e.to_string())?,
                confidence: rule.confidence,
                sources: vec![req.task_id.clone()],
            };
            knowledge::check_proposal(&proposal).map_err(|e| e.message)?;
            Ok(proposal)
        })();
        match rendered {
            Ok(fact) => out.push(KnowledgeWrite {
                id: format!("{}-r{}", req.task_id, i + 1),
                author: Author {
                    actor: super::ARCHIVIST.into(),
                    task_id: Some(req.task_id.clone()),
                    step_id: None,
                },
                made_at_ms: ctx.now_ms(),
                reason: format!("playbook `{}` remember #{}", req.playbook, i + 1),
                op: WriteOp::Fact(fact),
            }),
            Err(problem) => tracing::warn!(
                task_id = %req.task_id,
                playbook = %req.playbook,
                rule = i + 1,
                %problem,
                "remember rule skipped"
            ),
        }
    }
    out
}
