//! `maintenance` category tasks: the mesh's health check, log cleanup (compress, then
//! delete), database optimization and expired-session cleanup.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use taskmesh_nats::Heartbeats;
use taskmesh_shared::wire;
use taskmesh_shared::{Lane, NameError, TaskError};

use super::db::{self, Database};
use super::file::{CleanupResult, resolve_roots};
use super::fsutil::{self, walk_files};
use super::{Catalog, add, blocking, skipped, store};
use crate::registry::{Registry, TaskContext, TaskPolicy};

// ---------------------------------------------------------------------------------------
// maintenance.system_health_check
// ---------------------------------------------------------------------------------------

/// Arguments of `maintenance.system_health_check`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthArgs {
    /// Pending tasks per category before "degraded"; default `TASKMESH_HEALTH_MAX_PENDING`.
    #[serde(default)]
    pub max_pending: Option<u64>,
}

/// One category's backlog.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CategoryHealth {
    /// Messages waiting, all lanes.
    pub pending: u64,
    /// Delivered, not yet acknowledged, all lanes.
    pub ack_pending: u64,
    /// Redelivered at least once, all lanes.
    pub redelivered: u64,
    /// Live workers serving it.
    pub workers: u64,
}

/// Result of `maintenance.system_health_check`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HealthResult {
    /// `healthy` or `degraded`.
    pub status: &'static str,
    /// Why it is degraded (empty when healthy).
    pub reasons: Vec<String>,
    /// Client → server → client round trip.
    pub nats_rtt_ms: f64,
    /// Per category.
    pub categories: BTreeMap<String, CategoryHealth>,
    /// Dead letters stored now.
    pub dlq_messages: u64,
    /// Dead letters added since the previous check.
    pub dlq_new: u64,
    /// Workers whose heartbeat is current.
    pub workers_live: u64,
    /// Workers whose last heartbeat is older than two intervals.
    pub workers_stale: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct HealthState {
    dlq_last_seq: u64,
}

/// `maintenance.system_health_check`: NATS round trip, per-category pending and
/// ack-pending (every lane consumer), dead letters added since the previous check (the
/// DLQ's last sequence is remembered in KV `TASKMESH_CATALOG_STATE`), and worker
/// heartbeats (stale ones, categories with no live worker). Always succeeds with a
/// verdict; only a broken NATS connection is an error (retryable).
pub async fn system_health_check(
    c: Arc<Catalog>,
    _ctx: TaskContext,
    a: HealthArgs,
) -> Result<HealthResult, TaskError> {
    let max_pending = a.max_pending.unwrap_or(c.settings.health_max_pending);
    let conn = c.nats()?;
    let mut reasons = Vec::new();
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), conn.client.flush())
        .await
        .map_err(|_| TaskError::retryable("NATS round trip timed out"))?
        .map_err(|e| store::nats_error("NATS round trip", e))?;
    let rtt = t0.elapsed();
    if rtt > Duration::from_millis(500) {
        reasons.push(format!("slow NATS round trip: {} ms", rtt.as_millis()));
    }
    let now = chrono::Utc::now();
    let beats = Heartbeats::open(&conn.js)
        .await
        .map_err(|e| store::nats_error("opening worker heartbeats", e))?
        .list()
        .await
        .map_err(|e| store::nats_error("reading worker heartbeats", e))?;
    let stale_after = chrono::Duration::from_std(c.cfg.worker.heartbeat_interval * 2)
        .unwrap_or(chrono::Duration::seconds(10));
    let mut workers_stale = Vec::new();
    let mut live_by_cat: BTreeMap<String, u64> = BTreeMap::new();
    let mut workers_live = 0;
    for hb in &beats {
        if now - hb.beat_at > stale_after {
            workers_stale.push(hb.id.clone());
        } else {
            workers_live += 1;
            for cat in &hb.categories {
                *live_by_cat.entry(cat.clone()).or_default() += 1;
            }
        }
    }
    if !workers_stale.is_empty() {
        reasons.push(format!(
            "{} worker(s) with stale heartbeats: {}",
            workers_stale.len(),
            workers_stale.join(", ")
        ));
    }
    let mut categories = BTreeMap::new();
    for (cat, _) in c.cfg.enabled_categories() {
        let sname = wire::stream_name(cat);
        let mut h = CategoryHealth {
            workers: live_by_cat.get(cat.as_str()).copied().unwrap_or(0),
            ..CategoryHealth::default()
        };
        match conn.js.get_stream(&sname).await {
            Ok(stream) => {
                for lane in Lane::ALL {
                    let cname = wire::consumer_name(cat, lane);
                    match stream.consumer_info(&cname).await {
                        Ok(info) => {
                            h.pending += info.num_pending;
                            h.ack_pending += info.num_ack_pending as u64;
                            h.redelivered += info.num_redelivered as u64;
                        }
                        Err(e) => reasons.push(format!("consumer {cname} on {sname}: {e}")),
                    }
                }
            }
            Err(e) => reasons.push(format!("stream {sname}: {e} (run `taskmesh provision`)")),
        }
        if h.pending > max_pending {
            reasons.push(format!(
                "category {cat}: {} pending tasks (over {max_pending})",
                h.pending
            ));
        }
        if h.workers == 0 && h.pending > 0 {
            reasons.push(format!(
                "category {cat}: {} tasks waiting and no live worker",
                h.pending
            ));
        }
        categories.insert(cat.as_str().to_owned(), h);
    }
    let (dlq_messages, dlq_seq) = match conn.js.get_stream(wire::DLQ_STREAM).await {
        Ok(mut s) => match s.info().await {
            Ok(i) => (i.state.messages, i.state.last_sequence),
            Err(e) => {
                reasons.push(format!("stream {}: {e}", wire::DLQ_STREAM));
                (0, 0)
            }
        },
        Err(e) => {
            reasons.push(format!("stream {}: {e}", wire::DLQ_STREAM));
            (0, 0)
        }
    };
    let kv = store::kv_bucket(conn, &c.cfg, store::CATALOG_STATE_BUCKET, Duration::ZERO).await?;
    let prev: Option<HealthState> = kv
        .get("health")
        .await
        .map_err(|e| store::nats_error("reading health state", e))?
        .and_then(|b| serde_json::from_slice(&b).ok());
    let dlq_new = prev.map_or(0, |p| dlq_seq.saturating_sub(p.dlq_last_seq));
    if dlq_new > 0 {
        reasons.push(format!(
            "{dlq_new} new dead letter(s) since the previous check"
        ));
    }
    let state = serde_json::to_vec(&HealthState {
        dlq_last_seq: dlq_seq,
    })
    .map_err(|e| TaskError::permanent(e.to_string()))?;
    kv.put("health", state.into())
        .await
        .map_err(|e| store::nats_error("writing health state", e))?;
    Ok(HealthResult {
        status: if reasons.is_empty() {
            "healthy"
        } else {
            "degraded"
        },
        reasons,
        nats_rtt_ms: rtt.as_secs_f64() * 1000.0,
        categories,
        dlq_messages,
        dlq_new,
        workers_live,
        workers_stale,
    })
}

// ---------------------------------------------------------------------------------------
// maintenance.cleanup_old_logs
// ---------------------------------------------------------------------------------------

/// Arguments of `maintenance.cleanup_old_logs`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsArgs {
    /// Log directories; default `TASKMESH_LOG_DIRS`.
    #[serde(default)]
    pub dirs: Option<Vec<PathBuf>>,
    /// Delete files older than this; default `TASKMESH_LOG_MAX_AGE` (14 days).
    #[serde(default)]
    pub max_age_secs: Option<u64>,
    /// Gzip files older than this (and not yet `.gz`) before they are old enough to
    /// delete; default `TASKMESH_LOG_COMPRESS_AFTER` (unset: never).
    #[serde(default)]
    pub compress_after_secs: Option<u64>,
    /// Only count.
    #[serde(default)]
    pub dry_run: bool,
}

/// Gzips `path` to `path.gz` (via a hidden partial file, keeping the modification time),
/// then removes the original.
fn gzip_file(path: &Path) -> std::io::Result<()> {
    let mtime = std::fs::metadata(path)?.modified()?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = path.parent().unwrap_or(Path::new("."));
    let partial = dir.join(format!(".{name}.gz.partial"));
    let target = dir.join(format!("{name}.gz"));
    let mut input = std::fs::File::open(path)?;
    let out = std::fs::File::create(&partial)?;
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    std::io::copy(&mut input, &mut gz)?;
    let out = gz.finish()?;
    out.set_modified(mtime)?;
    out.sync_all()?;
    drop(out);
    std::fs::rename(&partial, &target)?;
    std::fs::remove_file(path)
}

/// The blocking body of `maintenance.cleanup_old_logs`.
pub fn cleanup_logs(
    roots: &[PathBuf],
    max_age: Duration,
    compress_after: Option<Duration>,
    dry_run: bool,
) -> CleanupResult {
    let mut r = CleanupResult {
        dry_run,
        ..CleanupResult::default()
    };
    let push = |r: &mut CleanupResult, e: String| {
        if r.errors.len() < 100 {
            r.errors.push(e);
        }
    };
    for root in roots {
        let mut found = Vec::new();
        for e in walk_files(root, &mut |f| found.push(f)) {
            push(&mut r, e);
        }
        for f in found {
            let name = f.path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".partial") {
                continue;
            }
            let age = fsutil::age(&f.meta);
            if age > max_age {
                if !dry_run && let Err(e) = std::fs::remove_file(&f.path) {
                    push(&mut r, format!("{}: {e}", f.path.display()));
                    continue;
                }
                r.files_removed += 1;
                r.bytes_freed += f.meta.len();
            } else if compress_after.is_some_and(|c| age > c) && !name.ends_with(".gz") {
                if !dry_run && let Err(e) = gzip_file(&f.path) {
                    push(&mut r, format!("{}: {e}", f.path.display()));
                    continue;
                }
                r.files_compressed += 1;
            }
        }
    }
    r
}

/// `maintenance.cleanup_old_logs`: in each log directory, deletes regular files older than
/// `max_age_secs` and gzips (`<name>.gz`, same modification time) those older than
/// `compress_after_secs`. Same safety as `file.cleanup_temp_files`: no symlinks, never
/// outside a root, refuses `/` and the home directory; a missing directory is retryable.
pub async fn cleanup_old_logs(
    c: Arc<Catalog>,
    _ctx: TaskContext,
    a: LogsArgs,
) -> Result<serde_json::Value, TaskError> {
    let dirs = a.dirs.unwrap_or_else(|| c.settings.log_dirs.clone());
    if dirs.is_empty() {
        return Ok(skipped("no dirs configured (TASKMESH_LOG_DIRS)"));
    }
    let max_age = a
        .max_age_secs
        .map_or(c.settings.log_max_age, Duration::from_secs);
    let compress = match a.compress_after_secs.map(Duration::from_secs) {
        Some(c) if c >= max_age => {
            return Err(TaskError::permanent(
                "compress_after_secs: must be less than max_age_secs",
            ));
        }
        Some(c) => Some(c),
        // The configured age only applies where it is below this run's max age.
        None => c.settings.log_compress_after.filter(|c| *c < max_age),
    };
    let dry_run = a.dry_run;
    let r = blocking(move || {
        let roots = resolve_roots(&dirs, "dirs")?;
        Ok(cleanup_logs(&roots, max_age, compress, dry_run))
    })
    .await?;
    serde_json::to_value(r).map_err(|e| TaskError::permanent(e.to_string()))
}

// ---------------------------------------------------------------------------------------
// maintenance.optimize_database / cleanup_old_sessions
// ---------------------------------------------------------------------------------------

/// Arguments of `maintenance.optimize_database`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizeArgs {
    /// `sqlite:///path` or `postgres://…`; default `TASKMESH_DATABASE_URL`. Prefer the
    /// setting for PostgreSQL: arguments are stored in the stream and the DLQ.
    #[serde(default)]
    pub url: Option<String>,
}

/// `maintenance.optimize_database`: SQLite `PRAGMA quick_check`, `VACUUM`, `ANALYZE`,
/// `PRAGMA optimize`; PostgreSQL `VACUUM (ANALYZE)` of the whole database. A locked
/// database (SQLite busy, PostgreSQL lock/connection errors) is retryable.
pub async fn optimize_database(
    c: Arc<Catalog>,
    _ctx: TaskContext,
    a: OptimizeArgs,
) -> Result<serde_json::Value, TaskError> {
    let (url, field) = match a.url {
        Some(u) => (u, "url"),
        None => match c.settings.database_url.clone() {
            Some(u) => (u, "TASKMESH_DATABASE_URL"),
            None => return Ok(skipped("no database configured (TASKMESH_DATABASE_URL)")),
        },
    };
    let db = Database::parse(&url, field)?;
    let r = db::optimize(&db).await?;
    serde_json::to_value(r).map_err(|e| TaskError::permanent(e.to_string()))
}

/// Arguments of `maintenance.cleanup_old_sessions`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsArgs {
    /// Database; default `TASKMESH_DATABASE_URL`.
    #[serde(default)]
    pub url: Option<String>,
    /// Sessions table; default `TASKMESH_SESSIONS_TABLE` (`sessions`).
    #[serde(default)]
    pub table: Option<String>,
    /// Expiry column; default `TASKMESH_SESSIONS_EXPIRES_COLUMN` (`expires_at`).
    #[serde(default)]
    pub expires_column: Option<String>,
}

/// Result of `maintenance.cleanup_old_sessions`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SessionsResult {
    /// `sqlite` or `postgres`.
    pub engine: &'static str,
    /// The table.
    pub table: String,
    /// Rows deleted.
    pub deleted: u64,
}

/// `maintenance.cleanup_old_sessions`: deletes the rows of the sessions table whose expiry
/// has passed (SQLite: Unix seconds or ISO-8601 text; PostgreSQL: compared with `now()`).
/// Idempotent by nature. A locked database is retryable; a missing table is permanent.
pub async fn cleanup_old_sessions(
    c: Arc<Catalog>,
    _ctx: TaskContext,
    a: SessionsArgs,
) -> Result<serde_json::Value, TaskError> {
    let table = a.table.unwrap_or_else(|| c.settings.sessions_table.clone());
    let column = a
        .expires_column
        .unwrap_or_else(|| c.settings.sessions_expires_column.clone());
    db::ident(&table, "table")?;
    db::ident(&column, "expires_column")?;
    let (url, field) = match a.url {
        Some(u) => (u, "url"),
        None => match c.settings.database_url.clone() {
            Some(u) => (u, "TASKMESH_DATABASE_URL"),
            None => return Ok(skipped("no database configured (TASKMESH_DATABASE_URL)")),
        },
    };
    let db = Database::parse(&url, field)?;
    let deleted = db::delete_expired(&db, &table, &column).await?;
    serde_json::to_value(SessionsResult {
        engine: db.engine(),
        table,
        deleted,
    })
    .map_err(|e| TaskError::permanent(e.to_string()))
}

/// Registers the `maintenance` tasks.
pub fn register(r: &mut Registry, c: &Arc<Catalog>) -> Result<(), NameError> {
    add(
        r,
        c,
        "maintenance.system_health_check",
        TaskPolicy::default().with_timeout(Duration::from_secs(60)),
        system_health_check,
    )?;
    add(
        r,
        c,
        "maintenance.cleanup_old_logs",
        TaskPolicy::default(),
        cleanup_old_logs,
    )?;
    add(
        r,
        c,
        "maintenance.optimize_database",
        TaskPolicy::retry_delay(Duration::from_secs(3600)),
        optimize_database,
    )?;
    add(
        r,
        c,
        "maintenance.cleanup_old_sessions",
        TaskPolicy::retry_delay(Duration::from_secs(600)),
        cleanup_old_sessions,
    )?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_compressed_then_deleted() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("app.log");
        std::fs::write(&f, b"line\n".repeat(100)).unwrap();
        let roots = resolve_roots(&[d.path().to_path_buf()], "dirs").unwrap();
        // Compress everything older than 0 s, delete nothing (max age one hour).
        let r = cleanup_logs(
            &roots,
            Duration::from_secs(3600),
            Some(Duration::ZERO),
            false,
        );
        assert_eq!(r.files_compressed, 1, "{r:?}");
        assert!(!f.exists());
        assert!(d.path().join("app.log.gz").exists());
        let r = cleanup_logs(&roots, Duration::ZERO, None, false);
        assert_eq!(r.files_removed, 1);
        assert!(!d.path().join("app.log.gz").exists());
    }
}
