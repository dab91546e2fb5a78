//! `llm.generate`: text from the executor's model (drafts, summaries, snippets). Class
//! `idempotent`: asking again costs tokens but changes nothing outside, and a recorded
//! outcome is replayed, not asked again.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::{Call, Tool, ToolError, ToolInfo, opt_u64_param, str_param};
use crate::llm::{ChatRequest, LlmError, Message, Provider, Role};

pub struct LlmGenerate {
    provider: Option<Arc<Provider>>,
}

impl LlmGenerate {
    pub fn new(provider: Option<Arc<Provider>>) -> LlmGenerate {
        LlmGenerate { provider }
    }
}

impl Tool for LlmGenerate {
    fn info(&self) -> &'static ToolInfo {
        &super::CATALOG[4]
    }

    fn run(&self, call: Call) -> BoxFuture<'_, Result<Value, ToolError>> {
        Box::pin(async move {
            let provider = self
                .provider
                .as_ref()
                .ok_or_else(|| ToolError::permanent(LlmError::NotConfigured.to_string()))?;
            let p = &call.params;
            let prompt = str_param(p, "prompt")?;
            let optional_text = |key: &str| match p.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(ToolError::permanent(format!(
                    "param `{key}` must be a string"
                ))),
            };
            let system = optional_text("system")?;
            let model = optional_text("model")?.unwrap_or_default();
            let temperature = match p.get("temperature") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_f64().filter(|t| (0.0..=2.0).contains(t)).ok_or_else(
                    || ToolError::permanent("param `temperature` must be a number from 0 to 2"),
                )?),
            };
            let mut messages = Vec::with_capacity(2);
            if let Some(system) = system {
                messages.push(Message::system(system));
            }
            messages.push(Message::user(prompt));
            let reply = provider
                .chat(ChatRequest {
                    role: Role::Executor,
                    model,
                    messages,
                    schema: None,
                    max_tokens: opt_u64_param(p, "max_tokens")?,
                    temperature,
                })
                .await
                .map_err(|e| match e {
                    LlmError::Unavailable(m) => ToolError::retryable(m),
                    other => ToolError::permanent(other.to_string()),
                })?;
            if reply.content.trim().is_empty() {
                return Err(ToolError::retryable("the model answered nothing"));
            }
            Ok(json!({
                "text": reply.content,
                "model": reply.usage.model,
                "finish_reason": reply.finish_reason,
                "usage": {
                    "prompt_tokens": reply.usage.prompt_tokens,
                    "completion_tokens": reply.usage.completion_tokens,
                },
                "cost_usd": crate::budget::usd(reply.usage.cost_micros),
            }))
        })
    }
}
