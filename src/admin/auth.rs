//! Who may use the admin plane: the admin token (created once, kept only as its SHA-256, mode
//! 0600), the optional read-only token, dashboard sessions, and the limit on failed attempts
//! per client address. Every route but `/healthz` and the login form passes [`check`].
//! Comparisons are constant-time; no token or session id ever reaches a log line.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::digest;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{AdminError, Ctx, Peer, Role};

/// Failed authentications allowed per client address and window before 429.
const MAX_FAILURES: u32 = 5;
/// The rate limiter's window.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// How long a dashboard session lasts.
pub(crate) const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
pub(crate) const COOKIE: &str = "portcullis_session";

/// A logged-in dashboard session.
#[derive(Clone)]
pub(crate) struct Session {
    pub(crate) role: Role,
    /// Must come back with every form that changes something.
    pub(crate) csrf: String,
    pub(crate) expires: tokio::time::Instant,
}

/// The session id from the Cookie header, if any.
pub(crate) fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(&format!("{COOKIE}="))
                .map(str::to_owned)
        })
}

impl Ctx {
    /// The role of a presented token, comparing digests in constant time.
    pub(super) fn role(&self, presented: &str) -> Option<Role> {
        let d = digest::digest(&digest::SHA256, presented.as_bytes());
        let is =
            |h: &[u8; 32]| aws_lc_rs::constant_time::verify_slices_are_equal(d.as_ref(), h).is_ok();
        if is(&self.token) {
            Some(Role::Admin)
        } else if self.read_only.as_ref().is_some_and(is) {
            Some(Role::ReadOnly)
        } else {
            None
        }
    }

    /// Seconds to wait before trying again, if `ip` has failed too often.
    pub(super) fn limited(&self, ip: IpAddr) -> Option<u64> {
        let map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let (n, since) = map.get(&ip)?;
        let left = FAILURE_WINDOW.checked_sub(since.elapsed())?;
        (*n >= MAX_FAILURES).then(|| left.as_secs().max(1))
    }

    pub(super) fn failed(&self, ip: IpAddr) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let e = map.entry(ip).or_insert((0, tokio::time::Instant::now()));
        if e.1.elapsed() >= FAILURE_WINDOW {
            *e = (0, tokio::time::Instant::now());
        }
        e.0 += 1;
        // Bounded: forget stale entries once the map grows.
        if map.len() > 10_000 {
            map.retain(|_, (_, t)| t.elapsed() < FAILURE_WINDOW);
        }
    }
}

/// The token file in a state directory.
pub fn token_path(state_dir: &Path) -> PathBuf {
    state_dir.join("admin-token.sha256")
}

/// Loads the admin token's digest, or creates a token: returns the new token (to show once).
pub(super) fn token(state_dir: &Path) -> Result<([u8; 32], Option<String>), AdminError> {
    let path = token_path(state_dir);
    let fail = |reason: String| AdminError::Token {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::read_to_string(&path) {
        Ok(hex) => Ok((
            parse_hex32(hex.trim()).ok_or_else(|| fail("not a SHA-256 in hex".into()))?,
            None,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut raw = [0u8; 24];
            aws_lc_rs::rand::fill(&mut raw).map_err(|_| fail("no system randomness".into()))?;
            let token = format!("pct_{}", crate::hex::encode(&raw));
            let d = digest::digest(&digest::SHA256, token.as_bytes());
            let hex = crate::hex::encode(d.as_ref());
            std::fs::create_dir_all(state_dir).map_err(|e| fail(e.to_string()))?;
            crate::tls::write_private(&path, format!("{hex}\n").as_bytes())
                .map_err(|e| fail(e.to_string()))?;
            let mut h = [0u8; 32];
            h.copy_from_slice(d.as_ref());
            Ok((h, Some(token)))
        }
        Err(e) => Err(fail(e.to_string())),
    }
}

/// The SHA-256 of a token, in hex, for `read_only_token_sha256`.
pub fn hash_token(token: &str) -> String {
    crate::hex::encode(digest::digest(&digest::SHA256, token.trim().as_bytes()).as_ref())
}

pub(super) fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    crate::hex::decode::<32>(s)
}

/// Bearer-token (or dashboard session) check for every route but `/healthz` and the login
/// form; read-only tokens may only read; sessions change things only through the dashboard's
/// CSRF-protected forms.
pub(crate) async fn check(State(ctx): State<Arc<Ctx>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    if path == "/healthz" || path == "/login" {
        return next.run(req).await;
    }
    if let Some(session) = session_id(req.headers()).and_then(|id| {
        let sessions = ctx.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .get(&id)
            .filter(|s| s.expires > tokio::time::Instant::now())
            .cloned()
    }) {
        let reading = matches!(*req.method(), Method::GET | Method::HEAD);
        if !reading && path.starts_with("/api/") {
            return error(
                StatusCode::FORBIDDEN,
                "API changes need the bearer token; the dashboard uses its forms",
            );
        }
        req.extensions_mut().insert(session.role);
        req.extensions_mut().insert(session);
        return next.run(req).await;
    }
    let is_page = path == "/" || path.starts_with("/ui/");
    if is_page && req.headers().get(header::AUTHORIZATION).is_none() {
        return axum::response::Redirect::to("/login").into_response();
    }
    let ip = req
        .extensions()
        .get::<Peer>()
        .map(|p| p.0)
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    if let Some(wait) = ctx.limited(ip) {
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed attempts; try again later",
        );
        if let Ok(v) = HeaderValue::from_str(&wait.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(role) = presented.and_then(|t| ctx.role(t)) else {
        ctx.failed(ip);
        let mut r = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    };
    if role == Role::ReadOnly && !matches!(*req.method(), Method::GET | Method::HEAD) {
        return error(StatusCode::FORBIDDEN, "this token is read-only");
    }
    req.extensions_mut().insert(role);
    next.run(req).await
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}
