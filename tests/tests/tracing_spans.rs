//! Trace propagation through NATS headers with an in-memory span exporter: a task continues
//! its producer's trace on the first attempt, retries are new traces linked to the
//! producer, and scheduled fires are linked, not parented.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use taskmesh_nats::{Client, EnqueueOptions};
use taskmesh_shared::config::CategoryConfig;
use taskmesh_shared::{Category, Config, RetryPolicy, TaskError, TaskId, TaskName, TaskState};
use taskmesh_tests::{NatsServer, eventually};
use taskmesh_workers::{NoArgs, Registry, TaskContext, TaskPolicy, Worker, WorkerOptions};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// One exporter for the whole test binary (the subscriber is process-global).
fn exporter() -> &'static (InMemorySpanExporter, SdkTracerProvider) {
    static CELL: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    CELL.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("info"))
            .with(layer);
        tracing::subscriber::set_global_default(subscriber).unwrap();
        taskmesh_nats::trace::set_enabled(true);
        (exporter, provider)
    })
}

fn spans() -> Vec<SpanData> {
    exporter().0.get_finished_spans().unwrap()
}

fn attr(s: &SpanData, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

async fn mesh() -> (NatsServer, Client, CancellationToken) {
    exporter();
    let server = NatsServer::start().await;
    let mut cfg = Config {
        seed_categories: false,
        ..Config::default()
    };
    cfg.categories.insert(
        Category::new("tr").unwrap(),
        CategoryConfig {
            concurrency: 4,
            ..Default::default()
        },
    );
    cfg.nats.url = server.url();
    let cfg = Arc::new(cfg);
    let conn = taskmesh_nats::connect(&cfg.nats, "test", Duration::from_secs(5))
        .await
        .unwrap();
    taskmesh_nats::provision(&conn.js, &cfg).await.unwrap();
    let mut r = Registry::new();
    let policy = TaskPolicy {
        retry: RetryPolicy {
            initial_delay: Duration::from_millis(100),
            jitter: 0.0,
            ..Default::default()
        },
        max_attempts: Some(5),
        ..Default::default()
    };
    r.register(
        "tr.flaky",
        policy.clone(),
        |ctx: TaskContext, _a: NoArgs| async move {
            if ctx.attempt <= 2 {
                Err(TaskError::retryable("not yet"))
            } else {
                Ok(ctx.attempt)
            }
        },
    )
    .unwrap();
    r.register("tr.ok", policy, |_c: TaskContext, _a: NoArgs| async {
        Ok::<_, TaskError>(())
    })
    .unwrap();
    let worker_conn = taskmesh_nats::connect(&cfg.nats, "worker", Duration::from_secs(5))
        .await
        .unwrap();
    let w = Worker::new(
        worker_conn,
        cfg.clone(),
        Arc::new(r),
        WorkerOptions::default(),
    )
    .await
    .unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(w.run(stop.clone()));
    let client = Client::new(conn, &cfg).await.unwrap();
    (server, client, stop)
}

fn process_spans_of(task_id: &str) -> Vec<SpanData> {
    let mut v: Vec<SpanData> = spans()
        .into_iter()
        .filter(|s| {
            s.name.starts_with("process ")
                && attr(s, "messaging.message.id").as_deref() == Some(task_id)
        })
        .collect();
    v.sort_by_key(|s| attr(s, "task.attempt"));
    v
}

async fn wait_spans(task_id: &str, n: usize) -> Vec<SpanData> {
    eventually(
        Duration::from_secs(20),
        &format!("{n} process spans for {task_id}"),
        || async {
            let v = process_spans_of(task_id);
            if v.len() >= n {
                Ok(v)
            } else {
                Err(format!("{} spans", v.len()))
            }
        },
    )
    .await
}

#[tokio::test]
async fn a_task_continues_the_producers_trace_and_retries_are_linked() {
    let (_server, client, _stop) = mesh().await;
    // The producing service's own span.
    let parent = tracing::info_span!("handle_request");
    let parent_trace: TraceId = parent.context().span().span_context().trace_id();
    assert_ne!(parent_trace, TraceId::INVALID);
    let id = TaskId::new("trace-flaky").unwrap();
    client
        .enqueue(
            &TaskName::parse("tr.flaky").unwrap(),
            &serde_json::json!({}),
            EnqueueOptions::default().id(id.clone()),
        )
        .instrument(parent.clone())
        .await
        .unwrap();
    drop(parent);
    let rec = client.wait(&id, Duration::from_secs(20)).await.unwrap();
    assert_eq!((rec.state, rec.attempts), (TaskState::Succeeded, 3));

    let process = wait_spans(id.as_str(), 3).await;
    assert_eq!(process.len(), 3, "one process span per attempt");
    let publish = eventually(Duration::from_secs(5), "the publish span", || async {
        spans()
            .into_iter()
            .find(|s| {
                s.name == "publish tasks.tr.flaky"
                    && attr(s, "messaging.message.id").as_deref() == Some("trace-flaky")
            })
            .ok_or_else(|| "none".to_string())
    })
    .await;
    assert_eq!(
        publish.span_context.trace_id(),
        parent_trace,
        "publish is a child of the request"
    );
    assert_eq!(attr(&publish, "messaging.system").as_deref(), Some("nats"));

    // First attempt: a child of the producer's publish span, same trace.
    let first = &process[0];
    assert_eq!(first.span_context.trace_id(), parent_trace);
    assert_eq!(first.parent_span_id, publish.span_context.span_id());
    assert_eq!(attr(first, "task.attempt").as_deref(), Some("1"));
    assert_eq!(attr(first, "task.outcome").as_deref(), Some("retryable"));
    assert_eq!(
        attr(first, "messaging.destination.name").as_deref(),
        Some("tasks.tr.flaky")
    );
    // Retries: new traces, each linked to the producer.
    for retry in &process[1..] {
        assert_ne!(retry.span_context.trace_id(), parent_trace);
        assert_eq!(retry.parent_span_id, SpanId::INVALID);
        assert!(
            retry
                .links
                .iter()
                .any(|l| l.span_context.span_id() == publish.span_context.span_id()),
            "retry {:?} links to the publish span",
            attr(retry, "task.attempt")
        );
    }
    assert_eq!(
        attr(&process[2], "task.outcome").as_deref(),
        Some("succeeded")
    );
    // The result record names the trace of the attempt that wrote it.
    assert_eq!(
        rec.trace_id.as_deref(),
        Some(process[2].span_context.trace_id().to_string().as_str())
    );
}

#[tokio::test]
async fn a_scheduled_fire_is_linked_not_parented() {
    let (_server, client, _stop) = mesh().await;
    let fire = tracing::info_span!("scheduler_fire");
    let fire_sc = fire.context().span().span_context().clone();
    let id = TaskId::new("sched-x_20261129T020000Z").unwrap();
    let opts = EnqueueOptions::default()
        .id(id.clone())
        .header("Task-Schedule", "sched-x")
        .header("Task-Fire-Time", "2026-11-29T02:00:00Z");
    client
        .enqueue(
            &TaskName::parse("tr.ok").unwrap(),
            &serde_json::json!({}),
            opts,
        )
        .instrument(fire.clone())
        .await
        .unwrap();
    drop(fire);
    let process = wait_spans(id.as_str(), 1).await;
    let p = &process[0];
    assert_ne!(
        p.span_context.trace_id(),
        fire_sc.trace_id(),
        "a fire starts its own trace"
    );
    let publish_span_id = spans()
        .into_iter()
        .find(|s| {
            s.name == "publish tasks.tr.ok"
                && attr(s, "messaging.message.id").as_deref() == Some(id.as_str())
        })
        .map(|s| s.span_context.span_id())
        .unwrap();
    assert!(
        p.links
            .iter()
            .any(|l| l.span_context.span_id() == publish_span_id),
        "linked to the fire"
    );
}

#[tokio::test]
async fn a_foreign_traceparent_header_is_continued() {
    let (_server, client, _stop) = mesh().await;
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let id = TaskId::new("foreign-tp").unwrap();
    client
        .enqueue(
            &TaskName::parse("tr.ok").unwrap(),
            &serde_json::json!({}),
            EnqueueOptions::default()
                .id(id.clone())
                .header("traceparent", tp),
        )
        .await
        .unwrap();
    let process = wait_spans(id.as_str(), 1).await;
    assert_eq!(
        process[0].span_context.trace_id().to_string(),
        "0af7651916cd43dd8448eb211c80319c"
    );
    assert_eq!(process[0].parent_span_id.to_string(), "b7ad6b7169203331");
}
