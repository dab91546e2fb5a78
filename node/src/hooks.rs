//! Webhooks: `POST /hooks/<name>` starts the playbook whose `[webhook]` has that name.
//!
//! The body must be signed (HMAC-SHA256 of the raw bytes with the hook's shared secret,
//! `sha256=<hex>`, as GitHub signs), carry a delivery id (the task's idempotency key, so
//! a redelivery returns the same task) and fit `webhook_body_bytes_max`. Anything else
//! gets a 4xx with the same `{"error": {...}}` shape as every NATS subject, and nothing
//! starts. An accepted delivery goes through `cadre.tasks.submit`, like any client:
//! the intake's checks and governance apply unchanged.

use std::sync::Arc;

use actors::playbook::{Catalog, SecretSource, WebhookRule};
use actors::protocol::{ErrorCode, ErrorReply, SubmitReply, SubmitRequest, subject};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

/// What the hook handler needs: the catalog (which playbook a hook starts), NATS (to
/// submit), the node's metrics and the body cap.
pub struct Hooks {
    pub catalog: Arc<Catalog>,
    pub nats: async_nats::Client,
    pub metrics: Arc<actors::metrics::Metrics>,
    pub body_bytes_max: usize,
}

/// Longest delivery id taken as an idempotency key.
const DELIVERY_CHARS_MAX: usize = 200;

pub async fn deliver(
    State(hooks): State<Arc<Hooks>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let outcome = handle(&hooks, &name, &headers, &body).await;
    let label = match &outcome {
        Ok((_, reply)) if reply.duplicate => "duplicate",
        Ok(_) => "accepted",
        Err((status, _)) if *status == StatusCode::UNAUTHORIZED => "bad_signature",
        Err(_) => "refused",
    };
    // A name no playbook uses is not a label: unbounded series are a metrics leak.
    let hook = if hooks.catalog.by_webhook(&name).is_some() {
        name.as_str()
    } else {
        "unknown"
    };
    hooks
        .metrics
        .webhooks_total
        .with_label_values(&[hook, label])
        .inc();
    match outcome {
        Ok((status, reply)) => (status, Json(reply)).into_response(),
        Err((status, e)) => (status, Json(e)).into_response(),
    }
}

type Refusal = (StatusCode, ErrorReply);

fn refuse(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Refusal {
    (status, ErrorReply::new(code, message))
}

async fn handle(
    hooks: &Hooks,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(StatusCode, SubmitReply), Refusal> {
    let Some((playbook, rule)) = hooks
        .catalog
        .by_webhook(name)
        .and_then(|p| p.webhook.as_ref().map(|w| (p, w)))
    else {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("no webhook named `{name}`"),
        ));
    };
    if body.len() > hooks.body_bytes_max {
        return Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            format!(
                "body is {} bytes; the maximum is {} (webhook_body_bytes_max)",
                body.len(),
                hooks.body_bytes_max
            ),
        ));
    }
    // The signature first: nothing about an unsigned body is worth reading.
    check_signature(rule, headers, body)?;
    let delivery = header(headers, &rule.delivery_header)
        .filter(|d| !d.is_empty() && d.chars().count() <= DELIVERY_CHARS_MAX)
        .ok_or_else(|| {
            refuse(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidRequest,
                format!(
                    "header {} must carry the delivery id (1 to {DELIVERY_CHARS_MAX} characters)",
                    rule.delivery_header
                ),
            )
        })?;
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadJson,
            format!("body is not valid JSON: {e}"),
        )
    })?;
    let input = map_input(rule, &value)?;
    let req = SubmitRequest {
        playbook: Some(playbook.name.clone()),
        goal: None,
        input,
        idempotency_key: Some(format!("hook-{name}-{delivery}")),
        run_at: None,
        run_after: None,
        reason: Some(format!("webhook `{name}` delivery {delivery}")),
        priority: None,
    };
    submit(hooks, &req).await
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// `sha256=<hex>` over the raw body with the hook's secret, compared in constant time.
fn check_signature(rule: &WebhookRule, headers: &HeaderMap, body: &[u8]) -> Result<(), Refusal> {
    let unsigned = |why: &str| {
        refuse(
            StatusCode::UNAUTHORIZED,
            ErrorCode::InvalidRequest,
            format!("bad signature: {why} (header {})", rule.signature_header),
        )
    };
    let secret = read_secret(&rule.secret).map_err(|e| {
        tracing::error!(hook = %rule.name, error = %e, "webhook secret unreadable");
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "the webhook's secret cannot be read on this node",
        )
    })?;
    let given = header(headers, &rule.signature_header).ok_or_else(|| unsigned("missing"))?;
    let hex_sig = given
        .strip_prefix("sha256=")
        .ok_or_else(|| unsigned("not `sha256=<hex>`"))?;
    let sig = hex::decode(hex_sig).map_err(|_| unsigned("not hex"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .map_err(|_| unsigned("the secret is unusable"))?;
    mac.update(body);
    mac.verify_slice(&sig)
        .map_err(|_| unsigned("does not match"))
}

/// Read on every delivery, so a rotated file or variable takes effect at once.
fn read_secret(source: &SecretSource) -> Result<String, String> {
    let secret = match source {
        SecretSource::File(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .trim()
            .to_string(),
        SecretSource::Env(var) => std::env::var(var).map_err(|_| format!("${var} is not set"))?,
    };
    if secret.is_empty() {
        return Err("the secret is empty".into());
    }
    Ok(secret)
}

/// The task's input: the body, or the fields the hook's `input` table points at.
fn map_input(rule: &WebhookRule, body: &Value) -> Result<Value, Refusal> {
    let Some(fields) = &rule.input else {
        if !body.is_object() {
            return Err(refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::InvalidInput,
                "body must be a JSON object (or the hook must map it with `input`)",
            ));
        }
        return Ok(body.clone());
    };
    let mut input = Map::new();
    for (field, pointer) in fields {
        let v = body.pointer(pointer).ok_or_else(|| {
            refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::InvalidInput,
                format!("input `{field}`: the body has nothing at `{pointer}`"),
            )
        })?;
        input.insert(field.clone(), v.clone());
    }
    Ok(Value::Object(input))
}

async fn submit(hooks: &Hooks, req: &SubmitRequest) -> Result<(StatusCode, SubmitReply), Refusal> {
    let unavailable = |e: String| {
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            format!("the task could not be submitted: {e}; retry"),
        )
    };
    let payload = serde_json::to_vec(req).map_err(|e| unavailable(e.to_string()))?;
    let msg = hooks
        .nats
        .request(subject::TASKS_SUBMIT, payload.into())
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    if let Ok(reply) = serde_json::from_slice::<SubmitReply>(&msg.payload) {
        let status = if reply.duplicate {
            StatusCode::OK
        } else {
            StatusCode::ACCEPTED
        };
        return Ok((status, reply));
    }
    let e: ErrorReply = serde_json::from_slice(&msg.payload)
        .map_err(|e| unavailable(format!("unreadable reply: {e}")))?;
    let status = match e.error.code {
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::InvalidInput | ErrorCode::UnknownPlaybook => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::BAD_REQUEST,
    };
    Err((status, e))
}
