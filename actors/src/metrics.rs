//! The series a node exports. Names follow Prometheus conventions: `cadre_` prefix,
//! `_total` for counters, base units (`_seconds`, `_bytes`, `_usd`).
//!
//! They cover the four measures an operator steers by — task latency
//! (`cadre_task_duration_seconds`), failure rate (`cadre_tasks_finished_total`),
//! human approvals (`cadre_approvals_*`), cost per execution (`cadre_task_cost_usd`) —
//! and the node's health. Series whose cause arrives with a later issue (approvals,
//! cost, budgets, the kill switch) are registered now and stay at zero until then, so
//! dashboards and alert rules work from the first scrape.

use prometheus::{
    CounterVec, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    pub node_info: IntGaugeVec,
    pub tasks_submitted_total: IntCounterVec,
    pub tasks_finished_total: IntCounterVec,
    pub task_duration_seconds: HistogramVec,
    pub step_duration_seconds: HistogramVec,
    pub step_retries_total: IntCounterVec,
    pub step_failures_total: IntCounterVec,
    pub tasks_in_flight: IntGauge,
    pub steps_in_flight: IntGaugeVec,
    pub approvals_pending: IntGauge,
    pub approval_wait_seconds: Histogram,
    pub approvals_decided_total: IntCounterVec,
    pub policy_decisions_total: IntCounterVec,
    pub policy_reloads_total: IntCounterVec,
    pub actor_restarts_total: IntCounterVec,
    pub nats_connected: IntGauge,
    pub nats_reconnects_total: IntCounter,
    pub outbox_backlog: IntGauge,
    pub effects_outcome_unknown: IntGauge,
    pub effects_outcome_unknown_total: IntCounterVec,
    pub input_rejected_total: IntCounterVec,
    pub commit_seconds: Histogram,
    pub cost_usd_total: CounterVec,
    pub task_cost_usd: HistogramVec,
    pub budget_spent_usd: GaugeVec,
    pub budget_cap_usd: GaugeVec,
    pub killswitch_engaged: IntGauge,
    /// Tasks holding a step back (not dispatched) while the kill switch is engaged.
    pub tasks_held: IntGauge,
    /// Cluster: leases held, takeovers, stand-downs, fenced effects, checkpoint writes
    /// that did not reach JetStream.
    pub leases_held: IntGauge,
    pub task_takeovers_total: IntCounter,
    pub task_stand_downs_total: IntCounterVec,
    pub effects_fenced_total: IntCounterVec,
    pub checkpoint_publish_failures_total: IntCounter,
    /// Moved from the store's own counters at scrape time (see [`Metrics::sync_store`]).
    pub store_commits_total: IntCounter,
    pub store_written_commits_total: IntCounter,
    pub store_commits_in_place_total: IntCounter,
    pub store_fsyncs_total: IntCounter,
    pub store_write_stall_seconds_total: prometheus::Counter,
    pub store_size_bytes: IntGauge,
    pub audit_records_total: IntCounter,
    pub tool_concurrency_max: IntGaugeVec,
    pub rate_limit_per_second: GaugeVec,
    pub rate_limited_total: IntCounterVec,
    pub rate_limit_wait_seconds_total: CounterVec,
    pub knowledge_applied_seq: IntGauge,
    pub knowledge_writes_total: IntCounterVec,
    pub knowledge_outbox: IntGauge,
    pub memory_facts: IntGauge,
    pub memory_search_seconds: Histogram,
    pub episodes_pruned_total: IntCounterVec,
    /// LLM calls: by role, model and outcome (ok, retried, refused, unavailable).
    pub llm_requests_total: IntCounterVec,
    pub llm_tokens_total: IntCounterVec,
    pub llm_cost_usd_total: CounterVec,
    pub llm_request_seconds: HistogramVec,
    pub llm_in_flight: IntGauge,
    /// Calls to a model the price table does not name (they cost 0: a gap to fix).
    pub llm_unpriced_total: IntCounterVec,
    /// LLM plans by outcome: `valid` (first try), `repaired`, `invalid`.
    pub llm_plans_total: IntCounterVec,
    /// Schedule firings by outcome: `fired`, `caught_up`, `skipped`.
    pub schedule_firings_total: IntCounterVec,
    /// Webhook deliveries by hook and outcome.
    pub webhooks_total: IntCounterVec,
    /// Value of the audit head when this process started counting.
    audit_base: std::sync::atomic::AtomicU64,
    /// Serializes [`Metrics::sync_store`]: it advances counters by read-then-add, and two
    /// scrapes at once would both add the same difference.
    sync_lock: std::sync::Mutex<()>,
}

/// Step and commit latencies: 1 ms to 1 min.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0, 5.0, 10.0,
    30.0, 60.0,
];

/// Task latencies and approval waits: a task can wait hours for a person, so these
/// reach a day.
const LONG_BUCKETS: &[f64] = &[
    0.004, 0.016, 0.064, 0.256, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0,
    14_400.0, 43_200.0, 86_400.0,
];

/// The outbox backlog is counted up to this many entries.
const OUTBOX_COUNT_MAX: usize = 100_000;

/// Cost of one task in USD: from a tenth of a cent to 10 dollars.
const COST_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0];

/// Why a step attempt was retried or failed (the `reason` label).
pub mod reason {
    /// The tool reported a retryable error (5xx, 429, timeout).
    pub const TOOL_ERROR: &str = "tool_error";
    /// The tool reported an error another attempt would repeat (4xx, bad params).
    pub const PERMANENT: &str = "permanent";
    /// No executor answered.
    pub const UNANSWERED: &str = "unanswered";
    /// The outcome did not meet the step's success criteria.
    pub const VERIFY_FAILED: &str = "verify_failed";
    /// No verifier answered.
    pub const VERIFIER_UNANSWERED: &str = "verifier_unanswered";
    /// An operator aborted the step.
    pub const ABORTED: &str = "aborted";

    /// The reasons a step is retried or re-sent.
    pub const RETRIED: &[&str] = &[TOOL_ERROR, UNANSWERED, VERIFY_FAILED];
    /// The reasons a step fails for good.
    pub const FAILED: &[&str] = &[
        TOOL_ERROR,
        PERMANENT,
        UNANSWERED,
        VERIFY_FAILED,
        VERIFIER_UNANSWERED,
        ABORTED,
    ];
}

impl Metrics {
    /// Counts a request refused with an error reply.
    pub fn rejected(&self, subject: &str, code: crate::protocol::ErrorCode) {
        self.input_rejected_total
            .with_label_values(&[subject, code.as_str()])
            .inc();
    }

    /// Creates the per-label series a dashboard expects at zero: one per playbook and
    /// per tool this node knows.
    pub fn init_labels(&self, node_id: &str, playbooks: &[&str], tools: &[&str]) {
        self.node_info
            .with_label_values(&[node_id, env!("CARGO_PKG_VERSION")])
            .set(1);
        for pb in playbooks {
            self.tasks_submitted_total.with_label_values(&[pb]);
            self.cost_usd_total.with_label_values(&[pb]);
            self.task_cost_usd.with_label_values(&[pb]);
            for status in ["succeeded", "failed", "cancelled"] {
                self.tasks_finished_total.with_label_values(&[pb, status]);
                self.task_duration_seconds.with_label_values(&[pb, status]);
            }
        }
        for tool in tools {
            self.steps_in_flight.with_label_values(&[tool]);
            self.step_duration_seconds.with_label_values(&[tool]);
            self.effects_outcome_unknown_total
                .with_label_values(&[tool]);
            self.effects_fenced_total.with_label_values(&[tool]);
            for why in reason::RETRIED {
                self.step_retries_total.with_label_values(&[tool, why]);
            }
            for why in reason::FAILED {
                self.step_failures_total.with_label_values(&[tool, why]);
            }
        }
        for why in ["owned_elsewhere", "unclaimed"] {
            self.task_stand_downs_total.with_label_values(&[why]);
        }
        for actor in crate::roles::NODE_ROLES.iter().chain(&["task"]) {
            self.actor_restarts_total.with_label_values(&[actor]);
        }
    }

    /// Brings the counters kept by the store up to date (called before each scrape).
    pub fn sync_store(&self, store: &storage::Store) {
        use std::sync::atomic::Ordering::Relaxed;
        let _serial = self
            .sync_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stats = store.stats();
        let advance = |c: &IntCounter, to: u64| {
            let now = c.get();
            if to > now {
                c.inc_by(to - now);
            }
        };
        advance(&self.store_commits_total, stats.commits.load(Relaxed));
        advance(
            &self.store_written_commits_total,
            stats.written_commits.load(Relaxed),
        );
        advance(
            &self.store_commits_in_place_total,
            stats.written_in_place.load(Relaxed),
        );
        advance(&self.store_fsyncs_total, stats.syncs.load(Relaxed));
        let base = self.audit_base.load(Relaxed);
        advance(
            &self.audit_records_total,
            store.audit_seq().saturating_sub(base),
        );
        let stall = store.write_stall_micros() as f64 / 1e6;
        let seen = self.store_write_stall_seconds_total.get();
        if stall > seen {
            self.store_write_stall_seconds_total.inc_by(stall - seen);
        }
        self.store_size_bytes.set(store.size_bytes() as i64);
        // Entries leave the outbox once published and flushed, so it is near-empty on a
        // healthy node and counting it is cheap; a count at the cap still alerts.
        if let Ok(n) = store.count_keys(storage::Cf::Outbox, OUTBOX_COUNT_MAX) {
            self.outbox_backlog.set(n as i64);
        }
    }

    /// Counts audit records from `head` on (the chain's head when the node started).
    pub fn set_audit_base(&self, head: u64) {
        self.audit_base
            .store(head, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let r = &registry;
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(r, IntCounterVec::new(Opts::new(name, help), labels)?)
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            register(
                r,
                HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                    labels,
                )?,
            )
        };
        let gauge = |name: &str, help: &str| register(r, IntGauge::new(name, help)?);
        Ok(Metrics {
            knowledge_applied_seq: gauge(
                "cadre_knowledge_applied_seq",
                "The last message of the knowledge stream this node applied.",
            )?,
            knowledge_writes_total: {
                let c = counter(
                    "cadre_knowledge_writes_total",
                    "Knowledge stream messages applied here, by op and result (applied, rejected, malformed).",
                    &["op", "result"],
                )?;
                for op in ["context", "checkpoint", "rollback", "fact"] {
                    for result in ["applied", "rejected"] {
                        c.with_label_values(&[op, result]);
                    }
                }
                c
            },
            knowledge_outbox: gauge(
                "cadre_knowledge_outbox",
                "Knowledge writes made on this node and not yet acknowledged by the stream.",
            )?,
            memory_facts: gauge(
                "cadre_memory_facts",
                "Current (not superseded) facts in this node's search index.",
            )?,
            memory_search_seconds: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "cadre_memory_search_seconds",
                        "One bounded memory retrieval (search, rank, cut).",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )?,
            )?,
            episodes_pruned_total: {
                let c = counter(
                    "cadre_episodes_pruned_total",
                    "Episodes removed by the retention policy, by cap (age, count, bytes).",
                    &["cap"],
                )?;
                for cap in ["age", "count", "bytes"] {
                    c.with_label_values(&[cap]);
                }
                c
            },
            node_info: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "cadre_node_info",
                        "This node: always 1, labelled with its id and version.",
                    ),
                    &["node_id", "version"],
                )?,
            )?,
            tasks_submitted_total: counter(
                "cadre_tasks_submitted_total",
                "Tasks accepted by intake.",
                &["playbook"],
            )?,
            tasks_finished_total: counter(
                "cadre_tasks_finished_total",
                "Tasks that reached a terminal status (succeeded, failed, cancelled).",
                &["playbook", "status"],
            )?,
            task_duration_seconds: histogram(
                "cadre_task_duration_seconds",
                "Submit to terminal status.",
                &["playbook", "status"],
                LONG_BUCKETS,
            )?,
            step_duration_seconds: histogram(
                "cadre_step_duration_seconds",
                "One attempt of a step, dispatch to executor reply.",
                &["tool"],
                LATENCY_BUCKETS,
            )?,
            step_retries_total: counter(
                "cadre_step_retries_total",
                "Step attempts retried or re-sent, by why.",
                &["tool", "reason"],
            )?,
            step_failures_total: counter(
                "cadre_step_failures_total",
                "Steps failed for good, by why.",
                &["tool", "reason"],
            )?,
            tasks_in_flight: gauge(
                "cadre_tasks_in_flight",
                "Non-terminal tasks with a running TaskActor.",
            )?,
            steps_in_flight: register(
                r,
                IntGaugeVec::new(
                    Opts::new("cadre_steps_in_flight", "Steps executing on this node."),
                    &["tool"],
                )?,
            )?,
            approvals_pending: gauge(
                "cadre_approvals_pending",
                "Steps waiting for a human approval.",
            )?,
            approval_wait_seconds: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "cadre_approval_wait_seconds",
                        "Request to decision of an approval.",
                    )
                    .buckets(LONG_BUCKETS.to_vec()),
                )?,
            )?,
            approvals_decided_total: {
                let c = counter(
                    "cadre_approvals_decided_total",
                    "Approvals decided, by decision (approve, deny, expired).",
                    &["decision"],
                )?;
                for d in ["approve", "deny", "expired", "void"] {
                    c.with_label_values(&[d]);
                }
                c
            },
            policy_decisions_total: {
                let c = counter(
                    "cadre_policy_decisions_total",
                    "Dispatch decisions of the policies, by ruling (allow, deny, require_approval).",
                    &["ruling"],
                )?;
                for d in ["allow", "deny", "require_approval"] {
                    c.with_label_values(&[d]);
                }
                c
            },
            policy_reloads_total: {
                let c = counter(
                    "cadre_policy_reloads_total",
                    "Hot reloads of the policies directory, by result (ok, invalid: the old policies stay).",
                    &["result"],
                )?;
                for d in ["ok", "invalid"] {
                    c.with_label_values(&[d]);
                }
                c
            },
            actor_restarts_total: counter(
                "cadre_actor_restarts_total",
                "Actors restarted by a supervisor.",
                &["actor"],
            )?,
            nats_connected: gauge(
                "cadre_nats_connected",
                "1 while the node's NATS connection is up.",
            )?,
            nats_reconnects_total: register(
                r,
                IntCounter::new(
                    "cadre_nats_reconnects_total",
                    "NATS connections re-established after a loss.",
                )?,
            )?,
            outbox_backlog: gauge(
                "cadre_outbox_backlog",
                "Committed events not yet published and confirmed (counted up to 100,000).",
            )?,
            effects_outcome_unknown: gauge(
                "cadre_effects_outcome_unknown",
                "Unsafe effects whose outcome is unknown, waiting for an operator.",
            )?,
            effects_outcome_unknown_total: counter(
                "cadre_effects_outcome_unknown_total",
                "Unsafe effects found in `intent` after a crash.",
                &["tool"],
            )?,
            input_rejected_total: counter(
                "cadre_input_rejected_total",
                "Requests refused with an error reply.",
                &["subject", "code"],
            )?,
            commit_seconds: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "cadre_commit_seconds",
                        "A TaskActor commit of one transition, until synced or, for a task's own progress, written.",
                    )
                        .buckets(LATENCY_BUCKETS.to_vec()),
                )?,
            )?,
            webhooks_total: counter(
                "cadre_webhooks_total",
                "POST /hooks/<name> deliveries, by hook (`unknown` for a name no playbook has) and outcome (accepted, duplicate, bad_signature, refused).",
                &["hook", "outcome"],
            )?,
            schedule_firings_total: {
                let c = counter(
                    "cadre_schedule_firings_total",
                    "Schedule firings on this node, by outcome (fired on time, caught_up once for missed ones, skipped).",
                    &["outcome"],
                )?;
                for o in ["fired", "caught_up", "skipped"] {
                    c.with_label_values(&[o]);
                }
                c
            },
            llm_requests_total: counter(
                "cadre_llm_requests_total",
                "Chat-completion requests, by role, model and outcome (ok, retried, refused, unavailable).",
                &["role", "model", "outcome"],
            )?,
            llm_tokens_total: counter(
                "cadre_llm_tokens_total",
                "Tokens used, by role, model and kind (prompt, completion), as providers report them.",
                &["role", "model", "kind"],
            )?,
            llm_cost_usd_total: register(
                r,
                CounterVec::new(
                    Opts::new(
                        "cadre_llm_cost_usd_total",
                        "What LLM calls cost, by role and model (tokens × the price table).",
                    ),
                    &["role", "model"],
                )?,
            )?,
            llm_request_seconds: histogram(
                "cadre_llm_request_seconds",
                "One chat-completion request, by role.",
                &["role"],
                LATENCY_BUCKETS,
            )?,
            llm_in_flight: gauge(
                "cadre_llm_in_flight",
                "Chat-completion requests on the wire now (at most llm_concurrency_max).",
            )?,
            llm_unpriced_total: counter(
                "cadre_llm_unpriced_total",
                "Calls to a model the price table does not name: they were counted as free.",
                &["model"],
            )?,
            llm_plans_total: {
                let c = counter(
                    "cadre_llm_plans_total",
                    "Plans asked of the LLM planner, by outcome (valid, repaired, invalid, unavailable).",
                    &["outcome"],
                )?;
                for o in ["valid", "repaired", "invalid", "unavailable"] {
                    c.with_label_values(&[o]);
                }
                c
            },
            cost_usd_total: register(
                r,
                CounterVec::new(
                    Opts::new(
                        "cadre_cost_usd_total",
                        "Money spent by steps (LLM tokens, paid APIs).",
                    ),
                    &["playbook"],
                )?,
            )?,
            task_cost_usd: histogram(
                "cadre_task_cost_usd",
                "Cost of each verified task; _sum/_count is the cost per verified task.",
                &["playbook"],
                COST_BUCKETS,
            )?,
            budget_spent_usd: register(r, {
                let g = GaugeVec::new(
                    Opts::new(
                        "cadre_budget_spent_usd",
                        "Spent against a budget in its period.",
                    ),
                    &["scope"],
                )?;
                g.with_label_values(&["global"]);
                g
            })?,
            budget_cap_usd: register(r, {
                let g = GaugeVec::new(
                    Opts::new(
                        "cadre_budget_cap_usd",
                        "A budget's cap in its period (0: no cap).",
                    ),
                    &["scope"],
                )?;
                g.with_label_values(&["global"]);
                g
            })?,
            killswitch_engaged: gauge(
                "cadre_killswitch_engaged",
                "1 while the kill switch stops all dispatching.",
            )?,
            tasks_held: gauge(
                "cadre_tasks_held",
                "Tasks holding a step back, undispatched, while the kill switch is engaged.",
            )?,
            leases_held: gauge(
                "cadre_leases_held",
                "Task leases this node holds (cluster mode).",
            )?,
            task_takeovers_total: register(
                r,
                IntCounter::new(
                    "cadre_task_takeovers_total",
                    "Tasks this node took over from an owner whose lease expired.",
                )?,
            )?,
            task_stand_downs_total: counter(
                "cadre_task_stand_downs_total",
                "Tasks this node stopped driving because another node owns them.",
                &["reason"],
            )?,
            effects_fenced_total: counter(
                "cadre_effects_fenced_total",
                "Effects refused because the request's fencing token was stale.",
                &["tool"],
            )?,
            checkpoint_publish_failures_total: register(
                r,
                IntCounter::new(
                    "cadre_checkpoint_publish_failures_total",
                    "Task checkpoints committed locally that could not be replicated.",
                )?,
            )?,
            store_commits_total: register(
                r,
                IntCounter::new(
                    "cadre_store_commits_total",
                    "Commits answered once synced (intake, decisions, a task's end, …).",
                )?,
            )?,
            store_written_commits_total: register(
                r,
                IntCounter::new(
                    "cadre_store_written_commits_total",
                    "Commits answered once written, their fsync right after (a task's own progress).",
                )?,
            )?,
            store_commits_in_place_total: register(
                r,
                IntCounter::new(
                    "cadre_store_commits_in_place_total",
                    "Commits (of both kinds) written by the committing task itself, the commit thread being idle.",
                )?,
            )?,
            store_fsyncs_total: register(
                r,
                IntCounter::new(
                    "cadre_store_fsyncs_total",
                    "fsyncs of the WAL, each covering every commit written before it.",
                )?,
            )?,
            store_write_stall_seconds_total: register(
                r,
                prometheus::Counter::new(
                    "cadre_store_write_stall_seconds_total",
                    "Time RocksDB stalled or slowed writes.",
                )?,
            )?,
            store_size_bytes: gauge(
                "cadre_store_size_bytes",
                "Approximate size of the RocksDB SST files.",
            )?,
            audit_records_total: register(
                r,
                IntCounter::new(
                    "cadre_audit_records_total",
                    "Audit records appended since the node started.",
                )?,
            )?,
            tool_concurrency_max: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "cadre_tool_concurrency_max",
                        "Steps one tool may run at once on this node.",
                    ),
                    &["tool"],
                )?,
            )?,
            rate_limit_per_second: register(
                r,
                GaugeVec::new(
                    Opts::new(
                        "cadre_rate_limit_per_second",
                        "Configured rate limits (`tool:<name>`, `host:<name>`).",
                    ),
                    &["limit"],
                )?,
            )?,
            rate_limited_total: counter(
                "cadre_rate_limited_total",
                "Steps that had to wait for a rate limit.",
                &["limit"],
            )?,
            rate_limit_wait_seconds_total: register(
                r,
                CounterVec::new(
                    Opts::new(
                        "cadre_rate_limit_wait_seconds_total",
                        "Time steps waited for a rate limit.",
                    ),
                    &["limit"],
                )?,
            )?,
            audit_base: std::sync::atomic::AtomicU64::new(0),
            sync_lock: std::sync::Mutex::new(()),
            registry,
        })
    }
}

fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> Result<C, prometheus::Error> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}
