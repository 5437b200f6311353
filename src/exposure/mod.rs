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

pub use crate::config::positions::{ExtraPositions, PathPattern, PatternError, PositionName};

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

/// Query parameters, form fields and JSON keys that carry credentials.
pub const KEY_PARAMS: [&str; 20] = [
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
    "pwd",
    "refresh_token",
    "id_token",
    "client_assertion",
    "accesstoken",
    "refreshtoken",
];

/// Cookie names that hold a session or a credential. A cookie is one if its lowercase name is
/// listed here, contains one of [`CREDENTIAL_COOKIE_PARTS`], or is in the site's
/// `exposure_cookies`; `theme=dark` or `_ga=...` are not.
pub const CREDENTIAL_COOKIES: [&str; 12] = [
    "sid",
    "sess",
    "ssid",
    "phpsessid",
    "jsessionid",
    "asp.net_sessionid",
    "connect.sid",
    "jwt",
    "auth",
    "remember_me",
    "user_credentials",
    "_identity",
];

/// Parts of a cookie name that mark it as a credential (`laravel_session`, `XSRF-TOKEN` is
/// not one: see the list).
pub const CREDENTIAL_COOKIE_PARTS: [&str; 9] = [
    "session", "token", "auth", "jwt", "secret", "passw", "apikey", "api_key", "login",
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
    /// A field of a form or JSON body.
    Body,
    /// A segment of the path matched by one of the site's `exposure_paths`.
    Path,
}

impl CredentialKind {
    pub const ALL: [CredentialKind; 8] = [
        CredentialKind::Authorization,
        CredentialKind::ProxyAuthorization,
        CredentialKind::Cookie,
        CredentialKind::Header,
        CredentialKind::Query,
        CredentialKind::Userinfo,
        CredentialKind::Body,
        CredentialKind::Path,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Authorization => "authorization",
            CredentialKind::ProxyAuthorization => "proxy-authorization",
            CredentialKind::Cookie => "cookie",
            CredentialKind::Header => "header",
            CredentialKind::Query => "query",
            CredentialKind::Userinfo => "userinfo",
            CredentialKind::Body => "body",
            CredentialKind::Path => "path",
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
        f.write_str(&crate::hex::encode(&self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
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
    /// The key file in a state directory (the installation secret, see [`crate::seal`]).
    pub fn key_path(dir: &Path) -> PathBuf {
        crate::seal::key_path(dir)
    }

    /// Loads the key from `dir`, creating a random one (mode 0600) at first start.
    pub fn open(dir: &Path) -> Result<Fingerprinter, ExposureError> {
        let bytes = crate::seal::installation_key(dir).map_err(|reason| ExposureError::Key {
            path: Self::key_path(dir).display().to_string(),
            reason,
        })?;
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
    secrets: Option<(&mut Vec<SecretValue>, bool)>,
) {
    let mut sink = Sink { fp, out, secrets };
    let pairs = headers
        .iter()
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
    scan_headers(pairs, extra, &mut sink);
    let target = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
    scan_target(target.as_bytes(), extra, &mut sink);
    if let Some(a) = uri.authority() {
        if let Some((userinfo, _)) = a.as_str().rsplit_once('@') {
            sink.push(CredentialKind::Userinfo, b"userinfo", userinfo.as_bytes());
        }
    }
}

/// Searches a request head that the HTTP parser refused (a bad header line, a head too large,
/// one never finished): it crossed the wire all the same. Only complete lines are read; a
/// header line is `name: value` leniently (spaces around the name, bytes HTTP forbids).
pub fn detect_raw_head(
    raw: &[u8],
    extra: &ExtraPositions,
    fp: &Fingerprinter,
    out: &mut Vec<Found>,
) {
    detect_raw_head_with_secrets(raw, extra, fp, out, None);
}

/// Like [`detect_raw_head`], with the secrets an exposure response needs (see
/// [`detect_with_secrets`]).
pub fn detect_raw_head_with_secrets(
    raw: &[u8],
    extra: &ExtraPositions,
    fp: &Fingerprinter,
    out: &mut Vec<Found>,
    secrets: Option<(&mut Vec<SecretValue>, bool)>,
) {
    let mut sink = Sink { fp, out, secrets };
    let head = match raw.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => &raw[..end + 2],
        None => raw,
    };
    // The last piece has no line end: a line cut short carries no whole value.
    let complete = match head.iter().rposition(|b| *b == b'\n') {
        Some(i) => &head[..i],
        None => return,
    };
    let mut lines = complete
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    // Clients may send empty lines before the request line.
    let request_line = lines.by_ref().find(|l| !trim(l).is_empty());
    if let Some(line) = request_line {
        let mut words = line.split(|b| *b == b' ').filter(|w| !w.is_empty());
        if let Some(target) = words.nth(1) {
            let target = match target.windows(3).position(|w| w == b"://") {
                // Absolute form: the authority may hold user:password@.
                Some(i) => {
                    let rest = &target[i + 3..];
                    let end = rest.iter().position(|b| *b == b'/' || *b == b'?');
                    let authority = &rest[..end.unwrap_or(rest.len())];
                    if let Some(at) = authority.iter().rposition(|b| *b == b'@') {
                        sink.push(CredentialKind::Userinfo, b"userinfo", &authority[..at]);
                    }
                    end.map_or(&b"/"[..], |e| &rest[e..])
                }
                None => target,
            };
            scan_target(target, extra, &mut sink);
        }
    }
    let pairs = lines.filter_map(|l| {
        let colon = l.iter().position(|b| *b == b':')?;
        Some((trim(&l[..colon]), trim(&l[colon + 1..])))
    });
    scan_headers(pairs, extra, &mut sink);
}

/// Searches the start of a cleartext request body: form fields
/// (`application/x-www-form-urlencoded`) and JSON string members (`application/json`, any
/// `+json` type) whose name is a credential parameter. `body` may be cut anywhere.
pub fn detect_body(
    content_type: &[u8],
    body: &[u8],
    extra: &ExtraPositions,
    fp: &Fingerprinter,
    out: &mut Vec<Found>,
) {
    detect_body_with_secrets(content_type, body, false, extra, fp, out, None);
}

/// Like [`detect_body`], with the secrets an exposure response needs; `cut` says that `body`
/// is only the start of a longer one, so a form's last field may be incomplete.
pub fn detect_body_with_secrets(
    content_type: &[u8],
    body: &[u8],
    cut: bool,
    extra: &ExtraPositions,
    fp: &Fingerprinter,
    out: &mut Vec<Found>,
    secrets: Option<(&mut Vec<SecretValue>, bool)>,
) {
    let mut sink = Sink { fp, out, secrets };
    match body_kind(content_type) {
        Some(BodyKind::Form) => {
            // A field cut off by the bound has no whole value.
            let whole = match body.iter().rposition(|b| *b == b'&') {
                Some(i) if cut => &body[..i],
                None if cut => &[],
                _ => body,
            };
            for (name, value) in form_urlencoded::parse(whole) {
                if is_param(name.as_bytes(), extra) {
                    sink.push(
                        CredentialKind::Body,
                        name.to_ascii_lowercase().as_bytes(),
                        value.as_bytes(),
                    );
                }
            }
        }
        Some(BodyKind::Json) => json_members(body, |name, value| {
            if is_param(name, extra) {
                sink.push(CredentialKind::Body, &name.to_ascii_lowercase(), value);
            }
        }),
        None => {}
    }
}

/// Whether a body of this content type is searched.
pub fn body_is_searched(content_type: &[u8]) -> bool {
    body_kind(content_type).is_some()
}

enum BodyKind {
    Form,
    Json,
}

fn body_kind(content_type: &[u8]) -> Option<BodyKind> {
    let essence = content_type
        .split(|b| *b == b';')
        .next()
        .map(trim)
        .unwrap_or_default()
        .to_ascii_lowercase();
    if essence == b"application/x-www-form-urlencoded" {
        Some(BodyKind::Form)
    } else if essence == b"application/json" || essence.ends_with(b"+json") {
        Some(BodyKind::Json)
    } else {
        None
    }
}

/// Calls `each(name, value)` for every `"name": "value"` member at any depth of a JSON text
/// that may be cut short. Escapes `\"`, `\\` and `\/` are undone; a value with other escapes
/// is passed with them as written. Nothing is allocated unless a string holds an escape.
fn json_members(text: &[u8], mut each: impl FnMut(&[u8], &[u8])) {
    // The last string read and whether a ':' followed it (then it was a member name).
    let mut last: Option<std::borrow::Cow<'_, [u8]>> = None;
    let mut name: Option<std::borrow::Cow<'_, [u8]>> = None;
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'"' => {
                let Some((s, next)) = json_string(text, i + 1) else {
                    return;
                };
                match name.take() {
                    Some(n) => each(&n, &s),
                    None => last = Some(s),
                }
                i = next;
                continue;
            }
            b':' => name = last.take(),
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ => {
                last = None;
                name = None;
            }
        }
        i += 1;
    }
}

/// The JSON string starting after its opening quote at `from`, and the index after its
/// closing quote; `None` if the text ends first.
fn json_string(text: &[u8], from: usize) -> Option<(std::borrow::Cow<'_, [u8]>, usize)> {
    let mut i = from;
    let mut escaped = false;
    while i < text.len() {
        match text[i] {
            b'\\' => {
                escaped = true;
                i += 2;
                continue;
            }
            b'"' => {
                let raw = &text[from..i];
                if !escaped {
                    return Some((std::borrow::Cow::Borrowed(raw), i + 1));
                }
                let mut out = Vec::with_capacity(raw.len());
                let mut j = 0;
                while j < raw.len() {
                    if raw[j] == b'\\' && j + 1 < raw.len() && b"\"\\/".contains(&raw[j + 1]) {
                        out.push(raw[j + 1]);
                        j += 2;
                    } else {
                        out.push(raw[j]);
                        j += 1;
                    }
                }
                return Some((std::borrow::Cow::Owned(out), i + 1));
            }
            _ => i += 1,
        }
    }
    None
}

/// Where found credentials go: fingerprinted at once, and the secrets kept only if asked.
struct Sink<'a> {
    fp: &'a Fingerprinter,
    out: &'a mut Vec<Found>,
    secrets: Option<(&'a mut Vec<SecretValue>, bool)>,
}

impl Sink<'_> {
    fn push(&mut self, kind: CredentialKind, name: &[u8], value: &[u8]) {
        if self.out.len() >= MAX_PER_REQUEST || value.is_empty() {
            return;
        }
        self.out.push(Found {
            kind,
            name: PositionName::new(name),
            fingerprint: self.fp.fingerprint(value),
        });
        if let Some((v, keep_raw)) = self.secrets.as_mut() {
            let mut sha256 = [0u8; 32];
            sha256.copy_from_slice(digest::digest(&digest::SHA256, value).as_ref());
            v.push(SecretValue {
                sha256,
                raw: keep_raw.then(|| String::from_utf8_lossy(value).into_owned()),
            });
        }
    }
}

fn is_param(name: &[u8], extra: &ExtraPositions) -> bool {
    KEY_PARAMS
        .iter()
        .any(|p| p.as_bytes().eq_ignore_ascii_case(name))
        || extra
            .params
            .iter()
            .any(|p| p.as_bytes().eq_ignore_ascii_case(name))
}

/// Whether a cookie of this name is a credential (see [`CREDENTIAL_COOKIES`]).
pub fn cookie_is_credential(name: &[u8], extra: &ExtraPositions) -> bool {
    let lower = name.to_ascii_lowercase();
    CREDENTIAL_COOKIES.iter().any(|c| c.as_bytes() == lower)
        || CREDENTIAL_COOKIE_PARTS
            .iter()
            .any(|p| lower.windows(p.len()).any(|w| w == p.as_bytes()))
        || extra.cookies.iter().any(|c| c.as_bytes() == lower)
}

/// Searches header pairs (names in any case).
fn scan_headers<'h>(
    pairs: impl Iterator<Item = (&'h [u8], &'h [u8])>,
    extra: &ExtraPositions,
    sink: &mut Sink<'_>,
) {
    for (name, v) in pairs {
        let is = |h: &HeaderName| name.eq_ignore_ascii_case(h.as_str().as_bytes());
        let kind = if is(&AUTHORIZATION) {
            Some(CredentialKind::Authorization)
        } else if is(&PROXY_AUTHORIZATION) {
            Some(CredentialKind::ProxyAuthorization)
        } else {
            None
        };
        if let Some(kind) = kind {
            // `Scheme credentials`: the scheme names the position, the rest is the secret.
            match v.iter().position(|b| *b == b' ') {
                Some(i) => sink.push(kind, &v[..i], trim(&v[i + 1..])),
                None => sink.push(kind, b"?", v),
            }
        } else if is(&COOKIE) {
            for pair in v.split(|b| *b == b';') {
                let pair = trim(pair);
                if let Some(i) = pair.iter().position(|b| *b == b'=') {
                    let cookie = trim(&pair[..i]);
                    if cookie_is_credential(cookie, extra) {
                        sink.push(CredentialKind::Cookie, cookie, trim(&pair[i + 1..]));
                    }
                }
            }
        } else if let Some(h) = KEY_HEADERS
            .iter()
            .find(|h| h.as_bytes().eq_ignore_ascii_case(name))
        {
            sink.push(CredentialKind::Header, h.as_bytes(), v);
        } else if let Some(h) = extra.headers.iter().find(|h| is(h)) {
            sink.push(CredentialKind::Header, h.as_str().as_bytes(), v);
        }
    }
}

/// Searches a request target in origin form (`/path?query`): the site's path patterns, then
/// query parameters separated by `&` or `;`.
fn scan_target(target: &[u8], extra: &ExtraPositions, sink: &mut Sink<'_>) {
    let (path, query) = match target.iter().position(|b| *b == b'?') {
        Some(i) => (&target[..i], Some(&target[i + 1..])),
        None => (target, None),
    };
    for pattern in &extra.paths {
        if pattern.captures(path, |name, value| {
            sink.push(CredentialKind::Path, name.as_str().as_bytes(), value)
        }) {
            break;
        }
    }
    let Some(query) = query else { return };
    let query = query.split(|b| *b == b'#').next().unwrap_or_default();
    for piece in query.split(|b| *b == b';') {
        for (name, value) in form_urlencoded::parse(piece) {
            if is_param(name.as_bytes(), extra) {
                sink.push(
                    CredentialKind::Query,
                    name.to_ascii_lowercase().as_bytes(),
                    value.as_bytes(),
                );
            }
        }
    }
}

/// Whether any of the site's path patterns matches `path`: its template must then hide the
/// token (analytics keeps path templates).
pub fn path_has_token(path: &str, extra: &ExtraPositions) -> bool {
    extra
        .paths
        .iter()
        .any(|p| p.captures(path.as_bytes(), |_, _| {}))
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
            cookies: vec!["prefs_v2".into()],
            paths: vec![PathPattern::parse("/bot{token}/").expect("pattern")],
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
                (
                    "cookie",
                    "session=abc; theme=dark; prefs_v2=x; laravel_session=y",
                ),
                ("x-api-key", "k1"),
                ("private-token", "k2"),
                ("x-custom-secret", "k3"),
                ("x-unrelated", "nothing"),
            ],
            "http://user:pw@h.example/p?api_key=1&Token=2;mykey=3&page=4",
        );
        let want = [
            (CredentialKind::Authorization, "Bearer"),
            (CredentialKind::ProxyAuthorization, "Basic"),
            (CredentialKind::Cookie, "session"),
            (CredentialKind::Cookie, "prefs_v2"),
            (CredentialKind::Cookie, "laravel_session"),
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
    fn harmless_cookies_are_not_credentials() {
        let got = found(&[("cookie", "theme=dark; lang=en; _ga=GA1.2.3")], "/");
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn path_patterns_capture_tokens() {
        let got = found(&[], "/bot123456:AAE-xyz/sendMessage?chat=1");
        assert_eq!(got, [(CredentialKind::Path, "token".to_owned())]);
        assert!(found(&[], "/bot/sendMessage").is_empty(), "empty token");
        assert!(found(&[], "/api/bot1/").is_empty(), "anchored at the start");
        let p = PathPattern::parse("/v1/{key}.json").expect("pattern");
        let mut seen = Vec::new();
        assert!(p.captures(b"/v1/abc.json", |n, v| seen
            .push((n.as_str().to_owned(), v.to_vec()))));
        assert_eq!(seen, [("key".to_owned(), b"abc".to_vec())]);
        for bad in ["bot{token}", "/bot", "/a{}/", "/{a}{b}/", "/a}b{c}", "/a{b"] {
            assert!(PathPattern::parse(bad).is_err(), "{bad}");
        }
    }

    fn raw(head: &[u8]) -> Vec<(CredentialKind, String)> {
        let mut out = Vec::new();
        detect_raw_head(
            head,
            &ExtraPositions::default(),
            &Fingerprinter::ephemeral(),
            &mut out,
        );
        out.iter()
            .map(|f| (f.kind, f.name.as_str().to_owned()))
            .collect()
    }

    #[test]
    fn raw_heads_are_searched_leniently() {
        let head = b"GET /x?token=t HTTP/1.1\r\nHost: a\r\nX-API-Key : k\r\nBad\x01Line\r\nAuthorization: Bearer b\r\nX-Auth-Token: cut-sh";
        assert_eq!(
            raw(head),
            [
                (CredentialKind::Query, "token".to_owned()),
                (CredentialKind::Header, "x-api-key".to_owned()),
                (CredentialKind::Authorization, "Bearer".to_owned()),
            ],
            "the unfinished last line is not a whole value"
        );
        assert_eq!(
            raw(b"GET http://u:p@h/ HTTP/1.1\r\n\r\nX-API-Key: after-the-head\r\n"),
            [(CredentialKind::Userinfo, "userinfo".to_owned())]
        );
        assert!(raw(b"").is_empty());
        assert!(raw(b"\n\n\n").is_empty());
    }

    /// One key for the whole test binary, so fingerprints compare across calls.
    fn test_fp() -> &'static Fingerprinter {
        static FP: std::sync::OnceLock<Fingerprinter> = std::sync::OnceLock::new();
        FP.get_or_init(Fingerprinter::ephemeral)
    }

    fn body(ct: &str, b: &str, cut: bool) -> Vec<(CredentialKind, String, Fingerprint)> {
        let fp = test_fp();
        let mut out = Vec::new();
        let extra = ExtraPositions::default();
        detect_body_with_secrets(ct.as_bytes(), b.as_bytes(), cut, &extra, fp, &mut out, None);
        out.iter()
            .map(|f| (f.kind, f.name.as_str().to_owned(), f.fingerprint))
            .collect()
    }

    #[test]
    fn form_and_json_bodies_are_searched() {
        let names = |v: Vec<(CredentialKind, String, Fingerprint)>| {
            v.into_iter().map(|(k, n, _)| (k, n)).collect::<Vec<_>>()
        };
        let form = "application/x-www-form-urlencoded; charset=utf-8";
        assert_eq!(
            names(body(form, "user=a&password=hunter2&remember=1", false)),
            [(CredentialKind::Body, "password".to_owned())]
        );
        assert!(
            body(form, "user=a&password=hunt", true).is_empty(),
            "a field cut by the bound is no whole value"
        );
        let json = r#"{"user": "a", "auth": {"client_secret" : "s\"x", "n": 1}, "apiKey":"k", "list": ["token", "x"]}"#;
        let got = body("application/json", json, false);
        assert_eq!(
            names(got.clone()),
            [
                (CredentialKind::Body, "client_secret".to_owned()),
                (CredentialKind::Body, "apikey".to_owned()),
            ],
            "array strings are not members"
        );
        assert_eq!(
            got[0].2,
            test_fp().fingerprint(br#"s"x"#),
            "escapes are undone"
        );
        assert_eq!(
            names(body("application/vnd.api+json", r#"{"token":"t"#, true)),
            [],
            "an unterminated string is no whole value"
        );
        assert!(body("text/plain", "password=x", false).is_empty());
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
        let many: Vec<String> = (0..100).map(|i| format!("session{i}=v")).collect();
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
