//! The knowledge subjects (`cadre.context.*`, `cadre.memory.*`) and the messages of the
//! replicated knowledge stream (`cadre.knowledge.>`). Public, JSON.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Request/reply subjects, served by any node (queue group [`QUEUE_KNOWLEDGE`]): every
/// node reads the same versions from its own copy of the store.
pub const CONTEXT_GET: &str = "cadre.context.get";
pub const CONTEXT_PUT: &str = "cadre.context.put";
pub const CONTEXT_HISTORY: &str = "cadre.context.history";
pub const CONTEXT_LIST: &str = "cadre.context.list";
pub const CONTEXT_CHECKPOINT: &str = "cadre.context.checkpoint";
pub const CONTEXT_ROLLBACK: &str = "cadre.context.rollback";
/// What became of a write (`{"write_id"}`), or, without one, this node's writes still
/// waiting for the stream and the latest rejected ones.
pub const CONTEXT_WRITES: &str = "cadre.context.writes";
pub const MEMORY_SEARCH: &str = "cadre.memory.search";
pub const MEMORY_HISTORY: &str = "cadre.memory.history";
/// `{"task_id"}` → the episode of a verified task (as `Episode::view`), while the
/// retention caps keep it; `not_found` after.
pub const MEMORY_EPISODE: &str = "cadre.memory.episode";
pub const QUEUE_KNOWLEDGE: &str = "cadre-knowledge";

/// The JetStream stream every knowledge write goes through, in order, to every node.
pub const KNOWLEDGE_STREAM: &str = "CADRE_KNOWLEDGE";
pub const KNOWLEDGE_ALL: &str = "cadre.knowledge.>";

/// Where a write is published: `cadre.knowledge.<op>.<name>` (the key, checkpoint or
/// topic, whose dots are subject token separators).
pub fn knowledge_subject(write: &KnowledgeWrite) -> String {
    let (op, name) = match &write.op {
        WriteOp::Put { key, .. } => ("context", key.as_str()),
        WriteOp::Checkpoint { name } => ("checkpoint", name.as_str()),
        WriteOp::Rollback { checkpoint } => ("rollback", checkpoint.as_str()),
        WriteOp::Fact(f) => ("fact", f.topic.as_str()),
    };
    format!("cadre.knowledge.{op}.{name}")
}

/// Who made a write: `operator`, or a role (`executor`, `archivist`) with the task and
/// step it acted for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Author {
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_id: Option<String>,
}

impl Author {
    pub fn operator() -> Author {
        Author {
            actor: "operator".into(),
            task_id: None,
            step_id: None,
        }
    }
}

/// One message of the knowledge stream. Applied in stream order by every node, with
/// the same checks, so every node reaches the same versions and the same rejections.
/// (No `deny_unknown_fields`: serde does not support it beside `flatten`.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnowledgeWrite {
    /// A ULID made by the writer; also the `Nats-Msg-Id`, so a re-published write is
    /// dropped by the stream (and, past its duplicate window, by the appliers).
    pub id: String,
    pub author: Author,
    /// The writer's clock when the write was made (an offline write is published later).
    pub made_at_ms: u64,
    #[serde(default)]
    pub reason: String,
    #[serde(flatten)]
    pub op: WriteOp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum WriteOp {
    /// A new version of `key`; `null` deletes (a version too). With `expected_version`,
    /// applied only if the key is at that version when the write is applied (0: absent).
    #[serde(rename = "context")]
    Put {
        key: String,
        value: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expected_version: Option<u64>,
    },
    /// Names the state of the store as of this message.
    Checkpoint { name: String },
    /// Writes, for every key that changed since the checkpoint, a new version holding
    /// its value at the checkpoint.
    Rollback { checkpoint: String },
    /// A fact learned from verified work.
    Fact(FactProposal),
}

/// A candidate fact: a duplicate of the topic's current fact confirms it; a different
/// value supersedes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FactProposal {
    /// What the fact is about, dotted: `client.acme.contact`.
    pub topic: String,
    #[serde(default)]
    pub kind: FactKind,
    /// The statement, for people and for retrieval.
    pub text: String,
    /// What is compared to tell a confirmation from a contradiction.
    pub value: Value,
    /// 0 to 1.
    pub confidence: f64,
    /// The episodes (task ids) it came from.
    pub sources: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FactKind {
    #[default]
    Fact,
    /// A rule of thumb learned from outcomes ("invoices sent on Monday get paid first").
    Heuristic,
}

// ---------------------------------------------------------------------------------------
// Context store
// ---------------------------------------------------------------------------------------

/// `cadre.context.get`: the latest version, or the one at `version`, or the one in
/// force at `at_ms` (the stream's clock). At most one of the two.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextGetRequest {
    pub key: String,
    #[serde(default)]
    pub version: Option<u64>,
    #[serde(default)]
    pub at_ms: Option<u64>,
}

/// One version of a key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextEntry {
    pub key: String,
    pub version: u64,
    /// `null` when this version deleted the key.
    pub value: Value,
    pub deleted: bool,
    pub author: Author,
    pub reason: String,
    /// When the version entered the store (the stream's clock; every node agrees).
    pub at_ms: u64,
    /// When its writer made it.
    pub made_at_ms: u64,
    /// The stream sequence that wrote it.
    pub seq: u64,
    pub write_id: String,
}

/// `cadre.context.put`. `write_id` makes a retry safe: the same id is applied once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextPutRequest {
    pub key: String,
    pub value: Value,
    #[serde(default)]
    pub expected_version: Option<u64>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub author: Option<Author>,
    #[serde(default)]
    pub write_id: Option<String>,
}

/// A write's reply: `applied` (with the version it made), or `pending` when the stream
/// could not be reached in time — the write is kept and published when it can be;
/// `cadre.context.writes` tells what became of it. A conflict is an error reply
/// (`conflict`, with `current_version`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteReply {
    pub write_id: String,
    pub status: WriteStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// A rollback's new versions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<KeyVersion>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteStatus {
    Applied,
    Pending,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVersion {
    pub key: String,
    pub version: u64,
}

/// `cadre.context.history`: versions newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextHistoryRequest {
    pub key: String,
    #[serde(default)]
    pub limit: Option<usize>,
    /// Continue below this version (the `next` of the previous page).
    #[serde(default)]
    pub before_version: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContextHistoryReply {
    pub key: String,
    pub versions: Vec<ContextEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
}

/// `cadre.context.list`: the latest version of each key under `prefix`, in key order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextListRequest {
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub limit: Option<usize>,
    /// Continue after this key.
    #[serde(default)]
    pub after: Option<String>,
    /// Include deleted keys.
    #[serde(default)]
    pub deleted: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContextListReply {
    pub entries: Vec<ContextEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    pub name: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub checkpoint: String,
    #[serde(default)]
    pub reason: Option<String>,
}

/// `cadre.context.writes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WritesRequest {
    #[serde(default)]
    pub write_id: Option<String>,
    #[serde(default)]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteView {
    pub write_id: String,
    pub status: WriteStatus,
    /// `context`, `checkpoint`, `rollback` or `fact`, and what it names.
    pub op: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Why it was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u64>,
}

/// With a `write_id`: that write. Without: the writes made on this node and not yet in
/// the stream (`pending`, oldest first), then the latest `rejected` ones (newest first).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WritesReply {
    pub writes: Vec<WriteView>,
}

// ---------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------

pub const SEARCH_TOP_K_DEFAULT: usize = 5;
pub const SEARCH_TOP_K_MAX: usize = 50;
pub const SEARCH_CHARS_DEFAULT: usize = 2000;
pub const SEARCH_CHARS_MAX: usize = 32_000;

/// `cadre.memory.search`: current facts ranked by relevance and recency, at most
/// `top_k` of them and at most `chars_max` characters of their text.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySearchRequest {
    pub query: String,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub chars_max: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FactView {
    pub id: String,
    pub topic: String,
    pub kind: FactKind,
    pub text: String,
    pub value: Value,
    pub confidence: f64,
    /// The episodes it came from (task ids), newest last.
    pub sources: Vec<String>,
    pub created_at_ms: u64,
    pub last_confirmed_ms: u64,
    pub confirmations: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_at_ms: Option<u64>,
    /// Search only: the rank score (BM25 × recency × confidence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemorySearchReply {
    pub facts: Vec<FactView>,
    /// Characters of `text` returned (≤ `chars_max`).
    pub chars: usize,
    /// More facts matched than fit in `top_k` and `chars_max`.
    pub truncated: bool,
}

/// `cadre.memory.history`: every fact ever held on a topic, newest first (superseded
/// ones included).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHistoryRequest {
    pub topic: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryHistoryReply {
    pub topic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    pub facts: Vec<FactView>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_write_reads_back_as_written() {
        let author = Author {
            actor: "archivist".into(),
            task_id: Some("t1".into()),
            step_id: None,
        };
        for op in [
            WriteOp::Put {
                key: "project.a.b".into(),
                value: json!({"x": [1, 2]}),
                expected_version: Some(3),
            },
            WriteOp::Checkpoint { name: "cp".into() },
            WriteOp::Rollback {
                checkpoint: "cp".into(),
            },
            WriteOp::Fact(FactProposal {
                topic: "client.a".into(),
                kind: FactKind::Heuristic,
                text: "t".into(),
                value: json!("v"),
                confidence: 0.5,
                sources: vec!["t1".into()],
            }),
        ] {
            let write = KnowledgeWrite {
                id: "w1".into(),
                author: author.clone(),
                made_at_ms: 7,
                reason: "r".into(),
                op,
            };
            let text = serde_json::to_string(&write).unwrap();
            assert_eq!(
                serde_json::from_str::<KnowledgeWrite>(&text).unwrap(),
                write,
                "{text}"
            );
        }
        let put: KnowledgeWrite = serde_json::from_value(json!({
            "id": "w2", "author": {"actor": "operator"}, "made_at_ms": 1,
            "op": "context", "key": "pref.x", "value": null
        }))
        .unwrap();
        assert!(matches!(
            put.op,
            WriteOp::Put {
                expected_version: None,
                ..
            }
        ));
    }
}
