//! The least-privilege identities of `nats/conf/` on a real 3-node JetStream cluster.
//!
//! The cluster runs `nats/conf/cluster-common.conf` (JetStream with `sync_interval: always`,
//! and through it `accounts.conf` and `permissions.conf`) on loopback: each node's file here
//! only sets what differs on one machine (name, ports, store directory, routes) and
//! `include`s the real file. Clients authenticate with the committed development seeds in
//! `nats/conf/dev-nkeys/`.
//!
//! For every identity the tests prove it can do its job with the real code paths
//! (`taskmesh_nats::provision`, `Client::enqueue`, `topology::lane_consumer`, KV buckets,
//! the `taskmesh` binary) and that what it must not do is refused by the server: deleting
//! or purging streams, pulling from or acking another category's consumer, creating
//! consumers as a worker, publishing into another category, and reading another
//! service's inbox. A refusal is observed as the server's `Permissions Violation` error on
//! that connection, naming the exact subject.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, object_store};
use async_nats::{Event, HeaderMap};
use bytes::Bytes;
use futures::StreamExt;
use taskmesh_nats::publish::Unique;
use taskmesh_nats::{
    Cancels, Client, Connection, ConnectionState, EnqueueOptions, Heartbeats, Limits, NatsError,
    ResultStore,
};
use taskmesh_shared::config::Rate;
use taskmesh_shared::{Category, Config, Lane, TaskId, TaskName, WorkerHeartbeat, wire};
use taskmesh_tests::{TaskmeshProcess, eventually, nats_server_bin, workspace_root};
use tempfile::TempDir;

/// The seed categories, each with its own worker identity.
const CATEGORIES: [&str; 5] = ["ai", "email", "file", "sync", "maintenance"];
/// Catalog buckets the workers use (workers/src/catalog/store.rs); the provisioner creates
/// them, since a least-privilege worker cannot create streams.
const CATALOG_KV_BUCKETS: [&str; 4] = [
    "TASKMESH_EMAIL_LEDGER",
    "TASKMESH_CALENDAR",
    "TASKMESH_NOTION",
    "TASKMESH_CATALOG_STATE",
];
/// The default Object Store bucket of `file.sync_cloud_storage`.
const CATALOG_OBJECT_BUCKET: &str = "TASKMESH_FILES";
/// How long a refused operation may take to be reported by the server.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// The cluster, from nats/conf
// ---------------------------------------------------------------------------------------

fn conf_dir() -> PathBuf {
    workspace_root().join("nats/conf")
}

/// The development seed of an identity (`nats/conf/dev-nkeys/<name>.nk`).
fn seed_file(identity: &str) -> PathBuf {
    conf_dir().join("dev-nkeys").join(format!("{identity}.nk"))
}

/// The reply-inbox prefix an identity may subscribe to (`_INBOX_<name with _>`).
fn inbox_of(identity: &str) -> String {
    format!("_INBOX_{}", identity.replace('-', "_"))
}

fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// Three `nats-server` processes running `nats/conf/cluster-common.conf` on loopback.
struct Cluster {
    nodes: Vec<TaskmeshProcess>,
    urls: Vec<String>,
    _dir: TempDir,
}

impl Cluster {
    /// Starts the nodes and waits until every one answers JetStream requests (as the
    /// provisioner). `ack_v2` turns on the `js_ack_fc_v2` feature flag (the v2 ack subject
    /// layout, the default from nats-server 2.16).
    async fn start(ack_v2: bool) -> Self {
        for attempt in 1..=5 {
            match Self::launch(ack_v2).await {
                Ok(cluster) => return cluster,
                Err(e) if attempt < 5 => eprintln!("cluster start attempt {attempt}: {e}"),
                Err(e) => panic!("the 3-node cluster did not start: {e}"),
            }
        }
        unreachable!()
    }

    async fn launch(ack_v2: bool) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("taskmesh-identities-")
            .tempdir()
            .expect("temp dir");
        let ports = free_ports(9);
        let (clients, rest) = ports.split_at(3);
        let (routes, monitors) = rest.split_at(3);
        // nats-server resolves `include` relative to the including file: link the real
        // folder next to the generated node files.
        std::os::unix::fs::symlink(conf_dir(), dir.path().join("conf")).expect("link nats/conf");
        let route_list: Vec<String> = routes
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect();
        let mut nodes = Vec::new();
        for i in 0..3 {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            let flags = if ack_v2 {
                "feature_flags { js_ack_fc_v2: true }\n"
            } else {
                ""
            };
            let conf = format!(
                "# node {name} on loopback; everything else comes from nats/conf\n\
                 server_name: {name}\n\
                 listen: \"127.0.0.1:{client}\"\n\
                 http: \"127.0.0.1:{monitor}\"\n\
                 store_dir: \"{store}\"\n\
                 cluster {{\n  name: taskmesh\n  listen: \"127.0.0.1:{route}\"\n  routes: [{routes}]\n  connect_retries: 120\n}}\n\
                 {flags}\
                 include \"conf/cluster-common.conf\"\n",
                client = clients[i],
                monitor = monitors[i],
                route = routes[i],
                store = store.display(),
                routes = route_list.join(", "),
            );
            let path = dir.path().join(format!("{name}.conf"));
            std::fs::write(&path, conf).expect("write node config");
            let server = nats_server_bin();
            nodes.push(TaskmeshProcess::spawn_program(
                &server,
                &["-c", path.to_str().expect("utf-8 path")],
                &[],
            ));
        }
        let urls: Vec<String> = clients
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        let mut cluster = Self {
            nodes,
            urls,
            _dir: dir,
        };
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while tokio::time::Instant::now() < deadline {
            for node in &mut self.nodes {
                if !node.is_running() {
                    let log = node.log_tail(30);
                    return Err(format!("a node exited:\n{log}"));
                }
            }
            let mut ready = 0;
            for url in &self.urls {
                match node_answers(url).await {
                    Ok(()) => ready += 1,
                    Err(e) => last = format!("{url}: {e}"),
                }
            }
            if ready == self.urls.len() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let logs: Vec<String> = self.nodes.iter().map(|n| n.log_tail(15)).collect();
        Err(format!(
            "not ready after 60s; last: {last}\n{}",
            logs.join("\n---\n")
        ))
    }

    fn url_list(&self) -> String {
        self.urls.join(",")
    }
}

/// One readiness probe: the provisioner gets JetStream account info from this node.
async fn node_answers(url: &str) -> Result<(), String> {
    let seed = std::fs::read_to_string(seed_file("provisioner")).map_err(|e| e.to_string())?;
    let attempt = async {
        let client = async_nats::ConnectOptions::new()
            .nkey(seed.trim().to_owned())
            .custom_inbox_prefix(inbox_of("provisioner"))
            .connection_timeout(Duration::from_secs(1))
            .connect(url)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut js = jetstream::new(client);
        js.set_timeout(Duration::from_secs(2));
        js.query_account()
            .await
            .map(|_| ())
            .map_err(|e| format!("account info: {e}"))
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

// ---------------------------------------------------------------------------------------
// Sessions: one connection per identity, recording the server's permission errors
// ---------------------------------------------------------------------------------------

/// A connection as one identity, with every error the server reported on it.
struct Session {
    who: String,
    client: async_nats::Client,
    js: jetstream::Context,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Session {
    async fn connect(cluster: &Cluster, identity: &str) -> Self {
        let seed = std::fs::read_to_string(seed_file(identity))
            .unwrap_or_else(|e| panic!("seed of {identity}: {e}"));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        let client = async_nats::ConnectOptions::new()
            .nkey(seed.trim().to_owned())
            .custom_inbox_prefix(inbox_of(identity))
            .name(format!("identities-test {identity}"))
            .event_callback(move |event| {
                let sink = sink.clone();
                async move {
                    if let Event::ServerError(e) = event {
                        sink.lock().unwrap().push(e.to_string());
                    }
                }
            })
            .connect(cluster.urls.as_slice())
            .await
            .unwrap_or_else(|e| panic!("{identity} cannot connect: {e}"));
        let mut js = jetstream::new(client.clone());
        js.set_timeout(Duration::from_secs(10));
        Self {
            who: identity.to_owned(),
            client,
            js,
            errors,
        }
    }

    /// The connection as `taskmesh_nats` builds it.
    fn connection(&self) -> Connection {
        Connection {
            client: self.client.clone(),
            js: self.js.clone(),
            state: Arc::new(ConnectionState::default()),
        }
    }

    fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    /// Runs an operation the identity is allowed to do; panics with the server's
    /// permission errors when it fails.
    async fn allowed<T, E: std::fmt::Display>(
        &self,
        what: &str,
        op: impl Future<Output = Result<T, E>>,
    ) -> T {
        match tokio::time::timeout(Duration::from_secs(20), op).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => panic!(
                "{} must be allowed to {what}, but it failed: {e}; server errors: {:?}",
                self.who,
                self.errors()
            ),
            Err(_) => panic!(
                "{} must be allowed to {what}, but it timed out; server errors: {:?}",
                self.who,
                self.errors()
            ),
        }
    }

    /// Waits until the server reported a permission violation for `kind` (`Publish` or
    /// `Subscription`) on exactly `subject`.
    async fn violation(&self, what: &str, kind: &str, subject: &str) {
        let needle = format!("for {kind} to \"{subject}\"");
        let errors = self.errors.clone();
        let who = self.who.clone();
        eventually(
            REFUSAL_TIMEOUT,
            &format!("{who}: the server refuses to let it {what} ({kind} to {subject})"),
            || {
                let errors = errors.clone();
                let needle = needle.clone();
                async move {
                    let seen = errors.lock().unwrap().clone();
                    if seen.iter().any(|e| {
                        e.to_ascii_lowercase().contains("permissions violation")
                            && e.contains(&needle)
                    }) {
                        Ok(())
                    } else {
                        Err(format!("server errors so far: {seen:?}"))
                    }
                }
            },
        )
        .await;
    }

    /// Publishes a request to `subject` (as the client library would) and expects the
    /// server to refuse it.
    async fn refused_publish(&self, what: &str, subject: &str, body: &'static str) {
        let reply = self.client.new_inbox();
        self.client
            .publish_with_reply(
                subject.to_owned(),
                reply,
                Bytes::from_static(body.as_bytes()),
            )
            .await
            .expect("publish");
        self.client.flush().await.expect("flush");
        self.violation(what, "Publish", subject).await;
    }

    /// Subscribes to `subject` and expects the server to refuse it.
    async fn refused_subscribe(&self, what: &str, subject: &str) {
        let _sub = self
            .client
            .subscribe(subject.to_owned())
            .await
            .expect("subscribe");
        self.client.flush().await.expect("flush");
        self.violation(what, "Subscription", subject).await;
    }

    /// Runs a library operation that must be refused: the server names `subject` in a
    /// permission violation, and the operation does not succeed (a refused request gets
    /// no reply, so once the violation is seen the operation is abandoned).
    async fn refused_op<T, E>(
        &self,
        what: &str,
        subject: &str,
        op: impl Future<Output = Result<T, E>>,
    ) {
        let op = std::pin::pin!(op);
        tokio::select! {
            result = op => {
                assert!(result.is_err(), "{}: {what} succeeded; it must be refused", self.who);
                self.violation(what, "Publish", subject).await;
            }
            () = self.violation(what, "Publish", subject) => {}
        }
    }

    /// What every identity is refused: deleting or purging a task stream, wildcard
    /// subscriptions, the default inbox, and creating streams outside the provisioner.
    async fn refused_everywhere(&self) {
        self.refused_publish("delete a stream", "$JS.API.STREAM.DELETE.TASKS_EMAIL", "")
            .await;
        self.refused_publish("purge a stream", "$JS.API.STREAM.PURGE.TASKS_EMAIL", "{}")
            .await;
        self.refused_publish(
            "purge the results",
            "$JS.API.STREAM.PURGE.KV_TASKMESH_RESULTS",
            "{}",
        )
        .await;
        self.refused_subscribe("subscribe to everything", ">").await;
        self.refused_subscribe("read every inbox", "_INBOX.>").await;
        if self.who != "provisioner" {
            self.refused_publish(
                "create a stream",
                "$JS.API.STREAM.CREATE.ROGUE",
                r#"{"name":"ROGUE","subjects":["rogue.>"]}"#,
            )
            .await;
        }
    }

    /// Fails when the server reported any error on this connection.
    fn assert_no_errors(&self) {
        let errors = self.errors();
        assert!(
            errors.is_empty(),
            "{} got server errors: {errors:?}",
            self.who
        );
    }
}

fn mesh_config() -> Config {
    Config::from_toml_str("[streams]\nreplicas = 3\n").expect("config")
}

fn category(name: &str) -> Category {
    name.parse().expect("category")
}

fn stream_of(c: &str) -> String {
    wire::stream_name(&category(c))
}

/// Creates (idempotently) every stream, consumer and bucket as the provisioner, retrying
/// while the cluster elects its leaders.
async fn provision(provisioner: &Session) {
    let cfg = mesh_config();
    eventually(
        Duration::from_secs(60),
        "the provisioner creates the topology",
        || {
            let js = provisioner.js.clone();
            let cfg = cfg.clone();
            async move {
                taskmesh_nats::provision(&js, &cfg)
                    .await
                    .map_err(|e| e.to_string())?;
                for bucket in CATALOG_KV_BUCKETS {
                    js.create_or_update_key_value(kv::Config {
                        bucket: bucket.into(),
                        history: 1,
                        storage: jetstream::stream::StorageType::File,
                        num_replicas: 3,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("bucket {bucket}: {e}"))?;
                }
                if js.get_object_store(CATALOG_OBJECT_BUCKET).await.is_err() {
                    js.create_object_store(object_store::Config {
                        bucket: CATALOG_OBJECT_BUCKET.into(),
                        storage: jetstream::stream::StorageType::File,
                        num_replicas: 3,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("object store: {e}"))?;
                }
                Ok(())
            }
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Static checks of the permissions file
// ---------------------------------------------------------------------------------------

/// Every quoted subject of one `allow` list of `role` in permissions.conf.
fn allow_list(text: &str, role: &str, list: &str) -> Vec<String> {
    let start = text
        .find(&format!("\n{role} = {{"))
        .unwrap_or_else(|| panic!("role {role} not in permissions.conf"));
    let body = &text[start..];
    let end = body.find("\n}").expect("role block end");
    let body = &body[..end];
    let at = body
        .find(&format!("{list}:"))
        .unwrap_or_else(|| panic!("{role} has no {list} list"));
    let list_text = &body[at..];
    let close = list_text.find(']').expect("list end");
    list_text[..close]
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn no_identity_is_granted_wildcard_access_or_a_foreign_inbox() {
    let perms = std::fs::read_to_string(conf_dir().join("permissions.conf")).unwrap();
    let accounts = std::fs::read_to_string(conf_dir().join("accounts.conf")).unwrap();
    let roles: Vec<(&str, &str)> = vec![
        ("PROVISIONER", "provisioner"),
        ("SCHEDULER", "scheduler"),
        ("API", "api"),
        ("PRODUCER", "producer"),
        ("WORKER_AI", "worker-ai"),
        ("WORKER_EMAIL", "worker-email"),
        ("WORKER_FILE", "worker-file"),
        ("WORKER_SYNC", "worker-sync"),
        ("WORKER_MAINTENANCE", "worker-maintenance"),
        ("BACKUP", "backup"),
        ("SYS_OPERATOR", "sys"),
    ];
    let forbidden = [
        ">",
        "$JS.>",
        "$JS.API.>",
        "_INBOX.>",
        "$KV.>",
        "$O.>",
        "*.>",
    ];
    for (role, identity) in &roles {
        let publish = allow_list(&perms, role, "publish");
        let subscribe = allow_list(&perms, role, "subscribe");
        assert!(!publish.is_empty(), "{role}: empty publish list");
        for s in publish.iter().chain(&subscribe) {
            assert!(
                !forbidden.contains(&s.as_str()),
                "{role} is granted {s:?}, which no identity may have"
            );
        }
        assert_eq!(
            subscribe,
            vec![format!("{}.>", inbox_of(identity))],
            "{role} must subscribe to its own inbox prefix only"
        );
        assert!(
            accounts.contains(&format!("permissions: ${role} }}")),
            "accounts.conf binds no identity to {role}"
        );
        assert!(
            seed_file(identity).is_file(),
            "no development seed for {identity}"
        );
    }
    // Workers: only their own category's task consumers, in both ack layouts.
    for c in CATEGORIES {
        let role = format!("WORKER_{}", c.to_uppercase());
        let publish = allow_list(&perms, &role, "publish");
        let stream = stream_of(c);
        for lane in ["", "-high", "-low"] {
            let consumer = format!("{c}{lane}");
            for want in [
                format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
                format!("$JS.ACK.{stream}.{consumer}.>"),
                format!("$JS.ACK.*.*.{stream}.{consumer}.>"),
            ] {
                assert!(publish.contains(&want), "{role} lacks {want}");
            }
        }
        for s in &publish {
            let creates_task_consumers = s.starts_with("$JS.API.CONSUMER.CREATE.TASKS_")
                || s.starts_with("$JS.API.CONSUMER.DURABLE.CREATE.");
            let deletes = s.starts_with("$JS.API.STREAM.DELETE.");
            // (Replacing an object in the Object Store purges its old chunks.)
            let purges_non_object_store =
                s.starts_with("$JS.API.STREAM.PURGE.") && !s.contains(".OBJ_");
            assert!(
                !creates_task_consumers && !deletes && !purges_non_object_store,
                "{role} may not create task consumers, delete or purge: {s}"
            );
            for other in CATEGORIES.iter().filter(|o| **o != c) {
                let other_stream = stream_of(other);
                assert!(
                    !s.contains(&format!(".{other_stream}."))
                        || s.starts_with("$JS.API.CONSUMER.INFO."),
                    "{role} reaches {other_stream}: {s}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Every identity on the cluster
// ---------------------------------------------------------------------------------------

/// A task message as a producer publishes it.
async fn publish_task(s: &Session, subject: String, id: &str) -> u64 {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    headers.insert("Task-Id", id);
    let ack = s
        .allowed(&format!("publish {subject}"), async {
            s.js.publish_with_headers(subject.clone(), headers, Bytes::from_static(b"{}"))
                .await?
                .await
        })
        .await;
    ack.sequence
}

/// Fetches one message of a lane consumer (the worker's bounded pull).
async fn pull_one(s: &Session, consumer: &consumer::PullConsumer) -> jetstream::Message {
    s.allowed("pull from its consumer", async {
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .messages()
            .await?;
        match batch.next().await {
            Some(m) => m,
            None => Err::<jetstream::Message, async_nats::Error>("no message within 5s".into()),
        }
    })
    .await
}

/// Waits until a worker's consumer has nothing pending or unacknowledged.
async fn consumer_drained(consumer: &consumer::PullConsumer, what: &str) {
    eventually(Duration::from_secs(10), what, || {
        let mut c = consumer.clone();
        async move {
            let info = c.info().await.map_err(|e| e.to_string())?;
            if info.num_ack_pending == 0 && info.num_pending == 0 {
                Ok(())
            } else {
                Err(format!(
                    "{} pending, {} unacknowledged",
                    info.num_pending, info.num_ack_pending
                ))
            }
        }
    })
    .await;
}

/// The v1 layout of an ack subject: `$JS.ACK.<stream>.<consumer>.<delivered>.<stream
/// seq>.<consumer seq>.<timestamp>.<pending>`.
fn v1_ack_subject(m: &jetstream::Message) -> String {
    let info = m.info().expect("a JetStream delivery");
    format!(
        "$JS.ACK.{}.{}.{}.{}.{}.{}.{}",
        info.stream,
        info.consumer,
        info.delivered,
        info.stream_sequence,
        info.consumer_sequence,
        info.published.unix_timestamp_nanos(),
        info.pending
    )
}

/// One worker identity doing its job and nothing more.
async fn worker_does_its_job(
    cluster: &Cluster,
    producer: &Session,
    api: &Session,
    c: &'static str,
) {
    let worker = Session::connect(cluster, &format!("worker-{c}")).await;
    let cat = category(c);
    let stream = stream_of(c);
    let other = CATEGORIES[(CATEGORIES.iter().position(|x| *x == c).unwrap() + 1) % 5];
    let other_stream = stream_of(other);

    // Bind all three lanes the way the runtime does (consumer info, never create).
    let mut lanes = Vec::new();
    for lane in Lane::ALL {
        let consumer = worker
            .allowed(
                &format!("bind its {} lane", lane.as_str()),
                taskmesh_nats::topology::lane_consumer(&worker.js, &cat, lane),
            )
            .await;
        lanes.push(consumer);
    }
    let normal = &mut lanes[1];

    // Pull and ack in the layout the server delivers (v2 on this cluster) ...
    let seq = publish_task(
        producer,
        format!("tasks.{c}.probe"),
        &format!("{c}-probe-1"),
    )
    .await;
    let m = pull_one(&worker, normal).await;
    let reply = m.reply.clone().expect("reply subject").to_string();
    let tokens: Vec<&str> = reply.split('.').collect();
    assert!(
        tokens.len() >= 11 && tokens[4] == stream && tokens[5] == c,
        "expected a v2 ack subject for {stream}/{c}, got {reply}"
    );
    assert_eq!(m.info().unwrap().stream_sequence, seq);
    worker.allowed("ack in the v2 layout", m.ack()).await;
    consumer_drained(normal, &format!("worker-{c}: the v2 ack took effect")).await;

    // ... and in the v1 layout, published by hand.
    publish_task(
        producer,
        format!("tasks.{c}.probe"),
        &format!("{c}-probe-2"),
    )
    .await;
    let m = pull_one(&worker, normal).await;
    worker
        .allowed("send progress", m.ack_with(jetstream::AckKind::Progress))
        .await;
    let v1 = v1_ack_subject(&m);
    worker
        .allowed("ack in the v1 layout", async {
            worker
                .client
                .publish(v1.clone(), Bytes::from_static(b"+ACK"))
                .await?;
            worker.client.flush().await?;
            Ok::<_, async_nats::Error>(())
        })
        .await;
    consumer_drained(normal, &format!("worker-{c}: the v1 ack took effect")).await;

    // Dead letters (waiting for the PubAck), result records, heartbeats.
    worker
        .allowed("store a dead letter", async {
            worker
                .js
                .publish(format!("dlq.{c}.probe"), Bytes::from_static(b"{}"))
                .await?
                .await
        })
        .await;
    let results = worker
        .allowed("open the result bucket", ResultStore::open(&worker.js))
        .await;
    let key = format!("{c}-probe-1");
    worker
        .allowed(
            "write a result record",
            results.store().put(&key, Bytes::from_static(b"{}")),
        )
        .await;
    worker
        .allowed("read a result record", results.store().get(&key))
        .await;
    let beats = worker
        .allowed("open the heartbeat bucket", Heartbeats::open(&worker.js))
        .await;
    let now = chrono::Utc::now();
    let beat = WorkerHeartbeat {
        id: format!("{c}-identities-test"),
        categories: vec![c.to_owned()],
        concurrency: 1,
        in_flight: 0,
        version: "test".into(),
        host: "localhost".into(),
        pid: std::process::id(),
        started_at: now,
        beat_at: now,
    };
    worker.allowed("beat", beats.beat(&beat)).await;
    let listed = api
        .allowed("list worker heartbeats", async {
            let kv = api.js.get_key_value(wire::WORKERS_BUCKET).await?;
            let keys: Vec<String> = kv
                .keys()
                .await?
                .filter_map(|k| async { k.ok() })
                .collect()
                .await;
            Ok::<_, async_nats::Error>(keys)
        })
        .await;
    assert!(
        listed.contains(&beat.id),
        "heartbeat of worker-{c} not listed: {listed:?}"
    );
    worker
        .allowed("remove its heartbeat", beats.remove(&beat.id))
        .await;

    // Shared rate limiters (compare-and-set) and cancel requests (watched, not written).
    let limits = worker
        .allowed("open the rate limiters", Limits::open(&worker.js))
        .await;
    let rate = Rate {
        count: 1000,
        per: Duration::from_secs(1),
    };
    worker
        .allowed(
            "take a rate-limit slot",
            limits.reserve(&format!("probe-{c}"), rate),
        )
        .await;
    let cancels = worker
        .allowed("open the cancel requests", Cancels::open(&worker.js))
        .await;
    let _watch = worker
        .allowed("watch the cancel requests", cancels.watch())
        .await;
    worker
        .refused_publish(
            "request a cancel",
            &format!("$KV.TASKMESH_CANCELS.{c}-probe-1"),
            "{}",
        )
        .await;

    // The catalog's own state.
    catalog_state(&worker, c).await;

    // What a worker must not do.
    let o_consumer = other.to_owned();
    worker
        .refused_publish(
            "pull from another category's consumer",
            &format!("$JS.API.CONSUMER.MSG.NEXT.{other_stream}.{o_consumer}"),
            r#"{"batch":1,"no_wait":true}"#,
        )
        .await;
    if c != "maintenance" {
        // (The maintenance health check reads every consumer's state.)
        worker
            .refused_publish(
                "bind another category's consumer",
                &format!("$JS.API.CONSUMER.INFO.{other_stream}.{o_consumer}-high"),
                "",
            )
            .await;
    }
    worker
        .refused_publish(
            "ack on another category's consumer (v1)",
            &format!("$JS.ACK.{other_stream}.{o_consumer}.1.1.1.1700000000000000000.0"),
            "+ACK",
        )
        .await;
    worker
        .refused_publish(
            "ack on another category's consumer (v2)",
            &format!("$JS.ACK._.abc123.{other_stream}.{o_consumer}.1.1.1.1700000000000000000.0"),
            "+ACK",
        )
        .await;
    let rogue = consumer::pull::Config {
        durable_name: Some("rogue".into()),
        filter_subject: format!("tasks.{c}.>"),
        ..Default::default()
    };
    worker
        .refused_op(
            "create a consumer on its own stream",
            &format!("$JS.API.CONSUMER.CREATE.{stream}.rogue.tasks.{c}.>"),
            worker.js.create_consumer_on_stream(rogue, &stream),
        )
        .await;
    worker
        .refused_publish(
            "create an ephemeral consumer",
            &format!("$JS.API.CONSUMER.CREATE.{stream}"),
            "{}",
        )
        .await;
    worker
        .refused_publish(
            "delete its consumer",
            &format!("$JS.API.CONSUMER.DELETE.{stream}.{c}"),
            "",
        )
        .await;
    worker
        .refused_op(
            "publish into another category",
            &format!("tasks.{other}.probe"),
            async {
                worker
                    .js
                    .publish(format!("tasks.{other}.probe"), Bytes::from_static(b"{}"))
                    .await?
                    .await
            },
        )
        .await;
    worker
        .refused_publish(
            "dead-letter into another category",
            &format!("dlq.{other}.probe"),
            "{}",
        )
        .await;
    worker
        .refused_subscribe(
            "read another service's inbox",
            &format!("{}.>", inbox_of(&format!("worker-{other}"))),
        )
        .await;
    worker
        .refused_subscribe("read the producer's inbox", "_INBOX_producer.>")
        .await;
    worker.refused_everywhere().await;
}

/// The catalog buckets of one worker category: each worker reads and writes its own.
async fn catalog_state(worker: &Session, c: &str) {
    let kv_buckets: &[&str] = match c {
        "email" => &["TASKMESH_EMAIL_LEDGER"],
        "sync" => &["TASKMESH_CALENDAR", "TASKMESH_NOTION"],
        "maintenance" => &["TASKMESH_CATALOG_STATE"],
        _ => &[],
    };
    for bucket in kv_buckets {
        let kv = worker
            .allowed(&format!("open {bucket}"), worker.js.get_key_value(*bucket))
            .await;
        let key = format!("probe-{c}");
        worker
            .allowed(
                &format!("create a key in {bucket}"),
                kv.create(&key, Bytes::from_static(b"1")),
            )
            .await;
        // Direct gets may be answered by a follower that has not applied the write yet.
        let entry = eventually(
            Duration::from_secs(5),
            &format!("{}: read {bucket}", worker.who),
            || {
                let (kv, key) = (kv.clone(), key.clone());
                async move {
                    match kv.entry(&key).await {
                        Ok(Some(e)) if e.operation == kv::Operation::Put => Ok(e),
                        other => Err(format!("{other:?}")),
                    }
                }
            },
        )
        .await;
        worker
            .allowed(
                &format!("compare-and-set in {bucket}"),
                kv.update(&key, Bytes::from_static(b"2"), entry.revision),
            )
            .await;
        worker
            .allowed(&format!("delete a key of {bucket}"), kv.delete(&key))
            .await;
    }
    match c {
        "file" => {
            let os = worker
                .allowed(
                    "open the object store",
                    worker.js.get_object_store(CATALOG_OBJECT_BUCKET),
                )
                .await;
            let mut body: &[u8] = b"first version";
            worker
                .allowed("upload an object", os.put("probe.txt", &mut body))
                .await;
            let mut body: &[u8] = b"second version";
            worker
                .allowed("replace an object", os.put("probe.txt", &mut body))
                .await;
            let names = worker
                .allowed("list the object store", async {
                    let list = os.list().await?;
                    let names: Vec<String> = list
                        .filter_map(|i| async { i.ok().map(|i| i.name) })
                        .collect()
                        .await;
                    Ok::<_, async_nats::Error>(names)
                })
                .await;
            assert!(names.contains(&"probe.txt".to_owned()), "{names:?}");
            worker
                .allowed("delete an object", os.delete("probe.txt"))
                .await;
        }
        "ai" => {
            // Follow-up: an answer sent by e-mail (on the low lane, so the email worker's
            // normal lane holds only its own probe).
            publish_task(worker, "tasks.email.send.low".into(), "ai-follow-up-1").await;
        }
        "maintenance" => {
            // The health check reads every category's consumers and the heartbeats.
            let mut s = worker
                .allowed("read a stream's state", worker.js.get_stream("TASKS_DLQ"))
                .await;
            worker.allowed("read stream info", s.info()).await;
            let email = worker
                .allowed(
                    "open another category's stream",
                    worker.js.get_stream("TASKS_EMAIL"),
                )
                .await;
            worker
                .allowed("read another category's lag", email.consumer_info("email"))
                .await;
            let kv = worker
                .allowed(
                    "open the heartbeats",
                    worker.js.get_key_value(wire::WORKERS_BUCKET),
                )
                .await;
            worker
                .allowed("list the heartbeats", async {
                    let keys: Vec<String> = kv
                        .keys()
                        .await?
                        .filter_map(|k| async { k.ok() })
                        .collect()
                        .await;
                    Ok::<_, async_nats::Error>(keys)
                })
                .await;
        }
        _ => {}
    }
}

/// The scheduler's job: hold the lease (create, compare-and-set, hand over), keep cursors,
/// watch dynamic schedules, fire (de-duplicated) and delay.
async fn scheduler_does_its_job(cluster: &Cluster, api: &Session) {
    let a = Session::connect(cluster, "scheduler").await;
    let b = Session::connect(cluster, "scheduler").await;
    let leases_a = a
        .allowed(
            "open the lease bucket",
            a.js.get_key_value(wire::LEASES_BUCKET),
        )
        .await;
    let leases_b = b
        .allowed(
            "open the lease bucket",
            b.js.get_key_value(wire::LEASES_BUCKET),
        )
        .await;
    let rev = a
        .allowed(
            "acquire the lease",
            leases_a.create("scheduler", Bytes::from_static(b"{\"holder\":\"a\"}")),
        )
        .await;
    let rev = a
        .allowed(
            "renew the lease (compare-and-set)",
            leases_a.update("scheduler", Bytes::from_static(b"{\"holder\":\"a\"}"), rev),
        )
        .await;
    let taken = b
        .allowed("try the lease", async {
            Ok::<_, async_nats::Error>(
                leases_b
                    .create("scheduler", Bytes::from_static(b"{\"holder\":\"b\"}"))
                    .await,
            )
        })
        .await;
    assert!(
        matches!(&taken, Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists),
        "the second replica must see the lease held: {taken:?}"
    );
    let mut deletions = b
        .allowed("watch the lease", leases_b.watch("scheduler"))
        .await;
    a.allowed(
        "resign the lease",
        leases_a.delete_expect_revision("scheduler", Some(rev)),
    )
    .await;
    let seen = b
        .allowed("see the resignation", async {
            loop {
                match deletions.next().await {
                    Some(Ok(e)) if e.operation != kv::Operation::Put => return Ok(e),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.to_string()),
                    None => return Err("watch ended".to_string()),
                }
            }
        })
        .await;
    assert_eq!(seen.key, "scheduler");
    b.allowed(
        "take the lease over",
        leases_b.create("scheduler", Bytes::from_static(b"{\"holder\":\"b\"}")),
    )
    .await;
    // Direct gets may be answered by a follower that has not applied the write yet.
    eventually(
        Duration::from_secs(5),
        "the scheduler reads the lease it holds",
        || {
            let leases = leases_b.clone();
            async move {
                match leases.entry("scheduler").await {
                    Ok(Some(e)) if &e.value[..] == b"{\"holder\":\"b\"}" => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;

    // Fire: the same slot twice is one task.
    let fire = |dup: bool| {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", "health@2026-11-29T15:00:00Z");
        headers.insert("Task-Id", "health_20261129T150000Z");
        headers.insert("Task-Schedule", "health");
        let js = b.js.clone();
        async move {
            let ack = js
                .publish_with_headers(
                    "tasks.maintenance.system_health_check",
                    headers,
                    Bytes::from_static(b"{}"),
                )
                .await?
                .await?;
            assert_eq!(ack.duplicate, dup);
            Ok::<_, async_nats::Error>(ack)
        }
    };
    b.allowed("fire a schedule", fire(false)).await;
    b.allowed("fire the same slot again (de-duplicated)", fire(true))
        .await;
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Schedule", "@at 2099-01-01T00:00:00Z");
    headers.insert("Nats-Schedule-Target", "tasks.email.send");
    b.allowed("publish a delayed task", async {
        b.js.publish_with_headers(
            "delayed.email.scheduler-probe",
            headers,
            Bytes::from_static(b"{}"),
        )
        .await?
        .await
    })
    .await;

    // Cursors and dynamic schedules.
    let cursors = b
        .allowed(
            "open the cursors",
            b.js.get_key_value(wire::SCHEDULER_BUCKET),
        )
        .await;
    b.allowed(
        "advance a cursor",
        cursors.put("health", Bytes::from_static(b"2026-11-29T15:00:00Z")),
    )
    .await;
    let keys = b
        .allowed("scan every cursor", async {
            let keys: Vec<String> = cursors
                .keys()
                .await?
                .filter_map(|k| async { k.ok() })
                .collect()
                .await;
            Ok::<_, async_nats::Error>(keys)
        })
        .await;
    assert_eq!(keys, ["health"]);
    let schedules = b
        .allowed(
            "open the dynamic schedules",
            b.js.get_key_value(wire::SCHEDULES_BUCKET),
        )
        .await;
    let mut watch = b
        .allowed(
            "watch the dynamic schedules",
            schedules.watch_with_history(">"),
        )
        .await;
    let api_schedules = api
        .allowed(
            "open the dynamic schedules",
            api.js.get_key_value(wire::SCHEDULES_BUCKET),
        )
        .await;
    api.allowed(
        "add a dynamic schedule",
        api_schedules.put("nightly", Bytes::from_static(b"{\"name\":\"nightly\"}")),
    )
    .await;
    let added = b
        .allowed("see the new schedule", async {
            match watch.next().await {
                Some(Ok(e)) => Ok(e),
                Some(Err(e)) => Err(e.to_string()),
                None => Err("watch ended".into()),
            }
        })
        .await;
    assert_eq!(added.key, "nightly");

    // What the scheduler must not do.
    b.refused_publish(
        "pull a worker's consumer",
        "$JS.API.CONSUMER.MSG.NEXT.TASKS_AI.ai",
        r#"{"batch":1}"#,
    )
    .await;
    b.refused_publish(
        "create a consumer on a task stream",
        "$JS.API.CONSUMER.CREATE.TASKS_AI.rogue.tasks.ai.>",
        "{}",
    )
    .await;
    b.refused_publish("write result records", "$KV.TASKMESH_RESULTS.forged", "{}")
        .await;
    b.refused_publish("store dead letters", "dlq.ai.forged", "{}")
        .await;
    b.refused_subscribe("read the api's inbox", "_INBOX_api.>")
        .await;
    b.refused_everywhere().await;
    a.assert_no_errors();
}

/// The producer's job: enqueue (now and delayed) and read results.
async fn producer_does_its_job(producer: &Session) {
    let cfg = mesh_config();
    let client = producer
        .allowed(
            "open the producer client",
            Client::new(producer.connection(), &cfg),
        )
        .await;
    let task = TaskName::parse("email.send").unwrap();
    let done = producer
        .allowed(
            "enqueue a task",
            client.enqueue(&task, &serde_json::json!({}), EnqueueOptions::default()),
        )
        .await;
    assert_eq!(done.stream, "TASKS_EMAIL");
    let unique = || EnqueueOptions {
        unique: Some(Unique {
            window: Duration::from_secs(60),
            key: Some("identities-unique".into()),
        }),
        ..Default::default()
    };
    producer
        .allowed(
            "enqueue a unique task",
            client.enqueue(&task, &serde_json::json!({}), unique()),
        )
        .await;
    let again = producer
        .allowed("try the same unique task again", async {
            Ok::<_, String>(
                client
                    .enqueue(&task, &serde_json::json!({}), unique())
                    .await,
            )
        })
        .await;
    assert!(
        matches!(again, Err(NatsError::NotUnique { .. })),
        "the unique lock must hold: {again:?}"
    );
    producer
        .allowed(
            "enqueue a delayed task",
            client.enqueue(
                &task,
                &serde_json::json!({}),
                EnqueueOptions::default().delay(Duration::from_secs(3600)),
            ),
        )
        .await;
    producer
        .allowed("enqueue a high-priority task", async {
            client
                .enqueue(
                    &task,
                    &serde_json::json!({}),
                    EnqueueOptions::default().lane(Lane::High),
                )
                .await
        })
        .await;
    let none = producer
        .allowed("read a result", client.result(&done.id))
        .await;
    assert!(none.is_none());
    let waited = producer
        .allowed("wait for a result (watch)", async {
            Ok::<_, String>(client.wait(&done.id, Duration::from_millis(300)).await)
        })
        .await;
    assert!(
        matches!(waited, Err(taskmesh_nats::NatsError::Timeout(..))),
        "waiting for a result nobody writes times out: {waited:?}"
    );

    // What a producer must not do.
    producer
        .refused_publish(
            "pull a worker's consumer",
            "$JS.API.CONSUMER.MSG.NEXT.TASKS_EMAIL.email",
            r#"{"batch":1}"#,
        )
        .await;
    producer
        .refused_publish(
            "create a consumer on a task stream",
            "$JS.API.CONSUMER.CREATE.TASKS_EMAIL.rogue.tasks.email.>",
            "{}",
        )
        .await;
    producer
        .refused_publish("forge a result", "$KV.TASKMESH_RESULTS.forged", "{}")
        .await;
    producer
        .refused_publish("forge a dead letter", "dlq.email.forged", "{}")
        .await;
    producer
        .refused_subscribe("read the api's inbox", "_INBOX_api.>")
        .await;
    producer.refused_everywhere().await;
}

/// The API's job: inspect, pause and resume, read and replay dead letters, enqueue, read
/// results.
async fn api_does_its_job(api: &Session) {
    let mut email = api
        .allowed("open a task stream", api.js.get_stream("TASKS_EMAIL"))
        .await;
    api.allowed("read stream info", email.info()).await;
    api.allowed("read consumer info", email.consumer_info("email-low"))
        .await;
    let in_an_hour = chrono::Utc::now() + chrono::Duration::hours(1);
    let until = async_nats::datetime::from_nanos(i128::from(
        in_an_hour
            .timestamp_nanos_opt()
            .expect("a representable instant"),
    ))
    .expect("a valid instant");
    api.allowed("pause a consumer", email.pause_consumer("email-low", until))
        .await;
    api.allowed("resume a consumer", email.resume_consumer("email-low"))
        .await;
    let dlq = api
        .allowed("open the dead letters", api.js.get_stream("TASKS_DLQ"))
        .await;
    let letter = api
        .allowed(
            "read a dead letter",
            dlq.get_last_raw_message_by_subject("dlq.email.probe"),
        )
        .await;
    api.allowed(
        "delete a replayed dead letter",
        dlq.delete_message(letter.sequence),
    )
    .await;
    api.allowed("replay a dead letter", async {
        api.js
            .publish("tasks.email.send", letter.payload.clone())
            .await?
            .await
    })
    .await;
    let results = api
        .allowed("open the results", ResultStore::open(&api.js))
        .await;
    let cancels = api
        .allowed("open the cancel requests", Cancels::open(&api.js))
        .await;
    api.allowed(
        "request a cancel",
        cancels.request(&TaskId::new("email-probe-2").unwrap(), "identities test"),
    )
    .await;
    api.allowed("read a result", results.store().get("email-probe-1"))
        .await;

    api.refused_op(
        "change a stream",
        "$JS.API.STREAM.UPDATE.TASKS_EMAIL",
        api.js
            .update_stream(taskmesh_nats::topology::task_stream_config(
                &category("email"),
                &mesh_config(),
            )),
    )
    .await;
    api.refused_publish(
        "create a consumer on a task stream",
        "$JS.API.CONSUMER.CREATE.TASKS_EMAIL.rogue.tasks.email.>",
        "{}",
    )
    .await;
    api.refused_publish(
        "pull a worker's consumer",
        "$JS.API.CONSUMER.MSG.NEXT.TASKS_EMAIL.email",
        r#"{"batch":1}"#,
    )
    .await;
    api.refused_publish("forge a result", "$KV.TASKMESH_RESULTS.forged", "{}")
        .await;
    api.refused_publish("forge a heartbeat", "$KV.TASKMESH_WORKERS.forged", "{}")
        .await;
    api.refused_subscribe("read the producer's inbox", "_INBOX_producer.>")
        .await;
    api.refused_everywhere().await;
}

/// The provisioner's job (done in `provision`, here: idempotently again) and its limits.
async fn provisioner_limits(provisioner: &Session) {
    let cfg = mesh_config();
    let report = provisioner
        .allowed(
            "provision again (idempotent)",
            taskmesh_nats::provision(&provisioner.js, &cfg),
        )
        .await;
    assert_eq!(report.streams.len(), 6, "{report:?}");
    provisioner
        .refused_op(
            "delete a stream",
            "$JS.API.STREAM.DELETE.TASKS_SYNC",
            provisioner.js.delete_stream("TASKS_SYNC"),
        )
        .await;
    let stream = provisioner
        .allowed("open a stream", provisioner.js.get_stream("TASKS_FILE"))
        .await;
    provisioner
        .refused_op("purge a stream", "$JS.API.STREAM.PURGE.TASKS_FILE", async {
            stream.purge().await
        })
        .await;
    provisioner
        .refused_op(
            "delete a consumer",
            "$JS.API.CONSUMER.DELETE.TASKS_FILE.file",
            stream.delete_consumer("file"),
        )
        .await;
    provisioner
        .refused_publish("enqueue", "tasks.email.send", "{}")
        .await;
    provisioner
        .refused_publish(
            "pull a worker's consumer",
            "$JS.API.CONSUMER.MSG.NEXT.TASKS_FILE.file",
            r#"{"batch":1}"#,
        )
        .await;
    provisioner
        .refused_publish("forge a result", "$KV.TASKMESH_RESULTS.forged", "{}")
        .await;
    provisioner
        .refused_subscribe("read the scheduler's inbox", "_INBOX_scheduler.>")
        .await;
    provisioner.refused_everywhere().await;
}

/// The backup identity snapshots a stream (what `nats stream backup` does) and nothing more.
async fn backup_does_its_job(cluster: &Cluster) {
    let backup = Session::connect(cluster, "backup").await;
    let deliver = backup.client.new_inbox();
    let mut chunks = backup
        .allowed(
            "receive snapshot chunks",
            backup.client.subscribe(deliver.clone()),
        )
        .await;
    let request = serde_json::json!({"deliver_subject": deliver, "chunk_size": 65536});
    let response = backup
        .allowed("start a snapshot", async {
            backup
                .client
                .request(
                    "$JS.API.STREAM.SNAPSHOT.TASKS_DLQ",
                    Bytes::from(request.to_string()),
                )
                .await
        })
        .await;
    let response: serde_json::Value = serde_json::from_slice(&response.payload).unwrap();
    assert!(
        response.get("error").is_none() && response.get("config").is_some(),
        "snapshot refused: {response}"
    );
    let bytes = backup
        .allowed("stream the snapshot", async {
            let mut total = 0usize;
            while let Some(chunk) = chunks.next().await {
                if chunk.payload.is_empty() {
                    return Ok(total);
                }
                total += chunk.payload.len();
                if let Some(reply) = chunk.reply {
                    backup.client.publish(reply, Bytes::new()).await?;
                }
            }
            Err::<usize, async_nats::Error>("the snapshot ended early".into())
        })
        .await;
    assert!(bytes > 0, "an empty snapshot");
    backup
        .refused_publish("restore a stream", "$JS.API.STREAM.RESTORE.TASKS_DLQ", "{}")
        .await;
    backup
        .refused_publish("enqueue", "tasks.email.send", "{}")
        .await;
    backup.refused_everywhere().await;
}

/// The system-account operator asks servers for reports and touches no task data.
async fn sys_does_its_job(cluster: &Cluster) {
    let sys = Session::connect(cluster, "sys").await;
    let pong = sys
        .allowed(
            "ask the servers for their state",
            sys.client
                .request("$SYS.REQ.SERVER.PING.VARZ", Bytes::new()),
        )
        .await;
    let varz: serde_json::Value = serde_json::from_slice(&pong.payload).unwrap();
    assert!(varz["data"]["server_name"].is_string(), "{varz}");
    sys.refused_publish("enqueue", "tasks.email.send", "{}")
        .await;
    sys.refused_subscribe("listen to account events", "$SYS.ACCOUNT.>")
        .await;
    sys.refused_subscribe("read every inbox", "_INBOX.>").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_identity_does_its_job_and_nothing_more() {
    let cluster = Cluster::start(true).await;

    // Nobody gets in without a known key.
    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(cluster.urls.as_slice())
        .await;
    assert!(anonymous.is_err(), "an anonymous client was let in");

    let provisioner = Session::connect(&cluster, "provisioner").await;
    provision(&provisioner).await;
    let producer = Session::connect(&cluster, "producer").await;
    let api = Session::connect(&cluster, "api").await;

    for c in CATEGORIES {
        worker_does_its_job(&cluster, &producer, &api, c).await;
    }
    producer_does_its_job(&producer).await;
    api_does_its_job(&api).await;
    scheduler_does_its_job(&cluster, &api).await;
    provisioner_limits(&provisioner).await;
    backup_does_its_job(&cluster).await;
    sys_does_its_job(&cluster).await;

    // The refused operations changed nothing: every stream is still there.
    let mut names: Vec<String> = provisioner
        .allowed("list streams", async {
            let names: Vec<String> = provisioner
                .js
                .stream_names()
                .filter_map(|n| async { n.ok() })
                .collect()
                .await;
            Ok::<_, async_nats::Error>(names)
        })
        .await;
    names.sort();
    for want in [
        "TASKS_AI",
        "TASKS_DLQ",
        "TASKS_EMAIL",
        "TASKS_FILE",
        "TASKS_MAINTENANCE",
        "TASKS_SYNC",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
}

// ---------------------------------------------------------------------------------------
// The mesh with least-privilege identities
// ---------------------------------------------------------------------------------------

/// Environment of a `taskmesh` process running as `identity` against the cluster.
fn identity_env(cluster: &Cluster, identity: &str, config: &Path) -> Vec<(String, String)> {
    vec![
        ("NATS_URL".into(), cluster.url_list()),
        (
            "NATS_NKEY_FILE".into(),
            seed_file(identity).display().to_string(),
        ),
        ("NATS_INBOX_PREFIX".into(), inbox_of(identity)),
        ("TASKMESH_CONFIG".into(), config.display().to_string()),
        // Permission errors surface as NATS client events (debug level).
        (
            "RUST_LOG".into(),
            "info,taskmesh_nats=debug,async_nats=warn".into(),
        ),
    ]
}

fn spawn_as(cluster: &Cluster, identity: &str, config: &Path, args: &[&str]) -> TaskmeshProcess {
    let env = identity_env(cluster, identity, config);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TaskmeshProcess::spawn(args, &env)
}

/// Runs `taskmesh enqueue <task> --wait` as `identity` and returns its output.
async fn enqueue_and_wait(cluster: &Cluster, identity: &str, config: &Path, task: &str) -> String {
    let mut p = spawn_as(
        cluster,
        identity,
        config,
        &["enqueue", task, "--wait", "--timeout", "60s"],
    );
    let status = p.wait_exit(Duration::from_secs(90)).await;
    let log = p.log();
    assert!(
        status.is_some_and(|s| s.success()),
        "taskmesh enqueue {task} --wait as {identity} did not succeed ({status:?}):\n{log}"
    );
    assert!(log.contains("\"succeeded\""), "{log}");
    log
}

fn assert_no_permission_errors(name: &str, log: &str) {
    assert!(
        !log.to_ascii_lowercase().contains("permissions violation"),
        "{name} hit a permission error:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_runs_on_the_cluster_with_least_privilege_identities() {
    let cluster = Cluster::start(false).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("taskmesh.toml");
    std::fs::write(
        &config,
        "[streams]\nreplicas = 3\n\n[worker]\nheartbeat_interval = \"1s\"\n\n\
         [scheduler]\ndefault_schedules = false\n\n\
         [[schedules]]\nname = \"probe\"\ntask = \"ai.test_scheduler_connection\"\n\
         every = \"2s\"\ncatch_up = \"none\"\n",
    )
    .unwrap();

    // Provisioning as the provisioner (retried while the cluster elects leaders).
    let mut provisioned = false;
    for _ in 0..10 {
        let mut p = spawn_as(&cluster, "provisioner", &config, &["provision"]);
        let status = p.wait_exit(Duration::from_secs(60)).await;
        if status.is_some_and(|s| s.success()) {
            assert_no_permission_errors("taskmesh provision", &p.log());
            provisioned = true;
            break;
        }
        eprintln!("provision attempt failed:\n{}", p.log_tail(10));
    }
    assert!(
        provisioned,
        "taskmesh provision never succeeded as the provisioner"
    );
    // Catalog buckets: created by the provisioner identity too.
    let provisioner = Session::connect(&cluster, "provisioner").await;
    provision(&provisioner).await;

    let mut workers: Vec<(String, TaskmeshProcess)> = ["ai", "email", "maintenance"]
        .iter()
        .map(|c| {
            let identity = format!("worker-{c}");
            let p = spawn_as(
                &cluster,
                &identity,
                &config,
                &["worker", "--category", c, "--http-addr", "127.0.0.1:0"],
            );
            (identity, p)
        })
        .collect();

    // Every worker is up: its heartbeat is in TASKMESH_WORKERS (read as the api).
    let api = Session::connect(&cluster, "api").await;
    eventually(Duration::from_secs(30), "every worker beats", || {
        let js = api.js.clone();
        async move {
            let kv = js
                .get_key_value(wire::WORKERS_BUCKET)
                .await
                .map_err(|e| e.to_string())?;
            let keys: Vec<String> = kv
                .keys()
                .await
                .map_err(|e| e.to_string())?
                .filter_map(|k| async { k.ok() })
                .collect()
                .await;
            let missing: Vec<&str> = ["ai", "email", "maintenance"]
                .into_iter()
                .filter(|c| !keys.iter().any(|k| k.starts_with(&format!("{c}-"))))
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("no heartbeat from {missing:?}; keys: {keys:?}"))
            }
        }
    })
    .await;

    enqueue_and_wait(
        &cluster,
        "producer",
        &config,
        "ai.test_scheduler_connection",
    )
    .await;
    // Two scheduler replicas: one takes the lease and fires `probe` every 2 s; the ai
    // worker runs the fires (task id `probe_<slot>`).
    let mut schedulers: Vec<(String, TaskmeshProcess)> = ["a", "b"]
        .iter()
        .map(|r| {
            let p = spawn_as(
                &cluster,
                "scheduler",
                &config,
                &["scheduler", "--id", r, "--http-addr", "127.0.0.1:0"],
            );
            (format!("scheduler {r}"), p)
        })
        .collect();
    eventually(
        Duration::from_secs(60),
        "a scheduled fire ran and succeeded",
        || {
            let js = api.js.clone();
            async move {
                let kv = js
                    .get_key_value(wire::RESULTS_BUCKET)
                    .await
                    .map_err(|e| e.to_string())?;
                let keys: Vec<String> = kv
                    .keys()
                    .await
                    .map_err(|e| e.to_string())?
                    .filter_map(|k| async { k.ok() })
                    .filter(|k| std::future::ready(k.starts_with("probe_")))
                    .collect()
                    .await;
                for key in &keys {
                    if let Some(v) = kv.get(key).await.map_err(|e| e.to_string())?
                        && String::from_utf8_lossy(&v).contains("\"succeeded\"")
                    {
                        return Ok(());
                    }
                }
                Err(format!("fires so far: {keys:?}"))
            }
        },
    )
    .await;

    enqueue_and_wait(&cluster, "producer", &config, "email.process_email_queue").await;
    let health =
        enqueue_and_wait(&cluster, "api", &config, "maintenance.system_health_check").await;
    assert!(health.contains("\"categories\""), "{health}");

    for (name, p) in &mut schedulers {
        p.sigterm();
        let status = p.wait_exit(Duration::from_secs(30)).await;
        let log = p.log();
        assert!(
            status.is_some_and(|s| s.success()),
            "{name} did not stop cleanly ({status:?}):\n{log}"
        );
        assert_no_permission_errors(name, &log);
    }
    for (identity, p) in &mut workers {
        p.sigterm();
        let status = p.wait_exit(Duration::from_secs(40)).await;
        let log = p.log();
        assert!(
            status.is_some_and(|s| s.success()),
            "{identity} did not drain and exit 0 ({status:?}):\n{log}"
        );
        assert_no_permission_errors(identity, &log);
    }
}
