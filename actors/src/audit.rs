//! Audit records: building them from what a node does, and reading them back.
//!
//! The chain itself (sequence, hashes, verification) is `storage::chain`; this module
//! says what goes in a record. Every record is appended in the same synced batch as
//! the transition it describes (`storage::Batch::append_audit`), so the audit log and
//! the state can never disagree.

use serde::Serialize;
use sha2::{Digest, Sha256};
use storage::chain::Link;

use crate::model::{JsonText, Task};
use crate::protocol::{AuditEntry, AuditEntryJson, AuditRecord, AuditRecordJson, TaskEvent};
use crate::redact;

/// sha256 of params as sent: the same `args_hash` the effect ledger records.
pub fn args_hash(params: &JsonText) -> String {
    storage::codec::to_hex(&Sha256::digest(params.0.as_bytes()))
}

/// Params as they may appear in an audit record: redacted, as JSON text.
pub fn redacted_params(params: &JsonText) -> String {
    // Nothing secret-looking anywhere in the text, keys included: nothing to mask, and
    // the params go as sent (the text `args_hash` hashes), without a parse and rewrite.
    if !redact::might_hold_secret(&params.0) {
        return params.0.clone();
    }
    match params.to_value() {
        Ok(v) => crate::model::compact_json(&redact::value(&v)),
        Err(_) => redact::text(&params.0),
    }
}

/// The pointer to a task's input context: where it lives and what it hashed to.
pub fn input_ref(task: &Task) -> String {
    let digest = storage::codec::to_hex(&Sha256::digest(task.input.0.as_bytes()));
    format!("tasks/{}#input sha256:{}", task.id, &digest[..16])
}

/// `<playbook>@<version>`: the plan an action belongs to.
pub fn plan_of(task: &Task) -> String {
    if task.playbook_version.is_empty() {
        task.playbook.clone()
    } else {
        format!("{}@{}", task.playbook, task.playbook_version)
    }
}

/// What every record of one task repeats, computed once per task actor rather than
/// once per record (the input pointer hashes the whole input).
#[derive(Debug, Clone, Default)]
pub struct TaskFacts {
    plan: String,
    input_ref: String,
}

impl TaskFacts {
    pub fn of(task: &Task) -> TaskFacts {
        TaskFacts {
            plan: plan_of(task),
            input_ref: input_ref(task),
        }
    }

    /// Up to date with `task` (its plan version arrives with the plan).
    pub fn refresh(&mut self, task: &Task) {
        if !task.playbook_version.is_empty() && !self.plan.ends_with(&task.playbook_version) {
            self.plan = plan_of(task);
        }
    }

    /// A record for `task` with everything but the action filled in.
    pub fn record(&self, task: &Task, node_id: &str, actor: &str, at_ms: u64) -> AuditRecord {
        AuditRecord {
            at_ms,
            node_id: node_id.to_string(),
            actor: actor.to_string(),
            operator: None,
            action: String::new(),
            task_id: Some(task.id.clone()),
            step_id: None,
            attempt: None,
            plan: Some(self.plan.clone()),
            tool: None,
            args_hash: None,
            params: None,
            input_ref: Some(self.input_ref.clone()),
            outcome: String::new(),
            detail: None,
            duration_ms: None,
            cost_usd: None,
        }
    }
}

/// The record of one committed task event. `actor` is who caused it.
pub fn of_event(facts: &TaskFacts, task: &Task, event: &TaskEvent, actor: &str) -> AuditRecord {
    let mut r = facts.record(task, &event.node_id, actor, event.at_ms);
    r.action = event.kind.clone();
    r.step_id = event.step_id.clone();
    r.attempt = event.attempt;
    r.detail = event.detail.as_deref().map(redact::text);
    if let Some(step) = event.step_id.as_deref().and_then(|s| task.step(s)) {
        r.tool = Some(step.spec.tool.clone());
        if event.kind == "step_succeeded" || event.kind == "step_failed" {
            r.duration_ms = match (step.started_at_ms, step.finished_at_ms) {
                (Some(s), Some(f)) => Some(f.saturating_sub(s)),
                _ => None,
            };
        }
    }
    r.outcome = outcome_of(&event.kind).to_string();
    r
}

/// The outcome word for an event kind.
fn outcome_of(kind: &str) -> &str {
    match kind {
        "step_succeeded" | "succeeded" => "ok",
        "step_failed" | "failed" => "failed",
        "step_retry" => "retry",
        "step_redelivery" => "resend",
        "step_outcome_unknown" => "unknown",
        "step_started" => "dispatched",
        "cancelled" => "cancelled",
        "step_resolved" => "decided",
        // Status changes: the new status is the outcome.
        other => other,
    }
}

/// Decodes a stored link into the entry published and answered.
pub fn entry(link: &Link) -> Result<AuditEntry, storage::CodecError> {
    Ok(AuditEntry {
        seq: link.seq,
        hash: storage::codec::to_hex(&link.hash),
        prev_hash: storage::codec::to_hex(&link.prev_hash),
        record: storage::codec::from_wire(&link.payload)?,
    })
}

/// A stored link as the entry it makes, for writing as JSON: the same text as
/// [`entry`]'s, with the record decoded in place (its strings borrowed from the link,
/// not copied). What the publisher writes for every link.
pub struct LinkEntry<'a> {
    link: &'a Link,
    record: AuditRecordJson<'a>,
}

impl<'a> LinkEntry<'a> {
    pub fn decode(link: &'a Link) -> Result<LinkEntry<'a>, storage::CodecError> {
        Ok(LinkEntry {
            link,
            record: storage::codec::from_wire(&link.payload)?,
        })
    }
}

impl Serialize for LinkEntry<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let hash = storage::codec::to_hex(&self.link.hash);
        let prev_hash = storage::codec::to_hex(&self.link.prev_hash);
        AuditEntryJson {
            seq: self.link.seq,
            hash: &hash,
            prev_hash: &prev_hash,
            record: self.record,
        }
        .serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use storage::chain::Head;

    use super::*;

    fn full() -> AuditRecord {
        AuditRecord {
            at_ms: 1_765_000_000_123,
            node_id: "laptop".into(),
            actor: "executor@laptop".into(),
            operator: Some("ana".into()),
            action: "step_executed".into(),
            task_id: Some("01JTASK".into()),
            step_id: Some("folder".into()),
            attempt: Some(2),
            plan: Some("client-onboarding@3".into()),
            tool: Some("file.write".into()),
            args_hash: Some("ab".repeat(32)),
            params: Some(r#"{"path":"/srv/a \"b\"\n","token":"[redacted]"}"#.into()),
            input_ref: Some("tasks/01JTASK#input sha256:0123456789abcdef".into()),
            outcome: "ok".into(),
            detail: Some("wrote 12 bytes — ünïcode".into()),
            duration_ms: Some(17),
            cost_usd: Some(0.25),
        }
    }

    fn sparse() -> AuditRecord {
        AuditRecord {
            operator: None,
            task_id: None,
            step_id: None,
            attempt: None,
            plan: None,
            tool: None,
            args_hash: None,
            params: None,
            input_ref: None,
            detail: None,
            duration_ms: None,
            cost_usd: None,
            ..full()
        }
    }

    #[test]
    fn params_without_secrets_go_as_sent_and_a_secret_anywhere_is_masked() {
        let plain = JsonText(r##"{"path":"/srv/a.md","content":"# Acme","n":1.5}"##.into());
        assert_eq!(redacted_params(&plain), plain.0);
        let keyed = JsonText(r#"{"url":"https://x","headers":{"X-Api-Key":"k1"}}"#.into());
        assert_eq!(
            redacted_params(&keyed),
            r#"{"url":"https://x","headers":{"X-Api-Key":"[redacted]"}}"#
        );
        let inline = JsonText(r#"{"cmd":["curl","-H","Authorization: Bearer abc"]}"#.into());
        assert!(!redacted_params(&inline).contains("abc"));
    }

    /// The publisher's in-place decode reads the stored record field by field in
    /// `AuditRecordJson`'s order: it must write what the owned entry writes.
    #[test]
    fn a_link_entry_writes_what_the_owned_entry_writes() {
        let mut head = Head::EMPTY;
        for record in [full(), sparse()] {
            let link = head.append(storage::codec::to_wire(&record).unwrap());
            let owned = serde_json::to_string(&entry(&link).unwrap()).unwrap();
            let borrowed = serde_json::to_string(&LinkEntry::decode(&link).unwrap()).unwrap();
            assert_eq!(borrowed, owned);
            let back: AuditEntry = serde_json::from_str(&borrowed).unwrap();
            assert_eq!(back.record, record);
        }
        let torn = head.append(b"\x05ab".to_vec());
        assert!(LinkEntry::decode(&torn).is_err());
    }
}
