//! HTTP outcome classification shared by the tasks that call HTTP APIs: what is worth a
//! retry (and when), what is not.

use std::time::Duration;

use reqwest::{Response, StatusCode};
use taskmesh_shared::TaskError;

/// The longest `Retry-After` honoured; a server asking for more gets this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A transport error (connect, timeout, reset) is retryable.
pub fn transport_error(what: &str, e: &reqwest::Error) -> TaskError {
    TaskError::retryable(format!("{what}: {e}"))
}

/// `Retry-After` as seconds (an HTTP date is not supported and gives `None`).
pub fn retry_after(resp: &Response) -> Option<Duration> {
    let v = resp.headers().get(reqwest::header::RETRY_AFTER)?;
    let secs: u64 = v.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// Classifies a non-success response: 429, 408 and 5xx are retryable (after `Retry-After`
/// when given), other statuses are permanent. The message carries the start of the body.
pub async fn status_error(what: &str, resp: Response) -> TaskError {
    let status = resp.status();
    let after = retry_after(&resp);
    let body = resp.text().await.unwrap_or_default();
    let snippet: String = body.chars().take(300).collect();
    let msg = format!("{what}: HTTP {status}: {snippet}");
    if is_retryable(status) {
        match after {
            Some(d) => TaskError::retry_after(msg, d),
            None => TaskError::retryable(msg),
        }
    } else {
        TaskError::permanent(msg)
    }
}

/// 408, 429 and every 5xx.
pub fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
}

/// Checks that `url` is an `http` or `https` URL; `field` names the argument.
pub fn check_url(url: &str, field: &str) -> Result<reqwest::Url, TaskError> {
    let u = reqwest::Url::parse(url)
        .map_err(|e| TaskError::permanent(format!("{field}: not a URL ({e}): {url}")))?;
    if u.scheme() != "http" && u.scheme() != "https" {
        return Err(TaskError::permanent(format!(
            "{field}: only http and https URLs are supported, got {}",
            u.scheme()
        )));
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_classify() {
        assert!(is_retryable(StatusCode::TOO_MANY_REQUESTS));
        assert!(is_retryable(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!is_retryable(StatusCode::BAD_REQUEST));
        assert!(!is_retryable(StatusCode::UNAUTHORIZED));
        assert!(check_url("ftp://x", "url").is_err());
        assert!(check_url("http://127.0.0.1:1/x", "url").is_ok());
    }
}
