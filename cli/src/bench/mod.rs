//! `taskmesh bench`: throughput and latency of the real client and runtime against raw
//! JetStream, in the same run on the same machine (absolute figures drift; ratios hold).
//!
//! Workloads: `raw`, `e2e` (here), `latency` ([`latency`]), `concurrency`
//! ([`concurrency`]) and `scheduler` ([`sched`]). Each starts its own nats-server on a free
//! loopback port (unless `--nats-url` is given) and prints a table, or JSON with `--json`.

mod concurrency;
mod latency;
mod sched;

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
use taskmesh_shared::{Config, TaskError, TaskName};
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
    /// Paced at `--rate`: enqueue → handler start percentiles, with raw JetStream alongside.
    Latency,
    /// N tasks sleeping `--sleep-ms` in one spawned worker process: completion time, peak RSS.
    Concurrency,
    /// N `every = "1s"` schedules in one scheduler: fire lag against the slot.
    Scheduler,
}

/// Options of `taskmesh bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// The workload.
    workload: Workload,
    /// Messages / tasks per measurement (schedules for `scheduler`). Default: 100 000 for
    /// `raw` and `e2e`, 5 s worth at `--rate` for `latency`, 10 000 for `concurrency` and
    /// `scheduler`.
    #[arg(long)]
    n: Option<usize>,
    /// Worker concurrency (e2e and latency; `concurrency` uses N).
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// Publish window (PubAcks outstanding at once; a JetStream context stalls above 5000).
    /// Default 4096, or 256 with `--sync-always` (each PubAck waits for an fsync, and a
    /// deep window runs into the client's 5 s ack timeout).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4500))]
    window: Option<u64>,
    /// Tasks per second for `latency`.
    #[arg(long, default_value_t = 20_000.0)]
    rate: f64,
    /// How long each task sleeps in `concurrency`, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    sleep_ms: u64,
    /// `concurrency`: run the worker with result records off (default on: a `running` and a
    /// final record per task).
    #[arg(long)]
    results_off: bool,
    /// `e2e` and `raw`: store all N messages first, then start consuming (a drain, as the
    /// peers' harness measures), instead of publishing and consuming at once.
    #[arg(long)]
    prefill: bool,
    /// `raw` for profiling: add taskmesh's publish headers (`all`: `Nats-Msg-Id`, `Task-Id`,
    /// `Task-Enqueued-At`; `noid`: without `Nats-Msg-Id`; `msgid`: `Nats-Msg-Id` only), to
    /// price them on the server.
    #[arg(long, hide = true)]
    raw_headers: Option<String>,
    /// `raw` for profiling: write one KV record (the size of a task's result record) per
    /// message before acking it, as `e2e` with results on does, to price result writes.
    #[arg(long, hide = true)]
    raw_kv: bool,
    /// `e2e` for profiling: run only one series (`raw`, `off` or `on`), or `ceilings` (the
    /// three raw series).
    #[arg(long, hide = true)]
    only: Option<String>,
    /// How long `scheduler` runs, in seconds (the first 2 s of slots are warm-up).
    #[arg(long, default_value_t = 12)]
    seconds: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Run the server with `sync_interval: always`.
    #[arg(long)]
    sync_always: bool,
}

pub(super) struct Bench {
    server: Option<LocalServer>,
    pub(super) dir: std::path::PathBuf,
    pub(super) url: String,
}

impl Bench {
    pub(super) async fn start(
        external: &Option<String>,
        sync_always: bool,
    ) -> anyhow::Result<Self> {
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
    /// CPU seconds used so far by this process and by the server it started.
    pub(super) fn cpu(&self) -> Cpu {
        Cpu {
            own: proc_cpu_seconds("self"),
            server: self
                .server
                .as_ref()
                .and_then(LocalServer::pid)
                .and_then(|pid| proc_cpu_seconds(&pid.to_string())),
        }
    }
    pub(super) async fn stop(self) {
        if let Some(s) = self.server {
            s.stop().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(super) fn fastrand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// Raw JetStream publish + consume of `n` messages; returns messages per second.
async fn raw(
    url: &str,
    n: usize,
    window: usize,
    prefill: bool,
    headers: Option<&str>,
    with_kv: bool,
) -> anyhow::Result<f64> {
    let client = taskmesh_nats::async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let (name, c) = raw_stream(&js, "BENCH_RAW").await?;
    let kv = if with_kv {
        let bucket = format!("BENCH_KV_{}", fastrand_u32());
        js.create_key_value(jetstream::kv::Config {
            bucket: bucket.clone(),
            history: 1,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
        Some(bucket)
    } else {
        None
    };
    // Its own context: a context's in-flight PubAck limit is shared, and the consumer's
    // unpolled record PubAcks must not starve the publisher (or themselves).
    let kv_js = jetstream::new(js.client());
    let subject = format!("bench.{name}.noop");
    let body = Bytes::from_static(b"{}");
    if prefill {
        publish_raw_h(&js, &subject, &body, n, window, headers).await?;
    }
    let start = Instant::now();
    let consume = tokio::spawn(async move {
        let mut got = 0usize;
        // With `--raw-kv`: a record per message, acked once the record is stored.
        let record = Bytes::from(vec![b'x'; 320]);
        let mut puts = FuturesUnordered::new();
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
                got += 1;
                any = true;
                let Some(bucket) = &kv else {
                    m.ack().await.map_err(|e| anyhow::anyhow!(e))?;
                    continue;
                };
                while puts.len() >= 2048 {
                    if let Some(r) = puts.next().await {
                        let _: () = r?;
                    }
                }
                let put = kv_js
                    .publish(format!("$KV.{bucket}.k{got}"), record.clone())
                    .await?;
                puts.push(async move {
                    put.await?;
                    m.ack().await.map_err(|e| anyhow::anyhow!(e))
                });
            }
            if !any {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        while let Some(r) = puts.next().await {
            r?;
        }
        anyhow::Ok(())
    });
    if !prefill {
        publish_raw_h(&js, &subject, &body, n, window, headers).await?;
    }
    consume.await??;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let _ = js.delete_stream(&name).await;
    Ok(rate)
}

/// Publishes `n` copies of `body` with at most `window` PubAcks outstanding.
pub(super) async fn publish_raw(
    js: &jetstream::Context,
    subject: &str,
    body: &Bytes,
    n: usize,
    window: usize,
) -> anyhow::Result<()> {
    publish_raw_h(js, subject, body, n, window, None).await
}

async fn publish_raw_h(
    js: &jetstream::Context,
    subject: &str,
    body: &Bytes,
    n: usize,
    window: usize,
    headers: Option<&str>,
) -> anyhow::Result<()> {
    let salt = fastrand_u32();
    let mut acks = FuturesUnordered::new();
    for i in 0..n {
        if let Some(mode) = headers {
            if acks.len() >= window
                && let Some(r) = acks.next().await
            {
                let _: jetstream::publish::PublishAck = r?;
            }
            let id = format!("{salt:08x}-{i:024x}");
            let mut h = taskmesh_nats::async_nats::HeaderMap::new();
            if mode != "noid" {
                h.insert("Nats-Msg-Id", id.as_str());
            }
            if mode != "msgid" {
                h.insert("Task-Id", id.as_str());
                h.insert(
                    "Task-Enqueued-At",
                    chrono::Utc::now()
                        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                        .as_str(),
                );
            }
            acks.push(
                js.publish_with_headers(subject.to_owned(), h, body.clone())
                    .await?
                    .into_future(),
            );
            continue;
        }
        if acks.len() >= window
            && let Some(r) = acks.next().await
        {
            let _: jetstream::publish::PublishAck = r?;
        }
        acks.push(
            js.publish(subject.to_owned(), body.clone())
                .await?
                .into_future(),
        );
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    Ok(())
}

/// The config of the one `bench` category the in-process workloads use (no seed
/// categories, no default schedules), and a connection with its topology provisioned.
pub(super) async fn bench_category(
    url: &str,
    concurrency: usize,
    results: bool,
) -> anyhow::Result<(Arc<Config>, taskmesh_nats::Connection)> {
    let mut cfg = Config {
        seed_categories: false,
        ..Config::default()
    };
    cfg.categories.clear();
    cfg.scheduler.default_schedules = false;
    cfg.categories.insert(
        "bench".parse()?,
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
    Ok((cfg, conn))
}

/// `n` no-op tasks through the client and the runtime; returns tasks per second.
async fn e2e(
    url: &str,
    n: usize,
    concurrency: usize,
    window: usize,
    results: bool,
    prefill: bool,
) -> anyhow::Result<f64> {
    let (cfg, conn) = bench_category(url, concurrency, results).await?;
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
    let client = Client::new(conn, &cfg).await?;
    let task = TaskName::parse("bench.noop")?;
    let body = Bytes::from_static(b"{}");
    let before = stats.finished.load(Ordering::Relaxed);
    let send_all = async {
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
        anyhow::Ok(())
    };
    let (start, w) = if prefill {
        send_all.await?;
        let start = Instant::now();
        (start, tokio::spawn(worker.run(stop.clone())))
    } else {
        let w = tokio::spawn(worker.run(stop.clone()));
        let start = Instant::now();
        send_all.await?;
        (start, w)
    };
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

/// Rounds to three decimals (ratios in JSON).
pub(super) fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The `q` quantile (0..=1) of sorted values.
pub(super) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The load average, so a reader can judge how noisy the figures are.
pub(super) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Runs a benchmark and prints its table or JSON.
pub(crate) async fn run(a: BenchArgs, external: Option<String>) -> anyhow::Result<()> {
    let window = match a.window {
        Some(w) => usize::try_from(w).unwrap_or(4096),
        None if a.sync_always => 256,
        None => 4096,
    };
    let load_before = loadavg();
    match a.workload {
        Workload::Raw => {
            let n = a.n.unwrap_or(100_000);
            let b = Bench::start(&external, a.sync_always).await?;
            let r = raw(
                &b.url,
                n,
                window,
                a.prefill,
                a.raw_headers.as_deref(),
                a.raw_kv,
            )
            .await
            .context("raw benchmark");
            b.stop().await;
            let r = r?;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"workload": "raw", "n": n, "msgs_per_sec": r.round(), "prefill": a.prefill,
                        "sync_always": a.sync_always, "loadavg": load_before})
                );
            } else {
                println!("raw JetStream publish+consume+ack: {n} msgs in one run: {r:.0} msg/s");
                println!(
                    "(sync_always = {}, load average {load_before})",
                    a.sync_always
                );
            }
        }
        Workload::E2e => {
            let n = a.n.unwrap_or(100_000);
            let only = a.only.as_deref();
            let mut rows: Vec<Row> = Vec::new();
            for series in Series::ALL {
                if !series.selected(only) {
                    continue;
                }
                let b = Bench::start(&external, a.sync_always).await?;
                let before = b.cpu();
                let r = match series {
                    Series::Raw => raw(&b.url, n, window, a.prefill, None, false).await,
                    Series::RawContract => {
                        raw(&b.url, n, window, a.prefill, Some("all"), false).await
                    }
                    Series::RawContractKv => {
                        raw(&b.url, n, window, a.prefill, Some("all"), true).await
                    }
                    Series::Off | Series::On => {
                        e2e(
                            &b.url,
                            n,
                            a.concurrency,
                            window,
                            series == Series::On,
                            a.prefill,
                        )
                        .await
                    }
                }
                .with_context(|| format!("e2e benchmark, series {}", series.key()));
                let cpu = b.cpu().since(&before, n);
                b.stop().await;
                rows.push(Row {
                    series,
                    rate: r?,
                    cpu,
                });
            }
            print_e2e(&a, n, &rows, &load_before)?;
        }
        Workload::Latency => {
            let n =
                a.n.unwrap_or_else(|| ((a.rate * 5.0) as usize).clamp(1_000, 200_000));
            let rep = latency::run(&external, &a, n, window).await?;
            rep.print(a.json)?;
        }
        Workload::Concurrency => {
            let n = a.n.unwrap_or(10_000);
            let rep = concurrency::run(&external, &a, n, window).await?;
            rep.print(a.json)?;
        }
        Workload::Scheduler => {
            let n = a.n.unwrap_or(10_000);
            let rep = sched::run(&external, &a, n).await?;
            rep.print(a.json)?;
        }
    }
    Ok(())
}

/// CPU seconds (user + system) of a process, from `/proc/<pid>/stat` (`None` elsewhere).
fn proc_cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut f = rest.split_whitespace().skip(11);
    let utime: f64 = f.next()?.parse().ok()?;
    let stime: f64 = f.next()?.parse().ok()?;
    // Linux reports these in USER_HZ, which is 100 on every architecture it runs on.
    Some((utime + stime) / 100.0)
}

/// CPU used so far by the bench process and by its nats-server.
#[derive(Debug, Clone, Copy)]
pub(super) struct Cpu {
    own: Option<f64>,
    server: Option<f64>,
}

/// CPU microseconds per message of one series.
#[derive(Debug, Clone, Copy, Default)]
struct CpuPerMsg {
    /// The bench process: publisher plus consumer (raw) or client plus worker (e2e).
    client: Option<f64>,
    /// nats-server (only when the bench started it).
    server: Option<f64>,
}

impl Cpu {
    fn since(&self, before: &Cpu, n: usize) -> CpuPerMsg {
        let per = |a: Option<f64>, b: Option<f64>| {
            Some(((a? - b?) * 1e6 / n.max(1) as f64 * 10.0).round() / 10.0)
        };
        CpuPerMsg {
            client: per(self.own, before.own),
            server: per(self.server, before.server),
        }
    }
}

/// One series of the `e2e` workload, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Series {
    /// async-nats only: the limit.
    Raw,
    /// raw, but every message carries the wire contract's publish headers (`Nats-Msg-Id`,
    /// `Task-Id`, `Task-Enqueued-At`): the most taskmesh could reach with results off.
    RawContract,
    /// taskmesh, results off.
    Off,
    /// RawContract plus one KV record per message, stored before the ack: the most
    /// taskmesh could reach with results on.
    RawContractKv,
    /// taskmesh, results on.
    On,
}

impl Series {
    const ALL: [Series; 5] = [
        Series::Raw,
        Series::RawContract,
        Series::Off,
        Series::RawContractKv,
        Series::On,
    ];
    fn key(self) -> &'static str {
        match self {
            Series::Raw => "raw",
            Series::RawContract => "raw_contract",
            Series::Off => "results_off",
            Series::RawContractKv => "raw_contract_kv",
            Series::On => "results_on",
        }
    }
    /// `--only raw|off|on` runs one series; `--only ceilings` the three raw ones.
    fn selected(self, only: Option<&str>) -> bool {
        match only {
            None => true,
            Some("raw") => self == Series::Raw,
            Some("off") => self == Series::Off,
            Some("on") => self == Series::On,
            Some("ceilings") => matches!(
                self,
                Series::Raw | Series::RawContract | Series::RawContractKv
            ),
            Some(_) => false,
        }
    }
}

/// A measured series.
struct Row {
    series: Series,
    rate: f64,
    cpu: CpuPerMsg,
}

fn print_e2e(a: &BenchArgs, n: usize, rows: &[Row], load: &str) -> anyhow::Result<()> {
    let rate = |s: Series| rows.iter().find(|r| r.series == s).map(|r| r.rate);
    let raw_rate = rate(Series::Raw).unwrap_or(f64::NAN);
    let ceiling = |s: Series| match s {
        Series::Off => rate(Series::RawContract),
        Series::On => rate(Series::RawContractKv),
        _ => None,
    };
    if a.json {
        let mut obj = serde_json::json!({
            "workload": "e2e", "n": n, "concurrency": a.concurrency,
            "sync_always": a.sync_always, "raw_msgs_per_sec": raw_rate.round(),
            "prefill": a.prefill, "loadavg": load,
        });
        for r in rows {
            let mut o = serde_json::json!({
                "tasks_per_sec": r.rate.round(),
                "raw_msgs_per_sec": raw_rate.round(),
                "ratio_to_raw": r3(r.rate / raw_rate),
                "cpu_us_per_task": {"client": r.cpu.client, "nats_server": r.cpu.server},
            });
            if let Some(c) = ceiling(r.series) {
                o["ceiling_msgs_per_sec"] = serde_json::json!(c.round());
                o["ceiling_ratio_to_raw"] = serde_json::json!(r3(c / raw_rate));
                o["ratio_to_ceiling"] = serde_json::json!(r3(r.rate / c));
            }
            obj[r.series.key()] = o;
        }
        if let Some(off) = rate(Series::Off) {
            obj["tasks_per_sec"] = serde_json::json!(off.round());
            obj["ratio_to_raw"] = serde_json::json!(r3(off / raw_rate));
        }
        println!("{}", serde_json::to_string_pretty(&obj)?);
    } else {
        let us = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
        println!(
            "{:<18} {:>11} {:>8} {:>14} {:>14}",
            "series", "per second", "vs raw", "client µs/msg", "server µs/msg"
        );
        for r in rows {
            println!(
                "{:<18} {:>11.0} {:>8.2} {:>14} {:>14}",
                r.series.key(),
                r.rate,
                r.rate / raw_rate,
                us(r.cpu.client),
                us(r.cpu.server)
            );
        }
        println!(
            "(n = {n}, concurrency = {}, prefill = {}, sync_always = {}, load average {load})",
            a.concurrency, a.prefill, a.sync_always
        );
        println!(
            "raw_contract = raw + the wire contract's publish headers; raw_contract_kv = that + one KV record per message: the ceilings of results_off and results_on"
        );
    }
    Ok(())
}

/// A fresh WorkQueue stream `<prefix>_<n>` on `bench.<name>.>` with one durable pull
/// consumer: the no-taskmesh baseline every raw series uses.
pub(crate) async fn raw_stream(
    js: &jetstream::Context,
    prefix: &str,
) -> anyhow::Result<(String, consumer::PullConsumer)> {
    let name = format!("{prefix}_{}", fastrand_u32());
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
    let c = s
        .create_consumer(consumer::pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await?;
    Ok((name, c))
}
