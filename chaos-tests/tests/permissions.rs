//! The shipped NATS users (`ops/nats/cadre-users.conf`) on a real nats-server: a node
//! runs as `node`, an operator decides, an injector only hands work in.

use std::time::Duration;

use bytes::Bytes;
use chaos_tests::{CadreNode, NatsServer, cadre_cli, ops_dir, request, wait_task};
use serde_json::json;

const WITHIN: Duration = Duration::from_secs(30);

const NOTE: &str = r#"
name = "note"
[[steps]]
id = "write"
tool = "file.write"
params = { path = "{{input.root}}/{{task.id}}.txt", content = "hello" }
verify = { file_exists = true }
"#;

/// A shell step the built-in policies hold for an operator's approval.
const DEPLOY: &str = r#"
name = "deploy"
[[steps]]
id = "ship"
tool = "shell.run"
params = { program = "touch", args = ["{{input.root}}/shipped-{{task.id}}"] }
verify = { exit_code = 0 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injector_hands_work_in_but_cannot_decide_stop_or_call_an_executor() -> anyhow::Result<()>
{
    // Passwords only in the server's environment, as the shipped config expects.
    let (node_pw, operator_pw, injector_pw) = ("n-7c1f", "o-93ab", "i-51de");
    let nats = NatsServer::start_including(
        Some(&ops_dir().join("nats/cadre-users.conf")),
        &[
            ("CADRE_NATS_NODE_PASSWORD", node_pw),
            ("CADRE_NATS_OPERATOR_PASSWORD", operator_pw),
            ("CADRE_NATS_INJECTOR_PASSWORD", injector_pw),
        ],
    )?;
    assert!(
        async_nats::connect(&nats.url).await.is_err(),
        "no anonymous access"
    );
    let dir = tempfile::tempdir()?;
    let playbooks = dir.path().join("playbooks");
    std::fs::create_dir_all(&playbooks)?;
    std::fs::write(playbooks.join("note.toml"), NOTE)?;
    std::fs::write(playbooks.join("deploy.toml"), DEPLOY)?;
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files)?;
    let files = files.canonicalize()?.display().to_string();
    let pb = playbooks.display().to_string();
    let mut node = CadreNode::start(
        "n1",
        &dir.path().join("data"),
        &nats.url_as("node", node_pw),
        &[
            ("CADRE_PLAYBOOKS_DIR", &pb),
            ("CADRE_FILE_ROOTS", &files),
            ("CADRE_LOG_LEVEL", "info"),
            ("CADRE_SHELL_ALLOW", "touch"),
            // The built-in policies: shell.run needs an approval.
            ("CADRE_POLICIES_DIR", ""),
        ],
    )?;
    let operator = nats.client_as("operator", operator_pw).await?;
    node.wait_ready(&operator).await?;
    let injector = nats.client_as("injector", injector_pw).await?;

    // The injector hands work in and follows it.
    let reply = request(
        &injector,
        "cadre.tasks.submit",
        json!({"playbook": "note", "input": {"root": files}}).to_string(),
    )
    .await?;
    let task_id = reply["task_id"].as_str().unwrap_or_default().to_string();
    let task = wait_task(&injector, &task_id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(task["status"], "succeeded", "{task:#}");

    // A step waits for an approval the injector would like to give itself.
    let reply = request(
        &injector,
        "cadre.tasks.submit",
        json!({"playbook": "deploy", "input": {"root": files}}).to_string(),
    )
    .await?;
    let deploy_id = reply["task_id"].as_str().unwrap_or_default().to_string();
    let waiting = wait_task(&injector, &deploy_id, WITHIN, |s| {
        s == "awaiting_approval" || chaos_tests::is_terminal(s)
    })
    .await?;
    assert_eq!(waiting["status"], "awaiting_approval", "{waiting:#}");
    let approval_id = waiting["steps"][0]["approval"]["approval_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    // It cannot decide or stop anything, nor call an executor directly: the server
    // refuses the publish, so no node ever sees the request.
    let refused = [
        (
            "cadre.approvals.decide",
            json!({"approval_id": approval_id, "decision": "approve", "by": "mallory"}),
        ),
        ("cadre.approvals.list", json!({})),
        (
            "cadre.control.killswitch",
            json!({"engaged": true, "by": "mallory"}),
        ),
        ("cadre.tasks.cancel", json!({"task_id": task_id})),
        (
            "cadre.tasks.resolve",
            json!({"task_id": task_id, "step_id": "write", "decision": "abort"}),
        ),
    ];
    for (subject, body) in refused {
        let req = async_nats::Request::new()
            .payload(Bytes::from(body.to_string()))
            .timeout(Some(Duration::from_millis(500)));
        let answer = injector.send_request(subject, req).await;
        assert!(
            answer.is_err(),
            "{subject} answered an injector: {answer:?}"
        );
    }
    let raw = injector
        .send_request(
            "cadre.exec.shell.run",
            async_nats::Request::new()
                .payload(Bytes::from_static(b"\x00"))
                .timeout(Some(Duration::from_millis(500))),
        )
        .await;
    assert!(raw.is_err(), "an executor answered an injector");
    let url = nats.url_as("injector", injector_pw);
    let (code, out, err) = cadre_cli(&url, &["killswitch", "on", "--timeout-ms", "500"])?;
    assert_ne!(code, 0, "{out}{err}");
    let (code, out, err) = cadre_cli(
        &url,
        &[
            "approvals",
            "approve",
            &approval_id,
            "--by",
            "mallory",
            "--timeout-ms",
            "500",
        ],
    )?;
    assert_ne!(code, 0, "{out}{err}");
    let still = request(
        &injector,
        "cadre.tasks.get",
        json!({ "task_id": deploy_id }).to_string(),
    )
    .await?;
    assert_eq!(still["status"], "awaiting_approval", "{still:#}");
    assert!(
        !std::path::Path::new(&files)
            .join(format!("shipped-{deploy_id}"))
            .exists()
    );

    // The operator can, and the audit log shows only the operator's decision.
    let url = nats.url_as("operator", operator_pw);
    let (code, out, err) = cadre_cli(&url, &["killswitch", "status"])?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("off"),
        "the injector's attempt changed nothing: {out}"
    );
    let (code, out, err) = cadre_cli(
        &url,
        &["approvals", "approve", &approval_id, "--by", "olga"],
    )?;
    assert_eq!(code, 0, "{out}{err}");
    let shipped = wait_task(&operator, &deploy_id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(shipped["status"], "succeeded", "{shipped:#}");
    let (code, out, err) = cadre_cli(&url, &["killswitch", "on", "--by", "olga"])?;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cadre_cli(&url, &["killswitch", "off", "--by", "olga"])?;
    assert_eq!(code, 0, "{out}{err}");
    let (code, tail, err) = cadre_cli(&url, &["audit", "tail", "--node", "n1", "-n", "100"])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        tail.contains("operator:olga") && !tail.contains("mallory"),
        "{tail}"
    );
    let (code, out, err) = cadre_cli(&url, &["task", "get", &task_id])?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("succeeded"), "{out}");
    // The node's password never reached its log.
    let log = std::fs::read_to_string(dir.path().join("data/n1.log")).unwrap_or_default();
    assert!(
        !log.contains(node_pw),
        "the NATS password leaked into the log"
    );
    Ok(())
}
