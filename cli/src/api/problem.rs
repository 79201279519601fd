//! RFC 9457 problem details: every API error is `application/problem+json`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use taskmesh_nats::NatsError;

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FieldError {
    /// The field (`task`, `args.ms`, `priority`).
    pub(crate) field: String,
    /// What is wrong with it.
    pub(crate) message: String,
}

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An API failure.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// 401: no or invalid credentials.
    Unauthorized(String),
    /// 403: valid credentials without the needed scope.
    Forbidden(String),
    /// 404.
    NotFound(String),
    /// 409.
    Conflict(String),
    /// 422: invalid input, per field.
    Invalid(Vec<FieldError>),
    /// 503: NATS is missing something (not provisioned) or unreachable.
    Unavailable(String),
    /// 500.
    Internal(anyhow::Error),
}

impl ApiError {
    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldError::new(field, message)])
    }

    pub(crate) fn from_nats(e: NatsError) -> Self {
        match e {
            NatsError::NotProvisioned { .. } | NatsError::Connect { .. } => {
                Self::Unavailable(e.to_string())
            }
            NatsError::TooLarge { .. } => Self::invalid("args", e.to_string()),
            NatsError::Name(_) => Self::invalid("id", e.to_string()),
            NatsError::NotUnique { .. } => Self::Conflict(e.to_string()),
            other => Self::Internal(other.into()),
        }
    }
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    title: &'a str,
    status: u16,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<Vec<FieldError>>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, title, detail, errors) = match self {
            Self::Unauthorized(d) => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unauthorized",
                d,
                None,
            ),
            Self::Forbidden(d) => (StatusCode::FORBIDDEN, "forbidden", "forbidden", d, None),
            Self::NotFound(d) => (StatusCode::NOT_FOUND, "not-found", "not found", d, None),
            Self::Conflict(d) => (StatusCode::CONFLICT, "conflict", "conflict", d, None),
            Self::Invalid(errors) => {
                let detail = errors
                    .iter()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid-request",
                    "invalid request",
                    detail,
                    Some(errors),
                )
            }
            Self::Unavailable(d) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "service unavailable",
                d,
                None,
            ),
            Self::Internal(e) => {
                tracing::error!(error = %format!("{e:#}"), "api request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                    format!("{e:#}"),
                    None,
                )
            }
        };
        let body = Problem {
            kind: &format!("https://taskmesh.dev/problems/{kind}"),
            title,
            status: status.as_u16(),
            detail,
            errors,
        };
        let mut resp = (status, serde_json::to_string(&body).unwrap_or_default()).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"taskmesh\""),
            );
        }
        resp
    }
}
