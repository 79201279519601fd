//! Settings of the built-in tasks: where the mail, files, feeds and databases are.
//!
//! Every setting comes from one environment variable (read once, when the catalog is
//! registered, by [`Settings::from_env`]); a task's own arguments override the setting for
//! one run. A task whose setting is missing and whose arguments do not name one returns
//! `{"skipped": "<why>"}` instead of failing, so the default schedules (which fire every task
//! with `{}`) are harmless on a machine where nothing is configured.
//!
//! | variable | used by | meaning |
//! |---|---|---|
//! | `TASKMESH_AI_BASE_URL` | `ai.run_prompt` | OpenAI-compatible API base, e.g. `https://api.openai.com/v1` (`/chat/completions` is appended) |
//! | `TASKMESH_AI_API_KEY` | `ai.run_prompt` | bearer token (optional for local servers) |
//! | `TASKMESH_AI_MODEL` | `ai.run_prompt` | default model; default `gpt-4o-mini` |
//! | `TASKMESH_SMTP_URL` | `email.send` | `smtp://host:port` (plain, local only), `smtp://…?tls=required` (STARTTLS), `smtps://host:465` (implicit TLS); credentials as `user:password@` |
//! | `TASKMESH_SMTP_FROM` | `email.send` | sender address; default `taskmesh@localhost` |
//! | `TASKMESH_SUMMARY_TO` | `email.send_daily_email_summary` | recipients, comma-separated |
//! | `TASKMESH_MAILDIR` | `email.process_email_queue`, `sync.email_service` | the Maildir inbox (`new/`, `cur/`, `tmp/`) |
//! | `TASKMESH_EMAIL_RULES` | `email.*` categorization | JSON rule list, inline or the path of a JSON file |
//! | `TASKMESH_TEMP_DIRS` | `file.cleanup_temp_files` | comma-separated directories |
//! | `TASKMESH_TEMP_MAX_AGE` | `file.cleanup_temp_files` | default `24h` |
//! | `TASKMESH_BACKUP_SOURCES` | `file.backup_user_data` | comma-separated files or directories |
//! | `TASKMESH_BACKUP_DEST` | `file.backup_user_data` | where archives go |
//! | `TASKMESH_BACKUP_KEEP` | `file.backup_user_data` | archives kept; default 4 |
//! | `TASKMESH_SYNC_DIR` | `file.sync_cloud_storage` | directory to upload |
//! | `TASKMESH_SYNC_BUCKET` | `file.sync_cloud_storage` | Object Store bucket; default `TASKMESH_FILES` |
//! | `TASKMESH_SYNC_DELETE` | `file.sync_cloud_storage` | `true` deletes objects whose file is gone |
//! | `TASKMESH_CALENDAR_URLS` | `sync.calendar_events` | comma-separated ICS feed URLs |
//! | `TASKMESH_NOTION_BASE_URL` | `sync.notion_pages` | default `https://api.notion.com` |
//! | `TASKMESH_NOTION_TOKEN` | `sync.notion_pages` | integration token |
//! | `TASKMESH_NOTION_DATABASE_ID` | `sync.notion_pages` | database to query |
//! | `TASKMESH_IMAP_URL` | `sync.email_service` | `imap://user:pass@host:143/INBOX` or `imaps://…:993/INBOX` |
//! | `TASKMESH_LOG_DIRS` | `maintenance.cleanup_old_logs` | comma-separated directories |
//! | `TASKMESH_LOG_MAX_AGE` | `maintenance.cleanup_old_logs` | default `14d` |
//! | `TASKMESH_LOG_COMPRESS_AFTER` | `maintenance.cleanup_old_logs` | gzip logs older than this (unset: never) |
//! | `TASKMESH_DATABASE_URL` | `maintenance.optimize_database`, `maintenance.cleanup_old_sessions` | `sqlite:///path/app.db` or `postgres://user:pass@host/db` |
//! | `TASKMESH_SESSIONS_TABLE` | `maintenance.cleanup_old_sessions` | default `sessions` |
//! | `TASKMESH_SESSIONS_EXPIRES_COLUMN` | `maintenance.cleanup_old_sessions` | default `expires_at` |
//! | `TASKMESH_HEALTH_MAX_PENDING` | `maintenance.system_health_check` | pending tasks per category before "degraded"; default 1000 |

use std::path::PathBuf;
use std::time::Duration;

/// Settings of the built-in tasks (see the module docs for the environment variables).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Settings {
    /// OpenAI-compatible API base URL.
    pub ai_base_url: Option<String>,
    /// Bearer token for the AI API.
    pub ai_api_key: Option<String>,
    /// Default model.
    pub ai_model: String,
    /// SMTP URL.
    pub smtp_url: Option<String>,
    /// Sender address.
    pub smtp_from: String,
    /// Daily summary recipients.
    pub summary_to: Vec<String>,
    /// The Maildir inbox.
    pub maildir: Option<PathBuf>,
    /// Categorization rules (JSON text: a list of rules).
    pub email_rules: Option<String>,
    /// Temp directories to clean.
    pub temp_dirs: Vec<PathBuf>,
    /// Age after which a temp file is removed.
    pub temp_max_age: Duration,
    /// What to back up.
    pub backup_sources: Vec<PathBuf>,
    /// Where backups go.
    pub backup_dest: Option<PathBuf>,
    /// Backups kept.
    pub backup_keep: usize,
    /// Directory synchronized into the Object Store.
    pub sync_dir: Option<PathBuf>,
    /// Object Store bucket.
    pub sync_bucket: String,
    /// Delete objects whose file is gone.
    pub sync_delete: bool,
    /// ICS feed URLs.
    pub calendar_urls: Vec<String>,
    /// Notion API base URL.
    pub notion_base_url: String,
    /// Notion token.
    pub notion_token: Option<String>,
    /// Notion database id.
    pub notion_database_id: Option<String>,
    /// IMAP URL.
    pub imap_url: Option<String>,
    /// Log directories.
    pub log_dirs: Vec<PathBuf>,
    /// Age after which a log file is removed.
    pub log_max_age: Duration,
    /// Age after which a log file is gzipped.
    pub log_compress_after: Option<Duration>,
    /// Database URL (`sqlite://…` or `postgres://…`).
    pub database_url: Option<String>,
    /// Sessions table.
    pub sessions_table: String,
    /// Sessions expiry column.
    pub sessions_expires_column: String,
    /// Pending tasks per category before the health check says degraded.
    pub health_max_pending: u64,
}

/// The default AI model.
pub const DEFAULT_AI_MODEL: &str = "gpt-4o-mini";
/// The default Notion API base.
pub const DEFAULT_NOTION_BASE_URL: &str = "https://api.notion.com";
/// The default Object Store bucket of `file.sync_cloud_storage`.
pub const DEFAULT_SYNC_BUCKET: &str = taskmesh_shared::wire::FILES_OBJECT_STORE;

impl Settings {
    /// Every setting at its default, nothing configured.
    pub fn empty() -> Self {
        Self {
            ai_model: DEFAULT_AI_MODEL.into(),
            smtp_from: "taskmesh@localhost".into(),
            temp_max_age: Duration::from_secs(24 * 3600),
            backup_keep: 4,
            sync_bucket: DEFAULT_SYNC_BUCKET.into(),
            notion_base_url: DEFAULT_NOTION_BASE_URL.into(),
            log_max_age: Duration::from_secs(14 * 24 * 3600),
            sessions_table: "sessions".into(),
            sessions_expires_column: "expires_at".into(),
            health_max_pending: 1000,
            ..Self::default()
        }
    }

    /// Reads the `TASKMESH_*` environment variables. A value that does not parse is logged
    /// and ignored (the default applies), so a typo never stops a worker.
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads settings through `get` (the environment, or a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let s = |k: &str| {
            get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let list = |k: &str| -> Vec<String> {
            s(k).map(|v| {
                v.split(',')
                    .map(|x| x.trim().to_owned())
                    .filter(|x| !x.is_empty())
                    .collect()
            })
            .unwrap_or_default()
        };
        let paths = |k: &str| list(k).into_iter().map(PathBuf::from).collect::<Vec<_>>();
        let dur = |k: &str, d: Duration| {
            match s(k) {
            None => d,
            Some(v) => parse_duration(&v).unwrap_or_else(|| {
                tracing::warn!(variable = k, value = %v, "not a duration (`24h`, `90s`); using the default");
                d
            }),
        }
        };
        let num = |k: &str, d: u64| match s(k) {
            None => d,
            Some(v) => v.parse().unwrap_or_else(|_| {
                tracing::warn!(variable = k, value = %v, "not a number; using the default");
                d
            }),
        };
        let e = Self::empty();
        Self {
            ai_base_url: s("TASKMESH_AI_BASE_URL"),
            ai_api_key: s("TASKMESH_AI_API_KEY"),
            ai_model: s("TASKMESH_AI_MODEL").unwrap_or(e.ai_model),
            smtp_url: s("TASKMESH_SMTP_URL"),
            smtp_from: s("TASKMESH_SMTP_FROM").unwrap_or(e.smtp_from),
            summary_to: list("TASKMESH_SUMMARY_TO"),
            maildir: s("TASKMESH_MAILDIR").map(PathBuf::from),
            email_rules: s("TASKMESH_EMAIL_RULES"),
            temp_dirs: paths("TASKMESH_TEMP_DIRS"),
            temp_max_age: dur("TASKMESH_TEMP_MAX_AGE", e.temp_max_age),
            backup_sources: paths("TASKMESH_BACKUP_SOURCES"),
            backup_dest: s("TASKMESH_BACKUP_DEST").map(PathBuf::from),
            backup_keep: usize::try_from(num("TASKMESH_BACKUP_KEEP", e.backup_keep as u64))
                .unwrap_or(e.backup_keep),
            sync_dir: s("TASKMESH_SYNC_DIR").map(PathBuf::from),
            sync_bucket: s("TASKMESH_SYNC_BUCKET").unwrap_or(e.sync_bucket),
            sync_delete: s("TASKMESH_SYNC_DELETE").is_some_and(|v| v == "true" || v == "1"),
            calendar_urls: list("TASKMESH_CALENDAR_URLS"),
            notion_base_url: s("TASKMESH_NOTION_BASE_URL").unwrap_or(e.notion_base_url),
            notion_token: s("TASKMESH_NOTION_TOKEN"),
            notion_database_id: s("TASKMESH_NOTION_DATABASE_ID"),
            imap_url: s("TASKMESH_IMAP_URL"),
            log_dirs: paths("TASKMESH_LOG_DIRS"),
            log_max_age: dur("TASKMESH_LOG_MAX_AGE", e.log_max_age),
            log_compress_after: s("TASKMESH_LOG_COMPRESS_AFTER").and_then(|v| parse_duration(&v)),
            database_url: s("TASKMESH_DATABASE_URL"),
            sessions_table: s("TASKMESH_SESSIONS_TABLE").unwrap_or(e.sessions_table),
            sessions_expires_column: s("TASKMESH_SESSIONS_EXPIRES_COLUMN")
                .unwrap_or(e.sessions_expires_column),
            health_max_pending: num("TASKMESH_HEALTH_MAX_PENDING", e.health_max_pending),
        }
    }
}

/// `90s`, `24h`, `14d` (humantime syntax) or a plain number of seconds.
pub fn parse_duration(v: &str) -> Option<Duration> {
    if let Ok(n) = v.parse::<u64>() {
        return Some(Duration::from_secs(n));
    }
    humantime::parse_duration(v).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn env_values_parse_with_defaults() {
        let m: HashMap<&str, &str> = [
            ("TASKMESH_TEMP_DIRS", "/tmp/a, /tmp/b,,"),
            ("TASKMESH_TEMP_MAX_AGE", "2h"),
            ("TASKMESH_LOG_MAX_AGE", "nonsense"),
            ("TASKMESH_BACKUP_KEEP", "7"),
            ("TASKMESH_SYNC_DELETE", "true"),
        ]
        .into_iter()
        .collect();
        let s = Settings::from_lookup(|k| m.get(k).map(|v| (*v).to_owned()));
        assert_eq!(
            s.temp_dirs,
            vec![PathBuf::from("/tmp/a"), PathBuf::from("/tmp/b")]
        );
        assert_eq!(s.temp_max_age, Duration::from_secs(7200));
        assert_eq!(s.log_max_age, Duration::from_secs(14 * 24 * 3600));
        assert_eq!(s.backup_keep, 7);
        assert!(s.sync_delete);
        assert_eq!(s.ai_model, DEFAULT_AI_MODEL);
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("x"), None);
    }
}
