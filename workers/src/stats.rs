//! In-process counters the runtime keeps for metrics, health and heartbeats.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

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

/// Everything the runtime counts.
#[derive(Debug, Default)]
pub struct Stats {
    categories: Mutex<HashMap<String, std::sync::Arc<CategoryStats>>>,
    tasks: Mutex<HashMap<String, Vec<(&'static str, TaskCounts)>>>,
    /// Attempts finished since start (any outcome).
    pub finished: AtomicU64,
}

impl Stats {
    /// The counters of a category (created on first use).
    pub fn category(&self, name: &str) -> std::sync::Arc<CategoryStats> {
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
            match per.iter_mut().find(|(o, _)| *o == outcome) {
                Some((_, c)) => {
                    c.count += 1;
                    c.seconds += seconds;
                }
                None => per.push((outcome, TaskCounts { count: 1, seconds })),
            }
        }
        self.finished.fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot of the (task, outcome) counters.
    pub fn task_counts(&self) -> Vec<((String, &'static str), TaskCounts)> {
        let g = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = g
            .iter()
            .flat_map(|(task, per)| per.iter().map(move |(o, c)| ((task.clone(), *o), *c)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Names and counters of every category seen.
    pub fn categories(&self) -> Vec<(String, std::sync::Arc<CategoryStats>)> {
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
}
