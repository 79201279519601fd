//! Logs and traces. Logs: human-readable on a terminal, JSON with
//! `TASKMESH_LOG_FORMAT=json`, level from `RUST_LOG`. Traces: exported over OTLP when the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set —
//! `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` for gRPC, HTTP/protobuf otherwise; off (and free) by
//! default, and off when `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes pending spans.
#[derive(Debug, Default)]
pub(crate) struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporter.
    pub(crate) fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            eprintln!("warning: flushing traces failed: {e}");
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Is OTLP export asked for by the environment?
fn otlp_requested() -> bool {
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled
        && (env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
            || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some())
}

fn build_provider(service: &str) -> anyhow::Result<SdkTracerProvider> {
    let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "http/protobuf".into());
    let exporter = if protocol.eq_ignore_ascii_case("grpc") {
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?
    } else {
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()?
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(format!("taskmesh-{service}"));
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Installs the global subscriber. `long_running` services log at `info` by default,
/// one-shot verbs only at `warn`. Must run inside the tokio runtime (the gRPC exporter
/// needs it).
pub(crate) fn init(service: &str, long_running: bool) -> Telemetry {
    let default = if long_running {
        "info,async_nats=warn"
    } else {
        "warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let json = env("TASKMESH_LOG_FORMAT").is_some_and(|v| v.eq_ignore_ascii_case("json"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // The level filter applies to log output only, so spans exported to OpenTelemetry do
    // not depend on RUST_LOG.
    let fmt: Box<dyn Layer<_> + Send + Sync> = if json {
        fmt.json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed()
    } else {
        fmt.with_ansi(std::io::stderr().is_terminal() && env("NO_COLOR").is_none())
            .with_target(false)
            .with_filter(filter)
            .boxed()
    };
    let (otel, provider, error) = if otlp_requested() {
        match build_provider(service) {
            Ok(p) => {
                let layer = tracing_opentelemetry::layer()
                    .with_tracer(p.tracer("taskmesh"))
                    .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                        m.is_span() && (m.name() == "publish" || m.name() == "process")
                    }));
                (Some(layer), Some(p), None)
            }
            Err(e) => (None, None, Some(e)),
        }
    } else {
        (None, None, None)
    };
    tracing_subscriber::registry().with(fmt).with(otel).init();
    if let Some(e) = error {
        tracing::error!(error = %e, "cannot set up OTLP trace export; continuing without traces");
    }
    if provider.is_some() {
        taskmesh_nats::trace::set_enabled(true);
        tracing::info!("exporting traces over OTLP");
    }
    Telemetry { provider }
}
