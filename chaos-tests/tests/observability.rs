//! Observability, end to end: a real Prometheus scraping a real node, the shipped alert
//! rules through `promtool`, the hash-chained audit log (verified, tampered with,
//! published), a task's trace, and secrets kept out of all of them.

use std::path::Path;
use std::time::Duration;

use chaos_tests::{
    CadreNode, HttpSink, NatsServer, Prometheus, cadre_cli, eventually, ops_dir, request, wait_task,
};
use futures::StreamExt;
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(30);

/// A real nats-server, a client, an HTTP sink, a temp dir with one playbook in it.
struct World {
    nats: NatsServer,
    client: async_nats::Client,
    sink: HttpSink,
    dir: tempfile::TempDir,
    /// The playbooks directory, for `CADRE_PLAYBOOKS_DIR`.
    playbooks: String,
}

async fn world(playbook: &str, text: &str) -> anyhow::Result<World> {
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let sink = HttpSink::start().await?;
    let dir = tempfile::tempdir()?;
    let playbooks = dir.path().join("playbooks");
    std::fs::create_dir_all(&playbooks)?;
    std::fs::write(playbooks.join(format!("{playbook}.toml")), text)?;
    let playbooks = playbooks.display().to_string();
    Ok(World {
        nats,
        client,
        sink,
        dir,
        playbooks,
    })
}

const CRM_ONLY: &str = r#"
name = "crm-only"
[[steps]]
id = "crm"
tool = "http.request"
max_attempts = 3
params = { method = "POST", url = "{{input.url}}/clients", json = { name = "{{input.name}}" } }
verify = { status_in = [201] }
"#;

async fn submit(nats: &async_nats::Client, body: Value) -> anyhow::Result<String> {
    let reply = request(nats, "cadre.tasks.submit", body.to_string()).await?;
    reply["task_id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("no task id: {reply}"))
}

/// Every series the issue names, as Prometheus sees them (histograms by `_count`).
const SERIES: &[&str] = &[
    "cadre_node_info",
    "cadre_tasks_submitted_total",
    "cadre_tasks_finished_total",
    "cadre_task_duration_seconds_count",
    "cadre_step_duration_seconds_count",
    "cadre_step_retries_total",
    "cadre_step_failures_total",
    "cadre_tasks_in_flight",
    "cadre_steps_in_flight",
    "cadre_approvals_pending",
    "cadre_approval_wait_seconds_count",
    "cadre_approvals_decided_total",
    "cadre_actor_restarts_total",
    "cadre_nats_connected",
    "cadre_nats_reconnects_total",
    "cadre_outbox_backlog",
    "cadre_effects_outcome_unknown",
    "cadre_store_size_bytes",
    "cadre_store_write_stall_seconds_total",
    "cadre_cost_usd_total",
    "cadre_task_cost_usd_count",
    "cadre_budget_spent_usd",
    "cadre_budget_cap_usd",
    "cadre_killswitch_engaged",
    "cadre_audit_records_total",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_sees_every_series_move_and_loads_the_alert_rules() -> anyhow::Result<()>
{
    let World {
        nats,
        client,
        sink,
        dir,
        playbooks: pb,
    } = world("crm-only", CRM_ONLY).await?;
    let mut node = CadreNode::start(
        "n1",
        &dir.path().join("data"),
        &nats.url,
        &[
            ("CADRE_PLAYBOOKS_DIR", &pb),
            ("CADRE_RETRY_DELAY_MS_BASE", "20"),
            ("CADRE_RETRY_DELAY_MS_MAX", "50"),
        ],
    )?;
    node.wait_ready(&client).await?;
    let target = node.metrics_addr().unwrap_or_default().to_string();
    let rules = ops_dir().join("prometheus/alerts.yml");
    let prom = Prometheus::start(&[(&target, "n1")], &[rules])?;

    // Before any task: every series exists (at zero where its cause is later work).
    eventually(WITHIN, "prometheus scraping the node", || async {
        (prom.value("up{job=\"cadre\",node=\"n1\"}").await == Some(1.0)).then_some(())
    })
    .await?;
    let names = prom.api("/api/v1/label/__name__/values").await?;
    let names: Vec<&str> = names["data"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let missing: Vec<&&str> = SERIES.iter().filter(|s| !names.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "series missing in Prometheus: {missing:?}"
    );
    assert_eq!(
        prom.value("cadre_nats_connected").await,
        Some(1.0),
        "connected"
    );

    // A task that retries once, then one that fails for good.
    sink.fail_next(&[503]);
    let ok = submit(
        &client,
        json!({"playbook": "crm-only", "input": {"url": sink.url, "name": "A"}}),
    )
    .await?;
    let t = wait_task(&client, &ok, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(t["status"], "succeeded", "{t:#}");
    sink.fail_next(&[400]);
    let bad = submit(
        &client,
        json!({"playbook": "crm-only", "input": {"url": sink.url, "name": "B"}}),
    )
    .await?;
    let t = wait_task(&client, &bad, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(t["status"], "failed", "{t:#}");

    // The series move as the tasks ran, as Prometheus scraped them.
    let moved = [
        ("cadre_tasks_submitted_total{playbook=\"crm-only\"}", 2.0),
        (
            "cadre_tasks_finished_total{playbook=\"crm-only\",status=\"succeeded\"}",
            1.0,
        ),
        (
            "cadre_tasks_finished_total{playbook=\"crm-only\",status=\"failed\"}",
            1.0,
        ),
        (
            "cadre_task_duration_seconds_count{playbook=\"crm-only\"}",
            2.0,
        ),
        (
            "cadre_step_duration_seconds_count{tool=\"http.request\"}",
            3.0,
        ),
        (
            "cadre_step_retries_total{tool=\"http.request\",reason=\"tool_error\"}",
            1.0,
        ),
        (
            "cadre_step_failures_total{tool=\"http.request\",reason=\"permanent\"}",
            1.0,
        ),
        // accepted … succeeded: at least 8 records per task.
        ("cadre_audit_records_total", 16.0),
        // Both tasks' accepted and final commits wait for their fsync; their progress is
        // committed once written (the fsync follows).
        ("cadre_store_commits_total", 4.0),
        ("cadre_store_written_commits_total", 4.0),
        (
            "cadre_store_commits_total + cadre_store_written_commits_total",
            8.0,
        ),
    ];
    for (query, at_least) in moved {
        eventually(WITHIN, query, || async {
            prom.value(query).await.filter(|v| *v >= at_least)
        })
        .await?;
    }
    assert_eq!(prom.value("cadre_tasks_in_flight").await, Some(0.0));
    eventually(WITHIN, "the outbox drained", || async {
        (prom.value("cadre_outbox_backlog").await == Some(0.0)).then_some(())
    })
    .await?;
    assert_eq!(prom.value("cadre_effects_outcome_unknown").await, Some(0.0));

    // The shipped alert rules load into a real Prometheus and evaluate without error.
    let groups = eventually(WITHIN, "alert rules evaluated", || async {
        let v = prom.api("/api/v1/rules").await.ok()?;
        let groups = v["data"]["groups"].as_array()?.clone();
        let rules: Vec<Value> = groups
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        (!rules.is_empty() && rules.iter().all(|r| r["health"] == "ok")).then_some(groups)
    })
    .await?;
    assert_eq!(groups[0]["name"], "cadre");
    Ok(())
}

#[test]
fn promtool_accepts_the_shipped_config_rules_and_rule_tests() -> anyhow::Result<()> {
    let ops = ops_dir().join("prometheus");
    for args in [
        vec!["check", "config", "prometheus.yml"],
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(&args)
            .current_dir(&ops)
            .output()?;
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

const SECRET_CRM: &str = r#"
name = "secret-crm"
[[steps]]
id = "crm"
tool = "http.request"
max_attempts = 3
params = { method = "POST", url = "{{input.url}}/clients", headers = { Authorization = "Bearer {{input.token}}" }, json = { name = "{{input.name}}", api_key = "{{input.api_key}}" } }
verify = { status_in = [201] }
"#;

const TOKEN: &str = "tok-SECRET-7781";
const API_KEY: &str = "key-SECRET-4410";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_verifies_is_published_keeps_secrets_out_and_catches_tampering()
-> anyhow::Result<()> {
    let World {
        nats,
        client,
        sink,
        dir,
        playbooks: pb,
    } = world("secret-crm", SECRET_CRM).await?;
    let data = dir.path().join("data");
    let mut node = CadreNode::start(
        "n1",
        &data,
        &nats.url,
        &[
            ("CADRE_PLAYBOOKS_DIR", &pb),
            ("CADRE_RETRY_DELAY_MS_BASE", "20"),
            ("CADRE_LOG_LEVEL", "debug"),
        ],
    )?;
    node.wait_ready(&client).await?;
    let mut audit = client.subscribe("cadre.audit.*").await?;
    let mut events = client.subscribe("cadre.events.>").await?;

    sink.fail_next(&[503]);
    let input = json!({"url": sink.url, "name": "Acme", "token": TOKEN, "api_key": API_KEY});
    let task_id = submit(&client, json!({"playbook": "secret-crm", "input": input})).await?;
    let t = wait_task(&client, &task_id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(t["status"], "succeeded", "{t:#}");
    assert_eq!(
        sink.requests().last().map(|r| r.body["api_key"].clone()),
        Some(json!(API_KEY)),
        "the secret was really used"
    );

    // Published records: in order, chained, ending with the task's `succeeded`.
    let mut published = Vec::new();
    while !published.iter().any(|e: &Value| {
        e["record"]["task_id"] == task_id.as_str() && e["record"]["action"] == "succeeded"
    }) {
        let msg = tokio::time::timeout(WITHIN, audit.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("audit subscription ended"))?;
        assert_eq!(msg.subject.as_str(), "cadre.audit.n1");
        // A message is a batch: an array of consecutive entries.
        published.extend(serde_json::from_slice::<Vec<Value>>(&msg.payload)?);
    }
    for pair in published.windows(2) {
        assert_eq!(pair[1]["seq"], pair[0]["seq"].as_u64().unwrap_or(0) + 1);
        assert_eq!(
            pair[1]["prev_hash"], pair[0]["hash"],
            "published links chain"
        );
    }
    let executed: Vec<&Value> = published
        .iter()
        .filter(|e| e["record"]["action"] == "step_executed")
        .collect();
    assert_eq!(executed.len(), 2, "two attempts: {published:#?}");
    let r = &executed[1]["record"];
    assert_eq!(r["actor"], "executor@n1");
    assert_eq!(r["tool"], "http.request");
    assert_eq!(r["args_hash"].as_str().map(str::len), Some(64));
    assert!(
        r["input_ref"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("tasks/{task_id}#input sha256:"))
    );
    let started = published
        .iter()
        .find(|e| e["record"]["action"] == "step_started")
        .map(|e| e["record"]["params"].as_str().unwrap_or("").to_string())
        .unwrap_or_default();
    assert!(
        started.contains("[redacted]") && started.contains("Acme"),
        "{started}"
    );

    // The trace and the tail read the same records.
    let (code, trace, err) = cadre_cli(&nats.url, &["task", "trace", &task_id, "--json"])?;
    assert_eq!(code, 0, "{err}");
    let trace: Value = serde_json::from_str(&trace)?;
    let kinds: Vec<&str> = trace["entries"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["record"]["action"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(kinds.first(), Some(&"accepted"));
    assert_eq!(kinds.last(), Some(&"succeeded"));
    let (code, tail, err) = cadre_cli(&nats.url, &["audit", "tail", "--node", "n1", "-n", "500"])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        tail.contains(&task_id) && tail.contains("step_executed"),
        "{tail}"
    );

    // Secrets reached the sink, and nothing else: not the audit log, not the events,
    // not the trace, not the node's debug logs.
    let mut seen_events = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(200), events.next()).await
    {
        seen_events.push(String::from_utf8_lossy(&msg.payload).into_owned());
    }
    assert!(!seen_events.is_empty());
    let everything = format!(
        "{}\n{}\n{trace}\n{tail}\n{}",
        serde_json::to_string(&published)?,
        seen_events.join("\n"),
        std::fs::read_to_string(data.join("n1.log")).unwrap_or_default()
    );
    for secret in [TOKEN, API_KEY] {
        assert!(!everything.contains(secret), "{secret} leaked");
    }

    // The node verifies its own chain over NATS.
    let (code, out, err) = cadre_cli(&nats.url, &["audit", "verify", "--node", "n1"])?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("intact"), "{out}");

    // Offline, a record rewritten with a valid checksum is caught by the chain alone,
    // and a flipped byte by its checksum; each is named.
    assert_eq!(node.terminate(WITHIN)?, Some(0));
    let data_dir = data.display().to_string();
    let verify = || cadre_cli(&nats.url, &["audit", "verify", "--data-dir", &data_dir]);
    let (code, out, err) = verify()?;
    assert_eq!(code, 0, "{out}{err}");
    // Read offline, the store holds every link the node published (the last commits
    // charged a budget: their merges must replay).
    let head = published
        .last()
        .and_then(|e| e["seq"].as_u64())
        .unwrap_or(0);
    let (_, out, _) = cadre_cli(
        &nats.url,
        &["audit", "verify", "--data-dir", &data_dir, "--json"],
    )?;
    let report: Value = serde_json::from_str(&out)?;
    assert_eq!(report["head_seq"], head, "{report}");
    let store = data.join("store");
    let original = tamper(&store, 4, |link_bytes| {
        let mut link: storage::chain::Link = storage::codec::decode(link_bytes)?;
        let at = link.payload.len() / 2;
        link.payload[at] ^= 0x01;
        Ok(storage::codec::encode(&link)?)
    })?;
    let (code, out, _) = verify()?;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("BROKEN at record 4") && out.contains("altered"),
        "{out}"
    );
    tamper(&store, 4, |_| Ok(original.clone()))?;
    tamper(&store, 6, |raw| {
        let mut raw = raw.to_vec();
        let at = raw.len() / 3;
        raw[at] ^= 0x10;
        Ok(raw)
    })?;
    let (code, out, _) = verify()?;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("BROKEN at record 6") && out.contains("cannot be read"),
        "{out}"
    );

    // A node on a tampered store still starts, serves, and reports the break. Its
    // publication cursor is set back (as a crash can leave it): the publisher goes
    // over the broken records again, publishes each as a break, and goes on.
    set_audit_cursor(&store, 0)?;
    let mut republished = client.subscribe("cadre.audit.n1").await?;
    client.flush().await?;
    node = CadreNode::start("n1", &data, &nats.url, &[("CADRE_PLAYBOOKS_DIR", &pb)])?;
    node.wait_ready(&client).await?;
    let (code, out, _) = cadre_cli(&nats.url, &["audit", "verify", "--node", "n1", "--json"])?;
    assert_eq!(code, 1, "{out}");
    let report: Value = serde_json::from_str(&out)?;
    assert_eq!(report["broken"]["seq"], 6, "{report}");
    assert_eq!(report["ok"], false);
    let mut again = Vec::new();
    while again.last().and_then(|e: &Value| e["seq"].as_u64()) < Some(head) {
        let msg = tokio::time::timeout(WITHIN, republished.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("audit subscription ended"))?;
        again.extend(serde_json::from_slice::<Vec<Value>>(&msg.payload)?);
    }
    let seqs: Vec<u64> = again.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=head).collect::<Vec<_>>(), "every link, in order");
    assert!(
        again[5]["error"]
            .as_str()
            .is_some_and(|e| e.contains("unreadable audit link")),
        "{:#}",
        again[5]
    );
    assert_eq!(again[4]["seq"], 5);
    assert!(again[4]["record"].is_object(), "{:#}", again[4]);
    Ok(())
}

/// Sets the audit publisher's cursor in a stopped node's store.
fn set_audit_cursor(store: &Path, seq: u64) -> anyhow::Result<()> {
    let db = storage::open_raw(store)?;
    let cf = db
        .cf_handle("meta")
        .ok_or_else(|| anyhow::anyhow!("no meta column family"))?;
    db.put_cf(cf, b"audit_published_seq", storage::codec::encode(&seq)?)?;
    db.flush_cf(cf)?;
    Ok(())
}

/// Rewrites audit record `seq` in a stopped node's store with `f(old bytes)`; returns
/// the old bytes.
fn tamper(
    store: &Path,
    seq: u64,
    f: impl FnOnce(&[u8]) -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<Vec<u8>> {
    let db = storage::open_raw(store)?;
    let cf = db
        .cf_handle("audit")
        .ok_or_else(|| anyhow::anyhow!("no audit column family"))?;
    let key = seq.to_be_bytes();
    let old = db
        .get_cf(cf, key)?
        .ok_or_else(|| anyhow::anyhow!("no audit record {seq}"))?;
    db.put_cf(cf, key, f(&old)?)?;
    db.flush_cf(cf)?;
    Ok(old)
}

const OPS_RUN: &str = r#"
name = "ops-run"
[[steps]]
id = "crm"
tool = "http.request"
max_attempts = 3
params = { method = "POST", url = "{{input.url}}/clients", json = { name = "{{input.name}}" } }
verify = { status_in = [201] }
[[steps]]
id = "deploy"
tool = "shell.run"
depends_on = ["crm"]
params = { program = "sleep", args = ["30"] }
verify = { exit_code = 0 }
[[steps]]
id = "note"
tool = "file.write"
depends_on = ["deploy"]
params = { path = "{{input.root}}/done.txt", content = "deployed" }
verify = { file_exists = true }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_of_a_task_that_retried_waited_for_an_operator_and_succeeded_reads_clearly()
-> anyhow::Result<()> {
    let World {
        nats,
        client,
        sink,
        dir,
        playbooks: pb,
    } = world("ops-run", OPS_RUN).await?;
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files)?;
    let files = files.canonicalize()?.display().to_string();
    let env = [
        ("CADRE_PLAYBOOKS_DIR", pb.as_str()),
        ("CADRE_FILE_ROOTS", files.as_str()),
        ("CADRE_SHELL_ALLOW", "sleep"),
        ("CADRE_RETRY_DELAY_MS_BASE", "20"),
    ];
    let mut node = CadreNode::start("n1", &dir.path().join("data"), &nats.url, &env)?;
    node.wait_ready(&client).await?;

    sink.fail_next(&[503]);
    let input = json!({"url": sink.url, "name": "Acme", "root": files});
    let task_id = submit(&client, json!({"playbook": "ops-run", "input": input})).await?;
    // The unsafe step is running (its intent is on disk): kill the node under it.
    eventually(WITHIN, "shell.run in flight", || async {
        let m = node.metrics().await.ok()?;
        m.lines()
            .any(|l| l.starts_with("cadre_steps_in_flight{tool=\"shell.run\"} 1"))
            .then_some(())
    })
    .await?;
    node.restart()?;
    node.wait_ready(&client).await?;
    wait_task(&client, &task_id, WITHIN, |s| s == "awaiting_operator").await?;
    let (code, out, err) = cadre_cli(
        &nats.url,
        &[
            "task",
            "resolve",
            &task_id,
            "--step",
            "deploy",
            "--decision",
            "mark_done",
            "--by",
            "alice",
            "--note",
            "checked the host: deployed",
        ],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    let t = wait_task(&client, &task_id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(t["status"], "succeeded", "{t:#}");

    let (code, trace, err) = cadre_cli(&nats.url, &["task", "trace", &task_id])?;
    assert_eq!(code, 0, "{err}");
    println!("{trace}");
    let lines: Vec<&str> = trace.lines().collect();
    assert!(
        lines[0].contains(&task_id) && lines[0].contains("succeeded"),
        "{trace}"
    );
    // In order: the retry, the executor's answers, the crash's unknown outcome, the
    // operator's decision with who and why, the rest, success.
    let order = [
        ("intake@n1", "accepted"),
        ("executor@n1", "step_executed"),
        ("executor@n1", "step_retry"),
        ("verifier@n1", "step_succeeded"),
        ("executor@n1", "step_outcome_unknown"),
        ("executor@n1", "approval_requested"),
        ("executor@n1", "awaiting_operator"),
        ("operator:alice", "approval_granted"),
        ("operator:alice", "step_succeeded"),
        ("task@n1", "step_started"),
        ("archivist@n1", "succeeded"),
    ];
    let mut at = 0;
    for (actor, action) in order {
        let found = lines[at..]
            .iter()
            .position(|l| l.contains(actor) && l.split_whitespace().any(|w| w == action))
            .ok_or_else(|| anyhow::anyhow!("no `{actor} {action}` after line {at}:\n{trace}"))?;
        at += found + 1;
    }
    let retry = lines
        .iter()
        .find(|l| l.contains("step_retry"))
        .copied()
        .unwrap_or("");
    assert!(retry.contains("crm#1") && retry.contains("503"), "{retry}");
    let resolved = lines
        .iter()
        .find(|l| l.contains("operator:alice") && l.contains("step_succeeded"))
        .copied()
        .unwrap_or("");
    assert!(
        resolved.contains("deploy#1")
            && resolved.contains("marked done by alice: checked the host"),
        "{resolved}"
    );
    let executed = lines
        .iter()
        .find(|l| l.contains("step_executed") && l.contains("note#1"))
        .copied()
        .unwrap_or("");
    assert!(
        executed.contains("file.write") && executed.contains("took"),
        "{executed}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_nats_shows_in_readiness_and_metrics_and_audit_tail_follows_live()
-> anyhow::Result<()> {
    let World {
        mut nats,
        client,
        sink,
        dir,
        playbooks: pb,
    } = world("crm-only", CRM_ONLY).await?;
    let mut node = CadreNode::start(
        "n1",
        &dir.path().join("data"),
        &nats.url,
        &[("CADRE_PLAYBOOKS_DIR", &pb)],
    )?;
    node.wait_ready(&client).await?;
    let addr = node.metrics_addr().unwrap_or_default().to_string();
    let series = |text: &str, name: &str| chaos_tests::metric(text, name);
    let m = node.metrics().await?;
    assert_eq!(series(&m, "cadre_nats_connected"), 1.0);
    assert_eq!(series(&m, "cadre_nats_reconnects_total"), 0.0);
    let (status, body) = chaos_tests::http_get(&addr, "/readyz").await?;
    assert_eq!(status, 200, "{body}");

    // The broker goes away: not ready, and the gauge says why.
    nats.kill();
    let body = eventually(WITHIN, "readyz 503", || async {
        let (status, body) = chaos_tests::http_get(&addr, "/readyz").await.ok()?;
        (status == 503).then_some(body)
    })
    .await?;
    assert!(body.contains("nats"), "{body}");
    assert_eq!(series(&node.metrics().await?, "cadre_nats_connected"), 0.0);

    // It comes back: ready again, one reconnect counted.
    nats.respawn()?;
    eventually(WITHIN, "reconnected", || async {
        let m = node.metrics().await.ok()?;
        (series(&m, "cadre_nats_connected") == 1.0
            && series(&m, "cadre_nats_reconnects_total") >= 1.0)
            .then_some(())
    })
    .await?;
    let client = nats.client().await?;
    eventually(WITHIN, "readyz 200", || async {
        let (status, _) = chaos_tests::http_get(&addr, "/readyz").await.ok()?;
        (status == 200).then_some(())
    })
    .await?;
    node.wait_ready(&client).await?;

    // `cadre audit tail -f` prints records as they are committed.
    let mut tail = std::process::Command::new(chaos_tests::cadre_bin()?)
        .args(["audit", "tail", "--node", "n1", "-n", "0", "--follow"])
        .env("CADRE_NATS_URL", &nats.url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = tail
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    // The follower's subscription starts at some point of its own: keep submitting
    // until it prints a task's `accepted`, then that task must show whole, live.
    let mut seen: Vec<String> = Vec::new();
    let mut followed_task: Option<String> = None;
    let followed = tokio::time::timeout(WITHIN, async {
        loop {
            if followed_task.is_none() {
                let body =
                    json!({"playbook": "crm-only", "input": {"url": sink.url, "name": "Tail"}});
                submit(&client, body).await?;
            }
            match tokio::time::timeout(Duration::from_secs(2), lines.recv()).await {
                Ok(Some(line)) => {
                    let words: Vec<&str> = line.split_whitespace().collect();
                    if followed_task.is_none() && words.contains(&"accepted") {
                        followed_task = words.iter().find(|w| w.len() == 26).map(|w| w.to_string());
                    }
                    let done = followed_task
                        .as_deref()
                        .is_some_and(|t| words.contains(&t) && words.contains(&"succeeded"));
                    seen.push(line);
                    if done {
                        return anyhow::Ok(());
                    }
                }
                Ok(None) => anyhow::bail!("audit tail exited"),
                Err(_) => {}
            }
        }
    })
    .await;
    let _ = tail.kill();
    let _ = tail.wait();
    followed.map_err(|_| anyhow::anyhow!("audit tail -f printed: {seen:#?}"))??;
    let task = followed_task.unwrap_or_default();
    let of_task: Vec<&String> = seen.iter().filter(|l| l.contains(&task)).collect();
    println!(
        "audit tail -f, task {task}:\n{}",
        of_task
            .iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    for action in [
        "accepted",
        "step_started",
        "step_executed",
        "step_succeeded",
        "succeeded",
    ] {
        assert!(
            of_task
                .iter()
                .any(|l| l.split_whitespace().any(|w| w == action)),
            "no {action} for {task}: {of_task:#?}"
        );
    }
    assert!(
        of_task.iter().any(|l| l.contains("executor@n1")),
        "{of_task:#?}"
    );
    Ok(())
}
