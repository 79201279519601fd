//! The one worker runtime: a consume loop per category, one processing path per message,
//! one place ([`Delivery::settle`]) where outcomes become acks.
//!
//! ## Pulling
//! Each category has a semaphore of `concurrency` slots and three lane consumers (`high`,
//! normal, `low`). A lane that has shown messages is *busy*: the loop fetches it without
//! waiting (`no_wait`) for as many messages as there are free slots, highest lane first,
//! so it never holds more work than it can start. A lane that came back short is *idle*:
//! it gets one long-poll (bounded by `worker.pull_expires`). While slots are plentiful the
//! poll is *wide*: it asks for up to an eighth of the free slots (at most 64) and reserves
//! them, so each message that arrives starts at once and a steady trickle costs no pull
//! round trip per task; a wide poll that fills up turns the lane busy. A wide poll expires
//! after 200 ms, and none is issued while another lane is busy, so reserved slots return
//! quickly to a lane with a backlog. While slots are scarce or another lane is busy it
//! asks for a single message without reserving a slot: that message waits for the next
//! free slot, ahead of lower lanes, and the lane turns busy again. Every eighth
//! round the low lane is served before the normal lane, so low-priority work still
//! progresses under sustained normal load.
//!
//! ## Processing
//! decode metadata → deadline → attempt budget → handler lookup → argument decode → run
//! (progress every `ack_wait / 3`, hard time limit, panics caught) → [`decide`] → result
//! record → [`Delivery::settle`].
//!
//! ## Drain
//! On shutdown the loops stop pulling; in-flight tasks get `worker.drain_grace` to finish;
//! whatever is still running is then cancelled and released (`Nak` without delay) so
//! another replica takes it at once.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{FutureExt, Stream, StreamExt};
use opentelemetry::trace::TraceContextExt;
use std::collections::{HashMap, HashSet};
use taskmesh_nats::async_nats::jetstream::{self, consumer::PullConsumer};
use taskmesh_nats::{
    Cancels, Connection, Delivery, Heartbeats, Limits, NatsError, ResultStore, topology, trace,
};
use taskmesh_shared::config::{CategoryConfig, Config};
use taskmesh_shared::crypto::Keyring;
use taskmesh_shared::wire::{self, headers as h};
use taskmesh_shared::{
    Category, Decision, ErrorInfo, Lane, Outcome, TaskError, TaskRecord, TaskState,
    WorkerHeartbeat, decide,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::registry::{DecodeError, Registry, TaskContext};
use crate::stats::{CategoryStats, Stats};

/// How often consumer backlogs are polled for metrics.
const BACKLOG_POLL: Duration = Duration::from_secs(5);

/// The policy of a task no handler is registered for (it is dead-lettered unrun).
static DEFAULT_POLICY: std::sync::LazyLock<crate::registry::TaskPolicy> =
    std::sync::LazyLock::new(crate::registry::TaskPolicy::default);

/// How long a task runs before its `running` record is written.
const RUNNING_RECORD_AFTER: Duration = Duration::from_millis(200);

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// A configuration problem (unknown category, bad override).
    #[error("{0}")]
    Config(String),
    /// NATS refused something the worker needs.
    #[error(transparent)]
    Nats(#[from] NatsError),
}

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct WorkerOptions {
    /// Categories to serve; empty = every enabled category in config.
    pub categories: Vec<Category>,
    /// Overrides every category's concurrency.
    pub concurrency: Option<usize>,
    /// A fixed worker id (default: `<category>.<category>-<random>`; it is a KV key).
    pub id: Option<String>,
}

struct Inner {
    conn: Connection,
    cfg: Arc<Config>,
    registry: Arc<Registry>,
    id: Arc<str>,
    results: Option<ResultStore>,
    stats: Arc<Stats>,
    /// Fired at the end of the drain grace: running tasks are cancelled and released.
    abort: CancellationToken,
    /// Cancel requests seen, and the tokens of running tasks.
    cancels: CancelState,
    /// Shared rate limiters (opened on first use).
    limits: tokio::sync::OnceCell<Limits>,
    /// Keyring for encrypted categories.
    keyring: Option<Arc<Keyring>>,
    /// Every task runs under a read guard; a redelivery whose previous attempt never
    /// settled (the worker died with it in flight) takes the write guard and runs alone,
    /// so a task that crashes the process spends only its own attempts, not those of the
    /// tasks that happened to run beside it.
    isolation: tokio::sync::RwLock<()>,
}

#[derive(Default)]
struct CancelState {
    /// Set once any cancel request was seen: until then no task takes the lock to ask.
    any: std::sync::atomic::AtomicBool,
    requested: std::sync::Mutex<HashSet<String>>,
    running: std::sync::Mutex<HashMap<String, CancellationToken>>,
}

impl CancelState {
    fn is_requested(&self, id: &str) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        self.requested
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }
    /// Remembers the request first, then fires a running task's token: a task that starts
    /// in between registers after the request is visible and sees it in its own check.
    fn mark(&self, id: String) {
        self.requested
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone());
        self.any.store(true, Ordering::Release);
        if let Some(t) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            t.cancel();
        }
    }
    fn start(&self, id: &str, token: CancellationToken) {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned(), token);
    }
    fn finish(&self, id: &str) {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

struct CategoryRt {
    name: Category,
    cfg: CategoryConfig,
    concurrency: usize,
    slots: Arc<Semaphore>,
    stats: Arc<CategoryStats>,
}

/// A worker process's runtime: serves one or more categories.
pub struct Worker {
    inner: Arc<Inner>,
    categories: Vec<Arc<CategoryRt>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.inner.id)
            .finish()
    }
}

impl Worker {
    /// Prepares a worker. Fails on unknown categories; opens the result bucket when results
    /// are enabled.
    pub async fn new(
        conn: Connection,
        cfg: Arc<Config>,
        registry: Arc<Registry>,
        opts: WorkerOptions,
    ) -> Result<Self, WorkerError> {
        let names: Vec<Category> = if opts.categories.is_empty() {
            cfg.enabled_categories().map(|(c, _)| c.clone()).collect()
        } else {
            opts.categories.clone()
        };
        if names.is_empty() {
            return Err(WorkerError::Config("no category to serve".into()));
        }
        let stats = Arc::new(Stats::with_breakers(cfg.breakers.clone()));
        let keyring = cfg
            .encryption
            .keyring()
            .map_err(|e| WorkerError::Config(format!("encryption: {e}")))?
            .map(Arc::new);
        let mut categories = Vec::with_capacity(names.len());
        for name in &names {
            let c = cfg
                .category(name)
                .map_err(|e| WorkerError::Config(e.to_string()))?
                .clone();
            let concurrency = opts.concurrency.unwrap_or(c.concurrency).max(1);
            categories.push(Arc::new(CategoryRt {
                stats: stats.category(name.as_str()),
                name: name.clone(),
                concurrency,
                slots: Arc::new(Semaphore::new(concurrency)),
                cfg: c,
            }));
        }
        let results = if cfg.results.enabled {
            Some(ResultStore::open(&conn.js).await?)
        } else {
            None
        };
        let id = opts.id.unwrap_or_else(|| {
            let cats: Vec<&str> = names.iter().map(Category::as_str).collect();
            format!("{}-{:08x}", cats.join("."), fastrand::u32(..))
        });
        Ok(Self {
            inner: Arc::new(Inner {
                conn,
                cfg,
                registry,
                id: id.into(),
                results,
                stats,
                abort: CancellationToken::new(),
                cancels: CancelState::default(),
                limits: tokio::sync::OnceCell::new(),
                keyring,
                isolation: tokio::sync::RwLock::new(()),
            }),
            categories,
        })
    }

    /// The worker id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Live counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.inner.stats.clone()
    }

    /// Runs until `shutdown` fires, then drains (see the module docs) and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let started_at = Utc::now();
        let hb_stop = CancellationToken::new();
        let hb = tokio::spawn(heartbeat_loop(
            self.inner.clone(),
            self.categories.clone(),
            started_at,
            hb_stop.clone(),
        ));
        tracing::info!(
            worker = %self.inner.id,
            categories = ?self.categories.iter().map(|c| (c.name.as_str(), c.concurrency)).collect::<Vec<_>>(),
            "worker started"
        );
        let canceller = tokio::spawn(cancel_watch(self.inner.clone(), hb_stop.clone()));
        let poller = tokio::spawn(backlog_loop(
            self.inner.clone(),
            self.categories.clone(),
            hb_stop.clone(),
        ));
        let loops: Vec<_> = self
            .categories
            .iter()
            .map(|c| {
                tokio::spawn(category_loop(
                    self.inner.clone(),
                    c.clone(),
                    shutdown.clone(),
                ))
            })
            .collect();
        shutdown.cancelled().await;
        tracing::info!(worker = %self.inner.id, in_flight = self.inner.stats.in_flight(), "draining");
        for l in loops {
            if let Err(e) = l.await {
                tracing::error!(error = %e, "consume loop ended abnormally");
            }
        }
        let grace = self.inner.cfg.worker.drain_grace;
        let all_done = async {
            for c in &self.categories {
                // Holding every slot means nothing is running.
                let _all = c.slots.acquire_many(c.concurrency as u32).await;
            }
        };
        if tokio::time::timeout(grace, all_done).await.is_err() {
            let left = self.inner.stats.in_flight();
            tracing::warn!(
                left,
                "drain grace over: releasing unfinished tasks to other workers"
            );
            self.inner.abort.cancel();
            let released = async {
                for c in &self.categories {
                    let _all = c.slots.acquire_many(c.concurrency as u32).await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), released).await;
        }
        hb_stop.cancel();
        let _ = hb.await;
        let _ = poller.await;
        let _ = canceller.await;
        if let Err(e) = self.inner.conn.client.flush().await {
            tracing::warn!(error = %e, "flush at shutdown failed");
        }
        tracing::info!(worker = %self.inner.id, "worker stopped");
        Ok(())
    }
}

async fn heartbeat_loop(
    inner: Arc<Inner>,
    cats: Vec<Arc<CategoryRt>>,
    started_at: DateTime<Utc>,
    stop: CancellationToken,
) {
    let mut hbs: Option<Heartbeats> = None;
    let mut tick = tokio::time::interval(inner.cfg.worker.heartbeat_interval);
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if hbs.is_none() {
            match Heartbeats::open(&inner.conn.js).await {
                Ok(h) => hbs = Some(h),
                Err(e) => {
                    tracing::debug!(error = %e, "heartbeat bucket unavailable");
                    continue;
                }
            }
        }
        let Some(h) = &hbs else { continue };
        let beat = WorkerHeartbeat {
            id: inner.id.to_string(),
            categories: cats.iter().map(|c| c.name.to_string()).collect(),
            concurrency: cats.iter().map(|c| c.concurrency).sum(),
            in_flight: inner.stats.in_flight(),
            version: env!("CARGO_PKG_VERSION").into(),
            host: host.clone(),
            pid: std::process::id(),
            started_at,
            beat_at: Utc::now(),
        };
        if let Err(e) = h.beat(&beat).await {
            tracing::debug!(error = %e, "heartbeat failed");
        }
    }
    if let Some(h) = hbs
        && let Err(e) = h.remove(&inner.id).await
    {
        tracing::debug!(error = %e, "removing heartbeat failed");
    }
}

/// Follows cancel requests: remembers them and fires the token of a running task.
async fn cancel_watch(inner: Arc<Inner>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let watch = match Cancels::open(&inner.conn.js).await {
            Ok(c) => c.watch().await,
            Err(e) => Err(e),
        };
        match watch {
            Ok(w) => {
                tokio::pin!(w);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        next = w.next() => match next {
                            Some(id) => inner.cancels.mark(id),
                            None => break,
                        },
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cancel requests unavailable"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Polls consumer backlogs and the DLQ size for metrics (every 5 s; best effort: an
/// identity without permission for `TASKS_DLQ` info simply reports no DLQ gauge).
async fn backlog_loop(inner: Arc<Inner>, cats: Vec<Arc<CategoryRt>>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(BACKLOG_POLL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let mut depths = Vec::new();
        for c in &cats {
            for lane in Lane::ALL {
                let stream = wire::stream_name(&c.name);
                let consumer = wire::consumer_name(&c.name, lane);
                let got: Result<jetstream::consumer::PullConsumer, _> = inner
                    .conn
                    .js
                    .get_consumer_from_stream(&consumer, &stream)
                    .await;
                if let Ok(pc) = got {
                    // The lookup itself fetched fresh info.
                    let info = pc.cached_info();
                    depths.push(crate::stats::QueueDepth {
                        category: c.name.to_string(),
                        lane: lane.as_str(),
                        pending: info.num_pending,
                        ack_pending: info.num_ack_pending as u64,
                    });
                }
            }
        }
        inner.stats.set_queues(depths);
        if let Ok(dlq) = inner.conn.js.get_stream(wire::DLQ_STREAM).await {
            let messages = dlq.cached_info().state.messages;
            inner.stats.dlq_messages.store(messages, Ordering::Relaxed);
        }
    }
}

type LongPoll = Pin<
    Box<dyn Stream<Item = Result<jetstream::Message, taskmesh_nats::async_nats::Error>> + Send>,
>;

struct LaneRt {
    lane: Lane,
    consumer: Option<PullConsumer>,
    busy: bool,
    idle_poll: Option<LongPoll>,
    /// Slots reserved for the long-poll's messages (a wide poll only): each arriving
    /// message takes one and starts at once; the rest return when the poll ends.
    idle_slots: Option<OwnedSemaphorePermit>,
    /// Messages the long-poll asked for, and how many came.
    idle_want: usize,
    idle_got: usize,
    waiting: VecDeque<jetstream::Message>,
    retry_at: Instant,
    failures: u32,
}

impl LaneRt {
    fn new(lane: Lane) -> Self {
        Self {
            lane,
            consumer: None,
            busy: true,
            idle_poll: None,
            idle_slots: None,
            idle_want: 0,
            idle_got: 0,
            waiting: VecDeque::new(),
            retry_at: Instant::now(),
            failures: 0,
        }
    }
    fn back_off(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let ms = (50u64 << self.failures.min(6)).min(2_000);
        self.retry_at = Instant::now() + Duration::from_millis(ms);
    }
}

/// The widest idle long-poll, in messages.
const WIDE_POLL_MAX: usize = 64;

/// How long a wide long-poll holds its reserved slots at most: when another lane turns busy
/// meanwhile, they are back in the pool this soon (the next poll is narrow).
const WIDE_POLL_EXPIRES: Duration = Duration::from_millis(200);

/// How many messages an idle lane's long-poll asks for with `free` slots: one (and no slot
/// reserved) while slots are scarce or another lane is busy, else up to an eighth of the
/// free slots, reserved for it — so messages arriving on an idle worker start at once,
/// with no pull round trip or new long-poll between them, and a poll never brings more
/// than its slots.
fn idle_poll_width(free: usize, max_batch: usize, other_lane_busy: bool) -> usize {
    let wide = (free / 8).min(max_batch).min(WIDE_POLL_MAX);
    if wide >= 2 && !other_lane_busy {
        wide
    } else {
        1
    }
}

/// Lane order for a round: high first; every eighth round low before normal.
fn lane_order(round: u64) -> [usize; 3] {
    if round % 8 == 7 { [0, 2, 1] } else { [0, 1, 2] }
}

async fn category_loop(inner: Arc<Inner>, cat: Arc<CategoryRt>, shutdown: CancellationToken) {
    let mut lanes: [LaneRt; 3] = Lane::ALL.map(LaneRt::new);
    let max_batch = inner.cfg.worker.max_batch.max(1);
    let mut round: u64 = 0;
    let mut last_bind_error = Instant::now() - Duration::from_secs(60);
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        // Bind consumers (again after errors), with backoff and a clear message.
        let now = Instant::now();
        for l in lanes
            .iter_mut()
            .filter(|l| l.consumer.is_none() && l.retry_at <= now)
        {
            match topology::lane_consumer(&inner.conn.js, &cat.name, l.lane).await {
                Ok(c) => {
                    l.consumer = Some(c);
                    l.failures = 0;
                }
                Err(e) => {
                    if last_bind_error.elapsed() > Duration::from_secs(10) {
                        tracing::error!(category = %cat.name, lane = l.lane.as_str(), error = %e, "cannot bind consumer; retrying");
                        last_bind_error = Instant::now();
                    }
                    l.back_off();
                }
            }
        }
        cat.stats.bound.store(
            lanes.iter().all(|l| l.consumer.is_some()),
            Ordering::Relaxed,
        );

        // Serve: waiting messages and busy lanes, in priority order, while slots are free.
        for i in lane_order(round) {
            let l = &mut lanes[i];
            while !l.waiting.is_empty() {
                let Ok(permit) = cat.slots.clone().try_acquire_owned() else {
                    break;
                };
                if let Some(m) = l.waiting.pop_front() {
                    dispatch(&inner, &cat, m, permit);
                }
            }
            if !l.busy || !l.waiting.is_empty() || l.retry_at > Instant::now() {
                continue;
            }
            let Some(consumer) = &l.consumer else {
                continue;
            };
            let want = cat.slots.available_permits().min(max_batch);
            if want == 0 {
                continue;
            }
            let Ok(permits) = cat.slots.clone().try_acquire_many_owned(want as u32) else {
                continue;
            };
            match fetch(consumer, want, inner.cfg.worker.pull_expires).await {
                Ok(msgs) => {
                    l.failures = 0;
                    let got = msgs.len();
                    let mut permits = permits;
                    for m in msgs {
                        let one = permits.split(1);
                        match one {
                            Some(p) => dispatch(&inner, &cat, m, p),
                            None => l.waiting.push_back(m),
                        }
                    }
                    if got < want {
                        l.busy = false;
                    }
                }
                Err(e) => {
                    tracing::warn!(category = %cat.name, lane = l.lane.as_str(), error = %e, "pull failed; backing off");
                    l.busy = false;
                    l.back_off();
                    if is_consumer_gone(&e) {
                        l.consumer = None;
                    }
                }
            }
        }
        round = round.wrapping_add(1);

        // Idle lanes: one long-poll each, wide (slots reserved) while slots are plentiful
        // and no lane is busy.
        let any_busy = lanes.iter().any(|l| l.busy || !l.waiting.is_empty());
        for l in lanes.iter_mut() {
            if l.busy
                || l.idle_poll.is_some()
                || !l.waiting.is_empty()
                || l.retry_at > Instant::now()
            {
                continue;
            }
            let Some(consumer) = &l.consumer else {
                continue;
            };
            let mut want = idle_poll_width(cat.slots.available_permits(), max_batch, any_busy);
            let slots = if want > 1 {
                cat.slots.clone().try_acquire_many_owned(want as u32).ok()
            } else {
                None
            };
            if slots.is_none() {
                want = 1;
            }
            let expires = if want > 1 {
                WIDE_POLL_EXPIRES.min(inner.cfg.worker.pull_expires)
            } else {
                inner.cfg.worker.pull_expires
            };
            match consumer
                .batch()
                .max_messages(want)
                .expires(expires)
                .messages()
                .await
            {
                Ok(b) => {
                    l.idle_poll = Some(Box::pin(b));
                    l.idle_slots = slots;
                    l.idle_want = want;
                    l.idle_got = 0;
                }
                Err(e) => {
                    tracing::warn!(category = %cat.name, lane = l.lane.as_str(), error = %e, "long-poll failed; backing off");
                    l.back_off();
                }
            }
        }

        // Wait for something to do.
        let need_slot = lanes
            .iter()
            .any(|l| (l.busy && l.consumer.is_some()) || !l.waiting.is_empty());
        let next_retry = lanes
            .iter()
            .filter(|l| l.consumer.is_none() || l.failures > 0)
            .map(|l| l.retry_at)
            .min();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            (i, item) = next_idle(&mut lanes) => {
                let l = &mut lanes[i];
                match item {
                    Some(Ok(m)) => {
                        l.idle_got += 1;
                        match l.idle_slots.as_mut().and_then(|s| s.split(1)) {
                            // A wide poll: its slot is reserved, start now.
                            Some(slot) => dispatch(&inner, &cat, m, slot),
                            None => {
                                l.waiting.push_back(m);
                                l.busy = true;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(category = %cat.name, lane = l.lane.as_str(), error = %e, "long-poll ended with an error");
                        l.idle_poll = None;
                        l.idle_slots = None;
                        l.back_off();
                    }
                    None => {
                        l.idle_poll = None;
                        l.idle_slots = None;
                        // A wide poll that filled up: there is a backlog, fetch it.
                        if l.idle_want > 1 && l.idle_got >= l.idle_want {
                            l.busy = true;
                        }
                    }
                }
            }
            p = cat.slots.clone().acquire_owned(), if need_slot => {
                drop(p);
                // Let other finishing tasks return their slots so the next fetch is larger.
                tokio::task::yield_now().await;
            }
            _ = sleep_until_opt(next_retry), if next_retry.is_some() => {}
        }
    }

    // Drain: stop pulling; hand back anything received but not started.
    for l in lanes.iter_mut() {
        for m in l.waiting.drain(..) {
            let _ = m.ack_with(jetstream::AckKind::Nak(None)).await;
        }
    }
    // Outstanding long-polls may still deliver until they expire: release those too.
    let deadline = Instant::now() + inner.cfg.worker.pull_expires + Duration::from_millis(500);
    for l in lanes.iter_mut() {
        if let Some(mut s) = l.idle_poll.take() {
            while let Ok(Some(item)) = tokio::time::timeout_at(deadline, s.next()).await {
                if let Ok(m) = item {
                    let _ = m.ack_with(jetstream::AckKind::Nak(None)).await;
                }
            }
        }
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Polls every lane's long-poll; resolves with the first event.
async fn next_idle(
    lanes: &mut [LaneRt; 3],
) -> (
    usize,
    Option<Result<jetstream::Message, taskmesh_nats::async_nats::Error>>,
) {
    poll_fn(|cx| {
        let mut any = false;
        for (i, l) in lanes.iter_mut().enumerate() {
            if let Some(s) = l.idle_poll.as_mut() {
                any = true;
                if let Poll::Ready(item) = s.poll_next_unpin(cx) {
                    return Poll::Ready((i, item));
                }
            }
        }
        let _ = any;
        Poll::Pending
    })
    .await
}

/// Fetches up to `n` available messages without waiting for more. The request carries no
/// `expires` (with one, the server holds a `no_wait` request until it expires); the client
/// bounds it instead, so a lost reply cannot stall the loop.
async fn fetch(
    consumer: &PullConsumer,
    n: usize,
    bound: Duration,
) -> Result<Vec<jetstream::Message>, taskmesh_nats::async_nats::Error> {
    let work = async {
        let mut batch = consumer.fetch().max_messages(n).messages().await?;
        let mut out = Vec::with_capacity(n);
        while let Some(m) = batch.next().await {
            match m {
                Ok(m) => out.push(m),
                Err(e) if out.is_empty() => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "fetch ended early");
                    break;
                }
            }
        }
        Ok(out)
    };
    tokio::time::timeout(bound, work)
        .await
        .map_err(|_| format!("no reply to a pull request within {bound:?}"))?
}

fn is_consumer_gone(e: &taskmesh_nats::async_nats::Error) -> bool {
    let s = e.to_string();
    s.contains("Consumer Deleted") || s.contains("consumer not found")
}

fn dispatch(
    inner: &Arc<Inner>,
    cat: &Arc<CategoryRt>,
    msg: jetstream::Message,
    permit: OwnedSemaphorePermit,
) {
    let inner = inner.clone();
    let cat = cat.clone();
    cat.stats.in_flight.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        // Boxed: the task's state machine is several KiB; spawned inline it would be
        // copied into the task cell and again when the task completes.
        Box::pin(process(&inner, &cat, msg)).await;
        cat.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        drop(permit);
    });
}

/// Reads `Task-Max-Attempts`; an unreadable value is ignored (the policy applies).
fn header_attempts(d: &Delivery) -> Option<u32> {
    d.header(h::TASK_MAX_ATTEMPTS)?
        .trim()
        .parse()
        .ok()
        .filter(|n| *n > 0)
}

/// Hands an unfinished task back at shutdown. The record says `retrying` first, so the
/// next worker knows this attempt was settled (released, not crashed) and does not isolate
/// it.
async fn release_at_shutdown(d: &Delivery, rec: Option<&mut Rec<'_>>, task_id: &str) {
    if let Some(Rec { store, record }) = rec {
        record.state = TaskState::Retrying;
        record.finished_at = Some(Utc::now());
        record.error = Some(ErrorInfo {
            kind: "released".into(),
            message: "the worker shut down before the task finished; handed to another worker"
                .into(),
        });
        if let Err(e) = store.put(record).await {
            tracing::debug!(error = %e, "cannot write released record");
        }
    }
    if let Err(e) = d.release().await {
        tracing::warn!(task_id = %task_id, error = %e, "cannot release task at shutdown");
    }
}

/// A task's result record and the store it is written to (only when results are stored).
struct Rec<'a> {
    store: &'a ResultStore,
    record: TaskRecord,
}

/// The isolation guard a task runs under (held, never read).
#[allow(dead_code)]
enum Isolation<'a> {
    Shared(tokio::sync::RwLockReadGuard<'a, ()>),
    Alone(tokio::sync::RwLockWriteGuard<'a, ()>),
}

/// `error.kind` of the record written when an unsettled redelivery starts running alone.
const ISOLATED: &str = "isolated";

/// Were this task's unsettled deliveries lost only beside others — it never crashed a
/// worker while running alone? (No record, or a record that is neither an isolated run
/// nor a settled retry.) Without result records it cannot tell and says no.
async fn lost_only_as_bystander(inner: &Inner, task_id: &str) -> bool {
    let (Some(store), Ok(id)) = (&inner.results, taskmesh_shared::TaskId::new(task_id)) else {
        return false;
    };
    match store.get(&id).await {
        Ok(Some(r)) => {
            r.state == TaskState::Running && r.error.as_ref().is_none_or(|e| e.kind != ISOLATED)
        }
        Ok(None) => true,
        Err(_) => false,
    }
}

/// Did a worker settle the attempt before this one (its record says `retrying` for the
/// previous attempt)? Without result records every redelivery counts as unsettled.
async fn previous_attempt_settled(inner: &Inner, task_id: &str, attempt: u32) -> bool {
    let (Some(store), Ok(id)) = (&inner.results, taskmesh_shared::TaskId::new(task_id)) else {
        return false;
    };
    matches!(
        store.get(&id).await,
        Ok(Some(r)) if r.state == TaskState::Retrying && r.attempts + 1 >= attempt
    )
}

/// Releases a running task's cancel registration when its attempt ends.
struct FinishGuard<'a>(&'a CancelState, &'a str);

impl Drop for FinishGuard<'_> {
    fn drop(&mut self) {
        self.0.finish(self.1);
    }
}

/// Did the dependency fail (as opposed to the task's own input)?
fn is_dependency_failure(o: &Outcome) -> bool {
    matches!(
        o,
        Outcome::Failed(TaskError::Retryable { .. }) | Outcome::TimedOut(_)
    )
}

/// The shared limits a task is subject to: its own and its dependency's.
fn rate_limits(
    inner: &Inner,
    policy: &crate::registry::TaskPolicy,
    task: &taskmesh_shared::TaskName,
) -> Vec<(String, taskmesh_shared::config::Rate)> {
    let mut v = Vec::new();
    if let Some(r) = policy.rate_limit {
        v.push((format!("task.{}", task.as_str()), r));
    }
    if let Some(dep) = &policy.dependency
        && let Some(r) = inner
            .cfg
            .limits
            .get(dep)
            .and_then(|r| taskmesh_shared::config::parse_rate(r).ok())
    {
        v.push((format!("dep.{dep}"), r));
    }
    v
}

async fn limiter(inner: &Inner) -> Result<&Limits, NatsError> {
    inner
        .limits
        .get_or_try_init(|| Limits::open(&inner.conn.js))
        .await
}

/// Decrypts the body of a task in an encrypted category; the error says why it must not run.
async fn open_body(inner: &Inner, d: &Delivery, task_id: &str) -> Result<Vec<u8>, String> {
    let Some(ring) = &inner.keyring else {
        return Err("encrypted category but no keyring configured".into());
    };
    let Some(key_id) = d.header(h::TASK_KEY_ID) else {
        return Err("plain body in an encrypted category (no Task-Key-Id)".into());
    };
    let plain = ring
        .open(key_id, d.subject(), task_id, d.payload())
        .map_err(|e| e.to_string())?;
    // A valid ciphertext of a task that already finished is a replay.
    if let Some(store) = &inner.results
        && let Ok(id) = taskmesh_shared::TaskId::new(task_id)
        && let Ok(Some(r)) = store.get(&id).await
        && r.state.is_final()
    {
        return Err(format!(
            "replayed ciphertext: task {task_id} already finished ({})",
            r.state.as_str()
        ));
    }
    Ok(plain)
}

/// Defers a task whose dependency's breaker is open: scheduled copy, attempt kept.
async fn defer(
    inner: &Inner,
    cat: &CategoryRt,
    d: &Delivery,
    rec: Option<&mut Rec<'_>>,
    task_id: &str,
    dep: &str,
    until: DateTime<Utc>,
) {
    match d.defer(&inner.conn.js, &cat.name, until).await {
        Ok(()) => {
            tracing::info!(task_id = %task_id, dependency = dep, until = %until, "breaker open: task deferred");
            if let Some(Rec { store, record }) = rec {
                record.state = TaskState::Retrying;
                record.attempts = d.attempt().saturating_sub(1);
                record.finished_at = Some(Utc::now());
                record.error = Some(ErrorInfo {
                    kind: "breaker_open".into(),
                    message: format!(
                        "dependency {dep} is unavailable; deferred until {}",
                        until.to_rfc3339()
                    ),
                });
                if let Err(e) = store.put(record).await {
                    tracing::debug!(error = %e, "cannot write deferred record");
                }
            }
        }
        Err(e) => {
            tracing::warn!(task_id = %task_id, error = %e, "cannot defer; releasing for a later delivery");
            let _ = d.release().await;
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

async fn process(inner: &Arc<Inner>, cat: &Arc<CategoryRt>, msg: jetstream::Message) {
    let d = match Delivery::new(msg) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a message without JetStream metadata");
            return;
        }
    };
    let attempt = d.attempt();
    let task_id = d.task_id();
    let parsed = wire::parse_task_subject(d.subject());
    let task_name = parsed
        .as_ref()
        .map(|p| p.task.as_str().to_owned())
        .unwrap_or_else(|| d.subject().to_owned());
    let registered = parsed
        .as_ref()
        .and_then(|p| inner.registry.get(p.task.as_str()));
    let policy = registered.map_or(&*DEFAULT_POLICY, |r| &r.policy);
    let max_attempts = header_attempts(&d)
        .or(policy.max_attempts)
        .unwrap_or(cat.cfg.max_attempts)
        .min(u32::try_from(cat.cfg.max_deliver).unwrap_or(u32::MAX))
        .max(1);
    let remote = trace::extract(d.headers());
    let span = if trace::enabled() {
        tracing::info_span!(
            "process",
            otel.name = %format!("process {}", d.subject()),
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.operation.type = "process",
            messaging.destination.name = %d.subject(),
            messaging.message.id = %task_id,
            task.id = %task_id,
            task.name = %task_name,
            task.attempt = attempt,
            task.outcome = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        )
    } else {
        tracing::info_span!(
            "task",
            task.id = %task_id,
            task.name = %task_name,
            task.attempt = attempt,
            task.outcome = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        )
    };
    let trace_id = if trace::enabled() {
        if let Some(sc) = remote.clone() {
            // First attempt of a directly enqueued task continues the producer's trace;
            // retries and scheduled fires start their own, linked to it.
            let follow = attempt == 1
                && d.header(h::TASK_SCHEDULE).is_none()
                && inner.cfg.tracing.trust_incoming;
            if follow {
                let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
            } else {
                span.add_link(sc);
            }
        }
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        sc.is_valid().then(|| trace::trace_id_hex(&sc))
    } else {
        remote.map(|sc| trace::trace_id_hex(&sc))
    };
    if let Some(t) = &trace_id {
        span.record("trace_id", t.as_str());
    }
    run_task(
        inner,
        cat,
        d,
        task_id,
        task_name,
        parsed,
        registered,
        policy,
        max_attempts,
        trace_id,
        span.clone(),
    )
    .instrument(span)
    .await;
}

#[allow(clippy::too_many_arguments)]
async fn run_task(
    inner: &Arc<Inner>,
    cat: &Arc<CategoryRt>,
    d: Delivery,
    task_id: String,
    task_name: String,
    parsed: Option<wire::ParsedSubject>,
    registered: Option<&crate::registry::Registered>,
    policy: &crate::registry::TaskPolicy,
    max_attempts: u32,
    trace_id: Option<String>,
    span: tracing::Span,
) {
    let attempt = d.attempt();
    let started_at = Utc::now();
    // The record exists only when it is stored: no per-task allocations for it otherwise.
    let mut rec = inner
        .results
        .as_ref()
        .filter(|_| policy.store_result)
        .map(|store| Rec {
            store,
            record: TaskRecord {
                id: task_id.clone(),
                task: task_name.clone(),
                state: TaskState::Running,
                attempts: attempt,
                enqueued_at: d
                    .header(h::TASK_ENQUEUED_AT)
                    .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                    .map(|t| t.to_utc())
                    .or(Some(d.meta().published)),
                started_at: Some(started_at),
                finished_at: None,
                duration_ms: None,
                worker: inner.id.to_string(),
                result: None,
                error: None,
                trace_id: trace_id.clone(),
            },
        });

    let clock = Instant::now();
    // Held until the outcome is settled, not just computed: a task running alone is alone
    // until its ack or dead letter is out, so a neighbour that crashes the process cannot
    // strand it half-settled behind an "isolated" marker (found by the fault suite: a
    // permanent failure was dead-lettered as `max_attempts` when an aborting poison took
    // the lock between its outcome and its dead letter).
    let mut _isolation: Option<Isolation<'_>> = None;
    let outcome = 'run: {
        let Some(parsed) = parsed else {
            break 'run Outcome::UnknownTask(format!(
                "{:?} is not a valid task subject",
                d.subject()
            ));
        };
        if let Some(raw) = d.header(h::TASK_DEADLINE) {
            match DateTime::parse_from_rfc3339(raw.trim()) {
                Ok(deadline) if deadline.to_utc() < started_at => {
                    break 'run Outcome::Expired(format!(
                        "deadline {raw} passed before the task started"
                    ));
                }
                Ok(_) => {}
                Err(e) => {
                    break 'run Outcome::Undecodable(format!("invalid Task-Deadline {raw:?}: {e}"));
                }
            }
        }
        // Earlier deliveries never settled (the worker died or hung): stop the loop — but
        // only for a task that crashed while running alone. A bystander whose deliveries
        // were lost with a crashing neighbour gets its turn alone first.
        if attempt > max_attempts && !Box::pin(lost_only_as_bystander(inner, &task_id)).await {
            break 'run Outcome::Failed(TaskError::retryable(format!(
                "delivered {attempt} times without completing (worker crashed or exceeded ack_wait)"
            )));
        }
        let limit = usize::try_from(inner.cfg.streams.max_msg_size).unwrap_or(usize::MAX);
        if d.payload().len() > limit {
            break 'run Outcome::Undecodable(format!(
                "body of {} bytes exceeds the limit of {limit} bytes",
                d.payload().len()
            ));
        }
        if inner.cancels.is_requested(&task_id) {
            break 'run Outcome::Cancelled("cancelled before it started".into());
        }
        let Some(registered) = registered else {
            break 'run Outcome::UnknownTask(format!(
                "no handler for task {} on worker {} (registered: {})",
                parsed.task,
                inner.id,
                inner.registry.names().join(", ")
            ));
        };
        let encrypted = inner
            .cfg
            .encryption
            .categories
            .iter()
            .any(|c| *c == cat.name);
        let plain: std::borrow::Cow<'_, [u8]> = if encrypted {
            match Box::pin(open_body(inner, &d, &task_id)).await {
                Ok(p) => std::borrow::Cow::Owned(p),
                Err(why) => break 'run Outcome::Undecodable(why),
            }
        } else {
            std::borrow::Cow::Borrowed(&d.payload()[..])
        };
        // A breaker open for the task's dependency: defer without spending an attempt.
        let mut probe = None;
        if let Some(dep) = &policy.dependency {
            let breaker = inner.stats.breakers.get(dep);
            match breaker.admit() {
                crate::breaker::Admit::Run { probe: p } => probe = Some((breaker, p)),
                crate::breaker::Admit::Defer(wait) => {
                    let jitter = Duration::from_millis(fastrand::u64(0..2000));
                    let until =
                        Utc::now() + chrono::Duration::from_std(wait + jitter).unwrap_or_default();
                    Box::pin(defer(inner, cat, &d, rec.as_mut(), &task_id, dep, until)).await;
                    return;
                }
            }
        }
        let cancel = inner.abort.child_token();
        let ctx = TaskContext {
            id: task_id.clone(),
            task: parsed.task.clone(),
            attempt,
            max_attempts,
            cancel: cancel.clone(),
            schedule: d.header(h::TASK_SCHEDULE).map(str::to_owned),
            fire_time: d.header(h::TASK_FIRE_TIME).map(str::to_owned),
            trace_id: trace_id.clone(),
            worker: inner.id.clone(),
        };
        let every = (cat.cfg.ack_wait / 3).max(Duration::from_millis(100));
        let mut progress = tokio::time::interval_at(Instant::now() + every, every);
        // Shared rate limits: wait for this task's slot (progress keeps the delivery alive).
        for (key, rate) in rate_limits(inner, policy, &parsed.task) {
            let wait = Box::pin(async {
                match limiter(inner).await {
                    Ok(l) => l.reserve(&key, rate).await,
                    Err(e) => Err(e),
                }
            })
            .await;
            let wait = match wait {
                Ok(w) => w,
                Err(e) => {
                    break 'run Outcome::Failed(TaskError::retryable(format!(
                        "rate limiter {key}: {e}"
                    )));
                }
            };
            let until = Instant::now() + wait;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    _ = progress.tick() => { let _ = Box::pin(d.progress()).await; }
                    _ = inner.abort.cancelled() => {
                        Box::pin(release_at_shutdown(&d, rec.as_mut(), &task_id)).await;
                        return;
                    }
                }
            }
        }
        // A redelivery nobody settled may be what killed the last worker: run it alone.
        let suspect =
            attempt > 1 && !Box::pin(previous_attempt_settled(inner, &task_id, attempt)).await;
        _isolation = Some(if suspect {
            tracing::warn!(task_id = %task_id, attempt, "previous attempt never settled (worker crash?): running it alone");
            let write = inner.isolation.write();
            tokio::pin!(write);
            loop {
                tokio::select! {
                    g = &mut write => {
                        // Mark the lone run: if the process dies now, this task is the cause.
                        if let Some(r) = rec.as_mut() {
                            r.record.error = Some(ErrorInfo { kind: ISOLATED.into(), message: format!("running alone on attempt {attempt}") });
                            if let Err(e) = Box::pin(r.store.put(&r.record)).await {
                                tracing::debug!(error = %e, "cannot mark the isolated run");
                            }
                            r.record.error = None;
                        }
                        break Isolation::Alone(g);
                    }
                    _ = progress.tick() => { let _ = Box::pin(d.progress()).await; }
                    _ = inner.abort.cancelled() => {
                        Box::pin(release_at_shutdown(&d, rec.as_mut(), &task_id)).await;
                        return;
                    }
                }
            }
        } else {
            Isolation::Shared(inner.isolation.read().await)
        });
        inner.cancels.start(&task_id, cancel.clone());
        let _running = FinishGuard(&inner.cancels, &task_id);
        if inner.cancels.is_requested(&task_id) {
            cancel.cancel();
        }
        let soft = policy.soft_timeout.map(|t| Instant::now() + t);
        let mut soft_fired = false;
        let started = std::panic::catch_unwind(AssertUnwindSafe(|| registered.start(ctx, &plain)));
        let fut = match started {
            Ok(Ok(f)) => f,
            Ok(Err(DecodeError::Syntax(m))) => break 'run Outcome::Undecodable(m),
            Ok(Err(DecodeError::Args(m))) => break 'run Outcome::Failed(TaskError::permanent(m)),
            Err(p) => break 'run Outcome::Panicked(panic_message(p.as_ref())),
        };
        let fut = AssertUnwindSafe(fut).catch_unwind();
        tokio::pin!(fut);
        let hard = policy.timeout.map(|t| (t, Instant::now() + t));
        // A `running` record is written only for tasks still running after a moment:
        // fast tasks cost one result write, not two.
        let running_at = rec
            .as_ref()
            .filter(|_| inner.cfg.results.record_running)
            .map(|_| Instant::now() + RUNNING_RECORD_AFTER);
        let mut running_written = false;
        loop {
            tokio::select! {
                r = &mut fut => {
                    let outcome = match r {
                        Ok(Ok(v)) => Outcome::Succeeded(v),
                        Ok(Err(e)) => Outcome::Failed(e),
                        Err(p) => Outcome::Panicked(panic_message(p.as_ref())),
                    };
                    let outcome = match outcome {
                        // A cancelled task that did not finish its work is cancelled, not failed.
                        Outcome::Succeeded(v) => Outcome::Succeeded(v),
                        other if inner.cancels.is_requested(&task_id) => {
                            Outcome::Cancelled(format!("cancelled while running ({})", other.error_message().unwrap_or_default()))
                        }
                        other => other,
                    };
                    if let Some((b, p)) = &probe {
                        b.record(is_dependency_failure(&outcome), *p);
                    }
                    break 'run outcome;
                },
                _ = sleep_until_opt(soft), if soft.is_some() && !soft_fired => {
                    soft_fired = true;
                    tracing::warn!(task_id = %task_id, "soft time limit reached: cancellation requested");
                    cancel.cancel();
                }
                _ = sleep_until_opt(running_at), if running_at.is_some() && !running_written => {
                    running_written = true;
                    if let Some(r) = &rec
                        && let Err(e) = Box::pin(r.store.put(&r.record)).await
                    {
                        tracing::warn!(task_id = %task_id, error = %e, "cannot write running record");
                    }
                }
                _ = progress.tick() => {
                    if let Err(e) = Box::pin(d.progress()).await {
                        tracing::debug!(task_id = %task_id, error = %e, "progress not sent");
                    }
                }
                _ = sleep_until_opt(hard.map(|h| h.1)), if hard.is_some() => {
                    cancel.cancel();
                    if let Some((b, p)) = &probe {
                        b.record(true, *p);
                    }
                    break 'run Outcome::TimedOut(hard.map(|h| h.0).unwrap_or_default());
                }
                _ = inner.abort.cancelled() => {
                    Box::pin(release_at_shutdown(&d, rec.as_mut(), &task_id)).await;
                    tracing::info!(task_id = %task_id, task = %task_name, "released unfinished task at shutdown");
                    return;
                }
            }
        }
    };
    let elapsed = clock.elapsed();
    let decision = decide(
        &outcome,
        attempt,
        max_attempts,
        &policy.retry,
        fastrand::f64(),
    );
    span.record("task.outcome", outcome.kind());
    // Unregistered names come from publishers: one label for all of them, so a stream of
    // made-up task names cannot blow up metric cardinality.
    let metric_task = if registered.is_some() {
        std::borrow::Cow::Borrowed(task_name.as_str())
    } else {
        std::borrow::Cow::Owned(format!("{}._unknown", cat.name))
    };
    inner
        .stats
        .record(&metric_task, outcome.kind(), elapsed.as_secs_f64());

    let error = match &outcome {
        Outcome::Succeeded(_) => None,
        other => Some(other.error_message().unwrap_or_default()),
    };
    if let Some(Rec { record, .. }) = rec.as_mut() {
        record.finished_at = Some(Utc::now());
        record.duration_ms = Some(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
        record.state = match &decision {
            Decision::Ack => TaskState::Succeeded,
            Decision::Cancel => TaskState::Cancelled,
            Decision::Retry { .. } => TaskState::Retrying,
            Decision::DeadLetter { .. } => TaskState::Dead,
        };
        match (outcome, &error) {
            (Outcome::Succeeded(v), _) => record.result = Some(v),
            (other, message) => {
                let kind = match &decision {
                    Decision::DeadLetter { reason, .. } if reason.as_str() == "max_attempts" => {
                        "max_attempts"
                    }
                    _ => other.kind(),
                };
                record.error = Some(ErrorInfo {
                    kind: kind.to_owned(),
                    message: message.clone().unwrap_or_default(),
                });
            }
        }
    }
    match &decision {
        Decision::Cancel => tracing::info!(task_id = %task_id, task = %task_name, "task cancelled"),
        Decision::Ack => {
            tracing::debug!(task_id = %task_id, task = %task_name, attempt, "task succeeded")
        }
        Decision::Retry { delay } => tracing::warn!(
            task_id = %task_id, task = %task_name, attempt, max_attempts, retry_in = ?delay,
            error = error.as_deref().unwrap_or(""), "task failed; will retry"),
        Decision::DeadLetter { reason, error } => tracing::error!(
            task_id = %task_id, task = %task_name, attempt, reason = reason.as_str(), error = %error,
            "task dead-lettered"),
    }
    let write_record = async {
        if let Some(r) = &rec
            && let Err(e) = Box::pin(r.store.put(&r.record)).await
        {
            tracing::warn!(task_id = %task_id, error = %e, "cannot write result record");
        }
    };
    let double_ack = inner.cfg.worker.double_ack;
    if matches!(decision, Decision::DeadLetter { .. }) {
        // The record says `dead` only once the dead letter is stored.
        match Box::pin(d.settle(&inner.conn.js, &decision, double_ack)).await {
            Ok(()) => write_record.await,
            Err(e) => {
                tracing::error!(task_id = %task_id, error = %e, "dead-lettering failed; the task will be redelivered")
            }
        }
    } else {
        write_record.await;
        if let Err(e) = Box::pin(d.settle(&inner.conn.js, &decision, double_ack)).await {
            tracing::warn!(task_id = %task_id, error = %e, "settling the delivery failed; it will be redelivered after ack_wait");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_lane_is_not_starved() {
        let low_first = (0..64).filter(|r| lane_order(*r) == [0, 2, 1]).count();
        assert_eq!(low_first, 8);
        assert!((0..64).all(|r| lane_order(r)[0] == 0));
    }
}
