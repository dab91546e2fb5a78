//! RocksDB behind a small typed surface: column families, batches, group commit.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::Instant;

use rocksdb::{ColumnFamilyDescriptor, DB, IteratorMode, Options, WriteBatch, WriteOptions};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{mpsc, oneshot};

use crate::chain::{self, ChainReport, Head, Link};
use crate::codec::{self, CodecError};

/// The schema this binary writes. The store records it in `meta`; a store written by a
/// newer binary is refused rather than misread.
/// History: 1 — the spine; 2 — adds the `audit` and `audit_index` families (created
/// on open, so migrating from 1 is stamping the new version); 3 — `spend`; 4 — the
/// knowledge families `context`, `facts` and `knowledge_outbox`; 5 — `secrets`.
pub const SCHEMA_VERSION: u32 = 5;
const META_SCHEMA_KEY: &[u8] = b"schema_version";
/// How long the syncer gathers groups that were only written (no commit waits for their
/// fsync) before syncing them, by default: fewer fsyncs under load, and a synced commit
/// arriving meanwhile is not queued behind one.
const WRITTEN_SYNC_WINDOW: std::time::Duration = std::time::Duration::from_millis(2);
/// Upper bound on batches the writer folds into one synced write.
const GROUP_BATCHES_MAX: usize = 2048;
/// Links the audit feed holds for its reader at most. A reader that falls further
/// behind reads the rest back from RocksDB; the bound keeps a stalled reader from
/// holding more than a few MiB.
const AUDIT_FEED_MAX: usize = 8192;

/// Column families. Each holds one kind of record; keys are documented where written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cf {
    /// task_id → task record (the TaskActor's checkpoint).
    Tasks,
    /// task_id → parked flag (bool) for every non-terminal task: what a restart resumes
    /// (parked tasks wait for an operator and are not started).
    Active,
    /// big-endian u64 sequence → message to publish (the transactional outbox).
    Outbox,
    /// `<task_id>/<step_id>/<attempt>` → effect ledger entry.
    Effects,
    /// client idempotency key → task_id.
    IntakeKeys,
    /// task_id → episode (archived summary of a verified task).
    Episodes,
    /// store metadata (schema version, audit publication cursor).
    Meta,
    /// big-endian u64 sequence → [`chain::Link`]: the hash-chained audit log. Written
    /// only by the group-commit writer (see [`Batch::append_audit`]).
    Audit,
    /// `<index>/<first seq BE>` → run length (`u32`): the audit links of one task (or
    /// other index key), one key per commit.
    AuditIndex,
    /// `<period>/<scope>` → counter (`u64`, little-endian, not a checksummed record):
    /// money spent, in millionths of a dollar. Only added to ([`Batch::add`]), through a
    /// merge operator, so concurrent writers never read-modify-write.
    Spend,
    /// The context store, as applied from the knowledge stream: `v/<key>\0<version BE>`
    /// → a version, `l/<key>` → the latest version number, `k/<name>` → a checkpoint,
    /// `w/<write id>` → what became of a write.
    Context,
    /// Consolidated memory: `f/<fact id>` → a fact, `c/<topic>` → the current fact's id,
    /// `t/<topic>\0<seq BE>` → a fact id (the topic's history).
    Facts,
    /// `<write id>` → a knowledge write not yet acknowledged by the stream (ids are
    /// ULIDs, so key order is the order they were made).
    KnowledgeOutbox,
    /// `<name>` → a sealed secret (ciphertext and nonce; never the value in clear).
    Secrets,
}

impl Cf {
    pub const ALL: [Cf; 14] = [
        Cf::Tasks,
        Cf::Active,
        Cf::Outbox,
        Cf::Effects,
        Cf::IntakeKeys,
        Cf::Episodes,
        Cf::Meta,
        Cf::Audit,
        Cf::AuditIndex,
        Cf::Spend,
        Cf::Context,
        Cf::Facts,
        Cf::KnowledgeOutbox,
        Cf::Secrets,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Tasks => "tasks",
            Cf::Active => "active",
            Cf::Outbox => "outbox",
            Cf::Effects => "effects",
            Cf::IntakeKeys => "intake_keys",
            Cf::Episodes => "episodes",
            Cf::Meta => "meta",
            Cf::Audit => "audit",
            Cf::AuditIndex => "audit_index",
            Cf::Spend => "spend",
            Cf::Context => "context",
            Cf::Facts => "facts",
            Cf::KnowledgeOutbox => "knowledge_outbox",
            Cf::Secrets => "secrets",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt record in column family `{cf}` at key {key:?}: {source}")]
    Corrupt {
        cf: &'static str,
        key: String,
        source: CodecError,
    },
    #[error("cannot encode a record for `{cf}`: {source}")]
    Encode {
        cf: &'static str,
        source: CodecError,
    },
    #[error(
        "the store at {path} has schema version {found}, newer than this binary's {SCHEMA_VERSION}: run a newer cadre"
    )]
    TooNew { path: PathBuf, found: u32 },
    #[error("synced commit failed: {0}")]
    Commit(String),
    #[error("cannot start the commit writer thread: {0}")]
    WriterThread(std::io::Error),
    #[error("the store's commit writer has stopped")]
    WriterGone,
    #[error("audit records are appended only by a synced commit (Store::commit)")]
    AuditOutsideCommit,
    #[error("the store was opened read-only")]
    ReadOnly,
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Memtable size per column family.
    pub write_buffer_bytes: usize,
    /// How long written-only groups are gathered for one fsync (a synced commit ends the
    /// wait at once).
    pub written_sync_window: std::time::Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            write_buffer_bytes: 16 << 20,
            written_sync_window: WRITTEN_SYNC_WINDOW,
        }
    }
}

/// One write operation in a [`Batch`].
#[derive(Debug)]
enum Op {
    Put {
        cf: Cf,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        cf: Cf,
        key: Vec<u8>,
    },
    /// Deletes every key in `[from, to)`.
    DeleteRange {
        cf: Cf,
        from: Vec<u8>,
        to: Vec<u8>,
    },
    /// Adds a little-endian u64 to a counter (a merge).
    Add {
        cf: Cf,
        key: Vec<u8>,
        delta: u64,
    },
}

/// The operations of one state transition, applied atomically.
#[derive(Debug, Default)]
pub struct Batch {
    ops: Vec<Op>,
    /// Audit payloads to chain, each with an optional index key.
    audit: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    /// Encodes `value` (checksummed) and stages a put.
    pub fn put<T: Serialize + ?Sized>(
        &mut self,
        cf: Cf,
        key: impl Into<Vec<u8>>,
        value: &T,
    ) -> Result<&mut Self, StoreError> {
        let value = codec::encode(value).map_err(|source| StoreError::Encode {
            cf: cf.name(),
            source,
        })?;
        self.ops.push(Op::Put {
            cf,
            key: key.into(),
            value,
        });
        Ok(self)
    }

    /// Adds `delta` to the counter at `key` of a counter family (`Cf::Spend`).
    pub fn add(&mut self, cf: Cf, key: impl Into<Vec<u8>>, delta: u64) -> &mut Self {
        self.ops.push(Op::Add {
            cf,
            key: key.into(),
            delta,
        });
        self
    }

    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Delete {
            cf,
            key: key.into(),
        });
        self
    }

    /// Deletes every key in `[from, to)` with one range tombstone: for long runs of
    /// keys that are read back only by scans (each read of the family consults the
    /// tombstones, so not for families read by key on a hot path).
    pub fn delete_range(
        &mut self,
        cf: Cf,
        from: impl Into<Vec<u8>>,
        to: impl Into<Vec<u8>>,
    ) -> &mut Self {
        self.ops.push(Op::DeleteRange {
            cf,
            from: from.into(),
            to: to.into(),
        });
        self
    }

    /// Appends `record` to the audit chain when this batch commits, findable under
    /// `index` (a task id) as well. The writer assigns its sequence and hash, so the
    /// chain's order is the order of commits.
    pub fn append_audit<T: Serialize + ?Sized>(
        &mut self,
        record: &T,
        index: Option<&[u8]>,
    ) -> Result<&mut Self, StoreError> {
        let payload = codec::to_wire(record).map_err(|source| StoreError::Encode {
            cf: Cf::Audit.name(),
            source,
        })?;
        self.audit.push((payload, index.map(<[u8]>::to_vec)));
        Ok(self)
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.audit.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len() + self.audit.len()
    }
}

/// One page of a [`Store::scan`].
#[derive(Debug)]
pub struct ScanPage<T> {
    pub rows: Vec<(Vec<u8>, T)>,
    /// Set when the scan examined its maximum number of keys: the last key examined.
    pub cut_at: Option<Vec<u8>>,
}

/// Counters the node exports and the benchmark reads.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Synced commits requested: the caller waited for the fsync.
    pub commits: AtomicU64,
    /// Written commits requested ([`Store::commit_written`]): the caller went on once the
    /// batch was in the WAL; the fsync followed.
    pub written_commits: AtomicU64,
    /// Commits (of both kinds) written on the committer's own thread, the writer thread
    /// being idle ([`Store::send`]).
    pub written_in_place: AtomicU64,
    /// fsyncs actually issued by the group-commit writer (≤ commits).
    pub syncs: AtomicU64,
    /// Unsynced writes (made durable by the next sync: RocksDB has one WAL).
    pub unsynced_writes: AtomicU64,
    /// Total time spent in synced writes, microseconds.
    pub sync_micros: AtomicU64,
}

/// When a commit is answered, and how soon its group is synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Answered once synced.
    Synced,
    /// Answered once written; synced within the gathering window.
    Written,
    /// Answered once written; synced at once (someone waits for it meanwhile).
    Syncing,
}

struct CommitRequest {
    batch: Batch,
    durability: Durability,
    /// The group's ticket: [`Store::wait_synced`] with it waits for its fsync.
    done: oneshot::Sender<Result<u64, String>>,
}

/// A written group handed to the syncer: its ticket, the audit head it reached, and who
/// waits for its fsync.
struct SyncJob {
    ticket: u64,
    audit_head: u64,
    waiters: Vec<oneshot::Sender<Result<u64, String>>>,
    /// Sync without gathering: a waiter, or a [`Durability::Syncing`] commit.
    urgent: bool,
}

/// An audit link as read: the link, or its sequence and why it cannot be read.
pub type LinkOrBreak = Result<Link, (u64, CodecError)>;

/// A node's RocksDB. Cheap to clone; the writer thread stops when the last clone drops.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<DB>,
    path: PathBuf,
    writer: Option<mpsc::Sender<CommitRequest>>,
    /// The chain head, ticket and syncer queue: held by whoever writes a group, the
    /// `cadre-commit` thread or a committer writing on its own thread while it is idle.
    /// (None when read-only.)
    chain: Option<Arc<Mutex<Chain>>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    syncer_thread: Option<std::thread::JoinHandle<()>>,
    stats: Arc<StoreStats>,
    /// The audit chain's head sequence, moved once the links are synced.
    audit_head: tokio::sync::watch::Receiver<u64>,
    /// Links as written, for the one reader that follows the head.
    audit_feed: Arc<AuditFeed>,
    /// The last group ticket whose fsync completed, or why an fsync failed (for good:
    /// after a failed fsync the OS may have dropped what it was to make durable).
    synced: tokio::sync::watch::Receiver<Result<u64, String>>,
    /// Kept for its statistics (write-stall time).
    db_opts: Options,
}

impl Drop for Inner {
    /// Closing the channel ends the writer; joining it releases its handle on the DB,
    /// so the store can be reopened (RocksDB holds a file lock) as soon as this returns.
    fn drop(&mut self) {
        self.writer.take();
        self.chain.take();
        // The writer ends, dropping the syncer's channel; the syncer ends after it.
        for thread in [self.writer_thread.take(), self.syncer_thread.take()]
            .into_iter()
            .flatten()
        {
            let _ = thread.join();
        }
    }
}

impl Store {
    /// Opens (creating if missing) the store at `path`, checks and migrates its schema,
    /// and starts the group-commit writer.
    pub fn open(path: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        std::fs::create_dir_all(path).map_err(|source| StoreError::DataDir {
            path: path.to_path_buf(),
            source,
        })?;
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.increase_parallelism(2);
        db_opts.set_keep_log_file_num(4);
        db_opts.set_max_total_wal_size(64 << 20);
        let descriptors = Cf::ALL.iter().map(|cf| {
            let mut cf_opts = cf_options(*cf);
            cf_opts.set_write_buffer_size(options.write_buffer_bytes);
            ColumnFamilyDescriptor::new(cf.name(), cf_opts)
        });
        // Tickers only (write-stall time): histograms and timers cost on every write.
        db_opts.enable_statistics();
        db_opts.set_statistics_level(rocksdb::statistics::StatsLevel::ExceptHistogramOrTimers);
        let db = Arc::new(DB::open_cf_descriptors(&db_opts, path, descriptors)?);
        let stats = Arc::new(StoreStats::default());
        let head = read_audit_head(&db)?;
        let (head_tx, head_rx) = tokio::sync::watch::channel(head.seq);
        let (tx, rx) = mpsc::channel(GROUP_BATCHES_MAX * 4);
        let (synced_tx, synced_rx) = tokio::sync::watch::channel(Ok(0));
        let queue = Arc::new(SyncQueue::default());
        let syncer_thread = {
            let syncer = Syncer {
                db: db.clone(),
                stats: stats.clone(),
                head_tx,
                synced_tx,
                window: options.written_sync_window,
            };
            std::thread::Builder::new()
                .name("cadre-sync".into())
                .spawn({
                    let queue = queue.clone();
                    move || syncer.run(&queue)
                })
                .map_err(StoreError::WriterThread)?
        };
        let audit_feed = Arc::new(AuditFeed::default());
        let chain = Arc::new(Mutex::new(Chain {
            head,
            ticket: 0,
            jobs: SyncSender(queue),
            feed: audit_feed.clone(),
        }));
        let writer_thread = {
            let writer = GroupWriter {
                db: db.clone(),
                chain: chain.clone(),
            };
            std::thread::Builder::new()
                .name("cadre-commit".into())
                .spawn(move || writer.run(rx))
                .map_err(StoreError::WriterThread)?
        };
        let store = Store {
            inner: Arc::new(Inner {
                db,
                path: path.to_path_buf(),
                writer: Some(tx),
                chain: Some(chain),
                writer_thread: Some(writer_thread),
                syncer_thread: Some(syncer_thread),
                stats,
                audit_head: head_rx,
                audit_feed,
                synced: synced_rx,
                db_opts,
            }),
        };
        store.check_schema()?;
        Ok(store)
    }

    /// Opens the store read-only, without a writer: for tooling (`cadre audit verify
    /// --data-dir`) that must read a node's store, also while the node runs.
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let db_opts = Options::default();
        // Only the families the store has: one written by an older schema lacks the
        // newer ones, and tooling reads only the audit chain and metadata.
        let existing = DB::list_cf(&db_opts, path)?;
        let descriptors = Cf::ALL
            .iter()
            .filter(|cf| existing.iter().any(|e| e == cf.name()))
            .map(|cf| ColumnFamilyDescriptor::new(cf.name(), cf_options(*cf)));
        let db = Arc::new(DB::open_cf_descriptors_read_only(
            &db_opts,
            path,
            descriptors,
            false,
        )?);
        let head = read_audit_head(&db)?;
        let (_, head_rx) = tokio::sync::watch::channel(head.seq);
        let (_, synced) = tokio::sync::watch::channel(Ok(0));
        let store = Store {
            inner: Arc::new(Inner {
                db,
                path: path.to_path_buf(),
                writer: None,
                chain: None,
                writer_thread: None,
                syncer_thread: None,
                stats: Arc::new(StoreStats::default()),
                audit_head: head_rx,
                audit_feed: Arc::default(),
                synced,
                db_opts,
            }),
        };
        if let Some(found) = store.get::<u32>(Cf::Meta, META_SCHEMA_KEY)?
            && found > SCHEMA_VERSION
        {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found,
            });
        }
        Ok(store)
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        match self.get::<u32>(Cf::Meta, META_SCHEMA_KEY)? {
            Some(found) if found > SCHEMA_VERSION => Err(StoreError::TooNew {
                path: self.inner.path.clone(),
                found,
            }),
            Some(found) if found == SCHEMA_VERSION => Ok(()),
            // Older or absent: migrate. 1 → 2 → 3 → 4 only add column families (2: the
            // audit chain; 3: spend counters; 4: knowledge), which the open above
            // created; stamping the version completes it.
            _ => {
                let mut batch = Batch::new();
                batch.put(Cf::Meta, META_SCHEMA_KEY, &SCHEMA_VERSION)?;
                self.write_batch(batch, true)
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn stats(&self) -> &Arc<StoreStats> {
        &self.inner.stats
    }

    /// Commits `batch` durably (synced), grouped with whatever else is pending.
    pub async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.inner.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.send(batch, Durability::Synced).await.map(|_| ())
    }

    /// Commits `batch` like [`Self::commit`] — atomically, in commit order, audit links
    /// chained — but answers once it is in the WAL, before its fsync (which the syncer
    /// issues right after, for the whole group). It survives a process crash at once (the
    /// OS has it) and a power loss once synced. Returns the ticket to wait for
    /// ([`Self::wait_synced`]): what must not be seen before it is durable (published
    /// events) waits for it.
    pub async fn commit_written(&self, batch: Batch) -> Result<u64, StoreError> {
        if batch.is_empty() {
            return self.synced_ticket();
        }
        self.inner
            .stats
            .written_commits
            .fetch_add(1, Ordering::Relaxed);
        self.send(batch, Durability::Written).await
    }

    /// Commits `batch` like [`Self::commit`], answering once it is written like
    /// [`Self::commit_written`], with its fsync issued at once rather than gathered: for
    /// a caller that does other work before it waits for the ticket
    /// ([`Self::wait_synced`]), so that work overlaps the fsync. Counted as a synced
    /// commit.
    pub async fn commit_syncing(&self, batch: Batch) -> Result<u64, StoreError> {
        if batch.is_empty() {
            return self.synced_ticket();
        }
        self.inner.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.send(batch, Durability::Syncing).await
    }

    async fn send(&self, batch: Batch, durability: Durability) -> Result<u64, StoreError> {
        // The writer thread idle: write here, sparing two thread hand-offs (to the writer
        // and back), which cost more than the write (docs/PERFORMANCE.md).
        let batch = match self.write_here(batch, durability) {
            Here::Written(ticket) => return ticket,
            Here::Syncing(wait) => return answer(wait.await),
            Here::Busy(batch) => batch,
        };
        let (done, wait) = oneshot::channel();
        let writer = self.inner.writer.as_ref().ok_or(StoreError::WriterGone)?;
        writer
            .send(CommitRequest {
                batch,
                durability,
                done,
            })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        answer(wait.await)
    }

    /// Writes `batch` as a group of its own on this thread if no group is being written
    /// (the chain's lock is free), exactly as the writer thread would: chained, to the
    /// WAL, then handed to the syncer. Never waits for the lock and never for a RocksDB
    /// write stall (see [`write_group`]).
    fn write_here(&self, batch: Batch, durability: Durability) -> Here {
        let Some(chain) = &self.inner.chain else {
            return Here::Busy(batch);
        };
        let mut chain = match chain.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(_)) => {
                return Here::Written(Err(StoreError::Commit(CHAIN_POISONED.into())));
            }
            Err(TryLockError::WouldBlock) => return Here::Busy(batch),
        };
        let (done, wait) = oneshot::channel();
        let ticket = chain.write(&self.inner.db, vec![(durability, done, batch)], true);
        drop(chain);
        self.inner
            .stats
            .written_in_place
            .fetch_add(1, Ordering::Relaxed);
        match ticket {
            Err(e) => Here::Written(Err(StoreError::Commit(e))),
            Ok(_) if durability == Durability::Synced => Here::Syncing(wait),
            Ok(ticket) => Here::Written(Ok(ticket)),
        }
    }

    /// Waits until the group with `ticket` (from [`Self::commit_written`]) is synced.
    /// An error once any fsync has failed.
    pub async fn wait_synced(&self, ticket: u64) -> Result<(), StoreError> {
        let mut synced = self.inner.synced.clone();
        let reached = synced
            .wait_for(|s| s.as_ref().map_or(true, |t| *t >= ticket))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        match &*reached {
            Ok(_) => Ok(()),
            Err(e) => Err(StoreError::Commit(e.clone())),
        }
    }

    fn synced_ticket(&self) -> Result<u64, StoreError> {
        self.inner
            .synced
            .borrow()
            .clone()
            .map_err(StoreError::Commit)
    }

    /// Writes `batch` to the WAL without fsync. It survives a process crash (the OS has
    /// it) and becomes power-safe with the next synced commit, because RocksDB has one
    /// WAL and a sync covers everything written before it. Use only for records whose
    /// loss on power failure is repaired by redoing deterministic work.
    pub fn write_unsynced(&self, batch: Batch) -> Result<(), StoreError> {
        self.inner
            .stats
            .unsynced_writes
            .fetch_add(1, Ordering::Relaxed);
        self.write_batch(batch, false)
    }

    fn write_batch(&self, batch: Batch, sync: bool) -> Result<(), StoreError> {
        if !batch.audit.is_empty() {
            return Err(StoreError::AuditOutsideCommit);
        }
        if self.inner.writer.is_none() {
            return Err(StoreError::ReadOnly);
        }
        let db = &self.inner.db;
        let mut wb = WriteBatch::default();
        apply(db, &mut wb, batch.ops);
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        db.write_opt(wb, &opts)?;
        Ok(())
    }

    /// Reads and decodes one record; a value that fails its checksum is an error naming
    /// where it is, never a silently wrong record.
    pub fn get<T: DeserializeOwned>(&self, cf: Cf, key: &[u8]) -> Result<Option<T>, StoreError> {
        let db = &self.inner.db;
        let Some(bytes) = db.get_pinned_cf(handle(db, cf), key)? else {
            return Ok(None);
        };
        codec::decode(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                cf: cf.name(),
                key: String::from_utf8_lossy(key).into_owned(),
                source,
            })
    }

    /// A counter of a counter family (`Cf::Spend`); 0 if never added to.
    pub fn counter(&self, cf: Cf, key: &[u8]) -> Result<u64, StoreError> {
        let db = &self.inner.db;
        Ok(db
            .get_pinned_cf(handle(db, cf), key)?
            .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
            .map_or(0, u64::from_le_bytes))
    }

    pub fn contains(&self, cf: Cf, key: &[u8]) -> Result<bool, StoreError> {
        let db = &self.inner.db;
        Ok(db.get_pinned_cf(handle(db, cf), key)?.is_some())
    }

    /// Up to `limit` records in key order (or reverse), starting at `from` inclusive
    /// (forward) or at/below `from` (reverse); `None` starts at the end. `keep` filters
    /// decoded records; at most `scan_max` keys are examined so a filter cannot turn a
    /// page into a full scan. When the scan stops at `scan_max`, `cut_at` is the last
    /// key examined, so the caller can say where to go on.
    pub fn scan<T: DeserializeOwned>(
        &self,
        cf: Cf,
        from: Option<&[u8]>,
        reverse: bool,
        limit: usize,
        scan_max: usize,
        mut keep: impl FnMut(&[u8], &T) -> bool,
    ) -> Result<ScanPage<T>, StoreError> {
        let db = &self.inner.db;
        let mode = match (from, reverse) {
            (Some(k), false) => IteratorMode::From(k, rocksdb::Direction::Forward),
            (Some(k), true) => IteratorMode::From(k, rocksdb::Direction::Reverse),
            (None, false) => IteratorMode::Start,
            (None, true) => IteratorMode::End,
        };
        let mut page = ScanPage {
            rows: Vec::new(),
            cut_at: None,
        };
        let mut last_key = None;
        for (examined, item) in db.iterator_cf(handle(db, cf), mode).enumerate() {
            if page.rows.len() >= limit {
                break;
            }
            if examined >= scan_max {
                page.cut_at = last_key;
                break;
            }
            let (key, value) = item?;
            let record: T = codec::decode(&value).map_err(|source| StoreError::Corrupt {
                cf: cf.name(),
                key: String::from_utf8_lossy(&key).into_owned(),
                source,
            })?;
            if keep(&key, &record) {
                page.rows.push((key.to_vec(), record));
            }
            last_key = Some(key.into_vec());
        }
        Ok(page)
    }

    /// Up to `limit` records whose keys start with `prefix`, in key order or (reverse)
    /// from the last such key down. `after` (exclusive) continues a page.
    pub fn prefixed<T: DeserializeOwned>(
        &self,
        cf: Cf,
        prefix: &[u8],
        after: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
        let db = &self.inner.db;
        // The greatest key with this prefix is below `prefix` + 0xff…: keys here are
        // shorter than the 64 bytes appended.
        let mut end = prefix.to_vec();
        end.extend_from_slice(&[0xff; 64]);
        let start = after.map(<[u8]>::to_vec);
        let mode = match (&start, reverse) {
            (Some(k), false) => IteratorMode::From(k, rocksdb::Direction::Forward),
            (Some(k), true) => IteratorMode::From(k, rocksdb::Direction::Reverse),
            (None, false) => IteratorMode::From(prefix, rocksdb::Direction::Forward),
            (None, true) => IteratorMode::From(&end, rocksdb::Direction::Reverse),
        };
        let mut rows = Vec::new();
        for item in db.iterator_cf(handle(db, cf), mode) {
            if rows.len() >= limit {
                break;
            }
            let (key, value) = item?;
            if !key.starts_with(prefix) {
                break;
            }
            if start.as_deref() == Some(&key[..]) {
                continue;
            }
            let record: T = codec::decode(&value).map_err(|source| StoreError::Corrupt {
                cf: cf.name(),
                key: String::from_utf8_lossy(&key).into_owned(),
                source,
            })?;
            rows.push((key.into_vec(), record));
        }
        Ok(rows)
    }

    /// Every key of a family with the size of its stored value, in key order.
    pub fn value_sizes(&self, cf: Cf) -> Result<Vec<(Vec<u8>, usize)>, StoreError> {
        let db = &self.inner.db;
        let mut out = Vec::new();
        for item in db.iterator_cf(handle(db, cf), IteratorMode::Start) {
            let (k, v) = item?;
            out.push((k.into_vec(), v.len()));
        }
        Ok(out)
    }

    /// All keys of a column family (used for small index families such as `active`).
    pub fn keys(&self, cf: Cf) -> Result<Vec<Vec<u8>>, StoreError> {
        let db = &self.inner.db;
        let mut out = Vec::new();
        for item in db.iterator_cf(handle(db, cf), IteratorMode::Start) {
            out.push(item?.0.into_vec());
        }
        Ok(out)
    }

    /// Keys in a column family, counting at most `max` (for small families such as the
    /// outbox, whose size is a health signal).
    pub fn count_keys(&self, cf: Cf, max: usize) -> Result<usize, StoreError> {
        let db = &self.inner.db;
        let mut n = 0;
        for item in db
            .iterator_cf(handle(db, cf), IteratorMode::Start)
            .take(max)
        {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// The last key of a column family, if any.
    pub fn last_key(&self, cf: Cf) -> Result<Option<Vec<u8>>, StoreError> {
        let db = &self.inner.db;
        match db.iterator_cf(handle(db, cf), IteratorMode::End).next() {
            Some(item) => Ok(Some(item?.0.into_vec())),
            None => Ok(None),
        }
    }

    /// Approximate on-disk size of live data, bytes.
    pub fn size_bytes(&self) -> u64 {
        let db = &self.inner.db;
        Cf::ALL
            .iter()
            .filter_map(|cf| {
                db.property_int_value_cf(handle(db, *cf), "rocksdb.total-sst-files-size")
                    .ok()
                    .flatten()
            })
            .sum()
    }

    /// Total time writes were stalled or slowed by RocksDB (compaction falling behind).
    pub fn write_stall_micros(&self) -> u64 {
        // A read-only store has no statistics (and writes nothing to stall).
        if self.inner.writer.is_none() {
            return 0;
        }
        self.inner
            .db_opts
            .get_ticker_count(rocksdb::statistics::Ticker::StallMicros)
    }

    /// Sequence of the last committed audit link.
    pub fn audit_seq(&self) -> u64 {
        *self.inner.audit_head.borrow()
    }

    /// Changes whenever commits append audit links (to wake a publisher).
    pub fn audit_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.audit_head.clone()
    }

    /// Up to `limit` synced audit links with sequence > `after` (at most the audit head),
    /// in order. A link that cannot be read fails the read.
    pub fn audit_links(&self, after: u64, limit: usize) -> Result<Vec<Link>, StoreError> {
        self.audit_links_or_breaks(after, limit)?
            .into_iter()
            .map(|link| {
                link.map_err(|(seq, source)| StoreError::Corrupt {
                    cf: Cf::Audit.name(),
                    key: String::from_utf8_lossy(&chain::key(seq)).into_owned(),
                    source,
                })
            })
            .collect()
    }

    /// As [`Store::audit_links`], except that a link that cannot be read takes its place
    /// as its sequence and why, instead of failing the whole read: the publisher sends
    /// the break on (a collector sees the gap and why) and goes past it.
    pub fn audit_links_or_breaks(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<LinkOrBreak>, StoreError> {
        // Only synced links: one written but not yet synced could still be lost, and its
        // sequence then reused for another record; what is published or read never is.
        let synced = self.audit_seq().saturating_sub(after);
        let limit = usize::try_from(synced).map_or(limit, |n| n.min(limit));
        if limit == 0 {
            return Ok(Vec::new());
        }
        let db = &self.inner.db;
        let from = chain::key(after.saturating_add(1));
        let mut links = Vec::with_capacity(limit);
        let iter = db.iterator_cf(
            handle(db, Cf::Audit),
            IteratorMode::From(&from, rocksdb::Direction::Forward),
        );
        for (next, item) in (after.saturating_add(1)..).zip(iter.take(limit)) {
            let (key, value) = item?;
            // Keys are the sequence; a key that is not one still moves the reader on.
            let seq = <[u8; 8]>::try_from(&key[..]).map_or(next, u64::from_be_bytes);
            links.push(codec::decode::<Link>(&value).map_err(|e| (seq, e)));
        }
        Ok(links)
    }

    /// For the one reader that follows the chain's head (the audit publisher): as
    /// [`Store::audit_links_or_breaks`], but the links come from memory, as the writer
    /// encoded them, when it holds them from `after + 1` on: no read back, no decode.
    /// Taken links leave memory, so a second reader would see gaps (and read those
    /// back). The feed fills only once this is first called, and drops its oldest links
    /// past [`AUDIT_FEED_MAX`]; whatever it lacks is read from RocksDB.
    pub fn take_audit_links(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<LinkOrBreak>, StoreError> {
        let feed = &self.inner.audit_feed;
        feed.on.store(true, Ordering::Relaxed);
        // Read before the feed: every link at or below it is synced.
        let synced = self.audit_seq();
        let mut links = feed.lock();
        while links.front().is_some_and(|l| l.seq <= after) {
            links.pop_front();
        }
        if links
            .front()
            .is_some_and(|l| l.seq == after.saturating_add(1))
        {
            let n = links
                .iter()
                .take(limit)
                .take_while(|l| l.seq <= synced)
                .count();
            return Ok(links.drain(..n).map(Ok).collect());
        }
        drop(links);
        self.audit_links_or_breaks(after, limit)
    }

    /// The last `limit` audit links appended under `index`, oldest first.
    pub fn audit_links_for(&self, index: &[u8], limit: usize) -> Result<Vec<Link>, StoreError> {
        let db = &self.inner.db;
        let mut prefix = index.to_vec();
        prefix.push(b'/');
        let mut seqs = Vec::new();
        let iter = db.iterator_cf(
            handle(db, Cf::AuditIndex),
            IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (key, value) = item?;
            if !key.starts_with(&prefix) || key.len() != prefix.len() + 8 {
                break;
            }
            let mut first = [0u8; 8];
            first.copy_from_slice(&key[prefix.len()..]);
            let first = u64::from_be_bytes(first);
            let len: u32 = codec::decode(&value).map_err(|source| StoreError::Corrupt {
                cf: Cf::AuditIndex.name(),
                key: String::from_utf8_lossy(&key).into_owned(),
                source,
            })?;
            seqs.extend(first..first + u64::from(len));
        }
        let skip = seqs.len().saturating_sub(limit);
        let mut links = Vec::with_capacity(seqs.len() - skip);
        for seq in &seqs[skip..] {
            if let Some(link) = self.get::<Link>(Cf::Audit, &chain::key(*seq))? {
                links.push(link);
            }
        }
        Ok(links)
    }

    /// Walks the whole audit chain and names the first link that does not hold.
    pub fn verify_audit(&self) -> Result<ChainReport, StoreError> {
        let db = &self.inner.db;
        let mut error = None;
        let links = db
            .iterator_cf(handle(db, Cf::Audit), IteratorMode::Start)
            .map_while(|item| match item {
                Ok((k, v)) => Some((k.into_vec(), v.into_vec())),
                Err(e) => {
                    error = Some(e);
                    None
                }
            });
        let report = chain::verify(links);
        match error {
            Some(e) => Err(e.into()),
            None => Ok(report),
        }
    }

    /// Raw bytes of a value, for tooling that must see exactly what is stored.
    pub fn get_raw(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let db = &self.inner.db;
        Ok(db.get_cf(handle(db, cf), key)?)
    }
}

fn handle(db: &DB, cf: Cf) -> &rocksdb::ColumnFamily {
    // Every family in Cf::ALL is created at open, so a missing handle is a bug in this
    // file, not an input error.
    db.cf_handle(cf.name())
        .unwrap_or_else(|| panic!("column family {} not opened", cf.name()))
}

fn apply(db: &DB, wb: &mut WriteBatch, ops: Vec<Op>) {
    for op in ops {
        match op {
            Op::Put { cf, key, value } => wb.put_cf(handle(db, cf), key, value),
            Op::Delete { cf, key } => wb.delete_cf(handle(db, cf), key),
            Op::DeleteRange { cf, from, to } => wb.delete_range_cf(handle(db, cf), from, to),
            Op::Add { cf, key, delta } => wb.merge_cf(handle(db, cf), key, delta.to_le_bytes()),
        }
    }
}

/// The merge operator of counter families: the sum of the existing value and the
/// operands, each a little-endian u64 (saturating; a malformed value counts as 0).
/// A column family's options as every open of the store must give them. The `spend`
/// family's merge operator above all: replaying a write-ahead log that holds a merge
/// without it fails that batch, and RocksDB's point-in-time recovery then drops it and
/// every batch after it, so an open without it reads (and a writable one keeps) the
/// store as it was before the last commits that charged a budget.
fn cf_options(cf: Cf) -> Options {
    let mut opts = Options::default();
    if cf == Cf::Spend {
        opts.set_merge_operator_associative("cadre_add_u64", add_counters);
    }
    opts
}

/// Opens a stopped node's store as RocksDB itself, with the store's column family
/// options, for tools and tests that must edit it below the store's API (a test that
/// tampers with an audit record). Anything else goes through [`Store`].
pub fn open_raw(path: &Path) -> Result<DB, StoreError> {
    let opts = Options::default();
    let existing = DB::list_cf(&opts, path)?;
    let descriptors = existing.iter().map(|name| {
        let opts = Cf::ALL
            .iter()
            .find(|cf| cf.name() == name)
            .map_or_else(Options::default, |cf| cf_options(*cf));
        ColumnFamilyDescriptor::new(name, opts)
    });
    Ok(DB::open_cf_descriptors(&opts, path, descriptors)?)
}

fn add_counters(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    let read = |b: &[u8]| <[u8; 8]>::try_from(b).map(u64::from_le_bytes).unwrap_or(0);
    let sum = operands.iter().fold(existing.map_or(0, read), |acc, op| {
        acc.saturating_add(read(op))
    });
    Some(sum.to_le_bytes().to_vec())
}

/// The audit head as stored: the last link of the `audit` family.
fn read_audit_head(db: &DB) -> Result<Head, StoreError> {
    match db
        .iterator_cf(handle(db, Cf::Audit), IteratorMode::End)
        .next()
    {
        None => Ok(Head::EMPTY),
        Some(item) => {
            let (key, value) = item?;
            let link: Link = codec::decode(&value).map_err(|source| StoreError::Corrupt {
                cf: Cf::Audit.name(),
                key: format!("{key:?}"),
                source,
            })?;
            Ok(Head {
                seq: link.seq,
                hash: link.hash,
            })
        }
    }
}

/// The `cadre-commit` thread: drains every pending commit into one `WriteBatch`,
/// chains their audit records, writes it to the WAL, answers the commits that asked only
/// for that, and hands the group to the `cadre-sync` thread. The chain has one author at
/// a time (its lock), so its order is the commit order; the fsync is on its own thread,
/// so writing the next group never waits for the last one's fsync. While this thread is
/// idle a committer writes its batch itself, the same way ([`Store::send`]).
struct GroupWriter {
    db: Arc<DB>,
    chain: Arc<Mutex<Chain>>,
}

impl GroupWriter {
    fn run(self, mut rx: mpsc::Receiver<CommitRequest>) {
        let mut group = Vec::with_capacity(GROUP_BATCHES_MAX);
        while let Some(first) = rx.blocking_recv() {
            group.push(first);
            while group.len() < GROUP_BATCHES_MAX {
                match rx.try_recv() {
                    Ok(next) => group.push(next),
                    Err(_) => break,
                }
            }
            let commits: Vec<Commit> = group
                .drain(..)
                .map(|req| (req.durability, req.done, req.batch))
                .collect();
            match self.chain.lock() {
                Ok(mut chain) => {
                    let _ = chain.write(&self.db, commits, false);
                }
                Err(_) => {
                    for (_, done, _) in commits {
                        let _ = done.send(Err(CHAIN_POISONED.into()));
                    }
                }
            }
        }
    }
}

/// A panic while a group was being staged may have moved the chain's head past links
/// that were never written: from then on every commit is refused rather than leave a
/// hole in the audit chain. (A bug; the node must be restarted, and rereads the head.)
const CHAIN_POISONED: &str = "a commit panicked while writing the audit chain; restart the node";

/// What a commit written on the caller's thread still needs.
enum Here {
    /// Written (or failed): the ticket.
    Written(Result<u64, StoreError>),
    /// Written; the answer comes once synced.
    Syncing(oneshot::Receiver<Result<u64, String>>),
    /// A group is being written: through the writer thread.
    Busy(Batch),
}

fn answer(
    reply: Result<Result<u64, String>, oneshot::error::RecvError>,
) -> Result<u64, StoreError> {
    match reply {
        Ok(Ok(ticket)) => Ok(ticket),
        Ok(Err(message)) => Err(StoreError::Commit(message)),
        Err(_) => Err(StoreError::WriterGone),
    }
}

/// The audit chain's head, the groups written so far, and the syncer's queue.
struct Chain {
    head: Head,
    /// Groups written so far.
    ticket: u64,
    jobs: SyncSender,
    feed: Arc<AuditFeed>,
}

/// Audit links as the writer encoded them, in chain order, until the publisher takes
/// them ([`Store::take_audit_links`]). Filled under the chain's lock, only with links
/// whose group was written, and only once a reader has asked.
#[derive(Default)]
struct AuditFeed {
    on: AtomicBool,
    links: Mutex<VecDeque<Link>>,
}

impl AuditFeed {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Link>> {
        // Nothing panics while holding it; a poisoned feed still holds whole links.
        self.links
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn extend(&self, written: Vec<Link>) {
        let mut links = self.lock();
        links.extend(written);
        let over = links.len().saturating_sub(AUDIT_FEED_MAX);
        links.drain(..over);
    }
}

/// A commit in a group: when to answer, where to answer, what to write.
type Commit = (Durability, oneshot::Sender<Result<u64, String>>, Batch);

impl Chain {
    /// Writes `commits` as one group: answers those that asked only for the write, hands
    /// the rest to the syncer with the group's ticket. `here`: on a committer's thread
    /// (see [`write_group`]).
    fn write(&mut self, db: &DB, commits: Vec<Commit>, here: bool) -> Result<u64, String> {
        let before = self.head;
        let mut wb = WriteBatch::default();
        let mut waiters = Vec::with_capacity(commits.len());
        let mut links = self.feed.on.load(Ordering::Relaxed).then(Vec::new);
        let mut staged = Ok(());
        for (durability, done, batch) in commits {
            if staged.is_ok() {
                staged = self.stage(db, &mut wb, batch, links.as_mut());
            }
            waiters.push((durability, done));
        }
        // A link that cannot be encoded fails the whole group: never write a chain
        // with a hole in it.
        if let Err(e) = staged.and_then(|()| write_group(db, wb, here)) {
            self.head = before;
            for (_, done) in waiters {
                // A waiter that went away (its task stopped) needs no answer.
                let _ = done.send(Err(e.clone()));
            }
            return Err(e);
        }
        if let Some(links) = links.filter(|l| !l.is_empty()) {
            self.feed.extend(links);
        }
        self.ticket += 1;
        let ticket = self.ticket;
        let mut for_sync = Vec::new();
        let mut urgent = false;
        for (durability, done) in waiters {
            urgent |= durability != Durability::Written;
            if durability == Durability::Synced {
                for_sync.push(done);
            } else {
                let _ = done.send(Ok(ticket));
            }
        }
        let job = SyncJob {
            ticket,
            audit_head: self.head.seq,
            waiters: for_sync,
            urgent,
        };
        self.jobs.send(job);
        Ok(ticket)
    }

    /// Adds `batch` to the group; its links also go to `feed_links` when the feed is on.
    fn stage(
        &mut self,
        db: &DB,
        wb: &mut WriteBatch,
        batch: Batch,
        mut feed_links: Option<&mut Vec<Link>>,
    ) -> Result<(), String> {
        apply(db, wb, batch.ops);
        // Consecutive links with the same index form one run: one index key each.
        let mut run: Option<(Vec<u8>, u64, u32)> = None;
        let flush = |wb: &mut WriteBatch, run: Option<(Vec<u8>, u64, u32)>| {
            if let Some((index, first, len)) = run {
                let value = codec::encode(&len).map_err(|e| e.to_string())?;
                wb.put_cf(
                    handle(db, Cf::AuditIndex),
                    chain::index_key(&index, first),
                    value,
                );
            }
            Ok::<(), String>(())
        };
        for (payload, index) in batch.audit {
            let link = self.head.append(payload);
            let value = codec::encode(&link).map_err(|e| e.to_string())?;
            wb.put_cf(handle(db, Cf::Audit), chain::key(link.seq), value);
            let seq = link.seq;
            if let Some(feed) = feed_links.as_deref_mut() {
                feed.push(link);
            }
            run = match (run, index) {
                (Some((i, first, len)), Some(index)) if i == index => Some((i, first, len + 1)),
                (previous, index) => {
                    flush(wb, previous)?;
                    index.map(|i| (i, seq, 1))
                }
            };
        }
        flush(wb, run)
    }
}

/// To the WAL, not synced: the syncer makes it durable. On a committer's thread
/// (`here`, an async worker) a RocksDB write stall must not block the worker unannounced:
/// the write is tried without waiting and, if RocksDB would stall it, done again as
/// blocking work (`block_in_place`), still under the chain's lock so the order holds.
fn write_group(db: &DB, wb: WriteBatch, here: bool) -> Result<(), String> {
    let mut opts = WriteOptions::default();
    opts.set_sync(false);
    if !here {
        return db.write_opt(wb, &opts).map_err(|e| e.to_string());
    }
    // `write_opt` consumes the batch: keep its bytes for the rare retry.
    let copy = wb.data().to_vec();
    opts.set_no_slowdown(true);
    match db.write_opt(wb, &opts) {
        Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => {
            opts.set_no_slowdown(false);
            let retry = || db.write_opt(WriteBatch::from_data(&copy), &opts);
            let multi_thread = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            if multi_thread {
                tokio::task::block_in_place(retry)
            } else {
                retry()
            }
        }
        other => other,
    }
    .map_err(|e| e.to_string())
}

/// The `cadre-sync` thread: one fsync of the WAL for every group written meanwhile
/// (RocksDB lets writes go on during it), then it answers the synced commits of those
/// groups and moves the synced ticket and the audit head (links are published only once
/// durable).
struct Syncer {
    db: Arc<DB>,
    stats: Arc<StoreStats>,
    head_tx: tokio::sync::watch::Sender<u64>,
    synced_tx: tokio::sync::watch::Sender<Result<u64, String>>,
    window: std::time::Duration,
}

/// Written groups on their way to the syncer. A group nobody waits for does not wake
/// a syncer that is gathering (it would be woken once per commit, for nothing): only an
/// urgent group (with a waiter, or a [`Durability::Syncing`] commit), or the window's
/// end, does.
#[derive(Default)]
struct SyncQueue {
    state: Mutex<SyncQueueState>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct SyncQueueState {
    jobs: Vec<SyncJob>,
    /// The syncer is gathering until its window closes.
    gathering: bool,
    /// No more groups will come (the store is closing).
    closed: bool,
    /// The syncer thread has ended (it panicked): nobody will fsync what is queued.
    syncer_gone: bool,
}

/// The writers' end of the queue; dropping the last one lets the syncer finish.
struct SyncSender(Arc<SyncQueue>);

impl SyncSender {
    fn send(&self, job: SyncJob) {
        let mut state = lock_queue(&self.0);
        if state.syncer_gone {
            drop(state);
            fail_waiters(vec![job]);
            return;
        }
        let wake = !state.gathering || job.urgent;
        state.jobs.push(job);
        drop(state);
        if wake {
            self.0.wake.notify_one();
        }
    }
}

impl Drop for SyncSender {
    fn drop(&mut self) {
        lock_queue(&self.0).closed = true;
        self.0.wake.notify_one();
    }
}

fn fail_waiters(jobs: Vec<SyncJob>) {
    for done in jobs.into_iter().flat_map(|job| job.waiters) {
        let _ = done.send(Err("the store's syncer has stopped".into()));
    }
}

fn lock_queue(queue: &SyncQueue) -> std::sync::MutexGuard<'_, SyncQueueState> {
    // Nothing panics while holding it; a poisoned queue still holds whole jobs.
    queue
        .state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Syncer {
    fn run(self, queue: &SyncQueue) {
        // However the thread ends, commits waiting for an fsync get an error, not silence.
        struct Gone<'a>(&'a SyncQueue);
        impl Drop for Gone<'_> {
            fn drop(&mut self) {
                let mut state = lock_queue(self.0);
                state.syncer_gone = true;
                let jobs = std::mem::take(&mut state.jobs);
                drop(state);
                fail_waiters(jobs);
            }
        }
        let _gone = Gone(queue);
        loop {
            let mut state = lock_queue(queue);
            while state.jobs.is_empty() && !state.closed {
                state = queue
                    .wake
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            if state.jobs.is_empty() {
                return;
            }
            // Nobody waits for groups that were only written: gather more for one fsync,
            // until a synced commit arrives or the window closes.
            let window = Instant::now() + self.window;
            state.gathering = true;
            while !state.jobs.iter().any(|j| j.urgent) && !state.closed {
                let left = window.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                state = queue
                    .wake
                    .wait_timeout(state, left)
                    .map(|(state, _)| state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner().0);
            }
            state.gathering = false;
            let jobs = std::mem::take(&mut state.jobs);
            drop(state);
            let started = Instant::now();
            let result = self.db.flush_wal(true).map_err(|e| e.to_string());
            self.stats
                .sync_micros
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            self.stats.syncs.fetch_add(1, Ordering::Relaxed);
            // The watches first: a commit answered sees its own links and ticket synced.
            match (&result, jobs.last()) {
                (Ok(()), Some(last)) => {
                    let head = last.audit_head;
                    self.head_tx.send_if_modified(|h| {
                        let moved = *h != head;
                        *h = head;
                        moved
                    });
                    // A failure stays: nothing written before it is known durable.
                    self.synced_tx.send_if_modified(|s| match s {
                        Ok(t) => {
                            *t = last.ticket;
                            true
                        }
                        Err(_) => false,
                    });
                }
                (Err(e), _) => {
                    let _ = self.synced_tx.send_replace(Err(e.clone()));
                }
                (Ok(()), None) => {}
            }
            for job in jobs {
                let answer = result.clone().map(|()| job.ticket);
                for done in job.waiters {
                    let _ = done.send(answer.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commit_then_read_back_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let mut batch = Batch::new();
            batch
                .put(Cf::Tasks, "t1", &("hello".to_string(), 7u32))
                .unwrap();
            batch.put(Cf::Active, "t1", &()).unwrap();
            store.commit(batch).await.unwrap();
            let mut batch = Batch::new();
            batch.delete(Cf::Active, "t1");
            store.write_unsynced(batch).unwrap();
        }
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let got: Option<(String, u32)> = store.get(Cf::Tasks, b"t1").unwrap();
        assert_eq!(got, Some(("hello".to_string(), 7)));
        assert!(!store.contains(Cf::Active, b"t1").unwrap());
    }

    #[tokio::test]
    async fn a_range_delete_removes_its_range_only_and_a_later_put_survives_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let mut batch = Batch::new();
        for seq in 1u64..=5 {
            batch.put(Cf::Outbox, seq.to_be_bytes(), &seq).unwrap();
        }
        store.commit(batch).await.unwrap();
        let mut batch = Batch::new();
        batch.delete_range(Cf::Outbox, 2u64.to_be_bytes(), 4u64.to_be_bytes());
        store.write_unsynced(batch).unwrap();
        let keys = |store: &Store| {
            store
                .scan::<u64>(Cf::Outbox, None, false, 10, 10, |_, _| true)
                .unwrap()
                .rows
                .into_iter()
                .map(|(_, v)| v)
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&store), [1, 4, 5]);
        let mut batch = Batch::new();
        batch.put(Cf::Outbox, 3u64.to_be_bytes(), &3u64).unwrap();
        store.commit(batch).await.unwrap();
        assert_eq!(keys(&store), [1, 3, 4, 5]);
        assert_eq!(store.count_keys(Cf::Outbox, 10).unwrap(), 4);
        assert_eq!(
            store.last_key(Cf::Outbox).unwrap(),
            Some(5u64.to_be_bytes().to_vec())
        );
    }

    /// A store whose syncer, once it holds only written groups, gathers for 10 minutes:
    /// any fsync a test sees came from a commit that asked for it.
    fn gathering_for_ten_minutes() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            written_sync_window: std::time::Duration::from_secs(600),
            ..StoreOptions::default()
        };
        let store = Store::open(dir.path(), &options).unwrap();
        (dir, store)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_synced_commit_ends_the_gathering_window_at_once() {
        let (_dir, store) = gathering_for_ten_minutes();
        let mut batch = Batch::new();
        batch.put(Cf::Tasks, "written", &1u32).unwrap();
        let ticket = store.commit_written(batch).await.unwrap();
        // The syncer now gathers for 10 minutes; more written groups do not end that.
        let mut batch = Batch::new();
        batch.put(Cf::Tasks, "written2", &2u32).unwrap();
        store.commit_written(batch).await.unwrap();
        assert_eq!(store.stats().syncs.load(Ordering::Relaxed), 0);
        // A commit that waits for its fsync is not kept waiting for the window.
        let mut batch = Batch::new();
        batch.put(Cf::Tasks, "synced", &3u32).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(20), store.commit(batch))
            .await
            .expect("a synced commit waited for the gathering window")
            .unwrap();
        // One fsync for all three, and the written ones are synced with it.
        assert_eq!(store.stats().syncs.load(Ordering::Relaxed), 1);
        store.wait_synced(ticket).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_syncing_commit_answers_once_written_and_ends_the_window_at_once() {
        let (_dir, store) = gathering_for_ten_minutes();
        let mut batch = Batch::new();
        batch.put(Cf::Tasks, "written", &1u32).unwrap();
        let written = store.commit_written(batch).await.unwrap();
        // The syncer now gathers for 10 minutes.
        let mut batch = Batch::new();
        batch.put(Cf::Tasks, "syncing", &2u32).unwrap();
        let ticket = store.commit_syncing(batch).await.unwrap();
        assert!(ticket > written);
        // Answered once written: readable before its fsync is waited for.
        assert_eq!(store.get::<u32>(Cf::Tasks, b"syncing").unwrap(), Some(2));
        tokio::time::timeout(
            std::time::Duration::from_secs(20),
            store.wait_synced(ticket),
        )
        .await
        .expect("a syncing commit waited for the gathering window")
        .unwrap();
        // One fsync for both.
        assert_eq!(store.stats().syncs.load(Ordering::Relaxed), 1);
        store.wait_synced(written).await.unwrap();
        assert_eq!(store.stats().commits.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn audit_links_are_read_only_once_synced() {
        let (_dir, store) = gathering_for_ten_minutes();
        let mut batch = Batch::new();
        batch.append_audit(&"written", Some(b"t")).unwrap();
        batch.append_audit(&"written too", Some(b"t")).unwrap();
        let ticket = store.commit_written(batch).await.unwrap();
        // In the WAL, not synced (the syncer gathers for 10 minutes): not yet readable.
        assert_eq!(store.audit_seq(), 0);
        assert!(store.audit_links(0, 10).unwrap().is_empty());
        let mut batch = Batch::new();
        batch.append_audit(&"synced", Some(b"t")).unwrap();
        store.commit(batch).await.unwrap();
        store.wait_synced(ticket).await.unwrap();
        let links = store.audit_links(0, 10).unwrap();
        assert_eq!(links.iter().map(|l| l.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(store.audit_links(1, 1).unwrap().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreadable_audit_link_is_a_break_for_the_publisher_and_an_error_for_readers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let mut batch = Batch::new();
        for r in ["one", "two", "three"] {
            batch.append_audit(&r, Some(b"t")).unwrap();
        }
        store.commit(batch).await.unwrap();
        let db = &store.inner.db;
        db.put_cf(handle(db, Cf::Audit), chain::key(2), b"torn")
            .unwrap();
        let read = store.audit_links_or_breaks(0, 10).unwrap();
        assert_eq!(read.len(), 3);
        assert_eq!(read[0].as_ref().map(|l| l.seq).ok(), Some(1));
        assert!(matches!(&read[1], Err((2, _))), "{:?}", read[1]);
        assert_eq!(read[2].as_ref().map(|l| l.seq).ok(), Some(3));
        assert!(matches!(
            store.audit_links(0, 10),
            Err(StoreError::Corrupt { cf: "audit", .. })
        ));
        assert_eq!(store.audit_links(2, 10).unwrap().len(), 1, "past the break");
    }

    fn seqs(links: &[LinkOrBreak]) -> Vec<u64> {
        links
            .iter()
            .map(|l| l.as_ref().map_or_else(|b| b.0, |l| l.seq))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_audit_feed_hands_over_synced_links_as_written_once_then_reads_back() {
        let (_dir, store) = gathering_for_ten_minutes();
        assert!(store.take_audit_links(0, 10).unwrap().is_empty(), "feed on");
        let mut batch = Batch::new();
        for r in ["one", "two"] {
            batch.append_audit(&r, Some(b"t")).unwrap();
        }
        let ticket = store.commit_written(batch).await.unwrap();
        assert!(
            store.take_audit_links(0, 10).unwrap().is_empty(),
            "not synced"
        );
        let mut batch = Batch::new();
        batch.append_audit(&"three", Some(b"t")).unwrap();
        store.commit(batch).await.unwrap();
        store.wait_synced(ticket).await.unwrap();
        let stored = store.audit_links(0, 10).unwrap();
        // Link 2 torn on disk after it was written: the feed still holds it as written.
        let db = &store.inner.db;
        db.put_cf(handle(db, Cf::Audit), chain::key(2), b"torn")
            .unwrap();
        let first = store.take_audit_links(0, 2).unwrap();
        assert_eq!(seqs(&first), [1, 2], "bounded by the limit");
        let rest = store.take_audit_links(2, 10).unwrap();
        let fed: Vec<Link> = first.into_iter().chain(rest).map(Result::unwrap).collect();
        assert_eq!(fed, stored, "from memory, as written");
        // Taken once: asked again, the links are read back (and the torn one shows).
        let again = store.take_audit_links(0, 10).unwrap();
        assert_eq!(seqs(&again), [1, 2, 3]);
        assert!(again[1].is_err(), "{:?}", again[1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_behind_the_bounded_feed_reads_back_what_it_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        store.take_audit_links(0, 1).unwrap();
        let total = AUDIT_FEED_MAX as u64 + 300;
        let mut batch = Batch::new();
        for i in 0..total {
            batch.append_audit(&i, Some(b"t")).unwrap();
        }
        store.commit(batch).await.unwrap();
        assert_eq!(store.inner.audit_feed.lock().len(), AUDIT_FEED_MAX);
        let mut after = 0;
        while after < total {
            let page = store.take_audit_links(after, 512).unwrap();
            assert_eq!(page.len() as u64, 512.min(total - after));
            assert_eq!(
                seqs(&page),
                (after + 1..=after + page.len() as u64).collect::<Vec<_>>()
            );
            let page_len = page.len() as u64;
            for link in page {
                let link = link.unwrap();
                assert_eq!(
                    codec::from_wire::<u64>(&link.payload).unwrap(),
                    link.seq - 1
                );
            }
            after += page_len;
        }
        assert!(store.inner.audit_feed.lock().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_writer_lets_the_committer_write_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        for i in 0..20u32 {
            let mut batch = Batch::new();
            batch.put(Cf::Tasks, format!("k{i:02}"), &i).unwrap();
            batch.append_audit(&format!("r{i}"), Some(b"t")).unwrap();
            if i % 2 == 0 {
                store.commit(batch).await.unwrap();
            } else {
                let ticket = store.commit_written(batch).await.unwrap();
                store.wait_synced(ticket).await.unwrap();
            }
        }
        // One committer at a time: the writer thread is never needed.
        assert_eq!(store.stats().written_in_place.load(Ordering::Relaxed), 20);
        assert_eq!(store.audit_seq(), 20);
        assert_eq!(store.get::<u32>(Cf::Tasks, b"k19").unwrap(), Some(19));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn committers_in_place_and_through_the_writer_keep_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (tasks, each) = (16u32, 40u32);
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let mut joins = Vec::new();
            for t in 0..tasks {
                let store = store.clone();
                joins.push(tokio::spawn(async move {
                    for i in 0..each {
                        let mut batch = Batch::new();
                        batch.put(Cf::Tasks, format!("t{t:02}"), &i).unwrap();
                        let index = format!("t{t:02}");
                        for r in 0..3 {
                            batch
                                .append_audit(&format!("{t}/{i}/{r}"), Some(index.as_bytes()))
                                .unwrap();
                        }
                        if i % 3 == 0 {
                            store.commit(batch).await.unwrap();
                        } else {
                            store.commit_written(batch).await.unwrap();
                        }
                    }
                }));
            }
            for j in joins {
                j.await.unwrap();
            }
            let stats = store.stats();
            let all = u64::from(tasks * each);
            let commits = stats.commits.load(Ordering::Relaxed)
                + stats.written_commits.load(Ordering::Relaxed);
            assert_eq!(commits, all);
            let in_place = stats.written_in_place.load(Ordering::Relaxed);
            println!("{in_place} of {all} commits written in place");
            assert!(in_place > 0 && in_place <= all);
            // Every task's last write is visible, and each task's records are indexed in
            // its own commit order.
            for t in 0..tasks {
                let key = format!("t{t:02}");
                assert_eq!(
                    store.get::<u32>(Cf::Tasks, key.as_bytes()).unwrap(),
                    Some(each - 1)
                );
                let links = store.audit_links_for(key.as_bytes(), 1000).unwrap();
                let payloads: Vec<String> = links
                    .iter()
                    .map(|l| codec::from_wire::<String>(&l.payload).unwrap())
                    .collect();
                let expected: Vec<String> = (0..each)
                    .flat_map(|i| (0..3).map(move |r| format!("{t}/{i}/{r}")))
                    .collect();
                assert_eq!(payloads, expected);
            }
        }
        // One unbroken chain across reopen: every link, in order, none twice.
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(
            store.verify_audit().unwrap().head_seq,
            u64::from(tasks * each * 3)
        );
    }

    #[tokio::test]
    async fn concurrent_commits_are_grouped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let mut joins = Vec::new();
        for i in 0..200u32 {
            let store = store.clone();
            joins.push(tokio::spawn(async move {
                let mut batch = Batch::new();
                batch.put(Cf::Tasks, format!("k{i:04}"), &i).unwrap();
                store.commit(batch).await
            }));
        }
        for j in joins {
            j.await.unwrap().unwrap();
        }
        let stats = store.stats();
        assert_eq!(stats.commits.load(Ordering::Relaxed), 200);
        // Every commit is durable; how many fsyncs that took depends on timing, but never more.
        assert!(stats.syncs.load(Ordering::Relaxed) <= 201);
        let all = store
            .scan::<u32>(Cf::Tasks, None, false, 1000, 1000, |_, _| true)
            .unwrap()
            .rows;
        assert_eq!(all.len(), 200);
        let last_two = store
            .scan::<u32>(Cf::Tasks, None, true, 2, 1000, |_, _| true)
            .unwrap()
            .rows;
        let odd = store
            .scan::<u32>(Cf::Tasks, None, false, 1000, 10, |_, v| v % 2 == 1)
            .unwrap();
        assert_eq!(odd.rows.len(), 5, "a filter examines at most scan_max keys");
        assert_eq!(
            odd.cut_at.as_deref(),
            Some(&b"k0009"[..]),
            "and says where it stopped"
        );
        assert_eq!(
            last_two.iter().map(|(_, v)| *v).collect::<Vec<_>>(),
            vec![199, 198]
        );
    }

    #[tokio::test]
    async fn a_written_commit_is_visible_at_once_and_synced_right_after() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let mut batch = Batch::new();
            batch.put(Cf::Tasks, "t1", &7u32).unwrap();
            batch.append_audit(&"a1", Some(b"t1")).unwrap();
            let ticket = store.commit_written(batch).await.unwrap();
            assert_eq!(store.get::<u32>(Cf::Tasks, b"t1").unwrap(), Some(7));
            store.wait_synced(ticket).await.unwrap();
            // The audit head moves once its links are synced.
            assert_eq!(store.audit_seq(), 1);
            let mut batch = Batch::new();
            batch.put(Cf::Tasks, "t2", &8u32).unwrap();
            store.commit(batch).await.unwrap();
            let stats = store.stats();
            assert_eq!(stats.written_commits.load(Ordering::Relaxed), 1);
            assert_eq!(stats.commits.load(Ordering::Relaxed), 1);
            assert!((1..=2).contains(&stats.syncs.load(Ordering::Relaxed)));
        }
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(store.get::<u32>(Cf::Tasks, b"t1").unwrap(), Some(7));
        assert_eq!(store.verify_audit().unwrap().head_seq, 1);
    }

    #[tokio::test]
    async fn audit_links_chain_in_commit_order_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let mut joins = Vec::new();
            for i in 0..50u32 {
                let store = store.clone();
                joins.push(tokio::spawn(async move {
                    let mut batch = Batch::new();
                    batch.put(Cf::Tasks, format!("t{i}"), &i).unwrap();
                    let task = format!("t{}", i % 5);
                    batch
                        .append_audit(&format!("a{i}"), Some(task.as_bytes()))
                        .unwrap();
                    batch
                        .append_audit(&format!("b{i}"), Some(task.as_bytes()))
                        .unwrap();
                    store.commit(batch).await
                }));
            }
            for j in joins {
                j.await.unwrap().unwrap();
            }
            assert_eq!(store.audit_seq(), 100);
            let mut unsynced = Batch::new();
            unsynced.append_audit(&"x", None).unwrap();
            assert!(matches!(
                store.write_unsynced(unsynced),
                Err(StoreError::AuditOutsideCommit)
            ));
        }
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(store.audit_seq(), 100, "the head is read back on open");
        let mut batch = Batch::new();
        batch.append_audit(&"after reopen", Some(b"t0")).unwrap();
        store.commit(batch).await.unwrap();
        let report = store.verify_audit().unwrap();
        assert_eq!(report.broken, None);
        assert_eq!(report.head_seq, 101);
        // One task's links: its two records per commit, adjacent, in order.
        let t0 = store.audit_links_for(b"t0", 100).unwrap();
        assert_eq!(t0.len(), 21);
        let texts: Vec<String> = t0
            .iter()
            .map(|l| codec::from_wire::<String>(&l.payload).unwrap())
            .collect();
        assert_eq!(texts.last().map(String::as_str), Some("after reopen"));
        for pair in texts[..20].chunks(2) {
            assert_eq!(pair[0].replace('a', "b"), pair[1], "{texts:?}");
        }
        assert_eq!(store.audit_links(99, 10).unwrap().len(), 2);
        assert_eq!(store.audit_links_for(b"t0", 3).unwrap().len(), 3);
        drop(store);
        let ro = Store::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.verify_audit().unwrap().head_seq, 101);
        assert_eq!(ro.write_stall_micros(), 0);
    }

    #[tokio::test]
    async fn corrupt_value_is_reported_with_its_location() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let mut raw = codec::encode(&42u64).unwrap();
        let mid = raw.len() / 2;
        raw[mid] ^= 0x40;
        let db = &store.inner.db;
        db.put_cf(handle(db, Cf::Tasks), b"bad", &raw).unwrap();
        let err = store.get::<u64>(Cf::Tasks, b"bad").unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt { cf: "tasks", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("\"bad\""), "{err}");
    }

    #[tokio::test]
    async fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let mut batch = Batch::new();
            batch
                .put(Cf::Meta, META_SCHEMA_KEY, &(SCHEMA_VERSION + 1))
                .unwrap();
            store.commit(batch).await.unwrap();
        }
        let err = Store::open(dir.path(), &StoreOptions::default())
            .err()
            .expect("must refuse");
        assert!(matches!(err, StoreError::TooNew { found, .. } if found == SCHEMA_VERSION + 1));
        assert!(err.to_string().contains("run a newer cadre"));
    }

    #[tokio::test]
    async fn counters_add_up_across_batches_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            assert_eq!(store.counter(Cf::Spend, b"2026-11-24/*").unwrap(), 0);
            // Concurrent writers: grouped into shared writes, never read-modify-write.
            let commits: Vec<_> = (1..=50u64)
                .map(|n| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let mut batch = Batch::new();
                        batch.add(Cf::Spend, b"2026-11-24/*".to_vec(), n);
                        store.commit(batch).await
                    })
                })
                .collect();
            for c in commits {
                c.await.unwrap().unwrap();
            }
            assert_eq!(store.counter(Cf::Spend, b"2026-11-24/*").unwrap(), 1275);
        }
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(store.counter(Cf::Spend, b"2026-11-24/*").unwrap(), 1275);
    }
}
