//! Metrics, health probes, JSON logs and OTLP export of real `taskmesh` processes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use taskmesh_nats::EnqueueOptions;
use taskmesh_shared::{TaskId, TaskName};
use taskmesh_tests::{TaskmeshProcess, TestMesh, eventually, http_addr_of, http_get};

/// The value of one metric line (`name{labels} value`), 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_scrape_after_n_tasks_shows_the_counters_moved_by_n() {
    let mesh = TestMesh::start("", "").await;
    let w = mesh.worker();
    let addr = http_addr_of(&w).await;
    let series = "taskmesh_tasks_total{task=\"testkit.sleep\",outcome=\"succeeded\"}";
    let before = http_get(&addr, "/metrics").await.unwrap();
    assert_eq!(before.0, 200);
    let base = metric(&before.1, series);
    let n = 37;
    let ids = mesh.sleep_tasks("scrape", n, 1).await;
    mesh.all_succeeded(&ids, Duration::from_secs(30)).await;
    let (_, text) = http_get(&addr, "/metrics").await.unwrap();
    assert_eq!(metric(&text, series) - base, n as f64, "{text}");
    assert_eq!(
        metric(
            &text,
            "taskmesh_task_duration_seconds_count{task=\"testkit.sleep\"}"
        ),
        n as f64
    );
    assert_eq!(metric(&text, "taskmesh_nats_connected"), 1.0);
    assert!(
        text.contains("taskmesh_tasks_in_flight{category=\"testkit\"}"),
        "{text}"
    );
    assert!(text.contains("# TYPE taskmesh_task_duration_seconds histogram"));
    assert_eq!(http_get(&addr, "/healthz").await.unwrap().0, 200);
}

#[tokio::test]
async fn readyz_goes_red_when_nats_stops_and_green_when_it_returns() {
    let mut mesh = TestMesh::start("", "").await;
    let mut w = mesh.worker();
    let addr = http_addr_of(&w).await;
    eventually(Duration::from_secs(10), "ready", || async {
        match http_get(&addr, "/readyz").await? {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let pid = w.pid();
    mesh.server.stop();
    let t0 = tokio::time::Instant::now();
    let why = eventually(
        Duration::from_secs(5),
        "not ready after nats-server stopped",
        || async {
            match http_get(&addr, "/readyz").await? {
                (503, body) => Ok(body),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(why.contains("NATS"), "{why}");
    eprintln!("readyz went red {:?} after the stop", t0.elapsed());
    assert_eq!(
        http_get(&addr, "/healthz").await.unwrap().0,
        200,
        "alive while NATS is away"
    );
    mesh.server.start_again().await;
    eventually(Duration::from_secs(20), "ready again", || async {
        match http_get(&addr, "/readyz").await? {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(w.is_running() && w.pid() == pid, "no worker restart");
    // And it works again.
    let ids = mesh.sleep_tasks("after", 3, 1).await;
    mesh.all_succeeded(&ids, Duration::from_secs(20)).await;
}

#[tokio::test]
async fn json_logs_carry_task_id_name_attempt_and_trace_id() {
    let mesh = TestMesh::start("", "").await;
    let w = mesh.worker_with(
        &["--http-addr", "127.0.0.1:0"],
        &[("TASKMESH_LOG_FORMAT", "json")],
    );
    let id = TaskId::new("json-log-1").unwrap();
    let opts = EnqueueOptions::default().id(id.clone()).header(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    mesh.client
        .enqueue(
            &TaskName::parse("testkit.fail").unwrap(),
            &serde_json::json!({}),
            opts,
        )
        .await
        .unwrap();
    let line = eventually(
        Duration::from_secs(20),
        "a JSON log line about the task",
        || async {
            w.log()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["message"] == "task dead-lettered")
                .ok_or_else(|| "not yet".to_string())
        },
    )
    .await;
    let span = &line["span"];
    assert_eq!(span["task.id"], "json-log-1", "{line}");
    assert_eq!(span["task.name"], "testkit.fail", "{line}");
    assert_eq!(span["task.attempt"], 1, "{line}");
    assert_eq!(
        span["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "{line}"
    );
    assert_eq!(line["level"], "ERROR");
}

/// A loopback HTTP server that stores every request body and answers 200.
async fn capture_server() -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let b = bodies.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let b = b.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(sock);
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    let mut first = true;
                    loop {
                        line.clear();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" && !first {
                            break;
                        }
                        first = false;
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    b.lock().unwrap().push(body);
                    let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if r.get_mut().write_all(ok.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, bodies)
}

#[tokio::test]
async fn spans_are_exported_over_otlp_http_from_producer_and_worker() {
    let mesh = TestMesh::start("", "").await;
    let (addr, bodies) = capture_server().await;
    let endpoint = format!("http://{addr}");
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let _w = mesh.worker_with(&["--http-addr", "127.0.0.1:0"], &otel);
    let mut env: Vec<(&str, &str)> = otel.to_vec();
    let url = mesh.server.url();
    env.push(("NATS_URL", url.as_str()));
    let mut enq = TaskmeshProcess::spawn(
        &[
            "enqueue",
            "testkit.sleep",
            "--args",
            r#"{"ms": 1}"#,
            "--id",
            "otlp-1",
            "--wait",
            "--timeout",
            "20s",
        ],
        &env,
    );
    let status = enq
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("enqueue exits");
    assert!(status.success(), "{}", enq.log());
    let (publish, process) = eventually(Duration::from_secs(20), "publish and process spans captured", || async {
        let mut publish = None;
        let mut process = None;
        for body in bodies.lock().unwrap().iter() {
            let req = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(&body[..])
                .map_err(|e| e.to_string())?;
            for rs in req.resource_spans {
                for ss in rs.scope_spans {
                    for s in ss.spans {
                        if s.name == "publish tasks.testkit.sleep" {
                            publish = Some(s);
                        } else if s.name == "process tasks.testkit.sleep" {
                            process = Some(s);
                        }
                    }
                }
            }
        }
        match (publish, process) {
            (Some(a), Some(b)) => Ok((a, b)),
            (a, b) => Err(format!("publish {} process {}", a.is_some(), b.is_some())),
        }
    })
    .await;
    assert_eq!(
        publish.trace_id, process.trace_id,
        "one trace from the CLI through the worker"
    );
    assert_eq!(process.parent_span_id, publish.span_id);
    let rec = mesh
        .client
        .result(&TaskId::new("otlp-1").unwrap())
        .await
        .unwrap()
        .unwrap();
    let hex: String = process
        .trace_id
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(rec.trace_id.as_deref(), Some(hex.as_str()));
}
