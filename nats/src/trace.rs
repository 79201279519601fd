//! W3C trace context in NATS headers: the one place it is injected and extracted.
//!
//! Spans follow the OpenTelemetry messaging conventions: `publish <subject>` (producer) on
//! enqueue, `process <subject>` (consumer) per delivery. Tracing is off until the binary
//! installs an OpenTelemetry layer and calls [`set_enabled`]; while off, no span is created
//! on the publish path and a producer's own `traceparent` passes through untouched.
//!
//! Header values are capped ([`MAX_TRACE_HEADER`]); `baggage` is never propagated.

use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::HeaderMap;
use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use taskmesh_shared::wire::headers as h;

/// Longest `traceparent` / `tracestate` value read or written; longer ones are ignored.
pub const MAX_TRACE_HEADER: usize = 512;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns span creation and context injection on (the binary does this when it installs an
/// OpenTelemetry exporter; tests with an in-memory exporter do it too).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Is OpenTelemetry tracing on?
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Parses a `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex>`) and an optional
/// `tracestate` into a remote span context; `None` when absent, oversized or malformed.
pub fn parse_traceparent(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    if traceparent.len() > MAX_TRACE_HEADER {
        return None;
    }
    let mut parts = traceparent.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2
        || version == "ff"
        || trace.len() != 32
        || span.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace_id = TraceId::from_hex(trace)
        .ok()
        .filter(|t| *t != TraceId::INVALID)?;
    let span_id = SpanId::from_hex(span)
        .ok()
        .filter(|s| *s != SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let state = tracestate
        .filter(|s| s.len() <= MAX_TRACE_HEADER)
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags),
        true,
        state,
    ))
}

/// Formats a span context as a `traceparent` value.
pub fn format_traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// The remote span context a message carries, if any.
pub fn extract(headers: Option<&HeaderMap>) -> Option<SpanContext> {
    let hs = headers?;
    let tp = hs.get(h::TRACEPARENT)?.as_str();
    parse_traceparent(tp, hs.get(h::TRACESTATE).map(|v| v.as_str()))
}

/// Writes `cx`'s span as `traceparent` (and `tracestate`) unless the headers already
/// carry one (a producer's explicit context wins). Never writes `baggage`.
pub fn inject(headers: &mut HeaderMap, cx: &Context) {
    if headers.get(h::TRACEPARENT).is_some() {
        return;
    }
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return;
    }
    headers.insert(h::TRACEPARENT, format_traceparent(sc).as_str());
    let state = sc.trace_state().header();
    if !state.is_empty() && state.len() <= MAX_TRACE_HEADER {
        headers.insert(h::TRACESTATE, state.as_str());
    }
}

/// The lower-case hex trace id of a `traceparent` value.
pub fn trace_id_hex(sc: &SpanContext) -> String {
    sc.trace_id().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trip_and_caps() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(tp, Some("vendor=x")).unwrap_or_else(|| unreachable!());
        assert_eq!(format_traceparent(&sc), tp);
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(sc.trace_state().header(), "vendor=x");
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            assert!(parse_traceparent(bad, None).is_none(), "{bad:?}");
        }
        let huge = format!("{tp}{}", " ".repeat(MAX_TRACE_HEADER));
        assert!(parse_traceparent(&huge, None).is_none());
        let big_state = "a=".to_string() + &"b".repeat(MAX_TRACE_HEADER);
        let sc = parse_traceparent(tp, Some(&big_state)).unwrap_or_else(|| unreachable!());
        assert_eq!(
            sc.trace_state().header(),
            "",
            "oversized tracestate dropped"
        );
    }

    #[test]
    fn inject_keeps_an_explicit_context_and_skips_invalid_ones() {
        let mut hs = HeaderMap::new();
        inject(&mut hs, &Context::new());
        assert!(hs.get(h::TRACEPARENT).is_none());
        let sc = parse_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        )
        .unwrap_or_else(|| unreachable!());
        inject(
            &mut hs,
            &Context::new().with_remote_span_context(sc.clone()),
        );
        assert_eq!(extract(Some(&hs)), Some(sc));
        let other = parse_traceparent(
            "00-11111111111111111111111111111111-2222222222222222-01",
            None,
        )
        .unwrap_or_else(|| unreachable!());
        inject(&mut hs, &Context::new().with_remote_span_context(other));
        assert_eq!(
            hs.get(h::TRACEPARENT).map(|v| v.as_str()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert!(hs.get(h::BAGGAGE).is_none());
    }
}
