//! Knowledge, end to end on one node: the context store over `cadre.context.*` (versions,
//! time travel, a CAS conflict, checkpoint and rollback), a playbook whose second run
//! reads what the first one archived and what its `context.put` step wrote, facts
//! superseded and confirmed, and episodes pruned by the retention caps. The two-node
//! side (one body of knowledge, a write made offline) is in `topology.rs`.

use std::path::Path;
use std::time::Duration;

use chaos_tests::{CadreNode, NatsServer, cadre_cli, eventually, request, wait_task};
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(30);

async fn ask(nats: &async_nats::Client, subject: &str, body: Value) -> anyhow::Result<Value> {
    request(nats, subject, body.to_string()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_context_store_keeps_versions_checkpoints_and_rolls_back() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let dir = tempfile::tempdir()?;
    let playbooks = chaos_tests::shipped_playbooks().display().to_string();
    let mut node = CadreNode::start(
        "n1",
        &dir.path().join("data"),
        &nats.url,
        &[("CADRE_PLAYBOOKS_DIR", playbooks.as_str())],
    )?;
    node.wait_ready(&client).await?;
    let key = "project.acme.status";

    let v1 = ask(
        &client,
        "cadre.context.put",
        json!({"key": key, "value": "lead", "reason": "first call"}),
    )
    .await?;
    assert_eq!(
        (v1["status"].as_str(), v1["version"].as_u64()),
        (Some("applied"), Some(1)),
        "{v1}\n{}",
        node.log_tail()
    );
    let v2 = ask(&client, "cadre.context.put", json!({"key": key, "value": {"stage": "signed", "value_usd": 12000}, "expected_version": 1})).await?;
    assert_eq!(v2["version"], 2, "{v2}");

    // A writer that read version 1 loses, and is told the version now.
    let lost = ask(
        &client,
        "cadre.context.put",
        json!({"key": key, "value": "lost", "expected_version": 1}),
    )
    .await?;
    assert_eq!(lost["error"]["code"], "conflict", "{lost}");
    assert_eq!(lost["error"]["current_version"], 2, "{lost}");

    let latest = ask(&client, "cadre.context.get", json!({"key": key})).await?;
    assert_eq!(latest["version"], 2);
    assert_eq!(latest["value"]["stage"], "signed");
    assert_eq!(latest["author"]["actor"], "operator");
    let first = ask(
        &client,
        "cadre.context.get",
        json!({"key": key, "version": 1}),
    )
    .await?;
    assert_eq!(
        (first["value"].as_str(), first["reason"].as_str()),
        (Some("lead"), Some("first call"))
    );
    // Time travel: what was in force just before version 2 entered the store.
    let at = latest["at_ms"].as_u64().unwrap_or_default() - 1;
    let then = ask(
        &client,
        "cadre.context.get",
        json!({"key": key, "at_ms": at}),
    )
    .await?;
    assert!(
        then["version"] == 1 || at < first["at_ms"].as_u64().unwrap_or_default(),
        "{then}"
    );
    let before_all = ask(
        &client,
        "cadre.context.get",
        json!({"key": key, "at_ms": 1}),
    )
    .await?;
    assert_eq!(before_all["error"]["code"], "not_found", "{before_all}");

    // Checkpoint, change two keys, roll back: new versions, nothing destroyed.
    let cp = ask(
        &client,
        "cadre.context.checkpoint",
        json!({"name": "before-import", "reason": "bulk import"}),
    )
    .await?;
    assert_eq!(cp["status"], "applied", "{cp}");
    let again = ask(
        &client,
        "cadre.context.checkpoint",
        json!({"name": "before-import"}),
    )
    .await?;
    assert_eq!(again["error"]["code"], "conflict", "{again}");
    ask(
        &client,
        "cadre.context.put",
        json!({"key": key, "value": "churned"}),
    )
    .await?;
    ask(
        &client,
        "cadre.context.put",
        json!({"key": "action.acme.followup", "value": "call Tuesday"}),
    )
    .await?;
    let rb = ask(
        &client,
        "cadre.context.rollback",
        json!({"checkpoint": "before-import"}),
    )
    .await?;
    assert_eq!(rb["status"], "applied", "{rb}");
    assert_eq!(
        rb["changed"],
        json!([{"key": "action.acme.followup", "version": 2}, {"key": key, "version": 4}])
    );
    let now = ask(&client, "cadre.context.get", json!({"key": key})).await?;
    assert_eq!(
        (now["version"].as_u64(), &now["value"]["stage"]),
        (Some(4), &json!("signed"))
    );
    assert!(
        now["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("rollback to checkpoint `before-import`")
    );
    let gone = ask(
        &client,
        "cadre.context.get",
        json!({"key": "action.acme.followup"}),
    )
    .await?;
    assert_eq!(gone["deleted"], true, "{gone}");
    let history = ask(&client, "cadre.context.history", json!({"key": key})).await?;
    let versions: Vec<u64> = history["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["version"].as_u64())
        .collect();
    assert_eq!(versions, [4, 3, 2, 1]);

    // Bad input: a clear error each time, and the node keeps serving.
    for (subject, body, code) in [
        ("cadre.context.put", "{not json".to_string(), "bad_json"),
        (
            "cadre.context.put",
            json!({"key": "acme", "value": 1}).to_string(),
            "invalid_request",
        ),
        (
            "cadre.context.get",
            json!({"key": key, "version": 1, "at_ms": 5}).to_string(),
            "invalid_request",
        ),
        (
            "cadre.context.rollback",
            json!({"checkpoint": "nope"}).to_string(),
            "not_found",
        ),
        (
            "cadre.memory.search",
            json!({"query": "x", "top_k": 1000}).to_string(),
            "invalid_request",
        ),
    ] {
        let reply = request(&client, subject, body).await?;
        assert_eq!(reply["error"]["code"], code, "{subject}: {reply}");
    }

    // The CLI reads the same store.
    let (code, out, err) = cadre_cli(&nats.url, &["context", "history", key])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("v4") && out.contains("v1") && out.contains("rollback to checkpoint"),
        "{out}"
    );
    let (code, _, err) = cadre_cli(&nats.url, &["context", "put", key, "x", "--expect", "1"])?;
    assert_eq!(code, 1, "a conflict is an error: {err}");
    assert!(
        err.contains("conflict") && err.contains("at version 4"),
        "{err}"
    );
    node.terminate(WITHIN)?;
    Ok(())
}

/// A newsletter that recalls what earlier issues led with and writes its own progress to
/// the context store.
const NEWSLETTER: &str = r#"
name = "newsletter"
[recall]
query = "{{input.topic}} newsletter"
top_k = 3
chars_max = 400

[[steps]]
id = "draft"
tool = "file.write"
params = { path = "{{input.root}}/issue-{{input.issue}}.md", content = "Issue {{input.issue}}: {{input.headline}}. Sent on {{context.pref.newsletter.day}}.\nEarlier:\n{{recall.text}}\n" }
verify = { file_exists = true }

[[steps]]
id = "progress"
tool = "context.put"
depends_on = ["draft"]
params = { key = "project.newsletter.last_issue", value = "{{input.issue}}", reason = "issue drafted" }
verify = { json_path_equals = { path = "$.key", value = "project.newsletter.last_issue" } }

[[remember]]
topic = "newsletter.{{input.topic}}.lead"
text = "The {{input.topic}} newsletter issue {{input.issue}} led with {{input.headline}}"
value = "{{input.headline}}"
confidence = 0.7
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_uses_what_the_first_one_archived() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let dir = tempfile::tempdir()?;
    let (roots, pb) = chaos_tests::files_and_playbooks(dir.path(), &[("newsletter", NEWSLETTER)])?;
    let mut node = CadreNode::start(
        "n1",
        &dir.path().join("data"),
        &nats.url,
        &[
            ("CADRE_FILE_ROOTS", roots.as_str()),
            ("CADRE_PLAYBOOKS_DIR", pb.as_str()),
            ("CADRE_EPISODES_MAX", "2"),
            ("CADRE_EPISODE_PRUNE_INTERVAL_MS", "100"),
        ],
    )?;
    node.wait_ready(&client).await?;

    // Without the preference the plan cannot be made, and says what is missing.
    let run = |issue: u32, headline: &str| json!({"playbook": "newsletter", "input": {"root": roots, "topic": "pricing", "issue": issue, "headline": headline}});
    let early = ask(&client, "cadre.tasks.submit", run(0, "x")).await?;
    let early = wait_task(
        &client,
        early["task_id"].as_str().unwrap_or_default(),
        WITHIN,
        chaos_tests::is_terminal,
    )
    .await?;
    assert_eq!(early["status"], "failed", "{early}");
    assert!(
        early["failure"]
            .to_string()
            .contains("context.pref.newsletter.day"),
        "{early}"
    );
    ask(
        &client,
        "cadre.context.put",
        json!({"key": "pref.newsletter.day", "value": "Tuesday"}),
    )
    .await?;

    let mut ids = Vec::new();
    for (issue, headline) in [
        (1, "new annual plans"),
        (2, "a price freeze"),
        (3, "a price freeze"),
    ] {
        let reply = ask(&client, "cadre.tasks.submit", run(issue, headline)).await?;
        let id = reply["task_id"].as_str().unwrap_or_default().to_string();
        let task = wait_task(&client, &id, WITHIN, chaos_tests::is_terminal).await?;
        assert_eq!(task["status"], "succeeded", "{task:#}");
        // What this run learned is applied before the next run plans.
        eventually(WITHIN, "the run's fact in memory", || async {
            let h = ask(
                &client,
                "cadre.memory.history",
                json!({"topic": "newsletter.pricing.lead"}),
            )
            .await
            .ok()?;
            h["facts"]
                .as_array()?
                .iter()
                .any(|f| {
                    f["sources"]
                        .as_array()
                        .is_some_and(|s| s.contains(&json!(id)))
                })
                .then_some(())
        })
        .await?;
        ids.push(id);
    }
    let draft = |n: u32| std::fs::read_to_string(Path::new(&roots).join(format!("issue-{n}.md")));
    let first = draft(1)?;
    assert!(
        first.starts_with("Issue 1: new annual plans. Sent on Tuesday.\nEarlier:\n\n"),
        "{first}"
    );
    let second = draft(2)?;
    assert!(
        second.contains("- The pricing newsletter issue 1 led with new annual plans"),
        "the second run read what the first archived: {second}"
    );
    // The third run recalls the current fact only: issue 2's lead superseded issue 1's.
    let third = draft(3)?;
    assert!(
        third.contains("issue 2 led with a price freeze") && !third.contains("issue 1"),
        "{third}"
    );

    // Supersession kept history; the duplicate confirmed rather than duplicated.
    let h = ask(
        &client,
        "cadre.memory.history",
        json!({"topic": "newsletter.pricing.lead"}),
    )
    .await?;
    let facts = h["facts"].as_array().cloned().unwrap_or_default();
    assert_eq!(facts.len(), 2, "{h:#}");
    assert_eq!(h["current"], facts[0]["id"]);
    assert_eq!(facts[0]["value"], "a price freeze");
    assert_eq!(facts[0]["confirmations"], 2);
    assert_eq!(facts[0]["sources"], json!([ids[1], ids[2]]));
    assert!(facts[0]["confidence"].as_f64().unwrap_or_default() > 0.7);
    assert_eq!(facts[1]["value"], "new annual plans");
    assert_eq!(facts[1]["superseded_by"], facts[0]["id"]);

    // Retrieval over NATS: bounded and ranked.
    let found = ask(
        &client,
        "cadre.memory.search",
        json!({"query": "pricing newsletter freeze", "top_k": 1}),
    )
    .await?;
    assert_eq!(
        found["facts"][0]["topic"], "newsletter.pricing.lead",
        "{found}"
    );
    assert!(found["chars"].as_u64().unwrap_or(999) <= 2000);

    // The `context.put` step wrote a version authored by the step.
    let progress = ask(
        &client,
        "cadre.context.get",
        json!({"key": "project.newsletter.last_issue"}),
    )
    .await?;
    assert_eq!(
        (progress["value"].as_u64(), progress["version"].as_u64()),
        (Some(3), Some(3)),
        "{progress}"
    );
    assert_eq!(
        progress["author"],
        json!({"actor": "executor", "task_id": ids[2], "step_id": "progress"})
    );

    // An episode keeps the run's input, plan, outcomes, verdicts and timestamps.
    let third = ask(&client, "cadre.memory.episode", json!({"task_id": ids[2]})).await?;
    assert_eq!(third["input"]["headline"], "a price freeze", "{third:#}");
    let steps = third["steps"].as_array().cloned().unwrap_or_default();
    assert_eq!(steps.len(), 2, "{third:#}");
    assert_eq!(steps[0]["params"]["path"], format!("{roots}/issue-3.md"));
    assert_eq!(steps[1]["output"]["version"], 3);
    for s in &steps {
        assert_eq!(s["verdict"]["passed"], true, "{s}");
        assert!(s["started_at_ms"].as_u64() <= s["finished_at_ms"].as_u64());
    }
    // Three verified runs (the early failure has no episode): the count cap keeps two,
    // the newest.
    eventually(WITHIN, "the oldest episode pruned", || async {
        let first = ask(&client, "cadre.memory.episode", json!({"task_id": ids[0]}))
            .await
            .ok()?;
        (first["error"]["code"] == "not_found").then_some(())
    })
    .await?;
    let second = ask(&client, "cadre.memory.episode", json!({"task_id": ids[1]})).await?;
    assert_eq!(second["task_id"], json!(ids[1]), "{second}");
    let (_, text) =
        chaos_tests::http_get(node.metrics_addr().unwrap_or_default(), "/metrics").await?;
    assert_eq!(
        chaos_tests::metric(&text, "cadre_episodes_pruned_total{cap=\"count\"}"),
        1.0
    );
    node.terminate(WITHIN)?;
    Ok(())
}
