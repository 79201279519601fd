//! File-system helpers shared by the file and maintenance tasks: a directory walk that never
//! follows symbolic links, never leaves its root (nor its file system), and a guard that
//! refuses `/` and the home directory as roots.
//!
//! All of it is blocking: call it from `spawn_blocking`.

use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use taskmesh_shared::TaskError;

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// SHA-256 of a file's content, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// Checks a directory given as a cleanup root: absolute, existing, a real directory (the
/// path is resolved once here), and neither `/` nor the home directory nor one of the
/// home directory's ancestors. `field` names the argument in error messages (`dirs[0]`).
///
/// A missing root is a *retryable* error (a volume that is not mounted yet); everything
/// else is permanent.
pub fn checked_root(path: &Path, field: &str) -> Result<PathBuf, TaskError> {
    if !path.is_absolute() {
        return Err(TaskError::permanent(format!(
            "{field}: {} must be an absolute path",
            path.display()
        )));
    }
    let real = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TaskError::retryable(format!(
                "{field}: {} does not exist (not mounted yet?)",
                path.display()
            )));
        }
        Err(e) => {
            return Err(TaskError::retryable(format!(
                "{field}: cannot resolve {}: {e}",
                path.display()
            )));
        }
    };
    if real == Path::new("/") {
        return Err(TaskError::permanent(format!(
            "{field}: refusing the file-system root {}",
            path.display()
        )));
    }
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        let home = std::fs::canonicalize(&home).unwrap_or_else(|_| PathBuf::from(home));
        if home.starts_with(&real) {
            return Err(TaskError::permanent(format!(
                "{field}: refusing {} (the home directory or one of its parents)",
                path.display()
            )));
        }
    }
    if !real.is_dir() {
        return Err(TaskError::permanent(format!(
            "{field}: {} is not a directory",
            path.display()
        )));
    }
    Ok(real)
}

/// One regular file found by [`walk_files`].
#[derive(Debug)]
pub struct Found {
    /// Its path (under the root).
    pub path: PathBuf,
    /// Its metadata (`lstat`).
    pub meta: Metadata,
}

/// Visits every regular file under `root`, depth first. Symbolic links (to files or
/// directories) are never followed nor reported; directories on another file system
/// (mount points) are not entered. Errors are collected as text and the walk goes on.
pub fn walk_files(root: &Path, visit: &mut dyn FnMut(Found)) -> Vec<String> {
    let mut errors = Vec::new();
    let root_dev = match std::fs::symlink_metadata(root) {
        Ok(m) if m.is_dir() => m.dev(),
        Ok(_) => {
            errors.push(format!("{} is not a directory", root.display()));
            return errors;
        }
        Err(e) => {
            errors.push(format!("{}: {e}", root.display()));
            return errors;
        }
    };
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                errors.push(format!("{}: {e}", dir.display()));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    errors.push(format!("{}: {e}", dir.display()));
                    continue;
                }
            };
            let path = entry.path();
            // lstat: a symlink is reported as a symlink, never as its target.
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    errors.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            let ft = meta.file_type();
            if ft.is_symlink() {
                continue;
            }
            if ft.is_dir() {
                if meta.dev() == root_dev {
                    stack.push(path);
                }
            } else if ft.is_file() {
                visit(Found { path, meta });
            }
        }
    }
    errors
}

/// Age of a file by modification time, zero for times in the future.
pub fn age(meta: &Metadata) -> std::time::Duration {
    meta.modified()
        .ok()
        .and_then(|m| m.elapsed().ok())
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn walk_skips_symlinks_and_stays_inside() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), b"x").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("sub")).unwrap();
        std::fs::write(root.path().join("sub/a"), b"a").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("link-dir")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("victim"), root.path().join("link-file"))
            .unwrap();
        let mut seen = Vec::new();
        let errors = walk_files(root.path(), &mut |f| seen.push(f.path));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(seen, vec![root.path().join("sub/a")]);
    }

    #[test]
    fn roots_are_checked() {
        assert!(
            !checked_root(Path::new("/"), "dirs[0]")
                .unwrap_err()
                .is_retryable()
        );
        assert!(
            !checked_root(Path::new("rel"), "dirs[0]")
                .unwrap_err()
                .is_retryable()
        );
        assert!(
            checked_root(Path::new("/no/such/dir/xyz"), "dirs[0]")
                .unwrap_err()
                .is_retryable()
        );
        if let Some(home) = std::env::var_os("HOME") {
            assert!(checked_root(Path::new(&home), "d").is_err());
        }
        let t = tempfile::tempdir().unwrap();
        assert!(checked_root(t.path(), "d").is_ok());
        assert_eq!(sha256_hex(b"abc").len(), 64);
    }
}
