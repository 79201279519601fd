//! What a task run produced, and the one pure function that maps it to an ack decision.
//!
//! Handlers never ack. They return `Result<Value, TaskError>`; the runtime turns that (or a
//! panic, an undecodable body, an unknown task, an expired deadline) into an [`Outcome`],
//! [`decide`] turns the outcome into a [`Decision`], and the NATS layer carries the decision
//! out. DESIGN.md § Delivery semantics is this table.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::retry::RetryPolicy;

/// A handler's failure, saying in its type what should happen next.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// Try again later (network blip, 5xx, lock held). `retry_after` overrides the backoff
    /// (for example an HTTP `Retry-After`).
    #[error("{message}")]
    Retryable {
        /// What failed.
        message: String,
        /// Wait at least this long before the next attempt.
        retry_after: Option<Duration>,
    },
    /// Will never succeed (bad arguments, missing resource): dead-lettered at once.
    #[error("{message}")]
    Permanent {
        /// What failed.
        message: String,
    },
}

impl TaskError {
    /// A retryable error.
    pub fn retryable(message: impl fmt::Display) -> Self {
        Self::Retryable {
            message: message.to_string(),
            retry_after: None,
        }
    }
    /// A retryable error that must wait at least `after`.
    pub fn retry_after(message: impl fmt::Display, after: Duration) -> Self {
        Self::Retryable {
            message: message.to_string(),
            retry_after: Some(after),
        }
    }
    /// A permanent error.
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self::Permanent {
            message: message.to_string(),
        }
    }
    /// Is this error worth another attempt?
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable { .. })
    }
}

/// Why a message went to the dead-letter stream (`Dlq-Reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeadReason {
    /// Retryable failures used up every attempt.
    MaxAttempts,
    /// The handler said it will never succeed.
    Permanent,
    /// The body could not be decoded (not UTF-8 JSON, too large, wrong shape).
    Undecodable,
    /// No handler is registered for the task.
    UnknownTask,
    /// `Task-Deadline` passed before the task started.
    Expired,
}

impl DeadReason {
    /// The wire value (`max_attempts`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxAttempts => "max_attempts",
            Self::Permanent => "permanent",
            Self::Undecodable => "undecodable",
            Self::UnknownTask => "unknown_task",
            Self::Expired => "expired",
        }
    }
    /// Parses the wire value.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "max_attempts" => Self::MaxAttempts,
            "permanent" => Self::Permanent,
            "undecodable" => Self::Undecodable,
            "unknown_task" => Self::UnknownTask,
            "expired" => Self::Expired,
            _ => return None,
        })
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one delivery of a task came to.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler returned a value.
    Succeeded(serde_json::Value),
    /// The handler returned an error.
    Failed(TaskError),
    /// The handler panicked (treated as retryable).
    Panicked(String),
    /// The handler ran past its hard time limit (treated as retryable).
    TimedOut(Duration),
    /// The body could not be decoded.
    Undecodable(String),
    /// No handler for this task name.
    UnknownTask(String),
    /// The deadline passed before the task started.
    Expired(String),
    /// Cancelled on request before or while it ran.
    Cancelled(String),
}

impl Outcome {
    /// The short kind used in result records and metrics (`error.kind`, `outcome` label).
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Succeeded(_) => "succeeded",
            Outcome::Failed(TaskError::Retryable { .. }) => "retryable",
            Outcome::Failed(TaskError::Permanent { .. }) => "permanent",
            Outcome::Panicked(_) => "panic",
            Outcome::TimedOut(_) => "timeout",
            Outcome::Undecodable(_) => "undecodable",
            Outcome::UnknownTask(_) => "unknown_task",
            Outcome::Expired(_) => "expired",
            Outcome::Cancelled(_) => "cancelled",
        }
    }
    /// The error text, if this is a failure.
    pub fn error_message(&self) -> Option<String> {
        match self {
            Outcome::Succeeded(_) => None,
            Outcome::Failed(e) => Some(e.to_string()),
            Outcome::Panicked(m) => Some(format!("handler panicked: {m}")),
            Outcome::TimedOut(d) => Some(format!("handler exceeded its time limit of {d:?}")),
            Outcome::Undecodable(m)
            | Outcome::UnknownTask(m)
            | Outcome::Expired(m)
            | Outcome::Cancelled(m) => Some(m.clone()),
        }
    }
}

/// What the runtime does with the delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Acknowledge: done.
    Ack,
    /// Negative-acknowledge with this redelivery delay (never zero for a failure).
    Retry {
        /// Delay before the redelivery.
        delay: Duration,
    },
    /// Terminate without a dead letter: the task was cancelled on request.
    Cancel,
    /// Copy to the DLQ, wait for its PubAck, then terminate the original.
    DeadLetter {
        /// `Dlq-Reason`.
        reason: DeadReason,
        /// `Dlq-Error`.
        error: String,
    },
}

/// Smallest delay a retry may have: a bare Nak redelivers at once and ignores backoff.
pub const MIN_RETRY_DELAY: Duration = Duration::from_millis(10);

/// Maps an outcome to a decision. `attempt` is 1-based (the delivery count);
/// `max_attempts` is the effective budget (already capped by `max_deliver`); `unit` is a
/// random number in `[0, 1)` for jitter.
pub fn decide(
    outcome: &Outcome,
    attempt: u32,
    max_attempts: u32,
    policy: &RetryPolicy,
    unit: f64,
) -> Decision {
    let retry = |retry_after: Option<Duration>, msg: String| {
        if attempt >= max_attempts {
            Decision::DeadLetter {
                reason: DeadReason::MaxAttempts,
                error: msg,
            }
        } else {
            let backoff = policy.backoff(attempt, unit);
            let delay = retry_after.map_or(backoff, |ra| ra.max(backoff.min(ra)));
            Decision::Retry {
                delay: delay.max(MIN_RETRY_DELAY),
            }
        }
    };
    let msg = || outcome.error_message().unwrap_or_default();
    match outcome {
        Outcome::Succeeded(_) => Decision::Ack,
        Outcome::Failed(TaskError::Retryable { retry_after, .. }) => retry(*retry_after, msg()),
        Outcome::Panicked(_) | Outcome::TimedOut(_) => retry(None, msg()),
        Outcome::Failed(TaskError::Permanent { .. }) => Decision::DeadLetter {
            reason: DeadReason::Permanent,
            error: msg(),
        },
        Outcome::Undecodable(_) => Decision::DeadLetter {
            reason: DeadReason::Undecodable,
            error: msg(),
        },
        Outcome::UnknownTask(_) => Decision::DeadLetter {
            reason: DeadReason::UnknownTask,
            error: msg(),
        },
        Outcome::Expired(_) => Decision::DeadLetter {
            reason: DeadReason::Expired,
            error: msg(),
        },
        Outcome::Cancelled(_) => Decision::Cancel,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.0,
        }
    }

    #[test]
    fn the_delivery_table() {
        use Decision::*;
        let retryable = Outcome::Failed(TaskError::retryable("down"));
        let cases: Vec<(Outcome, u32, Decision)> = vec![
            (Outcome::Succeeded(serde_json::json!(1)), 1, Ack),
            (
                retryable.clone(),
                1,
                Retry {
                    delay: Duration::from_secs(1),
                },
            ),
            (
                retryable.clone(),
                2,
                Retry {
                    delay: Duration::from_secs(2),
                },
            ),
            (
                retryable.clone(),
                3,
                DeadLetter {
                    reason: DeadReason::MaxAttempts,
                    error: "down".into(),
                },
            ),
            (
                retryable.clone(),
                7,
                DeadLetter {
                    reason: DeadReason::MaxAttempts,
                    error: "down".into(),
                },
            ),
            (
                Outcome::Panicked("boom".into()),
                1,
                Retry {
                    delay: Duration::from_secs(1),
                },
            ),
            (
                Outcome::Failed(TaskError::permanent("bad arg")),
                1,
                DeadLetter {
                    reason: DeadReason::Permanent,
                    error: "bad arg".into(),
                },
            ),
            (
                Outcome::Undecodable("not json".into()),
                1,
                DeadLetter {
                    reason: DeadReason::Undecodable,
                    error: "not json".into(),
                },
            ),
            (
                Outcome::UnknownTask("no handler".into()),
                1,
                DeadLetter {
                    reason: DeadReason::UnknownTask,
                    error: "no handler".into(),
                },
            ),
            (
                Outcome::Expired("late".into()),
                1,
                DeadLetter {
                    reason: DeadReason::Expired,
                    error: "late".into(),
                },
            ),
        ];
        for (outcome, attempt, want) in cases {
            assert_eq!(
                decide(&outcome, attempt, 3, &p(), 0.0),
                want,
                "{outcome:?} #{attempt}"
            );
        }
    }

    #[test]
    fn retry_after_is_honoured_and_never_zero() {
        let o = Outcome::Failed(TaskError::retry_after("429", Duration::from_secs(30)));
        assert_eq!(
            decide(&o, 1, 3, &p(), 0.0),
            Decision::Retry {
                delay: Duration::from_secs(30)
            }
        );
        let zero = RetryPolicy {
            initial_delay: Duration::ZERO,
            ..p()
        };
        let o = Outcome::Failed(TaskError::retryable("x"));
        assert_eq!(
            decide(&o, 1, 3, &zero, 0.0),
            Decision::Retry {
                delay: MIN_RETRY_DELAY
            }
        );
    }

    #[test]
    fn reasons_round_trip() {
        for r in [
            DeadReason::MaxAttempts,
            DeadReason::Permanent,
            DeadReason::Undecodable,
            DeadReason::UnknownTask,
            DeadReason::Expired,
        ] {
            assert_eq!(DeadReason::parse(r.as_str()), Some(r));
        }
    }
}
