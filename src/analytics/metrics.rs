//! Prometheus text exposition at `/metrics`, served over TLS only.
//!
//! Series are built at scrape time from the analytics totals and the counters of the listeners,
//! read through the narrow [`Counters`] trait (the root implements it), so the request path
//! pays nothing for them and this module never reaches into the edge. Label values come only from configured site names (or
//! `unknown`) and fixed enumerations: no client input ever becomes a label.

use std::convert::Infallible;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::Analytics;

/// What `/metrics` reads besides the analytics totals.
pub trait Counters: Send + Sync {
    /// The edge's counters of events before any request.
    fn edge(&self) -> StatsSnapshot;
    /// Connections refused by a cap, as (listener, reason, count): `edge`, `dns`, `metrics`.
    fn refusals(&self) -> Vec<(&'static str, &'static str, u64)>;
    /// The analytics, when enabled.
    fn analytics(&self) -> Option<&Analytics>;
    /// Every site's certificate: where it comes from and when it expires.
    fn certs(&self) -> Vec<crate::tls::SiteCert>;
    /// ACME orders that failed since start.
    fn acme_failures(&self) -> u64;
    /// Whether the store answered its last query.
    fn store_up(&self) -> bool;
}

/// A point-in-time copy of the edge's pre-request counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub cleartext_on_tls_port: u64,
    pub garbage_on_tls_port: u64,
    pub handshake_timeouts: u64,
    pub handshake_failures: u64,
    pub unknown_sni: u64,
    pub handshakes: u64,
    /// QUIC (HTTP/3) handshakes completed, also counted in `handshakes`.
    pub quic_handshakes: u64,
    /// QUIC clients sent a Retry to prove their address (under load).
    pub quic_retries: u64,
    pub cleartext_connections: u64,
    pub active_connections: i64,
    /// HTTP/1.1 connections quiet between requests whose HTTP state is freed.
    pub hibernating_connections: i64,
    pub first_request_timeouts: u64,
    pub forced_closes: u64,
    pub malformed_requests: u64,
    /// Connections refused because the edge held `max_connections`.
    pub refused_global: u64,
    /// Connections refused because their address held `max_connections_per_client`.
    pub refused_per_client: u64,
}

type Labels = Vec<(String, String)>;

fn counter(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauge(reg: &mut Registry, name: &str, help: &str) -> Gauge<i64, AtomicI64> {
    let g = Gauge::<i64, AtomicI64>::default();
    reg.register(name, help, g.clone());
    g
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The exposition text for the current state.
pub fn render(edge: &dyn Counters) -> String {
    let mut reg = Registry::with_prefix("portcullis");
    let stats = edge.edge();
    let requests = counter(
        &mut reg,
        "requests",
        "Requests answered, by site, scheme and status class",
    );
    let tls = counter(
        &mut reg,
        "tls_requests",
        "Requests over TLS by negotiated version",
    );
    let events = counter(
        &mut reg,
        "connection_events",
        "Connections that ended before a request, by site, scheme and outcome",
    );
    let exposures = counter(
        &mut reg,
        "exposures",
        "Credentials seen in cleartext requests, by site and position",
    );
    let exposures_dropped = counter(
        &mut reg,
        "exposures_dropped",
        "Exposure records not kept because too many distinct credentials arrived at once",
    );
    let clear_on_tls = counter(
        &mut reg,
        "cleartext_on_tls_port",
        "Cleartext HTTP requests sent to a TLS port",
    );
    let hs_fail = counter(
        &mut reg,
        "handshake_failures",
        "TLS handshakes that failed, by reason",
    );
    let handshakes = counter(
        &mut reg,
        "handshakes",
        "TLS handshakes completed, by transport (tcp, quic)",
    );
    let retries = counter(
        &mut reg,
        "quic_retries",
        "QUIC clients asked to prove their address with a Retry (sent under load)",
    );
    let active = gauge(
        &mut reg,
        "active_connections",
        "Client connections open now",
    );
    let hibernating = gauge(
        &mut reg,
        "hibernating_connections",
        "HTTP/1.1 keep-alive connections quiet between requests, holding no HTTP buffers",
    );
    let refused = counter(
        &mut reg,
        "connections_refused",
        "Connections closed at accept by a cap, by listener (edge, dns, metrics) and cap",
    );
    let closed = counter(
        &mut reg,
        "connections_closed_by_edge",
        "Connections the edge closed: no complete request head in time, or not closing when asked",
    );
    let malformed = counter(
        &mut reg,
        "malformed_requests",
        "Cleartext connections that ended inside a request head (refused by the parser or never finished)",
    );
    let lag = gauge(
        &mut reg,
        "store_flush_lag_seconds",
        "Age of the oldest counts not yet written to the store",
    );
    let log_dropped = counter(
        &mut reg,
        "access_log_dropped",
        "Access log lines dropped because the writer fell behind",
    );

    clear_on_tls
        .get_or_create(&vec![])
        .inc_by(stats.cleartext_on_tls_port);
    let tcp = stats.handshakes.saturating_sub(stats.quic_handshakes);
    for (transport, n) in [("tcp", tcp), ("quic", stats.quic_handshakes)] {
        handshakes
            .get_or_create(&labels(&[("transport", transport)]))
            .inc_by(n);
    }
    retries.get_or_create(&vec![]).inc_by(stats.quic_retries);
    for (reason, n) in [
        ("failed", stats.handshake_failures),
        ("timeout", stats.handshake_timeouts),
        ("unknown_sni", stats.unknown_sni),
        ("not_tls", stats.garbage_on_tls_port),
    ] {
        hs_fail
            .get_or_create(&labels(&[("reason", reason)]))
            .inc_by(n);
    }
    active.set(stats.active_connections);
    hibernating.set(stats.hibernating_connections);
    for (listener, reason, n) in edge.refusals() {
        refused
            .get_or_create(&labels(&[("listener", listener), ("reason", reason)]))
            .inc_by(n);
    }
    for (reason, n) in [
        ("first_request_timeout", stats.first_request_timeouts),
        ("close_timeout", stats.forced_closes),
    ] {
        closed
            .get_or_create(&labels(&[("reason", reason)]))
            .inc_by(n);
    }
    malformed
        .get_or_create(&vec![])
        .inc_by(stats.malformed_requests);
    if let Some(a) = edge.analytics() {
        let totals = a.totals();
        for ((site, outcome, scheme, status), n) in &totals.requests {
            let site = a.site_name(*site);
            if *outcome == crate::observe::Outcome::Response {
                let class = format!("{status}xx");
                requests
                    .get_or_create(&labels(&[
                        ("site", &site),
                        ("scheme", scheme.as_str()),
                        ("status", &class),
                    ]))
                    .inc_by(*n);
            } else {
                events
                    .get_or_create(&labels(&[
                        ("site", &site),
                        ("scheme", scheme.as_str()),
                        ("outcome", outcome.as_str()),
                    ]))
                    .inc_by(*n);
            }
        }
        for ((site, version), n) in &totals.tls_versions {
            tls.get_or_create(&labels(&[
                ("site", &a.site_name(*site)),
                ("version", version.as_str()),
            ]))
            .inc_by(*n);
        }
        for ((site, kind), n) in &totals.exposures {
            exposures
                .get_or_create(&labels(&[
                    ("site", &a.site_name(*site)),
                    ("kind", kind.as_str()),
                ]))
                .inc_by(*n);
        }
        exposures_dropped
            .get_or_create(&vec![])
            .inc_by(totals.exposures_dropped);
        lag.set(a.flush_lag() as i64);
        if let Some(log) = a.access_log() {
            log_dropped
                .get_or_create(&vec![])
                .inc_by(log.dropped.load(std::sync::atomic::Ordering::Relaxed));
        }
    }
    let expiry = Family::<Labels, Gauge<i64, AtomicI64>>::default();
    reg.register(
        "cert_expiry_seconds",
        "Seconds until the certificate served for the site expires (negative: expired)",
        expiry.clone(),
    );
    let source = Family::<Labels, Gauge<i64, AtomicI64>>::default();
    reg.register(
        "cert_source",
        "1 for the source of the site's certificate: file, acme or development (not trusted by clients)",
        source.clone(),
    );
    let now = crate::clock::now() as i64;
    for c in edge.certs() {
        source
            .get_or_create(&labels(&[("site", &c.site), ("source", c.source)]))
            .set(1);
        if let Some(t) = c.not_after {
            expiry
                .get_or_create(&labels(&[("site", &c.site)]))
                .set(t as i64 - now);
        }
    }
    counter(
        &mut reg,
        "acme_failures",
        "ACME orders that failed (the CA unreachable, refusing or rate limiting)",
    )
    .get_or_create(&vec![])
    .inc_by(edge.acme_failures());
    gauge(
        &mut reg,
        "store_up",
        "1 when the store (SQLite, or the fleet's PostgreSQL) answered its last query; 0 while the node serves its last-known-good policy",
    )
    .set(i64::from(edge.store_up()));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

/// Serves `GET /metrics` over TLS on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    limits: Arc<crate::net::Limits>,
    edge: Arc<dyn Counters>,
    stop: CancellationToken,
) {
    let acceptor = crate::net::Acceptor::new(listener, "metrics");
    let service = move |_peer| {
        let edge = edge.clone();
        service_fn(move |req: Request<Incoming>| {
            let edge = edge.clone();
            async move {
                let resp = if req.uri().path() == "/metrics" {
                    let mut r = Response::new(Full::new(Bytes::from(render(&*edge))));
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    r
                } else {
                    let mut r = Response::new(Full::new(Bytes::from_static(
                        b"404: only /metrics is served here\n",
                    )));
                    *r.status_mut() = StatusCode::NOT_FOUND;
                    r
                };
                Ok::<_, Infallible>(resp)
            }
        })
    };
    crate::net::serve_control(acceptor, limits, tls, service, stop).await;
}
