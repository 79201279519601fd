//! The scheduler loop: every replica watches the schedules and competes for the lease; the
//! leader fires each due slot, waits for its PubAck, then advances the schedule's cursor.
//!
//! # How a fire happens
//!
//! Next fires live in a min-heap ordered by due time (one entry per schedule, plus
//! catch-up and retry entries), so a wake-up costs `O(log n)` per due fire and nothing per
//! idle schedule: 10 000 schedules are as cheap as 10 between their slots. The loop sleeps
//! until the earliest due time on the monotonic clock, capped at [`SchedulerOptions::tick`]
//! so a wall-clock step is noticed quickly, and reads wall time from the injected
//! [`Clock`].
//!
//! For each due slot the leader checks its lease trust window (see [`crate::lease`]),
//! publishes the fire with `Nats-Msg-Id = <schedule>@<slot>` (so a second leader in
//! overlap produces no second task), `Task-Id = <schedule>_<slot>`, `Task-Schedule` and
//! `Task-Fire-Time`, without waiting: PubAcks are pipelined. When a PubAck arrives the slot
//! counts as fired and the cursor (the last fired slot, key = schedule name in
//! `TASKMESH_SCHEDULER`) advances by compare-and-set — never past a slot whose publish has
//! not been acknowledged yet, and never backwards (see [`crate::cursor`]). A failed publish
//! is retried with the same ids (so a publish that did land is not doubled) until it
//! succeeds or is `max_fire_lag` late.
//!
//! # Publishing ahead of the slot
//!
//! A schedule's next regular fire is due `scheduler.publish_ahead` (default 700 ms)
//! *before* its slot. A fire published before its slot (by the injected clock) goes out with
//! `run_at = slot`: [`Client::send`] stores it on `delayed.<category>.<task id>` with
//! `Nats-Schedule: @at <slot>` and `Nats-Schedule-Target: tasks.<category>.<name>`, same
//! body, same ids and headers, and the server moves it onto the task subject at the slot
//! (dropping the schedule message and its `Nats-Msg-Id`). So the leader's burst of
//! publishes for schedules due in the same second, its PubAcks and its own stalls happen
//! before the slot, and what remains at the slot is the server's release. A fire whose
//! slot has come (catch-up, a retry after the slot, a leader that started or fell behind
//! late, `publish_ahead = 0`) is published on the task subject as before, and so is one
//! whose slot is less than 300 ms away (it waits for its slot): the server would release
//! that message schedule late. The default is not a whole second because every slot is
//! one: publishing the next slot's fires at the instant the server releases the current
//! slot's makes both slower (10 000 `every = "1s"` schedules: p99 lag 295–519 ms with 1 s,
//! 127–204 ms with 700 ms; 1 000: 42–70 ms and 15–25 ms).
//!
//! What it changes, and what it does not:
//!
//! - De-duplication happens on the message schedule: two leaders in overlap publish the
//!   same `Nats-Msg-Id` within the stream's duplicate window, and the second copy is
//!   dropped whether it is a message schedule or (after the slot) a direct publish.
//! - The lease is checked when a fire is published (up to `publish_ahead` before its slot),
//!   and the cursor advances after the message schedule's PubAck: a cursor may name a slot
//!   up to `publish_ahead` in the future. That fire is *committed*: the server releases it
//!   even if the leader dies, or the dynamic schedule is paused, changed or removed, in the
//!   meantime; it runs exactly once, with the arguments it was published with. A new
//!   leader continues after `max(now, cursor)`, so it neither repeats nor misses it.
//! - Lag (metrics, `max_fire_lag`) is measured against the slot; a fire acknowledged before
//!   its slot counts as lag 0.
//! - The manual clock of a test drives *when* fires are published, but the server releases
//!   a message schedule on its own wall clock: tests whose clock is not the real one set
//!   `publish_ahead = 0`.
//!
//! # Taking over
//!
//! When a replica starts trusting its lease it reads every cursor and, per enabled
//! schedule, fires [`Schedule::missed_slots`]`(cursor, now)` at once (`catch_up`: `none`,
//! `latest` or `all` up to `max_catch_up`), then continues with the first slot after
//! `max(now, cursor)`. A schedule with no cursor (new) starts with its next slot.
//!
//! # Dynamic schedules
//!
//! Every replica (leader or not) watches `TASKMESH_SCHEDULES`: an added or resumed schedule
//! starts with its next slot, a changed one continues after the last slot fired, a paused
//! or removed one stops at once — except for a fire already committed ahead of its slot
//! (above), which the server still releases. An invalid one is logged and skipped; a
//! dynamic schedule that has a static schedule's name is ignored (static wins).

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use taskmesh_nats::{Client, Connection, EnqueueOptions, Enqueued};
use taskmesh_shared::clock::SystemClock;
use taskmesh_shared::config::SchedulerConfig;
use taskmesh_shared::schedule::{ScheduleDef, default_schedules};
use taskmesh_shared::wire::{self, headers};
use taskmesh_shared::{Clock, Config, TaskId};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use crate::cursor::{CursorEntry, Cursors, format_slot};
use crate::dynamic::{DynamicEvent, DynamicSchedules};
use crate::error::SchedulerError;
use crate::lease::{KvLeaseStore, Leadership, Lease, LeaseConfig};
use crate::metrics::SchedulerMetrics;
use crate::spec::Schedule;

/// Missed slots are counted (for `missed`) up to this many per schedule and takeover.
const MISSED_COUNT_CAP: usize = 1000;
/// Longest wait for the NATS client to take a message.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the cursor scan at takeover.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry delay after a failed cursor scan or cursor write.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// A new leader waits this long at most for the dynamic schedules to load before it fires
/// the others (so a cold start catches dynamic schedules up too).
const DYNAMIC_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest `scheduler.publish_ahead`: far inside the stream's duplicate window (10 min
/// by default), and a bound on how long a committed fire outlives a pause.
const MAX_PUBLISH_AHEAD: Duration = Duration::from_secs(60);
/// The least lead a fire is published ahead with. nats-server arms its message-schedule
/// timer no sooner than 250 ms ahead (so as not to slow down ingest), so a message schedule
/// stored less than 250 ms before its time on an otherwise idle stream is released up to
/// 250 ms late (measured with 2.15.1: `@at` 100 ms ahead → released 151 ms late). A fire
/// whose slot is closer than this waits and is published on the task subject at its slot.
const MIN_SCHEDULE_LEAD: Duration = Duration::from_millis(300);

/// How a scheduler replica runs. [`SchedulerOptions::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// This replica's id, written into the lease value as `holder`. Unique per replica;
    /// if unsure, [`default_replica_id`].
    pub id: String,
    /// The wall clock slots are computed and compared on. [`SystemClock`] in production;
    /// tests inject a manual one.
    pub clock: Arc<dyn Clock>,
    /// The longest the loop sleeps before it looks at the wall clock again (so a clock
    /// step is noticed): 250 ms.
    pub tick: Duration,
    /// How long shutdown waits for outstanding PubAcks and cursor writes before resigning
    /// the lease: 5 s.
    pub drain_timeout: Duration,
}

impl SchedulerOptions {
    /// Defaults with replica id `id`.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            clock: Arc::new(SystemClock),
            tick: Duration::from_millis(250),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// `<hostname>-<pid>`: unique per process on a host, and per pod in Kubernetes (where the
/// host name is the pod name).
pub fn default_replica_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "scheduler".to_owned());
    format!("{}-{}", host.trim(), std::process::id())
}

/// The static schedules of `cfg`, compiled: `[[schedules]]`, plus the default set when
/// `scheduler.default_schedules` is on. A `[[schedules]]` entry with a default schedule's
/// name replaces that default (for example to disable it with `enabled = false`).
///
/// Refuses the first invalid schedule (its name and the reason are in the error), a name
/// used twice in `[[schedules]]`, and a schedule whose category is not configured.
pub fn static_schedules(cfg: &Config) -> Result<Vec<Schedule>, SchedulerError> {
    let mut defs: Vec<ScheduleDef> = Vec::new();
    let mut seen = HashSet::new();
    for def in &cfg.schedules {
        if !seen.insert(def.name.clone()) {
            return Err(SchedulerError::DuplicateName(def.name.clone()));
        }
        defs.push(def.clone());
    }
    if cfg.scheduler.default_schedules {
        defs.extend(
            default_schedules()
                .into_iter()
                .filter(|d| !seen.contains(&d.name)),
        );
    }
    let mut out = Vec::with_capacity(defs.len());
    for def in &defs {
        let schedule = Schedule::compile(def)?;
        let category = schedule.task().category();
        if cfg.category(&category).is_err() {
            return Err(SchedulerError::Config(format!(
                "schedule {:?} targets task {}, but category {category} is not configured: add [categories.{category}]{}",
                def.name,
                schedule.task(),
                if cfg.schedules.iter().any(|d| d.name == def.name) {
                    ", or remove the schedule"
                } else {
                    ", or set scheduler.default_schedules = false"
                }
            )));
        }
        out.push(schedule);
    }
    Ok(out)
}

/// A scheduler replica. See the [module docs](self).
pub struct Scheduler {
    conn: Connection,
    cfg: Config,
    statics: Vec<Arc<Schedule>>,
    opts: SchedulerOptions,
    metrics: Arc<SchedulerMetrics>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("id", &self.opts.id)
            .field("statics", &self.statics.len())
            .finish()
    }
}

impl Scheduler {
    /// Validates the configuration and compiles the static schedules (no I/O). Refuses
    /// an invalid schedule with its name and the reason.
    pub fn new(
        conn: Connection,
        cfg: &Config,
        opts: SchedulerOptions,
    ) -> Result<Self, SchedulerError> {
        let s = &cfg.scheduler;
        if s.lease_ttl < Duration::from_secs(1) {
            return Err(SchedulerError::Config(format!(
                "scheduler.lease_ttl must be at least 1s, got {:?}",
                s.lease_ttl
            )));
        }
        if s.max_fire_lag < Duration::from_secs(1) {
            return Err(SchedulerError::Config(format!(
                "scheduler.max_fire_lag must be at least 1s, got {:?}",
                s.max_fire_lag
            )));
        }
        if s.publish_ahead > MAX_PUBLISH_AHEAD
            || (!s.publish_ahead.is_zero() && s.publish_ahead < MIN_SCHEDULE_LEAD)
        {
            return Err(SchedulerError::Config(format!(
                "scheduler.publish_ahead must be 0s (publish at the slot) or {MIN_SCHEDULE_LEAD:?} to {MAX_PUBLISH_AHEAD:?}, got {:?}",
                s.publish_ahead
            )));
        }
        if opts.id.is_empty() {
            return Err(SchedulerError::Config("the replica id is empty".into()));
        }
        let statics = static_schedules(cfg)?.into_iter().map(Arc::new).collect();
        Ok(Self {
            conn,
            cfg: cfg.clone(),
            statics,
            opts,
            metrics: Arc::new(SchedulerMetrics::default()),
        })
    }

    /// The counters (shared; they keep updating while the scheduler runs).
    pub fn metrics(&self) -> Arc<SchedulerMetrics> {
        self.metrics.clone()
    }

    /// The compiled static schedules.
    pub fn static_schedules(&self) -> &[Arc<Schedule>] {
        &self.statics
    }

    /// Runs until `shutdown`: then stops firing, waits for outstanding PubAcks and cursor
    /// writes (bounded), resigns the lease and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), SchedulerError> {
        let js = &self.conn.js;
        let leases = taskmesh_nats::topology::bucket(js, wire::LEASES_BUCKET).await?;
        let ttl = leases
            .status()
            .await
            .map_err(|e| SchedulerError::kv("reading the lease bucket", e))?
            .max_age();
        if ttl.is_zero() {
            return Err(SchedulerError::Config(format!(
                "bucket {} has no max age, so a dead leader's lease would never expire: run `taskmesh provision`",
                wire::LEASES_BUCKET
            )));
        }
        if ttl != self.cfg.scheduler.lease_ttl {
            tracing::warn!(
                bucket_max_age = ?ttl,
                lease_ttl = ?self.cfg.scheduler.lease_ttl,
                "the lease bucket's max age differs from scheduler.lease_ttl; using the bucket's (run `taskmesh provision` to apply the config)"
            );
        }
        let cursors = Cursors::open(js).await?;
        let dynamic = DynamicSchedules::open(js).await?;
        let client = Client::new(self.conn.clone(), &self.cfg).await?;

        let stop_watch = CancellationToken::new();
        let (dyn_tx, mut dyn_rx) = mpsc::channel(1024);
        let watcher = tokio::spawn(dynamic.watch(dyn_tx, stop_watch.clone()));

        let lease_cfg = LeaseConfig::new(self.opts.id.clone(), ttl);
        tracing::info!(
            id = %self.opts.id,
            ttl = ?ttl,
            renew_every = ?lease_cfg.renew_every,
            trust = ?lease_cfg.trust(),
            publish_ahead = ?self.cfg.scheduler.publish_ahead,
            static_schedules = self.statics.len(),
            "scheduler started; competing for the lease"
        );
        let lease = Lease::start(KvLeaseStore(leases), lease_cfg, self.opts.clock.clone());
        let mut lease_rx = lease.subscribe();

        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let mut core = Core::new(
            client,
            done_tx,
            cursors,
            &self.statics,
            self.opts.clone(),
            &self.cfg.scheduler,
            self.metrics.clone(),
        );
        let mut dyn_open = true;
        let started = Instant::now();
        let result = loop {
            let leadership = *lease_rx.borrow_and_update();
            let trusted = leadership.is_trusted();
            if trusted && !core.active {
                if !core.dynamic_ready && started.elapsed() >= DYNAMIC_READY_TIMEOUT {
                    tracing::warn!(
                        timeout = ?DYNAMIC_READY_TIMEOUT,
                        "dynamic schedules not loaded yet; firing the others"
                    );
                    core.dynamic_ready = true;
                }
                if core.dynamic_ready && core.retry_activation.is_none_or(|at| Instant::now() >= at)
                {
                    core.activate().await;
                }
            } else if !trusted && core.active {
                core.deactivate(match leadership {
                    Leadership::Follower => "another replica holds the lease",
                    Leadership::Leader { .. } => "the lease trust window ran out",
                });
            }
            let wake = core.next_wake(leadership);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break Ok(()),
                changed = lease_rx.changed() => {
                    if changed.is_err() {
                        break Err(SchedulerError::Internal("the lease task ended unexpectedly".into()));
                    }
                }
                () = sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                    core.fire_due(&lease_rx).await;
                }
                event = dyn_rx.recv(), if dyn_open => match event {
                    Some(event) => core.apply(event),
                    None => dyn_open = false,
                },
                Some(done) = done_rx.recv() => core.on_done(done),
            }
        };
        core.drain(&mut done_rx).await;
        stop_watch.cancel();
        let _ = watcher.await;
        lease.resign().await;
        let (fires, duplicates, missed, caught_up, errors) = self.metrics.totals();
        tracing::info!(
            id = %self.opts.id,
            fires,
            duplicates,
            missed,
            caught_up,
            publish_errors = errors,
            "scheduler stopped"
        );
        result
    }
}

/// Why a heap entry exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// The schedule's next slot; firing it schedules the one after.
    Regular,
    /// A missed slot fired late (takeover, or a leader that fell behind).
    CatchUp,
    /// A publish that failed, with the attempt number of the next try.
    Retry(u32),
}

/// A heap entry: fire `slot` of `name` at `at`, if the schedule is still generation `gen`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Due {
    at: DateTime<Utc>,
    slot: DateTime<Utc>,
    name: Arc<str>,
    generation: u64,
    kind: Kind,
}

/// A schedule the loop knows.
#[derive(Debug)]
struct Entry {
    schedule: Arc<Schedule>,
    body: Bytes,
    generation: u64,
    dynamic: bool,
}

/// Per-schedule firing and cursor state.
#[derive(Debug, Default)]
struct Progress {
    /// The stored cursor as last seen.
    known: Option<CursorEntry>,
    /// A cursor write is in flight.
    writing: bool,
    /// The slot the cursor should move to next.
    want: Option<DateTime<Utc>>,
    /// Published in this leadership epoch, PubAck not yet received.
    pending: BTreeSet<DateTime<Utc>>,
    /// Acknowledged in this epoch but above a pending slot (the cursor waits for it).
    acked: BTreeSet<DateTime<Utc>>,
    /// The highest slot this replica published.
    last_fired: Option<DateTime<Utc>>,
}

/// A PubAck (or its failure).
struct AckDone {
    epoch: u64,
    name: Arc<str>,
    slot: DateTime<Utc>,
    kind: Kind,
    /// Published before its slot, as a message schedule the server releases at the slot.
    ahead: bool,
    /// When the PubAck arrived (wall clock).
    acked_at: DateTime<Utc>,
    result: Result<Enqueued, String>,
}

/// A spawned operation's report.
enum Done {
    Ack(AckDone),
    Write(WriteDone),
}

/// A finished cursor write.
struct WriteDone {
    name: Arc<str>,
    result: Result<CursorEntry, String>,
}

/// The loop's state (one task; no locks).
struct Core {
    client: Client,
    cursors: Cursors,
    opts: SchedulerOptions,
    max_fire_lag: TimeDelta,
    /// A regular fire is due this long before its slot (`scheduler.publish_ahead`).
    publish_ahead: TimeDelta,
    metrics: Arc<SchedulerMetrics>,
    static_names: HashSet<Arc<str>>,
    entries: HashMap<Arc<str>, Entry>,
    progress: HashMap<Arc<str>, Progress>,
    heap: BinaryHeap<Reverse<Due>>,
    /// PubAck waits and cursor writes run as their own tasks (so PubAcks are collected,
    /// and the client's in-flight ack permits released, even while the loop is busy
    /// publishing a burst) and report here.
    done_tx: mpsc::UnboundedSender<Done>,
    /// Spawned PubAck waits and cursor writes not yet reported.
    in_flight: usize,
    next_generation: u64,
    /// Counts leadership periods; acks from an earlier one do not touch `pending`.
    epoch: u64,
    active: bool,
    retry_activation: Option<Instant>,
    /// The dynamic schedules stored at start have been loaded.
    dynamic_ready: bool,
}

/// Whether a fire of `slot` published at `now` would be a message schedule due in less
/// than [`MIN_SCHEDULE_LEAD`].
fn too_close_for_a_schedule(slot: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    slot > now
        && (slot - now)
            .to_std()
            .is_ok_and(|lead| lead < MIN_SCHEDULE_LEAD)
}

/// When a regular fire of `slot` is due: `publish_ahead` before it.
fn due_at(slot: DateTime<Utc>, publish_ahead: TimeDelta) -> DateTime<Utc> {
    slot.checked_sub_signed(publish_ahead).unwrap_or(slot)
}

fn body_of(schedule: &Schedule) -> Bytes {
    Bytes::from(serde_json::to_vec(schedule.args()).unwrap_or_else(|_| b"{}".to_vec()))
}

impl Core {
    fn new(
        client: Client,
        done_tx: mpsc::UnboundedSender<Done>,
        cursors: Cursors,
        statics: &[Arc<Schedule>],
        opts: SchedulerOptions,
        cfg: &SchedulerConfig,
        metrics: Arc<SchedulerMetrics>,
    ) -> Self {
        let mut core = Core {
            client,
            cursors,
            opts,
            max_fire_lag: TimeDelta::from_std(cfg.max_fire_lag).unwrap_or(TimeDelta::MAX),
            publish_ahead: TimeDelta::from_std(cfg.publish_ahead).unwrap_or(TimeDelta::zero()),
            metrics,
            static_names: HashSet::new(),
            entries: HashMap::new(),
            progress: HashMap::new(),
            heap: BinaryHeap::new(),
            done_tx,
            in_flight: 0,
            next_generation: 0,
            epoch: 0,
            active: false,
            retry_activation: None,
            dynamic_ready: false,
        };
        for s in statics {
            let name: Arc<str> = Arc::from(s.name());
            core.static_names.insert(name.clone());
            let generation = core.bump();
            core.entries.insert(
                name,
                Entry {
                    body: body_of(s),
                    schedule: s.clone(),
                    generation,
                    dynamic: false,
                },
            );
        }
        core.metrics.set_known(core.entries.len());
        core
    }

    fn bump(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    fn now(&self) -> DateTime<Utc> {
        self.opts.clock.now()
    }

    /// When the loop must wake up next (besides events).
    fn next_wake(&self, leadership: Leadership) -> Option<Instant> {
        let tick = Instant::now() + self.opts.tick;
        if self.active {
            let due = self.heap.peek().map(|Reverse(d)| {
                let wait = (d.at - self.now()).to_std().unwrap_or(Duration::ZERO);
                Instant::now() + wait
            });
            let mut wake = due.map_or(tick, |d| d.min(tick));
            if let Some(until) = leadership.trusted_until() {
                wake = wake.min(until);
            }
            Some(wake)
        } else if leadership.is_trusted() {
            // Waiting to retry the takeover.
            Some(self.retry_activation.unwrap_or(tick))
        } else {
            None
        }
    }

    /// Starts firing: reads the cursors and plans catch-up and next slots.
    async fn activate(&mut self) {
        let loaded = match timeout(LOAD_TIMEOUT, self.cursors.load_all()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read schedule cursors; not firing yet, retrying");
                self.retry_activation = Some(Instant::now() + RETRY_DELAY);
                return;
            }
            Err(_) => {
                tracing::warn!(timeout = ?LOAD_TIMEOUT, "reading schedule cursors timed out; not firing yet, retrying");
                self.retry_activation = Some(Instant::now() + RETRY_DELAY);
                return;
            }
        };
        self.retry_activation = None;
        self.epoch += 1;
        self.active = true;
        self.heap.clear();
        let now = self.now();
        for p in self.progress.values_mut() {
            p.pending.clear();
            p.acked.clear();
            p.want = None;
        }
        let names: Vec<Arc<str>> = self.entries.keys().cloned().collect();
        let mut catch_up = 0;
        for name in names {
            let known = loaded.get(&*name).copied();
            let p = self.progress.entry(name.clone()).or_default();
            if let Some(k) = known
                && p.known.is_none_or(|old| k.revision >= old.revision)
            {
                p.known = Some(k);
            }
            let cursor = p.known.and_then(|k| k.slot);
            catch_up += self.plan_takeover(&name, cursor, now);
        }
        self.metrics.set_leader(true);
        tracing::info!(
            id = %self.opts.id,
            now = %now.to_rfc3339_opts(SecondsFormat::Millis, true),
            schedules = self.entries.len(),
            catch_up_fires = catch_up,
            "became leader; firing schedules"
        );
    }

    /// Plans one schedule at takeover; returns the number of catch-up fires.
    fn plan_takeover(
        &mut self,
        name: &Arc<str>,
        cursor: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> usize {
        let Some(entry) = self.entries.get(name) else {
            return 0;
        };
        if !entry.schedule.enabled() {
            return 0;
        }
        let (schedule, generation) = (entry.schedule.clone(), entry.generation);
        let missed = schedule.missed_slots(cursor, now);
        if let Some(c) = cursor {
            let total = schedule.slots_between(c, now, MISSED_COUNT_CAP).len();
            let skipped = total.saturating_sub(missed.len()) as u64;
            if skipped > 0 {
                self.metrics.with(name, |m| m.missed += skipped);
                tracing::info!(
                    schedule = %name,
                    skipped,
                    catch_up = ?schedule.catch_up(),
                    "skipping missed slots"
                );
            }
        }
        let n = missed.len();
        for slot in missed {
            self.heap.push(Reverse(Due {
                at: now,
                slot,
                name: name.clone(),
                generation,
                kind: Kind::CatchUp,
            }));
        }
        let from = cursor.map_or(now, |c| c.max(now));
        self.push_regular(name, &schedule, generation, from);
        n
    }

    fn push_regular(
        &mut self,
        name: &Arc<str>,
        schedule: &Schedule,
        generation: u64,
        after: DateTime<Utc>,
    ) {
        if let Some(slot) = schedule.next_fire(after) {
            self.heap.push(Reverse(Due {
                at: due_at(slot, self.publish_ahead),
                slot,
                name: name.clone(),
                generation,
                kind: Kind::Regular,
            }));
        }
    }

    fn deactivate(&mut self, reason: &str) {
        if !self.active {
            return;
        }
        self.active = false;
        self.heap.clear();
        self.metrics.set_leader(false);
        tracing::info!(id = %self.opts.id, reason, "stopped firing");
    }

    /// Fires every due heap entry, checking the lease before each one.
    async fn fire_due(&mut self, lease: &watch::Receiver<Leadership>) {
        if !self.active {
            return;
        }
        let now = self.now();
        let started = Instant::now();
        let mut fired = 0usize;
        while self.heap.peek().is_some_and(|Reverse(d)| d.at <= now) {
            if !lease.borrow().is_trusted() {
                // The loop deactivates on its next turn with the right reason.
                break;
            }
            let Some(Reverse(due)) = self.heap.pop() else {
                break;
            };
            self.fire_one(due, now).await;
            fired += 1;
        }
        if fired > 0 {
            tracing::debug!(fired, took = ?started.elapsed(), "fired due slots");
        }
    }

    async fn fire_one(&mut self, due: Due, now: DateTime<Utc>) {
        let current = self
            .entries
            .get(&due.name)
            .filter(|e| e.generation == due.generation && e.schedule.enabled())
            .map(|e| (e.schedule.clone(), e.body.clone()));
        let Some((schedule, body)) = current else {
            if let Some(p) = self.progress.get_mut(&due.name) {
                p.pending.remove(&due.slot);
            }
            return;
        };
        if too_close_for_a_schedule(due.slot, self.now()) {
            // The server would release a message schedule this close to its slot late:
            // publish it on the task subject at the slot instead.
            self.heap.push(Reverse(Due {
                at: due.slot,
                ..due
            }));
            return;
        }
        match due.kind {
            Kind::Regular => {
                let lag = now - due.slot;
                let next_after = if lag > self.max_fire_lag {
                    // Fell behind (a clock step, a stall): apply catch-up, as a new
                    // leader would, from just before this slot.
                    let cursor = due.slot - TimeDelta::seconds(1);
                    let missed = schedule.missed_slots(Some(cursor), now);
                    let total = schedule.slots_between(cursor, now, MISSED_COUNT_CAP).len();
                    let skipped = total.saturating_sub(missed.len()) as u64;
                    self.metrics.with(&due.name, |m| m.missed += skipped);
                    tracing::warn!(
                        schedule = %due.name,
                        slot = %format_slot(due.slot),
                        lag_ms = lag.num_milliseconds(),
                        skipped,
                        "fell behind by more than max_fire_lag; applying catch_up"
                    );
                    for slot in missed {
                        self.publish(&due.name, &schedule, &body, slot, Kind::CatchUp, 0)
                            .await;
                    }
                    now
                } else {
                    self.publish(&due.name, &schedule, &body, due.slot, Kind::Regular, 0)
                        .await;
                    due.slot
                };
                self.push_regular(&due.name, &schedule, due.generation, next_after);
            }
            Kind::CatchUp => {
                self.publish(&due.name, &schedule, &body, due.slot, Kind::CatchUp, 0)
                    .await;
            }
            Kind::Retry(attempt) => {
                self.publish(&due.name, &schedule, &body, due.slot, due.kind, attempt)
                    .await;
            }
        }
    }

    /// Publishes one fire without waiting for its PubAck: on the task subject when its slot
    /// has come, else as a message schedule that the server releases at the slot.
    async fn publish(
        &mut self,
        name: &Arc<str>,
        schedule: &Schedule,
        body: &Bytes,
        slot: DateTime<Utc>,
        kind: Kind,
        attempt: u32,
    ) {
        let p = self.progress.entry(name.clone()).or_default();
        p.pending.insert(slot);
        p.last_fired = p.last_fired.max(Some(slot));
        // Before its slot (a regular fire inside `publish_ahead`, or the retry of one) a fire
        // goes out as a message schedule `@at <slot>`, so it is never stored on the task
        // subject early. Same ids either way: the stream's duplicate window covers the
        // message schedule, so an overlapping leader's copy of it, or a later direct
        // publish of the same slot, is dropped.
        let ahead = slot > self.now();
        let opts = EnqueueOptions {
            id: TaskId::new(schedule.fire_task_id(slot)).ok(),
            msg_id: Some(schedule.fire_id(slot)),
            headers: vec![
                (headers::TASK_SCHEDULE.to_owned(), name.to_string()),
                (headers::TASK_FIRE_TIME.to_owned(), format_slot(slot)),
            ],
            run_at: ahead.then_some(slot),
            ..Default::default()
        };
        let sent = timeout(
            SEND_TIMEOUT,
            self.client.send(schedule.task(), body.clone(), opts),
        )
        .await;
        match sent {
            Ok(Ok(pending)) => {
                let (epoch, name, tx) = (self.epoch, name.clone(), self.done_tx.clone());
                let clock = self.opts.clock.clone();
                self.in_flight += 1;
                tokio::spawn(async move {
                    let result = pending.acked().await.map_err(|e| e.to_string());
                    let _ = tx.send(Done::Ack(AckDone {
                        epoch,
                        name,
                        slot,
                        kind,
                        ahead,
                        acked_at: clock.now(),
                        result,
                    }));
                });
            }
            Ok(Err(e)) => self.publish_failed(name, slot, attempt, &e.to_string()),
            Err(_) => self.publish_failed(
                name,
                slot,
                attempt,
                "timed out handing the message to the NATS client",
            ),
        }
    }

    fn publish_failed(&mut self, name: &Arc<str>, slot: DateTime<Utc>, attempt: u32, error: &str) {
        self.metrics.with(name, |m| m.publish_errors += 1);
        let now = self.now();
        let generation = self.entries.get(name).map(|e| e.generation);
        match generation {
            // The schedule was removed meanwhile: nothing to retry.
            None => {
                if let Some(p) = self.progress.get_mut(name) {
                    p.pending.remove(&slot);
                }
            }
            Some(generation) if self.active && now - slot <= self.max_fire_lag => {
                let delay = Duration::from_millis(100 * 2u64.pow(attempt.min(6)))
                    .min(Duration::from_secs(5));
                tracing::warn!(
                    schedule = %name,
                    slot = %format_slot(slot),
                    attempt = attempt + 1,
                    retry_in = ?delay,
                    error,
                    "publishing a fire failed; retrying with the same id"
                );
                self.heap.push(Reverse(Due {
                    at: now + TimeDelta::from_std(delay).unwrap_or(TimeDelta::MAX),
                    slot,
                    name: name.clone(),
                    generation,
                    kind: Kind::Retry(attempt + 1),
                }));
            }
            Some(_) if self.active => {
                tracing::error!(
                    schedule = %name,
                    slot = %format_slot(slot),
                    error,
                    "giving up on a fire: it is more than max_fire_lag late"
                );
                self.metrics.with(name, |m| m.missed += 1);
                if let Some(p) = self.progress.get_mut(name) {
                    p.pending.remove(&slot);
                }
                self.advance_cursor(name);
            }
            // Not leading: the slot stays pending (the cursor will not pass it); the next
            // leader fires it from the cursor.
            Some(_) => tracing::warn!(
                schedule = %name,
                slot = %format_slot(slot),
                error,
                "publishing a fire failed; not leading any more, leaving it to the next leader"
            ),
        }
    }

    fn on_done(&mut self, done: Done) {
        self.in_flight = self.in_flight.saturating_sub(1);
        match done {
            Done::Ack(a) => self.on_ack(a),
            Done::Write(w) => self.on_write(w),
        }
    }

    fn on_ack(&mut self, done: AckDone) {
        match done.result {
            Ok(ack) => {
                // A fire published ahead is acknowledged before its slot: lag 0 (the
                // server releases it at the slot).
                let lag = (done.acked_at - done.slot)
                    .to_std()
                    .unwrap_or(Duration::ZERO);
                self.metrics.with(&done.name, |m| {
                    if ack.duplicate {
                        m.duplicates += 1;
                    } else {
                        m.fires += 1;
                        if done.kind == Kind::CatchUp {
                            m.caught_up += 1;
                        }
                    }
                    m.last_lag = Some(lag);
                    m.last_slot = m.last_slot.max(Some(done.slot));
                });
                if ack.duplicate {
                    tracing::info!(
                        schedule = %done.name,
                        slot = %format_slot(done.slot),
                        "slot was already fired; the stream dropped the duplicate"
                    );
                } else {
                    tracing::debug!(
                        schedule = %done.name,
                        slot = %format_slot(done.slot),
                        lag_ms = lag.as_millis() as u64,
                        ahead = done.ahead,
                        sequence = ack.sequence,
                        "fired"
                    );
                }
                if done.epoch != self.epoch {
                    return;
                }
                if let Some(p) = self.progress.get_mut(&done.name) {
                    p.pending.remove(&done.slot);
                    p.acked.insert(done.slot);
                }
                self.advance_cursor(&done.name);
            }
            Err(e) => {
                if done.epoch == self.epoch {
                    let attempt = match done.kind {
                        Kind::Retry(n) => n,
                        _ => 0,
                    };
                    self.publish_failed(&done.name, done.slot, attempt, &e);
                } else {
                    self.metrics.with(&done.name, |m| m.publish_errors += 1);
                }
            }
        }
    }

    /// Moves the wanted cursor to the newest acknowledged slot below every pending one.
    fn advance_cursor(&mut self, name: &Arc<str>) {
        let Some(p) = self.progress.get_mut(name) else {
            return;
        };
        let floor = p.pending.first().copied();
        let mut target = None;
        while let Some(&slot) = p.acked.first() {
            if floor.is_some_and(|f| slot >= f) {
                break;
            }
            p.acked.pop_first();
            target = Some(slot);
        }
        if let Some(t) = target
            && p.want.is_none_or(|w| t > w)
        {
            p.want = Some(t);
        }
        self.maybe_write(name);
    }

    fn maybe_write(&mut self, name: &Arc<str>) {
        let Some(p) = self.progress.get_mut(name) else {
            return;
        };
        if p.writing {
            return;
        }
        let Some(want) = p.want else {
            return;
        };
        if p.known.and_then(|k| k.slot).is_some_and(|s| s >= want) {
            p.want = None;
            return;
        }
        p.writing = true;
        let (cursors, known, name) = (self.cursors.clone(), p.known, name.clone());
        let tx = self.done_tx.clone();
        self.in_flight += 1;
        tokio::spawn(async move {
            let result = cursors
                .advance(&name, want, known)
                .await
                .map_err(|e| e.to_string());
            if result.is_err() {
                // Pace the retry that on_write starts.
                sleep(RETRY_DELAY).await;
            }
            let _ = tx.send(Done::Write(WriteDone { name, result }));
        });
    }

    fn on_write(&mut self, done: WriteDone) {
        let Some(p) = self.progress.get_mut(&done.name) else {
            return;
        };
        p.writing = false;
        match done.result {
            Ok(entry) => {
                if p.known.is_none_or(|k| entry.revision >= k.revision) {
                    p.known = Some(entry);
                }
            }
            Err(e) => {
                p.known = None;
                tracing::warn!(schedule = %done.name, error = %e, "cannot advance the schedule cursor; retrying");
            }
        }
        self.maybe_write(&done.name);
    }

    /// Applies a dynamic schedule change.
    fn apply(&mut self, event: DynamicEvent) {
        match event {
            DynamicEvent::Put(stored) => {
                let name: Arc<str> = Arc::from(stored.name.as_str());
                if self.static_names.contains(&name) {
                    tracing::warn!(schedule = %name, "dynamic schedule ignored: a static schedule has this name");
                    return;
                }
                match stored.def.map(|def| Schedule::compile(&def)) {
                    Ok(Ok(schedule)) => self.upsert(name, Arc::new(schedule)),
                    Ok(Err(e)) => self.invalid(&name, &e.to_string()),
                    Err(reason) => self.invalid(&name, &reason),
                }
            }
            DynamicEvent::Ready => {
                self.dynamic_ready = true;
                tracing::debug!(schedules = self.entries.len(), "dynamic schedules loaded");
            }
            DynamicEvent::Delete(name) => {
                let name: Arc<str> = Arc::from(name.as_str());
                if self.entries.get(&name).is_some_and(|e| e.dynamic) {
                    self.entries.remove(&name);
                    self.progress.remove(&name);
                    self.metrics.forget(&name);
                    self.metrics.set_known(self.entries.len());
                    tracing::info!(schedule = %name, "dynamic schedule removed");
                }
            }
        }
    }

    fn invalid(&mut self, name: &Arc<str>, reason: &str) {
        self.metrics.invalid_dynamic();
        tracing::warn!(schedule = %name, reason, "invalid dynamic schedule skipped");
        if self.entries.get(name).is_some_and(|e| e.dynamic) {
            self.entries.remove(name);
            self.metrics.set_known(self.entries.len());
        }
    }

    fn upsert(&mut self, name: Arc<str>, schedule: Arc<Schedule>) {
        let generation = self.bump();
        let was_enabled = self.entries.get(&name).map(|e| e.schedule.enabled());
        let enabled = schedule.enabled();
        self.entries.insert(
            name.clone(),
            Entry {
                body: body_of(&schedule),
                schedule: schedule.clone(),
                generation,
                dynamic: true,
            },
        );
        self.metrics.set_known(self.entries.len());
        let what = match (was_enabled, enabled) {
            (None, _) => "dynamic schedule added",
            (Some(false), true) => "dynamic schedule resumed",
            (Some(true), false) => "dynamic schedule paused",
            _ => "dynamic schedule updated",
        };
        tracing::info!(schedule = %name, enabled, "{what}");
        if self.active && enabled {
            let now = self.now();
            // A changed schedule continues after the last slot fired; an added or resumed
            // one starts with its next slot (no catch-up for time it did not exist or was
            // paused).
            let last = self.progress.get(&name).and_then(|p| p.last_fired);
            let from = match (was_enabled, last) {
                (Some(true), Some(l)) => l.max(now),
                _ => now,
            };
            self.push_regular(&name, &schedule, generation, from);
        }
    }

    /// Stops firing and waits (bounded) for outstanding PubAcks and cursor writes.
    async fn drain(&mut self, done_rx: &mut mpsc::UnboundedReceiver<Done>) {
        self.deactivate("shutting down");
        let deadline = Instant::now() + self.opts.drain_timeout;
        while self.in_flight > 0 {
            tokio::select! {
                () = sleep_until(deadline) => {
                    tracing::warn!(
                        outstanding = self.in_flight,
                        "shutdown: gave up waiting for PubAcks and cursor writes"
                    );
                    break;
                }
                done = done_rx.recv() => match done {
                    Some(done) => self.on_done(done),
                    None => break,
                },
            }
        }
    }
}

/// Fires `schedule` now, outside its slots, with its own id
/// (`<schedule>_manual_<uuid v7>`): `taskmesh schedules trigger`. Works on paused schedules
/// too. Returns the PubAck.
pub async fn trigger(
    client: &Client,
    schedule: &Schedule,
    clock: &dyn Clock,
) -> Result<Enqueued, SchedulerError> {
    let id = manual_fire_id(schedule.name());
    let id = TaskId::new(id).map_err(taskmesh_nats::NatsError::from)?;
    let opts = EnqueueOptions {
        id: Some(id),
        headers: vec![
            (
                headers::TASK_SCHEDULE.to_owned(),
                schedule.name().to_owned(),
            ),
            (headers::TASK_FIRE_TIME.to_owned(), format_slot(clock.now())),
        ],
        ..Default::default()
    };
    Ok(client
        .send(schedule.task(), body_of(schedule), opts)
        .await?
        .acked()
        .await?)
}

/// `<schedule>_manual_<uuid v7, 32 hex>`, shortened to stay a valid task id (≤ 128) for
/// the longest names.
fn manual_fire_id(name: &str) -> String {
    let uuid = uuid::Uuid::now_v7().simple().to_string();
    let id = format!("{name}_manual_{uuid}");
    if id.len() <= 128 {
        id
    } else {
        let room = 128usize.saturating_sub(name.len() + 2);
        format!("{name}_m{}", &uuid[uuid.len().saturating_sub(room)..])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn manual_ids_are_valid_task_ids() {
        for len in [1, 50, 88, 89, 100] {
            let name = "a".repeat(len);
            let id = manual_fire_id(&name);
            assert!(TaskId::new(id.clone()).is_ok(), "{id}");
            assert!(id.starts_with(&name));
            assert_ne!(manual_fire_id(&name), id, "unique");
        }
        assert!(manual_fire_id("x").starts_with("x_manual_"));
    }

    #[test]
    fn static_schedules_merge_defaults_and_refuse_bad_ones() {
        let cfg = Config::default();
        let all = static_schedules(&cfg).unwrap();
        assert_eq!(all.len(), 13);

        let cfg = Config::from_toml_str(
            r#"
            [[schedules]]
            name = "cleanup-temp-files"
            task = "file.cleanup_temp_files"
            cron = "0 3 * * *"
            enabled = false
            [[schedules]]
            name = "mine"
            task = "sync.poll"
            every = "30s"
            "#,
        )
        .unwrap();
        let all = static_schedules(&cfg).unwrap();
        assert_eq!(all.len(), 14);
        let cleanup = all
            .iter()
            .find(|s| s.name() == "cleanup-temp-files")
            .unwrap();
        assert!(
            !cleanup.enabled(),
            "a [[schedules]] entry overrides the default"
        );

        let mut cfg = Config::default();
        cfg.scheduler.default_schedules = false;
        cfg.schedules = vec![
            ScheduleDef::new_every("a", "sync.poll", "1s"),
            ScheduleDef::new_every("a", "sync.poll", "2s"),
        ];
        assert!(matches!(
            static_schedules(&cfg),
            Err(SchedulerError::DuplicateName(n)) if n == "a"
        ));
        cfg.schedules = vec![ScheduleDef::new_cron("bad", "sync.poll", "0 0 30 2 *")];
        let err = static_schedules(&cfg).unwrap_err();
        assert!(
            matches!(&err, SchedulerError::Schedule(e) if e.schedule() == "bad"),
            "{err}"
        );
        cfg.schedules = vec![ScheduleDef::new_every("x", "nowhere.poll", "1s")];
        assert!(matches!(
            static_schedules(&cfg),
            Err(SchedulerError::Config(m)) if m.contains("category nowhere")
        ));
    }

    #[test]
    fn regular_fires_are_due_publish_ahead_before_their_slot() {
        let slot = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        assert_eq!(due_at(slot, TimeDelta::zero()), slot);
        assert_eq!(
            due_at(slot, TimeDelta::milliseconds(1500)),
            DateTime::from_timestamp(1_799_999_998, 500_000_000).unwrap()
        );
        assert_eq!(
            due_at(DateTime::<Utc>::MIN_UTC, TimeDelta::seconds(1)),
            DateTime::<Utc>::MIN_UTC
        );
    }

    #[test]
    fn a_slot_closer_than_the_server_timer_is_published_at_the_slot() {
        let slot = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let before = |ms| slot - TimeDelta::milliseconds(ms);
        assert!(!too_close_for_a_schedule(slot, before(1000)));
        assert!(!too_close_for_a_schedule(slot, before(300)));
        assert!(too_close_for_a_schedule(slot, before(299)));
        assert!(too_close_for_a_schedule(slot, before(1)));
        assert!(
            !too_close_for_a_schedule(slot, slot),
            "due: published directly"
        );
        assert!(!too_close_for_a_schedule(
            slot,
            slot + TimeDelta::seconds(1)
        ));
    }

    #[test]
    fn heap_orders_by_due_time_then_slot() {
        let t = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
        let due = |at, slot, kind| Due {
            at: t(at),
            slot: t(slot),
            name: Arc::from("a"),
            generation: 1,
            kind,
        };
        let mut heap = BinaryHeap::new();
        heap.push(Reverse(due(20, 20, Kind::Regular)));
        heap.push(Reverse(due(10, 5, Kind::CatchUp)));
        heap.push(Reverse(due(10, 3, Kind::CatchUp)));
        heap.push(Reverse(due(15, 15, Kind::Retry(1))));
        let order: Vec<i64> =
            std::iter::from_fn(|| heap.pop().map(|Reverse(d)| d.slot.timestamp())).collect();
        assert_eq!(order, [3, 5, 15, 20]);
    }
}
