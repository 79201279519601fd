//! Cancel requests in `TASKMESH_CANCELS` (key = task id). `taskmesh cancel` writes one;
//! workers watch the bucket, skip queued tasks that are cancelled and fire the cancellation
//! token of running ones.

use async_nats::jetstream::{self, kv};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use taskmesh_shared::{TaskId, wire};

use crate::error::NatsError;
use crate::topology;

/// One cancel request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    /// When it was asked for.
    pub requested_at: DateTime<Utc>,
    /// Why (free text).
    pub reason: String,
}

/// Handle to the cancel bucket.
#[derive(Debug, Clone)]
pub struct Cancels {
    kv: kv::Store,
}

impl Cancels {
    /// Opens the bucket.
    pub async fn open(js: &jetstream::Context) -> Result<Self, NatsError> {
        Ok(Self {
            kv: topology::bucket(js, wire::CANCELS_BUCKET).await?,
        })
    }

    /// Requests cancellation of a task.
    pub async fn request(&self, id: &TaskId, reason: &str) -> Result<(), NatsError> {
        let body = serde_json::to_vec(&CancelRequest {
            requested_at: Utc::now(),
            reason: reason.to_owned(),
        })?;
        self.kv
            .put(id.as_str(), body.into())
            .await
            .map_err(|e| NatsError::js(format!("requesting cancel of {id}"), e))?;
        Ok(())
    }

    /// Every task id with a cancel request: the existing ones first, then new ones as they
    /// come.
    pub async fn watch(&self) -> Result<impl Stream<Item = String> + use<>, NatsError> {
        let w = self
            .kv
            .watch_with_history(">")
            .await
            .map_err(|e| NatsError::js("watching cancel requests", e))?;
        Ok(w.filter_map(|e| async move {
            match e {
                Ok(entry) if entry.operation == kv::Operation::Put => Some(entry.key),
                _ => None,
            }
        }))
    }
}
