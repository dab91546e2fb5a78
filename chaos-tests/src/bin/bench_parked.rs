//! The parking benchmark: what N tasks waiting for an operator cost a node.
//!
//! N tasks start an `unsafe` step (`shell.run sleep`), the node is SIGKILLed mid-step and
//! restarted: every step is now an effect with an unknown outcome, and every task parks
//! in `awaiting_operator`. Reports the restarted node's RSS against a fresh node's.
//!
//! `cargo run -p chaos-tests --bin bench_parked -- [tasks]`

use std::time::{Duration, Instant};

use chaos_tests::{CadreNode, NatsServer, eventually, metric};
use serde_json::json;

/// An argument no other `sleep` on the machine has, so the cleanup kills only ours.
const SLEEP_ARG: &str = "3599.25";
/// Tasks parked per kill.
const WAVE_MAX: usize = 5_000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let tasks: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let dir = tempfile::tempdir()?;
    let playbooks = dir.path().join("playbooks");
    std::fs::create_dir_all(&playbooks)?;
    std::fs::write(
        playbooks.join("park.toml"),
        format!(
            "name = \"park\"\n[[steps]]\nid = \"run\"\ntool = \"shell.run\"\ntimeout_ms = 3600000\n\
             params = {{ program = \"sleep\", args = [\"{SLEEP_ARG}\"] }}\nverify = {{ exit_code = 0 }}\n"
        ),
    )?;
    let pb = playbooks.display().to_string();
    let limit = (tasks + 1).to_string();
    let env = [
        ("CADRE_PLAYBOOKS_DIR", pb.as_str()),
        ("CADRE_SHELL_ALLOW", "sleep"),
        ("CADRE_EXEC_CONCURRENCY_MAX", limit.as_str()),
        ("CADRE_MAILBOX_DEPTH_MAX", limit.as_str()),
    ];
    let mut node = CadreNode::start("parked", &dir.path().join("data"), &nats.url, &env)?;
    node.wait_ready(&client).await?;
    let rss_fresh = node.rss_kib();

    // In waves: each running `sleep` holds pipes, and this VM caps open files at 20,000.
    let mut parked = 0;
    let mut parked_secs = 0.0;
    while parked < tasks {
        let wave = WAVE_MAX.min(tasks - parked);
        let bodies = (0..wave).map(|_| json!({"playbook": "park"}).to_string());
        chaos_tests::submit_many(&client, bodies, 256).await;
        eventually(Duration::from_secs(600), "every step running", || async {
            let m = node.metrics().await.ok()?;
            (metric_labelled(&m, "cadre_steps_in_flight", "shell.run") as usize >= wave)
                .then_some(())
        })
        .await?;
        node.kill9();
        let _ = std::process::Command::new("pkill")
            .args(["-f", &format!("sleep {SLEEP_ARG}")])
            .status();
        let restarted = Instant::now();
        node.restart()?;
        node.wait_ready(&client).await?;
        eventually(
            Duration::from_secs(600),
            "every task of the wave parked",
            || async {
                let m = node.metrics().await.ok()?;
                let unknown =
                    metric_labelled(&m, "cadre_effects_outcome_unknown_total", "shell.run")
                        as usize;
                (unknown >= wave && metric(&m, "cadre_tasks_in_flight") == 0.0).then_some(())
            },
        )
        .await?;
        parked_secs = restarted.elapsed().as_secs_f64();
        parked += wave;
    }
    let rss_parked = node.rss_kib();
    // What stays once the burst of resuming them is over (the node trims its heap every 5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let rss_settled = node.rss_kib();
    let list = chaos_tests::request(
        &client,
        "cadre.tasks.list",
        json!({"status": "awaiting_operator", "limit": 500}).to_string(),
    )
    .await?;

    // Once more: a node that starts with the tasks already parked resumes none of them.
    node.kill9();
    node.restart()?;
    node.wait_ready(&client).await?;
    let resumed = node
        .metrics()
        .await
        .map(|m| metric(&m, "cadre_tasks_in_flight"))
        .unwrap_or(-1.0);
    let rss_cold = node.rss_kib();

    println!(
        "bench_parked: {tasks} tasks parked in awaiting_operator (outcome unknown after SIGKILL)"
    );
    println!(
        "last wave: restart to all parked {parked_secs:.2} s; list shows {} parked on its first page",
        list["tasks"].as_array().map(Vec::len).unwrap_or(0)
    );
    println!(
        "RSS: fresh node {} MiB; right after parking {tasks} tasks {} MiB (+{:.1} MiB, includes the heap left from resuming them)",
        rss_fresh / 1024,
        rss_parked / 1024,
        rss_parked.saturating_sub(rss_fresh) as f64 / 1024.0
    );
    println!(
        "RSS 6 s later: {} MiB (+{:.1} MiB)",
        rss_settled / 1024,
        rss_settled.saturating_sub(rss_fresh) as f64 / 1024.0
    );
    println!(
        "restarted again with {tasks} tasks already parked: {} MiB (+{:.1} MiB), {resumed} task actors started",
        rss_cold / 1024,
        rss_cold.saturating_sub(rss_fresh) as f64 / 1024.0
    );
    node.kill9();
    Ok(())
}

/// A series with one label value, e.g. `cadre_steps_in_flight{tool="shell.run"}`.
fn metric_labelled(text: &str, name: &str, value: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&format!("\"{value}\"")))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
