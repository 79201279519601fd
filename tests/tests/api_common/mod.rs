//! Helpers shared by the `admin`, `api` and `dashboard` suites: running CLI verbs, a
//! minimal HTTP/1.1 client, HS256 tokens, and starting `taskmesh api`.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest as _, Sha256};
use taskmesh_tests::mesh::path_str;
use taskmesh_tests::{TaskmeshProcess, TestMesh, http_addr_of};

/// The HS256 secret every test API server trusts.
pub const SECRET: &str = "test-secret-0123456789abcdef-0123456789";
/// A static API key with both scopes.
pub const SERVICE_KEY: &str = "svc-key-0123456789abcdef";

/// Runs `taskmesh <args> --config <mesh config>`; (success, whole output).
pub async fn cli(mesh: &TestMesh, args: &[&str]) -> (bool, String) {
    let mut a = args.to_vec();
    a.extend(["--config", path_str(&mesh.config)]);
    let mut p = TaskmeshProcess::spawn(&a, &[]);
    let status = p
        .wait_exit(Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("taskmesh {args:?} did not exit: {}", p.log()));
    (status.success(), p.log())
}

/// The first JSON document (object or array) in `out` (logs may precede it).
pub fn first_json(out: &str) -> serde_json::Value {
    let start = out
        .lines()
        .scan(0usize, |pos, l| {
            let here = *pos;
            *pos += l.len() + 1;
            Some((here, l))
        })
        .find(|(_, l)| l.starts_with('{') || l.starts_with('['))
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("no JSON in output:\n{out}"));
    serde_json::Deserializer::from_str(&out[start..])
        .into_iter::<serde_json::Value>()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("unparsable JSON in output:\n{out}"))
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new()
        .chain_update(&ipad)
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(&opad)
        .chain_update(inner)
        .finalize()
        .to_vec()
}

/// An HS256 JWT signed with `secret`, with `scope` and `exp` = now + `ttl_s`.
pub fn token_with(secret: &str, scope: &str, ttl_s: i64) -> String {
    let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let exp = chrono::Utc::now().timestamp() + ttl_s;
    let c = URL_SAFE_NO_PAD.encode(
        serde_json::to_vec(&serde_json::json!({"sub": "tester", "scope": scope, "exp": exp}))
            .unwrap(),
    );
    let sig = hmac_sha256(secret.as_bytes(), format!("{h}.{c}").as_bytes());
    format!("{h}.{c}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// A valid token for [`SECRET`].
pub fn token(scope: &str) -> String {
    token_with(SECRET, scope, 600)
}

/// A response.
#[derive(Debug)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Lower-cased header names with values.
    pub headers: Vec<(String, String)>,
    /// Body text.
    pub body: String,
}

impl Resp {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request (`Connection: close`).
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&serde_json::Value>,
) -> Resp {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = bearer {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).await.expect("write");
    // Read until the body is complete (Content-Length or the last chunk): some servers
    // (chromedriver) keep the connection open despite `Connection: close`.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        if response_complete(&buf) {
            break;
        }
        let n = s.read(&mut chunk).await.expect("read");
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("header end");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    Resp {
        status,
        headers,
        body,
    }
}

fn response_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let body = &buf[end + 4..];
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return body.len() >= len;
    }
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    false
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `taskmesh api` on a free loopback port with [`SECRET`] and [`SERVICE_KEY`]; returns the
/// process and its address.
pub async fn start_api(mesh: &TestMesh) -> (TaskmeshProcess, String) {
    let keys = format!("svc:{SERVICE_KEY}:read write");
    let p = TaskmeshProcess::spawn(
        &[
            "api",
            "--config",
            path_str(&mesh.config),
            "--http-addr",
            "127.0.0.1:0",
        ],
        &[
            ("TASKMESH_API_JWT_HS256_SECRET", SECRET),
            ("TASKMESH_API_KEYS", &keys),
        ],
    );
    let addr = http_addr_of(&p).await;
    (p, addr)
}
