//! The operator console: a small web page, served by the node on `console_addr`
//! (loopback by default), for approving, watching and stopping from a browser or a
//! phone.
//!
//! - The page (`assets/`) is plain HTML, CSS and JavaScript compiled into the binary:
//!   nothing is fetched from elsewhere, and there is no JavaScript build step.
//! - Its JSON API (`/console/api/*`) is a thin translation to the public NATS subjects
//!   the CLI uses (`cadre.approvals.decide`, `cadre.control.killswitch`, …), sent from
//!   the node's own NATS connection: the same handlers, checks and audit records apply,
//!   and no action has a second path around governance. Decisions are recorded as
//!   `<console_operator>@console`.
//! - Live updates are server-sent events (`/console/api/events`) fed from
//!   `cadre.events.>`, the approval events and the node's kill switch.
//! - Access: see [`auth`].

mod api;
pub mod auth;
mod events;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actors::context::NodeContext;
use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};

/// The console's settings (`Config::console`).
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    pub addr: SocketAddr,
    pub password_hash: String,
    pub operator: String,
    pub session_ttl: Duration,
    /// The origin the browser sees, behind a proxy; `None`: `http://<Host>`.
    pub origin: Option<String>,
}

/// How long the console waits for a NATS reply (a cluster-wide list gathers from
/// every node first).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body the console takes (a note, a reason).
const BODY_BYTES_MAX: usize = 64 << 10;

pub struct Console {
    config: ConsoleConfig,
    nats: async_nats::Client,
    node_id: String,
    sessions: auth::Sessions,
    feed: tokio::sync::broadcast::Sender<events::Feed>,
}

impl Console {
    /// Who the console's actions are recorded as.
    fn by(&self) -> String {
        format!("{}@console", self.config.operator)
    }

    /// The origin a POST must come from.
    fn expected_origin(&self, headers: &axum::http::HeaderMap) -> String {
        match &self.config.origin {
            Some(o) => o.clone(),
            None => {
                let host = headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or_default();
                format!("http://{host}")
            }
        }
    }

    fn secure_cookies(&self) -> bool {
        self.config
            .origin
            .as_deref()
            .is_some_and(|o| o.starts_with("https://"))
    }
}

/// Serves the console on `listener` until the task is aborted; the event feed runs
/// beside it.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: ConsoleConfig,
    ctx: Arc<NodeContext>,
) {
    let (feed, _) = tokio::sync::broadcast::channel(events::FEED_CAPACITY);
    let console = Arc::new(Console {
        sessions: auth::Sessions::new(config.session_ttl),
        config,
        nats: ctx.nats.clone(),
        node_id: ctx.settings.node_id.clone(),
        feed: feed.clone(),
    });
    let pump = tokio::spawn(events::pump(ctx.clone(), feed));
    let app = router(console);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "console stopped");
    }
    pump.abort();
}

fn router(console: Arc<Console>) -> Router {
    let api = Router::new()
        .route("/session", get(api::session))
        .route("/login", post(api::login))
        .route("/logout", post(api::logout))
        .route("/approvals", get(api::approvals))
        .route("/approvals/decide", post(api::decide))
        .route("/tasks", get(api::tasks))
        .route("/task", get(api::task))
        .route("/trace", get(api::trace))
        .route("/tasks/resolve", post(api::resolve))
        .route("/tasks/cancel", post(api::cancel))
        .route(
            "/killswitch",
            get(api::killswitch).post(api::set_killswitch),
        )
        .route("/nodes", get(api::nodes))
        .route("/budgets", get(api::budgets))
        .route("/events", get(events::stream))
        .fallback(api::not_found)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(axum::middleware::map_response(no_store));
    Router::new()
        .route(
            "/",
            get(|| async { axum::response::Redirect::to("/console/") }),
        )
        .route(
            "/console",
            get(|| async { axum::response::Redirect::to("/console/") }),
        )
        .route("/console/", get(index))
        .route("/console/app.js", get(script))
        .route("/console/app.css", get(style))
        .nest("/console/api", api)
        .layer(axum::middleware::map_response(hardened))
        .with_state(console)
}

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX_HTML,
    )
}

async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        APP_JS,
    )
}

async fn style() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        APP_CSS,
    )
}

/// Every response: only our own scripts and styles run, no framing (clickjacking a
/// kill switch), no sniffing, no referrer leaving the page.
async fn hardened(mut response: axum::response::Response) -> axum::response::Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// API answers are live state: never cached.
async fn no_store(mut response: axum::response::Response) -> axum::response::Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
