//! `file.write`: whole-file atomic writes under configured roots.

use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::blocking_pool::BlockingPool;
use super::{Call, Tool, ToolError, ToolInfo, str_param};

pub struct FileWrite {
    roots: Arc<Vec<PathBuf>>,
    fsync: bool,
    /// Writes run here, not on tokio's blocking pool (see [`BlockingPool`]): two threads
    /// while writes are quick, up to 64 when a slow disk makes them wait.
    pool: Arc<BlockingPool>,
}

impl FileWrite {
    pub fn new(roots: Vec<PathBuf>, fsync: bool) -> FileWrite {
        FileWrite {
            roots: Arc::new(roots),
            fsync,
            pool: Arc::new(BlockingPool::new(
                "cadre-file-io",
                2,
                64,
                Duration::from_millis(2),
                Duration::from_secs(10),
            )),
        }
    }
}

/// The path if it is absolute, has no `..`, and lies under a root, also after resolving
/// symlinks of its parent directory.
fn admit(roots: &[PathBuf], raw: &str) -> Result<PathBuf, ToolError> {
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(ToolError::permanent(format!(
            "path `{raw}` must be absolute"
        )));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(ToolError::permanent(format!(
            "path `{raw}` must not contain `..`"
        )));
    }
    let Some(root) = roots.iter().find(|r| path.starts_with(r)) else {
        return Err(ToolError::permanent(format!(
            "path `{raw}` is outside the configured file roots ({})",
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let parent = path
        .parent()
        .ok_or_else(|| ToolError::permanent(format!("path `{raw}` has no parent")))?;
    if path.file_name().is_none() {
        return Err(ToolError::permanent(format!("path `{raw}` names no file")));
    }
    let outside = || {
        ToolError::permanent(format!(
            "path `{raw}` resolves outside its root {} (symlink)",
            root.display()
        ))
    };
    let unresolved = |dir: &Path, e: std::io::Error| {
        ToolError::permanent(format!("cannot resolve {}: {e}", dir.display()))
    };
    let resolve = |dir: &Path| dir.canonicalize().map_err(|e| unresolved(dir, e));
    // The parent usually exists: resolving it is the whole check (no mkdir, no stat).
    let real_parent = match parent.canonicalize() {
        Ok(real) => real,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Directories are created only under an ancestor that resolves inside the
            // root: a symlink out of it must not get a tree made at its far end.
            let existing = parent
                .ancestors()
                .find(|a| a.exists())
                .unwrap_or(Path::new("/"));
            if !resolve(existing)?.starts_with(root) {
                // Nothing of the root is left: it was removed after the node started
                // (roots must exist then), which is not a symlink's doing.
                if root.starts_with(existing) && existing != root.as_path() {
                    return Err(ToolError::permanent(format!(
                        "file root {} no longer exists",
                        root.display()
                    )));
                }
                return Err(outside());
            }
            std::fs::create_dir_all(parent).map_err(|e| {
                ToolError::permanent(format!("cannot create {}: {e}", parent.display()))
            })?;
            resolve(parent)?
        }
        Err(e) => return Err(unresolved(parent, e)),
    };
    if !real_parent.starts_with(root) {
        return Err(outside());
    }
    Ok(real_parent.join(path.file_name().unwrap_or_default()))
}

/// Temp file, write, fsync (if asked), rename over `path`, fsync its directory.
fn write(path: &Path, content: &[u8], key: &str, fsync: bool) -> Result<(), ToolError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    // The temp name carries the idempotency key so concurrent attempts never share it.
    let tmp = dir.join(format!(".{name}.{}.cadre-tmp", sanitize(key)));
    let io = |what: &str, e: std::io::Error| {
        ToolError::retryable(format!("{what} {}: {e}", path.display()))
    };
    let mut file = std::fs::File::create(&tmp).map_err(|e| io("cannot create temp file for", e))?;
    file.write_all(content).map_err(|e| io("cannot write", e))?;
    if fsync {
        file.sync_all().map_err(|e| io("cannot sync", e))?;
    }
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| io("cannot rename into", e))?;
    if fsync {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("cannot sync directory of", e))?;
    }
    Ok(())
}

fn sanitize(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Tool for FileWrite {
    fn info(&self) -> &'static ToolInfo {
        &super::CATALOG[0]
    }

    fn run(&self, call: Call) -> BoxFuture<'_, Result<Value, ToolError>> {
        async move {
            let raw = str_param(&call.params, "path")?.to_string();
            let content = match call.params.get("content") {
                Some(Value::String(s)) => s.clone().into_bytes(),
                Some(other) => serde_json::to_vec_pretty(other).unwrap_or_default(),
                None => return Err(ToolError::permanent("param `content` is missing")),
            };
            let (roots, fsync) = (self.roots.clone(), self.fsync);
            let key = call.idempotency_key.clone();
            self.pool
                .run(move || {
                    let path = admit(&roots, &raw)?;
                    write(&path, &content, &key, fsync)?;
                    let sha = storage::codec::to_hex(&Sha256::digest(&content));
                    Ok(json!({"path": path.display().to_string(), "bytes": content.len(), "sha256": sha}))
                })
                .await
                .map_err(|e| ToolError::retryable(format!("file.write worker failed: {e}")))?
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn call(path: &str, content: &str) -> Call {
        Call {
            params: json!({"path": path, "content": content}),
            idempotency_key: "t.s".into(),
            fencing_token: 0,
            timeout: Duration::from_secs(5),
        }
    }

    /// Writing `path` fails with an error that says `why`.
    async fn refused(tool: &FileWrite, path: &Path, why: &str) {
        let err = tool
            .run(call(path.to_str().unwrap(), "x"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(why), "{}: {err}", path.display());
    }

    #[tokio::test]
    async fn writes_under_root_and_refuses_escapes() {
        let root = tempfile::tempdir().unwrap();
        let root_path = root.path().canonicalize().unwrap();
        let tool = FileWrite::new(vec![root_path.clone()], true);
        let target = root_path.join("acme/README.md");
        let out = tool
            .run(call(target.to_str().unwrap(), "# Acme"))
            .await
            .unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "# Acme");
        assert_eq!(out["bytes"], 6);

        let outside = tool.run(call("/etc/cadre-test", "x")).await.unwrap_err();
        assert!(
            outside
                .to_string()
                .contains("outside the configured file roots"),
            "{outside}"
        );
        let dotdot = format!("{}/../escape", root_path.display());
        assert!(
            tool.run(call(&dotdot, "x"))
                .await
                .unwrap_err()
                .to_string()
                .contains("..")
        );
        assert!(
            tool.run(call("relative/path", "x"))
                .await
                .unwrap_err()
                .to_string()
                .contains("absolute")
        );

        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), root_path.join("link")).unwrap();
        refused(&tool, &root_path.join("link/file"), "symlink").await;
        assert!(!elsewhere.path().join("file").exists());

        // A missing directory behind the link: refused before anything is created there.
        refused(&tool, &root_path.join("link/new/dir/file"), "symlink").await;
        assert!(!elsewhere.path().join("new").exists());

        // A root removed after the start is named as such, and not made again.
        let gone = tempfile::tempdir().unwrap();
        let gone_root = gone.path().canonicalize().unwrap().join("root");
        std::fs::create_dir(&gone_root).unwrap();
        let tool_gone = FileWrite::new(vec![gone_root.clone()], false);
        std::fs::remove_dir(&gone_root).unwrap();
        refused(&tool_gone, &gone_root.join("x/file"), "no longer exists").await;
        assert!(!gone_root.exists());

        // Missing directories inside the root are created, as before.
        let nested = root_path.join("a/b/c/file.txt");
        tool.run(call(nested.to_str().unwrap(), "nested"))
            .await
            .unwrap();
        assert_eq!(std::fs::read_to_string(&nested).unwrap(), "nested");
    }
}
