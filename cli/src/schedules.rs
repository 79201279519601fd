//! `taskmesh scheduler` and `taskmesh schedules …` (placeholder until the scheduler lands).

use clap::{Args, Subcommand};
use taskmesh_shared::Config;
use tokio_util::sync::CancellationToken;

/// Options of `taskmesh scheduler`.
#[derive(Debug, Args, Default)]
pub(crate) struct SchedulerArgs {}

/// `taskmesh schedules …` verbs.
#[derive(Debug, Subcommand)]
pub(crate) enum SchedulesCmd {
    /// List schedules.
    List,
}

/// Runs the scheduler until `shutdown` fires.
pub(crate) async fn run_scheduler(
    _cfg: Config,
    _args: SchedulerArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    shutdown.cancelled().await;
    Ok(())
}

/// Runs a `schedules` verb; returns the exit code.
pub(crate) async fn schedules(_cfg: Config, _cmd: SchedulesCmd) -> anyhow::Result<i32> {
    anyhow::bail!("the scheduler is not built yet")
}
