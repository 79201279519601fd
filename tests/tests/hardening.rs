//! Production hardening against real nats-server: priority lanes, circuit breakers, shared
//! rate limits, time limits, cancel, unique tasks and payload protection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use taskmesh_nats::publish::Unique;
use taskmesh_nats::{EnqueueOptions, NatsError};
use taskmesh_shared::config::{CategoryConfig, EncryptionConfig};
use taskmesh_shared::{Category, Lane, TaskError, TaskId, TaskName, TaskState};
use taskmesh_tests::{InProcMesh, TestMesh, eventually, one_category_config};
use taskmesh_workers::{NoArgs, Registry, TaskContext, TaskPolicy};
use tokio::time::Instant;

fn name(s: &str) -> TaskName {
    TaskName::parse(s).unwrap()
}

#[derive(serde::Deserialize)]
struct Work {
    #[serde(default)]
    ms: u64,
}

/// A registry where `h.work` sleeps `ms` and records when each task id started.
fn recording_registry(starts: Arc<Mutex<HashMap<String, Instant>>>) -> Registry {
    let mut r = Registry::new();
    r.register(
        "h.work",
        TaskPolicy::default(),
        move |ctx: TaskContext, a: Work| {
            let starts = starts.clone();
            async move {
                starts
                    .lock()
                    .unwrap()
                    .insert(ctx.id.clone(), Instant::now());
                tokio::time::sleep(Duration::from_millis(a.ms)).await;
                Ok::<_, TaskError>(())
            }
        },
    )
    .unwrap();
    r
}

#[tokio::test]
async fn high_priority_starts_fast_under_saturation_and_low_is_not_starved() {
    let cat = CategoryConfig {
        concurrency: 8,
        max_ack_pending: 20_000,
        ..Default::default()
    };
    let mesh = InProcMesh::start(one_category_config("", "h", cat)).await;
    let starts = Arc::new(Mutex::new(HashMap::new()));
    let task = name("h.work");
    let normal = Bytes::from_static(br#"{"ms": 5}"#);
    let items = (0..10_000).map(|i| {
        (
            task.clone(),
            normal.clone(),
            EnqueueOptions::default().id(TaskId::new(format!("n-{i}")).unwrap()),
        )
    });
    for r in mesh.client.enqueue_batch(items).await {
        r.unwrap();
    }
    let w = mesh.worker(recording_registry(starts.clone())).await;
    eventually(
        Duration::from_secs(10),
        "the worker is saturated",
        || async {
            let n = w.stats.in_flight();
            if n == 8 {
                Ok(())
            } else {
                Err(format!("{n} in flight"))
            }
        },
    )
    .await;
    // Low-priority work enqueued behind a deep normal backlog.
    for i in 0..20 {
        let id = TaskId::new(format!("low-{i}")).unwrap();
        mesh.client
            .send(
                &task,
                normal.clone(),
                EnqueueOptions::default().id(id).lane(Lane::Low),
            )
            .await
            .unwrap()
            .acked()
            .await
            .unwrap();
    }
    let mut latencies = Vec::new();
    for i in 0..50 {
        let id = TaskId::new(format!("high-{i}")).unwrap();
        let t0 = Instant::now();
        mesh.client
            .send(
                &task,
                Bytes::from_static(br#"{"ms": 0}"#),
                EnqueueOptions::default().id(id.clone()).lane(Lane::High),
            )
            .await
            .unwrap()
            .acked()
            .await
            .unwrap();
        let started = eventually(Duration::from_secs(5), "the high task started", || async {
            starts
                .lock()
                .unwrap()
                .get(id.as_str())
                .copied()
                .ok_or_else(|| "not yet".to_string())
        })
        .await;
        latencies.push(started.duration_since(t0));
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100 - 1];
    eprintln!(
        "high-priority start latency: p50 {:?}, p99 {:?}, max {:?}",
        latencies[25], p99, latencies[49]
    );
    assert!(p99 <= Duration::from_millis(100), "p99 {p99:?}");
    // Every low task ran while the normal backlog was still there.
    eventually(Duration::from_secs(30), "all low tasks ran", || async {
        let s = starts.lock().unwrap();
        let low = (0..20)
            .filter(|i| s.contains_key(&format!("low-{i}")))
            .count();
        if low == 20 {
            Ok(())
        } else {
            Err(format!("{low} of 20"))
        }
    })
    .await;
    let normal_done = starts
        .lock()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("n-"))
        .count();
    assert!(
        normal_done < 10_000,
        "low tasks finished only after the normal backlog drained"
    );
    w.stop.cancel();
}

#[tokio::test]
async fn a_dependency_outage_defers_tasks_without_dead_letters_or_a_hot_loop() {
    let fx = TestMesh::start(
        "ack_wait = \"10s\"\nmax_attempts = 4",
        "[breakers.testkit-dep]\nfailure_threshold = 3\nwindow = \"10s\"\nopen_for = \"2s\"\n",
    )
    .await;
    let flag = fx.dir.path().join("dependency-down");
    std::fs::write(&flag, "down").unwrap();
    let mut w = fx.worker();
    let task = name("testkit.dependent");
    let body = Bytes::from(
        serde_json::to_vec(&serde_json::json!({"down_flag": flag.to_str().unwrap()})).unwrap(),
    );
    let mut ids = Vec::new();
    for i in 0..40 {
        let id = TaskId::new(format!("dep-{i}")).unwrap();
        fx.client
            .send(
                &task,
                body.clone(),
                EnqueueOptions::default().id(id.clone()),
            )
            .await
            .unwrap()
            .acked()
            .await
            .unwrap();
        ids.push(id);
    }
    // The outage: let the breaker open and several open/half-open cycles pass.
    let addr = taskmesh_tests::http_addr_of(&w).await;
    eventually(Duration::from_secs(20), "the breaker opened", || async {
        let (_, m) = taskmesh_tests::http_get(&addr, "/metrics").await?;
        if m.contains("taskmesh_breaker_state{dependency=\"testkit-dep\"} 2") {
            Ok(())
        } else {
            Err("not open".into())
        }
    })
    .await;
    let cpu0 = cpu_seconds(w.pid());
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await; // the simulated outage goes on
    let cpu = cpu_seconds(w.pid()) - cpu0;
    let share = cpu / t0.elapsed().as_secs_f64();
    eprintln!(
        "worker CPU while the breaker cycles: {:.1}% of a core",
        share * 100.0
    );
    assert!(share < 0.10, "hot loop: {:.1}% of a core", share * 100.0);
    // Recovery.
    std::fs::remove_file(&flag).unwrap();
    fx.all_succeeded(&ids, Duration::from_secs(60)).await;
    let info = fx
        .client
        .connection()
        .js
        .get_stream("TASKS_DLQ")
        .await
        .unwrap()
        .cached_info()
        .state
        .messages;
    assert_eq!(info, 0, "nothing was dead-lettered by the outage");
    assert!(w.is_running());
}

/// User + system CPU seconds of a process (Linux `/proc`).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test]
async fn four_workers_share_one_rate_limit() {
    let fx = TestMesh::start("", "").await;
    // The limit is per task, configured once, held by every process together.
    let cfg = std::fs::read_to_string(&fx.config).unwrap()
        + "\n[tasks.\"testkit.sleep\"]\nrate_limit = \"50/s\"\n";
    std::fs::write(&fx.config, cfg).unwrap();
    let workers: Vec<_> = (0..4).map(|_| fx.worker()).collect();
    let ids = fx.sleep_tasks("rl", 1000, 0).await;
    fx.all_succeeded(&ids, Duration::from_secs(60)).await;
    let mut starts: Vec<i64> = fx
        .ledger()
        .iter()
        .filter(|e| e.event == "start")
        .map(|e| e.at_ms)
        .collect();
    starts.sort();
    assert_eq!(starts.len(), 1000);
    let pids: std::collections::HashSet<u32> = fx.ledger().iter().map(|e| e.pid).collect();
    assert_eq!(pids.len(), 4, "all four workers took part");
    // Every 1-second window after a 1 s warm-up (and before the tail) holds 50 ± 10%.
    let (first, last) = (starts[0], starts[999]);
    let mut worst = (50usize, 0i64);
    let mut t = first + 1000;
    while t + 1000 <= last - 500 {
        let n = starts.iter().filter(|s| **s >= t && **s < t + 1000).count();
        if (n as i64 - 50).abs() > (worst.0 as i64 - 50).abs() {
            worst = (n, t - first);
        }
        assert!(
            (45..=55).contains(&n),
            "{n} starts in the window at +{} ms",
            t - first
        );
        t += 100;
    }
    eprintln!(
        "1000 tasks in {:.1} s; worst window {} at +{} ms",
        (last - first) as f64 / 1000.0,
        worst.0,
        worst.1
    );
    drop(workers);
}

#[tokio::test]
async fn soft_limits_signal_and_hard_limits_abort() {
    let mesh = InProcMesh::start(one_category_config(
        "",
        "h",
        CategoryConfig {
            concurrency: 4,
            ..Default::default()
        },
    ))
    .await;
    let mut r = Registry::new();
    let soft = TaskPolicy {
        soft_timeout: Some(Duration::from_millis(300)),
        ..TaskPolicy::default()
    };
    r.register(
        "h.cooperative",
        soft,
        |ctx: TaskContext, _a: NoArgs| async move {
            tokio::select! {
                _ = ctx.cancel.cancelled() => Ok::<_, TaskError>("stopped at the soft limit"),
                _ = tokio::time::sleep(Duration::from_secs(30)) => Ok("ran to the end"),
            }
        },
    )
    .unwrap();
    let hard = TaskPolicy {
        timeout: Some(Duration::from_millis(300)),
        max_attempts: Some(2),
        ..TaskPolicy::default()
    };
    r.register("h.stubborn", hard, |_c: TaskContext, _a: NoArgs| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok::<_, TaskError>(())
    })
    .unwrap();
    let _w = mesh.worker(r).await;
    let a = mesh
        .client
        .enqueue(
            &name("h.cooperative"),
            &serde_json::json!({}),
            EnqueueOptions::default(),
        )
        .await
        .unwrap()
        .id;
    let rec = mesh
        .wait_state(&a, TaskState::Succeeded, Duration::from_secs(10))
        .await;
    assert_eq!(
        rec.result,
        Some(serde_json::json!("stopped at the soft limit"))
    );
    assert!(rec.duration_ms.unwrap() < 5_000);
    let b = mesh
        .client
        .enqueue(
            &name("h.stubborn"),
            &serde_json::json!({}),
            EnqueueOptions::default(),
        )
        .await
        .unwrap()
        .id;
    let rec = mesh
        .wait_state(&b, TaskState::Dead, Duration::from_secs(20))
        .await;
    assert_eq!(rec.attempts, 2);
    assert_eq!(rec.error.unwrap().kind, "max_attempts");
    let dl = mesh.dead_letters().await;
    assert!(dl.iter().any(|d| {
        d.subject == "dlq.h.stubborn"
            && d.header("Dlq-Error")
                .is_some_and(|v| v.contains("time limit"))
    }));
}

#[tokio::test]
async fn cancel_skips_a_queued_task_and_stops_a_running_one() {
    let mesh = InProcMesh::start(one_category_config(
        "",
        "h",
        CategoryConfig {
            concurrency: 4,
            ..Default::default()
        },
    ))
    .await;
    let ran = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut r = Registry::new();
    let seen = ran.clone();
    r.register(
        "h.long",
        TaskPolicy::default(),
        move |ctx: TaskContext, _a: NoArgs| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(ctx.id.clone());
                tokio::select! {
                    _ = ctx.cancel.cancelled() => Err(TaskError::retryable("interrupted")),
                    _ = tokio::time::sleep(Duration::from_secs(60)) => Ok(()),
                }
            }
        },
    )
    .unwrap();
    let cancels = taskmesh_nats::Cancels::open(&mesh.client.connection().js)
        .await
        .unwrap();
    // Queued: cancelled before any worker runs.
    let queued = mesh
        .client
        .enqueue(
            &name("h.long"),
            &serde_json::json!({}),
            EnqueueOptions::default(),
        )
        .await
        .unwrap()
        .id;
    cancels.request(&queued, "test").await.unwrap();
    let _w = mesh.worker(r).await;
    let rec = mesh
        .wait_state(&queued, TaskState::Cancelled, Duration::from_secs(10))
        .await;
    assert!(rec.error.unwrap().message.contains("before it started"));
    // Running: its token fires.
    let running = mesh
        .client
        .enqueue(
            &name("h.long"),
            &serde_json::json!({}),
            EnqueueOptions::default(),
        )
        .await
        .unwrap()
        .id;
    eventually(Duration::from_secs(10), "it runs", || async {
        if ran.lock().unwrap().contains(&running.to_string()) {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await;
    let t0 = Instant::now();
    cancels.request(&running, "test").await.unwrap();
    mesh.wait_state(&running, TaskState::Cancelled, Duration::from_secs(10))
        .await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(
        !ran.lock().unwrap().contains(&queued.to_string()),
        "the queued task never ran"
    );
}

#[tokio::test]
async fn unique_tasks_are_refused_inside_their_window() {
    let mesh = InProcMesh::start(one_category_config("", "h", CategoryConfig::default())).await;
    let task = name("h.report");
    let u = || EnqueueOptions {
        unique: Some(Unique {
            window: Duration::from_secs(2),
            key: None,
        }),
        ..Default::default()
    };
    let first = mesh
        .client
        .enqueue(&task, &serde_json::json!({"day": "2026-11-29"}), u())
        .await
        .unwrap();
    match mesh
        .client
        .enqueue(&task, &serde_json::json!({"day": "2026-11-29"}), u())
        .await
    {
        Err(NatsError::NotUnique { existing, .. }) => assert_eq!(existing, first.id),
        other => panic!("expected NotUnique, got {other:?}"),
    }
    // Different arguments are a different task.
    mesh.client
        .enqueue(&task, &serde_json::json!({"day": "2026-11-30"}), u())
        .await
        .unwrap();
    // An explicit key spans arguments.
    let k = || EnqueueOptions {
        unique: Some(Unique {
            window: Duration::from_secs(60),
            key: Some("nightly".into()),
        }),
        ..Default::default()
    };
    mesh.client
        .enqueue(&task, &serde_json::json!({"a": 1}), k())
        .await
        .unwrap();
    assert!(matches!(
        mesh.client
            .enqueue(&task, &serde_json::json!({"a": 2}), k())
            .await,
        Err(NatsError::NotUnique { .. })
    ));
    // After the window (beyond which the stream's 10-minute dedup would not help either) it
    // is accepted again, with a new id.
    let again = eventually(Duration::from_secs(10), "the window expired", || async {
        mesh.client
            .enqueue(&task, &serde_json::json!({"day": "2026-11-29"}), u())
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    assert_ne!(again.id, first.id);
}

#[tokio::test]
async fn oversize_bodies_are_refused_by_the_client_and_dead_lettered_by_the_worker() {
    let mesh = InProcMesh::start(one_category_config("", "h", CategoryConfig::default())).await;
    let big = "x".repeat(2 * 1024 * 1024);
    match mesh
        .client
        .enqueue(
            &name("h.echo"),
            &serde_json::json!({"blob": big}),
            EnqueueOptions::default(),
        )
        .await
    {
        Err(NatsError::TooLarge { size, limit }) => assert!(size > limit),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // A worker configured for smaller bodies than the stream takes refuses them unparsed.
    let ran = Arc::new(Mutex::new(0));
    let mut r = Registry::new();
    let n = ran.clone();
    r.register(
        "h.echo",
        TaskPolicy::default(),
        move |_c: TaskContext, _a: serde_json::Value| {
            *n.lock().unwrap() += 1;
            async { Ok::<_, TaskError>(()) }
        },
    )
    .unwrap();
    let mut small = (*mesh.cfg).clone();
    small.streams.max_msg_size = 4096;
    let _w = mesh.worker_with(r, Arc::new(small)).await;
    let body = serde_json::to_vec(&serde_json::json!({"blob": "y".repeat(8192)})).unwrap();
    mesh.client
        .send(&name("h.echo"), body.into(), EnqueueOptions::default())
        .await
        .unwrap()
        .acked()
        .await
        .unwrap();
    let dl = eventually(Duration::from_secs(10), "a dead letter", || async {
        mesh.dead_letters()
            .await
            .into_iter()
            .next()
            .ok_or_else(|| "none".to_string())
    })
    .await;
    assert_eq!(dl.header("Dlq-Reason"), Some("undecodable"));
    assert!(dl.header("Dlq-Error").unwrap().contains("exceeds"));
    assert_eq!(*ran.lock().unwrap(), 0);
}

#[tokio::test]
async fn encrypted_bodies_run_and_tampered_or_replayed_ones_are_dead_lettered() {
    let key = |b: u8| base64_key(b);
    let mut cfg = one_category_config("", "h", CategoryConfig::default());
    cfg.encryption = EncryptionConfig {
        categories: vec![Category::new("h").unwrap()],
        current: Some("k2".into()),
        keys: BTreeMap::from([("k1".to_string(), key(1)), ("k2".to_string(), key(2))]),
        keys_file: None,
    };
    let mesh = InProcMesh::start(cfg).await;
    let seen = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
    let mut r = Registry::new();
    let s = seen.clone();
    r.register(
        "h.secret",
        TaskPolicy::default(),
        move |_c: TaskContext, a: serde_json::Value| {
            s.lock().unwrap().push(a);
            async { Ok::<_, TaskError>(()) }
        },
    )
    .unwrap();
    let _w = mesh.worker(r).await;
    let ok = mesh
        .client
        .enqueue(
            &name("h.secret"),
            &serde_json::json!({"card": "4111"}),
            EnqueueOptions::default(),
        )
        .await
        .unwrap()
        .id;
    mesh.wait_state(&ok, TaskState::Succeeded, Duration::from_secs(10))
        .await;
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [serde_json::json!({"card": "4111"})]
    );
    // What travelled was ciphertext: read it back from the stream? It is acked and gone;
    // seal one ourselves with the same keyring instead.
    let ring = mesh.cfg.encryption.keyring().unwrap().unwrap();
    let js = &mesh.client.connection().js;
    let publish = |id: &str, body: Vec<u8>, key_id: &str| {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Task-Id", id);
        h.insert(
            "Nats-Msg-Id",
            format!("{id}-{}", fastrand_suffix()).as_str(),
        );
        h.insert("Task-Key-Id", key_id);
        h.insert("Task-Encoding", "xchacha20poly1305");
        let js = js.clone();
        async move {
            js.publish_with_headers("tasks.h.secret", h, body.into())
                .await
                .unwrap()
                .await
                .unwrap()
        }
    };
    let mut tampered = ring
        .seal("tasks.h.secret", "t-tamper", b"{\"card\":\"5500\"}")
        .unwrap();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x55;
    publish("t-tamper", tampered, "k2").await;
    // Bound to another task id.
    let moved = ring
        .seal("tasks.h.secret", "t-other", b"{\"card\":\"5500\"}")
        .unwrap();
    publish("t-moved", moved, "k2").await;
    // A replay of a finished task's valid ciphertext, past JetStream's duplicate check.
    let replay = ring
        .seal("tasks.h.secret", ok.as_str(), b"{\"card\":\"4111\"}")
        .unwrap();
    publish(ok.as_str(), replay, "k2").await;
    // A plain body in an encrypted category.
    js.publish("tasks.h.secret", Bytes::from_static(b"{\"card\":\"1\"}"))
        .await
        .unwrap()
        .await
        .unwrap();
    let dls = eventually(Duration::from_secs(10), "four dead letters", || async {
        let d = mesh.dead_letters().await;
        if d.len() >= 4 {
            Ok(d)
        } else {
            Err(format!("{}", d.len()))
        }
    })
    .await;
    for d in &dls {
        assert_eq!(d.header("Dlq-Reason"), Some("undecodable"));
    }
    let errors: Vec<String> = dls
        .iter()
        .map(|d| d.header("Dlq-Error").unwrap().to_owned())
        .collect();
    assert!(errors.iter().any(|e| e.contains("replayed")), "{errors:?}");
    assert!(
        errors.iter().any(|e| e.contains("plain body")),
        "{errors:?}"
    );
    assert_eq!(
        errors
            .iter()
            .filter(|e| e.contains("authentication"))
            .count(),
        2,
        "{errors:?}"
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "nothing tampered or replayed ran"
    );
    // Rotation: a body sealed with the old key still runs.
    let old =
        taskmesh_shared::crypto::Keyring::new("k1", &BTreeMap::from([("k1".to_string(), key(1))]))
            .unwrap();
    publish(
        "t-old-key",
        old.seal("tasks.h.secret", "t-old-key", b"{\"card\":\"old\"}")
            .unwrap(),
        "k1",
    )
    .await;
    mesh.wait_state(
        &TaskId::new("t-old-key").unwrap(),
        TaskState::Succeeded,
        Duration::from_secs(10),
    )
    .await;
}

fn base64_key(b: u8) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode([b; 32])
}

fn fastrand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}
