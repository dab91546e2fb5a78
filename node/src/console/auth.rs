//! Who may use the console, and proof that a POST came from the console's own page.
//!
//! - The credential is a password (or a long token: the same thing to the console)
//!   whose Argon2id hash is in the config; the password itself is never stored.
//! - A login opens a session: a random 256-bit id in an `HttpOnly`, `SameSite=Strict`
//!   cookie (`Secure` behind https), kept in memory by its SHA-256 (a node restart
//!   logs everyone out, which is the safe direction), with a lifetime.
//! - Every POST must carry the session's CSRF token in `X-Cadre-Csrf` (a cross-site
//!   page cannot read it) and, when the browser sends an `Origin`, come from the
//!   console's own origin. `SameSite=Strict` is the third wall.
//! - Failed logins are limited node-wide, so the hash cannot be guessed through the
//!   console faster than `LOGIN_FAILURES_MAX` per minute.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

pub const COOKIE: &str = "cadre_console";
pub const CSRF_HEADER: &str = "x-cadre-csrf";

/// Sessions kept at once; the oldest goes first when a login would exceed it.
const SESSIONS_MAX: usize = 32;
/// Failed logins allowed per window, node-wide.
const LOGIN_FAILURES_MAX: usize = 5;
const LOGIN_WINDOW: Duration = Duration::from_secs(60);

/// The hash of a new password, as `console_password_hash` takes it (Argon2id, the
/// crate's default parameters, a random salt).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Is this a hash the console can check a password against?
pub fn check_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| format!("not a PHC hash string: {e}"))?;
    if parsed.algorithm.as_str() != "argon2id" {
        return Err(format!(
            "the algorithm is `{}`; the console takes argon2id",
            parsed.algorithm
        ));
    }
    Ok(())
}

/// Checks a password against the hash (slow by design: run it off the async threads).
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

struct Session {
    csrf: String,
    expires_at: Instant,
    created_at: Instant,
}

/// What a request proved about itself.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No session, or an expired one: log in.
    Unauthenticated,
    /// A session, but the request did not come from the console's page.
    Forbidden(&'static str),
}

pub struct Sessions {
    ttl: Duration,
    by_hash: Mutex<HashMap<[u8; 32], Session>>,
    failures: Mutex<Vec<Instant>>,
}

/// A new session: the cookie's value and the page's CSRF token.
pub struct Opened {
    pub token: String,
    pub csrf: String,
}

impl Sessions {
    pub fn new(ttl: Duration) -> Sessions {
        Sessions {
            ttl,
            by_hash: Mutex::new(HashMap::new()),
            failures: Mutex::new(Vec::new()),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// `Some(wait)` while failed logins are over the limit.
    pub fn login_blocked(&self, now: Instant) -> Option<Duration> {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.retain(|at| now.duration_since(*at) < LOGIN_WINDOW);
        (failures.len() >= LOGIN_FAILURES_MAX)
            .then(|| LOGIN_WINDOW.saturating_sub(now.duration_since(failures[0])))
    }

    pub fn login_failed(&self, now: Instant) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(now);
    }

    pub fn open(&self, now: Instant) -> Opened {
        let token = hex::encode(rand::random::<[u8; 32]>());
        let csrf = hex::encode(rand::random::<[u8; 32]>());
        let mut sessions = self.by_hash.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|_, s| s.expires_at > now);
        while sessions.len() >= SESSIONS_MAX {
            let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.created_at)
                .map(|(k, _)| *k)
            else {
                break;
            };
            sessions.remove(&oldest);
        }
        sessions.insert(
            digest(&token),
            Session {
                csrf: csrf.clone(),
                expires_at: now + self.ttl,
                created_at: now,
            },
        );
        Opened { token, csrf }
    }

    pub fn close(&self, headers: &HeaderMap) {
        if let Some(token) = cookie(headers) {
            self.by_hash
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&digest(&token));
        }
    }

    /// The session's CSRF token, if the request carries a live session.
    pub fn session(&self, headers: &HeaderMap, now: Instant) -> Result<String, Refusal> {
        let token = cookie(headers).ok_or(Refusal::Unauthenticated)?;
        let sessions = self.by_hash.lock().unwrap_or_else(|p| p.into_inner());
        match sessions.get(&digest(&token)) {
            Some(s) if s.expires_at > now => Ok(s.csrf.clone()),
            _ => Err(Refusal::Unauthenticated),
        }
    }

    /// A state-changing request: a live session, its CSRF token, and our origin.
    pub fn check_post(
        &self,
        headers: &HeaderMap,
        expected_origin: &str,
        now: Instant,
    ) -> Result<(), Refusal> {
        let csrf = self.session(headers, now)?;
        check_origin(headers, expected_origin)?;
        let sent = headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or(Refusal::Forbidden("the X-Cadre-Csrf header is missing"))?;
        if !constant_time_eq(sent.as_bytes(), csrf.as_bytes()) {
            return Err(Refusal::Forbidden("the X-Cadre-Csrf token does not match"));
        }
        Ok(())
    }
}

/// A browser names the page a POST comes from in `Origin`; a request from another
/// site is refused. (Clients that send none still need the session and its token.)
pub fn check_origin(headers: &HeaderMap, expected: &str) -> Result<(), Refusal> {
    match headers.get("origin").map(|v| v.to_str()) {
        None => Ok(()),
        Some(Ok(origin)) if origin == expected => Ok(()),
        Some(_) => Err(Refusal::Forbidden("the request comes from another origin")),
    }
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    #[test]
    fn a_hash_checks_its_password_and_no_other() {
        let hash = hash_password("correct horse").expect("hash");
        assert!(check_hash(&hash).is_ok(), "{hash}");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_password(&hash, "correct horse"));
        assert!(!verify_password(&hash, "correct horse "));
        assert!(!verify_password("not a hash", "correct horse"));
        assert!(check_hash("plaintext").is_err());
        assert!(
            check_hash("$argon2i$v=19$m=16,t=2,p=1$c29tZXNhbHQ$M2Zf7Rf0CtqAKS5mTOmnKw")
                .unwrap_err()
                .contains("argon2id")
        );
    }

    #[test]
    fn a_post_needs_the_session_its_token_and_our_origin() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let now = Instant::now();
        let opened = sessions.open(now);
        let cookie = format!("other=1; {COOKIE}={}", opened.token);
        let origin = "http://127.0.0.1:9480";
        let ok = with(&[
            ("cookie", &cookie),
            ("x-cadre-csrf", &opened.csrf),
            ("origin", origin),
        ]);
        assert_eq!(sessions.check_post(&ok, origin, now), Ok(()));
        // No origin header (a script): the token suffices.
        let scripted = with(&[("cookie", &cookie), ("x-cadre-csrf", &opened.csrf)]);
        assert_eq!(sessions.check_post(&scripted, origin, now), Ok(()));
        let no_token = with(&[("cookie", &cookie), ("origin", origin)]);
        assert!(matches!(
            sessions.check_post(&no_token, origin, now),
            Err(Refusal::Forbidden(_))
        ));
        let wrong_token = with(&[("cookie", &cookie), ("x-cadre-csrf", "00")]);
        assert!(matches!(
            sessions.check_post(&wrong_token, origin, now),
            Err(Refusal::Forbidden(_))
        ));
        let cross_site = with(&[
            ("cookie", &cookie),
            ("x-cadre-csrf", &opened.csrf),
            ("origin", "https://evil.example"),
        ]);
        assert!(matches!(
            sessions.check_post(&cross_site, origin, now),
            Err(Refusal::Forbidden(_))
        ));
        let stranger = with(&[("x-cadre-csrf", &opened.csrf)]);
        assert_eq!(
            sessions.check_post(&stranger, origin, now),
            Err(Refusal::Unauthenticated)
        );
        // Expired, then closed.
        let later = now + Duration::from_secs(61);
        assert_eq!(
            sessions.check_post(&ok, origin, later),
            Err(Refusal::Unauthenticated)
        );
        let again = sessions.open(now);
        let cookie = format!("{COOKIE}={}", again.token);
        let h = with(&[("cookie", &cookie)]);
        assert!(sessions.session(&h, now).is_ok());
        sessions.close(&h);
        assert_eq!(sessions.session(&h, now), Err(Refusal::Unauthenticated));
    }

    #[test]
    fn failed_logins_are_limited_per_minute() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let now = Instant::now();
        for _ in 0..LOGIN_FAILURES_MAX {
            assert_eq!(sessions.login_blocked(now), None);
            sessions.login_failed(now);
        }
        let wait = sessions.login_blocked(now + Duration::from_secs(10));
        assert_eq!(wait, Some(Duration::from_secs(50)));
        assert_eq!(sessions.login_blocked(now + LOGIN_WINDOW), None);
    }
}
