//! An injectable wall clock, so time-dependent logic (deadlines, schedules) is testable
//! without sleeping. Monotonic durations use `tokio::time::Instant` in the async crates,
//! which tests can pause and advance.

use std::fmt::Debug;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};

/// A source of wall-clock time.
pub trait Clock: Send + Sync + Debug {
    /// The current UTC time.
    fn now(&self) -> DateTime<Utc>;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    /// A clock stopped at `t`.
    pub fn new(t: DateTime<Utc>) -> Self {
        Self(Mutex::new(t))
    }
    /// Sets the time.
    pub fn set(&self, t: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }
    /// Moves the time by `d` (may be negative).
    pub fn advance(&self, d: Duration) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *g += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The system clock shifted by an offset and run at a rate (fault tests: skew, jumps, 2×).
#[derive(Debug)]
pub struct SkewedClock {
    origin: DateTime<Utc>,
    state: Mutex<(Duration, f64)>,
}

impl SkewedClock {
    /// Starts with offset `offset` and rate `rate` (1.0 = real time).
    pub fn new(offset: Duration, rate: f64) -> Self {
        Self {
            origin: Utc::now(),
            state: Mutex::new((offset, rate)),
        }
    }
    /// Jumps the clock by `d`.
    pub fn jump(&self, d: Duration) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0 += d;
    }
}

impl Clock for SkewedClock {
    fn now(&self) -> DateTime<Utc> {
        let (offset, rate) = *self.state.lock().unwrap_or_else(|p| p.into_inner());
        let real = Utc::now() - self.origin;
        let scaled = Duration::microseconds(
            (real.num_microseconds().unwrap_or(i64::MAX) as f64 * rate) as i64,
        );
        self.origin + scaled + offset
    }
}
