//! The chaos schedule over a cluster: a real nats-server and three real `cadre` nodes in
//! cluster mode, each on its own `Link` to NATS, tasks flowing through the durable intake
//! stream, and faults from a seeded schedule, each over a batch of tasks in flight, on a
//! node the schedule picks: SIGKILL and restart; SIGSTOP past the lease TTL and SIGCONT;
//! its link cut past the lease TTL and healed (a partition); its link slowed to 150 ms
//! each way for a while; nats-server killed and restarted under everyone. Panics are
//! injected into every role of every node all along. After every fault, a probe task's
//! success measures the recovery. Then the invariants over every task: succeeded; its
//! `unsafe` effect ran once; every sink request carried a known key; per key the fencing
//! tokens never went back (no effect under a stale lease); every node's audit chain holds.
//!
//! The seed is printed; `CADRE_CHAOS_SEED=<seed>` replays the schedule and
//! `CADRE_CHAOS_MINUTES=<n>` runs it for that long (`ops/scripts/chaos.sh --cluster`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chaos_tests::workload::{Rig, seed};
use chaos_tests::{CadreNode, Link, NatsServer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FAULTS: usize = 6;
const BATCH: usize = 3;
const NODES: [&str; 3] = ["a", "b", "c"];
const LEASE_TTL: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Fault {
    Kill,
    Freeze,
    Partition,
    SlowLink,
    RestartNats,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_under_mixed_faults_loses_nothing_and_fences_every_stale_owner()
-> anyhow::Result<()> {
    let seed = seed()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut nats = NatsServer::start()?;
    let client = nats.client().await?;
    let rig = Rig::new().await?;
    let ttl = LEASE_TTL.as_millis().to_string();
    let node_seed = (seed % i64::MAX as u64).max(1).to_string();
    let faults = actors::faults::ROLES
        .iter()
        .map(|r| format!("{r}=0.02"))
        .collect::<Vec<_>>()
        .join(",");
    let env = rig.env(&[
        ("CADRE_CLUSTER", "true"),
        ("CADRE_LEASE_TTL_MS", ttl.as_str()),
        ("CADRE_HEARTBEAT_MS", "500"),
        // A request that lands on a frozen or cut-off node is lost until the timeout.
        ("CADRE_STEP_TIMEOUT_MS", "3000"),
        ("CADRE_STEP_ATTEMPTS_MAX", "20"),
        ("CADRE_SEED", node_seed.as_str()),
        ("CADRE_FAULT_PANIC", faults.as_str()),
        ("CADRE_FAULT_PANIC_MAX", "1"),
    ]);
    let mut links = Vec::new();
    let mut nodes = Vec::new();
    for id in NODES {
        let link = Link::start(&nats.url).await?;
        let node = CadreNode::start(id, &rig.data_dir().join(id), &link.url, &env)?;
        links.push(link);
        nodes.push(node);
    }
    for node in &mut nodes {
        node.wait_ready(&client).await?;
    }
    let tails = |nodes: &[CadreNode]| {
        nodes
            .iter()
            .map(|n| format!("--- {}\n{}", n.node_id, n.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    };

    let minutes: Option<u64> = match std::env::var("CADRE_CHAOS_MINUTES") {
        Ok(m) => Some(m.parse()?),
        Err(_) => None,
    };
    let until = minutes.map(|m| Instant::now() + Duration::from_secs(m * 60));
    let js = async_nats::jetstream::new(client.clone());
    let mut submitted = 0usize;
    let mut recoveries: HashMap<Fault, Vec<Duration>> = HashMap::new();
    let mut count = 0;
    for i in 0.. {
        match until {
            Some(until) if Instant::now() >= until => break,
            None if i == FAULTS => break,
            _ => count += 1,
        }
        let fault = match rng.random_range(0..5) {
            0 => Fault::Kill,
            1 => Fault::Freeze,
            2 => Fault::Partition,
            3 => Fault::SlowLink,
            _ => Fault::RestartNats,
        };
        let victim = rng.random_range(0..NODES.len());
        // Work in flight when the fault hits: enqueued durably (deduplicated by message
        // id cluster-wide), taken by whichever node pulls it.
        for n in submitted..submitted + BATCH {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("chaos-{n}").as_str());
            js.publish_with_headers("cadre.tasks.enqueue", headers, rig.submit(n).into())
                .await?
                .await?;
        }
        submitted += BATCH;
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await; // the schedule
        let held = match fault {
            Fault::Kill | Fault::RestartNats => Duration::from_millis(rng.random_range(100..800)),
            Fault::Freeze | Fault::Partition => LEASE_TTL + Duration::from_millis(1_000),
            Fault::SlowLink => Duration::from_millis(2_000),
        };
        match fault {
            Fault::Kill => {
                nodes[victim].kill9();
                tokio::time::sleep(held).await; // down for this long
                nodes[victim].restart()?;
            }
            Fault::Freeze => {
                nodes[victim].freeze();
                tokio::time::sleep(held).await; // frozen past the lease
                nodes[victim].thaw();
            }
            Fault::Partition => {
                links[victim].cut(true);
                tokio::time::sleep(held).await; // cut off past the lease
                links[victim].cut(false);
            }
            Fault::SlowLink => {
                links[victim].set_delay(Duration::from_millis(150));
                tokio::time::sleep(held).await; // slow for this long
                links[victim].set_delay(Duration::ZERO);
            }
            Fault::RestartNats => {
                nats.kill();
                tokio::time::sleep(held).await; // broker down
                nats.respawn()?;
            }
        }
        let ended = Instant::now();
        let probe = rig.submit(submitted);
        submitted += 1;
        let (probe_id, accepted) =
            chaos_tests::workload::probe(&client, probe, Duration::from_secs(90))
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "seed {seed}, fault {i} {fault:?} on {}: {e}\n{}",
                        NODES[victim],
                        tails(&nodes)
                    )
                })?;
        let took = ended.elapsed();
        println!(
            "fault {i}: {fault:?} on {} for {held:?}; a task enqueued after it succeeded {took:?} later",
            NODES[victim]
        );
        // A slow recovery shows where its time went: how long the submit took, then the
        // probe's own records.
        if took > Duration::from_secs(1) {
            println!("  probe {probe_id}: accepted after {accepted:?}");
            chaos_tests::workload::print_timeline(&client, &probe_id).await;
        }
        recoveries.entry(fault).or_default().push(took);
    }

    let tasks = rig
        .settle(&client, submitted, Duration::from_secs(120))
        .await
        .map_err(|e| anyhow::anyhow!("seed {seed}: {e}\n{}", tails(&nodes)))?;
    rig.check(&client, &NODES, &tasks, seed).await?;
    let summary = chaos_tests::workload::recovery_summary(&recoveries);
    // Injected panics since each node's last start, as the nodes count them.
    let mut restarts = 0.0;
    for node in &nodes {
        let text = node.metrics().await.unwrap_or_default();
        restarts += chaos_tests::metric_sum(&text, "cadre_actor_restarts_total");
    }
    println!(
        "seed {seed}: {count} faults over {} nodes, {submitted} tasks succeeded, {restarts} actor restarts (since each node's last start); recovery {summary:?}",
        NODES.len()
    );
    Ok(())
}
