//! NATS state the catalog keeps for its tasks: the buckets it owns and follow-up enqueues.
//! The only catalog module that touches async-nats types (through `taskmesh_nats`).
//!
//! The catalog's buckets are task data, not part of the mesh's topology, so they are
//! created on first use (get, else create) with the settings below; a least-privilege
//! deployment can create them ahead with `nats kv add` / `nats object add` instead.
//!
//! | bucket | kind | written by | keys |
//! |---|---|---|---|
//! | `TASKMESH_EMAIL_LEDGER` | KV, max age 7 days | `email.send` | task id → `{"state": "sending"\|"sent", …}` |
//! | `TASKMESH_CALENDAR` | KV | `sync.calendar_events` | `feed.<feed>` (ETag, known events), `event.<feed>.<event>` |
//! | `TASKMESH_NOTION` | KV | `sync.notion_pages` | `page.<page id>`, `cursor.<database id>` |
//! | `TASKMESH_CATALOG_STATE` | KV | `maintenance.system_health_check` | `health` (last DLQ size) |
//! | `TASKMESH_FILES` (configurable) | Object Store | `file.sync_cloud_storage` | relative file path |

use std::time::Duration;

use serde::Serialize;
use taskmesh_nats::async_nats::jetstream::{self, kv, object_store};
use taskmesh_nats::{Client, Connection, EnqueueOptions};
use taskmesh_shared::{Config, TaskError, TaskId, TaskName};

/// KV bucket of `email.send`'s delivery ledger.
pub const EMAIL_LEDGER_BUCKET: &str = taskmesh_shared::wire::EMAIL_LEDGER_BUCKET;
/// How long ledger entries are kept (longer than any retry sequence).
pub const EMAIL_LEDGER_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// KV bucket of synchronized calendar events.
pub const CALENDAR_BUCKET: &str = taskmesh_shared::wire::CALENDAR_BUCKET;
/// KV bucket of synchronized Notion pages.
pub const NOTION_BUCKET: &str = taskmesh_shared::wire::NOTION_BUCKET;
/// KV bucket of small catalog state (the health check's previous observation).
pub const CATALOG_STATE_BUCKET: &str = taskmesh_shared::wire::CATALOG_STATE_BUCKET;

/// A NATS failure while a task runs: retryable (the broker may be back soon).
pub fn nats_error(what: &str, e: impl std::fmt::Display) -> TaskError {
    TaskError::retryable(format!("{what}: {e}"))
}

/// Opens a KV bucket, creating it (file storage, replicas from config) when missing.
pub async fn kv_bucket(
    conn: &Connection,
    cfg: &Config,
    name: &str,
    max_age: Duration,
) -> Result<kv::Store, TaskError> {
    if let Ok(s) = conn.js.get_key_value(name).await {
        return Ok(s);
    }
    match conn
        .js
        .create_key_value(kv::Config {
            bucket: name.into(),
            description: format!("taskmesh catalog: {name}"),
            history: 1,
            max_age,
            storage: jetstream::stream::StorageType::File,
            num_replicas: cfg.streams.replicas,
            ..Default::default()
        })
        .await
    {
        Ok(s) => Ok(s),
        // Another worker may have created it in between.
        Err(e) => conn
            .js
            .get_key_value(name)
            .await
            .map_err(|_| nats_error(&format!("cannot open or create bucket {name}"), e)),
    }
}

/// Opens an Object Store bucket, creating it when missing.
pub async fn object_bucket(
    conn: &Connection,
    cfg: &Config,
    name: &str,
) -> Result<object_store::ObjectStore, TaskError> {
    if let Ok(s) = conn.js.get_object_store(name).await {
        return Ok(s);
    }
    match conn
        .js
        .create_object_store(object_store::Config {
            bucket: name.into(),
            description: Some("taskmesh file.sync_cloud_storage".into()),
            storage: jetstream::stream::StorageType::File,
            num_replicas: cfg.streams.replicas,
            ..Default::default()
        })
        .await
    {
        Ok(s) => Ok(s),
        Err(e) => conn
            .js
            .get_object_store(name)
            .await
            .map_err(|_| nats_error(&format!("cannot open or create object store {name}"), e)),
    }
}

/// Enqueues a follow-up task with a fixed id, so a redelivered parent enqueues it once
/// (JetStream drops the duplicate inside the duplicate window, and the follow-up's own
/// idempotency covers the rest). Returns whether it was a duplicate.
pub async fn enqueue_follow_up<A: Serialize + ?Sized>(
    conn: &Connection,
    cfg: &Config,
    task: &str,
    args: &A,
    id: &str,
) -> Result<bool, TaskError> {
    let task = TaskName::parse(task).map_err(|e| TaskError::permanent(e.to_string()))?;
    let id = TaskId::new(id).map_err(|e| TaskError::permanent(e.to_string()))?;
    let client = Client::new(conn.clone(), cfg)
        .await
        .map_err(|e| nats_error("opening the producer", e))?;
    let done = client
        .enqueue(&task, args, EnqueueOptions::default().id(id))
        .await
        .map_err(|e| nats_error(&format!("enqueuing {task}"), e))?;
    Ok(done.duplicate)
}

/// Every record in `TASKMESH_RESULTS` (the latest value of each key).
pub async fn all_results(conn: &Connection) -> Result<Vec<taskmesh_shared::TaskRecord>, TaskError> {
    use futures::StreamExt;
    let rs = taskmesh_nats::ResultStore::open(&conn.js)
        .await
        .map_err(|e| nats_error("opening the result bucket", e))?;
    let kv = rs.store();
    let status = kv
        .status()
        .await
        .map_err(|e| nats_error("reading the result bucket", e))?;
    let mut out = Vec::new();
    if status.values() == 0 {
        return Ok(out);
    }
    let mut w = kv
        .watch_with_history(">")
        .await
        .map_err(|e| nats_error("reading the result bucket", e))?;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
            Ok(Some(Ok(e))) => {
                if e.operation == kv::Operation::Put {
                    match serde_json::from_slice(&e.value) {
                        Ok(r) => out.push(r),
                        Err(err) => {
                            tracing::debug!(key = %e.key, error = %err, "skipping unreadable result")
                        }
                    }
                }
                if e.delta == 0 {
                    break;
                }
            }
            Ok(Some(Err(e))) => return Err(nats_error("reading the result bucket", e)),
            Ok(None) | Err(_) => break,
        }
    }
    Ok(out)
}
