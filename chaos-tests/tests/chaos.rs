//! The chaos suite's short mode: one real node and a real nats-server, tasks flowing,
//! faults from a seeded schedule — SIGKILL the node, freeze it (SIGSTOP) and thaw it,
//! kill and restart nats-server — each hitting a batch of tasks in flight (enqueued on the
//! durable intake stream just before), and after every fault a probe task whose success
//! measures the recovery. A second run injects panics into every recoverable role
//! (`fault_panic`): each role is restarted by its supervisor, the work it held is retried.
//! Then the invariants: every accepted task succeeded; no `unsafe` effect ran twice;
//! every request the HTTP sink saw carried its step's idempotency key; no task's status
//! moved backwards; the audit chain holds. The seed is printed;
//! `CADRE_CHAOS_SEED=<seed>` replays the schedule. docs/RELIABILITY.md has the scenarios
//! and the figures.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chaos_tests::workload::{Rig, seed};
use chaos_tests::{CadreNode, NatsServer, request};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FAULTS: usize = 9;
const BATCH: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Fault {
    KillNode,
    FreezeNode,
    RestartNats,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_faults_lose_nothing_repeat_no_effect_and_recover() -> anyhow::Result<()> {
    let seed = seed()?;
    let mut rng = StdRng::seed_from_u64(seed);

    let mut nats = NatsServer::start()?;
    let client = nats.client().await?;
    let rig = Rig::new().await?;
    let mut node = CadreNode::start("chaos", &rig.data_dir(), &nats.url, &rig.env(&[]))?;
    node.wait_ready(&client).await?;

    let mut submitted = 0usize;
    let submit = |n: usize| rig.submit(n);
    let mut recoveries: HashMap<Fault, Vec<Duration>> = HashMap::new();
    // The long mode: faults for as long as asked, instead of the short suite's few.
    let minutes: Option<u64> = match std::env::var("CADRE_CHAOS_MINUTES") {
        Ok(m) => Some(m.parse()?),
        Err(_) => None,
    };
    let until = minutes.map(|m| Instant::now() + Duration::from_secs(m * 60));
    let mut faults = 0;
    for i in 0.. {
        match until {
            Some(until) if Instant::now() >= until => break,
            None if i == FAULTS => break,
            _ => faults += 1,
        }
        let fault = match rng.random_range(0..3) {
            0 => Fault::KillNode,
            1 => Fault::FreezeNode,
            _ => Fault::RestartNats,
        };
        let held_ms = rng.random_range(50..800);
        // Work in flight when the fault hits: enqueued durably, so none of it needs the
        // node up to be accepted.
        let js = async_nats::jetstream::new(client.clone());
        for n in submitted..submitted + BATCH {
            js.publish("cadre.tasks.enqueue", submit(n).into())
                .await?
                .await?;
        }
        submitted += BATCH;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await; // the schedule
        match fault {
            Fault::KillNode => {
                node.kill9();
                tokio::time::sleep(Duration::from_millis(held_ms)).await; // down for this long
                node.restart()?;
            }
            Fault::FreezeNode => {
                node.freeze();
                tokio::time::sleep(Duration::from_millis(held_ms)).await; // frozen for this long
                node.thaw();
            }
            Fault::RestartNats => {
                nats.kill();
                tokio::time::sleep(Duration::from_millis(held_ms)).await; // broker down
                nats.respawn()?;
            }
        }
        let ended = Instant::now();
        // A probe submitted once the fault is over: its success is the recovery.
        let probe = submit(submitted);
        submitted += 1;
        chaos_tests::workload::probe(&client, probe, Duration::from_secs(60))
            .await
            .map_err(|e| {
                anyhow::anyhow!("seed {seed}, fault {i} {fault:?}: {e}\n{}", node.log_tail())
            })?;
        let took = ended.elapsed();
        println!(
            "fault {i}: {fault:?} for {held_ms} ms; a task submitted after it succeeded {took:?} later"
        );
        recoveries.entry(fault).or_default().push(took);
    }

    let settling = Instant::now();
    let tasks = rig
        .settle(&client, submitted, Duration::from_secs(120))
        .await
        .map_err(|e| anyhow::anyhow!("seed {seed}: {e}\n{}", node.log_tail()))?;

    let settled = settling.elapsed();
    println!("seed {seed}: every task terminal {settled:?} after the last fault");
    // Work in flight when the broker went away is re-sent on reconnect, not left to its
    // step's timeout (30 s here): the last tasks end within seconds of the last fault.
    assert!(
        settled < Duration::from_secs(10),
        "seed {seed}: tasks took {settled:?} to settle after the last fault"
    );
    rig.check(&client, &["chaos"], &tasks, seed).await?;
    let summary = chaos_tests::workload::recovery_summary(&recoveries);
    println!(
        "seed {seed}: {faults} faults, {submitted} tasks succeeded, {} sink requests; recovery {summary:?}",
        rig.sink.requests().len()
    );
    Ok(())
}

/// Roles panic inside their handlers (`fault_panic`, seeded by the node's seed): the
/// node's supervisor restarts the singletons, the task supervisor restarts a TaskActor
/// from its checkpoint, the requests a panic dropped are retried by whoever sent them.
/// Every role panics at least once, the node keeps serving, and every task succeeds with
/// the invariants above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_in_every_role_cost_no_task() -> anyhow::Result<()> {
    const TASKS: usize = 24;
    let seed = seed()?;
    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let rig = Rig::new().await?;
    // The node's options are signed 64-bit.
    let node_seed = (seed % i64::MAX as u64).max(1).to_string();
    let faults = actors::faults::ROLES
        .iter()
        .map(|r| format!("{r}=0.3"))
        .collect::<Vec<_>>()
        .join(",");
    let env = rig.env(&[
        ("CADRE_SEED", node_seed.as_str()),
        ("CADRE_FAULT_PANIC", faults.as_str()),
        ("CADRE_FAULT_PANIC_MAX", "2"),
        // An executor's panic drops the job: the task re-sends it after its timeout.
        ("CADRE_STEP_TIMEOUT_MS", "2000"),
    ]);
    let mut node = CadreNode::start("panicky", &rig.data_dir(), &nats.url, &env)?;
    node.wait_ready(&client).await?;
    let started = Instant::now();
    for n in 0..TASKS {
        let reply = request(&client, "cadre.tasks.submit", rig.submit(n)).await?;
        assert_eq!(reply["status"], "accepted", "seed {seed}: {reply}");
    }
    let tasks = rig
        .settle(&client, TASKS, Duration::from_secs(120))
        .await
        .map_err(|e| anyhow::anyhow!("seed {seed}: {e}\n{}", node.log_tail()))?;
    let took = started.elapsed();
    rig.check(&client, &["panicky"], &tasks, seed).await?;

    // Each role panicked and was restarted inside the process, which still serves (nothing
    // here would restart it).
    let metrics = node.metrics().await?;
    let restarts = |role: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("cadre_actor_restarts_total{")
                    && l.contains(&format!("actor=\"{role}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let counts: Vec<(&str, f64)> = actors::faults::ROLES
        .iter()
        .map(|r| (*r, restarts(r)))
        .collect();
    for (role, n) in &counts {
        assert!(*n >= 1.0, "seed {seed}: {role} never restarted: {counts:?}");
    }
    println!("seed {seed}: {TASKS} tasks succeeded in {took:?} through restarts {counts:?}");
    Ok(())
}
