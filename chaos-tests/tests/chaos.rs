//! The chaos suite's short mode: one real node and a real nats-server, tasks flowing,
//! faults from a seeded schedule — SIGKILL the node, freeze it (SIGSTOP) and thaw it,
//! kill and restart nats-server — each hitting a batch of tasks in flight (enqueued on the
//! durable intake stream just before), and after every fault a probe task whose success
//! measures the recovery. A second run injects panics into every recoverable role
//! (`fault_panic`): each role is restarted by its supervisor, the work it held is retried.
//! Then the invariants: every accepted task succeeded; no `unsafe` effect ran twice;
//! every request the HTTP sink saw carried its step's idempotency key; no task's status
//! moved backwards; the audit chain holds. The seed is printed;
//! `CADRE_CHAOS_SEED=<seed>` replays the schedule. docs/RELIABILITY.md has the scenarios
//! and the figures.

use std::collections::HashMap;
use std::path::PathBuf;
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

fn seed() -> anyhow::Result<u64> {
    let seed: u64 = match std::env::var("CADRE_CHAOS_SEED") {
        Ok(s) => s.parse()?,
        Err(_) => rand::random(),
    };
    println!("chaos seed: {seed} (replay with CADRE_CHAOS_SEED={seed})");
    Ok(seed)
}

/// Every task the node lists, page by page.
async fn all_tasks(client: &async_nats::Client) -> anyhow::Result<Vec<Value>> {
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
struct Rig {
    sink: HttpSink,
    dir: tempfile::TempDir,
    roots: String,
    script: String,
    record: String,
    playbooks: String,
}

impl Rig {
    async fn new() -> anyhow::Result<Rig> {
        let sink = HttpSink::start().await?;
        let dir = tempfile::tempdir()?;
        let files = dir.path().join("files");
        std::fs::create_dir_all(&files)?;
        let roots = files.canonicalize()?.display().to_string();
        let (script, record) = chaos_tests::unsafe_recorder(dir.path())?;
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
        Ok(Rig {
            sink,
            roots,
            script: script.display().to_string(),
            record: record.display().to_string(),
            playbooks: playbooks.display().to_string(),
            dir,
        })
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn env<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
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

    fn submit(&self, n: usize) -> String {
        let input = json!({"n": n.to_string(), "url": self.sink.url, "root": self.roots,
                           "script": self.script, "record": self.record});
        json!({"playbook": "chaos", "input": input, "idempotency_key": format!("chaos-{n}")})
            .to_string()
    }

    /// Waits until all `submitted` tasks are terminal. An unsafe step caught mid-flight
    /// asks a person; this answers from the effect's evidence, through the approval it
    /// raised.
    async fn settle(
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
                    .all(|t| chaos_tests::is_terminal(t["status"].as_str().unwrap_or(""))))
            .then_some(tasks)
        })
        .await
    }

    /// The invariants, over every task: succeeded; the unsafe step ran exactly once; the
    /// status never moved backwards; every sink request carried a known step's key; the
    /// audit chain verifies.
    async fn check(
        &self,
        client: &async_nats::Client,
        node_id: &str,
        tasks: &[Value],
        seed: u64,
    ) -> anyhow::Result<()> {
        let unsafe_runs = chaos_tests::unsafe_runs(std::path::Path::new(&self.record))?;
        for t in tasks {
            let id = t["task_id"].as_str().unwrap_or_default();
            assert_eq!(t["status"], "succeeded", "seed {seed}: {t:#}");
            assert_eq!(
                unsafe_runs.get(id).copied(),
                Some(1),
                "seed {seed}: the unsafe step of {id} ran {:?} times",
                unsafe_runs.get(id)
            );
            let trace = request(
                client,
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
        let verify: Value = request(client, &format!("cadre.audit.{node_id}.verify"), "{}").await?;
        assert_eq!(verify["ok"], true, "seed {seed}: {verify:#}");
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_faults_lose_nothing_repeat_no_effect_and_recover() -> anyhow::Result<()> {
    let seed = seed()?;
    let mut rng = StdRng::seed_from_u64(seed);

    let mut nats = NatsServer::start()?;
    let client = nats.client().await?;
    let rig = Rig::new().await?;
    let mut node = CadreNode::start("chaos", &rig.data_dir(), &nats.url, &rig.env(&[]))?;
    node.wait_ready(&client).await?;

    let mut submitted = 0usize;
    let submit = |n: usize| rig.submit(n);
    let mut recoveries: HashMap<Fault, Vec<Duration>> = HashMap::new();
    // The long mode: faults for as long as asked, instead of the short suite's few.
    let minutes: Option<u64> = match std::env::var("CADRE_CHAOS_MINUTES") {
        Ok(m) => Some(m.parse()?),
        Err(_) => None,
    };
    let until = minutes.map(|m| Instant::now() + Duration::from_secs(m * 60));
    let mut faults = 0;
    for i in 0.. {
        match until {
            Some(until) if Instant::now() >= until => break,
            None if i == FAULTS => break,
            _ => faults += 1,
        }
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

    let settling = Instant::now();
    let tasks = rig
        .settle(&client, submitted, Duration::from_secs(120))
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
    rig.check(&client, "chaos", &tasks, seed).await?;
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
        "seed {seed}: {faults} faults, {submitted} tasks succeeded, {} sink requests; recovery {summary:?}",
        rig.sink.requests().len()
    );
    Ok(())
}

/// Roles panic inside their handlers (`fault_panic`, seeded by the node's seed): the
/// node's supervisor restarts the singletons, the task supervisor restarts a TaskActor
/// from its checkpoint, the requests a panic dropped are retried by whoever sent them.
/// Every role panics at least once, the node keeps serving, and every task succeeds with
/// the invariants above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_in_every_role_cost_no_task() -> anyhow::Result<()> {
    const TASKS: usize = 24;
    let seed = seed()?;
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let rig = Rig::new().await?;
    // The node's options are signed 64-bit.
    let node_seed = (seed % i64::MAX as u64).max(1).to_string();
    let faults = actors::faults::ROLES
        .iter()
        .map(|r| format!("{r}=0.3"))
        .collect::<Vec<_>>()
        .join(",");
    let env = rig.env(&[
        ("CADRE_SEED", node_seed.as_str()),
        ("CADRE_FAULT_PANIC", faults.as_str()),
        ("CADRE_FAULT_PANIC_MAX", "2"),
        // An executor's panic drops the job: the task re-sends it after its timeout.
        ("CADRE_STEP_TIMEOUT_MS", "2000"),
    ]);
    let mut node = CadreNode::start("panicky", &rig.data_dir(), &nats.url, &env)?;
    node.wait_ready(&client).await?;
    let started = Instant::now();
    for n in 0..TASKS {
        let reply = request(&client, "cadre.tasks.submit", rig.submit(n)).await?;
        assert_eq!(reply["status"], "accepted", "seed {seed}: {reply}");
    }
    let tasks = rig
        .settle(&client, TASKS, Duration::from_secs(120))
        .await
        .map_err(|e| anyhow::anyhow!("seed {seed}: {e}\n{}", node.log_tail()))?;
    let took = started.elapsed();
    rig.check(&client, "panicky", &tasks, seed).await?;

    // Each role panicked and was restarted inside the process, which still serves (nothing
    // here would restart it).
    let metrics = node.metrics().await?;
    let restarts = |role: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("cadre_actor_restarts_total{")
                    && l.contains(&format!("actor=\"{role}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let counts: Vec<(&str, f64)> = actors::faults::ROLES
        .iter()
        .map(|r| (*r, restarts(r)))
        .collect();
    for (role, n) in &counts {
        assert!(*n >= 1.0, "seed {seed}: {role} never restarted: {counts:?}");
    }
    println!("seed {seed}: {TASKS} tasks succeeded in {took:?} through restarts {counts:?}");
    Ok(())
}
