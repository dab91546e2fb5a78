//! Nodes together, against a real nats-server and real `cadre` processes: each node
//! announces itself as an instance of the NATS micro service `cadre` and by a heartbeat
//! in the `CADRE_NODES` bucket; `cadre cluster status` shows every node, and a node that
//! dies is reported gone within three heartbeats.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use chaos_tests::{CadreNode, NatsServer, cadre_cli, eventually, request};
use futures::StreamExt;
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(30);

/// Every reply to a request that many services answer, within `window`.
async fn gather(
    nats: &async_nats::Client,
    subject: &str,
    window: Duration,
) -> anyhow::Result<Vec<Value>> {
    let inbox = nats.new_inbox();
    let mut replies = nats.subscribe(inbox.clone()).await?;
    nats.publish_with_reply(subject.to_string(), inbox, Bytes::new())
        .await?;
    nats.flush().await?;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, replies.next()).await {
        out.push(serde_json::from_slice(&msg.payload)?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_announce_themselves_and_a_dead_node_is_reported_gone() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let dir = tempfile::tempdir()?;
    let playbooks = chaos_tests::shipped_playbooks().display().to_string();
    let node = |id: &str, location: &str| {
        let tags = format!("location={location},tier=test");
        CadreNode::start(
            id,
            &dir.path().join(id),
            &nats.url,
            &[
                ("CADRE_TAGS", tags.as_str()),
                ("CADRE_HEARTBEAT_MS", "200"),
                ("CADRE_PLAYBOOKS_DIR", playbooks.as_str()),
            ],
        )
    };
    let mut laptop = node("laptop", "laptop")?;
    let mut vps = node("vps", "vps")?;
    laptop.wait_ready(&client).await?;
    vps.wait_ready(&client).await?;

    // `cadre cluster status`: both nodes, alive, with their tags and tools.
    let status = eventually(WITHIN, "both nodes in the cluster status", || async {
        let (code, out, _) = cadre_cli(&nats.url, &["cluster", "status", "--json"]).ok()?;
        let v: Value = serde_json::from_str(&out).ok()?;
        let alive = v["nodes"]
            .as_array()?
            .iter()
            .filter(|n| n["alive"] == true)
            .count();
        (code == 0 && alive == 2).then_some(v)
    })
    .await?;
    let vps_status = &status["nodes"][1];
    assert_eq!(vps_status["node_id"], "vps", "{status:#}");
    assert_eq!(
        vps_status["tags"],
        json!({"location": "vps", "tier": "test"})
    );
    let tools: BTreeSet<&str> = vps_status["tools"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(
        tools,
        BTreeSet::from([
            "context.put",
            "email.send",
            "file.write",
            "http.request",
            "llm.generate",
            "shell.run"
        ])
    );
    let (code, text, err) = cadre_cli(&nats.url, &["cluster", "status"])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains("laptop") && text.contains("location=vps"),
        "{text}"
    );

    // The NATS services API (what `nats micro ls|info` asks): two instances of `cadre`.
    let pings = gather(&client, "$SRV.PING.cadre", Duration::from_millis(500)).await?;
    assert_eq!(pings.len(), 2, "{pings:?}");
    let infos = gather(&client, "$SRV.INFO.cadre", Duration::from_millis(500)).await?;
    let ids: BTreeSet<&str> = infos
        .iter()
        .filter_map(|i| i["metadata"]["node_id"].as_str())
        .collect();
    assert_eq!(ids, BTreeSet::from(["laptop", "vps"]), "{infos:?}");
    assert!(
        infos.iter().all(|i| i["metadata"]["tools"]
            .as_str()
            .is_some_and(|t| t.contains("shell.run"))),
        "{infos:?}"
    );
    // Each node's own endpoint answers with its status.
    let own = request(&client, "cadre.node.vps.status", "{}").await?;
    assert_eq!(own["node_id"], "vps", "{own}");

    // A node that dies is reported gone within three heartbeats; the other stays up.
    vps.kill9();
    let status = eventually(WITHIN, "vps reported gone", || async {
        let v = request(&client, "cadre.cluster.status", "{}").await.ok()?;
        let gone = v["nodes"]
            .as_array()?
            .iter()
            .any(|n| n["node_id"] == "vps" && n["alive"] == false);
        gone.then_some(v)
    })
    .await?;
    assert_eq!(status["nodes"][0]["alive"], true, "{status:#}");
    let (code, text, _) = cadre_cli(&nats.url, &["cluster", "status"])?;
    assert_eq!(code, 1, "a gone node is a failure for scripts: {text}");
    assert!(text.contains("GONE"), "{text}");

    // Bad input: a clear error, and it keeps serving.
    let bad = request(&client, "cadre.cluster.status", r#"{"node": "x"}"#).await?;
    assert_eq!(bad["error"]["code"], "invalid_request", "{bad}");
    let again = request(&client, "cadre.cluster.status", "").await?;
    assert!(again["nodes"].is_array(), "{again}");
    Ok(())
}

/// Every audit record of both nodes (each node reads its own store).
async fn audit_records(client: &async_nats::Client, nodes: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for node in nodes {
        let mut after = 0u64;
        loop {
            let req = json!({"after_seq": after, "limit": 1000}).to_string();
            let reply = request(client, &format!("cadre.audit.{node}.read"), req).await?;
            let entries = reply["entries"].as_array().cloned().unwrap_or_default();
            if entries.is_empty() {
                break;
            }
            after = entries
                .last()
                .and_then(|e| e["seq"].as_u64())
                .unwrap_or(after);
            out.extend(entries.into_iter().map(|e| e["record"].clone()));
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_run_on_the_node_or_tag_they_name() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let dir = tempfile::tempdir()?;
    let playbooks = dir.path().join("playbooks");
    std::fs::create_dir_all(&playbooks)?;
    std::fs::write(
        playbooks.join("placed.toml"),
        r#"
name = "placed"
[[steps]]
id = "on_vps"
tool = "shell.run"
on_node = "vps"
params = { program = "echo", args = ["vps"] }
verify = { exit_code = 0 }
[[steps]]
id = "on_laptop"
tool = "shell.run"
on_tag = "location=laptop"
depends_on = ["on_vps"]
params = { program = "echo", args = ["laptop"] }
verify = { exit_code = 0 }
[[steps]]
id = "anywhere"
tool = "shell.run"
depends_on = ["on_laptop"]
params = { program = "echo", args = ["any"] }
verify = { exit_code = 0 }
[[steps]]
id = "vps_file"
tool = "file.write"
on_node = "vps"
depends_on = ["anywhere"]
params = { path = "{{input.root}}/{{task.id}}.txt", content = "on the vps" }
verify = { file_exists = true }
"#,
    )?;
    let pb = playbooks.display().to_string();
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files)?;
    let root = files.canonicalize()?.display().to_string();
    let node = |id: &str, location: &str| {
        let tags = format!("location={location}");
        CadreNode::start(
            id,
            &dir.path().join(id),
            &nats.url,
            &[
                ("CADRE_TAGS", tags.as_str()),
                ("CADRE_PLAYBOOKS_DIR", pb.as_str()),
                ("CADRE_SHELL_ALLOW", "echo"),
                ("CADRE_FILE_ROOTS", root.as_str()),
            ],
        )
    };
    let mut laptop = node("laptop", "laptop")?;
    let mut vps = node("vps", "vps")?;
    laptop.wait_ready(&client).await?;
    vps.wait_ready(&client).await?;

    // Submitted to whichever node's intake answers; each step still runs where it says.
    let mut ids = Vec::new();
    for n in 0..8 {
        let body = json!({"playbook": "placed", "input": {"root": root}, "idempotency_key": format!("p{n}")});
        let reply = request(&client, "cadre.tasks.submit", body.to_string()).await?;
        ids.push(reply["task_id"].as_str().unwrap_or_default().to_string());
    }
    let records = eventually(WITHIN, "every task succeeded", || async {
        let records = audit_records(&client, &["laptop", "vps"]).await.ok()?;
        let done = ids.iter().all(|id| {
            records
                .iter()
                .any(|r| r["task_id"] == id.as_str() && r["action"] == "succeeded")
        });
        done.then_some(records)
    })
    .await?;
    let mut owners = BTreeSet::new();
    for id in &ids {
        let ran_on = |step: &str| -> Vec<String> {
            records
                .iter()
                .filter(|r| {
                    r["task_id"] == id.as_str()
                        && r["step_id"] == step
                        && r["action"] == "step_executed"
                })
                .filter_map(|r| r["actor"].as_str().map(str::to_string))
                .collect()
        };
        assert_eq!(ran_on("on_vps"), ["executor@vps"], "{id}");
        assert_eq!(ran_on("on_laptop"), ["executor@laptop"], "{id}");
        assert_eq!(ran_on("anywhere").len(), 1, "{id}");
        assert_eq!(ran_on("vps_file"), ["executor@vps"], "{id}");
        // Its file criterion was judged where the file was written.
        let judged_by: Vec<&str> = records
            .iter()
            .filter(|r| {
                r["task_id"] == id.as_str()
                    && r["step_id"] == "vps_file"
                    && r["action"] == "step_succeeded"
            })
            .filter_map(|r| r["actor"].as_str())
            .collect();
        assert_eq!(judged_by, ["verifier@vps"], "{id}");
        if let Some(owner) = records
            .iter()
            .find(|r| r["task_id"] == id.as_str() && r["action"] == "succeeded")
            .and_then(|r| r["node_id"].as_str())
        {
            owners.insert(owner.to_string());
        }
    }
    println!("tasks owned by {owners:?}");
    Ok(())
}

/// A node in cluster mode (2 s leases, 200 ms heartbeats) that may run `/bin/true`.
fn cluster_node(
    dir: &std::path::Path,
    nats_url: &str,
    id: &str,
    playbooks: &str,
    extra: &[(&str, &str)],
) -> anyhow::Result<CadreNode> {
    let mut env = vec![
        ("CADRE_CLUSTER", "true"),
        ("CADRE_LEASE_TTL_MS", "2000"),
        ("CADRE_HEARTBEAT_MS", "200"),
        ("CADRE_PLAYBOOKS_DIR", playbooks),
        ("CADRE_SHELL_ALLOW", "/bin/true"),
    ];
    env.extend_from_slice(extra);
    CadreNode::start(id, &dir.join(id), nats_url, &env)
}

/// In a cluster, `cadre.tasks.list` and `cadre.approvals.list` answer for every node,
/// whichever node the request lands on: the operator sees the approvals waiting on the
/// laptop through a VPS, and pages through every node's tasks as one list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_answer_for_the_whole_cluster() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let dir = tempfile::tempdir()?;
    let playbooks = dir.path().join("playbooks");
    std::fs::create_dir_all(&playbooks)?;
    // The built-in policies hold `shell.run` for a person.
    std::fs::write(
        playbooks.join("ask.toml"),
        r#"
name = "ask"
[[steps]]
id = "run"
tool = "shell.run"
params = { program = "/bin/true", args = ["{{input.n}}"] }
verify = { exit_code = 0 }
"#,
    )?;
    let pb = playbooks.display().to_string();
    let node = |id: &str| {
        cluster_node(
            dir.path(),
            &nats.url,
            id,
            &pb,
            &[("CADRE_POLICIES_DIR", "")],
        )
    };
    let mut a = node("a")?;
    let mut b = node("b")?;
    a.wait_ready(&client).await?;
    b.wait_ready(&client).await?;
    eventually(WITHIN, "both nodes alive", || async {
        (chaos_tests::alive_nodes(&client).await? == 2).then_some(())
    })
    .await?;

    // Tasks on both nodes, each waiting for an approval.
    let js = async_nats::jetstream::new(client.clone());
    let leases = js.get_key_value("CADRE_LEASES").await?;
    let (mut tasks, mut owners) = (BTreeSet::new(), BTreeSet::new());
    for n in 0..40 {
        let submit = json!({"playbook": "ask", "input": {"n": n.to_string()}}).to_string();
        let reply = request(&client, "cadre.tasks.submit", submit).await?;
        let id = reply["task_id"].as_str().unwrap_or_default().to_string();
        let lease = leases
            .get(&id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no lease for {id}"))?;
        owners.insert(serde_json::from_slice::<Value>(&lease)?["owner"].to_string());
        tasks.insert(id);
        if owners.len() == 2 && tasks.len() >= 6 {
            break;
        }
    }
    anyhow::ensure!(owners.len() == 2, "one node owns all of {tasks:?}");

    // Whichever node answers (the queue group picks), the list is whole: ten answers in a
    // row, each with every task's approval and nothing missing.
    eventually(WITHIN, "every approval, in every answer", || async {
        for _ in 0..10 {
            let v = request(&client, "cadre.approvals.list", "{}").await.ok()?;
            let listed: BTreeSet<String> = v["approvals"]
                .as_array()?
                .iter()
                .filter_map(|a| a["task_id"].as_str().map(String::from))
                .collect();
            if listed != tasks || v.get("unanswered").is_some() {
                return None;
            }
        }
        Some(())
    })
    .await?;

    // Each node alone holds only its own.
    let mut per_node = Vec::new();
    for id in ["a", "b"] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Cadre-Forwarded", "test"); // as a node asks another
        let msg = client
            .request_with_headers(
                format!("cadre.node.{id}.approvals.list"),
                headers,
                Bytes::from_static(b"{}"),
            )
            .await?;
        let v: Value = serde_json::from_slice(&msg.payload)?;
        per_node.push(v["approvals"].as_array().map_or(0, Vec::len));
    }
    assert_eq!(per_node.iter().sum::<usize>(), tasks.len(), "{per_node:?}");
    assert!(per_node.iter().all(|n| *n < tasks.len()), "{per_node:?}");

    // Paged three at a time, newest first, every task once.
    for _ in 0..4 {
        let (mut seen, mut before) = (Vec::new(), None::<String>);
        loop {
            let req = json!({"limit": 3, "before": before});
            let page = request(&client, "cadre.tasks.list", req.to_string()).await?;
            assert!(page.get("unanswered").is_none(), "{page}");
            let ids: Vec<String> = page["tasks"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .filter_map(|t| t["task_id"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            assert!(ids.len() <= 3, "{page}");
            seen.extend(ids);
            match page["next"].as_str() {
                Some(next) => before = Some(next.to_string()),
                None => break,
            }
        }
        let mut newest_first: Vec<String> = tasks.iter().cloned().collect();
        newest_first.reverse();
        assert_eq!(seen, newest_first);
    }
    println!(
        "{} tasks on two nodes: every approvals and tasks list whole",
        tasks.len()
    );
    Ok(())
}

/// A policy set published once (`cadre.control.policies`, here through the CLI) is
/// enforced by every node of the cluster instead of its own directory, and by a node
/// that was not running when it was published, from its start. An invalid set is refused
/// with its errors and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_policy_set_reaches_every_node_and_a_late_one() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let dir = tempfile::tempdir()?;
    let playbooks = dir.path().join("playbooks");
    std::fs::create_dir_all(&playbooks)?;
    std::fs::write(
        playbooks.join("run.toml"),
        r#"
name = "run"
[[steps]]
id = "run"
tool = "shell.run"
params = { program = "/bin/true" }
verify = { exit_code = 0 }
"#,
    )?;
    let pb = playbooks.display().to_string();
    // Each node's own directory permits everything (the harness's open policy).
    let node = |id: &str| cluster_node(dir.path(), &nats.url, id, &pb, &[]);
    let mut a = node("a")?;
    let mut b = node("b")?;
    a.wait_ready(&client).await?;
    b.wait_ready(&client).await?;

    // Refused: the errors name the file; nothing is stored.
    let bad = json!({"files": {"broken.cedar": "permit(principal, action"}, "by": "ann"});
    let reply = request(&client, "cadre.control.policies", bad.to_string()).await?;
    assert_eq!(reply["error"]["code"], "invalid_request", "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("broken.cedar"),
        "{reply}"
    );
    let none = request(&client, "cadre.control.policies", "{}").await?;
    assert_eq!(none["error"]["code"], "not_found", "{none}");

    // Published through the CLI: shell.run is forbidden everywhere.
    let policies = dir.path().join("cluster-policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(
        policies.join("no-shell.cedar"),
        "permit(principal, action, resource);\n\
         forbid(principal, action, resource) when { context.tool == \"shell.run\" };\n",
    )?;
    let policies_arg = policies.display().to_string();
    let (code, out, err) = cadre_cli(
        &nats.url,
        &["policy", "publish", &policies_arg, "--by", "ann", "--json"],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    let published: Value = serde_json::from_str(&out)?;
    let version = published["version"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    anyhow::ensure!(!version.is_empty(), "{published}");

    // A node that was away starts with it.
    let mut c = node("c")?;
    c.wait_ready(&client).await?;
    eventually(WITHIN, "every node on the published version", || async {
        let v = request(&client, "cadre.cluster.status", "{}").await.ok()?;
        let nodes = v["nodes"].as_array()?;
        (nodes.len() == 3
            && nodes
                .iter()
                .all(|n| n["alive"] == true && n["policy_version"] == version.as_str()))
        .then_some(())
    })
    .await?;

    // And they enforce it: a shell step is denied whichever node runs the task.
    for n in 0..6 {
        let submit = json!({"playbook": "run", "input": {}, "idempotency_key": format!("p{n}")});
        let reply = request(&client, "cadre.tasks.submit", submit.to_string()).await?;
        let id = reply["task_id"].as_str().unwrap_or_default().to_string();
        let view = eventually(WITHIN, "the task ended", || async {
            let v = request(
                &client,
                "cadre.tasks.get",
                json!({"task_id": id}).to_string(),
            )
            .await
            .ok()?;
            chaos_tests::is_terminal(v["status"].as_str()?).then_some(v)
        })
        .await?;
        assert_eq!(view["status"], "failed", "{view:#}");
        assert!(
            view.to_string().contains(&version),
            "not denied under the published policies: {view:#}"
        );
    }
    println!("policies {version}: published once, enforced by a, b and the late c");
    Ok(())
}
