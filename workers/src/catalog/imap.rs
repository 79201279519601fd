//! A minimal IMAP4rev1 client for `sync.email_service`: `LOGIN`, `SELECT`,
//! `UID SEARCH`, `UID FETCH … BODY.PEEK[]`, `LOGOUT`, over plain TCP (`imap://`, for
//! local servers) or implicit TLS (`imaps://`, rustls with the webpki roots). Messages
//! are copied, never flagged or deleted on the server.

use std::sync::Arc;
use std::time::Duration;

use taskmesh_shared::TaskError;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// Where and who.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImapTarget {
    /// Host name.
    pub host: String,
    /// Port (143 / 993 by default).
    pub port: u16,
    /// Implicit TLS.
    pub tls: bool,
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
    /// Mailbox; default `INBOX`.
    pub mailbox: String,
}

/// Parses `imap[s]://user:password@host[:port][/MAILBOX]`; `field` names the setting.
pub fn parse_url(url: &str, field: &str) -> Result<ImapTarget, TaskError> {
    let u = reqwest::Url::parse(url)
        .map_err(|e| TaskError::permanent(format!("{field}: not a URL ({e})")))?;
    let tls = match u.scheme() {
        "imap" => false,
        "imaps" => true,
        s => {
            return Err(TaskError::permanent(format!(
                "{field}: scheme must be imap or imaps, got {s}"
            )));
        }
    };
    let host = u
        .host_str()
        .ok_or_else(|| TaskError::permanent(format!("{field}: no host")))?
        .to_owned();
    let dec = |s: &str| {
        percent_decode(s).ok_or_else(|| TaskError::permanent(format!("{field}: bad escape")))
    };
    let user = dec(u.username())?;
    if user.is_empty() {
        return Err(TaskError::permanent(format!("{field}: no user name")));
    }
    let password = dec(u.password().unwrap_or_default())?;
    let mailbox = dec(u.path().trim_start_matches('/'))?;
    Ok(ImapTarget {
        port: u.port().unwrap_or(if tls { 993 } else { 143 }),
        host,
        tls,
        user,
        password,
        mailbox: if mailbox.is_empty() {
            "INBOX".into()
        } else {
            mailbox
        },
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open, logged-in session.
pub struct Session {
    io: BufReader<Box<dyn Io>>,
    tag: u32,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("tag", &self.tag).finish()
    }
}

const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn net(what: &str, e: impl std::fmt::Display) -> TaskError {
    TaskError::retryable(format!("imap {what}: {e}"))
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// What one command returned: untagged lines (with literals inlined as bytes) and the
/// tagged status line.
#[derive(Debug, Default)]
pub struct Reply {
    /// `* …` lines; each literal `{n}` is followed by its bytes in `literals`.
    pub untagged: Vec<String>,
    /// Literal payloads, in order.
    pub literals: Vec<Vec<u8>>,
}

impl Session {
    /// Connects, reads the greeting and logs in.
    pub async fn login(t: &ImapTarget) -> Result<Self, TaskError> {
        let tcp = tokio::time::timeout(
            IO_TIMEOUT,
            tokio::net::TcpStream::connect((t.host.as_str(), t.port)),
        )
        .await
        .map_err(|_| net("connect", "timed out"))?
        .map_err(|e| net("connect", e))?;
        let io: Box<dyn Io> = if t.tls {
            let mut roots = tokio_rustls::rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
                tokio_rustls::rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| net("tls", e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(t.host.clone())
                .map_err(|e| TaskError::permanent(format!("TASKMESH_IMAP_URL: host: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| net("tls", e))?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        let mut s = Self {
            io: BufReader::new(io),
            tag: 0,
        };
        let greeting = s.line().await?;
        if !greeting.starts_with("* OK") && !greeting.starts_with("* PREAUTH") {
            return Err(net("greeting", greeting));
        }
        let cmd = format!("LOGIN {} {}", quote(&t.user), quote(&t.password));
        match s.command(&cmd).await {
            Err(e) if !e.is_retryable() => Err(TaskError::permanent(
                "TASKMESH_IMAP_URL: the server refused the login",
            )),
            other => other.map(|_| s),
        }
    }

    async fn line(&mut self) -> Result<String, TaskError> {
        let mut buf = Vec::new();
        let n = tokio::time::timeout(IO_TIMEOUT, self.io.read_until(b'\n', &mut buf))
            .await
            .map_err(|_| net("read", "timed out"))?
            .map_err(|e| net("read", e))?;
        if n == 0 {
            return Err(net("read", "connection closed"));
        }
        Ok(String::from_utf8_lossy(&buf)
            .trim_end_matches(['\r', '\n'])
            .to_owned())
    }

    /// Sends one command and reads until its tagged reply. `NO`/`BAD` are permanent.
    pub async fn command(&mut self, cmd: &str) -> Result<Reply, TaskError> {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        let w = self.io.get_mut();
        tokio::time::timeout(IO_TIMEOUT, async {
            w.write_all(format!("{tag} {cmd}\r\n").as_bytes()).await?;
            w.flush().await
        })
        .await
        .map_err(|_| net("write", "timed out"))?
        .map_err(|e| net("write", e))?;
        let mut reply = Reply::default();
        loop {
            let mut line = self.line().await?;
            // A line ending in {n} announces n bytes of literal data.
            while let Some(n) = literal_len(&line) {
                let mut data = vec![0u8; n];
                tokio::time::timeout(IO_TIMEOUT, self.io.read_exact(&mut data))
                    .await
                    .map_err(|_| net("read", "timed out"))?
                    .map_err(|e| net("read", e))?;
                reply.literals.push(data);
                let rest = self.line().await?;
                line.push_str(" \u{0}LITERAL ");
                line.push_str(&rest);
            }
            if let Some(status) = line.strip_prefix(&format!("{tag} ")) {
                return if status.starts_with("OK") {
                    Ok(reply)
                } else {
                    Err(TaskError::permanent(format!(
                        "imap {cmd_name}: {status}",
                        cmd_name = cmd.split(' ').next().unwrap_or("")
                    )))
                };
            }
            reply.untagged.push(line);
        }
    }

    /// Selects a mailbox; returns its `UIDVALIDITY`.
    pub async fn select(&mut self, mailbox: &str) -> Result<u64, TaskError> {
        let r = self.command(&format!("SELECT {}", quote(mailbox))).await?;
        Ok(r.untagged
            .iter()
            .find_map(|l| {
                let i = l.find("[UIDVALIDITY ")?;
                l[i + 13..].split(']').next()?.trim().parse().ok()
            })
            .unwrap_or(0))
    }

    /// UIDs greater than `after`, ascending.
    pub async fn uids_after(&mut self, after: u64) -> Result<Vec<u64>, TaskError> {
        let r = self
            .command(&format!("UID SEARCH UID {}:*", after + 1))
            .await?;
        let mut v: Vec<u64> = r
            .untagged
            .iter()
            .filter_map(|l| l.strip_prefix("* SEARCH"))
            .flat_map(|rest| rest.split_whitespace().filter_map(|n| n.parse().ok()))
            .filter(|u| *u > after) // `n:*` always matches the last message
            .collect();
        v.sort_unstable();
        v.dedup();
        Ok(v)
    }

    /// The raw message with this UID (not marked `\Seen`).
    pub async fn fetch(&mut self, uid: u64) -> Result<Option<Vec<u8>>, TaskError> {
        let r = self
            .command(&format!("UID FETCH {uid} BODY.PEEK[]"))
            .await?;
        Ok(r.literals.into_iter().next())
    }

    /// Logs out (errors ignored: the work is done).
    pub async fn logout(mut self) {
        let _ = self.command("LOGOUT").await;
    }
}

fn literal_len(line: &str) -> Option<usize> {
    let body = line.strip_suffix('}')?;
    let open = body.rfind('{')?;
    body[open + 1..].trim_end_matches('+').parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_literals_parse() {
        let t = parse_url("imaps://me%40x.org:p%3Ass@mail.example/Archive", "u").unwrap();
        assert_eq!(t.user, "me@x.org");
        assert_eq!(t.password, "p:ss");
        assert_eq!((t.port, t.tls), (993, true));
        assert_eq!(t.mailbox, "Archive");
        assert_eq!(parse_url("imap://u@h", "u").unwrap().mailbox, "INBOX");
        assert!(parse_url("http://u@h", "u").is_err());
        assert!(parse_url("imap://h", "u").is_err());
        assert_eq!(literal_len("* 1 FETCH (UID 5 BODY[] {123}"), Some(123));
        assert_eq!(literal_len("* OK done"), None);
        assert_eq!(quote("a\"b"), "\"a\\\"b\"");
    }
}
