//! LLM planning and LLM steps, end to end: the real `cadre` binary against a real
//! OpenAI-compatible HTTP server the test starts (`chaos_tests::LlmServer`), which speaks
//! the wire format (`choices`, `usage`, structured output, errors, 429 with
//! `Retry-After`) and answers with what the test queues.
//!
//! One node, in phases: a free-text goal planned through a 429 storm, its first draft
//! refused (a missing dependency and a step the policies deny) and repaired, run with an
//! `llm.generate` step judged by the LLM judge, and its cost recorded from token usage
//! × the price table; a plan that cannot be repaired failing cleanly; a playbook's goal
//! template planned with the playbook's own model routing, its LLM steps held to the
//! provider's concurrency cap. The API key is a canary that must appear nowhere.

use std::time::Duration;

use chaos_tests::{CadreNode, LlmServer, NatsServer, metric_sum, request, wait_task};
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(60);
const CANARY_KEY: &str = "sk-test-canary-7f3a9c";

/// What the test server bills for a call, in millionths of a dollar, the way it counts
/// tokens (characters / 4 + 1) at `price` (input, output dollars per million tokens).
fn billed(prompt: &[(String, String)], reply: &str, price: (u64, u64)) -> u64 {
    let chars: usize = prompt.iter().map(|(_, c)| c.chars().count()).sum();
    let p = (chars / 4 + 1) as u64;
    let c = (reply.chars().count() / 4 + 1) as u64;
    p * price.0 + c * price.1
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goals_are_planned_repaired_judged_and_costed() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let llm = LlmServer::start_with_key(CANARY_KEY).await?;
    let dir = tempfile::tempdir()?;
    let welcome_goal = r#"
name = "welcome-goal"
description = "Welcome a client: the LLM fills in the steps"
goal = "Welcome {{input.client}} with three short notes"
[llm]
planner_model = "plan-small"
executor_model = "small"
tools = ["llm.generate"]
"#;
    let burn = r#"
name = "burn"
goal = "Write {{input.n}} notes"
[llm]
tools = ["llm.generate"]
"#;
    let (files, playbooks) = chaos_tests::files_and_playbooks(
        dir.path(),
        &[("welcome-goal", welcome_goal), ("burn", burn)],
    )?;
    let mut node = CadreNode::start(
        "n1",
        &dir.path().join("data"),
        &nats.url,
        &[
            ("CADRE_PLAYBOOKS_DIR", playbooks.as_str()),
            ("CADRE_FILE_ROOTS", files.as_str()),
            // The built-in policies: file.write outside the roots is denied.
            ("CADRE_POLICIES_DIR", ""),
            ("CADRE_LOG_LEVEL", "info"),
            ("CADRE_LLM_BASE_URL", llm.url.as_str()),
            ("CADRE_LLM_API_KEY", CANARY_KEY),
            ("CADRE_LLM_MODEL", "base-model"),
            ("CADRE_LLM_PLANNER_MODEL", "big-model"),
            (
                "CADRE_LLM_PRICES",
                "big-model=10/30,base-model=1/2,plan-small=2/4,small=3/5",
            ),
            ("CADRE_LLM_CONCURRENCY_MAX", "2"),
            ("CADRE_BUDGET_PLAYBOOK_DAY_USD", "burn=0.002"),
            ("CADRE_LLM_RETRY_DELAY_MS_BASE", "50"),
            ("CADRE_LLM_RETRY_DELAY_MS_MAX", "5000"),
        ],
    )?;
    node.wait_ready(&client).await?;

    // --- A goal in plain words, through a 429 storm and one repair ------------------
    llm.fail_next(3, 429, Some("1"));
    let save_path = format!("{files}/acme/welcome.md");
    let first_draft = json!({"steps": [
        {"id": "draft", "tool": "llm.generate",
         "params": {"prompt": "Write a warm welcome note for {{input.client}}"},
         "verify": {"llm_judge": {"rubric": "Warm, and names the client", "threshold": 0.8}}},
        // Reads the draft without depending on it.
        {"id": "save", "tool": "file.write",
         "params": {"path": save_path, "content": "{{steps.draft.output.text}}"},
         "verify": {"file_exists": true}},
        {"id": "subject", "tool": "llm.generate",
         "params": {"prompt": "A subject line for {{input.client}}"},
         "verify": {"output_contains": "Draft:"}},
    ]});
    let second_draft = json!({"steps": [
        {"id": "draft", "tool": "llm.generate",
         "params": {"prompt": "Write a warm welcome note for {{input.client}}"},
         "verify": {"llm_judge": {"rubric": "Warm, and names the client", "threshold": 0.8}}},
        // Writes where the policies forbid (outside the file roots).
        {"id": "save", "tool": "file.write", "depends_on": ["draft"],
         "params": {"path": "/etc/cadre-welcome.md", "content": "{{steps.draft.output.text}}"},
         "verify": {"file_exists": true}},
        {"id": "subject", "tool": "llm.generate",
         "params": {"prompt": "A subject line for {{input.client}}"},
         "verify": {"output_contains": "Draft:"}},
    ]});
    let third_draft = json!({"steps": [
        {"id": "draft", "tool": "llm.generate",
         "params": {"prompt": "Write a warm welcome note for {{input.client}}"},
         "verify": {"llm_judge": {"rubric": "Warm, and names the client", "threshold": 0.8}}},
        {"id": "save", "tool": "file.write", "depends_on": ["draft"],
         "params": {"path": save_path, "content": "{{steps.draft.output.text}}"},
         "verify": {"file_contains": "Acme Ltd"}},
        {"id": "subject", "tool": "llm.generate",
         "params": {"prompt": "A subject line for {{input.client}}"},
         "verify": {"output_contains": "Draft:"}},
    ]});
    llm.push_json("cadre_plan", first_draft.clone());
    llm.push_json("cadre_plan", second_draft.clone());
    llm.push_json("cadre_plan", third_draft.clone());
    let verdict = json!({"score": 0.9, "reasoning": "Warm, and names Acme Ltd."});
    llm.push_json("cadre_judge", verdict.clone());
    let submitted = request(
        &client,
        "cadre.tasks.submit",
        json!({"goal": "Welcome our new client Acme Ltd", "input": {"client": "Acme Ltd"}})
            .to_string(),
    )
    .await?;
    let task_id = submitted["task_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!task_id.is_empty(), "{submitted}");
    let task = wait_task(&client, &task_id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(task["status"], "succeeded", "{task}\n{}", node.log_tail());
    assert_eq!(task["playbook"], "goal");
    assert_eq!(task["goal"], "Welcome our new client Acme Ltd");

    // The storm: three 429s, each waited out for its Retry-After (1 s), then served.
    let calls = llm.calls();
    let statuses: Vec<u16> = calls.iter().take(4).map(|c| c.status).collect();
    assert_eq!(statuses, [429, 429, 429, 200]);
    let waited = calls[3].at - calls[0].at;
    assert!(
        waited >= Duration::from_millis(2900),
        "Retry-After was not honoured: {waited:?}"
    );
    // Two repairs: each draft after the first was asked for with the errors of the
    // one before (the checks of a playbook, then the policies' pre-check).
    let planning = &task["planning"];
    assert_eq!(planning["drafts"], 3, "{planning}");
    let refused = planning["refused"].to_string();
    assert!(
        refused.contains("reads step `draft`, which must be in depends_on"),
        "{refused}"
    );
    assert!(
        refused.contains(
            "step `save` (file.write): the policies deny it: file.write outside the configured file roots"
        ),
        "{refused}"
    );
    let planner_calls: Vec<_> = calls
        .iter()
        .filter(|c| c.schema_name.as_deref() == Some("cadre_plan"))
        .collect();
    assert!(planner_calls.iter().all(|c| c.model == "big-model"));
    let repair = &planner_calls.last().expect("planner calls").messages;
    assert!(
        repair
            .last()
            .is_some_and(|(role, text)| role == "user" && text.contains("That plan cannot run")),
        "{repair:?}"
    );
    // The draft was sent with the tool catalog's schema, and the prompt with the goal.
    let schema = planner_calls[0].schema.clone().unwrap_or_default();
    assert_eq!(schema["properties"]["steps"]["maxItems"], 7, "{schema}");
    assert!(
        planner_calls[0].messages[1]
            .1
            .contains("Welcome our new client Acme Ltd"),
        "{:?}",
        planner_calls[0].messages
    );

    // The steps ran as planned: the draft judged, the file written with its text.
    let step = |id: &str| -> Value {
        task["steps"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["id"] == id).cloned())
            .unwrap_or_default()
    };
    let judged = step("draft")["verdict"]["reasons"].to_string();
    assert!(
        judged.contains(
            "llm_judge score 0.90 (threshold 0.80, base-model): Warm, and names Acme Ltd."
        ),
        "{judged}"
    );
    let written = std::fs::read_to_string(&save_path)?;
    assert_eq!(
        written, "Draft: Write a warm welcome note for Acme Ltd",
        "the file holds the generated text"
    );
    assert_eq!(step("draft")["output"]["model"], "base-model");

    // Cost: every call's tokens × its model's price, on the task, the budget and the
    // metrics alike.
    let price = |model: &str| match model {
        "big-model" => (10, 30),
        "base-model" => (1, 2),
        _ => (0, 0),
    };
    let drafts = [
        first_draft.to_string(),
        second_draft.to_string(),
        third_draft.to_string(),
    ];
    let ok_planner: Vec<_> = planner_calls.iter().filter(|c| c.status == 200).collect();
    assert_eq!(ok_planner.len(), 3);
    let planning_micros: u64 = ok_planner
        .iter()
        .zip(&drafts)
        .map(|(c, reply)| billed(&c.messages, reply, price(&c.model)))
        .sum();
    assert!(
        close(
            planning["cost_usd"].as_f64().unwrap_or(-1.0),
            planning_micros as f64 / 1e6
        ),
        "planning cost {planning} (expected {planning_micros} µ$)"
    );
    let judge_call = calls
        .iter()
        .find(|c| c.schema_name.as_deref() == Some("cadre_judge"))
        .expect("a judge call");
    let draft_call = calls
        .iter()
        .find(|c| c.schema_name.is_none() && c.messages[0].1.contains("welcome note"))
        .expect("the draft's call");
    let draft_micros = billed(
        &draft_call.messages,
        "Draft: Write a warm welcome note for Acme Ltd",
        (1, 2),
    ) + billed(&judge_call.messages, &verdict.to_string(), (1, 2));
    assert!(
        close(
            step("draft")["cost_usd"].as_f64().unwrap_or(-1.0),
            draft_micros as f64 / 1e6
        ),
        "draft step cost {} (expected {draft_micros} µ$: generation and judging)",
        step("draft")["cost_usd"]
    );
    let steps_cost: f64 = task["steps"]
        .as_array()
        .map(|s| s.iter().filter_map(|s| s["cost_usd"].as_f64()).sum())
        .unwrap_or_default();
    let total = task["cost_usd"].as_f64().unwrap_or_default();
    assert!(
        close(
            total,
            planning["cost_usd"].as_f64().unwrap_or_default() + steps_cost
        ),
        "{task}"
    );
    let budget = request(&client, "cadre.budget.status", "{}").await?;
    assert!(
        close(
            budget["spent_today_usd"].as_f64().unwrap_or_default(),
            total
        ),
        "{budget} vs {total}"
    );
    let metrics = node.metrics().await?;
    assert!(
        close(metric_sum(&metrics, "cadre_llm_cost_usd_total"), total),
        "metrics disagree with the task's cost {total}"
    );
    assert!(metrics.contains(
        r#"cadre_llm_requests_total{model="big-model",outcome="retried",role="planner"} 3"#
    ));

    // --- A plan that cannot be repaired fails cleanly -------------------------------
    let too_short = json!({"steps": [
        {"id": "only", "tool": "llm.generate", "params": {"prompt": "hi"}, "verify": {"output_contains": "x"}},
    ]});
    for _ in 0..3 {
        llm.push_json("cadre_plan", too_short.clone());
    }
    let before = llm.calls().len();
    // Through the CLI this time: `cadre task submit --goal`.
    let (code, out, err) = chaos_tests::cadre_cli(
        &nats.url,
        &["task", "submit", "--goal", "Do something vague", "--json"],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    let submitted: Value = serde_json::from_str(&out)?;
    let failed_id = submitted["task_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let failed = wait_task(&client, &failed_id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(failed["status"], "failed", "{failed}");
    let reason = failed["failure"].as_str().unwrap_or_default();
    assert!(
        reason.contains("plan_invalid") || reason.contains("PlanInvalid"),
        "{reason}"
    );
    assert!(
        reason.contains("still invalid after 3 drafts")
            && reason.contains("$.steps: must have at least 3 items"),
        "{reason}"
    );
    assert_eq!(failed["planning"]["drafts"], 3);
    assert!(failed["steps"].as_array().is_some_and(Vec::is_empty));
    assert!(failed["cost_usd"].as_f64().unwrap_or_default() > 0.0);
    assert_eq!(
        llm.calls().len() - before,
        3,
        "one call per draft, nothing ran"
    );

    // --- A playbook's goal template, its own routing, a 429 storm on its LLM steps
    // held to the provider's concurrency cap ------------------------------------------
    llm.set_delay(Duration::from_millis(400));
    let notes: Vec<Value> = (1..=4)
        .map(|n| {
            json!({"id": format!("note{n}"), "tool": "llm.generate",
                   "params": {"prompt": format!("Note {n} for {{{{input.client}}}}")},
                   "verify": {"output_contains": "Draft: Note"}})
        })
        .collect();
    llm.push_json("cadre_plan", json!({ "steps": notes }));
    let calls_before = llm.calls().len();
    let submitted = request(
        &client,
        "cadre.tasks.submit",
        json!({"playbook": "welcome-goal", "input": {"client": "Globex"}}).to_string(),
    )
    .await?;
    let pb_id = submitted["task_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // The plan is decided when its request arrives and answered 400 ms later: the storm
    // is queued in between, so it falls on the steps' calls.
    chaos_tests::eventually(WITHIN, "the plan request", || async {
        llm.calls()
            .iter()
            .skip(calls_before)
            .any(|c| c.schema_name.is_some() && c.status == 200)
            .then_some(())
    })
    .await?;
    llm.fail_next(4, 429, Some("1"));
    llm.fail_next(2, 503, None);
    let done = wait_task(&client, &pb_id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", node.log_tail());
    assert_eq!(done["playbook"], "welcome-goal");
    let new_calls: Vec<_> = llm.calls().into_iter().skip(calls_before).collect();
    let planner = &new_calls[0];
    assert_eq!(
        planner.model, "plan-small",
        "the playbook routes its planner"
    );
    assert!(
        planner.messages[1]
            .1
            .contains("Welcome Globex with three short notes"),
        "the goal template is rendered: {:?}",
        planner.messages[1]
    );
    let tools = planner
        .schema
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default();
    assert!(
        tools.contains("llm.generate") && !tools.contains("file.write"),
        "the playbook's tools only: {tools}"
    );
    let generated: Vec<_> = new_calls
        .iter()
        .filter(|c| c.schema_name.is_none() && c.status == 200)
        .collect();
    assert_eq!(generated.len(), 4);
    let storm = |status: u16| new_calls.iter().filter(|c| c.status == status).count();
    assert_eq!(
        (storm(429), storm(503)),
        (4, 2),
        "the storm reached the steps' calls, which came through it"
    );
    assert!(
        generated.iter().all(|c| c.model == "small"),
        "executor routing"
    );
    assert_eq!(
        llm.max_in_flight(),
        2,
        "at most llm_concurrency_max calls at once"
    );

    // --- Budgets: planning is charged at once, an LLM step's estimate is held against
    // the cap before it runs, and a playbook over its cap is not planned at all -------
    llm.set_delay(Duration::ZERO);
    let notes: Vec<Value> = (1..=3)
        .map(|n| {
            json!({"id": format!("n{n}"), "tool": "llm.generate",
                   "params": {"prompt": format!("Note {n}")}, "verify": {"output_contains": "Note"}})
        })
        .collect();
    llm.push_json("cadre_plan", json!({ "steps": notes }));
    let submitted = request(
        &client,
        "cadre.tasks.submit",
        json!({"playbook": "burn", "input": {"n": 3}}).to_string(),
    )
    .await?;
    let burn_id = submitted["task_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let held = wait_task(&client, &burn_id, WITHIN, |s| {
        s == "awaiting_approval" || chaos_tests::is_terminal(s)
    })
    .await?;
    assert_eq!(held["status"], "awaiting_approval", "{held}");
    assert!(
        held["planning"]["cost_usd"].as_f64().unwrap_or_default() > 0.002,
        "planning alone crossed burn's cap: {}",
        held["planning"]
    );
    let reasons = held["steps"].to_string();
    assert!(
        reasons.contains("budget: this step")
            && reasons.contains("would cross burn's daily cap $0.0020"),
        "{reasons}"
    );
    let before = llm.calls().len();
    let submitted = request(
        &client,
        "cadre.tasks.submit",
        json!({"playbook": "burn", "input": {"n": 1}}).to_string(),
    )
    .await?;
    let refused_id = submitted["task_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let refused = wait_task(&client, &refused_id, WITHIN, chaos_tests::is_terminal).await?;
    let why = refused["failure"].as_str().unwrap_or_default();
    assert!(
        why.contains("OverBudget") && why.contains("the LLM planner was not asked"),
        "{refused}"
    );
    assert_eq!(
        llm.calls().len(),
        before,
        "no call for a playbook over its cap"
    );

    // --- The key went to the provider and nowhere else ------------------------------
    assert!(
        llm.calls()
            .iter()
            .all(|c| c.authorization.as_deref() == Some(&format!("Bearer {CANARY_KEY}")))
    );
    let trace = request(
        &client,
        "cadre.tasks.trace",
        json!({"task_id": task_id}).to_string(),
    )
    .await?;
    let metrics = node.metrics().await?;
    for (what, text) in [
        ("the log", node.log_tail()),
        ("the task", task.to_string()),
        ("the trace", trace.to_string()),
        ("the metrics", metrics),
    ] {
        assert!(!text.contains(CANARY_KEY), "the API key leaked into {what}");
    }
    let log = std::fs::read_to_string(node.data_dir.join("n1.log"))?;
    assert!(!log.contains(CANARY_KEY), "the API key leaked into the log");
    Ok(())
}
