//! The node's HTTP server: `/metrics` (Prometheus text), `/healthz` (the process
//! answers), `/readyz` (NATS connected, store open, every role's actor up), and
//! `POST /hooks/<name>` (signed webhooks, `crate::hooks`).

use std::sync::Arc;

use actors::context::NodeContext;
use actors::roles;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use prometheus::{Encoder, TextEncoder};
use storage::Cf;

pub async fn serve(
    listener: tokio::net::TcpListener,
    ctx: Arc<NodeContext>,
    hooks: Arc<crate::hooks::Hooks>,
) {
    // Room above the cap, so a body slightly over it gets the hook's own JSON 413.
    let limit = hooks.body_bytes_max.saturating_mul(2).saturating_add(4096);
    let hook_routes = Router::new()
        .route("/hooks/{name}", post(crate::hooks::deliver))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(hooks);
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(ctx)
        .merge(hook_routes);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "http server stopped");
    }
}

async fn metrics(State(ctx): State<Arc<NodeContext>>) -> impl IntoResponse {
    ctx.metrics.sync_store(&ctx.store);
    let mut body = Vec::new();
    let families = ctx.metrics.registry.gather();
    match TextEncoder::new().encode(&families, &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Ready means the node can take and carry out work: NATS is connected, the store
/// answers a read, and every role's actor is registered (none is down or restarting).
/// The body lists each check, so a failing probe says which.
async fn ready(State(ctx): State<Arc<NodeContext>>) -> impl IntoResponse {
    let mut problems = Vec::new();
    match ctx.nats.connection_state() {
        async_nats::connection::State::Connected => {}
        other => problems.push(format!("nats: {other:?}")),
    }
    if let Err(e) = ctx.store.get::<u32>(Cf::Meta, b"schema_version") {
        problems.push(format!("store: {e}"));
    }
    for role in roles::NODE_ROLES {
        if ractor::registry::where_is(ctx.from(role)).is_none() {
            problems.push(format!("actor {} is not running", ctx.from(role)));
        }
    }
    if problems.is_empty() {
        (
            StatusCode::OK,
            "ready: nats connected, store open, actors up\n".to_string(),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", problems.join("\n")),
        )
    }
}
