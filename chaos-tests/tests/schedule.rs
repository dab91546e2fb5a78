//! Cadre owns the clock: a `wait` step and a delayed task survive `kill -9` and resume on
//! time; a cron schedule fires on time and once with two nodes running; firings missed
//! while every node was down follow their schedule's policy (`catch_up_once`: one task
//! that says so; `skip`: none), and firing goes on after.
//!
//! Every schedule here ticks every 2 s (a 6-field cron with seconds), so nothing waits
//! for a minute to turn.

use std::collections::BTreeSet;
use std::time::Duration;

use chaos_tests::{CadreNode, NatsServer, cadre_cli, eventually, request, wait_task};
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(30);

async fn get(client: &async_nats::Client, task_id: &str) -> anyhow::Result<Value> {
    request(
        client,
        "cadre.tasks.get",
        json!({"task_id": task_id}).to_string(),
    )
    .await
}

fn step<'a>(task: &'a Value, id: &str) -> &'a Value {
    task["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["id"] == id))
        .unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_step_and_a_delayed_task_survive_kill_9_and_run_on_time() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let dir = tempfile::tempdir()?;
    let follow_up = r#"
name = "follow-up"
[[steps]]
id = "sent"
tool = "file.write"
params = { path = "{{input.root}}/sent.md", content = "first mail" }
verify = { file_exists = true }
[[steps]]
id = "pause"
tool = "wait"
params = { for = "{{input.pause}}" }
depends_on = ["sent"]
[[steps]]
id = "again"
tool = "file.write"
params = { path = "{{input.root}}/follow-up.md", content = "following up" }
verify = { file_exists = true }
depends_on = ["pause"]
"#;
    let quick = r#"
name = "quick"
[[steps]]
id = "only"
tool = "file.write"
params = { path = "{{input.root}}/quick-{{task.id}}.md", content = "now" }
verify = { file_exists = true }
"#;
    let (files, playbooks) = chaos_tests::files_and_playbooks(
        dir.path(),
        &[("follow-up", follow_up), ("quick", quick)],
    )?;
    let mut node = CadreNode::start(
        "n1",
        &dir.path().join("data"),
        &nats.url,
        &[
            ("CADRE_PLAYBOOKS_DIR", playbooks.as_str()),
            ("CADRE_FILE_ROOTS", files.as_str()),
        ],
    )?;
    node.wait_ready(&client).await?;

    // Bad times are the submitter's error, with a clear message.
    let bad = request(
        &client,
        "cadre.tasks.submit",
        json!({"playbook": "quick", "input": {"root": files}, "run_at": "next tuesday"})
            .to_string(),
    )
    .await?;
    assert_eq!(bad["error"]["code"], "invalid_request", "{bad}");
    assert!(
        bad["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("run_at") && m.contains("RFC 3339")),
        "{bad}"
    );

    // A follow-up that waits 4 s between its mails, and a task delayed by 4 s.
    let waiting = request(
        &client,
        "cadre.tasks.submit",
        json!({"playbook": "follow-up", "input": {"root": files, "pause": "4s"}}).to_string(),
    )
    .await?;
    let waiting_id = waiting["task_id"].as_str().unwrap_or_default().to_string();
    let delayed = request(
        &client,
        "cadre.tasks.submit",
        json!({"playbook": "quick", "input": {"root": files}, "run_after": "4s"}).to_string(),
    )
    .await?;
    let delayed_id = delayed["task_id"].as_str().unwrap_or_default().to_string();
    let parked = eventually(WITHIN, "the wait step to start", || async {
        let t = get(&client, &waiting_id).await.ok()?;
        (step(&t, "pause")["status"] == "waiting").then_some(t)
    })
    .await?;
    let scheduled = wait_task(&client, &delayed_id, WITHIN, |s| s == "scheduled").await?;
    let wake_ms = step(&parked, "pause")["started_at_ms"]
        .as_u64()
        .unwrap_or(0)
        + 4_000;
    let run_ms = scheduled["created_at_ms"].as_u64().unwrap_or(0) + 4_000;
    assert_eq!(
        scheduled["not_before_ms"].as_u64(),
        Some(run_ms),
        "{scheduled}"
    );
    assert_eq!(step(&parked, "again")["status"], "pending");

    // Killed while both wait; back before their time.
    node.kill9();
    node.restart()?;
    node.wait_ready(&client).await?;

    let done = wait_task(&client, &waiting_id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", node.log_tail());
    let pause = step(&done, "pause");
    assert_eq!(pause["output"]["waited_until_ms"].as_u64(), Some(wake_ms));
    let woke = pause["output"]["woke_at_ms"].as_u64().unwrap_or(0);
    assert!(
        (wake_ms..wake_ms + 2_000).contains(&woke),
        "woke at {woke}, due {wake_ms}"
    );
    let again = step(&done, "again")["started_at_ms"].as_u64().unwrap_or(0);
    assert!(
        again >= wake_ms,
        "the next mail went before the wait was over"
    );
    assert!(std::path::Path::new(&format!("{files}/follow-up.md")).exists());

    let ran = wait_task(&client, &delayed_id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(ran["status"], "succeeded", "{ran}");
    let started = step(&ran, "only")["started_at_ms"].as_u64().unwrap_or(0);
    assert!(
        (run_ms..run_ms + 2_000).contains(&started),
        "started at {started}, due {run_ms}"
    );

    // A delayed task can be cancelled before its time; it never runs.
    let later = request(
        &client,
        "cadre.tasks.submit",
        json!({"playbook": "quick", "input": {"root": files}, "run_after": "1h"}).to_string(),
    )
    .await?;
    let later_id = later["task_id"].as_str().unwrap_or_default().to_string();
    wait_task(&client, &later_id, WITHIN, |s| s == "scheduled").await?;
    let cancelled = request(
        &client,
        "cadre.tasks.cancel",
        json!({"task_id": later_id, "reason": "not needed"}).to_string(),
    )
    .await?;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    Ok(())
}

/// The scheduled times of the tasks `playbook` has, from their idempotency keys
/// (`schedule-<name>-<ms>`), and how many tasks there are.
async fn firings(
    client: &async_nats::Client,
    schedule: &str,
    playbook: &str,
) -> anyhow::Result<(Vec<u64>, usize)> {
    let list = request(
        client,
        "cadre.tasks.list",
        json!({"playbook": playbook, "limit": 500}).to_string(),
    )
    .await?;
    let mut times = Vec::new();
    let mut count = 0;
    for t in list["tasks"].as_array().cloned().unwrap_or_default() {
        let task = get(client, t["task_id"].as_str().unwrap_or_default()).await?;
        let key = task["idempotency_key"].as_str().unwrap_or_default();
        if let Some(ms) = key.strip_prefix(&format!("schedule-{schedule}-")) {
            times.push(ms.parse()?);
            count += 1;
        }
    }
    times.sort_unstable();
    Ok((times, count))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_fires_once_across_two_nodes_and_missed_firings_follow_their_policy()
-> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let dir = tempfile::tempdir()?;
    let tick = r#"
name = "tick"
[schedule]
cron = "*/2 * * * * *"
tz = "Europe/London"
[[steps]]
id = "beat"
tool = "wait"
params = { for = "0s" }
"#;
    let tock = r#"
name = "tock"
[[steps]]
id = "beat"
tool = "wait"
params = { for = "0s" }
"#;
    let (_, playbooks) =
        chaos_tests::files_and_playbooks(dir.path(), &[("tick", tick), ("tock", tock)])?;
    let env = [
        ("CADRE_CLUSTER", "true"),
        ("CADRE_PLAYBOOKS_DIR", playbooks.as_str()),
        ("CADRE_SCHEDULE_TICK_MS", "200"),
        // A firing found more than 1 s late was missed.
        ("CADRE_SCHEDULE_GRACE_MS", "1000"),
    ];
    let mut nodes = Vec::new();
    for id in ["laptop", "vps"] {
        let mut node = CadreNode::start(id, &dir.path().join(id), &nats.url, &env)?;
        node.wait_ready(&client).await?;
        nodes.push(node);
    }

    // On time and once: with both nodes up, every 2 s slot is one task, none twice.
    let listed = eventually(WITHIN, "five firings of tick", || async {
        let (times, count) = firings(&client, "tick", "tick").await.ok()?;
        (count >= 5).then_some((times, count))
    })
    .await?;
    let (times, count) = listed;
    let distinct: BTreeSet<u64> = times.iter().copied().collect();
    assert_eq!(distinct.len(), count, "a firing made two tasks: {times:?}");
    for pair in times.windows(2) {
        assert_eq!(pair[1] - pair[0], 2_000, "a slot was skipped: {times:?}");
    }
    let first = times[0];
    let list = request(&client, "cadre.schedules.list", "{}").await?;
    let fired_by = list["fired_by"].as_str().unwrap_or_default().to_string();
    assert!(["laptop", "vps"].contains(&fired_by.as_str()), "{list}");
    let tick_view = &list["schedules"][0];
    assert_eq!(tick_view["source"], "playbook", "{list}");
    assert!(
        tick_view["next_fire"]
            .as_str()
            .is_some_and(|t| t.ends_with("+00:00") || t.ends_with("Z")),
        "shown in Europe/London (UTC+0 in winter): {tick_view}"
    );

    // Two schedules of `tock`, through the CLI: one catches up, one skips.
    for (name, missed) in [("catchup", "catch_up_once"), ("skipper", "skip")] {
        let (code, out, err) = cadre_cli(
            &nats.url,
            &[
                "schedule",
                "add",
                name,
                "tock",
                "--cron",
                "*/2 * * * * *",
                "--missed",
                missed,
            ],
        )?;
        assert_eq!(code, 0, "{out}{err}");
    }
    let bad = request(
        &client,
        "cadre.schedules.add",
        json!({"name": "bad", "playbook": "tock", "cron": "*/2 * * *"}).to_string(),
    )
    .await?;
    assert_eq!(bad["error"]["code"], "invalid_request", "{bad}");
    eventually(WITHIN, "both tock schedules to fire", || async {
        let (_, a) = firings(&client, "catchup", "tock").await.ok()?;
        let (_, b) = firings(&client, "skipper", "tock").await.ok()?;
        (a >= 1 && b >= 1).then_some(())
    })
    .await?;

    // Every node down for 7 s: three or four firings of each schedule fall due unseen.
    for node in &mut nodes {
        assert_eq!(node.terminate(Duration::from_secs(15))?, Some(0));
    }
    // Every slot fired so far is at or before now.
    let (before_catchup, before_skip) = (now_ms(), now_ms());
    tokio::time::sleep(Duration::from_secs(7)).await;
    let down_until = now_ms();
    for node in &mut nodes {
        node.restart()?;
        node.wait_ready(&client).await?;
    }

    // catch_up_once: one task for all the missed slots, whose trace says so, then the
    // next slot on time.
    let after = eventually(WITHIN, "the catch-up firing and the next", || async {
        let (times, _) = firings(&client, "catchup", "tock").await.ok()?;
        let after: Vec<u64> = times.into_iter().filter(|t| *t > before_catchup).collect();
        (after.len() >= 2).then_some(after)
    })
    .await?;
    assert!(
        after[0] >= down_until,
        "the catch-up fires for the latest missed slot: {after:?}"
    );
    assert_eq!(after[1] - after[0], 2_000, "then on time: {after:?}");
    let said = accepted_detail(&client, "tock", &format!("schedule-catchup-{}", after[0])).await?;
    assert!(
        said.contains("to catch up:") && said.contains("earlier firings since"),
        "the catch-up task's trace says what it stands for: {said}"
    );
    let next = accepted_detail(&client, "tock", &format!("schedule-catchup-{}", after[1])).await?;
    assert!(
        next.contains("fired for") && !next.contains("catch up"),
        "{next}"
    );

    // skip: no task for the missed slots; the schedule counts them and says so.
    let after = eventually(WITHIN, "skipper firing again", || async {
        let (times, _) = firings(&client, "skipper", "tock").await.ok()?;
        let after: Vec<u64> = times.into_iter().filter(|t| *t > before_skip).collect();
        (!after.is_empty()).then_some(after)
    })
    .await?;
    assert!(
        after[0] > down_until,
        "skip fired for a slot of the downtime: {after:?}"
    );
    let list = request(&client, "cadre.schedules.list", "{}").await?;
    let skipper = list["schedules"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "skipper").cloned())
        .unwrap_or_default();
    assert!(skipper["skipped"].as_u64().unwrap_or(0) >= 3, "{skipper}");
    let (tick_times, tick_count) = firings(&client, "tick", "tick").await?;
    let distinct: BTreeSet<u64> = tick_times.iter().copied().collect();
    assert_eq!(distinct.len(), tick_count, "a firing made two tasks");
    assert_eq!(tick_times.first(), Some(&first));

    // Pause stops firing; an unknown name is not_found.
    let (code, out, err) = cadre_cli(&nats.url, &["schedule", "pause", "tick"])?;
    assert_eq!(code, 0, "{out}{err}");
    let missing = request(
        &client,
        "cadre.schedules.pause",
        json!({"name": "nope"}).to_string(),
    )
    .await?;
    assert_eq!(missing["error"]["code"], "not_found", "{missing}");
    Ok(())
}

/// The `accepted` record's detail in the trace of the `playbook` task with `key`.
async fn accepted_detail(
    client: &async_nats::Client,
    playbook: &str,
    key: &str,
) -> anyhow::Result<String> {
    let list = request(
        client,
        "cadre.tasks.list",
        json!({"playbook": playbook, "limit": 500}).to_string(),
    )
    .await?;
    for t in list["tasks"].as_array().cloned().unwrap_or_default() {
        let id = t["task_id"].as_str().unwrap_or_default();
        if get(client, id).await?["idempotency_key"] == key {
            let records = chaos_tests::trace_records(client, id).await?;
            return Ok(records
                .iter()
                .find(|r| r["action"] == "accepted")
                .map(|r| r["detail"].to_string())
                .unwrap_or_default());
        }
    }
    anyhow::bail!("no {playbook} task with key {key}")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_priority_work_waits_for_its_window_and_runs_under_its_cap() -> anyhow::Result<()> {
    const WINDOW: u64 = 4_000;
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let dir = tempfile::tempdir()?;
    let background = r#"
name = "background"
priority = "low"
[[steps]]
id = "work"
tool = "wait"
params = { for = "1s" }
"#;
    let urgent = r#"
name = "urgent"
[[steps]]
id = "work"
tool = "wait"
params = { for = "0s" }
"#;
    let (_, playbooks) = chaos_tests::files_and_playbooks(
        dir.path(),
        &[("background", background), ("urgent", urgent)],
    )?;
    let window = WINDOW.to_string();
    let mut node = CadreNode::start(
        "n1",
        &dir.path().join("data"),
        &nats.url,
        &[
            ("CADRE_PLAYBOOKS_DIR", playbooks.as_str()),
            ("CADRE_LOW_PRIORITY_WINDOW_MS", window.as_str()),
            ("CADRE_LOW_PRIORITY_CONCURRENCY_MAX", "2"),
        ],
    )?;
    node.wait_ready(&client).await?;
    // Start just after a window boundary, so the whole batch falls in one window and
    // the urgent task has most of a window to show it does not wait.
    let into = now_ms() % WINDOW;
    tokio::time::sleep(Duration::from_millis(WINDOW - into + 50)).await;
    let submitted_at = now_ms();
    let mut low = Vec::new();
    for n in 0..5 {
        let reply = request(
            &client,
            "cadre.tasks.submit",
            json!({"playbook": "background", "input": {"n": n}}).to_string(),
        )
        .await?;
        low.push(reply["task_id"].as_str().unwrap_or_default().to_string());
    }
    let reply = request(
        &client,
        "cadre.tasks.submit",
        json!({"playbook": "urgent", "priority": "high"}).to_string(),
    )
    .await?;
    let urgent_id = reply["task_id"].as_str().unwrap_or_default().to_string();
    let boundary = submitted_at.div_ceil(WINDOW) * WINDOW;

    let urgent_done = wait_task(&client, &urgent_id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(urgent_done["status"], "succeeded");
    assert_eq!(urgent_done["priority"], "high");
    let urgent_end = step(&urgent_done, "work")["finished_at_ms"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(
        urgent_end < boundary,
        "the urgent task waited for the low batch"
    );

    let mut spans = Vec::new();
    for id in &low {
        let t = wait_task(&client, id, WITHIN, chaos_tests::is_terminal).await?;
        assert_eq!(t["status"], "succeeded", "{t}");
        assert_eq!(t["priority"], "low", "the playbook's priority");
        assert_eq!(t["not_before_ms"].as_u64(), Some(boundary), "{t}");
        let work = step(&t, "work");
        let (start, end) = (
            work["started_at_ms"].as_u64().unwrap_or(0),
            work["finished_at_ms"].as_u64().unwrap_or(0),
        );
        assert!(start >= boundary, "a low task ran before its window");
        spans.push((start, end));
    }
    // At any moment at most two ran (the cap), and two did run together (a batch).
    let most = spans
        .iter()
        .map(|&(s, _)| spans.iter().filter(|&&(a, b)| a <= s && s < b).count())
        .max()
        .unwrap_or(0);
    assert_eq!(most, 2, "{spans:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_an_event_resumes_on_the_event_or_its_timeout_across_kill_9()
-> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let dir = tempfile::tempdir()?;
    let await_reply = r#"
name = "await-reply"
[[steps]]
id = "reply"
tool = "wait"
params = { event = "reply", timeout = "{{input.timeout}}" }
[[steps]]
id = "log"
tool = "file.write"
params = { path = "{{input.root}}/{{task.id}}.md", content = "{{steps.reply.output}}" }
verify = { file_exists = true }
depends_on = ["reply"]
"#;
    let (files, playbooks) =
        chaos_tests::files_and_playbooks(dir.path(), &[("await-reply", await_reply)])?;
    let mut node = CadreNode::start(
        "n1",
        &dir.path().join("data"),
        &nats.url,
        &[
            ("CADRE_PLAYBOOKS_DIR", playbooks.as_str()),
            ("CADRE_FILE_ROOTS", files.as_str()),
        ],
    )?;
    node.wait_ready(&client).await?;
    let submit = |timeout: &'static str| {
        let (client, files) = (client.clone(), files.clone());
        async move {
            let r = request(
                &client,
                "cadre.tasks.submit",
                json!({"playbook": "await-reply", "input": {"root": files, "timeout": timeout}})
                    .to_string(),
            )
            .await?;
            anyhow::Ok(r["task_id"].as_str().unwrap_or_default().to_string())
        }
    };
    let answered = submit("60s").await?;
    let unanswered = submit("2s").await?;
    for id in [&answered, &unanswered] {
        eventually(WITHIN, "the wait to start", || async {
            let t = get(&client, id).await.ok()?;
            (step(&t, "reply")["status"] == "waiting").then_some(())
        })
        .await?;
    }
    // An event nobody waits for is refused.
    let wrong = request(
        &client,
        "cadre.tasks.signal",
        json!({"task_id": answered, "event": "payment"}).to_string(),
    )
    .await?;
    assert_eq!(wrong["error"]["code"], "conflict", "{wrong}");

    // The waiting survives kill -9; the event arrives after the restart.
    node.kill9();
    node.restart()?;
    node.wait_ready(&client).await?;
    let signalled = request(
        &client,
        "cadre.tasks.signal",
        json!({"task_id": answered, "event": "reply", "payload": {"text": "yes please"}, "by": "mailbox"})
            .to_string(),
    )
    .await?;
    assert!(signalled["error"].is_null(), "{signalled}");
    let done = wait_task(&client, &answered, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", node.log_tail());
    let out = &step(&done, "reply")["output"];
    assert_eq!(
        (out["arrived"].as_bool(), out["payload"]["text"].as_str()),
        (Some(true), Some("yes please")),
        "{out}"
    );
    let logged = std::fs::read_to_string(format!("{files}/{answered}.md"))?;
    assert!(logged.contains("yes please"), "{logged}");

    // No event: the timeout resumes it, saying so.
    let timed = wait_task(&client, &unanswered, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(timed["status"], "succeeded", "{timed}");
    let out = &step(&timed, "reply")["output"];
    assert_eq!(
        (out["arrived"].as_bool(), out["timed_out"].as_bool()),
        (Some(false), Some(true)),
        "{out}"
    );
    Ok(())
}
