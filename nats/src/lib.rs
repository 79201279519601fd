//! # taskmesh-nats
//!
//! The only taskmesh crate that talks to NATS (async-nats). Everything above it sees
//! taskmesh types, never raw subjects:
//!
//! - [`connect`]: a connection from config (user/password, token, nkey, creds, TLS, own
//!   inbox prefix) with live [`ConnectionState`] for health checks;
//! - [`topology`]: streams, consumers and buckets as code; [`provision`];
//! - [`publish`]: the producer [`Client`] (`enqueue`, pipelined `send`, delayed tasks,
//!   `wait` for a result);
//! - [`delivery`]: a delivered message and [`Delivery::settle`], the one place where a
//!   decision becomes `Ack`, `Nak(delay)` or DLQ-copy-then-`Term`;
//! - [`trace`]: W3C trace context in headers, the one place it is injected and extracted;
//! - [`results`], [`heartbeats`], [`cancels`], [`limits`]: the result, worker, cancel and
//!   shared rate-limit buckets.

pub mod admin;
pub mod cancels;
pub mod connect;
pub mod delivery;
pub mod error;
pub mod heartbeats;
pub mod limits;
pub mod publish;
pub mod results;
pub mod topology;
pub mod trace;

pub use async_nats;
pub use cancels::Cancels;
pub use connect::{Connection, ConnectionState, connect};
pub use delivery::{Delivery, DeliveryMeta};
pub use error::NatsError;
pub use heartbeats::Heartbeats;
pub use limits::Limits;
pub use publish::{Client, EnqueueOptions, Enqueued, PendingEnqueue};
pub use results::ResultStore;
pub use topology::provision;
