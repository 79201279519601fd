//! `taskmesh bench`: throughput of the real client and runtime against raw JetStream, in
//! the same run on the same machine (absolute figures drift; ratios hold).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use taskmesh_nats::async_nats::jetstream::{self, consumer, stream};
use taskmesh_nats::{Client, EnqueueOptions};
use taskmesh_shared::config::CategoryConfig;
use taskmesh_shared::{Category, Config, TaskError, TaskName};
use taskmesh_workers::{NoArgs, Registry, TaskPolicy, Worker, WorkerOptions};
use tokio_util::sync::CancellationToken;

use crate::server::LocalServer;

/// Which benchmark.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Workload {
    /// async-nats publish (pipelined acks) + pull consume + ack, no taskmesh code.
    Raw,
    /// N no-op tasks through the real client and runtime, results off and on, with `raw`.
    E2e,
}

/// Options of `taskmesh bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// The workload.
    workload: Workload,
    /// Messages / tasks per measurement.
    #[arg(long, default_value_t = 100_000)]
    n: usize,
    /// Worker concurrency for e2e.
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// Publish window (PubAcks outstanding at once).
    #[arg(long, default_value_t = 4096)]
    window: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Run the server with `sync_interval: always`.
    #[arg(long)]
    sync_always: bool,
}

struct Bench {
    server: Option<LocalServer>,
    dir: std::path::PathBuf,
    url: String,
}

impl Bench {
    async fn start(external: &Option<String>, sync_always: bool) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "taskmesh-bench-{}-{}",
            std::process::id(),
            fastrand_u32()
        ));
        if let Some(url) = external {
            return Ok(Self {
                server: None,
                dir,
                url: url.clone(),
            });
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let server = LocalServer::start(&dir, port, sync_always).await?;
        Ok(Self {
            url: server.url.clone(),
            server: Some(server),
            dir,
        })
    }
    async fn stop(self) {
        if let Some(s) = self.server {
            s.stop().await;
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn fastrand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// Raw JetStream publish + consume of `n` messages; returns messages per second.
async fn raw(url: &str, n: usize, window: usize) -> anyhow::Result<f64> {
    let client = taskmesh_nats::async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let name = format!("BENCH_RAW_{}", fastrand_u32());
    let _ = js.delete_stream(&name).await;
    let s = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("bench.{name}.>")],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let c: consumer::PullConsumer = s
        .create_consumer(consumer::pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await?;
    let start = Instant::now();
    let consume = tokio::spawn(async move {
        let mut got = 0usize;
        while got < n {
            let mut b = c
                .fetch()
                .max_messages(512)
                .expires(Duration::from_secs(1))
                .messages()
                .await?;
            let mut any = false;
            while let Some(m) = b.next().await {
                let m = m.map_err(|e| anyhow::anyhow!(e))?;
                m.ack().await.map_err(|e| anyhow::anyhow!(e))?;
                got += 1;
                any = true;
            }
            if !any {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        anyhow::Ok(())
    });
    let subject = format!("bench.{name}.noop");
    let body = Bytes::from_static(b"{}");
    let mut acks = FuturesUnordered::new();
    for _ in 0..n {
        if acks.len() >= window
            && let Some(r) = acks.next().await
        {
            let _: jetstream::publish::PublishAck = r?;
        }
        acks.push(
            js.publish(subject.clone(), body.clone())
                .await?
                .into_future(),
        );
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    consume.await??;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let _ = js.delete_stream(&name).await;
    Ok(rate)
}

/// `n` no-op tasks through the client and the runtime; returns tasks per second.
async fn e2e(
    url: &str,
    n: usize,
    concurrency: usize,
    window: usize,
    results: bool,
) -> anyhow::Result<f64> {
    let mut cfg = Config {
        seed_categories: false,
        ..Config::default()
    };
    cfg.categories.clear();
    let cat: Category = "bench".parse()?;
    cfg.categories.insert(
        cat.clone(),
        CategoryConfig {
            concurrency,
            max_ack_pending: 20_000,
            ..CategoryConfig::default()
        },
    );
    cfg.nats.url = url.to_owned();
    cfg.results.enabled = results;
    let cfg = Arc::new(cfg);
    let conn = taskmesh_nats::connect(&cfg.nats, "bench", Duration::from_secs(5)).await?;
    taskmesh_nats::provision(&conn.js, &cfg).await?;
    let mut reg = Registry::new();
    reg.register(
        "bench.noop",
        TaskPolicy::default(),
        |_c, _a: NoArgs| async { Ok::<_, TaskError>(()) },
    )?;
    let worker_conn =
        taskmesh_nats::connect(&cfg.nats, "bench-worker", Duration::from_secs(5)).await?;
    let worker = Worker::new(
        worker_conn,
        cfg.clone(),
        Arc::new(reg),
        WorkerOptions::default(),
    )
    .await?;
    let stats = worker.stats();
    let stop = CancellationToken::new();
    let w = tokio::spawn(worker.run(stop.clone()));
    let client = Client::new(conn, &cfg).await?;
    let task = TaskName::parse("bench.noop")?;
    let body = Bytes::from_static(b"{}");
    let before = stats.finished.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut acks = FuturesUnordered::new();
    for _ in 0..n {
        if acks.len() >= window
            && let Some(r) = acks.next().await
        {
            let _: taskmesh_nats::Enqueued = r?;
        }
        acks.push(
            client
                .send(&task, body.clone(), EnqueueOptions::default())
                .await?
                .acked(),
        );
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while stats.finished.load(Ordering::Relaxed) - before < n as u64 {
        if Instant::now() > deadline {
            bail!(
                "e2e: only {} of {n} tasks finished within 120 s",
                stats.finished.load(Ordering::Relaxed) - before
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    stop.cancel();
    let _ = w.await;
    Ok(rate)
}

/// Runs a benchmark and prints its table or JSON.
pub(crate) async fn run(a: BenchArgs, external: Option<String>) -> anyhow::Result<()> {
    match a.workload {
        Workload::Raw => {
            let b = Bench::start(&external, a.sync_always).await?;
            let r = raw(&b.url, a.n, a.window).await.context("raw benchmark")?;
            b.stop().await;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"workload": "raw", "n": a.n, "msgs_per_sec": r.round()})
                );
            } else {
                println!(
                    "raw JetStream publish+consume+ack: {} msgs in one run: {:.0} msg/s",
                    a.n, r
                );
            }
        }
        Workload::E2e => {
            let mut rows = Vec::new();
            let b = Bench::start(&external, a.sync_always).await?;
            let raw_rate = raw(&b.url, a.n, a.window).await.context("raw benchmark")?;
            b.stop().await;
            for results in [false, true] {
                let b = Bench::start(&external, a.sync_always).await?;
                let r = e2e(&b.url, a.n, a.concurrency, a.window, results)
                    .await
                    .context("e2e benchmark")?;
                b.stop().await;
                rows.push((results, r));
            }
            let mode = |on: bool| if on { "results_on" } else { "results_off" };
            if a.json {
                let mut obj = serde_json::json!({
                    "workload": "e2e", "n": a.n, "concurrency": a.concurrency,
                    "sync_always": a.sync_always, "raw_msgs_per_sec": raw_rate.round(),
                });
                for (on, r) in &rows {
                    obj[mode(*on)] = serde_json::json!({
                        "tasks_per_sec": r.round(),
                        "raw_msgs_per_sec": raw_rate.round(),
                        "ratio_to_raw": (r / raw_rate * 1000.0).round() / 1000.0,
                    });
                }
                if let Some((_, off)) = rows.iter().find(|(on, _)| !on) {
                    obj["tasks_per_sec"] = serde_json::json!(off.round());
                    obj["ratio_to_raw"] =
                        serde_json::json!((off / raw_rate * 1000.0).round() / 1000.0);
                }
                println!("{}", serde_json::to_string_pretty(&obj)?);
            } else {
                println!("{:<14} {:>12} {:>10}", "workload", "per second", "vs raw");
                println!("{:<14} {:>12.0} {:>10}", "raw", raw_rate, "1.00");
                for (on, r) in &rows {
                    println!(
                        "{:<14} {:>12.0} {:>10.2}",
                        format!("e2e {}", mode(*on)),
                        r,
                        r / raw_rate
                    );
                }
                println!(
                    "(n = {}, concurrency = {}, sync_always = {})",
                    a.n, a.concurrency, a.sync_always
                );
            }
        }
    }
    Ok(())
}
