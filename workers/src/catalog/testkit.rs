//! `testkit` tasks: deliberately slow, failing, panicking or crashing tasks for fault tests
//! and demos. Registered only when the config declares a `testkit` category, so a
//! production deployment never serves them by accident.
//!
//! With `TASKMESH_TESTKIT_LEDGER=<file>` every start and finish is appended to the file as
//! one line `<event> <task id> <attempt> <pid> <unix ms>` (`start`, `done`), written outside NATS so a
//! test can count executions across worker crashes.

use std::io::Write;
use std::time::Duration;

use serde::Deserialize;
use taskmesh_shared::{NameError, TaskError};

use crate::registry::{Registry, TaskContext, TaskPolicy};

/// Arguments of `testkit.sleep`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepArgs {
    /// How long to sleep, in milliseconds.
    #[serde(default)]
    pub ms: u64,
}

/// Arguments of `testkit.flaky`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlakyArgs {
    /// Fail (retryably) on attempts `1..=fail_times`, then succeed.
    pub fail_times: u32,
}

/// Arguments of `testkit.dependent`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DependentArgs {
    /// While this file exists the dependency is "down" (a retryable failure).
    pub down_flag: String,
}

/// Arguments of `testkit.crash`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrashArgs {
    /// `panic` (caught by the runtime) or `abort` (kills the worker process).
    pub how: String,
}

fn ledger(event: &str, ctx: &TaskContext) {
    let Some(path) = std::env::var_os("TASKMESH_TESTKIT_LEDGER") else {
        return;
    };
    let line = format!(
        "{event} {} {} {} {}\n",
        ctx.id,
        ctx.attempt,
        std::process::id(),
        chrono::Utc::now().timestamp_millis()
    );
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        tracing::warn!(error = %e, "testkit ledger write failed");
    }
}

/// `testkit.sleep {"ms": N}`: sleeps, then returns `{"slept_ms": N}`; stops early (retryably)
/// when cancelled.
pub async fn sleep(ctx: TaskContext, a: SleepArgs) -> Result<serde_json::Value, TaskError> {
    ledger("start", &ctx);
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(a.ms)) => {}
        _ = ctx.cancel.cancelled() => return Err(TaskError::retryable("cancelled")),
    }
    ledger("done", &ctx);
    Ok(serde_json::json!({ "slept_ms": a.ms }))
}

/// `testkit.flaky {"fail_times": N}`: retryable failure on the first N attempts.
pub async fn flaky(ctx: TaskContext, a: FlakyArgs) -> Result<serde_json::Value, TaskError> {
    ledger("start", &ctx);
    if ctx.attempt <= a.fail_times {
        return Err(TaskError::retryable(format!(
            "planned failure on attempt {}",
            ctx.attempt
        )));
    }
    ledger("done", &ctx);
    Ok(serde_json::json!({ "attempt": ctx.attempt }))
}

/// `testkit.dependent {"down_flag": path}`: needs dependency `testkit-dep` (its breaker and
/// `[limits]` entry apply); fails retryably while the flag file exists.
pub async fn dependent(ctx: TaskContext, a: DependentArgs) -> Result<serde_json::Value, TaskError> {
    ledger("start", &ctx);
    if std::path::Path::new(&a.down_flag).exists() {
        return Err(TaskError::retryable("dependency testkit-dep is down"));
    }
    ledger("done", &ctx);
    Ok(serde_json::json!({ "attempt": ctx.attempt }))
}

/// `testkit.fail {}`: always a permanent failure.
pub async fn fail(ctx: TaskContext, _a: serde_json::Value) -> Result<(), TaskError> {
    ledger("start", &ctx);
    Err(TaskError::permanent("planned permanent failure"))
}

/// `testkit.crash {"how": "panic" | "abort"}`.
pub async fn crash(ctx: TaskContext, a: CrashArgs) -> Result<(), TaskError> {
    ledger("start", &ctx);
    match a.how.as_str() {
        "panic" => panic!("planned panic in task {}", ctx.id),
        "abort" => std::process::abort(),
        other => Err(TaskError::permanent(format!(
            "how: expected panic or abort, got {other:?}"
        ))),
    }
}

/// Registers the `testkit` tasks.
pub fn register(r: &mut Registry) -> Result<(), NameError> {
    let quick = TaskPolicy {
        retry: taskmesh_shared::RetryPolicy {
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            jitter: 0.0,
            ..Default::default()
        },
        ..TaskPolicy::default()
    };
    r.register("testkit.sleep", quick.clone(), sleep)?;
    r.register("testkit.flaky", quick.clone(), flaky)?;
    r.register("testkit.fail", quick.clone(), fail)?;
    r.register(
        "testkit.dependent",
        quick.clone().with_dependency("testkit-dep"),
        dependent,
    )?;
    r.register("testkit.crash", quick, crash)?;
    Ok(())
}
