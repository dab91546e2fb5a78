//! Governor: the node's governance actor: the kill switch (`cadre.control.killswitch`)
//! and the hot reload of the policies directory. (The per-step gate itself runs inside
//! each TaskActor's transition: `crate::governance`.)
//!
//! Policies: the directory is checked every `policy_reload` for a change of its
//! `*.cedar` files (name, size, mtime). A change that validates is put in force for
//! every decision after it and audited (`policies_reloaded`, with the new version); one
//! that does not is refused, logged with every error's line, audited
//! (`policies_rejected`) and counted, and the policies in force stay.
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
    AuditRecord, ClusterPolicies, ErrorCode, ErrorReply, KillSwitchRequest, KillSwitchState,
    PoliciesRequest, subject,
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
    /// What the policies directory looked like when last read.
    policy_files: Option<Vec<(String, u64, std::time::SystemTime)>>,
    /// A policy set was published to the cluster: it, not the directory, is in force.
    cluster_policies: bool,
}

pub enum GovernorMsg {
    Request(Inbound),
    /// The bucket's kill switch changed (or was read at start).
    Observed(KillSwitchState),
    /// Time to look at the policies directory.
    PolicyTick,
    /// `cadre.control.policies`.
    PoliciesRequest(Inbound),
    /// The bucket's policy set changed (or was read at start).
    PoliciesObserved(ClusterPolicies),
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
        let bucket = ensure_control_bucket(&ctx.jetstream()).await?;
        // Apply what is stored before any task can dispatch (the task supervisor
        // starts after the governor).
        let current = read_state(&bucket).await?;
        ctx.set_killswitch(current.engaged);
        if current.engaged {
            tracing::warn!(by = ?current.by, reason = ?current.reason, "kill switch engaged: nothing is dispatched");
        }
        let mut watch = bucket
            .watch_many([subject::KILLSWITCH_KEY, subject::POLICIES_KEY])
            .await?;
        let me = myself.clone();
        let watcher = tokio::spawn(async move {
            while let Some(entry) = watch.next().await {
                let Ok(entry) = entry else { continue };
                let msg = if entry.key == subject::POLICIES_KEY {
                    match serde_json::from_slice::<ClusterPolicies>(&entry.value) {
                        Ok(mut set) => {
                            set.revision = entry.revision;
                            GovernorMsg::PoliciesObserved(set)
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "unreadable policy set in the control bucket");
                            continue;
                        }
                    }
                } else {
                    GovernorMsg::Observed(decode(&entry.value, entry.revision))
                };
                if me.cast(msg).is_err() {
                    return;
                }
            }
        });
        // The cluster's policy set, if one was published, before any task dispatches
        // (a node that was away catches up here).
        let published = match bucket.get(subject::POLICIES_KEY).await? {
            Some(value) => serde_json::from_slice::<ClusterPolicies>(&value).ok(),
            None => None,
        };
        let sub = ctx
            .nats
            .queue_subscribe(subject::CONTROL_KILLSWITCH, subject::QUEUE_CONTROL.into())
            .await?;
        let pump = bus::spawn_pump(
            sub,
            myself.clone(),
            ctx.settings.mailbox_depth_max,
            GovernorMsg::Request,
        );
        let policies_pump = bus::spawn_pump(
            ctx.nats
                .queue_subscribe(subject::CONTROL_POLICIES, subject::QUEUE_CONTROL.into())
                .await?,
            myself.clone(),
            ctx.settings.mailbox_depth_max,
            GovernorMsg::PoliciesRequest,
        );
        let mut tasks = vec![watcher, pump, policies_pump];
        if ctx.settings.policies_dir.is_some() {
            let me = myself.clone();
            let every = ctx.settings.policy_reload;
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if me.cast(GovernorMsg::PolicyTick).is_err() {
                        return;
                    }
                }
            }));
        }
        let mut state = GovernorState {
            ctx,
            bucket,
            tasks,
            // Read at the first tick: a change made while the node started is not
            // missed (an unchanged directory gives the version in force: no reload).
            policy_files: None,
            cluster_policies: false,
        };
        if let Some(set) = published {
            state.apply_cluster_policies(&set).await?;
        }
        Ok(state)
    }

    async fn handle(
        &self,
        _: ActorRef<GovernorMsg>,
        msg: GovernorMsg,
        state: &mut GovernorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GovernorMsg::Observed(ks) => apply(&state.ctx, &ks),
            GovernorMsg::PolicyTick if !state.cluster_policies => state.reload_policies().await?,
            GovernorMsg::PolicyTick => {}
            GovernorMsg::PoliciesObserved(set) => state.apply_cluster_policies(&set).await?,
            GovernorMsg::PoliciesRequest(inbound) => {
                let result = state.publish_policies(&inbound).await;
                state
                    .ctx
                    .respond(subject::CONTROL_POLICIES, inbound.msg.reply, result)
                    .await;
            }
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
    /// Enforces the cluster's policy set, if it is not in force already, and records it.
    /// From then on the directory is no longer read.
    async fn apply_cluster_policies(
        &mut self,
        set: &ClusterPolicies,
    ) -> Result<(), ActorProcessingErr> {
        self.cluster_policies = true;
        let ctx = &self.ctx;
        let before = ctx.policies().version().to_string();
        if set.version == before {
            return Ok(());
        }
        let sources: Vec<(String, String)> = set.files.clone().into_iter().collect();
        let by = set.by.as_deref().unwrap_or("?");
        // Validated when published; a node of another version may still disagree.
        install(
            ctx,
            crate::policy::Policies::from_sources(&sources),
            &format!("published to the cluster by {by}"),
        )
        .await
    }

    /// Validates and publishes a policy set to the cluster, or reads the one published.
    async fn publish_policies(&mut self, inbound: &Inbound) -> Result<ClusterPolicies, ErrorReply> {
        let ctx = self.ctx.clone();
        let req: PoliciesRequest =
            parse_json(&inbound.msg.payload, ctx.settings.payload_bytes_max)?;
        let unavailable =
            |e: String| ErrorReply::new(ErrorCode::Unavailable, format!("control bucket: {e}"));
        let Some(files) = req.files else {
            let entry = self
                .bucket
                .entry(subject::POLICIES_KEY)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            return match entry {
                Some(entry) if !entry.value.is_empty() => {
                    let mut set: ClusterPolicies = serde_json::from_slice(&entry.value)
                        .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))?;
                    set.revision = entry.revision;
                    Ok(set)
                }
                _ => Err(ErrorReply::new(
                    ErrorCode::NotFound,
                    "no policy set was published to the cluster; each node reads its own",
                )),
            };
        };
        if files.is_empty() {
            return Err(ErrorReply::new(
                ErrorCode::InvalidRequest,
                "files is empty: publish at least one policy file",
            ));
        }
        let sources: Vec<(String, String)> = files.clone().into_iter().collect();
        let policies = crate::policy::Policies::from_sources(&sources).map_err(|errors| {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            ErrorReply::new(
                ErrorCode::InvalidRequest,
                format!("invalid policies, not published: {}", lines.join("; ")),
            )
        })?;
        let mut set = ClusterPolicies {
            version: policies.version().to_string(),
            files,
            by: req.by,
            at_ms: ctx.now_ms(),
            node_id: ctx.settings.node_id.clone(),
            revision: 0,
        };
        let bytes = serde_json::to_vec(&set)
            .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))?;
        set.revision = self
            .bucket
            .put(subject::POLICIES_KEY, Bytes::from(bytes))
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        // This node enforces it now; the others (and this one again) through the watch.
        self.apply_cluster_policies(&set)
            .await
            .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))?;
        Ok(set)
    }

    /// Re-reads the policies directory if its files changed.
    async fn reload_policies(&mut self) -> Result<(), ActorProcessingErr> {
        let Some(dir) = self.ctx.settings.policies_dir.clone() else {
            return Ok(());
        };
        let files = policy_files(&dir);
        if self.policy_files.as_ref() == Some(&files) {
            return Ok(());
        }
        self.policy_files = Some(files);
        let loaded = crate::policy::Policies::load_dir(&dir);
        if matches!(&loaded, Ok(p) if p.version() == self.ctx.policies().version()) {
            return Ok(());
        }
        install(&self.ctx, loaded, &format!("from {}", dir.display())).await
    }

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

/// Puts a loaded policy set in force, or keeps the one in force if it did not load;
/// either way logged, counted and audited (`policies_reloaded` / `policies_rejected`).
async fn install(
    ctx: &NodeContext,
    loaded: Result<crate::policy::Policies, Vec<crate::policy::PolicyError>>,
    source: &str,
) -> Result<(), ActorProcessingErr> {
    let before = ctx.policies().version().to_string();
    let (action, outcome, detail) = match loaded {
        Ok(policies) => {
            let version = policies.version().to_string();
            tracing::info!(from = %before, to = %version, policies = policies.len(), source, "policies in force");
            ctx.set_policies(policies);
            (
                "policies_reloaded",
                "ok",
                format!("{before} -> {version} ({source})"),
            )
        }
        Err(errors) => {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            tracing::error!(
                in_force = %before,
                source,
                "invalid policies, not loaded (the policies in force stay):\n  - {}",
                lines.join("\n  - ")
            );
            ("policies_rejected", "invalid", lines.join("; "))
        }
    };
    ctx.metrics
        .policy_reloads_total
        .with_label_values(&[outcome])
        .inc();
    let mut record = blank_record(ctx, action, outcome);
    record.detail = Some(detail);
    let mut batch = Batch::new();
    batch.append_audit(&record, None)?;
    ctx.store.commit(batch).await?;
    Ok(())
}

fn apply(ctx: &NodeContext, ks: &KillSwitchState) {
    if ctx.killswitch_engaged() != ks.engaged {
        tracing::warn!(engaged = ks.engaged, by = ?ks.by, reason = ?ks.reason, "kill switch");
    }
    ctx.set_killswitch(ks.engaged);
}

fn record(ctx: &NodeContext, ks: &KillSwitchState) -> AuditRecord {
    let mut r = blank_record(
        ctx,
        if ks.engaged {
            "killswitch_on"
        } else {
            "killswitch_off"
        },
        if ks.engaged { "engaged" } else { "released" },
    );
    r.at_ms = ks.at_ms;
    r.actor = "operator".into();
    r.operator = ks.by.clone();
    r.detail = ks.reason.as_deref().map(crate::redact::text);
    r
}

/// The governor's record of a node-wide action.
fn blank_record(ctx: &NodeContext, action: &str, outcome: &str) -> AuditRecord {
    AuditRecord::new(
        ctx.now_ms(),
        &ctx.settings.node_id,
        &ctx.from(crate::roles::GOVERNOR),
        action,
        outcome,
    )
}

/// Name, size and modification time of each `*.cedar` file in `dir`, sorted.
fn policy_files(dir: &std::path::Path) -> Vec<(String, u64, std::time::SystemTime)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "cedar"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            let modified = m.modified().ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                m.len(),
                modified,
            ))
        })
        .collect();
    files.sort();
    files
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
