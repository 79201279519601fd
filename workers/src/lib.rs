//! # taskmesh-workers
//!
//! The one worker runtime and the built-in task catalog.
//!
//! - [`registry`]: typed handlers registered by name with a [`TaskPolicy`] (retry, time
//!   limit, result storage) — per-task behaviour is data;
//! - [`runtime`]: the [`Worker`]: one consume loop per category, pulling only for free
//!   slots, processing each delivery through one path that ends in
//!   `taskmesh_nats::Delivery::settle`; graceful drain;
//! - [`breaker`]: circuit breakers keyed by dependency;
//! - [`stats`]: counters for metrics, health and heartbeats;
//! - [`catalog`]: the built-in tasks, one module per category.
//!
//! ```no_run
//! # async fn demo(conn: taskmesh_nats::Connection) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use taskmesh_shared::{Config, TaskError};
//! use taskmesh_workers::{Registry, TaskPolicy, Worker, WorkerOptions};
//!
//! #[derive(serde::Deserialize)]
//! struct Greet { name: String }
//!
//! let mut registry = Registry::new();
//! registry.register("email.greet", TaskPolicy::default(), |_ctx, a: Greet| async move {
//!     if a.name.is_empty() {
//!         return Err(TaskError::permanent("name must not be empty"));
//!     }
//!     Ok(format!("hello {}", a.name))
//! })?;
//! let worker = Worker::new(conn, Arc::new(Config::default()), Arc::new(registry), WorkerOptions::default()).await?;
//! worker.run(tokio_util::sync::CancellationToken::new()).await?;
//! # Ok(()) }
//! ```

pub mod breaker;
pub mod catalog;
pub mod registry;
pub mod runtime;
pub mod stats;

pub use registry::{NoArgs, Registry, TaskContext, TaskPolicy};
pub use runtime::{Worker, WorkerError, WorkerOptions};
pub use stats::Stats;
