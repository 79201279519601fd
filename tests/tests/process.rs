//! Real `taskmesh` processes against a real nats-server: `kill -9` mid-batch, SIGTERM
//! drain with long and short grace, and the `taskmesh dev` + `taskmesh enqueue --wait` tour.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use taskmesh_shared::{TaskId, TaskState};
use taskmesh_tests::{
    LedgerEntry, TaskmeshProcess, TestMesh, eventually, ledger_counts as count, nats_server_bin,
};
use tokio::time::Instant;

#[tokio::test]
async fn kill_9_of_a_worker_mid_batch_loses_nothing() {
    let fx = TestMesh::start("ack_wait = \"2s\"", "").await;
    let ids = fx.sleep_tasks("k9", 300, 30).await;
    let mut a = fx.worker();
    eventually(
        Duration::from_secs(30),
        "worker A finished some tasks",
        || async {
            let done = count(&fx.ledger(), "done").len();
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
    let entries = fx.ledger();
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
    let redelivered: Vec<&LedgerEntry> = entries
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
    let fx = TestMesh::start("ack_wait = \"30s\"", "drain_grace = \"10s\"").await;
    let mut a = fx.worker();
    let ids = fx.sleep_tasks("drain", 6, 1500).await;
    eventually(Duration::from_secs(20), "all six started", || async {
        let n = count(&fx.ledger(), "start").len();
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
    let done = count(&fx.ledger(), "done");
    assert_eq!(done.len(), 6, "{done:?}");
    for id in &ids {
        let r = fx.client.result(id).await.unwrap().unwrap();
        assert_eq!((r.state, r.attempts), (TaskState::Succeeded, 1));
    }
}

#[tokio::test]
async fn sigterm_past_the_grace_hands_unfinished_tasks_to_another_worker_at_once() {
    let fx = TestMesh::start("ack_wait = \"30s\"", "drain_grace = \"1s\"").await;
    let mut a = fx.worker();
    fx.sleep_tasks("grace", 4, 20_000).await;
    eventually(Duration::from_secs(20), "all four started on A", || async {
        let n = count(&fx.ledger(), "start").len();
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
        let again = fx
            .ledger()
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
