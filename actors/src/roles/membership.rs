//! Membership: how the nodes of one NATS system know each other.
//!
//! Each node announces itself twice: as an instance of the NATS micro service `cadre`
//! (so `nats micro ls|info|stats cadre` lists the nodes, with their id, version, tools and
//! tags in the metadata), and by a heartbeat, its `NodeStatus` written every
//! `heartbeat` to its key in the JetStream KV bucket `CADRE_NODES`. The bucket is what
//! `cadre.cluster.status` answers from: it also remembers nodes that went away, with the
//! time they were last heard of, which a service ping cannot.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_nats::service::ServiceExt;
use bytes::Bytes;
use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;

use crate::bus::{self, Inbound};
use crate::context::NodeContext;
use crate::protocol::{
    ClusterStatusReply, ClusterStatusRequest, ErrorCode, ErrorReply, NodeStatus, subject,
};
use crate::roles::intake::parse_json;

/// A node not heard of for this many heartbeats is reported as gone.
const MISSED_HEARTBEATS: u64 = 3;

#[derive(Clone, Copy)]
pub struct Membership;

pub struct MembershipArgs {
    pub ctx: Arc<NodeContext>,
    /// The tools this node's executor serves.
    pub tools: Vec<String>,
}

pub struct MembershipState {
    ctx: Arc<NodeContext>,
    bucket: kv::Store,
    tools: Vec<String>,
    started_at_ms: u64,
    /// The micro service instance; stopped with the actor.
    service: Option<async_nats::service::Service>,
    tasks: Vec<JoinHandle<()>>,
}

pub enum MembershipMsg {
    Heartbeat,
    Status(Inbound),
}

impl Actor for Membership {
    type Msg = MembershipMsg;
    type State = MembershipState;
    type Arguments = MembershipArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<MembershipMsg>,
        args: MembershipArgs,
    ) -> Result<MembershipState, ActorProcessingErr> {
        let ctx = args.ctx;
        let bucket = ensure_nodes_bucket(&ctx.jetstream()).await?;
        let settings = &ctx.settings;
        let metadata = HashMap::from([
            ("node_id".to_string(), settings.node_id.clone()),
            ("tools".to_string(), args.tools.join(",")),
            ("tags".to_string(), tags_text(&settings.tags)),
        ]);
        let service = ctx
            .nats
            .service_builder()
            .description(format!("Cadre node {}", settings.node_id))
            .metadata(metadata)
            .start(subject::SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await?;
        // One endpoint per node, so `nats micro info cadre` shows where each instance
        // answers; it serves the node's own status.
        let mut endpoint = service
            .endpoint(subject::node_status(&settings.node_id))
            .await?;
        let status_ctx = ctx.clone();
        let tools = args.tools.clone();
        let started_at_ms = ctx.now_ms();
        let endpoint_task = tokio::spawn(async move {
            while let Some(request) = endpoint.next().await {
                let status = node_status(&status_ctx, &tools, started_at_ms);
                let body = serde_json::to_vec(&status).unwrap_or_default();
                let _ = request.respond(Ok(Bytes::from(body))).await;
            }
        });
        let me = myself.clone();
        let every = settings.heartbeat;
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if me.cast(MembershipMsg::Heartbeat).is_err() {
                    return;
                }
            }
        });
        let pump = bus::spawn_pump(
            ctx.nats
                .queue_subscribe(subject::CLUSTER_STATUS, subject::QUEUE_TASKS.into())
                .await?,
            myself,
            settings.mailbox_depth_max,
            MembershipMsg::Status,
        );
        Ok(MembershipState {
            ctx,
            bucket,
            tools: args.tools,
            started_at_ms,
            service: Some(service),
            tasks: vec![endpoint_task, ticker, pump],
        })
    }

    async fn handle(
        &self,
        _: ActorRef<MembershipMsg>,
        msg: MembershipMsg,
        state: &mut MembershipState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            MembershipMsg::Heartbeat => {
                let status = node_status(&state.ctx, &state.tools, state.started_at_ms);
                let body = serde_json::to_vec(&status)?;
                // A missed heartbeat (JetStream briefly away) is retried by the next one.
                if let Err(e) = state
                    .bucket
                    .put(&state.ctx.settings.node_id, Bytes::from(body))
                    .await
                {
                    tracing::warn!(error = %e, "heartbeat not written");
                }
            }
            MembershipMsg::Status(inbound) => {
                let ctx = &state.ctx;
                let payload: &[u8] = if inbound.msg.payload.is_empty() {
                    b"{}"
                } else {
                    &inbound.msg.payload
                };
                let reply = match parse_json::<ClusterStatusRequest>(
                    payload,
                    ctx.settings.payload_bytes_max,
                ) {
                    Ok(_) => cluster_status(ctx, &state.bucket).await,
                    Err(e) => Err(e),
                };
                ctx.respond(subject::CLUSTER_STATUS, inbound.msg.reply, reply)
                    .await;
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<MembershipMsg>,
        state: &mut MembershipState,
    ) -> Result<(), ActorProcessingErr> {
        for task in &state.tasks {
            task.abort();
        }
        if let Some(service) = state.service.take() {
            let _ = service.stop().await;
        }
        Ok(())
    }
}

/// This node, now.
fn node_status(ctx: &NodeContext, tools: &[String], started_at_ms: u64) -> NodeStatus {
    let metrics = &ctx.metrics;
    let steps_in_flight = tools
        .iter()
        .map(|t| metrics.steps_in_flight.with_label_values(&[t]).get())
        .sum();
    NodeStatus {
        node_id: ctx.settings.node_id.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        tags: ctx.settings.tags.clone(),
        tools: tools.to_vec(),
        started_at_ms,
        heartbeat_at_ms: ctx.now_ms(),
        tasks_in_flight: metrics.tasks_in_flight.get(),
        steps_in_flight,
        approvals_pending: metrics.approvals_pending.get(),
        killswitch_engaged: ctx.killswitch_engaged(),
        tasks_held: metrics.tasks_held.get(),
        policy_version: ctx.policies().version().to_string(),
        alive: true,
    }
}

/// The nodes heard of recently, this one included.
pub async fn alive_nodes(ctx: &NodeContext) -> Result<Vec<String>, ErrorReply> {
    let bucket = ctx
        .jetstream()
        .get_key_value(subject::NODES_BUCKET)
        .await
        .map_err(|e| ErrorReply::new(ErrorCode::Unavailable, format!("nodes bucket: {e}")))?;
    let status = cluster_status(ctx, &bucket).await?;
    Ok(status
        .nodes
        .into_iter()
        .filter(|n| n.alive)
        .map(|n| n.node_id)
        .collect())
}

/// Every node the bucket knows, with whether it was heard of recently.
async fn cluster_status(
    ctx: &NodeContext,
    bucket: &kv::Store,
) -> Result<ClusterStatusReply, ErrorReply> {
    let unavailable =
        |e: String| ErrorReply::new(ErrorCode::Unavailable, format!("nodes bucket: {e}"));
    let mut keys = bucket
        .keys()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let now = ctx.now_ms();
    let stale_after = ctx.settings.heartbeat.as_millis() as u64 * MISSED_HEARTBEATS;
    let mut nodes = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| unavailable(e.to_string()))?;
        let Some(value) = bucket
            .get(&key)
            .await
            .map_err(|e| unavailable(e.to_string()))?
        else {
            continue;
        };
        let Ok(mut status) = serde_json::from_slice::<NodeStatus>(&value) else {
            tracing::warn!(node = %key, "unreadable heartbeat in the nodes bucket");
            continue;
        };
        status.alive = now.saturating_sub(status.heartbeat_at_ms) <= stale_after;
        nodes.push(status);
    }
    nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    Ok(ClusterStatusReply {
        answered_by: ctx.settings.node_id.clone(),
        at_ms: now,
        nodes,
    })
}

fn tags_text(tags: &BTreeMap<String, String>) -> String {
    tags.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Declares the nodes bucket: one key per node, its latest heartbeat; a node gone for a
/// week is forgotten.
pub async fn ensure_nodes_bucket(js: &jetstream::Context) -> Result<kv::Store, ActorProcessingErr> {
    match js.get_key_value(subject::NODES_BUCKET).await {
        Ok(bucket) => Ok(bucket),
        Err(_) => Ok(js
            .create_key_value(kv::Config {
                bucket: subject::NODES_BUCKET.into(),
                description: "Cadre nodes: each node's latest heartbeat".into(),
                history: 1,
                max_age: Duration::from_secs(7 * 24 * 3600),
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await?),
    }
}
