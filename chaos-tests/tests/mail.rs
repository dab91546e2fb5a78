//! `email.send` against a real SMTP server started by the test (Python's `aiosmtpd`,
//! installed by ops/scripts/install-deps.sh): the mail arrives with a Message-ID derived
//! from the step's key, a task submitted twice with one idempotency key mails once, the
//! password comes from the node's secrets (a wrong one is refused by the server; rotated
//! back, mail flows again, no restart), and the password appears in no output.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chaos_tests::{CadreNode, NatsServer, free_port, request, wait_task};
use serde_json::json;

const WITHIN: Duration = Duration::from_secs(30);

/// The SMTP server; killed on drop.
struct SmtpSink {
    child: Child,
    port: u16,
}

impl SmtpSink {
    fn start(dir: &std::path::Path, user: &str, password: &str) -> anyhow::Result<SmtpSink> {
        SmtpSink::start_with(dir, user, password, &[])
    }

    /// `extra`: `--tls-cert`/`--tls-key` to require STARTTLS.
    fn start_with(
        dir: &std::path::Path,
        user: &str,
        password: &str,
        extra: &[&str],
    ) -> anyhow::Result<SmtpSink> {
        let port = free_port()?;
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/smtp_sink.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args([
                "--port",
                &port.to_string(),
                "--dir",
                &dir.display().to_string(),
            ])
            .args(["--user", user, "--password", password])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        anyhow::ensure!(
            line.starts_with("ready"),
            "smtp sink did not start: {line:?} (is aiosmtpd installed?)"
        );
        Ok(SmtpSink { child, port })
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mails(dir: &std::path::Path) -> Vec<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_is_sent_once_per_key_with_the_password_from_secrets() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(&inbox)?;
    let password = "smtp-pass-canary-8e2c";
    let smtp = SmtpSink::start(&inbox, "cadre", password)?;
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let welcome = r#"
name = "welcome-mail"
[[steps]]
id = "send"
tool = "email.send"
params = { to = "{{input.email}}", subject = "Welcome, {{input.client}}", text = "Hello {{input.client}},\n\nKickoff is on {{input.kickoff}}." }
verify = { json_path_equals = { path = "$.accepted", value = true } }
max_attempts = 1
"#;
    let (_, playbooks) =
        chaos_tests::files_and_playbooks(dir.path(), &[("welcome-mail", welcome)])?;
    let port = smtp.port.to_string();
    let mut node = CadreNode::start(
        "n1",
        &dir.path().join("data"),
        &nats.url,
        &[
            ("CADRE_PLAYBOOKS_DIR", playbooks.as_str()),
            ("CADRE_SMTP_HOST", "127.0.0.1"),
            ("CADRE_SMTP_PORT", port.as_str()),
            ("CADRE_SMTP_TLS", "none"),
            ("CADRE_SMTP_USER", "cadre"),
            ("CADRE_MAIL_FROM", "Ops <ops@cadre.test>"),
            ("CADRE_LOG_LEVEL", "debug"),
        ],
    )?;
    node.wait_ready(&client).await?;
    let set = request(
        &client,
        "cadre.node.n1.secrets.set",
        json!({"name": "smtp_password", "value": password}).to_string(),
    )
    .await?;
    assert_eq!(set["version"], 1, "{set}");

    let submit = |key: &'static str| {
        let client = client.clone();
        async move {
            let reply = request(
                &client,
                "cadre.tasks.submit",
                json!({"playbook": "welcome-mail", "idempotency_key": key,
                       "input": {"email": "ada@acme.test", "client": "Acme", "kickoff": "2026-12-01"}})
                .to_string(),
            )
            .await?;
            let id = reply["task_id"].as_str().unwrap_or_default().to_string();
            let task = wait_task(&client, &id, WITHIN, chaos_tests::is_terminal).await?;
            anyhow::Ok((reply, task))
        }
    };
    let (_, task) = submit("acme-welcome").await?;
    assert_eq!(task["status"], "succeeded", "{task}\n{}", node.log_tail());
    let task_id = task["task_id"].as_str().unwrap_or_default().to_string();
    let got = mails(&inbox);
    assert_eq!(got.len(), 1, "{got:?}");
    let mail = &got[0];
    let message_id = format!("<{task_id}.send@cadre.test>");
    assert!(
        mail.contains(&format!("Message-ID: {message_id}")),
        "{mail}"
    );
    assert!(
        mail.contains("To: ada@acme.test") && mail.contains("Subject: Welcome, Acme"),
        "{mail}"
    );
    assert!(mail.contains("Kickoff is on 2026-12-01."), "{mail}");
    assert_eq!(task["steps"][0]["output"]["message_id"], message_id);

    // The same key again: the same task, no second mail.
    let (again, _) = submit("acme-welcome").await?;
    assert_eq!(
        (again["task_id"].as_str(), again["duplicate"].as_bool()),
        (Some(task_id.as_str()), Some(true))
    );
    assert_eq!(
        mails(&inbox).len(),
        1,
        "a duplicate submission mailed again"
    );

    // A wrong password: the server refuses, the step fails, nothing is sent.
    request(
        &client,
        "cadre.node.n1.secrets.rotate",
        json!({"name": "smtp_password", "value": "wrong"}).to_string(),
    )
    .await?;
    let (_, refused) = submit("acme-wrong").await?;
    assert_eq!(refused["status"], "failed", "{refused}");
    assert!(
        refused["failure"]
            .as_str()
            .is_some_and(|f| f.contains("SMTP")),
        "{refused}"
    );
    assert_eq!(mails(&inbox).len(), 1);
    // Rotated back: mail flows again, no restart.
    request(
        &client,
        "cadre.node.n1.secrets.rotate",
        json!({"name": "smtp_password", "value": password}).to_string(),
    )
    .await?;
    let (_, second) = submit("acme-second").await?;
    assert_eq!(second["status"], "succeeded", "{second}");
    assert_eq!(mails(&inbox).len(), 2);

    let log = std::fs::read_to_string(node.data_dir.join("n1.log"))?;
    for (what, text) in [
        ("the log", log),
        ("the task", task.to_string()),
        ("the failure", refused.to_string()),
    ] {
        assert!(
            !text.contains(password),
            "the SMTP password leaked into {what}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_is_required_and_verified() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // A CA of the test's own, and a certificate for localhost signed by it.
    let (ca, ca_key, cert, key) = (
        dir.path().join("ca.pem"),
        dir.path().join("ca.key"),
        dir.path().join("cert.pem"),
        dir.path().join("cert.key"),
    );
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl").args(args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let p = |p: &std::path::Path| p.display().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=cadre test CA",
        "-keyout",
        &p(&ca_key),
        "-out",
        &p(&ca),
    ])?;
    let csr = dir.path().join("cert.csr");
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &p(&key),
        "-out",
        &p(&csr),
    ])?;
    let ext = dir.path().join("ext.cnf");
    std::fs::write(&ext, "subjectAltName=DNS:localhost\n")?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&ca),
        "-CAkey",
        &p(&ca_key),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&cert),
    ])?;

    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(&inbox)?;
    let password = "tls-pass-canary-31f0";
    let tls_sink = SmtpSink::start_with(
        &inbox,
        "cadre",
        password,
        &["--tls-cert", &p(&cert), "--tls-key", &p(&key)],
    )?;
    let plain_inbox = dir.path().join("plain");
    std::fs::create_dir_all(&plain_inbox)?;
    let plain_sink = SmtpSink::start(&plain_inbox, "cadre", password)?;

    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let mail = r#"
name = "mail"
[[steps]]
id = "send"
tool = "email.send"
params = { to = "ada@acme.test", subject = "Over TLS", text = "sealed" }
verify = { json_path_equals = { path = "$.accepted", value = true } }
max_attempts = 1
"#;
    let (_, playbooks) = chaos_tests::files_and_playbooks(dir.path(), &[("mail", mail)])?;
    let run = |port: u16, name: &'static str, trust: bool| {
        let (client, data, nats_url, playbooks, ca) = (
            client.clone(),
            dir.path().join(format!("{name}-node")),
            nats.url.clone(),
            playbooks.clone(),
            if trust { p(&ca) } else { String::new() },
        );
        async move {
            let port = port.to_string();
            let mut node = CadreNode::start(
                name,
                &data,
                &nats_url,
                &[
                    ("CADRE_PLAYBOOKS_DIR", playbooks.as_str()),
                    ("CADRE_SMTP_HOST", "localhost"),
                    ("CADRE_SMTP_PORT", port.as_str()),
                    ("CADRE_SMTP_TLS", "starttls"),
                    ("CADRE_SMTP_CA_FILE", ca.as_str()),
                    ("CADRE_SMTP_USER", "cadre"),
                    ("CADRE_MAIL_FROM", "ops@cadre.test"),
                ],
            )?;
            node.wait_ready(&client).await?;
            request(
                &client,
                &format!("cadre.node.{name}.secrets.set"),
                json!({"name": "smtp_password", "value": password}).to_string(),
            )
            .await?;
            let reply = request(
                &client,
                "cadre.tasks.submit",
                json!({"playbook": "mail"}).to_string(),
            )
            .await?;
            let id = reply["task_id"].as_str().unwrap_or_default().to_string();
            let task = wait_task(&client, &id, WITHIN, chaos_tests::is_terminal).await?;
            node.terminate(Duration::from_secs(10))?;
            anyhow::Ok(task)
        }
    };
    // STARTTLS with a certificate the node trusts (smtp_ca_file): delivered.
    let sent = run(tls_sink.port, "tls", true).await?;
    assert_eq!(sent["status"], "succeeded", "{sent}");
    assert_eq!(mails(&inbox).len(), 1);
    // A server that cannot upgrade gets nothing: no plaintext fallback, no password sent.
    let refused = run(plain_sink.port, "plain", true).await?;
    assert_eq!(refused["status"], "failed", "{refused}");
    assert!(
        refused["failure"]
            .as_str()
            .is_some_and(|f| f.contains("STARTTLS is not supported")),
        "{refused}"
    );
    assert!(mails(&plain_inbox).is_empty(), "mail went out in plaintext");
    // A certificate the node does not trust (no smtp_ca_file): refused, nothing sent.
    let untrusted = run(tls_sink.port, "untrusting", false).await?;
    assert_eq!(untrusted["status"], "failed", "{untrusted}");
    assert_eq!(mails(&inbox).len(), 1, "mail went to an unverified server");
    Ok(())
}
