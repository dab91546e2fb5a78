//! The compose cluster, as users run it: `ops/scripts/docker-image.sh` builds the
//! `cadre` image from this machine alone (a Debian base made with debootstrap, the binaries
//! this build produced), `docker/make-certs.sh` makes the TLS certificates, and
//! `docker/compose.yml` starts NATS (`ops/nats/hub.conf`), a laptop-like and a VPS-like
//! node and Prometheus. Tasks flow; the laptop's container is killed, later the VPS's is
//! cut off the network (`docker network disconnect`); each time the other node takes the
//! tasks over, every task succeeds and no call ran under a stale lease. Prometheus, in the
//! cluster, sees the VPS stand down once it is back.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chaos_tests::{HttpSink, eventually, free_port, request};
use futures::StreamExt;
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(90);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A compose project, brought down (with its volumes) on drop.
struct Compose {
    project: String,
    env: Vec<(String, String)>,
}

impl Compose {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("docker-compose");
        c.arg("-f")
            .arg(repo().join("docker/compose.yml"))
            .args(["-p", &self.project])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    fn container(&self, service: &str) -> String {
        format!("{}_{service}_1", self.project)
    }

    fn logs(&self, service: &str) -> String {
        let out = Command::new("docker")
            .args(["logs", "--tail", "30", &self.container(service)])
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self.cmd(&["down", "-v", "--timeout", "2"]).output();
    }
}

/// Follows task events until every task in `tasks` succeeded; returns the takeovers seen
/// (task → the node that took it).
async fn all_succeed(
    events: &mut async_nats::Subscriber,
    tasks: &[String],
    compose: &Compose,
) -> anyhow::Result<HashMap<String, String>> {
    let (mut done, mut taken) = (HashSet::new(), HashMap::new());
    let deadline = tokio::time::Instant::now() + WITHIN;
    while !tasks.iter().all(|t| done.contains(t)) {
        let msg = tokio::time::timeout_at(deadline, events.next())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "{} of {} tasks succeeded\nvps: {}\nlaptop: {}",
                    done.len(),
                    tasks.len(),
                    compose.logs("vps"),
                    compose.logs("laptop")
                )
            })?
            .ok_or_else(|| anyhow::anyhow!("events ended"))?;
        let event: Value = serde_json::from_slice(&msg.payload)?;
        let id = event["task_id"].as_str().unwrap_or_default().to_string();
        match event["kind"].as_str() {
            Some("succeeded") => {
                done.insert(id);
            }
            Some("taken_over") => {
                taken.insert(id, event["node_id"].as_str().unwrap_or_default().into());
            }
            Some("failed") => anyhow::bail!("{event}"),
            _ => {}
        }
    }
    Ok(taken)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_cluster_survives_a_killed_and_a_disconnected_node() -> anyhow::Result<()> {
    // Needs a Docker engine (and root, for debootstrap). On a machine without one, the
    // suite fails here unless told, in so many words, to leave this test out.
    if std::env::var("CADRE_SKIP_DOCKER").as_deref() == Ok("1") {
        println!("SKIPPED: CADRE_SKIP_DOCKER=1, the compose cluster was not tested");
        return Ok(());
    }
    run(Command::new("docker").arg("info")).map_err(|e| {
        anyhow::anyhow!("this test needs a running Docker engine (or CADRE_SKIP_DOCKER=1): {e}")
    })?;
    let started = Instant::now();
    let cadre = chaos_tests::cadre_bin()?;
    run(Command::new(repo().join("ops/scripts/docker-image.sh")).arg(&cadre))?;
    println!("image built in {:?}", started.elapsed());

    let dir = tempfile::tempdir()?;
    let tls = dir.path().join("tls");
    run(Command::new(repo().join("docker/make-certs.sh")).arg(&tls))?;
    let playbooks = dir.path().join("playbooks");
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&playbooks)?;
    std::fs::create_dir_all(&policies)?;
    std::fs::write(
        playbooks.join("handover.toml"),
        r#"
name = "handover"
[[steps]]
id = "notes"
tool = "file.write"
on_tag = "location=laptop"
params = { path = "/var/lib/cadre/files/{{task.id}}.md", content = "notes" }
verify = { file_exists = true }
[[steps]]
id = "crm"
tool = "http.request"
depends_on = ["notes"]
params = { method = "POST", url = "{{input.url}}/slow/clients", json = { n = "{{input.n}}" } }
verify = { status_in = [201] }
"#,
    )?;
    // The sink is on the host, outside the shipped loopback allow list: permit here.
    std::fs::write(
        policies.join("open.cedar"),
        "permit(principal, action, resource);\n",
    )?;
    for d in [&tls, &playbooks, &policies] {
        run(Command::new("chmod").args(["-R", "a+rX"]).arg(d))?;
    }

    let nats_port = free_port()?;
    let prometheus_port = free_port()?;
    let p = |p: &Path| p.display().to_string();
    let env: Vec<(String, String)> = [
        ("CADRE_NATS_NODE_PASSWORD", "node-secret".to_string()),
        ("CADRE_NATS_OPERATOR_PASSWORD", "operator-secret".into()),
        ("CADRE_NATS_INJECTOR_PASSWORD", "injector-secret".into()),
        ("CADRE_NATS_PORT", nats_port.to_string()),
        ("CADRE_PROMETHEUS_PORT", prometheus_port.to_string()),
        ("CADRE_TLS_DIR", p(&tls)),
        ("CADRE_PLAYBOOKS", p(&playbooks)),
        ("CADRE_POLICIES", p(&policies)),
        ("CADRE_LEASE_TTL_MS", "2000".into()),
        ("CADRE_HOP_TIMEOUT_MS", "1000".into()),
        ("CADRE_STEP_TIMEOUT_MS", "4000".into()),
        ("CADRE_STEP_ATTEMPTS_MAX", "20".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let compose = Compose {
        project: format!("cadretest{}", std::process::id()),
        env,
    };
    run(&mut compose.cmd(&["up", "-d"]))?;

    let operator = async_nats::ConnectOptions::with_user_and_password(
        "operator".into(),
        "operator-secret".into(),
    )
    .add_root_certificates(tls.join("ca.pem"))
    .require_tls(true)
    .retry_on_initial_connect()
    .connect(format!("tls://localhost:{nats_port}"))
    .await?;
    let alive = |want: usize| {
        let operator = operator.clone();
        async move { (chaos_tests::alive_nodes(&operator).await? == want).then_some(()) }
    };
    eventually(WITHIN, "both nodes alive", || alive(2))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\nvps: {}", compose.logs("vps")))?;

    // The containers reach the sink on the host through the gateway.
    let sink = HttpSink::start_on("0.0.0.0").await?;
    let port = sink.url.rsplit(':').next().unwrap_or_default().to_string();
    let url = format!("http://host.docker.internal:{port}");
    let mut events = operator.subscribe("cadre.events.task.>").await?;
    let js = async_nats::jetstream::new(operator.clone());
    let leases = js.get_key_value("CADRE_LEASES").await?;
    let mut all = Vec::new();
    let round = |first: usize| {
        let (operator, url, leases) = (operator.clone(), url.clone(), leases.clone());
        async move {
            let mut owners = BTreeMap::new();
            for n in first..first + 6 {
                let submit =
                    json!({"playbook": "handover", "input": {"n": n.to_string(), "url": url}});
                let reply = request(&operator, "cadre.tasks.submit", submit.to_string()).await?;
                let id = reply["task_id"].as_str().unwrap_or_default().to_string();
                let lease = leases
                    .get(&id)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("no lease"))?;
                let owner = serde_json::from_slice::<Value>(&lease)?["owner"].clone();
                owners.insert(id, owner.as_str().unwrap_or_default().to_string());
            }
            anyhow::Ok(owners)
        }
    };
    let in_the_crm = |tasks: Vec<String>| {
        let sink = &sink;
        async move {
            eventually(WITHIN, "every task calling the CRM", || async {
                let keys: HashSet<String> = sink
                    .requests()
                    .into_iter()
                    .filter_map(|r| r.idempotency_key)
                    .collect();
                tasks
                    .iter()
                    .all(|t| keys.contains(&format!("{t}.crm")))
                    .then_some(())
            })
            .await
        }
    };

    // 1. The laptop's container is killed mid-call: the VPS takes its tasks over.
    let owners = round(0).await?;
    let tasks: Vec<String> = owners.keys().cloned().collect();
    in_the_crm(tasks.clone()).await?;
    run(Command::new("docker").args(["kill", &compose.container("laptop")]))?;
    let taken = all_succeed(&mut events, &tasks, &compose).await?;
    for (id, owner) in &owners {
        if owner == "laptop" {
            assert_eq!(
                taken.get(id).map(String::as_str),
                Some("vps"),
                "{id}: {taken:?}"
            );
        }
    }
    println!("laptop killed: {} tasks taken over by the VPS", taken.len());
    all.extend(tasks);
    run(Command::new("docker").args(["start", &compose.container("laptop")]))?;
    eventually(WITHIN, "the laptop back", || alive(2)).await?;

    // 2. The VPS is cut off the network mid-call: the laptop takes its tasks over.
    let owners = round(100).await?;
    let tasks: Vec<String> = owners.keys().cloned().collect();
    in_the_crm(tasks.clone()).await?;
    let cut = Instant::now();
    let network = format!("{}_cadre", compose.project);
    run(Command::new("docker").args([
        "network",
        "disconnect",
        &network,
        &compose.container("vps"),
    ]))?;
    let taken = all_succeed(&mut events, &tasks, &compose).await?;
    for (id, owner) in &owners {
        if owner == "vps" {
            assert_eq!(
                taken.get(id).map(String::as_str),
                Some("laptop"),
                "{id}: {taken:?}"
            );
        }
    }
    println!(
        "VPS disconnected: {} tasks taken over by the laptop, all done {:?} after the cut",
        taken.len(),
        cut.elapsed()
    );
    all.extend(tasks);
    // Back under its service name too (a bare `network connect` gives the container only
    // its own name, and Prometheus scrapes `vps:9464`).
    run(Command::new("docker").args([
        "network",
        "connect",
        "--alias",
        "vps",
        &network,
        &compose.container("vps"),
    ]))?;
    let reconnected = Instant::now();
    eventually(WITHIN, "the VPS back", || alive(2))
        .await
        .map_err(|e| anyhow::anyhow!("{e}\nvps: {}", compose.logs("vps")))?;
    println!(
        "VPS reconnected: alive again {:?} after its network came back",
        reconnected.elapsed()
    );

    // Prometheus, in the cluster, sees the VPS stand down once it is back.
    let prometheus = format!("127.0.0.1:{prometheus_port}");
    eventually(WITHIN, "Prometheus seeing the VPS stand down", || async {
        let (_, body) = chaos_tests::http_get(
            &prometheus,
            "/api/v1/query?query=sum(cadre_task_stand_downs_total%7Bnode%3D%22vps%22%7D)",
        )
        .await
        .ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        let n: f64 = v["data"]["result"][0]["value"][1].as_str()?.parse().ok()?;
        (n >= 1.0).then_some(())
    })
    .await
    .map_err(|e| {
        let seen = |q: &str| {
            let path = format!("/api/v1/query?query={q}");
            let prometheus = prometheus.clone();
            std::thread::spawn(move || {
                tokio::runtime::Runtime::new()
                    .ok()
                    .and_then(|rt| rt.block_on(chaos_tests::http_get(&prometheus, &path)).ok())
                    .map(|(_, body)| body)
                    .unwrap_or_default()
            })
            .join()
            .unwrap_or_default()
        };
        anyhow::anyhow!(
            "{e}\nup: {}\ntakeovers: {}\nvps: {}",
            seen("up"),
            seen("cadre_task_takeovers_total"),
            compose.logs("vps")
        )
    })?;

    // Every task succeeded; per task the CRM never saw an older token after a newer one.
    for id in &all {
        let get = json!({"task_id": id}).to_string();
        let view = request(&operator, "cadre.tasks.get", get).await?;
        assert_eq!(view["status"], "succeeded", "{view}");
    }
    sink.check_fencing()?;
    println!("compose test done in {:?}", started.elapsed());
    Ok(())
}
