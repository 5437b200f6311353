//! One request: find the site from SNI and Host on the connection's pool, then proxy it (TLS,
//! or cleartext in `allow` mode) or answer with the site's cleartext mode.
//!
//! Every answer built here comes from the configured site, never from an unchecked Host
//! header, and the reject answer is the same bytes whatever the request carried.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, LOCATION, STRICT_TRANSPORT_SECURITY};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use super::proxy::{forward, ClientAddr};
use super::snapshot::SiteRuntime;
use super::Shared;
use crate::config::{CleartextMode, HostPattern, ListenerKind};

/// Bodies the edge sends: the origin's, streamed, or a short one of its own.
pub(crate) type Body = Either<Incoming, Full<Bytes>>;

/// The 403 body of `reject` mode. It names no credential and echoes nothing.
pub const REJECT_BODY: &str =
    "403 Forbidden: this service is HTTPS-only and does not accept plain HTTP.\n\
Any credential (API key, token, password, cookie) sent with this request crossed the network \
unencrypted: consider it exposed, and revoke or rotate it. Use https:// instead.\n";

/// What a connection knows about itself, fixed at accept time.
pub(crate) struct ConnInfo {
    /// The edge, reached through the connection so a request clones no edge-wide Arc.
    pub(crate) shared: Arc<Shared>,
    pub(crate) key: (SocketAddr, ListenerKind),
    /// The client's address as forwarding headers write it.
    pub(crate) client: ClientAddr,
    /// The pool the listener belonged to at accept time, used if a reload removes it.
    pub(crate) pool: String,
    /// Lowercase SNI of a TLS connection.
    pub(crate) sni: Option<String>,
}

pub(crate) async fn handle(
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if req.method() == Method::CONNECT {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "405 Method Not Allowed: this edge is not a forward proxy.\n",
        ));
    }
    let snap = conn.shared.snapshot.load_full();
    let Some(host) = request_host(&req) else {
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: the request names no host.\n",
        ));
    };
    let site_idx = snap
        .pool_for(&conn.key, &conn.pool)
        .and_then(|p| p.find(&host));
    let site = match site_idx.and_then(|i| snap.sites.get(i)) {
        Some(s) => s,
        None => return Ok(misdirected()),
    };
    let edge = &snap.config.edge;
    match &conn.sni {
        Some(sni) => {
            if !site.host.matches(sni) {
                return Ok(misdirected());
            }
            let mut resp = forward(&site.origin, req, &conn.client, "https", edge).await;
            if let Some(v) = &site.hsts {
                resp.headers_mut()
                    .insert(STRICT_TRANSPORT_SECURITY, v.clone());
            }
            Ok(resp)
        }
        None => Ok(match site.mode {
            CleartextMode::Redirect => redirect(site, &host, &req),
            CleartextMode::Allow => forward(&site.origin, req, &conn.client, "http", edge).await,
            // `closed` cannot be reached on a cleartext port (validation forbids it); should it
            // ever be, refusing is the only safe answer.
            CleartextMode::Reject | CleartextMode::Closed => reject(),
        }),
    }
}

/// The request's hostname, lowercase, without port: from the URI authority (HTTP/2
/// `:authority`, absolute-form HTTP/1.1) or else the Host header.
fn request_host(req: &Request<Incoming>) -> Option<Cow<'_, str>> {
    let raw = match req.uri().authority() {
        Some(a) => a.host(),
        None => {
            let h = req.headers().get(HOST)?.to_str().ok()?;
            strip_port(h)
        }
    };
    let host = raw.trim_end_matches('.');
    if host.is_empty() {
        return None;
    }
    Some(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

fn strip_port(h: &str) -> &str {
    match h.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => h,
    }
}

fn redirect(site: &SiteRuntime, host: &str, req: &Request<Incoming>) -> Response<Body> {
    // The target host comes from the configured site; a wildcard site uses the request's
    // host only because it has just been matched against the wildcard.
    let target_host = match &site.host {
        HostPattern::Exact(h) => h.as_str(),
        HostPattern::Wildcard(_) => host,
    };
    let path = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .filter(|p| p.starts_with('/'))
        .unwrap_or("/");
    let location = if site.redirect_port == 443 {
        format!("https://{target_host}{path}")
    } else {
        format!("https://{target_host}:{}{path}", site.redirect_port)
    };
    let Ok(value) = HeaderValue::from_str(&location) else {
        return text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: unusable request target.\n",
        );
    };
    let status = if req.method() == Method::GET || req.method() == Method::HEAD {
        StatusCode::MOVED_PERMANENTLY
    } else {
        StatusCode::PERMANENT_REDIRECT
    };
    let mut resp = text(status, "This service is HTTPS-only; see Location.\n");
    resp.headers_mut().insert(LOCATION, value);
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn reject() -> Response<Body> {
    let mut resp = text(StatusCode::FORBIDDEN, REJECT_BODY);
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn misdirected() -> Response<Body> {
    text(
        StatusCode::MISDIRECTED_REQUEST,
        "421 Misdirected Request: no site by that name is served on this address and connection.\n",
    )
}

/// A short plain-text answer of the edge's own.
pub(crate) fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
