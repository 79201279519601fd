//! `taskmesh scheduler` (run a replica) and `taskmesh schedules …` (list and manage
//! schedules). See docs/scheduler.md.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Subcommand};
use serde::Serialize;
use taskmesh_nats::Client;
use taskmesh_scheduler::cursor::Cursors;
use taskmesh_scheduler::dynamic::DynamicSchedules;
use taskmesh_scheduler::{
    Schedule, Scheduler, SchedulerError, SchedulerOptions, default_replica_id, static_schedules,
};
use taskmesh_shared::clock::SystemClock;
use taskmesh_shared::schedule::{CatchUp, DEFAULT_MAX_CATCH_UP, DEFAULT_TIMEZONE, ScheduleDef};
use taskmesh_shared::{Config, TaskName};
use tokio_util::sync::CancellationToken;

/// Options of `taskmesh scheduler`.
#[derive(Debug, Args, Default)]
pub(crate) struct SchedulerArgs {
    /// This replica's id, shown as the lease holder (`taskmesh schedules list`); unique
    /// per replica. Default: `<hostname>-<pid>`.
    #[arg(long, env = "TASKMESH_SCHEDULER_ID")]
    pub(crate) id: Option<String>,
    /// Where `/healthz`, `/readyz` and `/metrics` listen (a free port on the same
    /// interface when taken). Not served when unset programmatically (`taskmesh dev`
    /// serves its own).
    #[arg(long, env = "TASKMESH_HTTP_ADDR", default_value = "127.0.0.1:9091")]
    pub(crate) http_addr: Option<SocketAddr>,
    /// Where to publish the scheduler's metrics when another server serves them.
    #[arg(skip)]
    pub(crate) metrics_sink: Option<Arc<crate::http::LateMetrics>>,
}

/// The scheduler's counters on `/metrics`.
struct SchedulerMetricsSource(Arc<taskmesh_scheduler::SchedulerMetrics>);

impl crate::http::MetricsSource for SchedulerMetricsSource {
    fn render(&self, out: &mut String) {
        self.0.render_prometheus(out);
    }
}

/// `taskmesh schedules …` verbs.
#[derive(Debug, Subcommand)]
pub(crate) enum SchedulesCmd {
    /// List static and dynamic schedules with their next fire times and the current leader.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add a dynamic schedule (fires without restarting any scheduler).
    Add(AddArgs),
    /// Remove a dynamic schedule (and its cursor).
    Remove {
        /// The schedule's name.
        name: String,
    },
    /// Pause a dynamic schedule: it stays stored but does not fire.
    Pause {
        /// The schedule's name.
        name: String,
    },
    /// Resume a paused dynamic schedule: it fires from its next slot (paused slots are not
    /// caught up).
    Resume {
        /// The schedule's name.
        name: String,
    },
    /// Fire a schedule (static or dynamic, even paused) now, with its own task id; prints
    /// the task id.
    Trigger {
        /// The schedule's name.
        name: String,
    },
}

/// `taskmesh schedules add`.
#[derive(Debug, Args)]
pub(crate) struct AddArgs {
    /// Schedule name: a-z, 0-9, '_' and '-' (kebab-case by convention).
    #[arg(long)]
    name: String,
    /// The task each fire enqueues, `<category>.<name>`.
    #[arg(long)]
    task: TaskName,
    /// Cron expression (5 fields, 6 with seconds first, or @hourly/@daily/…).
    #[arg(long, conflicts_with = "every", required_unless_present = "every")]
    cron: Option<String>,
    /// Fixed interval (`30s`, `10m`, `1h30m`), aligned to the Unix epoch.
    #[arg(long)]
    every: Option<String>,
    /// IANA time zone the cron expression is evaluated in.
    #[arg(long, default_value = DEFAULT_TIMEZONE)]
    timezone: String,
    /// The task's arguments (JSON), the body of every fire.
    #[arg(long, default_value = "{}")]
    args: String,
    /// What a new leader does about missed slots: none, latest, all.
    #[arg(long, default_value = "latest", value_parser = parse_catch_up)]
    catch_up: CatchUp,
    /// With --catch-up all, fire at most this many missed slots (the newest).
    #[arg(long, default_value_t = DEFAULT_MAX_CATCH_UP)]
    max_catch_up: u32,
    /// Store it paused.
    #[arg(long)]
    paused: bool,
    /// Overwrite a dynamic schedule of the same name.
    #[arg(long)]
    replace: bool,
}

fn parse_catch_up(s: &str) -> Result<CatchUp, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("expected none, latest or all, got {s:?}"))
}

/// Runs one scheduler replica until `shutdown` fires.
pub(crate) async fn run_scheduler(
    cfg: Config,
    args: SchedulerArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Refuse bad schedules before touching the network.
    static_schedules(&cfg).context("refusing to start the scheduler")?;
    let id = args.id.unwrap_or_else(default_replica_id);
    let conn = crate::connect(&cfg, "scheduler").await?;
    let state = conn.state.clone();
    let scheduler = Scheduler::new(conn, &cfg, SchedulerOptions::new(id))
        .context("refusing to start the scheduler")?;
    let http_stop = CancellationToken::new();
    if let Some(sink) = &args.metrics_sink {
        sink.set(Arc::new(SchedulerMetricsSource(scheduler.metrics())));
    }
    if let Some(addr) = args.http_addr {
        let probes = crate::http::Probes {
            conn: Some(state),
            worker: None,
            extra: vec![Arc::new(SchedulerMetricsSource(scheduler.metrics()))],
        };
        crate::http::serve(addr, probes, http_stop.clone()).await?;
    }
    let result = scheduler.run(shutdown).await;
    http_stop.cancel();
    Ok(result?)
}

/// Runs a `schedules` verb; returns the exit code.
pub(crate) async fn schedules(cfg: Config, cmd: SchedulesCmd) -> anyhow::Result<i32> {
    let statics = static_schedules(&cfg).context("the config file's schedules are invalid")?;
    let is_static = |name: &str| statics.iter().any(|s| s.name() == name);
    let conn = crate::connect(&cfg, "cli").await?;
    let dynamic = DynamicSchedules::open(&conn.js).await?;
    match cmd {
        SchedulesCmd::List { json } => {
            list(&cfg, &conn, &statics, &dynamic, json).await?;
            Ok(0)
        }
        SchedulesCmd::Add(a) => {
            if is_static(&a.name) {
                return Err(SchedulerError::Static(a.name).into());
            }
            let args: serde_json::Value =
                serde_json::from_str(&a.args).context("--args is not valid JSON")?;
            let def = ScheduleDef {
                name: a.name,
                task: a.task.to_string(),
                cron: a.cron,
                every: a.every,
                timezone: a.timezone,
                args,
                catch_up: a.catch_up,
                max_catch_up: a.max_catch_up,
                enabled: !a.paused,
            };
            let schedule = Schedule::compile(&def)?;
            if cfg.category(&a.task.category()).is_err() {
                eprintln!(
                    "warning: category {} is not in this config: make sure a stream for it exists (`taskmesh provision` with [categories.{}])",
                    a.task.category(),
                    a.task.category()
                );
            }
            dynamic.add(&def, a.replace).await?;
            let next = if def.enabled {
                schedule
                    .next_fire(Utc::now())
                    .map_or_else(|| "never".to_owned(), rfc3339)
            } else {
                "- (paused)".to_owned()
            };
            println!(
                "{} schedule {} ({} {}); next fire {next}",
                if a.replace { "stored" } else { "added" },
                def.name,
                def.task,
                trigger_text(&def)
            );
            Ok(0)
        }
        SchedulesCmd::Remove { name } => {
            if is_static(&name) {
                return Err(SchedulerError::Static(name).into());
            }
            dynamic.remove(&name).await?;
            // A new schedule with this name starts afresh (no catch-up from this cursor).
            if let Err(e) = Cursors::open(&conn.js).await?.remove(&name).await {
                eprintln!("warning: {e}");
            }
            println!("removed schedule {name}");
            Ok(0)
        }
        SchedulesCmd::Pause { name } | SchedulesCmd::Resume { name } if is_static(&name) => {
            Err(SchedulerError::Static(name).into())
        }
        SchedulesCmd::Pause { name } => {
            if dynamic.set_enabled(&name, false).await? {
                println!("paused schedule {name}");
            } else {
                println!("schedule {name} was already paused");
            }
            Ok(0)
        }
        SchedulesCmd::Resume { name } => {
            if dynamic.set_enabled(&name, true).await? {
                println!("resumed schedule {name}");
            } else {
                println!("schedule {name} was not paused");
            }
            Ok(0)
        }
        SchedulesCmd::Trigger { name } => {
            let done = trigger_by_name(&cfg, conn, &name).await?;
            println!("{}", done.id);
            Ok(0)
        }
    }
}

/// Fires schedule `name` (static or dynamic, even paused) now; returns the enqueued task.
pub(crate) async fn trigger_by_name(
    cfg: &Config,
    conn: taskmesh_nats::Connection,
    name: &str,
) -> anyhow::Result<taskmesh_nats::Enqueued> {
    let statics = static_schedules(cfg).context("the config file's schedules are invalid")?;
    let schedule = match statics.into_iter().find(|s| s.name() == name) {
        Some(s) => s,
        None => {
            let dynamic = DynamicSchedules::open(&conn.js).await?;
            let stored = dynamic
                .get(name)
                .await?
                .ok_or_else(|| SchedulerError::NotFound(name.to_owned()))?;
            let def = stored.def.map_err(|reason| {
                anyhow::anyhow!(
                    "schedule {name:?} is invalid ({reason}): fix it with `taskmesh schedules add --replace`"
                )
            })?;
            Schedule::compile(&def)?
        }
    };
    let client = Client::new(conn, cfg).await?;
    Ok(taskmesh_scheduler::trigger(&client, &schedule, &SystemClock).await?)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn trigger_text(def: &ScheduleDef) -> String {
    match (&def.cron, &def.every) {
        (Some(c), _) if def.timezone == DEFAULT_TIMEZONE => format!("cron {c}"),
        (Some(c), _) => format!("cron {c} {}", def.timezone),
        (None, Some(e)) => format!("every {e}"),
        (None, None) => "-".to_owned(),
    }
}

/// One row of `schedules list`.
#[derive(Debug, Serialize)]
pub(crate) struct Row {
    pub(crate) name: String,
    /// `config`, `default` or `dynamic`.
    source: &'static str,
    pub(crate) task: String,
    cron: Option<String>,
    every: Option<String>,
    timezone: String,
    catch_up: CatchUp,
    max_catch_up: u32,
    args: serde_json::Value,
    /// `enabled`, `paused`, `invalid` or `shadowed` (a dynamic schedule with a static
    /// schedule's name, ignored).
    pub(crate) state: &'static str,
    error: Option<String>,
    pub(crate) next_fire: Option<String>,
    pub(crate) last_fired: Option<String>,
}

/// The scheduler replica holding the lease.
#[derive(Debug, Serialize)]
pub(crate) struct Leader {
    pub(crate) holder: String,
    acquired_at: String,
    renewed_at: String,
}

/// `schedules list --json`.
#[derive(Debug, Serialize)]
pub(crate) struct Listing {
    pub(crate) leader: Option<Leader>,
    pub(crate) schedules: Vec<Row>,
}

fn row(
    def: &ScheduleDef,
    source: &'static str,
    state: &'static str,
    error: Option<String>,
    cursors: &HashMap<String, taskmesh_scheduler::cursor::CursorEntry>,
) -> Row {
    let next_fire = match (state, Schedule::compile(def)) {
        ("enabled", Ok(s)) => s.next_fire(Utc::now()).map(rfc3339),
        _ => None,
    };
    Row {
        name: def.name.clone(),
        source,
        task: def.task.clone(),
        cron: def.cron.clone(),
        every: def.every.clone(),
        timezone: def.timezone.clone(),
        catch_up: def.catch_up,
        max_catch_up: def.max_catch_up,
        args: def.args.clone(),
        state,
        error,
        next_fire,
        last_fired: cursors.get(&def.name).and_then(|c| c.slot).map(rfc3339),
    }
}

/// Every schedule (static and dynamic) with its state and next fire, and the leader.
pub(crate) async fn listing(
    cfg: &Config,
    conn: &taskmesh_nats::Connection,
) -> anyhow::Result<Listing> {
    let statics = static_schedules(cfg).context("the config file's schedules are invalid")?;
    let dynamic = DynamicSchedules::open(&conn.js).await?;
    build_listing(cfg, conn, &statics, &dynamic).await
}

async fn list(
    cfg: &Config,
    conn: &taskmesh_nats::Connection,
    statics: &[Schedule],
    dynamic: &DynamicSchedules,
    json: bool,
) -> anyhow::Result<()> {
    let listing = build_listing(cfg, conn, statics, dynamic).await?;
    print_listing(&listing, json)
}

async fn build_listing(
    cfg: &Config,
    conn: &taskmesh_nats::Connection,
    statics: &[Schedule],
    dynamic: &DynamicSchedules,
) -> anyhow::Result<Listing> {
    let cursors = Cursors::open(&conn.js).await?.load_all().await?;
    let leader = taskmesh_scheduler::lease::current(&conn.js)
        .await?
        .map(|(_, v)| Leader {
            holder: v.holder,
            acquired_at: rfc3339(v.acquired_at),
            renewed_at: rfc3339(v.renewed_at),
        });
    let mut rows = Vec::new();
    for s in statics {
        let source = if cfg.schedules.iter().any(|d| d.name == s.name()) {
            "config"
        } else {
            "default"
        };
        let state = if s.enabled() { "enabled" } else { "paused" };
        rows.push(row(s.def(), source, state, None, &cursors));
    }
    for stored in dynamic.list().await? {
        let shadowed = statics.iter().any(|s| s.name() == stored.name);
        match &stored.def {
            Ok(def) => {
                let state = match (shadowed, def.enabled) {
                    (true, _) => "shadowed",
                    (false, true) => "enabled",
                    (false, false) => "paused",
                };
                rows.push(row(def, "dynamic", state, None, &cursors));
            }
            Err(reason) => rows.push(Row {
                name: stored.name.clone(),
                source: "dynamic",
                task: String::new(),
                cron: None,
                every: None,
                timezone: String::new(),
                catch_up: CatchUp::default(),
                max_catch_up: 0,
                args: serde_json::Value::Null,
                state: "invalid",
                error: Some(reason.clone()),
                next_fire: None,
                last_fired: None,
            }),
        }
    }
    rows.sort_by(|a, b| {
        (a.next_fire.is_none(), &a.next_fire, &a.name).cmp(&(
            b.next_fire.is_none(),
            &b.next_fire,
            &b.name,
        ))
    });
    Ok(Listing {
        leader,
        schedules: rows,
    })
}

fn print_listing(listing: &Listing, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
        return Ok(());
    }
    match &listing.leader {
        Some(l) => println!(
            "leader: {} (since {}, renewed {})",
            l.holder, l.acquired_at, l.renewed_at
        ),
        None => println!("leader: none (no scheduler is running)"),
    }
    let table: Vec<[String; 8]> = listing
        .schedules
        .iter()
        .map(|r| {
            let def_like = ScheduleDef {
                cron: r.cron.clone(),
                every: r.every.clone(),
                timezone: r.timezone.clone(),
                ..ScheduleDef::new_every(&r.name, &r.task, "1s")
            };
            [
                r.name.clone(),
                r.source.to_owned(),
                r.task.clone(),
                trigger_text(&def_like),
                format!("{:?}", r.catch_up).to_lowercase(),
                match &r.error {
                    Some(e) => format!("invalid: {e}"),
                    None => r.state.to_owned(),
                },
                r.next_fire.clone().unwrap_or_else(|| "-".into()),
                r.last_fired.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let header = [
        "NAME",
        "SOURCE",
        "TASK",
        "TRIGGER",
        "CATCH-UP",
        "STATE",
        "NEXT FIRE",
        "LAST FIRED",
    ];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &table {
        for (w, cell) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let print = |cells: Vec<&str>| {
        let line: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    };
    print(header.to_vec());
    for r in &table {
        print(r.iter().map(String::as_str).collect());
    }
    Ok(())
}
