//! A real HTTP server standing in for the outside world (a CRM).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub idempotency_key: Option<String>,
    /// The `Cadre-Fencing-Token` header: the lease the sending owner held.
    pub fencing_token: Option<u64>,
    pub body: Value,
    /// When the request arrived.
    pub at: std::time::Instant,
}

/// How long a `slow/` path takes to answer.
pub const SLOW: std::time::Duration = std::time::Duration::from_millis(2000);

#[derive(Default)]
struct Inner {
    requests: Vec<Recorded>,
    /// First response per key: a retried request gets the same answer, as real APIs do.
    by_key: HashMap<String, Value>,
    /// Answer the next N requests with this status instead.
    fail_next: Vec<u16>,
}

/// Serves `POST /clients` (201 with an id) and `POST /anything` the same way; a path
/// under `slow/` answers after [`SLOW`], so a call is in flight for that long.
pub struct HttpSink {
    pub url: String,
    inner: Arc<Mutex<Inner>>,
    server: tokio::task::JoinHandle<()>,
}

impl HttpSink {
    pub async fn start() -> anyhow::Result<HttpSink> {
        HttpSink::start_on("127.0.0.1").await
    }

    /// Listening on `ip` (`0.0.0.0`: reachable from containers); `url` names 127.0.0.1.
    pub async fn start_on(ip: &str) -> anyhow::Result<HttpSink> {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
        let url = format!("http://127.0.0.1:{}", listener.local_addr()?.port());
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .route("/{*path}", post(handle))
            .with_state(inner.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(HttpSink { url, inner, server })
    }

    /// The next requests get these statuses (e.g. `[503, 503]`), then normal answers.
    pub fn fail_next(&self, statuses: &[u16]) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.fail_next = statuses.to_vec();
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner
            .lock()
            .map(|i| i.requests.clone())
            .unwrap_or_default()
    }

    /// No effect under a stale lease, as the target sees it: per idempotency key, in the
    /// order the calls arrived, the fencing tokens never go back. Every call must carry
    /// a token (a cluster's calls do).
    pub fn check_fencing(&self) -> anyhow::Result<()> {
        let mut by_key: std::collections::BTreeMap<String, Vec<(std::time::Instant, u64)>> =
            Default::default();
        for r in self.requests() {
            let token = r
                .fencing_token
                .ok_or_else(|| anyhow::anyhow!("a call without a fencing token: {r:?}"))?;
            let key = r.idempotency_key.clone().unwrap_or_default();
            by_key.entry(key).or_default().push((r.at, token));
        }
        for (key, mut calls) in by_key {
            calls.sort();
            let tokens: Vec<u64> = calls.iter().map(|c| c.1).collect();
            anyhow::ensure!(
                tokens.windows(2).all(|w| w[0] <= w[1]),
                "{key}: a call under a stale lease: tokens {tokens:?}"
            );
        }
        Ok(())
    }
}

impl Drop for HttpSink {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    axum::extract::Path(path): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Option<Json<Value>>,
) -> (StatusCode, Json<Value>) {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let fencing_token = headers
        .get("cadre-fencing-token")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = body.map(|Json(b)| b).unwrap_or(Value::Null);
    // Recorded on arrival: a slow call is seen while it is in flight.
    if let Ok(mut inner) = inner.lock() {
        inner.requests.push(Recorded {
            path: path.clone(),
            idempotency_key: key.clone(),
            fencing_token,
            body: body.clone(),
            at: std::time::Instant::now(),
        });
    }
    if path.starts_with("slow/") {
        tokio::time::sleep(SLOW).await; // the remote end at work
    }
    let Ok(mut inner) = inner.lock() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({})));
    };
    if !inner.fail_next.is_empty() {
        let status = inner.fail_next.remove(0);
        return (
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            Json(json!({"error": "injected"})),
        );
    }
    if let Some(previous) = key.as_ref().and_then(|k| inner.by_key.get(k)) {
        return (StatusCode::CREATED, Json(previous.clone()));
    }
    let mut reply = if body.is_object() { body } else { json!({}) };
    let id = format!("crm-{}", inner.by_key.len() + 1);
    reply["id"] = json!(id);
    if let Some(k) = key {
        inner.by_key.insert(k, reply.clone());
    }
    (StatusCode::CREATED, Json(reply))
}
