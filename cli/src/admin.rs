//! Admin verbs: `status`, `inspect`, `workers`, `dlq list|show|replay|purge`,
//! `pause|resume <category>` and `purge <category>`. Tables by default, `--json` on every
//! verb. The snapshot behind `status` is also `GET /api/stats`.

use std::io::{IsTerminal as _, Write as _};

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Subcommand};
use serde::Serialize;
use taskmesh_nats::admin::{Admin, CategoryStats, DeadLetter, DlqFilter};
use taskmesh_nats::{Connection, Heartbeats, ResultStore};
use taskmesh_shared::config::parse_duration;
use taskmesh_shared::record::WorkerHeartbeat;
use taskmesh_shared::{Category, Config, TaskId, TaskRecord};

/// One schedule in the status snapshot.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScheduleStatus {
    /// The schedule's name.
    pub(crate) name: String,
    /// The task each fire enqueues.
    pub(crate) task: String,
    /// `enabled`, `paused`, `invalid`, `shadowed`.
    pub(crate) state: &'static str,
    /// RFC 3339, when enabled.
    pub(crate) next_fire: Option<String>,
    /// RFC 3339 of the last fired slot.
    pub(crate) last_fired: Option<String>,
}

/// `taskmesh status --json` and `GET /api/stats` (see docs/operations.md).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Status {
    /// When the snapshot was taken.
    pub(crate) generated_at: DateTime<Utc>,
    /// Per category, in config order.
    pub(crate) categories: Vec<CategoryStats>,
    /// Dead letters in total (all categories, also ones not in this config).
    pub(crate) dlq_total: u64,
    /// Live workers (heartbeats not expired).
    pub(crate) workers: Vec<WorkerHeartbeat>,
    /// Schedules with their next fire.
    pub(crate) schedules: Vec<ScheduleStatus>,
    /// The scheduler replica holding the lease, if any.
    pub(crate) scheduler_leader: Option<String>,
    /// Why schedules could not be listed (an invalid schedule in the config), if so.
    pub(crate) schedules_error: Option<String>,
}

/// Takes the status snapshot.
pub(crate) async fn snapshot(cfg: &Config, conn: &Connection) -> anyhow::Result<Status> {
    let admin = Admin::new(conn.js.clone());
    let dlq = admin.dlq_counts().await?;
    let mut categories = Vec::new();
    for (c, _) in cfg.enabled_categories() {
        let n = dlq.get(c.as_str()).copied().unwrap_or(0);
        categories.push(admin.category_stats(c, n).await?);
    }
    let mut workers = Heartbeats::open(&conn.js).await?.list().await?;
    workers.sort_by(|a, b| a.id.cmp(&b.id));
    // Schedules are informative here: a bad schedule must not hide the queues.
    let (listing, schedules_error) = match crate::schedules::listing(cfg, conn).await {
        Ok(l) => (Some(l), None),
        Err(e) => (None, Some(crate::error_chain(&e))),
    };
    let (rows, leader) = listing.map_or((Vec::new(), None), |l| (l.schedules, l.leader));
    Ok(Status {
        generated_at: Utc::now(),
        categories,
        dlq_total: dlq.values().sum(),
        workers,
        schedules: rows
            .into_iter()
            .map(|r| ScheduleStatus {
                name: r.name,
                task: r.task,
                state: r.state,
                next_fire: r.next_fire,
                last_fired: r.last_fired,
            })
            .collect(),
        scheduler_leader: leader.map(|l| l.holder),
        schedules_error,
    })
}

/// Filters shared by `dlq list|replay|purge`.
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct DlqFilterArgs {
    /// Only this task (`email.send`) or category (`email`).
    #[arg(long)]
    task: Option<String>,
    /// Only this reason: max_attempts, permanent, undecodable, unknown_task, expired.
    #[arg(long)]
    reason: Option<String>,
    /// Only dead letters older than this (`1h`, `2d`) or before this RFC 3339 instant.
    #[arg(long)]
    older_than: Option<String>,
    /// Only dead letters newer than this (`1h`) or after this RFC 3339 instant.
    #[arg(long)]
    newer_than: Option<String>,
}

impl DlqFilterArgs {
    fn is_empty(&self) -> bool {
        self.task.is_none()
            && self.reason.is_none()
            && self.older_than.is_none()
            && self.newer_than.is_none()
    }

    fn filter(&self) -> anyhow::Result<DlqFilter> {
        let age = |s: &str, flag: &str| -> anyhow::Result<DateTime<Utc>> {
            if let Ok(t) = DateTime::parse_from_rfc3339(s) {
                return Ok(t.to_utc());
            }
            let d = parse_duration(s).map_err(|e| {
                anyhow::anyhow!("{flag}: expected a duration (`1h`) or an RFC 3339 instant: {e}")
            })?;
            Ok(Utc::now() - chrono::Duration::from_std(d)?)
        };
        Ok(DlqFilter {
            task: self.task.clone(),
            reason: self.reason.clone(),
            older_than: self
                .older_than
                .as_deref()
                .map(|s| age(s, "--older-than"))
                .transpose()?,
            newer_than: self
                .newer_than
                .as_deref()
                .map(|s| age(s, "--newer-than"))
                .transpose()?,
            task_id: None,
        })
    }
}

/// `taskmesh dlq …`.
#[derive(Debug, Subcommand)]
pub(crate) enum DlqCmd {
    /// List dead letters (oldest first).
    List {
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter (headers and body) by DLQ sequence or task id.
    Show {
        /// DLQ sequence (from `dlq list`) or task id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Republish dead letters to their original subject and remove them from the DLQ.
    /// Safe to re-run: a dead letter is never replayed into two tasks.
    Replay {
        /// DLQ sequences or task ids; or use the filters (or --all).
        ids: Vec<String>,
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Replay every dead letter.
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters for good.
    Purge {
        /// DLQ sequences or task ids; or use the filters (or --all).
        ids: Vec<String>,
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Delete every dead letter.
        #[arg(long)]
        all: bool,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints an aligned table.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// `taskmesh status`.
pub(crate) async fn status(cfg: &Config, conn: &Connection, json: bool) -> anyhow::Result<i32> {
    let s = snapshot(cfg, conn).await?;
    if json {
        print_json(&s)?;
        return Ok(0);
    }
    let mut rows = Vec::new();
    for c in &s.categories {
        for l in &c.lanes {
            rows.push(vec![
                c.category.clone(),
                l.lane.to_owned(),
                l.pending.to_string(),
                l.ack_pending.to_string(),
                l.redelivered.to_string(),
                l.waiting.to_string(),
                if !l.exists {
                    "missing".to_owned()
                } else if l.paused {
                    "paused".to_owned()
                } else {
                    "active".to_owned()
                },
                c.consumers.to_string(),
                c.dlq.to_string(),
            ]);
        }
    }
    table(
        &[
            "CATEGORY",
            "LANE",
            "PENDING",
            "IN FLIGHT",
            "REDELIVERED",
            "WAITING PULLS",
            "CONSUMER",
            "CONSUMERS",
            "DLQ",
        ],
        &rows,
    );
    println!(
        "\ndead letters: {}   live workers: {}   scheduler leader: {}",
        s.dlq_total,
        s.workers.len(),
        s.scheduler_leader.as_deref().unwrap_or("none")
    );
    if !s.workers.is_empty() {
        println!();
        print_workers(&s.workers);
    }
    if let Some(e) = &s.schedules_error {
        println!("\nschedules: cannot list them: {e}");
    }
    if !s.schedules.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = s
            .schedules
            .iter()
            .map(|r| {
                vec![
                    r.name.clone(),
                    r.task.clone(),
                    r.state.to_owned(),
                    r.next_fire.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        table(&["SCHEDULE", "TASK", "STATE", "NEXT FIRE"], &rows);
    }
    Ok(0)
}

fn print_workers(workers: &[WorkerHeartbeat]) {
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            vec![
                w.id.clone(),
                w.categories.join(","),
                format!("{}/{}", w.in_flight, w.concurrency),
                w.host.clone(),
                w.pid.to_string(),
                w.version.clone(),
                ts(w.started_at),
                ts(w.beat_at),
            ]
        })
        .collect();
    table(
        &[
            "WORKER",
            "CATEGORIES",
            "IN FLIGHT",
            "HOST",
            "PID",
            "VERSION",
            "STARTED",
            "LAST BEAT",
        ],
        &rows,
    );
}

/// `taskmesh workers`.
pub(crate) async fn workers(conn: &Connection, json: bool) -> anyhow::Result<i32> {
    let mut w = Heartbeats::open(&conn.js).await?.list().await?;
    w.sort_by(|a, b| a.id.cmp(&b.id));
    if json {
        print_json(&w)?;
    } else if w.is_empty() {
        println!("no live workers (start one with `taskmesh worker --category <name>`)");
    } else {
        print_workers(&w);
    }
    Ok(0)
}

/// `taskmesh inspect` output.
#[derive(Debug, Serialize)]
pub(crate) struct Inspection {
    /// The task id.
    pub(crate) id: String,
    /// Its result record, if one is stored (kept for the results TTL).
    pub(crate) record: Option<TaskRecord>,
    /// Its dead letter, if it is in the DLQ.
    pub(crate) dead_letter: Option<DeadLetter>,
}

/// Looks a task up in the results bucket and the DLQ.
pub(crate) async fn inspection(conn: &Connection, id: &TaskId) -> anyhow::Result<Inspection> {
    let record = ResultStore::open(&conn.js).await?.get(id).await?;
    let dead_letter = Admin::new(conn.js.clone())
        .dlq_find_task(id.as_str())
        .await?;
    Ok(Inspection {
        id: id.as_str().to_owned(),
        record,
        dead_letter,
    })
}

/// `taskmesh inspect <id>`; exit 3 when the task is unknown.
pub(crate) async fn inspect(conn: &Connection, id: &TaskId, json: bool) -> anyhow::Result<i32> {
    let i = inspection(conn, id).await?;
    let unknown = i.record.is_none() && i.dead_letter.is_none();
    if json {
        print_json(&i)?;
    } else if unknown {
        eprintln!(
            "task {id}: no result record and not in the DLQ (still queued, never enqueued, or its record expired; `taskmesh status` shows queue depths)"
        );
    } else {
        if let Some(r) = &i.record {
            println!("task:      {}", r.task);
            println!("state:     {}", r.state.as_str());
            println!("attempts:  {}", r.attempts);
            println!("worker:    {}", r.worker);
            if let Some(t) = r.enqueued_at {
                println!("enqueued:  {}", ts(t));
            }
            if let Some(t) = r.finished_at {
                println!("finished:  {}", ts(t));
            }
            if let Some(e) = &r.error {
                println!("error:     {}: {}", e.kind, e.message);
            }
            if let Some(v) = &r.result {
                println!("result:    {v}");
            }
        } else {
            println!("state:     (no result record)");
        }
        match &i.dead_letter {
            Some(d) => println!(
                "dlq:       yes, sequence {} ({}); replay with `taskmesh dlq replay {}`",
                d.seq,
                d.reason.as_deref().unwrap_or("-"),
                d.seq
            ),
            None => println!("dlq:       no"),
        }
    }
    Ok(if unknown { 3 } else { 0 })
}

/// Resolves DLQ ids: a number is a sequence, anything else a task id.
async fn resolve(admin: &Admin, ids: &[String]) -> anyhow::Result<Vec<DeadLetter>> {
    let mut out = Vec::new();
    for id in ids {
        let found = match id.parse::<u64>() {
            Ok(seq) => admin.dlq_get(seq).await?,
            Err(_) => admin.dlq_find_task(id).await?,
        };
        match found {
            Some(d) => out.push(d),
            None => anyhow::bail!(
                "no dead letter {id}: it may have been replayed or purged already (`taskmesh dlq list` shows what is there)"
            ),
        }
    }
    Ok(out)
}

fn dlq_rows(list: &[DeadLetter]) -> Vec<Vec<String>> {
    list.iter()
        .map(|d| {
            let mut err = d.error.clone().unwrap_or_default();
            if err.chars().count() > 60 {
                err = err.chars().take(57).collect::<String>() + "...";
            }
            vec![
                d.seq.to_string(),
                d.task.clone(),
                d.task_id.clone().unwrap_or_else(|| "-".into()),
                d.reason.clone().unwrap_or_else(|| "-".into()),
                d.attempts.map_or_else(|| "-".into(), |a| a.to_string()),
                ts(d.time),
                err,
            ]
        })
        .collect()
}

/// A progress bar on stderr when it is a terminal; nothing otherwise.
struct Progress {
    total: usize,
    done: usize,
    tty: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        let p = Self {
            total,
            done: 0,
            tty: std::io::stderr().is_terminal(),
        };
        p.draw();
        p
    }
    fn inc(&mut self) {
        self.done += 1;
        self.draw();
    }
    fn draw(&self) {
        if !self.tty || self.total == 0 {
            return;
        }
        let width = 30;
        let filled = self.done * width / self.total;
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\rreplaying [{}{}] {}/{}",
            "#".repeat(filled),
            "-".repeat(width - filled),
            self.done,
            self.total
        );
        if self.done == self.total {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    }
}

fn confirm(question: &str) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("refusing to {question} without a terminal to confirm on: pass --yes");
    }
    eprint!("{question}? type 'yes' to confirm: ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .context("reading the confirmation")?;
    Ok(answer.trim() == "yes")
}

/// `taskmesh dlq …`.
pub(crate) async fn dlq(conn: &Connection, cmd: DlqCmd) -> anyhow::Result<i32> {
    let admin = Admin::new(conn.js.clone());
    match cmd {
        DlqCmd::List {
            filter,
            limit,
            json,
        } => {
            let list = admin.dlq_list(&filter.filter()?, limit).await?;
            if json {
                print_json(&list)?;
            } else if list.is_empty() {
                println!("no dead letters match");
            } else {
                table(
                    &[
                        "SEQ", "TASK", "TASK ID", "REASON", "ATTEMPTS", "TIME", "ERROR",
                    ],
                    &dlq_rows(&list),
                );
            }
            Ok(0)
        }
        DlqCmd::Show { id, json } => {
            let d = resolve(&admin, &[id]).await?;
            let Some(d) = d.first() else { return Ok(1) };
            if json {
                print_json(d)?;
            } else {
                println!("sequence:  {}", d.seq);
                println!("task:      {}", d.task);
                println!("task id:   {}", d.task_id.as_deref().unwrap_or("-"));
                println!("reason:    {}", d.reason.as_deref().unwrap_or("-"));
                println!("error:     {}", d.error.as_deref().unwrap_or("-"));
                println!("time:      {}", ts(d.time));
                println!("headers:");
                for (k, v) in &d.headers {
                    println!("  {k}: {v}");
                }
                println!("body:\n{}", serde_json::to_string_pretty(&d.body)?);
            }
            Ok(0)
        }
        DlqCmd::Replay {
            ids,
            filter,
            all,
            json,
        } => {
            let targets = targets(&admin, &ids, &filter, all, "replay").await?;
            let mut progress = Progress::new(targets.len());
            let mut done = Vec::new();
            for d in &targets {
                // Gone meanwhile (replayed by someone else): nothing to do, not an error.
                if let Some(r) = admin.dlq_replay(d.seq).await? {
                    done.push(r);
                }
                progress.inc();
            }
            if json {
                print_json(&done)?;
            } else {
                println!("replayed {} dead letter(s)", done.len());
                for r in &done {
                    println!(
                        "  {} -> {} (task {})",
                        r.seq,
                        r.subject,
                        r.task_id.as_deref().unwrap_or("-")
                    );
                }
            }
            Ok(0)
        }
        DlqCmd::Purge {
            ids,
            filter,
            all,
            yes,
            json,
        } => {
            if all && ids.is_empty() && filter.is_empty() {
                if !yes && !confirm("delete every dead letter")? {
                    eprintln!("aborted");
                    return Ok(1);
                }
                let n = admin.dlq_purge_all().await?;
                if json {
                    print_json(&serde_json::json!({ "purged": n }))?;
                } else {
                    println!("purged {n} dead letter(s)");
                }
                return Ok(0);
            }
            let targets = targets(&admin, &ids, &filter, all, "purge").await?;
            if !yes && !confirm(&format!("delete {} dead letter(s)", targets.len()))? {
                eprintln!("aborted");
                return Ok(1);
            }
            let mut n = 0u64;
            for d in &targets {
                if admin.dlq_delete(d.seq).await? {
                    n += 1;
                }
            }
            if json {
                print_json(&serde_json::json!({ "purged": n }))?;
            } else {
                println!("purged {n} dead letter(s)");
            }
            Ok(0)
        }
    }
}

async fn targets(
    admin: &Admin,
    ids: &[String],
    filter: &DlqFilterArgs,
    all: bool,
    verb: &str,
) -> anyhow::Result<Vec<DeadLetter>> {
    if !ids.is_empty() {
        return resolve(admin, ids).await;
    }
    if filter.is_empty() && !all {
        anyhow::bail!(
            "name what to {verb}: DLQ sequences or task ids, filters (--task, --reason, --older-than, --newer-than), or --all"
        );
    }
    Ok(admin.dlq_list(&filter.filter()?, usize::MAX).await?)
}

/// `taskmesh pause|resume <category>`.
pub(crate) async fn pause(
    cfg: &Config,
    conn: &Connection,
    category: &Category,
    pause_for: Option<&str>,
    resume: bool,
    json: bool,
) -> anyhow::Result<i32> {
    check_category(cfg, category)?;
    let admin = Admin::new(conn.js.clone());
    let until = match pause_for {
        Some(d) => {
            Utc::now() + chrono::Duration::from_std(parse_duration(d).map_err(anyhow::Error::msg)?)?
        }
        None => Utc::now() + chrono::Duration::days(365 * 100),
    };
    if resume {
        admin.resume(category).await?;
    } else {
        admin.pause(category, until).await?;
    }
    if json {
        print_json(&serde_json::json!({
            "category": category.as_str(),
            "paused": !resume,
            "until": (!resume).then(|| ts(until)),
        }))?;
    } else if resume {
        println!("resumed category {category}: workers receive tasks again");
    } else {
        println!(
            "paused category {category} (every lane) until {}: tasks stay queued; `taskmesh resume {category}` resumes",
            ts(until)
        );
    }
    Ok(0)
}

/// `taskmesh purge <category>`.
pub(crate) async fn purge(
    cfg: &Config,
    conn: &Connection,
    category: &Category,
    yes: bool,
    json: bool,
) -> anyhow::Result<i32> {
    check_category(cfg, category)?;
    if !yes
        && !confirm(&format!(
            "delete every queued task of category {category} (also delayed ones)"
        ))?
    {
        eprintln!("aborted");
        return Ok(1);
    }
    let n = Admin::new(conn.js.clone()).purge_category(category).await?;
    if json {
        print_json(&serde_json::json!({ "category": category.as_str(), "purged": n }))?;
    } else {
        println!("purged {n} task(s) from category {category}");
    }
    Ok(0)
}

fn check_category(cfg: &Config, category: &Category) -> anyhow::Result<()> {
    if cfg.category(category).is_err() {
        let known: Vec<&str> = cfg.enabled_categories().map(|(c, _)| c.as_str()).collect();
        anyhow::bail!(
            "category {category} is not in this config (known: {}): pass --config with the file that declares it",
            known.join(", ")
        );
    }
    Ok(())
}
