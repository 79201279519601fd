//! `latency`: tasks paced at `--rate`; enqueue → handler start percentiles, with the same
//! pacing over raw JetStream (publish → pull consumer receives) in the same run.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use serde::Deserialize;
use taskmesh_nats::async_nats::jetstream;
use taskmesh_nats::{Client, EnqueueOptions};
use taskmesh_shared::{TaskError, TaskName};
use taskmesh_workers::{Registry, TaskPolicy, Worker, WorkerOptions};
use tokio_util::sync::CancellationToken;

use super::{Bench, BenchArgs, loadavg, quantile, r3};

/// The process-wide time origin the enqueue stamps are taken on (monotonic).
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    u64::try_from(base().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The body of a latency task: when it was enqueued, on [`base`].
#[derive(Deserialize)]
struct Stamp {
    t: u64,
}

fn stamp_body() -> Bytes {
    Bytes::from(format!("{{\"t\":{}}}", now_ns()))
}

/// Start latencies in milliseconds.
type Samples = Arc<Mutex<Vec<f64>>>;

fn record(samples: &Samples, t: u64) {
    let ms = now_ns().saturating_sub(t) as f64 / 1e6;
    if let Ok(mut v) = samples.lock() {
        v.push(ms);
    }
}

/// One measured series.
#[derive(Debug, Clone)]
pub(super) struct Series {
    name: &'static str,
    achieved_rate: f64,
    count: usize,
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
}

impl Series {
    fn from(name: &'static str, samples: &Samples, elapsed: Duration) -> Self {
        let mut v = samples.lock().map(|v| v.clone()).unwrap_or_default();
        v.sort_by(f64::total_cmp);
        Self {
            name,
            achieved_rate: v.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            count: v.len(),
            p50: quantile(&v, 0.50),
            p95: quantile(&v, 0.95),
            p99: quantile(&v, 0.99),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "count": self.count, "achieved_rate": self.achieved_rate.round(),
            "p50_ms": r3(self.p50), "p95_ms": r3(self.p95), "p99_ms": r3(self.p99),
            "max_ms": r3(self.max),
        })
    }
}

pub(super) struct Report {
    rate: f64,
    n: usize,
    concurrency: usize,
    sync_always: bool,
    load: String,
    raw: Series,
    taskmesh: Series,
}

impl Report {
    pub(super) fn print(&self, json: bool) -> anyhow::Result<()> {
        let t = &self.taskmesh;
        if json {
            let obj = serde_json::json!({
                "workload": "latency", "rate": self.rate, "n": self.n,
                "concurrency": self.concurrency, "sync_always": self.sync_always,
                "loadavg": self.load,
                "p50_ms": r3(t.p50), "p95_ms": r3(t.p95), "p99_ms": r3(t.p99),
                "max_ms": r3(t.max), "achieved_rate": t.achieved_rate.round(),
                "taskmesh": t.json(), "raw": self.raw.json(),
                "p99_ratio_to_raw": r3(t.p99 / self.raw.p99),
            });
            println!("{}", serde_json::to_string_pretty(&obj)?);
        } else {
            println!(
                "{:<10} {:>10} {:>9} {:>9} {:>9} {:>9}",
                "series", "rate/s", "p50 ms", "p95 ms", "p99 ms", "max ms"
            );
            for s in [&self.raw, t] {
                println!(
                    "{:<10} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    s.name, s.achieved_rate, s.p50, s.p95, s.p99, s.max
                );
            }
            println!(
                "(enqueue → handler start; raw = publish → pull consumer receives; target rate {}/s, n = {}, concurrency = {}, sync_always = {}, load average {})",
                self.rate, self.n, self.concurrency, self.sync_always, self.load
            );
        }
        Ok(())
    }
}

type AckFut = BoxFuture<'static, anyhow::Result<()>>;

/// Publishes `n` messages at `rate` per second (catching up when behind), at most `window`
/// PubAcks outstanding. `send` publishes one stamped body and returns its PubAck future.
async fn paced<F>(n: usize, rate: f64, window: usize, mut send: F) -> anyhow::Result<Duration>
where
    F: FnMut(Bytes) -> BoxFuture<'static, anyhow::Result<AckFut>>,
{
    let start = Instant::now();
    let mut sent = 0usize;
    let mut acks: FuturesUnordered<AckFut> = FuturesUnordered::new();
    while sent < n {
        let due = ((start.elapsed().as_secs_f64() * rate) as usize + 1).min(n);
        while sent < due {
            while acks.len() >= window {
                if let Some(r) = acks.next().await {
                    r?;
                }
            }
            acks.push(send(stamp_body()).await?);
            sent += 1;
        }
        // Until the next message is due, collect PubAcks.
        let next_at = start + Duration::from_secs_f64((sent as f64) / rate);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next_at.into()) => break,
                r = acks.next(), if !acks.is_empty() => { if let Some(r) = r { r?; } }
            }
        }
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    Ok(start.elapsed())
}

async fn wait_for(samples: &Samples, n: usize, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = samples.lock().map(|v| v.len()).unwrap_or(0);
        if got >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("{what}: only {got} of {n} messages arrived within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn raw(url: &str, n: usize, rate: f64, window: usize) -> anyhow::Result<Series> {
    let client = taskmesh_nats::async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let (name, c) = super::raw_stream(&js, "BENCH_LAT").await?;
    let samples: Samples = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let stop = CancellationToken::new();
    let consume = {
        let samples = samples.clone();
        let stop = stop.clone();
        // A continuous pull (the client keeps pull requests topped up).
        let mut msgs = c
            .stream()
            .max_messages_per_batch(256)
            .expires(Duration::from_secs(1))
            .messages()
            .await?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    m = msgs.next() => match m {
                        Some(Ok(m)) => {
                            if let Ok(s) = serde_json::from_slice::<Stamp>(&m.payload) {
                                record(&samples, s.t);
                            }
                            let _ = m.ack().await;
                        }
                        Some(Err(e)) => tracing::debug!(error = %e, "raw latency consumer"),
                        None => break,
                    }
                }
            }
        })
    };
    let subject = format!("bench.{name}.noop");
    let js2 = js.clone();
    let elapsed = paced(n, rate, window, move |body| {
        let js = js2.clone();
        let subject = subject.clone();
        async move {
            let ack = js.publish(subject, body).await?;
            Ok(async move {
                ack.await?;
                Ok(())
            }
            .boxed())
        }
        .boxed()
    })
    .await?;
    let waited = wait_for(&samples, n, "raw latency").await;
    stop.cancel();
    let _ = consume.await;
    let _ = js.delete_stream(&name).await;
    waited?;
    Ok(Series::from("raw", &samples, elapsed))
}

async fn taskmesh(
    url: &str,
    n: usize,
    rate: f64,
    concurrency: usize,
    window: usize,
) -> anyhow::Result<Series> {
    let (cfg, conn) = super::bench_category(url, concurrency, false).await?;
    let samples: Samples = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let mut reg = Registry::new();
    {
        let samples = samples.clone();
        reg.register("bench.stamp", TaskPolicy::default(), move |_c, a: Stamp| {
            record(&samples, a.t);
            async { Ok::<_, TaskError>(()) }
        })?;
    }
    let worker_conn =
        taskmesh_nats::connect(&cfg.nats, "bench-worker", Duration::from_secs(5)).await?;
    let worker = Worker::new(
        worker_conn,
        cfg.clone(),
        Arc::new(reg),
        WorkerOptions::default(),
    )
    .await?;
    let stop = CancellationToken::new();
    let w = tokio::spawn(worker.run(stop.clone()));
    let client = Client::new(conn, &cfg).await?;
    let task = TaskName::parse("bench.stamp")?;
    // Let the worker bind and post its long-polls.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let elapsed = paced(n, rate, window, move |body| {
        let client = client.clone();
        let task = task.clone();
        async move {
            let pending = client.send(&task, body, EnqueueOptions::default()).await?;
            Ok(async move {
                pending.acked().await?;
                Ok(())
            }
            .boxed())
        }
        .boxed()
    })
    .await;
    let waited = match &elapsed {
        Ok(_) => wait_for(&samples, n, "taskmesh latency").await,
        Err(_) => Ok(()),
    };
    stop.cancel();
    let _ = w.await;
    let elapsed = elapsed?;
    waited?;
    Ok(Series::from("taskmesh", &samples, elapsed))
}

pub(super) async fn run(
    external: &Option<String>,
    a: &BenchArgs,
    n: usize,
    window: usize,
) -> anyhow::Result<Report> {
    if !a.rate.is_finite() || a.rate <= 0.0 {
        anyhow::bail!("--rate must be positive");
    }
    let load = loadavg();
    let _ = base();
    let b = Bench::start(external, a.sync_always).await?;
    let r = raw(&b.url, n, a.rate, window).await.context("raw latency");
    b.stop().await;
    let raw = r?;
    let b = Bench::start(external, a.sync_always).await?;
    let t = taskmesh(&b.url, n, a.rate, a.concurrency, window)
        .await
        .context("taskmesh latency");
    b.stop().await;
    Ok(Report {
        rate: a.rate,
        n,
        concurrency: a.concurrency,
        sync_always: a.sync_always,
        load,
        raw,
        taskmesh: t?,
    })
}
