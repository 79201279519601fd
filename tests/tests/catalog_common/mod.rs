//! Shared set-up of the catalog suites (`catalog_*.rs`): a real nats-server, the seed
//! categories provisioned, an in-process worker running the built-in catalog with
//! explicit [`Settings`], and tiny real counterparts on loopback: an HTTP/1.1 server, an
//! SMTP sink and an IMAP server, each written on tokio so the tests need no extra crates.

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use taskmesh_nats::{Client, Connection, EnqueueOptions};
use taskmesh_shared::config::TaskPolicyConfig;
use taskmesh_shared::{Config, TaskId, TaskName, TaskRecord, TaskState};
use taskmesh_tests::{NatsServer, eventually};
use taskmesh_workers::catalog::{Settings, register_with};
use taskmesh_workers::{Registry, Worker, WorkerOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Every catalog task gets quick retries in tests (1 s, then 2 s), 10 attempts.
pub const CATALOG_TASKS: [&str; 17] = [
    "ai.run_prompt",
    "ai.test_scheduler_connection",
    "email.send",
    "email.categorize_incoming_email",
    "email.process_email_queue",
    "email.send_daily_email_summary",
    "file.cleanup_temp_files",
    "file.backup_user_data",
    "file.sync_cloud_storage",
    "sync.calendar_events",
    "sync.notion_pages",
    "sync.email_service",
    "maintenance.system_health_check",
    "maintenance.cleanup_old_logs",
    "maintenance.optimize_database",
    "maintenance.cleanup_old_sessions",
    "email.send",
];

pub struct Mesh {
    pub server: NatsServer,
    pub cfg: Arc<Config>,
    pub client: Client,
    pub stop: CancellationToken,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Mesh {
    /// A server, the seed categories provisioned, and a worker with `settings`.
    pub async fn start(settings: Settings) -> Self {
        let server = NatsServer::start().await;
        let mut cfg = Config::default();
        cfg.nats.url = server.url();
        cfg.worker.drain_grace = Duration::from_secs(1);
        cfg.worker.heartbeat_interval = Duration::from_secs(1);
        for t in CATALOG_TASKS {
            cfg.tasks.insert(
                TaskName::parse(t).unwrap(),
                TaskPolicyConfig {
                    max_attempts: Some(10),
                    initial_delay: Some(Duration::from_secs(1)),
                    max_delay: Some(Duration::from_secs(2)),
                    ..TaskPolicyConfig::default()
                },
            );
        }
        for c in cfg.categories.values_mut() {
            c.concurrency = 2;
        }
        let cfg = Arc::new(cfg);
        let conn = connect(&cfg, "test").await;
        taskmesh_nats::provision(&conn.js, &cfg).await.unwrap();
        let client = Client::new(conn, &cfg).await.unwrap();
        let wconn = connect(&cfg, "worker").await;
        let mut registry = Registry::new();
        register_with(&mut registry, &cfg, Some(wconn.clone()), settings).unwrap();
        let worker = Worker::new(
            wconn,
            cfg.clone(),
            Arc::new(registry),
            // A fixed id: the default `ai+email+…-<random>` is not a valid KV key, so its
            // heartbeats would not be stored (reported to the lead).
            WorkerOptions {
                id: Some(taskmesh_tests::unique_name("catalog-worker")),
                ..WorkerOptions::default()
            },
        )
        .await
        .unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move { worker.run(s).await.unwrap() });
        Self {
            server,
            cfg,
            client,
            stop,
        }
    }

    pub fn conn(&self) -> &Connection {
        self.client.connection()
    }

    pub async fn enqueue(&self, task: &str, args: Value) -> TaskId {
        self.client
            .enqueue(
                &TaskName::parse(task).unwrap(),
                &args,
                EnqueueOptions::default(),
            )
            .await
            .unwrap()
            .id
    }

    pub async fn enqueue_opts(&self, task: &str, args: Value, opts: EnqueueOptions) -> TaskId {
        self.client
            .enqueue(&TaskName::parse(task).unwrap(), &args, opts)
            .await
            .unwrap()
            .id
    }

    pub async fn record(&self, id: &TaskId) -> Option<TaskRecord> {
        self.client.result(id).await.unwrap()
    }

    pub async fn wait_state(&self, id: &TaskId, state: TaskState) -> TaskRecord {
        eventually(
            Duration::from_secs(30),
            &format!("task {id} is {state:?}"),
            || async {
                match self.record(id).await {
                    Some(r) if r.state == state => Ok(r),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await
    }

    /// Enqueues and waits for success; returns the result value.
    pub async fn run_ok(&self, task: &str, args: Value) -> Value {
        let id = self.enqueue(task, args).await;
        self.wait_state(&id, TaskState::Succeeded)
            .await
            .result
            .unwrap()
    }

    /// Enqueues a bad-args task and checks it is dead as a permanent failure whose message
    /// names `field`.
    pub async fn expect_bad_args(&self, task: &str, args: Value, field: &str) {
        let id = self.enqueue(task, args).await;
        let r = self.wait_state(&id, TaskState::Dead).await;
        let err = r.error.unwrap();
        assert_eq!(r.attempts, 1, "a bad argument is not retried");
        assert!(
            err.kind == "permanent" || err.kind == "invalid_args",
            "{err:?}"
        );
        assert!(err.message.contains(field), "{field} not in {err:?}");
    }
}

pub async fn connect(cfg: &Config, who: &str) -> Connection {
    taskmesh_nats::connect(&cfg.nats, who, Duration::from_secs(5))
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers
            .get(&k.to_ascii_lowercase())
            .map(String::as_str)
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }
    pub fn json(v: &Value) -> Self {
        Self::new(200, serde_json::to_vec(v).unwrap()).header("Content-Type", "application/json")
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
}

pub type Handler = Arc<dyn Fn(&HttpRequest) -> HttpResponse + Send + Sync>;

/// An HTTP/1.1 server on 127.0.0.1 (one request per connection); records every request.
pub struct HttpStub {
    pub url: String,
    pub requests: Arc<Mutex<Vec<HttpRequest>>>,
}

impl HttpStub {
    pub async fn start(handler: Handler) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let reqs = requests.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let handler = handler.clone();
                let reqs = reqs.clone();
                tokio::spawn(async move {
                    let _ = serve_http(sock, handler, reqs).await;
                });
            }
        });
        Self { url, requests }
    }

    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

async fn serve_http(
    sock: TcpStream,
    handler: Handler,
    reqs: Arc<Mutex<Vec<HttpRequest>>>,
) -> std::io::Result<()> {
    let mut r = BufReader::new(sock);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).await?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    let req = HttpRequest {
        method,
        path,
        headers,
        body,
    };
    reqs.lock().unwrap().push(req.clone());
    let resp = handler(&req);
    let mut out = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp.status,
        resp.body.len()
    );
    for (k, v) in &resp.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut sock = r.into_inner();
    sock.write_all(out.as_bytes()).await?;
    sock.write_all(&resp.body).await?;
    sock.flush().await?;
    sock.shutdown().await
}

// ---------------------------------------------------------------------------------------
// SMTP
// ---------------------------------------------------------------------------------------

/// An SMTP server on 127.0.0.1 that stores what it receives. The first `fail_rcpt`
/// transactions get `451` to `RCPT TO` (a transient refusal).
pub struct SmtpSink {
    pub url: String,
    pub messages: Arc<Mutex<Vec<String>>>,
    pub fail_rcpt: Arc<AtomicU32>,
}

impl SmtpSink {
    pub async fn start(fail_rcpt: u32) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("smtp://{}", listener.local_addr().unwrap());
        let messages = Arc::new(Mutex::new(Vec::new()));
        let fail = Arc::new(AtomicU32::new(fail_rcpt));
        let (m, f) = (messages.clone(), fail.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (m, f) = (m.clone(), f.clone());
                tokio::spawn(async move {
                    let _ = serve_smtp(sock, m, f).await;
                });
            }
        });
        Self {
            url,
            messages,
            fail_rcpt: fail,
        }
    }

    pub fn received(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }
}

async fn serve_smtp(
    sock: TcpStream,
    messages: Arc<Mutex<Vec<String>>>,
    fail: Arc<AtomicU32>,
) -> std::io::Result<()> {
    let mut r = BufReader::new(sock);
    r.get_mut().write_all(b"220 sink ESMTP\r\n").await?;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_ascii_uppercase();
        let reply: &[u8] = if cmd.starts_with("EHLO") {
            b"250-sink\r\n250 8BITMIME\r\n"
        } else if cmd.starts_with("HELO")
            || cmd.starts_with("MAIL")
            || cmd.starts_with("RSET")
            || cmd.starts_with("NOOP")
        {
            b"250 OK\r\n"
        } else if cmd.starts_with("RCPT") {
            if fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                b"451 4.3.0 try again later\r\n"
            } else {
                b"250 OK\r\n"
            }
        } else if cmd.starts_with("DATA") {
            r.get_mut().write_all(b"354 go ahead\r\n").await?;
            let mut data = String::new();
            loop {
                let mut l = String::new();
                if r.read_line(&mut l).await? == 0 {
                    return Ok(());
                }
                if l == ".\r\n" || l == ".\n" {
                    break;
                }
                data.push_str(&l);
            }
            messages.lock().unwrap().push(data);
            b"250 2.0.0 queued\r\n"
        } else if cmd.starts_with("QUIT") {
            r.get_mut().write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            b"502 not implemented\r\n"
        };
        r.get_mut().write_all(reply).await?;
    }
}

// ---------------------------------------------------------------------------------------
// IMAP
// ---------------------------------------------------------------------------------------

/// An IMAP server on `listener` with one mailbox of `messages` (UIDs 1..=n), UIDVALIDITY 42.
pub fn serve_imap(listener: TcpListener, messages: Arc<Mutex<Vec<Vec<u8>>>>) {
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let m = messages.clone();
            tokio::spawn(async move {
                let _ = imap_session(sock, m).await;
            });
        }
    });
}

async fn imap_session(sock: TcpStream, messages: Arc<Mutex<Vec<Vec<u8>>>>) -> std::io::Result<()> {
    let mut r = BufReader::new(sock);
    r.get_mut()
        .write_all(b"* OK stub IMAP4rev1 ready\r\n")
        .await?;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let line = line.trim_end();
        let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
        let upper = rest.to_ascii_uppercase();
        let msgs = messages.lock().unwrap().clone();
        let mut out: Vec<u8> = Vec::new();
        if upper.starts_with("LOGIN") {
            if rest.contains("\"secret\"") {
                out.extend(format!("{tag} OK LOGIN done\r\n").as_bytes());
            } else {
                out.extend(format!("{tag} NO bad password\r\n").as_bytes());
            }
        } else if upper.starts_with("SELECT") {
            out.extend(
                format!(
                    "* {} EXISTS\r\n* OK [UIDVALIDITY 42] ok\r\n{tag} OK [READ-WRITE] SELECT done\r\n",
                    msgs.len()
                )
                .as_bytes(),
            );
        } else if upper.starts_with("UID SEARCH") {
            let from: usize = upper
                .split_whitespace()
                .nth(3)
                .and_then(|r| r.split(':').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            let mut uids: Vec<String> = (from..=msgs.len()).map(|u| u.to_string()).collect();
            if uids.is_empty() && !msgs.is_empty() {
                uids.push(msgs.len().to_string()); // `n:*` matches the last message
            }
            out.extend(
                format!("* SEARCH {}\r\n{tag} OK SEARCH done\r\n", uids.join(" ")).as_bytes(),
            );
        } else if upper.starts_with("UID FETCH") {
            let uid: usize = upper
                .split_whitespace()
                .nth(2)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if let Some(m) = msgs.get(uid.wrapping_sub(1)) {
                out.extend(
                    format!("* {uid} FETCH (UID {uid} BODY[] {{{}}}\r\n", m.len()).as_bytes(),
                );
                out.extend(m);
                out.extend(b")\r\n");
            }
            out.extend(format!("{tag} OK FETCH done\r\n").as_bytes());
        } else if upper.starts_with("LOGOUT") {
            r.get_mut()
                .write_all(format!("* BYE\r\n{tag} OK LOGOUT done\r\n").as_bytes())
                .await?;
            return Ok(());
        } else {
            out.extend(format!("{tag} BAD unknown\r\n").as_bytes());
        }
        r.get_mut().write_all(&out).await?;
    }
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sets a file's modification time `age` in the past.
pub fn age_file(path: &std::path::Path, age: Duration) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::now() - age).unwrap();
}

/// Counts `n` of a `Fn` called (for stubs that fail the first calls).
pub fn counter() -> Arc<AtomicU32> {
    Arc::new(AtomicU32::new(0))
}
