//! `taskmesh dev`: one process with a local nats-server, provisioning, every category's
//! worker (and the scheduler). Ctrl-C drains the workers, then stops the server.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use taskmesh_shared::Config;
use taskmesh_workers::{Worker, WorkerOptions};

use crate::server::LocalServer;

/// Options of `taskmesh dev`.
#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// Client port of the local nats-server.
    #[arg(long, default_value_t = 4222)]
    port: u16,
    /// Where the server keeps its JetStream store and log.
    #[arg(long, default_value = ".taskmesh/dev")]
    data_dir: PathBuf,
    /// Use an already running server (`--nats-url`) instead of starting one.
    #[arg(long)]
    external: bool,
    /// Where `/healthz`, `/readyz` and `/metrics` listen.
    #[arg(long, env = "TASKMESH_HTTP_ADDR", default_value = "127.0.0.1:9090")]
    http_addr: std::net::SocketAddr,
}

/// Runs the dev mesh until Ctrl-C / SIGTERM.
pub(crate) async fn run(mut cfg: Config, args: DevArgs) -> anyhow::Result<()> {
    let shutdown = crate::shutdown_on_signals();
    let server = if args.external {
        None
    } else {
        let s = LocalServer::start(&args.data_dir, args.port, false).await?;
        tracing::info!(url = %s.url, data_dir = %args.data_dir.display(), "nats-server started");
        cfg.nats.url = s.url.clone();
        Some(s)
    };
    let result = async {
        let cfg = Arc::new(cfg);
        let conn = crate::connect(&cfg, "dev").await?;
        let report = taskmesh_nats::provision(&conn.js, &cfg).await.context("provisioning")?;
        tracing::info!(streams = report.streams.len(), consumers = report.consumers.len(), buckets = report.buckets.len(), "provisioned");
        let registry = Arc::new(crate::registry(&cfg, &conn)?);
        tracing::info!(tasks = ?registry.names(), "task catalog");
        let worker = Worker::new(conn.clone(), cfg.clone(), registry, WorkerOptions::default()).await?;
        let scheduler_metrics = Arc::new(crate::http::LateMetrics::default());
        let probes = crate::http::Probes {
            conn: Some(conn.state.clone()),
            worker: Some(worker.stats()),
            extra: vec![scheduler_metrics.clone()],
        };
        let http_stop = tokio_util::sync::CancellationToken::new();
        crate::http::serve(args.http_addr, probes, http_stop.clone()).await?;
        let w = tokio::spawn(worker.run(shutdown.clone()));
        let sched = tokio::spawn(crate::schedules::run_scheduler(
            (*cfg).clone(),
            crate::schedules::SchedulerArgs {
                metrics_sink: Some(scheduler_metrics),
                ..Default::default()
            },
            shutdown.clone(),
        ));
        println!(
            "taskmesh dev is running on {} — try: taskmesh enqueue ai.test_scheduler_connection --wait   (Ctrl-C stops)",
            cfg.nats.url
        );
        shutdown.cancelled().await;
        match tokio::time::timeout(cfg.worker.drain_grace + Duration::from_secs(10), w).await {
            Ok(Ok(r)) => r?,
            Ok(Err(e)) => tracing::error!(error = %e, "worker task failed"),
            Err(_) => tracing::error!("worker did not stop in time"),
        }
        http_stop.cancel();
        match sched.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "scheduler failed"),
            Err(e) => tracing::error!(error = %e, "scheduler task failed"),
        }
        anyhow::Ok(())
    }
    .await;
    if let Some(s) = server {
        s.stop().await;
        tracing::info!("nats-server stopped");
    }
    result
}
