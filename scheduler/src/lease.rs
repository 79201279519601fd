//! The leader lease: at most one scheduler replica fires at a time.
//!
//! The lease is one key ([`LEASE_KEY`]) in the `TASKMESH_LEASES` bucket, whose max age is
//! the lease TTL: a value that is not rewritten within the TTL disappears.
//!
//! - **Acquire**: a follower `create`s the key (succeeds only when it is absent, expired or
//!   deleted). It retries every [`LeaseConfig::poll_every`] and at once when it sees the key
//!   deleted (a leader resigned), so a clean hand-over takes milliseconds and a crashed
//!   leader is replaced about one TTL after its last renewal.
//! - **Renew**: the leader rewrites the key every [`LeaseConfig::renew_every`] (TTL/3) with a
//!   compare-and-set on the revision it last wrote (`update(key, value, revision)`).
//!   `kv.update` drops a per-key TTL, which is why the TTL is the bucket's max age.
//! - **Step down**: a renewal refused because the revision moved means another replica
//!   holds the lease: the leader steps down at once.
//! - **Trust window**: a write that starts at monotonic instant `t0` lands at or after
//!   `t0`, so the key cannot expire (and nobody else can acquire it) before `t0 + TTL`.
//!   The leader therefore trusts its lease until `t0 + TTL − margin` of the *start* of its
//!   last successful write, on tokio's monotonic clock. A renewal in flight does not extend
//!   the window: when the window runs out the leader stops firing, whatever the renewal
//!   is doing. [`Leadership::is_trusted`] is the check the firing loop makes before every
//!   publish.
//! - **In-doubt writes**: a write whose outcome is unknown (a timeout) may have landed.
//!   Each acquisition writes a fresh random `token` into the value, so when the next CAS
//!   is refused the replica reads the key: if it holds its own token at a new revision, the
//!   in-doubt write landed and the replica adopts that revision, trusting it from the start
//!   of the *earliest* in-doubt request. Otherwise it steps down.
//! - **Resign**: on shutdown the leader deletes the key with its expected revision.
//!
//! The store is a trait ([`LeaseStore`]) so the state machine runs against an in-memory
//! store with paused tokio time in tests; [`KvLeaseStore`] is the NATS KV implementation.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use taskmesh_nats::async_nats::jetstream::kv;
use taskmesh_shared::Clock;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

/// The key of the scheduler's lease in `TASKMESH_LEASES`.
pub const LEASE_KEY: &str = "scheduler";

/// Timing of the lease, all derived from the TTL by [`LeaseConfig::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The KV key ([`LEASE_KEY`]).
    pub key: String,
    /// This replica's id, written into the value (`holder`).
    pub holder: String,
    /// The lease TTL: the lease bucket's max age.
    pub ttl: Duration,
    /// How often the leader renews: TTL/3.
    pub renew_every: Duration,
    /// Subtracted from the TTL to get the trust window (clock-rate drift, scheduling
    /// delays): TTL/5, at least 100 ms.
    pub margin: Duration,
    /// How often a follower tries to acquire, and how soon a failed renewal is retried:
    /// TTL/10 within 50 ms..=1 s.
    pub poll_every: Duration,
    /// Longest wait for one KV request: TTL/3.
    pub request_timeout: Duration,
}

impl LeaseConfig {
    /// The timings for `ttl` (which must be the lease bucket's max age).
    pub fn new(holder: impl Into<String>, ttl: Duration) -> Self {
        let margin = (ttl / 5).max(Duration::from_millis(100)).min(ttl / 2);
        Self {
            key: LEASE_KEY.to_owned(),
            holder: holder.into(),
            ttl,
            renew_every: ttl / 3,
            margin,
            poll_every: (ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(1)),
            request_timeout: ttl / 3,
        }
    }

    /// How long a successful write is trusted, counted from the start of its request:
    /// `ttl − margin`.
    pub fn trust(&self) -> Duration {
        self.ttl.saturating_sub(self.margin)
    }
}

/// The lease value (JSON) stored under [`LEASE_KEY`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseValue {
    /// The holder's replica id (`taskmesh scheduler --id`).
    pub holder: String,
    /// Random per acquisition: tells this replica's own in-doubt writes from others'.
    pub token: String,
    /// When this holder acquired the lease (its wall clock).
    pub acquired_at: DateTime<Utc>,
    /// When it last renewed it (its wall clock).
    pub renewed_at: DateTime<Utc>,
}

impl LeaseValue {
    /// Parses a stored value.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// What this replica knows about its leadership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leadership {
    /// Another replica (or nobody) holds the lease.
    Follower,
    /// This replica holds the lease (as far as it knows).
    Leader {
        /// Counts this replica's acquisitions (1, 2, …).
        term: u64,
        /// The end of the trust window: do not fire at or after this instant.
        trusted_until: Instant,
    },
}

impl Leadership {
    /// Whether this replica may fire now.
    pub fn is_trusted(&self) -> bool {
        self.is_trusted_at(Instant::now())
    }

    /// Whether this replica may fire at `now`.
    pub fn is_trusted_at(&self, now: Instant) -> bool {
        matches!(self, Leadership::Leader { trusted_until, .. } if now < *trusted_until)
    }

    /// The end of the trust window, for a leader.
    pub fn trusted_until(&self) -> Option<Instant> {
        match self {
            Leadership::Leader { trusted_until, .. } => Some(*trusted_until),
            Leadership::Follower => None,
        }
    }
}

/// Why a lease store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseStoreError {
    /// The compare-and-set was refused: the key exists (`create`) or its revision moved
    /// (`update`, `delete`).
    #[error("lease revision conflict")]
    Conflict,
    /// The store could not be reached or did not answer; the write may or may not have
    /// landed.
    #[error("lease store unavailable: {0}")]
    Unavailable(String),
}

/// The compare-and-set store a lease lives in.
pub trait LeaseStore: Send + Sync + 'static {
    /// Writes `value` if `key` is absent, expired or deleted; returns the new revision.
    fn create(
        &self,
        key: &str,
        value: Bytes,
    ) -> impl Future<Output = Result<u64, LeaseStoreError>> + Send;
    /// Writes `value` if `key`'s current revision is `revision`; returns the new revision.
    fn update(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> impl Future<Output = Result<u64, LeaseStoreError>> + Send;
    /// The current value and revision; `None` when absent, expired or deleted.
    fn get(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<(u64, Bytes)>, LeaseStoreError>> + Send;
    /// Deletes `key` if its current revision is `revision`.
    fn delete(
        &self,
        key: &str,
        revision: u64,
    ) -> impl Future<Output = Result<(), LeaseStoreError>> + Send;
    /// A stream that yields whenever `key` is deleted (a leader resigned).
    fn deletions(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<BoxStream<'static, ()>, LeaseStoreError>> + Send;
}

/// [`LeaseStore`] on a NATS KV bucket (`TASKMESH_LEASES`).
#[derive(Debug, Clone)]
pub struct KvLeaseStore(pub kv::Store);

fn unavailable(e: impl std::fmt::Display) -> LeaseStoreError {
    LeaseStoreError::Unavailable(e.to_string())
}

impl LeaseStore for KvLeaseStore {
    async fn create(&self, key: &str, value: Bytes) -> Result<u64, LeaseStoreError> {
        self.0.create(key, value).await.map_err(|e| match e.kind() {
            kv::CreateErrorKind::AlreadyExists => LeaseStoreError::Conflict,
            _ => unavailable(e),
        })
    }

    async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64, LeaseStoreError> {
        self.0
            .update(key, value, revision)
            .await
            .map_err(|e| match e.kind() {
                kv::UpdateErrorKind::WrongLastRevision => LeaseStoreError::Conflict,
                _ => unavailable(e),
            })
    }

    async fn get(&self, key: &str) -> Result<Option<(u64, Bytes)>, LeaseStoreError> {
        Ok(self
            .0
            .entry(key)
            .await
            .map_err(unavailable)?
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| (e.revision, e.value)))
    }

    async fn delete(&self, key: &str, revision: u64) -> Result<(), LeaseStoreError> {
        self.0
            .delete_expect_revision(key, Some(revision))
            .await
            .map_err(unavailable)
    }

    async fn deletions(&self, key: &str) -> Result<BoxStream<'static, ()>, LeaseStoreError> {
        let watch = self.0.watch(key).await.map_err(unavailable)?;
        Ok(watch
            .filter_map(|e| async move {
                match e {
                    Ok(e) if e.operation != kv::Operation::Put => Some(()),
                    // A watcher error may hide a deletion: treat it as one (a harmless
                    // extra acquisition attempt).
                    Err(_) => Some(()),
                    Ok(_) => None,
                }
            })
            .boxed())
    }
}

/// The lease as stored now (who leads), or `None` when nobody holds it.
pub async fn current(
    js: &taskmesh_nats::async_nats::jetstream::Context,
) -> Result<Option<(u64, LeaseValue)>, crate::SchedulerError> {
    let kv = taskmesh_nats::topology::bucket(js, taskmesh_shared::wire::LEASES_BUCKET).await?;
    let entry = kv
        .entry(LEASE_KEY)
        .await
        .map_err(|e| crate::SchedulerError::kv("reading the scheduler lease", e))?;
    Ok(entry
        .filter(|e| e.operation == kv::Operation::Put)
        .and_then(|e| LeaseValue::decode(&e.value).map(|v| (e.revision, v))))
}

/// A running lease: a background task that acquires, renews and finally resigns it.
///
/// Dropping it without [`resign`](Lease::resign) still resigns in the background.
#[derive(Debug)]
pub struct Lease {
    rx: watch::Receiver<Leadership>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Lease {
    /// Starts competing for the lease in `store`.
    pub fn start<S: LeaseStore>(store: S, cfg: LeaseConfig, clock: Arc<dyn Clock>) -> Lease {
        let (tx, rx) = watch::channel(Leadership::Follower);
        let stop = CancellationToken::new();
        let machine = Machine {
            store,
            cfg,
            clock,
            tx,
            term: 0,
            held: None,
            pending_create: None,
        };
        let task = tokio::spawn(machine.run(stop.clone()));
        Lease {
            rx,
            stop,
            task: Some(task),
        }
    }

    /// The current leadership.
    pub fn leadership(&self) -> Leadership {
        *self.rx.borrow()
    }

    /// A receiver that sees every change of leadership (acquired, renewed, lost).
    pub fn subscribe(&self) -> watch::Receiver<Leadership> {
        self.rx.clone()
    }

    /// Stops renewing and deletes the key (if held), so a follower takes over at once.
    /// Returns when done (bounded by the request timeout).
    pub async fn resign(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The lease held by this replica.
#[derive(Debug)]
struct Held {
    term: u64,
    revision: u64,
    value: LeaseValue,
    trusted_until: Instant,
    /// Start of the last renewal attempt.
    last_attempt: Instant,
    /// The last attempt failed: retry after `poll_every` instead of `renew_every`.
    failing: bool,
    /// Start of the earliest request whose outcome is unknown since the last known write.
    in_doubt_since: Option<Instant>,
}

/// A `create` whose outcome is unknown.
#[derive(Debug)]
struct PendingCreate {
    token: String,
    started: Instant,
}

struct Machine<S> {
    store: S,
    cfg: LeaseConfig,
    clock: Arc<dyn Clock>,
    tx: watch::Sender<Leadership>,
    term: u64,
    held: Option<Held>,
    pending_create: Option<PendingCreate>,
}

impl<S: LeaseStore> Machine<S> {
    async fn run(mut self, stop: CancellationToken) {
        let mut deletions: Option<BoxStream<'static, ()>> = None;
        loop {
            if stop.is_cancelled() {
                break;
            }
            if let Some(next) = self.next_renewal() {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = sleep_until(next) => {}
                }
                // Not interrupted by `stop`: an aborted renewal could land unseen and make
                // the resignation's expected revision stale. It is bounded by the timeout,
                // and the firing loop stops on the trust window, not on this.
                self.renew().await;
                if self.held.is_none() {
                    deletions = None;
                }
            } else {
                if deletions.is_none() {
                    deletions = self.store.deletions(&self.cfg.key).await.ok();
                }
                let acquired = tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    acquired = self.try_acquire() => acquired,
                };
                if acquired {
                    deletions = None;
                    continue;
                }
                let poll = sleep(self.cfg.poll_every);
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    ended = next_deletion(&mut deletions) => {
                        if ended {
                            deletions = None;
                        }
                    }
                    () = poll => {}
                }
            }
        }
        self.resign().await;
    }

    fn next_renewal(&self) -> Option<Instant> {
        self.held.as_ref().map(|h| {
            h.last_attempt
                + if h.failing {
                    self.cfg.poll_every
                } else {
                    self.cfg.renew_every
                }
        })
    }

    fn publish(&self) {
        let state = match &self.held {
            Some(h) => Leadership::Leader {
                term: h.term,
                trusted_until: h.trusted_until,
            },
            None => Leadership::Follower,
        };
        self.tx.send_replace(state);
    }

    fn became_leader(&mut self, revision: u64, value: LeaseValue, trusted_from: Instant) {
        self.term += 1;
        tracing::info!(
            holder = %self.cfg.holder,
            term = self.term,
            revision,
            "acquired the scheduler lease"
        );
        self.held = Some(Held {
            term: self.term,
            revision,
            value,
            trusted_until: trusted_from + self.cfg.trust(),
            last_attempt: trusted_from,
            failing: false,
            in_doubt_since: None,
        });
        self.pending_create = None;
        self.publish();
    }

    async fn read_own(&self, token: &str) -> Option<(u64, LeaseValue)> {
        match timeout(self.cfg.request_timeout, self.store.get(&self.cfg.key)).await {
            Ok(Ok(Some((revision, bytes)))) => {
                LeaseValue::decode(&bytes).and_then(|v| (v.token == token).then_some((revision, v)))
            }
            _ => None,
        }
    }

    /// One acquisition attempt; true when this replica now holds the lease.
    async fn try_acquire(&mut self) -> bool {
        let t0 = Instant::now();
        if self
            .pending_create
            .as_ref()
            .is_some_and(|p| t0.duration_since(p.started) >= self.cfg.ttl)
        {
            // Whatever that attempt wrote has expired by now.
            self.pending_create = None;
        }
        let token = match &self.pending_create {
            Some(p) => p.token.clone(),
            None => uuid::Uuid::now_v7().simple().to_string(),
        };
        let now = self.clock.now();
        let value = LeaseValue {
            holder: self.cfg.holder.clone(),
            token: token.clone(),
            acquired_at: now,
            renewed_at: now,
        };
        let result = timeout(
            self.cfg.request_timeout,
            self.store.create(&self.cfg.key, value.encode()),
        )
        .await;
        match result {
            Ok(Ok(revision)) => {
                self.became_leader(revision, value, t0);
                true
            }
            Ok(Err(LeaseStoreError::Conflict)) => {
                if let Some(p) = self.pending_create.take()
                    && let Some((revision, stored)) = self.read_own(&p.token).await
                {
                    tracing::info!("an earlier in-doubt lease request had succeeded");
                    self.became_leader(revision, stored, p.started);
                    return true;
                }
                false
            }
            Ok(Err(LeaseStoreError::Unavailable(e))) => {
                tracing::warn!(error = %e, "cannot reach the lease bucket; retrying");
                self.pending_create
                    .get_or_insert(PendingCreate { token, started: t0 });
                false
            }
            Err(_) => {
                tracing::warn!(
                    timeout = ?self.cfg.request_timeout,
                    "lease request timed out; retrying"
                );
                self.pending_create
                    .get_or_insert(PendingCreate { token, started: t0 });
                false
            }
        }
    }

    /// One renewal attempt (the caller holds the lease).
    async fn renew(&mut self) {
        let Some(h) = self.held.as_mut() else {
            return;
        };
        let t0 = Instant::now();
        h.last_attempt = t0;
        let value = LeaseValue {
            renewed_at: self.clock.now(),
            ..h.value.clone()
        };
        let revision = h.revision;
        let result = timeout(
            self.cfg.request_timeout,
            self.store.update(&self.cfg.key, value.encode(), revision),
        )
        .await;
        let trust = self.cfg.trust();
        match result {
            Ok(Ok(new_revision)) => {
                if let Some(h) = self.held.as_mut() {
                    if h.failing {
                        tracing::info!("lease renewal works again");
                    }
                    h.revision = new_revision;
                    h.value = value;
                    h.trusted_until = t0 + trust;
                    h.failing = false;
                    h.in_doubt_since = None;
                }
                self.publish();
            }
            Ok(Err(LeaseStoreError::Conflict)) => {
                let (token, in_doubt) = match &self.held {
                    Some(h) => (h.value.token.clone(), h.in_doubt_since),
                    None => return,
                };
                if let Some(since) = in_doubt
                    && let Some((stored_rev, _)) = self.read_own(&token).await
                    && stored_rev != revision
                    && let Some(h) = self.held.as_mut()
                {
                    // One of our in-doubt renewals landed: adopt it. It started no earlier
                    // than `since`, so the key lives at least until `since + ttl`.
                    tracing::info!("an earlier in-doubt lease renewal had succeeded");
                    h.revision = stored_rev;
                    h.trusted_until = h.trusted_until.max(since + trust);
                    h.in_doubt_since = None;
                    h.failing = true; // renew again soon, from a known revision
                    self.publish();
                    return;
                }
                tracing::warn!(
                    holder = %self.cfg.holder,
                    "lost the scheduler lease: another replica holds it; stepping down"
                );
                self.held = None;
                self.publish();
            }
            Ok(Err(LeaseStoreError::Unavailable(e))) => {
                tracing::warn!(error = %e, "lease renewal failed; retrying");
                self.renewal_in_doubt(t0);
            }
            Err(_) => {
                tracing::warn!(
                    timeout = ?self.cfg.request_timeout,
                    "lease renewal timed out; retrying"
                );
                self.renewal_in_doubt(t0);
            }
        }
    }

    fn renewal_in_doubt(&mut self, started: Instant) {
        if let Some(h) = self.held.as_mut() {
            h.failing = true;
            h.in_doubt_since.get_or_insert(started);
        }
    }

    async fn resign(&mut self) {
        let Some(h) = self.held.take() else {
            return;
        };
        // Stop firing before the key goes away.
        self.publish();
        match timeout(
            self.cfg.request_timeout,
            self.store.delete(&self.cfg.key, h.revision),
        )
        .await
        {
            Ok(Ok(())) => tracing::info!(holder = %self.cfg.holder, "resigned the scheduler lease"),
            Ok(Err(e)) => tracing::warn!(
                error = %e,
                ttl = ?self.cfg.ttl,
                "could not resign the scheduler lease; it expires within its ttl"
            ),
            Err(_) => tracing::warn!(
                ttl = ?self.cfg.ttl,
                "resigning the scheduler lease timed out; it expires within its ttl"
            ),
        }
    }
}

/// Waits for the next deletion; true when the stream ended (it must be recreated). With
/// no stream, never resolves.
async fn next_deletion(deletions: &mut Option<BoxStream<'static, ()>>) -> bool {
    match deletions {
        Some(stream) => stream.next().await.is_none(),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use taskmesh_shared::clock::SystemClock;
    use tokio::sync::broadcast;
    use tokio_stream_shim::broadcast_stream;

    use super::*;

    /// What the fake store does with the next requests.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Mode {
        /// Behave.
        Normal,
        /// Never answer.
        Hang,
        /// Refuse without writing.
        Fail,
        /// Write, then report a failure (an ack lost on the way back).
        ApplyThenFail,
    }

    #[derive(Debug)]
    struct Entry {
        revision: u64,
        value: Bytes,
        written: Instant,
        deleted: bool,
    }

    #[derive(Debug)]
    struct Inner {
        seq: u64,
        entry: Option<Entry>,
        ttl: Duration,
    }

    /// An in-memory KV key with a bucket max age, on tokio time. Clones share the key and
    /// the script; [`FakeStore::handle`] gives a connection of its own (own script).
    #[derive(Debug, Clone)]
    struct FakeStore {
        inner: Arc<Mutex<Inner>>,
        deleted: broadcast::Sender<()>,
        modes: Arc<Mutex<VecDeque<Mode>>>,
    }

    impl FakeStore {
        fn new(ttl: Duration) -> Self {
            Self {
                inner: Arc::new(Mutex::new(Inner {
                    seq: 0,
                    entry: None,
                    ttl,
                })),
                deleted: broadcast::channel(16).0,
                modes: Arc::default(),
            }
        }

        /// Another client of the same key, with its own script.
        fn handle(&self) -> Self {
            Self {
                modes: Arc::default(),
                ..self.clone()
            }
        }

        /// The next requests of this handle behave as `modes` say, then normally.
        fn script(&self, modes: &[Mode]) {
            self.modes.lock().unwrap().extend(modes.iter().copied());
        }

        /// Overwrites the key as another party would.
        fn overwrite(&self, value: &LeaseValue) {
            let mut g = self.inner.lock().unwrap();
            g.seq += 1;
            g.entry = Some(Entry {
                revision: g.seq,
                value: value.encode(),
                written: Instant::now(),
                deleted: false,
            });
        }

        fn holder(&self) -> Option<String> {
            let mut g = self.inner.lock().unwrap();
            Self::expire(&mut g);
            g.entry
                .as_ref()
                .filter(|e| !e.deleted)
                .and_then(|e| LeaseValue::decode(&e.value))
                .map(|v| v.holder)
        }

        fn expire(g: &mut Inner) {
            if g.entry
                .as_ref()
                .is_some_and(|e| e.written.elapsed() >= g.ttl)
            {
                g.entry = None;
            }
        }

        /// Applies `f` unless the scripted mode says otherwise.
        async fn op<T: Send>(
            &self,
            f: impl FnOnce(&mut Inner) -> Result<T, LeaseStoreError> + Send,
        ) -> Result<T, LeaseStoreError> {
            let mode = self
                .modes
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Mode::Normal);
            // Every request takes a little time, as a real one does.
            sleep(Duration::from_millis(2)).await;
            match mode {
                Mode::Hang => std::future::pending().await,
                Mode::Fail => Err(LeaseStoreError::Unavailable("scripted failure".into())),
                Mode::Normal | Mode::ApplyThenFail => {
                    let result = {
                        let mut g = self.inner.lock().unwrap();
                        Self::expire(&mut g);
                        f(&mut g)
                    };
                    if mode == Mode::ApplyThenFail {
                        Err(LeaseStoreError::Unavailable("scripted lost ack".into()))
                    } else {
                        result
                    }
                }
            }
        }

        fn last_revision(g: &Inner) -> u64 {
            g.entry.as_ref().map_or(0, |e| e.revision)
        }

        fn write(g: &mut Inner, value: Bytes, deleted: bool) -> u64 {
            g.seq += 1;
            g.entry = Some(Entry {
                revision: g.seq,
                value,
                written: Instant::now(),
                deleted,
            });
            g.seq
        }
    }

    impl LeaseStore for FakeStore {
        async fn create(&self, _key: &str, value: Bytes) -> Result<u64, LeaseStoreError> {
            self.op(move |g| match &g.entry {
                Some(e) if !e.deleted => Err(LeaseStoreError::Conflict),
                _ => Ok(Self::write(g, value, false)),
            })
            .await
        }

        async fn update(
            &self,
            _key: &str,
            value: Bytes,
            revision: u64,
        ) -> Result<u64, LeaseStoreError> {
            self.op(move |g| {
                if Self::last_revision(g) == revision {
                    Ok(Self::write(g, value, false))
                } else {
                    Err(LeaseStoreError::Conflict)
                }
            })
            .await
        }

        async fn get(&self, _key: &str) -> Result<Option<(u64, Bytes)>, LeaseStoreError> {
            self.op(|g| {
                Ok(g.entry
                    .as_ref()
                    .filter(|e| !e.deleted)
                    .map(|e| (e.revision, e.value.clone())))
            })
            .await
        }

        async fn delete(&self, _key: &str, revision: u64) -> Result<(), LeaseStoreError> {
            let deleted = self.deleted.clone();
            self.op(move |g| {
                if Self::last_revision(g) == revision {
                    Self::write(g, Bytes::new(), true);
                    let _ = deleted.send(());
                    Ok(())
                } else {
                    Err(LeaseStoreError::Conflict)
                }
            })
            .await
        }

        async fn deletions(&self, _key: &str) -> Result<BoxStream<'static, ()>, LeaseStoreError> {
            Ok(broadcast_stream(self.deleted.subscribe()))
        }
    }

    /// A tiny broadcast → stream adapter (no tokio-stream dependency).
    mod tokio_stream_shim {
        use futures::stream::BoxStream;
        use tokio::sync::broadcast;

        pub(super) fn broadcast_stream(rx: broadcast::Receiver<()>) -> BoxStream<'static, ()> {
            Box::pin(futures::stream::unfold(rx, |mut rx| async move {
                match rx.recv().await {
                    Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => Some(((), rx)),
                    Err(broadcast::error::RecvError::Closed) => None,
                }
            }))
        }
    }

    const TTL: Duration = Duration::from_secs(3);

    fn start(store: &FakeStore, holder: &str) -> Lease {
        Lease::start(
            store.clone(),
            LeaseConfig::new(holder, TTL),
            Arc::new(SystemClock),
        )
    }

    /// Steps tokio time by `step` until `cond` holds, at most `limit`; returns the time
    /// taken.
    async fn until(limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        let step = Duration::from_millis(10);
        while !cond() {
            assert!(
                start.elapsed() < limit,
                "condition not met within {limit:?}"
            );
            sleep(step).await;
        }
        start.elapsed()
    }

    /// Runs for `span`, checking every 5 ms that at most one lease is trusted.
    async fn assert_exclusive(leases: &[&Lease], span: Duration) -> Vec<usize> {
        let start = Instant::now();
        let mut trusted_counts = vec![0; leases.len()];
        while start.elapsed() < span {
            let now = Instant::now();
            let trusted: Vec<usize> = (0..leases.len())
                .filter(|i| leases[*i].leadership().is_trusted_at(now))
                .collect();
            assert!(trusted.len() <= 1, "two trusted leaders: {trusted:?}");
            for i in trusted {
                trusted_counts[i] += 1;
            }
            sleep(Duration::from_millis(5)).await;
        }
        trusted_counts
    }

    #[test]
    fn timings_follow_the_ttl() {
        let c = LeaseConfig::new("a", Duration::from_secs(3));
        assert_eq!(c.renew_every, Duration::from_secs(1));
        assert_eq!(c.margin, Duration::from_millis(600));
        assert_eq!(c.trust(), Duration::from_millis(2400));
        assert_eq!(c.poll_every, Duration::from_millis(300));
        let c = LeaseConfig::new("a", Duration::from_secs(60));
        assert_eq!(c.poll_every, Duration::from_secs(1));
        assert!(c.trust() > c.renew_every * 2);
        let c = LeaseConfig::new("a", Duration::from_millis(200));
        assert_eq!(c.margin, Duration::from_millis(100));
        assert_eq!(c.poll_every, Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn first_replica_acquires_and_keeps_renewing() {
        let store = FakeStore::new(TTL);
        let a = start(&store, "a");
        until(Duration::from_secs(1), || a.leadership().is_trusted()).await;
        let first = a.leadership().trusted_until().unwrap();
        // Renewals move the trust window forward; the value stays ours for a long time.
        sleep(Duration::from_secs(10)).await;
        assert!(a.leadership().is_trusted());
        assert!(a.leadership().trusted_until().unwrap() > first + Duration::from_secs(8));
        assert_eq!(store.holder().as_deref(), Some("a"));
        assert!(matches!(a.leadership(), Leadership::Leader { term: 1, .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn only_one_of_three_leads() {
        let store = FakeStore::new(TTL);
        let (a, b, c) = (start(&store, "a"), start(&store, "b"), start(&store, "c"));
        let counts = assert_exclusive(&[&a, &b, &c], Duration::from_secs(20)).await;
        assert_eq!(
            counts.iter().filter(|n| **n > 0).count(),
            1,
            "exactly one replica led: {counts:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn crashed_leader_is_replaced_after_the_ttl() {
        let store = FakeStore::new(TTL);
        let a = start(&store, "a");
        until(Duration::from_secs(1), || a.leadership().is_trusted()).await;
        let b = start(&store, "b");
        sleep(Duration::from_secs(2)).await;
        assert_eq!(b.leadership(), Leadership::Follower);
        // A crash: a's task stops without resigning. The last renewal was at most
        // renew_every ago.
        let crash = Instant::now();
        let task = {
            let mut a = a;
            a.task.take().unwrap()
        };
        task.abort();
        let took = until(Duration::from_secs(10), || b.leadership().is_trusted()).await;
        assert!(
            took <= TTL + Duration::from_millis(400),
            "takeover took {took:?} after the crash"
        );
        assert!(crash.elapsed() >= TTL - Duration::from_secs(1) - Duration::from_millis(20));
        assert_eq!(store.holder().as_deref(), Some("b"));
    }

    #[tokio::test(start_paused = true)]
    async fn resigning_hands_over_within_a_second() {
        let store = FakeStore::new(TTL);
        let a = start(&store, "a");
        until(Duration::from_secs(1), || a.leadership().is_trusted()).await;
        let b = start(&store, "b");
        sleep(Duration::from_millis(500)).await;
        let t = Instant::now();
        a.resign().await;
        let took = until(Duration::from_secs(5), || b.leadership().is_trusted()).await;
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "hand-over took {:?}",
            t.elapsed()
        );
        assert!(took < Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_renewal_steps_down_at_once() {
        let store = FakeStore::new(TTL);
        let a = start(&store, "a");
        until(Duration::from_secs(1), || a.leadership().is_trusted()).await;
        // Someone else writes the key (a replica that saw it expire, say).
        store.overwrite(&LeaseValue {
            holder: "z".into(),
            token: "other".into(),
            acquired_at: Utc::now(),
            renewed_at: Utc::now(),
        });
        // The next renewal (within renew_every) is refused: step down then, not at the
        // end of the trust window.
        let took = until(Duration::from_secs(2), || {
            a.leadership() == Leadership::Follower
        })
        .await;
        assert!(
            took <= Duration::from_millis(1100),
            "stepped down after {took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn trust_runs_out_while_a_renewal_hangs() {
        let store = FakeStore::new(TTL);
        let (sa, sb) = (store.handle(), store.handle());
        let a = start(&sa, "a");
        until(Duration::from_secs(1), || a.leadership().is_trusted()).await;
        let trusted_until = a.leadership().trusted_until().unwrap();
        // Every request from now on hangs: renewals are in flight, never answered.
        sa.script(&[Mode::Hang; 100]);
        sb.script(&[Mode::Hang; 100]);
        let b = start(&sb, "b");
        let counts = assert_exclusive(&[&a, &b], Duration::from_secs(6)).await;
        // a stopped trusting exactly at the end of its window (no renewal extended it)…
        assert_eq!(a.leadership().trusted_until(), Some(trusted_until));
        assert!(!a.leadership().is_trusted());
        assert!(counts[0] > 0);
        // …and b could not acquire while the store hung either.
        assert_eq!(counts[1], 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_that_stops_renewing_never_overlaps_its_successor() {
        let store = FakeStore::new(TTL);
        let sa = store.handle();
        let a = start(&sa, "a");
        until(Duration::from_secs(1), || a.leadership().is_trusted()).await;
        let b = start(&store.handle(), "b");
        sleep(Duration::from_millis(100)).await;
        // a's renewals all fail (a partition on a's side only): b takes over when the
        // key expires; a must have stopped trusting before that.
        sa.script(&[Mode::Fail; 200]);
        let counts = assert_exclusive(&[&a, &b], Duration::from_secs(12)).await;
        assert!(counts[1] > 0, "b took over: {counts:?}");
        assert!(b.leadership().is_trusted());
        assert_eq!(store.holder().as_deref(), Some("b"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_in_doubt_renewal_that_landed_is_adopted() {
        let store = FakeStore::new(TTL);
        let a = start(&store, "a");
        until(Duration::from_secs(1), || a.leadership().is_trusted()).await;
        // The next renewal is written but its ack is lost; the one after that is refused
        // (stale revision) and must be recognised as our own write.
        store.script(&[Mode::ApplyThenFail]);
        sleep(Duration::from_secs(6)).await;
        assert!(a.leadership().is_trusted(), "{:?}", a.leadership());
        assert!(matches!(a.leadership(), Leadership::Leader { term: 1, .. }));
        assert_eq!(store.holder().as_deref(), Some("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_in_doubt_create_that_landed_is_adopted() {
        let store = FakeStore::new(TTL);
        store.script(&[Mode::ApplyThenFail]);
        let a = start(&store, "a");
        let took = until(Duration::from_secs(2), || a.leadership().is_trusted()).await;
        assert!(took < Duration::from_secs(1), "took {took:?}");
        assert_eq!(store.holder().as_deref(), Some("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_a_lease_resigns_it() {
        let store = FakeStore::new(TTL);
        let a = start(&store, "a");
        until(Duration::from_secs(1), || a.leadership().is_trusted()).await;
        drop(a);
        until(Duration::from_millis(200), || store.holder().is_none()).await;
    }
}
