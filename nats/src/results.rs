//! Result records in `TASKMESH_RESULTS` (key = task id).

use async_nats::jetstream::{self, kv};
use futures::{Stream, StreamExt};
use taskmesh_shared::{TaskId, TaskRecord, wire};

use crate::error::NatsError;
use crate::topology;

/// Reads and writes result records.
#[derive(Debug, Clone)]
pub struct ResultStore {
    kv: kv::Store,
}

impl ResultStore {
    /// Opens the bucket (it must be provisioned).
    pub async fn open(js: &jetstream::Context) -> Result<Self, NatsError> {
        Ok(Self {
            kv: topology::bucket(js, wire::RESULTS_BUCKET).await?,
        })
    }

    /// Writes a record (last writer wins).
    pub async fn put(&self, record: &TaskRecord) -> Result<(), NatsError> {
        let body = serde_json::to_vec(record)?;
        self.kv
            .put(&record.id, body.into())
            .await
            .map_err(|e| NatsError::js(format!("writing result of {}", record.id), e))?;
        Ok(())
    }

    /// Reads a record.
    pub async fn get(&self, id: &TaskId) -> Result<Option<TaskRecord>, NatsError> {
        let v = self
            .kv
            .get(id.as_str())
            .await
            .map_err(|e| NatsError::js(format!("reading result of {id}"), e))?;
        v.map(|b| decode(id.as_str(), &b)).transpose()
    }

    /// Streams every new version of one record.
    pub async fn watch(
        &self,
        id: &TaskId,
    ) -> Result<impl Stream<Item = Result<TaskRecord, NatsError>> + use<>, NatsError> {
        let w = self
            .kv
            .watch(id.as_str())
            .await
            .map_err(|e| NatsError::js(format!("watching result of {id}"), e))?;
        let key = id.as_str().to_owned();
        Ok(w.filter_map(move |e| {
            let key = key.clone();
            async move {
                match e {
                    Ok(entry) if entry.operation == kv::Operation::Put => {
                        Some(decode(&key, &entry.value))
                    }
                    Ok(_) => None,
                    Err(e) => Some(Err(NatsError::js(format!("watching result of {key}"), e))),
                }
            }
        }))
    }

    /// The underlying bucket.
    pub fn store(&self) -> &kv::Store {
        &self.kv
    }
}

fn decode(id: &str, b: &[u8]) -> Result<TaskRecord, NatsError> {
    serde_json::from_slice(b).map_err(|e| NatsError::Corrupt {
        what: format!("result record {id}"),
        message: e.to_string(),
    })
}
