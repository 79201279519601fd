//! The fault suite's tools: a fixture that works on one server or a cluster
//! ([`FaultMesh`]), the ledger-based [`Checker`] and its [`Report`], a worker
//! [`Supervisor`] (restarts a worker that died, like Kubernetes would), a loopback TCP
//! [`Proxy`] for latency, resets and blackholes, and per-node stream state from the
//! servers' `/jsz` monitoring endpoint ([`node_stream_states`]).
//!
//! # What the checker records and how it decides
//!
//! - **Enqueues**: every attempt ([`Checker::record`]): the task id, whether a PubAck came
//!   back, and the stream sequence(s) it reported. Only ids registered with
//!   `expect_completion = true` must complete; poison ids are checked by their records.
//! - **Handler start / completion**: the testkit ledger (`TASKMESH_TESTKIT_LEDGER`,
//!   `start`/`done` lines), written by the worker outside NATS, so it survives crashes.
//! - **Acks**: a WorkQueue stream deletes a message when it is acked (or termed). The
//!   sampler ([`Checker::sample`]) records `(time, first_seq)` of the stream; every
//!   message below `first_seq` is gone, so a task whose highest acknowledged sequence is
//!   below it has a **confirmed ack** at that time.
//!
//! The [`Report`]:
//!
//! - `lost`: an enqueue that got a PubAck and was expected to complete has no `done`.
//! - `unexpected`: a `done` for an id that no enqueue (acknowledged or not) ever used.
//! - `duplicates`: ids with more than one `done` (at-least-once allows these only for
//!   tasks in flight at a fault; each scenario states its bound).
//! - `redelivered_after_ack`: a `start` whose time is after the first sample that
//!   confirmed the id's ack. This can only happen if the server redelivered a deleted
//!   message or stored a second copy of an id inside the duplicate window.
//! - `longest_stall`: the longest gap between consecutive completions (or from the first
//!   enqueue to the first completion) while acknowledged work was still not done.
//! - `divergence`: filled by [`divergence`] for a cluster: nodes whose view of a stream
//!   (messages, first and last sequence) differs after the scenario settled.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use taskmesh_nats::{Client, EnqueueOptions, Enqueued, NatsError};
use taskmesh_shared::{Config, TaskId, TaskName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::mesh::{LedgerEntry, path_str, read_ledger};
use crate::{NatsServer, TaskmeshProcess, http_get};

/// Wall time in Unix milliseconds (the ledger's clock).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Whether the full tier runs (`TASKMESH_FAULT_FULL=1`); prints why a test is skipped.
pub fn full_tier(test: &str) -> bool {
    let on = std::env::var("TASKMESH_FAULT_FULL").is_ok_and(|v| v == "1");
    if !on {
        eprintln!(
            "{test}: skipped (full fault tier: set TASKMESH_FAULT_FULL=1 or run scripts/fault-suite.sh)"
        );
    }
    on
}

// ---------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------

/// A provisioned `testkit` category on any server URL list, a ledger file and a producer.
pub struct FaultMesh {
    /// Temp dir holding the config and ledger (kept when the test panics).
    pub dir: Option<tempfile::TempDir>,
    /// The config file.
    pub config: PathBuf,
    /// The testkit ledger file.
    pub ledger: PathBuf,
    /// A producer.
    pub client: Client,
}

impl FaultMesh {
    /// Writes a config for `urls` (comma-separated) with `[categories.testkit]`
    /// (`category` appended), `[worker]` (`worker` appended) and `extra` (whole sections,
    /// e.g. `[streams]\nreplicas = 3`), provisions it with `taskmesh provision` and
    /// connects a producer.
    ///
    /// # Panics
    ///
    /// When provisioning or connecting fails.
    pub async fn start(urls: &str, category: &str, worker: &str, extra: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("taskmesh-fault-")
            .tempdir()
            .expect("temp dir");
        let config = dir.path().join("taskmesh.toml");
        let ledger = dir.path().join("ledger.txt");
        std::fs::write(
            &config,
            format!(
                "seed_categories = false\n[nats]\nurl = \"{urls}\"\n[worker]\nheartbeat_interval = \"1s\"\n{worker}\n\
                 [categories.testkit]\nconcurrency = 8\nmax_deliver = 10\n{category}\n{extra}\n"
            ),
        )
        .expect("write config");
        let mut p = TaskmeshProcess::spawn(&["provision", "--config", path_str(&config)], &[]);
        let status = p
            .wait_exit(Duration::from_secs(60))
            .await
            .expect("provision exits");
        assert!(status.success(), "provision failed: {}", p.log());
        let cfg = Config::load(&config).expect("config loads");
        let conn = taskmesh_nats::connect(&cfg.nats, "fault-producer", Duration::from_secs(10))
            .await
            .expect("connect");
        let client = Client::new(conn, &cfg).await.expect("client");
        Self {
            dir: Some(dir),
            config,
            ledger,
            client,
        }
    }

    /// [`FaultMesh::start`] on one server.
    pub async fn single(server: &NatsServer, category: &str, worker: &str) -> Self {
        Self::start(&server.url(), category, worker, "").await
    }

    /// A worker command for this mesh (see [`WorkerCmd::spawn`]).
    pub fn worker_cmd(&self) -> WorkerCmd {
        WorkerCmd {
            config: self.config.clone(),
            ledger: self.ledger.clone(),
            env: Vec::new(),
        }
    }

    /// `taskmesh worker --category testkit` with the ledger.
    pub fn worker(&self) -> TaskmeshProcess {
        self.worker_cmd().spawn()
    }

    /// The ledger so far.
    pub fn ledger(&self) -> Vec<LedgerEntry> {
        read_ledger(&self.ledger)
    }

    /// The JetStream context of the producer connection.
    pub fn js(&self) -> async_nats::jetstream::Context {
        self.client.connection().js.clone()
    }
}

impl Drop for FaultMesh {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!(
                "taskmesh-tests: kept fault mesh files (config, ledger) in {}",
                dir.keep().display()
            );
        }
    }
}

/// How to start a testkit worker for a [`FaultMesh`] (owned, so a supervisor task can use it).
#[derive(Debug, Clone)]
pub struct WorkerCmd {
    /// The config file.
    pub config: PathBuf,
    /// The ledger file.
    pub ledger: PathBuf,
    /// Extra environment.
    pub env: Vec<(String, String)>,
}

impl WorkerCmd {
    /// Spawns `taskmesh worker --config … --category testkit --http-addr 127.0.0.1:0`.
    pub fn spawn(&self) -> TaskmeshProcess {
        let args = [
            "worker",
            "--config",
            path_str(&self.config),
            "--category",
            "testkit",
            "--http-addr",
            "127.0.0.1:0",
        ];
        let mut env = vec![("TASKMESH_TESTKIT_LEDGER", path_str(&self.ledger))];
        env.extend(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        TaskmeshProcess::spawn(&args, &env)
    }
}

/// `testkit.sleep` with `{"ms": ms}`.
pub fn sleep_task(ms: u64) -> (TaskName, Bytes) {
    (
        TaskName::parse("testkit.sleep").expect("name"),
        Bytes::from(format!("{{\"ms\":{ms}}}")),
    )
}

// ---------------------------------------------------------------------------------------
// Checker
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default, Clone)]
struct EnqueueObs {
    expect_completion: bool,
    attempts: u32,
    acked: u32,
    errors: Vec<String>,
    max_seq: u64,
    first_ms: i64,
}

/// The ledger-based checker (see the module docs for the definitions). Cheap to share
/// (`Arc<Checker>`); every method takes `&self`.
#[derive(Debug, Default)]
pub struct Checker {
    enqueues: Mutex<HashMap<String, EnqueueObs>>,
    /// `(unix ms, first_seq)` samples of the task stream, in time order.
    samples: Mutex<Vec<(i64, u64)>>,
}

impl Checker {
    /// An empty checker.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records one enqueue attempt of `id` and its outcome.
    pub fn record(&self, id: &str, expect_completion: bool, outcome: &Result<Enqueued, NatsError>) {
        let mut map = self.enqueues.lock().expect("lock");
        let obs = map.entry(id.to_owned()).or_insert_with(|| EnqueueObs {
            first_ms: now_ms(),
            ..EnqueueObs::default()
        });
        obs.expect_completion |= expect_completion;
        obs.attempts += 1;
        match outcome {
            Ok(e) => {
                obs.acked += 1;
                obs.max_seq = obs.max_seq.max(e.sequence);
            }
            Err(e) => obs.errors.push(e.to_string()),
        }
    }

    /// Enqueues `n` sleep tasks `<prefix>-<i>` through [`Client::enqueue_batch`], recording
    /// each; returns the ids whose PubAck came back.
    pub async fn enqueue_sleeps(
        &self,
        client: &Client,
        prefix: &str,
        n: usize,
        ms: u64,
    ) -> Vec<TaskId> {
        let (task, body) = sleep_task(ms);
        let items: Vec<_> = (0..n)
            .map(|i| {
                let id = TaskId::new(format!("{prefix}-{i}")).expect("id");
                (task.clone(), body.clone(), EnqueueOptions::default().id(id))
            })
            .collect();
        let ids: Vec<String> = items
            .iter()
            .map(|(_, _, o)| o.id.clone().expect("id").to_string())
            .collect();
        let results = client.enqueue_batch(items).await;
        let mut ok = Vec::new();
        for (id, r) in ids.iter().zip(&results) {
            self.record(id, true, r);
            if let Ok(e) = r {
                ok.push(e.id.clone());
            }
        }
        ok
    }

    /// Enqueues one task, retrying under the same id (a producer that did not get its PubAck
    /// publishes again; the duplicate window makes that safe) until a PubAck arrives or
    /// `limit` passes. Every attempt is recorded. Returns whether it was acknowledged.
    pub async fn enqueue_retrying(
        &self,
        client: &Client,
        task: &TaskName,
        body: Bytes,
        id: &TaskId,
        limit: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let attempt = tokio::time::timeout(Duration::from_secs(5), async {
                client
                    .send(task, body.clone(), EnqueueOptions::default().id(id.clone()))
                    .await?
                    .acked()
                    .await
            })
            .await
            .unwrap_or_else(|_| {
                Err(NatsError::Timeout(
                    Duration::from_secs(5),
                    "enqueue attempt".into(),
                ))
            });
            self.record(id.as_str(), true, &attempt);
            if attempt.is_ok() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Records one `(now, first_seq)` sample of `stream`; errors (a leader election in
    /// progress) are ignored — the next sample will do.
    pub async fn sample(&self, js: &async_nats::jetstream::Context, stream: &str) {
        let info = async {
            let mut s = js.get_stream(stream).await.ok()?;
            s.info().await.ok().map(|i| i.state.first_sequence)
        };
        if let Ok(Some(first)) = tokio::time::timeout(Duration::from_secs(2), info).await {
            self.samples.lock().expect("lock").push((now_ms(), first));
        }
    }

    /// Samples `stream` every 200 ms until `stop` is cancelled.
    pub fn spawn_sampler(
        self: &Arc<Self>,
        js: async_nats::jetstream::Context,
        stream: &str,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        let stream = stream.to_owned();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                me.sample(&js, &stream).await;
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        })
    }

    /// Ids whose PubAck came back and that must complete.
    pub fn acked_ids(&self) -> Vec<String> {
        let map = self.enqueues.lock().expect("lock");
        let mut v: Vec<String> = map
            .iter()
            .filter(|(_, o)| o.expect_completion && o.acked > 0)
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    /// Polls the ledger until every acknowledged, expected id has a `done`, or `limit`
    /// passes; returns the time it took (or `None` on timeout — the report then shows
    /// what is lost).
    pub async fn wait_complete(&self, ledger: &Path, limit: Duration) -> Option<Duration> {
        let t0 = tokio::time::Instant::now();
        let want: HashSet<String> = self.acked_ids().into_iter().collect();
        loop {
            let done: HashSet<String> = read_ledger(ledger)
                .into_iter()
                .filter(|e| e.event == "done")
                .map(|e| e.id)
                .collect();
            if want.iter().all(|id| done.contains(id)) {
                return Some(t0.elapsed());
            }
            if t0.elapsed() >= limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Builds the report from the ledger and the samples.
    pub fn analyze(&self, ledger: &[LedgerEntry]) -> Report {
        let map = self.enqueues.lock().expect("lock").clone();
        let samples = self.samples.lock().expect("lock").clone();
        let mut done: BTreeMap<&str, Vec<&LedgerEntry>> = BTreeMap::new();
        let mut starts: BTreeMap<&str, Vec<&LedgerEntry>> = BTreeMap::new();
        for e in ledger {
            match e.event.as_str() {
                "done" => done.entry(&e.id).or_default().push(e),
                "start" => starts.entry(&e.id).or_default().push(e),
                _ => {}
            }
        }
        let mut r = Report {
            enqueue_attempts: map.values().map(|o| o.attempts as usize).sum(),
            enqueue_errors: map.values().map(|o| o.errors.len()).sum(),
            acked: map.values().filter(|o| o.acked > 0).count(),
            completed: done.len(),
            starts: ledger.iter().filter(|e| e.event == "start").count(),
            ..Report::default()
        };
        for (id, o) in &map {
            if o.expect_completion && o.acked > 0 && !done.contains_key(id.as_str()) {
                r.lost.push(id.clone());
            }
            if o.acked == 0 && !o.errors.is_empty() {
                r.unacked.push(format!("{id}: {}", o.errors[0]));
            }
        }
        for (id, d) in &done {
            if !map.contains_key(*id) {
                r.unexpected.push((*id).to_owned());
            }
            if d.len() > 1 {
                r.duplicates.push(((*id).to_owned(), d.len()));
            }
        }
        // Confirmed acks: the first sample whose first_seq is above the id's sequence.
        for (id, o) in &map {
            if o.acked == 0 || o.max_seq == 0 {
                continue;
            }
            let Some((confirmed_ms, _)) = samples.iter().find(|(_, first)| *first > o.max_seq)
            else {
                continue;
            };
            r.confirmed_acks += 1;
            for s in starts.get(id.as_str()).into_iter().flatten() {
                if s.at_ms > *confirmed_ms {
                    r.redelivered_after_ack.push(format!(
                        "{id}: attempt {} started at {} ms, ack confirmed at {confirmed_ms} ms (seq {} < first_seq)",
                        s.attempt, s.at_ms, o.max_seq
                    ));
                }
            }
        }
        // Longest stall: gaps between completions, from the first enqueue to the last
        // completion of acknowledged work.
        let first_enqueue = map.values().map(|o| o.first_ms).min().unwrap_or(0);
        let mut times: Vec<i64> = ledger
            .iter()
            .filter(|e| e.event == "done" && map.get(&e.id).is_some_and(|o| o.expect_completion))
            .map(|e| e.at_ms)
            .collect();
        times.sort_unstable();
        let mut prev = first_enqueue;
        for t in times {
            let gap = t - prev;
            if gap > r.longest_stall_ms {
                r.longest_stall_ms = gap;
                r.longest_stall_at_ms = prev;
            }
            prev = t;
        }
        r.lost.sort();
        r.unexpected.sort();
        r.duplicates.sort();
        r
    }
}

/// What a scenario saw (see the module docs for the definitions).
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Enqueue attempts (retries under the same id included).
    pub enqueue_attempts: usize,
    /// Enqueue attempts that got no PubAck.
    pub enqueue_errors: usize,
    /// Distinct ids with at least one PubAck.
    pub acked: usize,
    /// Distinct ids with at least one `done`.
    pub completed: usize,
    /// `start` lines in the ledger.
    pub starts: usize,
    /// Ids whose ack the sampler confirmed.
    pub confirmed_acks: usize,
    /// Acknowledged, expected ids never completed.
    pub lost: Vec<String>,
    /// Ids that never got a PubAck (with their first error): not lost, but reported.
    pub unacked: Vec<String>,
    /// Completed ids never enqueued.
    pub unexpected: Vec<String>,
    /// Ids with more than one `done`, with the count.
    pub duplicates: Vec<(String, usize)>,
    /// Starts after a confirmed ack.
    pub redelivered_after_ack: Vec<String>,
    /// Longest gap without a completion while work was pending, in ms.
    pub longest_stall_ms: i64,
    /// When that gap began (Unix ms).
    pub longest_stall_at_ms: i64,
    /// Per-node stream state differences (cluster scenarios).
    pub divergence: Vec<String>,
}

fn first<T: fmt::Debug>(v: &[T]) -> String {
    format!("{:?}", &v[..v.len().min(5)])
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "enqueue attempts {}, errors {}, acked ids {}, completed ids {}, starts {}, confirmed acks {}",
            self.enqueue_attempts,
            self.enqueue_errors,
            self.acked,
            self.completed,
            self.starts,
            self.confirmed_acks
        )?;
        writeln!(f, "lost: {} first {}", self.lost.len(), first(&self.lost))?;
        writeln!(
            f,
            "unexpected: {} first {}",
            self.unexpected.len(),
            first(&self.unexpected)
        )?;
        writeln!(
            f,
            "duplicate executions: {} first {}",
            self.duplicates.len(),
            first(&self.duplicates)
        )?;
        writeln!(
            f,
            "redelivered after confirmed ack: {} first {}",
            self.redelivered_after_ack.len(),
            first(&self.redelivered_after_ack)
        )?;
        writeln!(
            f,
            "unacked enqueues: {} first {}",
            self.unacked.len(),
            first(&self.unacked)
        )?;
        writeln!(
            f,
            "longest stall: {} ms (from {})",
            self.longest_stall_ms, self.longest_stall_at_ms
        )?;
        write!(
            f,
            "divergence: {} {}",
            self.divergence.len(),
            first(&self.divergence)
        )
    }
}

impl Report {
    /// Panics with the whole report unless: nothing lost, nothing unexpected, at most
    /// `max_duplicates` duplicate executions, no redelivery after a confirmed ack, the
    /// longest stall under `max_stall` and no divergence.
    pub fn assert_ok(&self, scenario: &str, max_duplicates: usize, max_stall: Duration) {
        let mut bad = Vec::new();
        if !self.lost.is_empty() {
            bad.push("lost > 0");
        }
        if !self.unexpected.is_empty() {
            bad.push("unexpected > 0");
        }
        if self.duplicates.len() > max_duplicates {
            bad.push("too many duplicate executions");
        }
        if !self.redelivered_after_ack.is_empty() {
            bad.push("redelivery after a confirmed ack");
        }
        if self.longest_stall_ms > i64::try_from(max_stall.as_millis()).unwrap_or(i64::MAX) {
            bad.push("stall above the bound");
        }
        if !self.divergence.is_empty() {
            bad.push("nodes diverge");
        }
        eprintln!("[fault] {scenario}:\n{self}");
        assert!(
            bad.is_empty(),
            "{scenario} failed ({}; duplicates allowed {max_duplicates}, stall bound {max_stall:?}):\n{self}",
            bad.join(", ")
        );
    }
}

// ---------------------------------------------------------------------------------------
// Supervisor
// ---------------------------------------------------------------------------------------

/// Restarts a worker whenever it exits (a process supervisor, as Kubernetes restarts a
/// crashed pod), and counts the exits.
pub struct Supervisor {
    stop: CancellationToken,
    exits: Arc<Mutex<Vec<String>>>,
    task: Option<tokio::task::JoinHandle<String>>,
}

impl Supervisor {
    /// Starts the worker and watches it.
    pub fn start(cmd: WorkerCmd) -> Self {
        let stop = CancellationToken::new();
        let exits = Arc::new(Mutex::new(Vec::new()));
        let (s, e) = (stop.clone(), exits.clone());
        let task = tokio::spawn(async move {
            let mut p = cmd.spawn();
            loop {
                if s.is_cancelled() {
                    p.kill9();
                    return p.log_tail(30);
                }
                if let Some(status) = p.wait_exit(Duration::from_millis(200)).await {
                    e.lock().expect("lock").push(format!(
                        "pid {} exited {status}: {}",
                        p.pid(),
                        p.log_tail(3)
                    ));
                    p = cmd.spawn();
                }
            }
        });
        Self {
            stop,
            exits,
            task: Some(task),
        }
    }

    /// Exits seen so far (one line each).
    pub fn exits(&self) -> Vec<String> {
        self.exits.lock().expect("lock").clone()
    }

    /// Stops the supervisor and its worker; returns the last worker's log tail.
    pub async fn shutdown(mut self) -> String {
        self.stop.cancel();
        match self.task.take() {
            Some(t) => t.await.unwrap_or_default(),
            None => String::new(),
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

// ---------------------------------------------------------------------------------------
// TCP proxy
// ---------------------------------------------------------------------------------------

/// What the [`Proxy`] does to bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward at once.
    Pass,
    /// Delay every chunk by this much (each direction).
    Latency(Duration),
    /// Hold every byte (in both directions) until the mode changes: the network is
    /// silent, nothing is closed — TCP would retransmit, so data arrives once it heals.
    Blackhole,
}

/// A loopback TCP proxy in front of one upstream address, for worker ↔ NATS faults.
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    resets: watch::Sender<u64>,
    stop: CancellationToken,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards to `upstream` (`127.0.0.1:PORT`).
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (mode, _) = watch::channel(ProxyMode::Pass);
        let (resets, _) = watch::channel(0u64);
        let stop = CancellationToken::new();
        let (m, r, s) = (mode.clone(), resets.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = s.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((down, _)) = accepted else { continue };
                let (m, r, s) = (m.subscribe(), r.subscribe(), s.clone());
                tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = down.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::select! {
                        () = pump(dr, uw, m.clone()) => {}
                        () = pump(ur, dw, m) => {}
                        () = wait_reset(r) => {}
                        () = s.cancelled() => {}
                    }
                    // Dropping both halves closes both connections.
                });
            }
        });
        Self {
            addr,
            mode,
            resets,
            stop,
        }
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `nats://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Changes the mode for every connection, current and future.
    pub fn set_mode(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }

    /// Closes every current connection at once (new ones are accepted).
    pub fn reset_all(&self) {
        self.resets.send_modify(|n| *n += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn wait_reset(mut r: watch::Receiver<u64>) {
    r.borrow_and_update();
    if r.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let m = *mode.borrow_and_update();
            match m {
                ProxyMode::Pass => break,
                ProxyMode::Latency(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                ProxyMode::Blackhole => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Per-node stream state
// ---------------------------------------------------------------------------------------

/// `http: "127.0.0.1:-1"` — server config text that enables monitoring on a random port
/// (see [`monitor_addr`]).
pub const MONITOR_CONFIG: &str = "http: \"127.0.0.1:-1\"";

/// The monitoring address a server logged last (`Starting http monitor on …`), if any.
pub fn monitor_addr(server: &NatsServer) -> Option<String> {
    let log = std::fs::read(server.log_path()).ok()?;
    let log = String::from_utf8_lossy(&log);
    log.lines()
        .rev()
        .find_map(|l| l.split("Starting http monitor on ").nth(1))
        .map(|rest| {
            rest.trim()
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_owned()
        })
}

/// One node's view of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStreamState {
    /// The node name.
    pub node: String,
    /// Messages stored.
    pub messages: u64,
    /// First sequence.
    pub first_seq: u64,
    /// Last sequence.
    pub last_seq: u64,
}

/// Each running node's own view of `stream` from `/jsz` (an error text per node that did
/// not answer).
pub async fn node_stream_states(
    nodes: &[NatsServer],
    stream: &str,
) -> Vec<Result<NodeStreamState, String>> {
    let mut out = Vec::new();
    for node in nodes {
        let name = node.server_name().unwrap_or("?").to_owned();
        let Some(addr) = monitor_addr(node) else {
            out.push(Err(format!("{name}: no monitoring address in its log")));
            continue;
        };
        let got = http_get(&addr, "/jsz?accounts=true&streams=true").await;
        let state = got.and_then(|(code, body)| {
            if code != 200 {
                return Err(format!("{name}: HTTP {code}"));
            }
            let v: serde_json::Value =
                serde_json::from_str(&body).map_err(|e| format!("{name}: {e}"))?;
            let streams = v["account_details"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten());
            for s in streams {
                if s["name"] == stream {
                    let n = |k: &str| s["state"][k].as_u64().unwrap_or(0);
                    return Ok(NodeStreamState {
                        node: name.clone(),
                        messages: n("messages"),
                        first_seq: n("first_seq"),
                        last_seq: n("last_seq"),
                    });
                }
            }
            Err(format!("{name}: stream {stream} not in /jsz"))
        });
        out.push(state);
    }
    out
}

/// Differences between the nodes' views of `stream` (empty when all agree).
pub async fn divergence(nodes: &[NatsServer], stream: &str) -> Vec<String> {
    let states = node_stream_states(nodes, stream).await;
    let mut diffs = Vec::new();
    let mut seen: Option<&NodeStreamState> = None;
    for s in &states {
        match s {
            Err(e) => diffs.push(e.clone()),
            Ok(s) => match seen {
                None => seen = Some(s),
                Some(a) if (a.messages, a.last_seq) != (s.messages, s.last_seq) => {
                    diffs.push(format!("{a:?} vs {s:?}"));
                }
                Some(_) => {}
            },
        }
    }
    diffs
}

/// The resident set size of a process in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The leader of `stream` as the stream info reports it (a node name such as `n2`).
pub async fn stream_leader(js: &async_nats::jetstream::Context, stream: &str) -> Option<String> {
    let mut s = js.get_stream(stream).await.ok()?;
    let info = s.info().await.ok()?;
    info.cluster.clone().and_then(|c| c.leader)
}
