//! Operating the mesh: per-category and per-lane queue statistics, dead-letter listing,
//! replay and purge, consumer pause/resume and category purge.
//!
//! Used by `taskmesh status`, `taskmesh dlq …`, `taskmesh pause|resume|purge` and the REST
//! API. Every name comes from [`taskmesh_shared::wire`].
//!
//! **Replay is safe to re-run.** A dead letter with DLQ sequence `n` is republished to its
//! original subject (`Dlq-Subject`) with `Nats-Msg-Id = replay-<n>` and then deleted from
//! `TASKS_DLQ`. If the process dies between the two steps, the next replay of the same dead
//! letter is dropped by the task stream's duplicate window, so one dead letter never
//! becomes two tasks.

use std::collections::{BTreeMap, HashMap};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, response::Response, stream::LastRawMessageErrorKind};
use chrono::{DateTime, Utc};
use futures::TryStreamExt as _;
use serde::Serialize;
use taskmesh_shared::wire::{self, headers as h};
use taskmesh_shared::{Category, Lane};

use crate::NatsError;

/// One priority lane of a category: its durable consumer's state.
#[derive(Debug, Clone, Serialize)]
pub struct LaneStats {
    /// `high`, `normal` or `low`.
    pub lane: &'static str,
    /// The durable consumer's name (`email`, `email-high`, …).
    pub consumer: String,
    /// Messages waiting for this lane (not yet delivered).
    pub pending: u64,
    /// Delivered, not yet acknowledged (in flight).
    pub ack_pending: usize,
    /// Messages being redelivered.
    pub redelivered: usize,
    /// Pull requests waiting at the server (idle workers).
    pub waiting: usize,
    /// Messages delivered so far (consumer sequence).
    pub delivered: u64,
    /// Whether the consumer is paused.
    pub paused: bool,
    /// Whether the consumer exists (false: run `taskmesh provision`).
    pub exists: bool,
}

/// A category's stream, lanes and dead letters.
#[derive(Debug, Clone, Serialize)]
pub struct CategoryStats {
    /// The category.
    pub category: String,
    /// Its stream (`TASKS_EMAIL`).
    pub stream: String,
    /// Messages stored in the stream (queued + in flight + delayed).
    pub messages: u64,
    /// Sum of the lanes' `pending`.
    pub pending: u64,
    /// Sum of the lanes' `ack_pending` (in flight).
    pub in_flight: usize,
    /// Consumers bound to the stream.
    pub consumers: usize,
    /// Dead letters of this category in `TASKS_DLQ`.
    pub dlq: u64,
    /// Whether every lane is paused.
    pub paused: bool,
    /// The stream's last sequence (a monotonic count of tasks ever stored; throughput is
    /// its rate).
    pub last_sequence: u64,
    /// The lanes.
    pub lanes: Vec<LaneStats>,
}

/// A dead letter in `TASKS_DLQ`.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Its sequence in `TASKS_DLQ` (the id used by `show`, `replay`, `purge`).
    pub seq: u64,
    /// The task id (`Task-Id`), if any.
    pub task_id: Option<String>,
    /// The task name (`<category>.<name>`), from the DLQ subject.
    pub task: String,
    /// The subject it is replayed to (`Dlq-Subject`).
    pub original_subject: Option<String>,
    /// `Dlq-Reason`.
    pub reason: Option<String>,
    /// `Dlq-Error`.
    pub error: Option<String>,
    /// `Dlq-Attempts`.
    pub attempts: Option<u32>,
    /// `Dlq-Time`, else the time it was stored.
    pub time: DateTime<Utc>,
    /// All headers (first value of each).
    pub headers: BTreeMap<String, String>,
    /// The body: JSON when it parses, else a string (lossy UTF-8).
    pub body: serde_json::Value,
    #[serde(skip)]
    raw_headers: HeaderMap,
    #[serde(skip)]
    raw_body: bytes::Bytes,
}

/// Which dead letters to list, replay or purge. Empty = all.
#[derive(Debug, Clone, Default)]
pub struct DlqFilter {
    /// Task name (`email.send`) or category (`email`).
    pub task: Option<String>,
    /// `Dlq-Reason`.
    pub reason: Option<String>,
    /// Only dead letters older than this instant.
    pub older_than: Option<DateTime<Utc>>,
    /// Only dead letters newer than this instant.
    pub newer_than: Option<DateTime<Utc>>,
    /// Only this task id.
    pub task_id: Option<String>,
}

impl DlqFilter {
    /// Whether `d` passes the filter.
    pub fn matches(&self, d: &DeadLetter) -> bool {
        if let Some(t) = &self.task {
            let category_match = !t.contains('.') && d.task.split('.').next() == Some(t.as_str());
            if d.task != *t && !category_match {
                return false;
            }
        }
        if let Some(r) = &self.reason
            && d.reason.as_deref() != Some(r.as_str())
        {
            return false;
        }
        if let Some(t) = self.older_than
            && d.time >= t
        {
            return false;
        }
        if let Some(t) = self.newer_than
            && d.time <= t
        {
            return false;
        }
        if let Some(id) = &self.task_id
            && d.task_id.as_deref() != Some(id.as_str())
        {
            return false;
        }
        true
    }

    /// The subject filter narrowing the scan (`dlq.email.>` or `dlq.email.send`).
    fn subject(&self) -> String {
        match &self.task {
            Some(t) if t.contains('.') => format!("dlq.{t}"),
            Some(c) => format!("dlq.{c}.>"),
            None => wire::dlq_wildcard(),
        }
    }
}

/// What a replay did.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    /// The dead letter's DLQ sequence.
    pub seq: u64,
    /// The task id.
    pub task_id: Option<String>,
    /// Where it was published.
    pub subject: String,
    /// The task stream's sequence of the new copy.
    pub stream_seq: u64,
    /// True when an earlier (interrupted) replay had already published it.
    pub duplicate: bool,
}

/// Admin operations on an open JetStream context.
#[derive(Debug, Clone)]
pub struct Admin {
    js: jetstream::Context,
}

fn header_map(hm: &HeaderMap) -> BTreeMap<String, String> {
    hm.iter()
        .filter_map(|(k, v)| Some((k.to_string(), v.first()?.as_str().to_owned())))
        .collect()
}

fn from_nanos(nanos: i128) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(i64::try_from(nanos).unwrap_or(i64::MAX))
}

impl Admin {
    /// Admin operations on `js`.
    pub fn new(js: jetstream::Context) -> Self {
        Self { js }
    }

    async fn stream(&self, name: &str) -> Result<jetstream::stream::Stream, NatsError> {
        self.js
            .get_stream(name)
            .await
            .map_err(|_| NatsError::NotProvisioned {
                what: format!("stream {name}"),
            })
    }

    /// Dead letters per category (`{"email": 3}`).
    pub async fn dlq_counts(&self) -> Result<HashMap<String, u64>, NatsError> {
        let stream = self.stream(wire::DLQ_STREAM).await?;
        let mut subjects = stream
            .info_with_subjects(wire::dlq_wildcard())
            .await
            .map_err(|e| NatsError::js("reading TASKS_DLQ subjects", e))?;
        let mut out = HashMap::new();
        while let Some((subject, n)) = subjects
            .try_next()
            .await
            .map_err(|e| NatsError::js("reading TASKS_DLQ subjects", e))?
        {
            if let Some(c) = subject.split('.').nth(1) {
                *out.entry(c.to_owned()).or_default() += n as u64;
            }
        }
        Ok(out)
    }

    /// A category's stream and lanes; `dlq` from [`Admin::dlq_counts`].
    pub async fn category_stats(
        &self,
        category: &Category,
        dlq: u64,
    ) -> Result<CategoryStats, NatsError> {
        let name = wire::stream_name(category);
        let mut stream = self.stream(&name).await?;
        let info = stream
            .info()
            .await
            .map_err(|e| NatsError::js(format!("reading stream {name}"), e))?
            .clone();
        let mut lanes = Vec::new();
        for lane in Lane::ALL {
            let consumer = wire::consumer_name(category, lane);
            let mut row = LaneStats {
                lane: lane.as_str(),
                consumer: consumer.clone(),
                pending: 0,
                ack_pending: 0,
                redelivered: 0,
                waiting: 0,
                delivered: 0,
                paused: false,
                exists: false,
            };
            if let Ok(ci) = stream.consumer_info(&consumer).await {
                row.pending = ci.num_pending;
                row.ack_pending = ci.num_ack_pending;
                row.redelivered = ci.num_redelivered;
                row.waiting = ci.num_waiting;
                row.delivered = ci.delivered.consumer_sequence;
                row.paused = ci.paused;
                row.exists = true;
            }
            lanes.push(row);
        }
        Ok(CategoryStats {
            category: category.as_str().to_owned(),
            stream: name,
            messages: info.state.messages,
            pending: lanes.iter().map(|l| l.pending).sum(),
            in_flight: lanes.iter().map(|l| l.ack_pending).sum(),
            consumers: info.state.consumer_count,
            dlq,
            paused: lanes.iter().all(|l| l.paused),
            last_sequence: info.state.last_sequence,
            lanes,
        })
    }

    /// Pauses every lane's consumer of `category` until `until` (workers stay bound but
    /// receive nothing).
    pub async fn pause(&self, category: &Category, until: DateTime<Utc>) -> Result<(), NatsError> {
        let body = serde_json::json!({
            "pause_until": until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        });
        self.pause_request(category, &body).await
    }

    /// Resumes every lane's consumer of `category`.
    pub async fn resume(&self, category: &Category) -> Result<(), NatsError> {
        self.pause_request(category, &serde_json::json!({})).await
    }

    async fn pause_request(
        &self,
        category: &Category,
        body: &serde_json::Value,
    ) -> Result<(), NatsError> {
        let stream = wire::stream_name(category);
        for lane in Lane::ALL {
            let consumer = wire::consumer_name(category, lane);
            let op = format!("pausing or resuming consumer {consumer} on {stream}");
            let resp: Response<serde_json::Value> = self
                .js
                .request(format!("CONSUMER.PAUSE.{stream}.{consumer}"), body)
                .await
                .map_err(|e| NatsError::js(op.clone(), e))?;
            if let Response::Err { error } = resp {
                if error.code() == 404 {
                    return Err(NatsError::NotProvisioned {
                        what: format!("consumer {consumer} on {stream}"),
                    });
                }
                return Err(NatsError::js(op, error));
            }
        }
        Ok(())
    }

    /// Deletes every task queued in `category` (also delayed ones); returns how many.
    pub async fn purge_category(&self, category: &Category) -> Result<u64, NatsError> {
        let name = wire::stream_name(category);
        let stream = self.stream(&name).await?;
        let r = stream
            .purge()
            .await
            .map_err(|e| NatsError::js(format!("purging {name}"), e))?;
        Ok(r.purged)
    }

    /// The dead letter with DLQ sequence `seq`.
    pub async fn dlq_get(&self, seq: u64) -> Result<Option<DeadLetter>, NatsError> {
        let stream = self.stream(wire::DLQ_STREAM).await?;
        match stream.get_raw_message(seq).await {
            Ok(m) => Ok(Some(dead_letter(m))),
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
            Err(e) if e.to_string().contains("no message found") => Ok(None),
            Err(e) => Err(NatsError::js(format!("reading dead letter {seq}"), e)),
        }
    }

    /// Dead letters passing `filter`, oldest first, at most `limit`.
    pub async fn dlq_list(
        &self,
        filter: &DlqFilter,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, NatsError> {
        let stream = self.stream(wire::DLQ_STREAM).await?;
        let mut out = Vec::new();
        let mut next = 1u64;
        let subject = filter.subject();
        while out.len() < limit {
            let m = match stream
                .get_first_raw_message_by_subject(&subject, next)
                .await
            {
                Ok(m) => m,
                Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => break,
                Err(e) if e.to_string().contains("no message found") => break,
                Err(e) => return Err(NatsError::js("listing dead letters", e)),
            };
            next = m.sequence + 1;
            let d = dead_letter(m);
            if filter.matches(&d) {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// The dead letter of task `id`, if it is in the DLQ.
    pub async fn dlq_find_task(&self, id: &str) -> Result<Option<DeadLetter>, NatsError> {
        let filter = DlqFilter {
            task_id: Some(id.to_owned()),
            ..Default::default()
        };
        Ok(self.dlq_list(&filter, 1).await?.into_iter().next())
    }

    /// Republishes dead letter `seq` to its original subject (original body and headers
    /// minus `Dlq-*`, `Nats-*` and `Task-Attempts-Used`, with `Nats-Msg-Id =
    /// replay-<seq>`), then deletes it from `TASKS_DLQ`. `Ok(None)` when there is no such
    /// dead letter (already replayed or purged).
    pub async fn dlq_replay(&self, seq: u64) -> Result<Option<Replayed>, NatsError> {
        let Some(d) = self.dlq_get(seq).await? else {
            return Ok(None);
        };
        let subject = match &d.original_subject {
            Some(s) => s.clone(),
            None => format!("tasks.{}", d.task),
        };
        let mut headers = HeaderMap::new();
        for (name, values) in d.raw_headers.iter() {
            let n: &str = name.as_ref();
            if n.starts_with("Dlq-") || n.starts_with("Nats-") || n == h::TASK_ATTEMPTS_USED {
                continue;
            }
            for v in values {
                headers.append(n, v.as_str());
            }
        }
        headers.insert(h::NATS_MSG_ID, format!("replay-{seq}").as_str());
        let ack = self
            .js
            .publish_with_headers(subject.clone(), headers, d.raw_body.clone())
            .await
            .map_err(|e| NatsError::publish(subject.clone(), e))?
            .await
            .map_err(|e| NatsError::publish(subject.clone(), e))?;
        let stream = self.stream(wire::DLQ_STREAM).await?;
        if let Err(e) = stream.delete_message(seq).await
            && !e.to_string().contains("no message found")
        {
            return Err(NatsError::js(format!("deleting dead letter {seq}"), e));
        }
        Ok(Some(Replayed {
            seq,
            task_id: d.task_id,
            subject,
            stream_seq: ack.sequence,
            duplicate: ack.duplicate,
        }))
    }

    /// Deletes dead letter `seq`; false when it was not there.
    pub async fn dlq_delete(&self, seq: u64) -> Result<bool, NatsError> {
        let stream = self.stream(wire::DLQ_STREAM).await?;
        match stream.delete_message(seq).await {
            Ok(b) => Ok(b),
            Err(e) if e.to_string().contains("no message found") => Ok(false),
            Err(e) => Err(NatsError::js(format!("deleting dead letter {seq}"), e)),
        }
    }

    /// Deletes every dead letter (no filter: one stream purge); returns how many.
    pub async fn dlq_purge_all(&self) -> Result<u64, NatsError> {
        let stream = self.stream(wire::DLQ_STREAM).await?;
        let r = stream
            .purge()
            .await
            .map_err(|e| NatsError::js("purging TASKS_DLQ", e))?;
        Ok(r.purged)
    }
}

fn dead_letter(m: async_nats::jetstream::message::StreamMessage) -> DeadLetter {
    let headers = header_map(&m.headers);
    let get = |k: &str| headers.get(k).cloned();
    let time = get(h::DLQ_TIME)
        .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
        .map_or_else(|| from_nanos(m.time.unix_timestamp_nanos()), |t| t.to_utc());
    let body = serde_json::from_slice(&m.payload).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&m.payload).into_owned())
    });
    DeadLetter {
        seq: m.sequence,
        task_id: get(h::TASK_ID).or_else(|| get(h::NATS_MSG_ID)),
        task: m
            .subject
            .strip_prefix("dlq.")
            .unwrap_or(m.subject.as_str())
            .to_owned(),
        original_subject: get(h::DLQ_SUBJECT),
        reason: get(h::DLQ_REASON),
        error: get(h::DLQ_ERROR),
        attempts: get(h::DLQ_ATTEMPTS).and_then(|a| a.trim().parse().ok()),
        time,
        body,
        headers,
        raw_headers: m.headers,
        raw_body: m.payload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(task: &str, reason: &str, age_s: i64) -> DeadLetter {
        DeadLetter {
            seq: 1,
            task_id: Some("t1".into()),
            task: task.into(),
            original_subject: None,
            reason: Some(reason.into()),
            error: None,
            attempts: Some(1),
            time: Utc::now() - chrono::Duration::seconds(age_s),
            headers: BTreeMap::new(),
            body: serde_json::Value::Null,
            raw_headers: HeaderMap::new(),
            raw_body: bytes::Bytes::new(),
        }
    }

    #[test]
    fn filter_by_task_category_reason_and_age() {
        let d = letter("email.send", "permanent", 120);
        let f = |task: Option<&str>, reason: Option<&str>| DlqFilter {
            task: task.map(Into::into),
            reason: reason.map(Into::into),
            ..Default::default()
        };
        assert!(DlqFilter::default().matches(&d));
        assert!(f(Some("email.send"), None).matches(&d));
        assert!(f(Some("email"), None).matches(&d));
        assert!(!f(Some("email.other"), None).matches(&d));
        assert!(!f(Some("ai"), None).matches(&d));
        assert!(f(None, Some("permanent")).matches(&d));
        assert!(!f(None, Some("expired")).matches(&d));
        let minute_ago = Utc::now() - chrono::Duration::seconds(60);
        let older = DlqFilter {
            older_than: Some(minute_ago),
            ..Default::default()
        };
        assert!(older.matches(&d));
        let newer = DlqFilter {
            newer_than: Some(minute_ago),
            ..Default::default()
        };
        assert!(!newer.matches(&d));
        assert_eq!(f(Some("email"), None).subject(), "dlq.email.>");
        assert_eq!(f(Some("email.send"), None).subject(), "dlq.email.send");
    }
}
