//! Tools (adapters): the only code that touches the outside world.
//!
//! Every tool declares its idempotency class, which decides what the effect ledger
//! does with an effect whose outcome a crash left unknown:
//! `idempotent` runs again, `keyed` runs again with the same key (the target dedupes),
//! `unsafe` is never re-run blindly (an operator decides).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod blocking_pool;
mod context_put;
mod email_send;
mod file_write;
mod http_request;
mod llm_generate;
mod shell_run;

pub use context_put::ContextPut;
pub use email_send::{EmailSend, SmtpConfig, SmtpTls};
pub use file_write::FileWrite;
pub use http_request::HttpRequest;
pub use llm_generate::LlmGenerate;
pub use shell_run::ShellRun;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdempotencyClass {
    Idempotent,
    Keyed,
    Unsafe,
}

/// What every node knows about a tool, whether or not it runs it: used to validate
/// plans before anything executes.
#[derive(Debug, Clone, Copy)]
pub struct ToolInfo {
    pub name: &'static str,
    pub class: IdempotencyClass,
    pub description: &'static str,
    pub required_params: &'static [&'static str],
    pub optional_params: &'static [&'static str],
    /// Its params as a JSON Schema (the subset `llm::schema` checks): what the LLM
    /// planner is shown, and what its plans are checked against.
    pub params_schema: &'static str,
}

impl ToolInfo {
    pub fn schema(&self) -> Value {
        // The schemas are constants of this file, checked by a test.
        serde_json::from_str(self.params_schema).unwrap_or(Value::Null)
    }
}

pub const CATALOG: &[ToolInfo] = &[
    ToolInfo {
        name: "file.write",
        class: IdempotencyClass::Idempotent,
        description: "Write a whole file atomically (temp file + rename) under a configured root",
        required_params: &["path", "content"],
        optional_params: &[],
        params_schema: r#"{"type":"object","properties":{
            "path":{"type":"string","minLength":1,"description":"absolute path under a configured root"},
            "content":{"type":"string","description":"the whole file"}},
            "required":["path","content"],"additionalProperties":false}"#,
    },
    ToolInfo {
        name: "http.request",
        class: IdempotencyClass::Keyed,
        description: "HTTP request with an Idempotency-Key header; 5xx, 429 and timeouts retry",
        required_params: &["url"],
        optional_params: &["method", "headers", "json", "body", "timeout_ms"],
        params_schema: r#"{"type":"object","properties":{
            "url":{"type":"string","minLength":1},
            "method":{"enum":["GET","POST","PUT","PATCH","DELETE","HEAD"]},
            "headers":{"type":"object","additionalProperties":{"type":"string"}},
            "json":{"description":"a JSON body"},
            "body":{"type":"string","description":"a text body (not with json)"},
            "timeout_ms":{"type":"integer","minimum":1}},
            "required":["url"],"additionalProperties":false}"#,
    },
    ToolInfo {
        name: "shell.run",
        class: IdempotencyClass::Unsafe,
        description: "Run an allowed program with argv (never a shell string); captures exit code and output",
        required_params: &["program"],
        optional_params: &["args", "cwd", "env", "timeout_ms"],
        params_schema: r#"{"type":"object","properties":{
            "program":{"type":"string","minLength":1},
            "args":{"type":"array","items":{"type":"string"}},
            "cwd":{"type":"string"},
            "env":{"type":"object","additionalProperties":{"type":"string"}},
            "timeout_ms":{"type":"integer","minimum":1}},
            "required":["program"],"additionalProperties":false}"#,
    },
    ToolInfo {
        name: "context.put",
        class: IdempotencyClass::Keyed,
        description: "Write a key of the context store (a new version, with the task and step as author); the step's key is the write id, so a retry writes once",
        required_params: &["key", "value"],
        optional_params: &["expected_version", "reason"],
        params_schema: r#"{"type":"object","properties":{
            "key":{"type":"string","minLength":3,"description":"namespaced: fact.*, pref.*, project.*, action.*, safety.*"},
            "value":{"description":"any JSON; null deletes the key"},
            "expected_version":{"type":"integer","minimum":0},
            "reason":{"type":"string"}},
            "required":["key","value"],"additionalProperties":false}"#,
    },
    ToolInfo {
        name: "llm.generate",
        class: IdempotencyClass::Idempotent,
        description: "Ask the executor's LLM for text (a draft, a summary, a social snippet); the output's `text` is the answer",
        required_params: &["prompt"],
        optional_params: &["system", "model", "max_tokens", "temperature"],
        params_schema: r#"{"type":"object","properties":{
            "prompt":{"type":"string","minLength":1},
            "system":{"type":"string"},
            "model":{"type":"string","minLength":1},
            "max_tokens":{"type":"integer","minimum":1,"maximum":32768},
            "temperature":{"type":"number","minimum":0,"maximum":2}},
            "required":["prompt"],"additionalProperties":false}"#,
    },
    ToolInfo {
        name: WAIT,
        class: IdempotencyClass::Idempotent,
        description: "Wait, durably: `for` a duration (`90s`, `3d`) or `until` a time (RFC 3339); the task costs nothing meanwhile and resumes on time after any restart",
        required_params: &[],
        optional_params: &["for", "until", "event", "timeout"],
        params_schema: r#"{"type":"object","properties":{
            "for":{"type":["string","integer"],"description":"90s, 10m, 2h, 3d, or milliseconds"},
            "until":{"type":["string","integer"],"description":"RFC 3339 time, or milliseconds since the epoch"},
            "event":{"type":"string","description":"wait for this event (cadre.tasks.signal), at most `timeout`"},
            "timeout":{"type":["string","integer"],"description":"with `event`: how long at most"}},
            "additionalProperties":false}"#,
    },
    ToolInfo {
        name: "email.send",
        class: IdempotencyClass::Keyed,
        description: "Send a plain-text mail over the node's SMTP server; its Message-ID comes from the step's key, so a retried send is recognisably the same mail",
        required_params: &["to", "subject", "text"],
        optional_params: &["from", "cc", "reply_to"],
        params_schema: r#"{"type":"object","properties":{
            "to":{"type":["string","array"],"items":{"type":"string"},"description":"an address, or a list"},
            "subject":{"type":"string","minLength":1},
            "text":{"type":"string"},
            "from":{"type":"string","description":"default: the node's mail_from"},
            "cc":{"type":["string","array"],"items":{"type":"string"}},
            "reply_to":{"type":"string"}},
            "required":["to","subject","text"],"additionalProperties":false}"#,
    },
];

/// The durable timer: run by the task itself, never sent to an executor.
pub const WAIT: &str = "wait";

/// Whether a successful call of `tool` reports what it cost beyond its configured estimate, read from its
/// output, in millionths of a US dollar: `llm.generate` reports its tokens priced
/// (`cost_usd`). Charged once, when the task records the outcome.
pub fn reports_cost(tool: &str) -> bool {
    tool == "llm.generate"
}

/// See [`reports_cost`].
pub fn output_cost_micros(tool: &str, output: &Value) -> u64 {
    match tool {
        "llm.generate" => output
            .get("cost_usd")
            .and_then(Value::as_f64)
            .filter(|c| c.is_finite() && *c >= 0.0)
            .map(crate::budget::micros)
            .unwrap_or(0),
        _ => 0,
    }
}

pub fn info(name: &str) -> Option<&'static ToolInfo> {
    CATALOG.iter().find(|t| t.name == name)
}

/// Checks that `params` is an object with the tool's required keys and no unknown ones.
pub fn check_params(info: &ToolInfo, params: &Value) -> Result<(), String> {
    let Value::Object(map) = params else {
        return Err(format!("params for `{}` must be a table", info.name));
    };
    for key in info.required_params {
        if !map.contains_key(*key) {
            return Err(format!("`{}` needs param `{key}`", info.name));
        }
    }
    for key in map.keys() {
        if !info.required_params.contains(&key.as_str())
            && !info.optional_params.contains(&key.as_str())
        {
            let known: Vec<_> = info
                .required_params
                .iter()
                .chain(info.optional_params)
                .copied()
                .collect();
            return Err(format!(
                "`{}` has no param `{key}` (known: {})",
                info.name,
                known.join(", ")
            ));
        }
    }
    Ok(())
}

/// One call of a tool.
#[derive(Debug, Clone)]
pub struct Call {
    pub params: Value,
    pub idempotency_key: String,
    /// The task owner's lease token (0 without leases): a target that remembers the
    /// highest it has seen can refuse a stale owner's call.
    pub fencing_token: u64,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ToolError {
    #[error("{message}")]
    Retryable {
        message: String,
        output: Option<Value>,
    },
    #[error("{message}")]
    Permanent {
        message: String,
        output: Option<Value>,
    },
}

impl ToolError {
    pub fn permanent(message: impl Into<String>) -> ToolError {
        ToolError::Permanent {
            message: message.into(),
            output: None,
        }
    }
    pub fn retryable(message: impl Into<String>) -> ToolError {
        ToolError::Retryable {
            message: message.into(),
            output: None,
        }
    }
}

pub trait Tool: Send + Sync + 'static {
    fn info(&self) -> &'static ToolInfo;
    fn run(&self, call: Call) -> BoxFuture<'_, Result<Value, ToolError>>;
}

/// Configuration the tools need from the node.
#[derive(Debug, Clone)]
pub struct ToolConfig {
    /// Canonical roots `file.write` may write under. Empty: `file.write` refuses all.
    pub file_roots: Vec<PathBuf>,
    /// fsync file and directory on `file.write` (power-loss durability).
    pub file_fsync: bool,
    /// Programs `shell.run` may start, as given (names looked up on PATH, or absolute).
    pub shell_allow: Vec<String>,
    /// `email.send`'s server; `None`: the tool refuses every send.
    pub smtp: Option<SmtpConfig>,
    pub output_bytes_max: usize,
}

/// The tools this node runs.
pub fn build(
    config: &ToolConfig,
    nats: async_nats::Client,
    llm: Option<Arc<crate::llm::Provider>>,
    secrets: Option<Arc<crate::secrets::SecretStore>>,
) -> anyhow::Result<Vec<Arc<dyn Tool>>> {
    Ok(vec![
        Arc::new(ContextPut::new(nats)),
        Arc::new(EmailSend::new(config.smtp.clone(), secrets)),
        Arc::new(LlmGenerate::new(llm)),
        Arc::new(FileWrite::new(config.file_roots.clone(), config.file_fsync)),
        Arc::new(HttpRequest::new(config.output_bytes_max)?),
        Arc::new(ShellRun::new(
            config.shell_allow.clone(),
            config.output_bytes_max,
        )),
    ])
}

fn str_param<'a>(params: &'a Value, key: &str) -> Result<&'a str, ToolError> {
    params
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| ToolError::permanent(format!("param `{key}` must be a string")))
}

fn opt_u64_param(params: &Value, key: &str) -> Result<Option<u64>, ToolError> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ToolError::permanent(format!("param `{key}` must be a non-negative integer"))
        }),
    }
}

/// Cuts `bytes` to at most `max` bytes on a char boundary; says whether it cut.
fn bounded_text(bytes: &[u8], max: usize) -> (String, bool) {
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= max {
        return (text.into_owned(), false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (text[..end].to_string(), true)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_tool_has_a_schema_naming_its_params() {
        for tool in super::CATALOG {
            let schema = tool.schema();
            let props = schema["properties"]
                .as_object()
                .unwrap_or_else(|| panic!("{}: schema has no properties", tool.name));
            let mut named: Vec<&str> = props.keys().map(String::as_str).collect();
            let mut declared: Vec<&str> = tool
                .required_params
                .iter()
                .chain(tool.optional_params)
                .copied()
                .collect();
            named.sort_unstable();
            declared.sort_unstable();
            assert_eq!(named, declared, "{}", tool.name);
        }
    }
}
