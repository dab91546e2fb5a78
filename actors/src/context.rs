//! What every actor on a node shares: identity, connections, store, clock, settings.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use storage::{Batch, Cf, Store, StoreError};

use crate::clock::Clock;
use crate::machine::Limits;
use crate::metrics::Metrics;
use crate::playbook::StepDefaults;
use crate::policy::Policies;
use crate::roles::task::TaskMsg;
use crate::tools::ToolConfig;

/// Settings the roles need, already validated by the node's config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_id: String,
    pub payload_bytes_max: usize,
    /// Timeout of plan/verify/archive hops.
    pub hop_timeout: Duration,
    /// Added to a step's own timeout for the exec hop.
    pub exec_timeout_margin: Duration,
    pub limits: Limits,
    pub step_defaults: StepDefaults,
    pub tools: ToolConfig,
    /// Steps one tool may run at once on this node…
    pub exec_concurrency_max: usize,
    /// …or fewer, for these tools.
    pub tool_concurrency_max: std::collections::HashMap<String, usize>,
    /// Token buckets per tool and per target host.
    pub rate_limits: Vec<crate::rate::RateLimit>,
    /// Messages a role holds (mailbox + in hand) before its pump stops reading.
    pub mailbox_depth_max: usize,
    /// Restarts of one TaskActor within `restart_window` before its task fails.
    pub task_restarts_max: u32,
    pub restart_window: Duration,
    pub seed: u64,
    /// Estimated cost of one call, per tool, in millionths of a US dollar.
    pub tool_costs: std::collections::HashMap<String, u64>,
    /// Watched for policy changes; `None`: the built-in policies, never reloaded.
    pub policies_dir: Option<std::path::PathBuf>,
    pub policy_reload: Duration,
    /// Spend caps; a step that would cross one waits for an approval.
    pub caps: crate::budget::Caps,
    /// What the node says about itself: `location=laptop`, ….
    pub tags: std::collections::BTreeMap<String, String>,
    /// How often the node writes its heartbeat.
    pub heartbeat: Duration,
    /// The JetStream domain of the hub ("": the server's own JetStream).
    pub js_domain: String,
    /// Injected panics, for the chaos suite; none unless configured.
    pub faults: Arc<crate::faults::Faults>,
    /// Knowledge: episode retention and how long a write waits to be applied.
    pub knowledge: KnowledgeSettings,
    /// How often the scheduler looks for due firings.
    pub schedule_tick: Duration,
    /// A firing found this late is missed (and follows its schedule's policy).
    pub schedule_grace: Duration,
    /// Low-priority tasks start at multiples of this (their batch window)…
    pub low_priority_window: Duration,
    /// …and at most this many run at once on this node.
    pub low_priority_concurrency_max: usize,
}

#[derive(Debug, Clone)]
pub struct KnowledgeSettings {
    pub retention: crate::knowledge::Retention,
    pub prune_interval: Duration,
    /// A `cadre.context.put` not applied within this answers `pending`.
    pub write_wait: Duration,
}

/// A message waiting in the outbox: the relay publishes it, then deletes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub subject: String,
    /// A byte string to postcard: the same bytes on disk as a sequence of `u8` (length,
    /// then the bytes), written and read in one copy instead of one call per byte.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

pub struct NodeContext {
    pub settings: Settings,
    pub nats: async_nats::Client,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<Metrics>,
    outbox_seq: AtomicU64,
    draining: AtomicBool,
    /// Identifies this process incarnation in effect-ledger records.
    pub boot_id: u64,
    /// The kill switch as this node last applied it (from the `CADRE_CONTROL` bucket).
    killswitch: tokio::sync::watch::Sender<bool>,
    /// The node's rate-limit buckets.
    pub rate: crate::rate::RateLimiter,
    /// Tasks holding a step back because the kill switch is engaged; released together.
    paused: std::sync::Mutex<std::collections::HashMap<String, ractor::ActorRef<TaskMsg>>>,
    /// The policies in force; replaced whole by a hot reload.
    policies: std::sync::RwLock<Arc<Policies>>,
    /// Today's spend against the caps.
    pub ledger: crate::budget::Ledger,
    /// Leases and replicated checkpoints, on a node in a cluster (set once, at start).
    ownership: std::sync::OnceLock<Arc<crate::ownership::Ownership>>,
    /// The search index and the knowledge publisher's wake-up (set once, at start).
    knowledge: std::sync::OnceLock<Arc<crate::knowledge::Shared>>,
    /// The LLM provider, on a node configured with one (set once, at start).
    llm: std::sync::OnceLock<Arc<crate::llm::Provider>>,
    /// The node's sealed secrets (set once, at start).
    secrets: std::sync::OnceLock<Arc<crate::secrets::SecretStore>>,
    /// Slots of low-priority tasks: one held from planning to the task's end.
    pub low_slots: Arc<tokio::sync::Semaphore>,
}

impl NodeContext {
    /// A JetStream context in the configured domain.
    pub fn jetstream(&self) -> async_nats::jetstream::Context {
        crate::bus::jetstream(self.nats.clone(), &self.settings.js_domain)
    }

    pub fn new(
        settings: Settings,
        nats: async_nats::Client,
        store: Store,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        policies: Policies,
    ) -> Result<Arc<NodeContext>, StoreError> {
        let last = store
            .last_key(Cf::Outbox)?
            .map(|k| outbox_seq_of(&k))
            .unwrap_or(0);
        let boot_id = clock.now_ms() ^ (u64::from(std::process::id()) << 44);
        let rate = crate::rate::RateLimiter::new(&settings.rate_limits, clock.now_ms());
        for limit in &settings.rate_limits {
            metrics
                .rate_limit_per_second
                .with_label_values(&[&limit.key])
                .set(limit.per_second());
        }
        let ledger_store = store.clone();
        let low_slots = Arc::new(tokio::sync::Semaphore::new(
            settings.low_priority_concurrency_max.max(1),
        ));
        Ok(Arc::new(NodeContext {
            settings,
            nats,
            store,
            clock,
            metrics,
            outbox_seq: AtomicU64::new(last),
            draining: AtomicBool::new(false),
            boot_id,
            killswitch: tokio::sync::watch::Sender::new(false),
            rate,
            paused: std::sync::Mutex::new(std::collections::HashMap::new()),
            policies: std::sync::RwLock::new(Arc::new(policies)),
            ledger: crate::budget::Ledger::new(ledger_store),
            ownership: std::sync::OnceLock::new(),
            knowledge: std::sync::OnceLock::new(),
            llm: std::sync::OnceLock::new(),
            secrets: std::sync::OnceLock::new(),
            low_slots,
        }))
    }

    /// Answers a public request with `result` as JSON; an error is also counted in
    /// `cadre_input_rejected_total` under `subject`.
    pub async fn respond<T: Serialize>(
        &self,
        subject: &str,
        reply: Option<async_nats::Subject>,
        result: Result<T, crate::protocol::ErrorReply>,
    ) {
        match result {
            Ok(value) => crate::bus::reply_json(&self.nats, reply, &value).await,
            Err(e) => {
                self.metrics.rejected(subject, e.error.code);
                crate::bus::reply_json(&self.nats, reply, &e).await;
            }
        }
    }

    pub fn set_secrets(&self, secrets: Arc<crate::secrets::SecretStore>) {
        let _ = self.secrets.set(secrets);
    }

    pub fn secrets(&self) -> Option<&Arc<crate::secrets::SecretStore>> {
        self.secrets.get()
    }

    pub fn set_llm(&self, provider: Arc<crate::llm::Provider>) {
        let _ = self.llm.set(provider);
    }

    /// The LLM provider, if this node has one configured.
    pub fn llm(&self) -> Option<&Arc<crate::llm::Provider>> {
        self.llm.get()
    }

    /// This node's name for one of its roles: `executor@laptop`.
    pub fn from(&self, role: &str) -> String {
        crate::roles::actor_name(role, &self.settings.node_id)
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Stages `subject`/`payload` in `batch` as an outbox entry; returns what to hand
    /// the relay once the batch is committed.
    pub fn stage_outbox(
        &self,
        batch: &mut Batch,
        subject: String,
        payload: Vec<u8>,
    ) -> Result<(u64, OutboxEntry), StoreError> {
        let seq = self.outbox_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = OutboxEntry { subject, payload };
        batch.put(Cf::Outbox, seq.to_be_bytes().to_vec(), &entry)?;
        Ok((seq, entry))
    }

    /// Set when the node is shutting down: no new step is dispatched.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn killswitch_engaged(&self) -> bool {
        *self.killswitch.borrow()
    }

    /// Follows the kill switch (an executor aborts running calls when it engages).
    pub fn killswitch_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.killswitch.subscribe()
    }

    /// If the kill switch is engaged, records `task` as holding a step back and returns
    /// true; the caller must not dispatch. Checked under the same lock [`Self::
    /// set_killswitch`] releases under, so no task is left paused by a release racing
    /// its dispatch.
    pub fn pause_if_engaged(&self, task_id: &str, task: &ractor::ActorRef<TaskMsg>) -> bool {
        if !self.killswitch_engaged() {
            return false;
        }
        let Ok(mut paused) = self.paused.lock() else {
            return true;
        };
        if !self.killswitch_engaged() {
            return false;
        }
        paused.insert(task_id.to_string(), task.clone());
        self.metrics.tasks_held.set(paused.len() as i64);
        true
    }

    /// Applies the kill switch; on release, every paused task gets `Released`.
    pub fn set_killswitch(&self, engaged: bool) {
        let released = {
            let Ok(mut paused) = self.paused.lock() else {
                return;
            };
            self.killswitch.send_replace(engaged);
            self.metrics.killswitch_engaged.set(i64::from(engaged));
            if engaged {
                Vec::new()
            } else {
                self.metrics.tasks_held.set(0);
                paused.drain().map(|(_, task)| task).collect()
            }
        };
        for task in released {
            let _ = task.cast(TaskMsg::Released);
        }
    }

    /// Task ownership, if the node runs in a cluster.
    pub fn ownership(&self) -> Option<&Arc<crate::ownership::Ownership>> {
        self.ownership.get()
    }

    /// Joins the cluster: from now on tasks are driven under leases. Set before any
    /// actor starts.
    pub fn set_ownership(&self, ownership: Arc<crate::ownership::Ownership>) {
        let _ = self.ownership.set(ownership);
    }

    /// This node's knowledge side, once the node has opened it.
    pub fn knowledge(&self) -> Option<&Arc<crate::knowledge::Shared>> {
        self.knowledge.get()
    }

    pub fn set_knowledge(&self, shared: Arc<crate::knowledge::Shared>) {
        let _ = self.knowledge.set(shared);
    }

    /// The policies in force now.
    pub fn policies(&self) -> Arc<Policies> {
        match self.policies.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Puts `policies` in force for every decision from now on.
    pub fn set_policies(&self, policies: Policies) {
        let policies = Arc::new(policies);
        match self.policies.write() {
            Ok(mut p) => *p = policies,
            Err(poisoned) => *poisoned.into_inner() = policies,
        }
    }
}

pub fn outbox_seq_of(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = key.len().min(8);
    b[8 - n..].copy_from_slice(&key[key.len() - n..]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout an outbox entry had before its payload became a byte string: a
    /// backlog left by an older build must read back, and a new one read by it.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct OutboxEntryAsSeq {
        subject: String,
        payload: Vec<u8>,
    }

    #[test]
    fn outbox_entries_keep_their_bytes_on_disk() {
        let payload: Vec<u8> = (0..=255u8).chain(*b"{\"kind\":\"accepted\"}").collect();
        let entry = OutboxEntry {
            subject: "cadre.events.task.01J.accepted".into(),
            payload: payload.clone(),
        };
        let old = OutboxEntryAsSeq {
            subject: entry.subject.clone(),
            payload,
        };
        let written = storage::codec::encode(&entry).expect("encode");
        assert_eq!(written, storage::codec::encode(&old).expect("encode"));
        let back: OutboxEntry = storage::codec::decode(&written).expect("decode");
        assert_eq!(
            (back.subject, back.payload),
            (old.subject.clone(), old.payload.clone())
        );
        assert_eq!(
            storage::codec::decode::<OutboxEntryAsSeq>(&written).expect("decode"),
            old
        );
    }
}
