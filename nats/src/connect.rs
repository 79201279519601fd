//! Connecting to NATS from config, with connection state visible to health checks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use taskmesh_shared::config::NatsConfig;

use crate::error::NatsError;

/// Live connection state, updated by the client's event callback.
#[derive(Debug, Default)]
pub struct ConnectionState {
    connected: AtomicBool,
    ever_connected: AtomicBool,
    reconnects: AtomicU64,
    disconnects: AtomicU64,
}

impl ConnectionState {
    /// Is the client connected right now?
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    /// Reconnections since start.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
    /// Disconnections since start.
    pub fn disconnects(&self) -> u64 {
        self.disconnects.load(Ordering::Relaxed)
    }
}

/// A NATS client with its JetStream context and state.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The core client.
    pub client: async_nats::Client,
    /// The JetStream context.
    pub js: jetstream::Context,
    /// Connection state for health checks and metrics.
    pub state: Arc<ConnectionState>,
}

/// Connects with the configured identity; retries the first connect too, so a worker that
/// starts before its server comes up waits instead of crash-looping. Returns once connected
/// or after `first_connect_timeout`.
pub async fn connect(
    cfg: &NatsConfig,
    service: &str,
    first_connect_timeout: Duration,
) -> Result<Connection, NatsError> {
    let state = Arc::new(ConnectionState::default());
    let cb_state = state.clone();
    let mut opts = async_nats::ConnectOptions::new()
        .name(
            cfg.name
                .clone()
                .unwrap_or_else(|| format!("taskmesh-{service}")),
        )
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(Some(cfg.request_timeout))
        .reconnect_delay_callback(|attempts| {
            // 50 ms, doubling, capped at 2 s: quick recovery after a server restart,
            // no hot loop during a long outage.
            let exp = attempts.min(6) as u32;
            Duration::from_millis(50 * 2u64.pow(exp)).min(Duration::from_secs(2))
        })
        .event_callback(move |event| {
            let s = cb_state.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        s.connected.store(true, Ordering::Relaxed);
                        if s.ever_connected.swap(true, Ordering::Relaxed) {
                            s.reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::info!("connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        s.connected.store(false, Ordering::Relaxed);
                        s.disconnects.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("disconnected from NATS; reconnecting");
                    }
                    async_nats::Event::LameDuckMode => {
                        tracing::warn!("NATS server entered lame duck mode");
                    }
                    async_nats::Event::ServerError(e) => {
                        // Permission violations land here: make them visible.
                        tracing::warn!(error = %e, "NATS server error");
                    }
                    async_nats::Event::SlowConsumer(sid) => {
                        tracing::warn!(
                            subscription = sid,
                            "slow consumer: messages dropped by the client"
                        );
                    }
                    other => tracing::debug!(event = %other, "NATS client event"),
                }
            }
        });
    if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &cfg.token {
        opts = opts.token(t.clone());
    }
    if let Some(path) = &cfg.nkey_file {
        let seed = std::fs::read_to_string(path).map_err(|source| NatsError::File {
            path: path.clone(),
            source,
        })?;
        opts = opts.nkey(seed.trim().to_owned());
    }
    if let Some(path) = &cfg.creds_file {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|source| NatsError::File {
                path: path.clone(),
                source,
            })?;
    }
    if let Some(ca) = &cfg.tls_ca {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if cfg.tls_required {
        opts = opts.require_tls(true);
    }
    if let Some(prefix) = &cfg.inbox_prefix {
        opts = opts.custom_inbox_prefix(prefix.clone());
    }
    let addrs: Vec<async_nats::ServerAddr> = cfg
        .url
        .split(',')
        .map(|s| s.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<_, _>>()
        .map_err(|e| NatsError::Connect {
            url: cfg.url.clone(),
            source: Box::new(e),
        })?;
    let client = opts.connect(addrs).await.map_err(|e| NatsError::Connect {
        url: cfg.url.clone(),
        source: Box::new(e),
    })?;
    // With retry_on_initial_connect, connect() returns at once; wait for the first connect.
    let deadline = tokio::time::Instant::now() + first_connect_timeout;
    while client.connection_state() != async_nats::connection::State::Connected {
        if tokio::time::Instant::now() >= deadline {
            return Err(NatsError::Connect {
                url: cfg.url.clone(),
                source: format!(
                    "no connection within {first_connect_timeout:?}: is nats-server running? \
                     (`taskmesh dev` starts one)"
                )
                .into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    state.connected.store(true, Ordering::Relaxed);
    state.ever_connected.store(true, Ordering::Relaxed);
    let mut js = jetstream::new(client.clone());
    js.set_timeout(cfg.request_timeout);
    Ok(Connection { client, js, state })
}
