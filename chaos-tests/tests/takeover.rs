//! Task ownership across nodes, against a real nats-server, two real `cadre` processes
//! in cluster mode and a real HTTP sink. A node that owns tasks in flight is frozen past
//! its lease TTL (SIGSTOP), killed (SIGKILL) and restarted, or cut off NATS (its link
//! partitioned) and healed: the other node takes its tasks over from their replicated
//! checkpoints, and the old owner, thawed, restarted or reconnected, stands down. A link
//! slowed well below the lease TTL costs nobody their tasks. Checked as a user would see it: every task succeeds (an operator answers
//! the steps whose `unsafe` effect may have run, as after a crash), each taken-over
//! task's timeline says so, no `unsafe` effect runs twice, and the tokens the sink saw
//! for each task never go back (no effect under a stale lease).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chaos_tests::{CadreNode, HttpSink, Link, NatsServer, eventually, request};
use futures::StreamExt;
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(60);
const LEASE_TTL: Duration = Duration::from_secs(2);

/// nats-server, the sink, the playbook, and nodes `a` and `b` in cluster mode.
struct Cluster {
    _nats: NatsServer,
    client: async_nats::Client,
    sink: HttpSink,
    _dir: tempfile::TempDir,
    script: String,
    record: String,
    /// `a`'s connection to NATS, to slow down or cut.
    link: Link,
    a: CadreNode,
    b: CadreNode,
}

impl Cluster {
    async fn start() -> anyhow::Result<Cluster> {
        let nats = NatsServer::start()?;
        let client = nats.client().await?;
        let sink = HttpSink::start().await?;
        let dir = tempfile::tempdir()?;
        // The counted unsafe effect, then two seconds more: a fault can hit it after the
        // effect happened and before anyone heard of it.
        let (script, record) = chaos_tests::unsafe_recorder(dir.path())?;
        let slow = dir.path().join("record-slowly.sh");
        std::fs::write(
            &slow,
            format!("#!/bin/sh\n{} \"$@\"\nsleep 2\n", script.display()),
        )?;
        std::fs::set_permissions(&slow, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let (script, record) = (slow.display().to_string(), record.display().to_string());
        let playbooks = dir.path().join("playbooks");
        std::fs::create_dir_all(&playbooks)?;
        std::fs::write(
            playbooks.join("handover.toml"),
            r#"
name = "handover"
[[steps]]
id = "crm"
tool = "http.request"
params = { method = "POST", url = "{{input.url}}/slow/clients", json = { n = "{{input.n}}" } }
verify = { status_in = [201] }
[[steps]]
id = "unsafe"
tool = "shell.run"
depends_on = ["crm"]
params = { program = "{{input.script}}", args = ["{{task.id}}", "{{input.record}}"] }
verify = { exit_code = 0 }
"#,
        )?;
        let pb = playbooks.display().to_string();
        let ttl = LEASE_TTL.as_millis().to_string();
        let env = [
            ("CADRE_CLUSTER", "true"),
            ("CADRE_LEASE_TTL_MS", ttl.as_str()),
            ("CADRE_PLAYBOOKS_DIR", pb.as_str()),
            ("CADRE_SHELL_ALLOW", script.as_str()),
            ("CADRE_HOP_TIMEOUT_MS", "1000"),
            // A request that lands on the frozen node's executor is lost until the
            // timeout; the next attempt goes elsewhere.
            ("CADRE_STEP_TIMEOUT_MS", "4000"),
            ("CADRE_STEP_ATTEMPTS_MAX", "20"),
            ("CADRE_RETRY_DELAY_MS_BASE", "50"),
            ("CADRE_RETRY_DELAY_MS_MAX", "300"),
        ];
        let link = Link::start(&nats.url).await?;
        let mut a = CadreNode::start("a", &dir.path().join("a"), &link.url, &env)?;
        let mut b = CadreNode::start("b", &dir.path().join("b"), &nats.url, &env)?;
        a.wait_ready(&client).await?;
        b.wait_ready(&client).await?;
        Ok(Cluster {
            _nats: nats,
            client,
            sink,
            _dir: dir,
            script,
            record,
            link,
            a,
            b,
        })
    }

    /// Submits until node `a` owns `want` tasks (the intake queue group spreads them),
    /// then waits for those to be in `phase`. Returns every task and a's.
    async fn tasks_in_flight_on_a(
        &self,
        want: usize,
        phase: Phase,
    ) -> anyhow::Result<(Vec<String>, Vec<String>)> {
        let js = async_nats::jetstream::new(self.client.clone());
        let leases = js.get_key_value("CADRE_LEASES").await?;
        let (mut tasks, mut on_a) = (Vec::new(), Vec::new());
        for n in 0..40 {
            let input = json!({"n": n.to_string(), "url": self.sink.url,
                               "script": self.script, "record": self.record});
            let submit = json!({"playbook": "handover", "input": input}).to_string();
            let reply = request(&self.client, "cadre.tasks.submit", submit).await?;
            let id = reply["task_id"].as_str().unwrap_or_default().to_string();
            anyhow::ensure!(!id.is_empty(), "submit failed: {reply}");
            // The lease is claimed before the submit is acknowledged.
            let lease = leases
                .get(&id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no lease for {id}"))?;
            let lease: Value = serde_json::from_slice(&lease)?;
            if lease["owner"] == "a" {
                on_a.push(id.clone());
            }
            tasks.push(id);
            if on_a.len() == want {
                break;
            }
        }
        anyhow::ensure!(
            on_a.len() == want,
            "a owns {} of {} tasks",
            on_a.len(),
            tasks.len()
        );
        eventually(WITHIN, "a's tasks in flight", || async {
            let started: HashSet<String> = match phase {
                Phase::Crm => self
                    .sink
                    .requests()
                    .into_iter()
                    .filter_map(|r| r.idempotency_key?.strip_suffix(".crm").map(String::from))
                    .collect(),
                Phase::Unsafe => std::fs::read_to_string(&self.record)
                    .unwrap_or_default()
                    .lines()
                    .map(String::from)
                    .collect(),
            };
            on_a.iter().all(|t| started.contains(t)).then_some(())
        })
        .await?;
        Ok((tasks, on_a))
    }

    /// Follows the task events until every task succeeded or waits for an operator.
    async fn settle(
        &self,
        events: &mut async_nats::Subscriber,
        tasks: &[String],
        since: Instant,
    ) -> anyhow::Result<Settled> {
        let mut s = Settled::default();
        let mut settled = HashSet::new();
        let deadline = tokio::time::Instant::now() + WITHIN;
        while settled.len() < tasks.len() {
            let msg = tokio::time::timeout_at(deadline, events.next())
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "{} of {} tasks settled; taken over: {:?}\n{}",
                        settled.len(),
                        tasks.len(),
                        s.taken_over,
                        self.b.log_tail()
                    )
                })?
                .ok_or_else(|| anyhow::anyhow!("event subscription ended"))?;
            let event: Value = serde_json::from_slice(&msg.payload)?;
            let id = event["task_id"].as_str().unwrap_or_default().to_string();
            s.timeline.entry(id.clone()).or_default().push(format!(
                "{} {} {} {}",
                event["node_id"], event["kind"], event["step_id"], event["detail"]
            ));
            match event["kind"].as_str() {
                Some("taken_over") => {
                    assert_eq!(event["node_id"], "b", "{event}");
                    let detail = event["detail"].as_str().unwrap_or_default().to_string();
                    assert!(
                        detail.starts_with("from a, under fencing token "),
                        "{detail}"
                    );
                    s.takeover_after.push(since.elapsed());
                    s.taken_over.insert(id, detail);
                }
                Some("succeeded") => {
                    if event["node_id"] == "a" {
                        s.finished_by_a.insert(id.clone());
                    }
                    settled.insert(id);
                }
                Some("approval_requested") => {
                    assert_eq!(event["node_id"], "b", "{event}");
                    let detail = event["detail"].as_str().unwrap_or_default();
                    let approval = detail.split(':').next().unwrap_or_default().to_string();
                    s.pending.push((id.clone(), approval));
                    settled.insert(id);
                }
                Some("failed") => anyhow::bail!("a task failed: {event}"),
                _ => {}
            }
        }
        Ok(s)
    }

    /// The operator answers each step whose effect may have run, as the unsafe log says
    /// (done if it ran, else retry), through either node: one that does not own the task
    /// hands the decision to the owner.
    async fn decide(&self, pending: &[(String, String)]) -> anyhow::Result<()> {
        for (id, approval) in pending {
            let ran = std::fs::read_to_string(&self.record)
                .unwrap_or_default()
                .lines()
                .any(|l| l == id);
            let decision = if ran { "mark_done" } else { "retry" };
            let req = json!({"approval_id": approval, "decision": decision, "by": "takeover-test"});
            let reply = request(&self.client, "cadre.approvals.decide", req.to_string()).await?;
            assert!(reply.get("error").is_none(), "{reply}");
        }
        Ok(())
    }

    /// Every task succeeded; each unsafe effect ran once; per task, the sink never saw an
    /// older fencing token after a newer one.
    async fn check_invariants(&self, tasks: &[String]) -> anyhow::Result<()> {
        for id in tasks {
            let view = eventually(WITHIN, "the task's final view", || async {
                let get = json!({"task_id": id}).to_string();
                let v = request(&self.client, "cadre.tasks.get", get).await.ok()?;
                (v["status"] == "succeeded").then_some(v)
            })
            .await?;
            assert_eq!(view["status"], "succeeded", "{view}");
        }
        let runs = chaos_tests::unsafe_runs(std::path::Path::new(&self.record))?;
        for id in tasks {
            assert_eq!(runs.get(id), Some(&1), "unsafe runs of {id}: {runs:?}");
        }
        self.sink.check_fencing()
    }

    async fn stand_downs(&self) -> f64 {
        let text = self.a.metrics().await.unwrap_or_default();
        chaos_tests::metric_sum(&text, "cadre_task_stand_downs_total")
    }
}

/// Where a's tasks are when the fault hits.
#[derive(Clone, Copy)]
enum Phase {
    /// In the `keyed` HTTP call (at the sink for two seconds).
    Crm,
    /// In the `unsafe` step, after its effect: the new owner cannot know it ran.
    Unsafe,
}

#[derive(Default)]
struct Settled {
    taken_over: HashMap<String, String>,
    finished_by_a: HashSet<String>,
    pending: Vec<(String, String)>,
    /// From the fault to each `taken_over` event.
    takeover_after: Vec<Duration>,
    /// Each task's events as they arrived, for a failure's message.
    timeline: HashMap<String, Vec<String>>,
}

impl Settled {
    /// a's tasks that a had not finished before the fault: each must have been taken over.
    fn check_moved(&self, on_a: &[String]) -> anyhow::Result<usize> {
        let moved: Vec<&String> = on_a
            .iter()
            .filter(|id| !self.finished_by_a.contains(*id))
            .collect();
        // The sink call is slow, so a finishing all its tasks first is rare.
        anyhow::ensure!(
            !moved.is_empty(),
            "a finished all its tasks before the fault"
        );
        for id in &moved {
            anyhow::ensure!(
                self.taken_over.contains_key(*id),
                "{id} (owned by a) was not taken over"
            );
        }
        Ok(moved.len())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_owner_is_taken_over_and_stands_down_when_it_thaws() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    // What every node publishes about every task, as a user following along sees it.
    let mut events = cluster.client.subscribe("cadre.events.task.>").await?;
    let (tasks, on_a) = cluster.tasks_in_flight_on_a(3, Phase::Crm).await?;

    cluster.a.freeze();
    let frozen = Instant::now();
    let settled = cluster.settle(&mut events, &tasks, frozen).await?;
    let moved = settled.check_moved(&on_a)?;

    // `a` thaws after its leases are long gone: it stands down, issuing nothing.
    tokio::time::sleep((LEASE_TTL * 3).saturating_sub(frozen.elapsed())).await; // frozen well past the TTL
    cluster.a.thaw();
    let stood_down = eventually(WITHIN, "a standing down", || async {
        let n = cluster.stand_downs().await;
        (n >= moved as f64).then_some(n)
    })
    .await?;
    println!(
        "freeze: {moved} of a's tasks taken over after {:?}; {} waited for an operator; \
         a stood down {stood_down} times",
        settled.takeover_after,
        settled.pending.len()
    );
    cluster.decide(&settled.pending).await?;
    cluster.check_invariants(&tasks).await?;
    // A moved task's timeline, asked of either node, has both owners' records.
    for id in settled.taken_over.keys() {
        let records = chaos_tests::trace_records(&cluster.client, id).await?;
        let writers: HashSet<&str> = records
            .iter()
            .filter_map(|r| r["node_id"].as_str())
            .collect();
        assert_eq!(writers, HashSet::from(["a", "b"]), "{id}: {records:#?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owner_is_taken_over_and_defers_to_the_new_owner_on_restart() -> anyhow::Result<()>
{
    let mut cluster = Cluster::start().await?;
    let mut events = cluster.client.subscribe("cadre.events.task.>").await?;
    // Killed after its tasks' unsafe effects ran and before it heard back.
    let (tasks, on_a) = cluster.tasks_in_flight_on_a(3, Phase::Unsafe).await?;

    cluster.a.kill9();
    let killed = Instant::now();
    let settled = cluster.settle(&mut events, &tasks, killed).await?;
    let moved = settled.check_moved(&on_a)?;
    // Whichever node's executor ran a task's unsafe step (the call goes to any node with
    // the tool), the cluster-wide ledger has it. One whose outcome nobody recorded (its
    // executor died with `a`) is put to an operator; one whose outcome is recorded is
    // replayed. Neither runs again (counted below).
    let js = async_nats::jetstream::new(cluster.client.clone());
    let effects = js.get_key_value("CADRE_EFFECTS").await?;
    let asked: HashSet<&String> = settled.pending.iter().map(|(id, _)| id).collect();
    let mut unknown = 0;
    for id in on_a
        .iter()
        .filter(|id| !settled.finished_by_a.contains(*id))
    {
        let effect = effects
            .get(format!("{id}/unsafe/1"))
            .await?
            .ok_or_else(|| anyhow::anyhow!("{id}: no cluster-wide ledger entry"))?;
        let effect: Value = serde_json::from_slice(&effect)?;
        if effect["outcome"].is_null() {
            unknown += 1;
            assert!(
                asked.contains(id),
                "{id}: its unknown unsafe outcome was not put to an operator: {:#?}",
                settled.timeline.get(id)
            );
        }
    }
    println!("kill -9: {unknown} unsafe outcomes unknown after the kill");

    // `a` comes back with its old checkpoints: it resumes none of the moved tasks.
    cluster.a.restart()?;
    cluster.a.wait_ready(&cluster.client).await?;
    cluster.decide(&settled.pending).await?;
    cluster.check_invariants(&tasks).await?;
    println!(
        "kill -9: {moved} of a's tasks taken over after {:?}; {} waited for an operator; \
         a stood down {} times after its restart",
        settled.takeover_after,
        settled.pending.len(),
        cluster.stand_downs().await
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_owner_is_taken_over_and_stands_down_when_the_link_heals()
-> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let mut events = cluster.client.subscribe("cadre.events.task.>").await?;
    let (tasks, on_a) = cluster.tasks_in_flight_on_a(3, Phase::Crm).await?;

    // `a` keeps running and keeps reaching the CRM, but not NATS: its effects must stop
    // with its leases, though nobody can tell it so.
    cluster.link.cut(true);
    let cut = Instant::now();
    let settled = cluster.settle(&mut events, &tasks, cut).await?;
    let moved = settled.check_moved(&on_a)?;
    tokio::time::sleep((LEASE_TTL * 3).saturating_sub(cut.elapsed())).await; // cut well past the TTL
    cluster.link.cut(false);
    let stood_down = eventually(WITHIN, "a standing down", || async {
        let n = cluster.stand_downs().await;
        (n >= moved as f64).then_some(n)
    })
    .await?;
    println!(
        "partition: {moved} of a's tasks taken over after {:?}; {} waited for an operator; \
         a stood down {stood_down} times after the heal",
        settled.takeover_after,
        settled.pending.len()
    );
    cluster.decide(&settled.pending).await?;
    cluster.check_invariants(&tasks).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_link_below_the_lease_costs_no_ownership() -> anyhow::Result<()> {
    // 100 ms each way, a laptop on another continent from its VPS: a's requests to its
    // own roles cross the link four times (400 ms), its renewals twice, all well inside
    // the 2 s lease.
    // Slowed once a has tasks in flight: with the link slow from the start, b's intake
    // would pull every submitted task before a's pull crossed the link.
    let cluster = Cluster::start().await?;
    let mut events = cluster.client.subscribe("cadre.events.task.>").await?;
    let (tasks, on_a) = cluster.tasks_in_flight_on_a(3, Phase::Crm).await?;
    cluster.link.set_delay(Duration::from_millis(100));
    let started = Instant::now();
    let settled = cluster.settle(&mut events, &tasks, started).await?;
    assert!(
        settled.taken_over.is_empty(),
        "a slow link cost ownership: {:?}",
        settled.taken_over
    );
    for id in &on_a {
        assert!(
            settled.finished_by_a.contains(id),
            "{id} (a's) not finished by a: {:#?}",
            settled.timeline.get(id)
        );
    }
    // a never found its tasks owned elsewhere. (On a loaded machine a renewal can come
    // back after the token's 4/5 of the TTL: a holds that commit, stands down "unclaimed",
    // and claims its own lease again a third of a TTL later. Safe, and not a loss.)
    let metrics = cluster.a.metrics().await?;
    let lost = metrics
        .lines()
        .find(|l| l.starts_with("cadre_task_stand_downs_total{reason=\"owned_elsewhere\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert_eq!(lost, Some(0.0), "{metrics}");
    println!(
        "slow link (100 ms each way): {} tasks, {} of them a's, done {:?} after the slowdown, no takeover; a re-claimed its own {} times",
        tasks.len(),
        on_a.len(),
        started.elapsed(),
        cluster.stand_downs().await
    );
    cluster.check_invariants(&tasks).await
}
