//! Admin verbs against a real nats-server: `status --json` (its documented schema),
//! `inspect`, `workers`, `dlq list|show|replay|purge`, `pause|resume`, `purge`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_common;

use std::time::Duration;

use api_common::{cli, first_json};
use taskmesh_nats::EnqueueOptions;
use taskmesh_shared::{TaskId, TaskName, TaskState};
use taskmesh_tests::{TestMesh, eventually};

const LIMIT: Duration = Duration::from_secs(30);
const NO_DEFAULT_SCHEDULES: &str = "[scheduler]\ndefault_schedules = false";

fn testkit(status: &serde_json::Value) -> &serde_json::Value {
    status["categories"]
        .as_array()
        .expect("categories")
        .iter()
        .find(|c| c["category"] == "testkit")
        .expect("testkit category")
}

#[tokio::test(flavor = "multi_thread")]
async fn status_json_reports_queues_workers_and_dead_letters() {
    let mesh = TestMesh::start("", NO_DEFAULT_SCHEDULES).await;
    // Queued, no worker yet: pending counts them.
    mesh.sleep_tasks("queued", 3, 1).await;
    let (ok, out) = cli(&mesh, &["status", "--json"]).await;
    assert!(ok, "{out}");
    let s = first_json(&out);
    for key in [
        "generated_at",
        "categories",
        "dlq_total",
        "workers",
        "schedules",
        "scheduler_leader",
    ] {
        assert!(s.get(key).is_some(), "status --json lacks {key}: {s}");
    }
    let t = testkit(&s);
    assert_eq!(t["stream"], "TASKS_TESTKIT");
    assert_eq!(t["pending"], 3, "{t}");
    assert_eq!(t["messages"], 3, "{t}");
    assert_eq!(t["dlq"], 0);
    assert_eq!(t["paused"], false);
    let lanes: Vec<&str> = t["lanes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["lane"].as_str().unwrap())
        .collect();
    assert_eq!(lanes.len(), 3, "{t}");
    for l in t["lanes"].as_array().unwrap() {
        for k in [
            "consumer",
            "pending",
            "ack_pending",
            "redelivered",
            "waiting",
            "delivered",
            "paused",
            "exists",
        ] {
            assert!(l.get(k).is_some(), "lane lacks {k}: {l}");
        }
        assert_eq!(l["exists"], true);
    }

    // A worker drains the queue and dead-letters a permanent failure.
    let _worker = mesh.worker();
    let fail = TaskName::parse("testkit.fail").unwrap();
    let id = TaskId::new("admin-fail-1").unwrap();
    mesh.client
        .enqueue(
            &fail,
            &serde_json::json!({}),
            EnqueueOptions::default().id(id.clone()),
        )
        .await
        .unwrap();
    let s = eventually(
        LIMIT,
        "status shows the dead letter and a live worker",
        || async {
            let (ok, out) = cli(&mesh, &["status", "--json"]).await;
            if !ok {
                return Err(out);
            }
            let s = first_json(&out);
            let t = testkit(&s).clone();
            if t["dlq"] == 1
                && t["pending"] == 0
                && s["dlq_total"] == 1
                && s["workers"].as_array().is_some_and(|w| w.len() == 1)
            {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;
    let w = &s["workers"][0];
    assert!(
        w["categories"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "testkit"),
        "{w}"
    );

    // The table form names the columns.
    let (ok, out) = cli(&mesh, &["status"]).await;
    assert!(
        ok && out.contains("PENDING") && out.contains("testkit"),
        "{out}"
    );

    // workers --json
    let (ok, out) = cli(&mesh, &["workers", "--json"]).await;
    assert!(ok, "{out}");
    assert_eq!(first_json(&out).as_array().unwrap().len(), 1);

    // inspect: the record is dead and the task is in the DLQ.
    let (ok, out) = cli(&mesh, &["inspect", "admin-fail-1", "--json"]).await;
    assert!(ok, "{out}");
    let i = first_json(&out);
    assert_eq!(i["record"]["state"], "dead", "{i}");
    assert_eq!(i["dead_letter"]["reason"], "permanent", "{i}");
    let (ok, out) = cli(&mesh, &["inspect", "never-enqueued"]).await;
    assert!(!ok && out.contains("not in the DLQ"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_filters_replay_once_and_purge() {
    let mesh = TestMesh::start("", NO_DEFAULT_SCHEDULES).await;
    let worker = mesh.worker();
    let fail = TaskName::parse("testkit.fail").unwrap();
    for i in 0..3 {
        let id = TaskId::new(format!("dead-{i}")).unwrap();
        mesh.client
            .enqueue(
                &fail,
                &serde_json::json!({ "n": i }),
                EnqueueOptions::default().id(id),
            )
            .await
            .unwrap();
    }
    let list = eventually(LIMIT, "3 dead letters", || async {
        let (ok, out) = cli(&mesh, &["dlq", "list", "--json"]).await;
        let l = if ok {
            first_json(&out)
        } else {
            return Err(out);
        };
        if l.as_array().map(Vec::len) == Some(3) {
            Ok(l)
        } else {
            Err(l.to_string())
        }
    })
    .await;
    let first = &list[0];
    assert_eq!(first["task"], "testkit.fail");
    assert_eq!(first["reason"], "permanent");
    assert_eq!(first["original_subject"], "tasks.testkit.fail");
    let seq = first["seq"].as_u64().unwrap().to_string();
    // Which of the three died first is up to the scheduler: remember whose letter it is.
    let first_id = first["task_id"].as_str().unwrap().to_owned();

    // Filters.
    for (args, n) in [
        (vec!["--task", "testkit.fail"], 3),
        (vec!["--task", "testkit"], 3),
        (vec!["--task", "testkit.sleep"], 0),
        (vec!["--reason", "permanent"], 3),
        (vec!["--reason", "expired"], 0),
        (vec!["--newer-than", "1h"], 3),
        (vec!["--older-than", "1h"], 0),
    ] {
        let mut a = vec!["dlq", "list", "--json"];
        a.extend(args.iter().copied());
        let (ok, out) = cli(&mesh, &a).await;
        assert!(ok, "{out}");
        assert_eq!(
            first_json(&out).as_array().unwrap().len(),
            n,
            "dlq list {args:?}"
        );
    }
    let (ok, out) = cli(&mesh, &["dlq", "show", &seq, "--json"]).await;
    assert!(ok, "{out}");
    assert_eq!(first_json(&out)["headers"]["Dlq-Reason"], "permanent");

    // Replay without a target is refused with what to do next.
    let (ok, out) = cli(&mesh, &["dlq", "replay"]).await;
    assert!(!ok && out.contains("--all"), "{out}");

    // Replay the first one with the worker stopped: exactly one task comes back.
    drop(worker);
    let (ok, out) = cli(&mesh, &["dlq", "replay", &seq, "--json"]).await;
    assert!(ok, "{out}");
    let r = first_json(&out);
    assert_eq!(r[0]["subject"], "tasks.testkit.fail", "{r}");
    // Safe to re-run: it is gone from the DLQ, so a second replay does nothing more.
    let (ok, out) = cli(&mesh, &["dlq", "replay", &seq]).await;
    assert!(!ok && out.contains("no dead letter"), "{out}");
    let (ok, out) = cli(&mesh, &["status", "--json"]).await;
    assert!(ok, "{out}");
    let t = testkit(&first_json(&out)).clone();
    assert_eq!(t["pending"], 1, "one replayed task queued: {t}");
    assert_eq!(t["dlq"], 2, "{t}");

    // The republished copy carries no Dlq-* headers and a replay-<seq> id.
    let js = mesh.client.connection().js.clone();
    let stream = js.get_stream("TASKS_TESTKIT").await.unwrap();
    let m = stream
        .get_first_raw_message_by_subject("tasks.testkit.fail", 1)
        .await
        .unwrap();
    assert_eq!(
        m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_owned()),
        Some(format!("replay-{seq}"))
    );
    assert!(m.headers.get("Dlq-Reason").is_none());
    assert_eq!(
        m.headers.get("Task-Id").map(|v| v.as_str()),
        Some(first_id.as_str())
    );

    // Purge: refused without a terminal and without --yes; done with --yes.
    let (ok, out) = cli(&mesh, &["dlq", "purge", "--all"]).await;
    assert!(!ok && out.contains("--yes"), "{out}");
    let (ok, out) = cli(
        &mesh,
        &["dlq", "purge", "--reason", "permanent", "--yes", "--json"],
    )
    .await;
    assert!(ok, "{out}");
    assert_eq!(first_json(&out)["purged"], 2);
    let (ok, out) = cli(&mesh, &["dlq", "list", "--json"]).await;
    assert!(ok);
    assert_eq!(first_json(&out).as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_resume_and_purge_a_category() {
    let mesh = TestMesh::start("", NO_DEFAULT_SCHEDULES).await;
    let (ok, out) = cli(&mesh, &["pause", "testkit", "--json"]).await;
    assert!(ok, "{out}");
    assert_eq!(first_json(&out)["paused"], true);
    let _worker = mesh.worker();
    let ids = mesh.sleep_tasks("paused", 2, 1).await;
    let (ok, out) = cli(&mesh, &["status", "--json"]).await;
    assert!(ok, "{out}");
    let t = testkit(&first_json(&out)).clone();
    assert_eq!(t["paused"], true, "{t}");
    assert!(
        t["lanes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["paused"] == true)
    );
    // Paused: the worker receives nothing while we look.
    assert!(mesh.client.result(&ids[0]).await.unwrap().is_none());
    let (ok, out) = cli(&mesh, &["resume", "testkit"]).await;
    assert!(ok, "{out}");
    mesh.all_succeeded(&ids, LIMIT).await;
    let rec = mesh.client.result(&ids[1]).await.unwrap().unwrap();
    assert_eq!(rec.state, TaskState::Succeeded);

    // Purge a category.
    let (ok, out) = cli(&mesh, &["pause", "testkit"]).await;
    assert!(ok, "{out}");
    mesh.sleep_tasks("purged", 4, 1).await;
    let (ok, out) = cli(&mesh, &["purge", "testkit"]).await;
    assert!(
        !ok && out.contains("--yes"),
        "refused without a terminal: {out}"
    );
    let (ok, out) = cli(&mesh, &["purge", "testkit", "--yes", "--json"]).await;
    assert!(ok, "{out}");
    assert_eq!(first_json(&out)["purged"], 4);
    let (ok, out) = cli(&mesh, &["purge", "nosuchcategory", "--yes"]).await;
    assert!(!ok && out.contains("--config"), "{out}");
}
