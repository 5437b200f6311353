//! Credentials seen in cleartext requests: where they are looked for, and how each is reduced
//! at once to a keyed [`Fingerprint`] (HMAC-SHA-256 under a per-installation key, truncated).
//!
//! Invariant 2: a raw credential value never leaves [`detect`]. It is read from the request,
//! fed to the HMAC and dropped; only the fingerprint, the kind of position and the position's
//! name (header, cookie or parameter name, or the Authorization scheme) go further. This module
//! must never log, store or format a credential value.

use std::fmt;
use std::path::{Path, PathBuf};

pub mod queue;

use aws_lc_rs::{digest, hmac};
use http::header::{HeaderMap, HeaderName, AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION};
use http::Uri;

/// Headers that carry API keys and tokens, beside Authorization and Cookie.
pub const KEY_HEADERS: [&str; 6] = [
    "x-api-key",
    "api-key",
    "x-auth-token",
    "x-auth-key",
    "x-access-token",
    "private-token",
];

/// Query parameters that carry credentials.
pub const KEY_PARAMS: [&str; 14] = [
    "api_key",
    "apikey",
    "access_token",
    "token",
    "key",
    "secret",
    "password",
    "client_secret",
    "sig",
    "signature",
    "auth",
    "api-key",
    "auth_token",
    "passwd",
];

/// Most credentials one request is searched for: bounds the HMAC work a client can cause.
pub const MAX_PER_REQUEST: usize = 16;

/// Why the fingerprint key could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExposureError {
    #[error("fingerprint key {path}: {reason}")]
    Key { path: String, reason: String },
}

/// Where in the request a credential was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CredentialKind {
    Authorization,
    ProxyAuthorization,
    Cookie,
    Header,
    Query,
    Userinfo,
}

impl CredentialKind {
    pub const ALL: [CredentialKind; 6] = [
        CredentialKind::Authorization,
        CredentialKind::ProxyAuthorization,
        CredentialKind::Cookie,
        CredentialKind::Header,
        CredentialKind::Query,
        CredentialKind::Userinfo,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Authorization => "authorization",
            CredentialKind::ProxyAuthorization => "proxy-authorization",
            CredentialKind::Cookie => "cookie",
            CredentialKind::Header => "header",
            CredentialKind::Query => "query",
            CredentialKind::Userinfo => "userinfo",
        }
    }

    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A keyed, truncated digest of a credential. It can only be made by a [`Fingerprinter`],
/// which needs the raw value and the installation's key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 16]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A position's name, such as `x-api-key`, `session` or `Bearer`: short, plain characters
/// only, so it is safe as a record field.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PositionName {
    len: u8,
    bytes: [u8; 32],
}

impl PositionName {
    fn new(raw: &[u8]) -> PositionName {
        let ok = !raw.is_empty()
            && raw.len() <= 32
            && raw
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b));
        let text: &[u8] = if ok { raw } else { b"?" };
        let mut bytes = [0u8; 32];
        bytes[..text.len()].copy_from_slice(text);
        PositionName {
            len: text.len() as u8,
            bytes,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("?")
    }
}

impl fmt::Debug for PositionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One credential found: where, under which name, and its fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub kind: CredentialKind,
    pub name: PositionName,
    pub fingerprint: Fingerprint,
}

/// Holds the per-installation HMAC key.
pub struct Fingerprinter {
    key: hmac::Key,
}

impl Fingerprinter {
    /// The key file in a state directory.
    pub fn key_path(dir: &Path) -> PathBuf {
        dir.join("fingerprint.key")
    }

    /// Loads the key from `dir`, creating a random one (mode 0600) at first start.
    pub fn open(dir: &Path) -> Result<Fingerprinter, ExposureError> {
        let path = Self::key_path(dir);
        let fail = |reason: String| ExposureError::Key {
            path: path.display().to_string(),
            reason,
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) if b.len() == 32 => b,
            Ok(b) => return Err(fail(format!("holds {} bytes, expected 32", b.len()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| fail(format!("cannot create the state dir: {e}")))?;
                let mut b = vec![0u8; 32];
                aws_lc_rs::rand::fill(&mut b).map_err(|_| fail("no system randomness".into()))?;
                crate::tls::write_private(&path, &b)
                    .map_err(|e| fail(format!("cannot write: {e}")))?;
                b
            }
            Err(e) => return Err(fail(format!("cannot read: {e}"))),
        };
        Ok(Fingerprinter {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
        })
    }

    /// A fingerprinter with a key that is never stored, for tests and dry runs.
    pub fn ephemeral() -> Fingerprinter {
        let mut b = [0u8; 32];
        // With no randomness the key is all zeros: fingerprints still never expose values.
        let _ = aws_lc_rs::rand::fill(&mut b);
        Fingerprinter {
            key: hmac::Key::new(hmac::HMAC_SHA256, &b),
        }
    }

    pub fn fingerprint(&self, secret: &[u8]) -> Fingerprint {
        let tag = hmac::sign(&self.key, secret);
        let mut out = [0u8; 16];
        out.copy_from_slice(&tag.as_ref()[..16]);
        Fingerprint(out)
    }
}

/// Site-specific positions to search beyond the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtraPositions {
    pub headers: Vec<HeaderName>,
    /// Lowercase parameter names.
    pub params: Vec<String>,
}

/// What an exposure response needs of a credential beyond its fingerprint: its SHA-256 (for
/// the issuer to look up its own hashed tokens) and, only for `revoke` with `include_raw`, the
/// value itself. Held in memory only: never logged (Debug is redacted), never stored.
pub struct SecretValue {
    pub sha256: [u8; 32],
    pub raw: Option<String>,
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

/// Finds every credential in a request's headers and target and fingerprints it.
pub fn detect(
    headers: &HeaderMap,
    uri: &Uri,
    extra: &ExtraPositions,
    fp: &Fingerprinter,
    out: &mut Vec<Found>,
) {
    detect_with_secrets(headers, uri, extra, fp, out, None);
}

/// Like [`detect`]; with `secrets`, also pushes each credential's [`SecretValue`] (in the same
/// order as `out`), keeping the raw value when `.1` is true.
pub fn detect_with_secrets(
    headers: &HeaderMap,
    uri: &Uri,
    extra: &ExtraPositions,
    fp: &Fingerprinter,
    out: &mut Vec<Found>,
    mut secrets: Option<(&mut Vec<SecretValue>, bool)>,
) {
    let mut push = |kind: CredentialKind, name: &[u8], value: &[u8]| {
        if out.len() < MAX_PER_REQUEST && !value.is_empty() {
            out.push(Found {
                kind,
                name: PositionName::new(name),
                fingerprint: fp.fingerprint(value),
            });
            if let Some((v, keep_raw)) = secrets.as_mut() {
                let mut sha256 = [0u8; 32];
                sha256.copy_from_slice(digest::digest(&digest::SHA256, value).as_ref());
                v.push(SecretValue {
                    sha256,
                    raw: keep_raw.then(|| String::from_utf8_lossy(value).into_owned()),
                });
            }
        }
    };
    for (header, kind) in [
        (AUTHORIZATION, CredentialKind::Authorization),
        (PROXY_AUTHORIZATION, CredentialKind::ProxyAuthorization),
    ] {
        for v in headers.get_all(header) {
            let v = v.as_bytes();
            // `Scheme credentials`: the scheme names the position, the rest is the secret.
            match v.iter().position(|b| *b == b' ') {
                Some(i) => push(kind, &v[..i], trim(&v[i + 1..])),
                None => push(kind, b"?", v),
            }
        }
    }
    for v in headers.get_all(COOKIE) {
        for pair in v.as_bytes().split(|b| *b == b';') {
            let pair = trim(pair);
            match pair.iter().position(|b| *b == b'=') {
                Some(i) => push(
                    CredentialKind::Cookie,
                    trim(&pair[..i]),
                    trim(&pair[i + 1..]),
                ),
                None => push(CredentialKind::Cookie, b"?", pair),
            }
        }
    }
    for name in KEY_HEADERS {
        for v in headers.get_all(name) {
            push(CredentialKind::Header, name.as_bytes(), v.as_bytes());
        }
    }
    for name in &extra.headers {
        for v in headers.get_all(name) {
            push(
                CredentialKind::Header,
                name.as_str().as_bytes(),
                v.as_bytes(),
            );
        }
    }
    if let Some(q) = uri.query() {
        for (name, value) in form_urlencoded::parse(q.as_bytes()) {
            let known = KEY_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(&name))
                || extra.params.iter().any(|p| p.eq_ignore_ascii_case(&name));
            if known {
                push(
                    CredentialKind::Query,
                    name.to_ascii_lowercase().as_bytes(),
                    value.as_bytes(),
                );
            }
        }
    }
    if let Some(a) = uri.authority() {
        if let Some((userinfo, _)) = a.as_str().rsplit_once('@') {
            push(CredentialKind::Userinfo, b"userinfo", userinfo.as_bytes());
        }
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(headers: &[(&str, &str)], uri: &str) -> Vec<(CredentialKind, String)> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        let extra = ExtraPositions {
            headers: vec![HeaderName::from_static("x-custom-secret")],
            params: vec!["mykey".into()],
        };
        let mut out = Vec::new();
        detect(
            &h,
            &uri.parse().expect("uri"),
            &extra,
            &Fingerprinter::ephemeral(),
            &mut out,
        );
        out.iter()
            .map(|f| (f.kind, f.name.as_str().to_owned()))
            .collect()
    }

    #[test]
    fn every_position_is_searched() {
        let got = found(
            &[
                ("authorization", "Bearer tok"),
                ("proxy-authorization", "Basic dTpw"),
                ("cookie", "session=abc; theme=dark"),
                ("x-api-key", "k1"),
                ("private-token", "k2"),
                ("x-custom-secret", "k3"),
                ("x-unrelated", "nothing"),
            ],
            "http://user:pw@h.example/p?api_key=1&Token=2&mykey=3&page=4",
        );
        let want = [
            (CredentialKind::Authorization, "Bearer"),
            (CredentialKind::ProxyAuthorization, "Basic"),
            (CredentialKind::Cookie, "session"),
            (CredentialKind::Cookie, "theme"),
            (CredentialKind::Header, "x-api-key"),
            (CredentialKind::Header, "private-token"),
            (CredentialKind::Header, "x-custom-secret"),
            (CredentialKind::Query, "api_key"),
            (CredentialKind::Query, "token"),
            (CredentialKind::Query, "mykey"),
            (CredentialKind::Userinfo, "userinfo"),
        ];
        assert_eq!(got, want.map(|(k, n)| (k, n.to_owned())));
    }

    #[test]
    fn fingerprints_are_keyed_and_stable() {
        let a = Fingerprinter::ephemeral();
        let b = Fingerprinter::ephemeral();
        assert_eq!(a.fingerprint(b"s3cret"), a.fingerprint(b"s3cret"));
        assert_ne!(a.fingerprint(b"s3cret"), a.fingerprint(b"s3cret2"));
        assert_ne!(
            a.fingerprint(b"s3cret"),
            b.fingerprint(b"s3cret"),
            "another key, another fingerprint"
        );
        assert_eq!(a.fingerprint(b"x").to_string().len(), 32);
    }

    #[test]
    fn hostile_names_and_floods_are_bounded() {
        let many: Vec<String> = (0..100).map(|i| format!("c{i}=v")).collect();
        let cookie = many.join("; ");
        let got = found(
            &[
                ("cookie", &cookie),
                ("authorization", "Weird\"Scheme value"),
            ],
            "/",
        );
        assert_eq!(got.len(), MAX_PER_REQUEST);
        let got = found(&[("authorization", "We\"ird value")], "/");
        assert_eq!(got[0].1, "?");
    }
}
