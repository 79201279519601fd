//! `sync` category tasks: ICS calendars and a Notion database into KV buckets, an IMAP
//! mailbox into the Maildir inbox.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use taskmesh_shared::{NameError, TaskError};

use super::fsutil::sha256_hex;
use super::{Catalog, add, blocking, derived_id, http, ics, imap, skipped, store};
use crate::registry::{Registry, TaskContext, TaskPolicy};

// ---------------------------------------------------------------------------------------
// sync.calendar_events
// ---------------------------------------------------------------------------------------

/// Arguments of `sync.calendar_events`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalendarArgs {
    /// ICS feed URLs; default `TASKMESH_CALENDAR_URLS`.
    #[serde(default)]
    pub urls: Option<Vec<String>>,
    /// Mail the new events to this address (enqueues `email.send`).
    #[serde(default)]
    pub notify_email: Option<String>,
}

/// One feed's outcome.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct FeedResult {
    /// The feed URL.
    pub url: String,
    /// The server answered 304 (the ETag matched): nothing changed.
    pub not_modified: bool,
    /// Events new in the bucket.
    pub added: u64,
    /// Events whose content changed.
    pub updated: u64,
    /// Events gone from the feed, deleted from the bucket.
    pub removed: u64,
    /// Events unchanged.
    pub unchanged: u64,
    /// Older duplicate revisions dropped (same UID / RECURRENCE-ID).
    pub duplicates: u64,
}

/// Result of `sync.calendar_events`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CalendarResult {
    /// Per feed.
    pub feeds: Vec<FeedResult>,
    /// Totals.
    pub added: u64,
    /// Totals.
    pub updated: u64,
    /// Totals.
    pub removed: u64,
    /// The `email.send` task announcing new events, if any.
    pub notify_task_id: Option<String>,
}

/// What the bucket remembers about a feed (`feed.<feed>`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct FeedState {
    url: String,
    etag: Option<String>,
    /// identity → content digest.
    events: BTreeMap<String, String>,
}

/// Stored event (`event.<feed>.<digest of identity>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredEvent {
    feed: String,
    #[serde(flatten)]
    event: ics::Event,
    synced_at: String,
}

fn feed_key(url: &str) -> String {
    sha256_hex(url.as_bytes())[..16].to_owned()
}

/// `sync.calendar_events`: for each ICS feed, a conditional GET (`If-None-Match` with the
/// stored ETag; 304 = nothing to do), then an upsert of every event into KV
/// `TASKMESH_CALENDAR` and the deletion of events gone from the feed. Duplicate revisions
/// of one event keep the newest (`SEQUENCE`, then `LAST-MODIFIED`). HTTP 408/429/5xx and
/// transport errors are retryable; a document that is not iCalendar is permanent. The
/// feed's state (ETag, known events) is written last, so a rerun after a crash redoes
/// the same upserts.
pub async fn calendar_events(
    c: Arc<Catalog>,
    ctx: TaskContext,
    a: CalendarArgs,
) -> Result<serde_json::Value, TaskError> {
    let urls = a.urls.unwrap_or_else(|| c.settings.calendar_urls.clone());
    for (i, u) in urls.iter().enumerate() {
        http::check_url(u, &format!("urls[{i}]"))?;
    }
    if let Some(to) = &a.notify_email {
        super::email::check_address(to, "notify_email")?;
    }
    if urls.is_empty() {
        return Ok(skipped("no feeds configured (TASKMESH_CALENDAR_URLS)"));
    }
    let conn = c.nats()?;
    let kv = store::kv_bucket(conn, &c.cfg, store::CALENDAR_BUCKET, Duration::ZERO).await?;
    let mut total = CalendarResult::default();
    let mut new_events: Vec<String> = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let fk = feed_key(url);
        let state_key = format!("feed.{fk}");
        let mut state: FeedState = kv
            .get(&state_key)
            .await
            .map_err(|e| store::nats_error("reading the calendar bucket", e))?
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut req = c.http.get(url);
        if let Some(etag) = &state.etag {
            req = req.header(reqwest::header::IF_NONE_MATCH, etag);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| http::transport_error(&format!("fetching urls[{i}]"), &e))?;
        let mut fr = FeedResult {
            url: url.clone(),
            ..FeedResult::default()
        };
        if resp.status() == reqwest::StatusCode::NOT_MODIFIED {
            fr.not_modified = true;
            fr.unchanged = state.events.len() as u64;
            total.feeds.push(fr);
            continue;
        }
        if !resp.status().is_success() {
            return Err(http::status_error(&format!("fetching urls[{i}]"), resp).await);
        }
        let etag = resp
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp
            .text()
            .await
            .map_err(|e| http::transport_error(&format!("reading urls[{i}]"), &e))?;
        let cal = ics::parse(&text).map_err(|e| TaskError::permanent(format!("urls[{i}]: {e}")))?;
        fr.duplicates = cal.duplicates as u64;
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
        let mut next = BTreeMap::new();
        for (identity, ev) in cal.events {
            let body = serde_json::to_vec(&ev).map_err(|e| TaskError::permanent(e.to_string()))?;
            let digest = sha256_hex(&body);
            let key = format!("event.{fk}.{}", &sha256_hex(identity.as_bytes())[..32]);
            match state.events.get(&identity) {
                Some(d) if *d == digest => fr.unchanged += 1,
                prev => {
                    if prev.is_some() {
                        fr.updated += 1;
                    } else {
                        fr.added += 1;
                        new_events.push(format!("{} ({})", ev.summary, ev.start));
                    }
                    let stored = StoredEvent {
                        feed: url.clone(),
                        event: ev,
                        synced_at: now.clone(),
                    };
                    let v = serde_json::to_vec(&stored)
                        .map_err(|e| TaskError::permanent(e.to_string()))?;
                    kv.put(&key, v.into())
                        .await
                        .map_err(|e| store::nats_error("writing an event", e))?;
                }
            }
            next.insert(identity, digest);
        }
        for identity in state.events.keys() {
            if !next.contains_key(identity) {
                let key = format!("event.{fk}.{}", &sha256_hex(identity.as_bytes())[..32]);
                kv.delete(&key)
                    .await
                    .map_err(|e| store::nats_error("deleting an event", e))?;
                fr.removed += 1;
            }
        }
        state = FeedState {
            url: url.clone(),
            etag,
            events: next,
        };
        let v = serde_json::to_vec(&state).map_err(|e| TaskError::permanent(e.to_string()))?;
        kv.put(&state_key, v.into())
            .await
            .map_err(|e| store::nats_error("writing the feed state", e))?;
        total.added += fr.added;
        total.updated += fr.updated;
        total.removed += fr.removed;
        total.feeds.push(fr);
    }
    if let Some(to) = &a.notify_email
        && !new_events.is_empty()
    {
        let id = derived_id(&ctx.id, "events");
        let text = format!(
            "New calendar events:\n\n{}\n",
            new_events
                .iter()
                .map(|e| format!("- {e}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        store::enqueue_follow_up(
            conn,
            &c.cfg,
            "email.send",
            &serde_json::json!({"to": to, "subject": format!("{} new calendar events", new_events.len()), "text": text}),
            &id,
        )
        .await?;
        total.notify_task_id = Some(id);
    }
    serde_json::to_value(total).map_err(|e| TaskError::permanent(e.to_string()))
}

// ---------------------------------------------------------------------------------------
// sync.notion_pages
// ---------------------------------------------------------------------------------------

/// The Notion API version sent.
pub const NOTION_VERSION: &str = "2022-06-28";

/// Arguments of `sync.notion_pages`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotionArgs {
    /// Database id; default `TASKMESH_NOTION_DATABASE_ID`.
    #[serde(default)]
    pub database_id: Option<String>,
    /// Results per request, 1..=100; default 100.
    #[serde(default)]
    pub page_size: Option<u32>,
    /// Ignore the stored cursor and fetch every page.
    #[serde(default)]
    pub full: bool,
}

/// Result of `sync.notion_pages`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct NotionResult {
    /// The database.
    pub database_id: String,
    /// Query requests made.
    pub requests: u64,
    /// Pages new in the bucket.
    pub added: u64,
    /// Pages with a newer `last_edited_time`.
    pub updated: u64,
    /// Pages whose stored copy is as new or newer (kept).
    pub unchanged: u64,
    /// Archived or trashed pages removed from the bucket.
    pub removed: u64,
    /// The newest `last_edited_time` seen: the next run asks only for pages edited since.
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
struct QueryResponse {
    #[serde(default)]
    results: Vec<serde_json::Value>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    next_cursor: Option<String>,
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The plain text of a page's title property.
pub fn page_title(page: &serde_json::Value) -> String {
    page.get("properties")
        .and_then(|p| p.as_object())
        .and_then(|props| {
            props
                .values()
                .find(|v| v.get("type").and_then(|t| t.as_str()) == Some("title"))
        })
        .and_then(|t| t.get("title"))
        .and_then(|t| t.as_array())
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| p.get("plain_text").and_then(|s| s.as_str()))
                .collect::<String>()
        })
        .unwrap_or_default()
}

/// `sync.notion_pages`: pages through `POST {base}/v1/databases/{id}/query` (sorted by
/// `last_edited_time`, filtered to pages edited since the stored cursor) and stores each
/// page in KV `TASKMESH_NOTION` as `page.<id>`. Conflicts: a stored copy whose
/// `last_edited_time` is the same or newer is kept; archived/trashed pages are removed.
/// HTTP 429 (and 408/5xx) is retryable after `Retry-After`; the cursor moves only after
/// the last page, and page writes are idempotent, so a retry redoes no harm.
pub async fn notion_pages(
    c: Arc<Catalog>,
    _ctx: TaskContext,
    a: NotionArgs,
) -> Result<serde_json::Value, TaskError> {
    let page_size = a.page_size.unwrap_or(100);
    if !(1..=100).contains(&page_size) {
        return Err(TaskError::permanent("page_size: must be within 1..=100"));
    }
    if let Some(id) = &a.database_id
        && !valid_id(id)
    {
        return Err(TaskError::permanent(
            "database_id: letters, digits and `-` only, at most 64",
        ));
    }
    let Some(db) = a
        .database_id
        .or_else(|| c.settings.notion_database_id.clone())
    else {
        return Ok(skipped(
            "no database configured (TASKMESH_NOTION_DATABASE_ID)",
        ));
    };
    if !valid_id(&db) {
        return Err(TaskError::permanent(
            "TASKMESH_NOTION_DATABASE_ID: letters, digits and `-` only",
        ));
    }
    let Some(token) = c.settings.notion_token.clone() else {
        return Ok(skipped("no token configured (TASKMESH_NOTION_TOKEN)"));
    };
    let url = format!(
        "{}/v1/databases/{db}/query",
        c.settings.notion_base_url.trim_end_matches('/')
    );
    http::check_url(&url, "TASKMESH_NOTION_BASE_URL")?;
    let conn = c.nats()?;
    let kv = store::kv_bucket(conn, &c.cfg, store::NOTION_BUCKET, Duration::ZERO).await?;
    let cursor_key = format!("cursor.{db}");
    let since: Option<String> = if a.full {
        None
    } else {
        kv.get(&cursor_key)
            .await
            .map_err(|e| store::nats_error("reading the notion cursor", e))?
            .and_then(|b| String::from_utf8(b.to_vec()).ok())
    };
    let mut r = NotionResult {
        database_id: db.clone(),
        cursor: since.clone(),
        ..NotionResult::default()
    };
    let mut start: Option<String> = None;
    loop {
        let mut body = serde_json::json!({
            "page_size": page_size,
            "sorts": [{"timestamp": "last_edited_time", "direction": "ascending"}],
        });
        if let Some(s) = &since {
            body["filter"] = serde_json::json!({
                "timestamp": "last_edited_time",
                "last_edited_time": {"on_or_after": s},
            });
        }
        if let Some(s) = &start {
            body["start_cursor"] = s.clone().into();
        }
        let resp = c
            .http
            .post(&url)
            .bearer_auth(&token)
            .header("Notion-Version", NOTION_VERSION)
            .json(&body)
            .send()
            .await
            .map_err(|e| http::transport_error("notion query", &e))?;
        r.requests += 1;
        if !resp.status().is_success() {
            return Err(http::status_error("notion query", resp).await);
        }
        let q: QueryResponse = resp
            .json()
            .await
            .map_err(|e| TaskError::retryable(format!("notion query: unreadable response: {e}")))?;
        for page in q.results {
            let Some(id) = page
                .get("id")
                .and_then(|v| v.as_str())
                .filter(|s| valid_id(s))
            else {
                continue;
            };
            let edited = page
                .get("last_edited_time")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned();
            let gone = page.get("archived").and_then(|v| v.as_bool()) == Some(true)
                || page.get("in_trash").and_then(|v| v.as_bool()) == Some(true);
            let key = format!("page.{id}");
            let existing: Option<serde_json::Value> = kv
                .get(&key)
                .await
                .map_err(|e| store::nats_error("reading a page", e))?
                .and_then(|b| serde_json::from_slice(&b).ok());
            if r.cursor.as_deref().is_none_or(|c| edited.as_str() > c) {
                r.cursor = Some(edited.clone());
            }
            if gone {
                if existing.is_some() {
                    kv.delete(&key)
                        .await
                        .map_err(|e| store::nats_error("deleting a page", e))?;
                    r.removed += 1;
                }
                continue;
            }
            let stored_edit = existing
                .as_ref()
                .and_then(|e| e.get("last_edited_time"))
                .and_then(|v| v.as_str())
                .map(str::to_owned);
            if stored_edit.as_deref().is_some_and(|s| s >= edited.as_str()) {
                r.unchanged += 1;
                continue;
            }
            let doc = serde_json::json!({
                "id": id,
                "title": page_title(&page),
                "url": page.get("url"),
                "last_edited_time": edited,
                "properties": page.get("properties"),
                "synced_at": Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
            });
            let v = serde_json::to_vec(&doc).map_err(|e| TaskError::permanent(e.to_string()))?;
            kv.put(&key, v.into())
                .await
                .map_err(|e| store::nats_error("writing a page", e))?;
            if existing.is_some() {
                r.updated += 1;
            } else {
                r.added += 1;
            }
        }
        match (q.has_more, q.next_cursor) {
            (true, Some(next)) => start = Some(next),
            _ => break,
        }
        if r.requests >= 1000 {
            break; // bounded: the next run continues from the cursor
        }
    }
    if let Some(cur) = &r.cursor
        && r.cursor != since
    {
        kv.put(&cursor_key, cur.clone().into())
            .await
            .map_err(|e| store::nats_error("writing the notion cursor", e))?;
    }
    serde_json::to_value(r).map_err(|e| TaskError::permanent(e.to_string()))
}

// ---------------------------------------------------------------------------------------
// sync.email_service
// ---------------------------------------------------------------------------------------

/// Arguments of `sync.email_service`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailSyncArgs {
    /// Maildir to deliver into; default `TASKMESH_MAILDIR`.
    #[serde(default)]
    pub maildir: Option<PathBuf>,
    /// Most messages copied per run, 1..=10000; default 500.
    #[serde(default)]
    pub limit: Option<usize>,
}

/// Result of `sync.email_service`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct MailSyncResult {
    /// The mailbox.
    pub mailbox: String,
    /// Messages copied into `new/`.
    pub fetched: u64,
    /// The highest UID copied so far.
    pub last_uid: u64,
    /// Messages still waiting on the server (over the limit).
    pub remaining: u64,
}

/// The per-mailbox sync state file in the Maildir.
fn state_path(maildir: &Path, url: &str) -> PathBuf {
    maildir.join(format!(
        ".taskmesh-imap-{}",
        &sha256_hex(url.as_bytes())[..16]
    ))
}

/// `sync.email_service`: copies new messages of an IMAP mailbox (`TASKMESH_IMAP_URL`) into
/// the Maildir's `new/` (where `email.process_email_queue` picks them up). State: a file
/// `.taskmesh-imap-<digest>` in the Maildir holds `UIDVALIDITY` and the last UID copied;
/// each message file is named by UID validity and UID and written via `tmp/` + rename,
/// so a rerun never delivers one twice. Messages stay on the server, unflagged.
pub async fn email_service(
    c: Arc<Catalog>,
    ctx: TaskContext,
    a: MailSyncArgs,
) -> Result<serde_json::Value, TaskError> {
    let limit = a.limit.unwrap_or(500);
    if !(1..=10_000).contains(&limit) {
        return Err(TaskError::permanent("limit: must be within 1..=10000"));
    }
    if let Some(m) = &a.maildir
        && !m.is_absolute()
    {
        return Err(TaskError::permanent("maildir: must be an absolute path"));
    }
    let Some(url) = c.settings.imap_url.clone() else {
        return Ok(skipped("no IMAP account configured (TASKMESH_IMAP_URL)"));
    };
    let Some(maildir) = a.maildir.or_else(|| c.settings.maildir.clone()) else {
        return Ok(skipped("no maildir configured (TASKMESH_MAILDIR)"));
    };
    let target = imap::parse_url(&url, "TASKMESH_IMAP_URL")?;
    let md = maildir.clone();
    blocking(move || {
        for sub in ["new", "cur", "tmp"] {
            std::fs::create_dir_all(md.join(sub))
                .map_err(|e| TaskError::retryable(format!("maildir: {e}")))?;
        }
        Ok(())
    })
    .await?;
    let state_file = state_path(&maildir, &url);
    let (mut validity, mut last) = match tokio::fs::read_to_string(&state_file).await {
        Ok(s) => {
            let mut it = s.split_whitespace().filter_map(|n| n.parse::<u64>().ok());
            (it.next().unwrap_or(0), it.next().unwrap_or(0))
        }
        Err(_) => (0, 0),
    };
    let mut session = imap::Session::login(&target).await?;
    let server_validity = session.select(&target.mailbox).await?;
    if server_validity != validity {
        // A new mailbox (or one the server renumbered): start over; file names carry the
        // validity, so messages already copied under the old one are not confused.
        validity = server_validity;
        last = 0;
    }
    let uids = session.uids_after(last).await?;
    let mut r = MailSyncResult {
        mailbox: target.mailbox.clone(),
        last_uid: last,
        remaining: uids.len().saturating_sub(limit) as u64,
        ..MailSyncResult::default()
    };
    for uid in uids.into_iter().take(limit) {
        if ctx.cancel.is_cancelled() {
            break;
        }
        let name = format!("imap-{validity}-{uid}.taskmesh");
        let Some(raw) = session.fetch(uid).await? else {
            continue;
        };
        let md = maildir.clone();
        let n = name.clone();
        let written = blocking(move || deliver(&md, &n, &raw)).await?;
        if written {
            r.fetched += 1;
        }
        r.last_uid = uid;
        tokio::fs::write(&state_file, format!("{validity} {uid}\n"))
            .await
            .map_err(|e| TaskError::retryable(format!("maildir: writing sync state: {e}")))?;
    }
    session.logout().await;
    serde_json::to_value(r).map_err(|e| TaskError::permanent(e.to_string()))
}

/// Writes a message into `new/` unless it is already in `new/` or `cur/`.
fn deliver(maildir: &Path, name: &str, raw: &[u8]) -> Result<bool, TaskError> {
    use std::io::Write;
    let io = |e: std::io::Error| TaskError::retryable(format!("maildir: {e}"));
    let new = maildir.join("new").join(name);
    let in_cur = maildir.join("cur").join(format!("{name}:2,"));
    if new.exists() || in_cur.exists() {
        return Ok(false);
    }
    let tmp = maildir.join("tmp").join(name);
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(raw).and_then(|()| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, &new).map_err(io)?;
    Ok(true)
}

/// Registers the `sync` tasks.
pub fn register(r: &mut Registry, c: &Arc<Catalog>) -> Result<(), NameError> {
    add(
        r,
        c,
        "sync.calendar_events",
        TaskPolicy::retry_delay(Duration::from_secs(300)),
        calendar_events,
    )?;
    add(
        r,
        c,
        "sync.notion_pages",
        TaskPolicy::retry_delay(Duration::from_secs(600)),
        notion_pages,
    )?;
    add(
        r,
        c,
        "sync.email_service",
        TaskPolicy::default(),
        email_service,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_and_ids() {
        let page = serde_json::json!({"properties": {"Name": {"type": "title", "title": [
            {"plain_text": "Hello "}, {"plain_text": "world"}]}}});
        assert_eq!(page_title(&page), "Hello world");
        assert!(valid_id("1a2b-3c"));
        assert!(!valid_id("a/b"));
        assert_eq!(feed_key("http://x").len(), 16);
    }
}
