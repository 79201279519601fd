//! Worker heartbeats in `TASKMESH_WORKERS` (key = worker id; the bucket's max age expires
//! the entry of a worker that stopped beating).

use async_nats::jetstream::{self, kv};
use futures::TryStreamExt;
use taskmesh_shared::{WorkerHeartbeat, wire};

use crate::error::NatsError;
use crate::topology;

/// Reads and writes worker heartbeats.
#[derive(Debug, Clone)]
pub struct Heartbeats {
    kv: kv::Store,
}

impl Heartbeats {
    /// Opens the bucket.
    pub async fn open(js: &jetstream::Context) -> Result<Self, NatsError> {
        Ok(Self {
            kv: topology::bucket(js, wire::WORKERS_BUCKET).await?,
        })
    }

    /// Publishes one beat.
    pub async fn beat(&self, hb: &WorkerHeartbeat) -> Result<(), NatsError> {
        let body = serde_json::to_vec(hb)?;
        self.kv
            .put(&hb.id, body.into())
            .await
            .map_err(|e| NatsError::js("writing worker heartbeat", e))?;
        Ok(())
    }

    /// Removes a worker (clean shutdown).
    pub async fn remove(&self, id: &str) -> Result<(), NatsError> {
        self.kv
            .purge(id)
            .await
            .map_err(|e| NatsError::js("removing worker heartbeat", e))
    }

    /// Every live worker.
    pub async fn list(&self) -> Result<Vec<WorkerHeartbeat>, NatsError> {
        let keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(|e| NatsError::js("listing workers", e))?
            .try_collect()
            .await
            .map_err(|e| NatsError::js("listing workers", e))?;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(v) = self
                .kv
                .get(&k)
                .await
                .map_err(|e| NatsError::js("reading worker heartbeat", e))?
            {
                match serde_json::from_slice(&v) {
                    Ok(hb) => out.push(hb),
                    Err(e) => {
                        tracing::warn!(worker = %k, error = %e, "skipping unreadable heartbeat")
                    }
                }
            }
        }
        Ok(out)
    }
}
