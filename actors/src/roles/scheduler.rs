//! Scheduler: recurring tasks from cron schedules, once across a cluster.
//!
//! Schedules live in the `CADRE_SCHEDULES` bucket (a playbook's `[schedule]` section is
//! registered there at start; `cadre.schedules.*` adds, pauses, resumes and removes).
//! Every node runs a Scheduler; only the one holding the bucket's `_lease` fires. A
//! firing is a publish on `cadre.tasks.enqueue` whose `Nats-Msg-Id` and idempotency key
//! name the schedule and the scheduled time, then a compare-and-set of the schedule's
//! `last_fire_ms`: a lease that changes hands mid-firing makes the same message again,
//! which JetStream and the intake drop. Firings missed while no node could fire follow
//! the schedule's `missed` policy, and the task's `accepted` event says so.

use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::bus::{self, Inbound};
use crate::context::NodeContext;
use crate::playbook::Catalog;
use crate::protocol::{
    ErrorCode, ErrorReply, Lease, ScheduleListReply, ScheduleRecord, ScheduleRef, ScheduleSpec,
    ScheduleSpecStored, ScheduleView, SubmitRequest, subject,
};
use crate::roles::intake::parse_json;
use crate::schedule::{Cron, Firing};

#[derive(Clone, Copy)]
pub struct Scheduler;

pub struct SchedulerArgs {
    pub ctx: Arc<NodeContext>,
    pub catalog: Arc<Catalog>,
}

pub struct SchedulerState {
    ctx: Arc<NodeContext>,
    catalog: Arc<Catalog>,
    kv: kv::Store,
    pumps: Vec<JoinHandle<()>>,
    ticker: JoinHandle<()>,
    /// The lease's revision while this node holds it.
    lease: Option<u64>,
}

pub enum SchedulerMsg {
    Request(Inbound),
    Tick,
}

/// How long the lease lives without renewal: another node fires after this.
const LEASE_TTL_MS: u64 = 10_000;

impl Actor for Scheduler {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = SchedulerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SchedulerMsg>,
        args: SchedulerArgs,
    ) -> Result<SchedulerState, ActorProcessingErr> {
        let ctx = args.ctx;
        let kv = bucket(&ctx.jetstream()).await?;
        register_playbook_schedules(&ctx, &args.catalog, &kv).await;
        let mut pumps = Vec::new();
        for s in [
            subject::SCHEDULES_LIST,
            subject::SCHEDULES_ADD,
            subject::SCHEDULES_PAUSE,
            subject::SCHEDULES_RESUME,
            subject::SCHEDULES_REMOVE,
        ] {
            let sub = ctx
                .nats
                .queue_subscribe(s, subject::QUEUE_SCHEDULES.into())
                .await?;
            pumps.push(bus::spawn_pump(
                sub,
                myself.clone(),
                ctx.settings.mailbox_depth_max,
                SchedulerMsg::Request,
            ));
        }
        let tick = ctx.settings.schedule_tick;
        let me = myself.clone();
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(tick);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                every.tick().await;
                if me.cast(SchedulerMsg::Tick).is_err() {
                    return;
                }
            }
        });
        Ok(SchedulerState {
            ctx,
            catalog: args.catalog,
            kv,
            pumps,
            ticker,
            lease: None,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<SchedulerMsg>,
        msg: SchedulerMsg,
        state: &mut SchedulerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SchedulerMsg::Tick => {
                if state.ctx.is_draining() {
                    return Ok(());
                }
                if state.hold_lease().await {
                    state.fire_due().await;
                }
            }
            SchedulerMsg::Request(inbound) => {
                let Inbound { msg, permit } = inbound;
                let subject = msg.subject.to_string();
                let reply = state.request(&subject, &msg.payload).await;
                match reply {
                    Ok(value) => bus::reply_json(&state.ctx.nats, msg.reply, &value).await,
                    Err(e) => {
                        state.ctx.metrics.rejected(&subject, e.error.code);
                        bus::reply_json(&state.ctx.nats, msg.reply, &e).await;
                    }
                }
                drop(permit);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<SchedulerMsg>,
        state: &mut SchedulerState,
    ) -> Result<(), ActorProcessingErr> {
        state.ticker.abort();
        for pump in &state.pumps {
            pump.abort();
        }
        Ok(())
    }
}

async fn bucket(js: &jetstream::Context) -> Result<kv::Store, ActorProcessingErr> {
    if let Ok(kv) = js.get_key_value(subject::SCHEDULES_BUCKET).await {
        return Ok(kv);
    }
    let config = kv::Config {
        bucket: subject::SCHEDULES_BUCKET.into(),
        description: "Cadre schedules and the scheduler's lease".into(),
        history: 1,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    match js.create_key_value(config).await {
        Ok(kv) => Ok(kv),
        // Another node created it first.
        Err(_) => Ok(js.get_key_value(subject::SCHEDULES_BUCKET).await?),
    }
}

/// A playbook's `[schedule]`, as a record: created if absent, its spec refreshed if the
/// playbook changed it (when it last fired is kept; an operator's pause stays).
async fn register_playbook_schedules(ctx: &NodeContext, catalog: &Catalog, kv: &kv::Store) {
    for name in catalog.names() {
        let Some(pb) = catalog.get(name) else {
            continue;
        };
        let Some(spec) = &pb.schedule else { continue };
        let now = ctx.now_ms();
        let stored = ScheduleSpecStored {
            name: pb.name.clone(),
            playbook: pb.name.clone(),
            cron: spec.cron.clone(),
            tz: spec.tz.clone(),
            input: spec.input.clone(),
            missed: spec.missed,
        };
        let result = match kv.entry(&pb.name).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                match serde_json::from_slice::<ScheduleRecord>(&entry.value) {
                    Ok(mut record) if record.spec != stored => {
                        record.spec = stored;
                        put(kv, &record, Some(entry.revision)).await
                    }
                    Ok(_) => Ok(()),
                    Err(e) => Err(format!("unreadable record: {e}")),
                }
            }
            _ => put(kv, &new_record(stored, "playbook", now), None).await,
        };
        if let Err(e) = result {
            tracing::warn!(schedule = %pb.name, error = %e, "playbook schedule not registered");
        }
    }
}

fn new_record(spec: ScheduleSpecStored, source: &str, now_ms: u64) -> ScheduleRecord {
    ScheduleRecord {
        spec,
        paused: false,
        source: source.into(),
        created_at_ms: now_ms,
        // Nothing is due from before the schedule existed.
        last_fire_ms: now_ms,
        fired: 0,
        skipped: 0,
        last_note: None,
    }
}

/// Writes `record`: created (`revision` None, failing if the name exists) or updated
/// over exactly `revision` (failing if anyone wrote since).
async fn put(kv: &kv::Store, record: &ScheduleRecord, revision: Option<u64>) -> Result<(), String> {
    let bytes = Bytes::from(serde_json::to_vec(record).map_err(|e| e.to_string())?);
    match revision {
        None => kv
            .create(&record.spec.name, bytes)
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        Some(r) => kv
            .update(&record.spec.name, bytes, r)
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
    }
}

impl SchedulerState {
    /// Takes or renews the lease; true while this node holds it.
    async fn hold_lease(&mut self) -> bool {
        let now = self.ctx.now_ms();
        let me = Lease {
            owner: self.ctx.settings.node_id.clone(),
            boot_id: self.ctx.boot_id,
            token: None,
            claimed_at_ms: now,
        };
        let Ok(bytes) = serde_json::to_vec(&me) else {
            return false;
        };
        let key = subject::SCHEDULER_LEASE_KEY;
        let entry = match self.kv.entry(key).await {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(error = %e, "scheduler lease unreadable");
                self.lease = None;
                return false;
            }
        };
        let current = entry.as_ref().and_then(|e| {
            (e.operation == kv::Operation::Put)
                .then(|| serde_json::from_slice::<Lease>(&e.value).ok())
                .flatten()
                .map(|l| (l, e.revision))
        });
        let result: Result<u64, String> = match current {
            None => match &entry {
                // Deleted or purged: take it over that revision.
                Some(e) => self
                    .kv
                    .update(key, bytes.into(), e.revision)
                    .await
                    .map_err(|e| e.to_string()),
                None => self
                    .kv
                    .create(key, bytes.into())
                    .await
                    .map_err(|e| e.to_string()),
            },
            Some((lease, revision)) => {
                let mine = lease.owner == me.owner && lease.boot_id == me.boot_id;
                let expired = now.saturating_sub(lease.claimed_at_ms) > LEASE_TTL_MS;
                if !mine && !expired {
                    self.lease = None;
                    return false;
                }
                self.kv
                    .update(key, bytes.into(), revision)
                    .await
                    .map_err(|e| e.to_string())
            }
        };
        match result {
            Ok(revision) => {
                if self.lease.is_none() {
                    tracing::info!("this node fires the schedules now");
                }
                self.lease = Some(revision);
                true
            }
            Err(_) => {
                self.lease = None;
                false
            }
        }
    }

    async fn fire_due(&mut self) {
        let Ok(mut keys) = self.kv.keys().await else {
            return;
        };
        let mut names = Vec::new();
        while let Some(Ok(k)) = keys.next().await {
            if k != subject::SCHEDULER_LEASE_KEY {
                names.push(k);
            }
        }
        for name in names {
            if let Err(e) = self.fire_one(&name).await {
                tracing::warn!(schedule = %name, error = %e, "schedule not fired");
            }
        }
    }

    async fn fire_one(&mut self, name: &str) -> Result<(), String> {
        let Some(entry) = self.kv.entry(name).await.map_err(|e| e.to_string())? else {
            return Ok(());
        };
        if entry.operation != kv::Operation::Put {
            return Ok(());
        }
        let mut record: ScheduleRecord =
            serde_json::from_slice(&entry.value).map_err(|e| format!("unreadable: {e}"))?;
        if record.paused {
            return Ok(());
        }
        let cron = Cron::parse(&record.spec.cron, &record.spec.tz)?;
        let now = self.ctx.now_ms();
        let grace = self.ctx.settings.schedule_grace.as_millis() as u64;
        let metrics = &self.ctx.metrics;
        match crate::schedule::decide(&cron, record.last_fire_ms, now, grace, record.spec.missed) {
            Firing::Nothing => return Ok(()),
            Firing::Fire { at, missed, first } => {
                let reason = if missed == 0 {
                    format!(
                        "schedule `{name}` ({} {}) fired for {}",
                        record.spec.cron,
                        tz_name(&record.spec.tz),
                        cron.show(at)
                    )
                } else {
                    format!(
                        "schedule `{name}` ({} {}) fired once for {} to catch up: {missed} earlier firings since {} were missed (catch_up_once)",
                        record.spec.cron,
                        tz_name(&record.spec.tz),
                        cron.show(at),
                        cron.show(first)
                    )
                };
                self.enqueue(&record, at, &reason).await?;
                record.fired += 1;
                record.skipped += missed as u64;
                record.last_fire_ms = at;
                record.last_note = Some(reason);
                metrics
                    .schedule_firings_total
                    .with_label_values(&[if missed == 0 { "fired" } else { "caught_up" }])
                    .inc();
                if missed > 0 {
                    metrics
                        .schedule_firings_total
                        .with_label_values(&["skipped"])
                        .inc_by(missed as u64);
                }
            }
            Firing::Skip {
                latest,
                missed,
                first,
            } => {
                let note = format!(
                    "skipped {missed} missed firings from {} to {} (skip)",
                    cron.show(first),
                    cron.show(latest)
                );
                tracing::info!(schedule = %name, %note, "missed firings skipped");
                record.skipped += missed as u64;
                record.last_fire_ms = latest;
                record.last_note = Some(note);
                metrics
                    .schedule_firings_total
                    .with_label_values(&["skipped"])
                    .inc_by(missed as u64);
            }
        }
        // Lost to a concurrent write (an operator's pause, another node): the next tick
        // reads it again; a firing made twice is dropped by its message id.
        put(&self.kv, &record, Some(entry.revision)).await
    }

    /// The firing as a durable submission: its message id and idempotency key name the
    /// schedule and the time, so the same firing is one task however often it is sent.
    async fn enqueue(
        &self,
        record: &ScheduleRecord,
        at_ms: u64,
        reason: &str,
    ) -> Result<(), String> {
        let key = format!("schedule-{}-{at_ms}", record.spec.name);
        let req = SubmitRequest {
            playbook: Some(record.spec.playbook.clone()),
            goal: None,
            input: record.spec.input.clone(),
            idempotency_key: Some(key.clone()),
            run_at: None,
            run_after: None,
            reason: Some(reason.to_string()),
            priority: None,
        };
        let body = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", key.as_str());
        let ack = self
            .ctx
            .jetstream()
            .publish_with_headers(subject::TASKS_ENQUEUE, headers, Bytes::from(body))
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map_err(|e| e.to_string())?;
        Ok(())
    }

    async fn request(&mut self, subject: &str, payload: &[u8]) -> Result<Value, ErrorReply> {
        let max = self.ctx.settings.payload_bytes_max;
        let store_err =
            |e: String| ErrorReply::new(ErrorCode::Unavailable, format!("schedules: {e}"));
        match subject {
            subject::SCHEDULES_LIST => {
                let mut schedules = Vec::new();
                let mut keys = self.kv.keys().await.map_err(|e| store_err(e.to_string()))?;
                let mut names = Vec::new();
                while let Some(Ok(k)) = keys.next().await {
                    names.push(k);
                }
                names.sort();
                let mut fired_by = None;
                for name in names {
                    let Ok(Some(entry)) = self.kv.entry(&name).await else {
                        continue;
                    };
                    if entry.operation != kv::Operation::Put {
                        continue;
                    }
                    if name == subject::SCHEDULER_LEASE_KEY {
                        fired_by = serde_json::from_slice::<Lease>(&entry.value)
                            .ok()
                            .map(|l| l.owner);
                        continue;
                    }
                    let Ok(record) = serde_json::from_slice::<ScheduleRecord>(&entry.value) else {
                        continue;
                    };
                    let cron = Cron::parse(&record.spec.cron, &record.spec.tz).ok();
                    let next = cron
                        .as_ref()
                        .filter(|_| !record.paused)
                        .and_then(|c| c.next(record.last_fire_ms.max(self.ctx.now_ms())));
                    schedules.push(ScheduleView {
                        next_fire: next.zip(cron.as_ref()).map(|(t, c)| c.show(t)),
                        next_fire_ms: next,
                        record,
                    });
                }
                let reply = ScheduleListReply {
                    schedules,
                    fired_by,
                };
                serde_json::to_value(reply).map_err(|e| store_err(e.to_string()))
            }
            subject::SCHEDULES_ADD => {
                let spec: ScheduleSpec = parse_json(payload, max)?;
                let invalid = |m: String| ErrorReply::new(ErrorCode::InvalidRequest, m);
                if !subject::is_token(&spec.name) || spec.name.starts_with('_') {
                    return Err(invalid(format!(
                        "name `{}` must be letters, digits, `-` or `_` (not starting with `_`)",
                        spec.name
                    )));
                }
                let Some(pb) = self.catalog.get(&spec.playbook) else {
                    return Err(ErrorReply::new(
                        ErrorCode::UnknownPlaybook,
                        format!("no playbook named `{}`", spec.playbook),
                    ));
                };
                Cron::parse(&spec.cron, &spec.tz).map_err(invalid)?;
                pb.plan("validation", &spec.input, self.catalog.persona())
                    .map_err(|e| ErrorReply::new(ErrorCode::InvalidInput, e.to_string()))?;
                let stored = ScheduleSpecStored {
                    name: spec.name.clone(),
                    playbook: spec.playbook,
                    cron: spec.cron,
                    tz: spec.tz,
                    input: spec.input,
                    missed: spec.missed,
                };
                let now = self.ctx.now_ms();
                let record = match self.read(&spec.name).await? {
                    Some((mut old, revision)) => {
                        old.spec = stored;
                        put(&self.kv, &old, Some(revision))
                            .await
                            .map_err(store_err)?;
                        old
                    }
                    None => {
                        let record = new_record(stored, "operator", now);
                        put(&self.kv, &record, None).await.map_err(store_err)?;
                        record
                    }
                };
                serde_json::to_value(record).map_err(|e| store_err(e.to_string()))
            }
            subject::SCHEDULES_PAUSE | subject::SCHEDULES_RESUME => {
                let r: ScheduleRef = parse_json(payload, max)?;
                let Some((mut record, revision)) = self.read(&r.name).await? else {
                    return Err(not_found(&r.name));
                };
                record.paused = subject == subject::SCHEDULES_PAUSE;
                if !record.paused {
                    // Resumed: what fell due while paused was not missed, it was declined.
                    record.last_fire_ms = record.last_fire_ms.max(self.ctx.now_ms());
                }
                put(&self.kv, &record, Some(revision))
                    .await
                    .map_err(store_err)?;
                serde_json::to_value(record).map_err(|e| store_err(e.to_string()))
            }
            subject::SCHEDULES_REMOVE => {
                let r: ScheduleRef = parse_json(payload, max)?;
                let Some((record, _)) = self.read(&r.name).await? else {
                    return Err(not_found(&r.name));
                };
                self.kv
                    .delete(&r.name)
                    .await
                    .map_err(|e| store_err(e.to_string()))?;
                serde_json::to_value(record).map_err(|e| store_err(e.to_string()))
            }
            other => Err(ErrorReply::new(
                ErrorCode::InvalidRequest,
                format!("no such subject `{other}`"),
            )),
        }
    }

    async fn read(&self, name: &str) -> Result<Option<(ScheduleRecord, u64)>, ErrorReply> {
        if !subject::is_token(name) || name.starts_with('_') {
            return Err(ErrorReply::new(
                ErrorCode::InvalidRequest,
                format!("`{name}` is not a schedule name"),
            ));
        }
        let entry = self
            .kv
            .entry(name)
            .await
            .map_err(|e| ErrorReply::new(ErrorCode::Unavailable, format!("schedules: {e}")))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| {
                serde_json::from_slice::<ScheduleRecord>(&e.value)
                    .ok()
                    .map(|r| (r, e.revision))
            }))
    }
}

fn not_found(name: &str) -> ErrorReply {
    ErrorReply::new(ErrorCode::NotFound, format!("no schedule named `{name}`"))
}

fn tz_name(tz: &str) -> &str {
    if tz.is_empty() { "UTC" } else { tz }
}
