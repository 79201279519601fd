//! The worker runtime against a real nats-server: the outcome → ack table of DESIGN.md,
//! dead letters, long tasks, restarts, de-duplication and foreign producers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use taskmesh_nats::EnqueueOptions;
use taskmesh_shared::config::CategoryConfig;
use taskmesh_shared::{RetryPolicy, TaskError, TaskId, TaskName, TaskRecord, TaskState};
use taskmesh_tests::{DeadLetter, InProcMesh, eventually, one_category_config};
use taskmesh_workers::{NoArgs, Registry, TaskContext, TaskPolicy};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A server, a provisioned config with one category `t`, and a producer.
struct Mesh(InProcMesh);

impl std::ops::Deref for Mesh {
    type Target = InProcMesh;
    fn deref(&self) -> &InProcMesh {
        &self.0
    }
}

impl std::ops::DerefMut for Mesh {
    fn deref_mut(&mut self) -> &mut InProcMesh {
        &mut self.0
    }
}

impl Mesh {
    async fn start(ack_wait: Duration) -> Self {
        let cat = CategoryConfig {
            concurrency: 8,
            ack_wait,
            max_deliver: 10,
            max_attempts: 3,
            ..CategoryConfig::default()
        };
        Self(InProcMesh::start(one_category_config("", "t", cat)).await)
    }

    async fn worker(&self, registry: Registry) -> (CancellationToken, JoinHandle<()>) {
        let w = self.0.worker(registry).await;
        (w.stop, w.handle)
    }

    fn js(&self) -> &jetstream::Context {
        &self.client.connection().js
    }

    async fn wait_state(&self, id: &TaskId, state: TaskState) -> TaskRecord {
        self.0.wait_state(id, state, Duration::from_secs(20)).await
    }
}

fn name(s: &str) -> TaskName {
    TaskName::parse(s).unwrap()
}

fn header<'a>(m: &'a DeadLetter, k: &str) -> Option<&'a str> {
    m.header(k)
}

fn quick_retry(max_attempts: u32) -> TaskPolicy {
    TaskPolicy {
        retry: RetryPolicy {
            initial_delay: Duration::from_millis(300),
            max_delay: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: 0.0,
            ..RetryPolicy::default()
        },
        max_attempts: Some(max_attempts),
        ..TaskPolicy::default()
    }
}

#[derive(serde::Deserialize)]
struct Echo {
    x: i64,
}

fn echo_registry(seen: Arc<Mutex<Vec<String>>>) -> Registry {
    let mut r = Registry::new();
    r.register(
        "t.echo",
        TaskPolicy::default(),
        move |ctx: TaskContext, a: Echo| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(ctx.id.clone());
                Ok::<_, TaskError>(serde_json::json!({ "x": a.x }))
            }
        },
    )
    .unwrap();
    r
}

#[tokio::test]
async fn happy_path_stores_a_succeeded_record() {
    let mesh = Mesh::start(Duration::from_secs(30)).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (_stop, _w) = mesh.worker(echo_registry(seen.clone())).await;
    let done = mesh
        .client
        .enqueue(
            &name("t.echo"),
            &serde_json::json!({"x": 7}),
            EnqueueOptions::default(),
        )
        .await
        .unwrap();
    assert!(!done.duplicate);
    let r = mesh
        .client
        .wait(&done.id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.state, TaskState::Succeeded);
    assert_eq!(r.result, Some(serde_json::json!({"x": 7})));
    assert_eq!((r.attempts, r.task.as_str()), (1, "t.echo"));
    assert!(r.enqueued_at.is_some() && r.started_at.is_some() && r.finished_at.is_some());
    assert_eq!(seen.lock().unwrap().as_slice(), [done.id.to_string()]);
}

#[tokio::test]
async fn retryable_failures_back_off_with_growing_delays_then_succeed() {
    let mesh = Mesh::start(Duration::from_secs(30)).await;
    let starts = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let mut r = Registry::new();
    let s = starts.clone();
    r.register(
        "t.flaky",
        quick_retry(5),
        move |ctx: TaskContext, _a: NoArgs| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push(Instant::now());
                if ctx.attempt <= 2 {
                    Err(TaskError::retryable(format!(
                        "attempt {} fails",
                        ctx.attempt
                    )))
                } else {
                    Ok(ctx.attempt)
                }
            }
        },
    )
    .unwrap();
    let (_stop, _w) = mesh.worker(r).await;
    let id = mesh
        .client
        .enqueue(
            &name("t.flaky"),
            &serde_json::json!({}),
            EnqueueOptions::default(),
        )
        .await
        .unwrap()
        .id;
    let rec = mesh.wait_state(&id, TaskState::Succeeded).await;
    assert_eq!(rec.attempts, 3);
    assert_eq!(rec.result, Some(serde_json::json!(3)));
    let t = starts.lock().unwrap().clone();
    assert_eq!(t.len(), 3, "exactly three runs");
    let (d1, d2) = (t[1] - t[0], t[2] - t[1]);
    // 300 ms then 600 ms (no jitter), never a bare immediate Nak.
    assert!(d1 >= Duration::from_millis(280), "first retry after {d1:?}");
    assert!(
        d2 >= Duration::from_millis(560),
        "second retry after {d2:?}"
    );
    assert!(d2 > d1, "delays grow: {d1:?} then {d2:?}");
}

#[tokio::test]
async fn exhausted_attempts_dead_letter_with_original_body_and_headers() {
    let mesh = Mesh::start(Duration::from_secs(30)).await;
    let runs = Arc::new(AtomicU32::new(0));
    let mut r = Registry::new();
    let n = runs.clone();
    r.register(
        "t.always_fail",
        quick_retry(3),
        move |_c: TaskContext, _a: serde_json::Value| {
            n.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(TaskError::retryable("dependency down")) }
        },
    )
    .unwrap();
    let (_stop, _w) = mesh.worker(r).await;
    let body = serde_json::json!({"keep": "me", "n": [1, 2, 3]});
    let opts = EnqueueOptions::default().header("X-Custom", "kept");
    let id = mesh
        .client
        .enqueue(&name("t.always_fail"), &body, opts)
        .await
        .unwrap()
        .id;
    let rec = mesh.wait_state(&id, TaskState::Dead).await;
    assert_eq!(rec.attempts, 3);
    assert_eq!(
        rec.error.as_ref().map(|e| e.kind.as_str()),
        Some("max_attempts")
    );
    let dl = mesh.dead_letter_for("dlq.t.always_fail").await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&dl.payload).unwrap(),
        body
    );
    assert_eq!(header(&dl, "X-Custom"), Some("kept"));
    assert_eq!(header(&dl, "Task-Id"), Some(id.as_str()));
    assert_eq!(header(&dl, "Dlq-Reason"), Some("max_attempts"));
    assert_eq!(header(&dl, "Dlq-Attempts"), Some("3"));
    assert_eq!(header(&dl, "Dlq-Error"), Some("dependency down"));
    assert_eq!(header(&dl, "Dlq-Subject"), Some("tasks.t.always_fail"));
    assert!(header(&dl, "Dlq-Stream-Seq").is_some() && header(&dl, "Dlq-Time").is_some());
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    // Termed: nothing left in the work queue.
    let info = mesh
        .js()
        .get_stream("TASKS_T")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    assert_eq!(info.state.messages, 0);
}

#[tokio::test]
async fn undecodable_body_is_dead_lettered_on_first_delivery_and_the_worker_keeps_serving() {
    let mesh = Mesh::start(Duration::from_secs(30)).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (_stop, _w) = mesh.worker(echo_registry(seen.clone())).await;
    mesh.js()
        .publish("tasks.t.echo", Bytes::from_static(b"\xff\xfe{not json"))
        .await
        .unwrap()
        .await
        .unwrap();
    let dl = mesh.dead_letter_for("dlq.t.echo").await;
    assert_eq!(header(&dl, "Dlq-Reason"), Some("undecodable"));
    assert_eq!(header(&dl, "Dlq-Attempts"), Some("1"));
    assert_eq!(&dl.payload[..], b"\xff\xfe{not json");
    assert!(seen.lock().unwrap().is_empty(), "the handler never ran");
    // Well-formed JSON of the wrong shape is a permanent failure naming the field.
    let bad = mesh
        .client
        .enqueue(
            &name("t.echo"),
            &serde_json::json!({"y": 1}),
            EnqueueOptions::default(),
        )
        .await
        .unwrap()
        .id;
    let rec = mesh.wait_state(&bad, TaskState::Dead).await;
    let err = rec.error.unwrap();
    assert_eq!(err.kind, "permanent");
    assert!(err.message.contains("`x`"), "{}", err.message);
    // And the worker still serves.
    let ok = mesh
        .client
        .enqueue(
            &name("t.echo"),
            &serde_json::json!({"x": 1}),
            EnqueueOptions::default(),
        )
        .await
        .unwrap()
        .id;
    mesh.wait_state(&ok, TaskState::Succeeded).await;
}

#[tokio::test]
async fn unknown_task_is_dead_lettered() {
    let mesh = Mesh::start(Duration::from_secs(30)).await;
    let (_stop, _w) = mesh.worker(echo_registry(Arc::default())).await;
    let id = mesh
        .client
        .enqueue(
            &name("t.nobody_home"),
            &serde_json::json!({}),
            EnqueueOptions::default(),
        )
        .await
        .unwrap()
        .id;
    let rec = mesh.wait_state(&id, TaskState::Dead).await;
    assert_eq!(rec.error.unwrap().kind, "unknown_task");
    let dl = mesh.dead_letter_for("dlq.t.nobody_home").await;
    assert_eq!(header(&dl, "Dlq-Reason"), Some("unknown_task"));
}

#[tokio::test]
async fn permanent_errors_panics_and_expired_deadlines_follow_the_table() {
    let mesh = Mesh::start(Duration::from_secs(30)).await;
    let runs = Arc::new(AtomicU32::new(0));
    let mut r = Registry::new();
    r.register(
        "t.permanent",
        quick_retry(3),
        |_c: TaskContext, _a: NoArgs| async { Err::<(), _>(TaskError::permanent("bad input")) },
    )
    .unwrap();
    r.register(
        "t.panics",
        quick_retry(2),
        |_c: TaskContext, _a: NoArgs| async {
            if true {
                panic!("boom");
            }
            Ok::<(), TaskError>(())
        },
    )
    .unwrap();
    let n = runs.clone();
    r.register(
        "t.counted",
        TaskPolicy::default(),
        move |_c: TaskContext, _a: NoArgs| {
            n.fetch_add(1, Ordering::SeqCst);
            async { Ok::<(), TaskError>(()) }
        },
    )
    .unwrap();
    let (_stop, _w) = mesh.worker(r).await;
    let e = |t: &str| {
        let t = name(t);
        let c = mesh.client.clone();
        async move {
            c.enqueue(&t, &serde_json::json!({}), EnqueueOptions::default())
                .await
                .unwrap()
                .id
        }
    };
    let perm = e("t.permanent").await;
    let rec = mesh.wait_state(&perm, TaskState::Dead).await;
    assert_eq!(
        (rec.attempts, rec.error.unwrap().kind.as_str()),
        (1, "permanent")
    );

    let pan = e("t.panics").await;
    let rec = mesh.wait_state(&pan, TaskState::Dead).await;
    assert_eq!(rec.attempts, 2, "a panic is retryable");
    assert!(rec.error.unwrap().message.contains("boom"));

    let opts = EnqueueOptions {
        deadline: Some(chrono::Utc::now() - chrono::Duration::seconds(1)),
        ..Default::default()
    };
    let late = mesh
        .client
        .enqueue(&name("t.counted"), &serde_json::json!({}), opts)
        .await
        .unwrap()
        .id;
    mesh.wait_state(&late, TaskState::Dead).await;
    let dl = mesh.dead_letter_for("dlq.t.counted").await;
    assert_eq!(header(&dl, "Dlq-Reason"), Some("expired"));
    assert_eq!(runs.load(Ordering::SeqCst), 0, "an expired task never runs");
    let fine = e("t.counted").await;
    mesh.wait_state(&fine, TaskState::Succeeded).await;
}

#[tokio::test]
async fn a_task_running_three_times_ack_wait_is_not_redelivered() {
    let mesh = Mesh::start(Duration::from_secs(1)).await;
    let runs = Arc::new(AtomicU32::new(0));
    let mut r = Registry::new();
    let n = runs.clone();
    r.register(
        "t.slow",
        TaskPolicy::default(),
        move |_c: TaskContext, _a: NoArgs| {
            n.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Ok::<_, TaskError>("done")
            }
        },
    )
    .unwrap();
    let (_stop, _w) = mesh.worker(r).await;
    let id = mesh
        .client
        .enqueue(
            &name("t.slow"),
            &serde_json::json!({}),
            EnqueueOptions::default(),
        )
        .await
        .unwrap()
        .id;
    let rec = mesh.wait_state(&id, TaskState::Succeeded).await;
    assert_eq!(rec.attempts, 1);
    assert!(rec.duration_ms.unwrap() >= 3000);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "progress kept the delivery alive"
    );
}

#[tokio::test]
async fn the_same_msg_id_twice_runs_once() {
    let mesh = Mesh::start(Duration::from_secs(30)).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (_stop, _w) = mesh.worker(echo_registry(seen.clone())).await;
    let id = TaskId::new("order-42-confirmation").unwrap();
    let first = mesh
        .client
        .enqueue(
            &name("t.echo"),
            &serde_json::json!({"x": 1}),
            EnqueueOptions::default().id(id.clone()),
        )
        .await
        .unwrap();
    let second = mesh
        .client
        .enqueue(
            &name("t.echo"),
            &serde_json::json!({"x": 1}),
            EnqueueOptions::default().id(id.clone()),
        )
        .await
        .unwrap();
    assert!(!first.duplicate && second.duplicate);
    mesh.wait_state(&id, TaskState::Succeeded).await;
    // A marker task enqueued after both: once it ran, the duplicate would have too.
    let marker = mesh
        .client
        .enqueue(
            &name("t.echo"),
            &serde_json::json!({"x": 2}),
            EnqueueOptions::default(),
        )
        .await
        .unwrap()
        .id;
    mesh.wait_state(&marker, TaskState::Succeeded).await;
    let runs = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.as_str() == id.as_str())
        .count();
    assert_eq!(runs, 1);
}

#[tokio::test]
async fn a_plain_nats_publish_without_headers_runs() {
    let mesh = Mesh::start(Duration::from_secs(30)).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (_stop, _w) = mesh.worker(echo_registry(seen.clone())).await;
    // A core NATS publish (no JetStream ack, no headers), as any client in any language does.
    let plain = async_nats::connect(mesh.server.url()).await.unwrap();
    plain
        .publish("tasks.t.echo", Bytes::from_static(br#"{"x": 5}"#))
        .await
        .unwrap();
    plain.flush().await.unwrap();
    let id = eventually(Duration::from_secs(10), "the plain task ran", || async {
        seen.lock()
            .unwrap()
            .first()
            .cloned()
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    assert!(
        id.starts_with("TASKS_T-"),
        "id falls back to <stream>-<seq>: {id}"
    );
    let rec = mesh
        .wait_state(&TaskId::new(id).unwrap(), TaskState::Succeeded)
        .await;
    assert_eq!(rec.result, Some(serde_json::json!({"x": 5})));
}

#[tokio::test]
async fn a_nats_server_restart_mid_stream_loses_nothing() {
    let mut mesh = Mesh::start(Duration::from_secs(5)).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (_stop, _w) = mesh.worker(echo_registry(seen.clone())).await;
    let total = 600usize;
    let mut ids = Vec::new();
    for i in 0..total {
        if i == total / 2 {
            mesh.server.restart().await;
        }
        let id = TaskId::new(format!("restart-{i}")).unwrap();
        // A producer retries under the same id until the PubAck arrives: dedup makes it safe.
        eventually(Duration::from_secs(30), "enqueue accepted", || {
            let c = mesh.client.clone();
            let id = id.clone();
            async move {
                c.enqueue(
                    &name("t.echo"),
                    &serde_json::json!({"x": i}),
                    EnqueueOptions::default().id(id),
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
            }
        })
        .await;
        ids.push(id);
    }
    eventually(Duration::from_secs(60), "every task ran", || async {
        let got: std::collections::HashSet<String> = seen.lock().unwrap().iter().cloned().collect();
        let missing: Vec<&TaskId> = ids.iter().filter(|i| !got.contains(i.as_str())).collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} missing, first {:?}",
                missing.len(),
                missing.first()
            ))
        }
    })
    .await;
    for id in ids.iter().step_by(50) {
        mesh.wait_state(id, TaskState::Succeeded).await;
    }
}

#[tokio::test]
async fn worker_heartbeats_are_visible_and_removed_on_drain() {
    let mesh = Mesh::start(Duration::from_secs(30)).await;
    let (stop, w) = mesh.worker(echo_registry(Arc::default())).await;
    let hb = taskmesh_nats::Heartbeats::open(mesh.js()).await.unwrap();
    let live = eventually(Duration::from_secs(10), "a heartbeat", || async {
        let l = hb.list().await.map_err(|e| e.to_string())?;
        if l.is_empty() {
            Err("none".into())
        } else {
            Ok(l)
        }
    })
    .await;
    assert_eq!(live[0].categories, ["t"]);
    assert_eq!(live[0].concurrency, 8);
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), w)
        .await
        .unwrap()
        .unwrap();
    assert!(hb.list().await.unwrap().is_empty());
    let _ = futures::stream::empty::<()>().next().await;
}

/// Idle lanes long-poll wide (slots reserved) while slots are plentiful and narrow when
/// they are not: a trickle on an idle worker, then a burst far beyond its slots, then a
/// trickle while it is saturated. Every task runs exactly once and never more than
/// `concurrency` at a time.
#[tokio::test]
async fn wide_long_polls_never_exceed_concurrency_and_lose_nothing() {
    const CONCURRENCY: usize = 64;
    let cat = CategoryConfig {
        concurrency: CONCURRENCY,
        ack_wait: Duration::from_secs(30),
        ..CategoryConfig::default()
    };
    let mesh = InProcMesh::start(one_category_config("", "t", cat)).await;
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let ran = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut r = Registry::new();
    {
        let (running, peak, ran) = (running.clone(), peak.clone(), ran.clone());
        r.register(
            "t.hold",
            TaskPolicy::default(),
            move |ctx: TaskContext, _a: NoArgs| {
                let (running, peak, ran) = (running.clone(), peak.clone(), ran.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    ran.lock().unwrap().push(ctx.id.clone());
                    Ok::<_, TaskError>(())
                }
            },
        )
        .unwrap();
    }
    let w = mesh.worker(r).await;
    let task = name("t.hold");
    let send = |n: usize| {
        let client = mesh.client.clone();
        let task = task.clone();
        async move {
            let items = (0..n).map(|_| {
                (
                    task.clone(),
                    Bytes::from_static(b"{}"),
                    EnqueueOptions::default(),
                )
            });
            for r in client.enqueue_batch(items).await {
                r.unwrap();
            }
        }
    };
    // Trickle onto an idle worker (wide polls), burst (busy fetches), trickle while busy.
    for _ in 0..20 {
        send(1).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    send(400).await;
    for _ in 0..20 {
        send(1).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let total = 440;
    eventually(Duration::from_secs(30), "all tasks ran", || {
        let n = ran.lock().unwrap().len();
        async move {
            if n >= total {
                Ok(())
            } else {
                Err(format!("{n} of {total} ran"))
            }
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ran = ran.lock().unwrap().clone();
    let unique: std::collections::HashSet<&String> = ran.iter().collect();
    assert_eq!(ran.len(), total, "a task ran twice or was lost");
    assert_eq!(unique.len(), total);
    let peak = peak.load(Ordering::SeqCst) as usize;
    assert!(
        peak <= CONCURRENCY,
        "{peak} tasks ran at once with concurrency {CONCURRENCY}"
    );
    assert!(
        peak > CONCURRENCY / 2,
        "the burst never filled the slots (peak {peak})"
    );
    w.stop.cancel();
    let _ = w.handle.await;
}
