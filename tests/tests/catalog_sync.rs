//! `sync` tasks against a real HTTP server (ICS with ETag, Notion-shaped JSON with
//! pagination and a 429) and a real IMAP server on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod catalog_common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use catalog_common::{HttpResponse, HttpStub, Mesh, counter, free_port, serve_imap};
use serde_json::json;
use taskmesh_shared::TaskState;
use taskmesh_workers::catalog::Settings;

fn ics(events: &[(&str, &str, u32)]) -> String {
    let mut s = String::from("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\n");
    for (uid, summary, seq) in events {
        s.push_str(&format!(
            "BEGIN:VEVENT\r\nUID:{uid}\r\nSUMMARY:{summary}\r\nDTSTART:20261201T090000Z\r\nSEQUENCE:{seq}\r\nEND:VEVENT\r\n"
        ));
    }
    s.push_str("END:VCALENDAR\r\n");
    s
}

#[tokio::test]
async fn calendar_events_sync_with_etag_and_retry() {
    // (etag, body) served now; the first request gets a 503 with Retry-After.
    let feed = Arc::new(Mutex::new((
        "\"v1\"".to_string(),
        ics(&[
            ("a@x", "Standup", 0),
            ("b@x", "Review", 0),
            ("a@x", "Standup (old)", 0),
        ]),
    )));
    let calls = counter();
    let (f, c) = (feed.clone(), calls.clone());
    let stub = HttpStub::start(Arc::new(move |req| {
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            return HttpResponse::new(503, "busy").header("Retry-After", "1");
        }
        let (etag, body) = f.lock().unwrap().clone();
        if req.header("if-none-match") == Some(etag.as_str()) {
            return HttpResponse::new(304, "");
        }
        HttpResponse::new(200, body)
            .header("ETag", &etag)
            .header("Content-Type", "text/calendar")
    }))
    .await;
    let mut s = Settings::empty();
    s.calendar_urls = vec![format!("{}/cal.ics", stub.url)];
    let mesh = Mesh::start(s).await;

    let id = mesh.enqueue("sync.calendar_events", json!({})).await;
    let rec = mesh.wait_state(&id, TaskState::Succeeded).await;
    assert_eq!(rec.attempts, 2, "the 503 was retried");
    let r = rec.result.unwrap();
    assert_eq!(r["added"], 2, "{r}");
    assert_eq!(r["feeds"][0]["duplicates"], 1);
    let kv = mesh
        .conn()
        .js
        .get_key_value("TASKMESH_CALENDAR")
        .await
        .unwrap();
    let keys: Vec<String> = futures::TryStreamExt::try_collect(kv.keys().await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        keys.iter().filter(|k| k.starts_with("event.")).count(),
        2,
        "{keys:?}"
    );

    // Same ETag: a conditional GET answered 304, nothing changes.
    let r = mesh.run_ok("sync.calendar_events", json!({})).await;
    assert_eq!(r["feeds"][0]["not_modified"], true, "{r}");
    assert_eq!(
        stub.requests
            .lock()
            .unwrap()
            .last()
            .unwrap()
            .header("if-none-match"),
        Some("\"v1\"")
    );

    // A new version: one updated, one removed, one added.
    *feed.lock().unwrap() = (
        "\"v2\"".into(),
        ics(&[("a@x", "Standup moved", 1), ("c@x", "Party", 0)]),
    );
    let r = mesh.run_ok("sync.calendar_events", json!({})).await;
    assert_eq!(
        (
            r["added"].as_u64(),
            r["updated"].as_u64(),
            r["removed"].as_u64()
        ),
        (Some(1), Some(1), Some(1)),
        "{r}"
    );
    let keys: Vec<String> = futures::TryStreamExt::try_collect(kv.keys().await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        keys.iter().filter(|k| k.starts_with("event.")).count(),
        2,
        "{keys:?}"
    );
    let mut summaries = Vec::new();
    for k in keys.iter().filter(|k| k.starts_with("event.")) {
        let v: serde_json::Value =
            serde_json::from_slice(&kv.get(k).await.unwrap().unwrap()).unwrap();
        summaries.push(v["summary"].as_str().unwrap().to_owned());
    }
    summaries.sort();
    assert_eq!(summaries, vec!["Party", "Standup moved"]);

    mesh.expect_bad_args(
        "sync.calendar_events",
        json!({"urls": ["ftp://x/cal.ics"]}),
        "urls[0]",
    )
    .await;
    // A feed that is not iCalendar is a permanent failure naming the feed.
    let html = HttpStub::start(Arc::new(|_| HttpResponse::new(200, "<html>login</html>"))).await;
    mesh.expect_bad_args(
        "sync.calendar_events",
        json!({"urls": [html.url]}),
        "urls[0]",
    )
    .await;
}

#[tokio::test]
async fn notion_pages_paginate_store_and_honour_429() {
    let calls = counter();
    let c = calls.clone();
    let stub = HttpStub::start(Arc::new(move |req| {
        assert_eq!(req.path, "/v1/databases/db-1/query");
        assert_eq!(req.header("authorization"), Some("Bearer secret_x"));
        assert!(req.header("notion-version").is_some());
        let n = c.fetch_add(1, Ordering::SeqCst);
        let body = req.json();
        let page = |id: &str, title: &str, edited: &str, archived: bool| {
            json!({
                "object": "page", "id": id, "url": format!("https://notion.so/{id}"),
                "last_edited_time": edited, "archived": archived,
                "properties": {"Name": {"type": "title", "title": [{"plain_text": title}]}}
            })
        };
        match body.get("start_cursor").and_then(|v| v.as_str()) {
            None => HttpResponse::json(&json!({
                "object": "list", "has_more": true, "next_cursor": "c2",
                "results": [page("p-1", "One", "2026-11-01T10:00:00.000Z", false),
                            page("p-2", "Two", "2026-11-02T10:00:00.000Z", false)]
            })),
            Some("c2") if n == 1 => {
                HttpResponse::new(429, "{\"code\":\"rate_limited\"}").header("Retry-After", "1")
            }
            Some("c2") => HttpResponse::json(&json!({
                "object": "list", "has_more": false, "next_cursor": null,
                "results": [page("p-3", "Three", "2026-11-03T10:00:00.000Z", false),
                            page("p-4", "Gone", "2026-11-03T11:00:00.000Z", true)]
            })),
            Some(other) => HttpResponse::new(400, format!("bad cursor {other}")),
        }
    }))
    .await;
    let mut s = Settings::empty();
    s.notion_base_url = stub.url.clone();
    s.notion_token = Some("secret_x".into());
    s.notion_database_id = Some("db-1".into());
    let mesh = Mesh::start(s).await;

    let id = mesh
        .enqueue("sync.notion_pages", json!({"page_size": 2}))
        .await;
    let rec = mesh.wait_state(&id, TaskState::Succeeded).await;
    assert_eq!(rec.attempts, 2, "the 429 was retried");
    let r = rec.result.unwrap();
    // Attempt 2 re-read page 1 (already stored, unchanged) then page 2.
    assert_eq!(r["added"], 1, "{r}");
    assert_eq!(r["unchanged"], 2, "{r}");
    assert_eq!(r["cursor"], "2026-11-03T11:00:00.000Z");
    let kv = mesh
        .conn()
        .js
        .get_key_value("TASKMESH_NOTION")
        .await
        .unwrap();
    let p3: serde_json::Value =
        serde_json::from_slice(&kv.get("page.p-3").await.unwrap().unwrap()).unwrap();
    assert_eq!(p3["title"], "Three");
    assert!(kv.get("page.p-1").await.unwrap().is_some());
    assert!(
        kv.get("page.p-4").await.unwrap().is_none(),
        "archived pages are not stored"
    );
    // The next run sends the cursor as a filter.
    mesh.run_ok("sync.notion_pages", json!({"page_size": 2}))
        .await;
    let last = stub.requests.lock().unwrap()[4].json();
    assert_eq!(
        last["filter"]["last_edited_time"]["on_or_after"],
        "2026-11-03T11:00:00.000Z"
    );

    mesh.expect_bad_args("sync.notion_pages", json!({"page_size": 0}), "page_size")
        .await;
    mesh.expect_bad_args(
        "sync.notion_pages",
        json!({"database_id": "../x"}),
        "database_id",
    )
    .await;
}

#[tokio::test]
async fn email_service_copies_imap_mail_into_the_maildir_once() {
    let md = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut s = Settings::empty();
    s.maildir = Some(md.path().to_path_buf());
    s.imap_url = Some(format!("imap://me:secret@127.0.0.1:{port}/INBOX"));
    let mesh = Mesh::start(s).await;

    // Retry path: the IMAP server is down at first.
    let id = mesh.enqueue("sync.email_service", json!({})).await;
    mesh.wait_state(&id, TaskState::Retrying).await;
    let messages = Arc::new(Mutex::new(vec![
        b"From: a@x.example\r\nSubject: one\r\n\r\nfirst\r\n".to_vec(),
        b"From: b@x.example\r\nSubject: two\r\n\r\nsecond\r\n".to_vec(),
    ]));
    serve_imap(
        tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap(),
        messages.clone(),
    );
    let r = mesh
        .wait_state(&id, TaskState::Succeeded)
        .await
        .result
        .unwrap();
    assert_eq!(r["fetched"], 2, "{r}");
    assert_eq!(r["last_uid"], 2);
    let new: Vec<String> = std::fs::read_dir(md.path().join("new"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(new.len(), 2);
    assert!(new.iter().any(|m| m.contains("Subject: two")));

    // Nothing new: nothing copied again; one new message: one copied.
    let r = mesh.run_ok("sync.email_service", json!({})).await;
    assert_eq!(r["fetched"], 0, "{r}");
    messages
        .lock()
        .unwrap()
        .push(b"Subject: three\r\n\r\nthird\r\n".to_vec());
    let r = mesh.run_ok("sync.email_service", json!({})).await;
    assert_eq!(
        (r["fetched"].as_u64(), r["last_uid"].as_u64()),
        (Some(1), Some(3)),
        "{r}"
    );
    // And the queue picks them up.
    let q = mesh.run_ok("email.process_email_queue", json!({})).await;
    assert_eq!(q["processed"], 3, "{q}");

    mesh.expect_bad_args("sync.email_service", json!({"limit": 0}), "limit")
        .await;
    mesh.expect_bad_args("sync.email_service", json!({"maildir": "rel"}), "maildir")
        .await;
}
