//! `file` category tasks: temp-file cleanup, compressed backups with a checksum manifest
//! and retention, and a one-way sync into a JetStream Object Store bucket.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use taskmesh_nats::async_nats::jetstream::object_store::ObjectMetadata;
use taskmesh_shared::{NameError, TaskError};

use super::fsutil::{self, checked_root, walk_files};
use super::{Catalog, add, blocking, skipped, store};
use crate::registry::{Registry, TaskContext, TaskPolicy};

/// At most this many error messages are kept in a result.
const MAX_ERRORS: usize = 100;

fn push_error(errors: &mut Vec<String>, e: String) {
    if errors.len() < MAX_ERRORS {
        errors.push(e);
    }
}

// ---------------------------------------------------------------------------------------
// file.cleanup_temp_files
// ---------------------------------------------------------------------------------------

/// Arguments of `file.cleanup_temp_files`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CleanupArgs {
    /// Directories to clean; default `TASKMESH_TEMP_DIRS`.
    #[serde(default)]
    pub dirs: Option<Vec<PathBuf>>,
    /// Remove regular files older than this; default `TASKMESH_TEMP_MAX_AGE` (24 h).
    #[serde(default)]
    pub max_age_secs: Option<u64>,
    /// Only count what would be removed.
    #[serde(default)]
    pub dry_run: bool,
}

/// Result of `file.cleanup_temp_files` and `maintenance.cleanup_old_logs`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CleanupResult {
    /// Files removed (or that would be, with `dry_run`).
    pub files_removed: u64,
    /// Their total size.
    pub bytes_freed: u64,
    /// Files compressed (`cleanup_old_logs` with compression).
    #[serde(skip_serializing_if = "is_zero")]
    pub files_compressed: u64,
    /// Problems met (at most 100 listed); the run goes on past them.
    pub errors: Vec<String>,
    /// Whether this was a dry run.
    pub dry_run: bool,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Validates and resolves cleanup roots (`field[i]`).
pub fn resolve_roots(dirs: &[PathBuf], field: &str) -> Result<Vec<PathBuf>, TaskError> {
    if dirs.len() > 100 {
        return Err(TaskError::permanent(format!(
            "{field}: at most 100 directories"
        )));
    }
    dirs.iter()
        .enumerate()
        .map(|(i, d)| checked_root(d, &format!("{field}[{i}]")))
        .collect()
}

/// The blocking body of `file.cleanup_temp_files`: removes regular files older than
/// `max_age` under each (already checked) root.
pub fn cleanup(roots: &[PathBuf], max_age: Duration, dry_run: bool) -> CleanupResult {
    let mut r = CleanupResult {
        dry_run,
        ..CleanupResult::default()
    };
    for root in roots {
        let mut victims = Vec::new();
        for e in walk_files(root, &mut |f| {
            if fsutil::age(&f.meta) > max_age {
                victims.push((f.path, f.meta.len()));
            }
        }) {
            push_error(&mut r.errors, e);
        }
        for (path, size) in victims {
            if dry_run {
                r.files_removed += 1;
                r.bytes_freed += size;
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    r.files_removed += 1;
                    r.bytes_freed += size;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => push_error(&mut r.errors, format!("{}: {e}", path.display())),
            }
        }
    }
    r
}

/// `file.cleanup_temp_files`: deletes regular files older than `max_age_secs` under the
/// given directories. Never follows symbolic links, never leaves a root (nor its file
/// system), refuses `/` and the home directory (permanent). A root that does not exist is
/// retryable (a volume not mounted yet). `{"skipped": …}` with no directories configured.
pub async fn cleanup_temp_files(
    c: Arc<Catalog>,
    _ctx: TaskContext,
    a: CleanupArgs,
) -> Result<serde_json::Value, TaskError> {
    let dirs = a.dirs.unwrap_or_else(|| c.settings.temp_dirs.clone());
    if dirs.is_empty() {
        return Ok(skipped("no dirs configured (TASKMESH_TEMP_DIRS)"));
    }
    let max_age = a
        .max_age_secs
        .map_or(c.settings.temp_max_age, Duration::from_secs);
    let dry_run = a.dry_run;
    let r = blocking(move || {
        let roots = resolve_roots(&dirs, "dirs")?;
        Ok(cleanup(&roots, max_age, dry_run))
    })
    .await?;
    serde_json::to_value(r).map_err(|e| TaskError::permanent(e.to_string()))
}

// ---------------------------------------------------------------------------------------
// file.backup_user_data
// ---------------------------------------------------------------------------------------

/// Arguments of `file.backup_user_data`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupArgs {
    /// Files or directories to back up; default `TASKMESH_BACKUP_SOURCES`.
    #[serde(default)]
    pub sources: Option<Vec<PathBuf>>,
    /// Where archives go; default `TASKMESH_BACKUP_DEST`.
    #[serde(default)]
    pub dest_dir: Option<PathBuf>,
    /// Archives kept (1..=1000); default `TASKMESH_BACKUP_KEEP` (4).
    #[serde(default)]
    pub keep: Option<usize>,
}

/// Result of `file.backup_user_data`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BackupResult {
    /// The archive (`backup-<UTC time>-<task digest>.tar.gz`).
    pub archive: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256 (hex), also in `<archive>.sha256`.
    pub sha256: String,
    /// Files archived (listed with their SHA-256 in `MANIFEST.sha256` inside).
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
    /// Older archives removed by retention.
    pub removed: Vec<PathBuf>,
    /// True when this task id's archive already existed (a redelivery): nothing was redone.
    pub reused: bool,
}

/// Reads through to `inner` while hashing.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Archive names start with this.
pub const BACKUP_PREFIX: &str = "backup-";
/// Archive names end with this.
pub const BACKUP_SUFFIX: &str = ".tar.gz";

/// The blocking body of `file.backup_user_data`.
pub fn backup(
    task_id: &str,
    sources: &[PathBuf],
    dest: &Path,
    keep: usize,
) -> Result<BackupResult, TaskError> {
    for (i, s) in sources.iter().enumerate() {
        if !s.is_absolute() {
            return Err(TaskError::permanent(format!(
                "sources[{i}]: {} must be an absolute path",
                s.display()
            )));
        }
        if std::fs::symlink_metadata(s).is_err() {
            return Err(TaskError::retryable(format!(
                "sources[{i}]: {} does not exist (not mounted yet?)",
                s.display()
            )));
        }
    }
    if !dest.is_absolute() {
        return Err(TaskError::permanent("dest_dir: must be an absolute path"));
    }
    if !dest.is_dir() {
        return Err(TaskError::retryable(format!(
            "dest_dir: {} does not exist (backup volume not mounted?)",
            dest.display()
        )));
    }
    let dest =
        std::fs::canonicalize(dest).map_err(|e| TaskError::retryable(format!("dest_dir: {e}")))?;
    let tag = &fsutil::sha256_hex(task_id.as_bytes())[..12];
    // A redelivered task finds its finished archive and reuses it.
    if let Some(existing) = list_backups(&dest)?.into_iter().find(|p| {
        p.to_string_lossy()
            .ends_with(&format!("-{tag}{BACKUP_SUFFIX}"))
    }) {
        let size = std::fs::metadata(&existing).map(|m| m.len()).unwrap_or(0);
        let sha = std::fs::read_to_string(sidecar(&existing))
            .ok()
            .and_then(|s| s.split_whitespace().next().map(str::to_owned))
            .unwrap_or_default();
        let removed = retention(&dest, keep)?;
        return Ok(BackupResult {
            archive: existing,
            size,
            sha256: sha,
            files: 0,
            bytes: 0,
            removed,
            reused: true,
        });
    }
    let name = format!(
        "{BACKUP_PREFIX}{}-{tag}{BACKUP_SUFFIX}",
        Utc::now().format("%Y%m%dT%H%M%S%3fZ")
    );
    let final_path = dest.join(&name);
    let partial = dest.join(format!(".{name}.partial"));
    let io = |what: &str, e: std::io::Error| TaskError::retryable(format!("{what}: {e}"));
    let file = std::fs::File::create(&partial).map_err(|e| io("creating the archive", e))?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut manifest = String::new();
    let (mut files, mut bytes) = (0u64, 0u64);
    for src in sources {
        let label = src
            .file_name()
            .map_or_else(|| "root".to_owned(), |n| n.to_string_lossy().into_owned());
        let mut found = Vec::new();
        let meta = std::fs::symlink_metadata(src).map_err(|e| io("reading a source", e))?;
        if meta.is_file() {
            found.push((src.clone(), label.clone()));
        } else if meta.is_dir() {
            let errors = walk_files(src, &mut |f| {
                if f.path.starts_with(&dest) {
                    return; // never archive the archives
                }
                let rel = f.path.strip_prefix(src).unwrap_or(&f.path);
                found.push((f.path.clone(), format!("{label}/{}", rel.display())));
            });
            if let Some(e) = errors.into_iter().next() {
                let _ = std::fs::remove_file(&partial);
                return Err(TaskError::retryable(format!(
                    "reading {}: {e}",
                    src.display()
                )));
            }
        }
        found.sort();
        for (path, name) in found {
            let f = std::fs::File::open(&path).map_err(|e| io("opening a file", e))?;
            let m = f.metadata().map_err(|e| io("reading a file", e))?;
            let mut header = tar::Header::new_gnu();
            header.set_metadata(&m);
            let mut reader = HashingReader {
                inner: f.take(m.len()),
                hasher: Sha256::new(),
            };
            tar.append_data(&mut header, &name, &mut reader)
                .map_err(|e| io(&format!("archiving {}", path.display()), e))?;
            manifest.push_str(&format!(
                "{}  {name}\n",
                fsutil::hex(&reader.hasher.finalize())
            ));
            files += 1;
            bytes += m.len();
        }
    }
    let mut header = tar::Header::new_gnu();
    header.set_size(manifest.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(u64::try_from(Utc::now().timestamp()).unwrap_or(0));
    tar.append_data(&mut header, "MANIFEST.sha256", manifest.as_bytes())
        .map_err(|e| io("writing the manifest", e))?;
    let gz = tar
        .into_inner()
        .map_err(|e| io("finishing the archive", e))?;
    let file = gz.finish().map_err(|e| io("finishing the archive", e))?;
    file.sync_all().map_err(|e| io("syncing the archive", e))?;
    drop(file);
    let sum = fsutil::sha256_file(&partial).map_err(|e| io("hashing the archive", e))?;
    let sha256 = fsutil::hex(&sum);
    let size = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    let mut side =
        std::fs::File::create(sidecar(&final_path)).map_err(|e| io("writing the checksum", e))?;
    side.write_all(format!("{sha256}  {name}\n").as_bytes())
        .and_then(|()| side.sync_all())
        .map_err(|e| io("writing the checksum", e))?;
    std::fs::rename(&partial, &final_path).map_err(|e| io("renaming the archive", e))?;
    let removed = retention(&dest, keep)?;
    Ok(BackupResult {
        archive: final_path,
        size,
        sha256,
        files,
        bytes,
        removed,
        reused: false,
    })
}

fn sidecar(archive: &Path) -> PathBuf {
    let mut s = archive.as_os_str().to_owned();
    s.push(".sha256");
    PathBuf::from(s)
}

/// Finished archives in `dest`, oldest first (names carry the UTC time).
fn list_backups(dest: &Path) -> Result<Vec<PathBuf>, TaskError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dest)
        .map_err(|e| TaskError::retryable(format!("dest_dir: {e}")))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(BACKUP_PREFIX) && n.ends_with(BACKUP_SUFFIX))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Removes all but the newest `keep` archives (and their `.sha256` files).
fn retention(dest: &Path, keep: usize) -> Result<Vec<PathBuf>, TaskError> {
    let all = list_backups(dest)?;
    let excess = all.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for p in all.into_iter().take(excess) {
        if std::fs::remove_file(&p).is_ok() {
            let _ = std::fs::remove_file(sidecar(&p));
            removed.push(p);
        }
    }
    Ok(removed)
}

/// `file.backup_user_data`: a `tar.gz` of the sources with `MANIFEST.sha256` (one
/// `sha256sum` line per file) as its last entry, written as a hidden `.partial` file and
/// renamed when complete, a `<archive>.sha256` beside it, then retention of the newest
/// `keep` archives. The archive name carries a digest of the task id, so a redelivered
/// task reuses its archive. Missing sources or destination are retryable.
pub async fn backup_user_data(
    c: Arc<Catalog>,
    ctx: TaskContext,
    a: BackupArgs,
) -> Result<serde_json::Value, TaskError> {
    let keep = a.keep.unwrap_or(c.settings.backup_keep);
    if !(1..=1000).contains(&keep) {
        return Err(TaskError::permanent("keep: must be within 1..=1000"));
    }
    let sources = a
        .sources
        .unwrap_or_else(|| c.settings.backup_sources.clone());
    let Some(dest) = a.dest_dir.or_else(|| c.settings.backup_dest.clone()) else {
        return Ok(skipped("no dest_dir configured (TASKMESH_BACKUP_DEST)"));
    };
    if sources.is_empty() {
        return Ok(skipped("no sources configured (TASKMESH_BACKUP_SOURCES)"));
    }
    let id = ctx.id.clone();
    let r = blocking(move || backup(&id, &sources, &dest, keep)).await?;
    serde_json::to_value(r).map_err(|e| TaskError::permanent(e.to_string()))
}

// ---------------------------------------------------------------------------------------
// file.sync_cloud_storage
// ---------------------------------------------------------------------------------------

/// Arguments of `file.sync_cloud_storage`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudSyncArgs {
    /// The directory to upload; default `TASKMESH_SYNC_DIR`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Object Store bucket; default `TASKMESH_SYNC_BUCKET` (`TASKMESH_FILES`).
    #[serde(default)]
    pub bucket: Option<String>,
    /// Delete objects whose file is gone; default `TASKMESH_SYNC_DELETE` (false).
    #[serde(default)]
    pub delete: Option<bool>,
}

/// Result of `file.sync_cloud_storage`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CloudSyncResult {
    /// The bucket.
    pub bucket: String,
    /// Files uploaded (new or changed).
    pub uploaded: u64,
    /// Files whose object already had the same digest.
    pub unchanged: u64,
    /// Objects deleted (their file is gone).
    pub deleted: u64,
    /// Bytes uploaded.
    pub bytes_uploaded: u64,
    /// Per-file problems (at most 100 listed).
    pub errors: Vec<String>,
}

/// The Object Store's digest format: `SHA-256=<base64url>`.
pub fn object_digest(sum: &[u8; 32]) -> String {
    format!(
        "SHA-256={}",
        base64::engine::general_purpose::URL_SAFE.encode(sum)
    )
}

fn valid_bucket(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
}

/// `file.sync_cloud_storage`: one-way sync of a directory into an Object Store bucket. Each
/// regular file (no symlinks) is the object named by its path relative to the directory;
/// it is uploaded only when the bucket has no object of that name with the same SHA-256
/// digest. Resumable: an interrupted run leaves the finished uploads in place (an object
/// becomes visible only once complete), so the next run uploads only what is missing or
/// changed. With `delete`, objects whose file is gone are deleted.
pub async fn sync_cloud_storage(
    c: Arc<Catalog>,
    ctx: TaskContext,
    a: CloudSyncArgs,
) -> Result<serde_json::Value, TaskError> {
    let bucket = a.bucket.unwrap_or_else(|| c.settings.sync_bucket.clone());
    if !valid_bucket(&bucket) {
        return Err(TaskError::permanent(
            "bucket: letters, digits, `_` and `-` only, at most 64",
        ));
    }
    let Some(dir) = a.dir.or_else(|| c.settings.sync_dir.clone()) else {
        return Ok(skipped("no dir configured (TASKMESH_SYNC_DIR)"));
    };
    let delete = a.delete.unwrap_or(c.settings.sync_delete);
    // Walk and hash locally (blocking).
    let local: Vec<(String, PathBuf, u64, [u8; 32])> = blocking(move || {
        if !dir.is_absolute() {
            return Err(TaskError::permanent("dir: must be an absolute path"));
        }
        if !dir.is_dir() {
            return Err(TaskError::retryable(format!(
                "dir: {} does not exist (not mounted yet?)",
                dir.display()
            )));
        }
        let mut files = Vec::new();
        let errors = walk_files(&dir, &mut |f| files.push((f.path, f.meta.len())));
        if let Some(e) = errors.into_iter().next() {
            return Err(TaskError::retryable(format!("dir: {e}")));
        }
        let mut out = Vec::with_capacity(files.len());
        for (path, size) in files {
            let rel = path
                .strip_prefix(&dir)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            let sum = fsutil::sha256_file(&path)
                .map_err(|e| TaskError::retryable(format!("hashing {}: {e}", path.display())))?;
            out.push((rel, path, size, sum));
        }
        out.sort();
        Ok(out)
    })
    .await?;
    let conn = c.nats()?;
    let os = store::object_bucket(conn, &c.cfg, &bucket).await?;
    let mut remote: HashMap<String, Option<String>> = HashMap::new();
    {
        use futures::StreamExt;
        let mut list = os
            .list()
            .await
            .map_err(|e| store::nats_error("listing the object store", e))?;
        while let Some(info) = list.next().await {
            let info = info.map_err(|e| store::nats_error("listing the object store", e))?;
            if !info.deleted {
                remote.insert(info.name, info.digest);
            }
        }
    }
    let mut r = CloudSyncResult {
        bucket,
        ..CloudSyncResult::default()
    };
    let mut seen = BTreeMap::new();
    for (name, path, size, sum) in local {
        if ctx.cancel.is_cancelled() {
            return Err(TaskError::retryable("cancelled; the next run resumes"));
        }
        let digest = object_digest(&sum);
        seen.insert(name.clone(), ());
        if remote.get(&name).and_then(Option::as_deref) == Some(digest.as_str()) {
            r.unchanged += 1;
            continue;
        }
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) => {
                push_error(&mut r.errors, format!("{name}: {e}"));
                continue;
            }
        };
        let meta = ObjectMetadata {
            name: name.clone(),
            ..Default::default()
        };
        match os.put(meta, &mut file).await {
            Ok(info) => {
                if info.digest.as_deref() != Some(digest.as_str()) {
                    // The file changed while it was read; the next run uploads it again.
                    push_error(&mut r.errors, format!("{name}: changed during upload"));
                }
                r.uploaded += 1;
                r.bytes_uploaded += size;
            }
            Err(e) => return Err(store::nats_error(&format!("uploading {name}"), e)),
        }
    }
    if delete {
        for name in remote.keys() {
            if !seen.contains_key(name) {
                os.delete(name)
                    .await
                    .map_err(|e| store::nats_error(&format!("deleting {name}"), e))?;
                r.deleted += 1;
            }
        }
    }
    serde_json::to_value(r).map_err(|e| TaskError::permanent(e.to_string()))
}

/// Registers the `file` tasks.
pub fn register(r: &mut Registry, c: &Arc<Catalog>) -> Result<(), NameError> {
    add(
        r,
        c,
        "file.cleanup_temp_files",
        TaskPolicy::retry_delay(Duration::from_secs(600)),
        cleanup_temp_files,
    )?;
    add(
        r,
        c,
        "file.backup_user_data",
        TaskPolicy::retry_delay(Duration::from_secs(3600)),
        backup_user_data,
    )?;
    add(
        r,
        c,
        "file.sync_cloud_storage",
        TaskPolicy::default(),
        sync_cloud_storage,
    )?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_removes_only_old_regular_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("old"), b"12345").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("ln")).unwrap();
        let roots = resolve_roots(&[d.path().to_path_buf()], "dirs").unwrap();
        let dry = cleanup(&roots, Duration::ZERO, true);
        assert_eq!((dry.files_removed, dry.bytes_freed), (1, 5));
        assert!(d.path().join("old").exists());
        let r = cleanup(&roots, Duration::ZERO, false);
        assert_eq!(r.files_removed, 1);
        assert!(!d.path().join("old").exists());
        assert!(outside.path().join("keep").exists());
        let kept = cleanup(&roots, Duration::from_secs(3600), false);
        assert_eq!(kept.files_removed, 0);
    }

    #[test]
    fn backups_rotate_and_reuse() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("a.txt"), b"alpha").unwrap();
        let dest = tempfile::tempdir().unwrap();
        let b1 = backup("t1", &[src.path().to_path_buf()], dest.path(), 2).unwrap();
        assert_eq!(b1.files, 1);
        assert!(!b1.reused);
        let again = backup("t1", &[src.path().to_path_buf()], dest.path(), 2).unwrap();
        assert!(again.reused);
        assert_eq!(again.archive, b1.archive);
        assert_eq!(again.sha256, b1.sha256);
        backup("t2", &[src.path().to_path_buf()], dest.path(), 2).unwrap();
        let b3 = backup("t3", &[src.path().to_path_buf()], dest.path(), 2).unwrap();
        assert_eq!(b3.removed.len(), 1);
        assert_eq!(list_backups(dest.path()).unwrap().len(), 2);
    }
}
