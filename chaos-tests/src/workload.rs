//! The chaos suite's workload: a three-step playbook touching a file, an HTTP sink
//! (keyed) and a counted `unsafe` script; waiting for every task to end (answering an
//! unknown unsafe outcome from the script's own log, as an operator would); and the
//! invariants checked after every run.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::{HttpSink, eventually, request};

/// Rank of a status along the happy path (a task never moves to a lower one).
pub fn rank(status: &str) -> Option<u8> {
    Some(match status {
        "accepted" => 0,
        "planning" => 1,
        "running" | "awaiting_operator" | "awaiting_approval" | "compensating" => 2,
        "verifying" => 3,
        "archiving" => 4,
        "succeeded" | "failed" | "cancelled" => 5,
        _ => return None,
    })
}

pub fn seed() -> anyhow::Result<u64> {
    let seed: u64 = match std::env::var("CADRE_CHAOS_SEED") {
        Ok(s) => s.parse()?,
        Err(_) => rand::random(),
    };
    println!("chaos seed: {seed} (replay with CADRE_CHAOS_SEED={seed})");
    Ok(seed)
}

/// Every task the node lists, page by page.
pub async fn all_tasks(client: &async_nats::Client) -> anyhow::Result<Vec<Value>> {
    let (mut tasks, mut before) = (Vec::new(), None::<String>);
    loop {
        let req = json!({"limit": 500, "before": before});
        let page = request(client, "cadre.tasks.list", req.to_string()).await?;
        tasks.extend(page["tasks"].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            Some(next) => before = Some(next.to_string()),
            None => return Ok(tasks),
        }
    }
}

/// A three-step playbook touching a file, an HTTP sink (keyed) and a counted unsafe
/// script, and what a node needs to run it.
pub struct Rig {
    pub sink: HttpSink,
    pub dir: tempfile::TempDir,
    pub roots: String,
    pub script: String,
    pub record: String,
    pub playbooks: String,
}

impl Rig {
    pub async fn new() -> anyhow::Result<Rig> {
        let sink = HttpSink::start().await?;
        let dir = tempfile::tempdir()?;
        let (script, record) = crate::unsafe_recorder(dir.path())?;
        let chaos = r#"
name = "chaos"
[[steps]]
id = "note"
tool = "file.write"
params = { path = "{{input.root}}/{{task.id}}.txt", content = "{{input.n}}" }
verify = { file_exists = true }
[[steps]]
id = "crm"
tool = "http.request"
depends_on = ["note"]
params = { method = "POST", url = "{{input.url}}/clients", json = { n = "{{input.n}}" } }
verify = { status_in = [201] }
[[steps]]
id = "unsafe"
tool = "shell.run"
depends_on = ["crm"]
params = { program = "{{input.script}}", args = ["{{task.id}}", "{{input.record}}"] }
verify = { exit_code = 0 }
"#;
        let (roots, playbooks) = crate::files_and_playbooks(dir.path(), &[("chaos", chaos)])?;
        Ok(Rig {
            sink,
            roots,
            script: script.display().to_string(),
            record: record.display().to_string(),
            playbooks,
            dir,
        })
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn env<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut env = vec![
            ("CADRE_FILE_ROOTS", self.roots.as_str()),
            ("CADRE_PLAYBOOKS_DIR", self.playbooks.as_str()),
            ("CADRE_SHELL_ALLOW", self.script.as_str()),
            ("CADRE_RETRY_DELAY_MS_BASE", "20"),
            ("CADRE_RETRY_DELAY_MS_MAX", "200"),
            ("CADRE_HOP_TIMEOUT_MS", "1000"),
        ];
        env.extend_from_slice(extra);
        env
    }

    pub fn submit(&self, n: usize) -> String {
        let input = json!({"n": n.to_string(), "url": self.sink.url, "root": self.roots,
                           "script": self.script, "record": self.record});
        json!({"playbook": "chaos", "input": input, "idempotency_key": format!("chaos-{n}")})
            .to_string()
    }

    /// Waits until all `submitted` tasks are terminal. An unsafe step caught mid-flight
    /// asks a person; this answers from the effect's evidence, through the approval it
    /// raised.
    pub async fn settle(
        &self,
        client: &async_nats::Client,
        submitted: usize,
        within: Duration,
    ) -> anyhow::Result<Vec<Value>> {
        eventually(within, "every task terminal", || async {
            let tasks = all_tasks(client).await.ok()?;
            for t in tasks.iter().filter(|t| t["status"] == "awaiting_operator") {
                let id = t["task_id"].as_str()?;
                let view = request(
                    client,
                    "cadre.tasks.get",
                    json!({"task_id": id}).to_string(),
                )
                .await
                .ok()?;
                let Some(approval) = view["steps"][2]["approval"]["approval_id"].as_str() else {
                    continue;
                };
                let ran = std::fs::read_to_string(&self.record)
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l == id);
                let decision = if ran { "mark_done" } else { "retry" };
                let req =
                    json!({"approval_id": approval, "decision": decision, "by": "chaos-test"});
                let _ = request(client, "cadre.approvals.decide", req.to_string()).await;
            }
            (tasks.len() == submitted
                && tasks
                    .iter()
                    .all(|t| crate::is_terminal(t["status"].as_str().unwrap_or(""))))
            .then_some(tasks)
        })
        .await
    }

    /// The invariants, over every task: succeeded; the unsafe step ran exactly once; the
    /// status never moved backwards; every sink request carried a known step's key; the
    /// audit chain verifies.
    ///
    /// With several nodes, each node's audit chain is verified, and the fencing tokens
    /// the sink saw for each key must never go back.
    pub async fn check(
        &self,
        client: &async_nats::Client,
        nodes: &[&str],
        tasks: &[Value],
        seed: u64,
    ) -> anyhow::Result<()> {
        let unsafe_runs = crate::unsafe_runs(std::path::Path::new(&self.record))?;
        for t in tasks {
            let id = t["task_id"].as_str().unwrap_or_default();
            assert_eq!(t["status"], "succeeded", "seed {seed}: {t:#}");
            assert_eq!(
                unsafe_runs.get(id).copied(),
                Some(1),
                "seed {seed}: the unsafe step of {id} ran {:?} times",
                unsafe_runs.get(id)
            );
            // In a cluster, gathered from every node's audit chain: a node just back
            // from a fault may not be asked or may not answer in time, so the trace is
            // read again (bounded) until it holds the task's end.
            let ranks = eventually(
                Duration::from_secs(15),
                &format!("seed {seed}: the trace of {id} to reach `succeeded`"),
                || async {
                    let records = crate::trace_records(client, id).await.ok()?;
                    let ranks: Vec<u8> = records
                        .iter()
                        .filter_map(|r| r["action"].as_str().and_then(rank))
                        .collect();
                    (ranks.last() == Some(&5)).then_some(ranks)
                },
            )
            .await?;
            assert!(
                ranks.windows(2).all(|w| w[0] <= w[1]),
                "seed {seed}: {id} moved backwards: {ranks:?}"
            );
        }
        // Every request that reached the outside world carried its step's key, so a
        // retried call is recognisable: one key per task, each of a known task.
        let known: std::collections::HashSet<String> = tasks
            .iter()
            .filter_map(|t| t["task_id"].as_str().map(|id| format!("{id}.crm")))
            .collect();
        for r in &self.sink.requests() {
            let key = r.idempotency_key.clone().unwrap_or_default();
            assert!(
                known.contains(&key),
                "seed {seed}: a request without a task's key: {key:?}"
            );
        }
        for node_id in nodes {
            let verify: Value =
                request(client, &format!("cadre.audit.{node_id}.verify"), "{}").await?;
            assert_eq!(verify["ok"], true, "seed {seed}: {node_id}: {verify:#}");
        }
        if nodes.len() > 1 {
            self.sink
                .check_fencing()
                .map_err(|e| anyhow::anyhow!("seed {seed}: {e}"))?;
        }
        Ok(())
    }
}

/// A task submitted once a fault is over (`body`, retried until a node accepts it), then
/// waited for until it succeeds: its success is the recovery. Returns the task's id and
/// how long it took to be accepted.
pub async fn probe(
    client: &async_nats::Client,
    body: String,
    within: Duration,
) -> anyhow::Result<(String, Duration)> {
    let started = std::time::Instant::now();
    let id = eventually(within, "the probe accepted", || {
        let (body, client) = (body.clone(), client.clone());
        async move {
            let r = request(&client, "cadre.tasks.submit", body).await.ok()?;
            r["task_id"].as_str().map(str::to_string)
        }
    })
    .await?;
    let accepted = started.elapsed();
    eventually(within, "the probe succeeded", || async {
        let get = json!({"task_id": id}).to_string();
        let t = request(client, "cadre.tasks.get", get).await.ok()?;
        (t["status"] == "succeeded").then_some(())
    })
    .await?;
    Ok((id, accepted))
}

/// Prints a task's timeline from `cadre.tasks.trace` as `cadre task trace` does: for a
/// probe that was slow.
pub async fn print_timeline(client: &async_nats::Client, task_id: &str) {
    let get = json!({"task_id": task_id}).to_string();
    match request(client, "cadre.tasks.trace", get)
        .await
        .and_then(|v| Ok(serde_json::from_value::<actors::protocol::TraceReply>(v)?))
    {
        Ok(trace) => node::cli::print_trace(&trace),
        Err(e) => println!("  (no trace for {task_id}: {e})"),
    }
}

/// Recovery times per fault kind as `Kind: n=… median … max …`, sorted.
pub fn recovery_summary<K: std::fmt::Debug>(
    recoveries: &std::collections::HashMap<K, Vec<Duration>>,
) -> Vec<String> {
    let mut summary: Vec<String> = recoveries
        .iter()
        .map(|(f, d)| {
            let mut d = d.clone();
            d.sort();
            format!(
                "{f:?}: n={} median {:?} max {:?}",
                d.len(),
                d[d.len() / 2],
                d[d.len() - 1]
            )
        })
        .collect();
    summary.sort();
    summary
}
