//! The machine's two floors that the spine's figures stand on, as the spine issue names
//! them (its reference machine: request/reply 130 µs, synced RocksDB write 170 µs).
//!
//! One role hop, apart from what the roles do: sequential NATS request/replies through a
//! real nats-server on one shared connection (as a node has), answered (a) straight from
//! the subscription, (b) by a ractor actor fed by the roles' pump
//! (`actors::bus::spawn_pump`), answering in its handler, (c) the same, answering from a
//! spawned task (as the executor and verifier do). Interleaved rounds; medians.
//!
//! One synced RocksDB write: a 200-byte put with `sync = true` into a fresh database
//! under the temp dir (`TMPDIR`; on disk, not tmpfs, here), one at a time, then from 8
//! threads at once (RocksDB groups their fsyncs).
//!
//! `cargo run -p chaos-tests --bin bench_hop -- [requests per round] [rounds]`

use std::time::{Duration, Instant};

use actors::bus::{self, Inbound};
use bytes::Bytes;
use chaos_tests::NatsServer;
use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};

struct Responder;

struct ResponderArgs {
    client: async_nats::Client,
    spawn_reply: bool,
}

impl Actor for Responder {
    type Msg = Inbound;
    type State = ResponderArgs;
    type Arguments = ResponderArgs;

    async fn pre_start(
        &self,
        _: ActorRef<Inbound>,
        args: ResponderArgs,
    ) -> Result<ResponderArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<Inbound>,
        inbound: Inbound,
        state: &mut ResponderArgs,
    ) -> Result<(), ActorProcessingErr> {
        let Some(reply) = inbound.msg.reply.clone() else {
            return Ok(());
        };
        let client = state.client.clone();
        let answer = async move {
            let _ = client.publish(reply, Bytes::from_static(b"ok")).await;
            drop(inbound);
        };
        if state.spawn_reply {
            tokio::spawn(answer);
        } else {
            answer.await;
        }
        Ok(())
    }
}

/// `BENCH_WORKERS` sets the runtime's worker threads (default 3, as the node has here).
fn main() -> anyhow::Result<()> {
    let workers = std::env::var("BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let requests = args.first().copied().unwrap_or(3000);
    let rounds = args.get(1).copied().unwrap_or(3);
    let nats = NatsServer::start()?;
    let client = nats.client().await?;

    let mut direct = client.subscribe("hop.direct").await?;
    let c = client.clone();
    tokio::spawn(async move {
        while let Some(msg) = direct.next().await {
            if let Some(reply) = msg.reply {
                let _ = c.publish(reply, Bytes::from_static(b"ok")).await;
            }
        }
    });
    for (subject, spawn_reply) in [("hop.actor", false), ("hop.spawned", true)] {
        let (actor, _) = Actor::spawn(
            None,
            Responder,
            ResponderArgs {
                client: client.clone(),
                spawn_reply,
            },
        )
        .await?;
        bus::spawn_pump(client.subscribe(subject).await?, actor, 256, |i| i);
    }
    client.flush().await?;

    let subjects = ["hop.direct", "hop.actor", "hop.spawned"];
    let mut medians: Vec<Vec<f64>> = vec![Vec::new(); subjects.len()];
    for round in 1..=rounds {
        for (i, subject) in subjects.iter().enumerate() {
            let mut took = Vec::with_capacity(requests);
            for _ in 0..requests {
                let started = Instant::now();
                tokio::time::timeout(
                    Duration::from_secs(5),
                    client.request(*subject, Bytes::from_static(b"x")),
                )
                .await??;
                took.push(started.elapsed().as_secs_f64() * 1e6);
            }
            took.sort_by(f64::total_cmp);
            let p50 = took[took.len() / 2];
            println!(
                "round {round} {subject}: p50 {p50:.0} µs, p90 {:.0} µs",
                took[took.len() * 9 / 10]
            );
            medians[i].push(p50);
        }
    }
    for (i, subject) in subjects.iter().enumerate() {
        medians[i].sort_by(f64::total_cmp);
        println!(
            "{subject}: median p50 over {rounds} rounds {:.0} µs",
            medians[i][rounds / 2]
        );
    }
    synced_writes(requests, rounds)
}

/// The synced-write floor: sequential p50, then the rate of 8 concurrent writers.
fn synced_writes(requests: usize, rounds: usize) -> anyhow::Result<()> {
    const WRITERS: usize = 8;
    let dir = tempfile::tempdir()?;
    let mut options = rocksdb::Options::default();
    options.create_if_missing(true);
    let db = rocksdb::DB::open(&options, dir.path())?;
    let mut sync = rocksdb::WriteOptions::default();
    sync.set_sync(true);
    let value = [7u8; 200];
    let (mut p50s, mut rates) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let mut took = Vec::with_capacity(requests);
        for i in 0..requests {
            let started = Instant::now();
            db.put_opt(format!("seq-{round}-{i}"), value, &sync)?;
            took.push(started.elapsed().as_secs_f64() * 1e6);
        }
        took.sort_by(f64::total_cmp);
        let p50 = took[took.len() / 2];
        let started = Instant::now();
        std::thread::scope(|scope| -> anyhow::Result<()> {
            let (db, sync) = (&db, &sync);
            let handles: Vec<_> = (0..WRITERS)
                .map(|w| {
                    scope.spawn(move || -> Result<(), rocksdb::Error> {
                        for i in 0..requests / WRITERS {
                            db.put_opt(format!("par-{round}-{w}-{i}"), value, sync)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for handle in handles {
                handle
                    .join()
                    .map_err(|_| anyhow::anyhow!("a writer panicked"))??;
            }
            Ok(())
        })?;
        let rate = (requests / WRITERS * WRITERS) as f64 / started.elapsed().as_secs_f64();
        println!(
            "round {round} store.synced_put: p50 {p50:.0} µs, p90 {:.0} µs; {WRITERS} writers: {rate:.0} writes/s",
            took[took.len() * 9 / 10]
        );
        p50s.push(p50);
        rates.push(rate);
    }
    p50s.sort_by(f64::total_cmp);
    rates.sort_by(f64::total_cmp);
    println!(
        "store.synced_put: median p50 over {rounds} rounds {:.0} µs; {WRITERS} writers {:.0} writes/s",
        p50s[rounds / 2],
        rates[rounds / 2]
    );
    Ok(())
}
