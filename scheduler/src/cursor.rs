//! Per-schedule cursors in `TASKMESH_SCHEDULER`: key = schedule name, value = the last
//! fired slot as RFC 3339 (`2026-11-29T02:00:00Z`).
//!
//! A cursor only moves forward. [`Cursors::advance`] is a compare-and-set "max" register:
//! it reads the current revision, returns at once if the stored slot is already at or past
//! the new one, and otherwise writes with `update(key, value, revision)`, re-reading and
//! retrying when someone else wrote in between. So a stale leader that wakes up (SIGCONT)
//! and acknowledges an old publish can never move a cursor back, and two leaders in
//! overlap converge on the larger slot.

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use taskmesh_nats::async_nats::jetstream::{self, consumer, kv};
use taskmesh_shared::wire;

use crate::error::SchedulerError;

/// How many compare-and-set rounds [`Cursors::advance`] tries before giving up.
const CAS_ROUNDS: usize = 5;

/// The header the KV layer marks deletes and purges with.
const KV_OPERATION: &str = "KV-Operation";

/// A cursor as stored: its KV revision and the slot (`None` for a deleted key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorEntry {
    /// The key's revision (0 when the key never existed).
    pub revision: u64,
    /// The last fired slot.
    pub slot: Option<DateTime<Utc>>,
}

/// Formats a cursor value (a slot).
pub fn format_slot(slot: DateTime<Utc>) -> String {
    slot.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn parse_slot(bytes: &[u8]) -> Option<DateTime<Utc>> {
    let text = std::str::from_utf8(bytes).ok()?;
    DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.to_utc())
}

fn to_cursor(e: &kv::Entry) -> CursorEntry {
    let slot = match e.operation {
        kv::Operation::Put => {
            let slot = parse_slot(&e.value);
            if slot.is_none() {
                tracing::warn!(schedule = %e.key, "unreadable schedule cursor ignored");
            }
            slot
        }
        kv::Operation::Delete | kv::Operation::Purge => None,
    };
    CursorEntry {
        revision: e.revision,
        slot,
    }
}

/// The cursor bucket.
#[derive(Debug, Clone)]
pub struct Cursors {
    kv: kv::Store,
    client: taskmesh_nats::async_nats::Client,
}

impl Cursors {
    /// Opens `TASKMESH_SCHEDULER` ("run `taskmesh provision`" when missing).
    pub async fn open(js: &jetstream::Context) -> Result<Self, SchedulerError> {
        Ok(Self {
            kv: taskmesh_nats::topology::bucket(js, wire::SCHEDULER_BUCKET).await?,
            client: js.client(),
        })
    }

    /// One schedule's cursor; `None` when it never fired.
    pub async fn get(&self, name: &str) -> Result<Option<CursorEntry>, SchedulerError> {
        let entry = self.kv.entry(name).await.map_err(|e| {
            SchedulerError::kv(format!("reading the cursor of schedule {name:?}"), e)
        })?;
        Ok(entry.as_ref().map(to_cursor))
    }

    /// Every cursor: one ordered scan of the bucket's last value per key.
    pub async fn load_all(&self) -> Result<HashMap<String, CursorEntry>, SchedulerError> {
        let op = "reading schedule cursors";
        let consumer = self
            .kv
            .stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                description: Some("taskmesh scheduler cursor scan".into()),
                filter_subject: format!("{}>", self.kv.prefix),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                replay_policy: consumer::ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(|e| SchedulerError::kv(op, e))?;
        let mut out = HashMap::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(out);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| SchedulerError::kv(op, e))?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| SchedulerError::kv(op, e))?;
            let info = message.info().map_err(|e| SchedulerError::kv(op, e))?;
            let (pending, revision) = (info.pending, info.stream_sequence);
            if let Some(key) = message.subject.strip_prefix(self.kv.prefix.as_str()) {
                let deleted = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(KV_OPERATION))
                    .is_some_and(|op| op.as_str() != "PUT");
                let slot = if deleted {
                    None
                } else {
                    parse_slot(&message.payload)
                };
                out.insert(key.to_owned(), CursorEntry { revision, slot });
            }
            if pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// Moves `name`'s cursor to `slot` unless it is already there or later; returns what
    /// is stored afterwards. `known` is the caller's last view (saves a read).
    pub async fn advance(
        &self,
        name: &str,
        slot: DateTime<Utc>,
        mut known: Option<CursorEntry>,
    ) -> Result<CursorEntry, SchedulerError> {
        let op = || format!("advancing the cursor of schedule {name:?}");
        let value = format_slot(slot);
        for _ in 0..CAS_ROUNDS {
            let current = match known.take() {
                Some(k) => k,
                None => self.get(name).await?.unwrap_or(CursorEntry {
                    revision: 0,
                    slot: None,
                }),
            };
            if current.slot.is_some_and(|s| s >= slot) {
                return Ok(current);
            }
            match self
                .kv
                .update(name, value.clone().into(), current.revision)
                .await
            {
                Ok(revision) => {
                    return Ok(CursorEntry {
                        revision,
                        slot: Some(slot),
                    });
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(SchedulerError::kv(op(), e)),
            }
        }
        Err(SchedulerError::kv(
            op(),
            format!("still contended after {CAS_ROUNDS} compare-and-set rounds"),
        ))
    }

    /// Deletes a cursor (when its schedule is removed, so a new schedule of the same name
    /// starts afresh).
    pub async fn remove(&self, name: &str) -> Result<(), SchedulerError> {
        self.kv
            .purge(name)
            .await
            .map_err(|e| SchedulerError::kv(format!("removing the cursor of schedule {name:?}"), e))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn slots_round_trip_as_rfc3339() {
        let slot = DateTime::parse_from_rfc3339("2026-11-29T02:00:00Z")
            .unwrap()
            .to_utc();
        assert_eq!(format_slot(slot), "2026-11-29T02:00:00Z");
        assert_eq!(parse_slot(b"2026-11-29T02:00:00Z"), Some(slot));
        assert_eq!(parse_slot(b"2026-11-29T03:00:00+01:00"), Some(slot));
        assert_eq!(parse_slot(b"yesterday"), None);
    }
}
