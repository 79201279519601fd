//! The producer API: enqueue tasks with pipelined PubAcks, read and wait for results.

use std::time::Duration;

use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use serde::Serialize;
use taskmesh_shared::crypto::Keyring;
use taskmesh_shared::wire::{self, headers as h};
use taskmesh_shared::{Config, Lane, TaskId, TaskName, TaskRecord};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::connect::Connection;
use crate::error::NatsError;
use crate::results::ResultStore;
use crate::topology;

/// Options of one enqueue. `Default` is: generated UUIDv7 id, normal lane, no deadline,
/// the category's attempt budget, run as soon as possible.
#[derive(Debug, Clone, Default)]
pub struct EnqueueOptions {
    /// Task id (idempotency key); generated when `None`.
    pub id: Option<TaskId>,
    /// Dead-letter the task unrun (`expired`) if it has not started by then.
    pub deadline: Option<DateTime<Utc>>,
    /// Attempt budget for this task (never above the consumer's `max_deliver`).
    pub max_attempts: Option<u32>,
    /// Priority lane.
    pub lane: Lane,
    /// Run no earlier than this instant (a JetStream message schedule holds it until then).
    pub run_at: Option<DateTime<Utc>>,
    /// Extra headers (for example `traceparent`); names are case-sensitive.
    pub headers: Vec<(String, String)>,
    /// A `Nats-Msg-Id` different from the task id. The scheduler uses
    /// `<schedule>@<slot RFC 3339>` here (not a valid KV key, hence not a task id).
    pub msg_id: Option<String>,
    /// Refuse this enqueue while an equal one is inside its window (beyond the stream's
    /// duplicate window, which only catches equal ids).
    pub unique: Option<Unique>,
}

/// A uniqueness window: a second enqueue with the same key inside `window` is refused with
/// the first task's id ([`NatsError::NotUnique`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unique {
    /// How long the key stays taken (whole seconds, at least 1 s).
    pub window: Duration,
    /// The key; default: the task name and a SHA-256 of the arguments.
    pub key: Option<String>,
}

impl EnqueueOptions {
    /// Sets the id.
    pub fn id(mut self, id: TaskId) -> Self {
        self.id = Some(id);
        self
    }
    /// Sets the lane.
    pub fn lane(mut self, lane: Lane) -> Self {
        self.lane = lane;
        self
    }
    /// Delays the task by `d` from now.
    pub fn delay(mut self, d: Duration) -> Self {
        self.run_at =
            Some(Utc::now() + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX));
        self
    }
    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// An accepted enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// The task id.
    pub id: TaskId,
    /// The stream that stored it.
    pub stream: String,
    /// Its stream sequence.
    pub sequence: u64,
    /// True when JetStream had already seen this id inside the duplicate window: the task
    /// was not stored again.
    pub duplicate: bool,
}

/// A published task whose PubAck has not been awaited yet (pipelining).
pub struct PendingEnqueue {
    id: TaskId,
    subject: String,
    ack: PublishAckFuture,
}

impl std::fmt::Debug for PendingEnqueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingEnqueue")
            .field("id", &self.id)
            .field("subject", &self.subject)
            .finish()
    }
}

impl PendingEnqueue {
    /// The task id.
    pub fn id(&self) -> &TaskId {
        &self.id
    }
    /// Waits for the server's acknowledgement.
    pub async fn acked(self) -> Result<Enqueued, NatsError> {
        let ack = self
            .ack
            .await
            .map_err(|e| NatsError::publish(&self.subject, e))?;
        Ok(Enqueued {
            id: self.id,
            stream: ack.stream,
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }
}

/// Outstanding PubAcks [`Client::enqueue_batch`] allows.
pub const BATCH_WINDOW: usize = 1024;

/// A taskmesh producer. Cheap to clone.
///
/// [`Client::send`] returns before the server acknowledges; a JetStream context holds at most
/// 5 000 unacknowledged publishes and then waits, so await acknowledgements as you go
/// (or use [`Client::enqueue_batch`]).
#[derive(Debug, Clone)]
pub struct Client {
    conn: Connection,
    max_msg_size: usize,
    results: ResultStore,
    keyring: Option<Arc<Keyring>>,
    encrypted: Arc<Vec<taskmesh_shared::Category>>,
    unique: Arc<tokio::sync::OnceCell<kv::Store>>,
}

impl Client {
    /// A producer on an open connection.
    pub async fn new(conn: Connection, cfg: &Config) -> Result<Self, NatsError> {
        let results = ResultStore::open(&conn.js).await?;
        let keyring = cfg
            .encryption
            .keyring()
            .map_err(|e| NatsError::Corrupt {
                what: "encryption config".into(),
                message: e,
            })?
            .map(Arc::new);
        Ok(Self {
            max_msg_size: usize::try_from(cfg.streams.max_msg_size).unwrap_or(usize::MAX),
            conn,
            results,
            keyring,
            encrypted: Arc::new(cfg.encryption.categories.clone()),
            unique: Arc::default(),
        })
    }

    /// The connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The result store.
    pub fn results(&self) -> &ResultStore {
        &self.results
    }

    /// Enqueues `task` with JSON `args` and waits for the PubAck.
    pub async fn enqueue<A: Serialize + ?Sized>(
        &self,
        task: &TaskName,
        args: &A,
        opts: EnqueueOptions,
    ) -> Result<Enqueued, NatsError> {
        let body = Bytes::from(serde_json::to_vec(args)?);
        self.send(task, body, opts).await?.acked().await
    }

    /// Publishes a task without waiting for its PubAck: call [`PendingEnqueue::acked`]
    /// later. Many `send`s in a row are pipelined on one connection.
    pub async fn send(
        &self,
        task: &TaskName,
        body: Bytes,
        opts: EnqueueOptions,
    ) -> Result<PendingEnqueue, NatsError> {
        let id = opts.id.clone().unwrap_or_else(TaskId::generate);
        let lock = match &opts.unique {
            Some(u) => Some(self.take_unique(task, &body, &id, u).await?),
            None => None,
        };
        let sent = self.send_inner(task, body, opts, id).await;
        if sent.is_err()
            && let (Some(key), Some(kv)) = (lock, self.unique.get())
        {
            // The task was not stored: free the key again.
            let _ = kv.delete(&key).await;
        }
        sent
    }

    async fn take_unique(
        &self,
        task: &TaskName,
        body: &[u8],
        id: &TaskId,
        u: &Unique,
    ) -> Result<String, NatsError> {
        use sha2::Digest as _;
        let key = match &u.key {
            Some(k) => k.clone(),
            None => {
                let digest = sha2::Sha256::digest(body);
                let hex: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
                format!("{}.{hex}", task.as_str())
            }
        };
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_=./".contains(&b))
        {
            return Err(NatsError::Corrupt {
                what: "unique key".into(),
                message: format!("{key:?} may only use A-Z a-z 0-9 - _ = . /"),
            });
        }
        let kv = self
            .unique
            .get_or_try_init(|| topology::bucket(&self.conn.js, wire::UNIQUE_BUCKET))
            .await?;
        let ttl = u.window.max(Duration::from_secs(1));
        match kv
            .create_with_ttl(&key, Bytes::from(id.as_str().to_owned()), ttl)
            .await
        {
            Ok(_) => Ok(key),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let existing = kv
                    .get(&key)
                    .await
                    .map_err(|e| NatsError::js("reading unique key", e))?
                    .and_then(|v| String::from_utf8(v.to_vec()).ok())
                    .and_then(|s| TaskId::new(s).ok());
                match existing {
                    Some(existing) => Err(NatsError::NotUnique { key, existing }),
                    // Expired between the two calls: try once more.
                    None => kv
                        .create_with_ttl(&key, Bytes::from(id.as_str().to_owned()), ttl)
                        .await
                        .map(|_| key.clone())
                        .map_err(|e| NatsError::js(format!("taking unique key {key}"), e)),
                }
            }
            Err(e) => Err(NatsError::js(format!("taking unique key {key}"), e)),
        }
    }

    async fn send_inner(
        &self,
        task: &TaskName,
        body: Bytes,
        opts: EnqueueOptions,
        id: TaskId,
    ) -> Result<PendingEnqueue, NatsError> {
        let mut body = body;
        let mut headers = HeaderMap::new();
        headers.insert(
            h::NATS_MSG_ID,
            opts.msg_id.as_deref().unwrap_or(id.as_str()),
        );
        headers.insert(h::TASK_ID, id.as_str());
        headers.insert(
            h::TASK_ENQUEUED_AT,
            Utc::now()
                .to_rfc3339_opts(SecondsFormat::Micros, true)
                .as_str(),
        );
        if let Some(d) = opts.deadline {
            headers.insert(
                h::TASK_DEADLINE,
                d.to_rfc3339_opts(SecondsFormat::Millis, true).as_str(),
            );
        }
        if let Some(n) = opts.max_attempts {
            headers.insert(h::TASK_MAX_ATTEMPTS, n.to_string().as_str());
        }
        for (k, v) in &opts.headers {
            headers.insert(k.as_str(), v.as_str());
        }
        let target = wire::task_subject(task, opts.lane);
        if let Some(ring) = &self.keyring
            && self
                .encrypted
                .iter()
                .any(|c| c.as_str() == task.category_str())
        {
            let sealed =
                ring.seal(&target, id.as_str(), &body)
                    .map_err(|e| NatsError::Corrupt {
                        what: "task body".into(),
                        message: e.to_string(),
                    })?;
            body = Bytes::from(sealed);
            headers.insert(h::TASK_KEY_ID, ring.current_id());
            headers.insert(h::TASK_ENCODING, taskmesh_shared::crypto::ENCODING);
        }
        let span = if crate::trace::enabled() {
            let span = tracing::info_span!(
                "publish",
                otel.name = %format!("publish {target}"),
                otel.kind = "producer",
                messaging.system = "nats",
                messaging.operation.type = "send",
                messaging.destination.name = %target,
                messaging.message.id = %id,
            );
            crate::trace::inject(&mut headers, &span.context());
            Some(span)
        } else {
            None
        };
        let subject = match opts.run_at {
            Some(at) if at > Utc::now() => {
                // Milliseconds, rounded up (whole seconds would truncate and run the task
                // up to 1 s early); the server fires `@at` to the millisecond.
                let at = at + chrono::TimeDelta::nanoseconds(999_999);
                headers.insert(
                    h::NATS_SCHEDULE,
                    format!("@at {}", at.to_rfc3339_opts(SecondsFormat::Millis, true)).as_str(),
                );
                headers.insert(h::NATS_SCHEDULE_TARGET, target.as_str());
                wire::delayed_subject(&task.category(), &id)
            }
            _ => target,
        };
        let size = body.len() + headers_len(&headers);
        if size > self.max_msg_size {
            return Err(NatsError::TooLarge {
                size,
                limit: self.max_msg_size,
            });
        }
        let publish = self
            .conn
            .js
            .publish_with_headers(subject.clone(), headers, body);
        let ack = match span {
            Some(span) => publish.instrument(span).await,
            None => publish.await,
        }
        .map_err(|e| NatsError::publish(&subject, e))?;
        Ok(PendingEnqueue { id, subject, ack })
    }

    /// Enqueues many tasks with pipelined PubAcks (at most [`BATCH_WINDOW`] outstanding, well
    /// under the JetStream context's in-flight limit); results come back in input order.
    pub async fn enqueue_batch<I>(&self, items: I) -> Vec<Result<Enqueued, NatsError>>
    where
        I: IntoIterator<Item = (TaskName, Bytes, EnqueueOptions)>,
    {
        let mut out = Vec::new();
        let mut inflight = futures::stream::FuturesOrdered::new();
        for (task, body, opts) in items {
            while inflight.len() >= BATCH_WINDOW {
                if let Some(r) = inflight.next().await {
                    out.push(r);
                }
            }
            match self.send(&task, body, opts).await {
                Ok(p) => inflight.push_back(futures::future::Either::Left(p.acked())),
                Err(e) => inflight.push_back(futures::future::Either::Right(
                    futures::future::ready(Err(e)),
                )),
            }
        }
        while let Some(r) = inflight.next().await {
            out.push(r);
        }
        out
    }

    /// The task's current record, if any.
    pub async fn result(&self, id: &TaskId) -> Result<Option<TaskRecord>, NatsError> {
        self.results.get(id).await
    }

    /// Waits until the task's record reaches a final state (`succeeded`, `failed`, `dead`).
    pub async fn wait(&self, id: &TaskId, timeout: Duration) -> Result<TaskRecord, NatsError> {
        let work = async {
            let watch = self.results.watch(id).await?;
            tokio::pin!(watch);
            if let Some(r) = self.results.get(id).await?
                && r.state.is_final()
            {
                return Ok(r);
            }
            while let Some(r) = watch.next().await {
                let r = r?;
                if r.state.is_final() {
                    return Ok(r);
                }
            }
            Err(NatsError::Timeout(
                timeout,
                format!("the result of task {id}"),
            ))
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| NatsError::Timeout(timeout, format!("the result of task {id}")))?
    }
}

fn headers_len(h: &HeaderMap) -> usize {
    h.iter()
        .map(|(k, vs)| {
            let k: &str = k.as_ref();
            vs.iter()
                .map(|v| k.len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum::<usize>()
        + 12
}
