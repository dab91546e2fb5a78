//! The outbox relay: publishes committed messages, then deletes them from the outbox.
//!
//! Commit, then act: a transition's events are written in the same batch as its state;
//! the relay is the only thing that sends them. Entries arrive from committers in
//! memory; after a crash or a relay restart, `pre_start` sends what the outbox still
//! holds. Delivery is at least once: consumers dedupe on `(task_id, seq)`.

use std::sync::Arc;

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use storage::{Batch, Cf};

use crate::context::{NodeContext, OutboxEntry};

#[derive(Clone, Copy)]
pub struct Relay;

pub struct RelayArgs {
    pub ctx: Arc<NodeContext>,
}

pub struct RelayState {
    ctx: Arc<NodeContext>,
    /// Published but not yet flushed to the server.
    unflushed: Vec<u64>,
    flush_queued: bool,
}

pub enum RelayMsg {
    Publish(Vec<(u64, OutboxEntry)>),
    /// Entries of a commit answered before its fsync: published once it is synced, so
    /// nothing goes out that a power loss could take back.
    PublishWhenSynced(u64, Vec<(u64, OutboxEntry)>),
    /// Flush the connection, then delete what was published.
    Flush,
}

/// Entries read back per pass when draining a backlog.
const BACKLOG_PAGE: usize = 4096;

impl Actor for Relay {
    type Msg = RelayMsg;
    type State = RelayState;
    type Arguments = RelayArgs;

    async fn pre_start(
        &self,
        _: ActorRef<RelayMsg>,
        args: RelayArgs,
    ) -> Result<RelayState, ActorProcessingErr> {
        let mut state = RelayState {
            ctx: args.ctx,
            unflushed: Vec::new(),
            flush_queued: false,
        };
        drain_backlog(&mut state).await?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<RelayMsg>,
        msg: RelayMsg,
        state: &mut RelayState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RelayMsg::Publish(entries) => {
                state.ctx.settings.faults.maybe_panic(super::RELAY);
                publish(state, &myself, entries).await
            }
            RelayMsg::PublishWhenSynced(ticket, entries) => {
                state.ctx.settings.faults.maybe_panic(super::RELAY);
                state.ctx.store.wait_synced(ticket).await?;
                publish(state, &myself, entries).await
            }
            RelayMsg::Flush => flush(state).await,
        }
    }

    /// Messages still in the mailbox are dropped by a stop, but their entries are in the
    /// outbox: send everything it holds, so a clean shutdown leaves nothing behind.
    async fn post_stop(
        &self,
        _: ActorRef<RelayMsg>,
        state: &mut RelayState,
    ) -> Result<(), ActorProcessingErr> {
        drain_backlog(state).await
    }
}

async fn publish(
    state: &mut RelayState,
    myself: &ActorRef<RelayMsg>,
    entries: Vec<(u64, OutboxEntry)>,
) -> Result<(), ActorProcessingErr> {
    for (seq, entry) in entries {
        // A publish error means the connection is gone for good (async-nats buffers
        // across reconnects): fail, restart, and resend from the outbox.
        state
            .ctx
            .nats
            .publish(entry.subject, Bytes::from(entry.payload))
            .await?;
        state.unflushed.push(seq);
    }
    if !state.flush_queued && !state.unflushed.is_empty() {
        state.flush_queued = true;
        myself.cast(RelayMsg::Flush)?;
    }
    Ok(())
}

/// Sends what the outbox holds, a page at a time (flushing and deleting each page).
async fn drain_backlog(state: &mut RelayState) -> Result<(), ActorProcessingErr> {
    // What was already published goes first, so it is not sent twice.
    flush(state).await?;
    let mut sent = 0;
    loop {
        let page = state
            .ctx
            .store
            .scan::<OutboxEntry>(
                Cf::Outbox,
                None,
                false,
                BACKLOG_PAGE,
                BACKLOG_PAGE,
                |_, _| true,
            )?
            .rows;
        if page.is_empty() {
            break;
        }
        sent += page.len();
        for (key, entry) in page {
            state
                .ctx
                .nats
                .publish(entry.subject, Bytes::from(entry.payload))
                .await?;
            state.unflushed.push(crate::context::outbox_seq_of(&key));
        }
        flush(state).await?;
    }
    if sent > 0 {
        tracing::info!(entries = sent, "relayed outbox backlog");
    }
    Ok(())
}

async fn flush(state: &mut RelayState) -> Result<(), ActorProcessingErr> {
    state.flush_queued = false;
    if state.unflushed.is_empty() {
        return Ok(());
    }
    state.ctx.nats.flush().await?;
    let mut batch = Batch::new();
    // A run of consecutive sequences, all published, goes with one range tombstone
    // rather than a tombstone per key: under load most of a flush is such runs. A
    // range never covers a sequence this relay did not publish.
    // (A sequence sent twice, from the backlog and from memory, is deleted once.)
    state.unflushed.sort_unstable();
    state.unflushed.dedup();
    for (first, last) in runs(&state.unflushed) {
        match last.checked_add(1).filter(|_| first != last) {
            Some(end) => {
                batch.delete_range(Cf::Outbox, first.to_be_bytes(), end.to_be_bytes());
            }
            None => {
                for seq in first..=last {
                    batch.delete(Cf::Outbox, seq.to_be_bytes());
                }
            }
        }
    }
    state.unflushed.clear();
    // Unsynced: losing a delete only means a duplicate publish after power loss.
    state.ctx.store.write_unsynced(batch)?;
    Ok(())
}

/// The maximal runs of consecutive values in sorted `seqs`, as `(first, last)`.
fn runs(seqs: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    seqs.chunk_by(|a, b| b.checked_sub(*a) == Some(1))
        .map(|run| (run[0], run[run.len() - 1]))
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn runs_are_maximal_and_never_bridge_a_gap() {
        let seqs = [1, 2, 3, 5, 7, 8, u64::MAX - 1, u64::MAX];
        assert_eq!(
            runs(&seqs).collect::<Vec<_>>(),
            [(1, 3), (5, 5), (7, 8), (u64::MAX - 1, u64::MAX)]
        );
        assert_eq!(runs(&[]).count(), 0);
    }
}
