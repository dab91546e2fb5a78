//! The resume benchmark: N tasks held mid-step (an HTTP step to a server that accepts and
//! never answers), then the node is SIGKILLed and restarted. Reports the RSS those N live
//! tasks add and how long a restarted node takes to have every one of them running again.
//!
//! `cargo run -p chaos-tests --bin bench_resume -- [tasks]`

use std::time::{Duration, Instant};

use chaos_tests::{CadreNode, NatsServer, eventually, metric};
use serde_json::json;

const PLAYBOOK: &str = r#"
name = "hang"
[[steps]]
id = "call"
tool = "http.request"
timeout_ms = 3600000
params = { method = "POST", url = "{{input.url}}/slow", json = { n = "{{input.n}}" } }
verify = { status_in = [200] }
"#;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let tasks: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    // A server that accepts connections and never answers: every step stays in flight.
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", sink.local_addr()?);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = sink.accept().await {
            held.push(conn);
        }
    });
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let dir = tempfile::tempdir()?;
    let playbooks = dir.path().join("playbooks");
    std::fs::create_dir_all(&playbooks)?;
    std::fs::write(playbooks.join("hang.toml"), PLAYBOOK)?;
    let pb = playbooks.display().to_string();
    let mut node = CadreNode::start(
        "resume",
        &dir.path().join("data"),
        &nats.url,
        &[("CADRE_PLAYBOOKS_DIR", &pb)],
    )?;
    node.wait_ready(&client).await?;
    let rss_idle = node.rss_kib();

    let submitted = Instant::now();
    let bodies =
        (0..tasks).map(|n| json!({"playbook": "hang", "input": {"url": url, "n": n}}).to_string());
    chaos_tests::submit_many(&client, bodies, 256).await;
    eventually(Duration::from_secs(300), "every task running", || async {
        (in_flight(&node).await >= tasks).then_some(())
    })
    .await?;
    let accept_secs = submitted.elapsed().as_secs_f64();
    let rss_loaded = node.rss_kib();

    node.kill9();
    let restarted = Instant::now();
    node.restart()?;
    node.wait_ready(&client).await?;
    let ready_secs = restarted.elapsed().as_secs_f64();
    eventually(Duration::from_secs(300), "every task resumed", || async {
        (in_flight(&node).await >= tasks).then_some(())
    })
    .await?;
    let resumed_secs = restarted.elapsed().as_secs_f64();
    let rss_resumed = node.rss_kib();

    println!("bench_resume: {tasks} tasks, each with a live TaskActor and an HTTP step in flight");
    println!("submitted and running in {accept_secs:.1} s");
    println!(
        "RSS: {} MiB idle, {} MiB with {tasks} tasks (+{:.1} MiB, {:.1} KiB per task)",
        rss_idle / 1024,
        rss_loaded / 1024,
        (rss_loaded.saturating_sub(rss_idle)) as f64 / 1024.0,
        (rss_loaded.saturating_sub(rss_idle)) as f64 / tasks as f64
    );
    println!(
        "after SIGKILL: ready in {ready_secs:.2} s, all {tasks} tasks resumed {resumed_secs:.2} s after restart (RSS {} MiB)",
        rss_resumed / 1024
    );
    node.kill9();
    Ok(())
}

/// TaskActors running on the node, from its metrics.
async fn in_flight(node: &CadreNode) -> usize {
    node.metrics()
        .await
        .map(|m| metric(&m, "cadre_tasks_in_flight") as usize)
        .unwrap_or(0)
}
