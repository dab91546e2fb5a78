//! Governor: the node's governance. For now, the kill switch (`cadre.control.killswitch`);
//! policies, approvals and budgets join it with the rest of the governance issue.
//!
//! The kill switch is cluster-wide state: it lives in the JetStream KV bucket
//! `CADRE_CONTROL` (file storage), so it survives restarts and a node that starts later
//! reads it before it dispatches anything. Any node answers a request (queue group
//! `cadre-control`), writes the bucket and records the decision in its audit log; every
//! node watches the key and applies what it sees. Engaged: TaskActors hold their steps
//! back and executors refuse new calls and abort running ones. Released: held steps are
//! sent.

use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use storage::Batch;
use tokio::task::JoinHandle;

use crate::bus::{self, Inbound};
use crate::context::NodeContext;
use crate::protocol::{
    AuditRecord, ErrorCode, ErrorReply, KillSwitchRequest, KillSwitchState, subject,
};
use crate::roles::intake::parse_json;

#[derive(Clone, Copy)]
pub struct Governor;

pub struct GovernorArgs {
    pub ctx: Arc<NodeContext>,
}

pub struct GovernorState {
    ctx: Arc<NodeContext>,
    bucket: kv::Store,
    tasks: Vec<JoinHandle<()>>,
}

pub enum GovernorMsg {
    Request(Inbound),
    /// The bucket's kill switch changed (or was read at start).
    Observed(KillSwitchState),
}

impl Actor for Governor {
    type Msg = GovernorMsg;
    type State = GovernorState;
    type Arguments = GovernorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<GovernorMsg>,
        args: GovernorArgs,
    ) -> Result<GovernorState, ActorProcessingErr> {
        let ctx = args.ctx;
        let bucket = ensure_control_bucket(&jetstream::new(ctx.nats.clone())).await?;
        // Apply what is stored before any task can dispatch (the task supervisor
        // starts after the governor).
        let current = read_state(&bucket).await?;
        ctx.set_killswitch(current.engaged);
        if current.engaged {
            tracing::warn!(by = ?current.by, reason = ?current.reason, "kill switch engaged: nothing is dispatched");
        }
        let mut watch = bucket.watch(subject::KILLSWITCH_KEY).await?;
        let me = myself.clone();
        let watcher = tokio::spawn(async move {
            while let Some(entry) = watch.next().await {
                let Ok(entry) = entry else { continue };
                let state = decode(&entry.value, entry.revision);
                if me.cast(GovernorMsg::Observed(state)).is_err() {
                    return;
                }
            }
        });
        let sub = ctx
            .nats
            .queue_subscribe(subject::CONTROL_KILLSWITCH, subject::QUEUE_CONTROL.into())
            .await?;
        let pump = bus::spawn_pump(
            sub,
            myself,
            ctx.settings.mailbox_depth_max,
            GovernorMsg::Request,
        );
        Ok(GovernorState {
            ctx,
            bucket,
            tasks: vec![watcher, pump],
        })
    }

    async fn handle(
        &self,
        _: ActorRef<GovernorMsg>,
        msg: GovernorMsg,
        state: &mut GovernorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GovernorMsg::Observed(ks) => apply(&state.ctx, &ks),
            GovernorMsg::Request(inbound) => {
                let result = state.killswitch(&inbound).await;
                state
                    .ctx
                    .respond(subject::CONTROL_KILLSWITCH, inbound.msg.reply, result)
                    .await;
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<GovernorMsg>,
        state: &mut GovernorState,
    ) -> Result<(), ActorProcessingErr> {
        for task in &state.tasks {
            task.abort();
        }
        Ok(())
    }
}

impl GovernorState {
    /// Reads, or sets and records, the kill switch.
    async fn killswitch(&mut self, inbound: &Inbound) -> Result<KillSwitchState, ErrorReply> {
        let ctx = &self.ctx;
        let payload: &[u8] = if inbound.msg.payload.is_empty() {
            b"{}"
        } else {
            &inbound.msg.payload
        };
        let req: KillSwitchRequest = parse_json(payload, ctx.settings.payload_bytes_max)?;
        let unavailable =
            |e: String| ErrorReply::new(ErrorCode::Unavailable, format!("control bucket: {e}"));
        let Some(engaged) = req.engaged else {
            return read_state(&self.bucket)
                .await
                .map_err(|e| unavailable(e.to_string()));
        };
        let mut ks = KillSwitchState {
            engaged,
            by: req.by.clone(),
            reason: req.reason.clone(),
            at_ms: ctx.now_ms(),
            node_id: Some(ctx.settings.node_id.clone()),
            revision: 0,
        };
        let bytes = serde_json::to_vec(&ks)
            .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))?;
        ks.revision = self
            .bucket
            .put(subject::KILLSWITCH_KEY, Bytes::from(bytes))
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        // This node applies it now; the others (and this one again) through the watch.
        apply(ctx, &ks);
        let mut batch = Batch::new();
        batch
            .append_audit(&record(ctx, &ks), None)
            .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))?;
        ctx.store.commit(batch).await.map_err(|e| {
            ErrorReply::new(
                ErrorCode::Internal,
                format!("the kill switch is set but its audit record failed: {e}"),
            )
        })?;
        Ok(ks)
    }
}

fn apply(ctx: &NodeContext, ks: &KillSwitchState) {
    if ctx.killswitch_engaged() != ks.engaged {
        tracing::warn!(engaged = ks.engaged, by = ?ks.by, reason = ?ks.reason, "kill switch");
    }
    ctx.set_killswitch(ks.engaged);
}

fn record(ctx: &NodeContext, ks: &KillSwitchState) -> AuditRecord {
    AuditRecord {
        at_ms: ks.at_ms,
        node_id: ctx.settings.node_id.clone(),
        actor: "operator".into(),
        operator: ks.by.clone(),
        action: if ks.engaged {
            "killswitch_on"
        } else {
            "killswitch_off"
        }
        .into(),
        task_id: None,
        step_id: None,
        attempt: None,
        plan: None,
        tool: None,
        args_hash: None,
        params: None,
        input_ref: None,
        outcome: if ks.engaged { "engaged" } else { "released" }.into(),
        detail: ks.reason.as_deref().map(crate::redact::text),
        duration_ms: None,
        cost_usd: None,
    }
}

/// The stored state; an absent or unreadable value is "released" (an unreadable one is
/// logged: the bucket is Cadre's own, so it means a bug or a hand edit).
async fn read_state(bucket: &kv::Store) -> Result<KillSwitchState, ActorProcessingErr> {
    Ok(match bucket.entry(subject::KILLSWITCH_KEY).await? {
        Some(entry) => decode(&entry.value, entry.revision),
        None => KillSwitchState::default(),
    })
}

fn decode(value: &[u8], revision: u64) -> KillSwitchState {
    if value.is_empty() {
        // A deleted or purged key.
        return KillSwitchState {
            revision,
            ..KillSwitchState::default()
        };
    }
    match serde_json::from_slice::<KillSwitchState>(value) {
        Ok(mut ks) => {
            ks.revision = revision;
            ks
        }
        Err(e) => {
            tracing::error!(error = %e, "unreadable kill switch in the control bucket; treating it as engaged");
            KillSwitchState {
                engaged: true,
                reason: Some(format!("unreadable state in the control bucket: {e}")),
                revision,
                ..KillSwitchState::default()
            }
        }
    }
}

/// Declares the control bucket (file storage, a short history of decisions).
pub async fn ensure_control_bucket(
    js: &jetstream::Context,
) -> Result<kv::Store, ActorProcessingErr> {
    match js.get_key_value(subject::CONTROL_BUCKET).await {
        Ok(bucket) => Ok(bucket),
        Err(_) => Ok(js
            .create_key_value(kv::Config {
                bucket: subject::CONTROL_BUCKET.into(),
                description: "Cadre's cluster-wide control state (kill switch)".into(),
                history: 16,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await?),
    }
}
