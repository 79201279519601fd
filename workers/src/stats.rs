//! In-process counters the runtime keeps for metrics, health and heartbeats, and their
//! Prometheus text rendering (names as in docs/observability.md).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Upper bounds (seconds) of the task duration histogram buckets.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];

/// Counters of one category.
#[derive(Debug, Default)]
pub struct CategoryStats {
    /// Tasks running now.
    pub in_flight: AtomicUsize,
    /// Every lane's consumer is bound.
    pub bound: AtomicBool,
}

/// A (task, outcome) counter and the duration sum of that task.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct TaskCounts {
    /// Attempts that ended this way.
    pub count: u64,
    /// Sum of handler run time in seconds.
    pub seconds: f64,
}

#[derive(Debug, Default)]
struct PerTask {
    outcomes: Vec<(&'static str, TaskCounts)>,
    /// Cumulative-at-render counts per bucket (non-cumulative here), plus +Inf at the end.
    buckets: [u64; DURATION_BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

/// Everything the runtime counts.
#[derive(Debug)]
pub struct Stats {
    categories: Mutex<HashMap<String, Arc<CategoryStats>>>,
    tasks: Mutex<HashMap<String, PerTask>>,
    /// Attempts finished since start (any outcome).
    pub finished: AtomicU64,
    queues: Mutex<Vec<QueueDepth>>,
    /// Messages in `TASKS_DLQ` at the last poll (`u64::MAX` = unknown).
    pub dlq_messages: AtomicU64,
    /// Circuit breakers by dependency.
    pub breakers: crate::breaker::Breakers,
}

/// A lane consumer's backlog at the last poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    /// Category.
    pub category: String,
    /// Lane (`high`, `normal`, `low`).
    pub lane: &'static str,
    /// Messages waiting to be delivered.
    pub pending: u64,
    /// Delivered, not yet acknowledged.
    pub ack_pending: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            categories: Mutex::default(),
            tasks: Mutex::default(),
            finished: AtomicU64::new(0),
            queues: Mutex::default(),
            dlq_messages: AtomicU64::new(u64::MAX),
            breakers: crate::breaker::Breakers::default(),
        }
    }
}

impl Stats {
    /// Counters with breakers configured by `[breakers.…]`.
    pub fn with_breakers(
        cfg: std::collections::BTreeMap<String, taskmesh_shared::config::BreakerConfig>,
    ) -> Self {
        Self {
            breakers: crate::breaker::Breakers::new(cfg),
            ..Self::default()
        }
    }

    /// The counters of a category (created on first use).
    pub fn category(&self, name: &str) -> Arc<CategoryStats> {
        let mut g = self.categories.lock().unwrap_or_else(|p| p.into_inner());
        g.entry(name.to_owned()).or_default().clone()
    }

    /// Records one finished attempt.
    pub fn record(&self, task: &str, outcome: &'static str, seconds: f64) {
        {
            let mut g = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            // Look up by &str first: no allocation per task once a name has been seen.
            let per = match g.get_mut(task) {
                Some(v) => v,
                None => g.entry(task.to_owned()).or_default(),
            };
            match per.outcomes.iter_mut().find(|(o, _)| *o == outcome) {
                Some((_, c)) => {
                    c.count += 1;
                    c.seconds += seconds;
                }
                None => per
                    .outcomes
                    .push((outcome, TaskCounts { count: 1, seconds })),
            }
            let i = DURATION_BUCKETS
                .iter()
                .position(|b| seconds <= *b)
                .unwrap_or(DURATION_BUCKETS.len());
            per.buckets[i] += 1;
            per.sum += seconds;
            per.count += 1;
        }
        self.finished.fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot of the (task, outcome) counters.
    pub fn task_counts(&self) -> Vec<((String, &'static str), TaskCounts)> {
        let g = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = g
            .iter()
            .flat_map(|(task, per)| {
                per.outcomes
                    .iter()
                    .map(move |(o, c)| ((task.clone(), *o), *c))
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Names and counters of every category seen.
    pub fn categories(&self) -> Vec<(String, Arc<CategoryStats>)> {
        let g = self.categories.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = g.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Tasks running now across categories.
    pub fn in_flight(&self) -> usize {
        self.categories()
            .iter()
            .map(|(_, c)| c.in_flight.load(Ordering::Relaxed))
            .sum()
    }

    /// Is every consumer of every category bound?
    pub fn all_bound(&self) -> bool {
        let cats = self.categories();
        !cats.is_empty() && cats.iter().all(|(_, c)| c.bound.load(Ordering::Relaxed))
    }

    /// Replaces the backlog snapshot.
    pub fn set_queues(&self, q: Vec<QueueDepth>) {
        *self.queues.lock().unwrap_or_else(|p| p.into_inner()) = q;
    }

    /// The backlog snapshot.
    pub fn queues(&self) -> Vec<QueueDepth> {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Appends the worker metrics in Prometheus text format.
    pub fn render_prometheus(&self, out: &mut String) {
        self.breakers.render_prometheus(out);
        let _ = writeln!(out, "# HELP taskmesh_tasks_total Task attempts by outcome.");
        let _ = writeln!(out, "# TYPE taskmesh_tasks_total counter");
        for ((task, outcome), c) in self.task_counts() {
            let _ = writeln!(
                out,
                "taskmesh_tasks_total{{task=\"{}\",outcome=\"{outcome}\"}} {}",
                escape(&task),
                c.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP taskmesh_task_duration_seconds Handler run time of one attempt."
        );
        let _ = writeln!(out, "# TYPE taskmesh_task_duration_seconds histogram");
        {
            let g = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            let mut names: Vec<&String> = g.keys().collect();
            names.sort();
            for task in names {
                let Some(per) = g.get(task) else { continue };
                let t = escape(task);
                let mut cum = 0;
                for (i, b) in DURATION_BUCKETS.iter().enumerate() {
                    cum += per.buckets[i];
                    let _ = writeln!(
                        out,
                        "taskmesh_task_duration_seconds_bucket{{task=\"{t}\",le=\"{b}\"}} {cum}"
                    );
                }
                cum += per.buckets[DURATION_BUCKETS.len()];
                let _ = writeln!(
                    out,
                    "taskmesh_task_duration_seconds_bucket{{task=\"{t}\",le=\"+Inf\"}} {cum}"
                );
                let _ = writeln!(
                    out,
                    "taskmesh_task_duration_seconds_sum{{task=\"{t}\"}} {}",
                    per.sum
                );
                let _ = writeln!(
                    out,
                    "taskmesh_task_duration_seconds_count{{task=\"{t}\"}} {}",
                    per.count
                );
            }
        }
        let _ = writeln!(out, "# HELP taskmesh_tasks_in_flight Tasks running now.");
        let _ = writeln!(out, "# TYPE taskmesh_tasks_in_flight gauge");
        let cats = self.categories();
        for (c, s) in &cats {
            let _ = writeln!(
                out,
                "taskmesh_tasks_in_flight{{category=\"{}\"}} {}",
                escape(c),
                s.in_flight.load(Ordering::Relaxed)
            );
        }
        let queues = self.queues();
        let _ = writeln!(
            out,
            "# HELP taskmesh_queue_pending Messages waiting in a lane consumer (polled)."
        );
        let _ = writeln!(out, "# TYPE taskmesh_queue_pending gauge");
        for q in &queues {
            let _ = writeln!(
                out,
                "taskmesh_queue_pending{{category=\"{}\",lane=\"{}\"}} {}",
                escape(&q.category),
                q.lane,
                q.pending
            );
        }
        let _ = writeln!(
            out,
            "# HELP taskmesh_queue_ack_pending Messages delivered and not yet acknowledged (polled)."
        );
        let _ = writeln!(out, "# TYPE taskmesh_queue_ack_pending gauge");
        for q in &queues {
            let _ = writeln!(
                out,
                "taskmesh_queue_ack_pending{{category=\"{}\",lane=\"{}\"}} {}",
                escape(&q.category),
                q.lane,
                q.ack_pending
            );
        }
        let dlq = self.dlq_messages.load(Ordering::Relaxed);
        if dlq != u64::MAX {
            let _ = writeln!(
                out,
                "# HELP taskmesh_dlq_messages Messages in TASKS_DLQ (polled)."
            );
            let _ = writeln!(out, "# TYPE taskmesh_dlq_messages gauge");
            let _ = writeln!(out, "taskmesh_dlq_messages {dlq}");
        }
        let _ = writeln!(
            out,
            "# HELP taskmesh_consumer_bound Whether every lane consumer of the category is bound (1) or not (0)."
        );
        let _ = writeln!(out, "# TYPE taskmesh_consumer_bound gauge");
        for (c, s) in &cats {
            let _ = writeln!(
                out,
                "taskmesh_consumer_bound{{category=\"{}\"}} {}",
                escape(c),
                u8::from(s.bound.load(Ordering::Relaxed))
            );
        }
    }
}

/// Escapes a Prometheus label value.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let s = Stats::default();
        s.category("email").in_flight.store(2, Ordering::Relaxed);
        s.record("email.send", "succeeded", 0.003);
        s.record("email.send", "succeeded", 0.2);
        s.record("email.send", "retryable", 400.0);
        let mut out = String::new();
        s.render_prometheus(&mut out);
        for line in [
            "taskmesh_tasks_total{task=\"email.send\",outcome=\"succeeded\"} 2",
            "taskmesh_tasks_total{task=\"email.send\",outcome=\"retryable\"} 1",
            "taskmesh_task_duration_seconds_bucket{task=\"email.send\",le=\"0.005\"} 1",
            "taskmesh_task_duration_seconds_bucket{task=\"email.send\",le=\"0.25\"} 2",
            "taskmesh_task_duration_seconds_bucket{task=\"email.send\",le=\"120\"} 2",
            "taskmesh_task_duration_seconds_bucket{task=\"email.send\",le=\"+Inf\"} 3",
            "taskmesh_task_duration_seconds_count{task=\"email.send\"} 3",
            "taskmesh_tasks_in_flight{category=\"email\"} 2",
            "taskmesh_consumer_bound{category=\"email\"} 0",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
        }
        assert_eq!(escape("a\"b\\c"), "a\\\"b\\\\c");
    }
}
