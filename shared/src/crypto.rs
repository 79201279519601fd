//! Authenticated encryption of task bodies for chosen categories.
//!
//! XChaCha20-Poly1305 with a random 24-byte nonce; the body on the wire is
//! `nonce ‖ ciphertext+tag`, the key id travels in `Task-Key-Id`. The target subject and the
//! task id are the associated data, so a ciphertext moved to another task or subject fails
//! to decrypt. Keys rotate by id: new tasks use the current key, old keys stay for decrypt.

use std::collections::BTreeMap;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// Value of `Task-Encoding` for encrypted bodies.
pub const ENCODING: &str = "xchacha20poly1305";
const NONCE_LEN: usize = 24;

/// Why a body could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// A key id the keyring does not hold.
    #[error("unknown encryption key id {0:?}: add it to the keyring (old keys stay for decrypt)")]
    UnknownKey(String),
    /// A key that is not 32 bytes of base64.
    #[error("encryption key {0:?} must be 32 bytes, base64-encoded")]
    BadKey(String),
    /// The keyring has no current key.
    #[error("encryption keyring has no current key {0:?}")]
    NoCurrent(String),
    /// Tampered, truncated, wrong key, or moved to another subject or task id.
    #[error("body failed authentication (tampered, wrong key, or bound to another task)")]
    Authentication,
}

/// Named 256-bit keys and the id of the one used to seal.
#[derive(Clone)]
pub struct Keyring {
    current: String,
    keys: BTreeMap<String, XChaCha20Poly1305>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current)
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    /// Builds a keyring from base64 keys; `current` must be among them.
    pub fn new(current: &str, keys: &BTreeMap<String, String>) -> Result<Self, CryptoError> {
        let mut out = BTreeMap::new();
        for (id, b64) in keys {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| CryptoError::BadKey(id.clone()))?;
            let cipher = XChaCha20Poly1305::new_from_slice(&raw)
                .map_err(|_| CryptoError::BadKey(id.clone()))?;
            if raw.len() != 32 {
                return Err(CryptoError::BadKey(id.clone()));
            }
            out.insert(id.clone(), cipher);
        }
        if !out.contains_key(current) {
            return Err(CryptoError::NoCurrent(current.to_owned()));
        }
        Ok(Self {
            current: current.to_owned(),
            keys: out,
        })
    }

    /// The id new bodies are sealed with.
    pub fn current_id(&self) -> &str {
        &self.current
    }

    /// Encrypts `plain` for `subject` and `task_id`; returns the wire body.
    pub fn seal(&self, subject: &str, task_id: &str, plain: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let cipher = self
            .keys
            .get(&self.current)
            .ok_or_else(|| CryptoError::NoCurrent(self.current.clone()))?;
        let mut nonce = [0u8; NONCE_LEN];
        for b in &mut nonce {
            *b = fastrand::u8(..);
        }
        let aad = aad(subject, task_id);
        let ct = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::Authentication)?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypts a wire body sealed with key `key_id` for `subject` and `task_id`.
    pub fn open(
        &self,
        key_id: &str,
        subject: &str,
        task_id: &str,
        body: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let cipher = self
            .keys
            .get(key_id)
            .ok_or_else(|| CryptoError::UnknownKey(key_id.to_owned()))?;
        if body.len() < NONCE_LEN + 16 {
            return Err(CryptoError::Authentication);
        }
        let (nonce, ct) = body.split_at(NONCE_LEN);
        let aad = aad(subject, task_id);
        cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
            .map_err(|_| CryptoError::Authentication)
    }
}

fn aad(subject: &str, task_id: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(subject.len() + task_id.len() + 1);
    v.extend_from_slice(subject.as_bytes());
    v.push(0);
    v.extend_from_slice(task_id.as_bytes());
    v
}

/// A random key, base64-encoded (for `taskmesh keygen` and tests). Uses the operating
/// system's randomness through UUIDv4 generation.
pub fn generate_key() -> String {
    let mut raw = Vec::with_capacity(32);
    raw.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    raw.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    base64::engine::general_purpose::STANDARD.encode(raw)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ring(current: &str) -> Keyring {
        let mut keys = BTreeMap::new();
        keys.insert(
            "k1".to_string(),
            base64::engine::general_purpose::STANDARD.encode([1u8; 32]),
        );
        keys.insert(
            "k2".to_string(),
            base64::engine::general_purpose::STANDARD.encode([2u8; 32]),
        );
        Keyring::new(current, &keys).unwrap()
    }

    #[test]
    fn seal_open_and_rotation() {
        let old = ring("k1");
        let body = old
            .seal("tasks.email.send", "t1", b"{\"to\":\"a@b\"}")
            .unwrap();
        let new = ring("k2");
        // Rotated: new bodies use k2, old ones still open with k1.
        assert_eq!(
            new.open("k1", "tasks.email.send", "t1", &body).unwrap(),
            b"{\"to\":\"a@b\"}"
        );
        let b2 = new.seal("tasks.email.send", "t2", b"x").unwrap();
        assert_eq!(
            new.open(new.current_id(), "tasks.email.send", "t2", &b2)
                .unwrap(),
            b"x"
        );
    }

    #[test]
    fn tampering_and_rebinding_fail() {
        let r = ring("k1");
        let body = r.seal("tasks.email.send", "t1", b"secret").unwrap();
        let mut flipped = body.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(
            r.open("k1", "tasks.email.send", "t1", &flipped),
            Err(CryptoError::Authentication)
        );
        assert_eq!(
            r.open("k1", "tasks.email.send", "t2", &body),
            Err(CryptoError::Authentication)
        );
        assert_eq!(
            r.open("k1", "tasks.email.other", "t1", &body),
            Err(CryptoError::Authentication)
        );
        assert_eq!(
            r.open("k2", "tasks.email.send", "t1", &body),
            Err(CryptoError::Authentication)
        );
        assert_eq!(
            r.open("k9", "tasks.email.send", "t1", &body),
            Err(CryptoError::UnknownKey("k9".into()))
        );
        assert_eq!(
            r.open("k1", "tasks.email.send", "t1", &body[..10]),
            Err(CryptoError::Authentication)
        );
        assert!(matches!(
            Keyring::new(
                "k1",
                &BTreeMap::from([("k1".to_string(), "c2hvcnQ=".to_string())])
            ),
            Err(CryptoError::BadKey(_))
        ));
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(generate_key())
                .unwrap()
                .len(),
            32
        );
    }
}
