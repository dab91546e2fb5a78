//! The Governor: the gate the task machine passes before every dispatch.
//!
//! It renders the params the step would send, hashes them (an approval is bound to that
//! hash), estimates the cost, gathers the facts the policies see and asks them. The
//! machine commits the answer with the step, so no dispatch happens that was not decided.

use std::path::{Component, Path};

use serde_json::Value;

use crate::audit;
use crate::context::NodeContext;
use crate::machine::{Gate, Gated, approval_grants};
use crate::model::{JsonText, StepStatus, Task};
use crate::policy::{Ruling, StepFacts};
use crate::template;

/// The node's gate: its policies, settings and metrics.
pub struct Governor<'a> {
    pub ctx: &'a NodeContext,
}

impl Gate for Governor<'_> {
    fn check(&self, task: &Task, step: usize, now_ms: u64) -> Gated {
        let policies = self.ctx.policies();
        let spec = &task.steps[step].spec;
        let params = match step_params(task, step) {
            Ok(p) => p,
            // Nothing will be sent: the dispatch fails the step permanently with this
            // error, before any effect. The policies have nothing to judge.
            Err(e) => {
                return Gated {
                    ruling: Ruling::Allow,
                    reason: e,
                    policy_version: policies.version().to_string(),
                    args_hash: String::new(),
                    cost_micros: 0,
                    charged_micros: 0,
                };
            }
        };
        let value = params.to_value().unwrap_or(Value::Null);
        // A tool that reports what it cost is charged when it has run; before, its
        // estimate is only held against the caps.
        let reports = crate::tools::reports_cost(&spec.tool);
        let configured = self.ctx.settings.tool_costs.get(&spec.tool).copied();
        let cost_micros = match configured {
            Some(c) => c,
            None if reports => self.llm_estimate(&value),
            None => 0,
        };
        let mut facts = StepFacts {
            persona: task.persona.clone(),
            task_id: task.id.clone(),
            step_id: spec.id.clone(),
            playbook: task.playbook.clone(),
            tool: spec.tool.clone(),
            node: self.ctx.settings.node_id.clone(),
            cost_micros,
            now_ms,
            ..StepFacts::default()
        };
        describe(&mut facts, &value, &self.ctx.settings.tools.file_roots);
        let decision = policies.decide(&facts);
        self.ctx
            .metrics
            .policy_decisions_total
            .with_label_values(&[decision.ruling.as_str()])
            .inc();
        let args_hash = audit::args_hash(&params);
        let approved = task.steps[step]
            .approval
            .as_ref()
            .is_some_and(|a| approval_grants(a, &args_hash, &decision.policy_version));
        let mut gated = Gated {
            ruling: decision.ruling,
            reason: decision.reason_text(),
            policy_version: decision.policy_version,
            args_hash,
            cost_micros,
            charged_micros: if reports { 0 } else { cost_micros },
        };
        // The step would run (allowed, or approved as it is): charge its cost, unless that
        // crosses a cap nobody approved crossing; then it waits for an approval instead.
        let runs = match gated.ruling {
            Ruling::Allow => true,
            Ruling::RequireApproval => approved,
            Ruling::Deny => false,
        };
        if runs {
            let day = crate::budget::day_of(now_ms);
            let charged = self.ctx.ledger.try_charge(
                &self.ctx.settings.caps,
                &day,
                &task.playbook,
                task.cost_micros(),
                cost_micros,
                !reports,
                approved,
            );
            if let Err(breach) = charged {
                gated.ruling = Ruling::RequireApproval;
                gated.reason = format!("budget: {}", breach.0);
            }
        }
        gated
    }
}

impl Governor<'_> {
    /// An `llm.generate` call's cost before it is made, at its model's price: the
    /// prompt (about four characters a token) and the whole `max_tokens` (1,024 when
    /// unset). 0 without a provider or a price, which leaves the caps unchecked until
    /// the call reports its cost.
    fn llm_estimate(&self, params: &Value) -> u64 {
        let Some(provider) = self.ctx.llm() else {
            return 0;
        };
        let model = params
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_else(|| provider.model_for(crate::llm::Role::Executor));
        let Some(price) = provider.price(model) else {
            return 0;
        };
        let chars: usize = ["prompt", "system"]
            .iter()
            .filter_map(|k| params.get(*k).and_then(Value::as_str))
            .map(str::len)
            .sum();
        let completion = params
            .get("max_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(1_024);
        price.cost_micros(chars as u64 / 4 + 1, completion)
    }
}

/// What the policies say of a step before any task runs it: the LLM planner's
/// pre-check, so a plan with a step the policies deny is sent back for repair.
/// (`require_approval` passes: the step will wait for a person when dispatched.)
pub struct Precheck<'a> {
    pub ctx: &'a NodeContext,
    pub persona: &'a str,
    pub task_id: &'a str,
    pub playbook: &'a str,
}

impl Precheck<'_> {
    pub fn decide(&self, step_id: &str, tool: &str, params: &Value) -> crate::policy::Decision {
        let mut facts = StepFacts {
            persona: self.persona.to_string(),
            task_id: self.task_id.to_string(),
            step_id: step_id.to_string(),
            playbook: self.playbook.to_string(),
            tool: tool.to_string(),
            node: self.ctx.settings.node_id.clone(),
            cost_micros: self.ctx.settings.tool_costs.get(tool).copied().unwrap_or(0),
            now_ms: self.ctx.now_ms(),
            ..StepFacts::default()
        };
        describe(&mut facts, params, &self.ctx.settings.tools.file_roots);
        self.ctx.policies().decide(&facts)
    }
}

/// Fills in what the params say, by tool: method, host, path, program, recipient.
fn describe(facts: &mut StepFacts, params: &Value, file_roots: &[std::path::PathBuf]) {
    let text = |key: &str| params.get(key).and_then(Value::as_str).unwrap_or("");
    match facts.tool.as_str() {
        "http.request" => {
            facts.method = match text("method") {
                "" => "GET".to_string(),
                m => m.to_ascii_uppercase(),
            };
            facts.host = crate::rate::target_host(params).unwrap_or_default();
            facts.path = url_path(text("url")).to_string();
        }
        "file.write" => {
            facts.path = text("path").to_string();
            facts.within_roots = within_roots(Path::new(&facts.path), file_roots);
        }
        // The key a step writes in the context store.
        "context.put" => facts.path = text("key").to_string(),
        // Who a mail goes to (the first recipient; policies can match on it).
        "email.send" => {
            facts.recipient = match params.get("to") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
                _ => String::new(),
            }
        }
        "shell.run" => {
            facts.program = text("program").to_string();
            let args: Vec<String> = match params.get("args") {
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|a| match a {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect(),
                _ => Vec::new(),
            };
            facts.command = std::iter::once(facts.program.clone())
                .chain(args)
                .collect::<Vec<_>>()
                .join(" ");
        }
        _ => {}
    }
    facts.recipient = text("to").to_string();
}

/// The path of a URL (`/clients` of `https://crm/clients?x=1`); "/" if it has none.
fn url_path(url: &str) -> &str {
    let Some((_, rest)) = url.split_once("://") else {
        return "";
    };
    match rest.find('/') {
        Some(i) => rest[i..].split(['?', '#']).next().unwrap_or("/"),
        None => "/",
    }
}

/// The same lexical test `file.write` starts with: absolute, no `..`, under a root.
/// (The tool also resolves symlinks before writing.)
fn within_roots(path: &Path, roots: &[std::path::PathBuf]) -> bool {
    path.is_absolute()
        && !path.components().any(|c| matches!(c, Component::ParentDir))
        && roots.iter().any(|r| path.starts_with(r))
}

/// The params step `i` sends: its rendered params, or its template rendered now with
/// the input, the task and the outputs of the steps that succeeded, in one pass (so
/// text that came from the input is never read as a template).
pub fn step_params(task: &Task, i: usize) -> Result<JsonText, String> {
    let spec = &task.steps[i].spec;
    let Some(template) = &spec.params_template else {
        return Ok(spec.params.clone());
    };
    let render = || -> Result<JsonText, String> {
        let template = template
            .to_value()
            .map_err(|e| format!("stored template unreadable: {e}"))?;
        let input = task
            .input
            .to_value()
            .map_err(|e| format!("stored input unreadable: {e}"))?;
        let mut steps = serde_json::Map::new();
        for s in task
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::Succeeded)
        {
            let output = s
                .output
                .as_ref()
                .map(JsonText::to_value_lossy)
                .unwrap_or(Value::Null);
            steps.insert(s.spec.id.clone(), serde_json::json!({ "output": output }));
        }
        let task_scope = serde_json::json!({ "id": task.id, "playbook": task.playbook });
        let scope: &[(&str, &Value)] = &[
            ("input", &input),
            ("task", &task_scope),
            ("steps", &Value::Object(steps)),
        ];
        template::render(&template, scope)
            .map(|v| JsonText::from_value(&v))
            .map_err(|e| e.to_string())
    };
    render().map_err(|e| format!("params of step `{}`: {e}", spec.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_come_from_the_params_by_tool() {
        let roots = vec![std::path::PathBuf::from("/srv/cadre")];
        let mut f = StepFacts {
            tool: "http.request".into(),
            ..StepFacts::default()
        };
        let p = serde_json::json!({"method": "post", "url": "https://User:pw@CRM.example.com:8443/clients/7?x=1"});
        describe(&mut f, &p, &roots);
        assert_eq!(
            (f.method.as_str(), f.host.as_str()),
            ("POST", "crm.example.com")
        );
        assert_eq!(f.path, "/clients/7");

        let mut f = StepFacts {
            tool: "file.write".into(),
            ..StepFacts::default()
        };
        describe(
            &mut f,
            &serde_json::json!({"path": "/srv/cadre/a/b.md"}),
            &roots,
        );
        assert!(f.within_roots);
        for outside in [
            "/srv/cadre/../etc/passwd",
            "/etc/passwd",
            "srv/cadre/x",
            "/srv/cadrex/y",
        ] {
            let mut f = StepFacts {
                tool: "file.write".into(),
                ..StepFacts::default()
            };
            describe(&mut f, &serde_json::json!({ "path": outside }), &roots);
            assert!(!f.within_roots, "{outside}");
        }

        let mut f = StepFacts {
            tool: "shell.run".into(),
            ..StepFacts::default()
        };
        describe(
            &mut f,
            &serde_json::json!({"program": "rm", "args": ["-rf", "/tmp/x"]}),
            &roots,
        );
        assert_eq!(
            (f.program.as_str(), f.command.as_str()),
            ("rm", "rm -rf /tmp/x")
        );
    }

    #[test]
    fn a_url_path_defaults_to_root() {
        assert_eq!(url_path("http://h"), "/");
        assert_eq!(url_path("http://h:80/a/b#c"), "/a/b");
        assert_eq!(url_path("not a url"), "");
    }
}
