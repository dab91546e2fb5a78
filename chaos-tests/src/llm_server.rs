//! A real OpenAI-compatible chat-completions server for the LLM tests: Cadre's client talks
//! to it over HTTP exactly as it would to a provider, so the wire format, the key, retries
//! on 429/5xx with `Retry-After` and concurrency are all exercised for real, with
//! deterministic replies queued by the test.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct LlmCall {
    pub model: String,
    /// `response_format.json_schema.name`, when the request asked for structured output.
    pub schema_name: Option<String>,
    /// The JSON schema sent with it.
    pub schema: Option<Value>,
    /// Every message's content, in order, as (role, content).
    pub messages: Vec<(String, String)>,
    pub authorization: Option<String>,
    /// The HTTP status this server answered.
    pub status: u16,
    pub at: Instant,
}

#[derive(Default)]
struct Inner {
    key: Option<String>,
    json_replies: HashMap<String, VecDeque<Value>>,
    text_replies: VecDeque<String>,
    failures: VecDeque<(u16, Option<String>)>,
    delay: Duration,
    calls: Vec<LlmCall>,
    in_flight: usize,
    max_in_flight: usize,
    served: u64,
}

type Shared = Arc<Mutex<Inner>>;
type Reply = (StatusCode, HeaderMap, Json<Value>);

/// A test that panicked while holding the lock must not hide the calls from later assertions.
fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves `POST /v1/chat/completions`; see the module docs.
pub struct LlmServer {
    /// Base URL ending in `/v1`, as OpenAI clients expect.
    pub url: String,
    inner: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl LlmServer {
    pub async fn start() -> anyhow::Result<LlmServer> {
        LlmServer::start_inner(None).await
    }

    /// Require `Authorization: Bearer <key>`; otherwise 401 with an OpenAI error body.
    pub async fn start_with_key(key: &str) -> anyhow::Result<LlmServer> {
        LlmServer::start_inner(Some(key.to_string())).await
    }

    async fn start_inner(key: Option<String>) -> anyhow::Result<LlmServer> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let url = format!("http://127.0.0.1:{}/v1", listener.local_addr()?.port());
        let inner = Arc::new(Mutex::new(Inner {
            key,
            ..Inner::default()
        }));
        let app = Router::new()
            .route("/v1/chat/completions", post(handle))
            .with_state(inner.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(LlmServer { url, inner, server })
    }

    /// Queue a structured reply for the next request whose json_schema name is `schema_name`
    /// (e.g. "cadre_plan", "cadre_judge"): its message content is `content` serialized as JSON text.
    pub fn push_json(&self, schema_name: &str, content: Value) {
        lock(&self.inner)
            .json_replies
            .entry(schema_name.to_string())
            .or_default()
            .push_back(content);
    }

    /// Queue a plain-text reply for the next request without structured output.
    pub fn push_text(&self, text: &str) {
        lock(&self.inner).text_replies.push_back(text.to_string());
    }

    /// Answer the next `n` requests (of any kind) with `status` (e.g. 429 or 503) and, if given,
    /// a `Retry-After` header with that exact value, with an OpenAI-style error body.
    pub fn fail_next(&self, n: usize, status: u16, retry_after: Option<&str>) {
        let mut inner = lock(&self.inner);
        for _ in 0..n {
            inner
                .failures
                .push_back((status, retry_after.map(str::to_string)));
        }
    }

    /// Hold every request this long before answering (to observe concurrency).
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.inner).delay = delay;
    }

    pub fn calls(&self) -> Vec<LlmCall> {
        lock(&self.inner).calls.clone()
    }

    /// Most requests ever in flight at once.
    pub fn max_in_flight(&self) -> usize {
        lock(&self.inner).max_in_flight
    }
}

impl Drop for LlmServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Counts a request out even when the client hangs up mid-delay and axum drops the handler.
struct InFlight(Shared);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut inner = lock(&self.0);
        inner.in_flight = inner.in_flight.saturating_sub(1);
    }
}

/// What could be read from a request, kept even when it is invalid so the call is recorded.
#[derive(Default)]
struct Parsed {
    model: String,
    schema_name: Option<String>,
    schema: Option<Value>,
    messages: Vec<(String, String)>,
    invalid: Option<String>,
}

impl Parsed {
    fn reject(&mut self, why: String) {
        if self.invalid.is_none() {
            self.invalid = Some(why);
        }
    }
}

fn parse(body: &[u8]) -> Parsed {
    let mut p = Parsed::default();
    // Raw bytes rather than axum's `Json`: a bad body must get an OpenAI error, not axum's.
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            p.reject(format!(
                "We could not parse the JSON body of your request: {e}"
            ));
            return p;
        }
    };
    if !v.is_object() {
        p.reject("The request body must be a JSON object.".into());
        return p;
    }
    match v["model"].as_str() {
        Some(m) => p.model = m.to_string(),
        None => p.reject("'model' is required and must be a string.".into()),
    }
    match v["messages"].as_array() {
        Some(ms) if !ms.is_empty() => {
            for (i, m) in ms.iter().enumerate() {
                match (m["role"].as_str(), m["content"].as_str()) {
                    (Some(r), Some(c)) => p.messages.push((r.to_string(), c.to_string())),
                    _ => p.reject(format!(
                        "messages[{i}] must have a string 'role' and 'content'."
                    )),
                }
            }
        }
        _ => p.reject("'messages' must be a non-empty array.".into()),
    }
    let format = &v["response_format"];
    if format["type"] == "json_schema" {
        p.schema_name = format["json_schema"]["name"].as_str().map(str::to_string);
        p.schema = format["json_schema"].get("schema").cloned();
        if p.schema_name.is_none() {
            p.reject("'response_format.json_schema.name' must be a string.".into());
        }
    }
    p
}

fn error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Reply {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, HeaderMap::new(), Json(body))
}

async fn handle(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let req = parse(&body);
    // Decided and recorded on arrival, so queued replies and failures follow arrival order.
    let (reply, delay) = {
        let mut inner = lock(&shared);
        inner.in_flight += 1;
        inner.max_in_flight = inner.max_in_flight.max(inner.in_flight);
        let reply = answer(&mut inner, authorization.as_deref(), &req);
        inner.calls.push(LlmCall {
            model: req.model,
            schema_name: req.schema_name,
            schema: req.schema,
            messages: req.messages,
            authorization,
            status: reply.0.as_u16(),
            at: Instant::now(),
        });
        (reply, inner.delay)
    };
    let _in_flight = InFlight(shared);
    tokio::time::sleep(delay).await; // the model at work
    reply.into_response()
}

fn answer(inner: &mut Inner, authorization: Option<&str>, req: &Parsed) -> Reply {
    if let Some((status, retry_after)) = inner.failures.pop_front() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let (kind, code) = match status.as_u16() {
            429 => ("rate_limit_error", Some("rate_limit_exceeded")),
            s if s >= 500 => ("server_error", None),
            _ => ("invalid_request_error", None),
        };
        let mut reply = error(status, &format!("Injected failure ({status})."), kind, code);
        if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
            reply.1.insert(header::RETRY_AFTER, v);
        }
        return reply;
    }
    let expected = inner.key.as_ref().map(|k| format!("Bearer {k}"));
    if expected.is_some() && authorization != expected.as_deref() {
        let (message, code) = ("Incorrect API key provided.", Some("invalid_api_key"));
        return error(
            StatusCode::UNAUTHORIZED,
            message,
            "invalid_request_error",
            code,
        );
    }
    if let Some(why) = &req.invalid {
        return error(StatusCode::BAD_REQUEST, why, "invalid_request_error", None);
    }
    let content = match &req.schema_name {
        Some(name) => match inner
            .json_replies
            .get_mut(name)
            .and_then(VecDeque::pop_front)
        {
            Some(v) => v.to_string(),
            None => {
                let message = format!("LlmServer: no reply is queued for schema '{name}'.");
                let status = StatusCode::INTERNAL_SERVER_ERROR;
                return error(status, &message, "server_error", None);
            }
        },
        None => inner.text_replies.pop_front().unwrap_or_else(|| {
            let last_user = req.messages.iter().rev().find(|(role, _)| role == "user");
            let text: String = last_user
                .map(|(_, c)| c.chars().take(200).collect())
                .unwrap_or_default();
            format!("Draft: {text}")
        }),
    };
    inner.served += 1;
    let prompt_chars: usize = req.messages.iter().map(|(_, c)| c.chars().count()).sum();
    let prompt = prompt_chars / 4 + 1;
    let completion = content.chars().count() / 4 + 1;
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let body = json!({
        "id": format!("chatcmpl-{}", inner.served),
        "object": "chat.completion",
        "created": created,
        "model": req.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    });
    (StatusCode::OK, HeaderMap::new(), Json(body))
}
