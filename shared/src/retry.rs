//! Retry policy: how many attempts a task gets and how long to wait between them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Exponential backoff with jitter, capped. Per-task behaviour is data: every task has one
/// of these (its handler's default, overridden by config), and the one runtime applies it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Total deliveries a task may use, the first included (Celery's `max_retries=3` is 4).
    /// Capped by the consumer's `max_deliver`. If unsure: 4.
    pub max_attempts: u32,
    /// Delay before the first retry. If unsure: 1s.
    #[serde(with = "crate::config::duration")]
    pub initial_delay: Duration,
    /// Upper bound of any delay. If unsure: 10m.
    #[serde(with = "crate::config::duration")]
    pub max_delay: Duration,
    /// Growth factor per attempt (≥ 1). If unsure: 2.
    pub multiplier: f64,
    /// Fraction of the delay that is randomized (0 = none, 1 = full jitter). Spreads retries
    /// of a failed batch so they do not arrive together. If unsure: 0.2.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(600),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// A policy with a fixed first delay (the seeds' per-task `default_retry_delay`).
    pub fn with_initial_delay(mut self, d: Duration) -> Self {
        self.initial_delay = d;
        if self.max_delay < d {
            self.max_delay = d;
        }
        self
    }

    /// The delay before the retry that follows failed attempt `attempt` (1-based), without
    /// jitter: `initial × multiplier^(attempt-1)`, capped at `max_delay`.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let mult = self.multiplier.max(1.0);
        let secs = self.initial_delay.as_secs_f64() * mult.powi(exp);
        let cap = self.max_delay.as_secs_f64();
        Duration::from_secs_f64(if secs.is_finite() { secs.min(cap) } else { cap })
    }

    /// The jittered delay: uniform in `[base × (1 - jitter), base]`. `unit` is a random
    /// number in `[0, 1)`, passed in so the function stays pure.
    pub fn backoff(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.base_delay(attempt).as_secs_f64();
        let jitter = self.jitter.clamp(0.0, 1.0);
        let unit = unit.clamp(0.0, 1.0);
        Duration::from_secs_f64(base * (1.0 - jitter * unit))
    }

    /// Checks the policy's numbers.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("max_attempts must be at least 1".into());
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(format!("multiplier must be ≥ 1, got {}", self.multiplier));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(format!("jitter must be within 0..=1, got {}", self.jitter));
        }
        if self.max_delay < self.initial_delay {
            return Err("max_delay must not be below initial_delay".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grows_then_caps() {
        let p = RetryPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        let got: Vec<u128> = (1..=6).map(|a| p.backoff(a, 0.5).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1000, 1000]);
    }

    proptest! {
        #[test]
        fn backoff_within_bounds(attempt in 1u32..200, unit in 0.0f64..1.0,
                                 init_ms in 1u64..10_000, cap_extra in 0u64..100_000,
                                 mult in 1.0f64..5.0, jitter in 0.0f64..=1.0) {
            let p = RetryPolicy {
                max_attempts: 10,
                initial_delay: Duration::from_millis(init_ms),
                max_delay: Duration::from_millis(init_ms + cap_extra),
                multiplier: mult,
                jitter,
            };
            let d = p.backoff(attempt, unit);
            prop_assert!(d <= p.max_delay);
            prop_assert!(d.as_secs_f64() >= p.base_delay(attempt).as_secs_f64() * (1.0 - jitter) - 1e-9);
            prop_assert!(p.base_delay(attempt) <= p.base_delay(attempt + 1));
        }
    }
}
