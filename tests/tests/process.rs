//! Real `taskmesh` processes against a real nats-server: `kill -9` mid-batch, SIGTERM
//! drain with long and short grace, and the `taskmesh dev` + `taskmesh enqueue --wait` tour.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use taskmesh_nats::{Client, EnqueueOptions};
use taskmesh_shared::{Config, TaskId, TaskName, TaskState};
use taskmesh_tests::{NatsServer, TaskmeshProcess, eventually, nats_server_bin};
use tokio::time::Instant;

/// One ledger line: `<event> <task id> <attempt> <pid> <unix ms>`.
#[derive(Debug, Clone)]
struct Entry {
    event: String,
    id: String,
    attempt: u32,
    at_ms: i64,
}

fn ledger(path: &Path) -> Vec<Entry> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut p = l.split_whitespace();
            let (event, id, attempt) =
                (p.next()?.into(), p.next()?.into(), p.next()?.parse().ok()?);
            let _pid = p.next()?;
            Some(Entry {
                event,
                id,
                attempt,
                at_ms: p.next()?.parse().ok()?,
            })
        })
        .collect()
}

fn count(entries: &[Entry], event: &str) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for e in entries.iter().filter(|e| e.event == event) {
        *m.entry(e.id.clone()).or_default() += 1;
    }
    m
}

struct Fixture {
    _server: NatsServer,
    _dir: tempfile::TempDir,
    config: PathBuf,
    ledger: PathBuf,
    client: Client,
}

impl Fixture {
    async fn start(category_extra: &str, worker_extra: &str) -> Self {
        let server = NatsServer::start().await;
        let dir = tempfile::tempdir().unwrap();
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
        .unwrap();
        let mut p =
            TaskmeshProcess::spawn(&["provision", "--config", config.to_str().unwrap()], &[]);
        let status = p
            .wait_exit(Duration::from_secs(30))
            .await
            .expect("provision exits");
        assert!(status.success(), "provision failed: {}", p.log());
        let cfg = Config::load(&config).unwrap();
        let conn = taskmesh_nats::connect(&cfg.nats, "test", Duration::from_secs(5))
            .await
            .unwrap();
        let client = Client::new(conn, &cfg).await.unwrap();
        Self {
            _server: server,
            _dir: dir,
            config,
            ledger,
            client,
        }
    }

    fn worker(&self) -> TaskmeshProcess {
        TaskmeshProcess::spawn(
            &[
                "worker",
                "--config",
                self.config.to_str().unwrap(),
                "--category",
                "testkit",
            ],
            &[("TASKMESH_TESTKIT_LEDGER", self.ledger.to_str().unwrap())],
        )
    }

    async fn sleep_tasks(&self, prefix: &str, n: usize, ms: u64) -> Vec<TaskId> {
        let task = TaskName::parse("testkit.sleep").unwrap();
        let mut pending = Vec::new();
        for i in 0..n {
            let id = TaskId::new(format!("{prefix}-{i}")).unwrap();
            let body = serde_json::to_vec(&serde_json::json!({ "ms": ms })).unwrap();
            pending.push(
                self.client
                    .send(&task, body.into(), EnqueueOptions::default().id(id))
                    .await
                    .unwrap(),
            );
        }
        let mut ids = Vec::new();
        for p in pending {
            ids.push(p.acked().await.unwrap().id);
        }
        ids
    }

    async fn all_succeeded(&self, ids: &[TaskId], limit: Duration) {
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

#[tokio::test]
async fn kill_9_of_a_worker_mid_batch_loses_nothing() {
    let fx = Fixture::start("ack_wait = \"2s\"", "").await;
    let ids = fx.sleep_tasks("k9", 300, 30).await;
    let mut a = fx.worker();
    eventually(
        Duration::from_secs(30),
        "worker A finished some tasks",
        || async {
            let done = count(&ledger(&fx.ledger), "done").len();
            if done >= 40 {
                Ok(())
            } else {
                Err(format!("{done} done"))
            }
        },
    )
    .await;
    a.kill9();
    let killed_ms = chrono::Utc::now().timestamp_millis();
    let _b = fx.worker();
    fx.all_succeeded(&ids, Duration::from_secs(60)).await;
    let entries = ledger(&fx.ledger);
    let done = count(&entries, "done");
    let lost: Vec<&TaskId> = ids
        .iter()
        .filter(|i| !done.contains_key(i.as_str()))
        .collect();
    assert!(lost.is_empty(), "lost: {lost:?}");
    let dup: Vec<_> = done.iter().filter(|(_, n)| **n > 1).collect();
    // Only tasks in flight at the kill (at most the concurrency) may run twice.
    assert!(
        dup.len() <= 8,
        "duplicate executions beyond the in-flight window: {dup:?}"
    );
    // Tasks in flight at the kill came back within ack_wait (2 s) + 3 s.
    let redelivered: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.event == "start" && e.attempt > 1)
        .collect();
    assert!(
        redelivered.len() <= 8,
        "more redeliveries than were in flight: {}",
        redelivered.len()
    );
    for e in &redelivered {
        let after = e.at_ms - killed_ms;
        assert!(
            after <= 5_000,
            "task {} redelivered {after} ms after the kill",
            e.id
        );
    }
    eprintln!(
        "{} redelivered after the kill, {} ran twice",
        redelivered.len(),
        dup.len()
    );
}

#[tokio::test]
async fn sigterm_lets_in_flight_tasks_finish_and_exits_zero() {
    let fx = Fixture::start("ack_wait = \"30s\"", "drain_grace = \"10s\"").await;
    let mut a = fx.worker();
    let ids = fx.sleep_tasks("drain", 6, 1500).await;
    eventually(Duration::from_secs(20), "all six started", || async {
        let n = count(&ledger(&fx.ledger), "start").len();
        if n == 6 {
            Ok(())
        } else {
            Err(format!("{n} started"))
        }
    })
    .await;
    a.sigterm();
    let status = a
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("worker exits after SIGTERM");
    assert!(
        status.success(),
        "exit status {status:?}: {}",
        a.log_tail(20)
    );
    // Every in-flight task finished on that worker, first attempt.
    let done = count(&ledger(&fx.ledger), "done");
    assert_eq!(done.len(), 6, "{done:?}");
    for id in &ids {
        let r = fx.client.result(id).await.unwrap().unwrap();
        assert_eq!((r.state, r.attempts), (TaskState::Succeeded, 1));
    }
}

#[tokio::test]
async fn sigterm_past_the_grace_hands_unfinished_tasks_to_another_worker_at_once() {
    let fx = Fixture::start("ack_wait = \"30s\"", "drain_grace = \"1s\"").await;
    let mut a = fx.worker();
    fx.sleep_tasks("grace", 4, 20_000).await;
    eventually(Duration::from_secs(20), "all four started on A", || async {
        let n = count(&ledger(&fx.ledger), "start").len();
        if n == 4 {
            Ok(())
        } else {
            Err(format!("{n} started"))
        }
    })
    .await;
    let _b = fx.worker();
    let t0 = Instant::now();
    a.sigterm();
    let status = a
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("worker exits after the grace");
    assert!(
        status.success(),
        "exit status {status:?}: {}",
        a.log_tail(20)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "drain took {:?}",
        t0.elapsed()
    );
    // Released with Nak(0): B starts them long before ack_wait (30 s) would have expired.
    eventually(Duration::from_secs(10), "B restarted all four", || async {
        let again = ledger(&fx.ledger)
            .into_iter()
            .filter(|e| e.event == "start" && e.attempt >= 2)
            .count();
        if again >= 4 {
            Ok(())
        } else {
            Err(format!("{again} restarted"))
        }
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(12));
}

#[tokio::test]
async fn dev_runs_the_mesh_and_enqueue_wait_prints_a_succeeded_record() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data = tempfile::tempdir().unwrap();
    let bin = nats_server_bin();
    let mut dev = TaskmeshProcess::spawn(
        &[
            "dev",
            "--port",
            &port.to_string(),
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
        &[("NATS_SERVER_BIN", bin.to_str().unwrap())],
    );
    dev.wait_for_log("taskmesh dev is running", Duration::from_secs(30))
        .await;
    let url = format!("nats://127.0.0.1:{port}");
    let mut enq = TaskmeshProcess::spawn(
        &[
            "enqueue",
            "ai.test_scheduler_connection",
            "--wait",
            "--timeout",
            "10s",
        ],
        &[("NATS_URL", url.as_str())],
    );
    let status = enq
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("enqueue exits");
    let out = enq.log();
    assert!(status.success(), "{out}");
    assert!(out.contains("\"state\": \"succeeded\""), "{out}");
    assert!(out.contains("Scheduler connection test passed"), "{out}");
    dev.sigterm();
    let status = dev
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("dev exits");
    assert!(status.success(), "{}", dev.log_tail(20));
    // Its nats-server is gone too: the port is free again.
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "nats-server left behind"
    );
}
