//! A TCP link between a node and nats-server that the chaos suite can slow down or cut:
//! what `tc netem` and a cut cable do, in user space, because this machine's kernel has
//! no `netem` qdisc (`tc qdisc add … netem` answers "Specified qdisc kind is unknown").
//!
//! Every byte read on either side is held for the link's delay, then written, in order
//! (a one-way latency; the round trip is twice it). A cut link delivers nothing and
//! holds what it reads, as a partition does to TCP: neither side hears a reset, each
//! finds out through its own pings, a connection attempt during the cut hangs, and
//! whatever was held arrives on heal if its connection still lives.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

struct Shape {
    delay_us: AtomicU64,
    cut: tokio::sync::watch::Sender<bool>,
}

/// A listening end on loopback that forwards to `upstream`; stops on drop.
pub struct Link {
    /// `nats://127.0.0.1:<port>`: give this to the node instead of the server's URL.
    pub url: String,
    shape: Arc<Shape>,
    accept: tokio::task::JoinHandle<()>,
}

impl Link {
    pub async fn start(upstream: &str) -> anyhow::Result<Link> {
        let upstream = upstream
            .rsplit("://")
            .next()
            .unwrap_or(upstream)
            .rsplit('@')
            .next()
            .unwrap_or(upstream)
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("nats://{}", listener.local_addr()?);
        let shape = Arc::new(Shape {
            delay_us: AtomicU64::new(0),
            cut: tokio::sync::watch::Sender::new(false),
        });
        let s = shape.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (s, upstream) = (s.clone(), upstream.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = tokio::spawn(pipe(cr, sw, s.clone()));
                    let down = tokio::spawn(pipe(sr, cw, s));
                    // Either direction ending (a close, not a cut) ends both.
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        });
        Ok(Link { url, shape, accept })
    }

    /// Holds every byte this long in each direction, from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.shape
            .delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// Cuts the link (`true`) or heals it (`false`).
    pub fn cut(&self, cut: bool) {
        self.shape.cut.send_replace(cut);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// One direction: a reader stamps each chunk with when it is due; a writer delivers it
/// then, in order, and not while the link is cut.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shape: Arc<Shape>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let mut cut = shape.cut.subscribe();
    let writer = tokio::spawn(async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if cut.wait_for(|cut| !*cut).await.is_err() {
                return;
            }
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let delay = Duration::from_micros(shape.delay_us.load(Ordering::SeqCst));
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
