//! The operator console, end to end: the real `cadre` binary serving it, a real
//! nats-server, a real HTTP sink, and a real browser (headless Chromium over WebDriver)
//! at a phone's size. What the operator clicks must reach the same subjects as the CLI
//! and show up in the page live, without a reload.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use chaos_tests::{
    Browser, CadreNode, HttpSink, NatsServer, eventually, http_exchange, request, wait_task,
};
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(30);
const PASSWORD: &str = "correct horse battery staple";
const OPERATOR: &str = "ana";
/// A value that must never reach the page: it travels in a param the policies'
/// redaction masks (`API_TOKEN`).
const CANARY: &str = "canary-7f3a9c1e";

/// A shell step, which the built-in policies hold for an operator's approval; its marker
/// file shows it ran. Its token is a secret-looking param.
const DEPLOY: &str = r#"
name = "deploy"
description = "Ship the site"
[[steps]]
id = "ship"
tool = "shell.run"
params = { program = "touch", args = ["{{input.root}}/shipped-{{task.id}}"], env = { API_TOKEN = "{{input.token}}" } }
verify = { exit_code = 0 }
"#;

/// One HTTP call to a loopback host: allowed unattended by the built-in policies.
const PING: &str = r#"
name = "ping"
[[steps]]
id = "ping"
tool = "http.request"
params = { method = "POST", url = "{{input.url}}/ping/{{task.id}}" }
verify = { status_in = [201] }
"#;

/// A long shell step (held for approval, like every shell step): the kill switch cuts
/// it off mid-run, so whether it did its work is unknown.
const LONG: &str = r#"
name = "long"
[[steps]]
id = "migrate"
tool = "shell.run"
params = { program = "sleep", args = ["41.5"] }
verify = { exit_code = 0 }
"#;

struct World {
    nats: NatsServer,
    client: async_nats::Client,
    sink: HttpSink,
    dir: tempfile::TempDir,
    files: String,
    node: CadreNode,
    console: String,
}

/// `cadre console hash-password`, the way an operator makes the hash.
fn password_hash() -> anyhow::Result<String> {
    use std::io::Write;
    let mut child = std::process::Command::new(chaos_tests::cadre_bin()?)
        .args(["console", "hash-password"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(format!("{PASSWORD}\n").as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "hash-password failed");
    let hash = String::from_utf8(out.stdout)?.trim().to_string();
    anyhow::ensure!(hash.starts_with("$argon2id$"), "{hash}");
    Ok(hash)
}

async fn world() -> anyhow::Result<World> {
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let sink = HttpSink::start().await?;
    let dir = tempfile::tempdir()?;
    let (files, playbooks) = chaos_tests::files_and_playbooks(
        dir.path(),
        &[("deploy", DEPLOY), ("ping", PING), ("long", LONG)],
    )?;
    let console = format!("127.0.0.1:{}", chaos_tests::free_port()?);
    let hash = password_hash()?;
    let env = [
        ("CADRE_PLAYBOOKS_DIR", playbooks.as_str()),
        ("CADRE_FILE_ROOTS", files.as_str()),
        ("CADRE_SHELL_ALLOW", "touch,sleep"),
        // The built-in policies: shell.run waits for an approval.
        ("CADRE_POLICIES_DIR", ""),
        ("CADRE_CONSOLE_ADDR", console.as_str()),
        ("CADRE_CONSOLE_PASSWORD_HASH", hash.as_str()),
        ("CADRE_CONSOLE_OPERATOR", OPERATOR),
    ];
    let mut node = CadreNode::start("n1", &dir.path().join("n1"), &nats.url, &env)?;
    node.wait_ready(&client).await?;
    Ok(World {
        nats,
        client,
        sink,
        dir,
        files,
        node,
        console,
    })
}

impl World {
    async fn submit(&self, playbook: &str, input: Value) -> anyhow::Result<String> {
        let body = json!({"playbook": playbook, "input": input});
        let reply = request(&self.client, "cadre.tasks.submit", body.to_string()).await?;
        reply["task_id"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no task id: {reply}"))
    }

    async fn deploy(&self) -> anyhow::Result<String> {
        self.submit("deploy", json!({"root": self.files, "token": CANARY}))
            .await
    }

    fn shipped(&self, task_id: &str) -> bool {
        Path::new(&self.files)
            .join(format!("shipped-{task_id}"))
            .exists()
    }

    async fn killswitch(&self) -> anyhow::Result<Value> {
        request(&self.client, "cadre.control.killswitch", "{}").await
    }

    async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        Ok(chaos_tests::metric(&self.node.metrics().await?, name))
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.console)
    }
}

/// Throws the kill switch from the Control tab, through its confirmation.
async fn flip_killswitch(b: &Browser, engage: bool, reason: &str) -> anyhow::Result<String> {
    b.click("button[data-tab='control']").await?;
    let label = if engage {
        "Engage kill switch"
    } else {
        "Release kill switch"
    };
    b.wait_text("#killswitch-toggle", WITHIN, |t| t == label)
        .await?;
    b.type_into("#killswitch-reason", reason).await?;
    b.click("#killswitch-toggle").await?;
    b.wait_visible("#confirm-yes", WITHIN).await?;
    b.click("#confirm-yes").await?;
    let shown = if engage { "ENGAGED" } else { "Off" };
    b.wait_text("#killswitch-state", WITHIN, |t| t.starts_with(shown))
        .await
}

/// Approves the pending approval of `task_id` in the inbox.
async fn approve_in_page(b: &Browser, task_id: &str) -> anyhow::Result<()> {
    b.click("button[data-tab='inbox']").await?;
    let card = format!("article.approval[data-task-id='{task_id}']");
    b.wait_visible(&card, WITHIN).await?;
    b.click(&format!("{card} .approve")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_approves_denies_and_stops_dispatch_from_a_phone_and_sees_it_live()
-> anyhow::Result<()> {
    let w = world().await?;
    let browser = Browser::start(412, 915).await?;
    let b = &browser;

    // The page asks for the password first; a wrong one is refused in the page.
    b.goto(&w.url("/console/")).await?;
    b.wait_visible("#login-form", WITHIN).await?;
    b.type_into("#password", "not the password").await?;
    b.click("#login-button").await?;
    b.wait_text("#login-error", WITHIN, |t| t.contains("wrong password"))
        .await?;
    let app = b.client.find(fantoccini::Locator::Css("#app")).await?;
    assert!(
        !app.is_displayed().await?,
        "the console stays closed after a wrong password"
    );
    b.type_into("#password", PASSWORD).await?;
    b.click("#login-button").await?;
    let who = b.wait_visible("#node", WITHIN).await?;
    assert!(who.contains("n1") && who.contains("ana@console"), "{who}");
    b.wait_text("#live", WITHIN, |t| t == "live").await?;

    // A step waits for approval: its card appears without a reload, with what, why,
    // where and the params, the token masked.
    let approve_me = w.deploy().await?;
    let card = format!("article.approval[data-task-id='{approve_me}']");
    let text = b.wait_visible(&card, WITHIN).await?;
    for expected in [
        "shell.run",
        "deploy / ship",
        "shell.run needs an operator's approval",
        "touch",
        "API_TOKEN",
        "[redacted]",
        &approve_me,
    ] {
        assert!(
            text.contains(expected),
            "the card shows {expected:?}: {text}"
        );
    }
    assert!(!text.contains(CANARY), "the token is masked: {text}");
    assert!(
        !b.source().await?.contains(CANARY),
        "the token is nowhere in the page"
    );
    let shot = std::env::temp_dir().join("cadre-console-inbox.png");
    std::fs::write(&shot, b.screenshot().await?)?;
    println!("screenshot: {}", shot.display());
    b.wait_text("#inbox-count", WITHIN, |t| t == "1").await?;

    // Approve with a note: the task runs and the page shows it succeed, live.
    b.type_into(&format!("{card} .note"), "ship it, checked the diff")
        .await?;
    let clicked = std::time::Instant::now();
    b.click(&format!("{card} .approve")).await?;
    let decided = format!("[data-decided-approval][data-task-id='{approve_me}']");
    b.wait_text(&format!("{decided} .task-status"), WITHIN, |t| {
        t == "succeeded"
    })
    .await?;
    println!(
        "approve clicked → `succeeded` shown in the page: {} ms",
        clicked.elapsed().as_millis()
    );
    b.wait_text("#inbox-count", WITHIN, |t| t == "0").await?;
    assert!(w.shipped(&approve_me), "the approved step ran");
    // Through the same subject as the CLI: the node recorded who and why.
    let task = request(
        &w.client,
        "cadre.tasks.get",
        json!({"task_id": approve_me}).to_string(),
    )
    .await?;
    let approval = &task["steps"][0]["approval"];
    assert_eq!(approval["state"], "approved", "{task:#}");
    assert_eq!(approval["decided_by"], "ana@console", "{task:#}");
    assert_eq!(approval["note"], "ship it, checked the diff", "{task:#}");

    // Deny: the task fails, the step never runs, and the page says so.
    let deny_me = w.deploy().await?;
    let card = format!("article.approval[data-task-id='{deny_me}']");
    b.wait_visible(&card, WITHIN).await?;
    b.type_into(&format!("{card} .note"), "not today").await?;
    b.click(&format!("{card} .deny")).await?;
    let decided = format!("[data-decided-approval][data-task-id='{deny_me}']");
    b.wait_text(&format!("{decided} .task-status"), WITHIN, |t| {
        t == "failed"
    })
    .await?;
    let task = wait_task(&w.client, &deny_me, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(task["status"], "failed", "{task:#}");
    assert_eq!(task["steps"][0]["approval"]["state"], "denied", "{task:#}");
    assert!(!w.shipped(&deny_me), "a denied step never runs");

    // The kill switch, with its confirmation: dispatch stops on the node.
    b.click("button[data-tab='control']").await?;
    b.wait_text("#killswitch-toggle", WITHIN, |t| t == "Engage kill switch")
        .await?;
    b.click("#killswitch-toggle").await?;
    b.wait_text("#confirm-text", WITHIN, |t| {
        t.contains("Engage the kill switch")
    })
    .await?;
    // Cancelling the confirmation changes nothing.
    b.click("#confirm-no").await?;
    b.wait_text("#killswitch-toggle", WITHIN, |t| t == "Engage kill switch")
        .await?;
    assert_eq!(w.killswitch().await?["engaged"], false);
    let state = flip_killswitch(b, true, "drill from the phone").await?;
    assert!(
        state.contains("ana@console") && state.contains("drill from the phone"),
        "{state}"
    );
    b.wait_visible("#banner", WITHIN).await?;
    let ks = w.killswitch().await?;
    assert_eq!(ks["engaged"], true, "{ks}");
    assert_eq!(ks["by"], "ana@console", "{ks}");

    let held = w.submit("ping", json!({"url": w.sink.url})).await?;
    eventually(WITHIN, "the ping task held by the kill switch", || async {
        (w.metric("cadre_tasks_held").await.ok()? >= 1.0).then_some(())
    })
    .await?;
    let reached = |id: &str| {
        w.sink
            .requests()
            .iter()
            .filter(|r| r.path.contains(id))
            .count()
    };
    assert_eq!(reached(&held), 0, "a held step is not dispatched");
    b.click("button[data-tab='tasks']").await?;
    let row = format!("li.task[data-task-id='{held}'] .status");
    b.wait_text(&row, WITHIN, |t| t == "running").await?;

    // Released from the page: the held step goes out once, and the row turns green live.
    flip_killswitch(b, false, "drill over").await?;
    b.click("button[data-tab='tasks']").await?;
    b.wait_text(&row, WITHIN, |t| t == "succeeded").await?;
    assert_eq!(
        reached(&held),
        1,
        "the held step ran once, after the release"
    );

    // Its timeline, from the audit records (`cadre task trace`).
    b.click(&format!("li.task[data-task-id='{held}'] .open"))
        .await?;
    let timeline = b
        .wait_text("#detail-timeline", WITHIN, |t| t.contains("step_executed"))
        .await?;
    assert!(timeline.contains("succeeded"), "{timeline}");

    // An unknown outcome, resolved from the task's page: a long shell step, approved
    // here, is cut off by the kill switch mid-run.
    let cut = w.submit("long", json!({})).await?;
    approve_in_page(b, &cut).await?;
    eventually(WITHIN, "the long step running", || async {
        chaos_tests::process_running(&["sleep", "41.5"]).then_some(())
    })
    .await?;
    flip_killswitch(b, true, "stop the migration").await?;
    let t = wait_task(&w.client, &cut, WITHIN, |s| s == "awaiting_operator").await?;
    assert_eq!(t["steps"][0]["status"], "outcome_unknown", "{t:#}");
    flip_killswitch(b, false, "resume").await?;
    b.click("button[data-tab='tasks']").await?;
    b.click(&format!("li.task[data-task-id='{cut}'] .open"))
        .await?;
    let step = "#detail-steps .step[data-step-id='migrate']";
    b.wait_text(step, WITHIN, |t| t.contains("outcome_unknown"))
        .await?;
    b.click(&format!("{step} .resolve-abort")).await?;
    b.wait_text("#confirm-text", WITHIN, |t| t.contains("Abort the task"))
        .await?;
    b.click("#confirm-yes").await?;
    b.wait_text("#detail-status", WITHIN, |t| t == "failed")
        .await?;
    let timeline = b
        .wait_text("#detail-timeline", WITHIN, |t| t.contains("by ana@console"))
        .await?;
    assert!(timeline.contains("abort"), "{timeline}");
    let t = wait_task(&w.client, &cut, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(t["status"], "failed", "{t:#}");

    // Nodes and budgets are shown.
    b.click("button[data-tab='control']").await?;
    b.wait_text("#nodes .node[data-node-id='n1']", WITHIN, |t| {
        t.contains("n1")
    })
    .await?;
    b.wait_text("#budgets .budget[data-node-id='n1']", WITHIN, |t| {
        t.contains("n1")
    })
    .await?;

    let shot = std::env::temp_dir().join("cadre-console-phone.png");
    std::fs::write(&shot, b.screenshot().await?)?;
    println!("screenshot: {}", shot.display());
    browser.close().await?;
    drop(w.dir);
    drop(w.nats);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_forged_posts_and_password_guessing_are_refused_and_change_nothing()
-> anyhow::Result<()> {
    let w = world().await?;
    let addr = w.console.as_str();
    let post = |path: &'static str, headers: Vec<(&'static str, String)>, body: &'static str| {
        let headers = headers.clone();
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            http_exchange(addr, "POST", path, &h, body.as_bytes()).await
        }
    };
    let code = |body: &str| -> String {
        serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("(not an error body: {body})"))
    };
    let engage = r#"{"engaged": true, "reason": "forged"}"#;

    // No session: every read and write is refused with a structured error.
    for path in [
        "/console/api/approvals",
        "/console/api/tasks",
        "/console/api/events",
    ] {
        let r = http_exchange(addr, "GET", path, &[], b"").await?;
        assert_eq!(r.status, 401, "{path}: {}", r.body);
        assert_eq!(code(&r.body), "unauthenticated", "{path}");
    }
    let r = post("/console/api/killswitch", vec![], engage).await?;
    assert_eq!((r.status, code(&r.body)), (401, "unauthenticated".into()));

    // The page itself is public, and locked down.
    let page = http_exchange(addr, "GET", "/console/", &[], b"").await?;
    assert_eq!(page.status, 200);
    let csp = page.header("content-security-policy").unwrap_or_default();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    // Not on the metrics port.
    let metrics_addr = w.node.metrics_addr().context("metrics addr")?.to_string();
    let (status, _) = chaos_tests::http_get(&metrics_addr, "/console/").await?;
    assert_eq!(status, 404, "the console is only on console_addr");

    // Logins: from another site, refused; a wrong password, refused.
    let r = post(
        "/console/api/login",
        vec![("Origin", "https://evil.example".into())],
        r#"{"password": "correct horse battery staple"}"#,
    )
    .await?;
    assert_eq!((r.status, code(&r.body)), (403, "forbidden".into()));
    let r = post("/console/api/login", vec![], r#"{"password": "guess"}"#).await?;
    assert_eq!((r.status, code(&r.body)), (401, "unauthenticated".into()));
    let r = post("/console/api/login", vec![], r#"{"password": 12"#).await?;
    assert_eq!((r.status, code(&r.body)), (400, "bad_json".into()));

    let r = post(
        "/console/api/login",
        vec![("Origin", format!("http://{addr}"))],
        r#"{"password": "correct horse battery staple"}"#,
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let set_cookie = r
        .header("set-cookie")
        .context("a session cookie")?
        .to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    let cookie = set_cookie
        .split(';')
        .next()
        .context("cookie pair")?
        .to_string();
    let session: Value = serde_json::from_str(&r.body)?;
    let csrf = session["csrf"].as_str().context("csrf")?.to_string();

    // A session alone is not enough to change anything: the page's token is needed,
    // from the page's origin.
    let r = post(
        "/console/api/killswitch",
        vec![("Cookie", cookie.clone())],
        engage,
    )
    .await?;
    assert_eq!(
        (r.status, code(&r.body)),
        (403, "forbidden".into()),
        "no token"
    );
    let r = post(
        "/console/api/killswitch",
        vec![
            ("Cookie", cookie.clone()),
            ("X-Cadre-Csrf", csrf.clone()),
            ("Origin", "https://evil.example".into()),
        ],
        engage,
    )
    .await?;
    assert_eq!(
        (r.status, code(&r.body)),
        (403, "forbidden".into()),
        "cross-site"
    );
    let r = post(
        "/console/api/killswitch",
        vec![("Cookie", cookie.clone()), ("X-Cadre-Csrf", "0".repeat(64))],
        engage,
    )
    .await?;
    assert_eq!(
        (r.status, code(&r.body)),
        (403, "forbidden".into()),
        "wrong token"
    );
    // Bad bodies get their error; nothing changed.
    let with_session = || {
        vec![
            ("Cookie", cookie.clone()),
            ("X-Cadre-Csrf", csrf.clone()),
            ("Origin", format!("http://{addr}")),
        ]
    };
    let r = post("/console/api/killswitch", with_session(), "{not json").await?;
    assert_eq!((r.status, code(&r.body)), (400, "bad_json".into()));
    let r = post(
        "/console/api/killswitch",
        with_session(),
        r#"{"engaged": true, "sneaky": 1}"#,
    )
    .await?;
    assert_eq!((r.status, code(&r.body)), (400, "invalid_request".into()));
    let r = post(
        "/console/api/approvals/decide",
        with_session(),
        r#"{"approval_id": "01J0000000000000000000000A-a1", "decision": "approve"}"#,
    )
    .await?;
    assert_eq!(
        (r.status, code(&r.body)),
        (404, "not_found".into()),
        "{}",
        r.body
    );
    assert_eq!(
        w.killswitch().await?["engaged"],
        false,
        "no refused request engaged it"
    );

    // With everything in order, the same request works (and is recorded as the operator).
    let r = post(
        "/console/api/killswitch",
        with_session(),
        r#"{"engaged": false, "reason": "check"}"#,
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let ks: Value = serde_json::from_str(&r.body)?;
    assert_eq!(ks["by"], "ana@console", "{ks}");

    // Guessing the password: after five failures even the right one waits.
    for _ in 0..4 {
        let r = post("/console/api/login", vec![], r#"{"password": "guess"}"#).await?;
        assert_eq!(r.status, 401);
    }
    let r = post(
        "/console/api/login",
        vec![],
        r#"{"password": "correct horse battery staple"}"#,
    )
    .await?;
    assert_eq!((r.status, code(&r.body)), (429, "rate_limited".into()));
    assert!(r.header("retry-after").is_some());

    // Logging out ends the session.
    let r = post("/console/api/logout", with_session(), "{}").await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http_exchange(
        addr,
        "GET",
        "/console/api/approvals",
        &[("Cookie", &cookie)],
        b"",
    )
    .await?;
    assert_eq!(r.status, 401);
    Ok(())
}
