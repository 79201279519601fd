//! Tests of the test harness itself, against real `nats-server` processes.
//!
//! Run with `NATS_SERVER_BIN=$(scripts/ensure-nats-server.sh) cargo test -p taskmesh-tests`.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures::FutureExt;
use taskmesh_tests::{
    NatsCluster, NatsServer, ServerOptions, TaskmeshProcess, eventually, unique_name,
};

const SH: &str = "/bin/sh";

/// Creates a file-backed stream `name` on `subject` with `replicas` and publishes one
/// message (waiting for its PubAck).
async fn stream_with_one_message(
    js: &jetstream::Context,
    name: &str,
    subject: &str,
    replicas: usize,
    body: &'static [u8],
) {
    js.create_stream(stream::Config {
        name: name.to_string(),
        subjects: vec![subject.to_string()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("create stream {name}: {e}"));
    js.publish(subject.to_string(), body.into())
        .await
        .unwrap_or_else(|e| panic!("publish to {subject}: {e}"))
        .await
        .unwrap_or_else(|e| panic!("puback from {subject}: {e}"));
}

/// Waits until message 1 of `stream` can be read back, and returns its body.
async fn first_message(js: &jetstream::Context, name: &str) -> Vec<u8> {
    eventually(
        Duration::from_secs(10),
        &format!("message 1 of {name} is readable"),
        || async {
            let stream = js.get_stream(name).await.map_err(|e| e.to_string())?;
            let msg = stream.get_raw_message(1).await.map_err(|e| e.to_string())?;
            Ok(msg.payload.to_vec())
        },
    )
    .await
}

fn process_is_gone(pid: u32) -> bool {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
    nix::sys::signal::kill(pid, None) == Err(nix::errno::Errno::ESRCH)
}

fn keep_logs_requested() -> bool {
    std::env::var_os("TASKMESH_KEEP_LOGS").is_some()
}

#[tokio::test]
async fn restart_after_sigkill_keeps_jetstream_data() {
    let mut server = NatsServer::start().await;
    let (port, store, first_pid) = (
        server.port(),
        server.store_dir().to_path_buf(),
        server.pid(),
    );
    let js = jetstream::new(server.client().await);
    stream_with_one_message(&js, "KEEP", "keep.one", 1, b"survives kill -9").await;

    server.restart().await;

    assert_eq!(server.port(), port, "same port after restart");
    assert_eq!(server.store_dir(), store, "same store after restart");
    assert!(
        server.pid().is_some() && server.pid() != first_pid,
        "a new process"
    );
    let first_pid = first_pid.unwrap_or_else(|| panic!("the first server had no pid"));
    assert!(process_is_gone(first_pid), "the killed process is reaped");
    let js = jetstream::new(server.client().await);
    assert_eq!(first_message(&js, "KEEP").await, b"survives kill -9");
}

#[tokio::test]
async fn graceful_stop_and_start_again_keeps_jetstream_data() {
    let mut server = NatsServer::start().await;
    let js = jetstream::new(server.client().await);
    stream_with_one_message(&js, "GRACE", "grace.one", 1, b"survives sigterm").await;

    let status = server.stop_graceful().await;
    assert!(status.is_some(), "it was running");
    assert_eq!(server.pid(), None);
    assert!(!server.is_running());
    assert_eq!(
        server.stop_graceful().await,
        None,
        "a second stop is a no-op"
    );
    server.stop();

    server.start_again().await;
    let js = jetstream::new(server.client().await);
    assert_eq!(first_message(&js, "GRACE").await, b"survives sigterm");
    assert!(
        server.log_tail(200).contains("Server is ready"),
        "log is appended across restarts"
    );
}

#[tokio::test]
async fn options_reach_the_config() {
    let server = NatsServer::start_with(ServerOptions {
        sync_always: true,
        server_name: Some("solo".into()),
        extra_config: "max_payload: 2MB".into(),
        ..ServerOptions::default()
    })
    .await;
    let client = server.client().await;
    assert_eq!(client.server_info().max_payload, 2 * 1024 * 1024);
    assert_eq!(client.server_info().server_name, "solo");
    let config = std::fs::read_to_string(server.config_path())
        .unwrap_or_else(|e| panic!("read config: {e}"));
    assert!(config.contains("sync_interval: always"), "{config}");
    // A write with fsync-always still round-trips.
    let js = jetstream::new(client);
    stream_with_one_message(&js, "SYNCED", "synced.one", 1, b"fsynced").await;
    assert_eq!(first_message(&js, "SYNCED").await, b"fsynced");
}

#[tokio::test]
async fn fixed_port_is_used() {
    let first = NatsServer::start().await;
    let port = first.port();
    drop(first);
    let server = NatsServer::start_with(ServerOptions {
        port: Some(port),
        ..ServerOptions::default()
    })
    .await;
    assert_eq!(server.url(), format!("nats://127.0.0.1:{port}"));
}

#[tokio::test]
async fn pause_freezes_and_resume_thaws() {
    let mut server = NatsServer::start().await;
    // `flush` only drains the client's buffer; a JetStream API request needs an answer.
    let js = jetstream::new(server.client().await);
    js.query_account()
        .await
        .unwrap_or_else(|e| panic!("account info: {e}"));

    server.pause();
    let frozen = tokio::time::timeout(Duration::from_millis(500), js.query_account()).await;
    assert!(frozen.is_err(), "a paused server answered: {frozen:?}");
    assert!(server.is_running(), "a paused server is still alive");

    server.resume();
    eventually(
        Duration::from_secs(10),
        "the resumed server answers",
        || async {
            js.query_account()
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    )
    .await;

    // A graceful stop of a paused server does not hang on the pending SIGTERM.
    server.pause();
    assert!(server.stop_graceful().await.is_some());
}

#[tokio::test]
async fn lame_duck_mode_exits_and_start_again_works() {
    let mut server = NatsServer::start().await;
    server.lame_duck();
    let status = server.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.is_some(),
        "no exit after lame duck mode; log:\n{}",
        server.log_tail(20)
    );
    assert!(server.log_tail(50).contains("Entering lame duck mode"));
    assert!(!server.is_running());
    server.start_again().await;
    assert!(server.is_running());
}

#[tokio::test]
async fn lame_duck_mode_is_announced_to_clients() {
    let mut server = NatsServer::start_with(ServerOptions {
        // Keep the server in lame duck mode long enough to observe it.
        extra_config: "lame_duck_grace_period: \"20s\"\nlame_duck_duration: \"30s\"".into(),
        ..ServerOptions::default()
    })
    .await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _client = async_nats::ConnectOptions::new()
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event.to_string());
            }
        })
        .connect(server.url())
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    server.lame_duck();
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = rx.recv().await {
            if event.contains("lame duck") {
                return event;
            }
        }
        String::from("(event stream ended)")
    })
    .await
    .unwrap_or_else(|_| panic!("no lame duck event within 10s"));
    assert!(seen.contains("lame duck"), "{seen}");
}

#[tokio::test]
async fn drop_kills_the_server_and_removes_its_files() {
    let server = NatsServer::start().await;
    let pid = server.pid().unwrap_or_else(|| panic!("no pid"));
    let dir = server.dir().to_path_buf();
    assert!(server.log_path().starts_with(&dir));
    assert!(server.store_dir().starts_with(&dir));
    drop(server);
    assert!(
        process_is_gone(pid),
        "nats-server {pid} still runs after drop"
    );
    if !keep_logs_requested() {
        assert!(!dir.exists(), "{} was not removed", dir.display());
    }
}

#[tokio::test]
async fn a_panicking_test_keeps_the_server_files() {
    let mut kept: Option<PathBuf> = None;
    let result = std::panic::AssertUnwindSafe(async {
        let server = NatsServer::start().await;
        kept = Some(server.dir().to_path_buf());
        panic!("deliberate panic with a server alive");
    })
    .catch_unwind()
    .await;
    assert!(result.is_err());
    let dir = kept.unwrap_or_else(|| panic!("the server never started"));
    assert!(
        dir.join("nats-server.log").is_file(),
        "{} was removed",
        dir.display()
    );
    std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("clean {}: {e}", dir.display()));
}

#[tokio::test]
async fn three_node_cluster_elects_a_leader_and_serves_an_r3_stream() {
    let mut cluster = NatsCluster::start(3).await;
    assert_eq!(cluster.nodes().len(), 3);
    assert_eq!(cluster.name(), "taskmesh-test");
    let names: Vec<_> = cluster.nodes().iter().map(|n| n.server_name()).collect();
    assert_eq!(names, [Some("n1"), Some("n2"), Some("n3")]);
    assert_eq!(cluster.url_list(), cluster.urls().join(","));
    assert_eq!(cluster.url_list().matches("nats://127.0.0.1:").count(), 3);

    let js = jetstream::new(cluster.client().await);
    stream_with_one_message(&js, "R3", "r3.one", 3, b"replicated").await;
    let mut stream = js
        .get_stream("R3")
        .await
        .unwrap_or_else(|e| panic!("get R3: {e}"));
    let info = stream
        .info()
        .await
        .unwrap_or_else(|e| panic!("info R3: {e}"));
    assert_eq!(info.config.num_replicas, 3);
    let placement = info
        .cluster
        .clone()
        .unwrap_or_else(|| panic!("no cluster info"));
    assert!(placement.leader.is_some(), "{placement:?}");
    assert_eq!(placement.replicas.len(), 2, "two followers: {placement:?}");

    // One node down: the R3 stream keeps its quorum and still takes writes.
    cluster.node(0).stop();
    assert_eq!(cluster.node(0).pid(), None);
    eventually(Duration::from_secs(20), "a write with n1 down", || async {
        let ack = js
            .publish("r3.one", "with n1 down".into())
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map(|ack| ack.sequence).map_err(|e| e.to_string())
    })
    .await;

    cluster.node(0).start_again().await;
    cluster.wait_ready().await;
    let node1 = jetstream::new(cluster.node(0).client().await);
    assert_eq!(first_message(&node1, "R3").await, b"replicated");
}

#[tokio::test]
async fn eventually_returns_the_first_ok() {
    let mut calls = 0;
    let value = eventually(Duration::from_secs(5), "third call", || {
        calls += 1;
        let n = calls;
        async move {
            if n >= 3 {
                Ok(n * 10)
            } else {
                Err(format!("call {n}"))
            }
        }
    })
    .await;
    assert_eq!(value, 30);
}

#[tokio::test]
#[should_panic(expected = "widget ready: not true after 200ms; last seen: state is 7")]
async fn eventually_panics_with_the_last_observation() {
    eventually(Duration::from_millis(200), "widget ready", || async {
        Err::<(), _>("state is 7".to_string())
    })
    .await;
}

#[test]
fn unique_names_are_unique() {
    let names: std::collections::HashSet<String> = (0..100).map(|_| unique_name("email")).collect();
    assert_eq!(names.len(), 100);
}

#[tokio::test]
async fn process_log_env_and_sigterm() {
    let script = r#"echo "started in $PWD with FOO=$FOO"; trap 'echo got term; exit 3' TERM; while :; do sleep 0.05; done"#;
    let mut proc =
        TaskmeshProcess::spawn_program(Path::new(SH), &["-c", script], &[("FOO", "bar")]);
    proc.wait_for_log("with FOO=bar", Duration::from_secs(10))
        .await;
    assert!(
        proc.log()
            .contains(&format!("started in {}", proc.dir().display()))
    );
    assert!(proc.is_running());

    proc.sigterm();
    let status = proc
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no exit after SIGTERM; log:\n{}", proc.log()));
    assert_eq!(status.code(), Some(3));
    assert!(proc.log().contains("got term"));
    assert!(!proc.is_running());
    proc.sigterm(); // a no-op after exit
}

#[tokio::test]
async fn process_stop_cont_and_kill9() {
    let mut proc = TaskmeshProcess::spawn_program(
        Path::new(SH),
        &["-c", "echo up; while :; do sleep 0.05; done"],
        &[],
    );
    proc.wait_for_log("up", Duration::from_secs(10)).await;
    proc.sigstop();
    assert!(proc.is_running(), "a stopped process is alive");
    assert_eq!(proc.wait_exit(Duration::from_millis(100)).await, None);
    proc.sigcont();
    proc.kill9();
    let status = proc
        .wait_exit(Duration::from_secs(1))
        .await
        .unwrap_or_else(|| panic!("not reaped after kill9"));
    assert_eq!(status.signal(), Some(9));
    assert!(process_is_gone(proc.pid()));
}

#[test]
fn dropping_a_process_kills_it_and_cleans_up() {
    let proc = TaskmeshProcess::spawn_program(Path::new(SH), &["-c", "sleep 600"], &[]);
    let (pid, dir) = (proc.pid(), proc.dir().to_path_buf());
    drop(proc);
    assert!(process_is_gone(pid), "process {pid} survived drop");
    if !keep_logs_requested() {
        assert!(!dir.exists(), "{} was not removed", dir.display());
    }
}

#[test]
fn a_panicking_test_keeps_the_process_log() {
    let mut kept = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let proc = TaskmeshProcess::spawn_program(Path::new(SH), &["-c", "sleep 600"], &[]);
        kept = Some(proc.log_path().to_path_buf());
        panic!("deliberate panic with a process alive");
    }));
    assert!(result.is_err());
    let log = kept.unwrap_or_else(|| panic!("the process never started"));
    assert!(log.is_file(), "{} was removed", log.display());
    if let Some(dir) = log.parent() {
        std::fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("clean {}: {e}", dir.display()));
    }
}
