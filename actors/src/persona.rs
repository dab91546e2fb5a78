//! The business's identity: who Cadre acts for. One TOML file (`persona_file`), read at
//! start and checked; playbook templates read it as `persona.*` (`{{persona.signature}}`).
//!
//! ```toml
//! name = "Ada Moreau"
//! business = "Moreau Consulting"
//! roles = ["consultant", "bookkeeper"]
//! voice = "warm, brief, no jargon"
//! signature = "Ada — Moreau Consulting"
//! [contacts]
//! email = "ada@example.com"
//! [working_hours]
//! timezone = "Europe/Paris"
//! days = ["mon", "tue", "wed", "thu", "fri"]
//! start = "09:00"
//! end = "17:30"
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Persona {
    pub name: String,
    #[serde(default)]
    pub business: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// How messages written for the business should sound.
    #[serde(default)]
    pub voice: String,
    #[serde(default)]
    pub signature: String,
    /// `email`, `phone`, …: whatever the playbooks address.
    #[serde(default)]
    pub contacts: BTreeMap<String, String>,
    #[serde(default)]
    pub working_hours: Option<WorkingHours>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkingHours {
    /// An IANA name (`Europe/Paris`), as written; not interpreted yet.
    pub timezone: String,
    /// `mon` … `sun`.
    pub days: Vec<String>,
    /// `HH:MM`, 24-hour.
    pub start: String,
    pub end: String,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Minutes since midnight of an `HH:MM` time.
fn minutes(hhmm: &str) -> Option<u32> {
    let (h, m) = hhmm.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && hhmm.len() == 5).then_some(h * 60 + m)
}

impl Persona {
    /// Reads and checks `path`; the error names the file and every problem.
    pub fn load(path: &Path) -> Result<Persona, String> {
        let at = |problem: String| format!("persona file {}: {problem}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| at(e.to_string()))?;
        let persona: Persona = toml::from_str(&text).map_err(|e| at(e.to_string()))?;
        let problems = persona.problems();
        if problems.is_empty() {
            Ok(persona)
        } else {
            Err(at(problems.join("; ")))
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.name.trim().is_empty() {
            problems.push("`name` must not be empty".to_string());
        }
        if let Some(h) = &self.working_hours {
            if h.timezone.trim().is_empty() {
                problems.push("working_hours.timezone must not be empty".into());
            }
            for day in &h.days {
                if !DAYS.contains(&day.as_str()) {
                    problems.push(format!(
                        "working_hours.days: `{day}` is not one of {}",
                        DAYS.join(", ")
                    ));
                }
            }
            match (minutes(&h.start), minutes(&h.end)) {
                (Some(s), Some(e)) if s < e => {}
                (Some(_), Some(_)) => {
                    problems.push("working_hours: `start` must be before `end`".into())
                }
                _ => problems.push(format!(
                    "working_hours: start `{}` and end `{}` must be HH:MM",
                    h.start, h.end
                )),
            }
        }
        problems
    }

    /// What templates see as `persona`.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("persona.toml");
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        (dir, path)
    }

    #[test]
    fn a_whole_persona_loads() {
        let (_d, path) = write(
            r#"
name = "Ada Moreau"
business = "Moreau Consulting"
roles = ["consultant"]
signature = "Ada"
[contacts]
email = "ada@example.com"
[working_hours]
timezone = "Europe/Paris"
days = ["mon", "fri"]
start = "09:00"
end = "17:30"
"#,
        );
        let p = Persona::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.to_value()["contacts"]["email"], "ada@example.com");
        assert_eq!(p.to_value()["working_hours"]["end"], "17:30");
    }

    #[test]
    fn every_problem_is_named_with_the_file() {
        let (_d, path) = write(
            r#"
name = " "
[working_hours]
timezone = "Europe/Paris"
days = ["monday"]
start = "18:00"
end = "9:00"
"#,
        );
        let Err(e) = Persona::load(&path) else {
            panic!("loaded");
        };
        assert!(e.starts_with("persona file "), "{e}");
        assert!(e.contains("`name` must not be empty"), "{e}");
        assert!(e.contains("`monday` is not one of"), "{e}");
        assert!(e.contains("must be HH:MM"), "{e}");
        let (_d, path) = write("name = \"A\"\nemail = \"a@b\"\n");
        let Err(e) = Persona::load(&path) else {
            panic!("loaded");
        };
        assert!(e.contains("unknown field `email`"), "{e}");
    }
}
