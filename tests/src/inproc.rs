//! [`InProcMesh`]: a nats-server plus workers running inside the test process, for tests
//! that register their own handlers.

use std::sync::Arc;
use std::time::Duration;

use taskmesh_nats::Client;
use taskmesh_shared::config::CategoryConfig;
use taskmesh_shared::{Category, Config, TaskId, TaskRecord, TaskState};
use taskmesh_workers::{Registry, Stats, Worker, WorkerOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{NatsServer, eventually};

/// A running in-process worker.
pub struct RunningWorker {
    /// Fire to drain and stop it.
    pub stop: CancellationToken,
    /// Its counters.
    pub stats: Arc<Stats>,
    /// Its task.
    pub handle: JoinHandle<()>,
}

/// A message stored in `TASKS_DLQ`.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// `dlq.<category>.<name>`.
    pub subject: String,
    /// The original headers plus `Dlq-*`.
    pub headers: async_nats::HeaderMap,
    /// The original body.
    pub payload: bytes::Bytes,
}

impl DeadLetter {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }
}

/// A server, a provisioned config and a producer.
pub struct InProcMesh {
    /// The server.
    pub server: NatsServer,
    /// The config every worker gets.
    pub cfg: Arc<Config>,
    /// A producer.
    pub client: Client,
}

/// A config with one category `name` (no seed categories) pointing at `url`.
pub fn one_category_config(url: &str, name: &str, cat: CategoryConfig) -> Config {
    let mut cfg = Config {
        seed_categories: false,
        ..Config::default()
    };
    cfg.categories.clear();
    cfg.categories
        .insert(Category::new(name).expect("category name"), cat);
    cfg.nats.url = url.to_owned();
    cfg.worker.drain_grace = Duration::from_secs(2);
    cfg.worker.heartbeat_interval = Duration::from_secs(1);
    cfg
}

impl InProcMesh {
    /// Starts a server and provisions `cfg` (its URL is replaced by the server's).
    pub async fn start(mut cfg: Config) -> Self {
        let server = NatsServer::start().await;
        cfg.nats.url = server.url();
        let cfg = Arc::new(cfg);
        let conn = taskmesh_nats::connect(&cfg.nats, "test", Duration::from_secs(5))
            .await
            .expect("connect");
        taskmesh_nats::provision(&conn.js, &cfg)
            .await
            .expect("provision");
        let client = Client::new(conn, &cfg).await.expect("client");
        Self {
            server,
            cfg,
            client,
        }
    }

    /// Starts a worker with `registry` and this mesh's config.
    pub async fn worker(&self, registry: Registry) -> RunningWorker {
        self.worker_with(registry, self.cfg.clone()).await
    }

    /// Starts a worker with its own config (same server).
    pub async fn worker_with(&self, registry: Registry, cfg: Arc<Config>) -> RunningWorker {
        let conn = taskmesh_nats::connect(&cfg.nats, "worker", Duration::from_secs(5))
            .await
            .expect("connect worker");
        let w = Worker::new(conn, cfg, Arc::new(registry), WorkerOptions::default())
            .await
            .expect("worker");
        let stats = w.stats();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let handle = tokio::spawn(async move {
            if let Err(e) = w.run(s).await {
                panic!("worker failed: {e}");
            }
        });
        RunningWorker {
            stop,
            stats,
            handle,
        }
    }

    /// The current record of a task.
    pub async fn record(&self, id: &TaskId) -> Option<TaskRecord> {
        self.client.result(id).await.expect("read result")
    }

    /// Waits until a task's record is in `state`.
    pub async fn wait_state(&self, id: &TaskId, state: TaskState, limit: Duration) -> TaskRecord {
        eventually(
            limit,
            &format!("task {id} is {}", state.as_str()),
            || async {
                match self.record(id).await {
                    Some(r) if r.state == state => Ok(r),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await
    }

    /// The dead letters stored so far.
    pub async fn dead_letters(&self) -> Vec<DeadLetter> {
        let js = &self.client.connection().js;
        let Ok(stream) = js.get_stream("TASKS_DLQ").await else {
            return Vec::new();
        };
        let last = stream.cached_info().state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            if let Ok(m) = stream.get_raw_message(seq).await {
                out.push(DeadLetter {
                    subject: m.subject.to_string(),
                    headers: m.headers.clone(),
                    payload: m.payload.clone(),
                });
            }
        }
        out
    }

    /// Waits for a dead letter on `subject`.
    pub async fn dead_letter_for(&self, subject: &str) -> DeadLetter {
        eventually(
            Duration::from_secs(20),
            &format!("a dead letter on {subject}"),
            || async {
                self.dead_letters()
                    .await
                    .into_iter()
                    .find(|m| m.subject == subject)
                    .ok_or_else(|| "none yet".to_string())
            },
        )
        .await
    }
}
