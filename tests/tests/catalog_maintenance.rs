//! `maintenance` tasks against the real mesh (health), real log directories, a real SQLite
//! database and — when PostgreSQL's `initdb` is installed — a real PostgreSQL cluster
//! started by the test in a temporary directory on a free port. Without PostgreSQL that
//! test says so and passes; `TASKMESH_TEST_PG=1` makes a missing PostgreSQL a failure (CI),
//! `TASKMESH_TEST_PG=0` skips it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod catalog_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use catalog_common::{Mesh, age_file, free_port};
use serde_json::json;
use taskmesh_shared::TaskState;
use taskmesh_workers::catalog::Settings;

#[tokio::test]
async fn health_check_reports_backlog_and_dead_letter_growth() {
    let mesh = Mesh::start(Settings::empty()).await;
    // Wait until the worker's heartbeat is visible, so the verdict is about the mesh.
    let first =
        taskmesh_tests::eventually(Duration::from_secs(20), "a healthy verdict", || async {
            let r = mesh
                .run_ok("maintenance.system_health_check", json!({}))
                .await;
            if r["status"] == "healthy" {
                Ok(r)
            } else {
                Err(r.to_string())
            }
        })
        .await;
    assert!(first["nats_rtt_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(first["categories"]["email"]["workers"], 1, "{first}");
    assert!(first["workers_live"].as_u64().unwrap() >= 1);

    // A dead letter makes the next check degraded, with the reason.
    mesh.expect_bad_args(
        "maintenance.system_health_check",
        json!({"max_pending": "x"}),
        "invalid type",
    )
    .await;
    let r = mesh
        .run_ok("maintenance.system_health_check", json!({}))
        .await;
    assert_eq!(r["status"], "degraded", "{r}");
    assert_eq!(r["dlq_new"], 1, "{r}");
    assert!(r["reasons"].to_string().contains("dead letter"));
    // ...and the check after it is healthy again (growth is measured between checks).
    let r = mesh
        .run_ok("maintenance.system_health_check", json!({}))
        .await;
    assert_eq!(r["status"], "healthy", "{r}");

    // The check sees its own delivery as in flight (ack-pending) on the maintenance lane.
    let r = mesh
        .run_ok("maintenance.system_health_check", json!({"max_pending": 0}))
        .await;
    assert_eq!(
        r["categories"]["maintenance"]["ack_pending"], 1,
        "itself: {r}"
    );
}

#[tokio::test]
async fn cleanup_old_logs_compresses_then_deletes() {
    let logs = tempfile::tempdir().unwrap();
    let p = |n: &str| logs.path().join(n);
    std::fs::write(p("app.log"), b"today\n").unwrap();
    std::fs::write(p("app.log.1"), b"yesterday\n".repeat(50)).unwrap();
    std::fs::write(p("app.log.2.gz"), b"ancient").unwrap();
    age_file(&p("app.log.1"), Duration::from_secs(2 * 86400));
    age_file(&p("app.log.2.gz"), Duration::from_secs(30 * 86400));
    let mut s = Settings::empty();
    s.log_dirs = vec![logs.path().to_path_buf()];
    s.log_compress_after = Some(Duration::from_secs(86400));
    let mesh = Mesh::start(s).await;

    let r = mesh.run_ok("maintenance.cleanup_old_logs", json!({})).await;
    assert_eq!(
        (r["files_removed"].as_u64(), r["files_compressed"].as_u64()),
        (Some(1), Some(1)),
        "{r}"
    );
    assert!(p("app.log").exists());
    assert!(!p("app.log.1").exists() && !p("app.log.2.gz").exists());
    let gz = std::fs::read(p("app.log.1.gz")).unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text).unwrap();
    assert_eq!(text, "yesterday\n".repeat(50));
    // The compressed file keeps its age, so it is deleted once old enough.
    let r = mesh
        .run_ok(
            "maintenance.cleanup_old_logs",
            json!({"max_age_secs": 86400}),
        )
        .await;
    assert_eq!(r["files_removed"], 1, "{r}");

    mesh.expect_bad_args(
        "maintenance.cleanup_old_logs",
        json!({"max_age_secs": 10, "compress_after_secs": 20}),
        "compress_after_secs",
    )
    .await;
    mesh.expect_bad_args(
        "maintenance.cleanup_old_logs",
        json!({"dirs": ["/"]}),
        "dirs[0]",
    )
    .await;
    // Retry path: the log volume appears later.
    let later = logs.path().join("later");
    let id = mesh
        .enqueue("maintenance.cleanup_old_logs", json!({"dirs": [later]}))
        .await;
    mesh.wait_state(&id, TaskState::Retrying).await;
    std::fs::create_dir(&later).unwrap();
    mesh.wait_state(&id, TaskState::Succeeded).await;
}

fn sqlite_db(dir: &Path) -> PathBuf {
    let path = dir.join("app.db");
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, data BLOB, expires_at);
         CREATE TABLE junk (x BLOB);",
    )
    .unwrap();
    let now = chrono::Utc::now().timestamp();
    for i in 0..20 {
        let exp: rusqlite::types::Value = match i % 4 {
            0 => (now - 3600).into(),
            1 => "2001-01-01 00:00:00".to_string().into(),
            2 => (now + 3600).into(),
            _ => "2999-01-01T00:00:00Z".to_string().into(),
        };
        c.execute(
            "INSERT INTO sessions VALUES (?1, zeroblob(100), ?2)",
            rusqlite::params![format!("s{i}"), exp],
        )
        .unwrap();
    }
    for _ in 0..200 {
        c.execute("INSERT INTO junk VALUES (zeroblob(4000))", [])
            .unwrap();
    }
    c.execute("DELETE FROM junk", []).unwrap();
    path
}

#[tokio::test]
async fn sqlite_sessions_and_optimize_with_a_lock_retry() {
    let dir = tempfile::tempdir().unwrap();
    let path = sqlite_db(dir.path());
    let mut s = Settings::empty();
    s.database_url = Some(format!("sqlite://{}", path.display()));
    let mesh = Mesh::start(s).await;

    let r = mesh
        .run_ok("maintenance.cleanup_old_sessions", json!({}))
        .await;
    assert_eq!(
        r,
        json!({"engine": "sqlite", "table": "sessions", "deleted": 10})
    );
    let left: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("SELECT count(*) FROM sessions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 10);

    // Retry path: another process holds the database exclusively.
    let holder = rusqlite::Connection::open(&path).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let id = mesh
        .enqueue("maintenance.optimize_database", json!({}))
        .await;
    mesh.wait_state(&id, TaskState::Retrying).await;
    holder.execute_batch("COMMIT").unwrap();
    drop(holder);
    let r = mesh
        .wait_state(&id, TaskState::Succeeded)
        .await
        .result
        .unwrap();
    assert_eq!(r["integrity"], "ok");
    assert!(
        r["size_after"].as_u64().unwrap() < r["size_before"].as_u64().unwrap(),
        "VACUUM freed the junk: {r}"
    );
    let analyzed: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("SELECT count(*) FROM sqlite_stat1", [], |r| r.get(0))
        .unwrap();
    assert!(analyzed > 0, "ANALYZE wrote statistics");

    mesh.expect_bad_args(
        "maintenance.cleanup_old_sessions",
        json!({"table": "x; DROP TABLE sessions"}),
        "table",
    )
    .await;
    mesh.expect_bad_args(
        "maintenance.cleanup_old_sessions",
        json!({"table": "nope"}),
        "nope",
    )
    .await;
    mesh.expect_bad_args(
        "maintenance.optimize_database",
        json!({"url": "mysql://x"}),
        "url",
    )
    .await;
    // Nothing configured: skipped.
    let other = Mesh::start(Settings::empty()).await;
    let r = other
        .run_ok("maintenance.optimize_database", json!({}))
        .await;
    assert!(r["skipped"].is_string());
}

/// A throw-away PostgreSQL cluster: `initdb` + `pg_ctl start` in a temp dir on a free port
/// (as the `postgres` user when the test runs as root), stopped on drop.
struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl Postgres {
    fn bin_dir() -> Option<PathBuf> {
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
            && out.status.success()
        {
            let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if p.join("initdb").exists() {
                return Some(p);
            }
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .collect();
        found.sort();
        found.pop()
    }

    fn run(&self, prog: &str, args: &[&str]) {
        let bin = self.bin.join(prog);
        let out = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&bin)
                .args(args)
                .output()
        } else {
            Command::new(&bin).args(args).output()
        }
        .unwrap();
        assert!(
            out.status.success(),
            "{prog} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start() -> Option<Self> {
        let bin = Self::bin_dir()?;
        let dir = tempfile::tempdir().unwrap();
        // The temp dir is owned by the effective user: root must hand it to `postgres`
        // (initdb refuses to run as root).
        let as_postgres =
            std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(dir.path()).unwrap()) == 0;
        if as_postgres {
            let (uid, gid) = passwd_ids("postgres")?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let pg = Self {
            port: free_port(),
            dir,
            bin,
            as_postgres,
        };
        let data = pg.dir.path().join("data");
        let data_s = data.display().to_string();
        pg.run(
            "initdb",
            &["-D", &data_s, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            pg.port,
            pg.dir.path().display()
        );
        let log = pg.dir.path().join("pg.log").display().to_string();
        pg.run(
            "pg_ctl",
            &["-D", &data_s, "-o", &opts, "-l", &log, "-w", "start"],
        );
        Some(pg)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

/// uid and gid of a user from /etc/passwd.
fn passwd_ids(user: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&user))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").display().to_string();
        let bin = self.bin.join("pg_ctl");
        let _ = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&bin)
                .args(["-D", &data, "-m", "immediate", "stop"])
                .output()
        } else {
            Command::new(&bin)
                .args(["-D", &data, "-m", "immediate", "stop"])
                .output()
        };
    }
}

#[tokio::test]
async fn postgres_vacuum_analyze_and_sessions() {
    if std::env::var("TASKMESH_TEST_PG").as_deref() == Ok("0") {
        eprintln!("TASKMESH_TEST_PG=0: PostgreSQL test skipped");
        return;
    }
    let Some(pg) = Postgres::start() else {
        assert!(
            std::env::var("TASKMESH_TEST_PG").as_deref() != Ok("1"),
            "TASKMESH_TEST_PG=1 but PostgreSQL's initdb was not found (apt-get install postgresql)"
        );
        eprintln!(
            "PostgreSQL (initdb) is not installed: PostgreSQL test skipped (apt-get install postgresql)"
        );
        return;
    };
    let (client, conn) = tokio_postgres_connect(&pg.url()).await;
    client
        .batch_execute(
            "CREATE TABLE sessions (id text PRIMARY KEY, expires_at timestamptz);
             INSERT INTO sessions SELECT 's' || g, now() + (CASE WHEN g % 2 = 0 THEN interval '1 hour' ELSE interval '-1 hour' END) FROM generate_series(1, 10) g;",
        )
        .await
        .unwrap();
    let mut s = Settings::empty();
    s.database_url = Some(pg.url());
    let mesh = Mesh::start(s).await;
    let r = mesh
        .run_ok("maintenance.cleanup_old_sessions", json!({}))
        .await;
    assert_eq!(
        r,
        json!({"engine": "postgres", "table": "sessions", "deleted": 5})
    );
    let r = mesh
        .run_ok("maintenance.optimize_database", json!({}))
        .await;
    assert_eq!(r["engine"], "postgres");
    let row = client
        .query_one("SELECT last_vacuum IS NOT NULL AND last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'sessions'", &[])
        .await
        .unwrap();
    let done: bool = row.get(0);
    assert!(done, "VACUUM (ANALYZE) ran on the table");
    // Retry path: the server is down; a permanent error for a missing table.
    mesh.expect_bad_args(
        "maintenance.cleanup_old_sessions",
        json!({"table": "missing_table"}),
        "missing_table",
    )
    .await;
    drop(conn);
    let down = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    let id = mesh
        .enqueue("maintenance.optimize_database", json!({"url": down}))
        .await;
    let r = mesh.wait_state(&id, TaskState::Retrying).await;
    assert_eq!(r.error.unwrap().kind, "retryable");
}

async fn tokio_postgres_connect(
    url: &str,
) -> (tokio_postgres::Client, tokio::task::JoinHandle<()>) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let h = tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, h)
}
