//! Cadre's durable state: one RocksDB per node.
//!
//! This crate knows column families, keys and bytes; it does not know what a task is.
//! The record encoding lives in [`codec`] alone, so changing it is one file.
//! Synced commits go through a dedicated group-commit writer ([`Store::commit`]): every
//! pending batch is drained into one `WriteBatch` and synced once, so throughput grows
//! with the number of tasks in flight while each commit stays durable. The same writer
//! appends the hash-chained audit log ([`chain`]), so its order is the commit order.

// Tests unwrap: a failed unwrap is a failed test, with its location.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod chain;
pub mod codec;
mod store;

pub use codec::CodecError;
pub use store::{
    Batch, Cf, LinkOrBreak, SCHEMA_VERSION, ScanPage, Store, StoreError, StoreOptions, StoreStats,
    open_raw,
};
