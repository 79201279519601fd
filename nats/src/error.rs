//! The NATS layer's error type: what failed, why, and what to do next.

/// A failure talking to NATS. Messages are lower case and say what to do next.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// Could not connect (bad URL, server down, auth refused).
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// The URL(s) tried.
        url: String,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stream or consumer is missing.
    #[error("{what} not found: run `taskmesh provision`")]
    NotProvisioned {
        /// `stream TASKS_EMAIL`, `consumer email on TASKS_EMAIL`, `bucket …`.
        what: String,
    },
    /// A JetStream API call failed.
    #[error("{op}: {source}")]
    JetStream {
        /// What was being done.
        op: String,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A publish was refused or never acknowledged.
    #[error("publish to {subject} failed: {source}")]
    Publish {
        /// The subject.
        subject: String,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The task body is larger than the streams accept.
    #[error("task body of {size} bytes exceeds the limit of {limit} bytes (streams.max_msg_size)")]
    TooLarge {
        /// Body size.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// An equal task is inside its uniqueness window.
    #[error("an equal task is already enqueued (unique key {key}): task {existing}")]
    NotUnique {
        /// The uniqueness key.
        key: String,
        /// The id of the task holding it.
        existing: taskmesh_shared::TaskId,
    },
    /// Arguments could not be serialized to JSON.
    #[error("cannot encode task arguments as JSON: {0}")]
    Encode(#[from] serde_json::Error),
    /// A name or id was invalid.
    #[error(transparent)]
    Name(#[from] taskmesh_shared::NameError),
    /// A stored value could not be read.
    #[error("corrupt {what}: {message}")]
    Corrupt {
        /// What was read.
        what: String,
        /// Why it is unreadable.
        message: String,
    },
    /// Waiting for something took too long.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(std::time::Duration, String),
    /// A file needed for the connection could not be read.
    #[error("cannot read {path}: {source}")]
    File {
        /// The path.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl NatsError {
    pub(crate) fn js(
        op: impl Into<String>,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::JetStream {
            op: op.into(),
            source: Box::new(e),
        }
    }
    pub(crate) fn publish(
        subject: impl Into<String>,
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Publish {
            subject: subject.into(),
            source: Box::new(e),
        }
    }
}
