//! `taskmesh api` against a real nats-server: authentication (401, 403), validation
//! (422 problem details naming the field) and the happy path of every route.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_common;

use std::time::Duration;

use api_common::{SERVICE_KEY, request, start_api, token, token_with};
use serde_json::json;
use taskmesh_tests::mesh::path_str;
use taskmesh_tests::{TaskmeshProcess, TestMesh, eventually};

const LIMIT: Duration = Duration::from_secs(30);
const NO_DEFAULT_SCHEDULES: &str = "[scheduler]\ndefault_schedules = false";

#[tokio::test(flavor = "multi_thread")]
async fn auth_401_403_and_422_problem_details() {
    let mesh = TestMesh::start("", NO_DEFAULT_SCHEDULES).await;
    let (_api, addr) = start_api(&mesh).await;
    let read = token("read");
    let write = token("read write");

    // 401 without, with a bad, with an expired and with a forged token; WWW-Authenticate set.
    let forged = token_with("some-other-secret-of-enough-length", "read write", 600);
    let expired = token_with(api_common::SECRET, "read write", -10);
    for bearer in [
        None,
        Some("garbage"),
        Some(expired.as_str()),
        Some(forged.as_str()),
    ] {
        let r = request(&addr, "GET", "/api/stats", bearer, None).await;
        assert_eq!(r.status, 401, "{bearer:?}: {}", r.body);
        assert!(
            r.header("www-authenticate")
                .unwrap_or("")
                .starts_with("Bearer"),
            "{r:?}"
        );
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        assert_eq!(r.json()["status"], 401);
    }
    // 403: a read token on write routes.
    for (method, path, body) in [
        ("POST", "/api/tasks", Some(json!({"task": "testkit.sleep"}))),
        ("POST", "/api/categories/testkit/pause", None),
        ("POST", "/api/dlq/1/replay", None),
        (
            "POST",
            "/api/schedules",
            Some(json!({"name": "x", "task": "testkit.sleep", "every": "1h"})),
        ),
    ] {
        let r = request(&addr, method, path, Some(&read), body.as_ref()).await;
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
    }
    // A read token reads.
    assert_eq!(
        request(&addr, "GET", "/api/stats", Some(&read), None)
            .await
            .status,
        200
    );

    // 422 naming the field.
    for (body, field) in [
        (json!({"task": "not a task"}), "task"),
        (json!({"task": "nocategory.sleep"}), "task"),
        (
            json!({"task": "testkit.sleep", "priority": "urgent"}),
            "priority",
        ),
        (json!({"task": "testkit.sleep", "delay": "soon"}), "delay"),
        (
            json!({"task": "testkit.sleep", "deadline": "tomorrow-ish"}),
            "deadline",
        ),
        (json!({"task": "testkit.sleep", "id": "bad id!"}), "id"),
        (
            json!({"task": "testkit.sleep", "max_attempts": 0}),
            "max_attempts",
        ),
        (
            json!({"task": "testkit.sleep", "max_attempts": "three"}),
            "max_attempts",
        ),
        (json!({"task": "testkit.sleep", "colour": "red"}), "colour"),
        (json!({"args": {}}), "task"),
        (json!("just a string"), "body"),
    ] {
        let r = request(&addr, "POST", "/api/tasks", Some(&write), Some(&body)).await;
        assert_eq!(r.status, 422, "{body}: {}", r.body);
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        let p = r.json();
        assert_eq!(p["title"], "invalid request");
        assert_eq!(p["status"], 422);
        assert_eq!(p["errors"][0]["field"], field, "{body}: {p}");
    }
    let r = request(&addr, "GET", "/api/dlq?reason=bored", Some(&read), None).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.json()["errors"][0]["field"], "reason");
    let r = request(
        &addr,
        "POST",
        "/api/schedules",
        Some(&write),
        Some(&json!({"name": "bad", "task": "testkit.sleep", "cron": "61 * * * *"})),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.json()["errors"][0]["field"], "cron");
    let r = request(&addr, "POST", "/api/schedules", Some(&write), Some(&json!({"name": "bad", "task": "testkit.sleep", "every": "1h", "timezone": "Mars/Base"}))).await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.json()["errors"][0]["field"], "timezone");
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_to_start_without_auth() {
    let mesh = TestMesh::start("", NO_DEFAULT_SCHEDULES).await;
    let cfg = path_str(&mesh.config);
    let mut p =
        TaskmeshProcess::spawn(&["api", "--config", cfg, "--http-addr", "127.0.0.1:0"], &[]);
    let st = p.wait_exit(LIMIT).await.expect("exits");
    assert!(!st.success());
    assert!(
        p.log().contains("TASKMESH_API_JWT_HS256_SECRET"),
        "{}",
        p.log()
    );
    let mut p = TaskmeshProcess::spawn(
        &[
            "api",
            "--config",
            cfg,
            "--http-addr",
            "0.0.0.0:0",
            "--insecure-no-auth",
        ],
        &[],
    );
    let st = p.wait_exit(LIMIT).await.expect("exits");
    assert!(
        !st.success(),
        "no auth on a non-loopback address: {}",
        p.log()
    );
    assert!(p.log().contains("loopback"), "{}", p.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_happy_path() {
    let mesh = TestMesh::start("", NO_DEFAULT_SCHEDULES).await;
    let (_api, addr) = start_api(&mesh).await;
    let read = token("read");
    let write = token("read write");

    // Unauthenticated: probes, dashboard and the OpenAPI document, which lists every route.
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/",
        "/assets/app.js",
        "/assets/app.css",
    ] {
        let r = request(&addr, "GET", path, None, None).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    let doc = request(&addr, "GET", "/openapi.json", None, None)
        .await
        .json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for (path, method) in [
        ("/api/tasks", "post"),
        ("/api/tasks/{id}", "get"),
        ("/api/dlq", "get"),
        ("/api/dlq/{id}/replay", "post"),
        ("/api/schedules", "get"),
        ("/api/schedules", "post"),
        ("/api/schedules/{name}", "delete"),
        ("/api/schedules/{name}/trigger", "post"),
        ("/api/categories/{category}/pause", "post"),
        ("/api/categories/{category}/resume", "post"),
        ("/api/stats", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "openapi lacks {method} {path}"
        );
    }

    // POST /api/tasks with priority, deadline and a delay; with a static API key too.
    let _worker = mesh.worker();
    let r = request(&addr, "POST", "/api/tasks", Some(&write), Some(&json!({
        "task": "testkit.sleep", "args": {"ms": 1}, "id": "api-1", "priority": "high", "deadline": "10m"
    }))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["id"], "api-1");
    let r = request(&addr, "POST", "/api/tasks", Some(SERVICE_KEY), Some(&json!({
        "task": "testkit.sleep", "args": {"ms": 1}, "id": "api-delayed", "delay": "1s", "max_attempts": 2
    }))).await;
    assert_eq!(r.status, 201, "{}", r.body);
    // Same id again: not stored twice.
    let r = request(
        &addr,
        "POST",
        "/api/tasks",
        Some(&write),
        Some(&json!({"task": "testkit.sleep", "id": "api-1"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["duplicate"], true);

    // GET /api/tasks/{id}
    for id in ["api-1", "api-delayed"] {
        eventually(LIMIT, &format!("{id} succeeded"), || async {
            let r = request(&addr, "GET", &format!("/api/tasks/{id}"), Some(&read), None).await;
            if r.status == 200 && r.json()["record"]["state"] == "succeeded" {
                Ok(())
            } else {
                Err(r.body)
            }
        })
        .await;
    }
    assert_eq!(
        request(&addr, "GET", "/api/tasks/unknown-task", Some(&read), None)
            .await
            .status,
        404
    );

    // GET /api/dlq, POST /api/dlq/{id}/replay (by sequence and by task id).
    for id in ["api-dead-1", "api-dead-2"] {
        let r = request(
            &addr,
            "POST",
            "/api/tasks",
            Some(&write),
            Some(&json!({"task": "testkit.fail", "id": id})),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let list = eventually(LIMIT, "two dead letters", || async {
        let r = request(
            &addr,
            "GET",
            "/api/dlq?task=testkit.fail&reason=permanent&newer_than=1h",
            Some(&read),
            None,
        )
        .await;
        let l = r.json();
        if l.as_array().map(Vec::len) == Some(2) {
            Ok(l)
        } else {
            Err(r.body)
        }
    })
    .await;
    let seq = list[0]["seq"].as_u64().unwrap();
    assert_eq!(list[0]["task_id"], "api-dead-1");
    let r = request(&addr, "GET", "/api/dlq?older_than=1h", Some(&read), None).await;
    assert_eq!(r.json().as_array().unwrap().len(), 0);
    let r = request(&addr, "GET", &format!("/api/dlq/{seq}"), Some(&read), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = request(
        &addr,
        "POST",
        &format!("/api/dlq/{seq}/replay"),
        Some(&write),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["subject"], "tasks.testkit.fail");
    // Gone from the DLQ: a second replay of the same dead letter is a 404, not a second task.
    let r = request(
        &addr,
        "POST",
        &format!("/api/dlq/{seq}/replay"),
        Some(&write),
        None,
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = request(
        &addr,
        "POST",
        "/api/dlq/api-dead-2/replay",
        Some(&write),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["task_id"], "api-dead-2");
    // The replayed tasks ran again (testkit.fail fails again: back in the DLQ).
    eventually(LIMIT, "replayed tasks dead-lettered again", || async {
        let r = request(&addr, "GET", "/api/dlq", Some(&read), None).await;
        let n = r.json().as_array().map_or(0, Vec::len);
        if n == 2 { Ok(()) } else { Err(r.body) }
    })
    .await;
    let r = request(&addr, "DELETE", "/api/dlq/api-dead-2", Some(&write), None).await;
    assert_eq!(r.status, 204, "{}", r.body);

    // Schedules: add, list (next fire), trigger, pause, resume, delete.
    let r = request(
        &addr,
        "POST",
        "/api/schedules",
        Some(&write),
        Some(&json!({
            "name": "api-hourly", "task": "testkit.sleep", "every": "1h", "args": {"ms": 1}
        })),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(r.json()["next_fire"].is_string(), "{}", r.body);
    let r = request(
        &addr,
        "POST",
        "/api/schedules",
        Some(&write),
        Some(&json!({
            "name": "api-hourly", "task": "testkit.sleep", "every": "1h"
        })),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    let r = request(&addr, "GET", "/api/schedules", Some(&read), None).await;
    assert_eq!(r.status, 200);
    let l = r.json();
    let row = l["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "api-hourly")
        .cloned()
        .expect("listed");
    assert!(row["next_fire"].is_string(), "{row}");
    let r = request(
        &addr,
        "POST",
        "/api/schedules/api-hourly/trigger",
        Some(&write),
        None,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let fired = r.json()["id"].as_str().unwrap().to_owned();
    eventually(LIMIT, "the triggered fire ran", || async {
        let r = request(
            &addr,
            "GET",
            &format!("/api/tasks/{fired}"),
            Some(&read),
            None,
        )
        .await;
        if r.status == 200 && r.json()["record"]["state"] == "succeeded" {
            Ok(())
        } else {
            Err(r.body)
        }
    })
    .await;
    let r = request(
        &addr,
        "POST",
        "/api/schedules/api-hourly/pause",
        Some(&write),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let l = request(&addr, "GET", "/api/schedules", Some(&read), None)
        .await
        .json();
    assert!(
        l["schedules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "api-hourly" && s["state"] == "paused"),
        "{l}"
    );
    let r = request(
        &addr,
        "POST",
        "/api/schedules/api-hourly/resume",
        Some(&write),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = request(
        &addr,
        "DELETE",
        "/api/schedules/api-hourly",
        Some(&write),
        None,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let r = request(
        &addr,
        "DELETE",
        "/api/schedules/api-hourly",
        Some(&write),
        None,
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = request(
        &addr,
        "POST",
        "/api/schedules/nope/trigger",
        Some(&write),
        None,
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);

    // Categories: pause and resume show in /api/stats.
    let r = request(
        &addr,
        "POST",
        "/api/categories/testkit/pause",
        Some(&write),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let st = request(&addr, "GET", "/api/stats", Some(&read), None)
        .await
        .json();
    let t = st["categories"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["category"] == "testkit")
        .cloned()
        .unwrap();
    assert_eq!(t["paused"], true, "{t}");
    assert_eq!(t["dlq"], 1, "{t}");
    assert_eq!(st["workers"].as_array().unwrap().len(), 1, "{st}");
    let r = request(
        &addr,
        "POST",
        "/api/categories/testkit/resume",
        Some(&write),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let st = request(&addr, "GET", "/api/stats", Some(&read), None)
        .await
        .json();
    assert_eq!(st["categories"][0]["paused"], false, "{st}");
    let r = request(
        &addr,
        "POST",
        "/api/categories/nosuch/pause",
        Some(&write),
        None,
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);
}
