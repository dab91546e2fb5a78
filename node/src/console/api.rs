//! The console's JSON API: each endpoint checks the session (and, for a POST, that it
//! came from the console's page), then asks the public NATS subject the CLI asks and
//! answers with its reply. A NATS error reply keeps its `{"error": …}` body, with the
//! HTTP status that fits its code.

// A handler's early exit is the HTTP response itself (axum's `Response`, 128 bytes):
// boxing it would allocate on every refused request to please a size lint.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use actors::model::{ApprovalDecision, DecisionKind};
use actors::protocol::{ClusterStatusReply, ErrorCode, ErrorReply, subject};
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Console;
use super::auth::{self, Refusal};

/// Longest note or reason taken.
const NOTE_CHARS_MAX: usize = 2_000;

fn error(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response {
    (status, Json(ErrorReply::new(code, message))).into_response()
}

fn refused(r: Refusal) -> Response {
    match r {
        Refusal::Unauthenticated => error(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthenticated,
            "log in to the console first",
        ),
        Refusal::Forbidden(why) => error(StatusCode::FORBIDDEN, ErrorCode::Forbidden, why),
    }
}

fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadJson
        | ErrorCode::InvalidRequest
        | ErrorCode::UnknownPlaybook
        | ErrorCode::InvalidInput
        | ErrorCode::GoalNotSupported
        | ErrorCode::PlanInvalid => StatusCode::BAD_REQUEST,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Conflict | ErrorCode::OverBudget => StatusCode::CONFLICT,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
    }
}

impl Console {
    /// A reading request: a live session.
    pub(super) fn reader(&self, headers: &HeaderMap) -> Result<(), Response> {
        self.sessions
            .session(headers, Instant::now())
            .map(|_| ())
            .map_err(refused)
    }

    /// A state-changing request: a live session, its CSRF token, our origin.
    fn writer(&self, headers: &HeaderMap) -> Result<(), Response> {
        self.sessions
            .check_post(headers, &self.expected_origin(headers), Instant::now())
            .map_err(refused)
    }

    /// Asks a NATS subject; its reply as JSON, or the response that says why not.
    async fn ask(&self, subject: &str, body: &Value) -> Result<Value, Response> {
        let request = async_nats::Request::new()
            .payload(Bytes::from(body.to_string()))
            .timeout(Some(super::REQUEST_TIMEOUT));
        let unavailable =
            |why: String| error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, why);
        let msg = self
            .nats
            .send_request(subject.to_string(), request)
            .await
            .map_err(|e| unavailable(format!("no answer on {subject}: {e}")))?;
        let value: Value = serde_json::from_slice(&msg.payload)
            .map_err(|e| unavailable(format!("unreadable reply on {subject}: {e}")))?;
        if value.get("error").is_some()
            && let Ok(e) = serde_json::from_value::<ErrorReply>(value.clone())
        {
            return Err((status_of(e.error.code), Json(e)).into_response());
        }
        Ok(value)
    }

    async fn relay(&self, subject: &str, body: &Value) -> Response {
        match self.ask(subject, body).await {
            Ok(v) => Json(v).into_response(),
            Err(r) => r,
        }
    }
}

/// A JSON body, read as the NATS subjects read theirs: not JSON is `bad_json`, the
/// wrong shape `invalid_request`.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, ErrorCode::BadJson, e.to_string()))?;
    serde_json::from_value(value).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            e.to_string(),
        )
    })
}

type Params = Result<Query<HashMap<String, String>>, QueryRejection>;

/// A reading request: a live session; its query parameters.
fn read(
    c: &Console,
    headers: &HeaderMap,
    query: Params,
) -> Result<HashMap<String, String>, Response> {
    c.reader(headers)?;
    query.map(|Query(q)| q).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            e.body_text(),
        )
    })
}

fn note_ok(field: &str, text: &Option<String>) -> Result<(), Response> {
    match text {
        Some(t) if t.chars().count() > NOTE_CHARS_MAX => Err(error(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            format!("{field} is longer than {NOTE_CHARS_MAX} characters"),
        )),
        _ => Ok(()),
    }
}

/// A note as sent: trimmed, and absent when empty.
fn clean(text: Option<String>) -> Option<String> {
    text.map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

/// Every action has one shape: checked as a POST from the console's page, its body
/// parsed, then sent as one request on a public subject.
async fn act<B: serde::de::DeserializeOwned>(
    c: &Console,
    headers: &HeaderMap,
    body: &[u8],
    request: impl FnOnce(B) -> Result<(&'static str, Value), Response>,
) -> Response {
    if let Err(r) = c.writer(headers) {
        return r;
    }
    match parse(body).and_then(request) {
        Ok((subject, req)) => c.relay(subject, &req).await,
        Err(r) => r,
    }
}

pub async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such console endpoint",
    )
}

// ---------------------------------------------------------------------------------------
// Session
// ---------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    password: String,
}

pub async fn login(State(c): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    // A login from another site would let it plant its own session (login CSRF).
    if let Err(r) = auth::check_origin(&headers, &c.expected_origin(&headers)) {
        return refused(r);
    }
    let body: LoginBody = match parse(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Some(wait) = c.sessions.login_blocked(Instant::now()) {
        let secs = wait.as_secs().max(1);
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            format!("too many failed logins: try again in {secs} s"),
        );
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    let hash = c.config.password_hash.clone();
    let ok = tokio::task::spawn_blocking(move || auth::verify_password(&hash, &body.password))
        .await
        .unwrap_or(false);
    if !ok {
        c.sessions.login_failed(Instant::now());
        tracing::warn!("console: a login failed");
        return error(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthenticated,
            "wrong password",
        );
    }
    let opened = c.sessions.open(Instant::now());
    let cookie = format!(
        "{}={}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{}",
        auth::COOKIE,
        opened.token,
        c.sessions.ttl().as_secs(),
        if c.secure_cookies() { "; Secure" } else { "" }
    );
    tracing::info!(operator = %c.config.operator, "console: logged in");
    let mut r = Json(session_view(&c, &opened.csrf)).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

fn session_view(c: &Console, csrf: &str) -> Value {
    json!({"operator": c.config.operator, "by": c.by(), "node_id": c.node_id, "csrf": csrf})
}

pub async fn session(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    match c.sessions.session(&headers, Instant::now()) {
        Ok(csrf) => Json(session_view(&c, &csrf)).into_response(),
        Err(r) => refused(r),
    }
}

pub async fn logout(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if let Err(r) = c.writer(&headers) {
        return r;
    }
    c.sessions.close(&headers);
    let mut r = Json(json!({"logged_out": true})).into_response();
    let gone = format!(
        "{}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0",
        auth::COOKIE
    );
    if let Ok(v) = HeaderValue::from_str(&gone) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

// ---------------------------------------------------------------------------------------
// Approvals
// ---------------------------------------------------------------------------------------

pub async fn approvals(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    query: Params,
) -> Result<Response, Response> {
    let q = read(&c, &headers, query)?;
    let state = q.get("state").map_or("pending", String::as_str);
    Ok(c.relay(subject::APPROVALS_LIST, &json!({"state": state}))
        .await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecideBody {
    approval_id: String,
    decision: ApprovalDecision,
    #[serde(default)]
    note: Option<String>,
}

/// `cadre.approvals.decide`, as `cadre approvals approve|deny` sends it. The approval
/// is bound to the exact action it was requested for: if that changed, the node answers
/// `void` and the step asks again.
pub async fn decide(State(c): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    act(&c, &headers, &body, |b: DecideBody| {
        note_ok("note", &b.note)?;
        let req = json!({
            "approval_id": b.approval_id, "decision": b.decision,
            "by": c.by(), "note": clean(b.note),
        });
        Ok((subject::APPROVALS_DECIDE, req))
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Tasks
// ---------------------------------------------------------------------------------------

pub async fn tasks(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    query: Params,
) -> Result<Response, Response> {
    let q = read(&c, &headers, query)?;
    let mut req = serde_json::Map::new();
    for key in ["status", "playbook", "before"] {
        if let Some(v) = q.get(key).filter(|v| !v.is_empty()) {
            req.insert(key.into(), Value::String(v.clone()));
        }
    }
    if let Some(limit) = q.get("limit").filter(|v| !v.is_empty()) {
        match limit.parse::<u64>() {
            Ok(n) => {
                req.insert("limit".into(), json!(n));
            }
            Err(_) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::InvalidRequest,
                    format!("limit `{limit}` must be a whole number"),
                ));
            }
        }
    }
    Ok(c.relay(subject::TASKS_LIST, &Value::Object(req)).await)
}

fn task_id_of(q: &HashMap<String, String>) -> Result<String, Response> {
    q.get("id")
        .filter(|id| !id.is_empty())
        .cloned()
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidRequest,
                "missing query parameter `id` (the task id)",
            )
        })
}

/// `cadre.tasks.get`, with what may hold a secret masked: the input, each step's
/// params, output and error, the result and the failure. (The NATS reply is the
/// owner's full record; a browser is one more place a screen can be read from.)
pub async fn task(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    query: Params,
) -> Result<Response, Response> {
    let id = task_id_of(&read(&c, &headers, query)?)?;
    let mut task = c.ask(subject::TASKS_GET, &json!({"task_id": id})).await?;
    redact_task(&mut task);
    Ok(Json(task).into_response())
}

fn redact_task(task: &mut Value) {
    use actors::redact;
    for key in ["input", "result"] {
        if let Some(v) = task.get_mut(key) {
            *v = redact::value(v);
        }
    }
    if let Some(Value::String(f)) = task.get_mut("failure") {
        *f = redact::text(f);
    }
    if let Some(Value::Array(steps)) = task.get_mut("steps") {
        for step in steps {
            for key in ["params", "output"] {
                if let Some(v) = step.get_mut(key) {
                    *v = redact::value(v);
                }
            }
            if let Some(Value::String(e)) = step.get_mut("error") {
                *e = redact::text(e);
            }
        }
    }
}

/// `cadre.tasks.trace`: the audit records, already redacted by the node.
pub async fn trace(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    query: Params,
) -> Result<Response, Response> {
    let id = task_id_of(&read(&c, &headers, query)?)?;
    Ok(c.relay(subject::TASKS_TRACE, &json!({"task_id": id})).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    task_id: String,
    step_id: String,
    decision: DecisionKind,
    #[serde(default)]
    note: Option<String>,
}

/// `cadre.tasks.resolve`: an operator's decision on an outcome-unknown step.
pub async fn resolve(State(c): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    act(&c, &headers, &body, |b: ResolveBody| {
        note_ok("note", &b.note)?;
        let req = json!({
            "task_id": b.task_id, "step_id": b.step_id, "decision": b.decision,
            "by": c.by(), "note": clean(b.note),
        });
        Ok((subject::TASKS_RESOLVE, req))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    task_id: String,
    #[serde(default)]
    reason: Option<String>,
}

pub async fn cancel(State(c): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    act(&c, &headers, &body, |b: CancelBody| {
        note_ok("reason", &b.reason)?;
        let reason = match clean(b.reason) {
            Some(r) => format!("{r} ({})", c.by()),
            None => format!("cancelled by {}", c.by()),
        };
        Ok((
            subject::TASKS_CANCEL,
            json!({"task_id": b.task_id, "reason": reason}),
        ))
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Control
// ---------------------------------------------------------------------------------------

pub async fn killswitch(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    c.reader(&headers)?;
    Ok(c.relay(subject::CONTROL_KILLSWITCH, &json!({})).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillSwitchBody {
    engaged: bool,
    #[serde(default)]
    reason: Option<String>,
}

/// `cadre.control.killswitch`: engage or release, for every node of the cluster.
pub async fn set_killswitch(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    act(&c, &headers, &body, |b: KillSwitchBody| {
        note_ok("reason", &b.reason)?;
        let req = json!({"engaged": b.engaged, "by": c.by(), "reason": clean(b.reason)});
        Ok((subject::CONTROL_KILLSWITCH, req))
    })
    .await
}

pub async fn nodes(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    c.reader(&headers)?;
    Ok(c.relay(subject::CLUSTER_STATUS, &json!({})).await)
}

/// Each live node's budget (budgets are per node), asked of the node itself; a node
/// that does not answer is listed with its error.
pub async fn budgets(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    c.reader(&headers)?;
    let status = c.ask(subject::CLUSTER_STATUS, &json!({})).await?;
    let status: ClusterStatusReply = serde_json::from_value(status).map_err(|e| {
        error(
            StatusCode::BAD_GATEWAY,
            ErrorCode::Internal,
            format!("unexpected cluster status: {e}"),
        )
    })?;
    let asks = status.nodes.iter().filter(|n| n.alive).map(|n| {
        let c = c.clone();
        let node = n.node_id.clone();
        async move {
            let subject = subject::on_node(&node, subject::BUDGET_STATUS);
            match c.ask(&subject, &json!({})).await {
                Ok(v) => v,
                Err(_) => json!({"node_id": node, "error": "no answer"}),
            }
        }
    });
    let budgets = futures::future::join_all(asks).await;
    Ok(Json(json!({"budgets": budgets})).into_response())
}
