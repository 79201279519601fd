//! The result record stored in `TASKMESH_RESULTS` (key = task id) and the worker heartbeat
//! stored in `TASKMESH_WORKERS`. Both are public JSON: field names are the wire contract.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TaskState {
    /// A worker is running it.
    Running,
    /// Done, with a result.
    Succeeded,
    /// Failed, another attempt is scheduled.
    Retrying,
    /// Failed and will not retry (kept for records written by older workers and by tools).
    Failed,
    /// In the dead-letter stream.
    Dead,
    /// Cancelled on request (`taskmesh cancel`) before or while it ran.
    Cancelled,
}

impl TaskState {
    /// Is this a state the task will not leave by itself?
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Dead | Self::Cancelled
        )
    }
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Retrying => "retrying",
            Self::Failed => "failed",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
        }
    }
}

/// `{"kind": "...", "message": "..."}` in a result record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// `retryable`, `permanent`, `panic`, `timeout`, `undecodable`, `unknown_task`,
    /// `expired`, or the dead-letter reason `max_attempts`.
    pub kind: String,
    /// Human-readable text.
    pub message: String,
}

/// One task's record (DESIGN.md § Results).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The task id.
    pub id: String,
    /// The full task name (`email.send`).
    pub task: String,
    /// Current state.
    pub state: TaskState,
    /// Delivery attempt that wrote this record (1-based).
    pub attempts: u32,
    /// When the producer enqueued it, if known.
    pub enqueued_at: Option<DateTime<Utc>>,
    /// When this attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When this attempt finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// Handler run time of this attempt in milliseconds.
    pub duration_ms: Option<u64>,
    /// The worker id that ran it.
    pub worker: String,
    /// The handler's value on success.
    pub result: Option<serde_json::Value>,
    /// The error on failure.
    pub error: Option<ErrorInfo>,
    /// The W3C trace id the task ran under, if any.
    pub trace_id: Option<String>,
}

/// A worker's heartbeat in `TASKMESH_WORKERS` (key = worker id), refreshed while it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerHeartbeat {
    /// Unique worker id (`<categories>-<random>`).
    pub id: String,
    /// Categories it serves.
    pub categories: Vec<String>,
    /// Total concurrency across its categories.
    pub concurrency: usize,
    /// Tasks running right now.
    pub in_flight: usize,
    /// taskmesh version.
    pub version: String,
    /// Host name, if known.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Start time.
    pub started_at: DateTime<Utc>,
    /// Time of this beat.
    pub beat_at: DateTime<Utc>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Freezes the record's JSON shape: it is read by other services.
    #[test]
    fn record_json_shape_is_frozen() {
        let t = DateTime::parse_from_rfc3339("2026-11-29T08:00:00Z")
            .unwrap()
            .to_utc();
        let r = TaskRecord {
            id: "t1".into(),
            task: "email.send".into(),
            state: TaskState::Succeeded,
            attempts: 1,
            enqueued_at: Some(t),
            started_at: Some(t),
            finished_at: Some(t),
            duration_ms: Some(12),
            worker: "email-1".into(),
            result: Some(serde_json::json!({"ok": true})),
            error: None,
            trace_id: None,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"id":"t1","task":"email.send","state":"succeeded","attempts":1,"enqueued_at":"2026-11-29T08:00:00Z","started_at":"2026-11-29T08:00:00Z","finished_at":"2026-11-29T08:00:00Z","duration_ms":12,"worker":"email-1","result":{"ok":true},"error":null,"trace_id":null}"#
        );
    }
}
