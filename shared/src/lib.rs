//! # taskmesh-shared
//!
//! The vocabulary every taskmesh crate speaks, with no network I/O:
//!
//! - [`names`]: validated [`Category`], [`TaskName`], [`TaskId`] and priority [`Lane`];
//! - [`wire`]: the wire contract — every subject, stream, consumer, header and bucket name
//!   (the only place `tasks.…` is formatted);
//! - [`outcome`]: [`TaskError`] (what a handler says should happen next), [`Outcome`] and
//!   [`decide`], the one pure mapping from outcome to ack decision;
//! - [`retry`]: [`RetryPolicy`], exponential backoff with jitter;
//! - [`record`]: the result record and worker heartbeat JSON;
//! - [`config`]: the TOML configuration with defaults for the five seed categories;
//! - [`schedule`]: the raw schedule definition and the default schedule set;
//! - [`crypto`]: authenticated encryption of task bodies for chosen categories;
//! - [`clock`]: an injectable wall clock.

pub mod clock;
pub mod config;
pub mod crypto;
pub mod names;
pub mod outcome;
pub mod record;
pub mod retry;
pub mod schedule;
pub mod wire;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{CategoryConfig, Config, ConfigError};
pub use names::{Category, Lane, NameError, TaskId, TaskName};
pub use outcome::{DeadReason, Decision, Outcome, TaskError, decide};
pub use record::{ErrorInfo, TaskRecord, TaskState, WorkerHeartbeat};
pub use retry::RetryPolicy;
pub use schedule::ScheduleDef;
