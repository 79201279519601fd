//! Configuration: one TOML file (`--config FILE` / `TASKMESH_CONFIG`), every field with a
//! default so an empty file is a working single-node set-up with the five seed categories.
//!
//! ```toml
//! [nats]
//! url = "nats://127.0.0.1:4222"
//!
//! [categories.email]
//! concurrency = 8          # merged over the built-in seed categories
//!
//! [tasks."email.send"]
//! max_attempts = 6
//! timeout = "30s"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::names::{Category, TaskName};
use crate::schedule::ScheduleDef;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML did not parse or had unknown fields.
    #[error("invalid config: {0}")]
    Parse(String),
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// How to reach NATS.
    pub nats: NatsConfig,
    /// Stream settings shared by every category stream.
    pub streams: StreamConfig,
    /// Result storage.
    pub results: ResultsConfig,
    /// Dead-letter storage.
    pub dlq: DlqConfig,
    /// Worker runtime settings.
    pub worker: WorkerConfig,
    /// Scheduler settings.
    pub scheduler: SchedulerConfig,
    /// Tracing settings.
    pub tracing: TracingConfig,
    /// Keep the five seed categories (`ai`, `email`, `file`, `sync`, `maintenance`) under
    /// the ones this file declares. If unsure: true.
    pub seed_categories: bool,
    /// Per-category settings, merged over the seed categories.
    pub categories: BTreeMap<Category, CategoryConfig>,
    /// Per-task policy overrides, keyed by full task name.
    pub tasks: BTreeMap<TaskName, TaskPolicyConfig>,
    /// Static schedules (`[[schedules]]`), fired in addition to the defaults unless
    /// `scheduler.default_schedules = false`.
    pub schedules: Vec<ScheduleDef>,
    /// Circuit breakers by dependency name (`[breakers.smtp]`); a dependency a task names
    /// without a section here gets the defaults.
    pub breakers: BTreeMap<String, BreakerConfig>,
    /// Shared rate limits by dependency name (`[limits] smtp = "10/s"`), held across every
    /// worker process together.
    pub limits: BTreeMap<String, String>,
    /// Body encryption for chosen categories.
    pub encryption: EncryptionConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats: NatsConfig::default(),
            streams: StreamConfig::default(),
            results: ResultsConfig::default(),
            dlq: DlqConfig::default(),
            worker: WorkerConfig::default(),
            scheduler: SchedulerConfig::default(),
            tracing: TracingConfig::default(),
            seed_categories: true,
            categories: BTreeMap::new(),
            tasks: BTreeMap::new(),
            schedules: Vec::new(),
            breakers: BTreeMap::new(),
            limits: BTreeMap::new(),
            encryption: EncryptionConfig::default(),
        }
        .with_seeds()
    }
}

/// The seed categories and their worker concurrency (from the predecessor's deployment).
pub const SEED_CATEGORIES: [(&str, usize); 5] = [
    ("ai", 1),
    ("email", 4),
    ("file", 2),
    ("sync", 2),
    ("maintenance", 1),
];

impl Config {
    /// Parses TOML text and validates it.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let cfg = cfg.with_seeds();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text)
    }

    fn with_seeds(mut self) -> Self {
        if self.seed_categories {
            for (name, concurrency) in SEED_CATEGORIES {
                if let Ok(c) = Category::new(name) {
                    self.categories.entry(c).or_insert_with(|| CategoryConfig {
                        concurrency,
                        ..CategoryConfig::default()
                    });
                }
            }
        }
        self
    }

    /// Checks ranges and cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.streams.replicas == 0 || self.streams.replicas > 5 {
            return bad(format!(
                "streams.replicas must be 1..=5, got {}",
                self.streams.replicas
            ));
        }
        if self.streams.max_msg_size < 1024 {
            return bad("streams.max_msg_size must be at least 1024 bytes".into());
        }
        for (name, c) in &self.categories {
            if c.concurrency == 0 {
                return bad(format!("categories.{name}.concurrency must be at least 1"));
            }
            if c.max_deliver < 1 {
                return bad(format!("categories.{name}.max_deliver must be at least 1"));
            }
            if c.ack_wait < Duration::from_secs(1) {
                return bad(format!("categories.{name}.ack_wait must be at least 1s"));
            }
            if c.max_ack_pending < 1 {
                return bad(format!(
                    "categories.{name}.max_ack_pending must be at least 1"
                ));
            }
        }
        for (task, p) in &self.tasks {
            if !self.categories.contains_key(&task.category()) {
                return bad(format!(
                    "tasks.\"{task}\": category {} is not configured",
                    task.category_str()
                ));
            }
            if p.max_attempts == Some(0) {
                return bad(format!("tasks.\"{task}\".max_attempts must be at least 1"));
            }
            if let Some(r) = &p.rate_limit {
                parse_rate(r).map_err(|e| {
                    ConfigError::Invalid(format!("tasks.\"{task}\".rate_limit: {e}"))
                })?;
            }
        }
        for (name, r) in &self.limits {
            parse_rate(r).map_err(|e| ConfigError::Invalid(format!("limits.{name}: {e}")))?;
        }
        for (name, b) in &self.breakers {
            if b.failure_threshold == 0 {
                return bad(format!(
                    "breakers.{name}.failure_threshold must be at least 1"
                ));
            }
        }
        self.encryption
            .keyring()
            .map_err(|e| ConfigError::Invalid(format!("encryption: {e}")))?;
        Ok(())
    }

    /// The enabled categories, in name order.
    pub fn enabled_categories(&self) -> impl Iterator<Item = (&Category, &CategoryConfig)> {
        self.categories.iter().filter(|(_, c)| c.enabled)
    }

    /// Settings of one category, or a clear error naming the known ones.
    pub fn category(&self, c: &Category) -> Result<&CategoryConfig, ConfigError> {
        self.categories.get(c).filter(|c| c.enabled).ok_or_else(|| {
            let known: Vec<&str> = self.enabled_categories().map(|(c, _)| c.as_str()).collect();
            ConfigError::Invalid(format!(
                "unknown category {c:?}: configured categories are {}",
                known.join(", ")
            ))
        })
    }
}

/// How to reach NATS. Every field can also come from the environment in the CLI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated. `NATS_URL`. If unsure: `nats://127.0.0.1:4222`.
    pub url: String,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`).
    pub password: Option<String>,
    /// Token authentication.
    pub token: Option<String>,
    /// A file holding an nkey seed (`SU…`).
    pub nkey_file: Option<PathBuf>,
    /// A `.creds` file (JWT + nkey seed).
    pub creds_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify the server.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    pub tls_key: Option<PathBuf>,
    /// Require TLS even if the server does not ask for it.
    pub tls_required: bool,
    /// Prefix for this service's reply inboxes (least-privilege deployments give each
    /// service its own, instead of `_INBOX`).
    pub inbox_prefix: Option<String>,
    /// Client connection name shown in server monitoring.
    pub name: Option<String>,
    /// JetStream API request timeout. If unsure: 5s.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            user: None,
            password: None,
            token: None,
            nkey_file: None,
            creds_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            inbox_prefix: None,
            name: None,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Settings shared by every task stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// Replicas of every stream and bucket: 1 for dev, 3 for a production cluster.
    pub replicas: usize,
    /// JetStream de-duplication window for `Nats-Msg-Id`. If unsure: 10m.
    #[serde(with = "duration")]
    pub duplicate_window: Duration,
    /// Largest task body accepted, in bytes (headers included). If unsure: 1 MiB.
    pub max_msg_size: i32,
    /// Keep at most this many bytes per task stream (`-1` = unlimited).
    pub max_bytes: i64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            replicas: 1,
            duplicate_window: Duration::from_secs(600),
            max_msg_size: 1024 * 1024,
            max_bytes: -1,
        }
    }
}

/// Result storage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResultsConfig {
    /// Write result records at all. If unsure: true.
    pub enabled: bool,
    /// How long a record is kept. If unsure: 24h.
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// Also write a `running` record for tasks that run longer than 200 ms (tasks that
    /// finish sooner get only their final record). If unsure: true.
    pub record_running: bool,
}

impl Default for ResultsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl: Duration::from_secs(24 * 3600),
            record_running: true,
        }
    }
}

/// Dead-letter storage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DlqConfig {
    /// How long dead letters are kept. If unsure: 30 days.
    #[serde(with = "duration")]
    pub max_age: Duration,
}

impl Default for DlqConfig {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Worker runtime settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Largest pull batch (the runtime never asks for more than its free capacity).
    /// If unsure: 256.
    pub max_batch: usize,
    /// How long an idle long-poll waits for a message before asking again; also bounds how
    /// long a drain waits for outstanding polls. If unsure: 2s.
    #[serde(with = "duration")]
    pub pull_expires: Duration,
    /// SIGTERM grace: in-flight tasks get this long to finish before they are Nak'ed.
    /// If unsure: 25s (Kubernetes' default termination grace is 30s).
    #[serde(with = "duration")]
    pub drain_grace: Duration,
    /// Heartbeat period in `TASKMESH_WORKERS` (the entry expires after 3 missed beats).
    #[serde(with = "duration")]
    pub heartbeat_interval: Duration,
    /// Ack successful tasks with a confirmed (double) ack: slower, but a success is never
    /// redelivered after the worker saw the confirmation. If unsure: false.
    pub double_ack: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            max_batch: 256,
            pull_expires: Duration::from_secs(2),
            drain_grace: Duration::from_secs(25),
            heartbeat_interval: Duration::from_secs(5),
            double_ack: false,
        }
    }
}

/// Scheduler settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Fire the predecessor's default schedule set (see `docs/tasks.md`). If unsure: true.
    pub default_schedules: bool,
    /// Leader lease time-to-live: a dead leader is replaced within about this long, and a
    /// slot that falls due meanwhile fires up to about this late. It is also the max age
    /// of the `TASKMESH_LEASES` bucket (set by `taskmesh provision`; the scheduler uses the
    /// bucket's value when they differ). Whole seconds, at least 1. If unsure: 5s.
    #[serde(with = "duration")]
    pub lease_ttl: Duration,
    /// A leader that finds a slot more than this late when it comes due (the wall clock
    /// jumped forward, the process stalled) treats the late slots as missed and applies
    /// the schedule's `catch_up` instead of firing each one. At least 1s. If unsure: 10s.
    #[serde(with = "duration")]
    pub max_fire_lag: Duration,
    /// How long before its slot a regular fire is published, as a JetStream message
    /// schedule (`Nats-Schedule: @at <slot>` on `delayed.<category>.<task id>`) that the
    /// server releases onto the task subject at the slot, so the leader's publishes (and
    /// its own stalls) are off the critical path. A fire is committed when its message
    /// schedule is stored: pausing or removing a dynamic schedule, or losing the leader,
    /// in the last `publish_ahead` before a slot does not stop that one fire (it still runs
    /// exactly once). Not a whole number of seconds: slots are whole seconds, so the
    /// publishes for one slot would land on the server's release of another. `0s` publishes
    /// each fire at its slot; otherwise 300ms to 1m. If unsure: 700ms.
    #[serde(with = "duration")]
    pub publish_ahead: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            default_schedules: true,
            lease_ttl: Duration::from_secs(5),
            max_fire_lag: Duration::from_secs(10),
            publish_ahead: Duration::from_millis(700),
        }
    }
}

/// Tracing settings (export itself is configured by the standard `OTEL_*` variables).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// Continue the producer's trace on a task's first attempt. When false (publishers you
    /// do not trust), every task starts a new trace with a link to the incoming context.
    /// Retries and scheduled fires always start a new trace linked to it. If unsure: true.
    pub trust_incoming: bool,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            trust_incoming: true,
        }
    }
}

/// One category: its stream, consumers and worker pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CategoryConfig {
    /// Serve and provision this category. If unsure: true.
    pub enabled: bool,
    /// Tasks one worker process runs at once in this category.
    pub concurrency: usize,
    /// How long the server waits for an ack before redelivering; running tasks send a
    /// progress signal every `ack_wait / 3`. If unsure: 30s.
    #[serde(with = "duration")]
    pub ack_wait: Duration,
    /// Server-side delivery cap per message (the attempt budget can never exceed it).
    /// If unsure: 10.
    pub max_deliver: i64,
    /// In-flight cap across every replica of the consumer. If unsure: 1000.
    pub max_ack_pending: i64,
    /// Default attempt budget of this category's tasks (`Task-Max-Attempts` overrides it).
    /// If unsure: 4 (the predecessor's `max_retries=3`).
    pub max_attempts: u32,
}

impl Default for CategoryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            concurrency: 1,
            ack_wait: Duration::from_secs(30),
            max_deliver: 10,
            max_ack_pending: 1000,
            max_attempts: 4,
        }
    }
}

/// Per-task overrides of the handler's built-in policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskPolicyConfig {
    /// Attempt budget.
    pub max_attempts: Option<u32>,
    /// Delay before the first retry.
    #[serde(with = "opt_duration")]
    pub initial_delay: Option<Duration>,
    /// Cap of the retry delay.
    #[serde(with = "opt_duration")]
    pub max_delay: Option<Duration>,
    /// Hard time limit of one attempt.
    #[serde(with = "opt_duration")]
    pub timeout: Option<Duration>,
    /// Store result records for this task (`false` trades visibility for throughput).
    pub store_result: Option<bool>,
    /// Soft time limit: the handler's cancellation token fires, the attempt goes on.
    #[serde(with = "opt_duration")]
    pub soft_timeout: Option<Duration>,
    /// A rate limit of this task across every worker (`"10/s"`, `"600/m"`).
    pub rate_limit: Option<String>,
    /// The dependency this task needs (`smtp`, `notion`): its circuit breaker and its
    /// `[limits]` entry apply.
    pub dependency: Option<String>,
}

/// A circuit breaker: closed → open after `failure_threshold` failures within `window` →
/// half-open after `open_for` (up to `half_open_probes` trial tasks) → closed on success.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Failures that open the breaker. If unsure: 5.
    pub failure_threshold: u32,
    /// The window failures are counted in. If unsure: 30s.
    #[serde(with = "duration")]
    pub window: Duration,
    /// How long it stays open before probing. If unsure: 30s.
    #[serde(with = "duration")]
    pub open_for: Duration,
    /// Trial tasks let through while half-open. If unsure: 1.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            window: Duration::from_secs(30),
            open_for: Duration::from_secs(30),
            half_open_probes: 1,
        }
    }
}

/// Body encryption: categories whose task bodies are sealed (XChaCha20-Poly1305), and the
/// keyring. Keys are 32 random bytes, base64 (`taskmesh keygen`); keep them out of the
/// config file in production with `keys_file` (a TOML file with `current` and `[keys]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    /// Categories whose bodies are encrypted; a plain body there is refused.
    pub categories: Vec<Category>,
    /// Key id new bodies are sealed with.
    pub current: Option<String>,
    /// Keys by id (old ones stay for decrypt after a rotation).
    pub keys: BTreeMap<String, String>,
    /// A TOML file holding `current` and `[keys]`, read at start (overrides the above).
    pub keys_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    current: String,
    keys: BTreeMap<String, String>,
}

impl EncryptionConfig {
    /// The keyring, if any category is encrypted.
    pub fn keyring(&self) -> Result<Option<crate::crypto::Keyring>, String> {
        if self.categories.is_empty() {
            return Ok(None);
        }
        let (current, keys) = match &self.keys_file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
                let f: KeysFile =
                    toml::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
                (f.current, f.keys)
            }
            None => (
                self.current
                    .clone()
                    .ok_or("set current (the key id to seal with)")?,
                self.keys.clone(),
            ),
        };
        crate::crypto::Keyring::new(&current, &keys)
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

/// A rate: `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Events allowed…
    pub count: u32,
    /// …per this period.
    pub per: Duration,
}

impl Rate {
    /// The spacing between two events.
    pub fn interval(&self) -> Duration {
        self.per / self.count.max(1)
    }
}

/// Parses `"10/s"`, `"600/m"`, `"5/h"`, `"100/10s"`.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let (n, per) = s.split_once('/').ok_or_else(|| {
        format!("invalid rate {s:?}: expected <count>/<period>, e.g. 10/s or 600/m")
    })?;
    let count: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("invalid rate {s:?}: {n:?} is not a whole number"))?;
    if count == 0 {
        return Err(format!("invalid rate {s:?}: count must be at least 1"));
    }
    let per = match per.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        other => parse_duration(other).map_err(|e| format!("invalid rate {s:?}: {e}"))?,
    };
    if per.is_zero() {
        return Err(format!("invalid rate {s:?}: period must not be zero"));
    }
    Ok(Rate { count, per })
}

/// Parses a duration: a humantime string (`"30s"`, `"10m"`, `"1h 30m"`) or whole seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Serde for `Duration` as a humantime string (or whole seconds).
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }

    /// Serializes as `"30s"`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// Accepts `"30s"` or `30`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Secs(n) => Ok(Duration::from_secs(n)),
            Raw::Text(t) => super::parse_duration(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// Serde for `Option<Duration>` (see [`duration`]).
pub mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes `None` as nothing and `Some(d)` as `"30s"`.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    /// Accepts what [`super::duration`] accepts.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct W(#[serde(with = "super::duration")] Duration);
        Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_has_the_five_seeds() {
        let c = Config::from_toml_str("").unwrap();
        let got: Vec<(String, usize)> = c
            .categories
            .iter()
            .map(|(k, v)| (k.to_string(), v.concurrency))
            .collect();
        assert_eq!(
            got,
            [
                ("ai", 1),
                ("email", 4),
                ("file", 2),
                ("maintenance", 1),
                ("sync", 2)
            ]
            .map(|(a, b)| (a.to_string(), b))
        );
    }

    #[test]
    fn file_values_merge_over_seeds() {
        let c = Config::from_toml_str(
            r#"
            [categories.email]
            concurrency = 8
            ack_wait = "1m"
            [categories.reports]
            concurrency = 3
            [tasks."email.send"]
            max_attempts = 6
            timeout = 30
            "#,
        )
        .unwrap();
        assert_eq!(c.categories.len(), 6);
        let email = &c.categories[&Category::new("email").unwrap()];
        assert_eq!(
            (email.concurrency, email.ack_wait),
            (8, Duration::from_secs(60))
        );
        let t = &c.tasks[&TaskName::parse("email.send").unwrap()];
        assert_eq!(t.timeout, Some(Duration::from_secs(30)));
    }

    #[test]
    fn rates() {
        assert_eq!(
            parse_rate("10/s").unwrap().interval(),
            Duration::from_millis(100)
        );
        assert_eq!(
            parse_rate("600/m").unwrap().interval(),
            Duration::from_millis(100)
        );
        assert_eq!(
            parse_rate("100/10s").unwrap().interval(),
            Duration::from_millis(100)
        );
        for bad in ["10", "0/s", "x/s", "10/fortnight", "10/0s"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        let e = Config::from_toml_str("[limits]\nsmtp = \"ten/s\"").unwrap_err();
        assert!(e.to_string().contains("limits.smtp"), "{e}");
    }

    #[test]
    fn scheduler_publish_ahead() {
        let c = Config::from_toml_str("").unwrap();
        assert_eq!(c.scheduler.publish_ahead, Duration::from_millis(700));
        let c = Config::from_toml_str("[scheduler]\npublish_ahead = \"1s 500ms\"").unwrap();
        assert_eq!(c.scheduler.publish_ahead, Duration::from_millis(1500));
        let c = Config::from_toml_str("[scheduler]\npublish_ahead = 0").unwrap();
        assert_eq!(c.scheduler.publish_ahead, Duration::ZERO);
        let c = Config::from_toml_str("[scheduler]\npublish_ahead = \"0s\"").unwrap();
        assert_eq!(c.scheduler.publish_ahead, Duration::ZERO);
        let text = toml::to_string(&c.scheduler).unwrap();
        assert!(text.contains("publish_ahead = \"0s\""), "{text}");
    }

    #[test]
    fn errors_name_the_field() {
        let e = Config::from_toml_str("[categories.email]\nconcurrency = 0").unwrap_err();
        assert!(
            matches!(e, ConfigError::Invalid(ref m) if m.contains("categories.email.concurrency")),
            "{e}"
        );
        let e = Config::from_toml_str("[nats]\nurll = 'x'").unwrap_err();
        assert!(
            matches!(e, ConfigError::Parse(ref m) if m.contains("urll")),
            "{e}"
        );
        let e = Config::from_toml_str("[tasks.\"nope.x\"]\nmax_attempts = 1").unwrap_err();
        assert!(matches!(e, ConfigError::Invalid(_)), "{e}");
        assert!(Config::from_toml_str("[categories.\"Bad\"]").is_err());
    }
}
