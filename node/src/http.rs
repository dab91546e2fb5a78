//! The node's HTTP server: `/metrics` (Prometheus text), `/healthz`, `/readyz`.

use std::sync::Arc;

use actors::context::NodeContext;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, TextEncoder};

pub async fn serve(listener: tokio::net::TcpListener, ctx: Arc<NodeContext>) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(ctx);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "http server stopped");
    }
}

async fn metrics(State(ctx): State<Arc<NodeContext>>) -> impl IntoResponse {
    let stats = ctx.store.stats();
    let load =
        |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed) as i64;
    ctx.metrics.store_commits.set(load(&stats.commits));
    ctx.metrics.store_fsyncs.set(load(&stats.syncs));
    ctx.metrics
        .store_size_bytes
        .set(ctx.store.size_bytes() as i64);
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

async fn ready(State(ctx): State<Arc<NodeContext>>) -> impl IntoResponse {
    match ctx.nats.connection_state() {
        async_nats::connection::State::Connected => (StatusCode::OK, "ready\n".to_string()),
        other => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("nats: {other:?}\n"),
        ),
    }
}
