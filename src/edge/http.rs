//! One request: find the site from SNI and Host on the connection's pool, then proxy it (TLS,
//! or cleartext in `allow` mode) or answer with the site's cleartext mode.
//!
//! Every answer built here comes from the configured site, never from an unchecked Host
//! header, and the reject answer is the same bytes whatever the request carried.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, LOCATION, STRICT_TRANSPORT_SECURITY};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use super::proxy::{forward, ClientAddr};
use super::snapshot::SiteRuntime;
use super::Shared;
use crate::analytics::aggregate::{Observation, SiteId};
use crate::analytics::observe::{self, ClientFamily, Network, Outcome, Scheme, TlsVersion};
use crate::analytics::{self, Analytics, RequestMeta};
use crate::config::{CleartextMode, HostPattern, ListenerKind};
use crate::exposure::{self, ExtraPositions, Found};
use crate::stages::Stage;

/// Bodies the edge sends: the origin's, streamed, or a short one of its own.
pub(crate) type Body = Either<super::proxy::OriginBody, Full<Bytes>>;

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
    /// Negotiated TLS version (`None` for cleartext).
    pub(crate) tls: TlsVersion,
    /// The client's network, for analytics.
    pub(crate) network: Network,
    /// The family of the connection's User-Agent: clients rarely change agent mid-connection.
    pub(crate) agent: FirstSeen<Vec<u8>, ClientFamily>,
}

impl ConnInfo {
    fn client_family(&self, ua: Option<&[u8]>) -> ClientFamily {
        match ua {
            Some(ua) => self.agent.get(ua, |ua| ClientFamily::classify(Some(ua))),
            None => ClientFamily::None,
        }
    }
}

/// A value worked out from a connection's first request and reused for later requests that
/// bring the same key (nearly all do); any other key gets it worked out afresh.
pub(crate) struct FirstSeen<K, V>(OnceLock<(K, V)>);

impl<K, V> Default for FirstSeen<K, V> {
    fn default() -> Self {
        FirstSeen(OnceLock::new())
    }
}

impl<K, V: Clone> FirstSeen<K, V> {
    pub(crate) fn get<Q>(&self, key: &Q, make: impl FnOnce(&Q) -> V) -> V
    where
        Q: PartialEq + ToOwned<Owned = K> + ?Sized,
        K: std::borrow::Borrow<Q>,
    {
        if let Some((k, v)) = self.0.get() {
            if k.borrow() == key {
                return v.clone();
            }
        }
        let v = make(key);
        let _ = self.0.set((key.to_owned(), v.clone()));
        v
    }
}

pub(crate) async fn handle(
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let Some(analytics) = conn.shared.analytics.as_deref() else {
        return Ok(route(&conn, req, None).await.0);
    };
    let meta = RequestMeta::with_classifier(&req, |ua| conn.client_family(ua));
    let method = req.method().clone();
    let mut found = Vec::new();
    let (resp, site, respond) = route(&conn, req, Some((analytics, &mut found))).await;
    let scheme = if conn.sni.is_some() {
        Scheme::Tls
    } else {
        Scheme::Cleartext
    };
    let obs = Observation {
        at: analytics::now(),
        site,
        outcome: Outcome::Response,
        scheme,
        port: conn.key.0.port(),
        tls: conn.tls,
        http: meta.http,
        status_class: observe::status_class(resp.status().as_u16()),
        family: meta.family,
        network: conn.network,
        path: Some(meta.path),
    };
    if found.is_empty() {
        analytics.record(&obs);
    } else {
        analytics.record_with_exposures(&obs, &found, meta.path);
        if let (Some((host, policy, secrets)), Some(r)) = (respond, conn.shared.responder.get()) {
            r.offer(
                &host,
                &policy,
                &found,
                secrets,
                obs.network,
                obs.family,
                meta.path,
                obs.at,
            );
        }
    }
    if let Some(log) = analytics.access_log() {
        log.write(access_line(
            analytics,
            &obs,
            &method,
            resp.status().as_u16(),
            &found,
        ));
    }
    Ok(resp)
}

/// One access log line: only what analytics keeps, credentials as fingerprints.
fn access_line(
    a: &Analytics,
    o: &Observation,
    method: &Method,
    status: u16,
    found: &[Found],
) -> String {
    let method = match *method {
        Method::GET
        | Method::HEAD
        | Method::POST
        | Method::PUT
        | Method::DELETE
        | Method::PATCH
        | Method::OPTIONS => method.as_str(),
        _ => "OTHER",
    };
    let credentials: Vec<_> = found
        .iter()
        .map(|f| serde_json::json!({"kind": f.kind.as_str(), "name": f.name.as_str(), "fingerprint": f.fingerprint.to_string()}))
        .collect();
    serde_json::json!({
        "ts": o.at,
        "site": a.site_name(o.site),
        "scheme": o.scheme.as_str(),
        "port": o.port,
        "tls": o.tls.as_str(),
        "http": o.http.as_str(),
        "method": method,
        "path": o.path.map(|p| p.as_str().to_owned()),
        "status": status,
        "family": o.family.as_str(),
        "network": o.network.to_string(),
        "credentials": credentials,
    })
    .to_string()
}

/// What the exposure response needs from a request: the site, its policy, and the
/// credentials' SHA-256 (and raw value, if the policy asks for it), in memory only.
type Respond = Option<(
    String,
    Arc<crate::config::ExposureResponse>,
    Vec<crate::exposure::SecretValue>,
)>;

/// Routes a request and answers it. With analytics, credentials in a cleartext request are
/// fingerprinted into `found` before anything else happens to the request.
async fn route(
    conn: &ConnInfo,
    req: Request<Incoming>,
    analytics: Option<(&Analytics, &mut Vec<Found>)>,
) -> (Response<Body>, SiteId, Respond) {
    let snap = conn.shared.snapshot.load_full();
    let routes = snap.pool_for(&conn.key, &conn.pool);
    let host = request_host(&req);
    let has_host = host.is_some();
    let site_idx = host.and_then(|host| routes?.find(&host));
    let site = site_idx.and_then(|i| snap.sites.get(i));
    let mut respond: Respond = None;
    if let (Some((a, found)), None) = (analytics, &conn.sni) {
        let extra = site.map(|s| &s.exposure);
        let default = ExtraPositions::default();
        let policy = site.and_then(|s| s.response.clone());
        let mut secrets = Vec::new();
        let want = policy.as_ref().map(|p| (&mut secrets, p.include_raw));
        exposure::detect_with_secrets(
            req.headers(),
            req.uri(),
            extra.unwrap_or(&default),
            a.fingerprinter(),
            found,
            want,
        );
        if let (Some(p), Some(s)) = (policy, site) {
            if !found.is_empty() {
                respond = Some((s.name.clone(), p, secrets));
            }
        }
    }
    if req.method() == Method::CONNECT {
        return (
            text(
                StatusCode::METHOD_NOT_ALLOWED,
                "405 Method Not Allowed: this edge is not a forward proxy.\n",
            ),
            0,
            None,
        );
    }
    if !has_host {
        return (
            text(
                StatusCode::BAD_REQUEST,
                "400 Bad Request: the request names no host.\n",
            ),
            0,
            None,
        );
    }
    let Some(site) = site else {
        return (misdirected(), 0, respond);
    };
    let edge = &snap.config.edge;
    let resp = match &conn.sni {
        Some(sni) => {
            if !site.host.matches(sni) {
                return (misdirected(), 0, None);
            }
            let mut resp = forward(&site.origin, req, &conn.client, "https", edge).await;
            if let Some(v) = &site.hsts {
                resp.headers_mut()
                    .insert(STRICT_TRANSPORT_SECURITY, v.clone());
            }
            resp
        }
        None => {
            let plans = conn.shared.stages.load();
            let plan = plans.get(&site.name);
            let mut mode =
                site.mode_on(routes.map_or(site.pool, |r| r.index), crate::stages::now());
            let now = crate::stages::now();
            if plan.is_some_and(|p| {
                p.stage >= Stage::Brownout && p.brownout.is_some_and(|b| b.active(now))
            }) {
                mode = CleartextMode::Reject;
            }
            let mut resp = match mode {
                CleartextMode::Redirect => {
                    let host = request_host(&req).unwrap_or(Cow::Borrowed(""));
                    redirect(site, &host, &req)
                }
                CleartextMode::Allow => {
                    forward(&site.origin, req, &conn.client, "http", edge).await
                }
                // `closed` cannot be reached on a cleartext port (validation forbids it); should
                // it ever be, refusing is the only safe answer.
                CleartextMode::Reject | CleartextMode::Closed => reject(),
            };
            // Warn: redirect and allow answers say cleartext is going away, and when.
            if let (Some(p), CleartextMode::Redirect | CleartextMode::Allow) = (plan, mode) {
                for (name, value) in crate::stages::warn_headers(p) {
                    if let Ok(v) = HeaderValue::from_str(&value) {
                        resp.headers_mut().append(name, v);
                    }
                }
            }
            resp
        }
    };
    (resp, site.id, respond)
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
