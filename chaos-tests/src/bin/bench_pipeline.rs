//! The pipeline benchmark: N tasks of a 4-step `file.write` playbook through a real
//! `cadre` node and a real nats-server. Reports sequential submit→succeeded p50/p99,
//! sustained tasks/s at a given concurrency, synced commits and fsyncs per task, RSS.
//!
//! `cargo run -p chaos-tests --bin bench_pipeline -- [sequential_tasks] [throughput_tasks] [in_flight]`
//! (`BENCH_CLUSTER=1`: the node in cluster mode. `BENCH_TRACE=n`: after the sequential
//! phase, n more tasks run one at a time under a `>` subscription, and the median time
//! from submit at which each message of a task crossed the server is printed: where the
//! sequential latency goes, hop by hop.)

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chaos_tests::{CadreNode, NatsServer};
use futures::StreamExt;
use serde_json::json;

const PLAYBOOK: &str = r#"
name = "bench4"
[[steps]]
id = "s1"
tool = "file.write"
params = { path = "{{input.root}}/{{task.id}}-1.txt", content = "one" }
verify = { file_exists = true }
[[steps]]
id = "s2"
tool = "file.write"
depends_on = ["s1"]
params = { path = "{{input.root}}/{{task.id}}-2.txt", content = "two" }
verify = { file_exists = true }
[[steps]]
id = "s3"
tool = "file.write"
depends_on = ["s2"]
params = { path = "{{input.root}}/{{task.id}}-3.txt", content = "three" }
verify = { file_exists = true }
[[steps]]
id = "s4"
tool = "file.write"
depends_on = ["s3"]
params = { path = "{{input.root}}/{{task.id}}-4.txt", content = "four" }
verify = { file_exists = true }
"#;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sequential = args.first().copied().unwrap_or(300);
    let throughput = args.get(1).copied().unwrap_or(5000);
    let in_flight = args.get(2).copied().unwrap_or(256);
    let fsync = std::env::var("BENCH_FILE_FSYNC").unwrap_or_else(|_| "true".into());

    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let dir = tempfile::tempdir()?;
    // BENCH_FILES_DIR=/dev/shm puts the files the steps write on tmpfs (the store stays on
    // disk): it separates Cadre's cost from the file system's cost of creating inodes.
    let files_parent = match std::env::var("BENCH_FILES_DIR") {
        Ok(d) => tempfile::tempdir_in(d)?,
        Err(_) => tempfile::tempdir_in(dir.path())?,
    };
    let files = files_parent.path().canonicalize()?;
    let playbooks = dir.path().join("playbooks");
    std::fs::create_dir_all(&playbooks)?;
    std::fs::write(playbooks.join("bench4.toml"), PLAYBOOK)?;
    let (roots, pb) = (files.display().to_string(), playbooks.display().to_string());
    let mut env = vec![
        ("CADRE_FILE_ROOTS", roots.as_str()),
        ("CADRE_PLAYBOOKS_DIR", pb.as_str()),
        ("CADRE_FILE_FSYNC", fsync.as_str()),
    ];
    // BENCH_POLICIES_DIR="" runs the built-in policies (the harness's default is one
    // `permit`): the cost of the policies a user really runs.
    let policies = std::env::var("BENCH_POLICIES_DIR").ok();
    if let Some(dir) = &policies {
        env.push(("CADRE_POLICIES_DIR", dir.as_str()));
    }
    // BENCH_CLUSTER=1 runs the node in cluster mode: a lease per task, every checkpoint
    // replicated through JetStream, the fencing check before every effect.
    if std::env::var("BENCH_CLUSTER").is_ok_and(|v| v == "1") {
        env.push(("CADRE_CLUSTER", "true"));
    }
    let mut node = CadreNode::start("bench", &dir.path().join("data"), &nats.url, &env)?;
    node.wait_ready(&client).await?;
    let rss_idle = node.rss_kib();
    let input = json!({"playbook": "bench4", "input": {"root": roots}}).to_string();

    // Done-notifications: one subscription for every task's `succeeded` event.
    let mut done = client.subscribe("cadre.events.task.*.succeeded").await?;

    // Sequential: one task at a time, submit → succeeded.
    let (c0, f0) = store_counters(&node).await?;
    let h0 = Hists::scrape(&node).await?;
    let mut latencies = Vec::with_capacity(sequential);
    let mut accepted = Vec::with_capacity(sequential);
    for _ in 0..sequential {
        let started = Instant::now();
        let reply = chaos_tests::request(&client, "cadre.tasks.submit", input.clone()).await?;
        accepted.push(started.elapsed());
        let id = reply["task_id"].as_str().unwrap_or_default().to_string();
        wait_succeeded(&mut done, &id).await?;
        latencies.push(started.elapsed());
    }
    let (c1, f1) = store_counters(&node).await?;
    let h1 = Hists::scrape(&node).await?;
    latencies.sort();
    accepted.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];

    let trace_tasks: usize = std::env::var("BENCH_TRACE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if trace_tasks > 0 {
        trace(&client, &input, &mut done, trace_tasks).await?;
    }

    // Throughput: keep `in_flight` tasks going until `throughput` have succeeded.
    let cpu0 = node.pid().map(cpu_ms).unwrap_or(0.0);
    let started = Instant::now();
    let mut submitted = 0;
    let mut finished = 0;
    let mut pending: HashMap<String, ()> = HashMap::new();
    let mut submits = futures::stream::FuturesUnordered::new();
    while finished < throughput {
        while submitted < throughput && pending.len() + submits.len() < in_flight {
            let client = client.clone();
            let input = input.clone();
            submits.push(async move {
                chaos_tests::request(&client, "cadre.tasks.submit", input).await
            });
            submitted += 1;
        }
        tokio::select! {
            Some(reply) = submits.next() => {
                let reply = reply?;
                pending.insert(reply["task_id"].as_str().unwrap_or_default().to_string(), ());
            }
            msg = done.next() => {
                let msg = msg.ok_or_else(|| anyhow::anyhow!("events ended"))?;
                let id = msg.subject.as_str().split('.').nth(3).unwrap_or_default().to_string();
                if pending.remove(&id).is_some() { finished += 1; }
            }
        }
    }
    let elapsed = started.elapsed();
    let cpu = node.pid().map(cpu_ms).unwrap_or(0.0) - cpu0;
    let (c2, f2) = store_counters(&node).await?;
    let rss_after = node.rss_kib();

    println!(
        "bench_pipeline: 4-step file.write playbook, real nats-server + cadre, file_fsync={fsync}, files in {}",
        files.display()
    );
    println!(
        "sequential ({sequential} tasks): p50 {:.2} ms, p99 {:.2} ms; synced commits/task {:.2}, fsyncs/task {:.2}",
        ms(pct(0.50)),
        ms(pct(0.99)),
        (c1 - c0) as f64 / sequential as f64,
        (f1 - f0) as f64 / sequential as f64
    );
    println!(
        "  of which: submit → accepted p50 {:.2} ms; means per task: commit wait {:.2} ms × {:.1}, step attempt (dispatch → executor reply) {:.2} ms × {:.1}",
        ms(accepted[accepted.len() / 2]),
        h1.mean_ms(&h0, "cadre_commit_seconds"),
        h1.count(&h0, "cadre_commit_seconds") / sequential as f64,
        h1.mean_ms(&h0, "cadre_step_duration_seconds"),
        h1.count(&h0, "cadre_step_duration_seconds") / sequential as f64,
    );
    println!(
        "throughput ({throughput} tasks, {in_flight} in flight): {:.0} tasks/s; synced commits/task {:.2}, fsyncs/task {:.2}",
        throughput as f64 / elapsed.as_secs_f64(),
        (c2 - c1) as f64 / throughput as f64,
        (f2 - f1) as f64 / throughput as f64
    );
    println!(
        "  node CPU per task {:.2} ms ({:.2} CPUs busy)",
        cpu / throughput as f64,
        cpu / 1000.0 / elapsed.as_secs_f64()
    );
    println!(
        "cadre RSS: {} MiB idle, {} MiB after",
        rss_idle / 1024,
        rss_after / 1024
    );
    node.terminate(Duration::from_secs(30))?;
    Ok(())
}

/// Waits for task `id`'s `succeeded` event on `done`, skipping other tasks'.
async fn wait_succeeded(done: &mut async_nats::Subscriber, id: &str) -> anyhow::Result<()> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), done.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("events ended"))?;
        if msg.subject.as_str().contains(id) {
            return Ok(());
        }
    }
}

/// Runs `tasks` tasks one at a time while a `>` subscription timestamps every message,
/// and prints, for each message of a task (named by its subject without ids, and its
/// occurrence), the median time after submit at which it arrived here.
async fn trace(
    client: &async_nats::Client,
    input: &str,
    done: &mut async_nats::Subscriber,
    tasks: usize,
) -> anyhow::Result<()> {
    let mut all = client.subscribe(">").await?;
    client.flush().await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(msg) = all.next().await {
            if tx.send((Instant::now(), msg.subject.to_string())).is_err() {
                return;
            }
        }
    });
    let mut arrivals: HashMap<String, Vec<f64>> = HashMap::new();
    for _ in 0..tasks {
        let started = Instant::now();
        let reply = chaos_tests::request(client, "cadre.tasks.submit", input.to_string()).await?;
        let id = reply["task_id"].as_str().unwrap_or_default().to_string();
        wait_succeeded(done, &id).await?;
        // What the task caused that is still on its way (audit batches) arrives too.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut seen: HashMap<String, usize> = HashMap::new();
        while let Ok((at, subject)) = rx.try_recv() {
            let name = subject
                .split('.')
                .map(|part| if part == id { "<task>" } else { part })
                .collect::<Vec<_>>()
                .join(".");
            let name = match name.strip_prefix("_INBOX.") {
                Some(_) => "_INBOX (a reply)".to_string(),
                None => name,
            };
            let n = seen.entry(name.clone()).or_insert(0);
            *n += 1;
            arrivals
                .entry(format!("{name} #{n}"))
                .or_default()
                .push(ms(at.saturating_duration_since(started)));
        }
    }
    reader.abort();
    let mut rows: Vec<(f64, String, usize)> = arrivals
        .into_iter()
        .map(|(name, mut at)| {
            at.sort_by(f64::total_cmp);
            (at[at.len() / 2], name, at.len())
        })
        .collect();
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    println!("trace ({tasks} tasks): median ms after submit at which each message arrived");
    let mut last = 0.0;
    for (at, name, n) in rows {
        println!("  {at:7.3} (+{:.3})  {name}  [{n}]", at - last);
        last = at;
    }
    Ok(())
}

/// User + system CPU time of process `pid` so far, in ms (from /proc, in clock ticks of
/// 10 ms: read it over seconds, not milliseconds).
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime, fields 14 and 15 of stat(5): the 12th and 13th after the name.
    (ticks(11) + ticks(12)) * 10.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (synced commits, fsyncs) from the node's /metrics.
async fn store_counters(node: &CadreNode) -> anyhow::Result<(u64, u64)> {
    let metrics = node.metrics().await?;
    Ok((
        chaos_tests::metric(&metrics, "cadre_store_commits_total") as u64,
        chaos_tests::metric(&metrics, "cadre_store_fsyncs_total") as u64,
    ))
}

/// Sums and counts of the node's histograms (over every label set), to say where the
/// sequential latency goes.
struct Hists(HashMap<String, f64>);

impl Hists {
    async fn scrape(node: &CadreNode) -> anyhow::Result<Hists> {
        let text = node.metrics().await?;
        let mut sums = HashMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let mut parts = line.split_whitespace();
            let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            let name = name.split('{').next().unwrap_or(name);
            if name.ends_with("_sum") || name.ends_with("_count") {
                *sums.entry(name.to_string()).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
            }
        }
        Ok(Hists(sums))
    }

    fn delta(&self, before: &Hists, key: &str) -> f64 {
        self.0.get(key).copied().unwrap_or(0.0) - before.0.get(key).copied().unwrap_or(0.0)
    }

    fn count(&self, before: &Hists, name: &str) -> f64 {
        self.delta(before, &format!("{name}_count"))
    }

    fn mean_ms(&self, before: &Hists, name: &str) -> f64 {
        let n = self.count(before, name);
        if n == 0.0 {
            0.0
        } else {
            self.delta(before, &format!("{name}_sum")) * 1000.0 / n
        }
    }
}
