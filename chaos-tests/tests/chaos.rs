//! The chaos suite's short mode: one real node and a real nats-server, tasks flowing,
//! faults from a seeded schedule — SIGKILL the node, freeze it (SIGSTOP) and thaw it,
//! kill and restart nats-server — each hitting a batch of tasks in flight (enqueued on the
//! durable intake stream just before), and after every fault a probe task whose success
//! measures the recovery. Then the invariants: every accepted task
//! succeeded; no `unsafe` effect ran twice; every request the HTTP sink saw carried its
//! step's idempotency key; no task's status moved backwards; the audit chain holds. The
//! seed is printed; `CADRE_CHAOS_SEED=<seed>` replays the schedule. docs/RELIABILITY.md
//! has the scenarios and the figures.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chaos_tests::{CadreNode, HttpSink, NatsServer, eventually, request};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const FAULTS: usize = 9;
const BATCH: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Fault {
    KillNode,
    FreezeNode,
    RestartNats,
}

/// Rank of a status along the happy path (a task never moves to a lower one).
fn rank(status: &str) -> Option<u8> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_faults_lose_nothing_repeat_no_effect_and_recover() -> anyhow::Result<()> {
    let seed: u64 = match std::env::var("CADRE_CHAOS_SEED") {
        Ok(s) => s.parse()?,
        Err(_) => rand::random(),
    };
    println!("chaos seed: {seed} (replay with CADRE_CHAOS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);

    let mut nats = NatsServer::start()?;
    let client = nats.client().await?;
    let sink = HttpSink::start().await?;
    let dir = tempfile::tempdir()?;
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files)?;
    let roots = files.canonicalize()?.display().to_string();
    let (script, record) = chaos_tests::unsafe_recorder(dir.path())?;
    let (script, record) = (script.display().to_string(), record.display().to_string());
    let playbooks = dir.path().join("playbooks");
    std::fs::create_dir_all(&playbooks)?;
    std::fs::write(
        playbooks.join("chaos.toml"),
        r#"
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
"#,
    )?;
    let pb = playbooks.display().to_string();
    let env = [
        ("CADRE_FILE_ROOTS", roots.as_str()),
        ("CADRE_PLAYBOOKS_DIR", pb.as_str()),
        ("CADRE_SHELL_ALLOW", script.as_str()),
        ("CADRE_RETRY_DELAY_MS_BASE", "20"),
        ("CADRE_RETRY_DELAY_MS_MAX", "200"),
        ("CADRE_HOP_TIMEOUT_MS", "1000"),
    ];
    let mut node = CadreNode::start("chaos", &dir.path().join("data"), &nats.url, &env)?;
    node.wait_ready(&client).await?;

    let mut submitted = 0usize;
    let submit = |n: usize| {
        let input = json!({"n": n.to_string(), "url": sink.url, "root": roots,
                           "script": script, "record": record});
        json!({"playbook": "chaos", "input": input, "idempotency_key": format!("chaos-{n}")})
            .to_string()
    };
    let mut recoveries: HashMap<Fault, Vec<Duration>> = HashMap::new();
    for i in 0..FAULTS {
        let fault = match rng.random_range(0..3) {
            0 => Fault::KillNode,
            1 => Fault::FreezeNode,
            _ => Fault::RestartNats,
        };
        let held_ms = rng.random_range(50..800);
        // Work in flight when the fault hits: enqueued durably, so none of it needs the
        // node up to be accepted.
        let js = async_nats::jetstream::new(client.clone());
        for n in submitted..submitted + BATCH {
            js.publish("cadre.tasks.enqueue", submit(n).into())
                .await?
                .await?;
        }
        submitted += BATCH;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await; // the schedule
        match fault {
            Fault::KillNode => {
                node.kill9();
                tokio::time::sleep(Duration::from_millis(held_ms)).await; // down for this long
                node.restart()?;
            }
            Fault::FreezeNode => {
                node.freeze();
                tokio::time::sleep(Duration::from_millis(held_ms)).await; // frozen for this long
                node.thaw();
            }
            Fault::RestartNats => {
                nats.kill();
                tokio::time::sleep(Duration::from_millis(held_ms)).await; // broker down
                nats.respawn()?;
            }
        }
        let ended = Instant::now();
        // A probe submitted once the fault is over: its success is the recovery.
        let probe = submit(submitted);
        submitted += 1;
        let id = eventually(Duration::from_secs(60), "the probe accepted", || {
            let (probe, client) = (probe.clone(), client.clone());
            async move {
                let r = request(&client, "cadre.tasks.submit", probe).await.ok()?;
                r["task_id"].as_str().map(str::to_string)
            }
        })
        .await?;
        eventually(Duration::from_secs(60), "the probe succeeded", || async {
            let t = request(
                &client,
                "cadre.tasks.get",
                json!({"task_id": id}).to_string(),
            )
            .await
            .ok()?;
            (t["status"] == "succeeded").then_some(())
        })
        .await
        .map_err(|e| {
            anyhow::anyhow!("seed {seed}, fault {i} {fault:?}: {e}\n{}", node.log_tail())
        })?;
        let took = ended.elapsed();
        println!(
            "fault {i}: {fault:?} for {held_ms} ms; a task submitted after it succeeded {took:?} later"
        );
        recoveries.entry(fault).or_default().push(took);
    }

    // An unsafe step caught mid-flight asks a person; answer from the effect's evidence,
    // through the approval it raised.
    let settling = Instant::now();
    let tasks = eventually(Duration::from_secs(120), "every task terminal", || async {
        let list = request(
            &client,
            "cadre.tasks.list",
            json!({"limit": 500}).to_string(),
        )
        .await
        .ok()?;
        let tasks = list["tasks"].as_array()?.clone();
        for t in tasks.iter().filter(|t| t["status"] == "awaiting_operator") {
            let id = t["task_id"].as_str()?;
            let view = request(
                &client,
                "cadre.tasks.get",
                json!({"task_id": id}).to_string(),
            )
            .await
            .ok()?;
            let Some(approval) = view["steps"][2]["approval"]["approval_id"].as_str() else {
                continue;
            };
            let ran = std::fs::read_to_string(&record)
                .unwrap_or_default()
                .lines()
                .any(|l| l == id);
            let decision = if ran { "mark_done" } else { "retry" };
            let req = json!({"approval_id": approval, "decision": decision, "by": "chaos-test"});
            let _ = request(&client, "cadre.approvals.decide", req.to_string()).await;
        }
        (tasks.len() == submitted
            && tasks
                .iter()
                .all(|t| chaos_tests::is_terminal(t["status"].as_str().unwrap_or(""))))
        .then_some(tasks)
    })
    .await
    .map_err(|e| anyhow::anyhow!("seed {seed}: {e}\n{}", node.log_tail()))?;

    let settled = settling.elapsed();
    println!("seed {seed}: every task terminal {settled:?} after the last fault");
    // Work in flight when the broker went away is re-sent on reconnect, not left to its
    // step's timeout (30 s here): the last tasks end within seconds of the last fault.
    assert!(
        settled < Duration::from_secs(10),
        "seed {seed}: tasks took {settled:?} to settle after the last fault"
    );
    let unsafe_runs = chaos_tests::unsafe_runs(std::path::Path::new(&record))?;
    let sink_requests = sink.requests();
    for t in &tasks {
        let id = t["task_id"].as_str().unwrap_or_default();
        assert_eq!(t["status"], "succeeded", "seed {seed}: {t:#}");
        assert_eq!(
            unsafe_runs.get(id).copied(),
            Some(1),
            "seed {seed}: the unsafe step of {id} ran {:?} times",
            unsafe_runs.get(id)
        );
        // Its status never moved backwards, across every fault.
        let trace = request(
            &client,
            "cadre.tasks.trace",
            json!({"task_id": id}).to_string(),
        )
        .await?;
        let ranks: Vec<u8> = trace["entries"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter_map(|e| e["record"]["action"].as_str().and_then(rank))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            ranks.windows(2).all(|w| w[0] <= w[1]) && ranks.last() == Some(&5),
            "seed {seed}: {id} moved backwards: {ranks:?}"
        );
    }
    // Every request that reached the outside world carried its step's key, so a retried
    // call is recognisable: one key per task, each of a known task.
    let known: std::collections::HashSet<String> = tasks
        .iter()
        .filter_map(|t| t["task_id"].as_str().map(|id| format!("{id}.crm")))
        .collect();
    for r in &sink_requests {
        let key = r.idempotency_key.clone().unwrap_or_default();
        assert!(
            known.contains(&key),
            "seed {seed}: a request without a task's key: {key:?}"
        );
    }
    let verify: Value = request(&client, "cadre.audit.chaos.verify", "{}").await?;
    assert_eq!(verify["ok"], true, "seed {seed}: {verify:#}");
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
    println!(
        "seed {seed}: {FAULTS} faults, {submitted} tasks succeeded, {} sink requests; recovery {summary:?}",
        sink_requests.len()
    );
    Ok(())
}
