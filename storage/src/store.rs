//! RocksDB behind a small typed surface: column families, batches, group commit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rocksdb::{ColumnFamilyDescriptor, DB, IteratorMode, Options, WriteBatch, WriteOptions};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{mpsc, oneshot};

use crate::codec::{self, CodecError};

/// The schema this binary writes. The store records it in `meta`; a store written by a
/// newer binary is refused rather than misread.
pub const SCHEMA_VERSION: u32 = 1;
const META_SCHEMA_KEY: &[u8] = b"schema_version";
/// Upper bound on batches the writer folds into one synced write.
const GROUP_BATCHES_MAX: usize = 2048;

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
    /// store metadata (schema version).
    Meta,
}

impl Cf {
    pub const ALL: [Cf; 7] = [
        Cf::Tasks,
        Cf::Active,
        Cf::Outbox,
        Cf::Effects,
        Cf::IntakeKeys,
        Cf::Episodes,
        Cf::Meta,
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
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            write_buffer_bytes: 16 << 20,
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
}

/// The operations of one state transition, applied atomically.
#[derive(Debug, Default)]
pub struct Batch {
    ops: Vec<Op>,
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

    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(Op::Delete {
            cf,
            key: key.into(),
        });
        self
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
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
    /// Synced commits requested (one per state transition).
    pub commits: AtomicU64,
    /// fsyncs actually issued by the group-commit writer (≤ commits).
    pub syncs: AtomicU64,
    /// Unsynced writes (made durable by the next sync: RocksDB has one WAL).
    pub unsynced_writes: AtomicU64,
    /// Total time spent in synced writes, microseconds.
    pub sync_micros: AtomicU64,
}

struct CommitRequest {
    batch: Batch,
    done: oneshot::Sender<Result<(), String>>,
}

/// A node's RocksDB. Cheap to clone; the writer thread stops when the last clone drops.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<DB>,
    path: PathBuf,
    writer: Option<mpsc::Sender<CommitRequest>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    stats: Arc<StoreStats>,
}

impl Drop for Inner {
    /// Closing the channel ends the writer; joining it releases its handle on the DB,
    /// so the store can be reopened (RocksDB holds a file lock) as soon as this returns.
    fn drop(&mut self) {
        self.writer.take();
        if let Some(thread) = self.writer_thread.take() {
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
            let mut cf_opts = Options::default();
            cf_opts.set_write_buffer_size(options.write_buffer_bytes);
            ColumnFamilyDescriptor::new(cf.name(), cf_opts)
        });
        let db = Arc::new(DB::open_cf_descriptors(&db_opts, path, descriptors)?);
        let stats = Arc::new(StoreStats::default());
        let (tx, rx) = mpsc::channel(GROUP_BATCHES_MAX * 4);
        let writer_thread = {
            let db = db.clone();
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("cadre-commit".into())
                .spawn(move || group_commit_writer(db, rx, stats))
                .map_err(StoreError::WriterThread)?
        };
        let store = Store {
            inner: Arc::new(Inner {
                db,
                path: path.to_path_buf(),
                writer: Some(tx),
                writer_thread: Some(writer_thread),
                stats,
            }),
        };
        store.check_schema()?;
        Ok(store)
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        match self.get::<u32>(Cf::Meta, META_SCHEMA_KEY)? {
            Some(found) if found > SCHEMA_VERSION => Err(StoreError::TooNew {
                path: self.inner.path.clone(),
                found,
            }),
            Some(found) if found == SCHEMA_VERSION => Ok(()),
            // Older or absent: migrate. Version 1 is the first schema, so the only
            // migration is stamping it.
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
        let (done, wait) = oneshot::channel();
        let writer = self.inner.writer.as_ref().ok_or(StoreError::WriterGone)?;
        writer
            .send(CommitRequest { batch, done })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(StoreError::Commit(message)),
            Err(_) => Err(StoreError::WriterGone),
        }
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
        let db = &self.inner.db;
        let mut wb = WriteBatch::default();
        apply(db, &mut wb, batch);
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

    /// All keys of a column family (used for small index families such as `active`).
    pub fn keys(&self, cf: Cf) -> Result<Vec<Vec<u8>>, StoreError> {
        let db = &self.inner.db;
        let mut out = Vec::new();
        for item in db.iterator_cf(handle(db, cf), IteratorMode::Start) {
            out.push(item?.0.into_vec());
        }
        Ok(out)
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

fn apply(db: &DB, wb: &mut WriteBatch, batch: Batch) {
    for op in batch.ops {
        match op {
            Op::Put { cf, key, value } => wb.put_cf(handle(db, cf), key, value),
            Op::Delete { cf, key } => wb.delete_cf(handle(db, cf), key),
        }
    }
}

/// Drains every pending commit into one `WriteBatch`, syncs once, then releases all
/// waiters. One thread, so fsyncs never queue behind each other inside RocksDB.
fn group_commit_writer(db: Arc<DB>, mut rx: mpsc::Receiver<CommitRequest>, stats: Arc<StoreStats>) {
    let mut waiters = Vec::with_capacity(GROUP_BATCHES_MAX);
    while let Some(first) = rx.blocking_recv() {
        let mut wb = WriteBatch::default();
        apply(&db, &mut wb, first.batch);
        waiters.push(first.done);
        while waiters.len() < GROUP_BATCHES_MAX {
            match rx.try_recv() {
                Ok(next) => {
                    apply(&db, &mut wb, next.batch);
                    waiters.push(next.done);
                }
                Err(_) => break,
            }
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        let started = Instant::now();
        let result = db.write_opt(wb, &opts).map_err(|e| e.to_string());
        stats
            .sync_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        for done in waiters.drain(..) {
            // A waiter that went away (its task stopped) needs no answer.
            let _ = done.send(result.clone());
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
}
