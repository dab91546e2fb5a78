//! Budgets: caps on what steps cost, per task, per playbook per day and per day overall
//! (UTC days), and what verified tasks cost.
//!
//! Spend is counted when a step is dispatched (its estimated cost), in the same commit as
//! the dispatch: `Cf::Spend` counters `<day>/<playbook>` and `<day>/*`, added through a
//! merge operator. The ledger here holds today's counters in memory so that checking a
//! cap and charging it is one step under one lock: two steps dispatched at once cannot
//! both slip under the same cap. A charge whose commit then fails stays counted until
//! the node restarts (it over-counts, never under-counts).

use std::collections::HashMap;
use std::sync::Mutex;

use storage::{Batch, Cf, Store};

/// Caps in millionths of a US dollar; 0: no cap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caps {
    pub task: u64,
    pub day: u64,
    pub playbook_day: HashMap<String, u64>,
}

/// Today's spend, as committed plus charged since.
pub struct Ledger {
    store: Store,
    spent: Mutex<HashMap<String, u64>>,
}

/// What a step costs against the caps it would cross.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breach(pub String);

impl Ledger {
    pub fn new(store: Store) -> Ledger {
        Ledger {
            store,
            spent: Mutex::new(HashMap::new()),
        }
    }

    /// Charges `cost` to `playbook` on `day` if that stays within every cap (or
    /// `over_cap_approved`: an operator approved crossing it). `task_spent` is what the
    /// step's task has spent before it. With `charge` false the cost is only checked
    /// against the caps (an estimate of what a call will report having cost).
    #[expect(
        clippy::too_many_arguments,
        reason = "one decision's scalars; its one caller names each"
    )]
    pub fn try_charge(
        &self,
        caps: &Caps,
        day: &str,
        playbook: &str,
        task_spent: u64,
        cost: u64,
        charge: bool,
        over_cap_approved: bool,
    ) -> Result<(), Breach> {
        if cost == 0 {
            return Ok(());
        }
        let mut spent = match self.spent.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Yesterday's counters are no longer checked against anything.
        spent.retain(|k, _| k.starts_with(day));
        let keys = keys(day, playbook);
        let mut now = [0u64; 2];
        for (n, key) in now.iter_mut().zip(&keys) {
            *n = *spent
                .entry(key.clone())
                .or_insert_with(|| self.store.counter(Cf::Spend, key.as_bytes()).unwrap_or(0));
        }
        if !over_cap_approved {
            let mut crossed = Vec::new();
            if caps.task > 0 && task_spent + cost > caps.task {
                crossed.push(format!(
                    "task cap ${:.4} (spent ${:.4})",
                    usd(caps.task),
                    usd(task_spent)
                ));
            }
            if let Some(&cap) = caps.playbook_day.get(playbook)
                && cap > 0
                && now[0] + cost > cap
            {
                crossed.push(format!(
                    "{playbook}'s daily cap ${:.4} (spent ${:.4} on {day})",
                    usd(cap),
                    usd(now[0])
                ));
            }
            if caps.day > 0 && now[1] + cost > caps.day {
                crossed.push(format!(
                    "the daily cap ${:.4} (spent ${:.4} on {day})",
                    usd(caps.day),
                    usd(now[1])
                ));
            }
            if !crossed.is_empty() {
                return Err(Breach(format!(
                    "this step (${:.4}) would cross {}",
                    usd(cost),
                    crossed.join(" and ")
                )));
            }
        }
        if charge {
            for key in keys {
                *spent.entry(key).or_insert(0) += cost;
            }
        }
        Ok(())
    }

    /// Adds `cost` to today's spend without a cap check: a call that reported its cost
    /// after it ran (LLM tokens). Caps are checked before each dispatch, so one such
    /// call may cross a cap by at most its own cost.
    pub fn record(&self, day: &str, playbook: &str, cost: u64) {
        if cost == 0 {
            return;
        }
        let mut spent = match self.spent.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        spent.retain(|k, _| k.starts_with(day));
        for key in keys(day, playbook) {
            let now = *spent
                .entry(key.clone())
                .or_insert_with(|| self.store.counter(Cf::Spend, key.as_bytes()).unwrap_or(0));
            spent.insert(key, now + cost);
        }
    }

    /// Spent today by `playbook` (`*`: by all).
    pub fn spent(&self, day: &str, scope: &str) -> u64 {
        let key = format!("{day}/{scope}");
        let cached = self.spent.lock().ok().and_then(|s| s.get(&key).copied());
        cached.unwrap_or_else(|| self.store.counter(Cf::Spend, key.as_bytes()).unwrap_or(0))
    }
}

/// Millionths of a dollar (how costs are counted) as dollars (how they are shown).
pub fn usd(micros: u64) -> f64 {
    micros as f64 / 1_000_000.0
}

/// Dollars (as configured) as millionths, rounded.
pub fn micros(usd: f64) -> u64 {
    (usd * 1_000_000.0).round() as u64
}

/// The counters a charge to `playbook` on `day` moves.
pub fn keys(day: &str, playbook: &str) -> [String; 2] {
    [format!("{day}/{playbook}"), format!("{day}/*")]
}

/// Stages, in a transition's batch, the spend it charged.
pub fn stage_charge(batch: &mut Batch, day: &str, playbook: &str, cost: u64) {
    for key in keys(day, playbook) {
        batch.add(Cf::Spend, key.into_bytes(), cost);
    }
}

/// Counters of verified tasks per playbook: how many, and what they cost.
pub fn verified_keys(playbook: &str) -> [String; 2] {
    [
        format!("verified/{playbook}/tasks"),
        format!("verified/{playbook}/cost"),
    ]
}

/// The UTC day of `ms` since the epoch: `2026-11-24`.
pub fn day_of(ms: u64) -> String {
    // Howard Hinnant's days-to-civil algorithm.
    let z = (ms / 86_400_000) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_calendar_days() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(1_795_529_100_000), "2026-11-24");
        assert_eq!(day_of(951_782_400_000), "2000-02-29");
        assert_eq!(day_of(1_795_564_799_999), "2026-11-24");
        assert_eq!(day_of(1_795_564_800_000), "2026-11-25");
    }

    #[test]
    fn a_charge_that_would_cross_a_cap_is_refused_unless_approved() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(dir.path(), &Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let ledger = Ledger::new(store);
        let caps = Caps {
            task: 300,
            day: 1_000,
            playbook_day: HashMap::from([("news".to_string(), 500)]),
        };
        let day = "2026-11-24";
        assert_eq!(
            ledger.try_charge(&caps, day, "news", 0, 200, true, false),
            Ok(())
        );
        let task = ledger.try_charge(&caps, day, "news", 200, 200, true, false);
        assert!(task.is_err_and(|b| b.0.contains("task cap $0.0003")));
        assert_eq!(
            ledger.try_charge(&caps, day, "news", 0, 300, true, false),
            Ok(())
        );
        let pb = ledger.try_charge(&caps, day, "news", 0, 100, true, false);
        assert!(pb.is_err_and(|b| b.0.contains("news's daily cap")));
        assert_eq!(
            ledger.try_charge(&caps, day, "other", 0, 300, true, false),
            Ok(())
        );
        let all = ledger.try_charge(&caps, day, "other", 0, 250, true, false);
        assert!(all.is_err_and(|b| b.0.contains("the daily cap $0.0010")));
        // Approved: charged over the cap.
        assert_eq!(
            ledger.try_charge(&caps, day, "other", 0, 250, true, true),
            Ok(())
        );
        assert_eq!(ledger.spent(day, "*"), 1_050);
        assert_eq!(ledger.spent(day, "news"), 500);
        // A new day starts from zero.
        assert_eq!(
            ledger.try_charge(&caps, "2026-11-25", "news", 0, 250, true, false),
            Ok(())
        );
        // Checked, not charged: the estimate of a call that reports its cost once it
        // ran, which `record` then adds.
        let later = "2026-11-26";
        assert_eq!(
            ledger.try_charge(&caps, later, "llm", 0, 250, false, false),
            Ok(())
        );
        assert_eq!(ledger.spent(later, "*"), 0);
        ledger.record(later, "llm", 900);
        assert_eq!(ledger.spent(later, "llm"), 900);
        let crossed = ledger.try_charge(&caps, later, "llm", 0, 200, false, false);
        assert!(crossed.is_err_and(|b| b.0.contains("the daily cap")));
    }
}
