//! `shell.run`: an allowed program with an argv, never a shell string. Class `unsafe`:
//! a crash mid-run leaves its outcome unknown, and only an operator may re-run it.

use std::process::Stdio;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use super::{Call, Tool, ToolError, ToolInfo, bounded_text, opt_u64_param, str_param};

pub struct ShellRun {
    allow: Vec<String>,
    output_bytes_max: usize,
}

impl ShellRun {
    pub fn new(allow: Vec<String>, output_bytes_max: usize) -> ShellRun {
        ShellRun {
            allow,
            output_bytes_max,
        }
    }
}

impl Tool for ShellRun {
    fn info(&self) -> &'static ToolInfo {
        &super::CATALOG[2]
    }

    fn run(&self, call: Call) -> BoxFuture<'_, Result<Value, ToolError>> {
        async move {
            let p = &call.params;
            let program = str_param(p, "program")?;
            if !self.allow.iter().any(|a| a == program) {
                return Err(ToolError::permanent(format!(
                    "program `{program}` is not allowed (CADRE_SHELL_ALLOW: {})",
                    if self.allow.is_empty() {
                        "empty".to_string()
                    } else {
                        self.allow.join(", ")
                    }
                )));
            }
            let args: Vec<String> = match p.get("args") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|a| match a {
                        Value::String(s) => Ok(s.clone()),
                        Value::Number(n) => Ok(n.to_string()),
                        _ => Err(ToolError::permanent(
                            "every element of `args` must be a string",
                        )),
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => {
                    return Err(ToolError::permanent(
                        "param `args` must be a list of strings",
                    ));
                }
            };
            let timeout = opt_u64_param(p, "timeout_ms")?
                .map(std::time::Duration::from_millis)
                .unwrap_or(call.timeout);
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            // A clean environment: the node's own variables (and any secrets in them) do
            // not leak into programs; PATH, HOME and LANG are kept so programs work.
            cmd.env_clear();
            for key in ["PATH", "HOME", "LANG"] {
                if let Ok(v) = std::env::var(key) {
                    cmd.env(key, v);
                }
            }
            cmd.env("CADRE_IDEMPOTENCY_KEY", &call.idempotency_key);
            if let Some(Value::Object(env)) = p.get("env") {
                for (k, v) in env {
                    cmd.env(
                        k,
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string()),
                    );
                }
            }
            if let Some(cwd) = p.get("cwd").and_then(Value::as_str) {
                cmd.current_dir(cwd);
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| ToolError::permanent(format!("cannot start `{program}`: {e}")))?;
            let max = self.output_bytes_max;
            let mut stdout = child.stdout.take();
            let mut stderr = child.stderr.take();
            let run = async {
                let (out, err) = tokio::join!(
                    read_capped(stdout.as_mut(), max),
                    read_capped(stderr.as_mut(), max)
                );
                let status = child.wait().await;
                (out, err, status)
            };
            let Ok((out, err, status)) = tokio::time::timeout(timeout, run).await else {
                // kill_on_drop reaps it; the effect may be partial, so never retried blindly.
                return Err(ToolError::permanent(format!(
                    "`{program}` timed out after {} ms and was killed",
                    timeout.as_millis()
                )));
            };
            let status = status
                .map_err(|e| ToolError::permanent(format!("waiting for `{program}`: {e}")))?;
            let (stdout, stdout_truncated) = bounded_text(&out, max);
            let (stderr, stderr_truncated) = bounded_text(&err, max);
            Ok(json!({
                "exit_code": status.code(),
                "stdout": stdout,
                "stderr": stderr,
                "stdout_truncated": stdout_truncated,
                "stderr_truncated": stderr_truncated,
            }))
        }
        .boxed()
    }
}

/// Reads a pipe to its end, keeping at most `max + 1` bytes (the rest is drained so
/// the child never blocks on a full pipe).
async fn read_capped<R: tokio::io::AsyncRead + Unpin>(
    reader: Option<&mut R>,
    max: usize,
) -> Vec<u8> {
    let Some(reader) = reader else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = (max + 1).saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn call(params: Value) -> Call {
        Call {
            params,
            idempotency_key: "t.s".into(),
            fencing_token: 0,
            timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn runs_allowed_programs_with_argv_only() {
        let tool = ShellRun::new(vec!["echo".into(), "sleep".into()], 8);
        let out = tool
            .run(call(
                json!({"program": "echo", "args": ["a;", "$(rm -rf /)"]}),
            ))
            .await
            .unwrap();
        assert_eq!(out["exit_code"], 0);
        assert_eq!(
            out["stdout"], "a; $(rm ",
            "argv passed verbatim, output capped at 8 bytes"
        );
        assert_eq!(out["stdout_truncated"], true);
        let refused = tool
            .run(call(json!({"program": "sh", "args": ["-c", "true"]})))
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("not allowed"), "{refused}");
        let slow = tool
            .run(call(
                json!({"program": "sleep", "args": ["5"], "timeout_ms": 50}),
            ))
            .await
            .unwrap_err();
        assert!(
            matches!(slow, ToolError::Permanent { .. }) && slow.to_string().contains("timed out"),
            "{slow}"
        );
    }
}
