//! `{{path}}` templates over JSON values.
//!
//! A string that is exactly one `{{path}}` becomes the referenced value with its type
//! (a number stays a number, an object an object); anywhere else the value is spliced
//! into the string (strings as they are, other values as JSON). Paths are dotted:
//! `input.client`, `task.id`, `steps.fetch.output.body.title`, `input.items.0`.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unclosed `{{{{` in `{0}`")]
    Unclosed(String),
    #[error("empty `{{{{}}}}` in `{0}`")]
    Empty(String),
    #[error("`{0}` is missing")]
    Missing(String),
}

/// Resolves a root name (`input`, `task`, `steps`) to its value. Returning `None`
/// for a root leaves its templates untouched (rendered later).
pub trait Scope {
    fn root(&self, name: &str) -> Option<&Value>;
}

impl Scope for [(&str, &Value)] {
    fn root(&self, name: &str) -> Option<&Value> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
}

/// Every `{{path}}` in `value`, in order.
pub fn references(value: &Value) -> Result<Vec<String>, TemplateError> {
    let mut out = Vec::new();
    visit_strings(value, &mut |s| {
        for piece in split(s)? {
            if let Piece::Ref(path) = piece {
                out.push(path.to_string());
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// Renders every template whose root the scope knows; others stay as written.
pub fn render(value: &Value, scope: &(impl Scope + ?Sized)) -> Result<Value, TemplateError> {
    Ok(match value {
        Value::String(s) => render_str(s, scope)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render(v, scope))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render(v, scope)?)))
                .collect::<Result<_, TemplateError>>()?,
        ),
        other => other.clone(),
    })
}

fn render_str(s: &str, scope: &(impl Scope + ?Sized)) -> Result<Value, TemplateError> {
    let pieces = split(s)?;
    if let [Piece::Ref(path)] = pieces.as_slice() {
        return Ok(match lookup(path, scope)? {
            Some(v) => defused(v),
            None => Value::String(s.to_string()),
        });
    }
    let mut out = String::with_capacity(s.len());
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Ref(path) => match lookup(path, scope)? {
                Some(Value::String(v)) => out.push_str(&defuse(v)),
                Some(v) => out.push_str(&defuse(&v.to_string())),
                None => {
                    out.push_str("{{");
                    out.push_str(path);
                    out.push_str("}}");
                }
            },
        }
    }
    Ok(Value::String(out))
}

/// A secret reference is opened by the Executor in what reaches it, so one must come
/// from the playbook's own text: in a value rendered in from elsewhere (an input, a
/// webhook body, a tool's output) it is broken up, and stays text.
const SECRET_REF: &str = "{{secret.";

fn defuse(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains(SECRET_REF) {
        std::borrow::Cow::Owned(s.replace(SECRET_REF, "{ {secret."))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

fn defused(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(defuse(s).into_owned()),
        Value::Array(items) => Value::Array(items.iter().map(defused).collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), defused(v))).collect())
        }
        other => other.clone(),
    }
}

/// What rendering `{{path}}` would say of it: an error if its root is in scope and the
/// path is not there (or null), `Ok` otherwise.
pub fn check(path: &str, scope: &(impl Scope + ?Sized)) -> Result<(), TemplateError> {
    lookup(path, scope).map(|_| ())
}

/// `Ok(None)` when the root is not in scope (left for later); an error when the root
/// is in scope but the path is not there.
fn lookup<'a>(
    path: &str,
    scope: &'a (impl Scope + ?Sized),
) -> Result<Option<&'a Value>, TemplateError> {
    let mut parts = path.split('.');
    let root = parts.next().unwrap_or_default();
    let Some(mut current) = scope.root(root) else {
        return Ok(None);
    };
    for part in parts {
        let next = match current {
            Value::Object(map) => map.get(part),
            Value::Array(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        current = next.ok_or_else(|| TemplateError::Missing(path.to_string()))?;
    }
    if current.is_null() {
        return Err(TemplateError::Missing(path.to_string()));
    }
    Ok(Some(current))
}

enum Piece<'a> {
    Text(&'a str),
    Ref(&'a str),
}

fn split(s: &str) -> Result<Vec<Piece<'_>>, TemplateError> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            out.push(Piece::Text(&rest[..open]));
        }
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| TemplateError::Unclosed(s.to_string()))?;
        let path = after[..close].trim();
        if path.is_empty() {
            return Err(TemplateError::Empty(s.to_string()));
        }
        out.push(Piece::Ref(path));
        rest = &after[close + 2..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    Ok(out)
}

fn visit_strings(
    value: &Value,
    f: &mut impl FnMut(&str) -> Result<(), TemplateError>,
) -> Result<(), TemplateError> {
    match value {
        Value::String(s) => f(s),
        Value::Array(items) => items.iter().try_for_each(|v| visit_strings(v, f)),
        Value::Object(map) => map.values().try_for_each(|v| visit_strings(v, f)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn whole_reference_keeps_type_and_splices_into_text() {
        let input = json!({"client": "Acme", "n": 3, "tags": ["a"]});
        let scope: &[(&str, &Value)] = &[("input", &input)];
        let v = json!({"count": "{{input.n}}", "path": "/r/{{ input.client }}/x-{{input.n}}", "t": "{{input.tags}}", "first": "{{input.tags.0}}"});
        assert_eq!(
            render(&v, scope).unwrap(),
            json!({"count": 3, "path": "/r/Acme/x-3", "t": ["a"], "first": "a"})
        );
    }

    #[test]
    fn unknown_roots_stay_for_later_and_missing_fields_are_errors() {
        let input = json!({"client": "Acme"});
        let scope: &[(&str, &Value)] = &[("input", &input)];
        let v = json!("{{steps.a.output.x}} for {{input.client}}");
        assert_eq!(
            render(&v, scope).unwrap(),
            json!("{{steps.a.output.x}} for Acme")
        );
        assert_eq!(
            render(&json!("{{input.nope}}"), scope),
            Err(TemplateError::Missing("input.nope".into()))
        );
        assert_eq!(
            render(&json!("{{input.client.x}}"), scope),
            Err(TemplateError::Missing("input.client.x".into()))
        );
    }

    #[test]
    fn malformed_templates() {
        assert!(matches!(
            references(&json!("a {{ b")),
            Err(TemplateError::Unclosed(_))
        ));
        assert!(matches!(
            references(&json!("a {{ }}")),
            Err(TemplateError::Empty(_))
        ));
        assert_eq!(
            references(&json!({"a": ["{{x.y}}", "{{z}} {{w}}"]})).unwrap(),
            vec!["x.y", "z", "w"]
        );
    }
}
