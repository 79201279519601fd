//! One delivered message and the one place where a [`Decision`] becomes an ack.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use taskmesh_shared::wire::{self, headers as h};
use taskmesh_shared::{DeadReason, Decision};

use crate::error::NatsError;

/// Largest `Dlq-Error` value kept.
const MAX_ERROR_HEADER: usize = 1024;

/// What the server told us about a delivery (parsed from its ack subject).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryMeta {
    /// The stream.
    pub stream: String,
    /// The consumer.
    pub consumer: String,
    /// Stream sequence.
    pub stream_seq: u64,
    /// Delivery count, 1 for the first (the attempt number).
    pub attempt: u32,
    /// When the server stored the message.
    pub published: DateTime<Utc>,
    /// Messages still pending for the consumer.
    pub pending: u64,
}

/// A delivered task message.
#[derive(Debug)]
pub struct Delivery {
    msg: jetstream::Message,
    meta: DeliveryMeta,
}

impl Delivery {
    /// Wraps a JetStream message; fails for messages without an ack subject.
    pub fn new(msg: jetstream::Message) -> Result<Self, NatsError> {
        let meta = {
            let info = msg.info().map_err(|e| NatsError::Corrupt {
                what: "delivery".into(),
                message: e.to_string(),
            })?;
            let published = DateTime::<Utc>::from_timestamp_nanos(
                i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(i64::MAX),
            );
            DeliveryMeta {
                stream: info.stream.to_owned(),
                consumer: info.consumer.to_owned(),
                stream_seq: info.stream_sequence,
                attempt: u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX),
                published,
                pending: info.pending,
            }
        };
        Ok(Self { msg, meta })
    }

    /// Server-side facts about the delivery.
    pub fn meta(&self) -> &DeliveryMeta {
        &self.meta
    }
    /// The subject it was published to.
    pub fn subject(&self) -> &str {
        self.msg.subject.as_str()
    }
    /// The body.
    pub fn payload(&self) -> &Bytes {
        &self.msg.payload
    }
    /// A header's first value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.msg.headers.as_ref()?.get(name).map(|v| v.as_str())
    }
    /// All headers.
    pub fn headers(&self) -> Option<&HeaderMap> {
        self.msg.headers.as_ref()
    }

    /// The attempt number: deliveries of this message plus the attempts an earlier copy
    /// used (`Task-Attempts-Used`, set when a task is deferred by an open breaker).
    pub fn attempt(&self) -> u32 {
        let used = self
            .header(h::TASK_ATTEMPTS_USED)
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0)
            .min(1000);
        self.meta.attempt.saturating_add(used)
    }

    /// The task id: `Task-Id`, else `Nats-Msg-Id`, else `<stream>-<sequence>`.
    pub fn task_id(&self) -> String {
        self.header(h::TASK_ID)
            .or_else(|| self.header(h::NATS_MSG_ID))
            .filter(|s| taskmesh_shared::names::is_task_id(s))
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}-{}", self.meta.stream, self.meta.stream_seq))
    }

    /// Tells the server the task is still running (resets `ack_wait`).
    pub async fn progress(&self) -> Result<(), NatsError> {
        self.msg
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| NatsError::js("sending progress", Io(e.to_string())))
    }

    /// Hands the message back for immediate redelivery (drain at shutdown).
    pub async fn release(&self) -> Result<(), NatsError> {
        self.msg
            .ack_with(AckKind::Nak(None))
            .await
            .map_err(|e| NatsError::js("releasing message", Io(e.to_string())))
    }

    /// Carries out a decision. For a dead letter: publish the copy to `TASKS_DLQ`, wait for
    /// its PubAck, then terminate the original with the reason; if the copy cannot be
    /// stored the original is Nak'ed instead, so nothing is lost.
    pub async fn settle(
        &self,
        js: &jetstream::Context,
        decision: &Decision,
        double_ack: bool,
    ) -> Result<(), NatsError> {
        match decision {
            Decision::Ack if double_ack => self
                .msg
                .double_ack()
                .await
                .map_err(|e| NatsError::js("acknowledging", Io(e.to_string()))),
            Decision::Ack => self
                .msg
                .ack()
                .await
                .map_err(|e| NatsError::js("acknowledging", Io(e.to_string()))),
            Decision::Retry { delay } => self
                .msg
                .ack_with(AckKind::Nak(Some(*delay)))
                .await
                .map_err(|e| NatsError::js("negative-acknowledging", Io(e.to_string()))),
            Decision::Cancel => self.term("cancelled").await,
            Decision::DeadLetter { reason, error } => {
                if let Err(e) = self.dead_letter(js, *reason, error).await {
                    // Keep the task: it comes back after a short pause and we try again.
                    let _ = self
                        .msg
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                        .await;
                    return Err(e);
                }
                self.term(reason.as_str()).await
            }
        }
    }

    async fn dead_letter(
        &self,
        js: &jetstream::Context,
        reason: DeadReason,
        error: &str,
    ) -> Result<(), NatsError> {
        let mut headers = HeaderMap::new();
        if let Some(orig) = &self.msg.headers {
            for (k, vs) in orig.iter() {
                let name: &str = k.as_ref();
                if name == h::NATS_MSG_ID {
                    continue;
                }
                for v in vs {
                    headers.append(name, v.as_str());
                }
            }
        }
        if self.header(h::TASK_ID).is_none() {
            headers.insert(h::TASK_ID, self.task_id().as_str());
        }
        // One dead letter per stored task even if the worker dies between copy and Term.
        headers.insert(
            h::NATS_MSG_ID,
            format!("dlq-{}-{}", self.meta.stream, self.meta.stream_seq).as_str(),
        );
        headers.insert(h::DLQ_REASON, reason.as_str());
        headers.insert(
            h::DLQ_ERROR,
            wire::header_safe(error, MAX_ERROR_HEADER).as_str(),
        );
        headers.insert(h::DLQ_ATTEMPTS, self.meta.attempt.to_string().as_str());
        headers.insert(h::DLQ_STREAM_SEQ, self.meta.stream_seq.to_string().as_str());
        headers.insert(
            h::DLQ_TIME,
            Utc::now()
                .to_rfc3339_opts(SecondsFormat::Millis, true)
                .as_str(),
        );
        headers.insert(h::DLQ_SUBJECT, self.subject());
        let subject = wire::dlq_subject_for(self.subject());
        js.publish_with_headers(subject.clone(), headers, self.msg.payload.clone())
            .await
            .map_err(|e| NatsError::publish(&subject, e))?
            .await
            .map_err(|e| NatsError::publish(&subject, e))?;
        Ok(())
    }

    /// Defers the task without spending an attempt: a copy is scheduled (JetStream message
    /// schedule) onto the original subject at `until`, carrying the attempts used so far in
    /// `Task-Attempts-Used`; once the copy is stored the original is terminated.
    pub async fn defer(
        &self,
        js: &jetstream::Context,
        category: &taskmesh_shared::Category,
        until: DateTime<Utc>,
    ) -> Result<(), NatsError> {
        let id = taskmesh_shared::TaskId::new(self.task_id())?;
        let mut headers = HeaderMap::new();
        if let Some(orig) = &self.msg.headers {
            for (k, vs) in orig.iter() {
                let name: &str = k.as_ref();
                if name.starts_with("Nats-") || name == h::TASK_ATTEMPTS_USED {
                    continue;
                }
                for v in vs {
                    headers.append(name, v.as_str());
                }
            }
        }
        headers.insert(h::TASK_ID, id.as_str());
        let used = self.attempt().saturating_sub(1);
        headers.insert(h::TASK_ATTEMPTS_USED, used.to_string().as_str());
        // Whole seconds, rounded up: never fire before `until`.
        let until = if until.timestamp_subsec_nanos() > 0 {
            until
                + chrono::Duration::nanoseconds(
                    1_000_000_000 - i64::from(until.timestamp_subsec_nanos()),
                )
        } else {
            until
        };
        headers.insert(
            h::NATS_SCHEDULE,
            format!("@at {}", until.to_rfc3339_opts(SecondsFormat::Secs, true)).as_str(),
        );
        headers.insert(h::NATS_SCHEDULE_TARGET, self.subject());
        let subject = wire::delayed_subject(category, &id);
        js.publish_with_headers(subject.clone(), headers, self.msg.payload.clone())
            .await
            .map_err(|e| NatsError::publish(&subject, e))?
            .await
            .map_err(|e| NatsError::publish(&subject, e))?;
        self.term("deferred").await
    }

    /// Terminates the delivery with a reason (`+TERM <reason>`): no redelivery.
    pub async fn term(&self, reason: &str) -> Result<(), NatsError> {
        let Some(reply) = self.msg.reply.clone() else {
            return Ok(());
        };
        self.msg
            .context
            .client()
            .publish(reply, Bytes::from(format!("+TERM {reason}")))
            .await
            .map_err(|e| NatsError::js("terminating", e))
    }
}

#[derive(Debug)]
struct Io(String);
impl std::fmt::Display for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Io {}
