//! The series the actors move. Names follow Prometheus conventions: `cadre_` prefix,
//! `_total` for counters, base units (`_seconds`, `_bytes`).

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

pub struct Metrics {
    pub registry: Registry,
    pub tasks_submitted_total: IntCounterVec,
    pub tasks_finished_total: IntCounterVec,
    pub task_duration_seconds: HistogramVec,
    pub step_duration_seconds: HistogramVec,
    pub step_retries_total: IntCounterVec,
    pub step_failures_total: IntCounterVec,
    pub tasks_in_flight: IntGauge,
    pub steps_in_flight: IntGaugeVec,
    pub actor_restarts_total: IntCounterVec,
    pub outbox_backlog: IntGauge,
    pub effects_outcome_unknown_total: IntCounterVec,
    pub input_rejected_total: IntCounterVec,
    pub commit_seconds: Histogram,
    /// Set from the store's counters at scrape time.
    pub store_commits: IntGauge,
    pub store_fsyncs: IntGauge,
    pub store_size_bytes: IntGauge,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0, 5.0, 10.0,
    30.0, 60.0,
];

impl Metrics {
    /// Counts a request refused with an error reply.
    pub fn rejected(&self, subject: &str, code: crate::protocol::ErrorCode) {
        self.input_rejected_total
            .with_label_values(&[subject, code.as_str()])
            .inc();
    }

    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let histogram =
            |name: &str, help: &str, labels: &[&str]| -> Result<HistogramVec, prometheus::Error> {
                let h = HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                    labels,
                )?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let tasks_submitted_total = counter(
            "cadre_tasks_submitted_total",
            "Tasks accepted by intake.",
            &["playbook"],
        )?;
        let tasks_finished_total = counter(
            "cadre_tasks_finished_total",
            "Tasks that reached a terminal status.",
            &["playbook", "status"],
        )?;
        let task_duration_seconds = histogram(
            "cadre_task_duration_seconds",
            "Submit to terminal status.",
            &["playbook", "status"],
        )?;
        let step_duration_seconds = histogram(
            "cadre_step_duration_seconds",
            "One attempt of a step, dispatch to executor reply.",
            &["tool"],
        )?;
        let step_retries_total = counter(
            "cadre_step_retries_total",
            "Step attempts retried.",
            &["tool"],
        )?;
        let step_failures_total = counter(
            "cadre_step_failures_total",
            "Steps failed for good.",
            &["tool"],
        )?;
        let actor_restarts_total = counter(
            "cadre_actor_restarts_total",
            "Actors restarted by a supervisor.",
            &["actor"],
        )?;
        let effects_outcome_unknown_total = counter(
            "cadre_effects_outcome_unknown_total",
            "Unsafe effects found in `intent` after a crash.",
            &["tool"],
        )?;
        let input_rejected_total = counter(
            "cadre_input_rejected_total",
            "Requests refused with an error reply.",
            &["subject", "code"],
        )?;
        let tasks_in_flight = IntGauge::new(
            "cadre_tasks_in_flight",
            "Non-terminal tasks with a running TaskActor.",
        )?;
        registry.register(Box::new(tasks_in_flight.clone()))?;
        let steps_in_flight = IntGaugeVec::new(
            Opts::new("cadre_steps_in_flight", "Steps executing on this node."),
            &["tool"],
        )?;
        registry.register(Box::new(steps_in_flight.clone()))?;
        let outbox_backlog = IntGauge::new(
            "cadre_outbox_backlog",
            "Committed messages not yet published.",
        )?;
        registry.register(Box::new(outbox_backlog.clone()))?;
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new("cadre_commit_seconds", "Synced commit of one transition.")
                .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(commit_seconds.clone()))?;
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let store_commits = gauge(
            "cadre_store_synced_commits",
            "Synced commits requested since start (one per transition).",
        )?;
        let store_fsyncs = gauge(
            "cadre_store_fsyncs",
            "fsyncs issued by the group-commit writer since start.",
        )?;
        let store_size_bytes = gauge(
            "cadre_store_size_bytes",
            "Approximate size of the RocksDB SST files.",
        )?;
        Ok(Metrics {
            registry,
            tasks_submitted_total,
            tasks_finished_total,
            task_duration_seconds,
            step_duration_seconds,
            step_retries_total,
            step_failures_total,
            tasks_in_flight,
            steps_in_flight,
            actor_restarts_total,
            outbox_backlog,
            effects_outcome_unknown_total,
            input_rejected_total,
            commit_seconds,
            store_commits,
            store_fsyncs,
            store_size_bytes,
        })
    }
}
