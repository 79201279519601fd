//! The wire contract: every subject, stream, consumer, header and bucket name.
//!
//! This is the only module that formats `tasks.…`, `dlq.…` or `delayed.…`. Other services
//! and other languages depend on these names (see DESIGN.md § Wire contract); they change
//! only with a migration note.

use crate::names::{Category, Lane, TaskId, TaskName};

/// Header names (case-sensitive on the wire).
pub mod headers {
    /// The JetStream de-duplication id; the task id.
    pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
    /// The task id, kept because server-side scheduling strips `Nats-Msg-Id`.
    pub const TASK_ID: &str = "Task-Id";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state.
    pub const TRACESTATE: &str = "tracestate";
    /// W3C baggage; dropped by taskmesh.
    pub const BAGGAGE: &str = "baggage";
    /// RFC 3339 instant after which the task is dead-lettered unrun (`expired`).
    pub const TASK_DEADLINE: &str = "Task-Deadline";
    /// Overrides the category's attempt budget (never above `max_deliver`).
    pub const TASK_MAX_ATTEMPTS: &str = "Task-Max-Attempts";
    /// Set by the scheduler: the schedule's name.
    pub const TASK_SCHEDULE: &str = "Task-Schedule";
    /// Set by the scheduler: the slot (RFC 3339) this fire belongs to.
    pub const TASK_FIRE_TIME: &str = "Task-Fire-Time";
    /// RFC 3339 instant the task was first enqueued (set by the taskmesh client).
    pub const TASK_ENQUEUED_AT: &str = "Task-Enqueued-At";
    /// Body content type; `application/json` when absent.
    pub const CONTENT_TYPE: &str = "Content-Type";
    /// Dead letter: why (`max_attempts`, `permanent`, `undecodable`, `unknown_task`, `expired`).
    pub const DLQ_REASON: &str = "Dlq-Reason";
    /// Dead letter: the last error message.
    pub const DLQ_ERROR: &str = "Dlq-Error";
    /// Dead letter: delivery attempts made.
    pub const DLQ_ATTEMPTS: &str = "Dlq-Attempts";
    /// Dead letter: the original stream sequence.
    pub const DLQ_STREAM_SEQ: &str = "Dlq-Stream-Seq";
    /// Dead letter: when it was dead-lettered (RFC 3339).
    pub const DLQ_TIME: &str = "Dlq-Time";
    /// Dead letter: the original subject (so replay needs no parsing).
    pub const DLQ_SUBJECT: &str = "Dlq-Subject";
    /// Encrypted body: the key id it was sealed with.
    pub const TASK_KEY_ID: &str = "Task-Key-Id";
    /// Encrypted body: the scheme (`xchacha20poly1305`).
    pub const TASK_ENCODING: &str = "Task-Encoding";
    /// Attempts already used before this copy was published (a task deferred by an open
    /// circuit breaker keeps its attempt count across the republish).
    pub const TASK_ATTEMPTS_USED: &str = "Task-Attempts-Used";
    /// JetStream message schedule (`@at <RFC 3339>`), for delayed tasks.
    pub const NATS_SCHEDULE: &str = "Nats-Schedule";
    /// JetStream message schedule target subject.
    pub const NATS_SCHEDULE_TARGET: &str = "Nats-Schedule-Target";
}

/// The default content type of a task body.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Prefix of task subjects.
const TASKS: &str = "tasks";
/// Prefix of dead-letter subjects.
const DLQ: &str = "dlq";
/// Prefix of delayed-task schedule subjects.
const DELAYED: &str = "delayed";

/// The dead-letter stream.
pub const DLQ_STREAM: &str = "TASKS_DLQ";
/// KV bucket of result records (key = task id).
pub const RESULTS_BUCKET: &str = "TASKMESH_RESULTS";
/// KV bucket of dynamic schedules (key = schedule name).
pub const SCHEDULES_BUCKET: &str = "TASKMESH_SCHEDULES";
/// KV bucket of per-schedule cursors (the last fired slot).
pub const SCHEDULER_BUCKET: &str = "TASKMESH_SCHEDULER";
/// KV bucket holding the scheduler's leader lease.
pub const LEASES_BUCKET: &str = "TASKMESH_LEASES";
/// KV bucket of worker heartbeats.
pub const WORKERS_BUCKET: &str = "TASKMESH_WORKERS";
/// KV bucket of shared rate limiters (key = limiter name, value = next free slot).
pub const LIMITS_BUCKET: &str = "TASKMESH_LIMITS";
/// KV bucket of cancel requests (key = task id).
pub const CANCELS_BUCKET: &str = "TASKMESH_CANCELS";
/// KV bucket of unique-task locks (key = uniqueness key, value = task id, per-key TTL).
pub const UNIQUE_BUCKET: &str = "TASKMESH_UNIQUE";
/// Catalog: KV bucket of `email.send`'s delivery ledger (key = task id).
pub const EMAIL_LEDGER_BUCKET: &str = "TASKMESH_EMAIL_LEDGER";
/// Catalog: KV bucket of synchronized calendar events.
pub const CALENDAR_BUCKET: &str = "TASKMESH_CALENDAR";
/// Catalog: KV bucket of synchronized Notion pages.
pub const NOTION_BUCKET: &str = "TASKMESH_NOTION";
/// Catalog: KV bucket of small task state (the health check's previous observation).
pub const CATALOG_STATE_BUCKET: &str = "TASKMESH_CATALOG_STATE";
/// Catalog: Object Store bucket `file.sync_cloud_storage` syncs into by default.
pub const FILES_OBJECT_STORE: &str = "TASKMESH_FILES";

/// `tasks.<category>.<name>` plus `.high` / `.low` for priority lanes.
pub fn task_subject(task: &TaskName, lane: Lane) -> String {
    match lane.suffix() {
        Some(sfx) => format!("{TASKS}.{}.{sfx}", task.as_str()),
        None => format!("{TASKS}.{}", task.as_str()),
    }
}

/// `TASKS_<CATEGORY>`: the category's stream (upper case, `-` becomes `_`).
pub fn stream_name(category: &Category) -> String {
    format!(
        "TASKS_{}",
        category.as_str().to_ascii_uppercase().replace('-', "_")
    )
}

/// The subjects a category's stream binds: `tasks.<c>.*`, `tasks.<c>.*.high`,
/// `tasks.<c>.*.low` and `delayed.<c>.>`.
pub fn stream_subjects(category: &Category) -> Vec<String> {
    let c = category.as_str();
    vec![
        format!("{TASKS}.{c}.*"),
        format!("{TASKS}.{c}.*.high"),
        format!("{TASKS}.{c}.*.low"),
        format!("{DELAYED}.{c}.>"),
    ]
}

/// The filter subject of a lane's consumer.
pub fn lane_filter(category: &Category, lane: Lane) -> String {
    let c = category.as_str();
    match lane.suffix() {
        Some(sfx) => format!("{TASKS}.{c}.*.{sfx}"),
        None => format!("{TASKS}.{c}.*"),
    }
}

/// The durable consumer of a lane: `<category>`, `<category>-high`, `<category>-low`.
pub fn consumer_name(category: &Category, lane: Lane) -> String {
    match lane.suffix() {
        Some(sfx) => format!("{}-{sfx}", category.as_str()),
        None => category.as_str().to_owned(),
    }
}

/// `dlq.<category>.<name>`.
pub fn dlq_subject(task: &TaskName) -> String {
    format!("{DLQ}.{}", task.as_str())
}

/// The dead-letter subject for a delivered message's subject. A subject that is not a
/// valid task subject (it passed the stream's wildcard but not name validation) goes to
/// `dlq.<category>._invalid`, or `dlq.unknown._invalid`.
pub fn dlq_subject_for(subject: &str) -> String {
    if let Some(p) = parse_task_subject(subject) {
        return dlq_subject(&p.task);
    }
    let cat = subject
        .split('.')
        .nth(1)
        .filter(|c| crate::names::is_token(c))
        .unwrap_or("unknown");
    format!("{DLQ}.{cat}._invalid")
}

/// `dlq.>`: every dead letter.
pub fn dlq_wildcard() -> String {
    format!("{DLQ}.>")
}

/// `delayed.<category>.<task id>`: where a delayed task waits as a schedule message.
pub fn delayed_subject(category: &Category, id: &TaskId) -> String {
    format!("{DELAYED}.{}.{}", category.as_str(), id.as_str())
}

/// Parsed form of a delivered task subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedSubject {
    /// The task's full name.
    pub task: TaskName,
    /// The lane the task was published to.
    pub lane: Lane,
}

/// Parses `tasks.<category>.<name>[.high|.low]`; `None` for anything else.
pub fn parse_task_subject(subject: &str) -> Option<ParsedSubject> {
    let rest = subject.strip_prefix("tasks.")?;
    let mut parts = rest.split('.');
    let cat = parts.next()?;
    let name = parts.next()?;
    let lane = match parts.next() {
        None => Lane::Normal,
        Some("high") => Lane::High,
        Some("low") => Lane::Low,
        Some(_) => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    let task = TaskName::new(&Category::new(cat).ok()?, name).ok()?;
    Some(ParsedSubject { task, lane })
}

/// Task name from a dead-letter subject `dlq.<category>.<name>`.
pub fn parse_dlq_subject(subject: &str) -> Option<TaskName> {
    TaskName::parse(subject.strip_prefix("dlq.")?).ok()
}

/// Makes arbitrary text safe as a header value: control characters become spaces and the
/// result is cut to `max` bytes on a character boundary.
pub fn header_safe(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for ch in text.chars() {
        let ch = if ch.is_control() { ' ' } else { ch };
        if out.len() + ch.len_utf8() > max {
            break;
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_contract() {
        let email = Category::new("email").unwrap();
        let send = TaskName::parse("email.send").unwrap();
        assert_eq!(task_subject(&send, Lane::Normal), "tasks.email.send");
        assert_eq!(task_subject(&send, Lane::High), "tasks.email.send.high");
        assert_eq!(task_subject(&send, Lane::Low), "tasks.email.send.low");
        assert_eq!(stream_name(&email), "TASKS_EMAIL");
        assert_eq!(
            stream_name(&Category::new("big-data").unwrap()),
            "TASKS_BIG_DATA"
        );
        assert_eq!(
            stream_subjects(&email),
            [
                "tasks.email.*",
                "tasks.email.*.high",
                "tasks.email.*.low",
                "delayed.email.>"
            ]
        );
        assert_eq!(consumer_name(&email, Lane::Normal), "email");
        assert_eq!(consumer_name(&email, Lane::High), "email-high");
        assert_eq!(lane_filter(&email, Lane::Low), "tasks.email.*.low");
        assert_eq!(dlq_subject(&send), "dlq.email.send");
        let id = TaskId::new("abc").unwrap();
        assert_eq!(delayed_subject(&email, &id), "delayed.email.abc");
    }

    #[test]
    fn subjects_round_trip() {
        for (s, lane) in [
            ("tasks.email.send", Lane::Normal),
            ("tasks.email.send.high", Lane::High),
            ("tasks.email.send.low", Lane::Low),
        ] {
            let p = parse_task_subject(s).unwrap();
            assert_eq!(p.lane, lane);
            assert_eq!(task_subject(&p.task, p.lane), s);
        }
        for bad in [
            "tasks.email",
            "tasks.email.send.mid",
            "x.email.send",
            "tasks.Email.send",
        ] {
            assert!(parse_task_subject(bad).is_none(), "{bad}");
        }
        assert_eq!(
            parse_dlq_subject("dlq.email.send").unwrap().as_str(),
            "email.send"
        );
        assert_eq!(dlq_subject_for("tasks.email.send.high"), "dlq.email.send");
        assert_eq!(dlq_subject_for("tasks.email.Send"), "dlq.email._invalid");
        assert_eq!(dlq_subject_for("tasks.E.x"), "dlq.unknown._invalid");
    }
}
