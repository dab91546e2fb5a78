//! JSON written by hand, byte for byte as `serde_json` writes it, for the documents the
//! node writes many times per task: the audit log's entries (`audit::LinkEntry`, 18 per
//! task) and the task events (`TaskEvent::to_json`, 14 per task). `serde_json` makes a
//! call per field and scans every byte of every string and field name for escapes; here
//! field names are literals and strings are scanned a 64-bit word at a time. Each
//! writer is tested against `serde_json` on full, sparse and odd values.

use serde::Serialize;

/// `name` (the literal `,"field":`) and `value` as a JSON string, if there is a value:
/// what `serde_json` writes for an `Option` skipped when `None`.
pub fn field_str(out: &mut Vec<u8>, name: &[u8], value: Option<&str>) {
    if let Some(value) = value {
        out.extend_from_slice(name);
        string(out, value);
    }
}

/// `name` and `value` as a JSON number, if there is a value (see [`field_str`]).
pub fn field_num(out: &mut Vec<u8>, name: &[u8], value: Option<impl Serialize>) {
    if let Some(value) = value {
        out.extend_from_slice(name);
        number(out, value);
    }
}

/// A number as `serde_json` writes it (`null` for a float that is not finite).
pub fn number(out: &mut Vec<u8>, n: impl Serialize) {
    // Writing a number into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &n);
}

/// `s` as a JSON string, escaped as `serde_json` escapes: `"` and `\`, the control
/// characters (`\b \t \n \f \r`, the others as `\u00xx`), nothing else. Runs of 8
/// bytes with none of those are copied without looking at each byte.
pub fn string(out: &mut Vec<u8>, s: &str) {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // Does any byte of the word equal 0 / fall below 0x20? (The has-zero and has-less-than
    // word tricks: exact as a yes or no for the word, which is all the skip needs.)
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS != 0;
    let has_control = |v: u64| v.wrapping_sub(ONES * 0x20) & !v & HIGHS != 0;
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(word) = bytes.get(i..i + 8) {
            let v = u64::from_ne_bytes(word.try_into().unwrap_or_default());
            if !(has_control(v)
                || has_zero(v ^ (ONES * u64::from(b'"')))
                || has_zero(v ^ (ONES * u64::from(b'\\'))))
            {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        if b == b'"' || b == b'\\' || b < 0x20 {
            out.extend_from_slice(&bytes[copied..i]);
            escape(out, b);
            copied = i + 1;
        }
        i += 1;
    }
    out.extend_from_slice(&bytes[copied..]);
    out.push(b'"');
}

/// The escape of a byte [`string`] must escape, as `serde_json` writes it.
fn escape(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x09 => out.extend_from_slice(b"\\t"),
        0x0a => out.extend_from_slice(b"\\n"),
        0x0c => out.extend_from_slice(b"\\f"),
        0x0d => out.extend_from_slice(b"\\r"),
        _ => {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0x0f)]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Strings of random bytes from the ones that matter (controls, quotes, backslashes,
    /// ASCII, multi-byte characters), at random lengths: escaped as serde_json escapes.
    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        use rand::{Rng, SeedableRng};
        let seed = crate::test_seed(0x5eed_0a0d);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let alphabet = [
            'a', 'Z', '0', ' ', '"', '\\', '/', '\u{0}', '\u{8}', '\t', '\n', '\u{c}', '\r',
            '\u{1f}', '\u{7f}', 'é', '—', '😀', '\u{2028}',
        ];
        for _ in 0..2000 {
            let len = rng.random_range(0..40);
            let s: String = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            let mut ours = Vec::new();
            string(&mut ours, &s);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&s).unwrap(),
                "seed {seed}: {s:?}"
            );
        }
    }
}
