//! SQL databases the maintenance tasks look after: SQLite files (rusqlite, on the blocking
//! pool) and PostgreSQL (tokio-postgres, without TLS: use it on a trusted network or a
//! local socket-forwarding sidecar).

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use taskmesh_shared::TaskError;

use super::blocking;

/// A configured database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection string (`postgres://…`).
    Postgres(String),
}

impl Database {
    /// Parses `sqlite:///abs/path.db` (or `sqlite:/abs/path.db`) and `postgres://…` /
    /// `postgresql://…`; `field` names the setting or argument.
    pub fn parse(url: &str, field: &str) -> Result<Self, TaskError> {
        if let Some(rest) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let p = PathBuf::from(rest);
            if !p.is_absolute() {
                return Err(TaskError::permanent(format!(
                    "{field}: a SQLite path must be absolute (sqlite:///path/app.db)"
                )));
            }
            return Ok(Self::Sqlite(p));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres(url.to_owned()));
        }
        Err(TaskError::permanent(format!(
            "{field}: expected sqlite:///path or postgres://…"
        )))
    }

    /// `sqlite` or `postgres`.
    pub fn engine(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }
}

/// Result of `maintenance.optimize_database`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OptimizeResult {
    /// `sqlite` or `postgres`.
    pub engine: &'static str,
    /// Database size before, bytes.
    pub size_before: u64,
    /// Database size after, bytes.
    pub size_after: u64,
    /// What ran, in order.
    pub steps: Vec<String>,
    /// SQLite `PRAGMA quick_check` answer (`ok`), when SQLite.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub integrity: Option<String>,
}

/// How long SQLite waits for a lock before the task retries later.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(2);

fn sqlite_error(what: &str, e: rusqlite::Error) -> TaskError {
    use rusqlite::ErrorCode as C;
    let msg = format!("{what}: {e}");
    match e.sqlite_error_code() {
        Some(C::DatabaseBusy | C::DatabaseLocked | C::CannotOpen | C::SystemIoFailure) => {
            TaskError::retryable(msg)
        }
        _ => TaskError::permanent(msg),
    }
}

fn sqlite_open(path: &std::path::Path) -> Result<rusqlite::Connection, TaskError> {
    if !path.exists() {
        return Err(TaskError::retryable(format!(
            "database {} does not exist (not mounted yet?)",
            path.display()
        )));
    }
    let c = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| sqlite_error("opening the database", e))?;
    c.busy_timeout(SQLITE_BUSY_TIMEOUT)
        .map_err(|e| sqlite_error("configuring the database", e))?;
    Ok(c)
}

fn pg_error(what: &str, e: tokio_postgres::Error) -> TaskError {
    let msg = format!("{what}: {e}");
    match e.code() {
        // No SQLSTATE: connection-level trouble.
        None => TaskError::retryable(msg),
        Some(code) => {
            let class = &code.code()[..2];
            // 08 connection, 40 rollback (deadlock, serialization), 53 resources,
            // 55 lock not available, 57 operator intervention (shutdown).
            if matches!(class, "08" | "40" | "53" | "55" | "57") {
                TaskError::retryable(msg)
            } else {
                TaskError::permanent(msg)
            }
        }
    }
}

async fn pg_connect(url: &str) -> Result<tokio_postgres::Client, TaskError> {
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(15),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| TaskError::retryable("connecting to PostgreSQL: timed out"))?
    .map_err(|e| pg_error("connecting to PostgreSQL", e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
}

/// VACUUM and ANALYZE (SQLite adds `PRAGMA optimize` and a quick integrity check).
pub async fn optimize(db: &Database) -> Result<OptimizeResult, TaskError> {
    match db {
        Database::Sqlite(path) => {
            let path = path.clone();
            blocking(move || {
                let c = sqlite_open(&path)?;
                let size = |c: &rusqlite::Connection| -> Result<u64, TaskError> {
                    let pages: i64 = c
                        .query_row("PRAGMA page_count", [], |r| r.get(0))
                        .map_err(|e| sqlite_error("reading page_count", e))?;
                    let psize: i64 = c
                        .query_row("PRAGMA page_size", [], |r| r.get(0))
                        .map_err(|e| sqlite_error("reading page_size", e))?;
                    Ok(u64::try_from(pages * psize).unwrap_or(0))
                };
                let size_before = size(&c)?;
                let integrity: String = c
                    .query_row("PRAGMA quick_check", [], |r| r.get(0))
                    .map_err(|e| sqlite_error("PRAGMA quick_check", e))?;
                if integrity != "ok" {
                    return Err(TaskError::permanent(format!(
                        "database {} failed its integrity check: {integrity}",
                        path.display()
                    )));
                }
                c.execute_batch("VACUUM")
                    .map_err(|e| sqlite_error("VACUUM", e))?;
                c.execute_batch("ANALYZE")
                    .map_err(|e| sqlite_error("ANALYZE", e))?;
                c.execute_batch("PRAGMA optimize")
                    .map_err(|e| sqlite_error("PRAGMA optimize", e))?;
                Ok(OptimizeResult {
                    engine: "sqlite",
                    size_before,
                    size_after: size(&c)?,
                    steps: vec![
                        "PRAGMA quick_check".into(),
                        "VACUUM".into(),
                        "ANALYZE".into(),
                        "PRAGMA optimize".into(),
                    ],
                    integrity: Some(integrity),
                })
            })
            .await
        }
        Database::Postgres(url) => {
            let c = pg_connect(url).await?;
            let size_before = pg_size(&c).await?;
            c.batch_execute("VACUUM (ANALYZE)")
                .await
                .map_err(|e| pg_error("VACUUM (ANALYZE)", e))?;
            Ok(OptimizeResult {
                engine: "postgres",
                size_before,
                size_after: pg_size(&c).await?,
                steps: vec!["VACUUM (ANALYZE)".into()],
                integrity: None,
            })
        }
    }
}

async fn pg_size(c: &tokio_postgres::Client) -> Result<u64, TaskError> {
    let row = c
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .map_err(|e| pg_error("reading the database size", e))?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// Checks an SQL identifier (`[A-Za-z_][A-Za-z0-9_]*`, at most 63) and quotes it.
pub fn ident(name: &str, field: &str) -> Result<String, TaskError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(format!("\"{name}\""))
    } else {
        Err(TaskError::permanent(format!(
            "{field}: not a plain SQL identifier: {name}"
        )))
    }
}

/// Deletes rows whose expiry is in the past; returns how many. In SQLite the column may
/// hold Unix seconds (integer/real) or ISO-8601 text; in PostgreSQL it is compared with
/// `now()` (use `timestamptz`).
pub async fn delete_expired(db: &Database, table: &str, column: &str) -> Result<u64, TaskError> {
    let t = ident(table, "table")?;
    let col = ident(column, "expires_column")?;
    match db {
        Database::Sqlite(path) => {
            let path = path.clone();
            blocking(move || {
                let c = sqlite_open(&path)?;
                let now = chrono::Utc::now();
                let sql = format!(
                    "DELETE FROM {t} WHERE (typeof({col}) IN ('integer','real') AND {col} < ?1) \
                     OR (typeof({col}) = 'text' AND julianday({col}) < julianday(?2))"
                );
                let n = c
                    .execute(
                        &sql,
                        rusqlite::params![
                            now.timestamp(),
                            now.format("%Y-%m-%d %H:%M:%S").to_string()
                        ],
                    )
                    .map_err(|e| sqlite_error(&format!("deleting from {t}"), e))?;
                Ok(n as u64)
            })
            .await
        }
        Database::Postgres(url) => {
            let c = pg_connect(url).await?;
            c.execute(&format!("DELETE FROM {t} WHERE {col} < now()"), &[])
                .await
                .map_err(|e| pg_error(&format!("deleting from {t}"), e))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_identifiers() {
        assert_eq!(
            Database::parse("sqlite:///var/app.db", "u").unwrap(),
            Database::Sqlite("/var/app.db".into())
        );
        assert!(Database::parse("sqlite://rel.db", "u").is_err());
        assert_eq!(
            Database::parse("postgres://u@h/db", "u").unwrap().engine(),
            "postgres"
        );
        assert!(Database::parse("mysql://x", "u").is_err());
        assert_eq!(ident("sessions", "t").unwrap(), "\"sessions\"");
        assert!(ident("a; DROP TABLE x", "t").is_err());
        assert!(ident("1a", "t").is_err());
    }

    #[tokio::test]
    async fn sqlite_optimize_and_expire() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("app.db");
        {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE sessions (id TEXT, expires_at);
                 INSERT INTO sessions VALUES ('old-int', 1), ('old-text', '2000-01-01 00:00:00'),
                   ('new-int', 99999999999), ('new-text', '2999-01-01T00:00:00Z');",
            )
            .unwrap();
        }
        let db = Database::Sqlite(path.clone());
        assert_eq!(
            delete_expired(&db, "sessions", "expires_at").await.unwrap(),
            2
        );
        let r = optimize(&db).await.unwrap();
        assert_eq!(r.integrity.as_deref(), Some("ok"));
        let missing = Database::Sqlite(d.path().join("nope.db"));
        assert!(optimize(&missing).await.unwrap_err().is_retryable());
    }
}
