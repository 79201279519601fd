//! `ai` category tasks.

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use serde::Serialize;
use taskmesh_shared::{NameError, TaskError};

use crate::registry::{NoArgs, Registry, TaskContext, TaskPolicy};

/// Result of `ai.test_scheduler_connection`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConnectionTest {
    /// The task id.
    pub task_id: String,
    /// Always `success`.
    pub status: &'static str,
    /// `Scheduler connection test passed`.
    pub message: &'static str,
    /// When it ran (RFC 3339).
    pub timestamp: String,
}

/// `ai.test_scheduler_connection` (no args): a liveness probe through the whole mesh —
/// scheduler or producer → NATS → worker → result. Same result shape as the predecessor.
pub async fn test_scheduler_connection(
    ctx: TaskContext,
    _args: NoArgs,
) -> Result<ConnectionTest, TaskError> {
    Ok(ConnectionTest {
        task_id: ctx.id,
        status: "success",
        message: "Scheduler connection test passed",
        timestamp: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
    })
}

/// Registers the `ai` tasks.
pub fn register(r: &mut Registry) -> Result<(), NameError> {
    r.register(
        "ai.test_scheduler_connection",
        TaskPolicy::retry_delay(Duration::from_secs(60)),
        test_scheduler_connection,
    )?;
    Ok(())
}
