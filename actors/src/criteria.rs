//! Success criteria, evaluated by the Verifier. Pure functions of (criteria, step,
//! output) except the file checks, which read the file the step wrote.

use serde_json::Value;

use crate::model::Criteria;
use crate::protocol::Verdict;

/// The verdict line of a step with no rule to check (an `llm_judge` alone).
pub const NO_CRITERIA: &str = "ok: no criteria";

/// Largest file `file_contains` reads.
const FILE_READ_BYTES_MAX: u64 = 16 << 20;

/// Checks every criterion that is set; the verdict lists what was expected and found.
pub fn check(criteria: &Criteria, params: &Value, output: &Value) -> Verdict {
    let mut reasons = Vec::new();
    let mut passed = true;
    let mut note = |ok: bool, line: String| {
        passed &= ok;
        reasons.push(format!("{} {line}", if ok { "ok:" } else { "FAILED:" }));
    };
    if let Some(want) = criteria.exit_code {
        let got = output.get("exit_code").and_then(Value::as_i64);
        note(
            got == Some(want),
            format!("exit_code {} (want {want})", show(got)),
        );
    }
    if let Some(list) = &criteria.status_in {
        let got = output.get("status").and_then(Value::as_u64);
        let ok = got.is_some_and(|s| list.iter().any(|w| u64::from(*w) == s));
        note(ok, format!("status {} in {list:?}", show(got)));
    }
    let path = output
        .get("path")
        .or_else(|| params.get("path"))
        .and_then(Value::as_str);
    if let Some(want) = criteria.file_exists {
        match path {
            Some(p) => {
                let exists = std::path::Path::new(p).is_file();
                note(
                    exists == want,
                    format!("file_exists {p}: {exists} (want {want})"),
                );
            }
            None => note(false, "file_exists: the step has no `path`".into()),
        }
    }
    if let Some(needle) = &criteria.file_contains {
        match path.map(read_bounded) {
            Some(Ok(text)) => note(
                text.contains(needle.as_str()),
                format!("file_contains {needle:?}"),
            ),
            Some(Err(e)) => note(false, format!("file_contains {needle:?}: cannot read: {e}")),
            None => note(false, "file_contains: the step has no `path`".into()),
        }
    }
    if let Some(rule) = &criteria.json_path_equals {
        let want = rule.value.to_value_lossy();
        match json_path(output, &rule.path) {
            Ok(Some(got)) => note(*got == want, format!("{} = {got} (want {want})", rule.path)),
            Ok(None) => note(
                false,
                format!("{} not found in the output (want {want})", rule.path),
            ),
            Err(e) => note(false, format!("{}: {e}", rule.path)),
        }
    }
    if let Some(needle) = &criteria.output_contains {
        let text = output_text(output);
        note(
            text.contains(needle.as_str()),
            format!("output_contains {needle:?}"),
        );
    }
    if reasons.is_empty() {
        reasons.push(NO_CRITERIA.into());
    }
    Verdict { passed, reasons }
}

fn show<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "missing".into())
}

fn read_bounded(path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)?
        .take(FILE_READ_BYTES_MAX)
        .read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The text a human would call the output: stdout, a text body, or the JSON.
pub fn output_text(output: &Value) -> String {
    for key in ["stdout", "body", "text"] {
        if let Some(Value::String(s)) = output.get(key) {
            return s.clone();
        }
    }
    match output {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A small JSONPath subset: `$`, `.field`, `[index]`, `["field"]`.
pub fn json_path<'a>(root: &'a Value, path: &str) -> Result<Option<&'a Value>, String> {
    let rest = path.trim();
    let mut rest = rest.strip_prefix('$').unwrap_or(rest);
    let mut current = root;
    while !rest.is_empty() {
        let next;
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let field = &r[..end];
            if field.is_empty() {
                return Err(format!("empty field name in `{path}`"));
            }
            next = current.get(field);
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r
                .find(']')
                .ok_or_else(|| format!("unclosed `[` in `{path}`"))?;
            let inner = r[..end].trim();
            next = if let Some(name) = inner.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
                current.get(name)
            } else {
                let i: usize = inner
                    .parse()
                    .map_err(|_| format!("`[{inner}]` is not an index in `{path}`"))?;
                current.get(i)
            };
            rest = &r[end + 1..];
        } else {
            // Leading bare field: `a.b` is read as `$.a.b`.
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            next = current.get(&rest[..end]);
            rest = &rest[end..];
        }
        match next {
            Some(v) => current = v,
            None => return Ok(None),
        }
    }
    Ok(Some(current))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JsonPathEquals, JsonText};
    use serde_json::json;

    #[test]
    fn http_criteria() {
        let out = json!({"status": 201, "body": {"client": {"name": "Acme", "tags": ["a", "b"]}}});
        let c = Criteria {
            status_in: Some(vec![200, 201]),
            json_path_equals: Some(JsonPathEquals {
                path: "$.body.client.tags[1]".into(),
                value: JsonText("\"b\"".into()),
            }),
            output_contains: Some("Acme".into()),
            ..Default::default()
        };
        let v = check(&c, &json!({}), &out);
        assert!(v.passed, "{:?}", v.reasons);
        let c = Criteria {
            status_in: Some(vec![200]),
            ..Default::default()
        };
        let v = check(&c, &json!({}), &out);
        assert!(!v.passed);
        assert_eq!(v.reasons, vec!["FAILED: status 201 in [200]"]);
    }

    #[test]
    fn shell_and_file_criteria() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.md");
        std::fs::write(&f, "# Acme\nwelcome").unwrap();
        let p = json!({"path": f.to_str().unwrap()});
        let c = Criteria {
            file_exists: Some(true),
            file_contains: Some("welcome".into()),
            ..Default::default()
        };
        assert!(check(&c, &p, &json!({})).passed);
        let c = Criteria {
            file_contains: Some("absent".into()),
            ..Default::default()
        };
        assert!(!check(&c, &p, &json!({})).passed);
        let c = Criteria {
            file_exists: Some(true),
            ..Default::default()
        };
        assert!(!check(&c, &json!({"path": "/nonexistent/x"}), &json!({})).passed);
        let c = Criteria {
            exit_code: Some(0),
            output_contains: Some("done".into()),
            ..Default::default()
        };
        assert!(
            check(
                &c,
                &json!({}),
                &json!({"exit_code": 0, "stdout": "all done"})
            )
            .passed
        );
        assert!(
            !check(
                &c,
                &json!({}),
                &json!({"exit_code": 2, "stdout": "all done"})
            )
            .passed
        );
    }

    #[test]
    fn json_paths() {
        let v = json!({"a": {"b": [10, {"c": "x"}]}, "k.y": 1});
        assert_eq!(json_path(&v, "$.a.b[0]").unwrap(), Some(&json!(10)));
        assert_eq!(json_path(&v, "a.b[1].c").unwrap(), Some(&json!("x")));
        assert_eq!(json_path(&v, "$[\"k.y\"]").unwrap(), Some(&json!(1)));
        assert_eq!(json_path(&v, "$.a.zz").unwrap(), None);
        assert_eq!(json_path(&v, "$").unwrap(), Some(&v));
        assert!(json_path(&v, "$.a[x]").is_err());
    }
}
