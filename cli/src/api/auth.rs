//! API authentication: bearer JWTs (HS256 shared secret or RS256 public key) with scopes
//! `read` and `write` (claim `scope`, space-separated; `exp` checked), and static API keys
//! for service-to-service calls. A key is compared in constant time.
//!
//! Configuration (environment or flags of `taskmesh api`):
//!
//! - `TASKMESH_API_JWT_HS256_SECRET` — HS256 secret;
//! - `TASKMESH_API_JWT_RS256_PUBLIC_KEY_FILE` — PEM (`PUBLIC KEY` or `RSA PUBLIC KEY`);
//! - `TASKMESH_API_KEYS` — `name:key:read write,name2:key2:read`;
//! - `TASKMESH_API_KEYS_FILE` — the same, one `name:key:scopes` per line (`#` comments).

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// A permission an API route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Reading stats, tasks, dead letters, schedules.
    Read,
    /// Enqueueing, replaying, pausing, changing schedules.
    Write,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
        }
    }
}

/// Who made a request and what they may do.
#[derive(Debug, Clone)]
pub(crate) struct Principal {
    /// `sub` of a token or the key's name.
    pub(crate) name: String,
    scopes: Vec<String>,
}

impl Principal {
    /// Whether it holds `scope` (`write` implies `read`).
    pub(crate) fn allows(&self, scope: Scope) -> bool {
        self.scopes.iter().any(|s| s == scope.as_str())
            || (scope == Scope::Read && self.scopes.iter().any(|s| s == "write"))
    }
}

/// Why credentials were refused (the text goes to `WWW-Authenticate`).
#[derive(Debug)]
pub(crate) enum AuthError {
    /// No `Authorization` header.
    Missing,
    /// Present but invalid.
    Invalid(String),
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing => write!(
                f,
                "missing credentials: send `Authorization: Bearer <token or API key>`"
            ),
            Self::Invalid(why) => write!(f, "invalid credentials: {why}"),
        }
    }
}

struct ApiKey {
    name: String,
    digest: [u8; 32],
    scopes: Vec<String>,
}

enum JwtKey {
    Hs256(ring::hmac::Key),
    Rs256(Vec<u8>),
}

/// The configured verifiers.
pub(crate) struct Auth {
    jwt: Vec<JwtKey>,
    keys: Vec<ApiKey>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("jwt_keys", &self.jwt.len())
            .field("api_keys", &self.keys.len())
            .finish()
    }
}

fn digest(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// Constant-time equality of two digests.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    exp: Option<i64>,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default)]
    scope: Option<String>,
}

impl Auth {
    /// Builds the verifiers; errors say which setting is wrong.
    pub(crate) fn new(
        hs256_secret: Option<&str>,
        rs256_public_key_file: Option<&Path>,
        api_keys: Option<&str>,
        api_keys_file: Option<&Path>,
    ) -> Result<Self, String> {
        let mut jwt = Vec::new();
        if let Some(s) = hs256_secret.filter(|s| !s.is_empty()) {
            if s.len() < 16 {
                return Err("TASKMESH_API_JWT_HS256_SECRET is too short: use at least 16 bytes (32 random bytes recommended)".into());
            }
            jwt.push(JwtKey::Hs256(ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                s.as_bytes(),
            )));
        }
        if let Some(p) = rs256_public_key_file {
            let pem = std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read RS256 public key {}: {e}", p.display()))?;
            jwt.push(JwtKey::Rs256(
                rsa_public_key_der(&pem)
                    .map_err(|e| format!("RS256 public key {}: {e}", p.display()))?,
            ));
        }
        let mut keys = Vec::new();
        let mut add_keys = |text: &str, origin: &str| -> Result<(), String> {
            for item in text.split([',', '\n']) {
                let item = item.trim();
                if item.is_empty() || item.starts_with('#') {
                    continue;
                }
                let mut parts = item.splitn(3, ':');
                let (Some(name), Some(key)) = (parts.next(), parts.next()) else {
                    return Err(format!(
                        "{origin}: expected name:key:scopes, got an entry without a key"
                    ));
                };
                if key.len() < 16 {
                    return Err(format!(
                        "{origin}: key {name:?} is too short (at least 16 characters)"
                    ));
                }
                let scopes: Vec<String> = parts
                    .next()
                    .unwrap_or("read")
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect();
                if let Some(bad) = scopes.iter().find(|s| *s != "read" && *s != "write") {
                    return Err(format!(
                        "{origin}: key {name:?} has unknown scope {bad:?} (read, write)"
                    ));
                }
                keys.push(ApiKey {
                    name: name.to_owned(),
                    digest: digest(key.as_bytes()),
                    scopes,
                });
            }
            Ok(())
        };
        if let Some(k) = api_keys {
            add_keys(k, "TASKMESH_API_KEYS")?;
        }
        if let Some(p) = api_keys_file {
            let text = std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read API keys file {}: {e}", p.display()))?;
            add_keys(&text, &p.display().to_string())?;
        }
        Ok(Self { jwt, keys })
    }

    /// Whether any credential is configured.
    pub(crate) fn is_configured(&self) -> bool {
        !self.jwt.is_empty() || !self.keys.is_empty()
    }

    /// Checks an `Authorization` header value.
    pub(crate) fn verify(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let value = authorization.ok_or(AuthError::Missing)?;
        let Some(token) = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
        else {
            return Err(AuthError::Invalid("expected the Bearer scheme".into()));
        };
        let token = token.trim();
        if token.matches('.').count() == 2 {
            return self.verify_jwt(token);
        }
        let d = digest(token.as_bytes());
        // Compare against every key so timing does not reveal which one matched.
        let mut found = None;
        for k in &self.keys {
            if same(&k.digest, &d) {
                found = Some(k);
            }
        }
        found
            .map(|k| Principal {
                name: k.name.clone(),
                scopes: k.scopes.clone(),
            })
            .ok_or_else(|| AuthError::Invalid("unknown API key".into()))
    }

    fn verify_jwt(&self, token: &str) -> Result<Principal, AuthError> {
        let bad = |why: &str| AuthError::Invalid(why.to_owned());
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("malformed token"));
        };
        let header: Header = URL_SAFE_NO_PAD
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| bad("malformed token header"))?;
        let sig = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| bad("malformed token signature"))?;
        let signed = &token.as_bytes()[..h.len() + 1 + c.len()];
        let ok = self.jwt.iter().any(|k| match (k, header.alg.as_str()) {
            (JwtKey::Hs256(key), "HS256") => ring::hmac::verify(key, signed, &sig).is_ok(),
            (JwtKey::Rs256(der), "RS256") => ring::signature::UnparsedPublicKey::new(
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                der,
            )
            .verify(signed, &sig)
            .is_ok(),
            _ => false,
        });
        if !ok {
            return Err(bad(
                "token signature does not verify (or its alg is not configured)",
            ));
        }
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(c)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| bad("malformed token claims"))?;
        let now = chrono::Utc::now().timestamp();
        match claims.exp {
            None => return Err(bad("token has no exp claim")),
            Some(exp) if exp <= now => return Err(bad("token expired")),
            Some(_) => {}
        }
        if claims.nbf.is_some_and(|nbf| nbf > now + 60) {
            return Err(bad("token not valid yet (nbf)"));
        }
        Ok(Principal {
            name: claims.sub.unwrap_or_else(|| "jwt".into()),
            scopes: claims
                .scope
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
        })
    }
}

/// The PKCS#1 `RSAPublicKey` DER that ring wants, from a `PUBLIC KEY` (SPKI) or
/// `RSA PUBLIC KEY` PEM.
fn rsa_public_key_der(pem: &str) -> Result<Vec<u8>, String> {
    let (label, b64) = {
        let begin = pem
            .find("-----BEGIN ")
            .ok_or("no PEM block (-----BEGIN …-----)")?;
        let rest = &pem[begin + 11..];
        let label_end = rest.find("-----").ok_or("malformed PEM header")?;
        let label = &rest[..label_end];
        let body = &rest[label_end + 5..];
        let end = body.find("-----END ").ok_or("no PEM end line")?;
        (
            label.to_owned(),
            body[..end].split_whitespace().collect::<String>(),
        )
    };
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("PEM body is not base64: {e}"))?;
    match label.as_str() {
        "RSA PUBLIC KEY" => Ok(der),
        "PUBLIC KEY" => spki_to_pkcs1(&der).ok_or_else(|| "not an RSA SubjectPublicKeyInfo".into()),
        other => Err(format!("expected a PUBLIC KEY PEM, got {other}")),
    }
}

/// Reads one DER TLV at `b`: (tag, content, rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &x in &b[..n] {
            len = (len << 8) | usize::from(x);
        }
        b = &b[n..];
        len
    };
    if b.len() < len {
        return None;
    }
    Some((tag, &b[..len], &b[len..]))
}

fn spki_to_pkcs1(der: &[u8]) -> Option<Vec<u8>> {
    let (0x30, spki, _) = tlv(der)? else {
        return None;
    };
    let (0x30, _alg, rest) = tlv(spki)? else {
        return None;
    };
    let (0x03, bits, _) = tlv(rest)? else {
        return None;
    };
    let (&0, key) = bits.split_first()? else {
        return None;
    };
    Some(key.to_vec())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn hs256(secret: &str, claims: &serde_json::Value) -> String {
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let c = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap());
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let s = ring::hmac::sign(&key, format!("{h}.{c}").as_bytes());
        format!("{h}.{c}.{}", URL_SAFE_NO_PAD.encode(s.as_ref()))
    }

    #[test]
    fn jwt_scopes_expiry_and_signature() {
        let secret = "0123456789abcdef0123456789abcdef";
        let auth = Auth::new(Some(secret), None, None, None).unwrap();
        let exp = chrono::Utc::now().timestamp() + 60;
        let t = hs256(
            secret,
            &serde_json::json!({"sub":"ann","scope":"read","exp":exp}),
        );
        let p = auth.verify(Some(&format!("Bearer {t}"))).unwrap();
        assert!(p.allows(Scope::Read) && !p.allows(Scope::Write));
        let w = hs256(secret, &serde_json::json!({"scope":"write","exp":exp}));
        assert!(
            auth.verify(Some(&format!("Bearer {w}")))
                .unwrap()
                .allows(Scope::Read)
        );
        let old = hs256(secret, &serde_json::json!({"scope":"read","exp":exp - 120}));
        assert!(matches!(
            auth.verify(Some(&format!("Bearer {old}"))),
            Err(AuthError::Invalid(_))
        ));
        let forged = hs256(
            "another-secret-of-enough-length",
            &serde_json::json!({"scope":"write","exp":exp}),
        );
        assert!(auth.verify(Some(&format!("Bearer {forged}"))).is_err());
        let no_exp = hs256(secret, &serde_json::json!({"scope":"write"}));
        assert!(auth.verify(Some(&format!("Bearer {no_exp}"))).is_err());
        assert!(matches!(auth.verify(None), Err(AuthError::Missing)));
    }

    #[test]
    fn api_keys() {
        let auth = Auth::new(
            None,
            None,
            Some("svc:0123456789abcdefXYZ:read write, ro:ro-key-0123456789abc:read"),
            None,
        )
        .unwrap();
        let p = auth.verify(Some("Bearer 0123456789abcdefXYZ")).unwrap();
        assert_eq!(p.name, "svc");
        assert!(p.allows(Scope::Write));
        assert!(
            !auth
                .verify(Some("Bearer ro-key-0123456789abc"))
                .unwrap()
                .allows(Scope::Write)
        );
        assert!(auth.verify(Some("Bearer nope-nope-nope-nope")).is_err());
        assert!(Auth::new(None, None, Some("x:short"), None).is_err());
        assert!(Auth::new(None, None, Some("x:0123456789abcdefXYZ:admin"), None).is_err());
    }

    #[test]
    fn spki_is_unwrapped() {
        // SEQUENCE { SEQUENCE { OID rsaEncryption, NULL }, BIT STRING { 0, SEQUENCE {} } }
        let inner = [0x30, 0x00];
        let alg = [
            0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05,
            0x00,
        ];
        let mut bits = vec![0x03, 0x03, 0x00];
        bits.extend_from_slice(&inner);
        let mut body = alg.to_vec();
        body.extend_from_slice(&bits);
        let mut der = vec![0x30, u8::try_from(body.len()).unwrap()];
        der.extend_from_slice(&body);
        assert_eq!(spki_to_pkcs1(&der).unwrap(), inner.to_vec());
    }
}
