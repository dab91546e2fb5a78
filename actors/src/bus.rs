//! NATS plumbing shared by the roles: typed requests with timeouts, replies, and the
//! pump that feeds a subscription into an actor's mailbox with a bound on depth.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Message, Subject, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use ractor::ActorRef;
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::protocol::subject::FROM_HEADER;
use crate::protocol::{ErrorCode, ErrorReply};

/// A JetStream context, in `domain` if one is named: a node on a laptop's leaf server
/// reaches the hub's JetStream as `$JS.<domain>.API` (ops/nats/leaf.conf).
pub fn jetstream(client: Client, domain: &str) -> async_nats::jetstream::Context {
    if domain.is_empty() {
        async_nats::jetstream::new(client)
    } else {
        async_nats::jetstream::with_domain(client, domain)
    }
}

/// Why a request to another role got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HopError {
    #[error("no reply within {0} ms")]
    Timeout(u64),
    #[error("no responder on `{0}`")]
    NoResponders(String),
    #[error("transport: {0}")]
    Transport(String),
    #[error("undecodable reply: {0}")]
    Decode(String),
}

/// A reply and the actor that sent it (its `Cadre-From` header).
pub struct Replied<T> {
    pub value: T,
    pub from: Option<String>,
}

/// Sends a postcard-encoded request and decodes the postcard reply.
pub async fn request_wire<Req: Serialize, Rep: DeserializeOwned>(
    client: &Client,
    subject: String,
    req: &Req,
    timeout: Duration,
) -> Result<Replied<Rep>, HopError> {
    let payload = storage::codec::to_wire(req).map_err(|e| HopError::Decode(e.to_string()))?;
    let request = async_nats::Request::new()
        .payload(Bytes::from(payload))
        .timeout(Some(timeout));
    match client.send_request(subject.clone(), request).await {
        Ok(msg) => {
            let from = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(FROM_HEADER))
                .map(|v| v.as_str().to_string());
            storage::codec::from_wire(&msg.payload)
                .map(|value| Replied { value, from })
                .map_err(|e| HopError::Decode(e.to_string()))
        }
        Err(e) => Err(match e.kind() {
            async_nats::client::RequestErrorKind::TimedOut => {
                HopError::Timeout(timeout.as_millis() as u64)
            }
            async_nats::client::RequestErrorKind::NoResponders => HopError::NoResponders(subject),
            _ => HopError::Transport(e.to_string()),
        }),
    }
}

/// Replies with postcard, naming the replying actor (`from`, e.g. `executor@vps`) in
/// the `Cadre-From` header. A request without a reply subject is dropped: nobody waits.
pub async fn reply_wire<T: Serialize>(
    client: &Client,
    reply: Option<Subject>,
    value: &T,
    from: &str,
) {
    let Some(reply) = reply else { return };
    match storage::codec::to_wire(value) {
        Ok(bytes) => {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(FROM_HEADER, from);
            if let Err(e) = client
                .publish_with_headers(reply, headers, Bytes::from(bytes))
                .await
            {
                tracing::warn!(error = %e, "reply not sent");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot encode a reply"),
    }
}

pub async fn reply_json<T: Serialize>(client: &Client, reply: Option<Subject>, value: &T) {
    let Some(reply) = reply else { return };
    match serde_json::to_vec(value) {
        Ok(bytes) => publish(client, reply, Bytes::from(bytes)).await,
        Err(e) => tracing::error!(error = %e, "cannot encode a reply"),
    }
}

pub async fn reply_error(
    client: &Client,
    reply: Option<Subject>,
    code: ErrorCode,
    message: impl Into<String>,
) {
    reply_json(client, reply, &ErrorReply::new(code, message)).await;
}

async fn publish(client: &Client, subject: Subject, payload: Bytes) {
    if let Err(e) = client.publish(subject, payload).await {
        tracing::warn!(error = %e, "reply not sent");
    }
}

/// A message taken from a subscription, holding one of its pump's permits until handled.
pub struct Inbound {
    pub msg: Message,
    /// Move into a spawned handler to keep the bound while it runs.
    pub permit: OwnedSemaphorePermit,
}

/// A role's pumps for each of `subjects`, in the roles' queue group: the public subject
/// any node's requests come to, and this node's own copy.
pub async fn spawn_role_pumps<M: ractor::Message>(
    client: &Client,
    subjects: [String; 2],
    actor: &ActorRef<M>,
    depth: usize,
    wrap: fn(Inbound) -> M,
) -> Result<Vec<JoinHandle<()>>, async_nats::SubscribeError> {
    let mut pumps = Vec::new();
    for s in subjects {
        let sub = client
            .queue_subscribe(s, crate::protocol::subject::QUEUE_ROLES.into())
            .await?;
        pumps.push(spawn_pump(sub, actor.clone(), depth, wrap));
    }
    Ok(pumps)
}

/// Feeds `sub` into `actor` as `wrap(inbound)`. At most `depth` messages are in the
/// mailbox or being handled; past that the pump stops reading and NATS holds the rest
/// (requesters then time out and retry), so a burst cannot grow memory without bound.
pub fn spawn_pump<M: ractor::Message>(
    mut sub: Subscriber,
    actor: ActorRef<M>,
    depth: usize,
    wrap: fn(Inbound) -> M,
) -> JoinHandle<()> {
    let permits = Arc::new(Semaphore::new(depth.max(1)));
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            if actor.cast(wrap(Inbound { msg, permit })).is_err() {
                return;
            }
        }
    })
}
