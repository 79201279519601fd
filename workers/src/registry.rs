//! The task registry: typed handlers registered by name, each with its policy.
//!
//! A handler is an async function `(TaskContext, Args) -> Result<R, TaskError>` where `Args`
//! is any `serde::Deserialize` type and `R` any `serde::Serialize` type. The registry erases
//! the types once at registration; the runtime never sees them.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use taskmesh_shared::config::{Config, TaskPolicyConfig};
use taskmesh_shared::{NameError, RetryPolicy, TaskError, TaskName};
use tokio_util::sync::CancellationToken;

/// What a task may know about the run it is in.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// The task id: the idempotency key for side effects.
    pub id: String,
    /// The task's full name.
    pub task: TaskName,
    /// This attempt (1-based).
    pub attempt: u32,
    /// The attempt budget.
    pub max_attempts: u32,
    /// Fired when the task should stop early: worker drain, soft time limit, cancel.
    pub cancel: CancellationToken,
    /// The schedule that fired it, if any (`Task-Schedule`).
    pub schedule: Option<String>,
    /// The slot the scheduler fired it for (`Task-Fire-Time`).
    pub fire_time: Option<String>,
    /// The W3C trace id, if the task carries trace context.
    pub trace_id: Option<String>,
    /// The worker's id.
    pub worker: Arc<str>,
}

impl TaskContext {
    /// Is this the last attempt the task gets?
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }
}

/// Per-task behaviour as data. The handler's built-in defaults, then config overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskPolicy {
    /// Backoff between attempts. `retry.max_attempts` is used only when `max_attempts` is
    /// set here or in config; otherwise the category default applies.
    pub retry: RetryPolicy,
    /// Attempt budget; `None` = the category's `max_attempts`.
    pub max_attempts: Option<u32>,
    /// Hard time limit of one attempt; the attempt fails as a retryable timeout.
    pub timeout: Option<Duration>,
    /// Store result records. If unsure: true.
    pub store_result: bool,
    /// Soft time limit: the task's cancellation token fires, the attempt goes on.
    pub soft_timeout: Option<Duration>,
    /// A rate limit of this task across every worker.
    pub rate_limit: Option<taskmesh_shared::config::Rate>,
    /// The dependency this task needs (circuit breaker and `[limits]` key).
    pub dependency: Option<String>,
}

impl Default for TaskPolicy {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            max_attempts: None,
            timeout: None,
            store_result: true,
            soft_timeout: None,
            rate_limit: None,
            dependency: None,
        }
    }
}

impl TaskPolicy {
    /// A default policy whose first retry waits `d` (the seeds' `default_retry_delay`).
    pub fn retry_delay(d: Duration) -> Self {
        Self {
            retry: RetryPolicy::default().with_initial_delay(d),
            ..Self::default()
        }
    }
    /// Sets the hard time limit.
    pub fn with_timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }
    /// Sets the attempt budget.
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }
    /// Applies a `[tasks."…"]` config section.
    pub fn overridden_by(mut self, o: &TaskPolicyConfig) -> Self {
        if let Some(n) = o.max_attempts {
            self.max_attempts = Some(n);
        }
        if let Some(d) = o.initial_delay {
            self.retry.initial_delay = d;
            self.retry.max_delay = self.retry.max_delay.max(d);
        }
        if let Some(d) = o.max_delay {
            self.retry.max_delay = d.max(self.retry.initial_delay);
        }
        if let Some(d) = o.timeout {
            self.timeout = Some(d);
        }
        if let Some(s) = o.store_result {
            self.store_result = s;
        }
        if let Some(d) = o.soft_timeout {
            self.soft_timeout = Some(d);
        }
        if let Some(r) = o
            .rate_limit
            .as_deref()
            .and_then(|r| taskmesh_shared::config::parse_rate(r).ok())
        {
            self.rate_limit = Some(r);
        }
        if let Some(d) = &o.dependency {
            self.dependency = Some(d.clone());
        }
        self
    }

    /// Names the dependency the task needs.
    pub fn with_dependency(mut self, d: &str) -> Self {
        self.dependency = Some(d.to_owned());
        self
    }
}

/// Why a body could not become the handler's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Not UTF-8 JSON at all: dead-lettered as `undecodable`.
    Syntax(String),
    /// Valid JSON of the wrong shape (missing or mistyped field): a permanent failure whose
    /// message names the field.
    Args(String),
}

/// The future a handler returns, type-erased.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<serde_json::Value, TaskError>> + Send>>;

trait ErasedHandler: Send + Sync {
    fn start(&self, ctx: TaskContext, body: &[u8]) -> Result<HandlerFuture, DecodeError>;
}

struct Typed<A, F> {
    f: F,
    _args: std::marker::PhantomData<fn() -> A>,
}

impl<A, R, F, Fut> ErasedHandler for Typed<A, F>
where
    A: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
    F: Fn(TaskContext, A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, TaskError>> + Send + 'static,
{
    fn start(&self, ctx: TaskContext, body: &[u8]) -> Result<HandlerFuture, DecodeError> {
        let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            body
        };
        let args: A = serde_json::from_slice(body).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => {
                DecodeError::Args(format!("invalid arguments: {e}"))
            }
            _ => DecodeError::Syntax(format!("body is not valid JSON: {e}")),
        })?;
        let fut = (self.f)(ctx, args);
        Ok(Box::pin(async move {
            let r = fut.await?;
            serde_json::to_value(r)
                .map_err(|e| TaskError::permanent(format!("cannot encode the result as JSON: {e}")))
        }))
    }
}

/// A registered task.
#[derive(Clone)]
pub struct Registered {
    handler: Arc<dyn ErasedHandler>,
    /// Its policy (built-in defaults with config applied).
    pub policy: TaskPolicy,
}

impl fmt::Debug for Registered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registered")
            .field("policy", &self.policy)
            .finish()
    }
}

impl Registered {
    /// Decodes the body and starts the handler.
    pub fn start(&self, ctx: TaskContext, body: &[u8]) -> Result<HandlerFuture, DecodeError> {
        self.handler.start(ctx, body)
    }
}

/// Arguments of a task that takes none: accepts `{}` or an empty body; unknown fields are
/// ignored.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
pub struct NoArgs {}

/// Handlers by full task name.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    tasks: HashMap<String, Registered>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a typed handler under `name` (`<category>.<name>`). A later registration of
    /// the same name replaces the earlier one.
    pub fn register<A, R, F, Fut>(
        &mut self,
        name: &str,
        policy: TaskPolicy,
        f: F,
    ) -> Result<&mut Self, NameError>
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(TaskContext, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, TaskError>> + Send + 'static,
    {
        let name = TaskName::parse(name)?;
        self.tasks.insert(
            name.as_str().to_owned(),
            Registered {
                handler: Arc::new(Typed {
                    f,
                    _args: std::marker::PhantomData,
                }),
                policy,
            },
        );
        Ok(self)
    }

    /// Applies `[tasks."…"]` overrides from config.
    pub fn apply_config(&mut self, cfg: &Config) {
        for (name, o) in &cfg.tasks {
            if let Some(r) = self.tasks.get_mut(name.as_str()) {
                r.policy = r.policy.clone().overridden_by(o);
            }
        }
    }

    /// Looks up a task by full name.
    pub fn get(&self, name: &str) -> Option<&Registered> {
        self.tasks.get(name)
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tasks.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Add {
        a: i64,
        b: i64,
    }

    fn ctx() -> TaskContext {
        TaskContext {
            id: "t".into(),
            task: TaskName::parse("math.add").unwrap(),
            attempt: 1,
            max_attempts: 3,
            cancel: CancellationToken::new(),
            schedule: None,
            fire_time: None,
            trace_id: None,
            worker: "w".into(),
        }
    }

    #[tokio::test]
    async fn typed_handlers_decode_and_classify() {
        let mut r = Registry::new();
        r.register("math.add", TaskPolicy::default(), |_c, a: Add| async move {
            Ok::<_, TaskError>(a.a + a.b)
        })
        .unwrap();
        r.register(
            "math.none",
            TaskPolicy::default(),
            |_c, _a: NoArgs| async move { Ok::<_, TaskError>("ok") },
        )
        .unwrap();
        let add = r.get("math.add").unwrap();
        let v = add
            .start(ctx(), br#"{"a":1,"b":2}"#)
            .unwrap()
            .await
            .unwrap();
        assert_eq!(v, serde_json::json!(3));
        assert!(matches!(
            add.start(ctx(), b"{\"a\":1"),
            Err(DecodeError::Syntax(_))
        ));
        assert!(matches!(
            add.start(ctx(), b"\xff\xfe"),
            Err(DecodeError::Syntax(_))
        ));
        match add.start(ctx(), br#"{"a":1}"#) {
            Err(DecodeError::Args(m)) => assert!(m.contains("`b`"), "{m}"),
            _ => panic!("missing field must be an args error"),
        }
        let none = r.get("math.none").unwrap();
        for body in [&b""[..], b"{}", b"  "] {
            assert_eq!(none.start(ctx(), body).unwrap().await.unwrap(), "ok");
        }
        assert!(
            r.register("Bad", TaskPolicy::default(), |_c, _a: NoArgs| async {
                Ok::<_, TaskError>(())
            })
            .is_err()
        );
    }
}
