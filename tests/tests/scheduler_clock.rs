//! The scheduler loop in-process with an injected [`ManualClock`] against a real
//! nats-server: catch-up policies at takeover, a leader that falls behind a wall-clock
//! step, and duplicate suppression when a rewound cursor makes a leader re-fire slots that
//! are already stored. Time is driven, not waited for.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use taskmesh_scheduler::{Scheduler, SchedulerMetrics, SchedulerOptions};
use taskmesh_shared::{Config, ManualClock};
use taskmesh_tests::{NatsServer, eventually};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const NAMES: [&str; 4] = ["none", "latest", "all", "all3"];

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

fn config(url: &str) -> Config {
    let mut text = format!(
        "seed_categories = false\n[nats]\nurl = \"{url}\"\n[categories.testkit]\n[scheduler]\ndefault_schedules = false\nlease_ttl = \"2s\"\nmax_fire_lag = \"10s\"\n"
    );
    for (name, catch_up, max) in [
        ("none", "none", 100),
        ("latest", "latest", 100),
        ("all", "all", 100),
        ("all3", "all", 3),
    ] {
        text += &format!(
            "[[schedules]]\nname = \"{name}\"\ntask = \"testkit.sleep\"\nevery = \"10s\"\ncatch_up = \"{catch_up}\"\nmax_catch_up = {max}\n"
        );
    }
    Config::from_toml_str(&text).unwrap()
}

/// Slots stored per schedule (and checks each has its own id).
async fn stored(js: &jetstream::Context) -> BTreeMap<String, BTreeSet<DateTime<Utc>>> {
    let mut stream = js.get_stream("TASKS_TESTKIT").await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut out: BTreeMap<String, BTreeSet<DateTime<Utc>>> = BTreeMap::new();
    let mut ids = BTreeSet::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let m = stream.get_raw_message(seq).await.unwrap();
        let h = |n: &str| m.headers.get(n).unwrap().as_str().to_owned();
        let (name, slot) = (h("Task-Schedule"), t(&h("Task-Fire-Time")));
        assert_eq!(
            h("Task-Id"),
            format!("{name}_{}", slot.format("%Y%m%dT%H%M%SZ"))
        );
        assert!(ids.insert(h("Task-Id")), "task id stored twice");
        assert!(
            out.entry(name).or_default().insert(slot),
            "slot stored twice"
        );
    }
    out
}

fn counts(map: &BTreeMap<String, BTreeSet<DateTime<Utc>>>) -> Vec<usize> {
    NAMES
        .iter()
        .map(|n| map.get(*n).map_or(0, BTreeSet::len))
        .collect()
}

async fn wait_counts(js: &jetstream::Context, want: [usize; 4], what: &str) {
    eventually(Duration::from_secs(15), what, || async {
        let got = counts(&stored(js).await);
        if got == want {
            Ok(())
        } else {
            Err(format!("stored per schedule {got:?}, want {want:?}"))
        }
    })
    .await;
}

fn start(
    conn: &taskmesh_nats::Connection,
    cfg: &Config,
    clock: &Arc<ManualClock>,
) -> (
    Arc<SchedulerMetrics>,
    CancellationToken,
    JoinHandle<Result<(), taskmesh_scheduler::SchedulerError>>,
) {
    let mut opts = SchedulerOptions::new("clock-test");
    opts.clock = clock.clone();
    opts.tick = Duration::from_millis(20);
    let scheduler = Scheduler::new(conn.clone(), cfg, opts).unwrap();
    let metrics = scheduler.metrics();
    let stop = CancellationToken::new();
    let task = tokio::spawn(scheduler.run(stop.clone()));
    (metrics, stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_clock_steps_and_duplicate_suppression_with_an_injected_clock() {
    let server = NatsServer::start().await;
    let cfg = config(&server.url());
    let conn = taskmesh_nats::connect(&cfg.nats, "scheduler-test", Duration::from_secs(10))
        .await
        .unwrap();
    taskmesh_nats::provision(&conn.js, &cfg).await.unwrap();
    let cursors = conn.js.get_key_value("TASKMESH_SCHEDULER").await.unwrap();
    for name in NAMES {
        cursors
            .put(name, "2030-01-01T00:00:00Z".into())
            .await
            .unwrap();
    }

    // Takeover 65.5 s after the cursors: six 10-second slots (00:10 … 01:00) were missed.
    let clock = Arc::new(ManualClock::new(t("2030-01-01T00:01:05.5Z")));
    let (metrics, stop, task) = start(&conn, &cfg, &clock);
    wait_counts(&conn.js, [0, 1, 6, 3], "catch-up fires at takeover").await;
    let s = stored(&conn.js).await;
    assert_eq!(s["latest"], BTreeSet::from([t("2030-01-01T00:01:00Z")]));
    assert_eq!(
        s["all3"],
        ["00:40", "00:50", "01:00"]
            .iter()
            .map(|m| t(&format!("2030-01-01T00:{m}Z")))
            .collect()
    );
    assert_eq!(s["all"].first(), Some(&t("2030-01-01T00:00:10Z")));

    // The next slot fires when the clock reaches it, once per schedule.
    clock.set(t("2030-01-01T00:01:10.2Z"));
    wait_counts(&conn.js, [1, 2, 7, 4], "the 01:10 slot").await;

    // The wall clock steps two hours forward: the leader is > max_fire_lag behind its next
    // slot (00:01:20) and applies catch-up instead of firing all 774 slots up to 02:10:10.
    clock.set(t("2030-01-01T02:10:10.2Z"));
    wait_counts(&conn.js, [1, 3, 107, 7], "catch-up after the clock step").await;
    let s = stored(&conn.js).await;
    assert_eq!(s["latest"].last(), Some(&t("2030-01-01T02:10:10Z")));
    assert_eq!(
        s["all"].range(t("2030-01-01T01:10:01Z")..).next(),
        Some(&t("2030-01-01T01:53:40Z")),
        "the newest 100 slots"
    );
    let snap = metrics.snapshot();
    let missed: Vec<u64> = NAMES.iter().map(|n| snap.schedules[*n].missed).collect();
    // Skipped at takeover (6 slots, minus those fired) plus after the step (774, minus
    // those fired).
    assert_eq!(missed, [6 + 774, 5 + 773, 774 - 100, 3 + 771]);
    let fires: Vec<u64> = NAMES.iter().map(|n| snap.schedules[*n].fires).collect();
    assert_eq!(fires, [1, 3, 107, 7]);
    assert!(snap.leader);

    stop.cancel();
    task.await.unwrap().unwrap();
    eventually(Duration::from_secs(5), "cursors written", || async {
        let v = cursors.get("all").await.map_err(|e| e.to_string())?;
        match v.as_deref() {
            Some(b"2030-01-01T02:10:10Z") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Duplicate suppression: rewind one cursor, as if a leader died after publishing and
    // before writing it. The next leader re-fires the newest 100 slots under the same
    // Nats-Msg-Id; the stream keeps none of them.
    cursors
        .put("all", "2030-01-01T00:00:00Z".into())
        .await
        .unwrap();
    let (metrics, stop, task) = start(&conn, &cfg, &clock);
    eventually(
        Duration::from_secs(15),
        "100 re-fires acknowledged",
        || async {
            let d = metrics
                .snapshot()
                .schedules
                .get("all")
                .map_or(0, |c| c.duplicates);
            if d == 100 {
                Ok(())
            } else {
                Err(format!("{d} duplicates"))
            }
        },
    )
    .await;
    assert_eq!(counts(&stored(&conn.js).await), [1, 3, 107, 7]);
    let snap = metrics.snapshot();
    assert_eq!(snap.schedules["all"].fires, 0, "nothing new was stored");
    println!(
        "duplicate suppression: 100 re-fired slots, {} dropped by the stream as duplicates, 0 stored",
        snap.schedules["all"].duplicates
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}
