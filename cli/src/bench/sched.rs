//! `scheduler`: N `every = "1s"` schedules in one in-process scheduler replica for
//! `--seconds`; fire lag = the stream's store timestamp of each fire − its slot
//! (`Task-Fire-Time`). Slots of the first two seconds are warm-up (lease, compile, first
//! cursor writes) and reported apart.
//!
//! The scheduler runs with the default `scheduler.publish_ahead` (700 ms): each fire is
//! published that much early as a message schedule on `delayed.bench.<task id>` and the
//! server stores it on `tasks.bench.noop` at its slot. Only that stored task message is
//! measured (the lane consumer reads the task subjects, never `delayed.>`); fires committed
//! before the stop for slots after it are not counted.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use taskmesh_scheduler::{Scheduler, SchedulerOptions};
use taskmesh_shared::config::CategoryConfig;
use taskmesh_shared::schedule::ScheduleDef;
use taskmesh_shared::{Category, Config, Lane};
use tokio_util::sync::CancellationToken;

use super::{Bench, BenchArgs, loadavg, quantile, r3};

pub(super) struct Report {
    schedules: usize,
    seconds: u64,
    /// `scheduler.publish_ahead` of the run.
    publish_ahead: Duration,
    sync_always: bool,
    load: String,
    slots: usize,
    fires: usize,
    expected: usize,
    p50: f64,
    p99: f64,
    max: f64,
    warm_fires: usize,
    warm_p99: f64,
    /// Per slot: first → last fire stored (the burst's length), p50 over slots.
    burst_p50: f64,
    /// Per slot: lag of the first fire stored, p50 over slots (the loop's wake-up).
    first_p50: f64,
    /// Raw async-nats: N publishes in one burst on one connection, first → last PubAck
    /// (the floor of a burst of N fires), same server, same run.
    raw_burst_ms: f64,
}

impl Report {
    pub(super) fn print(&self, json: bool) -> anyhow::Result<()> {
        if json {
            let obj = serde_json::json!({
                "workload": "scheduler", "schedules": self.schedules, "seconds": self.seconds,
                "publish_ahead_ms": u64::try_from(self.publish_ahead.as_millis()).unwrap_or(u64::MAX),
                "sync_always": self.sync_always, "loadavg": self.load,
                "slots_measured": self.slots, "fires": self.fires, "fires_expected": self.expected,
                "p50_ms": r3(self.p50), "p99_ms": r3(self.p99), "max_ms": r3(self.max),
                "burst_ms_p50": r3(self.burst_p50), "first_fire_ms_p50": r3(self.first_p50),
                "raw_burst_ms": r3(self.raw_burst_ms),
                "warmup": {"fires": self.warm_fires, "p99_ms": r3(self.warm_p99)},
            });
            println!("{}", serde_json::to_string_pretty(&obj)?);
        } else {
            println!(
                "{:<10} {:>6} {:>9} {:>9} {:>9} {:>9} {:>11}",
                "schedules", "slots", "fires", "p50 ms", "p99 ms", "max ms", "burst ms"
            );
            println!(
                "{:<10} {:>6} {:>9} {:>9.1} {:>9.1} {:>9.1} {:>11.1}",
                self.schedules,
                self.slots,
                self.fires,
                self.p50,
                self.p99,
                self.max,
                self.burst_p50
            );
            println!(
                "(every = \"1s\"; lag = stream store time − slot; {} of {} expected fires; warm-up: {} fires, p99 {:.1} ms; sync_always = {}, load average {})",
                self.fires,
                self.expected,
                self.warm_fires,
                self.warm_p99,
                self.sync_always,
                self.load
            );
            println!(
                "(publish_ahead = {:?}: each fire is published that long before its slot as a message schedule, and the server stores it at the slot; 0 publishes at the slot)",
                self.publish_ahead
            );
        }
        Ok(())
    }
}

pub(super) async fn run(
    external: &Option<String>,
    a: &BenchArgs,
    n: usize,
) -> anyhow::Result<Report> {
    let load = loadavg();
    let b = Bench::start(external, a.sync_always).await?;
    let r = measure(&b.url, a, n, load)
        .await
        .context("scheduler benchmark");
    b.stop().await;
    r
}

async fn measure(url: &str, a: &BenchArgs, n: usize, load: String) -> anyhow::Result<Report> {
    let mut cfg = Config {
        seed_categories: false,
        ..Config::default()
    };
    cfg.categories.clear();
    cfg.scheduler.default_schedules = false;
    let cat: Category = "bench".parse()?;
    cfg.categories
        .insert(cat.clone(), CategoryConfig::default());
    cfg.nats.url = url.to_owned();
    cfg.results.enabled = false;
    let template: ScheduleDef = serde_json::from_value(serde_json::json!({
        "name": "s", "task": "bench.noop", "every": "1s", "catch_up": "none",
    }))
    .context("schedule template")?;
    cfg.schedules = (0..n)
        .map(|i| ScheduleDef {
            name: format!("s{i:06}"),
            ..template.clone()
        })
        .collect();
    let conn = taskmesh_nats::connect(&cfg.nats, "bench", Duration::from_secs(5)).await?;
    taskmesh_nats::provision(&conn.js, &cfg).await?;
    let raw_burst_ms = raw_burst(url, n).await?;
    let sconn =
        taskmesh_nats::connect(&cfg.nats, "bench-scheduler", Duration::from_secs(5)).await?;
    let scheduler = Scheduler::new(sconn, &cfg, SchedulerOptions::new("bench"))?;
    let stop = CancellationToken::new();
    let publish_ahead = cfg.scheduler.publish_ahead;
    let began: DateTime<Utc> = Utc::now();
    let task = tokio::spawn(scheduler.run(stop.clone()));
    // Stop 700 ms into a second, so the last slot's burst is complete.
    let end = began + chrono::Duration::seconds(i64::try_from(a.seconds.max(3)).unwrap_or(3));
    let end = DateTime::<Utc>::from_timestamp(end.timestamp(), 700_000_000).unwrap_or(end);
    let wait = (end - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait).await;
    stop.cancel();
    match tokio::time::timeout(Duration::from_secs(15), task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(e).context("the scheduler failed"),
        Ok(Err(e)) => return Err(e).context("the scheduler task"),
        Err(_) => anyhow::bail!("the scheduler did not stop within 15 s"),
    }

    // Read every fire back: store timestamp − slot.
    let consumer = taskmesh_nats::topology::lane_consumer(&conn.js, &cat, Lane::Normal).await?;
    let warm_until = began + chrono::Duration::seconds(2);
    let mut lags: Vec<f64> = Vec::new();
    let mut warm: Vec<f64> = Vec::new();
    let mut per_slot: std::collections::BTreeMap<i64, (f64, f64)> = Default::default();
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(2000)
            .expires(Duration::from_millis(500))
            .messages()
            .await?;
        let mut got = 0usize;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| anyhow::anyhow!(e))?;
            got += 1;
            let info = m.info().map_err(|e| anyhow::anyhow!(e))?;
            let stored_ns = info.published.unix_timestamp_nanos();
            let slot = m
                .headers
                .as_ref()
                .and_then(|h| h.get(taskmesh_shared::wire::headers::TASK_FIRE_TIME))
                .and_then(|v| DateTime::parse_from_rfc3339(v.as_str()).ok())
                .map(|t| t.to_utc());
            // A fire committed ahead for a slot after the stop is not part of the run.
            if let Some(slot) = slot.filter(|s| *s <= end) {
                let slot_ns = i128::from(slot.timestamp_nanos_opt().unwrap_or(0));
                let lag = (stored_ns - slot_ns) as f64 / 1e6;
                if slot < warm_until {
                    warm.push(lag);
                } else {
                    lags.push(lag);
                    let e = per_slot.entry(slot.timestamp()).or_insert((lag, lag));
                    e.0 = e.0.min(lag);
                    e.1 = e.1.max(lag);
                }
            }
            let _ = m.ack().await;
        }
        if got == 0 {
            break;
        }
    }
    lags.sort_by(f64::total_cmp);
    warm.sort_by(f64::total_cmp);
    let mut bursts: Vec<f64> = per_slot.values().map(|(lo, hi)| hi - lo).collect();
    bursts.sort_by(f64::total_cmp);
    let mut firsts: Vec<f64> = per_slot.values().map(|(lo, _)| *lo).collect();
    firsts.sort_by(f64::total_cmp);
    Ok(Report {
        schedules: n,
        seconds: a.seconds,
        publish_ahead,
        sync_always: a.sync_always,
        load,
        slots: per_slot.len(),
        fires: lags.len(),
        expected: per_slot.len() * n,
        p50: quantile(&lags, 0.5),
        p99: quantile(&lags, 0.99),
        max: lags.last().copied().unwrap_or(f64::NAN),
        warm_fires: warm.len(),
        warm_p99: quantile(&warm, 0.99),
        burst_p50: quantile(&bursts, 0.5),
        first_p50: quantile(&firsts, 0.5),
        raw_burst_ms,
    })
}

/// N raw publishes in one burst (window 4096), in milliseconds: the floor of a slot's burst.
async fn raw_burst(url: &str, n: usize) -> anyhow::Result<f64> {
    use taskmesh_nats::async_nats::jetstream::{self, stream};
    let client = taskmesh_nats::async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let name = format!("BENCH_BURST_{}", super::fastrand_u32());
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("bench.{name}.>")],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let subject = format!("bench.{name}.noop");
    let body = bytes::Bytes::from_static(b"{}");
    let start = std::time::Instant::now();
    super::publish_raw(&js, &subject, &body, n, 4096).await?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let _ = js.delete_stream(&name).await;
    Ok(ms)
}
