//! Compiled schedules and the pure time logic behind them: which instants (slots) a
//! schedule fires at, which slots were missed, and the ids a fire is published under.
//! No I/O and no clock: every function takes the instants it needs.
//!
//! A [`ScheduleDef`] (plain config data) is [`compile`](Schedule::compile)d once into a
//! [`Schedule`]; every problem is reported then, with the schedule's name, so nothing
//! fails later at fire time.
//!
//! # Slots
//!
//! A schedule's slots are a fixed set of whole-second UTC instants that depends only on the
//! definition, never on when a replica started, so every replica (and every new leader)
//! computes the same slots and the same fire ids. [`Schedule::next_fire`] is the first slot
//! strictly after an instant.
//!
//! **`every`** slots are the multiples of the interval since the Unix epoch, in UTC:
//! `every = "10m"` fires at :00, :10, :20, … of every hour; `every = "24h"` at 00:00 UTC.
//! The time zone plays no part (it is still validated).
//!
//! **`cron`** expressions are evaluated on the wall clock of the schedule's IANA time zone.
//! Days when the clock jumps are handled like vixie-cron and croner do, depending on the
//! expression's hour field:
//!
//! - **Interval jobs** — the hour field matches every hour (`*/15 * * * *`,
//!   `0 * * * *`, `@hourly`, `* * * * *`): the job fires at every real instant whose local
//!   wall time matches. A wall time skipped by a spring-forward gap never happens, so it
//!   does not fire (in New York on 2026-03-08, `0 * * * *` fires at 01:00 EST and then
//!   03:00 EDT, one real hour later); a wall time repeated by a fall-back overlap fires
//!   twice, once in each offset (01:00 EDT and 01:00 EST on 2026-11-01), so the real
//!   interval between fires never grows or shrinks.
//! - **Wall-clock jobs** — every other expression (`30 2 * * *`, `0 8 * * 1-5`,
//!   `0 */2 * * *`, `*/15 1 * * *`): the job fires once per matching wall time.
//!   - A wall time repeated by a fall-back overlap fires **once**, at its first occurrence
//!     (`30 1 * * *` in New York on 2026-11-01 fires at 01:30 EDT, not again at 01:30 EST).
//!   - A wall time skipped by a spring-forward gap fires **once, at the first valid
//!     instant after the gap** (`30 2 * * *` in New York on 2026-03-08 fires at 03:00 EDT).
//!     Several skipped wall times (`*/15 2 * * *`) still fire only once there, and a slot
//!     that also matches that instant (`0 3 * * *`) is the same slot, not a second one.
//!
//! Expressions take 5 fields (`minute hour day-of-month month day-of-week`), 6 with
//! seconds first, or an alias: `@yearly`/`@annually`, `@monthly`, `@weekly`, `@daily`,
//! `@midnight`, `@hourly`. Names (`MON`, `JAN`), ranges, lists, steps, `L`, `W` and `#`
//! are accepted as croner reads them; when both day fields are restricted a day matching
//! either one matches (vixie-cron). An expression that can never fire (`0 0 30 2 *`) is
//! refused.
//!
//! # Fire ids
//!
//! Two ids name each fire (see [`Schedule::fire_id`] and [`Schedule::fire_task_id`]):
//! `cleanup-temp-files@2026-11-29T02:00:00Z`, the `Nats-Msg-Id` the wire contract
//! specifies, and `cleanup-temp-files_20261129T020000Z`, a valid task id for the `Task-Id`
//! header and the result key.

use std::collections::VecDeque;
use std::str::FromStr;

use chrono::{DateTime, LocalResult, NaiveDateTime, SecondsFormat, TimeDelta, TimeZone, Utc};
use chrono_tz::{GapInfo, Tz};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use taskmesh_shared::names::{NameError, TaskName, is_token};
use taskmesh_shared::schedule::{CatchUp, ScheduleDef};

/// The longest schedule name: the name plus a 17-character slot suffix must stay a valid
/// task id (at most 128 characters).
pub const MAX_NAME_LEN: usize = 100;

/// The largest accepted `max_catch_up`.
pub const MAX_CATCH_UP_LIMIT: u32 = 10_000;

/// At most this many wall times are examined for one slot: only the matches inside one
/// fall-back overlap can be skipped, which is far fewer.
const MAX_WALL_STEPS: usize = 1_000_000;

/// Why a schedule definition was refused. Every message starts with the schedule's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    /// The name is empty, too long, or has a character outside `[a-z0-9_-]`.
    #[error(
        "schedule {schedule:?}: invalid name: use 1 to {MAX_NAME_LEN} characters from a-z, 0-9, '_' and '-'"
    )]
    InvalidName {
        /// The refused name.
        schedule: String,
    },
    /// The task is not `<category>.<name>` with valid tokens.
    #[error(
        "schedule {schedule:?}: invalid task {task:?}: expected <category>.<name> from a-z, 0-9, '_' and '-', for example file.cleanup_temp_files"
    )]
    InvalidTask {
        /// The schedule's name.
        schedule: String,
        /// The refused task name.
        task: String,
        /// What was wrong with it.
        #[source]
        source: NameError,
    },
    /// Neither or both of `cron` and `every` were set.
    #[error("schedule {schedule:?}: set exactly one of cron or every")]
    Trigger {
        /// The schedule's name.
        schedule: String,
    },
    /// The cron expression did not parse, or can never fire.
    #[error("schedule {schedule:?}: invalid cron expression {expr:?}: {reason}")]
    InvalidCron {
        /// The schedule's name.
        schedule: String,
        /// The refused expression.
        expr: String,
        /// Why, in words.
        reason: String,
    },
    /// The `every` interval did not parse or is not a whole number of seconds.
    #[error("schedule {schedule:?}: invalid every {every:?}: {reason}")]
    InvalidEvery {
        /// The schedule's name.
        schedule: String,
        /// The refused interval.
        every: String,
        /// Why, in words.
        reason: String,
    },
    /// The `every` interval is shorter than one second.
    #[error("schedule {schedule:?}: every must be at least 1s, got {every:?}")]
    EveryTooShort {
        /// The schedule's name.
        schedule: String,
        /// The refused interval.
        every: String,
    },
    /// The time zone is not an IANA name known to this build.
    #[error(
        "schedule {schedule:?}: unknown timezone {timezone:?}: use an IANA name such as \"UTC\" or \"Europe/Berlin\""
    )]
    UnknownTimezone {
        /// The schedule's name.
        schedule: String,
        /// The refused time zone.
        timezone: String,
    },
    /// `max_catch_up` is outside `1..=10000`.
    #[error("schedule {schedule:?}: max_catch_up must be 1..={MAX_CATCH_UP_LIMIT}, got {value}")]
    MaxCatchUp {
        /// The schedule's name.
        schedule: String,
        /// The refused value.
        value: u32,
    },
}

impl ScheduleError {
    /// The name of the schedule that was refused.
    pub fn schedule(&self) -> &str {
        match self {
            Self::InvalidName { schedule }
            | Self::InvalidTask { schedule, .. }
            | Self::Trigger { schedule }
            | Self::InvalidCron { schedule, .. }
            | Self::InvalidEvery { schedule, .. }
            | Self::EveryTooShort { schedule, .. }
            | Self::UnknownTimezone { schedule, .. }
            | Self::MaxCatchUp { schedule, .. } => schedule,
        }
    }
}

/// When a schedule fires.
#[derive(Debug, Clone)]
enum Trigger {
    /// A cron expression on the schedule's wall clock.
    Cron {
        /// Boxed: a parsed pattern is a few hundred bytes.
        cron: Box<Cron>,
        /// A wall-clock job (the hour field does not match every hour): a repeated wall
        /// time fires once, a skipped one fires at the end of the gap. Otherwise an
        /// interval job: every real matching instant fires.
        wall_clock: bool,
    },
    /// Multiples of this many seconds (at least 1) since the Unix epoch.
    Every { secs: i64 },
}

/// A validated, compiled schedule: the definition plus its parsed trigger and time zone.
///
/// See the [module docs](self) for which instants it fires at.
#[derive(Debug, Clone)]
pub struct Schedule {
    def: ScheduleDef,
    task: TaskName,
    trigger: Trigger,
    tz: Tz,
}

impl Schedule {
    /// Validates `def` and compiles its trigger and time zone.
    ///
    /// Checks, in this order: the name (`[a-z0-9_-]`, 1 to [`MAX_NAME_LEN`] characters),
    /// the task (`<category>.<name>`), exactly one of `cron` and `every`, the expression or
    /// interval, the time zone, and `max_catch_up` (1..=[`MAX_CATCH_UP_LIMIT`]). `args` may
    /// be any JSON value.
    pub fn compile(def: &ScheduleDef) -> Result<Schedule, ScheduleError> {
        let schedule = || def.name.clone();
        if def.name.len() > MAX_NAME_LEN || !is_token(&def.name) {
            return Err(ScheduleError::InvalidName {
                schedule: schedule(),
            });
        }
        let task = TaskName::parse(&def.task).map_err(|source| ScheduleError::InvalidTask {
            schedule: schedule(),
            task: def.task.clone(),
            source,
        })?;
        let trigger = match (&def.cron, &def.every) {
            (Some(expr), None) => {
                let cron = parse_cron(expr).map_err(|reason| ScheduleError::InvalidCron {
                    schedule: schedule(),
                    expr: expr.clone(),
                    reason,
                })?;
                let wall_clock = !(0..24).all(|h| cron.pattern.hour_match(h).unwrap_or(false));
                Trigger::Cron {
                    cron: Box::new(cron),
                    wall_clock,
                }
            }
            (None, Some(every)) => Trigger::Every {
                secs: parse_every(&def.name, every)?,
            },
            _ => {
                return Err(ScheduleError::Trigger {
                    schedule: schedule(),
                });
            }
        };
        let tz = Tz::from_str(&def.timezone).map_err(|_| ScheduleError::UnknownTimezone {
            schedule: schedule(),
            timezone: def.timezone.clone(),
        })?;
        if !(1..=MAX_CATCH_UP_LIMIT).contains(&def.max_catch_up) {
            return Err(ScheduleError::MaxCatchUp {
                schedule: schedule(),
                value: def.max_catch_up,
            });
        }
        Ok(Schedule {
            def: def.clone(),
            task,
            trigger,
            tz,
        })
    }

    /// The schedule's name (`cleanup-temp-files`).
    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// The task every fire enqueues.
    pub fn task(&self) -> &TaskName {
        &self.task
    }

    /// The JSON body of every fire.
    pub fn args(&self) -> &serde_json::Value {
        &self.def.args
    }

    /// The definition this schedule was compiled from.
    pub fn def(&self) -> &ScheduleDef {
        &self.def
    }

    /// What a new leader does about missed slots (see [`missed_slots`](Self::missed_slots)).
    pub fn catch_up(&self) -> CatchUp {
        self.def.catch_up
    }

    /// Whether the schedule fires at all. The slot functions ignore this flag: a disabled
    /// schedule still has slots, the scheduler just does not fire them.
    pub fn enabled(&self) -> bool {
        self.def.enabled
    }

    /// The time zone a cron expression is evaluated in (unused by `every`).
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// The first slot strictly after `after`, or `None` if there is none (only past the year
    /// 5000 or at the end of `DateTime`'s range). Slots are whole seconds.
    pub fn next_fire(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // A slot is a whole second, so "after `after`" is "after its whole second".
        let after = DateTime::from_timestamp(after.timestamp(), 0)?;
        match &self.trigger {
            Trigger::Every { secs } => {
                let next = after
                    .timestamp()
                    .div_euclid(*secs)
                    .checked_add(1)?
                    .checked_mul(*secs)?;
                DateTime::from_timestamp(next, 0)
            }
            Trigger::Cron {
                cron,
                wall_clock: false,
            } => cron
                .find_next_occurrence(&after.with_timezone(&self.tz), false)
                .ok()
                .map(|slot| slot.with_timezone(&Utc)),
            Trigger::Cron {
                cron,
                wall_clock: true,
            } => self.next_wall_clock(cron, after),
        }
    }

    /// Wall-clock jobs: walk the matching wall times forward from `after`'s wall time and
    /// map each to its instant (first occurrence in an overlap, end of the gap in a gap).
    /// That mapping never decreases, so the first instant past `after` is the next slot;
    /// only the wall times of an overlap that `after` is already in the later half of map
    /// to instants at or before `after` and are stepped over.
    fn next_wall_clock(&self, cron: &Cron, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut wall = after.with_timezone(&self.tz).naive_local();
        for _ in 0..MAX_WALL_STEPS {
            wall = cron.find_next_occurrence(&wall, false).ok()?;
            if let Some(slot) = self.wall_to_slot(wall)
                && slot > after
            {
                return Some(slot);
            }
        }
        None
    }

    /// The slot a wall-clock job's matching wall time fires at.
    fn wall_to_slot(&self, wall: NaiveDateTime) -> Option<DateTime<Utc>> {
        match self.tz.from_local_datetime(&wall) {
            LocalResult::Single(at) | LocalResult::Ambiguous(at, _) => Some(at.with_timezone(&Utc)),
            LocalResult::None => GapInfo::new(&wall, &self.tz)?
                .end
                .map(|at| at.with_timezone(&Utc)),
        }
    }

    /// The slots in `(after_exclusive, until_inclusive]`, oldest first, at most `limit` of
    /// them (the oldest ones).
    pub fn slots_between(
        &self,
        after_exclusive: DateTime<Utc>,
        until_inclusive: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut slots = Vec::new();
        let mut at = after_exclusive;
        while slots.len() < limit {
            match self.next_fire(at) {
                Some(slot) if slot <= until_inclusive => {
                    slots.push(slot);
                    at = slot;
                }
                _ => break,
            }
        }
        slots
    }

    /// The slots a leader should fire now for the time it was not firing, oldest first:
    /// the slots in `(cursor, now]` filtered by [`catch_up`](Self::catch_up).
    ///
    /// - `cursor = None` (the schedule never fired, for example it is new): nothing is
    ///   missed; the schedule starts with its next slot.
    /// - `none`: nothing.
    /// - `latest`: the most recent slot in `(cursor, now]`, if any.
    /// - `all`: every slot in `(cursor, now]`, but at most `max_catch_up` of them — the
    ///   newest ones, so a long outage does not replay ancient history.
    ///
    /// `cursor` is the last fired slot; a slot equal to `now` counts as missed (it is due).
    pub fn missed_slots(
        &self,
        cursor: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Vec<DateTime<Utc>> {
        let Some(cursor) = cursor else {
            return Vec::new();
        };
        match self.def.catch_up {
            CatchUp::None => Vec::new(),
            CatchUp::Latest => self.newest_slots(cursor, now, 1),
            CatchUp::All => self.newest_slots(cursor, now, self.def.max_catch_up as usize),
        }
    }

    /// The newest `n` slots in `(after, until]`, oldest first. Scans a window ending at
    /// `until` that doubles until it holds `n` slots or reaches `after`, so the cost
    /// follows the slots returned, not the length of the outage.
    fn newest_slots(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        n: usize,
    ) -> Vec<DateTime<Utc>> {
        if n == 0 || until <= after {
            return Vec::new();
        }
        let mut span = TimeDelta::minutes(1);
        loop {
            let start = until
                .checked_sub_signed(span)
                .filter(|start| *start > after)
                .unwrap_or(after);
            let mut newest = VecDeque::with_capacity(n);
            let mut at = start;
            while let Some(slot) = self.next_fire(at).filter(|slot| *slot <= until) {
                if newest.len() == n {
                    newest.pop_front();
                }
                newest.push_back(slot);
                at = slot;
            }
            if newest.len() == n || start == after {
                return newest.into();
            }
            span = span.checked_mul(2).unwrap_or(TimeDelta::MAX);
        }
    }

    /// The fire's message id: `<schedule>@<slot as RFC 3339 UTC, whole seconds, 'Z'>`,
    /// for example `cleanup-temp-files@2026-11-29T02:00:00Z`.
    ///
    /// This is the `Nats-Msg-Id` the wire contract specifies for scheduled fires: two
    /// leaders that fire the same slot during a failover publish the same id, and
    /// JetStream's duplicate window keeps one. It contains `@` and `:`, which task ids
    /// (`[A-Za-z0-9_=-]{1,128}`, valid KV keys) do not allow, so the `Task-Id` header and the
    /// result key use [`fire_task_id`](Self::fire_task_id) instead; both are derived from
    /// the same (schedule, slot) pair, so both are stable across replicas.
    pub fn fire_id(&self, slot: DateTime<Utc>) -> String {
        format!(
            "{}@{}",
            self.def.name,
            slot.to_rfc3339_opts(SecondsFormat::Secs, true)
        )
    }

    /// The fire's task id: `<schedule>_<slot as YYYYMMDDTHHMMSSZ in UTC>`, for example
    /// `cleanup-temp-files_20261129T020000Z`.
    ///
    /// Uses only `[A-Za-z0-9_-]` and is at most 117 characters, so it is a valid task id and
    /// KV key: the `Task-Id` header and the key of the fire's result record. It is
    /// unambiguous: names never contain upper-case letters, so the text after the last `_`
    /// is always the slot. See [`fire_id`](Self::fire_id) for why two ids exist.
    pub fn fire_task_id(&self, slot: DateTime<Utc>) -> String {
        format!("{}_{}", self.def.name, slot.format("%Y%m%dT%H%M%SZ"))
    }
}

/// Parses a 5- or 6-field expression or an alias; the error is a lower-case reason.
fn parse_cron(expr: &str) -> Result<Cron, String> {
    let trimmed = expr.trim();
    let expanded = if trimmed.starts_with('@') {
        match trimmed.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            _ => {
                return Err(
                    "unknown alias: use @hourly, @daily, @midnight, @weekly, @monthly or @yearly"
                        .to_owned(),
                );
            }
        }
    } else {
        trimmed
    };
    let fields = expanded.split_whitespace().count();
    if fields != 5 && fields != 6 {
        return Err(format!(
            "expected 5 fields (minute hour day-of-month month day-of-week) or 6 with seconds first, got {fields}"
        ));
    }
    let cron = CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(expanded)
        .map_err(|e| {
            e.to_string()
                .to_lowercase()
                .trim_end_matches('.')
                .to_owned()
        })?;
    // A pattern that names no real date (`0 0 30 2 *`) is found by a search that runs
    // out; refuse it here rather than at every fire.
    let probe = chrono::NaiveDate::from_ymd_opt(2000, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .ok_or_else(|| "internal error: bad probe date".to_owned())?;
    cron.find_next_occurrence(&probe, false)
        .map_err(|_| "it matches no date".to_owned())?;
    Ok(cron)
}

/// Parses an `every` interval into whole seconds (at least 1).
fn parse_every(schedule: &str, every: &str) -> Result<i64, ScheduleError> {
    let invalid = |reason: String| ScheduleError::InvalidEvery {
        schedule: schedule.to_owned(),
        every: every.to_owned(),
        reason,
    };
    let interval = humantime::parse_duration(every.trim()).map_err(|e| invalid(e.to_string()))?;
    if interval.as_secs() == 0 {
        return Err(ScheduleError::EveryTooShort {
            schedule: schedule.to_owned(),
            every: every.to_owned(),
        });
    }
    if interval.subsec_nanos() != 0 {
        return Err(invalid("must be a whole number of seconds".to_owned()));
    }
    i64::try_from(interval.as_secs()).map_err(|_| invalid("is too long".to_owned()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn cron_in(expr: &str, tz: &str) -> Schedule {
        let mut def = ScheduleDef::new_cron("job", "test.job", expr);
        def.timezone = tz.to_owned();
        Schedule::compile(&def).unwrap()
    }

    fn every(interval: &str) -> Schedule {
        Schedule::compile(&ScheduleDef::new_every("job", "test.job", interval)).unwrap()
    }

    /// The next `n` slots after `after`, as RFC 3339 UTC strings.
    fn next_n(s: &Schedule, after: &str, n: usize) -> Vec<String> {
        let mut at = utc(after);
        let mut out = Vec::new();
        for _ in 0..n {
            at = s.next_fire(at).unwrap();
            out.push(at.to_rfc3339_opts(SecondsFormat::Secs, true));
        }
        out
    }

    /// The next `n` slots after `after`, shown as local wall times with their offset.
    fn next_n_local(s: &Schedule, after: &str, n: usize) -> Vec<String> {
        let mut at = utc(after);
        let mut out = Vec::new();
        for _ in 0..n {
            at = s.next_fire(at).unwrap();
            out.push(
                at.with_timezone(&s.timezone())
                    .format("%Y-%m-%dT%H:%M:%S%:z")
                    .to_string(),
            );
        }
        out
    }

    #[test]
    fn utc_cron_table() {
        let cases: &[(&str, &str, &[&str])] = &[
            // 5 fields.
            (
                "0 2 * * *",
                "2026-11-28T02:00:00Z",
                &["2026-11-29T02:00:00Z", "2026-11-30T02:00:00Z"],
            ),
            (
                "*/10 * * * *",
                "2026-01-01T00:05:00Z",
                &[
                    "2026-01-01T00:10:00Z",
                    "2026-01-01T00:20:00Z",
                    "2026-01-01T00:30:00Z",
                ],
            ),
            (
                "*/10 * * * *",
                "2026-01-01T00:59:59.999Z",
                &["2026-01-01T01:00:00Z"],
            ),
            // Exactly on a slot: strictly after.
            (
                "*/10 * * * *",
                "2026-01-01T00:10:00Z",
                &["2026-01-01T00:20:00Z"],
            ),
            // Sub-second after a slot.
            (
                "*/10 * * * *",
                "2026-01-01T00:10:00.5Z",
                &["2026-01-01T00:20:00Z"],
            ),
            // 6 fields, seconds first.
            (
                "*/20 * * * * *",
                "2026-01-01T00:00:05Z",
                &[
                    "2026-01-01T00:00:20Z",
                    "2026-01-01T00:00:40Z",
                    "2026-01-01T00:01:00Z",
                ],
            ),
            (
                "30 0 8 * * *",
                "2026-01-01T08:00:00Z",
                &["2026-01-01T08:00:30Z", "2026-01-02T08:00:30Z"],
            ),
            // Aliases.
            (
                "@hourly",
                "2026-01-01T00:30:00Z",
                &["2026-01-01T01:00:00Z", "2026-01-01T02:00:00Z"],
            ),
            (
                "@daily",
                "2026-01-01T00:00:00Z",
                &["2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"],
            ),
            (
                "@midnight",
                "2026-01-01T12:00:00Z",
                &["2026-01-02T00:00:00Z"],
            ),
            // 2026-01-01 is a Thursday; @weekly is Sunday midnight.
            ("@weekly", "2026-01-01T00:00:00Z", &["2026-01-04T00:00:00Z"]),
            (
                "@monthly",
                "2026-01-15T00:00:00Z",
                &["2026-02-01T00:00:00Z"],
            ),
            ("@yearly", "2026-06-01T00:00:00Z", &["2027-01-01T00:00:00Z"]),
            (
                "@ANNUALLY",
                "2026-06-01T00:00:00Z",
                &["2027-01-01T00:00:00Z"],
            ),
            // Weekdays: Sunday 01:00 (backup-user-data), MON-FRI, names.
            (
                "0 1 * * 0",
                "2026-11-25T00:00:00Z",
                &["2026-11-29T01:00:00Z", "2026-12-06T01:00:00Z"],
            ),
            (
                "0 1 * * 7",
                "2026-11-25T00:00:00Z",
                &["2026-11-29T01:00:00Z"],
            ),
            (
                "0 9 * * 1-5",
                "2026-11-27T10:00:00Z", // a Friday, after 09:00
                &["2026-11-30T09:00:00Z", "2026-12-01T09:00:00Z"],
            ),
            (
                "0 9 * * mon,wed",
                "2026-11-27T10:00:00Z",
                &["2026-11-30T09:00:00Z", "2026-12-02T09:00:00Z"],
            ),
            // Every 2 h at :00 (sync-notion-pages).
            (
                "0 */2 * * *",
                "2026-01-01T01:00:00Z",
                &["2026-01-01T02:00:00Z", "2026-01-01T04:00:00Z"],
            ),
            // Leap day.
            (
                "0 0 29 2 *",
                "2026-01-01T00:00:00Z",
                &["2028-02-29T00:00:00Z"],
            ),
            // Day of month OR day of week, as vixie-cron: the 13th or any Friday.
            (
                "0 0 13 * 5",
                "2026-11-01T00:00:00Z",
                &["2026-11-06T00:00:00Z", "2026-11-13T00:00:00Z"],
            ),
        ];
        for (expr, after, expected) in cases {
            let s = cron_in(expr, "UTC");
            assert_eq!(
                next_n(&s, after, expected.len()),
                *expected,
                "{expr} after {after}"
            );
        }
    }

    #[test]
    fn cron_in_a_time_zone_uses_its_wall_clock() {
        // 08:00 in Berlin is 07:00 UTC in winter and 06:00 UTC in summer.
        let s = cron_in("0 8 * * *", "Europe/Berlin");
        assert_eq!(
            next_n(&s, "2026-01-10T00:00:00Z", 1),
            ["2026-01-10T07:00:00Z"]
        );
        assert_eq!(
            next_n(&s, "2026-07-10T00:00:00Z", 1),
            ["2026-07-10T06:00:00Z"]
        );
    }

    /// (timezone, expression, after (UTC), expected next slots as local wall times).
    type DstCase = (
        &'static str,
        &'static str,
        &'static str,
        &'static [&'static str],
    );

    const DST_CASES: &[DstCase] = &[
        // US spring forward 2026-03-08: 02:00 EST -> 03:00 EDT, 02:xx does not exist.
        // A daily job in the gap fires once, at the first instant after it.
        (
            "America/New_York",
            "30 2 * * *",
            "2026-03-07T12:00:00Z",
            &["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"],
        ),
        // A daily job outside the gap is untouched.
        (
            "America/New_York",
            "30 1 * * *",
            "2026-03-07T12:00:00Z",
            &["2026-03-08T01:30:00-05:00", "2026-03-09T01:30:00-04:00"],
        ),
        // Hourly (interval job): 02:00 never happens; 01:00 EST then 03:00 EDT.
        (
            "America/New_York",
            "0 * * * *",
            "2026-03-08T05:30:00Z", // 00:30 EST
            &[
                "2026-03-08T01:00:00-05:00",
                "2026-03-08T03:00:00-04:00",
                "2026-03-08T04:00:00-04:00",
            ],
        ),
        // Several skipped wall times of a wall-clock job fire once, together with a slot
        // that lands on the same instant.
        (
            "America/New_York",
            "0,30 2,3 * * *",
            "2026-03-08T06:00:00Z", // 01:00 EST
            &[
                "2026-03-08T03:00:00-04:00",
                "2026-03-08T03:30:00-04:00",
                "2026-03-09T02:00:00-04:00",
            ],
        ),
        // US fall back 2026-11-01: 02:00 EDT -> 01:00 EST, 01:xx happens twice.
        // A daily job in the overlap fires once, at the first 01:30 (EDT).
        (
            "America/New_York",
            "30 1 * * *",
            "2026-10-31T12:00:00Z",
            &["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"],
        ),
        // ... also when asked from between the two 01:30s.
        (
            "America/New_York",
            "30 1 * * *",
            "2026-11-01T06:00:00Z", // 01:00 EST, the second 01:00
            &["2026-11-02T01:30:00-05:00"],
        ),
        (
            "America/New_York",
            "30 2 * * *",
            "2026-10-31T12:00:00Z",
            &["2026-11-01T02:30:00-05:00", "2026-11-02T02:30:00-05:00"],
        ),
        // Hourly across the overlap fires at each real hour: 01:00 EDT and 01:00 EST.
        (
            "America/New_York",
            "0 * * * *",
            "2026-11-01T04:30:00Z", // 00:30 EDT
            &[
                "2026-11-01T01:00:00-04:00",
                "2026-11-01T01:00:00-05:00",
                "2026-11-01T02:00:00-05:00",
            ],
        ),
        // ... including when asked from inside the first half of the overlap.
        (
            "America/New_York",
            "*/15 * * * *",
            "2026-11-01T05:50:00Z", // 01:50 EDT
            &["2026-11-01T01:00:00-05:00", "2026-11-01T01:15:00-05:00"],
        ),
        (
            "America/New_York",
            "*/15 * * * *",
            "2026-11-01T05:40:00Z", // 01:40 EDT
            &["2026-11-01T01:45:00-04:00", "2026-11-01T01:00:00-05:00"],
        ),
        // A wall-clock job inside the overlap asked from its first half: its remaining
        // first-half times, then not the second half.
        (
            "America/New_York",
            "*/20 1 * * *",
            "2026-11-01T05:30:00Z", // 01:30 EDT
            &["2026-11-01T01:40:00-04:00", "2026-11-02T01:00:00-05:00"],
        ),
        // EU spring forward 2026-03-29: 02:00 CET -> 03:00 CEST.
        (
            "Europe/Berlin",
            "30 2 * * *",
            "2026-03-28T12:00:00Z",
            &["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"],
        ),
        (
            "Europe/Berlin",
            "0 * * * *",
            "2026-03-28T23:30:00Z", // 00:30 CET
            &[
                "2026-03-29T01:00:00+01:00",
                "2026-03-29T03:00:00+02:00",
                "2026-03-29T04:00:00+02:00",
            ],
        ),
        (
            "Europe/Berlin",
            "30 1 * * *",
            "2026-03-28T12:00:00Z",
            &["2026-03-29T01:30:00+01:00", "2026-03-30T01:30:00+02:00"],
        ),
        // Every 2 h (a wall-clock job): 02:00 falls in the gap and fires at 03:00.
        (
            "Europe/Berlin",
            "0 */2 * * *",
            "2026-03-28T23:30:00Z", // 00:30 CET
            &["2026-03-29T03:00:00+02:00", "2026-03-29T04:00:00+02:00"],
        ),
        // EU fall back 2026-10-25: 03:00 CEST -> 02:00 CET, 02:xx happens twice.
        (
            "Europe/Berlin",
            "30 2 * * *",
            "2026-10-24T12:00:00Z",
            &["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"],
        ),
        (
            "Europe/Berlin",
            "30 1 * * *",
            "2026-10-24T12:00:00Z",
            &["2026-10-25T01:30:00+02:00", "2026-10-26T01:30:00+01:00"],
        ),
        (
            "Europe/Berlin",
            "0 * * * *",
            "2026-10-24T23:30:00Z", // 01:30 CEST
            &[
                "2026-10-25T02:00:00+02:00",
                "2026-10-25T02:00:00+01:00",
                "2026-10-25T03:00:00+01:00",
            ],
        ),
        (
            "Europe/Berlin",
            "0 */2 * * *",
            "2026-10-24T21:30:00Z", // 23:30 CEST
            &[
                "2026-10-25T00:00:00+02:00",
                "2026-10-25T02:00:00+02:00",
                "2026-10-25T04:00:00+01:00",
            ],
        ),
    ];

    #[test]
    fn dst_table() {
        for (tz, expr, after, expected) in DST_CASES {
            let s = cron_in(expr, tz);
            assert_eq!(
                next_n_local(&s, after, expected.len()),
                *expected,
                "{expr} in {tz} after {after}"
            );
        }
    }

    /// Reference semantics by brute force over every minute, for 5-field expressions:
    /// interval jobs match every real minute whose wall time matches; wall-clock jobs map
    /// every matching wall minute to its first instant, or to the end of its gap.
    fn brute_force(s: &Schedule, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let Trigger::Cron { cron, wall_clock } = &s.trigger else {
            unreachable!()
        };
        let mut out = Vec::new();
        if *wall_clock {
            let pad = TimeDelta::hours(30);
            let mut wall = (from - pad).naive_utc();
            while wall <= (to + pad).naive_utc() {
                if cron.is_time_matching(&wall).unwrap()
                    && let Some(slot) = s.wall_to_slot(wall)
                    && slot > from
                    && slot <= to
                {
                    out.push(slot);
                }
                wall += TimeDelta::minutes(1);
            }
            out.sort();
            out.dedup();
        } else {
            let mut at = from + TimeDelta::minutes(1);
            while at <= to {
                if cron.is_time_matching(&at.with_timezone(&s.tz)).unwrap() {
                    out.push(at);
                }
                at += TimeDelta::minutes(1);
            }
        }
        out
    }

    #[test]
    fn dst_days_match_brute_force() {
        let zones = [
            (
                "America/New_York",
                "2026-03-07T00:00:00Z",
                "2026-03-10T00:00:00Z",
            ),
            (
                "America/New_York",
                "2026-10-31T00:00:00Z",
                "2026-11-03T00:00:00Z",
            ),
            (
                "Europe/Berlin",
                "2026-03-28T00:00:00Z",
                "2026-03-31T00:00:00Z",
            ),
            (
                "Europe/Berlin",
                "2026-10-24T00:00:00Z",
                "2026-10-27T00:00:00Z",
            ),
            // Half-hour DST shift.
            (
                "Australia/Lord_Howe",
                "2026-04-04T00:00:00Z",
                "2026-04-07T00:00:00Z",
            ),
            (
                "Australia/Lord_Howe",
                "2026-10-03T00:00:00Z",
                "2026-10-06T00:00:00Z",
            ),
        ];
        let exprs = [
            "30 2 * * *",
            "30 1 * * *",
            "0 * * * *",
            "*/15 * * * *",
            "*/20 1 * * *",
            "*/15 2 * * *",
            "0 */2 * * *",
            "0,30 2,3 * * *",
            "45 1,2 * * *",
            "5 * * * 0",
            "0 0 * * *",
        ];
        for (tz, from, to) in zones {
            for expr in exprs {
                let s = cron_in(expr, tz);
                let (from, to) = (utc(from), utc(to));
                assert_eq!(
                    s.slots_between(from, to, 10_000),
                    brute_force(&s, from, to),
                    "{expr} in {tz}"
                );
            }
        }
    }

    #[test]
    fn wall_clock_classification() {
        for (expr, wall_clock) in [
            ("0 * * * *", false),
            ("@hourly", false),
            ("*/15 * * * *", false),
            ("* * * * * *", false),
            ("0 0-23 * * *", false),
            ("5 * * * 0", false),
            ("30 2 * * *", true),
            ("0 */2 * * *", true),
            ("*/15 1 * * *", true),
            ("0 8,20 * * *", true),
            ("@daily", true),
        ] {
            let s = cron_in(expr, "UTC");
            let Trigger::Cron {
                wall_clock: got, ..
            } = s.trigger
            else {
                unreachable!()
            };
            assert_eq!(got, wall_clock, "{expr}");
        }
    }

    #[test]
    fn every_is_aligned_to_the_epoch() {
        let s = every("10m");
        assert_eq!(
            next_n(&s, "2026-01-01T00:03:17Z", 3),
            [
                "2026-01-01T00:10:00Z",
                "2026-01-01T00:20:00Z",
                "2026-01-01T00:30:00Z"
            ]
        );
        assert_eq!(
            next_n(&s, "2026-01-01T00:10:00Z", 1),
            ["2026-01-01T00:20:00Z"]
        );
        // 1h30m since the epoch: 2026-01-01T00:00Z is 328,704 intervals after it.
        assert_eq!(
            next_n(&every("1h30m"), "2025-12-31T23:59:59Z", 2),
            ["2026-01-01T00:00:00Z", "2026-01-01T01:30:00Z"]
        );
        // The time zone plays no part.
        let mut def = ScheduleDef::new_every("job", "test.job", "10m");
        def.timezone = "Asia/Kolkata".to_owned();
        let kolkata = Schedule::compile(&def).unwrap();
        let at = utc("2026-06-01T12:34:56Z");
        assert_eq!(kolkata.next_fire(at), s.next_fire(at));
        // Before the epoch too.
        assert_eq!(
            next_n(&s, "1969-12-31T23:55:00Z", 1),
            ["1970-01-01T00:00:00Z"]
        );
    }

    #[test]
    fn slots_between_is_bounded_and_half_open() {
        let s = every("10m");
        let slots = s.slots_between(
            utc("2026-01-01T00:00:00Z"),
            utc("2026-01-01T01:00:00Z"),
            100,
        );
        assert_eq!(slots.len(), 6);
        assert_eq!(slots[0], utc("2026-01-01T00:10:00Z"));
        assert_eq!(slots[5], utc("2026-01-01T01:00:00Z"));
        let limited = s.slots_between(utc("2026-01-01T00:00:00Z"), utc("2026-01-01T01:00:00Z"), 2);
        assert_eq!(limited, slots[..2]);
        assert!(
            s.slots_between(utc("2026-01-01T01:00:00Z"), utc("2026-01-01T00:00:00Z"), 10)
                .is_empty()
        );
    }

    fn with_catch_up(expr: &str, catch_up: CatchUp, max: u32) -> Schedule {
        let mut def = ScheduleDef::new_cron("job", "test.job", expr);
        def.catch_up = catch_up;
        def.max_catch_up = max;
        Schedule::compile(&def).unwrap()
    }

    /// (catch_up, max_catch_up, cursor, expected missed slots).
    type CatchUpCase = (CatchUp, u32, Option<DateTime<Utc>>, Vec<DateTime<Utc>>);

    #[test]
    fn missed_slots_table() {
        let cursor = utc("2026-01-01T00:00:00Z");
        let now = utc("2026-01-01T01:05:00Z"); // slots 00:10 … 01:00 missed
        let all: Vec<_> = (1..=6)
            .map(|i| cursor + TimeDelta::minutes(10 * i))
            .collect();
        let cases: &[CatchUpCase] = &[
            (CatchUp::None, 100, Some(cursor), vec![]),
            (CatchUp::Latest, 100, Some(cursor), vec![all[5]]),
            (CatchUp::All, 100, Some(cursor), all.clone()),
            // Bounded: the newest ones, oldest first.
            (CatchUp::All, 2, Some(cursor), all[4..].to_vec()),
            // Never fired: nothing is missed.
            (CatchUp::All, 100, None, vec![]),
            (CatchUp::Latest, 100, None, vec![]),
            // Up to date: nothing is missed.
            (CatchUp::All, 100, Some(all[5]), vec![]),
            (CatchUp::Latest, 100, Some(all[5]), vec![]),
        ];
        for (catch_up, max, cursor, expected) in cases {
            let s = with_catch_up("*/10 * * * *", *catch_up, *max);
            assert_eq!(
                &s.missed_slots(*cursor, now),
                expected,
                "{catch_up:?} max {max} cursor {cursor:?}"
            );
        }
        // A slot exactly at `now` is due, so it counts.
        let s = with_catch_up("*/10 * * * *", CatchUp::Latest, 100);
        assert_eq!(s.missed_slots(Some(cursor), all[5]), vec![all[5]]);
        // The cursor in the future (clock skew): nothing.
        assert!(s.missed_slots(Some(now), cursor).is_empty());
    }

    #[test]
    fn missed_slots_after_a_long_outage() {
        // A year of per-second slots: the newest 10,000, found without walking the year.
        let s = with_catch_up("* * * * * *", CatchUp::All, 10_000);
        let now = utc("2026-06-01T00:00:00Z");
        let missed = s.missed_slots(Some(utc("2025-06-01T00:00:00Z")), now);
        assert_eq!(missed.len(), 10_000);
        assert_eq!(missed[9_999], now);
        assert_eq!(missed[0], now - TimeDelta::seconds(9_999));
        // A yearly schedule three years behind: the latest is the most recent 1 January.
        let s = with_catch_up("@yearly", CatchUp::Latest, 100);
        assert_eq!(
            s.missed_slots(Some(utc("2023-01-01T00:00:00Z")), now),
            vec![utc("2026-01-01T00:00:00Z")]
        );
        let s = with_catch_up("@yearly", CatchUp::All, 100);
        assert_eq!(
            s.missed_slots(Some(utc("2022-06-01T00:00:00Z")), now),
            vec![
                utc("2023-01-01T00:00:00Z"),
                utc("2024-01-01T00:00:00Z"),
                utc("2025-01-01T00:00:00Z"),
                utc("2026-01-01T00:00:00Z"),
            ]
        );
    }

    #[test]
    fn fire_ids() {
        let s = Schedule::compile(&ScheduleDef::new_cron(
            "cleanup-temp-files",
            "file.cleanup_temp_files",
            "0 2 * * *",
        ))
        .unwrap();
        let slot = s.next_fire(utc("2026-11-28T03:00:00Z")).unwrap();
        assert_eq!(s.fire_id(slot), "cleanup-temp-files@2026-11-29T02:00:00Z");
        assert_eq!(s.fire_task_id(slot), "cleanup-temp-files_20261129T020000Z");
        assert!(taskmesh_shared::names::is_task_id(&s.fire_task_id(slot)));
        // The longest name still gives a valid task id.
        let long = "a".repeat(MAX_NAME_LEN);
        let s = Schedule::compile(&ScheduleDef::new_every(long, "a.b", "1s")).unwrap();
        assert!(taskmesh_shared::names::is_task_id(&s.fire_task_id(slot)));
    }

    #[test]
    fn accessors() {
        let mut def = ScheduleDef::new_cron("a-b", "email.send", "0 8 * * *");
        def.args = serde_json::json!({"to": "x"});
        def.catch_up = CatchUp::All;
        def.enabled = false;
        def.timezone = "Europe/Berlin".to_owned();
        let s = Schedule::compile(&def).unwrap();
        assert_eq!(s.name(), "a-b");
        assert_eq!(s.task().as_str(), "email.send");
        assert_eq!(s.args(), &serde_json::json!({"to": "x"}));
        assert_eq!(s.def(), &def);
        assert_eq!(s.catch_up(), CatchUp::All);
        assert!(!s.enabled());
        assert_eq!(s.timezone(), chrono_tz::Europe::Berlin);
    }

    #[test]
    fn default_schedules_compile() {
        for def in taskmesh_shared::schedule::default_schedules() {
            let s = Schedule::compile(&def).unwrap();
            assert!(s.next_fire(utc("2026-01-01T00:00:00Z")).is_some());
        }
    }

    /// The variant of an error, for tables that assert on kinds rather than text.
    fn kind(e: &ScheduleError) -> &'static str {
        match e {
            ScheduleError::InvalidName { .. } => "InvalidName",
            ScheduleError::InvalidTask { .. } => "InvalidTask",
            ScheduleError::Trigger { .. } => "Trigger",
            ScheduleError::InvalidCron { .. } => "InvalidCron",
            ScheduleError::InvalidEvery { .. } => "InvalidEvery",
            ScheduleError::EveryTooShort { .. } => "EveryTooShort",
            ScheduleError::UnknownTimezone { .. } => "UnknownTimezone",
            ScheduleError::MaxCatchUp { .. } => "MaxCatchUp",
        }
    }

    #[test]
    fn invalid_specs_table() {
        fn def_with(f: impl Fn(&mut ScheduleDef)) -> ScheduleDef {
            let mut def = ScheduleDef::new_cron("foo", "file.cleanup", "0 2 * * *");
            f(&mut def);
            def
        }
        fn every(every: &str) -> ScheduleDef {
            def_with(|d| {
                d.cron = None;
                d.every = Some(every.to_owned());
            })
        }
        fn cron(expr: &str) -> ScheduleDef {
            def_with(|d| d.cron = Some(expr.to_owned()))
        }
        let cases = [
            (def_with(|d| d.name = "Foo".into()), "InvalidName"),
            (def_with(|d| d.name = String::new()), "InvalidName"),
            (def_with(|d| d.name = "a b".into()), "InvalidName"),
            (def_with(|d| d.name = "a.b".into()), "InvalidName"),
            (
                def_with(|d| d.name = "a".repeat(MAX_NAME_LEN + 1)),
                "InvalidName",
            ),
            (def_with(|d| d.task = "cleanup".into()), "InvalidTask"),
            (def_with(|d| d.task = "file.Cleanup".into()), "InvalidTask"),
            (def_with(|d| d.task = "a.b.c".into()), "InvalidTask"),
            (def_with(|d| d.task = ".b".into()), "InvalidTask"),
            (def_with(|d| d.cron = None), "Trigger"),
            (def_with(|d| d.every = Some("10m".into())), "Trigger"),
            (cron("* * *"), "InvalidCron"),
            (cron(""), "InvalidCron"),
            (cron("0 0 1 1 * 2030"), "InvalidCron"),
            (cron("0 0 0 1 1 * 2030"), "InvalidCron"),
            (cron("61 * * * *"), "InvalidCron"),
            (cron("0 24 * * *"), "InvalidCron"),
            (cron("0 0 * * 8"), "InvalidCron"),
            (cron("0 x * * *"), "InvalidCron"),
            (cron("0 0 30 2 *"), "InvalidCron"),
            (cron("0 0 31 4 *"), "InvalidCron"),
            (cron("@reboot"), "InvalidCron"),
            (cron("@every 5m"), "InvalidCron"),
            (every("500ms"), "EveryTooShort"),
            (every("0s"), "EveryTooShort"),
            (every("1s500ms"), "InvalidEvery"),
            (every("ten minutes"), "InvalidEvery"),
            (every(""), "InvalidEvery"),
            (
                def_with(|d| d.timezone = "Mars/Base".into()),
                "UnknownTimezone",
            ),
            (def_with(|d| d.timezone = String::new()), "UnknownTimezone"),
            (def_with(|d| d.max_catch_up = 0), "MaxCatchUp"),
            (def_with(|d| d.max_catch_up = 10_001), "MaxCatchUp"),
        ];
        for (def, expected) in cases {
            let e = Schedule::compile(&def).unwrap_err();
            assert_eq!(kind(&e), expected, "{def:?} gave {e}");
            assert_eq!(e.schedule(), def.name);
            let text = e.to_string();
            let prefix = format!("schedule {:?}: ", def.name);
            assert!(text.starts_with(&prefix), "{text}");
            assert!(
                text[prefix.len()..].starts_with(|c: char| c.is_ascii_lowercase()),
                "{text}"
            );
            assert!(!text.ends_with('.'), "{text}");
        }
        // The limits themselves are fine, and so are other valid forms.
        for def in [
            def_with(|d| d.max_catch_up = 1),
            def_with(|d| d.max_catch_up = MAX_CATCH_UP_LIMIT),
            cron(" 0 2 * * * "),
            cron("0 0 2 * * *"),
            cron("0 0 L * *"),
            cron("0 0 * * FRI#2"),
            every("1s"),
            every("1h30m"),
            every("7days"),
        ] {
            Schedule::compile(&def).unwrap();
        }
    }

    #[test]
    fn error_text_names_schedule_and_reason() {
        let mut def = ScheduleDef::new_cron("foo", "file.cleanup", "* * *");
        let text = Schedule::compile(&def).unwrap_err().to_string();
        assert!(
            text.starts_with("schedule \"foo\": invalid cron expression \"* * *\": "),
            "{text}"
        );
        def.cron = Some("0 2 * * *".into());
        def.timezone = "Mars/Base".into();
        let text = Schedule::compile(&def).unwrap_err().to_string();
        assert!(text.contains("unknown timezone \"Mars/Base\""), "{text}");
    }

    /// Small valid 5-field cron expressions.
    fn cron_expr5() -> impl Strategy<Value = String> {
        let minute = prop_oneof![
            Just("*".to_owned()),
            (0u32..60).prop_map(|m| m.to_string()),
            (1u32..31).prop_map(|s| format!("*/{s}")),
            (0u32..30, 30u32..60).prop_map(|(a, b)| format!("{a},{b}")),
        ];
        let hour = prop_oneof![
            Just("*".to_owned()),
            (0u32..24).prop_map(|h| h.to_string()),
            (1u32..13).prop_map(|s| format!("*/{s}")),
            (0u32..12, 12u32..24).prop_map(|(a, b)| format!("{a}-{b}")),
        ];
        let dom = prop_oneof![
            3 => Just("*".to_owned()),
            1 => (1u32..29).prop_map(|d| d.to_string()),
        ];
        let month = prop_oneof![
            3 => Just("*".to_owned()),
            1 => (1u32..13).prop_map(|m| m.to_string()),
        ];
        let dow = prop_oneof![
            3 => Just("*".to_owned()),
            1 => (0u32..7).prop_map(|d| d.to_string()),
            1 => Just("1-5".to_owned()),
        ];
        (minute, hour, dom, month, dow)
            .prop_map(|(mi, h, d, mo, w)| format!("{mi} {h} {d} {mo} {w}"))
    }

    /// Small valid cron expressions, 5 or 6 fields.
    fn cron_expr() -> impl Strategy<Value = String> {
        let second = prop_oneof![
            Just(None),
            (0u32..60).prop_map(|s| Some(s.to_string())),
            (1u32..31).prop_map(|s| Some(format!("*/{s}"))),
        ];
        (second, cron_expr5()).prop_map(|(s, rest)| match s {
            Some(s) => format!("{s} {rest}"),
            None => rest,
        })
    }

    fn zone() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            Just("UTC"),
            Just("America/New_York"),
            Just("Europe/Berlin"),
            Just("Australia/Lord_Howe"),
            Just("Asia/Kolkata"),
        ]
    }

    /// Instants from 2020 to 2030, biased toward hours around DST changes.
    fn instant() -> impl Strategy<Value = DateTime<Utc>> {
        let dst_edges = [
            "2026-03-08T04:00:00Z",
            "2026-11-01T03:00:00Z",
            "2026-03-29T00:00:00Z",
            "2026-10-25T00:00:00Z",
        ];
        prop_oneof![
            (1_577_836_800i64..1_893_456_000).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap()),
            (0usize..4, 0i64..4 * 3600, 0u32..1_000_000_000).prop_map(move |(i, s, n)| {
                utc(dst_edges[i]) + TimeDelta::seconds(s) + TimeDelta::nanoseconds(i64::from(n))
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn next_fire_is_after_and_nothing_is_skipped(
            expr in cron_expr(),
            tz in zone(),
            t in instant(),
        ) {
            let s = cron_in(&expr, tz);
            let next = s.next_fire(t).unwrap();
            prop_assert!(next > t);
            // No slot strictly between: starting just after t and stepping through the
            // sample points below `next` never finds an earlier slot.
            let step = (next - t) / 16;
            for k in 0..16 {
                let probe = t + step * k;
                prop_assert_eq!(s.next_fire(probe), Some(next), "probe {}", probe);
            }
            // And slots_between agrees: the first slot after t is `next`.
            prop_assert_eq!(s.slots_between(t, next, 5), vec![next]);
            // The slot one second before `next` still leads to `next`.
            if next - TimeDelta::seconds(1) >= t {
                prop_assert_eq!(s.next_fire(next - TimeDelta::seconds(1)), Some(next));
            }
        }

        #[test]
        fn slots_match_brute_force_around_dst(
            expr in cron_expr5(),
            tz in zone(),
            edge in 0usize..4,
            offset_min in -(12i64 * 60)..(12 * 60),
        ) {
            let edges = [
                "2026-03-08T07:00:00Z",
                "2026-11-01T06:00:00Z",
                "2026-03-29T01:00:00Z",
                "2026-10-25T01:00:00Z",
            ];
            let s = cron_in(&expr, tz);
            let from = utc(edges[edge]) + TimeDelta::minutes(offset_min);
            let to = from + TimeDelta::hours(26);
            prop_assert_eq!(s.slots_between(from, to, 100_000), brute_force(&s, from, to));
        }

        #[test]
        fn every_next_fire_is_within_one_interval_and_aligned(
            secs in 1i64..(7 * 86_400),
            t in instant(),
        ) {
            let s = every(&format!("{secs}s"));
            let next = s.next_fire(t).unwrap();
            prop_assert!(next > t);
            prop_assert!(next - t <= TimeDelta::seconds(secs));
            prop_assert_eq!(next.timestamp().rem_euclid(secs), 0);
            prop_assert_eq!(next.timestamp_subsec_nanos(), 0);
        }

        #[test]
        fn missed_slots_are_the_newest_slots_in_range(
            expr in cron_expr(),
            tz in zone(),
            cursor in instant(),
            gap in 0i64..(12 * 3600),
            max in 1u32..50,
        ) {
            let mut def = ScheduleDef::new_cron("job", "test.job", &expr);
            def.timezone = tz.to_owned();
            def.catch_up = CatchUp::All;
            def.max_catch_up = max;
            let s = Schedule::compile(&def).unwrap();
            let now = cursor + TimeDelta::seconds(gap);
            let missed = s.missed_slots(Some(cursor), now);
            let all = s.slots_between(cursor, now, 1_000_000);
            let keep = all.len().min(max as usize);
            prop_assert_eq!(&missed[..], &all[all.len() - keep..]);
        }
    }
}
