//! The scheduler's error type: what failed, why, and what to do next.

use taskmesh_nats::NatsError;

use crate::spec::ScheduleError;

/// A scheduler failure. Messages are lower case and say what to do next.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchedulerError {
    /// A schedule definition was refused (its name and the reason are in the message).
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// Two schedules share a name.
    #[error(
        "duplicate schedule name {0:?}: schedule names must be unique across [[schedules]] and the default set; rename one, or set scheduler.default_schedules = false"
    )]
    DuplicateName(String),
    /// The scheduler settings cannot work (for example the lease bucket has no max age).
    #[error("invalid scheduler settings: {0}")]
    Config(String),
    /// Talking to NATS failed.
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// A KV operation failed.
    #[error("{op}: {message}")]
    Kv {
        /// What was being done (`reading cursor of schedule "x"`).
        op: String,
        /// The client's error.
        message: String,
    },
    /// A dynamic schedule does not exist.
    #[error("schedule {0:?} not found: `taskmesh schedules list` shows the schedules that exist")]
    NotFound(String),
    /// A verb that changes dynamic schedules was used on a static one.
    #[error(
        "schedule {0:?} is a static schedule from the config file: change it in [[schedules]] there (or scheduler.default_schedules) and restart the scheduler"
    )]
    Static(String),
    /// `add` without `--replace` found a schedule of that name.
    #[error(
        "schedule {0:?} already exists: pass --replace to overwrite it, or choose another name"
    )]
    Exists(String),
    /// A bug or an impossible state (a background task died).
    #[error("scheduler internal error: {0}")]
    Internal(String),
    /// A stored value was changed by someone else between read and write.
    #[error("schedule {0:?} was changed concurrently: run the command again")]
    Conflict(String),
}

impl SchedulerError {
    pub(crate) fn kv(op: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Self::Kv {
            op: op.into(),
            message: e.to_string(),
        }
    }
}
