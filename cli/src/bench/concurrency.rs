//! `concurrency`: N tasks that each sleep `--sleep-ms`, served by one `taskmesh worker`
//! child process with concurrency N. Completion time (first enqueue → stream empty: every
//! task acked) and the child's peak RSS (`VmHWM` in `/proc/<pid>/status`).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use taskmesh_nats::{Client, EnqueueOptions};
use taskmesh_shared::wire;
use taskmesh_shared::{Category, Config, Lane, TaskName};

use super::{Bench, BenchArgs, loadavg};

pub(super) struct Report {
    n: usize,
    sleep_ms: u64,
    results: bool,
    sync_always: bool,
    load: String,
    enqueue_s: f64,
    complete_s: f64,
    idle_rss_kib: u64,
    peak_rss_kib: u64,
}

impl Report {
    pub(super) fn print(&self, json: bool) -> anyhow::Result<()> {
        let mib = |k: u64| k as f64 / 1024.0;
        if json {
            let obj = serde_json::json!({
                "workload": "concurrency", "n": self.n, "sleep_ms": self.sleep_ms,
                "results": self.results, "sync_always": self.sync_always, "loadavg": self.load,
                "enqueue_s": (self.enqueue_s * 1000.0).round() / 1000.0,
                "complete_s": (self.complete_s * 1000.0).round() / 1000.0,
                "idle_rss_mib": (mib(self.idle_rss_kib) * 10.0).round() / 10.0,
                "peak_rss_mib": (mib(self.peak_rss_kib) * 10.0).round() / 10.0,
            });
            println!("{}", serde_json::to_string_pretty(&obj)?);
        } else {
            println!(
                "{:<12} {:>9} {:>12} {:>13} {:>13} {:>14}",
                "tasks", "sleep", "enqueued in", "completed in", "idle RSS", "peak RSS"
            );
            println!(
                "{:<12} {:>7}ms {:>11.3}s {:>12.3}s {:>9.1} MiB {:>10.1} MiB",
                self.n,
                self.sleep_ms,
                self.enqueue_s,
                self.complete_s,
                mib(self.idle_rss_kib),
                mib(self.peak_rss_kib)
            );
            println!(
                "(one `taskmesh worker` process, concurrency = {}, results = {}, sync_always = {}, load average {})",
                self.n, self.results, self.sync_always, self.load
            );
        }
        Ok(())
    }
}

/// `VmHWM` and `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

fn config_toml(n: usize, results: bool) -> String {
    format!(
        "seed_categories = false\n\n[results]\nenabled = {results}\n\n[scheduler]\ndefault_schedules = false\n\n\
         [categories.testkit]\nconcurrency = {n}\nmax_ack_pending = {}\n",
        (n * 2).max(1000)
    )
}

pub(super) async fn run(
    external: &Option<String>,
    a: &BenchArgs,
    n: usize,
    window: usize,
) -> anyhow::Result<Report> {
    let load = loadavg();
    let b = Bench::start(external, a.sync_always).await?;
    let r = measure(&b, a, n, window, load).await;
    b.stop().await;
    r
}

async fn measure(
    b: &Bench,
    a: &BenchArgs,
    n: usize,
    window: usize,
    load: String,
) -> anyhow::Result<Report> {
    let results = !a.results_off;
    std::fs::create_dir_all(&b.dir)?;
    let conf_path = b.dir.join("bench-concurrency.toml");
    let text = config_toml(n, results);
    std::fs::write(&conf_path, &text)?;
    let mut cfg = Config::from_toml_str(&text).context("bench config")?;
    cfg.nats.url = b.url.clone();
    let conn = taskmesh_nats::connect(&cfg.nats, "bench", Duration::from_secs(5)).await?;
    taskmesh_nats::provision(&conn.js, &cfg).await?;
    let cat: Category = "testkit".parse()?;
    let consumer = taskmesh_nats::topology::lane_consumer(&conn.js, &cat, Lane::Normal).await?;
    let stream_name = wire::stream_name(&cat);

    let http_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let exe = std::env::current_exe().context("locating the taskmesh binary")?;
    let log = std::fs::File::create(b.dir.join("worker.log"))?;
    let mut child = tokio::process::Command::new(&exe)
        .arg("--config")
        .arg(&conf_path)
        .arg("--nats-url")
        .arg(&b.url)
        .arg("worker")
        .arg("--category")
        .arg("testkit")
        .arg("--http-addr")
        .arg(format!("127.0.0.1:{http_port}"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} worker", exe.display()))?;
    let pid = child.id().context("worker child has no pid")?;

    // Ready: the worker's idle long-poll is waiting on the normal lane.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = consumer.clone();
        if let Ok(info) = c.info().await
            && info.num_waiting > 0
        {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            bail!(
                "the worker exited with {st} before binding (log: {})",
                b.dir.join("worker.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!("the worker did not start pulling within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle = rss_kib(pid).map(|(_, rss)| rss).unwrap_or(0);

    let client = Client::new(conn.clone(), &cfg).await?;
    let task = TaskName::parse("testkit.sleep")?;
    let body = Bytes::from(format!("{{\"ms\":{}}}", a.sleep_ms));
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
    let enqueue_s = start.elapsed().as_secs_f64();
    let limit = Duration::from_millis(a.sleep_ms) * 10 + Duration::from_secs(60);
    let complete_s = loop {
        let info = conn
            .js
            .get_stream(&stream_name)
            .await
            .map(|s| s.cached_info().state.messages);
        if let Ok(0) = info {
            break start.elapsed().as_secs_f64();
        }
        if start.elapsed() > limit {
            bail!("the tasks did not complete within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let peak = rss_kib(pid).map(|(hwm, _)| hwm).unwrap_or(0);
    if let Ok(p) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    Ok(Report {
        n,
        sleep_ms: a.sleep_ms,
        results,
        sync_always: a.sync_always,
        load,
        enqueue_s,
        complete_s,
        idle_rss_kib: idle,
        peak_rss_kib: peak,
    })
}
