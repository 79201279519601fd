//! # taskmesh-scheduler
//!
//! The taskmesh scheduler replaces Celery Beat: it turns schedules (static `[[schedules]]`
//! from the config file, dynamic ones from the `TASKMESH_SCHEDULES` KV bucket) into tasks
//! published on `tasks.<category>.<name>`, one per slot, exactly once per slot even when
//! two replicas both think they lead.
//!
//! - [`spec`]: a [`ScheduleDef`](taskmesh_shared::schedule::ScheduleDef) compiled into a
//!   validated [`Schedule`]; pure time logic with no I/O — [`Schedule::next_fire`]
//!   (cron in an IANA time zone, DST-correct, or `every` aligned to the Unix epoch),
//!   [`Schedule::missed_slots`] (catch-up after a failover) and the fire ids
//!   ([`Schedule::fire_id`] for `Nats-Msg-Id`, [`Schedule::fire_task_id`] for `Task-Id`).
//! - [`lease`]: the leader lease in `TASKMESH_LEASES` — create, compare-and-set renewals,
//!   a trust window on the monotonic clock, resignation on shutdown. A state machine over
//!   the [`LeaseStore`](lease::LeaseStore) trait, tested with paused tokio time.
//! - [`runner`]: the [`Scheduler`] loop — a min-heap of next fires, pipelined publishes
//!   (`scheduler.publish_ahead` before the slot, as message schedules the server releases
//!   at the slot), cursor advance after each PubAck, catch-up on takeover, live dynamic
//!   schedules.
//! - [`cursor`]: per-schedule cursors in `TASKMESH_SCHEDULER` (a compare-and-set "max"
//!   register: cursors never move back).
//! - [`dynamic`]: the `TASKMESH_SCHEDULES` bucket (list, add, remove, pause, resume).
//! - [`metrics`]: counters for `/metrics` (fires, missed slots, lag, leadership).
//!
//! Invariants: slots depend only on the schedule definition, never on when a replica
//! started, so every replica computes the same slots and the same fire ids; JetStream's
//! duplicate window turns a double fire during a leader overlap into one task; a replica
//! publishes only inside the trust window of a lease it holds; a cursor only moves forward
//! and only past acknowledged fires. Subjects come from `taskmesh_shared::wire` and
//! publishing goes through [`taskmesh_nats::Client`]; this crate touches NATS directly
//! only through KV bucket handles opened by `taskmesh_nats::topology::bucket`.

pub mod cursor;
pub mod dynamic;
pub mod error;
pub mod lease;
pub mod metrics;
pub mod runner;
pub mod spec;

pub use error::SchedulerError;
pub use metrics::{MetricsSnapshot, SchedulerMetrics};
pub use runner::{Scheduler, SchedulerOptions, default_replica_id, static_schedules, trigger};
pub use spec::{Schedule, ScheduleError};
