//! Governance, end to end against a real nats-server, the real `cadre` binary, a real
//! HTTP sink and real child processes: the kill switch (its state in a JetStream KV
//! bucket) and rate limits.

use std::time::{Duration, Instant};

use chaos_tests::{
    CadreNode, HttpSink, NatsServer, cadre_cli, eventually, metric, request, wait_task,
};
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(30);

const TWO_STEPS: &str = r#"
name = "two-steps"
[[steps]]
id = "crm"
tool = "http.request"
params = { method = "POST", url = "{{input.url}}/clients", json = { name = "{{input.name}}" } }
verify = { status_in = [201] }
[[steps]]
id = "note"
tool = "file.write"
depends_on = ["crm"]
params = { path = "{{input.root}}/{{task.id}}.txt", content = "done" }
verify = { file_exists = true }
"#;

const LONG_SHELL: &str = r#"
name = "long-shell"
[[steps]]
id = "deploy"
tool = "shell.run"
params = { program = "sleep", args = ["37.25"] }
verify = { exit_code = 0 }
"#;

struct World {
    nats: NatsServer,
    client: async_nats::Client,
    sink: HttpSink,
    dir: tempfile::TempDir,
    files: String,
    env: Vec<(String, String)>,
}

async fn world() -> anyhow::Result<World> {
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let sink = HttpSink::start().await?;
    let dir = tempfile::tempdir()?;
    let playbooks = dir.path().join("playbooks");
    std::fs::create_dir_all(&playbooks)?;
    std::fs::write(playbooks.join("two-steps.toml"), TWO_STEPS)?;
    std::fs::write(playbooks.join("long-shell.toml"), LONG_SHELL)?;
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files)?;
    let files = files.canonicalize()?.display().to_string();
    let env = vec![
        (
            "CADRE_PLAYBOOKS_DIR".into(),
            playbooks.display().to_string(),
        ),
        ("CADRE_FILE_ROOTS".into(), files.clone()),
        ("CADRE_SHELL_ALLOW".into(), "sleep".into()),
        ("CADRE_RETRY_DELAY_MS_BASE".into(), "20".into()),
        ("CADRE_RETRY_DELAY_MS_MAX".into(), "100".into()),
    ];
    Ok(World {
        nats,
        client,
        sink,
        dir,
        files,
        env,
    })
}

impl World {
    fn node(&self, id: &str) -> anyhow::Result<CadreNode> {
        self.node_with(id, &[])
    }

    fn node_with(&self, id: &str, extra: &[(&str, &str)]) -> anyhow::Result<CadreNode> {
        let mut env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        env.extend_from_slice(extra);
        CadreNode::start(id, &self.dir.path().join(id), &self.nats.url, &env)
    }

    fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let (code, out, err) = cadre_cli(&self.nats.url, args)?;
        anyhow::ensure!(code == 0, "cadre {args:?} exited {code}: {out}{err}");
        Ok(out)
    }
}

async fn engaged_metric(node: &CadreNode) -> f64 {
    node.metrics()
        .await
        .map(|m| metric(&m, "cadre_killswitch_engaged"))
        .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kill_switch_halts_dispatch_within_a_second_survives_restarts_and_off_resumes()
-> anyhow::Result<()> {
    let w = world().await?;
    let mut node = w.node("n1")?;
    node.wait_ready(&w.client).await?;
    assert_eq!(engaged_metric(&node).await, 0.0);

    // A steady flow of tasks, one every 10 ms, until told to stop.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let flow = {
        let (client, url, root) = (w.client.clone(), w.sink.url.clone(), w.files.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0.. {
                if stop_rx.try_recv().is_ok() {
                    break;
                }
                let body = json!({"playbook": "two-steps",
                                  "input": {"url": url, "name": format!("c{n}"), "root": root}});
                if let Ok(r) = request(&client, "cadre.tasks.submit", body.to_string()).await
                    && let Some(id) = r["task_id"].as_str()
                {
                    ids.push(id.to_string());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ids
        })
    };
    eventually(WITHIN, "tasks flowing", || async {
        (w.sink.requests().len() >= 10).then_some(())
    })
    .await?;

    let out = w.cli(&["killswitch", "on", "--by", "alice", "--reason", "drill"])?;
    let engaged_at = Instant::now();
    assert!(out.contains("ENGAGED") && out.contains("alice"), "{out}");
    // Watch the sink for 2.5 s: when did it see its last request?
    let mut count = w.sink.requests().len();
    let mut last_change = engaged_at;
    while engaged_at.elapsed() < Duration::from_millis(2500) {
        let now = w.sink.requests().len();
        if now != count {
            count = now;
            last_change = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let halted_in = last_change.duration_since(engaged_at);
    println!(
        "kill switch: last request reached the sink {halted_in:?} after `killswitch on` answered"
    );
    assert!(
        halted_in < Duration::from_secs(1),
        "halted in {halted_in:?}"
    );
    assert_eq!(engaged_metric(&node).await, 1.0);
    let _ = stop_tx.send(());
    let ids = flow.await?;
    let halted_count = w.sink.requests().len();

    // Tasks are still accepted, and wait.
    let waiting: Vec<Value> = futures::future::try_join_all(ids.iter().map(|id| {
        request(
            &w.client,
            "cadre.tasks.get",
            json!({"task_id": id}).to_string(),
        )
    }))
    .await?;
    let running = waiting.iter().filter(|t| t["status"] == "running").count();
    assert!(running > 0, "some tasks must be held: {waiting:#?}");
    assert!(
        waiting
            .iter()
            .all(|t| t["status"] == "running" || t["status"] == "succeeded"),
        "held tasks wait, none fails"
    );

    // The state survives a kill -9 of the node, and a node that starts later reads it.
    node.restart()?;
    node.wait_ready(&w.client).await?;
    assert_eq!(engaged_metric(&node).await, 1.0, "after a restart");
    // (`wait_ready` would be answered by n1 through the queue group: ask n2 itself.)
    let mut later = w.node("n2")?;
    let addr = later.metrics_addr().unwrap_or_default().to_string();
    eventually(WITHIN, "n2 ready", || async {
        let (status, _) = chaos_tests::http_get(&addr, "/readyz").await.ok()?;
        (status == 200).then_some(())
    })
    .await?;
    assert_eq!(
        engaged_metric(&later).await,
        1.0,
        "a node that starts later"
    );
    later.kill9();
    let status = w.cli(&["killswitch", "status"])?;
    assert!(
        status.contains("ENGAGED") && status.contains("drill"),
        "{status}"
    );
    // Nothing was dispatched across the restart (resumed tasks stay held).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        w.sink.requests().len(),
        halted_count,
        "no dispatch while engaged"
    );

    // Off: every held task resumes and succeeds, each CRM key seen once.
    let out = w.cli(&["killswitch", "off", "--by", "alice"])?;
    assert!(out.contains("off"), "{out}");
    for id in &ids {
        let t = wait_task(&w.client, id, WITHIN, chaos_tests::is_terminal).await?;
        assert_eq!(t["status"], "succeeded", "{t:#}");
    }
    let mut keys: Vec<String> = w
        .sink
        .requests()
        .iter()
        .filter_map(|r| r.idempotency_key.clone())
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), ids.len(), "one CRM record per task");
    assert_eq!(engaged_metric(&node).await, 0.0);

    // Both decisions are in the audit log, with who and why.
    let mut decisions = Vec::new();
    let mut after = 0;
    loop {
        let page = request(
            &w.client,
            "cadre.audit.n1.read",
            json!({"after_seq": after, "limit": 1000}).to_string(),
        )
        .await?;
        let entries = page["entries"].as_array().cloned().unwrap_or_default();
        let Some(last) = entries.last().and_then(|e| e["seq"].as_u64()) else {
            break;
        };
        after = last;
        decisions.extend(entries.into_iter().filter(|e| {
            e["record"]["action"]
                .as_str()
                .is_some_and(|a| a.starts_with("killswitch"))
        }));
    }
    let actions: Vec<&str> = decisions
        .iter()
        .filter_map(|e| e["record"]["action"].as_str())
        .collect();
    assert_eq!(
        actions,
        ["killswitch_on", "killswitch_off"],
        "{decisions:#?}"
    );
    assert_eq!(decisions[0]["record"]["operator"], "alice");
    assert_eq!(decisions[0]["record"]["detail"], "drill");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kill_switch_aborts_a_running_shell_step_and_says_its_outcome_is_unknown()
-> anyhow::Result<()> {
    let w = world().await?;
    let node = w.node("n1")?;
    let mut node = node;
    node.wait_ready(&w.client).await?;
    let r = request(
        &w.client,
        "cadre.tasks.submit",
        json!({"playbook": "long-shell"}).to_string(),
    )
    .await?;
    let task_id = r["task_id"].as_str().unwrap_or_default().to_string();
    eventually(WITHIN, "sleep running", || async {
        sleeping().then_some(())
    })
    .await?;

    w.cli(&[
        "killswitch",
        "on",
        "--by",
        "bob",
        "--reason",
        "stop everything",
    ])?;
    let engaged_at = Instant::now();
    eventually(WITHIN, "the child killed", || async {
        (!sleeping()).then_some(())
    })
    .await?;
    let killed_in = engaged_at.elapsed();
    println!("kill switch: running `sleep` killed {killed_in:?} after `killswitch on` answered");
    assert!(killed_in < Duration::from_secs(1), "{killed_in:?}");

    let t = wait_task(&w.client, &task_id, WITHIN, |s| s == "awaiting_operator").await?;
    let step = &t["steps"][0];
    assert_eq!(step["status"], "outcome_unknown", "{t:#}");
    assert!(
        step["error"]
            .as_str()
            .unwrap_or("")
            .contains("aborted by the kill switch"),
        "{t:#}"
    );

    w.cli(&["killswitch", "off"])?;
    w.cli(&[
        "task",
        "resolve",
        &task_id,
        "--step",
        "deploy",
        "--decision",
        "abort",
        "--by",
        "bob",
    ])?;
    let t = wait_task(&w.client, &task_id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(t["status"], "failed", "{t:#}");
    node.kill9();
    Ok(())
}

/// Is our `sleep 37.25` running?
fn sleeping() -> bool {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries.filter_map(Result::ok).any(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .map(|c| c.starts_with(b"sleep\x0037.25"))
                    .unwrap_or(false)
            })
        })
        .unwrap_or(false)
}

const CRM_ONLY: &str = r#"
name = "crm-only"
[[steps]]
id = "crm"
tool = "http.request"
params = { method = "POST", url = "{{input.url}}/clients", json = { name = "{{input.name}}" } }
verify = { status_in = [201] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_per_tool_and_per_host_space_the_calls_and_show_in_metrics()
-> anyhow::Result<()> {
    let w = world().await?;
    std::fs::write(w.dir.path().join("playbooks/crm-only.toml"), CRM_ONLY)?;
    // The host's limit is the tighter one for these calls: 4/s with a burst of 4.
    let mut node = w.node_with(
        "n1",
        &[
            ("CADRE_RATE_LIMITS", "http.request=50/s,host:127.0.0.1=4/s"),
            ("CADRE_TOOL_CONCURRENCY_MAX", "shell.run=2"),
        ],
    )?;
    node.wait_ready(&w.client).await?;
    let started = Instant::now();
    let ids = futures::future::try_join_all((0..12).map(|n| {
        let body =
            json!({"playbook": "crm-only", "input": {"url": w.sink.url, "name": format!("r{n}")}});
        request(&w.client, "cadre.tasks.submit", body.to_string())
    }))
    .await?;
    for r in &ids {
        let id = r["task_id"].as_str().unwrap_or_default();
        let t = wait_task(&w.client, id, WITHIN, chaos_tests::is_terminal).await?;
        assert_eq!(t["status"], "succeeded", "{t:#}");
    }
    // 12 calls at 4/s after a burst of 4: the last no sooner than 2 s after the first,
    // and no window of length T holds more than burst + rate·T calls.
    let mut at: Vec<Instant> = w.sink.requests().iter().map(|r| r.at).collect();
    at.sort();
    assert_eq!(at.len(), 12);
    let span = at[11].duration_since(at[0]);
    println!(
        "12 calls limited to 4/s took {span:?} (first to last), {:?} in all",
        started.elapsed()
    );
    assert!(span >= Duration::from_millis(1900), "{span:?}");
    for (i, t) in at.iter().enumerate() {
        for (j, u) in at.iter().enumerate().skip(i) {
            let window = u.duration_since(*t).as_secs_f64();
            let allowed = 4.0 + 4.0 * window + 1.0; // +1: one call of slack for timing
            assert!(
                (j - i + 1) as f64 <= allowed,
                "{} calls in {window:.3} s (calls {i}..={j})",
                j - i + 1
            );
        }
    }
    let m = node.metrics().await?;
    let series = |name: &str| {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(
        series("cadre_rate_limited_total{limit=\"host:127.0.0.1\"}") >= 7.0,
        "{m}"
    );
    assert_eq!(
        series("cadre_rate_limited_total{limit=\"tool:http.request\"}"),
        0.0
    );
    assert_eq!(
        series("cadre_rate_limit_per_second{limit=\"host:127.0.0.1\"}"),
        4.0
    );
    assert!(series("cadre_rate_limit_wait_seconds_total{limit=\"host:127.0.0.1\"}") > 1.0);
    assert_eq!(
        series("cadre_tool_concurrency_max{tool=\"shell.run\"}"),
        2.0
    );
    assert_eq!(
        series("cadre_tool_concurrency_max{tool=\"http.request\"}"),
        256.0
    );
    Ok(())
}
