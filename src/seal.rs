//! The installation secret and what is derived from it.
//!
//! Owns: `STATE/fingerprint.key`, 32 random bytes (mode 0600) made at first start. It keys the
//! credential fingerprints, and seals (AES-256-GCM, a key derived with HMAC-SHA256 under its own
//! label) the secrets the store keeps for a fleet: ACME account and certificate keys, so a
//! database row or a `pg_dump` never holds them in the clear. Every node of a fleet needs the
//! same file: fingerprints then agree, and each node opens what another sealed.
//!
//! Never: logs or returns the secret, or what it seals in an error.

use std::path::{Path, PathBuf};

use aws_lc_rs::{aead, hmac, rand};

/// The installation secret's file in a state directory.
pub fn key_path(dir: &Path) -> PathBuf {
    dir.join("fingerprint.key")
}

/// The installation secret of `dir`, created (random, mode 0600) when there is none. The error
/// says what is wrong with the file, never what it holds.
pub fn installation_key(dir: &Path) -> Result<[u8; 32], String> {
    let path = key_path(dir);
    match std::fs::read(&path) {
        Ok(b) => <[u8; 32]>::try_from(b.as_slice())
            .map_err(|_| format!("holds {} bytes, expected 32", b.len())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create the state dir: {e}"))?;
            let mut b = [0u8; 32];
            rand::fill(&mut b).map_err(|_| "no system randomness".to_owned())?;
            crate::tls::write_private(&path, &b).map_err(|e| format!("cannot write: {e}"))?;
            Ok(b)
        }
        Err(e) => Err(format!("cannot read: {e}")),
    }
}

/// Seals and opens secrets with a key derived from the installation secret.
pub struct Sealer {
    key: aead::LessSafeKey,
}

/// The nonce, sent in front of each sealed value.
const NONCE: usize = aead::NONCE_LEN;

impl Sealer {
    /// The sealer of the installation secret `secret`.
    pub fn new(secret: &[u8; 32]) -> Sealer {
        let derived = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, secret),
            b"portcullis seal v1",
        );
        let key = aead::UnboundKey::new(&aead::AES_256_GCM, derived.as_ref())
            .expect("a 32-byte key is an AES-256 key");
        Sealer {
            key: aead::LessSafeKey::new(key),
        }
    }

    /// The sealer of `dir`'s installation secret.
    pub fn open_dir(dir: &Path) -> Result<Sealer, String> {
        installation_key(dir)
            .map(|k| Sealer::new(&k))
            .map_err(|e| format!("{}: {e}", key_path(dir).display()))
    }

    /// `plain`, encrypted and bound to `label` (what it is, and whose): a sealed value moved to
    /// another row does not open there.
    pub fn seal(&self, label: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE];
        // Without randomness the nonce would repeat: refuse to seal rather than weaken it.
        if rand::fill(&mut nonce).is_err() {
            return Vec::new();
        }
        let mut out = plain.to_vec();
        if self
            .key
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(label.as_bytes()),
                &mut out,
            )
            .is_err()
        {
            return Vec::new();
        }
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&out);
        sealed
    }

    /// What [`Sealer::seal`] sealed under `label`, or `None` when it was sealed under another
    /// label or another installation secret, or is damaged.
    pub fn open(&self, label: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE + aead::AES_256_GCM.tag_len() {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE);
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, aead::Aad::from(label.as_bytes()), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_under_its_label_and_secret() {
        let s = Sealer::new(&[7; 32]);
        let sealed = s.seal("acme-key:a.test", b"-----BEGIN PRIVATE KEY-----");
        assert!(!sealed.is_empty());
        assert!(!sealed.windows(b"PRIVATE".len()).any(|w| w == b"PRIVATE"));
        assert_eq!(
            s.open("acme-key:a.test", &sealed).as_deref(),
            Some(&b"-----BEGIN PRIVATE KEY-----"[..])
        );
        assert_eq!(s.open("acme-key:b.test", &sealed), None);
        assert_eq!(Sealer::new(&[8; 32]).open("acme-key:a.test", &sealed), None);
        let mut damaged = sealed.clone();
        *damaged.last_mut().expect("tag") ^= 1;
        assert_eq!(s.open("acme-key:a.test", &damaged), None);
        assert_eq!(s.open("acme-key:a.test", b"short"), None);
        // A fresh nonce each time: the same value never seals to the same bytes.
        assert_ne!(s.seal("l", b"x"), s.seal("l", b"x"));
    }
}
