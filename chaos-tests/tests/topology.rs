//! The shipped laptop + VPS deployment, run as shipped: the VPS's hub
//! (`ops/nats/hub-leafnodes.conf`, which is `hub.conf` — JetStream synced on every write,
//! TLS, the users of `ops/nats/cadre-users.conf` — plus a leaf-node port) with the VPS's
//! `cadre` node connected to it over TLS as user `node`, and the laptop's own NATS server
//! (`ops/nats/leaf.conf`, a leaf node of the hub over TLS, no JetStream of its own) with the
//! laptop's node connected to it on loopback. Both nodes in cluster mode. The only
//! differences from a real deployment are loopback addresses and a CA made for the test.
//! Steps run where the playbook places them, the laptop's JetStream traffic crossing the
//! leaf link; when the laptop dies mid-task, the VPS takes over its tasks and finishes them;
//! when the leaf link to the hub is cut mid-task, the same, and the laptop stands down when
//! it heals.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use chaos_tests::{CadreNode, HttpSink, Link, NatsServer, eventually, ops_dir, request};
use futures::StreamExt;
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(60);
const USERS: [(&str, &str); 3] = [
    ("CADRE_NATS_NODE_PASSWORD", "node-secret"),
    ("CADRE_NATS_OPERATOR_PASSWORD", "operator-secret"),
    ("CADRE_NATS_INJECTOR_PASSWORD", "injector-secret"),
];

/// A CA and a certificate for 127.0.0.1 signed by it, made with `openssl`:
/// `(ca.pem, hub.pem, hub.key)`.
fn certificates(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (cert, key, csr) = (
        dir.join("hub.pem"),
        dir.join("hub.key"),
        dir.join("hub.csr"),
    );
    let san = dir.join("san.ext");
    std::fs::write(&san, "subjectAltName=IP:127.0.0.1\n")?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let p = |p: &Path| p.display().to_string();
    let steps: [Vec<String>; 3] = [
        ["req", "-x509"]
            .iter()
            .chain(&ec)
            .map(|s| s.to_string())
            .chain(
                [
                    "-keyout",
                    &p(&ca_key),
                    "-out",
                    &p(&ca),
                    "-days",
                    "2",
                    "-subj",
                    "/CN=cadre-test-ca",
                ]
                .map(String::from),
            )
            .collect(),
        ["req"]
            .iter()
            .chain(&ec)
            .map(|s| s.to_string())
            .chain(
                [
                    "-keyout",
                    &p(&key),
                    "-out",
                    &p(&csr),
                    "-subj",
                    "/CN=127.0.0.1",
                ]
                .map(String::from),
            )
            .collect(),
        [
            "x509",
            "-req",
            "-in",
            &p(&csr),
            "-CA",
            &p(&ca),
            "-CAkey",
            &p(&ca_key),
            "-CAcreateserial",
            "-out",
            &p(&cert),
            "-days",
            "2",
            "-extfile",
            &p(&san),
        ]
        .map(String::from)
        .to_vec(),
    ];
    for args in steps {
        let out = Command::new("openssl").args(&args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((ca, cert, key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_laptop_and_a_vps_over_tls_run_one_cluster_and_survive_the_laptop_dying()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ca, cert, key) = certificates(dir.path())?;
    let p = |p: &Path| p.display().to_string();
    let (cert, key, ca) = (p(&cert), p(&key), p(&ca));
    let mut hub_env: Vec<(&str, &str)> = USERS.to_vec();
    hub_env.extend([
        ("CADRE_NATS_NAME", "cadre-hub"),
        ("CADRE_NATS_TLS_CERT", cert.as_str()),
        ("CADRE_NATS_TLS_KEY", key.as_str()),
    ]);
    let leaf_port = chaos_tests::free_port()?.to_string();
    let leaf_listen = format!("127.0.0.1:{leaf_port}");
    hub_env.extend([
        ("CADRE_NATS_LEAF_LISTEN", leaf_listen.as_str()),
        ("CADRE_NATS_LEAF_PASSWORD", "leaf-secret"),
    ]);
    let hub = NatsServer::start_shipped(&ops_dir().join("nats/hub-leafnodes.conf"), &hub_env)?;
    // The laptop's server: a leaf of the hub, local users, no JetStream.
    // The laptop's leaf link to the hub runs through a Link the test can cut.
    let leaf_link = Link::start(&format!("nats://127.0.0.1:{leaf_port}")).await?;
    let link_port = leaf_link
        .url
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_string();
    let hub_leaf_url = format!("tls://leaf:leaf-secret@127.0.0.1:{link_port}");
    let mut leaf_env: Vec<(&str, &str)> = USERS.to_vec();
    leaf_env.extend([
        ("CADRE_NATS_NAME", "cadre-laptop"),
        ("CADRE_NATS_HUB_LEAF_URL", hub_leaf_url.as_str()),
        ("CADRE_NATS_HUB_CA_FILE", ca.as_str()),
    ]);
    let leaf = NatsServer::start_shipped(&ops_dir().join("nats/leaf.conf"), &leaf_env)?;
    // JetStream answers on the laptop once the leaf link is up.
    let on_the_laptop = leaf.client_as("operator", "operator-secret").await?;
    let laptop_js = async_nats::jetstream::with_domain(on_the_laptop.clone(), "cadre");
    eventually(WITHIN, "the hub's JetStream through the leaf", || async {
        laptop_js.query_account().await.ok().map(|_| ())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\nhub: {}\nleaf: {}", hub.log(), leaf.log()))?;
    let tls_url =
        |user: &str, password: &str| format!("tls://{user}:{password}@127.0.0.1:{}", hub.port);
    let operator = async_nats::ConnectOptions::with_user_and_password(
        "operator".into(),
        "operator-secret".into(),
    )
    .add_root_certificates(ca.clone().into())
    .require_tls(true)
    .connect(format!("tls://127.0.0.1:{}", hub.port))
    .await
    .map_err(|e| anyhow::anyhow!("operator over TLS: {e}\n{}", hub.log()))?;

    // One playbook: a file on the laptop, a file on the VPS, and a slow call to a CRM
    // that either node can make.
    let sink = HttpSink::start().await?;
    let playbooks = dir.path().join("playbooks");
    std::fs::create_dir_all(&playbooks)?;
    std::fs::write(
        playbooks.join("nearby.toml"),
        r#"
name = "nearby"
[[steps]]
id = "notes"
tool = "file.write"
on_tag = "location=laptop"
params = { path = "{{input.laptop}}/{{task.id}}.md", content = "kickoff notes" }
verify = { file_exists = true }
[[steps]]
id = "mailbox"
tool = "file.write"
on_tag = "location=vps"
params = { path = "{{input.vps}}/{{task.id}}.eml", content = "welcome" }
verify = { file_exists = true }
[[steps]]
id = "crm"
tool = "http.request"
depends_on = ["notes", "mailbox"]
params = { method = "POST", url = "{{input.url}}/slow/clients", json = { client = "acme" } }
verify = { status_in = [201] }
"#,
    )?;
    let pb = p(&playbooks);
    let roots = |name: &str| -> anyhow::Result<String> {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d)?;
        Ok(p(&d.canonicalize()?))
    };
    let (laptop_files, vps_files) = (roots("laptop-files")?, roots("vps-files")?);
    let node = |id: &str, url: &str, location: &str, files: &str, ca: &str, domain: &str| {
        let tags = format!("location={location}");
        CadreNode::start(
            id,
            &dir.path().join(id),
            url,
            &[
                ("CADRE_CLUSTER", "true"),
                ("CADRE_LEASE_TTL_MS", "2000"),
                ("CADRE_TAGS", tags.as_str()),
                ("CADRE_FILE_ROOTS", files),
                ("CADRE_NATS_CA_FILE", ca),
                ("CADRE_NATS_JS_DOMAIN", domain),
                ("CADRE_PLAYBOOKS_DIR", pb.as_str()),
                ("CADRE_HOP_TIMEOUT_MS", "1000"),
                ("CADRE_STEP_TIMEOUT_MS", "4000"),
                ("CADRE_STEP_ATTEMPTS_MAX", "20"),
                ("CADRE_RETRY_DELAY_MS_BASE", "50"),
                ("CADRE_RETRY_DELAY_MS_MAX", "300"),
                ("CADRE_KNOWLEDGE_WRITE_WAIT_MS", "1500"),
            ],
        )
    };
    let mut vps = node(
        "vps",
        &tls_url("node", "node-secret"),
        "vps",
        &vps_files,
        &ca,
        "",
    )?;
    // On loopback to its own server: no TLS there.
    let laptop_url = format!("nats://node:node-secret@127.0.0.1:{}", leaf.port);
    let mut laptop = node("laptop", &laptop_url, "laptop", &laptop_files, "", "cadre")?;
    vps.wait_ready(&operator).await?;
    laptop.wait_ready(&operator).await?;

    // Both nodes, over TLS.
    eventually(WITHIN, "both nodes alive in the cluster status", || async {
        (chaos_tests::alive_nodes(&operator).await? == 2).then_some(())
    })
    .await?;

    // Each step runs where it is placed.
    let mut events = operator.subscribe("cadre.events.task.>").await?;
    let input = json!({"laptop": laptop_files, "vps": vps_files, "url": sink.url});
    let submit = json!({"playbook": "nearby", "input": input}).to_string();
    let js = async_nats::jetstream::new(operator.clone());
    let leases = js.get_key_value("CADRE_LEASES").await?;
    let (mut tasks, mut on_laptop) = (Vec::new(), Vec::new());
    // NATS prefers a queue group's members on the server a request arrives at: what is
    // submitted on the laptop's server is the laptop's, what reaches the hub the VPS's.
    while tasks.len() < 4 {
        let via = if tasks.len() % 2 == 0 {
            &on_the_laptop
        } else {
            &operator
        };
        let reply = request(via, "cadre.tasks.submit", submit.clone()).await?;
        let id = reply["task_id"].as_str().unwrap_or_default().to_string();
        let lease = leases
            .get(&id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no lease for {id}: {reply}\n{}", laptop.log_tail()))?;
        if serde_json::from_slice::<Value>(&lease)?["owner"] == "laptop" {
            on_laptop.push(id.clone());
        }
        tasks.push(id);
    }
    anyhow::ensure!(
        on_laptop.len() == 2,
        "the laptop owns {on_laptop:?} of {tasks:?}"
    );
    eventually(WITHIN, "every task calling the CRM", || async {
        let keys: Vec<String> = sink
            .requests()
            .into_iter()
            .filter_map(|r| r.idempotency_key)
            .collect();
        tasks
            .iter()
            .all(|t| keys.contains(&format!("{t}.crm")))
            .then_some(())
    })
    .await?;
    for id in &tasks {
        assert!(
            Path::new(&laptop_files).join(format!("{id}.md")).exists(),
            "notes on the laptop"
        );
        assert!(
            Path::new(&vps_files).join(format!("{id}.eml")).exists(),
            "mail on the VPS"
        );
        assert!(!Path::new(&vps_files).join(format!("{id}.md")).exists());
    }

    // The laptop dies mid-call: the VPS takes its tasks over and finishes every task.
    laptop.kill9();
    let mut taken_over = 0;
    let mut succeeded = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + WITHIN;
    while succeeded.len() < tasks.len() {
        let msg = tokio::time::timeout_at(deadline, events.next())
            .await
            .map_err(|_| anyhow::anyhow!("tasks did not finish on the VPS\n{}", vps.log_tail()))?
            .ok_or_else(|| anyhow::anyhow!("events ended"))?;
        let event: Value = serde_json::from_slice(&msg.payload)?;
        match event["kind"].as_str() {
            Some("taken_over") => {
                assert_eq!(event["node_id"], "vps", "{event}");
                taken_over += 1;
            }
            Some("succeeded") => {
                succeeded.insert(event["task_id"].as_str().unwrap_or_default().to_string());
            }
            Some("failed") => anyhow::bail!("{event}"),
            _ => {}
        }
    }
    assert_eq!(taken_over, on_laptop.len());

    println!("laptop died: {taken_over} of its tasks taken over by the VPS");
    for id in &tasks {
        let get = json!({"task_id": id}).to_string();
        let view = request(&operator, "cadre.tasks.get", get).await?;
        assert_eq!(view["status"], "succeeded", "{view}");
    }

    // The laptop comes back, takes work submitted on it, and loses its link to the hub
    // mid-call (the laptop's node stays connected to its own server, which can no longer
    // reach JetStream): the VPS takes the tasks over; when the link heals, the laptop
    // stands down.
    laptop.restart()?;
    // Ready (`/readyz`) once all its roles are up and subscribed.
    let laptop_http = laptop.metrics_addr().unwrap_or_default().to_string();
    eventually(WITHIN, "the laptop ready again", || async {
        let (code, _) = chaos_tests::http_get(&laptop_http, "/readyz").await.ok()?;
        (code == 200).then_some(())
    })
    .await?;
    let mut cut_tasks = Vec::new();
    while cut_tasks.len() < 2 {
        let reply = request(&on_the_laptop, "cadre.tasks.submit", submit.clone()).await?;
        let id = reply["task_id"].as_str().unwrap_or_default().to_string();
        let lease = leases
            .get(&id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no lease for {id}"))?;
        let owner = serde_json::from_slice::<Value>(&lease)?["owner"].clone();
        anyhow::ensure!(
            owner == "laptop",
            "{id} submitted on the laptop is {owner}'s"
        );
        cut_tasks.push(id);
    }
    eventually(WITHIN, "the laptop's tasks calling the CRM", || async {
        let keys: Vec<String> = sink
            .requests()
            .into_iter()
            .filter_map(|r| r.idempotency_key)
            .collect();
        cut_tasks
            .iter()
            .all(|t| keys.contains(&format!("{t}.crm")))
            .then_some(())
    })
    .await?;
    leaf_link.cut(true);
    let (mut moved, mut done) = (
        std::collections::HashSet::new(),
        std::collections::HashSet::new(),
    );
    let deadline = tokio::time::Instant::now() + WITHIN;
    while done.len() < cut_tasks.len() {
        let msg = tokio::time::timeout_at(deadline, events.next())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the cut-off laptop's tasks did not finish\n{}",
                    vps.log_tail()
                )
            })?
            .ok_or_else(|| anyhow::anyhow!("events ended"))?;
        let event: Value = serde_json::from_slice(&msg.payload)?;
        let id = event["task_id"].as_str().unwrap_or_default().to_string();
        if !cut_tasks.contains(&id) {
            continue;
        }
        match event["kind"].as_str() {
            Some("taken_over") => {
                assert_eq!(event["node_id"], "vps", "{event}");
                moved.insert(id);
            }
            Some("succeeded") => {
                done.insert(id);
            }
            Some("failed") => anyhow::bail!("{event}"),
            _ => {}
        }
    }
    assert_eq!(moved.len(), cut_tasks.len(), "{moved:?}");
    leaf_link.cut(false);
    let stood_down = eventually(WITHIN, "the laptop standing down", || async {
        let text = laptop.metrics().await.ok()?;
        let n = chaos_tests::metric_sum(&text, "cadre_task_stand_downs_total");
        (n >= 1.0).then_some(n)
    })
    .await?;
    println!(
        "leaf link cut: {} of the laptop's tasks taken over by the VPS; the laptop stood down {stood_down} times after the heal",
        moved.len()
    );
    // No call ran under a stale lease, across the kill and the cut.
    sink.check_fencing()?;
    one_body_of_knowledge(&operator, &on_the_laptop, &leaf_link).await
}

/// The laptop and the VPS share one context store: what one writes the other reads, and
/// a write the laptop makes while cut off from the hub waits, then is applied — or, if
/// the VPS changed the key meanwhile, rejected with a conflict the laptop can show.
async fn one_body_of_knowledge(
    on_the_hub: &async_nats::Client,
    on_the_laptop: &async_nats::Client,
    leaf_link: &Link,
) -> anyhow::Result<()> {
    let ask = |via: &async_nats::Client, subject: &str, body: Value| {
        let (via, subject) = (via.clone(), subject.to_string());
        async move { request(&via, &subject, body.to_string()).await }
    };
    let key = "project.acme.status";
    let put = ask(
        on_the_hub,
        "cadre.context.put",
        json!({"key": key, "value": "signed"}),
    )
    .await?;
    assert_eq!(put["version"], 1, "{put}");
    for node in ["vps", "laptop"] {
        eventually(WITHIN, &format!("{node} reading version 1"), || async {
            let v = ask(
                on_the_hub,
                &format!("cadre.node.{node}.context.get"),
                json!({"key": key}),
            )
            .await
            .ok()?;
            (v["version"] == 1 && v["value"] == "signed").then_some(())
        })
        .await?;
    }

    // Cut off, the laptop still reads its copy, and keeps what it writes.
    leaf_link.cut(true);
    let read = ask(
        on_the_laptop,
        "cadre.node.laptop.context.get",
        json!({"key": key}),
    )
    .await?;
    assert_eq!(read["value"], "signed", "{read}");
    let stale = ask(
        on_the_laptop,
        "cadre.context.put",
        json!({"key": key, "value": "kickoff booked", "expected_version": 1}),
    )
    .await?;
    assert_eq!(stale["status"], "pending", "{stale}");
    let fresh = ask(
        on_the_laptop,
        "cadre.context.put",
        json!({"key": "action.acme.kickoff", "value": "send agenda"}),
    )
    .await?;
    assert_eq!(fresh["status"], "pending", "{fresh}");
    let waiting = ask(on_the_laptop, "cadre.node.laptop.context.writes", json!({})).await?;
    assert_eq!(
        waiting["writes"].as_array().map(Vec::len),
        Some(2),
        "{waiting}"
    );
    // Meanwhile the VPS moves the key on.
    let moved = ask(
        on_the_hub,
        "cadre.context.put",
        json!({"key": key, "value": "churned", "expected_version": 1}),
    )
    .await?;
    assert_eq!(moved["version"], 2, "{moved}");

    leaf_link.cut(false);
    let write = |id: &Value| json!({"write_id": id});
    let rejected = eventually(WITHIN, "the laptop's stale write judged", || async {
        let w = ask(
            on_the_laptop,
            "cadre.node.laptop.context.writes",
            write(&stale["write_id"]),
        )
        .await
        .ok()?;
        (w["writes"][0]["status"] == "rejected").then_some(w)
    })
    .await?;
    assert_eq!(rejected["writes"][0]["current_version"], 2, "{rejected}");
    assert!(
        rejected["writes"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("at version 2, not 1")
    );
    // Its other write is applied, and every node reads the same versions.
    for node in ["vps", "laptop"] {
        eventually(
            WITHIN,
            &format!("{node} reading the laptop's offline write"),
            || async {
                let a = ask(
                    on_the_hub,
                    &format!("cadre.node.{node}.context.get"),
                    json!({"key": "action.acme.kickoff"}),
                )
                .await
                .ok()?;
                let k = ask(
                    on_the_hub,
                    &format!("cadre.node.{node}.context.get"),
                    json!({"key": key}),
                )
                .await
                .ok()?;
                (a["value"] == "send agenda" && k["version"] == 2 && k["value"] == "churned")
                    .then_some(())
            },
        )
        .await?;
    }
    println!("knowledge: the laptop's offline writes — one applied, one rejected with a conflict");
    Ok(())
}
