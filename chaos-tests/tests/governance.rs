//! Governance, end to end against a real nats-server, the real `cadre` binary, a real
//! HTTP sink and real child processes: Cedar policies (allow, deny, approval), approvals
//! (decided, denied, expired, void, across a restart), policy hot reload, the kill
//! switch (its state in a JetStream KV bucket) and rate limits.

use std::time::{Duration, Instant};

use anyhow::Context;
use chaos_tests::{
    CadreNode, HttpSink, NatsServer, cadre_cli, eventually, metric, request, wait_task,
};
use futures::StreamExt;
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

/// A shell step the default policies hold for approval; its marker file shows it ran.
const DEPLOY: &str = r#"
name = "deploy"
[[steps]]
id = "ship"
tool = "shell.run"
params = { program = "touch", args = ["{{input.root}}/shipped-{{task.id}}"] }
verify = { exit_code = 0 }
"#;

/// A write outside the file roots: the default policies deny it.
const OUTSIDE: &str = r#"
name = "outside"
[[steps]]
id = "escape"
tool = "file.write"
params = { path = "{{input.path}}", content = "should never be written" }
verify = { file_exists = true }
"#;

/// Two HTTP calls that can be undone, then a shell step that needs an approval.
const SAGA: &str = r#"
name = "saga"
[[steps]]
id = "first"
tool = "http.request"
params = { method = "POST", url = "{{input.url}}/first" }
verify = { status_in = [201] }
compensate = { tool = "http.request", params = { method = "POST", url = "{{input.url}}/undo/first/{{steps.first.output.body.id}}" } }
[[steps]]
id = "second"
tool = "http.request"
depends_on = ["first"]
params = { method = "POST", url = "{{input.url}}/second" }
verify = { status_in = [201] }
compensate = { tool = "http.request", params = { method = "POST", url = "{{input.url}}/undo/second" }, verify = { status_in = [201] } }
[[steps]]
id = "ship"
tool = "shell.run"
depends_on = ["second"]
params = { program = "touch", args = ["{{input.root}}/shipped-{{task.id}}"] }
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
    std::fs::write(playbooks.join("deploy.toml"), DEPLOY)?;
    std::fs::write(playbooks.join("outside.toml"), OUTSIDE)?;
    std::fs::write(playbooks.join("saga.toml"), SAGA)?;
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files)?;
    let files = files.canonicalize()?.display().to_string();
    let env = vec![
        (
            "CADRE_PLAYBOOKS_DIR".into(),
            playbooks.display().to_string(),
        ),
        ("CADRE_FILE_ROOTS".into(), files.clone()),
        ("CADRE_SHELL_ALLOW".into(), "sleep,touch".into()),
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

impl World {
    async fn submit(&self, playbook: &str, input: Value) -> anyhow::Result<String> {
        let body = json!({"playbook": playbook, "input": input});
        let reply = request(&self.client, "cadre.tasks.submit", body.to_string()).await?;
        reply["task_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("no task id: {reply}"))
    }

    async fn deploy(&self) -> anyhow::Result<String> {
        self.submit("deploy", json!({"root": self.files})).await
    }

    fn shipped(&self, task_id: &str) -> bool {
        std::path::Path::new(&self.files)
            .join(format!("shipped-{task_id}"))
            .exists()
    }

    /// Waits for the task to wait for an approval; returns the approval as its view shows it.
    async fn pending_approval(&self, task_id: &str) -> anyhow::Result<Value> {
        let task = wait_task(&self.client, task_id, WITHIN, |s| {
            s == "awaiting_approval" || chaos_tests::is_terminal(s)
        })
        .await?;
        anyhow::ensure!(task["status"] == "awaiting_approval", "{task:#}");
        task["steps"]
            .as_array()
            .and_then(|steps| {
                steps
                    .iter()
                    .map(|s| &s["approval"])
                    .find(|a| a["state"] == "pending")
            })
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no pending approval: {task:#}"))
    }

    async fn decide(&self, approval_id: &str, decision: &str, by: &str) -> anyhow::Result<Value> {
        let body = json!({"approval_id": approval_id, "decision": decision, "by": by});
        request(&self.client, "cadre.approvals.decide", body.to_string()).await
    }

    async fn end(&self, task_id: &str) -> anyhow::Result<Value> {
        wait_task(&self.client, task_id, WITHIN, chaos_tests::is_terminal).await
    }
}

async fn metric_of(node: &CadreNode, series: &str) -> anyhow::Result<f64> {
    let text = node
        .metrics()
        .await
        .with_context(|| format!("/metrics; log:\n{}", node.log_tail()))?;
    Ok(metric(&text, series))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_allow_deny_or_hold_each_step_and_the_operator_decides_even_across_a_restart()
-> anyhow::Result<()> {
    let w = world().await?;
    // The built-in defaults; shell.run costs a quarter.
    let mut node = w.node_with(
        "n1",
        &[
            ("CADRE_POLICIES_DIR", ""),
            ("CADRE_TOOL_COSTS", "shell.run=0.25"),
        ],
    )?;
    node.wait_ready(&w.client).await?;
    let mut requested = w.client.subscribe("cadre.approvals.requested.>").await?;

    // Allow: a POST to a loopback host and a write inside the roots run unattended.
    let input = json!({"url": w.sink.url, "name": "acme", "root": w.files});
    let allowed = w.submit("two-steps", input).await?;
    let task = w.end(&allowed).await?;
    assert_eq!(task["status"], "succeeded", "{task:#}");
    let trace = w.cli(&["task", "trace", &allowed])?;
    assert!(trace.contains("allowed by policies"), "{trace}");

    // Deny: a write outside the roots fails without running.
    let escape = w.dir.path().join("escaped.txt");
    let denied = w
        .submit("outside", json!({"path": escape.display().to_string()}))
        .await?;
    let task = w.end(&denied).await?;
    assert_eq!(task["status"], "failed", "{task:#}");
    assert!(
        task["failure"]
            .as_str()
            .is_some_and(|f| f.contains("denied: file.write outside the configured file roots")),
        "{task:#}"
    );
    assert!(!escape.exists(), "a denied write happened");

    // Approval: the shell step waits; the request says what, why and what it costs.
    let first = w.deploy().await?;
    let approval = w.pending_approval(&first).await?;
    let id = approval["approval_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(approval["state"], "pending");
    let event = tokio::time::timeout(WITHIN, requested.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no approval event"))?;
    assert_eq!(
        event.subject.as_str(),
        format!("cadre.approvals.requested.{id}")
    );
    let event: Value = serde_json::from_slice(&event.payload)?;
    assert_eq!(
        event["reason"]
            .as_str()
            .map(|r| r.starts_with("shell.run needs an operator's approval")),
        Some(true),
        "{event:#}"
    );
    assert_eq!(event["tool"], "shell.run");
    assert_eq!(event["params"]["program"], "touch");
    assert_eq!(event["cost_usd"], 0.25);
    assert_eq!(event["args_hash"].as_str().map(str::len), Some(64));
    assert!(!w.shipped(&first), "ran before approval");
    assert_eq!(metric_of(&node, "cadre_approvals_pending").await?, 1.0);
    let list = w.cli(&["approvals", "list"])?;
    assert!(list.contains(&id), "{list}");

    let out = w.cli(&[
        "approvals",
        "approve",
        &id,
        "--by",
        "ann",
        "--note",
        "ship it",
    ])?;
    assert!(out.contains("approved"), "{out}");
    let task = w.end(&first).await?;
    assert_eq!(task["status"], "succeeded", "{task:#}");
    assert!(w.shipped(&first));
    assert_eq!(task["steps"][0]["approval"]["decided_by"], "ann");
    assert_eq!(task["cost_usd"], 0.25);
    let trace = w.cli(&["task", "trace", &first])?;
    assert!(
        trace.contains("approval_granted") && trace.contains("ann"),
        "{trace}"
    );
    // Decided once.
    let again = w.decide(&id, "deny", "bob").await?;
    assert_eq!(again["error"]["code"], "conflict", "{again}");

    // Denied by the operator: the step never runs.
    let second = w.deploy().await?;
    let id2 = w.pending_approval(&second).await?["approval_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let reply = w.decide(&id2, "deny", "bob").await?;
    assert_eq!(reply["state"], "denied", "{reply}");
    let task = w.end(&second).await?;
    assert_eq!(task["status"], "failed");
    assert_eq!(task["failure"], "step `ship` denied by bob");
    assert!(!w.shipped(&second));

    // Restart while awaiting approval: the request survives kill -9.
    let third = w.deploy().await?;
    let id3 = w.pending_approval(&third).await?["approval_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    node.kill9();
    node.restart()?;
    node.wait_ready(&w.client).await?;
    let list = request(&w.client, "cadre.approvals.list", "{}").await?;
    let ids: Vec<&str> = list["approvals"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x["approval_id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, [id3.as_str()], "{list}");
    assert!(!w.shipped(&third));
    let reply = w.decide(&id3, "approve", "ann").await?;
    assert_eq!(reply["state"], "approved", "{reply}");
    assert_eq!(w.end(&third).await?["status"], "succeeded");
    assert!(w.shipped(&third));

    // Bad input: a clear error, and the node keeps serving.
    for (body, code) in [
        (
            json!({"approval_id": "nope", "decision": "approve", "by": "x"}),
            "invalid_request",
        ),
        (
            json!({"approval_id": "01ABC-a1", "decision": "approve", "by": "x"}),
            "not_found",
        ),
        (
            json!({"approval_id": id3, "decision": "maybe", "by": "x"}),
            "invalid_request",
        ),
        (
            json!({"approval_id": id3, "decision": "approve", "by": " "}),
            "invalid_request",
        ),
    ] {
        let reply = request(&w.client, "cadre.approvals.decide", body.to_string()).await?;
        assert_eq!(reply["error"]["code"], code, "{body} -> {reply}");
    }
    assert_eq!(metric_of(&node, "cadre_approvals_pending").await?, 0.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_expire_are_void_when_the_policies_change_and_a_bad_reload_keeps_the_old_ones()
-> anyhow::Result<()> {
    let w = world().await?;
    let policies = w.dir.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    let default =
        std::fs::read_to_string(chaos_tests::ops_dir().join("../policies/default.cedar"))?;
    std::fs::write(policies.join("default.cedar"), &default)?;
    let dir = policies.display().to_string();
    let mut node = w.node_with(
        "n1",
        &[
            ("CADRE_POLICIES_DIR", &dir),
            ("CADRE_POLICY_RELOAD_MS", "100"),
            ("CADRE_APPROVAL_TTL_MS", "4000"),
        ],
    )?;
    node.wait_ready(&w.client).await?;

    // Expiry: nobody decides; the default (deny) fails the task, the step never runs.
    let expiring = w.deploy().await?;
    let approval = w.pending_approval(&expiring).await?;
    let version = approval["policy_version"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let task = w.end(&expiring).await?;
    assert_eq!(task["status"], "failed", "{task:#}");
    assert!(
        task["failure"]
            .as_str()
            .is_some_and(|f| f.contains("expired")),
        "{task:#}"
    );
    assert_eq!(task["steps"][0]["approval"]["state"], "expired");
    assert!(!w.shipped(&expiring));

    // Void on change: the policies change while a request waits; approving it then is
    // void, and the step asks again under the new version.
    let changed = w.deploy().await?;
    let id = w.pending_approval(&changed).await?["approval_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    std::fs::write(
        policies.join("default.cedar"),
        format!(
            "{default}
// Reviewed by ann.
"
        ),
    )?;
    eventually(WITHIN, "the policies reloaded", || async {
        let m = node.metrics().await.ok()?;
        m.contains(r#"cadre_policy_reloads_total{result="ok"} 1"#)
            .then_some(())
    })
    .await?;
    let reply = w.decide(&id, "approve", "ann").await?;
    assert_eq!(reply["state"], "void", "{reply}");
    let next = reply["next_approval_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!next.is_empty() && next != id, "{reply}");
    assert!(!w.shipped(&changed), "a void approval ran the step");
    let view = request(
        &w.client,
        "cadre.approvals.get",
        json!({ "approval_id": next }).to_string(),
    )
    .await?;
    let new_version = view["policy_version"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_ne!(new_version, version, "{view}");
    let (code, out, err) = cadre_cli(&w.nats.url, &["approvals", "approve", &id, "--by", "ann"])?;
    assert_eq!(code, 1, "deciding a void approval again: {out}{err}");
    let reply = w.decide(&next, "approve", "ann").await?;
    assert_eq!(reply["state"], "approved", "{reply}");
    assert_eq!(w.end(&changed).await?["status"], "succeeded");
    assert!(w.shipped(&changed));

    // A bad edit is refused: the policies in force stay, and `policy check` points at it.
    std::fs::write(
        policies.join("zz-broken.cedar"),
        "permit (principal, action, resource);
forbid (principal action, resource);
",
    )?;
    eventually(WITHIN, "the bad reload refused", || async {
        let m = node.metrics().await.ok()?;
        m.contains(r#"cadre_policy_reloads_total{result="invalid"} 1"#)
            .then_some(())
    })
    .await?;
    let after = w.deploy().await?;
    let approval = w.pending_approval(&after).await?;
    assert_eq!(
        approval["policy_version"],
        new_version.as_str(),
        "{approval}"
    );
    let (code, _, err) = cadre_cli(&w.nats.url, &["policy", "check", &dir])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("zz-broken.cedar:2:"), "{err}");
    let tail = w.cli(&["audit", "tail", "--node", "n1", "-n", "200"])?;
    assert!(
        tail.contains("policies_reloaded") && tail.contains("policies_rejected"),
        "{tail}"
    );

    // A node does not start on invalid policies.
    let mut refused = w.node_with("n2", &[("CADRE_POLICIES_DIR", &dir)])?;
    let code = refused.exit_code(WITHIN).await?;
    assert_eq!(code, Some(1), "{}", refused.log_tail());
    let log = refused.log_tail();
    assert!(
        log.contains("invalid policies") && log.contains("zz-broken.cedar:2:"),
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_failure_undo_the_done_steps_newest_first() -> anyhow::Result<()> {
    let w = world().await?;
    let mut node = w.node_with("n1", &[("CADRE_POLICIES_DIR", "")])?;
    node.wait_ready(&w.client).await?;
    let input = || json!({"url": w.sink.url, "root": w.files});
    // The undo requests the sink saw for a task's steps, in arrival order.
    let paths = |from: usize| -> Vec<String> {
        w.sink.requests()[from..]
            .iter()
            .map(|r| r.path.clone())
            .collect()
    };

    // Cancel while the last step waits for approval: the two done steps are undone,
    // the newer first; the first undo reads the id the CRM gave the first step.
    let seen = w.sink.requests().len();
    let cancelled = w.submit("saga", input()).await?;
    w.pending_approval(&cancelled).await?;
    let out = w.cli(&["task", "cancel", &cancelled, "--reason", "client left"])?;
    assert!(
        out.contains("compensating") || out.contains("cancelled"),
        "{out}"
    );
    let task = w.end(&cancelled).await?;
    assert_eq!(task["status"], "cancelled", "{task:#}");
    let p = paths(seen);
    assert_eq!(p.len(), 4, "{p:?}");
    assert_eq!(&p[..2], ["first", "second"]);
    assert_eq!(p[2], "undo/second");
    assert!(p[3].starts_with("undo/first/crm-"), "{p:?}");
    let ids: Vec<&str> = task["steps"]
        .as_array()
        .map(|s| s.iter().filter_map(|s| s["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        ids,
        ["first", "second", "ship", "second.undo", "first.undo"]
    );
    assert!(!w.shipped(&cancelled));
    let trace = w.cli(&["task", "trace", &cancelled])?;
    assert!(
        trace.contains("compensating") && trace.contains("2 of 2 steps undone"),
        "{trace}"
    );

    // A failed task compensates the same way: the operator denies the last step.
    let seen = w.sink.requests().len();
    let failed = w.submit("saga", input()).await?;
    let id = w.pending_approval(&failed).await?["approval_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let reply = w.decide(&id, "deny", "ann").await?;
    assert_eq!(reply["state"], "denied", "{reply}");
    let task = w.end(&failed).await?;
    assert_eq!(task["status"], "failed", "{task:#}");
    assert_eq!(task["failure"], "step `ship` denied by ann");
    let p = paths(seen);
    assert_eq!(p.get(2).map(String::as_str), Some("undo/second"), "{p:?}");
    assert!(
        p.get(3).is_some_and(|x| x.starts_with("undo/first/")),
        "{p:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_would_cross_a_budget_waits_for_approval_and_spend_survives_restarts()
-> anyhow::Result<()> {
    let w = world().await?;
    // Two steps: an HTTP call at $0.10 and a write at $0.01; $0.25 a day for the playbook.
    let mut node = w.node_with(
        "n1",
        &[
            ("CADRE_TOOL_COSTS", "http.request=0.10,file.write=0.01"),
            ("CADRE_BUDGET_PLAYBOOK_DAY_USD", "two-steps=0.25"),
        ],
    )?;
    node.wait_ready(&w.client).await?;
    let input = |n: u32| json!({"url": w.sink.url, "name": format!("c{n}"), "root": w.files});
    for n in 0..2 {
        let id = w.submit("two-steps", input(n)).await?;
        let task = w.end(&id).await?;
        assert_eq!(task["status"], "succeeded", "{task:#}");
        assert_eq!(task["cost_usd"], 0.11, "{task:#}");
    }

    // The third task's first step would bring the day to $0.32: it waits for a person.
    let third = w.submit("two-steps", input(2)).await?;
    let approval = w.pending_approval(&third).await?;
    let reason = approval["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(
            "budget: this step ($0.1000) would cross two-steps's daily cap $0.2500 (spent $0.2200"
        ),
        "{approval:#}"
    );
    let calls = w.sink.requests().len();
    let id = approval["approval_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(w.decide(&id, "approve", "ann").await?["state"], "approved");
    // Approved, it runs; the next step is over the cap too, and asks again.
    let next = w.pending_approval(&third).await?;
    assert_eq!(next["step_id"], "note", "{next:#}");
    assert_eq!(
        w.sink.requests().len(),
        calls + 1,
        "the approved call ran once"
    );
    let id = next["approval_id"].as_str().unwrap_or_default().to_string();
    assert_eq!(w.decide(&id, "approve", "ann").await?["state"], "approved");
    assert_eq!(w.end(&third).await?["status"], "succeeded");

    let budget = |w: &World| -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&w.cli(&["budget", "--json"])?)?)
    };
    let check = |b: &Value| {
        let pb = &b["playbooks"][0];
        assert_eq!(pb["playbook"], "two-steps", "{b:#}");
        assert!(
            (b["spent_today_usd"].as_f64().unwrap_or(0.0) - 0.33).abs() < 1e-9,
            "{b:#}"
        );
        assert_eq!(pb["day_cap_usd"], 0.25, "{b:#}");
        assert_eq!(pb["verified_tasks"], 3, "{b:#}");
        assert!(
            (pb["cost_per_verified_task_usd"].as_f64().unwrap_or(0.0) - 0.11).abs() < 1e-9,
            "{b:#}"
        );
    };
    check(&budget(&w)?);
    let m = node.metrics().await?;
    assert!(
        m.contains(r#"cadre_task_cost_usd_count{playbook="two-steps"} 3"#),
        "{m}"
    );
    assert!(
        m.contains(r#"cadre_budget_cap_usd{scope="playbook:two-steps"} 0.25"#),
        "{m}"
    );
    let spent = m
        .lines()
        .find(|l| l.starts_with(r#"cadre_cost_usd_total{playbook="two-steps"}"#))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(spent.is_some_and(|v| (v - 0.33).abs() < 1e-9), "{m}");

    // The spend is on disk: a restarted node still counts it against the cap.
    node.kill9();
    node.restart()?;
    node.wait_ready(&w.client).await?;
    check(&budget(&w)?);
    let fourth = w.submit("two-steps", input(3)).await?;
    let approval = w.pending_approval(&fourth).await?;
    assert!(
        approval["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("budget:")),
        "{approval:#}"
    );
    Ok(())
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

    // The same approval flow asks what to do about it.
    let approval = &step["approval"];
    assert_eq!(approval["kind"], "outcome_unknown", "{t:#}");
    assert_eq!(approval["state"], "pending", "{t:#}");
    let id = approval["approval_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let list = w.cli(&["approvals", "list"])?;
    assert!(list.contains(&id), "{list}");

    w.cli(&["killswitch", "off"])?;
    let wrong = w.decide(&id, "approve", "bob").await?;
    assert_eq!(wrong["error"]["code"], "conflict", "{wrong}");
    w.cli(&["approvals", "decide", &id, "abort", "--by", "bob"])?;
    let t = wait_task(&w.client, &task_id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(t["status"], "failed", "{t:#}");
    assert_eq!(t["steps"][0]["approval"]["state"], "denied", "{t:#}");
    assert_eq!(t["steps"][0]["approval"]["decided_by"], "bob", "{t:#}");
    node.kill9();
    Ok(())
}

/// Is our `sleep 37.25` running?
fn sleeping() -> bool {
    chaos_tests::process_running(&["sleep", "37.25"])
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
