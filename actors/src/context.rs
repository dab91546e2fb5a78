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
    /// Steps one tool may run at once on this node.
    pub exec_concurrency_max: usize,
    /// Messages a role holds (mailbox + in hand) before its pump stops reading.
    pub mailbox_depth_max: usize,
    /// Restarts of one TaskActor within `restart_window` before its task fails.
    pub task_restarts_max: u32,
    pub restart_window: Duration,
    pub seed: u64,
}

/// A message waiting in the outbox: the relay publishes it, then deletes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub subject: String,
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
}

impl NodeContext {
    pub fn new(
        settings: Settings,
        nats: async_nats::Client,
        store: Store,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<NodeContext>, StoreError> {
        let last = store
            .last_key(Cf::Outbox)?
            .map(|k| outbox_seq_of(&k))
            .unwrap_or(0);
        let boot_id = clock.now_ms() ^ (u64::from(std::process::id()) << 44);
        Ok(Arc::new(NodeContext {
            settings,
            nats,
            store,
            clock,
            metrics,
            outbox_seq: AtomicU64::new(last),
            draining: AtomicBool::new(false),
            boot_id,
        }))
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
}

pub fn outbox_seq_of(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = key.len().min(8);
    b[8 - n..].copy_from_slice(&key[key.len() - n..]);
    u64::from_be_bytes(b)
}
