//! `/healthz`, `/readyz` and `/metrics` (Prometheus text) for workers and schedulers.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use taskmesh_nats::ConnectionState;
use taskmesh_workers::Stats;
use tokio_util::sync::CancellationToken;

/// Something that adds metrics to a scrape.
pub(crate) trait MetricsSource: Send + Sync {
    /// Appends Prometheus text.
    fn render(&self, out: &mut String);
}

/// A metrics source filled in after the server started (`taskmesh dev` starts its HTTP
/// server before the scheduler exists).
#[derive(Default)]
pub(crate) struct LateMetrics(std::sync::OnceLock<Arc<dyn MetricsSource>>);

impl LateMetrics {
    /// Sets the source (first call wins).
    pub(crate) fn set(&self, source: Arc<dyn MetricsSource>) {
        let _ = self.0.set(source);
    }
}

impl std::fmt::Debug for LateMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "LateMetrics(set)"
        } else {
            "LateMetrics(unset)"
        })
    }
}

impl MetricsSource for LateMetrics {
    fn render(&self, out: &mut String) {
        if let Some(s) = self.0.get() {
            s.render(out);
        }
    }
}

/// What the endpoints report on.
#[derive(Clone, Default)]
pub(crate) struct Probes {
    /// The NATS connection (readiness needs it connected).
    pub(crate) conn: Option<Arc<ConnectionState>>,
    /// Worker counters (readiness needs every consumer bound).
    pub(crate) worker: Option<Arc<Stats>>,
    /// Further metrics (the scheduler's).
    pub(crate) extra: Vec<Arc<dyn MetricsSource>>,
}

impl Probes {
    fn readiness(&self) -> Result<(), String> {
        if let Some(c) = &self.conn
            && !c.is_connected()
        {
            return Err("not connected to NATS".into());
        }
        if let Some(w) = &self.worker
            && !w.all_bound()
        {
            let unbound: Vec<String> = w
                .categories()
                .into_iter()
                .filter(|(_, c)| !c.bound.load(Ordering::Relaxed))
                .map(|(n, _)| n)
                .collect();
            return Err(format!("consumers not bound for: {}", unbound.join(", ")));
        }
        Ok(())
    }

    fn metrics(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(out, "# HELP taskmesh_build_info taskmesh version.");
        let _ = writeln!(out, "# TYPE taskmesh_build_info gauge");
        let _ = writeln!(
            out,
            "taskmesh_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        if let Some(c) = &self.conn {
            let _ = writeln!(
                out,
                "# HELP taskmesh_nats_connected Whether the NATS connection is up (1) or not (0)."
            );
            let _ = writeln!(out, "# TYPE taskmesh_nats_connected gauge");
            let _ = writeln!(
                out,
                "taskmesh_nats_connected {}",
                u8::from(c.is_connected())
            );
            let _ = writeln!(
                out,
                "# HELP taskmesh_nats_reconnects_total Reconnections to NATS since start."
            );
            let _ = writeln!(out, "# TYPE taskmesh_nats_reconnects_total counter");
            let _ = writeln!(out, "taskmesh_nats_reconnects_total {}", c.reconnects());
            let _ = writeln!(
                out,
                "# HELP taskmesh_nats_disconnects_total Disconnections from NATS since start."
            );
            let _ = writeln!(out, "# TYPE taskmesh_nats_disconnects_total counter");
            let _ = writeln!(out, "taskmesh_nats_disconnects_total {}", c.disconnects());
        }
        if let Some(w) = &self.worker {
            w.render_prometheus(&mut out);
        }
        for e in &self.extra {
            e.render(&mut out);
        }
        out
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(p): State<Probes>) -> impl IntoResponse {
    match p.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics(State(p): State<Probes>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        p.metrics(),
    )
}

/// The router (also used by the API server).
pub(crate) fn router(probes: Probes) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(probes)
}

/// Binds `addr` (falling back to a free port on the same interface when it is taken, so
/// several local replicas can run) and serves until `shutdown`. Logs the bound address.
pub(crate) async fn serve(
    addr: SocketAddr,
    probes: Probes,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let fallback = SocketAddr::new(addr.ip(), 0);
            tracing::warn!(%addr, "http address in use; using a free port instead (pass --http-addr to choose)");
            tokio::net::TcpListener::bind(fallback).await?
        }
        Err(e) => return Err(anyhow::anyhow!("cannot bind --http-addr {addr}: {e}")),
    };
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "http listening on {bound} (/healthz /readyz /metrics)");
    let app = router(probes);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "http server failed");
        }
    });
    Ok(bound)
}
