//! The JSON Schema subset Cadre writes for its tools and its plan, and a validator for
//! it. The schemas are ours (`tools::CATALOG`), so only what they use is supported:
//! `type`, `properties`, `required`, `additionalProperties`, `items`, `enum`, `const`,
//! `anyOf`, `minimum`, `maximum`, `minLength`, `maxLength`, `minItems`, `maxItems`.
//! Anything else in a schema is ignored (descriptions, titles).

use serde_json::Value;

/// Every way `value` breaks `schema`, each prefixed with where (`$.params.url`).
pub fn validate(schema: &Value, value: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    check(schema, value, "$", &mut errors);
    errors
}

fn check(schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    let Value::Object(s) = schema else { return };
    if let Some(alternatives) = s.get("anyOf").and_then(Value::as_array) {
        let mut best: Option<Vec<String>> = None;
        for alt in alternatives {
            let mut e = Vec::new();
            check(alt, value, at, &mut e);
            if e.is_empty() {
                best = None;
                break;
            }
            if best.as_ref().is_none_or(|b| e.len() < b.len()) {
                best = Some(e);
            }
        }
        // The closest alternative's complaints say the most about what was meant.
        if let Some(e) = best {
            errors.extend(e);
            return;
        }
    }
    if let Some(want) = s.get("const")
        && value != want
    {
        errors.push(format!("{at}: must be {want}"));
        return;
    }
    if let Some(Value::Array(options)) = s.get("enum")
        && !options.contains(value)
    {
        let shown: Vec<String> = options.iter().map(Value::to_string).collect();
        errors.push(format!("{at}: must be one of {}", shown.join(", ")));
        return;
    }
    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !types.is_empty() && !types.iter().any(|t| is_type(value, t)) {
            errors.push(format!(
                "{at}: must be {} (found {})",
                types.join(" or "),
                type_of(value)
            ));
            return;
        }
    }
    match value {
        Value::String(text) => {
            let n = text.chars().count() as u64;
            if let Some(min) = s.get("minLength").and_then(Value::as_u64)
                && n < min
            {
                errors.push(format!("{at}: must be at least {min} characters"));
            }
            if let Some(max) = s.get("maxLength").and_then(Value::as_u64)
                && n > max
            {
                errors.push(format!("{at}: must be at most {max} characters"));
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if let Some(min) = s.get("minimum").and_then(Value::as_f64)
                && x < min
            {
                errors.push(format!("{at}: must be at least {min}"));
            }
            if let Some(max) = s.get("maximum").and_then(Value::as_f64)
                && x > max
            {
                errors.push(format!("{at}: must be at most {max}"));
            }
        }
        Value::Array(items) => {
            if let Some(min) = s.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                errors.push(format!("{at}: must have at least {min} items"));
            }
            if let Some(max) = s.get("maxItems").and_then(Value::as_u64)
                && items.len() as u64 > max
            {
                errors.push(format!("{at}: must have at most {max} items"));
            }
            if let Some(item) = s.get("items") {
                for (i, v) in items.iter().enumerate() {
                    check(item, v, &format!("{at}[{i}]"), errors);
                }
            }
        }
        Value::Object(map) => {
            let props = s.get("properties").and_then(Value::as_object);
            if let Some(Value::Array(required)) = s.get("required") {
                for key in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(key) {
                        errors.push(format!("{at}: missing `{key}`"));
                    }
                }
            }
            for (key, v) in map {
                let path = format!("{at}.{key}");
                match props.and_then(|p| p.get(key)) {
                    Some(sub) => check(sub, v, &path, errors),
                    None => match s.get("additionalProperties") {
                        Some(Value::Bool(false)) => {
                            let known: Vec<&str> = props
                                .map(|p| p.keys().map(String::as_str).collect())
                                .unwrap_or_default();
                            errors.push(format!(
                                "{at}: unknown field `{key}` (known: {})",
                                known.join(", ")
                            ));
                        }
                        Some(sub @ Value::Object(_)) => check(sub, v, &path, errors),
                        _ => {}
                    },
                }
            }
        }
        _ => {}
    }
}

fn is_type(value: &Value, t: &str) -> bool {
    match t {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "null" => value.is_null(),
        _ => true,
    }
}

fn type_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn errors_name_the_place_and_the_rule() {
        let schema = json!({
            "type": "object",
            "properties": {
                "url": {"type": "string", "minLength": 1},
                "method": {"enum": ["GET", "POST"]},
                "timeout_ms": {"type": "integer", "minimum": 1},
                "args": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
            },
            "required": ["url"],
            "additionalProperties": false,
        });
        assert!(validate(&schema, &json!({"url": "http://x", "args": ["a"]})).is_empty());
        let errors = validate(
            &schema,
            &json!({"method": "FETCH", "timeout_ms": 0, "args": ["a", 2, "c"], "bogus": true}),
        );
        assert_eq!(
            errors,
            vec![
                "$: missing `url`",
                "$.method: must be one of \"GET\", \"POST\"",
                "$.timeout_ms: must be at least 1",
                "$.args: must have at most 2 items",
                "$.args[1]: must be string (found integer)",
                "$: unknown field `bogus` (known: url, method, timeout_ms, args)",
            ]
        );
    }

    #[test]
    fn any_of_reports_the_closest_alternative() {
        let schema = json!({"anyOf": [
            {"type": "object", "properties": {"tool": {"const": "a"}, "n": {"type": "integer"}}, "required": ["tool", "n"]},
            {"type": "object", "properties": {"tool": {"const": "b"}}, "required": ["tool"]},
        ]});
        assert!(validate(&schema, &json!({"tool": "b"})).is_empty());
        assert_eq!(
            validate(&schema, &json!({"tool": "a", "n": "x"})),
            vec!["$.n: must be integer (found string)"]
        );
    }
}
