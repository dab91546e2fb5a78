//! The one place that knows how records are encoded on disk.
//!
//! Layout of every stored value: `[format: u8][postcard payload][crc32 (LE): u32]`.
//! postcard is compact, serde-native and maintained (bincode is unmaintained,
//! RUSTSEC-2025-0141). The checksum catches a torn or flipped value when it is read
//! back, before a corrupt record can drive a task. The format byte lets a later schema
//! decode old records during migration.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Format byte written in front of every record.
pub const RECORD_FORMAT: u8 = 1;
const CRC_LEN: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("record is {0} bytes, shorter than its header and checksum")]
    Truncated(usize),
    #[error("record format {found} is unknown (this binary reads format {RECORD_FORMAT})")]
    UnknownFormat { found: u8 },
    #[error("checksum mismatch: stored {stored:08x}, computed {computed:08x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("postcard: {0}")]
    Postcard(String),
}

thread_local! {
    /// Where records are serialised before being copied out at their exact size. A task's
    /// record (a few KiB, written whole at every transition) grown from a small vector
    /// would be reallocated and copied five or six times.
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Past this size the scratch buffer is not kept: one huge record must not pin its
/// memory on every thread that ever encoded one.
const SCRATCH_KEEP_MAX: usize = 64 << 10;

/// Serialises `value` after `header` in the thread's scratch buffer, and returns
/// `finish` of the bytes.
fn with_scratch<T: Serialize + ?Sized, R>(
    header: &[u8],
    value: &T,
    finish: impl FnOnce(&[u8]) -> R,
) -> Result<R, CodecError> {
    let mut scratch = SCRATCH.take();
    scratch.clear();
    scratch.extend_from_slice(header);
    let scratch = match postcard::to_extend(value, scratch) {
        Ok(v) => v,
        // The vector went with the error; the next call starts a new one.
        Err(e) => return Err(CodecError::Postcard(e.to_string())),
    };
    let out = finish(&scratch);
    if scratch.capacity() <= SCRATCH_KEEP_MAX {
        SCRATCH.set(scratch);
    }
    Ok(out)
}

/// Encodes `value` as a checksummed record.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    with_scratch(&[RECORD_FORMAT], value, |body| {
        let mut out = Vec::with_capacity(body.len() + CRC_LEN);
        out.extend_from_slice(body);
        out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        out
    })
}

/// Decodes a record written by [`encode`], checking format and checksum first.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() < 1 + CRC_LEN {
        return Err(CodecError::Truncated(bytes.len()));
    }
    let (body, crc_bytes) = bytes.split_at(bytes.len() - CRC_LEN);
    let stored = u32::from_le_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(CodecError::Checksum { stored, computed });
    }
    if body[0] != RECORD_FORMAT {
        return Err(CodecError::UnknownFormat { found: body[0] });
    }
    postcard::from_bytes(&body[1..]).map_err(|e| CodecError::Postcard(e.to_string()))
}

/// Plain postcard for internal wire hops (no checksum: NATS frames are already checked).
pub fn to_wire<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    with_scratch(&[], value, <[u8]>::to_vec)
}

/// Decodes what [`to_wire`] wrote; `T` may borrow its strings from `bytes`.
pub fn from_wire<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, CodecError> {
    postcard::from_bytes(bytes).map_err(|e| CodecError::Postcard(e.to_string()))
}

/// Lower-case hex of `bytes`, as `hex::encode` writes it but without its char-by-char
/// collect: the audit publisher writes two hashes per record. The digits go into a
/// byte buffer of the final size (`String::push` encodes each as UTF-8 and checks the
/// capacity every time), then become the string after a UTF-8 check.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = vec![0u8; bytes.len() * 2];
    for (pair, b) in hex.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
    // Hex digits are ASCII: the check always passes (no panic path).
    String::from_utf8(hex).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        id: String,
        n: u64,
        items: Vec<Option<i32>>,
        text: String,
    }

    fn sample() -> Sample {
        Sample {
            id: "01JTASK".into(),
            n: u64::MAX,
            items: vec![Some(-1), None, Some(7)],
            text: "{\"json\": [1, 2]}".into(),
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(bytes[0], RECORD_FORMAT);
        assert_eq!(decode::<Sample>(&bytes).unwrap(), sample());
    }

    #[test]
    fn records_encoded_one_after_another_on_a_thread_stay_independent() {
        let sized = |len: usize| Sample {
            text: "x".repeat(len),
            ..sample()
        };
        // Large (not kept), medium (kept), then smaller ones reuse the scratch buffer.
        for len in [SCRATCH_KEEP_MAX * 2, 5_000, 3, 0, 40_000, 1] {
            let record = encode(&sized(len)).unwrap();
            assert_eq!(
                decode::<Sample>(&record).unwrap(),
                sized(len),
                "record of {len}"
            );
            let wire = to_wire(&sized(len)).unwrap();
            assert_eq!(
                from_wire::<Sample>(&wire).unwrap(),
                sized(len),
                "wire of {len}"
            );
            assert_eq!(wire.len() + 1 + CRC_LEN, record.len());
        }
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        let bytes = encode(&sample()).unwrap();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                flipped[i] ^= 1 << bit;
                assert!(
                    decode::<Sample>(&flipped).is_err(),
                    "flip at byte {i} bit {bit} undetected"
                );
            }
        }
    }

    #[test]
    fn truncated_and_unknown_format() {
        assert_eq!(decode::<Sample>(&[1, 2]), Err(CodecError::Truncated(2)));
        let mut body = vec![9u8, 0];
        let crc = crc32fast::hash(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode::<Sample>(&body),
            Err(CodecError::UnknownFormat { found: 9 })
        );
    }

    #[test]
    fn wire_round_trip() {
        let bytes = to_wire(&sample()).unwrap();
        assert_eq!(from_wire::<Sample>(&bytes).unwrap(), sample());
        assert!(from_wire::<Sample>(b"\xff\xff").is_err());
    }

    #[test]
    fn to_hex_writes_what_hex_encode_writes() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(to_hex(&bytes), hex::encode(&bytes));
        assert_eq!(to_hex(&[]), "");
    }
}
