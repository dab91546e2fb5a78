//! The spine, end to end: a real nats-server on a free port, the real `cadre` binary,
//! real RocksDB on disk, a real HTTP server as the CRM, real files.

use std::path::Path;
use std::time::{Duration, Instant};

use chaos_tests::{
    CadreNode, HttpSink, NatsServer, eventually, request, shipped_playbooks, wait_task,
};
use futures::StreamExt;
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(30);

struct World {
    nats: NatsServer,
    client: async_nats::Client,
    sink: HttpSink,
    dir: tempfile::TempDir,
    files: std::path::PathBuf,
}

async fn world() -> anyhow::Result<World> {
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let sink = HttpSink::start().await?;
    let dir = tempfile::tempdir()?;
    let files = dir.path().join("files").canonicalize().or_else(|_| {
        std::fs::create_dir_all(dir.path().join("files"))?;
        dir.path().join("files").canonicalize()
    })?;
    Ok(World {
        nats,
        client,
        sink,
        dir,
        files,
    })
}

impl World {
    fn node(&self, env: &[(&str, &str)]) -> anyhow::Result<CadreNode> {
        let roots = self.files.display().to_string();
        let playbooks = shipped_playbooks().display().to_string();
        let mut all: Vec<(&str, &str)> = vec![
            ("CADRE_FILE_ROOTS", &roots),
            ("CADRE_PLAYBOOKS_DIR", &playbooks),
        ];
        all.extend_from_slice(env);
        CadreNode::start("n1", &self.dir.path().join("data"), &self.nats.url, &all)
    }

    fn onboarding(&self, client: &str) -> Value {
        json!({"client": client, "email": "ops@example.test", "kickoff": "2026-12-01",
               "root": self.files.display().to_string(), "crm_url": self.sink.url})
    }

    async fn submit(&self, body: Value) -> anyhow::Result<Value> {
        request(&self.client, "cadre.tasks.submit", body.to_string()).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_task_runs_to_succeeded_with_real_http_and_files() -> anyhow::Result<()> {
    let w = world().await?;
    let mut node = w.node(&[])?;
    node.wait_ready(&w.client).await?;
    let mut events = w.client.subscribe("cadre.events.>").await?;

    let reply = w
        .submit(json!({"playbook": "client-onboarding", "input": w.onboarding("Acme")}))
        .await?;
    assert_eq!(reply["status"], "accepted", "{reply}");
    assert_eq!(reply["duplicate"], false);
    let task_id = reply["task_id"].as_str().unwrap_or_default().to_string();
    let task = wait_task(&w.client, &task_id, WITHIN, chaos_tests::is_terminal).await?;

    assert_eq!(task["status"], "succeeded", "{task:#}");
    let steps = task["steps"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        steps
            .iter()
            .map(|s| s["id"].as_str().unwrap_or(""))
            .collect::<Vec<_>>(),
        ["folder", "crm", "welcome"]
    );
    for s in &steps {
        assert_eq!(s["status"], "succeeded", "{s:#}");
        assert_eq!(s["attempts"], 1);
        assert_eq!(s["verdict"]["passed"], true);
        assert!(s["started_at_ms"].is_u64() && s["finished_at_ms"].is_u64());
    }
    let readme = std::fs::read_to_string(w.files.join("Acme/README.md"))?;
    assert!(readme.starts_with("# Acme"), "{readme}");
    let mail = std::fs::read_to_string(w.files.join("Acme/welcome-mail.md"))?;
    assert!(
        mail.contains("Welcome aboard, Acme") && mail.contains("crm-1"),
        "step output flows into the next step: {mail}"
    );

    let crm: Vec<_> = w
        .sink
        .requests()
        .into_iter()
        .filter(|r| r.path == "clients")
        .collect();
    assert_eq!(crm.len(), 1);
    assert_eq!(
        crm[0].idempotency_key.as_deref(),
        Some(format!("{task_id}.crm").as_str())
    );
    assert_eq!(crm[0].body["name"], "Acme");

    // Every committed transition was published, in order, ending with `succeeded`.
    let mut kinds = Vec::new();
    let mut last_seq = 0;
    while !kinds.contains(&"succeeded".to_string()) {
        let msg = tokio::time::timeout(WITHIN, events.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("events ended"))?;
        let event: Value = serde_json::from_slice(&msg.payload)?;
        if event["task_id"] != task_id.as_str() {
            continue;
        }
        let seq = event["seq"].as_u64().unwrap_or(0);
        assert!(seq > last_seq, "events in commit order");
        last_seq = seq;
        assert!(msg.subject.ends_with(event["kind"].as_str().unwrap_or("?")));
        kinds.push(event["kind"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(kinds.first().map(String::as_str), Some("accepted"));
    for k in [
        "planning",
        "running",
        "step_started",
        "step_succeeded",
        "verifying",
        "archiving",
    ] {
        assert!(kinds.iter().any(|x| x == k), "missing {k} in {kinds:?}");
    }
    Ok(())
}

/// A done step's executor forwards its outcome to the verifier under the task's reply
/// subject, and the verdict is what answers the task: one hop, not a reply and a second
/// request. Watched on the wire, as any NATS client can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steps_outcome_goes_from_its_executor_to_the_verifier_whose_verdict_answers_the_task()
-> anyhow::Result<()> {
    let w = world().await?;
    let mut node = w.node(&[])?;
    node.wait_ready(&w.client).await?;
    let mut execs = w.client.subscribe("cadre.exec.>").await?;
    let mut verifies = w.client.subscribe("cadre.verify.>").await?;
    let mut inboxes = w.client.subscribe("_INBOX.>").await?;
    w.client.flush().await?;

    let reply = w
        .submit(json!({"playbook": "client-onboarding", "input": w.onboarding("Forward")}))
        .await?;
    let task_id = reply["task_id"].as_str().unwrap_or_default().to_string();
    let task = wait_task(&w.client, &task_id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(task["status"], "succeeded", "{task:#}");

    // Three steps: three exec requests, three forwarded outcomes on this node's verifier
    // subject, each under the reply subject of its exec request.
    let mut exec_inboxes = Vec::new();
    for _ in 0..3 {
        let msg = tokio::time::timeout(WITHIN, execs.next()).await?;
        let msg = msg.ok_or_else(|| anyhow::anyhow!("exec subscription ended"))?;
        exec_inboxes.push(msg.reply.map(|r| r.to_string()).unwrap_or_default());
    }
    for (i, exec_inbox) in exec_inboxes.iter().enumerate() {
        let msg = tokio::time::timeout(WITHIN, verifies.next()).await?;
        let msg = msg.ok_or_else(|| anyhow::anyhow!("verify subscription ended"))?;
        assert_eq!(msg.subject.as_str(), "cadre.verify.node.n1");
        let reply_to = msg.reply.map(|r| r.to_string()).unwrap_or_default();
        assert_eq!(&reply_to, exec_inbox, "verify {i} answers exec {i}'s inbox");
    }
    // What each exec inbox received came from the verifier, not the executor.
    let mut answered_by = Vec::new();
    while answered_by.len() < 3 {
        let msg = tokio::time::timeout(WITHIN, inboxes.next()).await?;
        let msg = msg.ok_or_else(|| anyhow::anyhow!("inbox subscription ended"))?;
        if exec_inboxes.contains(&msg.subject.to_string()) {
            let from = msg.headers.as_ref().and_then(|h| h.get("Cadre-From"));
            answered_by.push(from.map(|v| v.as_str().to_string()).unwrap_or_default());
        }
    }
    assert_eq!(answered_by, ["verifier@n1"; 3]);
    // No verify request was sent apart from the forwarded ones: any would have reached
    // this connection before the reply that said the task had succeeded.
    assert!(
        futures::FutureExt::now_or_never(verifies.next()).is_none(),
        "a fourth verify request"
    );
    // The audit still names the executor as the one that ran each step.
    let records = chaos_tests::trace_records(&w.client, &task_id).await?;
    let ran: Vec<_> = records
        .iter()
        .filter(|r| r["action"] == "step_executed")
        .map(|r| r["actor"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(ran, ["executor@n1"; 3], "{records:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_text_is_never_read_as_a_template() -> anyhow::Result<()> {
    let w = world().await?;
    let mut node = w.node(&[])?;
    node.wait_ready(&w.client).await?;
    // The welcome step reads the CRM's output, so it renders at dispatch; the email
    // (inserted there) looks like a template and must arrive as written.
    let mut input = w.onboarding("Braces");
    input["email"] = json!("ops@{{steps.folder.output.path}}.test {{ unclosed");
    let r = w
        .submit(json!({"playbook": "client-onboarding", "input": input}))
        .await?;
    let task_id = r["task_id"].as_str().unwrap_or_default().to_string();
    let task = wait_task(&w.client, &task_id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(task["status"], "succeeded", "{task:#}");
    let mail = std::fs::read_to_string(w.files.join("Braces/welcome-mail.md"))?;
    assert!(
        mail.contains("To: ops@{{steps.folder.output.path}}.test {{ unclosed"),
        "{mail}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_idempotency_key_gives_the_same_task() -> anyhow::Result<()> {
    let w = world().await?;
    let mut node = w.node(&[])?;
    node.wait_ready(&w.client).await?;
    let body = json!({"playbook": "client-onboarding", "input": w.onboarding("Beta"), "idempotency_key": "beta-1"});
    // Concurrent duplicates: one task, one `duplicate: false`.
    let replies = futures::future::try_join_all((0..5).map(|_| w.submit(body.clone()))).await?;
    let ids: std::collections::HashSet<_> =
        replies.iter().map(|r| r["task_id"].to_string()).collect();
    assert_eq!(ids.len(), 1, "{replies:?}");
    assert_eq!(
        replies.iter().filter(|r| r["duplicate"] == false).count(),
        1,
        "{replies:?}"
    );
    let task_id = replies[0]["task_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    wait_task(&w.client, &task_id, WITHIN, |s| s == "succeeded").await?;
    let again = w.submit(body).await?;
    assert_eq!(again["task_id"], task_id.as_str());
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["status"], "succeeded");
    let list = request(&w.client, "cadre.tasks.list", "{}").await?;
    assert_eq!(list["tasks"].as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(w.sink.requests().len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueued_while_no_node_runs_is_carried_out_when_one_starts() -> anyhow::Result<()> {
    let w = world().await?;
    let setup = std::process::Command::new(chaos_tests::cadre_bin()?)
        .args(["setup", "--nats-url", &w.nats.url])
        .output()?;
    assert!(
        setup.status.success(),
        "{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let js = async_nats::jetstream::new(w.client.clone());
    for (i, client) in ["Gamma", "Delta", "Epsilon"].iter().enumerate() {
        let body =
            json!({"playbook": "client-onboarding", "input": w.onboarding(client)}).to_string();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("msg-{i}").as_str());
        js.publish_with_headers("cadre.tasks.enqueue", headers.clone(), body.clone().into())
            .await?
            .await?;
        // The same message again (a retrying publisher): deduplicated.
        js.publish_with_headers("cadre.tasks.enqueue", headers, body.into())
            .await?
            .await?;
    }
    // A duplicate by idempotency key, beyond Nats-Msg-Id.
    for _ in 0..2 {
        let body = json!({"playbook": "client-onboarding", "input": w.onboarding("Zeta"), "idempotency_key": "zeta"});
        js.publish("cadre.tasks.enqueue", body.to_string().into())
            .await?
            .await?;
    }
    let mut node = w.node(&[])?;
    node.wait_ready(&w.client).await?;
    let tasks = eventually(WITHIN, "4 succeeded tasks", || async {
        let list = request(&w.client, "cadre.tasks.list", "{}").await.ok()?;
        let tasks = list["tasks"].as_array()?.clone();
        (tasks.len() == 4 && tasks.iter().all(|t| t["status"] == "succeeded")).then_some(tasks)
    })
    .await?;
    assert_eq!(tasks.len(), 4);
    for client in ["Gamma", "Delta", "Epsilon", "Zeta"] {
        assert!(w.files.join(client).join("README.md").exists(), "{client}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_structured_error_and_the_node_keeps_serving() -> anyhow::Result<()> {
    let w = world().await?;
    let mut node = w.node(&[("CADRE_PAYLOAD_BYTES_MAX", "2048")])?;
    node.wait_ready(&w.client).await?;
    let cases: Vec<(&str, String, &str)> = vec![
        ("cadre.tasks.submit", "{not json".into(), "bad_json"),
        ("cadre.tasks.submit", "".into(), "bad_json"),
        ("cadre.tasks.submit", "[1,2]".into(), "invalid_request"),
        ("cadre.tasks.submit", "{}".into(), "invalid_request"),
        (
            "cadre.tasks.submit",
            r#"{"playbook":"client-onboarding","bogus":1}"#.into(),
            "invalid_request",
        ),
        (
            "cadre.tasks.submit",
            r#"{"playbook":"no-such-playbook"}"#.into(),
            "unknown_playbook",
        ),
        (
            "cadre.tasks.submit",
            r#"{"goal":"Onboard Acme"}"#.into(),
            "goal_not_supported",
        ),
        (
            "cadre.tasks.submit",
            r#"{"playbook":"client-onboarding","input":{"client":"x"}}"#.into(),
            "invalid_input",
        ),
        (
            "cadre.tasks.submit",
            r#"{"playbook":"client-onboarding","input":[]}"#.into(),
            "invalid_input",
        ),
        (
            "cadre.tasks.submit",
            format!(
                r#"{{"playbook":"client-onboarding","input":{{"pad":"{}"}}}}"#,
                "x".repeat(4096)
            ),
            "payload_too_large",
        ),
        ("cadre.tasks.get", "{}".into(), "invalid_request"),
        (
            "cadre.tasks.get",
            r#"{"task_id":"a.b"}"#.into(),
            "invalid_request",
        ),
        (
            "cadre.tasks.get",
            r#"{"task_id":"01NOTATASK"}"#.into(),
            "not_found",
        ),
        (
            "cadre.tasks.list",
            r#"{"limit":0}"#.into(),
            "invalid_request",
        ),
        (
            "cadre.tasks.list",
            r#"{"status":"sleeping"}"#.into(),
            "invalid_request",
        ),
        (
            "cadre.tasks.cancel",
            r#"{"task_id":"01NOTATASK"}"#.into(),
            "not_found",
        ),
        (
            "cadre.tasks.resolve",
            r#"{"task_id":"01NOTATASK","step_id":"s","decision":"retry"}"#.into(),
            "not_found",
        ),
        (
            "cadre.tasks.resolve",
            r#"{"task_id":"t","step_id":"s","decision":"maybe"}"#.into(),
            "invalid_request",
        ),
    ];
    for (subject, payload, code) in &cases {
        let reply = request(&w.client, subject, payload.clone()).await?;
        assert_eq!(
            reply["error"]["code"], *code,
            "{subject} {payload:.60} → {reply}"
        );
        assert!(
            reply["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{reply}"
        );
    }
    // Conflicts on a real task: resolve a step that is not waiting, cancel a finished task.
    let done = w
        .submit(json!({"playbook": "client-onboarding", "input": w.onboarding("Eta")}))
        .await?;
    let task_id = done["task_id"].as_str().unwrap_or_default().to_string();
    wait_task(&w.client, &task_id, WITHIN, |s| s == "succeeded").await?;
    let resolve = json!({"task_id": task_id, "step_id": "crm", "decision": "retry"}).to_string();
    assert_eq!(
        request(&w.client, "cadre.tasks.resolve", resolve).await?["error"]["code"],
        "conflict"
    );
    let cancel = json!({"task_id": task_id}).to_string();
    assert_eq!(
        request(&w.client, "cadre.tasks.cancel", cancel).await?["error"]["code"],
        "conflict"
    );
    // An enqueued bad message is reported and dropped, not redelivered forever.
    let mut rejected = w.client.subscribe("cadre.events.intake.rejected").await?;
    let js = async_nats::jetstream::new(w.client.clone());
    js.publish("cadre.tasks.enqueue", "{oops".into())
        .await?
        .await?;
    let report = tokio::time::timeout(WITHIN, rejected.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no report"))?;
    let report: Value = serde_json::from_slice(&report.payload)?;
    assert_eq!(report["error"]["code"], "bad_json");
    // Still serving.
    let ok = w
        .submit(json!({"playbook": "client-onboarding", "input": w.onboarding("Theta")}))
        .await?;
    let task_id = ok["task_id"].as_str().unwrap_or_default().to_string();
    wait_task(&w.client, &task_id, WITHIN, |s| s == "succeeded").await?;
    Ok(())
}

fn write_playbook(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(format!("{name}.toml")), text)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_retry_with_the_same_key_and_permanent_ones_fail_the_task()
-> anyhow::Result<()> {
    let w = world().await?;
    let playbooks = w.dir.path().join("playbooks");
    write_playbook(
        &playbooks,
        "crm-only",
        r#"
name = "crm-only"
[[steps]]
id = "crm"
tool = "http.request"
max_attempts = 3
params = { method = "POST", url = "{{input.url}}/clients", json = { name = "{{input.name}}" } }
verify = { status_in = [201] }
"#,
    )?;
    let pb = playbooks.display().to_string();
    let mut node = w.node(&[
        ("CADRE_PLAYBOOKS_DIR", &pb),
        ("CADRE_RETRY_DELAY_MS_BASE", "20"),
        ("CADRE_RETRY_DELAY_MS_MAX", "50"),
    ])?;
    node.wait_ready(&w.client).await?;

    w.sink.fail_next(&[503, 429]);
    let r = w
        .submit(json!({"playbook": "crm-only", "input": {"url": w.sink.url, "name": "Iota"}}))
        .await?;
    let task_id = r["task_id"].as_str().unwrap_or_default().to_string();
    let task = wait_task(&w.client, &task_id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(task["status"], "succeeded", "{task:#}");
    assert_eq!(task["steps"][0]["attempts"], 3);
    let keys: Vec<_> = w
        .sink
        .requests()
        .iter()
        .map(|r| r.idempotency_key.clone())
        .collect();
    assert_eq!(
        keys,
        vec![Some(format!("{task_id}.crm")); 3],
        "every attempt carries the same key"
    );

    w.sink.fail_next(&[400]);
    let r = w
        .submit(json!({"playbook": "crm-only", "input": {"url": w.sink.url, "name": "Kappa"}}))
        .await?;
    let task_id = r["task_id"].as_str().unwrap_or_default().to_string();
    let task = wait_task(&w.client, &task_id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(task["status"], "failed");
    assert_eq!(task["steps"][0]["attempts"], 1, "a 400 is not retried");
    let failure = task["failure"].as_str().unwrap_or_default();
    assert!(
        failure.contains("step `crm` failed after 1 attempt") && failure.contains("400"),
        "{failure}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_task_and_sigterm_exits_cleanly() -> anyhow::Result<()> {
    let w = world().await?;
    let playbooks = w.dir.path().join("playbooks");
    write_playbook(
        &playbooks,
        "slow",
        r#"
name = "slow"
[[steps]]
id = "wait"
tool = "shell.run"
params = { program = "sleep", args = ["{{input.seconds}}"] }
verify = { exit_code = 0 }
[[steps]]
id = "after"
tool = "shell.run"
depends_on = ["wait"]
params = { program = "sleep", args = ["0"] }
verify = { exit_code = 0 }
"#,
    )?;
    let pb = playbooks.display().to_string();
    // `info`: the shutdown says there why it stops waiting for steps.
    let mut node = w.node(&[
        ("CADRE_PLAYBOOKS_DIR", &pb),
        ("CADRE_SHELL_ALLOW", "sleep"),
        ("CADRE_LOG_LEVEL", "info"),
    ])?;
    node.wait_ready(&w.client).await?;
    let r = w
        .submit(json!({"playbook": "slow", "input": {"seconds": "3"}}))
        .await?;
    let task_id = r["task_id"].as_str().unwrap_or_default().to_string();
    wait_task(&w.client, &task_id, WITHIN, |s| s == "running").await?;
    let cancel = request(
        &w.client,
        "cadre.tasks.cancel",
        json!({"task_id": task_id, "reason": "client changed mind"}).to_string(),
    )
    .await?;
    assert_eq!(cancel["status"], "cancelled", "{cancel}");
    let task = wait_task(&w.client, &task_id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(task["status"], "cancelled");
    assert_eq!(task["steps"][1]["status"], "skipped");
    assert!(
        task["failure"]
            .as_str()
            .unwrap_or_default()
            .contains("client changed mind")
    );

    // SIGTERM with a step in flight: the step finishes inside the grace period, exit 0.
    let r = w
        .submit(json!({"playbook": "slow", "input": {"seconds": "1"}}))
        .await?;
    let task_id = r["task_id"].as_str().unwrap_or_default().to_string();
    wait_task(&w.client, &task_id, WITHIN, |s| s == "running").await?;
    assert_eq!(node.terminate(Duration::from_secs(20))?, Some(0));
    // Restarted, the task resumes from its checkpoint and finishes.
    node.restart()?;
    node.wait_ready(&w.client).await?;
    let task = wait_task(&w.client, &task_id, WITHIN, |s| {
        chaos_tests::is_terminal(s) || s == "awaiting_operator"
    })
    .await?;
    // Both processes' logs: the first says why it stopped waiting for the step.
    assert_eq!(
        task["status"],
        "succeeded",
        "{task:#}\nlog:\n{}",
        node.log_tail()
    );
    Ok(())
}

/// A SIGTERM that comes while the node is still starting stops it cleanly: as soon as
/// its store is being opened, and while it waits for a NATS server that does not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_node_starts_stops_it_cleanly() -> anyhow::Result<()> {
    let w = world().await?;
    let mut node = w.node(&[])?;
    let lock = node.data_dir.join("store").join("LOCK");
    let deadline = Instant::now() + WITHIN;
    while !lock.exists() {
        anyhow::ensure!(Instant::now() < deadline, "the node never opened its store");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(node.terminate(Duration::from_secs(20))?, Some(0));

    // Where it looks for NATS, something accepts connections and never speaks: the node
    // waits there, and the SIGTERM ends the wait.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let silent_url = format!("nats://{}", silent.local_addr()?);
    let set_nats_url = |node: &mut CadreNode, url: &str| {
        node.env.retain(|(k, _)| k != "CADRE_NATS_URL");
        node.env.push(("CADRE_NATS_URL".into(), url.into()));
    };
    set_nats_url(&mut node, &silent_url);
    node.restart()?;
    let _connection = tokio::time::timeout(WITHIN, silent.accept()).await??;
    assert_eq!(node.terminate(Duration::from_secs(10))?, Some(0));

    // It stopped as a node stops: started again, it serves.
    set_nats_url(&mut node, &w.nats.url);
    node.restart()?;
    node.wait_ready(&w.client).await?;
    Ok(())
}

#[test]
fn config_errors_exit_2_with_what_to_fix_and_dump_config_shows_layers() -> anyhow::Result<()> {
    let bin = chaos_tests::cadre_bin()?;
    let out = std::process::Command::new(&bin)
        .args(["node", "run", "--dump-config", "--node-id", "from-flag"])
        .env("CADRE_STEP_ATTEMPTS_MAX", "4")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("node_id = \"from-flag\"") && text.contains("step_attempts_max = 4"),
        "{text}"
    );
    let out = std::process::Command::new(&bin)
        .args(["node", "run"])
        .env("CADRE_METRICS_ADDR", "nowhere")
        .env("CADRE_FILE_ROOTS", "relative/dir")
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr)?;
    assert!(
        err.contains("metrics_addr `nowhere`") && err.contains("must be an absolute path"),
        "{err}"
    );
    let out = std::process::Command::new(&bin)
        .args(["task", "submit", "x", "--input", "[1]"])
        .output()?;
    assert_eq!(out.status.code(), Some(2), "bad CLI input is a usage error");
    Ok(())
}

/// The business's identity (`CADRE_PERSONA_FILE`) reaches the work: a step writes a
/// note signed from `persona.*`. A persona file with a problem stops the node at start
/// with the file and the problem named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_persona_signs_what_the_playbooks_write() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let dir = tempfile::tempdir()?;
    let thanks = r#"
name = "thanks"
[[steps]]
id = "note"
tool = "file.write"
params = { path = "{{input.root}}/{{input.client}}.txt", content = "Thank you, {{input.client}}.\n{{persona.signature}} <{{persona.contacts.email}}>" }
verify = { file_exists = true }
"#;
    let (roots, pb) = chaos_tests::files_and_playbooks(dir.path(), &[("thanks", thanks)])?;
    let persona = dir.path().join("persona.toml");
    std::fs::write(
        &persona,
        r#"
name = "Ada Moreau"
business = "Moreau Consulting"
signature = "Ada Moreau, Moreau Consulting"
[contacts]
email = "ada@example.com"
"#,
    )?;
    let persona_path = persona.display().to_string();
    let env = [
        ("CADRE_FILE_ROOTS", roots.as_str()),
        ("CADRE_PLAYBOOKS_DIR", pb.as_str()),
        ("CADRE_PERSONA_FILE", persona_path.as_str()),
    ];
    let mut node = CadreNode::start("n1", &dir.path().join("data"), &nats.url, &env)?;
    node.wait_ready(&client).await?;
    let submit = json!({"playbook": "thanks", "input": {"root": roots, "client": "acme"}});
    let reply = request(&client, "cadre.tasks.submit", submit.to_string()).await?;
    let id = reply["task_id"].as_str().unwrap_or_default().to_string();
    let task = chaos_tests::wait_task(&client, &id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(task["status"], "succeeded", "{task:#}");
    assert_eq!(
        std::fs::read_to_string(Path::new(&roots).join("acme.txt"))?,
        "Thank you, acme.\nAda Moreau, Moreau Consulting <ada@example.com>"
    );
    node.terminate(Duration::from_secs(10))?;

    // A persona with a problem: the node does not start, and says why.
    std::fs::write(&persona, "name = \"\"\n")?;
    let out = std::process::Command::new(chaos_tests::cadre_bin()?)
        .args(["node", "run", "--dump-config"])
        .env("CADRE_PERSONA_FILE", &persona_path)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("persona file") && stderr.contains("`name` must not be empty"),
        "{stderr}"
    );
    Ok(())
}
