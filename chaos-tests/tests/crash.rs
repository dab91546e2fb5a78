//! Crash recovery: the real `cadre` binary is SIGKILLed at random points while tasks
//! flow, 20 times, and restarted each time. Then: every accepted task is terminal and
//! succeeded, the HTTP sink saw every step's Idempotency-Key, no `unsafe` step ran
//! twice, and every file is whole. The seed is printed; `CADRE_CHAOS_SEED=<seed>`
//! replays the same kill schedule.

use std::time::Duration;

use chaos_tests::{CadreNode, HttpSink, NatsServer, eventually, request};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const KILLS: usize = 20;
const TASKS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_loses_nothing_and_never_repeats_an_unsafe_effect()
-> anyhow::Result<()> {
    let seed: u64 = match std::env::var("CADRE_CHAOS_SEED") {
        Ok(s) => s.parse()?,
        Err(_) => rand::random(),
    };
    println!("crash test seed: {seed} (replay with CADRE_CHAOS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);

    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let sink = HttpSink::start().await?;
    let dir = tempfile::tempdir()?;
    // The unsafe effect: appends the task id to a log, so the test can count runs.
    let (script, record) = chaos_tests::unsafe_recorder(dir.path())?;
    let crashy = r#"
name = "crashy"
[[steps]]
id = "a"
tool = "file.write"
params = { path = "{{input.root}}/{{input.name}}/a.txt", content = "{{input.body}}" }
verify = { file_exists = true }
[[steps]]
id = "crm"
tool = "http.request"
depends_on = ["a"]
params = { method = "POST", url = "{{input.url}}/clients", json = { name = "{{input.name}}" } }
verify = { status_in = [201] }
[[steps]]
id = "unsafe"
tool = "shell.run"
depends_on = ["crm"]
params = { program = "{{input.script}}", args = ["{{task.id}}", "{{input.record}}"] }
verify = { exit_code = 0 }
[[steps]]
id = "b"
tool = "file.write"
depends_on = ["unsafe"]
params = { path = "{{input.root}}/{{input.name}}/b.txt", content = "{{input.body}}" }
verify = { file_exists = true }
"#;
    let (roots, pb) = chaos_tests::files_and_playbooks(dir.path(), &[("crashy", crashy)])?;
    let files = std::path::PathBuf::from(&roots);
    let body: String = (0..64 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let allow = script.display().to_string();
    let env = [
        ("CADRE_FILE_ROOTS", roots.as_str()),
        ("CADRE_PLAYBOOKS_DIR", pb.as_str()),
        ("CADRE_SHELL_ALLOW", allow.as_str()),
        ("CADRE_RETRY_DELAY_MS_BASE", "20"),
        ("CADRE_RETRY_DELAY_MS_MAX", "200"),
        ("CADRE_HOP_TIMEOUT_MS", "2000"),
    ];
    let js = async_nats::jetstream::new(client.clone());
    let mut node = CadreNode::start("crash", &dir.path().join("data"), &nats.url, &env)?;
    node.wait_ready(&client).await?;

    let waves = TASKS / 10;
    let mut published = 0;
    for kill in 0..KILLS {
        if kill % (KILLS / waves) == 0 && published < TASKS {
            for _ in 0..10 {
                let input = json!({"name": format!("client-{published}"), "body": body, "url": sink.url,
                    "root": roots, "script": allow, "record": record.display().to_string()});
                let msg = json!({"playbook": "crashy", "input": input, "idempotency_key": format!("crash-{published}")});
                js.publish("cadre.tasks.enqueue", msg.to_string().into())
                    .await?
                    .await?;
                published += 1;
            }
        }
        let delay = rng.random_range(20..400);
        tokio::time::sleep(Duration::from_millis(delay)).await; // the fault schedule, not a wait
        node.kill9();
        node.restart()?;
        node.wait_ready(&client).await?;
    }

    // Operator duty: an unsafe step caught mid-flight waits for a decision. Decide as an
    // operator would, from the effect's own evidence (its log line).
    let tasks = eventually(Duration::from_secs(120), "every task terminal", || async {
        let list = request(&client, "cadre.tasks.list", json!({"limit": 500}).to_string()).await.ok()?;
        let tasks = list["tasks"].as_array()?.clone();
        for t in tasks.iter().filter(|t| t["status"] == "awaiting_operator") {
            let id = t["task_id"].as_str()?;
            let ran = std::fs::read_to_string(&record).unwrap_or_default().lines().any(|l| l == id);
            let decision = if ran { "mark_done" } else { "retry" };
            let req = json!({"task_id": id, "step_id": "unsafe", "decision": decision, "by": "crash-test"});
            let _ = request(&client, "cadre.tasks.resolve", req.to_string()).await;
        }
        (tasks.len() == TASKS && tasks.iter().all(|t| chaos_tests::is_terminal(t["status"].as_str().unwrap_or(""))))
            .then_some(tasks)
    })
    .await;
    let tasks = match tasks {
        Ok(t) => t,
        Err(e) => {
            let list = request(
                &client,
                "cadre.tasks.list",
                json!({"limit": 500}).to_string(),
            )
            .await?;
            let stuck: Vec<String> = list["tasks"]
                .as_array()
                .map(|ts| {
                    ts.iter()
                        .filter(|t| !chaos_tests::is_terminal(t["status"].as_str().unwrap_or("")))
                        .map(|t| format!("{} {}", t["task_id"], t["status"]))
                        .collect()
                })
                .unwrap_or_default();
            let mut detail = String::new();
            for s in stuck.iter().take(3) {
                let id = s.split('"').nth(1).unwrap_or_default();
                let t = request(
                    &client,
                    "cadre.tasks.get",
                    json!({"task_id": id}).to_string(),
                )
                .await?;
                detail.push_str(&format!("{t:#}\n"));
            }
            anyhow::bail!(
                "seed {seed}: {e}; {} tasks listed, not terminal: {stuck:?}\n{detail}node log:\n{}",
                list["tasks"].as_array().map(Vec::len).unwrap_or(0),
                node.log_tail()
            );
        }
    };

    let unsafe_runs = chaos_tests::unsafe_runs(&record)?;
    let crm_keys: Vec<String> = sink
        .requests()
        .iter()
        .filter_map(|r| r.idempotency_key.clone())
        .collect();
    let mut names = std::collections::HashSet::new();
    for t in &tasks {
        let id = t["task_id"].as_str().unwrap_or_default();
        let task: Value = request(
            &client,
            "cadre.tasks.get",
            json!({"task_id": id}).to_string(),
        )
        .await?;
        assert_eq!(task["status"], "succeeded", "seed {seed}: {task:#}");
        assert!(
            names.insert(task["input"]["name"].to_string()),
            "seed {seed}: one task per idempotency key"
        );
        assert!(
            crm_keys.contains(&format!("{id}.crm")),
            "seed {seed}: sink never saw {id}.crm"
        );
        assert_eq!(
            unsafe_runs.get(id).copied(),
            Some(1),
            "seed {seed}: unsafe step of {id} ran {:?} times",
            unsafe_runs.get(id)
        );
        // Its timeline survived every kill: from intake to success, in order.
        let trace: Value = request(
            &client,
            "cadre.tasks.trace",
            json!({"task_id": id}).to_string(),
        )
        .await?;
        let actions: Vec<&str> = trace["entries"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter_map(|e| e["record"]["action"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            actions.first(),
            Some(&"accepted"),
            "seed {seed}: {id}: {actions:?}"
        );
        assert_eq!(
            actions.last(),
            Some(&"succeeded"),
            "seed {seed}: {id}: {actions:?}"
        );
        let seqs: Vec<u64> = trace["entries"]
            .as_array()
            .map(|e| e.iter().filter_map(|e| e["seq"].as_u64()).collect())
            .unwrap_or_default();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "seed {seed}: {id}: {seqs:?}"
        );
        let name = task["input"]["name"].as_str().unwrap_or_default();
        for f in ["a.txt", "b.txt"] {
            let text = std::fs::read_to_string(files.join(name).join(f))?;
            assert!(
                text == body,
                "seed {seed}: {name}/{f} is not whole ({} bytes)",
                text.len()
            );
        }
    }
    assert_eq!(names.len(), TASKS);
    // The audit chain holds across every SIGKILL: the writer resumes from the last link
    // committed, and nothing committed is lost or rewritten.
    let verify: Value = request(&client, "cadre.audit.crash.verify", "{}").await?;
    assert_eq!(verify["ok"], true, "seed {seed}: {verify:#}");
    let resolved = tasks.len();
    println!(
        "seed {seed}: {KILLS} kills, {resolved} tasks succeeded, {} CRM requests for {TASKS} keys",
        crm_keys.len()
    );
    Ok(())
}
