//! The scheduler loop in-process against a real nats-server. With an injected
//! [`ManualClock`]: catch-up policies at takeover, a leader that falls behind a wall-clock
//! step, and duplicate suppression when a rewound cursor makes a leader re-fire slots that
//! are already stored — time is driven, not waited for, so these run with
//! `publish_ahead = 0` (the server releases a message schedule on its own wall clock, not
//! on the test's). On the real clock: fires published ahead of their slot are released by
//! the server at the slot, exactly once, while two replicas both lead.

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
        "seed_categories = false\n[nats]\nurl = \"{url}\"\n[categories.testkit]\n[scheduler]\ndefault_schedules = false\nlease_ttl = \"2s\"\nmax_fire_lag = \"10s\"\npublish_ahead = \"0s\"\n"
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

/// A message schedule as published: (fire id, slot, seen at).
type Published = (String, DateTime<Utc>, DateTime<Utc>);

/// One message of the testkit stream: (subject, schedule, slot, task id, stored at).
type Stored = (String, String, DateTime<Utc>, String, DateTime<Utc>);

/// Every message of the testkit stream that carries a fire's headers.
async fn scan(js: &jetstream::Context) -> Vec<Stored> {
    let mut stream = js.get_stream("TASKS_TESTKIT").await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        // A released message schedule leaves a gap.
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        let h = |n: &str| m.headers.get(n).map(|v| v.as_str().to_owned());
        let (Some(name), Some(slot), Some(id)) =
            (h("Task-Schedule"), h("Task-Fire-Time"), h("Task-Id"))
        else {
            continue;
        };
        let stored_at =
            DateTime::from_timestamp_nanos(i64::try_from(m.time.unix_timestamp_nanos()).unwrap());
        out.push((m.subject.to_string(), name, t(&slot), id, stored_at));
    }
    out
}

/// Waits for the lease holder's next renewal (its revision moves) and deletes the key
/// right after it, so the follower takes over at once while the old leader still trusts
/// its lease for a whole renewal interval: two leaders for ~`lease_ttl / 3`.
async fn depose_after_a_renewal(js: &jetstream::Context) {
    let leases = js.get_key_value("TASKMESH_LEASES").await.unwrap();
    let rev = |e: Option<jetstream::kv::Entry>| e.map(|e| e.revision);
    let before = rev(leases.entry("scheduler").await.unwrap());
    eventually(Duration::from_secs(10), "a lease renewal", || async {
        let now = rev(leases.entry("scheduler").await.map_err(|e| e.to_string())?);
        if now.is_some() && now != before {
            Ok(())
        } else {
            Err(format!("revision {now:?}"))
        }
    })
    .await;
    leases.delete("scheduler").await.unwrap();
}

/// With the default `publish_ahead = 700ms` every fire goes out about 0.7 s before its
/// slot as a message schedule on `delayed.testkit.<task id>`, and the server stores it on
/// the task subject at its slot — not before. The lease key is deleted twice behind the
/// leader's back right after a renewal, so both replicas lead for ~2 s each time and both
/// publish the same slots: each slot is still stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ahead_fires_are_released_at_their_slot_once_while_two_replicas_lead() {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use futures::StreamExt;

    const SCHEDULES: [&str; 3] = ["a1", "a2", "a3"];
    let server = NatsServer::start().await;
    let mut text = format!(
        "seed_categories = false\n[nats]\nurl = \"{}\"\n[categories.testkit]\n[scheduler]\ndefault_schedules = false\nlease_ttl = \"6s\"\n",
        server.url()
    );
    for name in SCHEDULES {
        text += &format!(
            "[[schedules]]\nname = \"{name}\"\ntask = \"testkit.sleep\"\nevery = \"1s\"\ncatch_up = \"all\"\n"
        );
    }
    let cfg = Config::from_toml_str(&text).unwrap();
    assert_eq!(
        cfg.scheduler.publish_ahead,
        Duration::from_millis(700),
        "default"
    );
    let conn = taskmesh_nats::connect(&cfg.nats, "scheduler-test", Duration::from_secs(10))
        .await
        .unwrap();
    taskmesh_nats::provision(&conn.js, &cfg).await.unwrap();
    for refused in [Duration::from_secs(61), Duration::from_millis(100)] {
        let mut bad = cfg.clone();
        bad.scheduler.publish_ahead = refused;
        let err = Scheduler::new(conn.clone(), &bad, SchedulerOptions::new("x")).unwrap_err();
        assert!(err.to_string().contains("publish_ahead"), "{err}");
    }

    // Each message schedule as a replica publishes it (a core subscription sees JetStream
    // publishes too): (fire id, slot, seen at).
    let seen: Arc<Mutex<Vec<Published>>> = Arc::default();
    let mut sub = server
        .client()
        .await
        .subscribe("delayed.testkit.>")
        .await
        .unwrap();
    let seen_w = seen.clone();
    let collector = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let at = Utc::now();
            let h = |n: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(n))
                    .map(|v| v.as_str().to_owned())
            };
            if let (Some(id), Some(slot)) = (h("Nats-Msg-Id"), h("Task-Fire-Time")) {
                seen_w.lock().unwrap().push((id, t(&slot), at));
            }
        }
    });

    let replica = |id: &str| {
        let scheduler = Scheduler::new(conn.clone(), &cfg, SchedulerOptions::new(id)).unwrap();
        let metrics = scheduler.metrics();
        let stop = CancellationToken::new();
        let task = tokio::spawn(scheduler.run(stop.clone()));
        (metrics, stop, task)
    };
    let (ma, stop_a, task_a) = replica("ahead-a");
    let (mb, stop_b, task_b) = replica("ahead-b");
    // Milliseconds during which both replicas fired.
    let both_ms = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (ma, mb, both_ms) = (ma.clone(), mb.clone(), both_ms.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if ma.is_leader() && mb.is_leader() {
                    both_ms.fetch_add(10, Ordering::Relaxed);
                }
            }
        })
    };
    eventually(
        Duration::from_secs(15),
        "two fires per schedule",
        || async {
            let n = scan(&conn.js)
                .await
                .iter()
                .filter(|s| s.0.starts_with("tasks."))
                .count();
            if n >= 2 * SCHEDULES.len() {
                Ok(())
            } else {
                Err(format!("{n} fires stored"))
            }
        },
    )
    .await;

    for round in 1..=2 {
        let overlap_before = both_ms.load(Ordering::Relaxed);
        depose_after_a_renewal(&conn.js).await;
        eventually(
            Duration::from_secs(10),
            "two leaders, then one again",
            || async {
                let both = both_ms.load(Ordering::Relaxed) - overlap_before;
                if both >= 1000 && ma.is_leader() != mb.is_leader() {
                    Ok(())
                } else {
                    Err(format!(
                        "round {round}: both led {both} ms; leaders a={} b={}",
                        ma.is_leader(),
                        mb.is_leader()
                    ))
                }
            },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_a.cancel();
    stop_b.cancel();
    task_a.await.unwrap().unwrap();
    task_b.await.unwrap().unwrap();
    sampler.abort();

    // The fires committed last are released at their slots, and no message schedule is
    // left behind.
    eventually(
        Duration::from_secs(5),
        "pending message schedules released",
        || async {
            let pending = scan(&conn.js)
                .await
                .iter()
                .filter(|s| s.0.starts_with("delayed."))
                .count();
            if pending == 0 {
                Ok(())
            } else {
                Err(format!("{pending} pending"))
            }
        },
    )
    .await;
    collector.abort();

    let stored = scan(&conn.js).await;
    let seen = seen.lock().unwrap().clone();
    let mut published: BTreeMap<String, (usize, DateTime<Utc>)> = BTreeMap::new();
    for (id, _, at) in &seen {
        let e = published.entry(id.clone()).or_insert((0, *at));
        e.0 += 1;
        e.1 = e.1.min(*at);
    }
    let mut worst_release = chrono::TimeDelta::zero();
    let mut ahead = 0;
    let mut total = 0;
    for name in SCHEDULES {
        let fires: Vec<&Stored> = stored.iter().filter(|s| s.1 == name).collect();
        let slots: BTreeSet<DateTime<Utc>> = fires.iter().map(|s| s.2).collect();
        assert_eq!(slots.len(), fires.len(), "{name}: a slot stored twice");
        let (first, last) = (*slots.first().unwrap(), *slots.last().unwrap());
        assert_eq!(
            (last - first).num_seconds() + 1,
            i64::try_from(slots.len()).unwrap(),
            "{name}: a slot never fired"
        );
        for (subject, _, slot, id, stored_at) in fires {
            assert!(subject.starts_with("tasks.testkit."), "{subject}");
            assert_eq!(id, &format!("{name}_{}", slot.format("%Y%m%dT%H%M%SZ")));
            assert!(
                stored_at >= slot,
                "{name}: slot {slot} stored {} ms early",
                (*slot - *stored_at).num_milliseconds()
            );
            let fire_id = format!("{name}@{}", slot.format("%Y-%m-%dT%H:%M:%SZ"));
            if let Some((_, first_seen)) = published.get(&fire_id) {
                // Published well before the slot, stored at (not before) it.
                if *slot - *first_seen >= chrono::TimeDelta::milliseconds(200) {
                    ahead += 1;
                    worst_release = worst_release.max(*stored_at - *slot);
                }
            }
            total += 1;
        }
    }
    let both_published = published.values().filter(|(n, _)| *n >= 2).count();
    let duplicates: u64 = [&ma, &mb]
        .iter()
        .flat_map(|m| m.snapshot().schedules.into_values())
        .map(|c| c.duplicates)
        .sum();
    println!(
        "publish ahead: {total} fires stored exactly once, {ahead} published >= 200 ms before their slot and \
         stored {} ms after it at worst; {both_published} slots published by both leaders, {duplicates} \
         dropped as duplicates; both led {} ms",
        worst_release.num_milliseconds(),
        both_ms.load(Ordering::Relaxed)
    );
    assert!(
        ahead * 10 >= total * 9,
        "{ahead} of {total} fires went out ahead"
    );
    assert!(
        worst_release < chrono::TimeDelta::seconds(1),
        "released {} ms after the slot",
        worst_release.num_milliseconds()
    );
    assert!(
        both_published >= SCHEDULES.len(),
        "both leaders published the same slots ({both_published})"
    );
    assert!(
        duplicates >= u64::try_from(both_published).unwrap(),
        "{duplicates} duplicates for {both_published} slots published twice"
    );
}
