//! The web dashboard in headless Chromium, driven through chromedriver's WebDriver HTTP
//! API (no Node): sign in, watch a queue depth change after enqueues, replay a dead letter
//! from the page and see it run. With `TASKMESH_UPDATE_DOCS=1` it saves the screenshot
//! `docs/dashboard.png`.
//!
//! Needs Debian's `chromium` and `chromium-driver`; installed here with apt-get when
//! missing (the test machines run as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_common;

use std::path::Path;
use std::time::Duration;

use api_common::{request, start_api, token};
use base64::Engine as _;
use serde_json::{Value, json};
use taskmesh_nats::EnqueueOptions;
use taskmesh_shared::{TaskId, TaskName, TaskState};
use taskmesh_tests::{TaskmeshProcess, TestMesh, eventually, workspace_root};

const LIMIT: Duration = Duration::from_secs(45);

/// Installs chromium and chromedriver when missing.
fn ensure_chromium() {
    let have = |p: &str| Path::new(p).exists();
    if have("/usr/bin/chromium") && have("/usr/bin/chromedriver") {
        return;
    }
    let st = std::process::Command::new("sh")
        .args([
            "-c",
            "(apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver",
        ])
        .status()
        .expect("run apt-get");
    assert!(
        st.success(),
        "installing chromium and chromium-driver failed"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A WebDriver session.
struct Browser {
    driver: String,
    session: String,
    _profile: tempfile::TempDir,
    _process: TaskmeshProcess,
}

impl Browser {
    async fn start() -> Self {
        ensure_chromium();
        let port = free_port();
        let process = TaskmeshProcess::spawn_program(
            Path::new("/usr/bin/chromedriver"),
            &[&format!("--port={port}")],
            &[],
        );
        let driver = format!("127.0.0.1:{port}");
        eventually(LIMIT, "chromedriver answers", || async {
            tokio::net::TcpStream::connect(&driver)
                .await
                .map_err(|e| e.to_string())?;
            let r = request(&driver, "GET", "/status", None, None).await;
            if r.status == 200 { Ok(()) } else { Err(r.body) }
        })
        .await;
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    "--window-size=1200,560",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }
        }}});
        let r = request(&driver, "POST", "/session", None, Some(&caps)).await;
        assert_eq!(r.status, 200, "new session: {}", r.body);
        let session = r.json()["value"]["sessionId"]
            .as_str()
            .expect("session id")
            .to_owned();
        Self {
            driver,
            session,
            _profile: profile,
            _process: process,
        }
    }

    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("/session/{}{path}", self.session);
        let body = body.or_else(|| (method == "POST").then(|| json!({})));
        let r = request(&self.driver, method, &url, None, body.as_ref()).await;
        assert_eq!(r.status, 200, "{method} {path}: {}", r.body);
        r.json()["value"].clone()
    }

    async fn script(&self, js: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": js, "args": []})),
        )
        .await
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .expect("element id")
            .to_owned()
    }

    async fn text_of(&self, css: &str) -> Option<String> {
        let js =
            format!("const e = document.querySelector({css:?}); return e ? e.textContent : null;");
        self.script(&js).await.as_str().map(str::to_owned)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Best effort: closing the session ends Chromium; the driver is killed on drop.
        let driver = self.driver.clone();
        let url = format!("/session/{}", self.session);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    request(&driver, "DELETE", &url, None, None),
                )
                .await;
            });
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_shows_live_depths_and_replays_a_dead_letter() {
    let mesh = TestMesh::start("", "[scheduler]\ndefault_schedules = false").await;
    let (_api, addr) = start_api(&mesh).await;
    // A dynamic schedule, so the schedules table has a row with a next fire.
    let r = request(&addr, "POST", "/api/schedules", Some(&token("write")), Some(&json!({
        "name": "nightly-report", "task": "testkit.sleep", "cron": "0 3 * * *", "args": {"ms": 1}
    }))).await;
    assert_eq!(r.status, 201, "{}", r.body);

    let b = Browser::start().await;
    b.cmd(
        "POST",
        "/url",
        Some(json!({"url": format!("http://{addr}/")})),
    )
    .await;
    let title = b.cmd("GET", "/title", None).await;
    assert_eq!(title, "taskmesh");

    // Sign in through the login field.
    let field = b.find("#token").await;
    b.cmd(
        "POST",
        &format!("/element/{field}/value"),
        Some(json!({"text": token("read write")})),
    )
    .await;
    let btn = b.find("#login-btn").await;
    b.cmd("POST", &format!("/element/{btn}/click"), None).await;
    let pending = "tr[data-category=testkit] td.pending";
    eventually(LIMIT, "the page shows testkit's depth 0", || async {
        match b.text_of(pending).await {
            Some(t) if t == "0" => Ok(()),
            other => Err(format!(
                "{other:?}; status {:?}",
                b.text_of("#status").await
            )),
        }
    })
    .await;

    // Enqueue with no worker running: the depth on the page changes without a reload.
    mesh.sleep_tasks("dash", 7, 1).await;
    eventually(LIMIT, "the page shows depth 7", || async {
        match b.text_of(pending).await {
            Some(t) if t == "7" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // A dead letter: a task whose dependency is down, with a single attempt.
    let flag = mesh.dir.path().join("dependency-down");
    std::fs::write(&flag, b"down").unwrap();
    let _worker = mesh.worker();
    let id = TaskId::new("dash-dependent").unwrap();
    mesh.client
        .enqueue(
            &TaskName::parse("testkit.dependent").unwrap(),
            &json!({ "down_flag": flag.to_str().unwrap() }),
            EnqueueOptions {
                max_attempts: Some(1),
                ..Default::default()
            }
            .id(id.clone()),
        )
        .await
        .unwrap();
    let row = "#dlq tr[data-task-id=dash-dependent]";
    eventually(LIMIT, "the dead letter is listed on the page", || async {
        match b.text_of(row).await {
            Some(t) if t.contains("max_attempts") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually(LIMIT, "the queue drained on the page", || async {
        match b.text_of(pending).await {
            Some(t) if t == "0" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let rec = mesh.client.result(&id).await.unwrap().unwrap();
    assert_eq!(rec.state, TaskState::Dead);

    // Screenshot for the docs, with the dead letter visible.
    let png = b.cmd("GET", "/screenshot", None).await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(png.as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    // `TASKMESH_UPDATE_DOCS=1` refreshes the screenshot in the docs.
    if std::env::var_os("TASKMESH_UPDATE_DOCS").is_some() {
        std::fs::write(workspace_root().join("docs/dashboard.png"), &png).unwrap();
    }

    // The dependency is back; replay from the page.
    std::fs::remove_file(&flag).unwrap();
    let replay = b.find(&format!("{row} button[data-action=replay]")).await;
    b.cmd("POST", &format!("/element/{replay}/click"), None)
        .await;
    eventually(LIMIT, "the replayed task succeeded", || async {
        match mesh.client.result(&id).await.map_err(|e| e.to_string())? {
            Some(r) if r.state == TaskState::Succeeded => Ok(()),
            other => Err(format!(
                "{:?}; page says {:?}",
                other.map(|r| r.state),
                b.text_of("#message").await
            )),
        }
    })
    .await;
    eventually(LIMIT, "the dead letter left the page", || async {
        match b.text_of(row).await {
            None => Ok(()),
            Some(t) => Err(t),
        }
    })
    .await;
    let st = request(&addr, "GET", "/api/stats", Some(&token("read")), None)
        .await
        .json();
    assert_eq!(st["dlq_total"], 0, "{st}");
}
