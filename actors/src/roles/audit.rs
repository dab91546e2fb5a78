//! The audit log's publisher and reader: publishes every committed audit link on
//! `cadre.audit.<node_id>` for central collection (as JSON arrays of consecutive
//! entries), and answers
//! `cadre.audit.<node_id>.read` and `.verify`.
//!
//! Links are appended by the group-commit writer in the same batch as the transition
//! they describe; this actor only follows the chain's head. It takes them from the
//! store's in-memory feed, as the writer encoded them (`Store::take_audit_links`), and
//! writes each record's JSON straight from the link's bytes (`audit::LinkEntry`); after
//! a restart, or far behind, it reads them back. Its cursor (the last
//! sequence published) is kept in `meta`, unsynced, written at most once a second while
//! links flow and at a clean stop: after a crash it may publish up to the last second's
//! links again, never skip one. Consumers dedupe on `(node_id, seq)`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use storage::{Batch, Cf};
use tokio::task::JoinHandle;

use crate::audit;
use crate::bus::{self, Inbound};
use crate::context::NodeContext;
use crate::protocol::{
    AUDIT_READ_DEFAULT, AUDIT_READ_MAX, AuditBreak, AuditReadReply, AuditReadRequest,
    AuditVerifyReply, ErrorCode, ErrorReply, subject,
};
use crate::roles::intake::parse_json;

/// `meta` key of the publication cursor.
const CURSOR_KEY: &[u8] = b"audit_published_seq";
/// Links read per pass (and entries per message at most).
const PAGE: usize = 512;
/// A message is sent once its batch reaches this size (NATS's default maximum payload
/// is 1 MiB; an entry is at most a few KiB).
const BATCH_BYTES_MAX: usize = 256 * 1024;
/// How often the cursor is written while links flow. A crash republishes at most this
/// much more (consumers dedupe); a busy node spares a RocksDB write per pass.
const CURSOR_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy)]
pub struct AuditLog;

pub struct AuditArgs {
    pub ctx: Arc<NodeContext>,
}

pub struct AuditState {
    ctx: Arc<NodeContext>,
    /// The last sequence published.
    published: u64,
    /// The cursor as last written, and when.
    cursor: (u64, Instant),
    tasks: Vec<JoinHandle<()>>,
}

pub enum AuditMsg {
    /// The chain's head moved: publish what is new.
    HeadMoved,
    Read(Inbound),
    Verify(Inbound),
}

impl Actor for AuditLog {
    type Msg = AuditMsg;
    type State = AuditState;
    type Arguments = AuditArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<AuditMsg>,
        args: AuditArgs,
    ) -> Result<AuditState, ActorProcessingErr> {
        let ctx = args.ctx;
        let node = &ctx.settings.node_id;
        let depth = ctx.settings.mailbox_depth_max;
        let published = ctx.store.get::<u64>(Cf::Meta, CURSOR_KEY)?.unwrap_or(0);
        let mut watch = ctx.store.audit_watch();
        let me = myself.clone();
        let watcher = tokio::spawn(async move {
            while watch.changed().await.is_ok() {
                if me.cast(AuditMsg::HeadMoved).is_err() {
                    return;
                }
            }
        });
        let tasks = vec![
            watcher,
            bus::spawn_pump(
                ctx.nats.subscribe(subject::audit_read(node)).await?,
                myself.clone(),
                depth,
                AuditMsg::Read,
            ),
            bus::spawn_pump(
                ctx.nats.subscribe(subject::audit_verify(node)).await?,
                myself.clone(),
                depth,
                AuditMsg::Verify,
            ),
        ];
        // Whatever was committed while no publisher ran.
        myself.cast(AuditMsg::HeadMoved)?;
        Ok(AuditState {
            ctx,
            published,
            cursor: (published, Instant::now()),
            tasks,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<AuditMsg>,
        msg: AuditMsg,
        state: &mut AuditState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AuditMsg::HeadMoved => state.publish_new().await?,
            AuditMsg::Read(inbound) => {
                let ctx = &state.ctx;
                let result = parse_json::<AuditReadRequest>(
                    non_empty(&inbound.msg.payload),
                    ctx.settings.payload_bytes_max,
                )
                .and_then(|req| read(ctx, &req));
                let subject = subject::audit_read(&ctx.settings.node_id);
                ctx.respond(&subject, inbound.msg.reply, result).await;
            }
            AuditMsg::Verify(inbound) => {
                // Walking a long chain takes a while: off the actor and the runtime.
                let ctx = state.ctx.clone();
                tokio::spawn(async move {
                    let store = ctx.store.clone();
                    let node_id = ctx.settings.node_id.clone();
                    let result = tokio::task::spawn_blocking(move || verify(&store, node_id))
                        .await
                        .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))
                        .and_then(|r| r);
                    let subject = subject::audit_verify(&ctx.settings.node_id);
                    ctx.respond(&subject, inbound.msg.reply, result).await;
                });
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<AuditMsg>,
        state: &mut AuditState,
    ) -> Result<(), ActorProcessingErr> {
        for task in &state.tasks {
            task.abort();
        }
        // A clean stop leaves nothing unpublished, and the cursor where it is (also
        // when publishing fails: the connection may be closing).
        let published = state.publish_new().await;
        state.write_cursor()?;
        published
    }
}

impl AuditState {
    /// Publishes every link after the cursor. Links go out in batches: each message
    /// is a JSON array of consecutive entries (at most [`PAGE`] entries or
    /// [`BATCH_BYTES_MAX`] bytes), which keeps a busy node's audit stream to a few
    /// messages per commit group instead of one per record.
    async fn publish_new(&mut self) -> Result<(), ActorProcessingErr> {
        let ctx = self.ctx.clone();
        let subject = subject::audit(&ctx.settings.node_id);
        loop {
            let links = ctx.store.take_audit_links(self.published, PAGE)?;
            let Some(last) = links
                .last()
                .map(|l| l.as_ref().map_or_else(|b| b.0, |l| l.seq))
            else {
                return Ok(());
            };
            let mut batch = Vec::with_capacity((links.len() * 640).min(BATCH_BYTES_MAX));
            for link in &links {
                batch.push(if batch.is_empty() { b'[' } else { b',' });
                let entry = link
                    .as_ref()
                    .map_err(|(seq, e)| (*seq, format!("unreadable audit link: {e}")))
                    .and_then(|link| {
                        audit::LinkEntry::decode(link)
                            .map_err(|e| (link.seq, format!("undecodable audit record: {e}")))
                    });
                match entry {
                    Ok(entry) => entry.write_json(&mut batch),
                    // Published anyway, so a collector sees the gap and why;
                    // `cadre audit verify` names the record.
                    Err((seq, error)) => serde_json::to_writer(
                        &mut batch,
                        &serde_json::json!({ "seq": seq, "error": error }),
                    )?,
                }
                if batch.len() >= BATCH_BYTES_MAX {
                    batch.push(b']');
                    let full = std::mem::take(&mut batch);
                    ctx.nats.publish(subject.clone(), Bytes::from(full)).await?;
                }
            }
            if !batch.is_empty() {
                batch.push(b']');
                ctx.nats
                    .publish(subject.clone(), Bytes::from(batch))
                    .await?;
            }
            ctx.nats.flush().await?;
            self.published = last;
            if self.cursor.1.elapsed() >= CURSOR_EVERY {
                self.write_cursor()?;
            }
        }
    }

    /// Unsynced: losing the cursor only republishes links.
    fn write_cursor(&mut self) -> Result<(), ActorProcessingErr> {
        if self.cursor.0 != self.published {
            let mut cursor = Batch::new();
            cursor.put(Cf::Meta, CURSOR_KEY, &self.published)?;
            self.ctx.store.write_unsynced(cursor)?;
        }
        self.cursor = (self.published, Instant::now());
        Ok(())
    }
}

fn non_empty(payload: &[u8]) -> &[u8] {
    if payload.is_empty() { b"{}" } else { payload }
}

fn read(ctx: &NodeContext, req: &AuditReadRequest) -> Result<AuditReadReply, ErrorReply> {
    let limit = req
        .limit
        .unwrap_or(AUDIT_READ_DEFAULT)
        .clamp(1, AUDIT_READ_MAX);
    let head = ctx.store.audit_seq();
    let after = match (req.after_seq, req.last) {
        (Some(after), _) => after,
        (None, Some(last)) => head.saturating_sub(last.min(limit as u64)),
        (None, None) => 0,
    };
    let links = ctx
        .store
        .audit_links(after, limit)
        .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))?;
    let entries = links
        .iter()
        .map(audit::entry)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            ErrorReply::new(
                ErrorCode::Internal,
                format!("undecodable audit record: {e}; run `cadre audit verify`"),
            )
        })?;
    Ok(AuditReadReply {
        node_id: ctx.settings.node_id.clone(),
        entries,
        head_seq: head,
    })
}

/// Walks the chain of `store`; also used by `cadre audit verify --data-dir`.
pub fn verify(store: &storage::Store, node_id: String) -> Result<AuditVerifyReply, ErrorReply> {
    let report = store
        .verify_audit()
        .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))?;
    Ok(AuditVerifyReply {
        node_id,
        records: report.links,
        head_seq: report.head_seq,
        head_hash: report.head_hash,
        ok: report.broken.is_none(),
        broken: report.broken.map(|b| AuditBreak {
            seq: b.seq,
            reason: b.reason,
        }),
    })
}
