//! Secrets, end to end: a canary secret is set on the node, used by tasks through
//! `{{secret.crm_token}}` (the real HTTP sink receives it), rotated mid-run without a
//! restart, and then looked for everywhere Cadre writes: the task as `cadre.tasks.get`
//! shows it (the sink echoed the token: the output is scrubbed), its trace, every event
//! and audit record published meanwhile, the metrics, the node's log, `cadre secret
//! list`, and every file under the node's data directory (sealed at rest). A secret
//! reference smuggled in through the input stays text.

use std::time::Duration;

use chaos_tests::{CadreNode, HttpSink, NatsServer, cadre_cli, request, wait_task};
use futures::StreamExt;
use serde_json::json;

const WITHIN: Duration = Duration::from_secs(30);

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_secret_is_used_rotated_and_found_nowhere() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let sink = HttpSink::start().await?;
    let dir = tempfile::tempdir()?;
    let crm_sync = r#"
name = "crm-sync"
[[steps]]
id = "push"
tool = "http.request"
params = { method = "POST", url = "{{input.crm_url}}/clients", headers = { Authorization = "Bearer {{secret.crm_token}}" }, json = { name = "{{input.client}}", token = "{{secret.crm_token}}" } }
verify = { status_in = [201] }
"#;
    let missing = r#"
name = "uses-missing"
[[steps]]
id = "push"
tool = "http.request"
params = { method = "POST", url = "{{input.crm_url}}/clients", json = { token = "{{secret.nowhere}}" } }
verify = { status_in = [201] }
max_attempts = 1
"#;
    let (_, playbooks) = chaos_tests::files_and_playbooks(
        dir.path(),
        &[("crm-sync", crm_sync), ("uses-missing", missing)],
    )?;
    let data = dir.path().join("data");
    let mut node = CadreNode::start(
        "n1",
        &data,
        &nats.url,
        &[
            ("CADRE_PLAYBOOKS_DIR", playbooks.as_str()),
            ("CADRE_LOG_LEVEL", "debug"),
        ],
    )?;
    node.wait_ready(&client).await?;

    // Everything published while the secret is in use.
    let mut events = client.subscribe("cadre.events.>").await?;
    let mut audit = client.subscribe("cadre.audit.*").await?;
    let published = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let p = published.clone();
    let collector = tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                Some(m) = events.next() => m,
                Some(m) = audit.next() => m,
                else => return,
            };
            if let Ok(mut all) = p.lock() {
                all.push_str(&String::from_utf8_lossy(&msg.payload));
                all.push('\n');
            }
        }
    });

    let canary = "canary-7d3f19e2b4";
    let set = request(
        &client,
        "cadre.node.n1.secrets.set",
        json!({"name": "crm_token", "value": canary, "by": "test"}).to_string(),
    )
    .await?;
    assert_eq!(
        (set["name"].as_str(), set["version"].as_u64()),
        (Some("crm_token"), Some(1)),
        "{set}"
    );
    let again = request(
        &client,
        "cadre.node.n1.secrets.set",
        json!({"name": "crm_token", "value": "x"}).to_string(),
    )
    .await?;
    assert_eq!(
        again["error"]["code"], "conflict",
        "set twice is a rotation: {again}"
    );

    let run = |client: async_nats::Client, name: &'static str| {
        let url = sink.url.clone();
        async move {
            let reply = request(
                &client,
                "cadre.tasks.submit",
                json!({"playbook": "crm-sync", "input": {"client": name, "crm_url": url}})
                    .to_string(),
            )
            .await?;
            let id = reply["task_id"].as_str().unwrap_or_default().to_string();
            wait_task(&client, &id, WITHIN, chaos_tests::is_terminal).await
        }
    };
    let first = run(client.clone(), "Acme").await?;
    assert_eq!(first["status"], "succeeded", "{first}\n{}", node.log_tail());
    // The sink got the real value; the task keeps the reference and a scrubbed echo.
    let sent = sink.requests();
    assert_eq!(
        sent.last().map(|r| r.body["token"].clone()),
        Some(json!(canary))
    );
    let step = &first["steps"][0];
    assert_eq!(step["params"]["json"]["token"], "{{secret.crm_token}}");
    assert_eq!(
        step["output"]["body"]["token"], "[secret:crm_token]",
        "{step}"
    );

    // Rotated mid-run: the next task sends the new value; no restart.
    let rotated_value = "canary-rotated-51c0aa";
    let rotated = request(
        &client,
        "cadre.node.n1.secrets.rotate",
        json!({"name": "crm_token", "value": rotated_value}).to_string(),
    )
    .await?;
    assert_eq!(rotated["version"], 2, "{rotated}");
    let second = run(client.clone(), "Globex").await?;
    assert_eq!(second["status"], "succeeded", "{second}");
    assert_eq!(
        sink.requests().last().map(|r| r.body["token"].clone()),
        Some(json!(rotated_value))
    );

    // A reference that arrives as data stays data.
    let smuggled = run(client.clone(), "{{secret.crm_token}}").await?;
    assert_eq!(smuggled["status"], "succeeded", "{smuggled}");
    let name = sink
        .requests()
        .last()
        .map(|r| r.body["name"].clone())
        .unwrap_or_default();
    assert_eq!(
        name,
        json!("{ {secret.crm_token}}"),
        "the input was read as a template"
    );

    // A secret the node does not have: the step fails, clearly, and sends nothing.
    let before = sink.requests().len();
    let reply = request(
        &client,
        "cadre.tasks.submit",
        json!({"playbook": "uses-missing", "input": {"crm_url": sink.url}}).to_string(),
    )
    .await?;
    let id = reply["task_id"].as_str().unwrap_or_default().to_string();
    let failed = wait_task(&client, &id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["failure"]
            .as_str()
            .is_some_and(|f| f.contains("no secret named `nowhere`")),
        "{failed}"
    );
    assert_eq!(sink.requests().len(), before);

    // `cadre secret list`: names and ages, never values.
    let (code, out, err) = cadre_cli(&nats.url, &["secret", "list", "--node", "n1"])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("crm_token") && out.contains("v2"), "{out}");

    // Now look for both values everywhere.
    let mut places: Vec<(String, String)> = Vec::new();
    for task in [&first, &second, &smuggled, &failed] {
        let id = task["task_id"].as_str().unwrap_or_default();
        let view = request(
            &client,
            "cadre.tasks.get",
            json!({"task_id": id}).to_string(),
        )
        .await?;
        places.push((format!("task {id}"), view.to_string()));
        let trace = request(
            &client,
            "cadre.tasks.trace",
            json!({"task_id": id}).to_string(),
        )
        .await?;
        places.push((format!("trace {id}"), trace.to_string()));
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // the last publications
    collector.abort();
    places.push((
        "events and audit".into(),
        published.lock().map(|p| p.clone()).unwrap_or_default(),
    ));
    places.push(("metrics".into(), node.metrics().await?));
    places.push(("cadre secret list".into(), out));
    places.push((
        "the log".into(),
        std::fs::read_to_string(data.join("n1.log"))?,
    ));
    assert!(
        places[places.len() - 1].1.contains("secret rotate"),
        "the log records the rotation (not the value)"
    );
    assert!(
        places.iter().any(|(_, t)| t.contains("step_succeeded")),
        "events were collected"
    );
    for file in files_under(&data) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        places.push((
            file.display().to_string(),
            String::from_utf8_lossy(&bytes).into_owned(),
        ));
    }
    for (place, text) in &places {
        for value in [canary, rotated_value] {
            assert!(!text.contains(value), "the secret leaked into {place}");
        }
    }
    Ok(())
}
