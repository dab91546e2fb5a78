//! The full-text index over current facts: tantivy (BM25), on disk under the data
//! directory. Derived data: RocksDB holds the facts, and the index is rebuilt from it
//! whenever the two disagree (the commit payload records the stream sequence the index
//! holds).

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tantivy::collector::TopDocs;
use tantivy::directory::MmapDirectory;
use tantivy::query::QueryParser;
use tantivy::schema::{
    Field, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing, TextOptions, Value,
};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use super::IndexChange;

/// The writer's memory arena: one thread (the machine has two cores, shared).
const WRITER_ARENA_BYTES: usize = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("memory index: {0}")]
    Tantivy(#[from] tantivy::TantivyError),
    #[error("memory index directory {path}: {message}")]
    Directory { path: String, message: String },
}

pub struct MemoryIndex {
    index: Index,
    reader: IndexReader,
    writer: Mutex<IndexWriter>,
    id: Field,
    topic: Field,
    text: Field,
    parser: QueryParser,
    /// Changes added since the last commit.
    dirty: AtomicBool,
    /// The stream sequence the added changes reach.
    seq: AtomicU64,
}

fn schema() -> Schema {
    let mut b = Schema::builder();
    b.add_text_field("id", STRING | STORED);
    let stemmed = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer("en_stem")
            .set_index_option(IndexRecordOption::WithFreqsAndPositions),
    );
    // Topics are dotted (`client.acme.contact`): the tokenizer splits them into words.
    b.add_text_field("topic", stemmed.clone());
    b.add_text_field("text", stemmed);
    b.build()
}

impl MemoryIndex {
    /// Opens (creating) the index in `dir`, in RAM when `dir` is `None`.
    pub fn open(dir: Option<&Path>) -> Result<MemoryIndex, IndexError> {
        let schema = schema();
        let index = match dir {
            Some(dir) => {
                let fail = |message: String| IndexError::Directory {
                    path: dir.display().to_string(),
                    message,
                };
                std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
                let mmap = MmapDirectory::open(dir).map_err(|e| fail(e.to_string()))?;
                match Index::open_or_create(mmap, schema.clone()) {
                    Ok(index) => index,
                    // A schema from another version, or a torn index: it is derived
                    // data, so start again and let the caller rebuild it.
                    Err(_) => {
                        std::fs::remove_dir_all(dir).map_err(|e| fail(e.to_string()))?;
                        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
                        Index::create_in_dir(dir, schema.clone())?
                    }
                }
            }
            None => Index::create_in_ram(schema.clone()),
        };
        let field = |name: &str| schema.get_field(name);
        let (id, topic, text) = (field("id")?, field("topic")?, field("text")?);
        let writer = index.writer_with_num_threads(1, WRITER_ARENA_BYTES)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        let mut parser = QueryParser::for_index(&index, vec![topic, text]);
        // A word in the topic says more than the same word in the prose.
        parser.set_field_boost(topic, 1.5);
        let seq = index
            .load_metas()?
            .payload
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        Ok(MemoryIndex {
            index,
            reader,
            writer: Mutex::new(writer),
            id,
            topic,
            text,
            parser,
            dirty: AtomicBool::new(false),
            seq: AtomicU64::new(seq),
        })
    }

    /// The stream sequence the index holds (committed or not).
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IndexWriter> {
        match self.writer.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Follows the changes of the message at `seq`.
    pub fn apply(&self, changes: &[IndexChange], seq: u64) -> Result<(), IndexError> {
        let writer = self.lock();
        for change in changes {
            match change {
                IndexChange::Upsert { id, topic, text } => {
                    writer.delete_term(Term::from_field_text(self.id, id));
                    let mut doc = TantivyDocument::default();
                    doc.add_text(self.id, id);
                    doc.add_text(self.topic, topic);
                    doc.add_text(self.text, text);
                    writer.add_document(doc)?;
                }
                IndexChange::Remove { id } => {
                    writer.delete_term(Term::from_field_text(self.id, id));
                }
            }
        }
        self.seq.store(seq, Ordering::Release);
        if !changes.is_empty() {
            self.dirty.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Drops everything, then indexes what `fill` adds, as of `seq`.
    pub fn rebuild(
        &self,
        seq: u64,
        fill: impl FnOnce(&mut dyn FnMut(IndexChange)) -> Result<(), IndexError>,
    ) -> Result<usize, IndexError> {
        let mut writer = self.lock();
        writer.delete_all_documents()?;
        let mut n = 0;
        let mut error = None;
        fill(&mut |change| {
            if let IndexChange::Upsert { id, topic, text } = change {
                let mut doc = TantivyDocument::default();
                doc.add_text(self.id, &id);
                doc.add_text(self.topic, &topic);
                doc.add_text(self.text, &text);
                match writer.add_document(doc) {
                    Ok(_) => n += 1,
                    Err(e) => error = Some(e),
                }
            }
        })?;
        if let Some(e) = error {
            return Err(e.into());
        }
        self.seq.store(seq, Ordering::Release);
        commit_locked(&mut writer, seq)?;
        self.dirty.store(false, Ordering::Release);
        self.reader.reload()?;
        Ok(n)
    }

    /// Makes added changes searchable (and durable), if there are any.
    /// Under the writer's lock even when nothing is pending: a search must not read
    /// while another caller's commit is still on its way to the reader.
    pub fn commit(&self) -> Result<(), IndexError> {
        let mut writer = self.lock();
        if self.dirty.swap(false, Ordering::AcqRel) {
            commit_locked(&mut writer, self.seq())?;
            self.reader.reload()?;
        }
        Ok(())
    }

    /// The sequence the last commit recorded (what a restart finds).
    pub fn committed_seq(&self) -> Result<u64, IndexError> {
        Ok(self
            .index
            .load_metas()?
            .payload
            .and_then(|p| p.parse().ok())
            .unwrap_or(0))
    }

    /// The `n` best matches of `query` by BM25: `(score, fact id)`. Query syntax is
    /// lenient: words, `"phrases"`, `-exclusions`; what does not parse is ignored.
    pub fn search(&self, query: &str, n: usize) -> Result<Vec<(f32, String)>, IndexError> {
        self.commit()?;
        let (query, _ignored) = self.parser.parse_query_lenient(query);
        let searcher = self.reader.searcher();
        let top = searcher.search(&query, &TopDocs::with_limit(n).order_by_score())?;
        let mut out = Vec::with_capacity(top.len());
        for (score, address) in top {
            let doc: TantivyDocument = searcher.doc(address)?;
            if let Some(id) = doc.get_first(self.id).and_then(|v| v.as_str()) {
                out.push((score, id.to_string()));
            }
        }
        Ok(out)
    }

    /// Documents searchable now.
    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn commit_locked(writer: &mut IndexWriter, seq: u64) -> Result<(), IndexError> {
    let mut prepared = writer.prepare_commit()?;
    prepared.set_payload(&seq.to_string());
    prepared.commit()?;
    Ok(())
}
