//! The memory benchmark: N facts written through the knowledge stream to a real node,
//! then bounded retrievals over `cadre.memory.search`, one at a time. Reports how fast the
//! node applied the facts, how long retrieval takes at that size (median and p99 over a
//! seeded query set), the index's size on disk and the node's RSS.
//!
//! `cargo run -p chaos-tests --bin bench_memory -- [facts] [queries] [seed]`

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use chaos_tests::{CadreNode, NatsServer, eventually, metric, request};
use rand::{Rng, SeedableRng};
use serde_json::json;

const CLIENTS: usize = 2000;
const WORDS: &[&str] = &[
    "invoice",
    "newsletter",
    "kickoff",
    "webinar",
    "renewal",
    "refund",
    "pricing",
    "hiring",
    "contract",
    "onboarding",
    "feedback",
    "proposal",
    "deadline",
    "budget",
    "meeting",
    "launch",
    "support",
    "migration",
    "audit",
    "workshop",
];
const VERBS: &[&str] = &[
    "asked about",
    "paid the",
    "disputed the",
    "approved the",
    "postponed the",
    "loved the",
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let facts: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let queries: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);
    let seed: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(7);
    println!("bench_memory: {facts} facts, {queries} queries, seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let nats = NatsServer::start()?;
    let client = nats.client().await?;
    let dir = tempfile::tempdir()?;
    let playbooks = chaos_tests::shipped_playbooks().display().to_string();
    let data = dir.path().join("data");
    let mut node = CadreNode::start(
        "memory",
        &data,
        &nats.url,
        &[("CADRE_PLAYBOOKS_DIR", &playbooks)],
    )?;
    node.wait_ready(&client).await?;
    let rss_idle = node.rss_kib();

    // Facts as the Archivist writes them, published straight to the stream (256 acks in
    // flight), about CLIENTS clients, each on its own topic.
    let js = async_nats::jetstream::new(client.clone());
    let started = Instant::now();
    let mut acks = std::collections::VecDeque::new();
    for n in 0..facts {
        let client_no = rng.random_range(0..CLIENTS);
        let word = WORDS[rng.random_range(0..WORDS.len())];
        let verb = VERBS[rng.random_range(0..VERBS.len())];
        let topic = format!("client.c{client_no}.{word}.n{n}");
        let write = json!({
            "id": format!("bench-{n}"),
            "author": {"actor": "archivist", "task_id": format!("t{n}")},
            "made_at_ms": 0,
            "reason": "bench",
            "op": "fact",
            "topic": topic,
            "kind": "fact",
            "text": format!("Client c{client_no} {verb} {word} in week {}", n % 52),
            "value": format!("{verb} {word}"),
            "confidence": 0.6,
            "sources": [format!("t{n}")],
        });
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("bench-{n}").as_str());
        acks.push_back(
            js.publish_with_headers(
                format!("cadre.knowledge.fact.{topic}"),
                headers,
                write.to_string().into(),
            )
            .await?,
        );
        if acks.len() >= 256
            && let Some(ack) = acks.pop_front()
        {
            ack.await?;
        }
    }
    for ack in acks {
        ack.await?;
    }
    let published = started.elapsed();
    eventually(Duration::from_secs(900), "every fact applied", || async {
        let text = node.metrics().await.ok()?;
        (metric(&text, "cadre_knowledge_applied_seq") as u64 >= facts).then_some(())
    })
    .await?;
    let applied = started.elapsed();
    println!(
        "write: published in {:.1} s, applied by the node in {:.1} s ({:.0} facts/s)",
        published.as_secs_f64(),
        applied.as_secs_f64(),
        facts as f64 / applied.as_secs_f64()
    );

    // The first search commits what the index holds; time it apart.
    let first = Instant::now();
    let warm = request(
        &client,
        "cadre.memory.search",
        json!({"query": "invoice"}).to_string(),
    )
    .await?;
    anyhow::ensure!(
        warm["facts"].as_array().is_some_and(|f| !f.is_empty()),
        "{warm}"
    );
    println!(
        "first search (commits the index): {:.1} ms",
        first.elapsed().as_secs_f64() * 1e3
    );

    let mut took = Vec::with_capacity(queries);
    let mut returned = 0;
    for _ in 0..queries {
        let query = match rng.random_range(0..3) {
            0 => format!(
                "c{} {}",
                rng.random_range(0..CLIENTS),
                WORDS[rng.random_range(0..WORDS.len())]
            ),
            1 => format!(
                "{} {}",
                VERBS[rng.random_range(0..VERBS.len())],
                WORDS[rng.random_range(0..WORDS.len())]
            ),
            _ => WORDS[rng.random_range(0..WORDS.len())].to_string(),
        };
        let body = json!({"query": query, "top_k": 5, "chars_max": 2000}).to_string();
        let t = Instant::now();
        let reply = request(&client, "cadre.memory.search", body).await?;
        took.push(t.elapsed());
        let n = reply["facts"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(
            n <= 5 && reply["chars"].as_u64().unwrap_or(u64::MAX) <= 2000,
            "{reply}"
        );
        returned += n;
    }
    took.sort();
    let pct = |p: f64| took[((took.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1e3;
    println!(
        "search over NATS, top 5 / 2000 chars: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({:.1} facts per answer)",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0),
        returned as f64 / queries as f64
    );
    let index_bytes: u64 = std::fs::read_dir(data.join("memory-index"))?
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let text = node.metrics().await?;
    println!(
        "index on disk {:.1} MiB, {} current facts; node RSS {} → {} MiB",
        index_bytes as f64 / (1 << 20) as f64,
        metric(&text, "cadre_memory_facts"),
        rss_idle / 1024,
        node.rss_kib() / 1024
    );
    node.terminate(Duration::from_secs(30))?;
    Ok(())
}
