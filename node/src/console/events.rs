//! Live updates: one feed per console (a broadcast channel), filled from NATS
//! (`cadre.events.>`, the approval events) and the node's kill switch, and streamed to
//! each open page as server-sent events. A page that falls behind gets `resync` and
//! reloads what it shows; the browser's `EventSource` reconnects by itself.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actors::context::NodeContext;
use actors::protocol::subject;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::sync::broadcast;

use super::Console;

pub const FEED_CAPACITY: usize = 1024;
/// How often an open stream re-checks its session (a logout or expiry ends it).
const SESSION_RECHECK: Duration = Duration::from_secs(15);

/// One server-sent event: its `event:` name and its JSON `data:` (shared, not copied,
/// by every page the broadcast hands it to).
#[derive(Debug, Clone)]
pub struct Feed {
    pub kind: &'static str,
    pub data: Arc<str>,
}

/// Fills the feed until the console stops. Payloads are passed on as published: task
/// events and approval views carry no secrets (params are redacted by the node).
pub async fn pump(ctx: Arc<NodeContext>, feed: broadcast::Sender<Feed>) {
    let nats = &ctx.nats;
    let subscriptions = futures::future::try_join3(
        nats.subscribe(subject::EVENTS_ALL),
        nats.subscribe(subject::APPROVALS_REQUESTED_ALL),
        nats.subscribe(subject::APPROVALS_DECIDED_ALL),
    )
    .await;
    let (events, requested, decided) = match subscriptions {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "console: cannot follow events; pages will not update live");
            return;
        }
    };
    let mut messages = futures::stream::select_all([events, requested, decided]);
    let mut killswitch = ctx.killswitch_watch();
    loop {
        tokio::select! {
            msg = messages.next() => {
                let Some(msg) = msg else { return };
                // Every task event passes here: with no page open, drop it unread.
                if feed.receiver_count() == 0 {
                    continue;
                }
                let kind = if msg.subject.starts_with("cadre.events.task.") {
                    "task"
                } else if msg.subject.starts_with("cadre.approvals.") {
                    "approval"
                } else {
                    "intake"
                };
                let data = String::from_utf8_lossy(&msg.payload).into();
                // A page that closed in between is not an error.
                let _ = feed.send(Feed { kind, data });
            }
            changed = killswitch.changed() => {
                if changed.is_err() {
                    return;
                }
                let engaged = *killswitch.borrow_and_update();
                let _ = feed.send(Feed {
                    kind: "killswitch",
                    data: serde_json::json!({"engaged": engaged}).to_string().into(),
                });
            }
        }
    }
}

/// `GET /console/api/events`: the feed, for as long as the session lasts.
pub async fn stream(State(c): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if let Err(r) = c.reader(&headers) {
        return r;
    }
    let rx = c.feed.subscribe();
    let hello = Event::default()
        .event("hello")
        .data(serde_json::json!({"node_id": c.node_id}).to_string());
    let live = futures::stream::unfold((c, headers, rx), |(c, headers, mut rx)| async move {
        loop {
            let next = tokio::time::timeout(SESSION_RECHECK, rx.recv()).await;
            if c.sessions.session(&headers, Instant::now()).is_err() {
                return None;
            }
            let event = match next {
                Err(_quiet) => continue,
                Ok(Ok(feed)) => Event::default().event(feed.kind).data(feed.data),
                Ok(Err(broadcast::error::RecvError::Lagged(missed))) => {
                    Event::default().event("resync").data(missed.to_string())
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => return None,
            };
            return Some((Ok::<_, Infallible>(event), (c, headers, rx)));
        }
    });
    let stream = futures::stream::once(async { Ok(hello) }).chain(live);
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
