//! The built-in task catalog, one module per category. Each task is a typed handler with
//! its policy; [`register_all`] adds them to a registry.
//!
//! Every task has typed arguments (`deny_unknown_fields`; a bad value is a permanent
//! failure whose message starts with the field's name), a documented JSON result, and
//! reads its defaults from [`Settings`] (environment variables), so the default schedules,
//! which fire every task with `{}`, work — or return `{"skipped": "<why>"}` when nothing is
//! configured. `docs/tasks.md` is the user-facing reference and the migration table.
//!
//! | module | tasks |
//! |---|---|
//! | [`ai`] | `ai.run_prompt`, `ai.test_scheduler_connection` |
//! | [`email`] | `email.send`, `email.categorize_incoming_email`, `email.process_email_queue`, `email.send_daily_email_summary` |
//! | [`file`] | `file.cleanup_temp_files`, `file.backup_user_data`, `file.sync_cloud_storage` |
//! | [`sync`] | `sync.calendar_events`, `sync.notion_pages`, `sync.email_service` |
//! | [`maintenance`] | `maintenance.system_health_check`, `maintenance.cleanup_old_logs`, `maintenance.optimize_database`, `maintenance.cleanup_old_sessions` |
//!
//! Tasks that use NATS themselves (enqueue `email.send`, KV buckets, the Object Store, the
//! health check) need the connection passed to [`register_all`]; without one they fail
//! permanently with a message saying so.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use taskmesh_nats::Connection;
use taskmesh_shared::{Config, NameError, TaskError};

use crate::registry::{Registry, TaskContext, TaskPolicy};

pub mod ai;
pub mod db;
pub mod email;
pub mod file;
pub mod fsutil;
pub mod http;
pub mod ics;
pub mod imap;
pub mod maintenance;
pub mod settings;
pub mod store;
pub mod sync;
pub mod testkit;

pub use settings::Settings;

/// What every built-in task may use: settings, config, the NATS connection, an HTTP client.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// Task settings.
    pub settings: Settings,
    /// The taskmesh configuration (categories, worker settings).
    pub cfg: Arc<Config>,
    /// The NATS connection, when the caller gave one.
    pub nats: Option<Connection>,
    /// A shared HTTP client (rustls, timeouts).
    pub http: reqwest::Client,
}

impl Catalog {
    /// A catalog state. Building the HTTP client can only fail when the TLS backend cannot
    /// initialise, which is reported as a plain client without custom settings.
    pub fn new(settings: Settings, cfg: Arc<Config>, nats: Option<Connection>) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .user_agent(concat!("taskmesh/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot build the HTTP client; using defaults");
                reqwest::Client::new()
            });
        Self {
            settings,
            cfg,
            nats,
            http,
        }
    }

    /// The NATS connection, or a permanent error naming the task that needs it.
    pub fn nats(&self) -> Result<&Connection, TaskError> {
        self.nats.as_ref().ok_or_else(|| {
            TaskError::permanent(
                "this task needs a NATS connection, but the catalog was registered without one",
            )
        })
    }
}

/// Registers every built-in task with settings from the environment
/// ([`Settings::from_env`]), then applies `[tasks."…"]` overrides from config. `nats` is the
/// worker's connection, used by the tasks that enqueue, keep state in KV buckets or the
/// Object Store, or check the mesh's health.
pub fn register_all(
    registry: &mut Registry,
    cfg: &Config,
    nats: Option<Connection>,
) -> Result<(), NameError> {
    register_with(registry, cfg, nats, Settings::from_env())
}

/// [`register_all`] with explicit settings (tests, embedding).
pub fn register_with(
    registry: &mut Registry,
    cfg: &Config,
    nats: Option<Connection>,
    settings: Settings,
) -> Result<(), NameError> {
    let c = Arc::new(Catalog::new(settings, Arc::new(cfg.clone()), nats));
    ai::register(registry, &c)?;
    email::register(registry, &c)?;
    file::register(registry, &c)?;
    sync::register(registry, &c)?;
    maintenance::register(registry, &c)?;
    if cfg.categories.keys().any(|c| c.as_str() == "testkit") {
        testkit::register(registry)?;
    }
    registry.apply_config(cfg);
    Ok(())
}

/// Registers `f(catalog, ctx, args)` under `name`. Arguments are decoded here with the
/// path of the offending field in the message (`invalid arguments: to[0]: invalid type …`),
/// so every bad argument names its field; a body that is not JSON at all is still refused
/// by the registry as undecodable.
pub(crate) fn add<A, R, F, Fut>(
    r: &mut Registry,
    c: &Arc<Catalog>,
    name: &str,
    policy: TaskPolicy,
    f: F,
) -> Result<(), NameError>
where
    A: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
    F: Fn(Arc<Catalog>, TaskContext, A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, TaskError>> + Send + 'static,
{
    let c = c.clone();
    let f = Arc::new(f);
    r.register(name, policy, move |ctx, v: serde_json::Value| {
        let decoded = decode_args::<A>(v).map(|a| f(c.clone(), ctx, a));
        async move { decoded?.await }
    })?;
    Ok(())
}

/// Decodes arguments, naming the field that is wrong; `null` counts as `{}`.
pub fn decode_args<A: DeserializeOwned>(v: serde_json::Value) -> Result<A, TaskError> {
    let v = if v.is_null() {
        serde_json::Value::Object(serde_json::Map::new())
    } else {
        v
    };
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            TaskError::permanent(format!("invalid arguments: {inner}"))
        } else {
            TaskError::permanent(format!("invalid arguments: {path}: {inner}"))
        }
    })
}

/// `{"skipped": reason}`: the result of a scheduled task with nothing configured.
pub fn skipped(reason: &str) -> serde_json::Value {
    serde_json::json!({ "skipped": reason })
}

/// A task id derived from `id` for a follow-up task (`<id>-<suffix>`), kept a valid task id
/// (at most 128 characters: a long id is shortened to a digest).
pub fn derived_id(id: &str, suffix: &str) -> String {
    let candidate = format!("{id}-{suffix}");
    if candidate.len() <= 128 {
        return candidate;
    }
    format!("{}-{suffix}", &fsutil::sha256_hex(id.as_bytes())[..32])
}

/// Runs blocking work on the blocking pool; a panic there becomes a retryable error.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, TaskError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, TaskError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TaskError::retryable(format!("blocking work failed: {e}")))?
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_scheduled_task_is_registered() {
        let mut r = Registry::new();
        register_with(&mut r, &Config::default(), None, Settings::empty()).unwrap();
        for def in taskmesh_shared::schedule::default_schedules() {
            assert!(r.get(&def.task).is_some(), "{} is not registered", def.task);
        }
        for t in [
            "ai.run_prompt",
            "email.send",
            "email.categorize_incoming_email",
        ] {
            assert!(r.get(t).is_some(), "{t}");
        }
    }

    #[test]
    fn bad_arguments_name_their_field() {
        let e = decode_args::<email::SendArgs>(serde_json::json!({"to": 3, "subject": "s"}))
            .unwrap_err();
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("to"), "{e}");
        let e =
            decode_args::<file::CleanupArgs>(serde_json::json!({"dirs": ["/a", 7]})).unwrap_err();
        assert!(e.to_string().contains("dirs[1]"), "{e}");
        let e = decode_args::<file::CleanupArgs>(serde_json::json!({"dir": []})).unwrap_err();
        assert!(e.to_string().contains("`dir`"), "{e}");
        assert!(decode_args::<file::CleanupArgs>(serde_json::Value::Null).is_ok());
    }

    #[test]
    fn derived_ids_stay_valid() {
        assert_eq!(derived_id("abc", "mail"), "abc-mail");
        let long = "a".repeat(128);
        let d = derived_id(&long, "mail");
        assert!(d.len() <= 128);
        taskmesh_shared::TaskId::new(&d).unwrap();
    }
}
