//! `taskmesh`: the single binary — worker, provision, enqueue, dev, bench, admin verbs and
//! the REST API with its dashboard.

mod admin;
mod api;
mod bench;
mod dev;
mod http;
mod schedules;
mod server;
mod telemetry;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use taskmesh_nats::{Client, Connection, EnqueueOptions};
use taskmesh_shared::config::parse_duration;
use taskmesh_shared::{Category, Config, Lane, TaskId, TaskName, TaskState};
use taskmesh_workers::{Registry, Worker, WorkerOptions};
use tokio_util::sync::CancellationToken;

/// mimalloc instead of the system allocator: a task's state machine is several KiB and
/// glibc's malloc spends a tenth of the worker's CPU consolidating and splitting chunks of
/// that size (measured in BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// taskmesh: a NATS JetStream worker mesh for background tasks.
#[derive(Debug, Parser)]
#[command(name = "taskmesh", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Options every verb takes.
#[derive(Debug, Args)]
struct Global {
    /// Configuration file (TOML); built-in defaults when absent.
    #[arg(long, global = true, env = "TASKMESH_CONFIG")]
    config: Option<PathBuf>,
    /// NATS server URL(s), comma-separated (overrides the config file).
    #[arg(long, global = true, env = "NATS_URL")]
    nats_url: Option<String>,
    /// NATS user (with --nats-password).
    #[arg(long, global = true, env = "NATS_USER")]
    nats_user: Option<String>,
    /// NATS password.
    #[arg(long, global = true, env = "NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// NATS token.
    #[arg(long, global = true, env = "NATS_TOKEN", hide_env_values = true)]
    nats_token: Option<String>,
    /// NATS credentials file (.creds).
    #[arg(long, global = true, env = "NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// File holding an nkey seed.
    #[arg(long, global = true, env = "NATS_NKEY_FILE")]
    nats_nkey: Option<PathBuf>,
    /// CA certificate (PEM) for TLS.
    #[arg(long, global = true, env = "NATS_CA")]
    nats_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, global = true, env = "NATS_CERT")]
    nats_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, global = true, env = "NATS_KEY")]
    nats_key: Option<PathBuf>,
    /// Reply-inbox prefix of this service (least-privilege set-ups).
    #[arg(long, global = true, env = "NATS_INBOX_PREFIX")]
    nats_inbox_prefix: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create or update streams, consumers and buckets (idempotent).
    Provision,
    /// Run workers for one or more categories.
    Worker {
        /// Categories to serve, comma-separated (default: every configured category).
        #[arg(long, short, value_delimiter = ',')]
        category: Vec<Category>,
        /// Concurrency per category (default: from config).
        #[arg(long)]
        concurrency: Option<usize>,
        /// Also provision before starting (development convenience).
        #[arg(long)]
        provision: bool,
        /// Where `/healthz`, `/readyz` and `/metrics` listen.
        #[arg(long, env = "TASKMESH_HTTP_ADDR", default_value = "127.0.0.1:9090")]
        http_addr: std::net::SocketAddr,
    },
    /// Enqueue a task and print its id (and with --wait, its result record).
    Enqueue {
        /// Task name, `<category>.<name>`.
        task: TaskName,
        /// Arguments as JSON.
        #[arg(long, default_value = "{}")]
        args: String,
        /// Task id (idempotency key); default: a new UUIDv7.
        #[arg(long)]
        id: Option<TaskId>,
        /// Priority lane: high, normal, low.
        #[arg(long, default_value = "normal")]
        priority: Lane,
        /// Dead-letter the task if not started by then (RFC 3339) or within this duration.
        #[arg(long)]
        deadline: Option<String>,
        /// Attempt budget.
        #[arg(long)]
        max_attempts: Option<u32>,
        /// Run after this delay (`90s`, `10m`).
        #[arg(long, conflicts_with = "at")]
        delay: Option<String>,
        /// Run at this instant (RFC 3339).
        #[arg(long)]
        at: Option<String>,
        /// Refuse the enqueue while an equal task (same name and arguments, or the same
        /// --unique-key) was enqueued within this window (`10m`, `1h`).
        #[arg(long)]
        unique_for: Option<String>,
        /// Uniqueness key (default: task name + SHA-256 of the arguments).
        #[arg(long, requires = "unique_for")]
        unique_key: Option<String>,
        /// Wait for the task to finish and print its result record.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "60s")]
        timeout: String,
    },
    /// Run the scheduler (any number of replicas; one leads).
    Scheduler(schedules::SchedulerArgs),
    /// Manage dynamic schedules.
    #[command(subcommand)]
    Schedules(schedules::SchedulesCmd),
    /// Cancel a task: a queued one is skipped, a running one gets its cancellation token
    /// fired (the handler decides how fast it stops).
    Cancel {
        /// The task id.
        id: TaskId,
        /// Why (recorded).
        #[arg(long, default_value = "cancelled by operator")]
        reason: String,
    },
    /// Print a new random encryption key (base64, 32 bytes) for `[encryption.keys]`.
    Keygen,
    /// Local development: nats-server, provisioning, every category's worker (and the
    /// scheduler) in one process. Ctrl-C stops everything.
    Dev(dev::DevArgs),
    /// Benchmarks (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// Queue depths, in-flight tasks, consumers and dead letters per category and lane;
    /// live workers; schedules with their next fire.
    Status {
        /// Print JSON (schema in docs/operations.md).
        #[arg(long)]
        json: bool,
    },
    /// A task's result record and whether it is in the DLQ (exit 3: unknown task).
    Inspect {
        /// The task id.
        id: TaskId,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Live workers (from their heartbeats).
    Workers {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Dead letters: list, show, replay, purge.
    #[command(subcommand)]
    Dlq(admin::DlqCmd),
    /// Pause a category: every lane's consumer stops delivering (JetStream consumer pause).
    Pause {
        /// The category.
        category: Category,
        /// Resume by itself after this long (`30m`); default: until `taskmesh resume`.
        #[arg(long = "for")]
        pause_for: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resume a paused category.
    Resume {
        /// The category.
        category: Category,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete every queued task of a category (asks for confirmation unless --yes).
    Purge {
        /// The category.
        category: Category,
        /// Do not ask (required without a terminal).
        #[arg(long)]
        yes: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The REST API and web dashboard (plus /healthz, /readyz, /metrics).
    Api(api::ApiArgs),
}

impl Global {
    fn load_config(&self) -> anyhow::Result<Config> {
        let mut cfg = match &self.config {
            Some(p) => Config::load(p).with_context(|| format!("loading {}", p.display()))?,
            None => Config::default(),
        };
        let n = &mut cfg.nats;
        if let Some(v) = &self.nats_url {
            n.url = v.clone();
        }
        macro_rules! set {
            ($($field:ident <- $arg:ident),*) => {$( if self.$arg.is_some() { n.$field = self.$arg.clone(); } )*};
        }
        set!(user <- nats_user, password <- nats_password, token <- nats_token,
             creds_file <- nats_creds, nkey_file <- nats_nkey, tls_ca <- nats_ca,
             tls_cert <- nats_cert, tls_key <- nats_key, inbox_prefix <- nats_inbox_prefix);
        Ok(cfg)
    }
}

async fn connect(cfg: &Config, service: &str) -> anyhow::Result<Connection> {
    Ok(taskmesh_nats::connect(&cfg.nats, service, Duration::from_secs(10)).await?)
}

/// The worker's registry: the built-in catalog with config overrides.
pub(crate) fn registry(cfg: &Config, conn: &Connection) -> anyhow::Result<Registry> {
    let mut r = Registry::new();
    taskmesh_workers::catalog::register_all(&mut r, cfg, Some(conn.clone()))?;
    Ok(r)
}

/// A token fired by the first SIGINT or SIGTERM.
pub(crate) fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

fn parse_instant(s: &str) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.to_utc());
    }
    let d = parse_duration(s)
        .map_err(|e| anyhow::anyhow!("expected an RFC 3339 instant or a duration: {e}"))?;
    Ok(chrono::Utc::now() + chrono::Duration::from_std(d)?)
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.cmd {
        Cmd::Provision => {
            let cfg = cli.global.load_config()?;
            let conn = connect(&cfg, "provision").await?;
            let report = taskmesh_nats::provision(&conn.js, &cfg).await?;
            println!("streams:   {}", report.streams.join(", "));
            println!("consumers: {}", report.consumers.join(", "));
            println!("buckets:   {}", report.buckets.join(", "));
            Ok(0)
        }
        Cmd::Worker {
            category,
            concurrency,
            provision,
            http_addr,
        } => {
            let cfg = Arc::new(cli.global.load_config()?);
            let conn = connect(&cfg, "worker").await?;
            if provision {
                taskmesh_nats::provision(&conn.js, &cfg).await?;
            }
            let state = conn.state.clone();
            let worker = Worker::new(
                conn.clone(),
                cfg.clone(),
                Arc::new(registry(&cfg, &conn)?),
                WorkerOptions {
                    categories: category,
                    concurrency,
                    id: None,
                },
            )
            .await?;
            let shutdown = shutdown_on_signals();
            let probes = http::Probes {
                conn: Some(state),
                worker: Some(worker.stats()),
                extra: Vec::new(),
            };
            let http_stop = CancellationToken::new();
            http::serve(http_addr, probes, http_stop.clone()).await?;
            worker.run(shutdown).await?;
            http_stop.cancel();
            Ok(0)
        }
        Cmd::Enqueue {
            task,
            args,
            id,
            priority,
            deadline,
            max_attempts,
            delay,
            at,
            wait,
            timeout,
            unique_for,
            unique_key,
        } => {
            let cfg = cli.global.load_config()?;
            let args: serde_json::Value =
                serde_json::from_str(&args).context("--args is not valid JSON")?;
            let timeout = parse_duration(&timeout).map_err(anyhow::Error::msg)?;
            let conn = connect(&cfg, "cli").await?;
            let client = Client::new(conn, &cfg).await?;
            let mut opts = EnqueueOptions {
                id,
                lane: priority,
                max_attempts,
                ..Default::default()
            };
            if let Some(d) = deadline {
                opts.deadline = Some(parse_instant(&d).context("--deadline")?);
            }
            if let Some(d) = delay {
                opts = opts.delay(
                    parse_duration(&d)
                        .map_err(anyhow::Error::msg)
                        .context("--delay")?,
                );
            }
            if let Some(a) = at {
                opts.run_at = Some(parse_instant(&a).context("--at")?);
            }
            if let Some(w) = unique_for {
                let window = parse_duration(&w)
                    .map_err(anyhow::Error::msg)
                    .context("--unique-for")?;
                opts.unique = Some(taskmesh_nats::publish::Unique {
                    window,
                    key: unique_key,
                });
            }
            let done = client.enqueue(&task, &args, opts).await?;
            if done.duplicate {
                eprintln!(
                    "note: task id {} was already enqueued; not stored again",
                    done.id
                );
            }
            println!("{}", done.id);
            if wait {
                let record = client.wait(&done.id, timeout).await?;
                println!("{}", serde_json::to_string_pretty(&record)?);
                if record.state != TaskState::Succeeded {
                    return Ok(2);
                }
            }
            Ok(0)
        }
        Cmd::Scheduler(a) => {
            schedules::run_scheduler(cli.global.load_config()?, a, shutdown_on_signals()).await?;
            Ok(0)
        }
        Cmd::Schedules(c) => schedules::schedules(cli.global.load_config()?, c).await,
        Cmd::Cancel { id, reason } => {
            let cfg = cli.global.load_config()?;
            let conn = connect(&cfg, "cli").await?;
            taskmesh_nats::Cancels::open(&conn.js)
                .await?
                .request(&id, &reason)
                .await?;
            let client = Client::new(conn, &cfg).await?;
            match client.result(&id).await? {
                Some(r) if r.state.is_final() => {
                    println!(
                        "task {id} already finished ({}); nothing to cancel",
                        r.state.as_str()
                    );
                }
                Some(r) => println!("cancel requested for task {id} (now {})", r.state.as_str()),
                None => println!(
                    "cancel requested for task {id} (queued or unknown: it will be skipped when delivered)"
                ),
            }
            Ok(0)
        }
        Cmd::Keygen => {
            println!("{}", taskmesh_shared::crypto::generate_key());
            Ok(0)
        }
        Cmd::Dev(a) => dev::run(cli.global.load_config()?, a).await.map(|()| 0),
        Cmd::Bench(a) => bench::run(a, cli.global.nats_url.clone()).await.map(|()| 0),
        Cmd::Status { json } => {
            let cfg = cli.global.load_config()?;
            let conn = connect(&cfg, "cli").await?;
            admin::status(&cfg, &conn, json).await
        }
        Cmd::Inspect { id, json } => {
            let cfg = cli.global.load_config()?;
            let conn = connect(&cfg, "cli").await?;
            admin::inspect(&conn, &id, json).await
        }
        Cmd::Workers { json } => {
            let cfg = cli.global.load_config()?;
            let conn = connect(&cfg, "cli").await?;
            admin::workers(&conn, json).await
        }
        Cmd::Dlq(c) => {
            let cfg = cli.global.load_config()?;
            let conn = connect(&cfg, "cli").await?;
            admin::dlq(&conn, c).await
        }
        Cmd::Pause {
            category,
            pause_for,
            json,
        } => {
            let cfg = cli.global.load_config()?;
            let conn = connect(&cfg, "cli").await?;
            admin::pause(&cfg, &conn, &category, pause_for.as_deref(), false, json).await
        }
        Cmd::Resume { category, json } => {
            let cfg = cli.global.load_config()?;
            let conn = connect(&cfg, "cli").await?;
            admin::pause(&cfg, &conn, &category, None, true, json).await
        }
        Cmd::Purge {
            category,
            yes,
            json,
        } => {
            let cfg = cli.global.load_config()?;
            let conn = connect(&cfg, "cli").await?;
            admin::purge(&cfg, &conn, &category, yes, json).await
        }
        Cmd::Api(a) => api::run(cli.global.load_config()?, a, shutdown_on_signals())
            .await
            .map(|()| 0),
    }
}

/// `a: b: c` from an error chain, skipping causes already quoted by the message above them.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let (service, long_running) = match &cli.cmd {
        Cmd::Worker { .. } => ("worker", true),
        Cmd::Scheduler(_) => ("scheduler", true),
        Cmd::Dev(_) => ("dev", true),
        Cmd::Bench(_) => ("bench", true),
        Cmd::Api(_) => ("api", true),
        _ => ("cli", false),
    };
    let telemetry = rt.block_on(async { telemetry::init(service, long_running) });
    let result = rt.block_on(run(cli));
    telemetry.shutdown();
    match result {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
