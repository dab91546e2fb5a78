//! `file.write`: whole-file atomic writes under configured roots.

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use rustix::fs::{self, Mode, OFlags, ResolveFlags};
use rustix::io;
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

/// Where a write lands: its directory, opened by the kernel beneath the root, and the
/// file's name in it.
struct Target {
    /// Opened with `RESOLVE_BENEATH` from the root's own descriptor: every symlink on the
    /// way is resolved by the kernel and nothing outside the root can be opened, also
    /// when a link changes between this check and the write (which then happens through
    /// this descriptor, never through the path again).
    dir: OwnedFd,
    name: OsString,
    /// The path as given, what the output reports.
    path: PathBuf,
}

/// The target if the path is absolute, has no `..`, and lies under a root, also after
/// the kernel resolves the symlinks of its directory. Missing directories are created
/// one at a time, each beneath the root.
fn admit(roots: &[PathBuf], raw: &str) -> Result<Target, ToolError> {
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
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(ToolError::permanent(format!("path `{raw}` names no file")));
    };
    let Ok(below) = parent.strip_prefix(root) else {
        return Err(ToolError::permanent(format!(
            "path `{raw}` names the root itself, not a file in it"
        )));
    };
    let outside = || {
        ToolError::permanent(format!(
            "path `{raw}` resolves outside its root {} (a symlink leaves it, or is absolute)",
            root.display()
        ))
    };
    let cannot = |what: &str, dir: &Path, e: io::Errno| {
        ToolError::permanent(format!("cannot {what} {}: {e}", dir.display()))
    };
    let root_dir = match fs::open(root, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        // Removed after the node started (roots must exist then): not made again.
        Err(io::Errno::NOENT) => {
            return Err(ToolError::permanent(format!(
                "file root {} no longer exists",
                root.display()
            )));
        }
        Err(e) => return Err(cannot("open", root, e)),
    };
    let beneath = |rel: &Path| open_beneath(&root_dir, root, rel);
    // The directory usually exists: opening it is the whole check.
    let dir = match beneath(below) {
        Ok(dir) => dir,
        Err(io::Errno::XDEV) => return Err(outside()),
        Err(io::Errno::NOENT) => {
            // Made a level at a time, each level opened beneath the root first: a
            // symlink out of it never gets a tree made at its far end.
            let mut made: Option<OwnedFd> = None;
            let mut so_far = PathBuf::new();
            for part in below.components() {
                so_far.push(part);
                let mut opened = beneath(&so_far);
                if matches!(opened, Err(io::Errno::NOENT)) {
                    let at = made.as_ref().unwrap_or(&root_dir);
                    match fs::mkdirat(at, part.as_os_str(), Mode::from(0o777)) {
                        Ok(()) | Err(io::Errno::EXIST) => {}
                        Err(e) => return Err(cannot("create", &root.join(&so_far), e)),
                    }
                    opened = beneath(&so_far);
                }
                made = Some(match opened {
                    Ok(next) => next,
                    Err(io::Errno::XDEV) => return Err(outside()),
                    Err(e) => return Err(cannot("resolve", &root.join(&so_far), e)),
                });
            }
            // `below` is not empty here: the root itself was opened above.
            made.ok_or_else(|| cannot("resolve", parent, io::Errno::NOENT))?
        }
        Err(e) => return Err(cannot("resolve", parent, e)),
    };
    Ok(Target {
        dir,
        name: name.to_os_string(),
        path: root.join(below).join(name),
    })
}

/// Directory `rel` of the root, opened by the kernel beneath the root's descriptor.
fn open_beneath(root_dir: &OwnedFd, root: &Path, rel: &Path) -> io::Result<OwnedFd> {
    let rel_or_dot = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    match fs::openat2(root_dir, rel_or_dot, DIR_FLAGS, Mode::empty(), RESOLVE) {
        // `PERM`: a seccomp filter that predates `openat2` (older container runtimes)
        // refuses it so; a real permission problem shows again on the way below.
        Err(io::Errno::NOSYS | io::Errno::PERM) => resolve_then_open(root, rel),
        opened => opened,
    }
}

/// Without `openat2` (Linux before 5.6, a seccomp filter that does not know it, or
/// valgrind before 3.20, which `ops/scripts/instructions-per-task.sh` runs the node
/// under): the directory's real path is checked, then opened, and the write goes
/// through that descriptor. A symlink swapped in between check and open is not caught,
/// as it is with `openat2`; an absolute symlink that stays inside the root is followed.
/// Errors as `openat2`'s: `XDEV` outside the root, `NOENT` missing.
fn resolve_then_open(root: &Path, rel: &Path) -> io::Result<OwnedFd> {
    let real = root
        .join(rel)
        .canonicalize()
        .map_err(|e| io::Errno::from_io_error(&e).unwrap_or(io::Errno::IO))?;
    if !real.starts_with(root) {
        return Err(io::Errno::XDEV);
    }
    fs::open(&real, DIR_FLAGS, Mode::empty())
}

/// Directories are opened to read (an `fsync` needs that), never followed past the root.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC);
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

/// Temp file, write, fsync (if asked), rename over the name, fsync the directory: all
/// through the directory's descriptor.
fn write(target: &Target, content: &[u8], key: &str, fsync: bool) -> Result<(), ToolError> {
    let name = target.name.to_string_lossy();
    // The temp name carries the idempotency key so concurrent attempts never share it.
    let tmp = format!(".{name}.{}.cadre-tmp", sanitize(key));
    let failed = |what: &str, e: std::io::Error| {
        ToolError::retryable(format!("{what} {}: {e}", target.path.display()))
    };
    // `NOFOLLOW`: a link planted at the temp name is refused, not written through.
    let created = fs::openat(
        &target.dir,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from(0o666),
    )
    .map_err(|e| failed("cannot create temp file for", e.into()))?;
    let mut file = std::fs::File::from(created);
    file.write_all(content)
        .map_err(|e| failed("cannot write", e))?;
    if fsync {
        file.sync_all().map_err(|e| failed("cannot sync", e))?;
    }
    drop(file);
    // A link at the final name is replaced, not followed.
    fs::renameat(
        &target.dir,
        tmp.as_str(),
        &target.dir,
        target.name.as_os_str(),
    )
    .map_err(|e| failed("cannot rename into", e.into()))?;
    if fsync {
        fs::fsync(&target.dir).map_err(|e| failed("cannot sync directory of", e.into()))?;
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
                    let target = admit(&roots, &raw)?;
                    write(&target, &content, &key, fsync)?;
                    let sha = storage::codec::to_hex(&Sha256::digest(&content));
                    Ok(json!({"path": target.path.display().to_string(), "bytes": content.len(), "sha256": sha}))
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

    #[test]
    fn without_openat2_the_real_path_is_checked_then_opened() {
        let root = tempfile::tempdir().unwrap();
        let root_path = root.path().canonicalize().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::create_dir(root_path.join("real")).unwrap();
        std::os::unix::fs::symlink("real", root_path.join("beside")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), root_path.join("out")).unwrap();
        let dir = resolve_then_open(&root_path, Path::new("beside")).unwrap();
        fs::mkdirat(&dir, "made", Mode::from(0o777)).unwrap();
        assert!(root_path.join("real/made").is_dir());
        assert_eq!(
            resolve_then_open(&root_path, Path::new("out")).unwrap_err(),
            io::Errno::XDEV
        );
        assert_eq!(
            resolve_then_open(&root_path, Path::new("missing")).unwrap_err(),
            io::Errno::NOENT
        );
        assert!(resolve_then_open(&root_path, Path::new("")).is_ok());
    }

    #[tokio::test]
    async fn links_inside_the_root_are_followed_and_links_out_never_written_through() {
        let root = tempfile::tempdir().unwrap();
        let root_path = root.path().canonicalize().unwrap();
        let tool = FileWrite::new(vec![root_path.clone()], true);
        let elsewhere = tempfile::tempdir().unwrap();
        let secret = elsewhere.path().join("secret");
        std::fs::write(&secret, "untouched").unwrap();

        // A relative link from one directory of the root to another stays inside it:
        // followed, and new directories are made behind it.
        std::fs::create_dir_all(root_path.join("real")).unwrap();
        std::fs::create_dir_all(root_path.join("sub")).unwrap();
        std::os::unix::fs::symlink("real", root_path.join("beside")).unwrap();
        std::os::unix::fs::symlink("../real", root_path.join("sub/up")).unwrap();
        for (link, content) in [("beside", "b"), ("sub/up", "u")] {
            let path = root_path.join(link).join("new/file");
            let out = tool
                .run(call(path.to_str().unwrap(), content))
                .await
                .unwrap();
            assert_eq!(out["path"], path.to_str().unwrap());
            assert_eq!(
                std::fs::read_to_string(root_path.join("real/new/file")).unwrap(),
                content
            );
        }
        // An absolute link is refused even where it points inside the root: the kernel
        // resolves beneath the root's descriptor, where `/` is out of bounds.
        std::os::unix::fs::symlink(root_path.join("real"), root_path.join("absolute")).unwrap();
        refused(&tool, &root_path.join("absolute/file"), "symlink").await;

        // A link at the file's own name, to a file outside: the link is replaced by the
        // file, the far end is not written.
        let named = root_path.join("named");
        std::os::unix::fs::symlink(&secret, &named).unwrap();
        tool.run(call(named.to_str().unwrap(), "mine"))
            .await
            .unwrap();
        assert!(!named.is_symlink(), "the link was written through");
        assert_eq!(std::fs::read_to_string(&named).unwrap(), "mine");
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "untouched");

        // A link planted at the temp name: the write is refused, nothing outside changes.
        let planted = root_path.join(".planted.t.s.cadre-tmp");
        std::os::unix::fs::symlink(&secret, &planted).unwrap();
        let err = tool
            .run(call(root_path.join("planted").to_str().unwrap(), "x"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("cannot create temp file"), "{err}");
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "untouched");

        // The root itself is no file in it.
        refused(&tool, &root_path, "names the root itself").await;
        assert!(root_path.is_dir());

        // A link whose target leaves the root through `..`: refused as a symlink.
        std::os::unix::fs::symlink("../..", root_path.join("up")).unwrap();
        refused(&tool, &root_path.join("up/file"), "symlink").await;
        refused(&tool, &root_path.join("up/new/file"), "symlink").await;
    }
}
