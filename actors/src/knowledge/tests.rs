use serde_json::json;
use storage::{Store, StoreOptions};

use super::*;
use crate::protocol::knowledge::{Author, FactKind, FactProposal, KnowledgeWrite, WriteOp};

struct Log {
    store: Store,
    seq: u64,
    _dir: tempfile::TempDir,
}

impl Log {
    fn new() -> Log {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        Log {
            store,
            seq: 0,
            _dir: dir,
        }
    }

    /// Applies `op` as the next stream message, entering the stream at `at_ms`.
    fn apply(&mut self, at_ms: u64, op: WriteOp) -> Applied {
        self.seq += 1;
        let write = KnowledgeWrite {
            id: format!("w{}", self.seq),
            author: Author::operator(),
            made_at_ms: at_ms,
            reason: "test".into(),
            op,
        };
        apply(&self.store, self.seq, at_ms, &write)
            .unwrap()
            .unwrap()
    }

    fn put(
        &mut self,
        at_ms: u64,
        key: &str,
        value: serde_json::Value,
        expected: Option<u64>,
    ) -> Outcome {
        self.apply(
            at_ms,
            WriteOp::Put {
                key: key.into(),
                value,
                expected_version: expected,
            },
        )
        .outcome
    }

    fn fact(
        &mut self,
        at_ms: u64,
        topic: &str,
        text: &str,
        value: serde_json::Value,
        source: &str,
    ) -> Applied {
        self.apply(
            at_ms,
            WriteOp::Fact(FactProposal {
                topic: topic.into(),
                kind: FactKind::Fact,
                text: text.into(),
                value,
                confidence: 0.6,
                sources: vec![source.into()],
            }),
        )
    }
}

#[test]
fn versions_history_and_time_travel() {
    let mut log = Log::new();
    assert_eq!(
        log.put(1000, "project.acme.status", json!("lead"), None)
            .version,
        Some(1)
    );
    assert_eq!(
        log.put(2000, "project.acme.status", json!("signed"), Some(1))
            .version,
        Some(2)
    );
    assert_eq!(
        log.put(
            3000,
            "project.acme.status",
            json!({"stage": "kickoff"}),
            None
        )
        .version,
        Some(3)
    );

    let latest = get(&log.store, "project.acme.status", At::Latest)
        .unwrap()
        .unwrap();
    assert_eq!(
        (latest.version, latest.value.clone()),
        (3, json!({"stage": "kickoff"}))
    );
    assert_eq!(latest.author, Author::operator());
    assert_eq!(
        (latest.reason.as_str(), latest.at_ms, latest.seq),
        ("test", 3000, 3)
    );

    let v1 = get(&log.store, "project.acme.status", At::Version(1))
        .unwrap()
        .unwrap();
    assert_eq!(v1.value, json!("lead"));
    // In force at 2500 ms: version 2; before the first write: nothing.
    let then = get(&log.store, "project.acme.status", At::Time(2500))
        .unwrap()
        .unwrap();
    assert_eq!((then.version, then.value), (2, json!("signed")));
    assert!(
        get(&log.store, "project.acme.status", At::Time(999))
            .unwrap()
            .is_none()
    );

    let all = history(&log.store, "project.acme.status", None, 10).unwrap();
    assert_eq!(all.iter().map(|e| e.version).collect::<Vec<_>>(), [3, 2, 1]);
    let page = history(&log.store, "project.acme.status", Some(3), 1).unwrap();
    assert_eq!(page[0].version, 2);
    // Another key is not mixed in.
    log.put(4000, "project.acme.status2", json!(1), None);
    assert_eq!(
        history(&log.store, "project.acme.status", None, 10)
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn a_stale_expected_version_is_a_conflict_naming_the_current_one() {
    let mut log = Log::new();
    log.put(1, "pref.newsletter.day", json!("monday"), Some(0));
    log.put(2, "pref.newsletter.day", json!("tuesday"), Some(1));
    let lost = log.put(3, "pref.newsletter.day", json!("friday"), Some(1));
    assert!(!lost.applied);
    assert_eq!(lost.code, Some(ErrorCode::Conflict));
    assert_eq!(lost.current_version, Some(2));
    assert!(lost.error.unwrap().contains("at version 2, not 1"));
    // Creating over an existing key with expected 0 conflicts too; nothing changed.
    assert_eq!(
        log.put(4, "pref.newsletter.day", json!("x"), Some(0))
            .current_version,
        Some(2)
    );
    assert_eq!(
        value(&log.store, "pref.newsletter.day").unwrap(),
        Some(json!("tuesday"))
    );
}

#[test]
fn checkpoint_and_rollback_write_new_versions() {
    let mut log = Log::new();
    log.put(1, "project.a.status", json!("draft"), None);
    log.put(2, "project.b.status", json!("open"), None);
    assert!(
        log.apply(
            3,
            WriteOp::Checkpoint {
                name: "before-import".into()
            }
        )
        .outcome
        .applied
    );
    log.put(4, "project.a.status", json!("sent"), None);
    log.put(5, "project.c.status", json!("new"), None);
    log.put(6, "project.b.status", json!("closed"), None);
    log.put(7, "project.b.status", json!("open"), None); // changed back

    let dup = log
        .apply(
            8,
            WriteOp::Checkpoint {
                name: "before-import".into(),
            },
        )
        .outcome;
    assert_eq!(dup.code, Some(ErrorCode::Conflict));

    let rb = log
        .apply(
            9,
            WriteOp::Rollback {
                checkpoint: "before-import".into(),
            },
        )
        .outcome;
    assert!(rb.applied, "{rb:?}");
    assert_eq!(
        rb.changed,
        vec![
            ("project.a.status".to_string(), 3),
            ("project.c.status".to_string(), 2)
        ]
    );
    assert_eq!(
        value(&log.store, "project.a.status").unwrap(),
        Some(json!("draft"))
    );
    // A key created after the checkpoint is deleted — by a new version, kept in history.
    let c = get(&log.store, "project.c.status", At::Latest)
        .unwrap()
        .unwrap();
    assert!(c.deleted);
    assert!(
        c.reason
            .starts_with("rollback to checkpoint `before-import`")
    );
    assert_eq!(
        history(&log.store, "project.a.status", None, 10)
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        value(&log.store, "project.b.status").unwrap(),
        Some(json!("open"))
    );

    let missing = log
        .apply(
            10,
            WriteOp::Rollback {
                checkpoint: "nope".into(),
            },
        )
        .outcome;
    assert_eq!(missing.code, Some(ErrorCode::NotFound));
}

#[test]
fn the_same_write_applied_twice_counts_once() {
    let mut log = Log::new();
    let write = KnowledgeWrite {
        id: "same".into(),
        author: Author::operator(),
        made_at_ms: 1,
        reason: String::new(),
        op: WriteOp::Put {
            key: "action.call.acme".into(),
            value: json!(true),
            expected_version: None,
        },
    };
    assert!(apply(&log.store, 1, 1, &write).unwrap().is_some());
    assert!(apply(&log.store, 2, 2, &write).unwrap().is_none());
    assert_eq!(
        history(&log.store, "action.call.acme", None, 10)
            .unwrap()
            .len(),
        1
    );
    assert_eq!(applied_seq(&log.store).unwrap(), 2);
    log.seq = 2;
}

#[test]
fn bad_writes_are_rejected_with_reasons() {
    let mut log = Log::new();
    let bad_key = log.put(1, "acme.status", json!(1), None);
    assert_eq!(bad_key.code, Some(ErrorCode::InvalidRequest));
    assert!(bad_key.error.unwrap().contains("namespace"));
    let nothing = log.put(2, "project.x", serde_json::Value::Null, None);
    assert_eq!(nothing.code, Some(ErrorCode::NotFound));
    let unsourced = log.apply(
        3,
        WriteOp::Fact(FactProposal {
            topic: "client.acme".into(),
            kind: FactKind::Fact,
            text: "x".into(),
            value: json!(1),
            confidence: 0.5,
            sources: vec![],
        }),
    );
    assert!(unsourced.outcome.error.unwrap().contains("source episodes"));
    assert!(unsourced.index.is_empty());
}

#[test]
fn a_duplicate_fact_confirms_and_a_contradiction_supersedes() {
    let mut log = Log::new();
    let first = log.fact(
        1000,
        "client.acme.contact",
        "Acme's contact is ana@acme.test",
        json!("ana@acme.test"),
        "t1",
    );
    assert!(first.outcome.applied);
    let again = log.fact(
        5000,
        "client.acme.contact",
        "Acme's contact is ana@acme.test",
        json!("ana@acme.test"),
        "t2",
    );
    assert!(matches!(&again.index[..], [IndexChange::Upsert { id, .. }] if id == "w1"));
    let (current, facts) = topic_history(&log.store, "client.acme.contact", 10).unwrap();
    assert_eq!(current.as_deref(), Some("w1"));
    assert_eq!(
        facts.len(),
        1,
        "a duplicate confirms rather than duplicates"
    );
    assert_eq!(
        (facts[0].confirmations, facts[0].last_confirmed_ms),
        (2, 5000)
    );
    assert_eq!(facts[0].sources, ["t1", "t2"]);
    assert!(facts[0].confidence > 0.6 && facts[0].confidence <= 0.99);

    let changed = log.fact(
        9000,
        "client.acme.contact",
        "Acme's contact is bo@acme.test",
        json!("bo@acme.test"),
        "t3",
    );
    assert_eq!(
        changed.index,
        vec![
            IndexChange::Remove { id: "w1".into() },
            IndexChange::Upsert {
                id: "w3".into(),
                topic: "client.acme.contact".into(),
                text: "Acme's contact is bo@acme.test".into()
            },
        ]
    );
    let (current, facts) = topic_history(&log.store, "client.acme.contact", 10).unwrap();
    assert_eq!(current.as_deref(), Some("w3"));
    assert_eq!(
        facts.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(),
        ["w3", "w1"]
    );
    assert_eq!(facts[1].superseded_by.as_deref(), Some("w3"));
    assert_eq!(facts[1].superseded_at_ms, Some(9000));
    let mut live = Vec::new();
    current_facts(&log.store, |id, _| live.push(id.to_string())).unwrap();
    assert_eq!(live, ["w3"]);
}

#[test]
fn retrieval_is_relevant_and_bounded_on_a_seeded_corpus() {
    use rand::{Rng, SeedableRng};
    let seed = crate::test_seed(20261124);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut log = Log::new();
    let index = index::MemoryIndex::open(None).unwrap();
    let words = [
        "invoice",
        "newsletter",
        "kickoff",
        "webinar",
        "renewal",
        "refund",
        "pricing",
        "hiring",
    ];
    let clients = ["acme", "globex", "initech", "umbrella", "hooli", "stark"];
    let day = 86_400_000u64;
    let now = 400 * day;
    for i in 0..600 {
        let client = clients[rng.random_range(0..clients.len())];
        let word = words[rng.random_range(0..words.len())];
        let at = rng.random_range(0..now);
        let a = log.fact(
            at,
            &format!("client.{client}.n{i}"),
            &format!("{client} asked about the {word} on call {i}"),
            json!(i),
            "t",
        );
        index.apply(&a.index, log.seq).unwrap();
    }
    // Two facts about the same thing, one confirmed yesterday and one a year ago.
    let old = log.fact(
        now - 365 * day,
        "client.wayne.billing",
        "Wayne pays every invoice by wire transfer",
        json!("wire"),
        "t",
    );
    index.apply(&old.index, log.seq).unwrap();
    let fresh = log.fact(
        now - day,
        "client.wayne.terms",
        "Wayne pays every invoice within net 30 terms",
        json!("net30"),
        "t",
    );
    index.apply(&fresh.index, log.seq).unwrap();

    let bounds = recall::Bounds::new(Some(3), Some(10_000)).unwrap();
    let r = recall::search(&log.store, &index, "wayne invoice", bounds, now).unwrap();
    assert_eq!(r.facts.len(), 3);
    assert!(r.truncated);
    assert_eq!(
        r.facts[0].topic, "client.wayne.terms",
        "the recent one first: {:#?}",
        r.facts
    );
    assert_eq!(r.facts[1].topic, "client.wayne.billing");
    assert!(r.facts.windows(2).all(|w| w[0].score >= w[1].score));

    // Relevance: every hit for a client's word names that client or that word.
    let r = recall::search(
        &log.store,
        &index,
        "globex renewal",
        recall::Bounds::new(Some(10), None).unwrap(),
        now,
    )
    .unwrap();
    assert!(!r.facts.is_empty());
    assert!(
        r.facts
            .iter()
            .all(|f| f.text.contains("globex") || f.text.contains("renewal"))
    );
    assert!(
        r.facts[0].text.contains("globex") && r.facts[0].text.contains("renewal"),
        "{:#?}",
        r.facts[0]
    );

    // The character budget holds, in rank order.
    let tight = recall::search(
        &log.store,
        &index,
        "invoice",
        recall::Bounds::new(Some(50), Some(120)).unwrap(),
        now,
    )
    .unwrap();
    assert!(tight.chars <= 120 && !tight.facts.is_empty() && tight.truncated);
    assert_eq!(
        tight.chars,
        tight
            .facts
            .iter()
            .map(|f| f.text.chars().count())
            .sum::<usize>()
    );

    // A superseded fact leaves the results.
    let new_terms = log.fact(
        now,
        "client.wayne.terms",
        "Wayne now pays every invoice within net 60 terms",
        json!("net60"),
        "t",
    );
    index.apply(&new_terms.index, log.seq).unwrap();
    let r = recall::search(&log.store, &index, "wayne net terms", bounds, now).unwrap();
    assert!(r.facts.iter().any(|f| f.text.contains("net 60")));
    assert!(!r.facts.iter().any(|f| f.text.contains("net 30")));
    assert!(recall::Bounds::new(Some(0), None).is_err());
}

#[test]
fn the_index_rebuilds_from_the_store() {
    let mut log = Log::new();
    for i in 0..5 {
        log.fact(
            i,
            &format!("topic.t{i}"),
            &format!("fact number {i} about lemons"),
            json!(i),
            "t",
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let index = index::MemoryIndex::open(Some(dir.path())).unwrap();
    assert_eq!(index.committed_seq().unwrap(), 0);
    let n = index
        .rebuild(log.seq, |add| {
            current_facts(&log.store, |id, f| {
                add(IndexChange::Upsert {
                    id: id.into(),
                    topic: f.topic.clone(),
                    text: f.text.clone(),
                })
            })
            .map(|_| ())
            .map_err(|e| index::IndexError::Directory {
                path: String::new(),
                message: e.to_string(),
            })
        })
        .unwrap();
    assert_eq!(n, 5);
    drop(index);
    let reopened = index::MemoryIndex::open(Some(dir.path())).unwrap();
    assert_eq!(reopened.committed_seq().unwrap(), log.seq);
    assert_eq!(reopened.search("lemons", 10).unwrap().len(), 5);
}

#[test]
fn retention_prunes_the_oldest_episodes_by_age_count_and_bytes() {
    let log = Log::new();
    let day = 86_400_000u64;
    // Episodes made on days 1..=6 (task ids are ULIDs: the key says when).
    let mut batch = Batch::new();
    for d in 1..=6u64 {
        let id = ulid::Ulid::from_parts(d * day, 7).to_string();
        batch
            .put(Cf::Episodes, id.as_bytes(), &vec![0u8; 1000])
            .unwrap();
    }
    log.store.write_unsynced(batch).unwrap();
    let caps = |age_days: u64, count: usize, bytes: u64| Retention {
        age_ms_max: age_days * day,
        count_max: count,
        bytes_max: bytes,
    };
    // On day 10, nothing more than 7 days old: days 1 and 2 go, day 3 (7 days) stays.
    let p = prune_episodes(&log.store, caps(7, 100, u64::MAX), 10 * day).unwrap();
    assert_eq!(
        p,
        Pruned {
            age: 2,
            count: 0,
            bytes: 0
        }
    );
    let p = prune_episodes(&log.store, caps(7, 3, u64::MAX), 10 * day).unwrap();
    assert_eq!(
        p,
        Pruned {
            age: 0,
            count: 1,
            bytes: 0
        }
    );
    // Three left, about 1 KB each: a 2.5 KB cap keeps two.
    let p = prune_episodes(&log.store, caps(7, 3, 2500), 10 * day).unwrap();
    assert_eq!(
        p,
        Pruned {
            age: 0,
            count: 0,
            bytes: 1
        }
    );
    let left = log.store.value_sizes(Cf::Episodes).unwrap();
    assert_eq!(left.len(), 2);
    // The newest stay.
    assert_eq!(
        left[1].0,
        ulid::Ulid::from_parts(6 * day, 7).to_string().into_bytes()
    );
}
