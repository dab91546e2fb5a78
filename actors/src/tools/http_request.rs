//! `http.request`: one HTTP call carrying the step's `Idempotency-Key`.

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Map, Value, json};

use super::{Call, Tool, ToolError, ToolInfo, bounded_text, opt_u64_param, str_param};

pub struct HttpRequest {
    client: reqwest::Client,
    body_bytes_max: usize,
}

impl HttpRequest {
    pub fn new(body_bytes_max: usize) -> anyhow::Result<HttpRequest> {
        // reqwest is built without a default crypto provider; ring is already in the
        // tree through async-nats. Installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .user_agent(concat!("cadre/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()?;
        Ok(HttpRequest {
            client,
            body_bytes_max,
        })
    }
}

impl Tool for HttpRequest {
    fn info(&self) -> &'static ToolInfo {
        &super::CATALOG[1]
    }

    fn run(&self, call: Call) -> BoxFuture<'_, Result<Value, ToolError>> {
        async move {
            let p = &call.params;
            let url = str_param(p, "url")?;
            let method = p
                .get("method")
                .and_then(Value::as_str)
                .unwrap_or("GET")
                .to_ascii_uppercase();
            let method = reqwest::Method::from_bytes(method.as_bytes())
                .map_err(|_| ToolError::permanent(format!("`{method}` is not an HTTP method")))?;
            let timeout = opt_u64_param(p, "timeout_ms")?
                .map(Duration::from_millis)
                .unwrap_or(call.timeout);
            let mut req = self
                .client
                .request(method, url)
                .timeout(timeout)
                .header("Idempotency-Key", &call.idempotency_key);
            if call.fencing_token != 0 {
                req = req.header("Cadre-Fencing-Token", call.fencing_token);
            }
            if let Some(headers) = p.get("headers") {
                let Value::Object(headers) = headers else {
                    return Err(ToolError::permanent(
                        "param `headers` must be a table of strings",
                    ));
                };
                for (name, value) in headers {
                    let value = value.as_str().ok_or_else(|| {
                        ToolError::permanent(format!("header `{name}` must be a string"))
                    })?;
                    req = req.header(name.as_str(), value);
                }
            }
            match (p.get("json"), p.get("body")) {
                (Some(_), Some(_)) => {
                    return Err(ToolError::permanent("give `json` or `body`, not both"));
                }
                (Some(json), None) => req = req.json(json),
                (None, Some(Value::String(body))) => req = req.body(body.clone()),
                (None, Some(_)) => {
                    return Err(ToolError::permanent("param `body` must be a string"));
                }
                (None, None) => {}
            }
            let resp = req.send().await.map_err(|e| classify_send_error(&e))?;
            let status = resp.status();
            let content_type = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let bytes = read_bounded(resp, self.body_bytes_max).await?;
            let (text, truncated) = bounded_text(&bytes, self.body_bytes_max);
            let body = if content_type.contains("json") && !truncated {
                serde_json::from_str(&text).unwrap_or(Value::String(text))
            } else {
                Value::String(text)
            };
            let mut out = Map::new();
            out.insert("status".into(), json!(status.as_u16()));
            out.insert("content_type".into(), json!(content_type));
            out.insert("body".into(), body);
            if truncated {
                out.insert("body_truncated".into(), json!(true));
            }
            let out = Value::Object(out);
            if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                Err(ToolError::Retryable {
                    message: format!("HTTP {status} from {url}"),
                    output: Some(out),
                })
            } else if status.is_client_error() {
                Err(ToolError::Permanent {
                    message: format!("HTTP {status} from {url}"),
                    output: Some(out),
                })
            } else {
                Ok(out)
            }
        }
        .boxed()
    }
}

fn classify_send_error(e: &reqwest::Error) -> ToolError {
    // Builder errors (a bad URL) will not improve with time; transport errors may.
    if e.is_builder() {
        ToolError::permanent(format!("invalid request: {e}"))
    } else if e.is_timeout() {
        ToolError::retryable(format!("timed out: {e}"))
    } else {
        ToolError::retryable(format!("request failed: {e}"))
    }
}

/// Reads at most `max + 1` bytes, so a huge body cannot exhaust memory.
async fn read_bounded(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, ToolError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| ToolError::retryable(format!("reading body: {e}")))?
    {
        let room = (max + 1).saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() > max {
            break;
        }
    }
    Ok(out)
}
