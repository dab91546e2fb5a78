//! Injected faults, for the chaos suite: a role panics inside its message handler, as a
//! bug would, so tests exercise supervision for real — a role restarted by the node's
//! supervisor, a TaskActor restarted from its checkpoint, the request it held lost and
//! retried by whoever sent it. Off unless the node's `fault_panic` option names a role;
//! not for production.
//!
//! Each role panics with its probability per message, drawn from the node's seeded RNG,
//! and at most `max` times per process: the supervisors escalate a role that fails five
//! times a minute (a node stops; a task fails), and the point is to test recovery, not
//! to reach that limit.

use std::collections::BTreeMap;
use std::sync::Mutex;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Roles that take injected panics: the ones whose failure the runtime promises to
/// recover from without an operator.
pub const ROLES: &[&str] = &[
    "task",
    crate::roles::PLANNER,
    crate::roles::EXECUTOR,
    crate::roles::VERIFIER,
    crate::roles::ARCHIVIST,
    crate::roles::RELAY,
];

#[derive(Debug)]
pub struct Faults {
    /// Any role named: checked first, so a node without faults takes no lock per message.
    enabled: bool,
    /// Role → (probability per message, panics so far).
    panic: Mutex<BTreeMap<String, (f64, u32)>>,
    max: u32,
    rng: Mutex<StdRng>,
}

impl Faults {
    /// No faults: what every node runs unless told otherwise.
    pub fn none() -> Faults {
        Faults::new(BTreeMap::new(), 0, 0)
    }

    pub fn new(panic: BTreeMap<String, f64>, max: u32, seed: u64) -> Faults {
        Faults {
            enabled: !panic.is_empty() && max > 0,
            panic: Mutex::new(panic.into_iter().map(|(r, p)| (r, (p, 0))).collect()),
            max,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        }
    }

    /// Parses `role=probability` entries (`task=0.2`), checked against [`ROLES`].
    pub fn parse(entries: &[String]) -> Result<BTreeMap<String, f64>, String> {
        let mut panic = BTreeMap::new();
        for text in entries {
            let shape = || {
                format!(
                    "fault_panic entry `{text}` must look like `task=0.2` (a role of {} and a probability in [0, 1])",
                    ROLES.join(", ")
                )
            };
            let (role, p) = text.split_once('=').ok_or_else(shape)?;
            let p: f64 = p.trim().parse().map_err(|_| shape())?;
            let role = role.trim();
            if !ROLES.contains(&role) || !(0.0..=1.0).contains(&p) {
                return Err(shape());
            }
            panic.insert(role.to_string(), p);
        }
        Ok(panic)
    }

    /// Panics, if `role` is due one. Called first thing in the role's handler.
    pub fn maybe_panic(&self, role: &str) {
        if !self.enabled {
            return;
        }
        let Ok(mut panic) = self.panic.lock() else {
            return;
        };
        let Some((p, count)) = panic.get_mut(role) else {
            return;
        };
        if *count >= self.max {
            return;
        }
        let draw: f64 = self.rng.lock().map(|mut r| r.random()).unwrap_or(1.0);
        if draw < *p {
            *count += 1;
            let n = *count;
            drop(panic);
            panic!("injected fault: {role} panic {n} (fault_panic)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_with_the_shape() {
        let ok = Faults::parse(&["task=0.2".into(), " executor = 1 ".into()]);
        assert_eq!(
            ok,
            Ok(BTreeMap::from([
                ("executor".to_string(), 1.0),
                ("task".to_string(), 0.2)
            ]))
        );
        for bad in ["task", "task=2", "nobody=0.1", "task=x"] {
            let Err(e) = Faults::parse(&[bad.into()]) else {
                panic!("{bad} parsed");
            };
            assert!(e.contains("must look like `task=0.2`"), "{bad}: {e}");
        }
    }

    #[test]
    fn panics_at_most_max_times_and_only_for_named_roles() {
        let faults = Faults::new(BTreeMap::from([("task".to_string(), 1.0)]), 2, 7);
        let panics = (0..5)
            .filter(|_| std::panic::catch_unwind(|| faults.maybe_panic("task")).is_err())
            .count();
        let planner = std::panic::catch_unwind(|| faults.maybe_panic("planner")).is_err();
        assert_eq!(panics, 2);
        assert!(!planner);
    }
}
