//! Task ownership across nodes: leases with fencing tokens, replicated checkpoints, and
//! the cluster-wide ledger of `unsafe` effects. Only nodes started with `cluster = true`
//! have one (`NodeContext::ownership`); a single node keeps everything in its RocksDB.
//!
//! - **Lease**: key `<task id>` in the `CADRE_LEASES` bucket, written with a per-message
//!   TTL (`Nats-TTL`) and compare-and-set on the key's last revision. The revision of the
//!   write that claims it is the fencing token; renewals rewrite the entry (same owner,
//!   same token) before the TTL runs out. When an owner stops renewing, the server removes
//!   the entry at the TTL and leaves a `MaxAge` marker, which every node's watcher sees:
//!   the first node to write over that marker owns the task from then on. The server's
//!   clock alone decides expiry, so the laptop's and the VPS's clocks need not agree.
//! - **Stale owner**: an owner dispatches only until `sent + TTL - margin` of its last
//!   successful renewal (its own monotonic clock; the server's TTL started later), and a
//!   renewal that finds another revision has lost the task. Its executors check the
//!   token against the bucket just before an effect: an old token is refused (`Fenced`).
//! - **Checkpoints**: after each local commit the owner publishes the task record to
//!   `cadre.checkpoint.<id>` (stream `CADRE_CHECKPOINTS`, one message per subject),
//!   expecting the subject's last sequence to be the one it last wrote or read: a stale
//!   owner's write is refused by the server, so the replicated record never goes back.
//! - **Unsafe effects**: a cluster-wide intent record (`CADRE_EFFECTS`, created only if
//!   absent) before an `unsafe` tool runs, so an attempt re-sent to another node after a
//!   takeover is reported as an unknown outcome instead of running twice.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, kv, stream};
use bytes::Bytes;

use crate::model::Task;
use crate::protocol::{Lease, subject};
use crate::roles::task::TaskMsg;

/// How long before the TTL an owner stops dispatching: covers the time a request spends
/// in flight to an executor.
const SAFETY_MARGIN_DIV: u32 = 5;
/// How long a `MaxAge` marker stays, so a node whose watcher reconnects still sees it.
const MARKER_TTL: Duration = Duration::from_secs(15 * 60);
/// How long a released lease's delete marker and a finished effect's record stay.
const BUCKET_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error("task is owned by {owner} (fencing token {token})")]
    HeldBy { owner: String, token: u64 },
    #[error("lease lost: another node claimed the task")]
    Lost,
    #[error("fenced: a newer owner wrote the task's checkpoint")]
    Fenced,
    #[error("cluster state unavailable: {0}")]
    Unavailable(String),
}

fn unavailable(e: impl std::fmt::Display) -> OwnershipError {
    OwnershipError::Unavailable(e.to_string())
}

/// A lease this node holds.
#[derive(Debug, Clone)]
struct Held {
    /// The entry's last revision (the next renewal's compare-and-set).
    revision: u64,
    token: u64,
    /// Dispatch only before this instant.
    valid_until: Instant,
    /// The checkpoint subject's last sequence as this owner knows it.
    checkpoint_seq: u64,
}

/// What a claim found and took.
#[derive(Debug)]
pub struct Claim {
    pub token: u64,
    /// Claimed now (false: this process already held it).
    pub fresh: bool,
    /// The replicated checkpoint, if any, and who wrote it.
    pub checkpoint: Option<(Task, String)>,
}

/// How one renewal went.
#[derive(Debug, PartialEq, Eq)]
pub enum Renewal {
    Renewed,
    Lost,
    /// NATS did not answer; tried again at the next tick.
    Unreachable,
}

pub struct Ownership {
    js: jetstream::Context,
    leases: kv::Store,
    effects: kv::Store,
    checkpoints: stream::Stream,
    node_id: String,
    boot_id: u64,
    pub ttl: Duration,
    held: Mutex<HashMap<String, Held>>,
    /// Tasks holding a dispatch back because their lease lapsed; sent on renewal.
    waiting: Mutex<HashMap<String, ractor::ActorRef<TaskMsg>>>,
    /// `$JS.<domain>.API.` before a `$KV.` subject, with a JetStream domain.
    kv_prefix: String,
}

impl Ownership {
    /// Opens (creating if needed) the buckets and the stream.
    pub async fn open(
        nats: async_nats::Client,
        js_domain: &str,
        node_id: String,
        boot_id: u64,
        ttl: Duration,
    ) -> Result<Ownership, OwnershipError> {
        let js = crate::bus::jetstream(nats, js_domain);
        // A key-value write in another domain goes through its API prefix, as
        // async-nats' own `kv::Store::put` does.
        let kv_prefix = if js_domain.is_empty() {
            String::new()
        } else {
            format!("$JS.{js_domain}.API.")
        };
        let leases = bucket(
            &js,
            kv::Config {
                bucket: subject::LEASES_BUCKET.into(),
                description: "task ownership: one lease per running task".into(),
                history: 1,
                max_age: BUCKET_MAX_AGE,
                limit_markers: Some(MARKER_TTL),
                storage: stream::StorageType::File,
                ..Default::default()
            },
        )
        .await?;
        let effects = bucket(
            &js,
            kv::Config {
                bucket: subject::EFFECTS_BUCKET.into(),
                description: "cluster-wide ledger of unsafe effects".into(),
                history: 1,
                max_age: BUCKET_MAX_AGE * 7,
                storage: stream::StorageType::File,
                ..Default::default()
            },
        )
        .await?;
        let checkpoints = js
            .get_or_create_stream(stream::Config {
                name: subject::CHECKPOINT_STREAM.into(),
                description: Some("the latest checkpoint of every task".into()),
                subjects: vec![subject::CHECKPOINTS_ALL.into()],
                max_messages_per_subject: 1,
                allow_direct: true,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        Ok(Ownership {
            js,
            leases,
            effects,
            checkpoints,
            node_id,
            boot_id,
            ttl,
            held: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
            kv_prefix,
        })
    }

    pub fn leases(&self) -> &kv::Store {
        &self.leases
    }

    /// Claims `task_id` for this node: over no entry, a released or expired one, or one
    /// this node's earlier process left. A lease another node holds is refused. Returns
    /// the new token and the replicated checkpoint. A lease this process already holds
    /// (the intake claimed it) is kept as it is.
    pub async fn claim(&self, task_id: &str, now_ms: u64) -> Result<Claim, OwnershipError> {
        if let Some(held) = self.held(task_id) {
            // What this process replicated, its local record already holds.
            return Ok(Claim {
                token: held.token,
                fresh: false,
                checkpoint: None,
            });
        }
        let expected = match self.leases.entry(task_id).await.map_err(unavailable)? {
            None => 0,
            Some(e) if e.operation != kv::Operation::Put => e.revision,
            Some(e) => {
                let lease: Lease = serde_json::from_slice(&e.value).map_err(unavailable)?;
                if lease.owner != self.node_id {
                    return Err(OwnershipError::HeldBy {
                        token: lease.token_at(e.revision),
                        owner: lease.owner,
                    });
                }
                e.revision
            }
        };
        let lease = Lease {
            owner: self.node_id.clone(),
            boot_id: self.boot_id,
            token: None,
            claimed_at_ms: now_ms,
        };
        let sent = Instant::now();
        let revision = match self.write_lease(task_id, &lease, expected).await {
            Ok(r) => r,
            Err(OwnershipError::Lost) => {
                // Another node got there first: name it. Or this node's own renewal, sent
                // before the task actor restarted and slow to land, moved the revision
                // after it was read: not owned elsewhere, so claim again shortly.
                let (owner, token) = self.owner_of(task_id).await?.unwrap_or_default();
                if owner == self.node_id {
                    return Err(unavailable(format!(
                        "this node's lease on {task_id} moved while claiming it"
                    )));
                }
                return Err(OwnershipError::HeldBy { owner, token });
            }
            Err(e) => return Err(e),
        };
        let checkpoint = self.load_checkpoint(task_id).await?;
        let checkpoint_seq = checkpoint.as_ref().map_or(0, |c| c.2);
        self.lock_held().insert(
            task_id.to_string(),
            Held {
                revision,
                token: revision,
                valid_until: sent + self.dispatch_window(),
                checkpoint_seq,
            },
        );
        Ok(Claim {
            token: revision,
            fresh: true,
            checkpoint: checkpoint.map(|(t, owner, _)| (t, owner)),
        })
    }

    /// Renews every lease held, concurrently.
    pub async fn renew_all(&self) -> Vec<(String, Renewal)> {
        let held: Vec<(String, Held)> = self
            .lock_held()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let renewals = held.into_iter().map(|(task_id, h)| async move {
            let lease = Lease {
                owner: self.node_id.clone(),
                boot_id: self.boot_id,
                token: Some(h.token),
                claimed_at_ms: 0,
            };
            let sent = Instant::now();
            let outcome = match self.write_lease(&task_id, &lease, h.revision).await {
                Ok(revision) => {
                    let mut held = self.lock_held();
                    if let Some(e) = held.get_mut(&task_id).filter(|e| e.token == h.token) {
                        e.revision = revision;
                        e.valid_until = sent + self.dispatch_window();
                    }
                    Renewal::Renewed
                }
                Err(OwnershipError::Lost) => {
                    let mut held = self.lock_held();
                    if held.get(&task_id).is_some_and(|e| e.token == h.token) {
                        held.remove(&task_id);
                    }
                    Renewal::Lost
                }
                Err(_) => Renewal::Unreachable,
            };
            (task_id, outcome)
        });
        futures::future::join_all(renewals).await
    }

    /// Gives the task up (it ended or parked): nobody takes a released task over.
    pub async fn release(&self, task_id: &str) {
        let Some(held) = self.lock_held().remove(task_id) else {
            return;
        };
        if let Err(e) = self
            .leases
            .delete_expect_revision(task_id, Some(held.revision))
            .await
        {
            // Left to expire: a node that takes it over finds the task over or parked.
            tracing::debug!(task_id, error = %e, "lease not released");
        }
    }

    /// Forgets a lease without touching the bucket (the task stood down).
    pub fn forget(&self, task_id: &str) {
        self.lock_held().remove(task_id);
        if let Ok(mut w) = self.waiting.lock() {
            w.remove(task_id);
        }
    }

    /// The token to dispatch under, while the lease is held and not lapsed.
    pub fn token(&self, task_id: &str) -> Option<u64> {
        self.held(task_id)
            .filter(|h| Instant::now() < h.valid_until)
            .map(|h| h.token)
    }

    pub fn held_count(&self) -> usize {
        self.lock_held().len()
    }

    /// Whether this process holds the task's lease (lapsed or not).
    pub fn holds(&self, task_id: &str) -> bool {
        self.held(task_id).is_some()
    }

    /// Records `task` as holding a dispatch back until its lease is renewed.
    pub fn wait_for_renewal(&self, task_id: &str, task: &ractor::ActorRef<TaskMsg>) {
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(task_id.to_string(), task.clone());
        }
    }

    /// The tasks waiting on `task_id`'s renewal (now renewed).
    pub fn take_waiting(&self, task_id: &str) -> Option<ractor::ActorRef<TaskMsg>> {
        self.waiting.lock().ok()?.remove(task_id)
    }

    /// Whether `token` is the task's current lease: asked by an executor just before an
    /// effect. `Err` names why not.
    pub async fn check_token(&self, task_id: &str, token: u64) -> Result<(), String> {
        match self.owner_of(task_id).await {
            Ok(Some((_, current))) if current == token => Ok(()),
            Ok(Some((owner, current))) => Err(format!(
                "stale fencing token {token}: the task is held by {owner} under {current}"
            )),
            Ok(None) => Err(format!(
                "stale fencing token {token}: the task's lease has expired or was released"
            )),
            Err(e) => Err(format!("cannot check the fencing token {token}: {e}")),
        }
    }

    /// The task's current owner and token, if its lease is live.
    pub async fn owner_of(&self, task_id: &str) -> Result<Option<(String, u64)>, OwnershipError> {
        match self.leases.entry(task_id).await.map_err(unavailable)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let lease: Lease = serde_json::from_slice(&e.value).map_err(unavailable)?;
                Ok(Some((lease.owner.clone(), lease.token_at(e.revision))))
            }
            _ => Ok(None),
        }
    }

    /// Publishes `task` as the replicated checkpoint, compare-and-set on the subject's
    /// last sequence. `Fenced`: a newer owner has written since.
    pub async fn publish_checkpoint(&self, task: &Task) -> Result<(), OwnershipError> {
        let Some(held) = self.held(&task.id) else {
            return Err(OwnershipError::Fenced);
        };
        let payload = Bytes::from(storage::codec::encode(task).map_err(unavailable)?);
        let mut expected = held.checkpoint_seq;
        for _ in 0..2 {
            match self
                .put_checkpoint(task, payload.clone(), expected, held.token)
                .await
            {
                Ok(seq) => {
                    if let Some(h) = self
                        .lock_held()
                        .get_mut(&task.id)
                        .filter(|h| h.token == held.token)
                    {
                        h.checkpoint_seq = seq;
                    }
                    return Ok(());
                }
                Err(OwnershipError::Fenced) => {
                    // Our own earlier write may have landed unacknowledged: then the
                    // last message carries our token, and it is still ours to replace.
                    match self.last_checkpoint(&task.id).await? {
                        Some((seq, _, token)) if token == held.token => expected = seq,
                        _ => return Err(OwnershipError::Fenced),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(OwnershipError::Fenced)
    }

    /// The replicated checkpoint of `task_id`: the task, its writer, its sequence.
    pub async fn load_checkpoint(
        &self,
        task_id: &str,
    ) -> Result<Option<(Task, String, u64)>, OwnershipError> {
        match self
            .checkpoints
            .direct_get_last_for_subject(subject::checkpoint(task_id))
            .await
        {
            Ok(msg) => {
                let task: Task = storage::codec::decode(&msg.payload).map_err(unavailable)?;
                let owner = header(&msg.headers, subject::OWNER_HEADER).unwrap_or_default();
                Ok(Some((task, owner, msg.sequence)))
            }
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Starts an `unsafe` effect cluster-wide: `Ok(None)` if this is the first start of
    /// the attempt anywhere; `Ok(Some(json))`: the record another start left.
    pub async fn begin_effect(
        &self,
        key: &str,
        record: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, OwnershipError> {
        match self.effects.create(key, record.into()).await {
            Ok(_) => Ok(None),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let existing = self.effects.get(key).await.map_err(unavailable)?;
                Ok(Some(existing.map(|b| b.to_vec()).unwrap_or_default()))
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Records the outcome of an `unsafe` effect cluster-wide.
    pub async fn finish_effect(&self, key: &str, record: Vec<u8>) -> Result<(), OwnershipError> {
        self.effects
            .put(key, record.into())
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    fn dispatch_window(&self) -> Duration {
        self.ttl - self.ttl / SAFETY_MARGIN_DIV
    }

    fn held(&self, task_id: &str) -> Option<Held> {
        self.lock_held().get(task_id).cloned()
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        match self.held.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Writes `lease` with the TTL, if the key's last revision is `expected` (0: none).
    /// (By hand rather than `kv::Store::create`, whose re-create over a marker drops the
    /// TTL, and `update`, which cannot set one.)
    async fn write_lease(
        &self,
        task_id: &str,
        lease: &Lease,
        expected: u64,
    ) -> Result<u64, OwnershipError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        headers.insert(
            "Nats-TTL",
            format!("{}s", self.ttl.as_secs().max(1)).as_str(),
        );
        let payload = Bytes::from(serde_json::to_vec(lease).map_err(unavailable)?);
        let subject = format!("{}$KV.{}.{task_id}", self.kv_prefix, subject::LEASES_BUCKET);
        publish(&self.js, subject, headers, payload).await
    }

    async fn put_checkpoint(
        &self,
        task: &Task,
        payload: Bytes,
        expected: u64,
        token: u64,
    ) -> Result<u64, OwnershipError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        headers.insert(subject::OWNER_HEADER, self.node_id.as_str());
        headers.insert(subject::TOKEN_HEADER, token.to_string().as_str());
        match publish(&self.js, subject::checkpoint(&task.id), headers, payload).await {
            Err(OwnershipError::Lost) => Err(OwnershipError::Fenced),
            other => other,
        }
    }

    /// The last checkpoint's sequence, writer and token.
    async fn last_checkpoint(
        &self,
        task_id: &str,
    ) -> Result<Option<(u64, String, u64)>, OwnershipError> {
        match self
            .checkpoints
            .direct_get_last_for_subject(subject::checkpoint(task_id))
            .await
        {
            Ok(msg) => Ok(Some((
                msg.sequence,
                header(&msg.headers, subject::OWNER_HEADER).unwrap_or_default(),
                header(&msg.headers, subject::TOKEN_HEADER)
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0),
            ))),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }
}

/// A JetStream publish, its acknowledgement awaited; a failed compare-and-set is `Lost`
/// (for a lease) or `Fenced` (the callers map it).
async fn publish(
    js: &jetstream::Context,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
) -> Result<u64, OwnershipError> {
    let ack = js
        .publish_with_headers(subject, headers, payload)
        .await
        .map_err(unavailable)?;
    match ack.await {
        Ok(ack) => Ok(ack.sequence),
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Err(OwnershipError::Lost),
        Err(e) => Err(unavailable(e)),
    }
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| v.as_str().to_string())
}

async fn bucket(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, OwnershipError> {
    match js.get_key_value(&config.bucket).await {
        Ok(store) => Ok(store),
        Err(_) => match js.create_key_value(config.clone()).await {
            Ok(store) => Ok(store),
            // Another node created it between the two calls.
            Err(create) => js.get_key_value(&config.bucket).await.map_err(|get| {
                unavailable(format!(
                    "cannot create bucket {}: {create}; {get}",
                    config.bucket
                ))
            }),
        },
    }
}
