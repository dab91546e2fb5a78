//! Time as playbooks and operators write it: cron expressions in a time zone, durations
//! (`90s`, `3d`), instants (RFC 3339), and what a schedule does about firings it missed.
//! Pure functions of their arguments (the clock is passed in), so every rule is tested
//! without waiting.

use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;

/// Firings looked at per schedule per tick, at most: a schedule down for a year with a
/// per-second cron does not make the scheduler enumerate 31 million instants.
const DUE_MAX: usize = 10_000;

pub use crate::protocol::Missed;

/// A cron expression with its time zone, checked.
#[derive(Debug, Clone)]
pub struct Cron {
    schedule: cron::Schedule,
    tz: chrono_tz::Tz,
}

impl Cron {
    /// `expr` has 5 fields (`min hour dom month dow`), or 6–7 with seconds first (and a
    /// year last); `tz` is an IANA name (`Europe/London`), `UTC` by default.
    pub fn parse(expr: &str, tz: &str) -> Result<Cron, String> {
        let fields = expr.split_whitespace().count();
        let full = match fields {
            5 => format!("0 {expr}"),
            6 | 7 => expr.to_string(),
            n => {
                return Err(format!(
                    "cron `{expr}` has {n} fields; give 5 (min hour day month weekday) or 6 with seconds first"
                ));
            }
        };
        let schedule =
            cron::Schedule::from_str(&full).map_err(|e| format!("cron `{expr}`: {e}"))?;
        let tz = chrono_tz::Tz::from_str(if tz.is_empty() { "UTC" } else { tz })
            .map_err(|_| format!("time zone `{tz}` is not an IANA name (e.g. Europe/London)"))?;
        Ok(Cron { schedule, tz })
    }

    /// The firings in `(after_ms, until_ms]`, oldest first (at most [`DUE_MAX`]).
    pub fn due(&self, after_ms: u64, until_ms: u64) -> Vec<u64> {
        let Some(after) = self.at(after_ms) else {
            return Vec::new();
        };
        self.schedule
            .after(&after)
            .map(|t| t.timestamp_millis().max(0) as u64)
            .take_while(|&t| t <= until_ms)
            .take(DUE_MAX)
            .collect()
    }

    /// The next firing after `after_ms`.
    pub fn next(&self, after_ms: u64) -> Option<u64> {
        let after = self.at(after_ms)?;
        self.schedule
            .after(&after)
            .next()
            .map(|t| t.timestamp_millis().max(0) as u64)
    }

    /// `ms` shown in the schedule's own time zone.
    pub fn show(&self, ms: u64) -> String {
        self.at(ms)
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| ms.to_string())
    }

    fn at(&self, ms: u64) -> Option<DateTime<chrono_tz::Tz>> {
        let utc = Utc.timestamp_millis_opt(i64::try_from(ms).ok()?).single()?;
        Some(utc.with_timezone(&self.tz))
    }
}

/// What a scheduler tick does for one schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Firing {
    Nothing,
    /// Fire for `at`; `missed` firings before it were not fired (0: on time).
    Fire {
        at: u64,
        missed: usize,
        first: u64,
    },
    /// Fire none: `missed` firings up to `latest` are passed over.
    Skip {
        latest: u64,
        missed: usize,
        first: u64,
    },
}

/// Decides a tick: the firings due since `last_ms` (the last one handled). One due firing
/// within `grace_ms` of now is on time; more, or a late one, are missed and follow
/// `missed`.
pub fn decide(cron: &Cron, last_ms: u64, now_ms: u64, grace_ms: u64, missed: Missed) -> Firing {
    let due = cron.due(last_ms, now_ms);
    let (Some(&first), Some(&latest)) = (due.first(), due.last()) else {
        return Firing::Nothing;
    };
    if due.len() == 1 && now_ms.saturating_sub(latest) <= grace_ms {
        return Firing::Fire {
            at: latest,
            missed: 0,
            first,
        };
    }
    match missed {
        Missed::CatchUpOnce => Firing::Fire {
            at: latest,
            missed: due.len() - 1,
            first,
        },
        Missed::Skip => Firing::Skip {
            latest,
            missed: due.len(),
            first,
        },
    }
}

/// A duration: milliseconds as a number, or text with a unit — `500ms`, `90s`, `10m`,
/// `2h`, `3d`.
pub fn parse_duration(v: &Value) -> Result<u64, String> {
    if let Some(ms) = v.as_u64() {
        return Ok(ms);
    }
    let text = v
        .as_str()
        .ok_or_else(|| format!("duration {v} must be milliseconds or text like `90s`, `2h`, `3d`"))?
        .trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("duration `{text}` must start with a whole number"))?;
    let unit_ms = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => {
            return Err(format!(
                "duration `{text}`: unit `{other}` must be ms, s, m, h or d"
            ));
        }
    };
    n.checked_mul(unit_ms)
        .ok_or_else(|| format!("duration `{text}` is too long"))
}

/// An instant: milliseconds since the epoch as a number, or RFC 3339 text
/// (`2026-12-01T09:00:00+01:00`).
pub fn parse_instant(v: &Value) -> Result<u64, String> {
    if let Some(ms) = v.as_u64() {
        return Ok(ms);
    }
    let text = v
        .as_str()
        .ok_or_else(|| format!("time {v} must be milliseconds or RFC 3339 text"))?;
    let t = DateTime::parse_from_rfc3339(text.trim())
        .map_err(|e| format!("time `{text}` is not RFC 3339 (2026-12-01T09:00:00Z): {e}"))?;
    u64::try_from(t.timestamp_millis()).map_err(|_| format!("time `{text}` is before 1970"))
}

/// `ms` as RFC 3339 in UTC.
pub fn show_utc(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        .map(|t| t.to_rfc3339())
        .unwrap_or_else(|| ms.to_string())
}

/// When a `wait` step started at `started_ms` wakes: `for` a duration, or `until` an
/// instant (whichever its params give; not both).
pub fn wake_at(params: &Value, started_ms: u64) -> Result<u64, String> {
    if let Some(event) = params.get("event") {
        // Until an event comes, or its timeout.
        let name = event.as_str().unwrap_or_default();
        if !crate::protocol::subject::is_token(name) {
            return Err(format!(
                "wait: event {event} must be a name (letters, digits, `-`, `_`)"
            ));
        }
        let timeout = params
            .get("timeout")
            .ok_or("wait: an `event` wait needs a `timeout` (`3d`)")?;
        if params.get("for").is_some() || params.get("until").is_some() {
            return Err("wait: give `event` with `timeout`, or `for`, or `until`".into());
        }
        return Ok(started_ms.saturating_add(parse_duration(timeout)?));
    }
    match (params.get("for"), params.get("until")) {
        (Some(d), None) => Ok(started_ms.saturating_add(parse_duration(d)?)),
        (None, Some(t)) => parse_instant(t),
        (Some(_), Some(_)) => Err("wait: give `for` or `until`, not both".into()),
        (None, None) => Err(
            "wait: give `for` (a duration), `until` (a time), or `event` with a `timeout`".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// 2026-11-25T00:00:00Z.
    const MIDNIGHT: u64 = 1_795_564_800_000;

    #[test]
    fn cron_fires_in_its_time_zone() {
        // 09:00 on weekdays in New York is 14:00 UTC in November (EST, UTC-5).
        let c = Cron::parse("0 9 * * MON-FRI", "America/New_York").unwrap();
        let next = c.next(MIDNIGHT).unwrap();
        assert_eq!(show_utc(next), "2026-11-25T14:00:00+00:00");
        assert_eq!(c.show(next), "2026-11-25T09:00:00-05:00");
        let every_2s = Cron::parse("*/2 * * * * *", "").unwrap();
        assert_eq!(every_2s.due(MIDNIGHT, MIDNIGHT + 6_000).len(), 3);
        assert!(Cron::parse("0 9 * *", "UTC").is_err_and(|e| e.contains("has 4 fields")));
        assert!(Cron::parse("0 9 * * *", "Mars/Olympus").is_err_and(|e| e.contains("IANA")));
        assert!(Cron::parse("0 99 * * *", "UTC").is_err());
    }

    #[test]
    fn missed_firings_follow_the_policy() {
        let c = Cron::parse("*/2 * * * * *", "UTC").unwrap();
        let on_time = decide(&c, MIDNIGHT, MIDNIGHT + 2_100, 1_000, Missed::Skip);
        assert_eq!(
            on_time,
            Firing::Fire {
                at: MIDNIGHT + 2_000,
                missed: 0,
                first: MIDNIGHT + 2_000
            }
        );
        assert_eq!(
            decide(&c, MIDNIGHT, MIDNIGHT + 1_000, 1_000, Missed::Skip),
            Firing::Nothing
        );
        // Down from 0 to 10 s: five firings were due (2, 4, 6, 8, 10).
        let caught = decide(&c, MIDNIGHT, MIDNIGHT + 10_500, 1_000, Missed::CatchUpOnce);
        assert_eq!(
            caught,
            Firing::Fire {
                at: MIDNIGHT + 10_000,
                missed: 4,
                first: MIDNIGHT + 2_000
            }
        );
        let skipped = decide(&c, MIDNIGHT, MIDNIGHT + 10_500, 1_000, Missed::Skip);
        assert_eq!(
            skipped,
            Firing::Skip {
                latest: MIDNIGHT + 10_000,
                missed: 5,
                first: MIDNIGHT + 2_000
            }
        );
        // One firing, but found late: missed too.
        let late = decide(&c, MIDNIGHT, MIDNIGHT + 3_900, 1_000, Missed::Skip);
        assert!(matches!(late, Firing::Skip { missed: 1, .. }));
    }

    #[test]
    fn durations_and_instants() {
        assert_eq!(parse_duration(&json!("90s")), Ok(90_000));
        assert_eq!(parse_duration(&json!("3d")), Ok(259_200_000));
        assert_eq!(parse_duration(&json!("250ms")), Ok(250));
        assert_eq!(parse_duration(&json!(1500)), Ok(1500));
        assert!(parse_duration(&json!("soon")).is_err());
        assert!(parse_duration(&json!("3w")).is_err());
        assert_eq!(
            parse_instant(&json!("2026-11-25T01:00:00+01:00")),
            Ok(MIDNIGHT)
        );
        assert!(parse_instant(&json!("tomorrow")).is_err());
        assert_eq!(wake_at(&json!({"for": "2s"}), 1_000), Ok(3_000));
        assert_eq!(wake_at(&json!({"until": 5_000}), 1_000), Ok(5_000));
        assert!(wake_at(&json!({}), 0).is_err());
    }
}
