//! The taskmesh test harness: real `nats-server` and `taskmesh` processes for the
//! integration, end-to-end and fault suites.
//!
//! Every test gets its own servers on free loopback ports with their own temporary store
//! directories, so tests run in parallel and never share state. Everything is cleaned up
//! on drop; when a test panics, the temporary directories (server logs, JetStream store,
//! `taskmesh` logs) are kept and their paths printed to stderr. Set `TASKMESH_KEEP_LOGS=1`
//! to keep them for passing tests too.
//!
//! # Tour
//!
//! - [`NatsServer`] — one `nats-server` with JetStream. [`NatsServer::start`] returns once
//!   JetStream answers; the process can then be killed ([`NatsServer::stop`]), stopped
//!   gracefully, restarted on the same port with the same store
//!   ([`NatsServer::restart`]), frozen ([`NatsServer::pause`]) or put in lame duck mode.
//!   [`ServerOptions`] adds config text, `sync_interval: always` or a fixed port.
//! - [`NatsCluster`] — `n` clustered nodes (`n1`..`nN`, cluster `taskmesh-test`); `start`
//!   returns once a JetStream meta leader is elected and an `n`-replica stream can be
//!   placed. Each node is a [`NatsServer`] and can be killed and restarted on its own.
//! - [`TaskmeshProcess`] — the real `taskmesh` binary ([`taskmesh_bin`]) with its output
//!   in a log file, and signals (`SIGTERM`, `SIGKILL`, `SIGSTOP`, `SIGCONT`) for fault
//!   tests.
//! - [`eventually`] — the only way to wait: poll a condition with a deadline and panic
//!   with the last observation. No test sleeps for a fixed time to wait for something.
//! - [`unique_name`] — per-test names for streams, categories and task ids.
//!
//! The `nats-server` binary comes from [`nats_server_bin`]: `NATS_SERVER_BIN`, else the
//! project-local install in `.tools/bin`, else `PATH`. Install a recent enough one with
//! `scripts/ensure-nats-server.sh`:
//!
//! ```text
//! NATS_SERVER_BIN=$(scripts/ensure-nats-server.sh) cargo test -p taskmesh-tests
//! ```
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use taskmesh_tests::{NatsServer, eventually};
//!
//! # async fn example() {
//! let mut server = NatsServer::start().await;
//! let client = server.client().await;
//! let js = async_nats::jetstream::new(client);
//! // ... create a stream, publish ...
//! server.restart().await; // SIGKILL, then the same port and store again
//! eventually(Duration::from_secs(5), "the stream is back", || {
//!     let js = js.clone();
//!     async move { js.get_stream("TASKS_EMAIL").await.map(|_| ()).map_err(|e| e.to_string()) }
//! })
//! .await;
//! # }
//! ```

// Test-only code: a fixture that cannot do its job should fail the test at once, loudly
// and with context, so panicking is the error-handling strategy here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub mod fault;
pub mod inproc;
pub mod mesh;
pub use inproc::{DeadLetter, InProcMesh, RunningWorker, one_category_config};
pub use mesh::{LedgerEntry, TestMesh, ledger_counts, read_ledger};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::time::{Instant, sleep, timeout};

/// How long a single server may take to accept clients and answer JetStream requests.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a cluster may take to elect a meta leader and place a replicated stream.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process gets to exit after `SIGTERM` before the harness gives up.
const GRACEFUL_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The pause between two polls in [`eventually`] and the readiness loops.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How many times a server (or cluster) is relaunched when a free-picked port was taken.
const BIND_ATTEMPTS: usize = 5;
/// The oldest nats-server the project supports (message schedules, consumer pause).
const MIN_SERVER_VERSION: (u32, u32) = (2, 12);
/// Lines of server log included in a readiness panic.
const PANIC_LOG_LINES: usize = 40;
/// Name of the cluster [`NatsCluster`] forms.
const CLUSTER_NAME: &str = "taskmesh-test";

// ---------------------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------------------

/// The workspace root (the parent of this crate's folder).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.to_path_buf(), Path::to_path_buf)
}

/// The `nats-server` binary the harness runs: `NATS_SERVER_BIN` if set, else
/// `<workspace>/.tools/bin/nats-server` (where `scripts/ensure-nats-server.sh` installs
/// it) if it exists, else `nats-server` from `PATH`.
///
/// The version is checked (≥ 2.12) the first time a server is started.
pub fn nats_server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN").filter(|v| !v.is_empty()) {
        return PathBuf::from(bin);
    }
    let local = workspace_root().join(".tools/bin/nats-server");
    if local.is_file() {
        return local;
    }
    PathBuf::from("nats-server")
}

/// The `taskmesh` binary under test: `TASKMESH_BIN` if set, else `taskmesh` in the
/// profile folder this test binary was built into, else
/// `<CARGO_TARGET_DIR or workspace/target>/debug/taskmesh`.
///
/// # Panics
///
/// When the binary does not exist: build it first with `cargo build --bin taskmesh`.
pub fn taskmesh_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("TASKMESH_BIN").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "TASKMESH_BIN={} does not exist: build it first: cargo build --bin taskmesh",
            bin.display()
        );
        return bin;
    }
    let candidates = taskmesh_bin_candidates();
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return found.clone();
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    panic!(
        "the taskmesh binary was not found (looked at {}): build it first: cargo build --bin taskmesh",
        looked.join(", ")
    );
}

fn taskmesh_bin_candidates() -> Vec<PathBuf> {
    let exe = format!("taskmesh{}", std::env::consts::EXE_SUFFIX);
    let mut candidates = Vec::new();
    // Test binaries live in <target>/<profile>/deps; the binary is in <target>/<profile>.
    if let Ok(current) = std::env::current_exe()
        && let Some(profile_dir) = current.parent().and_then(Path::parent)
    {
        candidates.push(profile_dir.join(&exe));
    }
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => workspace_root().join(dir), // absolute paths replace the root
        None => workspace_root().join("target"),
    };
    candidates.push(target_dir.join("debug").join(&exe));
    candidates.dedup();
    candidates
}

/// Parses the version out of `nats-server --version` output (`nats-server: v2.15.1`).
fn parse_server_version(output: &str) -> Option<(u32, u32, u32)> {
    output.split_whitespace().find_map(|word| {
        let mut parts = word.trim_start_matches('v').splitn(3, '.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch: String = parts
            .next()?
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        Some((major, minor, patch.parse().ok()?))
    })
}

/// Checks once per binary path that it runs and is recent enough; panics otherwise.
fn check_server_version(bin: &Path) {
    static CHECKED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
    let mut checked = CHECKED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if checked.get_or_insert_with(HashSet::new).contains(bin) {
        return;
    }
    let hint = "install one with scripts/ensure-nats-server.sh or set NATS_SERVER_BIN";
    let output = Command::new(bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} --version: {e}; {hint}", bin.display()));
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let Some((major, minor, patch)) = parse_server_version(&text) else {
        panic!(
            "{} --version printed {:?}, not a nats-server version; {hint}",
            bin.display(),
            text.trim()
        );
    };
    assert!(
        (major, minor) >= MIN_SERVER_VERSION,
        "{} is nats-server {major}.{minor}.{patch}, taskmesh needs {}.{} or newer; {hint}",
        bin.display(),
        MIN_SERVER_VERSION.0,
        MIN_SERVER_VERSION.1,
    );
    if let Some(set) = checked.as_mut() {
        set.insert(bin.to_path_buf());
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

/// Polls `f` every ~50 ms until it returns `Ok`, and returns that value.
///
/// Each attempt is bounded by what is left of `timeout`, so a hanging attempt cannot hang
/// the test. This is how tests wait for anything: never a fixed sleep.
///
/// # Panics
///
/// When `f` has not returned `Ok` within `timeout`, with the message
/// `"{what}: not true after {timeout:?}; last seen: {err}"`, where `err` is the last
/// `Err` that `f` returned — so describe what you saw, not just that it was wrong.
///
/// # Example
///
/// ```no_run
/// # use std::time::Duration;
/// # async fn example(js: async_nats::jetstream::Context) {
/// let count = taskmesh_tests::eventually(Duration::from_secs(5), "3 messages stored", || {
///     let js = js.clone();
///     async move {
///         let mut stream = js.get_stream("TASKS_EMAIL").await.map_err(|e| e.to_string())?;
///         let n = stream.info().await.map_err(|e| e.to_string())?.state.messages;
///         if n == 3 { Ok(n) } else { Err(format!("{n} messages")) }
///     }
/// })
/// .await;
/// # }
/// ```
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    match poll_until(timeout, &mut f).await {
        Ok(value) => value,
        Err(err) => panic!("{what}: not true after {timeout:?}; last seen: {err}"),
    }
}

/// [`eventually`] without the panic: the last error when the deadline passes.
async fn poll_until<T, F, Fut>(limit: Duration, f: &mut F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    let mut last = String::from("(no attempt finished)");
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        // `timeout` polls the attempt before looking at the clock, so even a zero budget
        // gets one attempt.
        match timeout(remaining, f()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(err)) => last = err,
            Err(_) => return Err(format!("{last} (the next attempt was still running)")),
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(last);
        }
        sleep(POLL_INTERVAL.min(remaining)).await;
    }
}

/// A name unique within this machine for a while: `<prefix>-<pid>-<counter>-<time>`, in
/// lower-case hex after the prefix, so it stays a valid subject token, stream name part,
/// KV key and task category when `prefix` is one.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // The low 32 bits of the clock tell apart runs that reuse a pid.
    let time = (nanos & 0xffff_ffff) as u32;
    format!("{prefix}-{:x}-{n:x}-{time:08x}", std::process::id())
}

/// A port that was free on 127.0.0.1 a moment ago. The caller relaunches on a bind error:
/// another process can take it before the server binds.
fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free ports (all listeners are held until every port is picked).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| {
            TcpListener::bind("127.0.0.1:0")
                .unwrap_or_else(|e| panic!("cannot bind a free port on 127.0.0.1: {e}"))
        })
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .unwrap_or_else(|e| panic!("cannot read a bound port: {e}"))
                .port()
        })
        .collect()
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

fn send_signal(pid: u32, signal: Signal) -> nix::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| nix::errno::Errno::ESRCH)?;
    kill(Pid::from_raw(pid), signal)
}

/// Whether every thread of `pid` is in job-control stop (`T` in `/proc/<pid>/task/*/stat`).
/// `None` when that cannot be read (not Linux, or the process is gone).
fn all_threads_stopped(pid: u32) -> Option<bool> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut any = false;
    for task in tasks {
        let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
        // `pid (comm) S ...`: comm may hold spaces and parentheses, the state follows the
        // last `)`.
        let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
        if state != 'T' {
            return Some(false);
        }
        any = true;
    }
    Some(any)
}

/// Sends SIGSTOP or SIGCONT and waits until the kernel has (un)frozen every thread:
/// `kill` returns before a busy multi-threaded process has actually stopped.
fn stop_or_continue(pid: u32, stop: bool) -> nix::Result<()> {
    send_signal(
        pid,
        if stop {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        },
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        match all_threads_stopped(pid) {
            None => return Ok(()),
            Some(stopped) if stopped == stop => return Ok(()),
            // Stopping takes well under a millisecond; poll briefly without a runtime.
            Some(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    let state = if stop { "stopped" } else { "running" };
    panic!("process {pid} was not {state} 5s after the signal");
}

/// Whether temporary directories should outlive their owner: on panic, or on request.
fn keep_temp_dirs() -> bool {
    std::thread::panicking() || std::env::var_os("TASKMESH_KEEP_LOGS").is_some()
}

fn open_append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open log file {}: {e}", path.display()))
}

fn config_string(path: &Path) -> String {
    // NATS config strings use JSON-like escapes; temp paths need none, but be safe.
    let text = path.display().to_string();
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Polls a child for its exit, without blocking the runtime, for up to `limit`.
async fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("cannot wait for process {}: {e}", child.id()),
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return None;
        }
        sleep(Duration::from_millis(20).min(remaining)).await;
    }
}

/// SIGKILL and reap; never panics (it runs in `Drop`).
fn kill_and_reap(child: &mut Child) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let _ = child.kill();
    child.wait().ok()
}

// ---------------------------------------------------------------------------------------
// NatsServer
// ---------------------------------------------------------------------------------------

/// How to configure a [`NatsServer`]. `ServerOptions::default()` is a standalone JetStream
/// server on a free port with the default `sync_interval`.
///
/// ```
/// # use taskmesh_tests::ServerOptions;
/// let options = ServerOptions {
///     sync_always: true,
///     extra_config: "max_payload: 2MB\n".into(),
///     ..ServerOptions::default()
/// };
/// ```
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Config text appended verbatim to the generated config file (after the generated
    /// settings, so it can add blocks such as `accounts { ... }` or top-level settings
    /// such as `lame_duck_duration: "30s"`).
    pub extra_config: String,
    /// Adds `sync_interval: always` to the `jetstream` block (fsync every write, as
    /// production runs). Much slower; use it only where durability is under test.
    pub sync_always: bool,
    /// The client port; `None` picks a free one (and retries on a bind race).
    pub port: Option<u16>,
    /// `server_name`; `None` lets nats-server pick one (a cluster node must have one).
    pub server_name: Option<String>,
    /// Cluster membership; set by [`NatsCluster`], rarely by hand.
    pub cluster: Option<ClusterOptions>,
}

/// The `cluster { ... }` block of a node's config.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The cluster name, the same on every node.
    pub name: String,
    /// This node's route (cluster) port on 127.0.0.1.
    pub port: u16,
    /// The route ports of every node in the cluster (this one included is fine).
    pub routes: Vec<u16>,
}

/// Why a launched server did not become ready.
enum NotReady {
    /// The process exited; `bind_race` when a port was taken under us.
    Exited { status: ExitStatus, bind_race: bool },
    /// The deadline passed; the last probe error.
    Timeout(String),
}

/// A `nats-server` process with JetStream, on a free 127.0.0.1 port, with its config, log
/// and JetStream store in a temporary directory.
///
/// Dropping it kills the process (SIGKILL) and removes the directory — unless the thread
/// is panicking or `TASKMESH_KEEP_LOGS` is set, in which case the directory is kept and its
/// path printed to stderr.
///
/// Methods that signal the process (`pause`, `lame_duck`, ...) panic when it is not
/// running; `stop` and `stop_graceful` are no-ops then.
#[derive(Debug)]
pub struct NatsServer {
    bin: PathBuf,
    options: ServerOptions,
    port: u16,
    dir: Option<TempDir>,
    dir_path: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    store_dir: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a standalone JetStream server on a free port and waits (up to ~10 s) until
    /// it accepts clients and answers JetStream API requests.
    ///
    /// # Panics
    ///
    /// When the server binary is missing or too old, or the server is not ready in time
    /// (the message includes the tail of its log).
    pub async fn start() -> Self {
        Self::start_with(ServerOptions::default()).await
    }

    /// [`NatsServer::start`] with options. A node with `cluster` set is only waited on
    /// until it accepts clients (JetStream needs a quorum); [`NatsCluster`] does the rest.
    ///
    /// # Panics
    ///
    /// As [`NatsServer::start`].
    pub async fn start_with(options: ServerOptions) -> Self {
        let mut attempt = 1;
        loop {
            let mut server = Self::launch(options.clone());
            let wait_for_jetstream = options.cluster.is_none();
            match server
                .wait_ready(SERVER_READY_TIMEOUT, wait_for_jetstream)
                .await
            {
                Ok(()) => return server,
                Err(NotReady::Exited {
                    bind_race: true, ..
                }) if options.port.is_none() && attempt < BIND_ATTEMPTS => attempt += 1,
                Err(reason) => server.fail(&reason),
            }
        }
    }

    /// Writes the config and spawns the process without waiting for it.
    fn launch(mut options: ServerOptions) -> Self {
        let bin = nats_server_bin();
        check_server_version(&bin);
        let port = *options.port.get_or_insert_with(free_port);
        let dir = tempfile::Builder::new()
            .prefix("taskmesh-nats-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for nats-server: {e}"));
        let dir_path = dir.path().to_path_buf();
        let store_dir = dir_path.join("store");
        let mut server = Self {
            bin,
            port,
            config_path: dir_path.join("nats-server.conf"),
            log_path: dir_path.join("nats-server.log"),
            store_dir,
            dir: Some(dir),
            dir_path,
            options,
            child: None,
        };
        let config = server.render_config();
        std::fs::write(&server.config_path, config)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", server.config_path.display()));
        server.spawn();
        server
    }

    fn render_config(&self) -> String {
        let o = &self.options;
        let mut config = format!(
            "# written by taskmesh-tests\nlisten: \"127.0.0.1:{}\"\nlog_file: {}\nlogtime: true\n",
            self.port,
            config_string(&self.log_path),
        );
        if let Some(name) = &o.server_name {
            config += &format!("server_name: \"{name}\"\n");
        }
        config += &format!(
            "jetstream {{\n  store_dir: {}\n",
            config_string(&self.store_dir)
        );
        if o.sync_always {
            config += "  sync_interval: always\n";
        }
        config += "}\n";
        if let Some(cluster) = &o.cluster {
            let routes: Vec<String> = cluster
                .routes
                .iter()
                .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            config += &format!(
                "cluster {{\n  name: \"{}\"\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n}}\n",
                cluster.name,
                cluster.port,
                routes.join(", ")
            );
        }
        if !o.extra_config.is_empty() {
            config += "\n# extra config\n";
            config += &o.extra_config;
            config += "\n";
        }
        config
    }

    fn spawn(&mut self) {
        let log = open_append(&self.log_path);
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot duplicate a log file handle: {e}"));
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; install it with scripts/ensure-nats-server.sh or set NATS_SERVER_BIN",
                    self.bin.display()
                )
            });
        self.child = Some(child);
    }

    /// Waits until the server accepts clients and, if asked, answers JetStream.
    async fn wait_ready(&mut self, limit: Duration, jetstream: bool) -> Result<(), NotReady> {
        let url = self.url();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                let bind_race = self
                    .log_tail(PANIC_LOG_LINES)
                    .contains("address already in use");
                return Err(NotReady::Exited { status, bind_race });
            }
            let last = match probe(&url, jetstream).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(NotReady::Timeout(last));
            }
            sleep(POLL_INTERVAL).await;
        }
    }

    fn fail(&self, reason: &NotReady) -> ! {
        let what = match reason {
            NotReady::Exited { status, .. } => format!("exited ({status})"),
            NotReady::Timeout(last) => format!("was not ready in time; last probe: {last}"),
        };
        panic!(
            "nats-server on {} {what}\n--- {} (last {PANIC_LOG_LINES} lines) ---\n{}\n---",
            self.url(),
            self.log_path.display(),
            self.log_tail(PANIC_LOG_LINES),
        );
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(status) => status,
            Err(e) => panic!("cannot wait for nats-server {}: {e}", child.id()),
        }
    }

    fn running_pid(&mut self, action: &str) -> u32 {
        if self.exited().is_some() {
            self.child = None;
        }
        match &self.child {
            Some(child) => child.id(),
            None => panic!(
                "cannot {action}: nats-server on port {} is not running",
                self.port
            ),
        }
    }

    fn signal(&mut self, signal: Signal, action: &str) {
        let pid = self.running_pid(action);
        let sent = match signal {
            Signal::SIGSTOP => stop_or_continue(pid, true),
            Signal::SIGCONT => stop_or_continue(pid, false),
            _ => send_signal(pid, signal),
        };
        sent.unwrap_or_else(|e| {
            panic!("cannot {action} (send {signal} to nats-server {pid}): {e}")
        });
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port (stable across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The route port, for a cluster node.
    pub fn cluster_port(&self) -> Option<u16> {
        self.options.cluster.as_ref().map(|c| c.port)
    }

    /// `server_name` from the options, if one was set.
    pub fn server_name(&self) -> Option<&str> {
        self.options.server_name.as_deref()
    }

    /// The process id, or `None` when the server was stopped through this handle (or its
    /// exit was observed by [`NatsServer::is_running`] or [`NatsServer::wait_exit`]).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is alive (a paused process is alive).
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.exited().is_none()
    }

    /// The JetStream `store_dir` (stable across restarts); nats-server keeps its data in a
    /// `jetstream` folder inside it.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The temporary directory holding config, log and store.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// The generated config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The log file (server log plus the process's stdout and stderr, appended across
    /// restarts).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        last_lines(&read_lossy(&self.log_path), n)
    }

    /// Connects a client to this server.
    ///
    /// # Panics
    ///
    /// When the connection fails.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to nats-server at {}: {e}", self.url()))
    }

    /// Kills the server with SIGKILL (a crash: nothing is flushed) and reaps it. A no-op
    /// when it is not running.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// Stops the server with SIGTERM (a clean shutdown; a paused server is resumed to
    /// handle it) and waits for it to exit. Returns `None` when it was not running.
    ///
    /// # Panics
    ///
    /// When it is still running 30 s after SIGTERM (it is then killed).
    pub async fn stop_graceful(&mut self) -> Option<ExitStatus> {
        if self.exited().is_some() {
            self.child = None;
        }
        let mut child = self.child.take()?;
        // SIGCONT too, so a paused server handles the SIGTERM instead of hanging on to it.
        if let Err(e) = send_signal(child.id(), Signal::SIGTERM)
            .and_then(|()| send_signal(child.id(), Signal::SIGCONT))
        {
            kill_and_reap(&mut child);
            panic!("cannot send SIGTERM to nats-server {}: {e}", child.id());
        }
        match wait_child(&mut child, GRACEFUL_STOP_TIMEOUT).await {
            Some(status) => Some(status),
            None => {
                kill_and_reap(&mut child);
                panic!(
                    "nats-server on {} did not exit within {GRACEFUL_STOP_TIMEOUT:?} of SIGTERM\n{}",
                    self.url(),
                    self.log_tail(PANIC_LOG_LINES)
                );
            }
        }
    }

    /// Starts the stopped server again with the same port, config and store, and waits
    /// until it is ready: JetStream answers, or, for a cluster node, it accepts clients
    /// (JetStream needs a quorum; use [`NatsCluster::wait_ready`]).
    ///
    /// # Panics
    ///
    /// When the server is still running, or is not ready in time.
    pub async fn start_again(&mut self) {
        if self.exited().is_some() {
            self.child = None;
        }
        assert!(
            self.child.is_none(),
            "start_again: nats-server on port {} is still running; stop() it first or use restart()",
            self.port
        );
        self.spawn();
        let jetstream = self.options.cluster.is_none();
        if let Err(reason) = self.wait_ready(SERVER_READY_TIMEOUT, jetstream).await {
            self.fail(&reason);
        }
    }

    /// [`NatsServer::stop`] (SIGKILL) then [`NatsServer::start_again`].
    ///
    /// # Panics
    ///
    /// As [`NatsServer::start_again`].
    pub async fn restart(&mut self) {
        self.stop();
        self.start_again().await;
    }

    /// Freezes the process with SIGSTOP and returns once every thread has stopped:
    /// connections stay open but nothing is answered.
    ///
    /// # Panics
    ///
    /// When the server is not running.
    pub fn pause(&mut self) {
        self.signal(Signal::SIGSTOP, "pause");
    }

    /// Resumes a paused process with SIGCONT.
    ///
    /// # Panics
    ///
    /// When the server is not running.
    pub fn resume(&mut self) {
        self.signal(Signal::SIGCONT, "resume");
    }

    /// Puts the server in lame duck mode with SIGUSR2 (what `nats-server --signal ldm`
    /// sends): it stops accepting clients, tells connected ones to move elsewhere, waits
    /// `lame_duck_grace_period` (default 10 s), closes clients over `lame_duck_duration`
    /// (default 2 min; set both in [`ServerOptions::extra_config`] to shorten them), then
    /// exits. Observe the exit with [`NatsServer::wait_exit`].
    ///
    /// # Panics
    ///
    /// When the server is not running.
    pub fn lame_duck(&mut self) {
        self.signal(Signal::SIGUSR2, "enter lame duck mode");
    }

    /// Waits up to `limit` for the process to exit on its own (after lame duck mode, say),
    /// reaps it and returns its status; `None` when it is still running then or was not
    /// running at all. A later [`NatsServer::start_again`] works either way.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let status = wait_child(self.child.as_mut()?, limit).await;
        if status.is_some() {
            self.child = None;
        }
        status
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.dir.take()
            && keep_temp_dirs()
        {
            let path = dir.keep();
            eprintln!(
                "taskmesh-tests: kept nats-server (port {}) files in {} (log: {})",
                self.port,
                path.display(),
                self.log_path.display()
            );
        }
    }
}

/// One readiness probe: connect, and optionally ask JetStream for account info.
async fn probe(url: &str, jetstream: bool) -> Result<(), String> {
    let attempt = async {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(1))
            .connect(url)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        if jetstream {
            let mut js = async_nats::jetstream::new(client);
            js.set_timeout(Duration::from_secs(2));
            js.query_account()
                .await
                .map_err(|e| format!("jetstream account info: {e}"))?;
        }
        Ok(())
    };
    timeout(Duration::from_secs(3), attempt)
        .await
        .unwrap_or_else(|_| Err("probe timed out after 3s".to_string()))
}

// ---------------------------------------------------------------------------------------
// NatsCluster
// ---------------------------------------------------------------------------------------

/// A JetStream cluster of `n` `nats-server` nodes on loopback: `server_name` `n1`..`nN`,
/// cluster `taskmesh-test`, every node routing to every node, each with its own store.
///
/// Each node is a [`NatsServer`]: kill, pause or restart one with [`NatsCluster::node`]
/// and wait for the cluster with [`NatsCluster::wait_ready`]. Dropping the cluster drops
/// every node.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` nodes and waits (up to ~30 s) until a JetStream meta leader is elected
    /// and, when every node is up, a stream with `min(n, 5)` replicas can be placed.
    ///
    /// # Panics
    ///
    /// When `n` is 0, or the cluster is not ready in time (with every node's log tail).
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, ServerOptions::default()).await
    }

    /// [`NatsCluster::start`] with options applied to every node (`extra_config`,
    /// `sync_always`); `port`, `server_name` and `cluster` are set per node.
    ///
    /// # Panics
    ///
    /// As [`NatsCluster::start`].
    pub async fn start_with(n: usize, options: ServerOptions) -> Self {
        assert!(n > 0, "a cluster needs at least one node");
        let mut attempt = 1;
        loop {
            let ports = free_ports(2 * n);
            let (client_ports, route_ports) = ports.split_at(n);
            let nodes = (0..n)
                .map(|i| {
                    NatsServer::launch(ServerOptions {
                        port: Some(client_ports[i]),
                        server_name: Some(format!("n{}", i + 1)),
                        cluster: Some(ClusterOptions {
                            name: CLUSTER_NAME.to_string(),
                            port: route_ports[i],
                            routes: route_ports.to_vec(),
                        }),
                        ..options.clone()
                    })
                })
                .collect();
            let mut cluster = Self { nodes };
            match cluster.wait_ready_for(CLUSTER_READY_TIMEOUT).await {
                Ok(()) => return cluster,
                Err(NotReady::Exited {
                    bind_race: true, ..
                }) if attempt < BIND_ATTEMPTS => attempt += 1,
                Err(reason) => cluster.fail(&reason),
            }
        }
    }

    /// Waits (up to ~30 s) until every running node answers JetStream requests (so a meta
    /// leader is known) and, when all nodes run, a stream with `min(n, 5)` replicas can be
    /// created and deleted. Use it after restarting nodes.
    ///
    /// # Panics
    ///
    /// When the cluster is not ready in time, or a node has exited on its own.
    pub async fn wait_ready(&mut self) {
        if let Err(reason) = self.wait_ready_for(CLUSTER_READY_TIMEOUT).await {
            self.fail(&reason);
        }
    }

    async fn wait_ready_for(&mut self, limit: Duration) -> Result<(), NotReady> {
        let deadline = Instant::now() + limit;
        let probe_stream = unique_name("HARNESS_PROBE").replace('-', "_");
        loop {
            let mut running = Vec::new();
            for node in &mut self.nodes {
                if node.child.is_none() {
                    continue;
                }
                if let Some(status) = node.exited() {
                    let bind_race = node
                        .log_tail(PANIC_LOG_LINES)
                        .contains("address already in use");
                    return Err(NotReady::Exited { status, bind_race });
                }
                running.push(node.url());
            }
            if running.is_empty() {
                return Err(NotReady::Timeout("no node is running".to_string()));
            }
            let all_running = running.len() == self.nodes.len();
            let replicas = self.nodes.len().min(5);
            let last = match cluster_probe(&running, all_running, replicas, &probe_stream).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(NotReady::Timeout(last));
            }
            sleep(POLL_INTERVAL).await;
        }
    }

    fn fail(&self, reason: &NotReady) -> ! {
        let what = match reason {
            NotReady::Exited { status, .. } => format!("a node exited ({status})"),
            NotReady::Timeout(last) => format!("was not ready in time; last probe: {last}"),
        };
        let mut logs = String::new();
        for node in &self.nodes {
            logs += &format!(
                "--- {} {} (last 15 lines) ---\n{}\n",
                node.server_name().unwrap_or("?"),
                node.log_path().display(),
                node.log_tail(15)
            );
        }
        panic!("nats cluster {what}\n{logs}---");
    }

    /// All nodes, in order `n1`..`nN`.
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// All nodes, mutable (to stop or restart several).
    pub fn nodes_mut(&mut self) -> &mut [NatsServer] {
        &mut self.nodes
    }

    /// Node `i`, 0-based: `node(0)` is `n1`.
    ///
    /// # Panics
    ///
    /// When `i` is out of range.
    pub fn node(&mut self, i: usize) -> &mut NatsServer {
        let n = self.nodes.len();
        self.nodes
            .get_mut(i)
            .unwrap_or_else(|| panic!("node index {i} out of range: the cluster has {n} nodes"))
    }

    /// The cluster name (`taskmesh-test`).
    pub fn name(&self) -> &str {
        CLUSTER_NAME
    }

    /// Every node's client URL, in node order. Pass this (a `Vec<String>`) to
    /// `async_nats::connect`, which takes a list but does not split a comma-joined string.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// The client URLs joined with commas, the `NATS_URL` / `--server` form that the NATS
    /// CLI, the Go client and the `taskmesh` binary take.
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    /// Connects a client that knows every node (it fails over between them).
    ///
    /// # Panics
    ///
    /// When no node accepts the connection.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.urls())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the cluster {}: {e}", self.url_list()))
    }

    /// Stops every node (SIGKILL), starts them all again and waits with
    /// [`NatsCluster::wait_ready`].
    ///
    /// # Panics
    ///
    /// As [`NatsCluster::wait_ready`].
    pub async fn restart_all(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
        for node in &mut self.nodes {
            node.spawn();
        }
        self.wait_ready().await;
    }
}

/// One cluster readiness probe: every running node answers JetStream account info, then,
/// when all nodes run, a `replicas`-wide memory stream is created and deleted.
async fn cluster_probe(
    urls: &[String],
    all_running: bool,
    replicas: usize,
    stream: &str,
) -> Result<(), String> {
    for url in urls {
        probe(url, true).await.map_err(|e| format!("{url}: {e}"))?;
    }
    if !all_running {
        return Ok(());
    }
    let attempt = async {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(1))
            .connect(urls)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut js = async_nats::jetstream::new(client);
        js.set_timeout(Duration::from_secs(3));
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: stream.to_string(),
            subjects: vec![format!("{}.probe", stream.to_lowercase())],
            storage: async_nats::jetstream::stream::StorageType::Memory,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("placing an R{replicas} probe stream: {e}"))?;
        js.delete_stream(stream)
            .await
            .map_err(|e| format!("deleting the probe stream: {e}"))?;
        Ok(())
    };
    timeout(Duration::from_secs(8), attempt)
        .await
        .unwrap_or_else(|_| Err("stream probe timed out after 8s".to_string()))
}

// ---------------------------------------------------------------------------------------
// TaskmeshProcess
// ---------------------------------------------------------------------------------------

/// A running `taskmesh` process (or any program, via [`TaskmeshProcess::spawn_program`])
/// with stdout and stderr appended to a log file in its own temporary directory, which is
/// also its working directory (pass absolute paths in arguments).
///
/// `NO_COLOR=1` is set unless `env` overrides it, so logs are plain text. Dropping it
/// kills the process (SIGKILL) if it still runs and reaps it; when the thread is panicking
/// (or `TASKMESH_KEEP_LOGS` is set) the directory is kept and, on panic, the log tail
/// printed to stderr.
#[derive(Debug)]
pub struct TaskmeshProcess {
    program: PathBuf,
    child: Child,
    pid: u32,
    status: Option<ExitStatus>,
    dir: Option<TempDir>,
    dir_path: PathBuf,
    log_path: PathBuf,
}

impl TaskmeshProcess {
    /// Spawns [`taskmesh_bin`] with `args` and extra `env` (on top of the inherited
    /// environment).
    ///
    /// # Panics
    ///
    /// When the binary is missing (build it first: `cargo build --bin taskmesh`) or cannot
    /// be started.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_program(&taskmesh_bin(), args, env)
    }

    /// Spawns any program the same way (used by the harness's own tests, and for helper
    /// processes).
    ///
    /// # Panics
    ///
    /// When the program cannot be started.
    pub fn spawn_program(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("taskmesh-proc-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir for {}: {e}", program.display()));
        let dir_path = dir.path().to_path_buf();
        let log_path = dir_path.join("output.log");
        let log = open_append(&log_path);
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot duplicate a log file handle: {e}"));
        let child = Command::new(program)
            .args(args)
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .current_dir(&dir_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} {args:?}: {e}", program.display()));
        Self {
            program: program.to_path_buf(),
            pid: child.id(),
            child,
            status: None,
            dir: Some(dir),
            dir_path,
            log_path,
        }
    }

    /// The process id (kept after exit, for messages).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status if the process has exited (it is reaped then).
    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            match self.child.try_wait() {
                Ok(status) => self.status = status,
                Err(e) => panic!("cannot wait for process {}: {e}", self.pid),
            }
        }
        self.status
    }

    /// Whether the process is alive (a stopped process is alive).
    pub fn is_running(&mut self) -> bool {
        self.poll_exit().is_none()
    }

    /// Sends `signal` unless the process has already exited (its pid may be reused then).
    fn signal(&mut self, signal: Signal) {
        if self.poll_exit().is_some() {
            return;
        }
        let sent = match signal {
            Signal::SIGSTOP => stop_or_continue(self.pid, true),
            Signal::SIGCONT => stop_or_continue(self.pid, false),
            _ => send_signal(self.pid, signal),
        };
        sent.unwrap_or_else(|e| panic!("cannot send {signal} to process {}: {e}", self.pid));
    }

    /// Sends SIGTERM (graceful shutdown: drain, then exit). A no-op after exit.
    pub fn sigterm(&mut self) {
        self.signal(Signal::SIGTERM);
    }

    /// Kills the process with SIGKILL (a crash) and reaps it. A no-op after exit.
    pub fn kill9(&mut self) {
        if self.poll_exit().is_none() {
            self.status = kill_and_reap(&mut self.child);
        }
    }

    /// Freezes the process with SIGSTOP and returns once every thread has stopped. A no-op
    /// after exit.
    pub fn sigstop(&mut self) {
        self.signal(Signal::SIGSTOP);
    }

    /// Resumes a stopped process with SIGCONT. A no-op after exit.
    pub fn sigcont(&mut self) {
        self.signal(Signal::SIGCONT);
    }

    /// Waits up to `limit` for the process to exit and returns its status, or `None` if it
    /// is still running then.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = wait_child(&mut self.child, limit).await;
        }
        self.status
    }

    /// The whole log so far (stdout and stderr interleaved).
    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        last_lines(&self.log(), n)
    }

    /// Waits up to `limit` until the log contains `needle`.
    ///
    /// # Panics
    ///
    /// When it does not, with the log tail.
    pub async fn wait_for_log(&self, needle: &str, limit: Duration) {
        let what = format!("{} log contains {needle:?}", self.program.display());
        eventually(limit, &what, || async {
            if self.log().contains(needle) {
                Ok(())
            } else {
                Err(format!("log tail:\n{}", self.log_tail(20)))
            }
        })
        .await;
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The temporary (and working) directory.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }
}

impl Drop for TaskmeshProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.status = kill_and_reap(&mut self.child);
        }
        if let Some(dir) = self.dir.take()
            && keep_temp_dirs()
        {
            let path = dir.keep();
            eprintln!(
                "taskmesh-tests: kept {} (pid {}) files in {}",
                self.program.display(),
                self.pid,
                path.display()
            );
            if std::thread::panicking() {
                eprintln!(
                    "--- {} (last 30 lines) ---\n{}\n---",
                    self.log_path.display(),
                    self.log_tail(30)
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

/// A minimal HTTP/1.1 GET against `addr` (`127.0.0.1:9090`): the status code and body, or
/// the connection error as text (so it can feed [`eventually`]).
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The address a `taskmesh` process logged as `http listening on <addr>`.
pub async fn http_addr_of(p: &TaskmeshProcess) -> String {
    p.wait_for_log("http listening on ", Duration::from_secs(30))
        .await;
    let log = p.log();
    let line = log
        .lines()
        .find(|l| l.contains("http listening on "))
        .unwrap_or_default();
    line.split("http listening on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_server_versions() {
        let cases = [
            ("nats-server: v2.15.1", Some((2, 15, 1))),
            ("nats-server: v2.9.25\n", Some((2, 9, 25))),
            ("nats-server: v2.12.0-RC.1", Some((2, 12, 0))),
            ("v10.0.3", Some((10, 0, 3))),
            ("command not found", None),
            ("", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_server_version(input), want, "input {input:?}");
        }
    }

    #[test]
    fn unique_names_differ_and_are_subject_tokens() {
        let a = unique_name("email");
        let b = unique_name("email");
        assert_ne!(a, b);
        for name in [a, b] {
            assert!(name.starts_with("email-"), "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{name}"
            );
        }
    }

    #[test]
    fn last_lines_takes_the_tail() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(last_lines("a\nb", 5), "a\nb");
        assert_eq!(last_lines("", 3), "");
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(6);
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
    }

    #[test]
    fn cluster_config_lists_every_route() {
        let server = NatsServer {
            bin: PathBuf::from("nats-server"),
            options: ServerOptions {
                server_name: Some("n2".into()),
                sync_always: true,
                extra_config: "lame_duck_duration: \"30s\"".into(),
                cluster: Some(ClusterOptions {
                    name: CLUSTER_NAME.into(),
                    port: 6002,
                    routes: vec![6001, 6002, 6003],
                }),
                ..ServerOptions::default()
            },
            port: 4002,
            dir: None,
            dir_path: PathBuf::from("/tmp/x"),
            config_path: PathBuf::from("/tmp/x/nats-server.conf"),
            log_path: PathBuf::from("/tmp/x/nats-server.log"),
            store_dir: PathBuf::from("/tmp/x/store"),
            child: None,
        };
        let config = server.render_config();
        for want in [
            "listen: \"127.0.0.1:4002\"",
            "server_name: \"n2\"",
            "log_file: \"/tmp/x/nats-server.log\"",
            "store_dir: \"/tmp/x/store\"",
            "sync_interval: always",
            "name: \"taskmesh-test\"",
            "listen: \"127.0.0.1:6002\"",
            "\"nats-route://127.0.0.1:6001\", \"nats-route://127.0.0.1:6002\", \"nats-route://127.0.0.1:6003\"",
            "lame_duck_duration: \"30s\"",
        ] {
            assert!(config.contains(want), "missing {want:?} in:\n{config}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn poll_until_reports_the_last_error() {
        let mut n = 0;
        let result: Result<(), String> = poll_until(Duration::from_secs(1), &mut || {
            n += 1;
            let seen = n;
            async move { Err(format!("attempt {seen}")) }
        })
        .await;
        let err = result.expect_err("never Ok");
        assert!(err.starts_with("attempt "), "{err}");
        assert!(n > 5, "polled only {n} times");
    }

    #[tokio::test(start_paused = true)]
    async fn poll_until_bounds_a_hanging_attempt() {
        let result: Result<(), String> = poll_until(Duration::from_millis(200), &mut || {
            std::future::pending::<Result<(), String>>()
        })
        .await;
        let err = result.expect_err("never Ok");
        assert!(err.contains("still running"), "{err}");
    }
}
