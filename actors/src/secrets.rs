//! The node's secrets: values sealed at rest (ChaCha20-Poly1305, a random nonce per
//! value, the name as associated data) under a node key kept beside the store
//! (`<data_dir>/secrets.key`, 0600, made at first start) or named by `secrets_key_file`.
//!
//! Values are opened only by the Executor, at the moment a step's params are sent, and
//! only where the playbook's own text says `{{secret.<name>}}`: plans, audit records,
//! events, approvals and the effect ledger hold the reference, never the value, and
//! what a tool returns is scrubbed of every value it was given.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, OsRng, Payload};
use chacha20poly1305::{AeadCore, ChaCha20Poly1305, Key, Nonce};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use storage::{Batch, Cf, Store};

/// Longest secret value.
pub const VALUE_BYTES_MAX: usize = 16 << 10;

/// A sealed secret as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sealed {
    nonce: Vec<u8>,
    ciphertext: Vec<u8>,
    created_at_ms: u64,
    rotated_at_ms: u64,
    /// 1 when set, +1 per rotation.
    version: u32,
}

pub use crate::protocol::SecretInfo;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret names are letters, digits, `-` or `_` (1 to 64): `{0}`")]
    BadName(String),
    #[error("a secret value is 1 to {VALUE_BYTES_MAX} bytes")]
    BadValue,
    #[error("no secret named `{0}`")]
    NotFound(String),
    #[error("secret `{0}` exists; rotate it instead")]
    Exists(String),
    #[error("secret `{0}` cannot be opened: the node key does not match the one that sealed it")]
    Unsealable(String),
    #[error("secrets key file {path}: {message}")]
    Key { path: String, message: String },
    #[error(transparent)]
    Store(#[from] storage::StoreError),
}

pub struct SecretStore {
    store: Store,
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretStore(<sealed>)")
    }
}

impl SecretStore {
    /// Opens the store's secrets with the key at `key_path`, making a new random key
    /// there (mode 0600) if there is none.
    pub fn open(store: Store, key_path: &Path) -> Result<SecretStore, SecretError> {
        let key_err = |message: String| SecretError::Key {
            path: key_path.display().to_string(),
            message,
        };
        let bytes = match std::fs::read(key_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = ChaCha20Poly1305::generate_key(&mut OsRng);
                write_private(key_path, key.as_slice()).map_err(|e| key_err(e.to_string()))?;
                key.to_vec()
            }
            Err(e) => return Err(key_err(e.to_string())),
        };
        if bytes.len() != 32 {
            return Err(key_err(format!("holds {} bytes; a key is 32", bytes.len())));
        }
        Ok(SecretStore {
            store,
            cipher: ChaCha20Poly1305::new(Key::from_slice(&bytes)),
        })
    }

    /// Sets a new secret (`rotate: false`, refused if it exists) or replaces an
    /// existing one's value (`rotate: true`, refused if it does not).
    pub async fn put(
        &self,
        name: &str,
        value: &str,
        rotate: bool,
        now_ms: u64,
    ) -> Result<SecretInfo, SecretError> {
        check_name(name)?;
        if value.is_empty() || value.len() > VALUE_BYTES_MAX {
            return Err(SecretError::BadValue);
        }
        let old: Option<Sealed> = self.store.get(Cf::Secrets, name.as_bytes())?;
        let (created_at_ms, version) = match (&old, rotate) {
            (Some(_), false) => return Err(SecretError::Exists(name.into())),
            (None, true) => return Err(SecretError::NotFound(name.into())),
            (Some(o), true) => (o.created_at_ms, o.version + 1),
            (None, false) => (now_ms, 1),
        };
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: value.as_bytes(),
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Unsealable(name.into()))?;
        let sealed = Sealed {
            nonce: nonce.to_vec(),
            ciphertext,
            created_at_ms,
            rotated_at_ms: now_ms,
            version,
        };
        let mut batch = Batch::new();
        batch.put(Cf::Secrets, name.as_bytes(), &sealed)?;
        self.store.commit(batch).await?;
        Ok(info(name, &sealed))
    }

    pub async fn delete(&self, name: &str) -> Result<SecretInfo, SecretError> {
        check_name(name)?;
        let old: Sealed = self
            .store
            .get(Cf::Secrets, name.as_bytes())?
            .ok_or_else(|| SecretError::NotFound(name.into()))?;
        let mut batch = Batch::new();
        batch.delete(Cf::Secrets, name.as_bytes());
        self.store.commit(batch).await?;
        Ok(info(name, &old))
    }

    pub fn list(&self) -> Result<Vec<SecretInfo>, SecretError> {
        let mut out = Vec::new();
        for key in self.store.keys(Cf::Secrets)? {
            if let Some(s) = self.store.get::<Sealed>(Cf::Secrets, &key)? {
                out.push(info(&String::from_utf8_lossy(&key), &s));
            }
        }
        Ok(out)
    }

    /// The value of `name`, opened.
    pub fn open_value(&self, name: &str) -> Result<String, SecretError> {
        let sealed: Sealed = self
            .store
            .get(Cf::Secrets, name.as_bytes())?
            .ok_or_else(|| SecretError::NotFound(name.into()))?;
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Unsealable(name.into()))?;
        String::from_utf8(plain).map_err(|_| SecretError::Unsealable(name.into()))
    }
}

fn info(name: &str, s: &Sealed) -> SecretInfo {
    SecretInfo {
        name: name.to_string(),
        version: s.version,
        created_at_ms: s.created_at_ms,
        rotated_at_ms: s.rotated_at_ms,
    }
}

pub fn check_name(name: &str) -> Result<(), SecretError> {
    if name.len() > 64 || !crate::protocol::subject::is_token(name) {
        return Err(SecretError::BadName(name.into()));
    }
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// The names `{{secret.<name>}}` in `params` refer to.
pub fn referenced(params: &Value) -> Vec<String> {
    let mut names: Vec<String> = crate::template::references(params)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| r.strip_prefix("secret.").map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// `value` with every occurrence of each secret value replaced by `[secret:<name>]`:
/// what a tool returns (an echo, an error quoting a header) never carries one on.
pub fn scrub(value: &mut Value, opened: &[(String, String)]) {
    match value {
        Value::String(s) => {
            for (name, secret) in opened {
                if !secret.is_empty() && s.contains(secret.as_str()) {
                    *s = s.replace(secret.as_str(), &format!("[secret:{name}]"));
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| scrub(v, opened)),
        Value::Object(map) => map.values_mut().for_each(|v| scrub(v, opened)),
        _ => {}
    }
}

/// `text` scrubbed like [`scrub`].
pub fn scrub_text(text: &str, opened: &[(String, String)]) -> String {
    let mut v = Value::String(text.to_string());
    scrub(&mut v, opened);
    match v {
        Value::String(s) => s,
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn values_are_sealed_rotated_and_opened_only_with_the_key() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Store::open(&dir.path().join("db"), &Default::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let key = dir.path().join("secrets.key");
        let secrets = SecretStore::open(store.clone(), &key).unwrap_or_else(|e| panic!("{e}"));
        let canary = "canary-5b1f-value";
        secrets
            .put("crm_token", canary, false, 10)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            secrets.put("crm_token", "x", false, 11).await,
            Err(SecretError::Exists(_))
        ));
        assert!(matches!(
            secrets.put("nope", "x", true, 11).await,
            Err(SecretError::NotFound(_))
        ));
        assert!(matches!(
            secrets.put("bad name", "x", false, 11).await,
            Err(SecretError::BadName(_))
        ));
        assert_eq!(secrets.open_value("crm_token").unwrap_or_default(), canary);
        // At rest: no trace of the value in the store's files.
        let raw: Vec<u8> = store
            .keys(Cf::Secrets)
            .unwrap_or_default()
            .iter()
            .flat_map(|k| store.get::<Sealed>(Cf::Secrets, k).ok().flatten())
            .flat_map(|s| s.ciphertext)
            .collect();
        assert!(!raw.windows(canary.len()).any(|w| w == canary.as_bytes()));
        let rotated = secrets
            .put("crm_token", "second", true, 20)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (
                rotated.version,
                rotated.created_at_ms,
                rotated.rotated_at_ms
            ),
            (2, 10, 20)
        );
        assert_eq!(
            secrets.open_value("crm_token").unwrap_or_default(),
            "second"
        );
        // Another node's key cannot open it.
        let other = SecretStore::open(store.clone(), &dir.path().join("other.key"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            other.open_value("crm_token"),
            Err(SecretError::Unsealable(_))
        ));
        assert_eq!(secrets.list().unwrap_or_default().len(), 1);
        // Scrubbing.
        let opened = vec![("crm_token".to_string(), "second".to_string())];
        let mut out = serde_json::json!({"echo": "Bearer second", "n": [ "second" ]});
        scrub(&mut out, &opened);
        assert_eq!(
            out,
            serde_json::json!({"echo": "Bearer [secret:crm_token]", "n": ["[secret:crm_token]"]})
        );
    }
}
