//! Redaction by rule: what may leave the task's own record (audit records, events,
//! logs, traces) has its secrets masked first.
//!
//! The rules, all case-insensitive:
//! - an object key that names a credential (`password`, `secret`, `token`, `api_key`,
//!   `authorization`, `cookie`, `private_key`, `credential`, `session`, …, also as part
//!   of a longer key such as `x-api-key` or `client_secret`) has its value replaced;
//! - in text and in URLs, `user:password@` userinfo, `Bearer <token>`/`Basic <creds>`,
//!   and `key=value` / `key: value` pairs whose key names a credential are masked.
//!
//! A value is redacted whole, so its length does not leak either.

use std::sync::LazyLock;

use aho_corasick::AhoCorasick;
use serde_json::Value;

pub const MASK: &str = "[redacted]";

/// Parts of a key that make its value a secret.
const SECRET_KEY_PARTS: &[&str] = &[
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "api_key",
    "api-key",
    "authorization",
    "auth_header",
    "cookie",
    "private_key",
    "privatekey",
    "credential",
    "session",
    "signature",
];

/// Text that may hold a secret: a URL (userinfo), an HTTP auth scheme, or a key part.
const TEXT_TRIGGERS: &[&str] = &["://", "bearer ", "basic "];

/// Finds any of `parts`, ASCII case-insensitively, in one pass over a text and without
/// lowercasing a copy of it first (every event detail and audited param goes through).
fn matcher(parts: &[&[&str]]) -> AhoCorasick {
    AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build(parts.iter().flat_map(|p| p.iter()))
        .expect("a few short fixed patterns always build")
}

static SECRET_KEY: LazyLock<AhoCorasick> = LazyLock::new(|| matcher(&[SECRET_KEY_PARTS]));
static MIGHT_HOLD_SECRET: LazyLock<AhoCorasick> =
    LazyLock::new(|| matcher(&[TEXT_TRIGGERS, SECRET_KEY_PARTS]));

/// Does a key (object key, header name, query parameter) name a secret?
pub fn is_secret_key(key: &str) -> bool {
    SECRET_KEY.is_match(key)
}

/// A copy of `value` with every secret masked: values under secret keys, and secrets
/// inside strings (URLs with credentials, bearer tokens, `token=…`).
pub fn value(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, x)| {
                    let x = if is_secret_key(k) && !x.is_null() {
                        Value::String(MASK.into())
                    } else {
                        value(x)
                    };
                    (k.clone(), x)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(value).collect()),
        Value::String(s) => Value::String(text(s)),
        other => other.clone(),
    }
}

/// `text` with secrets masked: URL userinfo passwords, `Bearer`/`Basic` credentials,
/// and `key=value` / `key: value` / `"key": "value"` pairs whose key names a secret.
pub fn text(s: &str) -> String {
    masked(s).unwrap_or_else(|| s.to_string())
}

/// [`text`], only where it masks something: `None` leaves `s` as it is, without a copy
/// (most text holds nothing like a secret and is only scanned once).
pub fn masked(s: &str) -> Option<String> {
    if !might_hold_secret(s) {
        return None;
    }
    let out = mask_userinfo(s);
    let out = mask_after_scheme(&out, "bearer ");
    let out = mask_after_scheme(&out, "basic ");
    let out = mask_pairs(&out);
    (out != s).then_some(out)
}

/// Cheap pre-check so the common case (no secret-looking text) allocates once. False
/// means neither [`text`] nor, on JSON text, [`value`] would mask anything in `s`: the
/// checked parts include every key part.
pub fn might_hold_secret(s: &str) -> bool {
    MIGHT_HOLD_SECRET.is_match(s)
}

fn is_value_char(c: char) -> bool {
    !(c.is_whitespace() || matches!(c, '&' | ',' | ';' | '"' | '\'' | '}' | ')' | ']' | '>'))
}

/// `scheme://user:password@host` → `scheme://user:[redacted]@host`.
fn mask_userinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || !is_value_char(c))
            .unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..=colon]);
                        out.push_str(MASK);
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    out
}

/// `Bearer abc.def` → `Bearer [redacted]` (case-insensitive scheme).
fn mask_after_scheme(s: &str, scheme: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let mut out = String::with_capacity(s.len());
    let mut pos = 0;
    while let Some(found) = lower[pos..].find(scheme) {
        let start = pos + found + scheme.len();
        out.push_str(&s[pos..start]);
        let end = s[start..]
            .find(|c: char| !is_value_char(c))
            .map_or(s.len(), |e| start + e);
        if end > start {
            out.push_str(MASK);
        }
        pos = end;
    }
    out.push_str(&s[pos..]);
    out
}

/// `token=abc`, `api_key: abc`, `"password":"abc"` → the value masked.
fn mask_pairs(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'=' || c == b':' {
            // The key: the run of key characters before the separator (past one quote).
            let mut key_end = i;
            while key_end > 0 && bytes[key_end - 1] == b' ' {
                key_end -= 1;
            }
            if key_end > 0 && bytes[key_end - 1] == b'"' {
                key_end -= 1;
            }
            let mut key_start = key_end;
            while key_start > 0
                && (bytes[key_start - 1].is_ascii_alphanumeric()
                    || matches!(bytes[key_start - 1], b'_' | b'-' | b'.'))
            {
                key_start -= 1;
            }
            if key_start < key_end && is_secret_key(&s[key_start..key_end]) {
                // The value: skip spaces and one opening quote, then a run of value chars.
                let mut v = i + 1;
                while v < bytes.len() && bytes[v] == b' ' {
                    v += 1;
                }
                let quoted = v < bytes.len() && bytes[v] == b'"';
                if quoted {
                    v += 1;
                }
                let run_end = |from: usize| {
                    s[from..]
                        .find(|c: char| !is_value_char(c))
                        .map_or(s.len(), |e| from + e)
                };
                let end = if quoted {
                    s[v..].find('"').map_or(s.len(), |e| v + e)
                } else {
                    let end = run_end(v);
                    // `Authorization: Bearer x`: the scheme and its credential are one value.
                    let word = s[v..end].to_ascii_lowercase();
                    if (word == "bearer" || word == "basic") && s[end..].starts_with(' ') {
                        let next = end + 1;
                        if s[next..].starts_with(MASK) {
                            next + MASK.len()
                        } else {
                            run_end(next)
                        }
                    } else {
                        end
                    }
                };
                // `://` after a key is a URL, handled by mask_userinfo.
                let is_url = s[i..].starts_with("://");
                if end > v && !is_url && !s[v..end].starts_with(MASK) {
                    out.push_str(&s[copied..v]);
                    out.push_str(MASK);
                    copied = end;
                    i = end;
                    continue;
                }
            }
        }
        i += 1;
    }
    out.push_str(&s[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn masked_is_some_only_where_something_was_masked() {
        assert_eq!(masked("HTTP 503 from https://crm.test/clients"), None);
        // Passes the pre-check (a secret key's name) but holds no value to mask.
        assert!(might_hold_secret("token expired"));
        assert_eq!(masked("token expired"), None);
        assert_eq!(
            masked("401: Authorization: Bearer s3cr3t").as_deref(),
            Some(text("401: Authorization: Bearer s3cr3t").as_str())
        );
        assert!(!text("401: Authorization: Bearer s3cr3t").contains("s3cr3t"));
    }

    #[test]
    fn secret_keys_are_masked_at_any_depth() {
        let v = json!({
            "url": "https://crm.test/clients",
            "headers": {"Authorization": "Bearer s3cr3t", "X-Api-Key": "k-123", "Accept": "json"},
            "json": {"name": "Acme", "client_secret": "cs-9", "nested": [{"password": "p"}]},
            "token": null
        });
        let r = value(&v);
        let text = r.to_string();
        for secret in ["s3cr3t", "k-123", "cs-9", "\"p\""] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert_eq!(r["headers"]["Accept"], "json");
        assert_eq!(r["json"]["name"], "Acme");
        assert_eq!(r["token"], Value::Null, "absent secrets stay absent");
    }

    /// The one-pass matchers answer as lowercasing a copy and searching it for each part.
    #[test]
    fn matchers_agree_with_lowercase_and_contains() {
        let by_contains = |s: &str, parts: &[&str]| {
            let lower = s.to_ascii_lowercase();
            parts.iter().any(|p| lower.contains(p))
        };
        let texts = [
            "",
            "plain words",
            "X-API-KEY",
            "Client_Secret",
            "PaSsWoRd=1",
            "https://a.b/c",
            "HTTP:/ not a url",
            "Authorization: BEARER x",
            "basic",
            "BASIC abc",
            "tok en",
            "my-sessionid",
            "ﬁle Šecret é",
            "signaturé",
            "api_ke y apikey",
            r##"{"path":"/srv/acme/README.md","content":"# Acme"}"##,
        ];
        let triggers: Vec<&str> = TEXT_TRIGGERS
            .iter()
            .chain(SECRET_KEY_PARTS)
            .copied()
            .collect();
        for t in texts {
            assert_eq!(
                is_secret_key(t),
                by_contains(t, SECRET_KEY_PARTS),
                "key {t:?}"
            );
            assert_eq!(
                might_hold_secret(t),
                by_contains(t, &triggers),
                "text {t:?}"
            );
        }
    }

    #[test]
    fn secrets_inside_text_are_masked() {
        let cases = [
            (
                "POST https://bob:hunter2@crm.test/x?token=abc&page=2 failed",
                "POST https://bob:[redacted]@crm.test/x?token=[redacted]&page=2 failed",
            ),
            (
                "Authorization: Bearer eyJhbGci.x.y",
                "Authorization: [redacted]",
            ),
            ("got bearer abc123 back", "got bearer [redacted] back"),
            (
                r#"{"api_key":"zzz","n":1}"#,
                r#"{"api_key":"[redacted]","n":1}"#,
            ),
            ("password = hunter2; ok", "password = [redacted]; ok"),
            ("no secrets here: 12:30", "no secrets here: 12:30"),
            ("session_id=77 user=bob", "session_id=[redacted] user=bob"),
        ];
        for (input, want) in cases {
            assert_eq!(text(input), want, "input: {input}");
        }
    }
}
