//! Knowledge: the versioned context store and consolidated memory, as this node holds
//! them.
//!
//! Every write is a message of the `CADRE_KNOWLEDGE` stream. Each node applies the
//! stream in order to its own RocksDB ([`apply`]), with the same checks, so every node
//! reaches the same versions and rejects the same writes; reads answer from the local
//! copy, offline too. Validation at apply time rather than at the broker is what lets
//! one message change many keys at once (a rollback) and lets a write made offline be
//! judged against what happened meanwhile: it is applied or rejected with a conflict,
//! never lost.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use storage::{Batch, Cf, Store, StoreError};

use crate::model::JsonText;
use crate::protocol::ErrorCode;
use crate::protocol::knowledge::{
    Author, ContextEntry, FactKind, FactProposal, FactView, KeyVersion, KnowledgeWrite, WriteOp,
    WriteStatus, WriteView,
};

pub mod index;
pub mod recall;

/// The first token of a context key says what kind of knowledge it holds.
pub const KEY_NAMESPACES: &[&str] = &["fact", "pref", "project", "action", "safety"];
/// Longest key or topic, in bytes.
pub const KEY_BYTES_MAX: usize = 200;
/// Largest value (as JSON) one version may hold.
pub const VALUE_BYTES_MAX: usize = 64 << 10;
/// Longest reason, fact text.
pub const REASON_CHARS_MAX: usize = 500;
pub const FACT_TEXT_CHARS_MAX: usize = 2000;
/// Source episodes a fact keeps (the latest).
pub const FACT_SOURCES_MAX: usize = 32;
/// Confirmations raise confidence (noisy-or) up to this.
const CONFIDENCE_MAX: f64 = 0.99;
/// Versions a time-travel read walks back through at most.
const HISTORY_SCAN_MAX: usize = 100_000;
/// Keys a rollback reads per page.
const ROLLBACK_PAGE: usize = 1024;

const META_APPLIED_SEQ: &[u8] = b"knowledge_applied_seq";
/// The last stream sequence that changed the search index: an index committed below it
/// is rebuilt at start.
const META_INDEX_SEQ: &[u8] = b"knowledge_index_seq";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    pub message: String,
}

fn invalid(message: impl Into<String>) -> Invalid {
    Invalid {
        message: message.into(),
    }
}

/// `project.acme.status`: dotted tokens of letters, digits, `-` and `_`.
fn check_dotted(what: &str, s: &str) -> Result<(), Invalid> {
    if s.is_empty() || s.len() > KEY_BYTES_MAX {
        return Err(invalid(format!(
            "{what} `{s}` must be 1 to {KEY_BYTES_MAX} bytes"
        )));
    }
    if !s.split('.').all(crate::protocol::subject::is_token) {
        return Err(invalid(format!(
            "{what} `{s}` must be dot-separated words of letters, digits, `-` or `_`"
        )));
    }
    Ok(())
}

/// A context key: `<namespace>.<name>…` with a namespace from [`KEY_NAMESPACES`].
pub fn check_key(key: &str) -> Result<(), Invalid> {
    check_dotted("key", key)?;
    let ns = key.split('.').next().unwrap_or_default();
    if !KEY_NAMESPACES.contains(&ns) || !key.contains('.') {
        return Err(invalid(format!(
            "key `{key}` must start with a namespace ({}) and a name: `project.acme.status`",
            KEY_NAMESPACES.join(", ")
        )));
    }
    Ok(())
}

pub fn check_topic(topic: &str) -> Result<(), Invalid> {
    check_dotted("topic", topic)
}

/// A checkpoint name: one token.
pub fn check_name(name: &str) -> Result<(), Invalid> {
    if crate::protocol::subject::is_token(name) {
        Ok(())
    } else {
        Err(invalid(format!(
            "checkpoint name `{name}` must be letters, digits, `-` or `_`"
        )))
    }
}

fn check_value(value: &Value) -> Result<(), Invalid> {
    let len = value.to_string().len();
    if len > VALUE_BYTES_MAX {
        return Err(invalid(format!(
            "value is {len} bytes as JSON; at most {VALUE_BYTES_MAX}"
        )));
    }
    Ok(())
}

pub fn check_proposal(f: &FactProposal) -> Result<(), Invalid> {
    check_topic(&f.topic)?;
    check_value(&f.value)?;
    let chars = f.text.chars().count();
    if f.text.trim().is_empty() || chars > FACT_TEXT_CHARS_MAX {
        return Err(invalid(format!(
            "fact text must be 1 to {FACT_TEXT_CHARS_MAX} characters"
        )));
    }
    if !(0.0..=1.0).contains(&f.confidence) {
        return Err(invalid(format!(
            "confidence {} must be between 0 and 1",
            f.confidence
        )));
    }
    // Only verified work becomes a fact: it names the episodes it came from.
    if f.sources.is_empty() || f.sources.len() > FACT_SOURCES_MAX {
        return Err(invalid(format!(
            "a fact names 1 to {FACT_SOURCES_MAX} source episodes (task ids)"
        )));
    }
    if let Some(bad) = f
        .sources
        .iter()
        .find(|s| !crate::protocol::subject::is_token(s))
    {
        return Err(invalid(format!("source `{bad}` is not a task id")));
    }
    Ok(())
}

/// Checks a write before it is published (the appliers check it again).
pub fn check_write(w: &KnowledgeWrite) -> Result<(), Invalid> {
    if !crate::protocol::subject::is_token(&w.id) {
        return Err(invalid(format!(
            "write_id `{}` must be letters, digits, `-` or `_`",
            w.id
        )));
    }
    if w.reason.chars().count() > REASON_CHARS_MAX {
        return Err(invalid(format!(
            "reason is longer than {REASON_CHARS_MAX} characters"
        )));
    }
    match &w.op {
        WriteOp::Put { key, value, .. } => {
            check_key(key)?;
            check_value(value)
        }
        WriteOp::Checkpoint { name } => check_name(name),
        WriteOp::Rollback { checkpoint } => check_name(checkpoint),
        WriteOp::Fact(f) => check_proposal(f),
    }
}

// ---------------------------------------------------------------------------------------
// Stored records (postcard: no `skip_serializing_if`, no `Value`)
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredAuthor {
    actor: String,
    task_id: Option<String>,
    step_id: Option<String>,
}

impl From<&Author> for StoredAuthor {
    fn from(a: &Author) -> Self {
        StoredAuthor {
            actor: a.actor.clone(),
            task_id: a.task_id.clone(),
            step_id: a.step_id.clone(),
        }
    }
}

impl From<StoredAuthor> for Author {
    fn from(a: StoredAuthor) -> Self {
        Author {
            actor: a.actor,
            task_id: a.task_id,
            step_id: a.step_id,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredVersion {
    version: u64,
    /// `None`: this version deleted the key.
    value: Option<JsonText>,
    author: StoredAuthor,
    reason: String,
    at_ms: u64,
    made_at_ms: u64,
    seq: u64,
    write_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredCheckpoint {
    /// The state it names: every version written below this stream sequence.
    seq: u64,
    at_ms: u64,
    author: StoredAuthor,
    reason: String,
}

/// What became of a write, kept under its id on every node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub seq: u64,
    pub op: String,
    pub name: String,
    pub applied: bool,
    pub version: Option<u64>,
    pub changed: Vec<(String, u64)>,
    pub code: Option<ErrorCode>,
    pub error: Option<String>,
    pub current_version: Option<u64>,
}

impl Outcome {
    pub fn view(&self, write_id: &str) -> WriteView {
        WriteView {
            write_id: write_id.to_string(),
            status: if self.applied {
                WriteStatus::Applied
            } else {
                WriteStatus::Rejected
            },
            op: self.op.clone(),
            name: self.name.clone(),
            version: self.version,
            seq: Some(self.seq),
            error: self.error.clone(),
            current_version: self.current_version,
        }
    }

    pub fn changed(&self) -> Vec<KeyVersion> {
        self.changed
            .iter()
            .map(|(key, version)| KeyVersion {
                key: key.clone(),
                version: *version,
            })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredFact {
    pub topic: String,
    pub kind: FactKind,
    pub text: String,
    pub value: JsonText,
    pub confidence: f64,
    pub sources: Vec<String>,
    pub created_at_ms: u64,
    pub last_confirmed_ms: u64,
    pub confirmations: u32,
    pub superseded_by: Option<String>,
    pub superseded_at_ms: Option<u64>,
    pub seq: u64,
}

impl StoredFact {
    pub fn view(&self, id: &str) -> FactView {
        FactView {
            id: id.to_string(),
            topic: self.topic.clone(),
            kind: self.kind,
            text: self.text.clone(),
            value: self.value.to_value_lossy(),
            confidence: self.confidence,
            sources: self.sources.clone(),
            created_at_ms: self.created_at_ms,
            last_confirmed_ms: self.last_confirmed_ms,
            confirmations: self.confirmations,
            superseded_by: self.superseded_by.clone(),
            superseded_at_ms: self.superseded_at_ms,
            score: None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------

fn version_prefix(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 3);
    k.extend_from_slice(b"v/");
    k.extend_from_slice(key.as_bytes());
    k.push(0);
    k
}

fn version_key(key: &str, version: u64) -> Vec<u8> {
    let mut k = version_prefix(key);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn latest_key(key: &str) -> Vec<u8> {
    [b"l/", key.as_bytes()].concat()
}

fn checkpoint_key(name: &str) -> Vec<u8> {
    [b"k/", name.as_bytes()].concat()
}

fn outcome_key(write_id: &str) -> Vec<u8> {
    [b"w/", write_id.as_bytes()].concat()
}

fn fact_key(id: &str) -> Vec<u8> {
    [b"f/", id.as_bytes()].concat()
}

fn current_key(topic: &str) -> Vec<u8> {
    [b"c/", topic.as_bytes()].concat()
}

fn topic_prefix(topic: &str) -> Vec<u8> {
    [b"t/", topic.as_bytes(), b"\0"].concat()
}

// ---------------------------------------------------------------------------------------
// Apply
// ---------------------------------------------------------------------------------------

/// A change the search index must follow.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexChange {
    Upsert {
        id: String,
        topic: String,
        text: String,
    },
    Remove {
        id: String,
    },
}

/// What applying one message did.
#[derive(Debug)]
pub struct Applied {
    pub write_id: String,
    pub outcome: Outcome,
    pub index: Vec<IndexChange>,
}

/// The last stream sequence that changed the search index.
pub fn index_seq(store: &Store) -> Result<u64, StoreError> {
    Ok(store.get::<u64>(Cf::Meta, META_INDEX_SEQ)?.unwrap_or(0))
}

/// Moves past a message that is not a knowledge write (nothing else changes).
pub fn skip(store: &Store, seq: u64) -> Result<(), StoreError> {
    let mut batch = Batch::new();
    batch.put(Cf::Meta, META_APPLIED_SEQ, &seq)?;
    store.write_unsynced(batch)
}

/// The last stream sequence this node applied (0: none).
pub fn applied_seq(store: &Store) -> Result<u64, StoreError> {
    Ok(store.get::<u64>(Cf::Meta, META_APPLIED_SEQ)?.unwrap_or(0))
}

/// Applies the message at stream sequence `seq`, which entered the stream at `at_ms`,
/// in one atomic write with the new applied sequence. `None` for a message applied
/// before (its outcome stays as it was). Unsynced: the stream is the durable copy, and
/// a crash that loses the tail applies it again.
pub fn apply(
    store: &Store,
    seq: u64,
    at_ms: u64,
    write: &KnowledgeWrite,
) -> Result<Option<Applied>, StoreError> {
    let mut batch = Batch::new();
    batch.put(Cf::Meta, META_APPLIED_SEQ, &seq)?;
    // The same write published twice (past the stream's duplicate window) counts once.
    if store.contains(Cf::Context, &outcome_key(&write.id))? {
        store.write_unsynced(batch)?;
        return Ok(None);
    }
    let mut index = Vec::new();
    let (op, name) = op_name(&write.op);
    let mut outcome = Outcome {
        seq,
        op: op.into(),
        name: name.into(),
        applied: true,
        version: None,
        changed: Vec::new(),
        code: None,
        error: None,
        current_version: None,
    };
    let result = match check_write(write) {
        Err(e) => Err((ErrorCode::InvalidRequest, e.message, None)),
        Ok(()) => match &write.op {
            WriteOp::Put {
                key,
                value,
                expected_version,
            } => apply_put(
                store,
                &mut batch,
                Put {
                    key,
                    value,
                    expected: *expected_version,
                    seq,
                    at_ms,
                    write,
                },
            ),
            WriteOp::Checkpoint { name } => {
                apply_checkpoint(store, &mut batch, name, seq, at_ms, write)
            }
            WriteOp::Rollback { checkpoint } => {
                apply_rollback(store, &mut batch, checkpoint, seq, at_ms, write)
            }
            WriteOp::Fact(f) => apply_fact(store, &mut batch, f, seq, at_ms, write, &mut index),
        },
    };
    match result {
        Ok(Done { version, changed }) => {
            outcome.version = version;
            outcome.changed = changed;
        }
        Err((code, message, current)) => {
            outcome.applied = false;
            outcome.code = Some(code);
            outcome.error = Some(message);
            outcome.current_version = current;
            // Nothing of a rejected write is kept but its outcome.
            batch = Batch::new();
            batch.put(Cf::Meta, META_APPLIED_SEQ, &seq)?;
            index.clear();
        }
    }
    batch.put(Cf::Context, outcome_key(&write.id), &outcome)?;
    if !index.is_empty() {
        batch.put(Cf::Meta, META_INDEX_SEQ, &seq)?;
    }
    store.write_unsynced(batch)?;
    Ok(Some(Applied {
        write_id: write.id.clone(),
        outcome,
        index,
    }))
}

pub fn op_name(op: &WriteOp) -> (&'static str, &str) {
    match op {
        WriteOp::Put { key, .. } => ("context", key),
        WriteOp::Checkpoint { name } => ("checkpoint", name),
        WriteOp::Rollback { checkpoint } => ("rollback", checkpoint),
        WriteOp::Fact(f) => ("fact", &f.topic),
    }
}

struct Done {
    version: Option<u64>,
    changed: Vec<(String, u64)>,
}

type Rejection = (ErrorCode, String, Option<u64>);

struct Put<'a> {
    key: &'a str,
    value: &'a Value,
    expected: Option<u64>,
    seq: u64,
    at_ms: u64,
    write: &'a KnowledgeWrite,
}

fn apply_put(store: &Store, batch: &mut Batch, put: Put<'_>) -> Result<Done, Rejection> {
    let internal = |e: StoreError| (ErrorCode::Internal, e.to_string(), None);
    let latest = latest_version(store, put.key).map_err(internal)?;
    let current = latest.as_ref().map_or(0, |v| v.version);
    if let Some(expected) = put.expected
        && expected != current
    {
        return Err((
            ErrorCode::Conflict,
            format!("key `{}` is at version {current}, not {expected}", put.key),
            Some(current),
        ));
    }
    let deleted = latest.as_ref().is_none_or(|v| v.value.is_none());
    if put.value.is_null() && deleted {
        return Err((
            ErrorCode::NotFound,
            format!("key `{}` has no value to delete", put.key),
            Some(current),
        ));
    }
    let value = (!put.value.is_null()).then(|| JsonText::from_value(put.value));
    let version = write_version(
        batch,
        put.key,
        latest.as_ref(),
        value,
        VersionMeta {
            seq: put.seq,
            at_ms: put.at_ms,
            write: put.write,
            reason: &put.write.reason,
        },
    )
    .map_err(internal)?;
    Ok(Done {
        version: Some(version),
        changed: Vec::new(),
    })
}

struct VersionMeta<'a> {
    seq: u64,
    at_ms: u64,
    write: &'a KnowledgeWrite,
    reason: &'a str,
}

fn write_version(
    batch: &mut Batch,
    key: &str,
    latest: Option<&StoredVersion>,
    value: Option<JsonText>,
    meta: VersionMeta<'_>,
) -> Result<u64, StoreError> {
    let version = latest.map_or(0, |v| v.version) + 1;
    let record = StoredVersion {
        version,
        value,
        author: (&meta.write.author).into(),
        reason: meta.reason.to_string(),
        // Never before the version it follows, so "at a time" reads stay ordered.
        at_ms: meta.at_ms.max(latest.map_or(0, |v| v.at_ms)),
        made_at_ms: meta.write.made_at_ms,
        seq: meta.seq,
        write_id: meta.write.id.clone(),
    };
    batch.put(Cf::Context, version_key(key, version), &record)?;
    batch.put(Cf::Context, latest_key(key), &version)?;
    Ok(version)
}

fn apply_checkpoint(
    store: &Store,
    batch: &mut Batch,
    name: &str,
    seq: u64,
    at_ms: u64,
    write: &KnowledgeWrite,
) -> Result<Done, Rejection> {
    let internal = |e: StoreError| (ErrorCode::Internal, e.to_string(), None);
    if store
        .contains(Cf::Context, &checkpoint_key(name))
        .map_err(internal)?
    {
        return Err((
            ErrorCode::Conflict,
            format!("checkpoint `{name}` exists; checkpoints are never replaced"),
            None,
        ));
    }
    let record = StoredCheckpoint {
        seq,
        at_ms,
        author: (&write.author).into(),
        reason: write.reason.clone(),
    };
    batch
        .put(Cf::Context, checkpoint_key(name), &record)
        .map_err(internal)?;
    Ok(Done {
        version: None,
        changed: Vec::new(),
    })
}

fn apply_rollback(
    store: &Store,
    batch: &mut Batch,
    checkpoint: &str,
    seq: u64,
    at_ms: u64,
    write: &KnowledgeWrite,
) -> Result<Done, Rejection> {
    let internal = |e: StoreError| (ErrorCode::Internal, e.to_string(), None);
    let Some(cp) = store
        .get::<StoredCheckpoint>(Cf::Context, &checkpoint_key(checkpoint))
        .map_err(internal)?
    else {
        return Err((
            ErrorCode::NotFound,
            format!("no checkpoint named `{checkpoint}`"),
            None,
        ));
    };
    let reason = if write.reason.is_empty() {
        format!("rollback to checkpoint `{checkpoint}`")
    } else {
        format!("rollback to checkpoint `{checkpoint}`: {}", write.reason)
    };
    let mut changed = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store
            .prefixed::<u64>(Cf::Context, b"l/", after.as_deref(), false, ROLLBACK_PAGE)
            .map_err(internal)?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (lkey, _) in &page {
            let key = String::from_utf8_lossy(&lkey[2..]).into_owned();
            let Some(latest) = latest_version(store, &key).map_err(internal)? else {
                continue;
            };
            if latest.seq < cp.seq {
                continue; // untouched since the checkpoint
            }
            let then = version_before_seq(store, &key, cp.seq).map_err(internal)?;
            let then_value = then.and_then(|v| v.value);
            if then_value == latest.value {
                continue;
            }
            let version = write_version(
                batch,
                &key,
                Some(&latest),
                then_value,
                VersionMeta {
                    seq,
                    at_ms,
                    write,
                    reason: &reason,
                },
            )
            .map_err(internal)?;
            changed.push((key, version));
        }
        if page.len() < ROLLBACK_PAGE {
            break;
        }
    }
    Ok(Done {
        version: None,
        changed,
    })
}

fn apply_fact(
    store: &Store,
    batch: &mut Batch,
    f: &FactProposal,
    seq: u64,
    at_ms: u64,
    write: &KnowledgeWrite,
    index: &mut Vec<IndexChange>,
) -> Result<Done, Rejection> {
    let internal = |e: StoreError| (ErrorCode::Internal, e.to_string(), None);
    let current = match store
        .get::<String>(Cf::Facts, &current_key(&f.topic))
        .map_err(internal)?
    {
        Some(id) => store
            .get::<StoredFact>(Cf::Facts, &fact_key(&id))
            .map_err(internal)?
            .map(|fact| (id, fact)),
        None => None,
    };
    if let Some((id, mut fact)) = current {
        if fact.value.to_value().ok().as_ref() == Some(&f.value) {
            // The same fact again: it is confirmed, not duplicated.
            fact.last_confirmed_ms = fact.last_confirmed_ms.max(at_ms);
            fact.confirmations = fact.confirmations.saturating_add(1);
            fact.confidence = (1.0 - (1.0 - fact.confidence) * (1.0 - f.confidence))
                .clamp(fact.confidence, CONFIDENCE_MAX.max(fact.confidence));
            for s in &f.sources {
                if !fact.sources.contains(s) {
                    fact.sources.push(s.clone());
                }
            }
            let excess = fact.sources.len().saturating_sub(FACT_SOURCES_MAX);
            fact.sources.drain(..excess);
            batch
                .put(Cf::Facts, fact_key(&id), &fact)
                .map_err(internal)?;
            index.push(IndexChange::Upsert {
                id,
                topic: fact.topic.clone(),
                text: fact.text.clone(),
            });
            return Ok(Done {
                version: None,
                changed: Vec::new(),
            });
        }
        // A contradiction: the new fact supersedes the old, which stays in history.
        fact.superseded_by = Some(write.id.clone());
        fact.superseded_at_ms = Some(at_ms);
        batch
            .put(Cf::Facts, fact_key(&id), &fact)
            .map_err(internal)?;
        index.push(IndexChange::Remove { id });
    }
    let mut sources = f.sources.clone();
    sources.dedup();
    let fact = StoredFact {
        topic: f.topic.clone(),
        kind: f.kind,
        text: f.text.clone(),
        value: JsonText::from_value(&f.value),
        confidence: f.confidence.min(CONFIDENCE_MAX),
        sources,
        created_at_ms: at_ms,
        last_confirmed_ms: at_ms,
        confirmations: 1,
        superseded_by: None,
        superseded_at_ms: None,
        seq,
    };
    let mut history_key = topic_prefix(&f.topic);
    history_key.extend_from_slice(&seq.to_be_bytes());
    batch
        .put(Cf::Facts, fact_key(&write.id), &fact)
        .and_then(|b| b.put(Cf::Facts, current_key(&f.topic), &write.id))
        .and_then(|b| b.put(Cf::Facts, history_key, &write.id))
        .map_err(internal)?;
    index.push(IndexChange::Upsert {
        id: write.id.clone(),
        topic: fact.topic,
        text: fact.text,
    });
    Ok(Done {
        version: None,
        changed: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------

fn latest_version(store: &Store, key: &str) -> Result<Option<StoredVersion>, StoreError> {
    match store.get::<u64>(Cf::Context, &latest_key(key))? {
        Some(v) => store.get(Cf::Context, &version_key(key, v)),
        None => Ok(None),
    }
}

/// The newest version written below stream sequence `seq`.
fn version_before_seq(
    store: &Store,
    key: &str,
    seq: u64,
) -> Result<Option<StoredVersion>, StoreError> {
    newest_where(store, key, |v| v.seq < seq)
}

fn newest_where(
    store: &Store,
    key: &str,
    mut keep: impl FnMut(&StoredVersion) -> bool,
) -> Result<Option<StoredVersion>, StoreError> {
    let prefix = version_prefix(key);
    let mut after: Option<Vec<u8>> = None;
    let mut walked = 0;
    while walked < HISTORY_SCAN_MAX {
        let page =
            store.prefixed::<StoredVersion>(Cf::Context, &prefix, after.as_deref(), true, 256)?;
        let Some((last, _)) = page.last() else {
            return Ok(None);
        };
        after = Some(last.clone());
        walked += page.len();
        if let Some((_, v)) = page.into_iter().find(|(_, v)| keep(v)) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

fn entry(key: &str, v: StoredVersion) -> ContextEntry {
    ContextEntry {
        key: key.to_string(),
        version: v.version,
        deleted: v.value.is_none(),
        value: v.value.map_or(Value::Null, |t| t.to_value_lossy()),
        author: v.author.into(),
        reason: v.reason,
        at_ms: v.at_ms,
        made_at_ms: v.made_at_ms,
        seq: v.seq,
        write_id: v.write_id,
    }
}

/// Which version a read asks for.
#[derive(Debug, Clone, Copy)]
pub enum At {
    Latest,
    Version(u64),
    /// The version in force at this time (the stream's clock).
    Time(u64),
}

pub fn get(store: &Store, key: &str, at: At) -> Result<Option<ContextEntry>, StoreError> {
    let v = match at {
        At::Latest => latest_version(store, key)?,
        At::Version(n) => store.get(Cf::Context, &version_key(key, n))?,
        At::Time(t) => newest_where(store, key, |v| v.at_ms <= t)?,
    };
    Ok(v.map(|v| entry(key, v)))
}

/// The latest value of `key`, `None` if absent or deleted.
pub fn value(store: &Store, key: &str) -> Result<Option<Value>, StoreError> {
    Ok(latest_version(store, key)?
        .and_then(|v| v.value)
        .map(|t| t.to_value_lossy()))
}

/// Versions newest first, below `before` (exclusive).
pub fn history(
    store: &Store,
    key: &str,
    before: Option<u64>,
    limit: usize,
) -> Result<Vec<ContextEntry>, StoreError> {
    let after = before.map(|b| version_key(key, b));
    Ok(store
        .prefixed::<StoredVersion>(
            Cf::Context,
            &version_prefix(key),
            after.as_deref(),
            true,
            limit,
        )?
        .into_iter()
        .map(|(_, v)| entry(key, v))
        .collect())
}

/// Latest versions of the keys under `prefix` (a dotted prefix), after `after`.
pub fn list(
    store: &Store,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
    deleted: bool,
) -> Result<(Vec<ContextEntry>, Option<String>), StoreError> {
    let lprefix = latest_key(prefix);
    let mut cursor = after.map(latest_key);
    let mut out = Vec::new();
    loop {
        let page = store.prefixed::<u64>(Cf::Context, &lprefix, cursor.as_deref(), false, 256)?;
        let Some((last, _)) = page.last() else {
            return Ok((out, None));
        };
        cursor = Some(last.clone());
        let full = page.len() == 256;
        for (lkey, version) in page {
            let key = String::from_utf8_lossy(&lkey[2..]).into_owned();
            if let Some(v) = store.get::<StoredVersion>(Cf::Context, &version_key(&key, version))?
                && (deleted || v.value.is_some())
            {
                out.push(entry(&key, v));
                if out.len() >= limit {
                    return Ok((out, Some(key)));
                }
            }
        }
        if !full {
            return Ok((out, None));
        }
    }
}

pub fn outcome(store: &Store, write_id: &str) -> Result<Option<Outcome>, StoreError> {
    store.get(Cf::Context, &outcome_key(write_id))
}

/// The latest rejected writes, newest first (looking at up to `scan_max` outcomes).
pub fn rejected(
    store: &Store,
    limit: usize,
    scan_max: usize,
) -> Result<Vec<WriteView>, StoreError> {
    let rows = store.prefixed::<Outcome>(Cf::Context, b"w/", None, true, scan_max)?;
    Ok(rows
        .into_iter()
        .filter(|(_, o)| !o.applied)
        .take(limit)
        .map(|(k, o)| o.view(&String::from_utf8_lossy(&k[2..])))
        .collect())
}

pub fn fact(store: &Store, id: &str) -> Result<Option<StoredFact>, StoreError> {
    store.get(Cf::Facts, &fact_key(id))
}

/// Every fact held on `topic`, newest first, and the current one's id.
pub fn topic_history(
    store: &Store,
    topic: &str,
    limit: usize,
) -> Result<(Option<String>, Vec<FactView>), StoreError> {
    let current = store.get::<String>(Cf::Facts, &current_key(topic))?;
    let mut facts = Vec::new();
    for (_, id) in store.prefixed::<String>(Cf::Facts, &topic_prefix(topic), None, true, limit)? {
        if let Some(f) = fact(store, &id)? {
            facts.push(f.view(&id));
        }
    }
    Ok((current, facts))
}

/// Every current (not superseded) fact, for rebuilding the search index.
pub fn current_facts(
    store: &Store,
    mut each: impl FnMut(&str, &StoredFact),
) -> Result<usize, StoreError> {
    let mut after: Option<Vec<u8>> = None;
    let mut n = 0;
    loop {
        let page = store.prefixed::<StoredFact>(Cf::Facts, b"f/", after.as_deref(), false, 1024)?;
        let Some((last, _)) = page.last() else {
            return Ok(n);
        };
        after = Some(last.clone());
        let full = page.len() == 1024;
        for (k, f) in &page {
            if f.superseded_by.is_none() {
                each(&String::from_utf8_lossy(&k[2..]), f);
                n += 1;
            }
        }
        if !full {
            return Ok(n);
        }
    }
}

// ---------------------------------------------------------------------------------------
// This node's side: the index, the writes waiting for the stream, who waits for what
// ---------------------------------------------------------------------------------------

/// Shared by the roles of one node: the Knowledge role applies and publishes, the
/// Planner retrieves, the Archivist stages facts.
pub struct Shared {
    pub index: index::MemoryIndex,
    /// Wakes the publisher: a write was staged in `Cf::KnowledgeOutbox`.
    wake: tokio::sync::Notify,
    waiters: std::sync::Mutex<
        std::collections::HashMap<String, Vec<tokio::sync::oneshot::Sender<Outcome>>>,
    >,
}

impl Shared {
    pub fn new(index: index::MemoryIndex) -> Shared {
        Shared {
            index,
            wake: tokio::sync::Notify::new(),
            waiters: Default::default(),
        }
    }

    pub fn wake_publisher(&self) {
        self.wake.notify_one();
    }

    pub async fn publisher_woken(&self) {
        self.wake.notified().await;
    }

    /// Resolves when `write_id` is applied here (register before publishing).
    pub fn wait(&self, write_id: &str) -> tokio::sync::oneshot::Receiver<Outcome> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.entry(write_id.to_string()).or_default().push(tx);
        }
        rx
    }

    pub fn applied(&self, write_id: &str, outcome: &Outcome) {
        let waiting = self
            .waiters
            .lock()
            .ok()
            .and_then(|mut w| w.remove(write_id));
        for tx in waiting.into_iter().flatten() {
            let _ = tx.send(outcome.clone());
        }
    }

    /// Drops waiters that gave up.
    pub fn forget(&self, write_id: &str) {
        if let Ok(mut w) = self.waiters.lock()
            && let Some(list) = w.get_mut(write_id)
        {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                w.remove(write_id);
            }
        }
    }
}

/// Stages `write` for the stream in `batch` (published by the Knowledge role once the
/// batch is written).
pub fn stage(batch: &mut Batch, write: &KnowledgeWrite) -> Result<(), StoreError> {
    let json = serde_json::to_string(write).map_err(|e| StoreError::Commit(e.to_string()))?;
    batch.put(Cf::KnowledgeOutbox, write.id.as_bytes(), &json)?;
    Ok(())
}

pub fn staged_write(store: &Store, id: &str) -> Result<Option<KnowledgeWrite>, StoreError> {
    Ok(store
        .get::<String>(Cf::KnowledgeOutbox, id.as_bytes())?
        .and_then(|json| serde_json::from_str(&json).ok()))
}

pub fn checkpoint_exists(store: &Store, name: &str) -> Result<bool, StoreError> {
    store.contains(Cf::Context, &checkpoint_key(name))
}

/// Writes staged and not yet acknowledged, oldest first.
pub fn staged(store: &Store, limit: usize) -> Result<Vec<KnowledgeWrite>, StoreError> {
    Ok(store
        .prefixed::<String>(Cf::KnowledgeOutbox, b"", None, false, limit)?
        .into_iter()
        .filter_map(|(key, json)| match serde_json::from_str(&json) {
            Ok(write) => Some(write),
            Err(e) => {
                // Written by this binary from a `KnowledgeWrite`: a bug, not input.
                tracing::error!(write_id = %String::from_utf8_lossy(&key), error = %e, "unreadable staged knowledge write");
                None
            }
        })
        .collect())
}

/// Brings the search index up to the store: rebuilt when its last commit is older than
/// the last change to facts. Returns the facts indexed by a rebuild.
pub fn reconcile_index(
    store: &Store,
    index: &index::MemoryIndex,
) -> Result<Option<usize>, index::IndexError> {
    let to_index = |e: StoreError| index::IndexError::Directory {
        path: store.path().display().to_string(),
        message: e.to_string(),
    };
    let needed = index_seq(store).map_err(to_index)?;
    let applied = applied_seq(store).map_err(to_index)?;
    // Behind the last change to facts, or holding facts a fresh store does not have.
    let stale = index.committed_seq()? < needed || (needed == 0 && !index.is_empty());
    if !stale {
        return Ok(None);
    }
    let n = index.rebuild(applied, |add| {
        current_facts(store, |id, f| {
            add(IndexChange::Upsert {
                id: id.to_string(),
                topic: f.topic.clone(),
                text: f.text.clone(),
            })
        })
        .map(|_| ())
        .map_err(to_index)
    })?;
    Ok(Some(n))
}

// ---------------------------------------------------------------------------------------
// Episodes: retention
// ---------------------------------------------------------------------------------------

/// The caps on kept episodes; the oldest go first.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub age_ms_max: u64,
    pub count_max: usize,
    pub bytes_max: u64,
}

/// Episodes removed, by the cap that removed them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub age: usize,
    pub count: usize,
    pub bytes: usize,
}

/// Removes episodes past the caps. Episodes are keyed by task id, a ULID, so key order
/// is the order tasks were made and the key says its age.
pub fn prune_episodes(store: &Store, caps: Retention, now_ms: u64) -> Result<Pruned, StoreError> {
    let sizes = store.value_sizes(Cf::Episodes)?;
    let mut count = sizes.len();
    let mut bytes: u64 = sizes.iter().map(|(_, n)| *n as u64).sum();
    let mut pruned = Pruned::default();
    let mut batch = Batch::new();
    for (key, size) in &sizes {
        let made_ms = std::str::from_utf8(key)
            .ok()
            .and_then(|k| ulid::Ulid::from_string(k).ok())
            .map_or(0, |u| u.timestamp_ms());
        let cap = if now_ms.saturating_sub(made_ms) > caps.age_ms_max {
            &mut pruned.age
        } else if count > caps.count_max {
            &mut pruned.count
        } else if bytes > caps.bytes_max {
            &mut pruned.bytes
        } else {
            break;
        };
        *cap += 1;
        batch.delete(Cf::Episodes, key.clone());
        count -= 1;
        bytes = bytes.saturating_sub(*size as u64);
    }
    if !batch.is_empty() {
        store.write_unsynced(batch)?;
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests;
