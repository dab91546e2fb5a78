//! Rate limits per tool and per target host: token buckets over the injected clock.
//!
//! A limit `N/period` is a bucket of N tokens refilled at N per period, so a quiet limit
//! allows a burst of N and then N per period. A step takes one token from its tool's
//! bucket and one from its target host's (for `http.request`), both or neither, before
//! anything is recorded or run; when either is empty it waits until both have one.

use std::collections::HashMap;
use std::sync::Mutex;

/// One configured limit: `http.request=10/s`, `host:api.example.com=30/m`.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// `tool:<name>` or `host:<name>`, as the metrics label it.
    pub key: String,
    /// Tokens per period, and the burst.
    pub tokens: u32,
    pub period_ms: u64,
}

impl RateLimit {
    /// Parses `<tool>=<N>/<s|m|h>` or `host:<host>=<N>/<s|m|h>`.
    pub fn parse(text: &str) -> Result<RateLimit, String> {
        let shape = || {
            format!(
                "rate limit `{text}` must look like `http.request=10/s` or `host:api.example.com=30/m`"
            )
        };
        let (target, rate) = text.split_once('=').ok_or_else(shape)?;
        let (n, unit) = rate.trim().split_once('/').ok_or_else(shape)?;
        let tokens: u32 = n.trim().parse().map_err(|_| shape())?;
        let period_ms = match unit.trim() {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(shape()),
        };
        if tokens == 0 {
            return Err(format!("rate limit `{text}` must allow at least 1 call"));
        }
        let target = target.trim();
        let key = match target.strip_prefix("host:") {
            Some(host) if !host.is_empty() => format!("host:{}", host.to_ascii_lowercase()),
            Some(_) => return Err(shape()),
            None if target.is_empty() => return Err(shape()),
            None => format!("tool:{target}"),
        };
        Ok(RateLimit {
            key,
            tokens,
            period_ms,
        })
    }

    pub fn per_second(&self) -> f64 {
        f64::from(self.tokens) * 1000.0 / self.period_ms as f64
    }
}

#[derive(Debug)]
struct Bucket {
    capacity: f64,
    tokens: f64,
    per_ms: f64,
    last_ms: u64,
}

impl Bucket {
    fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64;
        self.tokens = (self.tokens + elapsed * self.per_ms).min(self.capacity);
        self.last_ms = self.last_ms.max(now_ms);
    }

    /// Milliseconds until one token is there (0: now). Refill is fractional, so compare
    /// with a tolerance: 200 ms at 5/s is one token, not 0.9999999.
    fn wait_ms(&self) -> u64 {
        const EPS: f64 = 1e-9;
        if self.tokens >= 1.0 - EPS {
            0
        } else {
            (((1.0 - self.tokens) / self.per_ms) - EPS).ceil().max(1.0) as u64
        }
    }
}

/// Every configured bucket of a node.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    pub fn new(limits: &[RateLimit], now_ms: u64) -> RateLimiter {
        let buckets = limits
            .iter()
            .map(|l| {
                let capacity = f64::from(l.tokens);
                let bucket = Bucket {
                    capacity,
                    tokens: capacity,
                    per_ms: capacity / l.period_ms as f64,
                    last_ms: now_ms,
                };
                (l.key.clone(), bucket)
            })
            .collect();
        RateLimiter {
            buckets: Mutex::new(buckets),
        }
    }

    /// Takes a token from each of `keys` that has a bucket — all or none. `Ok(())`
    /// when taken; `Err((key, wait_ms))` names the limit to wait for and how long.
    pub fn try_take(&self, keys: &[String], now_ms: u64) -> Result<(), (String, u64)> {
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        let mut longest: Option<(String, u64)> = None;
        for key in keys {
            if let Some(b) = buckets.get_mut(key) {
                b.refill(now_ms);
                let wait = b.wait_ms();
                if wait > 0 && longest.as_ref().is_none_or(|(_, w)| wait > *w) {
                    longest = Some((key.clone(), wait));
                }
            }
        }
        if let Some(wait) = longest {
            return Err(wait);
        }
        for key in keys {
            if let Some(b) = buckets.get_mut(key) {
                b.tokens = (b.tokens - 1.0).max(0.0);
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.lock().map(|b| b.is_empty()).unwrap_or(true)
    }
}

/// The host a step's params target (`http.request`'s `url`), lowercased.
pub fn target_host(params: &serde_json::Value) -> Option<String> {
    let url = params.get("url")?.as_str()?;
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit('@').next()?;
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        host_port.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(specs: &[&str]) -> RateLimiter {
        let limits: Vec<RateLimit> = specs
            .iter()
            .map(|s| RateLimit::parse(s).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        RateLimiter::new(&limits, 0)
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let l = limiter(&["http.request=5/s"]);
        let keys = ["tool:http.request".to_string()];
        for _ in 0..5 {
            assert_eq!(l.try_take(&keys, 0), Ok(()));
        }
        assert_eq!(l.try_take(&keys, 0), Err(("tool:http.request".into(), 200)));
        assert_eq!(l.try_take(&keys, 199), Err(("tool:http.request".into(), 1)));
        assert_eq!(l.try_take(&keys, 200), Ok(()));
        // A long quiet spell refills to the burst, not beyond.
        for _ in 0..5 {
            assert_eq!(l.try_take(&keys, 60_000), Ok(()));
        }
        assert!(l.try_take(&keys, 60_000).is_err());
        // No bucket for a key: no limit.
        assert_eq!(l.try_take(&["tool:file.write".to_string()], 0), Ok(()));
    }

    #[test]
    fn tool_and_host_are_taken_together_or_not_at_all() {
        let l = limiter(&["http.request=10/s", "host:API.example.com=1/m"]);
        let keys = [
            "tool:http.request".to_string(),
            "host:api.example.com".to_string(),
        ];
        assert_eq!(l.try_take(&keys, 0), Ok(()));
        assert_eq!(
            l.try_take(&keys, 0),
            Err(("host:api.example.com".into(), 60_000))
        );
        // The refused attempt took nothing from the tool's bucket: 9 left.
        let tool = ["tool:http.request".to_string()];
        for _ in 0..9 {
            assert_eq!(l.try_take(&tool, 0), Ok(()));
        }
        assert!(l.try_take(&tool, 0).is_err());
    }

    #[test]
    fn limits_parse_or_say_what_to_write() {
        assert_eq!(
            RateLimit::parse("host:Api.Example.com=30/m"),
            Ok(RateLimit {
                key: "host:api.example.com".into(),
                tokens: 30,
                period_ms: 60_000
            })
        );
        for bad in [
            "http.request",
            "x=10",
            "x=ten/s",
            "x=10/d",
            "=1/s",
            "host:=1/s",
            "x=0/s",
        ] {
            let err = RateLimit::parse(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn the_target_host_comes_from_the_url() {
        let host = |u: &str| target_host(&serde_json::json!({ "url": u }));
        assert_eq!(
            host("https://API.example.com:8443/x?y"),
            Some("api.example.com".into())
        );
        assert_eq!(host("http://bob:pw@10.0.0.1/x"), Some("10.0.0.1".into()));
        assert_eq!(host("http://[::1]:80/"), Some("::1".into()));
        assert_eq!(host("not a url"), None);
        assert_eq!(target_host(&serde_json::json!({})), None);
    }
}
