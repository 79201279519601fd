//! `ai` category tasks.
//!
//! - `ai.run_prompt`: one chat completion against an OpenAI-compatible endpoint. User-defined
//!   AI tasks ("summarize my inbox every morning", reminders) are dynamic schedules in
//!   `TASKMESH_SCHEDULES` that target it, which replaces the predecessor's ten-minute
//!   `process_due_ai_tasks` poll with exact timing.
//! - `ai.test_scheduler_connection`: the predecessor's liveness probe, same result shape.

use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use taskmesh_shared::{NameError, TaskError};

use super::{Catalog, add, derived_id, http, store};
use crate::registry::{NoArgs, Registry, TaskContext, TaskPolicy};

/// Arguments of `ai.run_prompt`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunPromptArgs {
    /// The user prompt (1..=100 000 characters).
    pub prompt: String,
    /// Model name; default `TASKMESH_AI_MODEL`.
    #[serde(default)]
    pub model: Option<String>,
    /// Optional system prompt.
    #[serde(default)]
    pub system: Option<String>,
    /// Send the answer to this address (enqueues `email.send`).
    #[serde(default)]
    pub notify_email: Option<String>,
    /// Upper bound of generated tokens.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature, 0..=2.
    #[serde(default)]
    pub temperature: Option<f32>,
}

/// Token usage reported by the endpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Generated tokens.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Both.
    #[serde(default)]
    pub total_tokens: u64,
}

/// Result of `ai.run_prompt`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PromptResult {
    /// The assistant's answer.
    pub answer: String,
    /// The model that answered (as reported by the endpoint).
    pub model: String,
    /// Why generation stopped (`stop`, `length`, …), if reported.
    pub finish_reason: Option<String>,
    /// Token usage.
    pub usage: Usage,
    /// The id of the `email.send` task enqueued for `notify_email`.
    pub notify_task_id: Option<String>,
}

#[derive(Deserialize)]
struct ChatResponse {
    #[serde(default)]
    model: Option<String>,
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
}

/// `ai.run_prompt`: calls `<TASKMESH_AI_BASE_URL>/chat/completions`. HTTP 429, 408 and 5xx
/// are retryable (after `Retry-After` when the server sends one); other statuses and a
/// missing base URL are permanent. With `notify_email` the answer is mailed through
/// `email.send` with task id `<id>-notify`, so a redelivered prompt mails once.
pub async fn run_prompt(
    c: Arc<Catalog>,
    ctx: TaskContext,
    a: RunPromptArgs,
) -> Result<PromptResult, TaskError> {
    if a.prompt.trim().is_empty() {
        return Err(TaskError::permanent("prompt: must not be empty"));
    }
    if a.prompt.chars().count() > 100_000 {
        return Err(TaskError::permanent(
            "prompt: longer than 100000 characters",
        ));
    }
    if let Some(t) = a.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(TaskError::permanent("temperature: must be within 0..=2"));
    }
    if let Some(to) = &a.notify_email {
        super::email::check_address(to, "notify_email")?;
    }
    let Some(base) = c.settings.ai_base_url.as_deref() else {
        return Err(TaskError::permanent(
            "TASKMESH_AI_BASE_URL is not set: point it at an OpenAI-compatible API (…/v1)",
        ));
    };
    let url = format!("{}/chat/completions", base.trim_end_matches('/'));
    http::check_url(&url, "TASKMESH_AI_BASE_URL")?;
    let model = a
        .model
        .clone()
        .unwrap_or_else(|| c.settings.ai_model.clone());
    let mut messages = Vec::new();
    if let Some(sys) = &a.system {
        messages.push(serde_json::json!({"role": "system", "content": sys}));
    }
    messages.push(serde_json::json!({"role": "user", "content": a.prompt}));
    let mut body = serde_json::json!({ "model": model, "messages": messages });
    if let Some(n) = a.max_tokens {
        body["max_tokens"] = n.into();
    }
    if let Some(t) = a.temperature {
        body["temperature"] = t.into();
    }
    let mut req = c.http.post(&url).json(&body);
    if let Some(key) = &c.settings.ai_api_key {
        req = req.bearer_auth(key);
    }
    let resp = tokio::select! {
        r = req.send() => r.map_err(|e| http::transport_error("chat completion request", &e))?,
        _ = ctx.cancel.cancelled() => return Err(TaskError::retryable("cancelled")),
    };
    if !resp.status().is_success() {
        return Err(http::status_error("chat completion", resp).await);
    }
    let parsed: ChatResponse = resp
        .json()
        .await
        .map_err(|e| TaskError::retryable(format!("chat completion: unreadable response: {e}")))?;
    let Some(first) = parsed.choices.into_iter().next() else {
        return Err(TaskError::retryable(
            "chat completion: response has no choices",
        ));
    };
    let answer = first.message.content.unwrap_or_default();
    let mut notify_task_id = None;
    if let Some(to) = &a.notify_email {
        let id = derived_id(&ctx.id, "notify");
        let subject = match &ctx.schedule {
            Some(s) => format!("taskmesh: {s}"),
            None => "taskmesh: your AI task finished".to_owned(),
        };
        store::enqueue_follow_up(
            c.nats()?,
            &c.cfg,
            "email.send",
            &serde_json::json!({"to": to, "subject": subject, "text": answer}),
            &id,
        )
        .await?;
        notify_task_id = Some(id);
    }
    Ok(PromptResult {
        answer,
        model: parsed.model.unwrap_or(model),
        finish_reason: first.finish_reason,
        usage: parsed.usage.unwrap_or_default(),
        notify_task_id,
    })
}

/// Result of `ai.test_scheduler_connection`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConnectionTest {
    /// The task id.
    pub task_id: String,
    /// Always `success`.
    pub status: &'static str,
    /// `Scheduler connection test passed`.
    pub message: &'static str,
    /// When it ran (RFC 3339).
    pub timestamp: String,
}

/// `ai.test_scheduler_connection` (no args): a liveness probe through the whole mesh —
/// scheduler or producer → NATS → worker → result. Same result shape as the predecessor.
pub async fn test_scheduler_connection(
    ctx: TaskContext,
    _args: NoArgs,
) -> Result<ConnectionTest, TaskError> {
    Ok(ConnectionTest {
        task_id: ctx.id,
        status: "success",
        message: "Scheduler connection test passed",
        timestamp: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
    })
}

/// Registers the `ai` tasks.
pub fn register(r: &mut Registry, c: &Arc<Catalog>) -> Result<(), NameError> {
    add(
        r,
        c,
        "ai.run_prompt",
        TaskPolicy::retry_delay(Duration::from_secs(60)).with_timeout(Duration::from_secs(300)),
        run_prompt,
    )?;
    r.register(
        "ai.test_scheduler_connection",
        TaskPolicy::retry_delay(Duration::from_secs(60)),
        test_scheduler_connection,
    )?;
    Ok(())
}
