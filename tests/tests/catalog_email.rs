//! `email` tasks against a real SMTP sink and a real Maildir on disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod catalog_common;

use catalog_common::{Mesh, SmtpSink};
use serde_json::json;
use taskmesh_nats::EnqueueOptions;
use taskmesh_shared::{TaskId, TaskState};
use taskmesh_workers::catalog::Settings;

#[tokio::test]
async fn send_delivers_once_per_task_id_and_retries_a_451() {
    let sink = SmtpSink::start(1).await;
    let mut s = Settings::empty();
    s.smtp_url = Some(sink.url.clone());
    s.smtp_from = "taskmesh <bot@example.org>".into();
    let mesh = Mesh::start(s).await;

    let id = TaskId::new("mail-once-1").unwrap();
    let args = json!({"to": ["a@example.org", "B <b@example.org>"], "subject": "Hello", "text": "plain body", "html": "<p>html body</p>"});
    mesh.enqueue_opts(
        "email.send",
        args.clone(),
        EnqueueOptions::default().id(id.clone()),
    )
    .await;
    let rec = mesh.wait_state(&id, TaskState::Succeeded).await;
    assert_eq!(rec.attempts, 2, "the 451 was retried");
    let r = rec.result.unwrap();
    assert_eq!(r["message_id"], "<mail-once-1@taskmesh>");
    assert_eq!(r["recipients"], json!(["a@example.org", "b@example.org"]));
    assert_eq!(r["already_sent"], false);
    let got = sink.received();
    assert_eq!(got.len(), 1);
    assert!(got[0].contains("Subject: Hello"), "{}", got[0]);
    assert!(got[0].contains("plain body") && got[0].contains("<p>html body</p>"));
    assert!(got[0].contains("Message-ID: <mail-once-1@taskmesh>"));

    // A redelivery of the same task id (a new message, same Task-Id) sends nothing.
    let again = EnqueueOptions {
        msg_id: Some("mail-once-1-redelivered".into()),
        ..EnqueueOptions::default().id(id.clone())
    };
    mesh.enqueue_opts("email.send", args, again).await;
    let second = taskmesh_tests::eventually(
        std::time::Duration::from_secs(20),
        "the redelivered task finished",
        || async {
            match mesh.record(&id).await {
                Some(r)
                    if r.state == TaskState::Succeeded
                        && r.result.as_ref().unwrap()["already_sent"] == true =>
                {
                    Ok(r)
                }
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(
        second.result.unwrap()["message_id"],
        "<mail-once-1@taskmesh>"
    );
    assert_eq!(sink.received().len(), 1, "never sent twice");

    // Bad arguments.
    mesh.expect_bad_args(
        "email.send",
        json!({"to": "not an address", "subject": "x", "text": "y"}),
        "to[0]",
    )
    .await;
    mesh.expect_bad_args(
        "email.send",
        json!({"to": "a@example.org", "subject": "x"}),
        "text",
    )
    .await;
    mesh.expect_bad_args(
        "email.send",
        json!({"to": "a@example.org", "subject": "a\nb", "text": "y"}),
        "subject",
    )
    .await;
    mesh.expect_bad_args(
        "email.send",
        json!({"to": "a@example.org", "subject": "x", "text": "y", "bcc": 1}),
        "bcc",
    )
    .await;
}

fn maildir_with(messages: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for sub in ["new", "cur", "tmp"] {
        std::fs::create_dir_all(d.path().join(sub)).unwrap();
    }
    for (name, body) in messages {
        std::fs::write(d.path().join("new").join(name), body).unwrap();
    }
    d
}

#[tokio::test]
async fn queue_files_new_mail_by_rules_and_categorize_classifies() {
    let md = maildir_with(&[
        (
            "1.a",
            "From: Boss <boss@corp.example>\r\nSubject: Q3 plan\r\n\r\nsee attached\r\n",
        ),
        (
            "2.b",
            "From: Shop <shop@store.example>\r\nSubject: Your invoice 42\r\n\r\nthanks\r\n",
        ),
        (
            "3.c",
            "From: friend@home.example\r\nSubject: hi\r\n\r\nlunch?\r\n",
        ),
    ]);
    let mut s = Settings::empty();
    s.maildir = Some(md.path().to_path_buf());
    s.email_rules = Some(
        json!({"default": "personal", "rules": [
            {"category": "work", "from": "@corp\\.example"},
            {"category": "bills", "subject": "invoice"}
        ]})
        .to_string(),
    );
    let mesh = Mesh::start(s).await;

    let r = mesh.run_ok("email.process_email_queue", json!({})).await;
    assert_eq!(r["processed"], 3);
    assert_eq!(
        r["by_category"],
        json!({"work": 1, "bills": 1, "personal": 1})
    );
    assert_eq!(r["remaining"], 0);
    assert_eq!(std::fs::read_dir(md.path().join("new")).unwrap().count(), 0);
    let filed = std::fs::read_to_string(md.path().join("cur/2.b:2,")).unwrap();
    assert!(
        filed.starts_with("X-Taskmesh-Category: bills\r\n"),
        "{filed}"
    );
    // Nothing new: nothing filed twice.
    let again = mesh.run_ok("email.process_email_queue", json!({})).await;
    assert_eq!(again["processed"], 0);

    // Retry path: a Maildir that is not there yet (not mounted) is retried, then works.
    let later = tempfile::tempdir().unwrap();
    let root = later.path().join("inbox");
    let id = mesh
        .enqueue("email.process_email_queue", json!({"maildir": root}))
        .await;
    mesh.wait_state(&id, TaskState::Retrying).await;
    std::fs::create_dir_all(root.join("new")).unwrap();
    std::fs::write(
        root.join("new/9.z"),
        "From: x@corp.example\r\nSubject: s\r\n\r\nb\r\n",
    )
    .unwrap();
    let done = mesh.wait_state(&id, TaskState::Succeeded).await;
    assert_eq!(done.result.unwrap()["by_category"], json!({"work": 1}));

    // Bad arguments.
    mesh.expect_bad_args("email.process_email_queue", json!({"limit": 0}), "limit")
        .await;
    mesh.expect_bad_args(
        "email.process_email_queue",
        json!({"maildir": "relative"}),
        "maildir",
    )
    .await;

    // categorize_incoming_email: configured rules, per-call rules, bad rules.
    let c = mesh
        .run_ok(
            "email.categorize_incoming_email",
            json!({"from": "ceo@corp.example", "subject": "x"}),
        )
        .await;
    assert_eq!(c, json!({"category": "work", "rule": 0}));
    let c = mesh
        .run_ok("email.categorize_incoming_email", json!({"subject": "weekly digest", "rules": [{"category": "news", "subject": "digest"}]}))
        .await;
    assert_eq!(c, json!({"category": "news", "rule": 0}));
    let c = mesh
        .run_ok(
            "email.categorize_incoming_email",
            json!({"from": "x@y.example"}),
        )
        .await;
    assert_eq!(c, json!({"category": "personal", "rule": null}));
    mesh.expect_bad_args(
        "email.categorize_incoming_email",
        json!({"from": "a", "rules": [{"category": "x", "from": "("}]}),
        "rules[0].from",
    )
    .await;
}

#[tokio::test]
async fn daily_summary_reports_task_statistics_by_mail() {
    let sink = SmtpSink::start(0).await;
    let mut s = Settings::empty();
    s.smtp_url = Some(sink.url.clone());
    s.summary_to = vec!["ops@example.org".into()];
    let mesh = Mesh::start(s).await;
    for i in 0..3 {
        mesh.run_ok(
            "email.categorize_incoming_email",
            json!({"subject": format!("m{i}")}),
        )
        .await;
    }
    mesh.expect_bad_args(
        "email.categorize_incoming_email",
        json!({"subject": 1}),
        "subject",
    )
    .await;
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let id = mesh
        .enqueue("email.send_daily_email_summary", json!({"date": today}))
        .await;
    let r = mesh
        .wait_state(&id, TaskState::Succeeded)
        .await
        .result
        .unwrap();
    let stats = &r["tasks"]["email.categorize_incoming_email"];
    assert_eq!(stats["succeeded"], 3, "{r}");
    assert_eq!(stats["dead"], 1, "{r}");
    assert!(stats["p50_ms"].is_u64() && stats["p95_ms"].is_u64(), "{r}");
    assert_eq!(r["sent_to"], json!(["ops@example.org"]));
    let mail_id = TaskId::new(r["email_task_id"].as_str().unwrap()).unwrap();
    assert_eq!(mail_id.as_str(), format!("{id}-mail"));
    mesh.wait_state(&mail_id, TaskState::Succeeded).await;
    let got = sink.received();
    assert_eq!(got.len(), 1);
    assert!(got[0].contains("taskmesh daily summary"), "{}", got[0]);
    assert!(got[0].contains("email.categorize_incoming_email"));
    assert!(got[0].contains("text/html"));

    // The default (yesterday) with nobody to mail works and sends nothing.
    let empty = mesh
        .run_ok("email.send_daily_email_summary", json!({"to": []}))
        .await;
    assert_eq!(empty["email_task_id"], serde_json::Value::Null);
    mesh.expect_bad_args(
        "email.send_daily_email_summary",
        json!({"date": "yesterday"}),
        "date",
    )
    .await;
    mesh.expect_bad_args(
        "email.send_daily_email_summary",
        json!({"to": ["x"]}),
        "to[0]",
    )
    .await;
}
