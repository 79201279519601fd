//! `taskmesh api`: the REST API (`/api/…`, described by `/openapi.json`), the web
//! dashboard (`/`), and `/healthz`, `/readyz`, `/metrics`, in one axum server.
//!
//! Every `/api` route needs credentials (see [`auth`]): `GET` routes the `read` scope, the
//! others `write`. Errors are RFC 9457 problem details (`application/problem+json`);
//! invalid input is `422` with `errors: [{field, message}]`.

mod auth;
mod problem;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use clap::Args;
use serde::Deserialize;
use taskmesh_nats::admin::{Admin, DlqFilter};
use taskmesh_nats::{Client, Connection, EnqueueOptions};
use taskmesh_scheduler::dynamic::DynamicSchedules;
use taskmesh_scheduler::{Schedule, ScheduleError, SchedulerError, static_schedules};
use taskmesh_shared::config::parse_duration;
use taskmesh_shared::schedule::ScheduleDef;
use taskmesh_shared::{Category, Config, Lane, TaskId, TaskName};
use tokio_util::sync::CancellationToken;

use self::auth::{Auth, Scope};
use self::problem::{ApiError, FieldError};

/// Options of `taskmesh api`.
#[derive(Debug, Args)]
pub(crate) struct ApiArgs {
    /// Where the API, the dashboard and the probes listen.
    #[arg(long, env = "TASKMESH_HTTP_ADDR", default_value = "127.0.0.1:9090")]
    http_addr: SocketAddr,
    /// HS256 secret for bearer JWTs.
    #[arg(long, env = "TASKMESH_API_JWT_HS256_SECRET", hide_env_values = true)]
    jwt_hs256_secret: Option<String>,
    /// PEM public key for RS256 bearer JWTs.
    #[arg(long, env = "TASKMESH_API_JWT_RS256_PUBLIC_KEY_FILE")]
    jwt_rs256_public_key_file: Option<PathBuf>,
    /// Static API keys: `name:key:read write,name2:key2:read`.
    #[arg(long, env = "TASKMESH_API_KEYS", hide_env_values = true)]
    api_keys: Option<String>,
    /// File with one `name:key:scopes` per line.
    #[arg(long, env = "TASKMESH_API_KEYS_FILE")]
    api_keys_file: Option<PathBuf>,
    /// Serve without authentication (only on a loopback address; development only).
    #[arg(long)]
    insecure_no_auth: bool,
}

struct AppState {
    cfg: Config,
    conn: Connection,
    client: Client,
    admin: Admin,
    /// `None`: `--insecure-no-auth`.
    auth: Option<Auth>,
}

type Shared = Arc<AppState>;

impl AppState {
    fn authorize(&self, headers: &HeaderMap, scope: Scope) -> Result<(), ApiError> {
        let Some(auth) = &self.auth else {
            return Ok(());
        };
        let value = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let principal = auth
            .verify(value)
            .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
        if principal.allows(scope) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "{} lacks the write scope this route needs",
                principal.name
            )))
        }
    }
}

/// Runs the API server until `shutdown`.
pub(crate) async fn run(
    cfg: Config,
    args: ApiArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let auth = Auth::new(
        args.jwt_hs256_secret.as_deref(),
        args.jwt_rs256_public_key_file.as_deref(),
        args.api_keys.as_deref(),
        args.api_keys_file.as_deref(),
    )
    .map_err(|e| anyhow::anyhow!("refusing to start the API: {e}"))?;
    let auth = if auth.is_configured() {
        Some(auth)
    } else if args.insecure_no_auth {
        if !args.http_addr.ip().is_loopback() {
            anyhow::bail!(
                "refusing to serve without authentication on {}: --insecure-no-auth works only on a loopback address",
                args.http_addr
            );
        }
        tracing::warn!("serving the API WITHOUT authentication (--insecure-no-auth)");
        None
    } else {
        anyhow::bail!(
            "refusing to start the API without authentication: set TASKMESH_API_JWT_HS256_SECRET, TASKMESH_API_JWT_RS256_PUBLIC_KEY_FILE or TASKMESH_API_KEYS (or pass --insecure-no-auth on a loopback address for development)"
        );
    };
    let conn = crate::connect(&cfg, "api").await?;
    let client = Client::new(conn.clone(), &cfg).await?;
    let probes = crate::http::Probes {
        conn: Some(conn.state.clone()),
        worker: None,
        extra: Vec::new(),
    };
    let state = Arc::new(AppState {
        admin: Admin::new(conn.js.clone()),
        cfg,
        conn,
        client,
        auth,
    });
    let app = router(state).merge(crate::http::router(probes));
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind --http-addr {}: {e}", args.http_addr))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "http listening on {bound} (dashboard /, API /api, /openapi.json, /healthz /readyz /metrics)");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/assets/app.js", get(app_js))
        .route("/assets/app.css", get(app_css))
        .route("/openapi.json", get(openapi))
        .route("/api/tasks", post(enqueue))
        .route("/api/tasks/{id}", get(get_task))
        .route("/api/dlq", get(list_dlq))
        .route("/api/dlq/{id}", get(show_dlq).delete(delete_dlq))
        .route("/api/dlq/{id}/replay", post(replay_dlq))
        .route("/api/schedules", get(list_schedules).post(add_schedule))
        .route(
            "/api/schedules/{name}",
            axum::routing::delete(delete_schedule),
        )
        .route("/api/schedules/{name}/trigger", post(trigger_schedule))
        .route("/api/schedules/{name}/pause", post(pause_schedule))
        .route("/api/schedules/{name}/resume", post(resume_schedule))
        .route("/api/categories/{category}/pause", post(pause_category))
        .route("/api/categories/{category}/resume", post(resume_category))
        .route("/api/stats", get(stats))
        .fallback(not_found)
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route: see /openapi.json".into())
}

/// A file compiled into the binary, served with its content type.
fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, content_type)], body)
}

async fn dashboard() -> impl IntoResponse {
    asset(
        "text/html; charset=utf-8",
        include_str!("../../assets/index.html"),
    )
}

async fn app_js() -> impl IntoResponse {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("../../assets/app.js"),
    )
}

async fn app_css() -> impl IntoResponse {
    asset(
        "text/css; charset=utf-8",
        include_str!("../../assets/app.css"),
    )
}

async fn openapi() -> impl IntoResponse {
    asset(
        "application/json",
        include_str!("../../assets/openapi.json"),
    )
}

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response {
    (status, axum::Json(v)).into_response()
}

/// Parses a JSON body, naming the field that does not fit.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        // A missing field is reported at the parent: name the field itself.
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
            .map(|f| {
                if path == "." {
                    f.to_owned()
                } else {
                    format!("{path}.{f}")
                }
            });
        let field = match missing {
            Some(f) => f,
            None if path == "." => "body".to_owned(),
            None => path,
        };
        ApiError::invalid(field, message)
    })
}

fn instant(field: &str, s: &str) -> Result<DateTime<Utc>, ApiError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.to_utc());
    }
    let d = parse_duration(s).map_err(|e| {
        ApiError::invalid(
            field,
            format!("expected an RFC 3339 instant or a duration like 10m: {e}"),
        )
    })?;
    let d = chrono::Duration::from_std(d)
        .map_err(|_| ApiError::invalid(field, "duration too large"))?;
    Ok(Utc::now() + d)
}

/// `POST /api/tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnqueueBody {
    task: String,
    #[serde(default)]
    args: Option<serde_json::Value>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    priority: Option<String>,
    #[serde(default)]
    delay: Option<String>,
    #[serde(default)]
    run_at: Option<String>,
    #[serde(default)]
    deadline: Option<String>,
    #[serde(default)]
    max_attempts: Option<u32>,
}

async fn enqueue(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    match enqueue_inner(&s, &headers, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn enqueue_inner(
    s: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    s.authorize(headers, Scope::Write)?;
    let b: EnqueueBody = parse_body(body)?;
    let mut errors = Vec::new();
    let task = match TaskName::parse(&b.task) {
        Ok(t) if s.cfg.category(&t.category()).is_err() => {
            errors.push(FieldError::new(
                "task",
                format!("category {} is not configured on this server", t.category()),
            ));
            None
        }
        Ok(t) => Some(t),
        Err(e) => {
            errors.push(FieldError::new("task", e.to_string()));
            None
        }
    };
    let id = match b.id.as_deref().map(TaskId::new).transpose() {
        Ok(id) => id,
        Err(e) => {
            errors.push(FieldError::new("id", e.to_string()));
            None
        }
    };
    let lane = match b.priority.as_deref().unwrap_or("normal") {
        "high" => Lane::High,
        "normal" => Lane::Normal,
        "low" => Lane::Low,
        other => {
            errors.push(FieldError::new(
                "priority",
                format!("expected high, normal or low, got {other:?}"),
            ));
            Lane::Normal
        }
    };
    let mut opts = EnqueueOptions {
        id,
        lane,
        ..Default::default()
    };
    if b.delay.is_some() && b.run_at.is_some() {
        errors.push(FieldError::new("delay", "set delay or run_at, not both"));
    }
    if let Some(d) = &b.delay {
        match parse_duration(d) {
            Ok(d) => opts = opts.delay(d),
            Err(e) => errors.push(FieldError::new("delay", e)),
        }
    }
    for (field, value, slot) in [
        ("run_at", &b.run_at, &mut opts.run_at),
        ("deadline", &b.deadline, &mut opts.deadline),
    ] {
        if let Some(v) = value {
            match instant(field, v) {
                Ok(t) => *slot = Some(t),
                Err(ApiError::Invalid(mut e)) => errors.append(&mut e),
                Err(other) => return Err(other),
            }
        }
    }
    match b.max_attempts {
        Some(0) => errors.push(FieldError::new("max_attempts", "must be at least 1")),
        m => opts.max_attempts = m,
    }
    let (Some(task), true) = (task, errors.is_empty()) else {
        return Err(ApiError::Invalid(errors));
    };
    let args = b.args.unwrap_or_else(|| serde_json::json!({}));
    let done = s
        .client
        .enqueue(&task, &args, opts)
        .await
        .map_err(ApiError::from_nats)?;
    Ok(json(
        if done.duplicate {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        },
        &serde_json::json!({
            "id": done.id.as_str(),
            "task": task.as_str(),
            "stream": done.stream,
            "sequence": done.sequence,
            "duplicate": done.duplicate,
        }),
    ))
}

macro_rules! handler {
    ($name:ident, $inner:ident, ($($arg:ident : $ty:ty),*)) => {
        async fn $name(State(s): State<Shared>, headers: HeaderMap, $($arg: $ty),*) -> Response {
            match $inner(&s, &headers, $($arg),*).await {
                Ok(r) => r,
                Err(e) => e.into_response(),
            }
        }
    };
}

handler!(get_task, get_task_inner, (id: Path<String>));
async fn get_task_inner(
    s: &AppState,
    headers: &HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    s.authorize(headers, Scope::Read)?;
    let id = TaskId::new(id).map_err(|e| ApiError::invalid("id", e.to_string()))?;
    let i = crate::admin::inspection(&s.conn, &id)
        .await
        .map_err(ApiError::Internal)?;
    if i.record.is_none() && i.dead_letter.is_none() {
        return Err(ApiError::NotFound(format!(
            "task {id}: no result record and not in the DLQ (still queued, unknown, or its record expired)"
        )));
    }
    Ok(json(StatusCode::OK, &i))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DlqQuery {
    task: Option<String>,
    reason: Option<String>,
    older_than: Option<String>,
    newer_than: Option<String>,
    limit: Option<usize>,
}

const REASONS: [&str; 5] = [
    "max_attempts",
    "permanent",
    "undecodable",
    "unknown_task",
    "expired",
];

handler!(list_dlq, list_dlq_inner, (q: Result<Query<DlqQuery>, axum::extract::rejection::QueryRejection>));
async fn list_dlq_inner(
    s: &AppState,
    headers: &HeaderMap,
    q: Result<Query<DlqQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    s.authorize(headers, Scope::Read)?;
    let Query(q) = q.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let mut errors = Vec::new();
    if let Some(r) = &q.reason
        && !REASONS.contains(&r.as_str())
    {
        errors.push(FieldError::new(
            "reason",
            format!("expected one of {}", REASONS.join(", ")),
        ));
    }
    let mut age = |field: &str, v: &Option<String>| -> Option<DateTime<Utc>> {
        let v = v.as_deref()?;
        if let Ok(t) = DateTime::parse_from_rfc3339(v) {
            return Some(t.to_utc());
        }
        match parse_duration(v) {
            Ok(d) => Some(Utc::now() - chrono::Duration::from_std(d).unwrap_or_default()),
            Err(e) => {
                errors.push(FieldError::new(field, e));
                None
            }
        }
    };
    let older_than = age("older_than", &q.older_than);
    let newer_than = age("newer_than", &q.newer_than);
    if !errors.is_empty() {
        return Err(ApiError::Invalid(errors));
    }
    let filter = DlqFilter {
        task: q.task,
        reason: q.reason,
        older_than,
        newer_than,
        task_id: None,
    };
    let list = s
        .admin
        .dlq_list(&filter, q.limit.unwrap_or(100).min(1000))
        .await
        .map_err(ApiError::from_nats)?;
    Ok(json(StatusCode::OK, &list))
}

/// A dead letter by DLQ sequence (a number) or task id (anything else).
async fn find_dead_letter(
    s: &AppState,
    id: &str,
) -> Result<taskmesh_nats::admin::DeadLetter, ApiError> {
    let found = match id.parse::<u64>() {
        Ok(seq) => s.admin.dlq_get(seq).await,
        Err(_) => s.admin.dlq_find_task(id).await,
    }
    .map_err(ApiError::from_nats)?;
    found.ok_or_else(|| {
        ApiError::NotFound(format!(
            "no dead letter {id}: already replayed or purged (GET /api/dlq lists them)"
        ))
    })
}

handler!(show_dlq, show_dlq_inner, (id: Path<String>));
async fn show_dlq_inner(
    s: &AppState,
    headers: &HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    s.authorize(headers, Scope::Read)?;
    Ok(json(StatusCode::OK, &find_dead_letter(s, &id).await?))
}

handler!(delete_dlq, delete_dlq_inner, (id: Path<String>));
async fn delete_dlq_inner(
    s: &AppState,
    headers: &HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    s.authorize(headers, Scope::Write)?;
    let d = find_dead_letter(s, &id).await?;
    s.admin
        .dlq_delete(d.seq)
        .await
        .map_err(ApiError::from_nats)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

handler!(replay_dlq, replay_dlq_inner, (id: Path<String>));
async fn replay_dlq_inner(
    s: &AppState,
    headers: &HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    s.authorize(headers, Scope::Write)?;
    let d = find_dead_letter(s, &id).await?;
    match s
        .admin
        .dlq_replay(d.seq)
        .await
        .map_err(ApiError::from_nats)?
    {
        Some(r) => Ok(json(StatusCode::OK, &r)),
        None => Err(ApiError::NotFound(format!(
            "no dead letter {id}: already replayed or purged"
        ))),
    }
}

handler!(list_schedules, list_schedules_inner, ());
async fn list_schedules_inner(s: &AppState, headers: &HeaderMap) -> Result<Response, ApiError> {
    s.authorize(headers, Scope::Read)?;
    let l = crate::schedules::listing(&s.cfg, &s.conn)
        .await
        .map_err(ApiError::Internal)?;
    Ok(json(StatusCode::OK, &l))
}

fn schedule_field(e: &ScheduleError) -> &'static str {
    match e {
        ScheduleError::InvalidName { .. } => "name",
        ScheduleError::InvalidTask { .. } => "task",
        ScheduleError::Trigger { .. } | ScheduleError::InvalidCron { .. } => "cron",
        ScheduleError::InvalidEvery { .. } | ScheduleError::EveryTooShort { .. } => "every",
        ScheduleError::UnknownTimezone { .. } => "timezone",
        _ => "body",
    }
}

fn scheduler_error(e: SchedulerError) -> ApiError {
    match e {
        SchedulerError::Schedule(se) => ApiError::invalid(schedule_field(&se), se.to_string()),
        SchedulerError::NotFound(_) => ApiError::NotFound(e.to_string()),
        SchedulerError::Static(_) | SchedulerError::Exists(_) => ApiError::Conflict(e.to_string()),
        other => ApiError::Internal(other.into()),
    }
}

async fn dynamic(s: &AppState) -> Result<DynamicSchedules, ApiError> {
    DynamicSchedules::open(&s.conn.js)
        .await
        .map_err(scheduler_error)
}

fn is_static(s: &AppState, name: &str) -> Result<bool, ApiError> {
    let statics = static_schedules(&s.cfg).map_err(scheduler_error)?;
    Ok(statics.iter().any(|x| x.name() == name))
}

handler!(add_schedule, add_schedule_inner, (body: Bytes));
async fn add_schedule_inner(
    s: &AppState,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    s.authorize(headers, Scope::Write)?;
    let mut v: serde_json::Value = parse_body(&body)?;
    let replace = match v.as_object_mut().and_then(|o| o.remove("replace")) {
        None => false,
        Some(serde_json::Value::Bool(b)) => b,
        Some(_) => return Err(ApiError::invalid("replace", "expected true or false")),
    };
    let paused = match v.as_object_mut().and_then(|o| o.remove("paused")) {
        None => false,
        Some(serde_json::Value::Bool(b)) => b,
        Some(_) => return Err(ApiError::invalid("paused", "expected true or false")),
    };
    let bytes = serde_json::to_vec(&v).map_err(|e| ApiError::Internal(e.into()))?;
    let mut def: ScheduleDef = parse_body(&bytes)?;
    if paused {
        def.enabled = false;
    }
    let schedule = Schedule::compile(&def).map_err(|e| scheduler_error(e.into()))?;
    if let Ok(t) = TaskName::parse(&def.task)
        && s.cfg.category(&t.category()).is_err()
    {
        return Err(ApiError::invalid(
            "task",
            format!("category {} is not configured on this server", t.category()),
        ));
    }
    if is_static(s, &def.name)? {
        return Err(scheduler_error(SchedulerError::Static(def.name)));
    }
    dynamic(s)
        .await?
        .add(&def, replace)
        .await
        .map_err(scheduler_error)?;
    let next = def
        .enabled
        .then(|| schedule.next_fire(Utc::now()))
        .flatten();
    Ok(json(
        StatusCode::CREATED,
        &serde_json::json!({ "schedule": def, "next_fire": next }),
    ))
}

handler!(delete_schedule, delete_schedule_inner, (name: Path<String>));
async fn delete_schedule_inner(
    s: &AppState,
    headers: &HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    s.authorize(headers, Scope::Write)?;
    if is_static(s, &name)? {
        return Err(scheduler_error(SchedulerError::Static(name)));
    }
    let d = dynamic(s).await?;
    if d.get(&name).await.map_err(scheduler_error)?.is_none() {
        return Err(scheduler_error(SchedulerError::NotFound(name)));
    }
    d.remove(&name).await.map_err(scheduler_error)?;
    if let Ok(c) = taskmesh_scheduler::cursor::Cursors::open(&s.conn.js).await {
        let _ = c.remove(&name).await;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

handler!(trigger_schedule, trigger_schedule_inner, (name: Path<String>));
async fn trigger_schedule_inner(
    s: &AppState,
    headers: &HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    s.authorize(headers, Scope::Write)?;
    let done = crate::schedules::trigger_by_name(&s.cfg, s.conn.clone(), &name)
        .await
        .map_err(|e| match e.downcast::<SchedulerError>() {
            Ok(se) => scheduler_error(se),
            Err(e) => ApiError::Internal(e),
        })?;
    Ok(json(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "schedule": name, "id": done.id.as_str() }),
    ))
}

async fn set_schedule_enabled(
    s: &AppState,
    headers: &HeaderMap,
    name: String,
    enabled: bool,
) -> Result<Response, ApiError> {
    s.authorize(headers, Scope::Write)?;
    if is_static(s, &name)? {
        return Err(scheduler_error(SchedulerError::Static(name)));
    }
    let changed = dynamic(s)
        .await?
        .set_enabled(&name, enabled)
        .await
        .map_err(scheduler_error)?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "schedule": name, "enabled": enabled, "changed": changed }),
    ))
}

handler!(pause_schedule, pause_schedule_inner, (name: Path<String>));
async fn pause_schedule_inner(
    s: &AppState,
    headers: &HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    set_schedule_enabled(s, headers, name, false).await
}

handler!(resume_schedule, resume_schedule_inner, (name: Path<String>));
async fn resume_schedule_inner(
    s: &AppState,
    headers: &HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    set_schedule_enabled(s, headers, name, true).await
}

fn category(s: &AppState, c: &str) -> Result<Category, ApiError> {
    let c = Category::new(c).map_err(|e| ApiError::invalid("category", e.to_string()))?;
    if s.cfg.category(&c).is_err() {
        return Err(ApiError::NotFound(format!(
            "category {c} is not configured on this server"
        )));
    }
    Ok(c)
}

handler!(pause_category, pause_category_inner, (c: Path<String>));
async fn pause_category_inner(
    s: &AppState,
    headers: &HeaderMap,
    Path(c): Path<String>,
) -> Result<Response, ApiError> {
    s.authorize(headers, Scope::Write)?;
    let c = category(s, &c)?;
    let until = Utc::now() + chrono::Duration::days(365 * 100);
    s.admin
        .pause(&c, until)
        .await
        .map_err(ApiError::from_nats)?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "category": c.as_str(), "paused": true }),
    ))
}

handler!(resume_category, resume_category_inner, (c: Path<String>));
async fn resume_category_inner(
    s: &AppState,
    headers: &HeaderMap,
    Path(c): Path<String>,
) -> Result<Response, ApiError> {
    s.authorize(headers, Scope::Write)?;
    let c = category(s, &c)?;
    s.admin.resume(&c).await.map_err(ApiError::from_nats)?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "category": c.as_str(), "paused": false }),
    ))
}

handler!(stats, stats_inner, ());
async fn stats_inner(s: &AppState, headers: &HeaderMap) -> Result<Response, ApiError> {
    s.authorize(headers, Scope::Read)?;
    let st = crate::admin::snapshot(&s.cfg, &s.conn)
        .await
        .map_err(ApiError::Internal)?;
    Ok(json(StatusCode::OK, &st))
}
