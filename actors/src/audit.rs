//! Audit records: building them from what a node does, and reading them back.
//!
//! The chain itself (sequence, hashes, verification) is `storage::chain`; this module
//! says what goes in a record. Every record is appended in the same synced batch as
//! the transition it describes (`storage::Batch::append_audit`), so the audit log and
//! the state can never disagree.

use sha2::{Digest, Sha256};
use storage::chain::Link;

use crate::json_write::{field_num, field_str, number};
use crate::model::{JsonText, Task};
use crate::protocol::{AuditEntry, AuditRecord, AuditRecordJson, TaskEvent};
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
            task_id: Some(task.id.clone()),
            plan: Some(self.plan.clone()),
            input_ref: Some(self.input_ref.clone()),
            ..AuditRecord::new(at_ms, node_id, actor, "", "")
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

    /// Appends the entry's JSON to `out`: byte for byte what `serde_json` writes for
    /// [`AuditEntryJson`] (tested against it), written by hand because the publisher
    /// writes one per record, 18 per task, and `serde_json`'s call per field and its
    /// byte-by-byte escape scan were 8 % of a task's instructions. Field names are
    /// literals here; strings are scanned 8 bytes at a time ([`crate::json_write::string`]).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let r = &self.record;
        out.extend_from_slice(b"{\"seq\":");
        number(out, self.link.seq);
        out.extend_from_slice(b",\"hash\":\"");
        out.extend_from_slice(storage::codec::to_hex(&self.link.hash).as_bytes());
        out.extend_from_slice(b"\",\"prev_hash\":\"");
        out.extend_from_slice(storage::codec::to_hex(&self.link.prev_hash).as_bytes());
        out.extend_from_slice(b"\",\"record\":{\"at_ms\":");
        number(out, r.at_ms);
        field_str(out, b",\"node_id\":", Some(r.node_id));
        field_str(out, b",\"actor\":", Some(r.actor));
        field_str(out, b",\"operator\":", r.operator);
        field_str(out, b",\"action\":", Some(r.action));
        field_str(out, b",\"task_id\":", r.task_id);
        field_str(out, b",\"step_id\":", r.step_id);
        field_num(out, b",\"attempt\":", r.attempt);
        field_str(out, b",\"plan\":", r.plan);
        field_str(out, b",\"tool\":", r.tool);
        field_str(out, b",\"args_hash\":", r.args_hash);
        field_str(out, b",\"params\":", r.params);
        field_str(out, b",\"input_ref\":", r.input_ref);
        field_str(out, b",\"outcome\":", Some(r.outcome));
        field_str(out, b",\"detail\":", r.detail);
        field_num(out, b",\"duration_ms\":", r.duration_ms);
        field_num(out, b",\"cost_usd\":", r.cost_usd);
        out.extend_from_slice(b"}}");
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
        let full = full();
        AuditRecord::new(
            full.at_ms,
            &full.node_id,
            &full.actor,
            &full.action,
            &full.outcome,
        )
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
    /// `AuditRecordJson`'s order, and writes its JSON by hand: it must write what
    /// serde_json writes for the owned entry.
    #[test]
    fn a_link_entry_writes_what_the_owned_entry_writes() {
        let mut head = Head::EMPTY;
        let odd = AuditRecord {
            detail: Some("tab\t nul\u{0} bell\u{7} del\u{7f} \u{2028} \\\" end".into()),
            cost_usd: Some(f64::NAN),
            ..full()
        };
        for record in [full(), sparse(), odd] {
            let link = head.append(storage::codec::to_wire(&record).unwrap());
            let owned = serde_json::to_string(&entry(&link).unwrap()).unwrap();
            let mut borrowed = Vec::new();
            LinkEntry::decode(&link).unwrap().write_json(&mut borrowed);
            let borrowed = String::from_utf8(borrowed).unwrap();
            assert_eq!(borrowed, owned);
            if record.cost_usd.is_some_and(f64::is_nan) {
                continue;
            }
            let back: AuditEntry = serde_json::from_str(&borrowed).unwrap();
            assert_eq!(back.record, record);
        }
        let torn = head.append(b"\x05ab".to_vec());
        assert!(LinkEntry::decode(&torn).is_err());
    }
}
