//! The raw schedule definition — plain serde data, as written in the config file's
//! `[[schedules]]` tables or stored as JSON in the `TASKMESH_SCHEDULES` KV bucket — and
//! [`default_schedules`], the predecessor's Celery Beat entries.
//!
//! Nothing here is validated beyond what serde checks (field names and types). The
//! scheduler compiles a [`ScheduleDef`] into a checked schedule (`taskmesh_scheduler::spec`)
//! and refuses a bad name, task, cron expression, interval or time zone there, with the
//! schedule's name in the message.
//!
//! ```toml
//! [[schedules]]
//! name = "cleanup-temp-files"
//! task = "file.cleanup_temp_files"
//! cron = "0 2 * * *"             # 5-field crontab, 6-field with seconds, or @daily …
//! timezone = "UTC"               # IANA name; cron is evaluated in it
//! args = {}
//! catch_up = "latest"            # none | latest | all (bounded by max_catch_up)
//! ```

use serde::{Deserialize, Serialize};

/// The time zone a schedule uses when none is given.
pub const DEFAULT_TIMEZONE: &str = "UTC";

/// How many missed slots `catch_up = "all"` fires at most when none is given.
pub const DEFAULT_MAX_CATCH_UP: u32 = 100;

/// One `[[schedules]]` entry (static config) or one value in KV `TASKMESH_SCHEDULES`
/// (dynamic, key = [`name`](Self::name)).
///
/// Set exactly one of [`cron`](Self::cron) and [`every`](Self::every).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleDef {
    /// The schedule's name, unique across static and dynamic schedules: lower-case letters,
    /// digits, `_` and `-` (kebab-case by convention, `cleanup-temp-files`). It is part of
    /// every fire's id, so renaming a schedule starts it afresh (no cursor, no catch-up).
    pub name: String,
    /// The task each fire enqueues, `<category>.<name>` (`file.cleanup_temp_files`).
    pub task: String,
    /// A cron expression evaluated in [`timezone`](Self::timezone): 5 fields
    /// (`min hour day-of-month month day-of-week`), 6 fields with seconds first, or one of
    /// `@hourly`, `@daily`, `@midnight`, `@weekly`, `@monthly`, `@yearly`/`@annually`.
    /// Use it for wall-clock times ("0 8 * * *" is 08:00 every day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// A fixed interval (`"30s"`, `"10m"`, `"1h30m"`, humantime syntax), whole seconds, at
    /// least 1s. Slots are the multiples of the interval since the Unix epoch (UTC), so every
    /// replica computes the same slots; the time zone plays no part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    /// IANA time zone name the cron expression is evaluated in (`Europe/Berlin`).
    /// If unsure: `UTC`, which has no daylight-saving surprises.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// The task's arguments: the JSON body of every fire. Default `{}`.
    #[serde(default = "default_args")]
    pub args: serde_json::Value,
    /// What a newly elected leader does about slots that passed while no leader fired them.
    /// If unsure: `latest`.
    #[serde(default)]
    pub catch_up: CatchUp,
    /// With `catch_up = "all"`, fire at most this many missed slots (the newest ones),
    /// 1..=10000. If unsure: 100.
    #[serde(default = "default_max_catch_up")]
    pub max_catch_up: u32,
    /// A disabled schedule is kept (and validated) but never fires. Default true.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
}

/// What to do about slots missed while no scheduler leader was firing (a restart, a
/// failover, an outage), counted from the schedule's cursor (the last fired slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Skip missed slots; fire only future ones.
    None,
    /// Fire the most recent missed slot once, skip older ones (Celery Beat's behaviour).
    #[default]
    Latest,
    /// Fire every missed slot, oldest first, at most `max_catch_up` of them (the newest).
    All,
}

fn default_timezone() -> String {
    DEFAULT_TIMEZONE.to_owned()
}

fn default_args() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

fn default_max_catch_up() -> u32 {
    DEFAULT_MAX_CATCH_UP
}

fn default_enabled() -> bool {
    true
}

impl ScheduleDef {
    /// A cron schedule with every other field at its default (UTC, args `{}`, catch up the
    /// latest slot, enabled).
    pub fn new_cron(name: impl Into<String>, task: impl Into<String>, cron: &str) -> Self {
        Self {
            cron: Some(cron.to_owned()),
            ..Self::bare(name.into(), task.into())
        }
    }

    /// An interval schedule (`every = "10m"`) with every other field at its default.
    pub fn new_every(name: impl Into<String>, task: impl Into<String>, every: &str) -> Self {
        Self {
            every: Some(every.to_owned()),
            ..Self::bare(name.into(), task.into())
        }
    }

    fn bare(name: String, task: String) -> Self {
        Self {
            name,
            task,
            cron: None,
            every: None,
            timezone: default_timezone(),
            args: default_args(),
            catch_up: CatchUp::default(),
            max_catch_up: default_max_catch_up(),
            enabled: default_enabled(),
        }
    }
}

/// The default schedule set: the predecessor's Celery Beat entries, with the beat entries'
/// kebab-case names and the same times (UTC), targeting the built-in taskmesh tasks.
///
/// "Every N minutes" entries use cron `*/N`, aligned to the clock as Celery's
/// `crontab(minute='*/N')` was; wall-clock times use plain cron ("0 8 * * *"). Every entry
/// has args `{}` and catches up the latest missed slot.
///
/// `process-due-ai-tasks` (a 10-minute poll for due user AI tasks) is deliberately not
/// here: each due prompt or reminder becomes its own dynamic schedule (KV
/// `TASKMESH_SCHEDULES`) targeting `ai.run_prompt`, so it fires at its exact time instead
/// of up to ten minutes late.
///
/// `cleanup-old-logs` runs at 04:00, the time in the predecessor's final notes (its plan
/// said 02:00).
pub fn default_schedules() -> Vec<ScheduleDef> {
    [
        (
            "test-scheduler-connection",
            "ai.test_scheduler_connection",
            "*/30 * * * *",
        ),
        (
            "process-email-queue",
            "email.process_email_queue",
            "*/5 * * * *",
        ),
        (
            "send-daily-email-summary",
            "email.send_daily_email_summary",
            "0 8 * * *",
        ),
        ("cleanup-temp-files", "file.cleanup_temp_files", "0 2 * * *"),
        ("backup-user-data", "file.backup_user_data", "0 1 * * 0"),
        (
            "sync-cloud-storage",
            "file.sync_cloud_storage",
            "0 */6 * * *",
        ),
        ("sync-calendar-events", "sync.calendar_events", "0 * * * *"),
        ("sync-notion-pages", "sync.notion_pages", "0 */2 * * *"),
        ("sync-email-service", "sync.email_service", "*/30 * * * *"),
        (
            "optimize-database",
            "maintenance.optimize_database",
            "0 3 * * 0",
        ),
        (
            "cleanup-old-logs",
            "maintenance.cleanup_old_logs",
            "0 4 * * *",
        ),
        (
            "cleanup-old-sessions",
            "maintenance.cleanup_old_sessions",
            "0 4 * * *",
        ),
        (
            "system-health-check",
            "maintenance.system_health_check",
            "*/15 * * * *",
        ),
    ]
    .into_iter()
    .map(|(name, task, cron)| ScheduleDef::new_cron(name, task, cron))
    .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly
mod tests {
    use super::*;
    use crate::names::{TaskName, is_token};

    #[derive(Deserialize)]
    struct File {
        schedules: Vec<ScheduleDef>,
    }

    #[test]
    fn design_example_parses() {
        let text = r#"
[[schedules]]
name = "process-due-ai-tasks"
task = "ai.process_due_ai_tasks"
cron = "*/10 * * * *"          # 5-field crontab, or 6-field with seconds; or every = "10m"
timezone = "UTC"
args = {}
catch_up = "latest"            # none | latest | all (bounded by max_catch_up)
"#;
        let file: File = toml::from_str(text).unwrap();
        assert_eq!(
            file.schedules,
            vec![ScheduleDef::new_cron(
                "process-due-ai-tasks",
                "ai.process_due_ai_tasks",
                "*/10 * * * *"
            )]
        );
    }

    #[test]
    fn every_and_all_fields_parse() {
        let text = r#"
[[schedules]]
name = "poll"
task = "sync.poll"
every = "1h30m"
timezone = "Europe/Berlin"
args = { account = 7, tags = ["a"] }
catch_up = "all"
max_catch_up = 5
enabled = false
"#;
        let file: File = toml::from_str(text).unwrap();
        let def = &file.schedules[0];
        assert_eq!(def.every.as_deref(), Some("1h30m"));
        assert_eq!(def.cron, None);
        assert_eq!(def.timezone, "Europe/Berlin");
        assert_eq!(def.args, serde_json::json!({"account": 7, "tags": ["a"]}));
        assert_eq!(def.catch_up, CatchUp::All);
        assert_eq!(def.max_catch_up, 5);
        assert!(!def.enabled);
    }

    #[test]
    fn unknown_field_is_rejected() {
        let toml_text = "[[schedules]]\nname = \"a\"\ntask = \"b.c\"\ncron = \"* * * * *\"\ncatchup = \"all\"\n";
        assert!(toml::from_str::<File>(toml_text).is_err());
        let json = r#"{"name":"a","task":"b.c","every":"1m","tz":"UTC"}"#;
        assert!(serde_json::from_str::<ScheduleDef>(json).is_err());
    }

    #[test]
    fn unknown_catch_up_is_rejected() {
        let json = r#"{"name":"a","task":"b.c","every":"1m","catch_up":"some"}"#;
        assert!(serde_json::from_str::<ScheduleDef>(json).is_err());
    }

    #[test]
    fn defaults_apply() {
        let def: ScheduleDef =
            serde_json::from_str(r#"{"name":"a","task":"b.c","every":"10m"}"#).unwrap();
        assert_eq!(def.timezone, "UTC");
        assert_eq!(def.args, serde_json::json!({}));
        assert_eq!(def.catch_up, CatchUp::Latest);
        assert_eq!(def.max_catch_up, 100);
        assert!(def.enabled);
        assert_eq!(def.cron, None);
        assert_eq!(def, ScheduleDef::new_every("a", "b.c", "10m"));
    }

    #[test]
    fn json_round_trip_omits_unset_trigger() {
        let def = ScheduleDef::new_cron("a", "b.c", "0 8 * * *");
        let json = serde_json::to_value(&def).unwrap();
        assert!(json.get("every").is_none());
        assert_eq!(json["catch_up"], "latest");
        let back: ScheduleDef = serde_json::from_value(json).unwrap();
        assert_eq!(back, def);
    }

    #[test]
    fn default_set_matches_the_seed_catalog() {
        let defs = default_schedules();
        assert_eq!(defs.len(), 13);
        let mut names: Vec<&str> = defs.iter().map(|d| d.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 13, "names are unique");
        for d in &defs {
            assert!(is_token(&d.name), "{}", d.name);
            TaskName::parse(&d.task).unwrap();
            assert!(d.cron.is_some() && d.every.is_none(), "{}", d.name);
            assert_eq!(d.timezone, "UTC");
            assert_eq!(d.args, serde_json::json!({}));
            assert!(d.enabled);
        }
        let cron_of = |name: &str| {
            defs.iter()
                .find(|d| d.name == name)
                .and_then(|d| d.cron.clone())
                .unwrap()
        };
        let expected = [
            ("test-scheduler-connection", "*/30 * * * *"),
            ("process-email-queue", "*/5 * * * *"),
            ("send-daily-email-summary", "0 8 * * *"),
            ("cleanup-temp-files", "0 2 * * *"),
            ("backup-user-data", "0 1 * * 0"),
            ("sync-cloud-storage", "0 */6 * * *"),
            ("sync-calendar-events", "0 * * * *"),
            ("sync-notion-pages", "0 */2 * * *"),
            ("sync-email-service", "*/30 * * * *"),
            ("optimize-database", "0 3 * * 0"),
            ("cleanup-old-logs", "0 4 * * *"),
            ("cleanup-old-sessions", "0 4 * * *"),
            ("system-health-check", "*/15 * * * *"),
        ];
        for (name, cron) in expected {
            assert_eq!(cron_of(name), cron, "{name}");
        }
        assert!(!defs.iter().any(|d| d.name == "process-due-ai-tasks"));
    }
}
