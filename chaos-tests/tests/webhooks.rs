//! Webhooks over real HTTP to the real binary: a signed delivery starts the playbook
//! with the body mapped into its input; a replayed delivery id returns the same task; a
//! bad or missing signature, a missing delivery id, an unknown hook, an oversized or
//! malformed body each get a clear 4xx and start nothing; a rotated secret takes effect
//! without a restart.

use std::time::Duration;

use chaos_tests::{CadreNode, NatsServer, metric, request, wait_task};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

const WITHIN: Duration = Duration::from_secs(30);

/// A delivery the edge must refuse: what it is, its headers, its body, the HTTP status
/// and a phrase of the error it answers.
type Refused<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u16, &'a str);

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// `POST path`; the status and the body as JSON (`Null` if not).
async fn post(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<(u16, Value)> {
    let (status, text) = chaos_tests::http_post(addr, path, headers, body).await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

async fn task_count(client: &async_nats::Client) -> anyhow::Result<usize> {
    let list = request(client, "cadre.tasks.list", r#"{"limit":500}"#).await?;
    Ok(list["tasks"].as_array().map(Vec::len).unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_deliveries_start_tasks_once_and_bad_ones_start_nothing() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("hook.key");
    let secret = "whsec-canary-41d8a1";
    std::fs::write(&key_file, format!("{secret}\n"))?;
    let playbook = format!(
        r#"
name = "payment"
[webhook]
name = "stripe-payment"
secret_file = "{}"
input = {{ client = "/data/customer", amount = "/data/amount", root = "/root" }}
[[steps]]
id = "ledger"
tool = "file.write"
params = {{ path = "{{{{input.root}}}}/paid-{{{{input.client}}}}.md", content = "{{{{input.amount}}}}" }}
verify = {{ file_contains = "1200" }}
"#,
        key_file.display()
    );
    let (files, playbooks) =
        chaos_tests::files_and_playbooks(dir.path(), &[("payment", &playbook)])?;
    let mut node = CadreNode::start(
        "n1",
        &dir.path().join("data"),
        &nats.url,
        &[
            ("CADRE_PLAYBOOKS_DIR", playbooks.as_str()),
            ("CADRE_FILE_ROOTS", files.as_str()),
            ("CADRE_WEBHOOK_BODY_BYTES_MAX", "1024"),
            ("CADRE_LOG_LEVEL", "info"),
        ],
    )?;
    node.wait_ready(&client).await?;
    let addr = node.metrics_addr().unwrap_or_default().to_string();
    let hook = "/hooks/stripe-payment";
    let body =
        serde_json::to_vec(&json!({"data": {"customer": "Acme", "amount": 1200}, "root": files}))?;

    // A good delivery: 202 with the task, which runs with the mapped input.
    let sig = sign(secret, &body);
    let (status, reply) = post(
        &addr,
        hook,
        &[("X-Cadre-Signature", &sig), ("X-Cadre-Delivery", "evt_1")],
        &body,
    )
    .await?;
    assert_eq!(status, 202, "{reply}");
    let task_id = reply["task_id"].as_str().unwrap_or_default().to_string();
    assert_eq!(reply["duplicate"], false);
    let task = wait_task(&client, &task_id, WITHIN, chaos_tests::is_terminal).await?;
    assert_eq!(task["status"], "succeeded", "{task}");
    assert_eq!(
        task["input"],
        json!({"client": "Acme", "amount": 1200, "root": files})
    );
    assert_eq!(
        std::fs::read_to_string(format!("{files}/paid-Acme.md"))?,
        "1200"
    );
    let trace = chaos_tests::trace_records(&client, &task_id).await?;
    assert!(
        trace.iter().any(|r| r["action"] == "accepted"
            && r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("webhook `stripe-payment` delivery evt_1"))),
        "{trace:?}"
    );

    // The same delivery again (the sender retried): the same task, nothing new.
    let (status, again) = post(
        &addr,
        hook,
        &[("X-Cadre-Signature", &sig), ("X-Cadre-Delivery", "evt_1")],
        &body,
    )
    .await?;
    assert_eq!(
        (status, again["task_id"].as_str()),
        (200, Some(task_id.as_str())),
        "{again}"
    );
    assert_eq!(again["duplicate"], true);
    let tasks = task_count(&client).await?;

    // Refused, each with its reason, and nothing starts.
    let forged = sign("not-the-secret", &body);
    let cases: Vec<Refused<'_>> = vec![
        (
            "forged",
            vec![
                ("X-Cadre-Signature", forged.as_str()),
                ("X-Cadre-Delivery", "evt_2"),
            ],
            body.clone(),
            401,
            "does not match",
        ),
        (
            "unsigned",
            vec![("X-Cadre-Delivery", "evt_3")],
            body.clone(),
            401,
            "missing",
        ),
        (
            "no delivery id",
            vec![("X-Cadre-Signature", sig.as_str())],
            body.clone(),
            400,
            "delivery id",
        ),
        (
            "tampered",
            vec![
                ("X-Cadre-Signature", sig.as_str()),
                ("X-Cadre-Delivery", "evt_4"),
            ],
            body.iter()
                .map(|b| if *b == b'2' { b'9' } else { *b })
                .collect(),
            401,
            "does not match",
        ),
    ];
    for (what, headers, body, want, says) in cases {
        let (status, reply) = post(&addr, hook, &headers, &body).await?;
        assert_eq!(status, want, "{what}: {reply}");
        assert!(
            reply["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(says)),
            "{what}: {reply}"
        );
    }
    let not_json = b"{not json".to_vec();
    let (status, reply) = post(
        &addr,
        hook,
        &[
            ("X-Cadre-Signature", &sign(secret, &not_json)),
            ("X-Cadre-Delivery", "evt_5"),
        ],
        &not_json,
    )
    .await?;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (400, Some("bad_json")),
        "{reply}"
    );
    let unmapped = serde_json::to_vec(&json!({"data": {"customer": "Acme"}, "root": files}))?;
    let (status, reply) = post(
        &addr,
        hook,
        &[
            ("X-Cadre-Signature", &sign(secret, &unmapped)),
            ("X-Cadre-Delivery", "evt_6"),
        ],
        &unmapped,
    )
    .await?;
    assert_eq!(status, 422, "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("/data/amount")),
        "{reply}"
    );
    let big = serde_json::to_vec(
        &json!({"data": {"customer": "x".repeat(1500), "amount": 1}, "root": files}),
    )?;
    let (status, reply) = post(
        &addr,
        hook,
        &[
            ("X-Cadre-Signature", &sign(secret, &big)),
            ("X-Cadre-Delivery", "evt_7"),
        ],
        &big,
    )
    .await?;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{reply}"
    );
    let (status, reply) = post(
        &addr,
        "/hooks/nope",
        &[("X-Cadre-Signature", &sig), ("X-Cadre-Delivery", "evt_8")],
        &body,
    )
    .await?;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{reply}"
    );
    assert_eq!(
        task_count(&client).await?,
        tasks,
        "a refused delivery started a task"
    );

    // Rotation: the file is replaced; the next delivery is checked against the new key.
    let rotated = "whsec-rotated-9c2e77";
    std::fs::write(&key_file, rotated)?;
    let body2 = serde_json::to_vec(
        &json!({"data": {"customer": "Globex", "amount": 1200}, "root": files}),
    )?;
    let (status, _) = post(
        &addr,
        hook,
        &[
            ("X-Cadre-Signature", &sign(secret, &body2)),
            ("X-Cadre-Delivery", "evt_9"),
        ],
        &body2,
    )
    .await?;
    assert_eq!(status, 401, "the old secret still opens the hook");
    let (status, reply) = post(
        &addr,
        hook,
        &[
            ("X-Cadre-Signature", &sign(rotated, &body2)),
            ("X-Cadre-Delivery", "evt_9"),
        ],
        &body2,
    )
    .await?;
    assert_eq!(status, 202, "{reply}");

    let metrics = node.metrics().await?;
    assert_eq!(
        metric(
            &metrics,
            r#"cadre_webhooks_total{hook="stripe-payment",outcome="bad_signature"}"#
        ),
        4.0
    );
    assert_eq!(
        metric(
            &metrics,
            r#"cadre_webhooks_total{hook="unknown",outcome="refused"}"#
        ),
        1.0
    );
    let log = std::fs::read_to_string(node.data_dir.join("n1.log"))?;
    for s in [secret, rotated] {
        assert!(
            !log.contains(s) && !metrics.contains(s),
            "a webhook secret leaked"
        );
    }
    Ok(())
}
