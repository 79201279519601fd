//! [`TestMesh`]: a nats-server, a config file, provisioning by the real binary, and a
//! producer — the fixture of every process-level test.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use taskmesh_nats::{Client, EnqueueOptions};
use taskmesh_shared::{Config, TaskId, TaskName, TaskState};

use crate::{NatsServer, TaskmeshProcess, eventually};

/// One line of the testkit ledger: `<event> <task id> <attempt> <pid> <unix ms>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// `start` or `done`.
    pub event: String,
    /// The task id.
    pub id: String,
    /// The attempt.
    pub attempt: u32,
    /// The worker's process id.
    pub pid: u32,
    /// Wall time in Unix milliseconds.
    pub at_ms: i64,
}

/// Reads a testkit ledger file (missing file = empty).
pub fn read_ledger(path: &Path) -> Vec<LedgerEntry> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut p = l.split_whitespace();
            Some(LedgerEntry {
                event: p.next()?.into(),
                id: p.next()?.into(),
                attempt: p.next()?.parse().ok()?,
                pid: p.next()?.parse().ok()?,
                at_ms: p.next()?.parse().ok()?,
            })
        })
        .collect()
}

/// How many times each task id has `event` in the ledger.
pub fn ledger_counts(entries: &[LedgerEntry], event: &str) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for e in entries.iter().filter(|e| e.event == event) {
        *m.entry(e.id.clone()).or_default() += 1;
    }
    m
}

/// A server, a config with a `testkit` category, provisioning and a producer.
pub struct TestMesh {
    /// The server.
    pub server: NatsServer,
    /// Temp dir for the config and ledger.
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
    /// The testkit ledger file.
    pub ledger: PathBuf,
    /// A producer.
    pub client: Client,
}

impl TestMesh {
    /// Starts a server, writes a config (`[categories.testkit]` with concurrency 8 plus
    /// `category_extra`; `[worker]` plus `worker_extra`), provisions with `taskmesh
    /// provision` and connects a producer.
    pub async fn start(category_extra: &str, worker_extra: &str) -> Self {
        let server = NatsServer::start().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("taskmesh.toml");
        let ledger = dir.path().join("ledger.txt");
        std::fs::write(
            &config,
            format!(
                "seed_categories = false\n[nats]\nurl = \"{}\"\n[worker]\nheartbeat_interval = \"1s\"\n{worker_extra}\n\
                 [categories.testkit]\nconcurrency = 8\nmax_deliver = 10\n{category_extra}\n",
                server.url()
            ),
        )
        .expect("write config");
        let mut p = TaskmeshProcess::spawn(&["provision", "--config", path_str(&config)], &[]);
        let status = p
            .wait_exit(Duration::from_secs(30))
            .await
            .expect("provision exits");
        assert!(status.success(), "provision failed: {}", p.log());
        let cfg = Config::load(&config).expect("config loads");
        let conn = taskmesh_nats::connect(&cfg.nats, "test", Duration::from_secs(5))
            .await
            .expect("connect");
        let client = Client::new(conn, &cfg).await.expect("client");
        Self {
            server,
            dir,
            config,
            ledger,
            client,
        }
    }

    /// `taskmesh worker --category testkit` with the ledger, plus extra args and env.
    pub fn worker_with(&self, args: &[&str], env: &[(&str, &str)]) -> TaskmeshProcess {
        let mut a = vec![
            "worker",
            "--config",
            path_str(&self.config),
            "--category",
            "testkit",
        ];
        a.extend_from_slice(args);
        let mut e = vec![("TASKMESH_TESTKIT_LEDGER", path_str(&self.ledger))];
        e.extend_from_slice(env);
        TaskmeshProcess::spawn(&a, &e)
    }

    /// `taskmesh worker --category testkit --http-addr 127.0.0.1:0`.
    pub fn worker(&self) -> TaskmeshProcess {
        self.worker_with(&["--http-addr", "127.0.0.1:0"], &[])
    }

    /// The ledger so far.
    pub fn ledger(&self) -> Vec<LedgerEntry> {
        read_ledger(&self.ledger)
    }

    /// Enqueues `n` `testkit.sleep` tasks with ids `<prefix>-<i>`, pipelined.
    pub async fn sleep_tasks(&self, prefix: &str, n: usize, ms: u64) -> Vec<TaskId> {
        let task = TaskName::parse("testkit.sleep").expect("name");
        let body =
            bytes::Bytes::from(serde_json::to_vec(&serde_json::json!({ "ms": ms })).expect("json"));
        let items = (0..n).map(|i| {
            let id = TaskId::new(format!("{prefix}-{i}")).expect("id");
            (task.clone(), body.clone(), EnqueueOptions::default().id(id))
        });
        let ids: Vec<TaskId> = self
            .client
            .enqueue_batch(items)
            .await
            .into_iter()
            .map(|r| r.expect("enqueued").id)
            .collect();
        ids
    }

    /// Waits until every task has a `succeeded` record.
    pub async fn all_succeeded(&self, ids: &[TaskId], limit: Duration) {
        eventually(limit, "every task succeeded", || async {
            let mut missing = Vec::new();
            for id in ids {
                match self.client.result(id).await.map_err(|e| e.to_string())? {
                    Some(r) if r.state == TaskState::Succeeded => {}
                    other => missing.push((id.to_string(), other.map(|r| r.state))),
                }
            }
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} not succeeded, first {:?}",
                    missing.len(),
                    missing[0]
                ))
            }
        })
        .await;
    }
}

/// A path as `&str` (test paths are UTF-8).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
