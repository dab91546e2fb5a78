//! Playbooks: versioned TOML descriptions of recurring loops, validated when loaded.
//!
//! Every error names the file, the step and the problem, so a typo is fixed in one go.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::model::{Criteria, JsonPathEquals, JsonText, Placement, StepSpec};
use crate::protocol::{TaskCheck, subject};
use crate::template::{self, Scope, TemplateError};
use crate::tools;

/// Plans are bounded: a playbook has 1 to 7 steps.
pub const STEPS_MAX: usize = 7;
/// Longest step timeout a playbook may set: one day.
pub const TIMEOUT_MS_MAX: u64 = 86_400_000;
/// Largest playbook file read.
const FILE_BYTES_MAX: u64 = 256 << 10;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlaybookFile {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    version: Option<String>,
    /// Who the playbook acts as, for the policies (`Persona::"..."`).
    #[serde(default)]
    persona: Option<String>,
    #[serde(default)]
    steps: Vec<StepFile>,
    #[serde(default)]
    checks: Vec<CheckFile>,
    /// What a verified run teaches: facts for consolidated memory.
    #[serde(default)]
    remember: Vec<RememberFile>,
    /// What the plan reads from memory, bounded.
    #[serde(default)]
    recall: Option<RecallFile>,
    /// A goal template instead of `[[steps]]`: the LLM planner fills in the steps.
    #[serde(default)]
    goal: Option<String>,
    /// Model routing and the LLM planner's tools, for this playbook.
    #[serde(default)]
    llm: Option<LlmFile>,
    /// Run it on a cron schedule.
    #[serde(default)]
    schedule: Option<ScheduleFile>,
    /// Start it from a signed `POST /hooks/<name>`.
    #[serde(default)]
    webhook: Option<WebhookFile>,
    /// Its tasks' priority unless a submission says otherwise.
    #[serde(default)]
    priority: Option<crate::model::Priority>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookFile {
    name: String,
    #[serde(default)]
    secret_file: Option<PathBuf>,
    #[serde(default)]
    secret_env: Option<String>,
    #[serde(default)]
    signature_header: Option<String>,
    #[serde(default)]
    delivery_header: Option<String>,
    /// Input field → JSON pointer into the body (`/data/object/email`); without it the
    /// body (an object) is the input.
    #[serde(default)]
    input: Option<std::collections::BTreeMap<String, String>>,
}

/// Where a webhook's shared secret is read from, on every delivery (so replacing the
/// file or variable rotates it without a restart). Never logged.
#[derive(Debug, Clone, PartialEq)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

/// A playbook's `[webhook]`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookRule {
    /// `POST /hooks/<name>`.
    pub name: String,
    pub secret: SecretSource,
    /// Carries `sha256=<hex HMAC-SHA256 of the raw body>`; `X-Cadre-Signature` by
    /// default (`X-Hub-Signature-256` for GitHub's).
    pub signature_header: String,
    /// Carries the delivery id, the task's idempotency key; `X-Cadre-Delivery` by
    /// default (`X-GitHub-Delivery` for GitHub's).
    pub delivery_header: String,
    pub input: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleFile {
    cron: String,
    #[serde(default)]
    tz: Option<String>,
    #[serde(default)]
    missed: Option<crate::protocol::Missed>,
    #[serde(default = "empty_table")]
    input: toml::Value,
}

/// A playbook's `[schedule]`, checked: registered as the schedule named for the
/// playbook when a node starts.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleRule {
    pub cron: String,
    pub tz: String,
    pub missed: crate::protocol::Missed,
    pub input: Value,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LlmFile {
    #[serde(default)]
    planner_model: Option<String>,
    #[serde(default)]
    executor_model: Option<String>,
    #[serde(default)]
    judge_model: Option<String>,
    /// Tools the LLM planner may use for this playbook's goal.
    #[serde(default)]
    tools: Option<Vec<String>>,
}

/// A playbook's model routing: empty strings fall back to the node's models.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LlmRouting {
    pub planner_model: String,
    pub executor_model: String,
    pub judge_model: String,
    /// Empty: the node's `llm_plan_tools`.
    pub tools: Vec<String>,
}

/// One fact a verified run yields. Templates read `input.*`, `task.*`, `persona.*` and
/// `steps.<id>.output.*`, rendered by the Archivist after verification.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RememberFile {
    topic: String,
    text: String,
    /// What tells a confirmation from a contradiction; the text when not given.
    #[serde(default)]
    value: Option<toml::Value>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    confidence: Option<f64>,
}

/// A retrieval made when the plan is: `recall.text`, `recall.facts.<n>.*`, `recall.count`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecallFile {
    query: String,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    chars_max: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    id: String,
    tool: String,
    #[serde(default = "empty_table")]
    params: toml::Value,
    #[serde(default)]
    verify: Option<CriteriaFile>,
    #[serde(default)]
    depends_on: Vec<String>,
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    compensate: Option<CompensateFile>,
    /// Run on this node only (its `node_id`).
    #[serde(default)]
    on_node: Option<String>,
    /// Run on a node with this tag only: `location=laptop`.
    #[serde(default)]
    on_tag: Option<String>,
}

/// What undoes a step (a saga's compensation): run, newest first, when the task is
/// cancelled or fails after the step succeeded.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompensateFile {
    tool: String,
    #[serde(default = "empty_table")]
    params: toml::Value,
    /// Optional: without criteria, a compensation that ran without a tool error passed.
    #[serde(default)]
    verify: Option<CriteriaFile>,
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckFile {
    step: String,
    verify: CriteriaFile,
}

/// Criteria as written in TOML (`json_path_equals.value` is any TOML value).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CriteriaFile {
    exit_code: Option<i64>,
    status_in: Option<Vec<u16>>,
    file_exists: Option<bool>,
    file_contains: Option<String>,
    json_path_equals: Option<JsonPathFile>,
    output_contains: Option<String>,
    llm_judge: Option<JudgeFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JudgeFile {
    rubric: String,
    #[serde(default)]
    threshold: Option<f64>,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonPathFile {
    path: String,
    value: toml::Value,
}

fn empty_table() -> toml::Value {
    toml::Value::Table(Default::default())
}

/// Defaults for what a step does not say.
#[derive(Debug, Clone)]
pub struct StepDefaults {
    pub max_attempts: u32,
    pub timeout_ms: u64,
}

/// A validated playbook. Params and criteria are JSON with `{{...}}` templates.
#[derive(Debug, Clone)]
pub struct Playbook {
    pub name: String,
    pub description: String,
    /// Declared version plus a content hash: `1@3f2a9c01`.
    pub version: String,
    /// Who it acts as, for the policies; `operator` unless the playbook says.
    pub persona: String,
    pub path: PathBuf,
    steps: Vec<PlannedStep>,
    checks: Vec<(String, Value)>,
    pub remember: Vec<RememberRule>,
    pub recall: Option<RecallRule>,
    /// What its templates read from the context store (after `context.`).
    context_paths: Vec<String>,
    /// A goal template (no fixed steps): the LLM planner plans each run.
    pub goal: Option<String>,
    pub llm: LlmRouting,
    pub schedule: Option<ScheduleRule>,
    pub webhook: Option<WebhookRule>,
    pub priority: crate::model::Priority,
    /// What [`Self::check_input`] looks up (see [`submit_refs`]).
    submit_refs: Option<Vec<(String, String)>>,
}

/// A `[[remember]]` rule, its templates unrendered.
#[derive(Debug, Clone)]
pub struct RememberRule {
    pub topic: String,
    pub text: String,
    pub value: Value,
    pub kind: crate::protocol::knowledge::FactKind,
    pub confidence: f64,
}

#[derive(Debug, Clone)]
pub struct RecallRule {
    pub query: String,
    pub bounds: crate::knowledge::recall::Bounds,
}

/// What a plan reads besides its input: `context.*` and `recall.*`, gathered by the
/// Planner (absent at intake, where those templates stay as written).
#[derive(Debug, Clone, Default)]
pub struct Known {
    pub context: Option<Value>,
    pub recall: Option<Value>,
}

#[derive(Debug, Clone)]
struct PlannedStep {
    id: String,
    tool: String,
    params: Value,
    /// Params read `steps.*`: rendered at dispatch from the template.
    reads_steps: bool,
    verify: Value,
    depends_on: Vec<String>,
    max_attempts: u32,
    timeout_ms: u64,
    /// Its compensation, as a step of its own (`<id>.undo`, no dependencies).
    compensate: Option<Box<PlannedStep>>,
    placement: Option<Placement>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}: {problem}")]
pub struct PlaybookError {
    pub file: String,
    pub problem: String,
}

/// Why an input cannot run a playbook.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InputError {
    #[error("input must be a JSON object")]
    NotAnObject,
    #[error("step `{step}`: {source}")]
    Template { step: String, source: TemplateError },
}

impl Playbook {
    /// Parses and validates one playbook from TOML text.
    pub fn parse(
        text: &str,
        file: &Path,
        defaults: &StepDefaults,
    ) -> Result<Playbook, PlaybookError> {
        let file_name = file.display().to_string();
        let err = |problem: String| PlaybookError {
            file: file_name.clone(),
            problem,
        };
        let raw: PlaybookFile =
            toml::from_str(text).map_err(|e| err(e.to_string().trim_end().to_string()))?;
        if raw.name == crate::model::GOAL_PLAYBOOK {
            return Err(err(format!(
                "name `{}` is reserved for tasks submitted as a free-text goal",
                raw.name
            )));
        }
        Playbook::validate(raw, text, file, defaults)
    }

    /// A plan the LLM planner drafted (`{"steps": [...]}`), checked as a playbook of
    /// that name would be: known tools, params, dependencies, templates, criteria.
    pub fn from_plan(
        name: &str,
        persona: &str,
        plan: &Value,
        defaults: &StepDefaults,
    ) -> Result<Playbook, String> {
        let steps = plan
            .get("steps")
            .and_then(Value::as_array)
            .ok_or("the plan has no `steps` array")?;
        // A model never chooses where a secret goes: only an operator's playbook does.
        if let Some(r) = template::references(plan)
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|r| r.starts_with("secret."))
        {
            return Err(format!(
                "`{{{{{r}}}}}`: a plan may not use secrets; a playbook written by the operator may"
            ));
        }
        let mut files = Vec::with_capacity(steps.len());
        for (n, step) in steps.iter().enumerate() {
            let at = |problem: String| format!("steps[{n}]: {problem}");
            let step = json_to_toml(&without_nulls(step)).map_err(at)?;
            files.push(StepFile::deserialize(step).map_err(|e| at(e.to_string()))?);
        }
        let raw = PlaybookFile {
            name: name.to_string(),
            description: String::new(),
            version: Some("llm".into()),
            persona: Some(persona.to_string()),
            steps: files,
            checks: Vec::new(),
            remember: Vec::new(),
            recall: None,
            goal: None,
            llm: None,
            schedule: None,
            webhook: None,
            priority: None,
        };
        Playbook::validate(raw, &plan.to_string(), Path::new("plan"), defaults)
            .map_err(|e| e.problem)
    }

    fn validate(
        raw: PlaybookFile,
        text: &str,
        file: &Path,
        defaults: &StepDefaults,
    ) -> Result<Playbook, PlaybookError> {
        let file_name = file.display().to_string();
        let err = |problem: String| PlaybookError {
            file: file_name.clone(),
            problem,
        };
        if !subject::is_token(&raw.name) {
            return Err(err(format!(
                "name `{}` must be letters, digits, `-` or `_`",
                raw.name
            )));
        }
        if raw.goal.is_some() {
            if !raw.steps.is_empty() || !raw.checks.is_empty() {
                return Err(err(
                    "has a `goal` and [[steps]]: the LLM planner makes the steps of a goal; give one or the other".into(),
                ));
            }
        } else if raw.steps.is_empty() || raw.steps.len() > STEPS_MAX {
            return Err(err(format!(
                "has {} steps; a playbook has 1 to {STEPS_MAX} steps (or a `goal` for the LLM planner)",
                raw.steps.len()
            )));
        }
        let persona = raw.persona.clone().unwrap_or_else(|| "operator".into());
        if !subject::is_token(&persona) {
            return Err(err(format!(
                "persona `{persona}` must be letters, digits, `-` or `_`"
            )));
        }
        let ids: Vec<&str> = raw.steps.iter().map(|s| s.id.as_str()).collect();
        let has_recall = raw.recall.is_some();
        let mut context_paths = Vec::new();
        let mut seen = HashSet::new();
        let mut steps = Vec::with_capacity(raw.steps.len());
        for s in &raw.steps {
            let at = |problem: String| err(format!("step `{}`: {problem}", s.id));
            if !subject::is_token(&s.id) {
                return Err(at("id must be letters, digits, `-` or `_`".into()));
            }
            if !seen.insert(s.id.as_str()) {
                return Err(at("id is used twice".into()));
            }
            let info = tools::info(&s.tool).ok_or_else(|| {
                let known: Vec<_> = tools::CATALOG.iter().map(|t| t.name).collect();
                at(format!(
                    "unknown tool `{}` (known: {})",
                    s.tool,
                    known.join(", ")
                ))
            })?;
            let params = toml_to_json(&s.params);
            tools::check_params(info, &params).map_err(at)?;
            for dep in &s.depends_on {
                if !ids.contains(&dep.as_str()) {
                    return Err(at(format!("depends_on names `{dep}`, which is not a step")));
                }
                if dep == &s.id {
                    return Err(at("depends on itself".into()));
                }
            }
            let is_wait = s.tool == tools::WAIT;
            let verify = match (&s.verify, is_wait) {
                (Some(v), false) => {
                    check_judge(v).map_err(at)?;
                    criteria_json(v)
                }
                (None, false) => return Err(at("has no `verify` criteria".into())),
                (Some(_), true) => {
                    return Err(at(
                        "a `wait` step has no `verify`: it succeeds when its time comes".into(),
                    ));
                }
                (None, true) => json!({}),
            };
            if !is_wait && verify.as_object().is_some_and(|m| m.is_empty()) {
                return Err(at("`verify` sets no criterion".into()));
            }
            let param_refs = template::references(&params).map_err(|e| at(e.to_string()))?;
            for r in &param_refs {
                check_reference(r, &s.depends_on, has_recall).map_err(at)?;
            }
            check_one_pass(&param_refs).map_err(at)?;
            if is_wait {
                check_wait(&params, &param_refs).map_err(at)?;
            }
            context_paths.extend(context_paths_of(&param_refs));
            check_criteria_references(&verify).map_err(at)?;
            let reads_steps = param_refs.iter().any(|r| r.starts_with("steps."));
            let (max_attempts, timeout_ms) =
                bounds(s.max_attempts, s.timeout_ms, defaults).map_err(at)?;
            let placement = placement(s.on_node.as_deref(), s.on_tag.as_deref()).map_err(at)?;
            let compensate = match &s.compensate {
                None => None,
                Some(c) => {
                    let at = |problem: String| at(format!("compensate: {problem}"));
                    let info = tools::info(&c.tool)
                        .ok_or_else(|| at(format!("unknown tool `{}`", c.tool)))?;
                    let params = toml_to_json(&c.params);
                    tools::check_params(info, &params).map_err(at)?;
                    // It may read the step it undoes, and what that step read.
                    let mut readable = s.depends_on.clone();
                    readable.push(s.id.clone());
                    let refs = template::references(&params).map_err(|e| at(e.to_string()))?;
                    for r in &refs {
                        check_reference(r, &readable, has_recall).map_err(at)?;
                    }
                    check_one_pass(&refs).map_err(at)?;
                    context_paths.extend(context_paths_of(&refs));
                    if let Some(v) = &c.verify {
                        check_judge(v).map_err(at)?;
                    }
                    let verify = c.verify.as_ref().map(criteria_json).unwrap_or(json!({}));
                    check_criteria_references(&verify).map_err(at)?;
                    let (max_attempts, timeout_ms) =
                        bounds(c.max_attempts, c.timeout_ms, defaults).map_err(at)?;
                    Some(Box::new(PlannedStep {
                        id: StepSpec::undo_id(&s.id),
                        tool: c.tool.clone(),
                        reads_steps: refs.iter().any(|r| r.starts_with("steps.")),
                        params,
                        verify,
                        depends_on: Vec::new(),
                        max_attempts,
                        timeout_ms,
                        compensate: None,
                        // The undo runs where the step ran: next to what it changed.
                        placement: placement.clone(),
                    }))
                }
            };
            steps.push(PlannedStep {
                id: s.id.clone(),
                tool: s.tool.clone(),
                params,
                reads_steps,
                verify,
                depends_on: s.depends_on.clone(),
                max_attempts,
                timeout_ms,
                compensate,
                placement,
            });
        }
        check_acyclic(&steps).map_err(err)?;
        let mut checks = Vec::new();
        for c in &raw.checks {
            if !ids.contains(&c.step.as_str()) {
                return Err(err(format!(
                    "check names step `{}`, which is not a step",
                    c.step
                )));
            }
            if c.verify.llm_judge.is_some() {
                return Err(err(format!(
                    "check on `{}`: llm_judge judges a step's own output; put it in the step's `verify`",
                    c.step
                )));
            }
            let verify = criteria_json(&c.verify);
            check_criteria_references(&verify)
                .map_err(|p| err(format!("check on `{}`: {p}", c.step)))?;
            checks.push((c.step.clone(), verify));
        }
        let all_steps: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        let mut remember = Vec::with_capacity(raw.remember.len());
        for (i, r) in raw.remember.iter().enumerate() {
            let at = |problem: String| err(format!("remember #{}: {problem}", i + 1));
            let value = r
                .value
                .as_ref()
                .map(toml_to_json)
                .unwrap_or_else(|| Value::String(r.text.clone()));
            let rule = json!({"topic": r.topic, "text": r.text, "value": value});
            for reference in template::references(&rule).map_err(|e| at(e.to_string()))? {
                if ["context.", "recall.", "secret."]
                    .iter()
                    .any(|p| reference.starts_with(p))
                {
                    return Err(at(format!(
                        "`{{{{{reference}}}}}`: what to remember reads input.*, task.*, persona.* and steps.<id>.output.*"
                    )));
                }
                check_reference(&reference, &all_steps, false).map_err(at)?;
            }
            let kind = match r.kind.as_deref() {
                None | Some("fact") => crate::protocol::knowledge::FactKind::Fact,
                Some("heuristic") => crate::protocol::knowledge::FactKind::Heuristic,
                Some(other) => {
                    return Err(at(format!("kind `{other}` must be `fact` or `heuristic`")));
                }
            };
            let confidence = r.confidence.unwrap_or(0.8);
            if !(0.0..=1.0).contains(&confidence) {
                return Err(at(format!(
                    "confidence {confidence} must be between 0 and 1"
                )));
            }
            remember.push(RememberRule {
                topic: r.topic.clone(),
                text: r.text.clone(),
                value,
                kind,
                confidence,
            });
        }
        let recall = match &raw.recall {
            None => None,
            Some(r) => {
                let at = |problem: String| err(format!("recall: {problem}"));
                check_request_text(&r.query, "the query").map_err(at)?;
                let bounds =
                    crate::knowledge::recall::Bounds::new(r.top_k, r.chars_max).map_err(at)?;
                Some(RecallRule {
                    query: r.query.clone(),
                    bounds,
                })
            }
        };
        if let Some(goal) = &raw.goal {
            let at = |problem: String| err(format!("goal: {problem}"));
            if goal.trim().is_empty() {
                return Err(at("is empty".into()));
            }
            check_request_text(goal, "a goal").map_err(at)?;
        }
        let llm = raw.llm.unwrap_or_default();
        if let Some(tools) = &llm.tools {
            for t in tools {
                if tools::info(t).is_none() {
                    return Err(err(format!("[llm] tools: unknown tool `{t}`")));
                }
            }
        }
        let llm = LlmRouting {
            planner_model: llm.planner_model.unwrap_or_default(),
            executor_model: llm.executor_model.unwrap_or_default(),
            judge_model: llm.judge_model.unwrap_or_default(),
            tools: llm.tools.unwrap_or_default(),
        };
        let schedule = match &raw.schedule {
            None => None,
            Some(s) => {
                let at = |problem: String| err(format!("schedule: {problem}"));
                let tz = s.tz.clone().unwrap_or_default();
                crate::schedule::Cron::parse(&s.cron, &tz).map_err(at)?;
                Some(ScheduleRule {
                    cron: s.cron.clone(),
                    tz,
                    missed: s.missed.unwrap_or_default(),
                    input: toml_to_json(&s.input),
                })
            }
        };
        let webhook = match &raw.webhook {
            None => None,
            Some(w) => {
                let at = |problem: String| err(format!("webhook: {problem}"));
                if !subject::is_token(&w.name) {
                    return Err(at(format!(
                        "name `{}` must be letters, digits, `-` or `_`",
                        w.name
                    )));
                }
                let secret = match (&w.secret_file, &w.secret_env) {
                    (Some(f), None) => SecretSource::File(f.clone()),
                    (None, Some(e)) => SecretSource::Env(e.clone()),
                    _ => return Err(at("give `secret_file` or `secret_env` (one of them)".into())),
                };
                for (field, pointer) in w.input.iter().flatten() {
                    if !pointer.is_empty() && !pointer.starts_with('/') {
                        return Err(at(format!(
                            "input `{field}`: `{pointer}` must be a JSON pointer (`/data/email`)"
                        )));
                    }
                }
                Some(WebhookRule {
                    name: w.name.clone(),
                    secret,
                    signature_header: w
                        .signature_header
                        .clone()
                        .unwrap_or_else(|| "X-Cadre-Signature".into()),
                    delivery_header: w
                        .delivery_header
                        .clone()
                        .unwrap_or_else(|| "X-Cadre-Delivery".into()),
                    input: w.input.clone(),
                })
            }
        };
        context_paths.sort();
        context_paths.dedup();
        let hash = hex::encode(&Sha256::digest(text.as_bytes())[..4]);
        let submit_refs = submit_refs(&steps, &checks);
        Ok(Playbook {
            name: raw.name,
            description: raw.description,
            version: format!("{}@{hash}", raw.version.unwrap_or_else(|| "0".into())),
            persona,
            path: file.to_path_buf(),
            steps,
            checks,
            remember,
            recall,
            context_paths,
            goal: raw.goal,
            llm,
            schedule,
            webhook,
            priority: raw.priority.unwrap_or_default(),
            submit_refs,
        })
    }

    /// Whether `input` can run this playbook: `Ok` exactly when [`Self::plan`] would
    /// plan it, the same error otherwise, but by looking up what the plan's templates
    /// read at submit time instead of rendering the plan (the intake checks every
    /// submission; the planner renders the plan once the task runs).
    pub fn check_input(&self, input: &Value, persona: &Value) -> Result<(), InputError> {
        let Some(refs) = &self.submit_refs else {
            return self.plan("validation", input, persona).map(|_| ());
        };
        if !input.is_object() {
            return Err(InputError::NotAnObject);
        }
        let task = json!({"id": "validation", "playbook": self.name});
        let scope: &[(&str, &Value)] = &[("input", input), ("task", &task), ("persona", persona)];
        for (step, path) in refs {
            template::check(path, scope).map_err(|source| InputError::Template {
                step: step.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// The goal template rendered for this input (a goal playbook only).
    pub fn goal_text(
        &self,
        task_id: &str,
        input: &Value,
        persona: &Value,
    ) -> Result<Option<String>, InputError> {
        let Some(goal) = &self.goal else {
            return Ok(None);
        };
        if !input.is_object() {
            return Err(InputError::NotAnObject);
        }
        self.render_text(goal, "goal", task_id, input, persona)
            .map(Some)
    }

    /// `text` (a goal, a recall query) rendered over the request: `input.*`, `task.*`,
    /// `persona.*`; errors name `what`.
    fn render_text(
        &self,
        text: &str,
        what: &str,
        task_id: &str,
        input: &Value,
        persona: &Value,
    ) -> Result<String, InputError> {
        let task = json!({"id": task_id, "playbook": self.name});
        let scope: &[(&str, &Value)] = &[("input", input), ("task", &task), ("persona", persona)];
        let rendered =
            template::render(&Value::String(text.to_string()), scope).map_err(|source| {
                InputError::Template {
                    step: what.into(),
                    source,
                }
            })?;
        Ok(match rendered {
            Value::String(s) => s,
            other => other.to_string(),
        })
    }

    /// What the templates read from the context store: paths after `context.`, each a
    /// key possibly followed by a path into its value.
    pub fn context_paths(&self) -> &[String] {
        &self.context_paths
    }

    /// The `[recall]` query rendered for this input, with its bounds.
    pub fn recall_query(
        &self,
        task_id: &str,
        input: &Value,
        persona: &Value,
    ) -> Result<Option<(String, crate::knowledge::recall::Bounds)>, InputError> {
        let Some(rule) = &self.recall else {
            return Ok(None);
        };
        let query = self.render_text(&rule.query, "recall", task_id, input, persona)?;
        Ok(Some((query, rule.bounds)))
    }

    pub fn step_count(&self) -> usize {
        self.steps.len()
    }

    /// Renders the plan for `input`: templates over `input.*`, `task.*` and `persona.*`
    /// (the business's identity, `Value::Null` when none is configured) are filled in;
    /// `steps.*` stay for dispatch time. Errors name the step and the missing field.
    pub fn plan(
        &self,
        task_id: &str,
        input: &Value,
        persona: &Value,
    ) -> Result<(Vec<StepSpec>, Vec<TaskCheck>), InputError> {
        self.plan_with(task_id, input, persona, &Known::default())
    }

    /// [`Self::plan`], with what the Planner gathered for `context.*` and `recall.*`.
    pub fn plan_with(
        &self,
        task_id: &str,
        input: &Value,
        persona: &Value,
        known: &Known,
    ) -> Result<(Vec<StepSpec>, Vec<TaskCheck>), InputError> {
        if !input.is_object() {
            return Err(InputError::NotAnObject);
        }
        let task = json!({"id": task_id, "playbook": self.name});
        let mut roots: Vec<(&str, &Value)> =
            vec![("input", input), ("task", &task), ("persona", persona)];
        if let Some(c) = &known.context {
            roots.push(("context", c));
        }
        if let Some(r) = &known.recall {
            roots.push(("recall", r));
        }
        let scope: &[(&str, &Value)] = &roots;
        let specs = self
            .steps
            .iter()
            .map(|s| s.spec(scope))
            .collect::<Result<Vec<_>, _>>()?;
        let mut checks = Vec::with_capacity(self.checks.len());
        for (step, verify) in &self.checks {
            let rendered =
                template::render(verify, scope).map_err(|source| InputError::Template {
                    step: step.clone(),
                    source,
                })?;
            checks.push(TaskCheck {
                step: step.clone(),
                criteria: criteria_from_json(&rendered),
            });
        }
        Ok((specs, checks))
    }
}

/// Every template reference [`Playbook::plan`] resolves (roots `input`, `task`,
/// `persona`; the others wait for later), with the step its error names, in the order
/// `plan` renders them: each step's params, its verify, its compensation; then the
/// task-level checks. `None` if a template cannot be read (loading refuses those).
fn submit_refs(steps: &[PlannedStep], checks: &[(String, Value)]) -> Option<Vec<(String, String)>> {
    fn add(out: &mut Vec<(String, String)>, step: &str, value: &Value) -> Option<()> {
        for path in template::references(value).ok()? {
            let root = path.split('.').next().unwrap_or_default();
            if matches!(root, "input" | "task" | "persona") {
                out.push((step.to_string(), path));
            }
        }
        Some(())
    }
    fn add_step(out: &mut Vec<(String, String)>, step: &PlannedStep) -> Option<()> {
        add(out, &step.id, &step.params)?;
        add(out, &step.id, &step.verify)?;
        match &step.compensate {
            Some(undo) => add_step(out, undo),
            None => Some(()),
        }
    }
    let mut out = Vec::new();
    for step in steps {
        add_step(&mut out, step)?;
    }
    for (step, verify) in checks {
        add(&mut out, step, verify)?;
    }
    Some(out)
}

impl PlannedStep {
    /// The step with templates over `input.*` and `task.*` rendered (`steps.*` stay
    /// for dispatch time).
    fn spec(&self, scope: &[(&str, &Value)]) -> Result<StepSpec, InputError> {
        let tpl = |source| InputError::Template {
            step: self.id.clone(),
            source,
        };
        let params = template::render(&self.params, scope).map_err(tpl)?;
        let verify = criteria_from_json(&template::render(&self.verify, scope).map_err(tpl)?);
        let compensate = match &self.compensate {
            Some(c) => {
                let mut undo = c.spec(scope)?;
                undo.compensates = Some(self.id.clone());
                Some(Box::new(undo))
            }
            None => None,
        };
        Ok(StepSpec {
            id: self.id.clone(),
            tool: self.tool.clone(),
            params: JsonText::from_value(&params),
            params_template: self.reads_steps.then(|| JsonText::from_value(&self.params)),
            verify,
            depends_on: self.depends_on.clone(),
            max_attempts: self.max_attempts,
            timeout_ms: self.timeout_ms,
            compensate,
            compensates: None,
            placement: self.placement.clone(),
        })
    }
}

/// A step's `on_node` / `on_tag`, checked: at most one, subject tokens.
fn placement(on_node: Option<&str>, on_tag: Option<&str>) -> Result<Option<Placement>, String> {
    match (on_node, on_tag) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err("set `on_node` or `on_tag`, not both".into()),
        (Some(node), None) if subject::is_token(node) => Ok(Some(Placement::Node(node.into()))),
        (Some(node), None) => Err(format!(
            "on_node `{node}` must be a node id (letters, digits, `-`, `_`)"
        )),
        (None, Some(tag)) => match tag.split_once('=') {
            Some((k, v)) if subject::is_token(k) && subject::is_token(v) => {
                Ok(Some(Placement::Tag(k.into(), v.into())))
            }
            _ => Err(format!("on_tag `{tag}` must look like `location=laptop`")),
        },
    }
}

/// A step's (or compensation's) attempts and timeout, defaulted and checked.
fn bounds(
    max_attempts: Option<u32>,
    timeout_ms: Option<u64>,
    defaults: &StepDefaults,
) -> Result<(u32, u64), String> {
    let max_attempts = max_attempts.unwrap_or(defaults.max_attempts);
    if !(1..=20).contains(&max_attempts) {
        return Err(format!("max_attempts {max_attempts} must be 1 to 20"));
    }
    let timeout_ms = timeout_ms.unwrap_or(defaults.timeout_ms);
    if !(1..=TIMEOUT_MS_MAX).contains(&timeout_ms) {
        return Err(format!(
            "timeout_ms {timeout_ms} must be 1 to {TIMEOUT_MS_MAX}"
        ));
    }
    Ok((max_attempts, timeout_ms))
}

/// A step whose params read `steps.*` is rendered once, at dispatch, from the input,
/// the task and the outputs (one pass, so text from the input is never read as a
/// template); what the plan gathered (`context`, `recall`, `persona`) is not there.
fn check_one_pass(refs: &[String]) -> Result<(), String> {
    if !refs.iter().any(|r| r.starts_with("steps.")) {
        return Ok(());
    }
    match refs.iter().find(|r| {
        ["context.", "recall.", "persona."]
            .iter()
            .any(|p| r.starts_with(p))
    }) {
        Some(r) => Err(format!(
            "`{{{{{r}}}}}`: a step that reads steps.* may read input.* and task.* only; read it in the step it depends on"
        )),
        None => Ok(()),
    }
}

fn context_paths_of(refs: &[String]) -> Vec<String> {
    refs.iter()
        .filter_map(|r| r.strip_prefix("context."))
        .map(str::to_string)
        .collect()
}

fn check_reference(path: &str, depends_on: &[String], has_recall: bool) -> Result<(), String> {
    let mut parts = path.split('.');
    match parts.next() {
        Some("input") => Ok(()),
        Some("context") => {
            let rest = path.strip_prefix("context.").unwrap_or_default();
            let ns = rest.split('.').next().unwrap_or_default();
            if crate::knowledge::KEY_NAMESPACES.contains(&ns) && rest.contains('.') {
                Ok(())
            } else {
                Err(format!(
                    "`{{{{{path}}}}}`: context keys start with a namespace ({}) and a name",
                    crate::knowledge::KEY_NAMESPACES.join(", ")
                ))
            }
        }
        Some("recall") if !has_recall => Err(format!(
            "`{{{{{path}}}}}` reads recall, but the playbook has no [recall] section"
        )),
        Some("recall") => match parts.next() {
            Some("text" | "count" | "facts") => Ok(()),
            _ => Err(format!(
                "`{{{{{path}}}}}`: recall has text, count and facts"
            )),
        },
        Some("persona") => match parts.next() {
            Some(
                "name" | "business" | "roles" | "voice" | "signature" | "contacts"
                | "working_hours",
            ) => Ok(()),
            _ => Err(format!(
                "`{{{{{path}}}}}`: persona has name, business, roles, voice, signature, contacts and working_hours"
            )),
        },
        Some("secret") => {
            let name = parts.next().unwrap_or_default();
            match (crate::secrets::check_name(name), parts.next()) {
                (Ok(()), None) => Ok(()),
                _ => Err(format!(
                    "`{{{{{path}}}}}`: a secret is `secret.<name>`, a name of letters, digits, `-` or `_`"
                )),
            }
        }
        Some("task") => match parts.next() {
            Some("id" | "playbook") => Ok(()),
            _ => Err(format!(
                "`{{{{{path}}}}}`: task has only `id` and `playbook`"
            )),
        },
        Some("steps") => {
            let step = parts.next().unwrap_or_default();
            if !depends_on.iter().any(|d| d == step) {
                return Err(format!(
                    "`{{{{{path}}}}}` reads step `{step}`, which must be in depends_on"
                ));
            }
            match parts.next() {
                Some("output") => Ok(()),
                _ => Err(format!(
                    "`{{{{{path}}}}}`: read a step's result as steps.<id>.output.<field>"
                )),
            }
        }
        _ => Err(format!(
            "`{{{{{path}}}}}`: templates read input.*, task.*, persona.*, context.*, recall.* or steps.<id>.output.*"
        )),
    }
}

/// Criteria are rendered when the plan is made, so they may read `input.*`, `task.*`
/// and `persona.*` only; a step's own result is what they check.
fn check_criteria_references(verify: &Value) -> Result<(), String> {
    for r in template::references(verify).map_err(|e| e.to_string())? {
        if r.starts_with("secret.") {
            return Err(format!(
                "`{{{{{r}}}}}` in `verify`: secrets go in params only (criteria are stored and shown)"
            ));
        }
        if r.starts_with("steps.") {
            return Err(format!(
                "`{{{{{r}}}}}` in `verify`: criteria read input.*, task.* and persona.* only (they check the step's own output)"
            ));
        }
        if r.starts_with("context.") || r.starts_with("recall.") {
            return Err(format!(
                "`{{{{{r}}}}}` in `verify`: criteria read input.*, task.* and persona.* only"
            ));
        }
        check_reference(&r, &[], false)?;
    }
    Ok(())
}

fn check_acyclic(steps: &[PlannedStep]) -> Result<(), String> {
    let mut done: HashSet<&str> = HashSet::new();
    while done.len() < steps.len() {
        let before = done.len();
        for s in steps {
            if !done.contains(s.id.as_str())
                && s.depends_on.iter().all(|d| done.contains(d.as_str()))
            {
                done.insert(&s.id);
            }
        }
        if done.len() == before {
            let stuck: Vec<_> = steps
                .iter()
                .filter(|s| !done.contains(s.id.as_str()))
                .map(|s| s.id.as_str())
                .collect();
            return Err(format!(
                "depends_on forms a cycle among steps {}",
                stuck.join(", ")
            ));
        }
    }
    Ok(())
}

pub fn toml_to_json(v: &toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => json!(i),
        toml::Value::Float(f) => json!(f),
        toml::Value::Boolean(b) => json!(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => Value::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect(),
        ),
    }
}

/// Criteria as JSON, so templates inside them render like params do.
fn criteria_json(c: &CriteriaFile) -> Value {
    let mut m = serde_json::Map::new();
    if let Some(v) = c.exit_code {
        m.insert("exit_code".into(), json!(v));
    }
    if let Some(v) = &c.status_in {
        m.insert("status_in".into(), json!(v));
    }
    if let Some(v) = c.file_exists {
        m.insert("file_exists".into(), json!(v));
    }
    if let Some(v) = &c.file_contains {
        m.insert("file_contains".into(), json!(v));
    }
    if let Some(v) = &c.json_path_equals {
        m.insert(
            "json_path_equals".into(),
            json!({"path": v.path, "value": toml_to_json(&v.value)}),
        );
    }
    if let Some(v) = &c.output_contains {
        m.insert("output_contains".into(), json!(v));
    }
    if let Some(j) = &c.llm_judge {
        m.insert(
            "llm_judge".into(),
            json!({"rubric": j.rubric, "threshold": j.threshold, "model": j.model}),
        );
    }
    Value::Object(m)
}

fn criteria_from_json(v: &Value) -> Criteria {
    let text = |k: &str| {
        v.get(k).map(|x| {
            x.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| x.to_string())
        })
    };
    Criteria {
        exit_code: v.get("exit_code").and_then(Value::as_i64),
        status_in: v.get("status_in").and_then(Value::as_array).map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64().and_then(|n| u16::try_from(n).ok()))
                .collect()
        }),
        file_exists: v.get("file_exists").and_then(Value::as_bool),
        file_contains: text("file_contains"),
        json_path_equals: v.get("json_path_equals").map(|j| JsonPathEquals {
            path: j
                .get("path")
                .and_then(Value::as_str)
                .unwrap_or("$")
                .to_string(),
            value: JsonText::from_value(j.get("value").unwrap_or(&Value::Null)),
        }),
        output_contains: text("output_contains"),
        llm_judge: v.get("llm_judge").map(|j| crate::model::Judge {
            rubric: j
                .get("rubric")
                .map(|r| {
                    r.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| r.to_string())
                })
                .unwrap_or_default(),
            threshold: j
                .get("threshold")
                .and_then(Value::as_f64)
                .unwrap_or(crate::model::Judge::DEFAULT_THRESHOLD),
            model: j
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        }),
    }
}

/// A `wait` step's params: `for` or `until`, fixed when the plan is made (the wake time
/// is committed when the step starts, so it cannot read other steps' outputs); checked
/// now unless a template fills them.
fn check_wait(params: &Value, refs: &[String]) -> Result<(), String> {
    if refs.iter().any(|r| r.starts_with("steps.")) {
        return Err("a `wait` step reads input.*, task.*, persona.* and context.* only".into());
    }
    if refs.is_empty() {
        crate::schedule::wake_at(params, 0)?;
    } else if params.get("event").is_none()
        && params.get("for").is_some() == params.get("until").is_some()
    {
        return Err("wait: give `for` (a duration) or `until` (a time)".into());
    }
    Ok(())
}

/// Text rendered from the request alone (a goal, a recall query): its templates read
/// `input.*`, `task.*` and `persona.*`, nothing gathered or produced later.
fn check_request_text(text: &str, what: &str) -> Result<(), String> {
    for reference in
        template::references(&Value::String(text.to_string())).map_err(|e| e.to_string())?
    {
        if !["input.", "task.", "persona."]
            .iter()
            .any(|p| reference.starts_with(p))
        {
            return Err(format!(
                "`{{{{{reference}}}}}`: {what} reads input.*, task.* and persona.*"
            ));
        }
        check_reference(&reference, &[], false)?;
    }
    Ok(())
}

/// A judge as written, checked: a rubric, a threshold between 0 and 1.
fn check_judge(c: &CriteriaFile) -> Result<(), String> {
    let Some(j) = &c.llm_judge else {
        return Ok(());
    };
    if j.rubric.trim().is_empty() {
        return Err("llm_judge needs a `rubric`".into());
    }
    if let Some(t) = j.threshold
        && !(0.0..=1.0).contains(&t)
    {
        return Err(format!("llm_judge threshold {t} must be between 0 and 1"));
    }
    Ok(())
}

/// JSON as TOML, for plans the LLM drafted (TOML has no null: strip them first).
fn json_to_toml(v: &Value) -> Result<toml::Value, String> {
    Ok(match v {
        Value::Null => return Err("null is not a value here".into()),
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => toml::Value::String(s.clone()),
        Value::Array(a) => {
            toml::Value::Array(a.iter().map(json_to_toml).collect::<Result<_, _>>()?)
        }
        Value::Object(m) => toml::Value::Table(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), json_to_toml(v)?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

/// `v` with every `null` member of an object left out (models write absent optional
/// fields as null).
fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// Every playbook in a directory, by name.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    playbooks: HashMap<String, Arc<Playbook>>,
    /// `persona.*` in templates; `Null` without a persona file.
    persona: Value,
}

impl Catalog {
    /// Loads every `*.toml` in `dir`. All errors are collected, not just the first.
    pub fn load_dir(dir: &Path, defaults: &StepDefaults) -> Result<Catalog, Vec<PlaybookError>> {
        let fail = |problem: String| {
            vec![PlaybookError {
                file: dir.display().to_string(),
                problem,
            }]
        };
        let entries = std::fs::read_dir(dir)
            .map_err(|e| fail(format!("cannot read the playbooks directory: {e}")))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        let mut catalog = Catalog::default();
        let mut errors = Vec::new();
        for path in paths {
            let file = path.display().to_string();
            let text = match read_capped(&path) {
                Ok(t) => t,
                Err(problem) => {
                    errors.push(PlaybookError { file, problem });
                    continue;
                }
            };
            match Playbook::parse(&text, &path, defaults) {
                Ok(pb) => {
                    let hook_taken = pb.webhook.as_ref().and_then(|w| {
                        catalog
                            .playbooks
                            .values()
                            .find(|o| o.webhook.as_ref().is_some_and(|x| x.name == w.name))
                    });
                    if let (Some(other), Some(w)) = (hook_taken, &pb.webhook) {
                        errors.push(PlaybookError {
                            file,
                            problem: format!(
                                "webhook `{}` is also used by {}",
                                w.name,
                                other.path.display()
                            ),
                        });
                    } else if let Some(other) = catalog.playbooks.get(&pb.name) {
                        errors.push(PlaybookError {
                            file,
                            problem: format!(
                                "name `{}` is also used by {}",
                                pb.name,
                                other.path.display()
                            ),
                        });
                    } else {
                        catalog.playbooks.insert(pb.name.clone(), Arc::new(pb));
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(catalog)
        } else {
            Err(errors)
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Playbook>> {
        self.playbooks.get(name)
    }

    /// The catalog whose plans read `persona` as `persona.*`.
    pub fn with_persona(mut self, persona: &crate::persona::Persona) -> Catalog {
        self.persona = persona.to_value();
        self
    }

    pub fn persona(&self) -> &Value {
        &self.persona
    }

    /// The playbook that `POST /hooks/<name>` starts.
    pub fn by_webhook(&self, name: &str) -> Option<&Arc<Playbook>> {
        self.playbooks
            .values()
            .find(|p| p.webhook.as_ref().is_some_and(|w| w.name == name))
    }

    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.playbooks.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    pub fn len(&self) -> usize {
        self.playbooks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.playbooks.is_empty()
    }
}

fn read_capped(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if meta.len() > FILE_BYTES_MAX {
        return Err(format!(
            "is {} bytes; a playbook is at most {FILE_BYTES_MAX}",
            meta.len()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))
}

impl Scope for Value {
    fn root(&self, name: &str) -> Option<&Value> {
        self.get(name)
    }
}

#[cfg(test)]
mod tests;
