//! Counters the scheduler keeps for `/metrics` (DESIGN.md § Observability):
//! `taskmesh_schedule_fires_total{schedule}`, `taskmesh_schedule_missed_total{schedule}`,
//! `taskmesh_schedule_lag_seconds{schedule}`, plus leadership and publish health.
//!
//! The scheduler only counts; whoever serves `/metrics` reads a [`MetricsSnapshot`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// Per-schedule counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScheduleCounters {
    /// Fires stored in the stream by this replica (PubAck received, not a duplicate),
    /// including catch-up fires. `taskmesh_schedule_fires_total`.
    pub fires: u64,
    /// Fires the stream dropped as duplicates of a `Nats-Msg-Id` it had already stored
    /// (another leader fired the slot first).
    pub duplicates: u64,
    /// Slots that passed without a fire and never will be fired, as the catch-up policy
    /// decided (counted at most 1000 per schedule per takeover).
    /// `taskmesh_schedule_missed_total`.
    pub missed: u64,
    /// Missed slots fired late by catch-up (part of `fires`).
    pub caught_up: u64,
    /// Publishes that failed (retried).
    pub publish_errors: u64,
    /// From the slot to its PubAck, for the last fire. `taskmesh_schedule_lag_seconds`.
    pub last_lag: Option<Duration>,
    /// The last slot this replica fired.
    pub last_slot: Option<DateTime<Utc>>,
}

/// A point-in-time copy of every counter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsSnapshot {
    /// Whether this replica is firing (holds a trusted lease) right now.
    pub leader: bool,
    /// How many times this replica became leader.
    pub leader_terms: u64,
    /// Dynamic schedules refused as invalid (logged and skipped).
    pub invalid_dynamic: u64,
    /// Schedules known (static and valid dynamic).
    pub schedules_known: u64,
    /// Per schedule, by name.
    pub schedules: BTreeMap<String, ScheduleCounters>,
}

/// The live counters; cheap to update from the firing loop.
#[derive(Debug, Default)]
pub struct SchedulerMetrics {
    leader: AtomicBool,
    leader_terms: AtomicU64,
    invalid_dynamic: AtomicU64,
    schedules_known: AtomicU64,
    schedules: Mutex<BTreeMap<String, ScheduleCounters>>,
}

impl SchedulerMetrics {
    /// A copy of every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            leader: self.is_leader(),
            leader_terms: self.leader_terms.load(Ordering::Relaxed),
            invalid_dynamic: self.invalid_dynamic.load(Ordering::Relaxed),
            schedules_known: self.schedules_known.load(Ordering::Relaxed),
            schedules: self.lock().clone(),
        }
    }

    /// Whether this replica is firing right now.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// Totals over every schedule: (fires, duplicates, missed, caught up, publish errors).
    pub fn totals(&self) -> (u64, u64, u64, u64, u64) {
        self.lock().values().fold((0, 0, 0, 0, 0), |t, c| {
            (
                t.0 + c.fires,
                t.1 + c.duplicates,
                t.2 + c.missed,
                t.3 + c.caught_up,
                t.4 + c.publish_errors,
            )
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ScheduleCounters>> {
        self.schedules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends the counters as Prometheus text: `taskmesh_schedule_fires_total`,
    /// `taskmesh_schedule_missed_total`, `taskmesh_schedule_lag_seconds` (DESIGN.md), plus
    /// `taskmesh_schedule_duplicates_total`, `taskmesh_schedule_publish_errors_total`,
    /// `taskmesh_scheduler_leader`, `taskmesh_scheduler_leader_terms_total`,
    /// `taskmesh_scheduler_schedules` and `taskmesh_scheduler_invalid_dynamic_total`.
    pub fn render_prometheus(&self, out: &mut String) {
        let snap = self.snapshot();
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        gauge(
            out,
            "taskmesh_scheduler_leader",
            "Whether this replica is firing (holds a trusted lease).",
            "gauge",
            u8::from(snap.leader).to_string(),
        );
        gauge(
            out,
            "taskmesh_scheduler_leader_terms_total",
            "How many times this replica became leader.",
            "counter",
            snap.leader_terms.to_string(),
        );
        gauge(
            out,
            "taskmesh_scheduler_schedules",
            "Schedules known (static and valid dynamic).",
            "gauge",
            snap.schedules_known.to_string(),
        );
        gauge(
            out,
            "taskmesh_scheduler_invalid_dynamic_total",
            "Dynamic schedules skipped as invalid.",
            "counter",
            snap.invalid_dynamic.to_string(),
        );
        type Field = fn(&ScheduleCounters) -> Option<String>;
        let families: [(&str, &str, &str, Field); 5] = [
            (
                "taskmesh_schedule_fires_total",
                "Fires stored by this replica (catch-up included).",
                "counter",
                |c| Some(c.fires.to_string()),
            ),
            (
                "taskmesh_schedule_missed_total",
                "Slots skipped by the catch-up policy.",
                "counter",
                |c| Some(c.missed.to_string()),
            ),
            (
                "taskmesh_schedule_duplicates_total",
                "Fires the stream dropped as already stored (Nats-Msg-Id).",
                "counter",
                |c| Some(c.duplicates.to_string()),
            ),
            (
                "taskmesh_schedule_publish_errors_total",
                "Failed publishes of fires (retried).",
                "counter",
                |c| Some(c.publish_errors.to_string()),
            ),
            (
                "taskmesh_schedule_lag_seconds",
                "From the slot to the PubAck of the last fire.",
                "gauge",
                |c| c.last_lag.map(|d| format!("{:.6}", d.as_secs_f64())),
            ),
        ];
        for (name, help, kind, field) in families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (schedule, c) in &snap.schedules {
                if let Some(v) = field(c) {
                    let _ = writeln!(out, "{name}{{schedule=\"{}\"}} {v}", escape(schedule));
                }
            }
        }
    }

    pub(crate) fn set_leader(&self, leader: bool) {
        if leader && !self.leader.swap(true, Ordering::Relaxed) {
            self.leader_terms.fetch_add(1, Ordering::Relaxed);
        } else if !leader {
            self.leader.store(false, Ordering::Relaxed);
        }
    }

    pub(crate) fn set_known(&self, n: usize) {
        self.schedules_known.store(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn invalid_dynamic(&self) {
        self.invalid_dynamic.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn with(&self, schedule: &str, f: impl FnOnce(&mut ScheduleCounters)) {
        let mut map = self.lock();
        match map.get_mut(schedule) {
            Some(c) => f(c),
            None => f(map.entry(schedule.to_owned()).or_default()),
        }
    }

    pub(crate) fn forget(&self, schedule: &str) {
        self.lock().remove(schedule);
    }
}

/// Escapes a Prometheus label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_accumulate_and_leadership_counts_terms() {
        let m = SchedulerMetrics::default();
        m.with("a", |c| c.fires += 2);
        m.with("a", |c| c.duplicates += 1);
        m.with("b", |c| c.missed += 3);
        m.set_leader(true);
        m.set_leader(true);
        m.set_leader(false);
        m.set_leader(true);
        let s = m.snapshot();
        assert!(s.leader);
        assert_eq!(s.leader_terms, 2);
        assert_eq!(s.schedules["a"].fires, 2);
        assert_eq!(m.totals(), (2, 1, 3, 0, 0));
        m.with("a", |c| c.last_lag = Some(Duration::from_millis(12)));
        let mut text = String::new();
        m.render_prometheus(&mut text);
        for want in [
            "taskmesh_scheduler_leader 1",
            "taskmesh_scheduler_leader_terms_total 2",
            "taskmesh_schedule_fires_total{schedule=\"a\"} 2",
            "taskmesh_schedule_missed_total{schedule=\"b\"} 3",
            "taskmesh_schedule_duplicates_total{schedule=\"a\"} 1",
            "taskmesh_schedule_lag_seconds{schedule=\"a\"} 0.012000",
            "# TYPE taskmesh_schedule_fires_total counter",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(!text.contains("taskmesh_schedule_lag_seconds{schedule=\"b\"}"));
        m.forget("a");
        assert!(!m.snapshot().schedules.contains_key("a"));
        assert_eq!(escape("a\"b"), "a\\\"b");
    }
}
