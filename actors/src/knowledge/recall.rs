//! Bounded retrieval: what the planner, the executors and `cadre.memory.search` get
//! from memory — never the full history.

use storage::Store;

use super::index::{IndexError, MemoryIndex};
use crate::protocol::knowledge::{
    FactView, MemorySearchReply, SEARCH_CHARS_DEFAULT, SEARCH_CHARS_MAX, SEARCH_TOP_K_DEFAULT,
    SEARCH_TOP_K_MAX,
};

/// A fact's recency weight halves every this many milliseconds since it was last
/// confirmed.
pub const RECENCY_HALF_LIFE_MS: f64 = 30.0 * 86_400_000.0;
/// BM25 candidates re-ranked per fact returned (recency and confidence can lift a
/// slightly weaker text match above a stale one).
const CANDIDATES_PER_RESULT: usize = 4;
const CANDIDATES_MIN: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum RecallError {
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Store(#[from] storage::StoreError),
}

/// The bounds of one retrieval, clamped to the protocol's maxima.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub top_k: usize,
    pub chars_max: usize,
}

impl Bounds {
    pub fn new(top_k: Option<usize>, chars_max: Option<usize>) -> Result<Bounds, String> {
        let top_k = top_k.unwrap_or(SEARCH_TOP_K_DEFAULT);
        let chars_max = chars_max.unwrap_or(SEARCH_CHARS_DEFAULT);
        if !(1..=SEARCH_TOP_K_MAX).contains(&top_k) {
            return Err(format!("top_k {top_k} must be 1 to {SEARCH_TOP_K_MAX}"));
        }
        if !(1..=SEARCH_CHARS_MAX).contains(&chars_max) {
            return Err(format!(
                "chars_max {chars_max} must be 1 to {SEARCH_CHARS_MAX}"
            ));
        }
        Ok(Bounds { top_k, chars_max })
    }
}

/// The rank of a match: BM25 × recency × confidence, each of the last two between ½
/// and 1 so that relevance leads.
pub fn score(bm25: f32, confidence: f64, last_confirmed_ms: u64, now_ms: u64) -> f64 {
    let age = now_ms.saturating_sub(last_confirmed_ms) as f64;
    let recency = 0.5f64.powf(age / RECENCY_HALF_LIFE_MS);
    f64::from(bm25) * (0.5 + 0.5 * recency) * (0.5 + 0.5 * confidence.clamp(0.0, 1.0))
}

/// Current facts matching `query`, best first, at most `top_k` and at most
/// `chars_max` characters of text in all. A fact that would cross the budget ends the
/// list (so the order stays the rank order).
pub fn search(
    store: &Store,
    index: &MemoryIndex,
    query: &str,
    bounds: Bounds,
    now_ms: u64,
) -> Result<MemorySearchReply, RecallError> {
    let pool = (bounds.top_k * CANDIDATES_PER_RESULT).max(CANDIDATES_MIN);
    let hits = index.search(query, pool)?;
    let mut ranked: Vec<FactView> = Vec::with_capacity(hits.len());
    for (bm25, id) in &hits {
        // Superseded facts leave the index when the stream says so; skip any the
        // index still holds between a change and its commit.
        if let Some(f) = super::fact(store, id)?
            && f.superseded_by.is_none()
        {
            let mut view = f.view(id);
            view.score = Some(score(*bm25, f.confidence, f.last_confirmed_ms, now_ms));
            ranked.push(view);
        }
    }
    ranked.sort_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.id.cmp(&b.id))
    });
    let matched = ranked.len();
    let mut facts = Vec::new();
    let mut chars = 0;
    for fact in ranked {
        let len = fact.text.chars().count();
        if facts.len() >= bounds.top_k || chars + len > bounds.chars_max {
            break;
        }
        chars += len;
        facts.push(fact);
    }
    Ok(MemorySearchReply {
        truncated: facts.len() < matched,
        facts,
        chars,
    })
}

/// The retrieval as templates read it (`recall.text`, `recall.facts.0.value`,
/// `recall.count`): one line per fact, best first.
pub fn to_template_value(reply: &MemorySearchReply) -> serde_json::Value {
    let text = reply
        .facts
        .iter()
        .map(|f| format!("- {}", f.text))
        .collect::<Vec<_>>()
        .join("\n");
    serde_json::json!({
        "text": text,
        "count": reply.facts.len(),
        "facts": reply.facts.iter().map(|f| serde_json::json!({
            "topic": f.topic,
            "text": f.text,
            "value": f.value,
            "confidence": f.confidence,
            "last_confirmed_ms": f.last_confirmed_ms,
        })).collect::<Vec<_>>(),
    })
}
