//! The audit chain: an append-only, hash-chained log in the `audit` column family.
//!
//! This module knows links and bytes, not what an audit record means: a caller hands
//! [`crate::Batch::append_audit`] an encoded payload and, optionally, an index key (a
//! task id) under which the link can be found again. The group-commit writer — one
//! thread, so chain order is commit order — gives each link its sequence number and the
//! hash of the link before it, inside the same synced `WriteBatch` as the transition
//! that caused it. Nothing can be audited that was not committed, and the reverse.
//!
//! `hash(n) = sha256("cadre-audit-v1" ‖ seq(n) as u64 BE ‖ hash(n-1) ‖ payload(n))`; the
//! first link's `prev_hash` is 32 zero bytes. Changing any byte of a link, removing one
//! or reordering them breaks the chain at that link, and [`verify`] names it. Cutting
//! the tail off is not detectable from the chain alone; that is why links are also
//! published for central collection (`cadre.audit.<node_id>`).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::codec;

const DOMAIN: &[u8] = b"cadre-audit-v1";
pub const ZERO_HASH: [u8; 32] = [0; 32];

/// One link of the chain, as stored.
/// (Byte fields are encoded as byte strings, one copy, not element by element.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub seq: u64,
    #[serde(with = "serde_bytes")]
    pub prev_hash: [u8; 32],
    #[serde(with = "serde_bytes")]
    pub hash: [u8; 32],
    /// The caller's record, encoded by the caller.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl Link {
    /// The hash this link must carry, given its content.
    pub fn expected_hash(&self) -> [u8; 32] {
        hash_of(self.seq, &self.prev_hash, &self.payload)
    }
}

/// The last link written: where the next one attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: [u8; 32],
}

impl Head {
    pub const EMPTY: Head = Head {
        seq: 0,
        hash: ZERO_HASH,
    };

    /// The next link after this head; advances the head.
    pub fn append(&mut self, payload: Vec<u8>) -> Link {
        let seq = self.seq + 1;
        let hash = hash_of(seq, &self.hash, &payload);
        let link = Link {
            seq,
            prev_hash: self.hash,
            hash,
            payload,
        };
        *self = Head { seq, hash };
        link
    }
}

fn hash_of(seq: u64, prev: &[u8; 32], payload: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(seq.to_be_bytes());
    h.update(prev);
    h.update(payload);
    h.finalize().into()
}

/// Key of link `seq` in the `audit` family.
pub fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// Key of a run of links under `index` in the `audit_index` family:
/// `<index>/<first seq BE>`; its value is the run's length. One commit's links for
/// one index are consecutive, so a commit writes one index key, not one per link.
pub fn index_key(index: &[u8], seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(index.len() + 9);
    k.extend_from_slice(index);
    k.push(b'/');
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// What walking the chain found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainReport {
    /// Links examined (up to and including a broken one).
    pub links: u64,
    /// The last good link.
    pub head_seq: u64,
    pub head_hash: String,
    /// The first link that does not hold, if any.
    pub broken: Option<Broken>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Broken {
    /// The sequence number the chain expected at this point.
    pub seq: u64,
    pub reason: String,
}

/// Walks `(key, raw value)` pairs in key order and reports the first link that breaks
/// the chain: undecodable, out of sequence, not pointing at its predecessor, or not
/// matching its own hash.
pub fn verify(links: impl Iterator<Item = (Vec<u8>, Vec<u8>)>) -> ChainReport {
    let mut head = Head::EMPTY;
    let mut examined = 0u64;
    let report = |head: Head, links: u64, broken: Option<Broken>| ChainReport {
        links,
        head_seq: head.seq,
        head_hash: hex::encode(head.hash),
        broken,
    };
    for (k, raw) in links {
        examined += 1;
        let expected = head.seq + 1;
        let broken = |reason: String| {
            Some(Broken {
                seq: expected,
                reason,
            })
        };
        let key_seq =
            (k.len() == 8).then(|| u64::from_be_bytes(k[..8].try_into().unwrap_or_default()));
        if key_seq != Some(expected) {
            let found = key_seq.map_or_else(
                || format!("a malformed key {k:?}"),
                |s| format!("record {s}"),
            );
            return report(
                head,
                examined,
                broken(format!("record {expected} is missing: found {found} next")),
            );
        }
        let link: Link = match codec::decode(&raw) {
            Ok(l) => l,
            Err(e) => {
                return report(
                    head,
                    examined,
                    broken(format!("record {expected} cannot be read: {e}")),
                );
            }
        };
        if link.seq != expected {
            return report(
                head,
                examined,
                broken(format!("record {expected} says it is record {}", link.seq)),
            );
        }
        if link.prev_hash != head.hash {
            return report(
                head,
                examined,
                broken(format!(
                    "record {expected} does not point at record {}: prev_hash {} ≠ {}",
                    head.seq,
                    hex::encode(link.prev_hash),
                    hex::encode(head.hash)
                )),
            );
        }
        if link.expected_hash() != link.hash {
            return report(
                head,
                examined,
                broken(format!(
                    "record {expected} was altered: its content hashes to {}, it carries {}",
                    hex::encode(link.expected_hash()),
                    hex::encode(link.hash)
                )),
            );
        }
        head = Head {
            seq: link.seq,
            hash: link.hash,
        };
    }
    report(head, examined, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut head = Head::EMPTY;
        (1..=n)
            .map(|i| {
                let link = head.append(format!("record {i}").into_bytes());
                (key(link.seq).to_vec(), codec::encode(&link).unwrap())
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies() {
        let r = verify(chain(5).into_iter());
        assert_eq!(r.broken, None);
        assert_eq!((r.links, r.head_seq), (5, 5));
        assert_eq!(verify(std::iter::empty()).head_seq, 0);
    }

    #[test]
    fn a_consistently_rewritten_record_is_named() {
        let mut links = chain(5);
        // Rewrite record 3's payload and re-encode it with a valid checksum: only the
        // chain can tell.
        let mut link: Link = codec::decode(&links[2].1).unwrap();
        link.payload[0] ^= 1;
        links[2].1 = codec::encode(&link).unwrap();
        let r = verify(links.into_iter());
        let broken = r.broken.unwrap();
        assert_eq!(broken.seq, 3);
        assert!(broken.reason.contains("altered"), "{}", broken.reason);
        assert_eq!(r.head_seq, 2);
    }

    #[test]
    fn a_rehashed_record_breaks_the_next_link() {
        let mut links = chain(5);
        let mut link: Link = codec::decode(&links[2].1).unwrap();
        link.payload[0] ^= 1;
        link.hash = link.expected_hash();
        links[2].1 = codec::encode(&link).unwrap();
        let broken = verify(links.into_iter()).broken.unwrap();
        assert_eq!(broken.seq, 4, "{}", broken.reason);
        assert!(broken.reason.contains("does not point at record 3"));
    }

    #[test]
    fn a_flipped_byte_a_gap_and_a_reorder_are_named() {
        let mut links = chain(5);
        let mid = links[1].1.len() / 2;
        links[1].1[mid] ^= 0x20;
        let b = verify(links.into_iter()).broken.unwrap();
        assert_eq!(b.seq, 2);
        assert!(b.reason.contains("cannot be read"), "{}", b.reason);

        let mut links = chain(5);
        links.remove(3);
        let b = verify(links.into_iter()).broken.unwrap();
        assert_eq!(b.seq, 4);
        assert!(b.reason.contains("missing"), "{}", b.reason);

        let mut links = chain(5);
        let moved = links[1].1.clone();
        links[1].1 = links[2].1.clone();
        links[2].1 = moved;
        assert_eq!(verify(links.into_iter()).broken.unwrap().seq, 2);
    }
}
