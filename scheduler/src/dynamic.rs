//! Dynamic schedules: [`ScheduleDef`]s stored as JSON in `TASKMESH_SCHEDULES`, one key per
//! schedule name, added and changed at run time (`taskmesh schedules add|remove|pause|…`)
//! and watched live by every scheduler replica.
//!
//! Writers validate with [`Schedule::compile`] before storing; the scheduler validates
//! again when it reads (another writer may not have), logs an invalid one and skips it.

use bytes::Bytes;
use futures::StreamExt;
use taskmesh_nats::async_nats::jetstream::{self, kv};
use taskmesh_shared::schedule::ScheduleDef;
use taskmesh_shared::wire;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::SchedulerError;
use crate::spec::Schedule;

/// One stored dynamic schedule as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSchedule {
    /// The key (the schedule's name).
    pub name: String,
    /// The KV revision.
    pub revision: u64,
    /// The definition, or why it cannot be used.
    pub def: Result<ScheduleDef, String>,
}

/// The `TASKMESH_SCHEDULES` bucket.
#[derive(Debug, Clone)]
pub struct DynamicSchedules {
    kv: kv::Store,
}

/// A change seen by the watcher.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum DynamicEvent {
    /// Added or changed.
    Put(StoredSchedule),
    /// Removed.
    Delete(String),
    /// Every schedule stored when the watch started has been sent (sent once).
    Ready,
}

/// Parses and checks a stored value: valid JSON, a known shape, the key matching the
/// name, and a definition that compiles.
fn decode(name: &str, value: &[u8]) -> Result<ScheduleDef, String> {
    let def: ScheduleDef =
        serde_json::from_slice(value).map_err(|e| format!("not a schedule definition: {e}"))?;
    if def.name != name {
        return Err(format!(
            "key {name:?} holds a schedule named {:?}; the key must be the name",
            def.name
        ));
    }
    Schedule::compile(&def).map_err(|e| e.to_string())?;
    Ok(def)
}

impl DynamicSchedules {
    /// Opens `TASKMESH_SCHEDULES` ("run `taskmesh provision`" when missing).
    pub async fn open(js: &jetstream::Context) -> Result<Self, SchedulerError> {
        Ok(Self {
            kv: taskmesh_nats::topology::bucket(js, wire::SCHEDULES_BUCKET).await?,
        })
    }

    /// Every stored schedule, by name.
    pub async fn list(&self) -> Result<Vec<StoredSchedule>, SchedulerError> {
        let op = "listing dynamic schedules";
        let mut keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(|e| SchedulerError::kv(op, e))?
            .filter_map(|k| async move { k.ok() })
            .collect()
            .await;
        keys.sort();
        let mut out = Vec::with_capacity(keys.len());
        for name in keys {
            if let Some(s) = self.get(&name).await? {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// One stored schedule; `None` when absent.
    pub async fn get(&self, name: &str) -> Result<Option<StoredSchedule>, SchedulerError> {
        let entry = self
            .kv
            .entry(name)
            .await
            .map_err(|e| SchedulerError::kv(format!("reading schedule {name:?}"), e))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| StoredSchedule {
                name: name.to_owned(),
                revision: e.revision,
                def: decode(name, &e.value),
            }))
    }

    /// Validates and stores `def`. Without `replace`, refuses a name that exists.
    /// Returns the new revision.
    pub async fn add(&self, def: &ScheduleDef, replace: bool) -> Result<u64, SchedulerError> {
        Schedule::compile(def)?;
        let value = Bytes::from(
            serde_json::to_vec(def)
                .map_err(|e| SchedulerError::kv(format!("encoding schedule {:?}", def.name), e))?,
        );
        let op = || format!("storing schedule {:?}", def.name);
        if replace {
            self.kv
                .put(&def.name, value)
                .await
                .map_err(|e| SchedulerError::kv(op(), e))
        } else {
            self.kv.create(&def.name, value).await.map_err(|e| {
                if e.kind() == kv::CreateErrorKind::AlreadyExists {
                    SchedulerError::Exists(def.name.clone())
                } else {
                    SchedulerError::kv(op(), e)
                }
            })
        }
    }

    /// Removes a schedule. Errors with [`SchedulerError::NotFound`] when absent.
    pub async fn remove(&self, name: &str) -> Result<(), SchedulerError> {
        let Some(current) = self.get(name).await? else {
            return Err(SchedulerError::NotFound(name.to_owned()));
        };
        self.kv
            .delete_expect_revision(name, Some(current.revision))
            .await
            .map_err(|e| SchedulerError::kv(format!("removing schedule {name:?}"), e))
    }

    /// Pauses (`false`) or resumes (`true`) a schedule, compare-and-set on its revision.
    /// Returns whether anything changed.
    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<bool, SchedulerError> {
        let Some(current) = self.get(name).await? else {
            return Err(SchedulerError::NotFound(name.to_owned()));
        };
        let mut def = current.def.map_err(|reason| {
            SchedulerError::kv(
                format!("reading schedule {name:?}"),
                format!("{reason}; fix it with `taskmesh schedules add --replace`"),
            )
        })?;
        if def.enabled == enabled {
            return Ok(false);
        }
        def.enabled = enabled;
        let value = Bytes::from(
            serde_json::to_vec(&def)
                .map_err(|e| SchedulerError::kv(format!("encoding schedule {name:?}"), e))?,
        );
        self.kv
            .update(name, value, current.revision)
            .await
            .map_err(|e| {
                if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                    SchedulerError::Conflict(name.to_owned())
                } else {
                    SchedulerError::kv(format!("updating schedule {name:?}"), e)
                }
            })?;
        Ok(true)
    }

    /// Sends every current schedule, then [`DynamicEvent::Ready`], then every change,
    /// until `stop`. Reconnects after a watcher error from the last revision seen, so no
    /// change is lost.
    pub(crate) async fn watch(self, tx: mpsc::Sender<DynamicEvent>, stop: CancellationToken) {
        let mut last: Option<u64> = None;
        let mut ready = false;
        loop {
            let watch = match last {
                None => self.kv.watch_with_history(">").await,
                Some(rev) => self.kv.watch_all_from_revision(rev + 1).await,
            };
            if watch.is_ok() && !ready {
                // An empty bucket delivers nothing, so there is no last entry to wait for.
                let mut stream = self.kv.stream.clone();
                if stream.info().await.is_ok_and(|i| i.state.messages == 0) {
                    ready = true;
                    if tx.send(DynamicEvent::Ready).await.is_err() {
                        return;
                    }
                }
            }
            match watch {
                Ok(mut watch) => loop {
                    let item = tokio::select! {
                        () = stop.cancelled() => return,
                        item = watch.next() => item,
                    };
                    match item {
                        Some(Ok(entry)) => {
                            last = Some(entry.revision);
                            let entry_delta = entry.delta;
                            let event = match entry.operation {
                                kv::Operation::Put => DynamicEvent::Put(StoredSchedule {
                                    def: decode(&entry.key, &entry.value),
                                    name: entry.key,
                                    revision: entry.revision,
                                }),
                                kv::Operation::Delete | kv::Operation::Purge => {
                                    DynamicEvent::Delete(entry.key)
                                }
                            };
                            if tx.send(event).await.is_err() {
                                return;
                            }
                            if !ready && entry_delta == 0 {
                                ready = true;
                                if tx.send(DynamicEvent::Ready).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "dynamic schedule watch failed; reconnecting");
                            break;
                        }
                        None => break,
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch dynamic schedules; retrying");
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_are_checked() {
        let def = ScheduleDef::new_every("poll", "sync.poll", "10s");
        let json = serde_json::to_vec(&def).unwrap();
        assert_eq!(decode("poll", &json), Ok(def));
        assert!(
            decode("other", &json)
                .unwrap_err()
                .contains("key \"other\"")
        );
        assert!(decode("poll", b"{").unwrap_err().contains("not a schedule"));
        let bad = ScheduleDef::new_cron("poll", "sync.poll", "61 * * * *");
        let err = decode("poll", &serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(err.contains("invalid cron"), "{err}");
    }
}
