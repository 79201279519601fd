//! The fault suite, full tier: cluster leader loss, step-downs, a frozen leader, a
//! whole-cluster bounce, a frozen worker, worker ↔ NATS network faults through a TCP proxy
//! and hostile input. Every test returns at once unless `TASKMESH_FAULT_FULL=1`
//! (`scripts/fault-suite.sh` sets it and writes `target/fault-report.md`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use taskmesh_shared::TaskId;
use taskmesh_tests::fault::{
    Checker, FaultMesh, MONITOR_CONFIG, Proxy, ProxyMode, divergence, full_tier, now_ms,
    sleep_task, stream_leader, vm_rss_kib,
};
use taskmesh_tests::{NatsCluster, NatsServer, ServerOptions, TaskmeshProcess, eventually};
use tokio_util::sync::CancellationToken;

const STREAM: &str = "TASKS_TESTKIT";

/// A 3-node R3 cluster with monitoring, a mesh on it, three workers and a sampler.
struct ClusterRun {
    cluster: NatsCluster,
    fx: FaultMesh,
    _workers: Vec<TaskmeshProcess>,
    checker: std::sync::Arc<Checker>,
    stop: CancellationToken,
    sampler: tokio::task::JoinHandle<()>,
}

impl ClusterRun {
    async fn start(extra_server: &str) -> Self {
        let cluster = NatsCluster::start_with(
            3,
            ServerOptions {
                extra_config: format!("{MONITOR_CONFIG}\n{extra_server}"),
                ..ServerOptions::default()
            },
        )
        .await;
        let urls = cluster.urls().join(",");
        let fx =
            FaultMesh::start(&urls, "ack_wait = \"5s\"", "", "[streams]\nreplicas = 3\n").await;
        let workers = (0..3).map(|_| fx.worker()).collect();
        let checker = Checker::new();
        let stop = CancellationToken::new();
        let sampler = checker.spawn_sampler(fx.js(), STREAM, stop.clone());
        Self {
            cluster,
            fx,
            _workers: workers,
            checker,
            stop,
            sampler,
        }
    }

    /// Two producers, `n` tasks each, every enqueue retried under the same id until acked.
    fn produce(&self, n: usize, ms: u64) -> Vec<tokio::task::JoinHandle<usize>> {
        (0..2)
            .map(|p| {
                let client = self.fx.client.clone();
                let checker = self.checker.clone();
                tokio::spawn(async move {
                    let (task, body) = sleep_task(ms);
                    let mut acked = 0;
                    for i in 0..n {
                        let id = TaskId::new(format!("p{p}-{i}")).unwrap();
                        if checker
                            .enqueue_retrying(
                                &client,
                                &task,
                                body.clone(),
                                &id,
                                Duration::from_secs(60),
                            )
                            .await
                        {
                            acked += 1;
                        }
                    }
                    acked
                })
            })
            .collect()
    }

    async fn wait_done(&self, n: usize) {
        eventually(Duration::from_secs(120), "load under way", || async {
            let d = taskmesh_tests::ledger_counts(&self.fx.ledger(), "done").len();
            if d >= n {
                Ok(())
            } else {
                Err(format!("{d} done"))
            }
        })
        .await;
    }

    async fn leader_index(&self) -> usize {
        let js = self.fx.js();
        let name = eventually(Duration::from_secs(30), "a stream leader", || {
            let js = js.clone();
            async move {
                stream_leader(&js, STREAM)
                    .await
                    .ok_or_else(|| "none".to_string())
            }
        })
        .await;
        name.trim_start_matches('n').parse::<usize>().unwrap() - 1
    }

    /// Waits for the producers and completion, checks divergence, asserts the report.
    async fn finish(
        self,
        scenario: &str,
        producers: Vec<tokio::task::JoinHandle<usize>>,
        max_dup: usize,
        max_stall: Duration,
    ) {
        for p in producers {
            p.await.unwrap();
        }
        let took = self
            .checker
            .wait_complete(&self.fx.ledger, Duration::from_secs(180))
            .await;
        let js = self.fx.js();
        eventually(
            Duration::from_secs(60),
            "the task stream is empty",
            || async {
                let mut s = js.get_stream(STREAM).await.map_err(|e| e.to_string())?;
                let n = s.info().await.map_err(|e| e.to_string())?.state.messages;
                if n == 0 {
                    Ok(())
                } else {
                    Err(format!("{n} left"))
                }
            },
        )
        .await;
        self.checker.sample(&js, STREAM).await;
        tokio::time::sleep(Duration::from_secs(6)).await; // ack_wait + 1 s for late redeliveries
        self.stop.cancel();
        self.sampler.await.unwrap();
        let nodes = self.cluster.nodes();
        // Replicas converge shortly after the leader's state settles.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let diverged = loop {
            let d = divergence(nodes, STREAM).await;
            if d.is_empty() || tokio::time::Instant::now() >= deadline {
                break d;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let mut report = self.checker.analyze(&self.fx.ledger());
        report.divergence = diverged;
        report.assert_ok(scenario, max_dup, max_stall);
        assert!(took.is_some(), "{scenario}: not all completed:\n{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_kill_9_of_the_stream_leader_under_load() {
    if !full_tier("cluster_kill_9_of_the_stream_leader_under_load") {
        return;
    }
    let mut run = ClusterRun::start("").await;
    let producers = run.produce(1000, 10);
    run.wait_done(300).await;
    let leader = run.leader_index().await;
    run.cluster.node(leader).stop();
    tokio::time::sleep(Duration::from_secs(5)).await; // the fault lasts 5 s
    run.cluster.node(leader).start_again().await;
    run.cluster.wait_ready().await;
    run.finish("leader kill -9", producers, 24, Duration::from_secs(30))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_forced_stream_and_consumer_leader_step_downs() {
    if !full_tier("cluster_forced_stream_and_consumer_leader_step_downs") {
        return;
    }
    let run = ClusterRun::start("").await;
    let producers = run.produce(1000, 10);
    run.wait_done(200).await;
    let nc = run.fx.client.connection().client.clone();
    for round in 0..3 {
        for subject in [
            format!("$JS.API.STREAM.LEADER.STEPDOWN.{STREAM}"),
            format!("$JS.API.CONSUMER.LEADER.STEPDOWN.{STREAM}.testkit"),
        ] {
            let reply = nc.request(subject.clone(), Bytes::new()).await;
            eprintln!(
                "step-down round {round} {subject}: {:?}",
                reply.map(|m| m.payload)
            );
        }
        run.wait_done(200 + 200 * (round + 1)).await;
    }
    run.finish(
        "leader step-downs",
        producers,
        24 * 6,
        Duration::from_secs(20),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_sigstop_of_the_stream_leader_for_15_s() {
    if !full_tier("cluster_sigstop_of_the_stream_leader_for_15_s") {
        return;
    }
    let mut run = ClusterRun::start("").await;
    let producers = run.produce(1000, 10);
    run.wait_done(300).await;
    let leader = run.leader_index().await;
    run.cluster.node(leader).pause();
    tokio::time::sleep(Duration::from_secs(15)).await; // the fault lasts 15 s
    run.cluster.node(leader).resume();
    run.finish(
        "leader SIGSTOP 15 s",
        producers,
        24,
        Duration::from_secs(35),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_rolling_restart_in_lame_duck_mode() {
    if !full_tier("cluster_rolling_restart_in_lame_duck_mode") {
        return;
    }
    let mut run =
        ClusterRun::start("lame_duck_duration: \"30s\"\nlame_duck_grace_period: \"1s\"").await;
    let producers = run.produce(2000, 10);
    run.wait_done(200).await;
    for i in 0..3 {
        run.cluster.node(i).lame_duck();
        let exited = run.cluster.node(i).wait_exit(Duration::from_secs(45)).await;
        assert!(exited.is_some(), "node {i} did not leave lame duck mode");
        run.cluster.node(i).start_again().await;
        run.cluster.wait_ready().await;
    }
    run.finish(
        "rolling lame-duck restart",
        producers,
        24 * 3,
        Duration::from_secs(30),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_bounce_under_load() {
    if !full_tier("whole_cluster_bounce_under_load") {
        return;
    }
    let mut run = ClusterRun::start("").await;
    let producers = run.produce(1000, 10);
    run.wait_done(300).await;
    run.cluster.restart_all().await;
    run.finish(
        "whole-cluster bounce",
        producers,
        24,
        Duration::from_secs(45),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_past_ack_wait_is_redelivered_once() {
    if !full_tier("a_worker_frozen_past_ack_wait_is_redelivered_once") {
        return;
    }
    let server = NatsServer::start().await;
    let fx = FaultMesh::single(&server, "ack_wait = \"2s\"", "").await;
    let mut a = fx.worker();
    let checker = Checker::new();
    checker.enqueue_sleeps(&fx.client, "frozen", 8, 1500).await;
    eventually(Duration::from_secs(30), "8 running on A", || async {
        let n = taskmesh_tests::ledger_counts(&fx.ledger(), "start").len();
        if n == 8 { Ok(()) } else { Err(format!("{n}")) }
    })
    .await;
    a.sigstop();
    let frozen_ms = now_ms();
    let _b = fx.worker();
    // B takes over all 8. Their first attempts never settled, so each runs alone (crash
    // isolation): one after another, 1.5 s each.
    eventually(Duration::from_secs(30), "B took over all 8", || async {
        let n = fx
            .ledger()
            .iter()
            .filter(|e| e.event == "start" && e.attempt == 2)
            .count();
        if n == 8 {
            Ok(())
        } else {
            Err(format!("{n} redelivered"))
        }
    })
    .await;
    let retried: Vec<_> = fx.ledger().into_iter().filter(|e| e.attempt == 2).collect();
    let first = retried
        .iter()
        .filter(|e| e.event == "start")
        .map(|e| e.at_ms)
        .min()
        .unwrap();
    // The first redelivery starts within ack_wait + 3 s of the freeze.
    assert!(
        first - frozen_ms <= 2_000 + 3_000,
        "redelivery too late: {} ms after the freeze",
        first - frozen_ms
    );
    // Each suspect ran alone: no second attempt started while another was running.
    let mut spans: Vec<(i64, i64)> = retried
        .iter()
        .filter(|e| e.event == "start")
        .filter_map(|s| {
            let done = retried.iter().find(|d| d.event == "done" && d.id == s.id)?;
            Some((s.at_ms, done.at_ms))
        })
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(
            w[1].0 >= w[0].1,
            "two unsettled redeliveries overlapped: {spans:?}"
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // A stays frozen a while longer
    a.sigcont();
    let took = checker
        .wait_complete(&fx.ledger, Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await; // window for a second redelivery
    let entries = fx.ledger();
    let starts = taskmesh_tests::ledger_counts(&entries, "start");
    assert!(
        starts.values().all(|n| *n <= 2),
        "redelivered more than once: {starts:?}"
    );
    let report = checker.analyze(&entries);
    report.assert_ok("worker SIGSTOP past ack_wait", 8, Duration::from_secs(15));
    assert!(took.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_to_nats_latency_resets_and_a_20_s_blackhole() {
    if !full_tier("worker_to_nats_latency_resets_and_a_20_s_blackhole") {
        return;
    }
    let server = NatsServer::start().await;
    let fx = FaultMesh::single(&server, "ack_wait = \"5s\"", "").await;
    let proxy = Proxy::start(format!("127.0.0.1:{}", server.port()).parse().unwrap()).await;
    // The worker reaches NATS only through the proxy.
    let mut cmd = fx.worker_cmd();
    let text = std::fs::read_to_string(&fx.config).unwrap();
    cmd.config = fx.config.with_file_name("worker-proxied.toml");
    std::fs::write(&cmd.config, text.replace(&server.url(), &proxy.url())).unwrap();
    let _w1 = cmd.spawn();
    let _w2 = cmd.spawn();
    let checker = Checker::new();
    let stop = CancellationToken::new();
    let sampler = checker.spawn_sampler(fx.js(), STREAM, stop.clone());
    checker.enqueue_sleeps(&fx.client, "net", 3000, 50).await;
    let progress = |n: usize| {
        let fx = &fx;
        async move {
            eventually(Duration::from_secs(90), "progress", || async {
                let d = taskmesh_tests::ledger_counts(&fx.ledger(), "done").len();
                if d >= n {
                    Ok(())
                } else {
                    Err(format!("{d} done"))
                }
            })
            .await;
        }
    };
    progress(100).await;
    proxy.set_mode(ProxyMode::Latency(Duration::from_millis(50)));
    progress(200).await;
    proxy.set_mode(ProxyMode::Pass);
    proxy.reset_all();
    progress(400).await;
    proxy.set_mode(ProxyMode::Blackhole);
    tokio::time::sleep(Duration::from_secs(20)).await; // the blackhole lasts 20 s
    proxy.set_mode(ProxyMode::Pass);
    let took = checker
        .wait_complete(&fx.ledger, Duration::from_secs(120))
        .await;
    checker.sample(&fx.js(), STREAM).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.cancel();
    sampler.await.unwrap();
    let report = checker.analyze(&fx.ledger());
    // Two workers with 8 slots each may have had their tasks in flight at a reset and at
    // the blackhole; the blackhole itself is the longest allowed stall (+ ack_wait + 10 s).
    report.assert_ok("network faults", 32, Duration::from_secs(20 + 5 + 10));
    assert!(took.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_dead_lettered_with_bounded_worker_memory() {
    if !full_tier("hostile_input_is_dead_lettered_with_bounded_worker_memory") {
        return;
    }
    let server = NatsServer::start().await;
    let fx = FaultMesh::single(&server, "ack_wait = \"5s\"", "").await;
    let mut w = fx.worker();
    let pid = w.pid();
    let js = fx.js();
    let checker = Checker::new();
    checker.enqueue_sleeps(&fx.client, "warm", 50, 0).await;
    checker
        .wait_complete(&fx.ledger, Duration::from_secs(30))
        .await;
    let rss_before = vm_rss_kib(pid).unwrap();
    let deep = "[".repeat(100_000) + &"]".repeat(100_000);
    let bodies: Vec<(&str, Bytes, Option<String>)> = vec![
        ("deep", Bytes::from(deep), None),
        (
            "utf8",
            Bytes::from_static(b"{\"ms\": \"\xff\xfe\xfd\"}"),
            None,
        ),
        (
            "bigkey",
            Bytes::from(format!("{{\"{}\":1}}", "k".repeat(900_000))),
            None,
        ),
        (
            "trace",
            Bytes::from_static(b"{\"ms\":0}"),
            Some("00-".to_string() + &"f".repeat(60_000)),
        ),
    ];
    let mut sent = 0;
    for round in 0..25 {
        for (kind, body, trace) in &bodies {
            let id = format!("hostile-{kind}-{round}");
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", id.as_str());
            h.insert("Task-Id", id.as_str());
            if let Some(t) = trace {
                h.insert("traceparent", t.as_str());
                h.insert("tracestate", t.as_str());
            }
            if js
                .publish_with_headers("tasks.testkit.sleep", h, body.clone())
                .await
                .unwrap()
                .await
                .is_ok()
            {
                sent += 1;
            }
        }
    }
    // Oversize: the server refuses it at publish (max_msg_size 1 MiB).
    let big = js
        .publish("tasks.testkit.sleep", Bytes::from(vec![b'x'; 2 << 20]))
        .await;
    let refused = match big {
        Err(_) => true,
        Ok(ack) => ack.await.is_err(),
    };
    assert!(refused, "a 2 MiB task was accepted");
    // Every hostile message is settled (dead-lettered or run), the stream drains.
    eventually(
        Duration::from_secs(120),
        "hostile input drained",
        || async {
            let mut s = js.get_stream(STREAM).await.map_err(|e| e.to_string())?;
            let n = s.info().await.map_err(|e| e.to_string())?.state.messages;
            if n == 0 {
                Ok(())
            } else {
                Err(format!("{n} left of {sent}"))
            }
        },
    )
    .await;
    assert!(w.is_running(), "the worker died: {}", w.log_tail(30));
    let rss_after = vm_rss_kib(pid).unwrap();
    eprintln!("[fault] hostile: {sent} messages, VmRSS {rss_before} KiB -> {rss_after} KiB");
    assert!(
        rss_after < 256 * 1024 && rss_after < rss_before + 128 * 1024,
        "worker memory not bounded: {rss_before} KiB -> {rss_after} KiB"
    );
    // Still serving.
    let ok = checker
        .enqueue_sleeps(&fx.client, "after-hostile", 10, 0)
        .await;
    assert_eq!(ok.len(), 10);
    assert!(
        checker
            .wait_complete(&fx.ledger, Duration::from_secs(30))
            .await
            .is_some()
    );
}
