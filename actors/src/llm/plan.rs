//! The LLM planner: a goal in plain words → a bounded plan the Verifier can check.
//!
//! The model is asked for structured output against a JSON schema built from the tool
//! catalog. A draft is then checked as a playbook would be (known tools, params against
//! each tool's schema, dependencies, templates, criteria) and by the policies; an
//! invalid draft goes back with its errors for a bounded number of repairs. Nothing
//! unvalidated reaches a task: the reply is either a checked plan or a refusal.

use std::time::Duration;

use serde_json::{Value, json};

use super::schema;
use super::{ChatRequest, LlmError, LlmSettings, Message, Provider, Role, Usage};
use crate::context::NodeContext;
use crate::knowledge::{self, recall};
use crate::model::{Planning, StepSpec};
use crate::playbook::{LlmRouting, Playbook, STEPS_MAX, StepDefaults};
use crate::policy::Ruling;
use crate::protocol::{ErrorCode, PlanReply};
use crate::tools;

/// Name of the structured output the planner asks for.
pub const PLAN_SCHEMA_NAME: &str = "cadre_plan";
/// Facts recalled for a goal's prompt, at most.
const RECALL_TOP_K: usize = 8;

/// Time a whole plan may take: every draft's call, retries included.
pub fn budget(settings: &LlmSettings) -> Duration {
    settings.call_budget() * (settings.plan_repairs_max + 1)
}

/// One goal to plan.
pub struct Goal<'a> {
    pub task_id: &'a str,
    /// `goal` for a free-text goal, else the goal playbook's name.
    pub playbook: &'a str,
    /// Who the plan acts as, for the policies.
    pub persona_name: &'a str,
    pub text: String,
    pub input: &'a Value,
    /// `persona.*`: the business's identity, shown in the prompt.
    pub persona: &'a Value,
    pub routing: &'a LlmRouting,
    /// What to recall for the prompt; `None`: the goal's own words.
    pub recall: Option<(String, recall::Bounds)>,
}

pub async fn plan(
    ctx: &NodeContext,
    provider: &Provider,
    defaults: &StepDefaults,
    goal: Goal<'_>,
) -> PlanReply {
    let settings = provider.settings();
    if let Some(breach) = over_budget(ctx, goal.playbook) {
        return rejected(ErrorCode::OverBudget, breach, None);
    }
    let allowed = allowed_tools(settings, goal.routing);
    if allowed.is_empty() {
        return rejected(
            ErrorCode::InvalidRequest,
            "the LLM planner may use no tool (llm_plan_tools, or the playbook's [llm] tools)"
                .into(),
            None,
        );
    }
    let steps_min = settings.plan_steps_min.clamp(1, STEPS_MAX);
    let plan_schema = plan_schema(&allowed, steps_min, STEPS_MAX);
    let system = system_prompt(&allowed, steps_min, STEPS_MAX);
    let user = match user_prompt(ctx, settings, &goal, system.len()) {
        Ok(u) => u,
        Err(message) => return rejected(ErrorCode::InvalidInput, message, None),
    };
    let model = if goal.routing.planner_model.is_empty() {
        provider.model_for(Role::Planner).to_string()
    } else {
        goal.routing.planner_model.clone()
    };
    let mut planning = Planning {
        model: model.clone(),
        prompt_chars: (system.len() + user.len()) as u64,
        ..Planning::default()
    };
    let mut usage = Usage::default();
    let mut messages = vec![Message::system(system), Message::user(user)];
    let drafts_max = settings.plan_repairs_max + 1;
    loop {
        planning.drafts += 1;
        let reply = provider
            .chat(ChatRequest {
                role: Role::Planner,
                model: model.clone(),
                messages: messages.clone(),
                schema: Some((PLAN_SCHEMA_NAME.into(), plan_schema.clone())),
                max_tokens: None,
                temperature: Some(0.0),
            })
            .await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                ctx.metrics
                    .llm_plans_total
                    .with_label_values(&["unavailable"])
                    .inc();
                settle(&mut planning, &usage);
                let code = match e {
                    LlmError::Unavailable(_) => ErrorCode::Unavailable,
                    _ => ErrorCode::PlanInvalid,
                };
                return rejected(code, format!("the LLM planner: {e}"), Some(planning));
            }
        };
        usage.add(&reply.usage);
        match check_draft(ctx, defaults, &goal, &plan_schema, &reply.content) {
            Ok(mut steps) => {
                route_models(
                    &mut steps,
                    &goal.routing.executor_model,
                    &goal.routing.judge_model,
                );
                let outcome = if planning.drafts == 1 {
                    "valid"
                } else {
                    "repaired"
                };
                ctx.metrics
                    .llm_plans_total
                    .with_label_values(&[outcome])
                    .inc();
                settle(&mut planning, &usage);
                return PlanReply::Planned {
                    steps,
                    checks: Vec::new(),
                    playbook_version: format!("llm@{model}"),
                    persona: goal.persona_name.to_string(),
                    planning: Some(planning),
                };
            }
            Err(errors) => {
                tracing::info!(task_id = goal.task_id, draft = planning.drafts, errors = ?errors, "LLM plan refused");
                planning.refused.push(errors.join("; "));
                if planning.drafts >= drafts_max {
                    ctx.metrics
                        .llm_plans_total
                        .with_label_values(&["invalid"])
                        .inc();
                    settle(&mut planning, &usage);
                    let message = format!(
                        "the LLM planner's plan was still invalid after {} drafts: {}",
                        planning.drafts,
                        errors.join("; ")
                    );
                    return rejected(ErrorCode::PlanInvalid, message, Some(planning));
                }
                messages.push(Message::assistant(reply.content));
                messages.push(Message::user(format!(
                    "That plan cannot run:\n- {}\nReturn the whole corrected plan.",
                    errors.join("\n- ")
                )));
            }
        }
    }
}

fn settle(planning: &mut Planning, usage: &Usage) {
    planning.prompt_tokens = usage.prompt_tokens;
    planning.completion_tokens = usage.completion_tokens;
    planning.cost_micros = usage.cost_micros;
}

fn rejected(code: ErrorCode, message: String, planning: Option<Planning>) -> PlanReply {
    PlanReply::Rejected {
        code,
        message,
        planning,
    }
}

/// A cap today's spend has already reached: planning would only add to it.
fn over_budget(ctx: &NodeContext, playbook: &str) -> Option<String> {
    let caps = &ctx.settings.caps;
    let day = crate::budget::day_of(ctx.now_ms());
    let usd = crate::budget::usd;
    let all = ctx.ledger.spent(&day, "*");
    if caps.day > 0 && all >= caps.day {
        return Some(format!(
            "budget: today's spend ${:.4} has reached the daily cap ${:.4}; the LLM planner was not asked",
            usd(all),
            usd(caps.day)
        ));
    }
    if let Some(&cap) = caps.playbook_day.get(playbook)
        && cap > 0
    {
        let spent = ctx.ledger.spent(&day, playbook);
        if spent >= cap {
            return Some(format!(
                "budget: {playbook} spent ${:.4} today, its daily cap ${:.4}; the LLM planner was not asked",
                usd(spent),
                usd(cap)
            ));
        }
    }
    None
}

fn allowed_tools(settings: &LlmSettings, routing: &LlmRouting) -> Vec<&'static tools::ToolInfo> {
    let names = if routing.tools.is_empty() {
        &settings.plan_tools
    } else {
        &routing.tools
    };
    tools::CATALOG
        .iter()
        .filter(|t| names.iter().any(|n| n == t.name))
        .collect()
}

/// Success criteria as the plan schema offers them: what the Verifier supports.
fn criteria_schema() -> Value {
    json!({
        "type": "object",
        "description": "At least one criterion; all must hold.",
        "properties": {
            "exit_code": {"type": "integer"},
            "status_in": {"type": "array", "items": {"type": "integer", "minimum": 100, "maximum": 599}, "minItems": 1},
            "file_exists": {"type": "boolean"},
            "file_contains": {"type": "string", "minLength": 1},
            "json_path_equals": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "value": {}},
                "required": ["path", "value"],
                "additionalProperties": false,
            },
            "output_contains": {"type": "string", "minLength": 1},
            "llm_judge": {
                "type": "object",
                "description": "An LLM reviewer scores the output from 0 to 1 against the rubric; passes at the threshold (default 0.7).",
                "properties": {
                    "rubric": {"type": "string", "minLength": 1},
                    "threshold": {"type": "number", "minimum": 0, "maximum": 1},
                },
                "required": ["rubric"],
                "additionalProperties": false,
            },
        },
        "additionalProperties": false,
    })
}

/// The plan's JSON schema: `steps`, each one call of an allowed tool with its params
/// schema, its criteria and its dependencies.
pub fn plan_schema(allowed: &[&tools::ToolInfo], steps_min: usize, steps_max: usize) -> Value {
    let per_tool: Vec<Value> = allowed
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {
                    "id": {"type": "string", "minLength": 1, "maxLength": 64},
                    "tool": {"const": t.name},
                    "params": t.schema(),
                    "verify": criteria_schema(),
                    "depends_on": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["id", "tool", "params", "verify"],
                "additionalProperties": false,
            })
        })
        .collect();
    json!({
        "type": "object",
        "properties": {
            "steps": {
                "type": "array",
                "minItems": steps_min,
                "maxItems": steps_max,
                "items": {"anyOf": per_tool},
            },
        },
        "required": ["steps"],
        "additionalProperties": false,
    })
}

fn system_prompt(allowed: &[&tools::ToolInfo], steps_min: usize, steps_max: usize) -> String {
    let mut catalog = String::new();
    for t in allowed {
        catalog.push_str(&format!(
            "- {} ({}): {}\n  params: {}\n",
            t.name,
            match t.class {
                tools::IdempotencyClass::Idempotent => "idempotent",
                tools::IdempotencyClass::Keyed => "keyed",
                tools::IdempotencyClass::Unsafe => "unsafe",
            },
            t.description,
            t.schema()
        ));
    }
    format!(
        "You are the planner of Cadre, the operations runtime of a one-person business. \
Turn the operator's goal into a plan of {steps_min} to {steps_max} steps. Each step calls one tool \
and says in `verify` how a machine checks that it succeeded. Reply with JSON only, matching the schema.\n\n\
Tools:\n{catalog}\n\
Success criteria (`verify`, at least one per step, all must hold): exit_code, status_in, \
file_exists, file_contains, json_path_equals {{path, value}}, output_contains, \
llm_judge {{rubric, threshold}} (a reviewer model scores the output from 0 to 1 against the rubric; \
use it for what rules cannot check, such as tone).\n\n\
Rules:\n\
- Step ids are short words of letters, digits, `-` or `_`, each used once.\n\
- A step may use an earlier step's result in its params as `{{{{steps.<id>.output.<field>}}}}` \
and must then name that step in `depends_on`. llm.generate's result is `output.text`; \
http.request's are `output.status` and `output.body`; shell.run's are `output.exit_code` and `output.stdout`.\n\
- `{{{{input.<field>}}}}` reads the task's input.\n\
- Use only facts from the goal, the input and the context given; do not invent addresses, \
URLs or paths.\n"
    )
}

/// The goal, the input and a bounded slice of what the business knows, within
/// `llm_prompt_chars_max` (together with the system prompt of `system_chars`). The goal
/// and input must fit whole; persona, context and memory are cut to what is left, in
/// that order.
fn user_prompt(
    ctx: &NodeContext,
    settings: &LlmSettings,
    goal: &Goal<'_>,
    system_chars: usize,
) -> Result<String, String> {
    let head = format!(
        "Goal: {}\n\nInput (JSON): {}\n",
        goal.text.trim(),
        goal.input
    );
    let cap = settings.prompt_chars_max;
    let used = system_chars + head.len();
    if used > cap {
        return Err(format!(
            "the goal and input make a planning prompt of {used} characters; the cap is {cap} (llm_prompt_chars_max)"
        ));
    }
    let mut left = cap - used;
    let mut prompt = head;
    let mut section = |title: &str, body: String, prompt: &mut String| {
        if body.is_empty() || left < title.len() + 16 {
            return;
        }
        let room = left - title.len() - 4;
        let body = cut(&body, room);
        let piece = format!("\n{title}:\n{body}\n");
        left = left.saturating_sub(piece.len());
        prompt.push_str(&piece);
    };
    if !goal.persona.is_null() {
        section(
            "About the business (persona)",
            goal.persona.to_string(),
            &mut prompt,
        );
    }
    section(
        "Context (latest values)",
        context_slice(ctx, settings),
        &mut prompt,
    );
    section("What memory recalls", memory_slice(ctx, goal), &mut prompt);
    Ok(prompt)
}

/// `key = value` lines of the context keys under the configured prefixes.
fn context_slice(ctx: &NodeContext, settings: &LlmSettings) -> String {
    let mut lines = Vec::new();
    for prefix in &settings.context_prefixes {
        let Ok((entries, _)) = knowledge::list(&ctx.store, prefix, None, 50, false) else {
            continue;
        };
        for e in entries {
            lines.push(format!("{} = {}", e.key, e.value));
        }
    }
    lines.join("\n")
}

fn memory_slice(ctx: &NodeContext, goal: &Goal<'_>) -> String {
    let Some(shared) = ctx.knowledge() else {
        return String::new();
    };
    let (query, bounds) = match &goal.recall {
        Some((q, b)) => (q.clone(), *b),
        None => match recall::Bounds::new(Some(RECALL_TOP_K), None) {
            Ok(b) => (goal.text.clone(), b),
            Err(_) => return String::new(),
        },
    };
    match recall::search(&ctx.store, &shared.index, &query, bounds, ctx.now_ms()) {
        Ok(reply) => recall::to_template_value(&reply)
            .get("text")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        Err(e) => {
            tracing::warn!(error = %e, "recall for a planning prompt failed");
            String::new()
        }
    }
}

fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(1);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Checks a draft; `Ok` is the plan as a task will run it.
fn check_draft(
    ctx: &NodeContext,
    defaults: &StepDefaults,
    goal: &Goal<'_>,
    plan_schema: &Value,
    content: &str,
) -> Result<Vec<StepSpec>, Vec<String>> {
    let draft: Value = serde_json::from_str(strip_fences(content))
        .map_err(|e| vec![format!("the reply is not JSON: {e}")])?;
    let errors = schema::validate(plan_schema, &draft);
    if !errors.is_empty() {
        return Err(errors);
    }
    let playbook = Playbook::from_plan(goal.playbook, goal.persona_name, &draft, defaults)
        .map_err(|e| vec![e])?;
    let known =
        crate::roles::planner::gather(ctx, &playbook, goal.task_id, goal.input, goal.persona)
            .map_err(|e| vec![e])?;
    let (steps, _) = playbook
        .plan_with(goal.task_id, goal.input, goal.persona, &known)
        .map_err(|e| vec![e.to_string()])?;
    let gate = crate::governance::Precheck {
        ctx,
        persona: goal.persona_name,
        task_id: goal.task_id,
        playbook: goal.playbook,
    };
    let mut denied = Vec::new();
    for s in &steps {
        let params = s.params.to_value_lossy();
        let decision = gate.decide(&s.id, &s.tool, &params);
        if decision.ruling == Ruling::Deny {
            denied.push(format!(
                "step `{}` ({}): the policies deny it: {}",
                s.id,
                s.tool,
                decision.reason_text()
            ));
        }
    }
    if denied.is_empty() {
        Ok(steps)
    } else {
        Err(denied)
    }
}

/// Some models wrap JSON in a Markdown fence even when asked for JSON.
fn strip_fences(text: &str) -> &str {
    let t = text.trim();
    let Some(inner) = t.strip_prefix("```") else {
        return t;
    };
    let inner = inner.strip_prefix("json").unwrap_or(inner);
    inner.strip_suffix("```").unwrap_or(inner).trim()
}

/// Routes models by role for one playbook: an `llm.generate` step without a `model`
/// gets the playbook's executor model, a judge without one the playbook's judge model.
/// (Empty: the node's own routing applies when the call is made.)
pub fn route_models(steps: &mut [StepSpec], executor_model: &str, judge_model: &str) {
    for s in steps {
        if s.tool == "llm.generate" && !executor_model.is_empty() {
            for params in std::iter::once(&mut s.params).chain(s.params_template.as_mut()) {
                if let Ok(Value::Object(mut map)) = params.to_value()
                    && !map.contains_key("model")
                {
                    map.insert("model".into(), Value::String(executor_model.into()));
                    *params = crate::model::JsonText::from_value(&Value::Object(map));
                }
            }
        }
        if let Some(judge) = &mut s.verify.llm_judge
            && judge.model.is_empty()
        {
            judge.model = judge_model.to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_schema_accepts_a_good_plan_and_names_what_is_wrong_with_a_bad_one() {
        let allowed: Vec<_> = tools::CATALOG
            .iter()
            .filter(|t| ["llm.generate", "file.write"].contains(&t.name))
            .collect();
        let schema = plan_schema(&allowed, 2, 7);
        let good = json!({"steps": [
            {"id": "draft", "tool": "llm.generate", "params": {"prompt": "Write a welcome"},
             "verify": {"llm_judge": {"rubric": "warm"}}},
            {"id": "save", "tool": "file.write", "depends_on": ["draft"],
             "params": {"path": "/tmp/x.md", "content": "{{steps.draft.output.text}}"},
             "verify": {"file_exists": true}},
        ]});
        assert_eq!(schema::validate(&schema, &good), Vec::<String>::new());
        let bad = json!({"steps": [
            {"id": "save", "tool": "file.write", "params": {"path": 3, "content": "x"},
             "verify": {"file_exists": true}},
        ]});
        assert_eq!(
            schema::validate(&schema, &bad),
            vec![
                "$.steps: must have at least 2 items",
                "$.steps[0].params.path: must be string (found integer)",
            ]
        );
        let unknown_tool = json!({"steps": [
            {"id": "a", "tool": "shell.run", "params": {"program": "rm"}, "verify": {"exit_code": 0}},
            {"id": "b", "tool": "file.write", "params": {"path": "/x", "content": ""}, "verify": {"file_exists": true}},
        ]});
        assert!(
            schema::validate(&schema, &unknown_tool)
                .iter()
                .any(|e| e.starts_with("$.steps[0].tool: must be")),
            "a tool outside the allowed set is refused"
        );
    }

    #[test]
    fn fences_are_stripped() {
        assert_eq!(strip_fences("```json\n{\"a\":1}\n```"), "{\"a\":1}");
        assert_eq!(strip_fences(" {\"a\":1} "), "{\"a\":1}");
    }

    #[test]
    fn models_are_routed_unless_the_step_names_one() {
        let spec = |params: Value| StepSpec {
            id: "d".into(),
            tool: "llm.generate".into(),
            params: crate::model::JsonText::from_value(&params),
            params_template: None,
            verify: crate::model::Criteria {
                llm_judge: Some(crate::model::Judge {
                    rubric: "r".into(),
                    threshold: 0.7,
                    model: String::new(),
                }),
                ..Default::default()
            },
            depends_on: vec![],
            max_attempts: 1,
            timeout_ms: 1,
            compensate: None,
            compensates: None,
            placement: None,
        };
        let mut steps = vec![
            spec(json!({"prompt": "p"})),
            spec(json!({"prompt": "p", "model": "own"})),
        ];
        route_models(&mut steps, "small", "judge-m");
        assert_eq!(steps[0].params.to_value().unwrap()["model"], "small");
        assert_eq!(steps[1].params.to_value().unwrap()["model"], "own");
        assert_eq!(
            steps[0].verify.llm_judge.as_ref().map(|j| j.model.as_str()),
            Some("judge-m")
        );
    }
}
