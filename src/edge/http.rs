//! One request: find the site from SNI and Host on the connection's pool, then proxy it (TLS,
//! or cleartext in `allow` mode) or answer with the site's cleartext mode.
//!
//! Every answer built here comes from the configured site, never from an unchecked Host
//! header, and the reject answer is the same bytes whatever the request carried.

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{ALT_SVC, CONNECTION, CONTENT_TYPE, HOST, LOCATION, STRICT_TRANSPORT_SECURITY};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Either;

use super::conn::{ConnInfo, InFlight};
use super::host::{self, BadHost, RequestHost};
use super::proxy::{forward, text, Body, ClientBody};
use super::snapshot::SiteRuntime;
use crate::analytics::aggregate::{Observation, SiteId};
use crate::analytics::{Analytics, RequestMeta};
use crate::config::{CleartextMode, HostPattern};
use crate::exposure::{self, ExtraPositions, Found};
use crate::observe::{self, HttpVersion, Outcome, Scheme};
use crate::stages::Stage;

/// The 403 body of `reject` mode. It names no credential and echoes nothing.
pub const REJECT_BODY: &str =
    "403 Forbidden: this service is HTTPS-only and does not accept plain HTTP.\n\
Any credential (API key, token, password, cookie) sent with this request crossed the network \
unencrypted: consider it exposed, and revoke or rotate it. Use https:// instead.\n";

pub(crate) async fn handle(
    conn: Arc<ConnInfo>,
    req: Request<ClientBody>,
) -> Result<Response<Body>, Infallible> {
    conn.request_started();
    let mut resp = answer(&conn, req).await;
    // Only a cleartext connection's capture cares whether another request follows.
    let keep_alive = conn.capture.is_some()
        && resp.headers().get(CONNECTION) != Some(&HeaderValue::from_static("close"));
    match resp.body_mut() {
        Either::Left(body) => body.hold(InFlight { conn, keep_alive }),
        Either::Right(_) => conn.request_done(keep_alive),
    }
    Ok(resp)
}

async fn answer(conn: &ConnInfo, req: Request<ClientBody>) -> Response<Body> {
    let Some(analytics) = conn.shared.analytics.as_deref() else {
        return route(conn, req, None).await.response;
    };
    let mut meta = RequestMeta::with_classifier(&req, |ua| conn.client_family(ua));
    let method = req.method().clone();
    let mut found = Vec::new();
    let routed = route(conn, req, Some((analytics, &mut found))).await;
    let resp = routed.response;
    if routed.token_in_path {
        // The path carries a credential: analytics keeps no part of it.
        meta.path = observe::PathTemplate::of("/:id");
    }
    let scheme = match (&conn.sni, meta.http) {
        (Some(_), HttpVersion::Http3) => Scheme::H3,
        (Some(_), _) => Scheme::Tls,
        (None, _) => Scheme::Cleartext,
    };
    let obs = Observation {
        at: crate::clock::now(),
        site: routed.site,
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
        if let (Some((host, policy, secrets)), Some(r)) =
            (routed.respond, conn.shared.responder.as_ref())
        {
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
    resp
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

/// A cleartext request's detection state: where fingerprints go, the site's exposure
/// response, and the secrets it needs.
type Detect<'a> = (
    &'a Analytics,
    &'a mut Vec<Found>,
    Option<Arc<crate::config::ExposureResponse>>,
    Vec<crate::exposure::SecretValue>,
);

/// What [`route`] did with a request.
struct Routed {
    response: Response<Body>,
    site: SiteId,
    respond: Respond,
    /// One of the site's `exposure_paths` matched the request's path.
    token_in_path: bool,
}

/// Routes a request and answers it. With analytics, credentials in a cleartext request are
/// fingerprinted into `found` before anything else happens to the request: its head first,
/// then the start of a form or JSON body.
async fn route(
    conn: &ConnInfo,
    req: Request<ClientBody>,
    analytics: Option<(&Analytics, &mut Vec<Found>)>,
) -> Routed {
    let snap = conn.shared.snapshot.load_full();
    let routes = snap.pool_for(&conn.key, &conn.pool);
    let host = request_host(&req);
    // A Host that cannot be a host matches no site: 421 as for an unknown name, not 400.
    let has_host = host != Err(BadHost::Missing);
    let site_idx = host.ok().and_then(|host| routes?.find(host.as_str()));
    let site = site_idx.and_then(|i| snap.sites.get(i));
    let default = ExtraPositions::default();
    let extra = site.map_or(&default, |s| &s.exposure);
    let token_in_path =
        !extra.paths.is_empty() && exposure::path_has_token(req.uri().path(), extra);
    let mut detect = match (analytics, &conn.sni) {
        (Some((a, found)), None) => {
            let policy = site.and_then(|s| s.response.clone());
            let mut secrets = Vec::new();
            let want = policy.as_ref().map(|p| (&mut secrets, p.include_raw));
            exposure::detect_with_secrets(
                req.headers(),
                req.uri(),
                extra,
                a.fingerprinter(),
                found,
                want,
            );
            Some((a, found, policy, secrets))
        }
        _ => None,
    };
    let done = |response, site: Option<&SiteRuntime>, detect: Option<Detect<'_>>| Routed {
        response,
        site: site.map_or(0, |s| s.id),
        respond: match (detect, site) {
            (Some((_, found, Some(p), secrets)), Some(s)) if !found.is_empty() => {
                Some((s.name.clone(), p, secrets))
            }
            _ => None,
        },
        token_in_path,
    };
    if req.method() == Method::CONNECT {
        let resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "405 Method Not Allowed: this edge is not a forward proxy.\n",
        );
        return done(resp, None, None);
    }
    if !has_host {
        let resp = text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: the request names no host.\n",
        );
        return done(resp, None, None);
    }
    let Some(site) = site else {
        return done(misdirected(), None, None);
    };
    let edge = &snap.config.edge;
    let resp = match &conn.sni {
        Some(sni) => {
            if !site.host.matches(sni) {
                return done(misdirected(), None, None);
            }
            let mut resp = forward(&site.origin, req, &conn.client, "https", edge).await;
            let headers = resp.headers_mut();
            if let Some(v) = &site.hsts {
                headers.insert(STRICT_TRANSPORT_SECURITY, v.clone());
            }
            if let (true, Some(v)) = (site.http3, &conn.alt_svc) {
                headers.insert(ALT_SVC, v.clone());
            }
            for (name, value) in &site.response_headers {
                headers.insert(name.clone(), value.clone());
            }
            resp
        }
        None => {
            let plans = conn.shared.stages.load();
            let plan = plans.get(&site.name);
            let mut mode = site.mode_on(routes.map_or(site.pool, |r| r.index), crate::clock::now());
            let now = crate::clock::now();
            if plan.is_some_and(|p| {
                p.stage >= Stage::Brownout && p.brownout.is_some_and(|b| b.active(now))
            }) {
                mode = CleartextMode::Reject;
            }
            let scan = snap.config.exposure.scan_body_bytes;
            let (req, body) = match &mut detect {
                Some((a, found, policy, secrets)) if scan > 0 && body_is_sent(&req) => {
                    let ct = req
                        .headers()
                        .get(CONTENT_TYPE)
                        .map(|v| v.as_bytes().to_vec());
                    let (parts, body) = req.into_parts();
                    let (prefix, ended, body) =
                        body.read_prefix(scan, edge.header_read_timeout).await;
                    let want = policy.as_ref().map(|p| (&mut *secrets, p.include_raw));
                    exposure::detect_body_with_secrets(
                        ct.as_deref().unwrap_or_default(),
                        &prefix,
                        !ended,
                        extra,
                        a.fingerprinter(),
                        found,
                        want,
                    );
                    (Request::from_parts(parts, ()), body)
                }
                _ => {
                    let (parts, body) = req.into_parts();
                    (Request::from_parts(parts, ()), body)
                }
            };
            let mut resp = match mode {
                CleartextMode::Redirect => {
                    let host = request_host(&req);
                    redirect(site, host.as_ref().map_or("", RequestHost::as_str), &req)
                }
                CleartextMode::Allow => {
                    let req = req.map(|()| body);
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
    done(resp, Some(site), detect)
}

/// Whether the client has sent, or is sending, a body worth searching: a form or JSON type,
/// and no `Expect: 100-continue` (such a client waits for our go-ahead before sending it, and
/// reading the body would give it; its credentials have not crossed the wire yet).
fn body_is_sent<B: hyper::body::Body>(req: &Request<B>) -> bool {
    let expects = req
        .headers()
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let searched = req
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| exposure::body_is_searched(v.as_bytes()));
    searched && !expects && !req.body().is_end_stream()
}

/// The request's host (see [`host::parse`]): from the URI authority (HTTP/2 `:authority`,
/// absolute-form HTTP/1.1) or else the Host header. A Host value that is not visible ASCII
/// names no host.
fn request_host<B>(req: &Request<B>) -> Result<RequestHost<'_>, BadHost> {
    match req.uri().authority() {
        Some(a) => host::parse(a.host()),
        None => {
            let h = req.headers().get(HOST).ok_or(BadHost::Missing)?;
            host::parse(h.to_str().map_err(|_| BadHost::Missing)?)
        }
    }
}

fn redirect<B>(site: &SiteRuntime, host: &str, req: &Request<B>) -> Response<Body> {
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
