//! `context.put`: writes a key of the context store through `cadre.context.put`, like
//! any other client. The step's idempotency key is the write id, so a retried step
//! writes one version.

use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::{Call, Tool, ToolError, ToolInfo, opt_u64_param, str_param};
use crate::protocol::ErrorReply;
use crate::protocol::knowledge::{Author, CONTEXT_PUT, ContextPutRequest, WriteReply, WriteStatus};

pub struct ContextPut {
    nats: async_nats::Client,
}

impl ContextPut {
    pub fn new(nats: async_nats::Client) -> ContextPut {
        ContextPut { nats }
    }
}

impl Tool for ContextPut {
    fn info(&self) -> &'static ToolInfo {
        &super::CATALOG[3]
    }

    fn run(&self, call: Call) -> BoxFuture<'_, Result<Value, ToolError>> {
        Box::pin(async move {
            let key = str_param(&call.params, "key")?.to_string();
            let value = call.params.get("value").cloned().unwrap_or(Value::Null);
            let expected_version = opt_u64_param(&call.params, "expected_version")?;
            let reason = match call.params.get("reason") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err(ToolError::permanent("param `reason` must be a string")),
            };
            // The key is `<task_id>.<step_id>`: the author, and (as one token) the write id.
            let (task_id, step_id) = match call.idempotency_key.split_once('.') {
                Some((t, s)) => (Some(t.to_string()), Some(s.to_string())),
                None => (None, None),
            };
            let request = ContextPutRequest {
                key,
                value,
                expected_version,
                reason,
                author: Some(Author {
                    actor: crate::roles::EXECUTOR.into(),
                    task_id,
                    step_id,
                }),
                write_id: Some(call.idempotency_key.replace('.', "-")),
            };
            let body = serde_json::to_vec(&request)
                .map_err(|e| ToolError::permanent(format!("cannot encode the write: {e}")))?;
            let timeout = call.timeout.min(Duration::from_secs(60));
            let reply = tokio::time::timeout(timeout, self.nats.request(CONTEXT_PUT, body.into()))
                .await
                .map_err(|_| ToolError::retryable("cadre.context.put did not answer in time"))?
                .map_err(|e| ToolError::retryable(format!("cadre.context.put: {e}")))?;
            if let Ok(e) = serde_json::from_slice::<ErrorReply>(&reply.payload) {
                use crate::protocol::ErrorCode::*;
                let message = format!("{}: {}", e.error.code.as_str(), e.error.message);
                let output = Some(json!({"error": e.error}));
                return Err(match e.error.code {
                    Unavailable | Internal => ToolError::Retryable { message, output },
                    _ => ToolError::Permanent { message, output },
                });
            }
            let written: WriteReply = serde_json::from_slice(&reply.payload)
                .map_err(|e| ToolError::retryable(format!("unreadable reply: {e}")))?;
            match written.status {
                WriteStatus::Applied => Ok(json!({
                    "key": written.key,
                    "version": written.version,
                    "seq": written.seq,
                    "write_id": written.write_id,
                })),
                // Kept and published when the stream is back; the retry asks again.
                _ => Err(ToolError::retryable(format!(
                    "write {} is pending: the knowledge stream is not reachable",
                    written.write_id
                ))),
            }
        })
    }
}
