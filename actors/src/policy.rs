//! Governance policies: Cedar decides, for each step about to be dispatched, `allow`,
//! `deny` or `require_approval`.
//!
//! Cedar has two effects (permit, forbid), so the three-way decision is two questions:
//! may the step `run` at all (no: deny), and may it `run_unattended` (no: it needs an
//! approval). Policies are validated against `policy/schema.cedarschema`, which gives
//! every attribute a type and always sets it: a typo is an error at load time, never a
//! rule that silently does not match. An error while evaluating denies (fail closed):
//! Cedar skips a policy that errors, and a skipped `forbid` must not become an allow.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::str::FromStr;
use std::sync::LazyLock;

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Decision as CedarDecision, Effect, Entities, EntityId,
    EntityTypeName, EntityUid, PolicyId, PolicySet, Request, RestrictedExpression, Schema,
    ValidationMode, Validator,
};
use miette::Diagnostic;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The types of what policies can see.
pub const SCHEMA: &str = include_str!("policy/schema.cedarschema");
/// The policies a node runs with when no policies directory is configured.
pub const DEFAULT_POLICIES: &str = include_str!("../../policies/default.cedar");
/// Name of the built-in policies, in errors and versions.
pub const BUILTIN_NAME: &str = "builtin:default.cedar";
/// Largest policy file read.
const FILE_BYTES_MAX: u64 = 256 << 10;

/// A policy file that cannot be used, pointing at the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl PolicyError {
    fn whole_file(file: &str, message: impl Into<String>) -> PolicyError {
        PolicyError {
            file: file.to_string(),
            line: 1,
            column: 1,
            message: message.into(),
        }
    }
}

/// What the policies decided for one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ruling {
    Allow,
    Deny,
    RequireApproval,
}

impl Ruling {
    pub fn as_str(self) -> &'static str {
        match self {
            Ruling::Allow => "allow",
            Ruling::Deny => "deny",
            Ruling::RequireApproval => "require_approval",
        }
    }
}

/// A decision and why, with the version of the policies that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub ruling: Ruling,
    /// The `@reason` (or id) of each policy that caused a deny or an approval.
    pub reasons: Vec<String>,
    pub policy_version: String,
}

impl Decision {
    pub fn reason_text(&self) -> String {
        if self.reasons.is_empty() {
            format!("policies {}", self.policy_version)
        } else {
            format!(
                "{} (policies {})",
                self.reasons.join("; "),
                self.policy_version
            )
        }
    }
}

/// Everything a policy can see about a step (see the schema).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepFacts {
    pub persona: String,
    pub task_id: String,
    pub step_id: String,
    pub playbook: String,
    pub tool: String,
    pub node: String,
    pub method: String,
    pub host: String,
    pub path: String,
    pub within_roots: bool,
    pub program: String,
    pub command: String,
    pub recipient: String,
    pub cost_micros: u64,
    pub now_ms: u64,
}

impl StepFacts {
    /// The policies' `context`: every attribute of the schema's `StepContext` (a test
    /// checks it against the schema; at run time it is built directly, because going
    /// through JSON and the schema costs more than the decision), or only those in
    /// `read`, the attributes the policies read when that is known (see
    /// [`context_attributes`]): leaving out the others is something no policy can tell.
    fn context(&self, read: Option<&BTreeSet<String>>) -> Vec<(String, RestrictedExpression)> {
        let secs = self.now_ms / 1000;
        let days = secs / 86_400;
        // 1970-01-01 was a Thursday (4); ISO weekday: Monday 1 … Sunday 7.
        let weekday = (days + 3) % 7 + 1;
        enum Attr<'a> {
            Text(&'a str),
            Long(u64),
            Bool(bool),
        }
        use Attr::{Bool, Long, Text};
        let all = [
            ("task_id", Text(&self.task_id)),
            ("step_id", Text(&self.step_id)),
            ("playbook", Text(&self.playbook)),
            ("tool", Text(&self.tool)),
            ("node", Text(&self.node)),
            ("method", Text(&self.method)),
            ("host", Text(&self.host)),
            ("path", Text(&self.path)),
            ("within_roots", Bool(self.within_roots)),
            ("program", Text(&self.program)),
            ("command", Text(&self.command)),
            ("recipient", Text(&self.recipient)),
            ("cost_micros", Long(self.cost_micros)),
            ("hour", Long(secs % 86_400 / 3600)),
            ("minute", Long(secs % 3600 / 60)),
            ("weekday", Long(weekday)),
        ];
        all.into_iter()
            .filter(|(k, _)| read.is_none_or(|read| read.contains(*k)))
            .map(|(k, v)| {
                let v = match v {
                    Text(t) => RestrictedExpression::new_string(t.to_string()),
                    Long(n) => RestrictedExpression::new_long(i64::try_from(n).unwrap_or(i64::MAX)),
                    Bool(b) => RestrictedExpression::new_bool(b),
                };
                (k.to_string(), v)
            })
            .collect()
    }
}

/// A loaded, validated set of policy files.
pub struct Policies {
    set: PolicySet,
    authorizer: Authorizer,
    run: EntityUid,
    run_unattended: EntityUid,
    /// The set is shaped so that `run_unattended` permitted implies `run` permitted (see
    /// [`unattended_implies_run`]): an allowed step needs one evaluation, not two.
    one_question_allows: bool,
    /// The context attributes the policies read, if every use of `context` is a literal
    /// attribute: only these are built for a question (building the context is a third
    /// of a decision's cost, and a file step's policies read 5 of its 16 attributes).
    context_read: Option<BTreeSet<String>>,
    version: String,
    files: Vec<String>,
    /// What each policy says when it causes a deny or an approval.
    reasons: HashMap<PolicyId, String>,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("version", &self.version)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Policies {
    /// The built-in defaults (`policies/default.cedar`).
    pub fn builtin() -> Policies {
        Policies::from_sources(&[(BUILTIN_NAME.to_string(), DEFAULT_POLICIES.to_string())])
            .unwrap_or_else(|e| panic!("the built-in policies are invalid: {e:?}"))
    }

    /// Every `*.cedar` file of `dir`, in name order.
    pub fn load_dir(dir: &Path) -> Result<Policies, Vec<PolicyError>> {
        let shown = dir.display().to_string();
        let entries = std::fs::read_dir(dir)
            .map_err(|e| vec![PolicyError::whole_file(&shown, format!("cannot read: {e}"))])?;
        let mut paths: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(vec![PolicyError::whole_file(
                &shown,
                "no *.cedar files: a policies directory must hold at least one policy",
            )]);
        }
        let mut sources = Vec::with_capacity(paths.len());
        let mut errors = Vec::new();
        for path in paths {
            let name = path.display().to_string();
            match std::fs::metadata(&path) {
                Ok(m) if m.len() > FILE_BYTES_MAX => {
                    errors.push(PolicyError::whole_file(
                        &name,
                        format!("larger than {FILE_BYTES_MAX} bytes"),
                    ));
                    continue;
                }
                Err(e) => {
                    errors.push(PolicyError::whole_file(&name, format!("cannot read: {e}")));
                    continue;
                }
                Ok(_) => {}
            }
            match std::fs::read_to_string(&path) {
                Ok(text) => sources.push((name, text)),
                Err(e) => errors.push(PolicyError::whole_file(&name, format!("cannot read: {e}"))),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Policies::from_sources(&sources)
    }

    /// Parses and validates `(file name, text)` pairs as one policy set.
    pub fn from_sources(sources: &[(String, String)]) -> Result<Policies, Vec<PolicyError>> {
        let schema = Schema::from_str(SCHEMA)
            .unwrap_or_else(|e| panic!("the built-in policy schema is invalid: {e:?}"));
        let validator = Validator::new(schema.clone());
        let mut set = PolicySet::new();
        let mut reasons = HashMap::new();
        let mut errors = Vec::new();
        let mut hasher = Sha256::new();
        let mut ids: HashMap<String, String> = HashMap::new();
        for (file, text) in sources {
            hasher.update((file.len() as u64).to_le_bytes());
            hasher.update(file.as_bytes());
            hasher.update((text.len() as u64).to_le_bytes());
            hasher.update(text.as_bytes());
            let parsed = match PolicySet::from_str(text) {
                Ok(p) => p,
                Err(e) => {
                    errors.extend(located(file, text, &e));
                    continue;
                }
            };
            let result = validator.validate(&parsed, ValidationMode::Strict);
            for e in result.validation_errors() {
                for e in located(file, text, e) {
                    // The same mistake is reported once per action it applies to.
                    if !errors.iter().any(|o: &PolicyError| {
                        (o.line, o.column) == (e.line, e.column) && o.file == e.file
                    }) {
                        errors.push(e);
                    }
                }
            }
            for policy in parsed.policies() {
                // Ids name policies in decisions: `@id` if given, else file and position
                // (the parser numbers a file's policies `policy0`, `policy1`, …).
                let id = match policy.annotation("id") {
                    Some(id) => id.to_string(),
                    None => {
                        let n = policy
                            .id()
                            .to_string()
                            .trim_start_matches("policy")
                            .parse::<usize>()
                            .map_or(0, |n| n + 1);
                        format!("{}#{n}", base_name(file))
                    }
                };
                let line = text
                    .find(&format!("@id(\"{id}\")"))
                    .map_or(1, |offset| line_col(text, offset).0);
                if let Some(other) = ids.insert(id.clone(), format!("{file}:{line}")) {
                    errors.push(PolicyError {
                        file: file.clone(),
                        line,
                        column: 1,
                        message: format!("policy id `{id}` is also used at {other}"),
                    });
                    continue;
                }
                let pid = PolicyId::new(&id);
                let reason = policy.annotation("reason").unwrap_or(&id).to_string();
                reasons.insert(pid.clone(), reason);
                if let Err(e) = set.add(policy.new_id(pid)) {
                    errors.push(PolicyError {
                        file: file.clone(),
                        line,
                        column: 1,
                        message: e.to_string(),
                    });
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let digest = hex::encode(hasher.finalize());
        let run_unattended = uid("Action", "run_unattended");
        Ok(Policies {
            one_question_allows: unattended_implies_run(&set, &run_unattended),
            context_read: context_attributes(&set),
            set,
            authorizer: Authorizer::new(),
            run: uid("Action", "run"),
            run_unattended,
            version: digest[..12].to_string(),
            files: sources.iter().map(|(f, _)| f.clone()).collect(),
            reasons,
        })
    }

    /// Content hash of the files and their names: recorded with every decision.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn files(&self) -> &[String] {
        &self.files
    }

    pub fn len(&self) -> usize {
        self.set.policies().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides for one step.
    pub fn decide(&self, facts: &StepFacts) -> Decision {
        let decision = |ruling, reasons| Decision {
            ruling,
            reasons,
            policy_version: self.version.clone(),
        };
        // Built once for both questions (the context is most of a question's cost).
        let persona = if facts.persona.is_empty() {
            "operator"
        } else {
            facts.persona.as_str()
        };
        let principal = EntityUid::from_type_name_and_id(PERSONA.clone(), EntityId::new(persona));
        let step = [facts.task_id.as_str(), facts.step_id.as_str()].join("/");
        let resource = EntityUid::from_type_name_and_id(STEP.clone(), EntityId::new(&step));
        let context = match Context::from_pairs(facts.context(self.context_read.as_ref())) {
            Ok(c) => c,
            Err(e) => return decision(Ruling::Deny, vec![format!("policy context: {e}")]),
        };
        let ask = |action: &EntityUid| {
            self.ask(
                principal.clone(),
                action.clone(),
                resource.clone(),
                context.clone(),
            )
        };
        // Most steps are allowed: with a set shaped for it, one question settles that.
        if self.one_question_allows && matches!(ask(&self.run_unattended), Ok(None)) {
            return decision(Ruling::Allow, Vec::new());
        }
        match ask(&self.run) {
            Err(e) => return decision(Ruling::Deny, vec![e]),
            Ok(Some(reasons)) => return decision(Ruling::Deny, reasons),
            Ok(None) => {}
        }
        match ask(&self.run_unattended) {
            Ok(None) => decision(Ruling::Allow, Vec::new()),
            Ok(Some(reasons)) => decision(Ruling::RequireApproval, reasons),
            Err(e) => decision(Ruling::Deny, vec![e]),
        }
    }

    /// `Ok(None)` if permitted; `Ok(Some(reasons))` if not; `Err` if evaluation failed.
    fn ask(
        &self,
        principal: EntityUid,
        action: EntityUid,
        resource: EntityUid,
        context: Context,
    ) -> Result<Option<Vec<String>>, String> {
        let request = Request::new(principal, action, resource, context, None)
            .map_err(|e| format!("policy request: {e}"))?;
        let response = self
            .authorizer
            .is_authorized(&request, &self.set, &Entities::empty());
        let errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| format!("policy evaluation failed (denied): {e}"))
            .collect();
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        if response.decision() == CedarDecision::Allow {
            return Ok(None);
        }
        let reasons: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|id| {
                self.reasons
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| id.to_string())
            })
            .collect();
        Ok(Some(if reasons.is_empty() {
            vec!["no policy permits it".to_string()]
        } else {
            reasons
        }))
    }
}

/// Whether `run_unattended` permitted, without errors, implies `run` permitted, without
/// errors, for any request: true when every permit applies to any action, every forbid to
/// any action or to `run_unattended` alone, and no condition looks at the action. Then
/// the policies that apply to `run` are a subset of those that apply to
/// `run_unattended`, evaluated alike (same principal, resource and context): a permit
/// satisfied for one is satisfied for the other, and a forbid or error for `run` would
/// have been one for `run_unattended`.
fn unattended_implies_run(set: &PolicySet, run_unattended: &EntityUid) -> bool {
    set.policies().all(|policy| {
        let scope_fits = match (policy.effect(), policy.action_constraint()) {
            (_, ActionConstraint::Any) => true,
            (Effect::Forbid, ActionConstraint::Eq(action)) => action == *run_unattended,
            (Effect::Forbid, ActionConstraint::In(actions)) => {
                actions.iter().all(|a| a == run_unattended)
            }
            (Effect::Permit, _) => false,
        };
        let looks_at_action = policy.to_json().map_or(true, |json| {
            json["conditions"].to_string().contains(r#""Var":"action""#)
        });
        scope_fits && !looks_at_action
    })
}

/// The context attributes `set` reads, or `None` if a policy uses `context` other than as
/// `context.<attr>` or `context has <attr>` (say, compared whole): then a question must
/// carry every attribute. Walks each policy's conditions in Cedar's JSON form, where an
/// attribute read is `{".": {"left": {"Var": "context"}, "attr": "tool"}}`.
fn context_attributes(set: &PolicySet) -> Option<BTreeSet<String>> {
    fn walk(expr: &serde_json::Value, read: &mut BTreeSet<String>) -> bool {
        use serde_json::Value;
        match expr {
            Value::Object(map) => {
                if map.len() == 1 {
                    for op in [".", "has"] {
                        let Some(inner) = map.get(op) else { continue };
                        if inner.get("left") == Some(&serde_json::json!({"Var": "context"})) {
                            let Some(attr) = inner.get("attr").and_then(Value::as_str) else {
                                return false;
                            };
                            read.insert(attr.to_string());
                            return true;
                        }
                    }
                    // Literals read nothing; a record's keys are names, not operators.
                    if map.contains_key("Value") {
                        return true;
                    }
                    if let Some(Value::Object(fields)) = map.get("Record") {
                        return fields.values().all(|v| walk(v, read));
                    }
                }
                if map.get("Var").and_then(Value::as_str) == Some("context") {
                    return false;
                }
                map.values().all(|v| walk(v, read))
            }
            Value::Array(items) => items.iter().all(|v| walk(v, read)),
            _ => true,
        }
    }
    let mut read = BTreeSet::new();
    for policy in set.policies() {
        let json = policy.to_json().ok()?;
        if !walk(&json["conditions"], &mut read) {
            return None;
        }
    }
    Some(read)
}

/// `Type::"id"`. The type names used here are fixed identifiers, which always parse.
fn uid(ty: &str, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(type_name(ty), EntityId::new(id))
}

fn type_name(ty: &str) -> EntityTypeName {
    EntityTypeName::from_str(ty)
        .unwrap_or_else(|e| panic!("entity type `{ty}` does not parse: {e}"))
}

/// The entity types every question names, parsed once: `from_str` runs Cedar's parser,
/// and two per step were a third of building a question.
static PERSONA: LazyLock<EntityTypeName> = LazyLock::new(|| type_name("Persona"));
static STEP: LazyLock<EntityTypeName> = LazyLock::new(|| type_name("Step"));

/// Errors of a Cedar diagnostic, each at the line and column its first label points at.
fn located<D: Diagnostic>(file: &str, text: &str, diagnostic: &D) -> Vec<PolicyError> {
    let mut out = Vec::new();
    let related: Vec<&dyn Diagnostic> = diagnostic
        .related()
        .map(|r| r.collect())
        .unwrap_or_default();
    let parts: Vec<&dyn Diagnostic> = if related.is_empty() {
        vec![diagnostic as &dyn Diagnostic]
    } else {
        related
    };
    for part in parts {
        let offset = part
            .labels()
            .and_then(|mut l| l.next())
            .map(|l| l.offset())
            .unwrap_or(0);
        let (line, column) = line_col(text, offset);
        let mut message = part.to_string();
        if let Some(help) = part.help() {
            message.push_str(&format!(" (help: {help})"));
        }
        out.push(PolicyError {
            file: file.to_string(),
            line,
            column,
            message,
        });
    }
    out
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn base_name(file: &str) -> &str {
    Path::new(file)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(file)
}

#[cfg(test)]
mod tests;
