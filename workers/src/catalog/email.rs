//! `email` category tasks: send over SMTP (at most once per task id), rule-based
//! categorization, the Maildir inbox queue and the daily summary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use lettre::message::{Mailbox, MultiPart, SinglePart, header::ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};
use taskmesh_nats::async_nats::jetstream::kv;
use taskmesh_shared::{NameError, TaskError};

use super::{Catalog, add, blocking, derived_id, skipped, store};
use crate::registry::{Registry, TaskContext, TaskPolicy};

// ---------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------

/// Checks one mailbox (`a@b.c` or `Name <a@b.c>`); `field` names the argument.
pub fn check_address(addr: &str, field: &str) -> Result<Mailbox, TaskError> {
    addr.parse::<Mailbox>()
        .map_err(|e| TaskError::permanent(format!("{field}: not an email address ({e}): {addr}")))
}

/// One address or a list of them.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum OneOrMany {
    /// `"a@b.c"`.
    One(String),
    /// `["a@b.c", "d@e.f"]`.
    Many(Vec<String>),
}

impl OneOrMany {
    fn to_vec(&self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s.clone()],
            Self::Many(v) => v.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// email.send
// ---------------------------------------------------------------------------------------

/// Arguments of `email.send`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendArgs {
    /// Recipient(s).
    pub to: OneOrMany,
    /// Subject line (one line, at most 998 characters).
    pub subject: String,
    /// Plain-text body.
    #[serde(default)]
    pub text: Option<String>,
    /// HTML body (sent as `multipart/alternative` with `text` when both are given).
    #[serde(default)]
    pub html: Option<String>,
    /// Carbon copies.
    #[serde(default)]
    pub cc: Option<OneOrMany>,
    /// Reply-To address.
    #[serde(default)]
    pub reply_to: Option<String>,
}

/// Result of `email.send`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SendResult {
    /// The `Message-ID` (derived from the task id: `<task id>@taskmesh`).
    pub message_id: String,
    /// Envelope recipients.
    pub recipients: Vec<String>,
    /// The SMTP server's final reply (`250 …`).
    pub smtp_response: String,
    /// When it was accepted (RFC 3339).
    pub sent_at: String,
    /// True when an earlier attempt of this task id had already sent it (nothing was sent
    /// this time).
    #[serde(default)]
    pub already_sent: bool,
}

/// One entry of the delivery ledger (KV `TASKMESH_EMAIL_LEDGER`, key = task id).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum LedgerEntry {
    /// Written (create-only) right before the SMTP transaction.
    Sending { at: String, worker: String },
    /// Written after the server accepted the message.
    Sent(SendResult),
}

fn build_message(
    from: &str,
    ctx: &TaskContext,
    a: &SendArgs,
) -> Result<(Message, Vec<String>, String), TaskError> {
    let to = a.to.to_vec();
    if to.is_empty() {
        return Err(TaskError::permanent("to: at least one recipient is needed"));
    }
    if to.len() > 100 {
        return Err(TaskError::permanent("to: at most 100 recipients"));
    }
    if a.subject.contains(['\r', '\n']) || a.subject.chars().count() > 998 {
        return Err(TaskError::permanent(
            "subject: must be one line of at most 998 characters",
        ));
    }
    let from = from
        .parse::<Mailbox>()
        .map_err(|e| TaskError::permanent(format!("TASKMESH_SMTP_FROM: not an address ({e})")))?;
    let message_id = format!("<{}@taskmesh>", ctx.id);
    let mut b = Message::builder()
        .from(from)
        .subject(a.subject.clone())
        .message_id(Some(message_id.clone()))
        .date_now();
    let mut recipients = Vec::new();
    for (i, t) in to.iter().enumerate() {
        let mb = check_address(t, &format!("to[{i}]"))?;
        recipients.push(mb.email.to_string());
        b = b.to(mb);
    }
    if let Some(cc) = &a.cc {
        for (i, t) in cc.to_vec().iter().enumerate() {
            let mb = check_address(t, &format!("cc[{i}]"))?;
            recipients.push(mb.email.to_string());
            b = b.cc(mb);
        }
    }
    if let Some(r) = &a.reply_to {
        b = b.reply_to(check_address(r, "reply_to")?);
    }
    let msg = match (&a.text, &a.html) {
        (Some(t), Some(h)) => b.multipart(MultiPart::alternative_plain_html(t.clone(), h.clone())),
        (Some(t), None) => b.singlepart(SinglePart::plain(t.clone())),
        (None, Some(h)) => b.singlepart(
            SinglePart::builder()
                .header(ContentType::TEXT_HTML)
                .body(h.clone()),
        ),
        (None, None) => {
            return Err(TaskError::permanent(
                "text: give `text`, `html` or both (the message has no body)",
            ));
        }
    }
    .map_err(|e| TaskError::permanent(format!("to: cannot build the message: {e}")))?;
    Ok((msg, recipients, message_id))
}

/// Did the SMTP transaction certainly not deliver the message? True for a refused
/// connection, a client-side error and an explicit 4xx/5xx reply; false for a connection
/// lost or timed out mid-session, where the server may have accepted it.
fn certainly_not_sent(e: &lettre::transport::smtp::Error) -> bool {
    if e.is_transient() || e.is_permanent() || e.is_client() {
        return true;
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::AddrNotAvailable
                    | std::io::ErrorKind::NotFound
            );
        }
        src = s.source();
    }
    false
}

/// `email.send`: one message over SMTP (`TASKMESH_SMTP_URL`), at most once per task id.
///
/// Idempotency: before the SMTP transaction the task *creates* the ledger key
/// `TASKMESH_EMAIL_LEDGER/<task id>` = `sending`; after the server's `250` it writes
/// `sent` with the result. A redelivery that finds `sent` returns the stored result with
/// `already_sent: true` and sends nothing. When the server clearly refused the message (a
/// 4xx/5xx reply, connection refused) the marker is removed and the error is retryable
/// (4xx, network) or permanent (5xx). The residual window: if the worker dies, or the
/// connection drops, after the marker and before the `sent` write, the outcome is unknown;
/// the task then fails permanently ("delivery state unknown") instead of risking a second
/// copy — at most once, never twice. An operator who checked the mailbox can delete the
/// ledger key and replay the dead letter.
pub async fn send(c: Arc<Catalog>, ctx: TaskContext, a: SendArgs) -> Result<SendResult, TaskError> {
    let (msg, recipients, message_id) = build_message(&c.settings.smtp_from, &ctx, &a)?;
    let Some(url) = c.settings.smtp_url.clone() else {
        return Err(TaskError::permanent(
            "TASKMESH_SMTP_URL is not set (smtp://host:25, smtp://host:587?tls=required, smtps://host:465)",
        ));
    };
    let ledger = store::kv_bucket(
        c.nats()?,
        &c.cfg,
        store::EMAIL_LEDGER_BUCKET,
        store::EMAIL_LEDGER_MAX_AGE,
    )
    .await?;
    let marker = LedgerEntry::Sending {
        at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        worker: ctx.worker.to_string(),
    };
    let marker = serde_json::to_vec(&marker)
        .map_err(|e| TaskError::permanent(format!("encoding the ledger entry: {e}")))?;
    let revision = match ledger.create(&ctx.id, marker.into()).await {
        Ok(rev) => rev,
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            let existing = ledger
                .get(&ctx.id)
                .await
                .map_err(|e| store::nats_error("reading the email ledger", e))?;
            return match existing.map(|b| serde_json::from_slice::<LedgerEntry>(&b)) {
                Some(Ok(LedgerEntry::Sent(mut r))) => {
                    r.already_sent = true;
                    Ok(r)
                }
                Some(Ok(LedgerEntry::Sending { at, worker })) => {
                    Err(TaskError::permanent(format!(
                        "delivery state unknown: attempt on worker {worker} at {at} started sending \
                     and did not finish; not resending to avoid a duplicate (check the mailbox, \
                     then delete key {} in {} to allow a resend)",
                        ctx.id,
                        store::EMAIL_LEDGER_BUCKET
                    )))
                }
                Some(Err(e)) => Err(TaskError::permanent(format!(
                    "unreadable email ledger entry {}: {e}",
                    ctx.id
                ))),
                // Deleted in between (a refused attempt cleaned up): try again soon.
                None => Err(TaskError::retryable("email ledger entry changed; retrying")),
            };
        }
        Err(e) => return Err(store::nats_error("writing the email ledger", e)),
    };
    let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(&url)
        .map_err(|e| TaskError::permanent(format!("TASKMESH_SMTP_URL: {e}")))?
        .timeout(Some(Duration::from_secs(60)))
        .build();
    match transport.send(msg).await {
        Ok(resp) => {
            let result = SendResult {
                message_id,
                recipients,
                smtp_response: format!(
                    "{} {}",
                    resp.code(),
                    resp.message().collect::<Vec<_>>().join(" ")
                ),
                sent_at: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
                already_sent: false,
            };
            let body = serde_json::to_vec(&LedgerEntry::Sent(result.clone()))
                .map_err(|e| TaskError::permanent(format!("encoding the ledger entry: {e}")))?;
            // Retry the ledger write a few times: losing it would turn a redelivery into
            // "delivery state unknown" instead of "already sent".
            let mut last = None;
            for _ in 0..3 {
                match ledger.update(&ctx.id, body.clone().into(), revision).await {
                    Ok(_) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            if let Some(e) = last {
                tracing::warn!(task = %ctx.id, error = %e, "mail sent but the ledger was not updated");
            }
            Ok(result)
        }
        Err(e) => {
            if certainly_not_sent(&e) {
                if let Err(de) = ledger.delete_expect_revision(&ctx.id, Some(revision)).await {
                    tracing::warn!(task = %ctx.id, error = %de, "cannot clear the email ledger marker");
                }
                if e.is_permanent() || e.is_client() {
                    Err(TaskError::permanent(format!("smtp: {e}")))
                } else {
                    Err(TaskError::retryable(format!("smtp: {e}")))
                }
            } else {
                Err(TaskError::permanent(format!(
                    "delivery state unknown: the SMTP session failed midway ({e}); not resending \
                     to avoid a duplicate"
                )))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Rules and categorization
// ---------------------------------------------------------------------------------------

/// One categorization rule: every pattern given must match (case-insensitive regular
/// expressions); the first matching rule wins.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The category assigned.
    pub category: String,
    /// Pattern for the sender (`Name <a@b.c>` text).
    #[serde(default)]
    pub from: Option<String>,
    /// Pattern for the subject.
    #[serde(default)]
    pub subject: Option<String>,
    /// Pattern for the plain-text body.
    #[serde(default)]
    pub body: Option<String>,
}

/// A rule file: a list of rules, or `{"default": "...", "rules": [...]}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RuleFile {
    List(Vec<Rule>),
    Full {
        #[serde(default)]
        default: Option<String>,
        rules: Vec<Rule>,
    },
}

/// The category when no rule matches.
pub const DEFAULT_CATEGORY: &str = "inbox";

/// The rules used when none are configured.
pub fn builtin_rules() -> Vec<Rule> {
    let r = |category: &str, from: Option<&str>, subject: Option<&str>, body: Option<&str>| Rule {
        category: category.into(),
        from: from.map(Into::into),
        subject: subject.map(Into::into),
        body: body.map(Into::into),
    };
    vec![
        r(
            "notifications",
            Some(r"no-?reply|notifications?@|mailer-daemon"),
            None,
            None,
        ),
        r(
            "finance",
            None,
            Some(r"\b(invoice|receipt|payment|order confirmation)\b"),
            None,
        ),
        r("newsletters", None, None, Some(r"\bunsubscribe\b")),
    ]
}

/// Compiled rules.
#[derive(Debug, Clone)]
pub struct Rules {
    rules: Vec<(String, [Option<Regex>; 3])>,
    default: String,
}

/// What a message is categorized on.
#[derive(Debug, Clone, Default)]
pub struct MailFacts<'a> {
    /// Sender text.
    pub from: &'a str,
    /// Subject.
    pub subject: &'a str,
    /// Plain-text body.
    pub body: &'a str,
}

impl Rules {
    /// Compiles rules; `field` prefixes error messages (`rules`, `TASKMESH_EMAIL_RULES`).
    pub fn compile(rules: &[Rule], default: Option<&str>, field: &str) -> Result<Self, TaskError> {
        let pat = |p: &Option<String>, i: usize, name: &str| -> Result<Option<Regex>, TaskError> {
            p.as_deref()
                .map(|p| {
                    RegexBuilder::new(p)
                        .case_insensitive(true)
                        .size_limit(1 << 20)
                        .build()
                        .map_err(|e| {
                            TaskError::permanent(format!(
                                "{field}[{i}].{name}: invalid pattern: {e}"
                            ))
                        })
                })
                .transpose()
        };
        let mut out = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            if r.category.trim().is_empty() {
                return Err(TaskError::permanent(format!(
                    "{field}[{i}].category: must not be empty"
                )));
            }
            out.push((
                r.category.clone(),
                [
                    pat(&r.from, i, "from")?,
                    pat(&r.subject, i, "subject")?,
                    pat(&r.body, i, "body")?,
                ],
            ));
        }
        Ok(Self {
            rules: out,
            default: default.unwrap_or(DEFAULT_CATEGORY).to_owned(),
        })
    }

    /// The configured rules (`TASKMESH_EMAIL_RULES`: inline JSON or a file path), else
    /// [`builtin_rules`].
    pub fn from_settings(text: Option<&str>) -> Result<Self, TaskError> {
        let Some(text) = text else {
            return Self::compile(&builtin_rules(), None, "rules");
        };
        let json = if text.starts_with('[') || text.starts_with('{') {
            text.to_owned()
        } else {
            std::fs::read_to_string(text).map_err(|e| {
                TaskError::retryable(format!("TASKMESH_EMAIL_RULES: cannot read {text}: {e}"))
            })?
        };
        match serde_json::from_str::<RuleFile>(&json) {
            Ok(RuleFile::List(r)) => Self::compile(&r, None, "TASKMESH_EMAIL_RULES"),
            Ok(RuleFile::Full { default, rules }) => {
                Self::compile(&rules, default.as_deref(), "TASKMESH_EMAIL_RULES")
            }
            Err(e) => Err(TaskError::permanent(format!(
                "TASKMESH_EMAIL_RULES: not a rule list: {e}"
            ))),
        }
    }

    /// The category of a message and the index of the rule that matched.
    pub fn categorize(&self, m: &MailFacts<'_>) -> (String, Option<usize>) {
        for (i, (cat, [from, subject, body])) in self.rules.iter().enumerate() {
            let ok = |re: &Option<Regex>, text: &str| re.as_ref().is_none_or(|r| r.is_match(text));
            let any = from.is_some() || subject.is_some() || body.is_some();
            if any && ok(from, m.from) && ok(subject, m.subject) && ok(body, m.body) {
                return (cat.clone(), Some(i));
            }
        }
        (self.default.clone(), None)
    }
}

/// Arguments of `email.categorize_incoming_email`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategorizeArgs {
    /// Sender (`Name <a@b.c>` or `a@b.c`).
    #[serde(default)]
    pub from: String,
    /// Subject.
    #[serde(default)]
    pub subject: String,
    /// Plain-text body.
    #[serde(default)]
    pub body: String,
    /// Rules for this call instead of the configured ones.
    #[serde(default)]
    pub rules: Option<Vec<Rule>>,
}

/// Result of `email.categorize_incoming_email`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CategorizeResult {
    /// The category.
    pub category: String,
    /// Index of the rule that matched; `null` = the default category.
    pub rule: Option<usize>,
}

/// `email.categorize_incoming_email`: classifies one message with the rules.
pub async fn categorize_incoming_email(
    c: Arc<Catalog>,
    _ctx: TaskContext,
    a: CategorizeArgs,
) -> Result<CategorizeResult, TaskError> {
    let rules = match &a.rules {
        Some(r) => Rules::compile(r, None, "rules")?,
        None => Rules::from_settings(c.settings.email_rules.as_deref())?,
    };
    let (category, rule) = rules.categorize(&MailFacts {
        from: &a.from,
        subject: &a.subject,
        body: &a.body,
    });
    Ok(CategorizeResult { category, rule })
}

// ---------------------------------------------------------------------------------------
// email.process_email_queue
// ---------------------------------------------------------------------------------------

/// The header the queue adds to a filed message.
pub const CATEGORY_HEADER: &str = "X-Taskmesh-Category";

/// Arguments of `email.process_email_queue`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessQueueArgs {
    /// The Maildir; default `TASKMESH_MAILDIR`.
    #[serde(default)]
    pub maildir: Option<PathBuf>,
    /// Most messages handled in one run (1..=10000); default 500.
    #[serde(default)]
    pub limit: Option<usize>,
}

/// Result of `email.process_email_queue`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ProcessQueueResult {
    /// Messages filed this run.
    pub processed: usize,
    /// Filed messages per category.
    pub by_category: BTreeMap<String, usize>,
    /// Messages still in `new/` (over the limit, or failed).
    pub remaining: usize,
    /// Per-message problems.
    pub errors: Vec<String>,
}

/// Parses a message just enough to categorize it.
fn facts_of(raw: &[u8]) -> (String, String, String) {
    let Some(m) = mail_parser::MessageParser::default().parse(raw) else {
        return Default::default();
    };
    let from = m
        .from()
        .and_then(|a| a.first())
        .map(|a| match (a.name(), a.address()) {
            (Some(n), Some(ad)) => format!("{n} <{ad}>"),
            (None, Some(ad)) => ad.to_owned(),
            (Some(n), None) => n.to_owned(),
            (None, None) => String::new(),
        })
        .unwrap_or_default();
    let subject = m.subject().unwrap_or_default().to_owned();
    let body = m.body_text(0).map(|b| b.into_owned()).unwrap_or_default();
    (from, subject, body)
}

/// Files one message: `new/<name>` → `tmp/<name>` with the category header → rename to
/// `cur/<name>:2,` → remove `new/<name>`. A rerun after a crash at any step finishes the
/// job without filing the message twice.
fn file_message(root: &Path, name: &str, category: &str, raw: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let base = name.split(":2,").next().unwrap_or(name);
    let cur = root.join("cur").join(format!("{base}:2,"));
    let new = root.join("new").join(name);
    if !cur.exists() {
        let tmp = root.join("tmp").join(base);
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{CATEGORY_HEADER}: {category}\r\n").as_bytes())?;
        f.write_all(raw)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &cur)?;
    }
    std::fs::remove_file(&new)
}

/// The blocking body of `email.process_email_queue`.
pub fn process_maildir(
    root: &Path,
    rules: &Rules,
    limit: usize,
) -> Result<ProcessQueueResult, TaskError> {
    let new_dir = root.join("new");
    if !new_dir.is_dir() {
        return Err(TaskError::retryable(format!(
            "maildir: {} has no new/ folder (not a Maildir, or not mounted yet)",
            root.display()
        )));
    }
    for sub in ["cur", "tmp"] {
        std::fs::create_dir_all(root.join(sub))
            .map_err(|e| TaskError::retryable(format!("maildir: cannot create {sub}/: {e}")))?;
    }
    let mut names: Vec<String> = std::fs::read_dir(&new_dir)
        .map_err(|e| TaskError::retryable(format!("maildir: cannot list new/: {e}")))?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    let mut out = ProcessQueueResult::default();
    for name in names.iter().take(limit) {
        let path = new_dir.join(name);
        let raw = match std::fs::read(&path) {
            Ok(r) => r,
            Err(e) => {
                out.errors.push(format!("{name}: {e}"));
                continue;
            }
        };
        let (from, subject, body) = facts_of(&raw);
        let (category, _) = rules.categorize(&MailFacts {
            from: &from,
            subject: &subject,
            body: &body,
        });
        match file_message(root, name, &category, &raw) {
            Ok(()) => {
                out.processed += 1;
                *out.by_category.entry(category).or_default() += 1;
            }
            Err(e) => out.errors.push(format!("{name}: {e}")),
        }
    }
    out.remaining = names.len() - out.processed;
    Ok(out)
}

/// `email.process_email_queue`: files every new message of the Maildir inbox into `cur/`
/// with its category in an `X-Taskmesh-Category` header. `{"skipped": …}` without a
/// Maildir; a Maildir without `new/` is retryable (not mounted yet).
pub async fn process_email_queue(
    c: Arc<Catalog>,
    _ctx: TaskContext,
    a: ProcessQueueArgs,
) -> Result<serde_json::Value, TaskError> {
    let limit = a.limit.unwrap_or(500);
    if !(1..=10_000).contains(&limit) {
        return Err(TaskError::permanent("limit: must be within 1..=10000"));
    }
    let Some(root) = a.maildir.or_else(|| c.settings.maildir.clone()) else {
        return Ok(skipped("no maildir configured (TASKMESH_MAILDIR)"));
    };
    if !root.is_absolute() {
        return Err(TaskError::permanent("maildir: must be an absolute path"));
    }
    let rules = Rules::from_settings(c.settings.email_rules.as_deref())?;
    let r = blocking(move || process_maildir(&root, &rules, limit)).await?;
    serde_json::to_value(r).map_err(|e| TaskError::permanent(e.to_string()))
}

// ---------------------------------------------------------------------------------------
// email.send_daily_email_summary
// ---------------------------------------------------------------------------------------

/// Arguments of `email.send_daily_email_summary`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SummaryArgs {
    /// Recipients; default `TASKMESH_SUMMARY_TO`.
    #[serde(default)]
    pub to: Option<OneOrMany>,
    /// The UTC day summarized (`YYYY-MM-DD`); default yesterday (relative to the fire time
    /// when scheduled).
    #[serde(default)]
    pub date: Option<String>,
}

/// Statistics of one task name for one day.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskDayStats {
    /// Finished successfully.
    pub succeeded: u64,
    /// Failed without retry.
    pub failed: u64,
    /// Dead-lettered.
    pub dead: u64,
    /// Median run time of successful runs, ms.
    pub p50_ms: Option<u64>,
    /// 95th percentile run time of successful runs, ms.
    pub p95_ms: Option<u64>,
}

/// Result of `email.send_daily_email_summary`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SummaryResult {
    /// The day summarized.
    pub date: String,
    /// Per task.
    pub tasks: BTreeMap<String, TaskDayStats>,
    /// Recipients of the summary.
    pub sent_to: Vec<String>,
    /// The `email.send` task id (`<id>-mail`), `null` when nobody is configured.
    pub email_task_id: Option<String>,
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Per-task statistics of the records that finished on `day` (UTC).
pub fn day_stats(
    records: &[taskmesh_shared::TaskRecord],
    day: NaiveDate,
) -> BTreeMap<String, TaskDayStats> {
    use taskmesh_shared::TaskState;
    let mut out: BTreeMap<String, TaskDayStats> = BTreeMap::new();
    let mut durations: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in records {
        let Some(done) = r.finished_at else { continue };
        if done.date_naive() != day {
            continue;
        }
        let s = out.entry(r.task.clone()).or_default();
        match r.state {
            TaskState::Succeeded => {
                s.succeeded += 1;
                if let Some(d) = r.duration_ms {
                    durations.entry(r.task.clone()).or_default().push(d);
                }
            }
            TaskState::Failed => s.failed += 1,
            TaskState::Dead => s.dead += 1,
            _ => {}
        }
    }
    for (task, mut d) in durations {
        d.sort_unstable();
        if let Some(s) = out.get_mut(&task) {
            s.p50_ms = percentile(&d, 0.50);
            s.p95_ms = percentile(&d, 0.95);
        }
    }
    out
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The summary as (text, html).
pub fn render_summary(day: &str, stats: &BTreeMap<String, TaskDayStats>) -> (String, String) {
    let ms = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v} ms"));
    let mut text = format!("taskmesh summary for {day} (UTC)\n\n");
    let mut html = format!(
        "<h2>taskmesh summary for {}</h2>\n<table border=\"1\" cellpadding=\"4\">\n\
         <tr><th>task</th><th>succeeded</th><th>failed</th><th>dead</th><th>p50</th><th>p95</th></tr>\n",
        html_escape(day)
    );
    if stats.is_empty() {
        text.push_str("No tasks finished that day.\n");
    }
    text.push_str(&format!(
        "{:<40} {:>9} {:>6} {:>5} {:>9} {:>9}\n",
        "task", "succeeded", "failed", "dead", "p50", "p95"
    ));
    for (task, s) in stats {
        text.push_str(&format!(
            "{:<40} {:>9} {:>6} {:>5} {:>9} {:>9}\n",
            task,
            s.succeeded,
            s.failed,
            s.dead,
            ms(s.p50_ms),
            ms(s.p95_ms)
        ));
        html.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            html_escape(task),
            s.succeeded,
            s.failed,
            s.dead,
            ms(s.p50_ms),
            ms(s.p95_ms)
        ));
    }
    html.push_str("</table>\n");
    (text, html)
}

/// `email.send_daily_email_summary`: the previous UTC day's task statistics from the result
/// bucket (records kept for `results.ttl`, 24 h by default — set it to 48 h for complete
/// days), rendered as text and HTML and sent through `email.send` with task id
/// `<id>-mail` (so a redelivered summary mails once).
pub async fn send_daily_email_summary(
    c: Arc<Catalog>,
    ctx: TaskContext,
    a: SummaryArgs,
) -> Result<SummaryResult, TaskError> {
    let to =
        a.to.map(|t| t.to_vec())
            .unwrap_or_else(|| c.settings.summary_to.clone());
    for (i, t) in to.iter().enumerate() {
        check_address(t, &format!("to[{i}]"))?;
    }
    let now = ctx
        .fire_time
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map_or_else(Utc::now, |t| t.to_utc());
    let day = match &a.date {
        Some(d) => NaiveDate::parse_from_str(d, "%Y-%m-%d")
            .map_err(|e| TaskError::permanent(format!("date: expected YYYY-MM-DD ({e})")))?,
        None => (now - chrono::Duration::days(1)).date_naive(),
    };
    let records = store::all_results(c.nats()?).await?;
    let stats = day_stats(&records, day);
    let day_s = day.format("%Y-%m-%d").to_string();
    let mut email_task_id = None;
    if !to.is_empty() {
        let (text, html) = render_summary(&day_s, &stats);
        let id = derived_id(&ctx.id, "mail");
        store::enqueue_follow_up(
            c.nats()?,
            &c.cfg,
            "email.send",
            &serde_json::json!({
                "to": to,
                "subject": format!("taskmesh daily summary {day_s}"),
                "text": text,
                "html": html,
            }),
            &id,
        )
        .await?;
        email_task_id = Some(id);
    }
    Ok(SummaryResult {
        date: day_s,
        tasks: stats,
        sent_to: to,
        email_task_id,
    })
}

/// Registers the `email` tasks.
pub fn register(r: &mut Registry, c: &Arc<Catalog>) -> Result<(), NameError> {
    add(
        r,
        c,
        "email.send",
        TaskPolicy::retry_delay(Duration::from_secs(60)).with_timeout(Duration::from_secs(120)),
        send,
    )?;
    add(
        r,
        c,
        "email.categorize_incoming_email",
        TaskPolicy::default(),
        categorize_incoming_email,
    )?;
    add(
        r,
        c,
        "email.process_email_queue",
        TaskPolicy::retry_delay(Duration::from_secs(300)),
        process_email_queue,
    )?;
    add(
        r,
        c,
        "email.send_daily_email_summary",
        TaskPolicy::retry_delay(Duration::from_secs(600)),
        send_daily_email_summary,
    )?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_first_and_default() {
        let rules = Rules::compile(
            &[
                Rule {
                    category: "work".into(),
                    from: Some("@corp\\.example$".into()),
                    subject: None,
                    body: None,
                },
                Rule {
                    category: "bills".into(),
                    from: None,
                    subject: Some("invoice".into()),
                    body: None,
                },
            ],
            None,
            "rules",
        )
        .unwrap();
        let f = |from, subject| MailFacts {
            from,
            subject,
            body: "",
        };
        assert_eq!(rules.categorize(&f("a@corp.example", "INVOICE")).0, "work");
        assert_eq!(
            rules.categorize(&f("a@x.example", "Your Invoice")),
            ("bills".into(), Some(1))
        );
        assert_eq!(
            rules.categorize(&f("a@x.example", "hi")),
            ("inbox".into(), None)
        );
        let bad = Rules::compile(
            &[Rule {
                category: "x".into(),
                from: Some("(".into()),
                subject: None,
                body: None,
            }],
            None,
            "rules",
        )
        .unwrap_err();
        assert!(!bad.is_retryable());
        assert!(Rules::from_settings(Some(r#"{"default":"other","rules":[]}"#)).is_ok());
    }

    #[test]
    fn percentiles_and_render() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[10, 20, 30, 40], 0.5), Some(20));
        assert_eq!(percentile(&[10, 20, 30, 40], 0.95), Some(40));
        let mut m = BTreeMap::new();
        m.insert("a.<b>".to_string(), TaskDayStats::default());
        let (t, h) = render_summary("2026-01-01", &m);
        assert!(t.contains("a.<b>"));
        assert!(h.contains("a.&lt;b&gt;"));
    }

    #[test]
    fn maildir_messages_are_filed_once() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("new")).unwrap();
        std::fs::write(
            d.path().join("new/1.msg"),
            "From: Shop <noreply@shop.example>\r\nSubject: hi\r\n\r\nbody\r\n",
        )
        .unwrap();
        let rules = Rules::from_settings(None).unwrap();
        let r = process_maildir(d.path(), &rules, 10).unwrap();
        assert_eq!(r.processed, 1);
        assert_eq!(r.by_category.get("notifications"), Some(&1));
        let filed = std::fs::read_to_string(d.path().join("cur/1.msg:2,")).unwrap();
        assert!(filed.starts_with("X-Taskmesh-Category: notifications\r\n"));
        let again = process_maildir(d.path(), &rules, 10).unwrap();
        assert_eq!(again.processed, 0);
    }
}
