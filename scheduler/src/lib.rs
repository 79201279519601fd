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
//!
//! Invariants: slots depend only on the schedule definition, never on when a replica
//! started, so every replica computes the same slots and the same fire ids; JetStream's
//! duplicate window turns a double fire during a leader overlap into one task.

pub mod spec;

pub use spec::{Schedule, ScheduleError};
