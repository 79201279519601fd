//! Circuit breakers keyed by dependency (`smtp`, `notion`, `ai-endpoint`), shared by every
//! category of one worker process.
//!
//! closed → open after `failure_threshold` dependency failures within `window` → half-open
//! after `open_for`, letting `half_open_probes` tasks through → closed on a success, open
//! again on a failure. While open, tasks that need the dependency are not attempted: the
//! runtime defers them (a scheduled copy, attempt count kept) until the breaker is due to
//! probe, so an outage neither dead-letters them nor spins.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use taskmesh_shared::config::BreakerConfig;
use tokio::time::Instant;

/// What the breaker says about running a task now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Run it (`probe` while half-open).
    Run {
        /// This run decides whether the breaker closes.
        probe: bool,
    },
    /// Do not run it; try again after this long.
    Defer(Duration),
}

#[derive(Debug)]
enum State {
    Closed { failures: VecDeque<Instant> },
    Open { until: Instant },
    HalfOpen { probes: u32 },
}

/// One dependency's breaker.
#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: Mutex<State>,
    /// Tasks deferred because the breaker was open.
    pub deferred: AtomicU64,
    /// Times it opened.
    pub opened: AtomicU64,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            state: Mutex::new(State::Closed {
                failures: VecDeque::new(),
            }),
            deferred: AtomicU64::new(0),
            opened: AtomicU64::new(0),
        }
    }

    /// May a task that needs the dependency run now?
    pub fn admit(&self) -> Admit {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let State::Open { until } = *s {
            if now < until {
                self.deferred.fetch_add(1, Ordering::Relaxed);
                return Admit::Defer(until - now);
            }
            *s = State::HalfOpen { probes: 0 };
        }
        match &mut *s {
            State::HalfOpen { probes } if *probes < self.cfg.half_open_probes.max(1) => {
                *probes += 1;
                Admit::Run { probe: true }
            }
            State::HalfOpen { .. } => {
                self.deferred.fetch_add(1, Ordering::Relaxed);
                // Probes are out; check back soon.
                Admit::Defer(self.cfg.open_for.min(Duration::from_secs(5)))
            }
            _ => Admit::Run { probe: false },
        }
    }

    /// Reports how a run that needed the dependency went (`failed` = the dependency
    /// failed: a retryable error or a timeout).
    pub fn record(&self, failed: bool, probe: bool) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match &mut *s {
            State::HalfOpen { probes } if probe => {
                if failed {
                    *s = State::Open {
                        until: now + self.cfg.open_for,
                    };
                    self.opened.fetch_add(1, Ordering::Relaxed);
                } else {
                    let _ = probes;
                    *s = State::Closed {
                        failures: VecDeque::new(),
                    };
                }
            }
            State::Closed { failures } if failed => {
                failures.push_back(now);
                while failures
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > self.cfg.window)
                {
                    failures.pop_front();
                }
                if failures.len() >= self.cfg.failure_threshold.max(1) as usize {
                    *s = State::Open {
                        until: now + self.cfg.open_for,
                    };
                    self.opened.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {}
        }
    }

    /// `closed`, `open` or `half_open`.
    pub fn state_name(&self) -> &'static str {
        match *self.state.lock().unwrap_or_else(|p| p.into_inner()) {
            State::Closed { .. } => "closed",
            State::Open { until } if Instant::now() < until => "open",
            State::Open { .. } | State::HalfOpen { .. } => "half_open",
        }
    }
}

/// Every breaker of a process, created on first use.
#[derive(Debug, Default)]
pub struct Breakers {
    cfg: BTreeMap<String, BreakerConfig>,
    map: Mutex<HashMap<String, Arc<Breaker>>>,
}

impl Breakers {
    /// Breakers configured by `[breakers.<name>]` (defaults for other names).
    pub fn new(cfg: BTreeMap<String, BreakerConfig>) -> Self {
        Self {
            cfg,
            map: Mutex::default(),
        }
    }

    /// The breaker of a dependency.
    pub fn get(&self, dependency: &str) -> Arc<Breaker> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = m.get(dependency) {
            return b.clone();
        }
        let b = Arc::new(Breaker::new(
            self.cfg.get(dependency).cloned().unwrap_or_default(),
        ));
        m.insert(dependency.to_owned(), b.clone());
        b
    }

    /// Every breaker and its state.
    pub fn states(&self) -> Vec<(String, &'static str, u64, u64)> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = m
            .iter()
            .map(|(k, b)| {
                (
                    k.clone(),
                    b.state_name(),
                    b.deferred.load(Ordering::Relaxed),
                    b.opened.load(Ordering::Relaxed),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// Appends breaker metrics (Prometheus text).
    pub fn render_prometheus(&self, out: &mut String) {
        let states = self.states();
        let _ = writeln!(
            out,
            "# HELP taskmesh_breaker_state Circuit breaker state: 0 closed, 1 half-open, 2 open."
        );
        let _ = writeln!(out, "# TYPE taskmesh_breaker_state gauge");
        for (d, s, _, _) in &states {
            let v = match *s {
                "open" => 2,
                "half_open" => 1,
                _ => 0,
            };
            let _ = writeln!(
                out,
                "taskmesh_breaker_state{{dependency=\"{}\"}} {v}",
                crate::stats::escape(d)
            );
        }
        let _ = writeln!(
            out,
            "# HELP taskmesh_breaker_deferred_total Tasks deferred while the breaker was open."
        );
        let _ = writeln!(out, "# TYPE taskmesh_breaker_deferred_total counter");
        for (d, _, n, _) in &states {
            let _ = writeln!(
                out,
                "taskmesh_breaker_deferred_total{{dependency=\"{}\"}} {n}",
                crate::stats::escape(d)
            );
        }
        let _ = writeln!(
            out,
            "# HELP taskmesh_breaker_opened_total Times the breaker opened."
        );
        let _ = writeln!(out, "# TYPE taskmesh_breaker_opened_total counter");
        for (d, _, _, n) in &states {
            let _ = writeln!(
                out,
                "taskmesh_breaker_opened_total{{dependency=\"{}\"}} {n}",
                crate::stats::escape(d)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 3,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(30),
            half_open_probes: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn closed_open_half_open_closed() {
        let b = Breaker::new(cfg());
        assert_eq!(b.admit(), Admit::Run { probe: false });
        b.record(true, false);
        b.record(true, false);
        assert_eq!(b.state_name(), "closed");
        b.record(true, false);
        assert_eq!(b.state_name(), "open");
        assert!(matches!(b.admit(), Admit::Defer(d) if d == Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(b.admit(), Admit::Run { probe: true });
        // Only one probe at a time.
        assert!(matches!(b.admit(), Admit::Defer(_)));
        b.record(true, true);
        assert_eq!(b.state_name(), "open", "a failed probe reopens");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(b.admit(), Admit::Run { probe: true });
        b.record(false, true);
        assert_eq!(b.state_name(), "closed");
        assert_eq!(b.opened.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_outside_the_window_do_not_count() {
        let b = Breaker::new(cfg());
        b.record(true, false);
        b.record(true, false);
        tokio::time::advance(Duration::from_secs(11)).await;
        b.record(true, false);
        assert_eq!(b.state_name(), "closed");
    }

    #[test]
    fn shared_by_name() {
        let bs = Breakers::new(BTreeMap::new());
        let a = bs.get("smtp");
        let b = bs.get("smtp");
        assert!(Arc::ptr_eq(&a, &b), "clones share one breaker (tower#794)");
    }
}
