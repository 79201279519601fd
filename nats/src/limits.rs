//! Rate limits shared by every worker process, held in `TASKMESH_LIMITS`.
//!
//! A limiter is a generic cell rate algorithm on one KV key: the value is the next free
//! slot (Unix nanoseconds). Taking a slot is a compare-and-set of `max(now, next) +
//! interval`, so permits are spaced evenly across all replicas (no bursts at window edges)
//! and every one-second window sees the configured rate. Processes must have roughly
//! synchronized clocks (NTP); skew shifts slots by the skew, it does not multiply them.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use chrono::Utc;
use taskmesh_shared::config::Rate;
use taskmesh_shared::wire;

use crate::error::NatsError;
use crate::topology;

/// Handle to the shared limiter bucket.
#[derive(Debug, Clone)]
pub struct Limits {
    kv: kv::Store,
}

impl Limits {
    /// Opens the bucket.
    pub async fn open(js: &jetstream::Context) -> Result<Self, NatsError> {
        Ok(Self {
            kv: topology::bucket(js, wire::LIMITS_BUCKET).await?,
        })
    }

    /// Reserves the next slot of limiter `name` at `rate`; returns how long to wait for it
    /// (zero when it is free now).
    pub async fn reserve(&self, name: &str, rate: Rate) -> Result<Duration, NatsError> {
        let interval = i64::try_from(rate.interval().as_nanos()).unwrap_or(i64::MAX);
        for _ in 0..64 {
            let now = Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
            let entry = self
                .kv
                .entry(name)
                .await
                .map_err(|e| NatsError::js(format!("reading limiter {name}"), e))?;
            let (next, revision) = match &entry {
                Some(e) if e.operation == kv::Operation::Put => (
                    std::str::from_utf8(&e.value)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok())
                        .unwrap_or(now),
                    Some(e.revision),
                ),
                Some(e) => (now, Some(e.revision)),
                None => (now, None),
            };
            let slot = next.max(now);
            let value = bytes::Bytes::from(slot.saturating_add(interval).to_string());
            let written = match revision {
                Some(r) => self
                    .kv
                    .update(name, value, r)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.kind() == kv::UpdateErrorKind::WrongLastRevision),
                None => self
                    .kv
                    .create(name, value)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.kind() == kv::CreateErrorKind::AlreadyExists),
            };
            match written {
                Ok(()) => {
                    let wait = u64::try_from(slot - now).unwrap_or(0);
                    return Ok(Duration::from_nanos(wait));
                }
                Err(true) => continue, // another replica took the slot: read again
                Err(false) => {
                    return Err(NatsError::Corrupt {
                        what: format!("limiter {name}"),
                        message: "cannot update the limiter key".into(),
                    });
                }
            }
        }
        Err(NatsError::Timeout(
            Duration::ZERO,
            format!("a slot of limiter {name} (contention)"),
        ))
    }
}
