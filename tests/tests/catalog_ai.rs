//! `ai` tasks against a real OpenAI-compatible stub on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod catalog_common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use catalog_common::{HttpResponse, HttpStub, Mesh, counter};
use serde_json::json;
use taskmesh_shared::{TaskId, TaskState};
use taskmesh_workers::catalog::Settings;

#[tokio::test]
async fn run_prompt_answers_retries_429_and_notifies() {
    let calls = counter();
    let c = calls.clone();
    let stub = HttpStub::start(Arc::new(move |req| {
        assert_eq!(req.path, "/v1/chat/completions");
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            return HttpResponse::new(429, "slow down").header("Retry-After", "1");
        }
        let body = req.json();
        let prompt = body["messages"].as_array().unwrap().last().unwrap()["content"]
            .as_str()
            .unwrap()
            .to_owned();
        HttpResponse::json(&json!({
            "id": "chatcmpl-1",
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("echo: {prompt}")}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
        }))
    }))
    .await;
    let mut s = Settings::empty();
    s.ai_base_url = Some(format!("{}/v1", stub.url));
    s.ai_api_key = Some("sk-test".into());
    let mesh = Mesh::start(s).await;

    let id = mesh
        .enqueue(
            "ai.run_prompt",
            json!({"prompt": "hello", "system": "be brief", "model": "tiny", "notify_email": "me@example.org"}),
        )
        .await;
    let rec = mesh.wait_state(&id, TaskState::Succeeded).await;
    assert_eq!(rec.attempts, 2, "the 429 was retried once");
    let r = rec.result.unwrap();
    assert_eq!(r["answer"], "echo: hello");
    assert_eq!(r["model"], "tiny");
    assert_eq!(r["usage"]["total_tokens"], 12);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    {
        let reqs = stub.requests.lock().unwrap();
        assert_eq!(reqs[1].header("authorization"), Some("Bearer sk-test"));
        assert_eq!(reqs[1].json()["messages"][0]["role"], "system");
    }
    // The notification became an email.send task with a derived id (it dies here: no SMTP).
    let notify = TaskId::new(r["notify_task_id"].as_str().unwrap()).unwrap();
    assert_eq!(notify.as_str(), format!("{id}-notify"));
    let mail = mesh.wait_state(&notify, TaskState::Dead).await;
    assert_eq!(mail.task, "email.send");
    assert!(mail.error.unwrap().message.contains("TASKMESH_SMTP_URL"));

    // Bad arguments: permanent, naming the field.
    mesh.expect_bad_args("ai.run_prompt", json!({"prompt": ""}), "prompt")
        .await;
    mesh.expect_bad_args("ai.run_prompt", json!({"prompt": 3}), "invalid type")
        .await;
    mesh.expect_bad_args(
        "ai.run_prompt",
        json!({"prompt": "x", "notify_email": "nope"}),
        "notify_email",
    )
    .await;
}

#[tokio::test]
async fn test_scheduler_connection_keeps_the_predecessor_shape() {
    let mesh = Mesh::start(Settings::empty()).await;
    let r = mesh.run_ok("ai.test_scheduler_connection", json!({})).await;
    assert_eq!(r["status"], "success");
    assert_eq!(r["message"], "Scheduler connection test passed");
    assert!(r["task_id"].as_str().is_some());
    // Without a base URL, run_prompt fails permanently with a clear message.
    mesh.expect_bad_args(
        "ai.run_prompt",
        json!({"prompt": "x"}),
        "TASKMESH_AI_BASE_URL",
    )
    .await;
}
