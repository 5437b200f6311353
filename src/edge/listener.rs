//! Accept loops and the life of one connection: protocol sniffing on TLS ports, the TLS
//! handshake with SNI checked against the pool, then HTTP/1.1 or HTTP/2 until drained or idle.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::capture::{Captured, HeadCapture};
use super::conn::{ClientAddr, ConnInfo};
use super::host;
use super::http::handle;
use super::{bump, Shared, Snapshot};
use crate::analytics::aggregate::SiteId;
use crate::analytics::{connection_event, RequestMeta};
use crate::config::ListenerKind;
use crate::exposure;
use crate::net::{answer_and_close, Activity, Ended, Timeouts, Watch, TLS_ONLY_400};
use crate::observe::{Network, Outcome, PathTemplate, Scheme, TlsVersion};

/// What the first byte on a TLS port says the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// A TLS handshake record.
    Tls,
    /// Cleartext HTTP: every method token starts with an uppercase letter.
    Http,
    /// Neither: closed.
    Garbage,
}

/// Classifies the first byte a client sent to a TLS port.
pub fn sniff(first: u8) -> Sniff {
    match first {
        0x16 => Sniff::Tls,
        b'A'..=b'Z' => Sniff::Http,
        _ => Sniff::Garbage,
    }
}

/// A fatal TLS alert record, `unrecognized_name` (112), sent when SNI names no site here.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112];

pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    key: (SocketAddr, ListenerKind),
    listener: std::net::TcpListener,
    stop: CancellationToken,
) {
    // Registered here, with the reactor of the runtime this loop runs on.
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(addr = %key.0, error = %e, "cannot register listener");
            return;
        }
    };
    let mut acceptor = crate::net::Acceptor::new(listener, "edge");
    while let Some((stream, peer)) = acceptor.accept(&stop).await {
        let permit = match shared.limits.admit(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                // Closed before a byte is read: the cheapest refusal there is.
                tracing::debug!(%peer, listener = %key.0, ?why, "connection refused by a cap");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared2 = shared.clone();
        // One span per connection; free unless debug logging is on.
        let span = tracing::debug_span!("conn", %peer, listener = %key.0, kind = %key.1);
        let conn = async move {
            let _permit = permit;
            let _active = ActiveGuard::new(shared2.clone());
            let shutdown = shared2.shutdown.clone();
            match key.1 {
                ListenerKind::Tls => tls_conn(shared2, key, stream, peer, shutdown).await,
                // QUIC sockets have their own accept loop (quic.rs), never this one.
                ListenerKind::Quic => {}
                ListenerKind::Cleartext => {
                    bump(&shared2.stats.cleartext_connections);
                    let snap = shared2.snapshot.load_full();
                    let limit = snap.config.edge.max_header_bytes;
                    let capture = HeadCapture::new(limit);
                    let info = conn_info(&shared2, &snap, key, peer, None, TlsVersion::None)
                        .with_capture(capture.clone());
                    drop(snap);
                    let info = Arc::new(info);
                    let stream = Captured::new(stream, capture.clone());
                    Box::pin(serve_http(
                        shared2.clone(),
                        info.clone(),
                        stream,
                        false,
                        shutdown,
                    ))
                    .await;
                    let raw = capture.take();
                    if !raw.is_empty() {
                        malformed_head(&shared2, &info, &raw);
                    }
                }
            }
        };
        shared.tracker.spawn(conn.instrument(span));
    }
}

/// A cleartext connection ended inside a request head: the parser refused it (400, 431) or
/// the client never finished it. Its credentials crossed the wire all the same.
fn malformed_head(shared: &Shared, info: &ConnInfo, raw: &[u8]) {
    bump(&shared.stats.malformed_requests);
    let Some(a) = &shared.analytics else { return };
    let snap = shared.snapshot.load();
    let host = lenient_host(raw);
    let site = host
        .as_deref()
        .and_then(|h| snap.pool_for(&info.key, &info.pool)?.find(h))
        .and_then(|i| snap.sites.get(i));
    let outcome = Outcome::MalformedRequest;
    observe_raw_head(
        shared,
        a,
        site,
        info.key,
        info.network,
        info.peer,
        raw,
        outcome,
    );
}

/// Counts a request head read raw (refused by a parser, or cleartext on a TLS port) and any
/// credential in it, for `site` if the head named one.
#[allow(clippy::too_many_arguments)]
fn observe_raw_head(
    shared: &Shared,
    a: &crate::analytics::Analytics,
    site: Option<&super::snapshot::SiteRuntime>,
    key: (SocketAddr, ListenerKind),
    network: Network,
    peer: std::net::IpAddr,
    raw: &[u8],
    outcome: Outcome,
) {
    let mut obs = connection_event(0, outcome, Scheme::Cleartext, key.0.port(), peer);
    obs.network = network;
    obs.status_class = 4;
    let path = PathTemplate::of("/");
    obs.path = Some(path);
    let default = exposure::ExtraPositions::default();
    let extra = site.map_or(&default, |s| &s.exposure);
    let policy = site.and_then(|s| s.response.clone());
    let mut found = Vec::new();
    let mut secrets = Vec::new();
    let want = policy.as_ref().map(|p| (&mut secrets, p.include_raw));
    exposure::detect_raw_head_with_secrets(raw, extra, a.fingerprinter(), &mut found, want);
    if let Some(s) = site {
        obs.site = s.id;
    }
    record_found(shared, a, site, &obs, &found, secrets, path);
}

/// Counts `obs` with the credentials found in its request, and offers them to the site's
/// exposure response.
fn record_found(
    shared: &Shared,
    a: &crate::analytics::Analytics,
    site: Option<&super::snapshot::SiteRuntime>,
    obs: &crate::analytics::aggregate::Observation,
    found: &[exposure::Found],
    secrets: Vec<exposure::SecretValue>,
    path: PathTemplate,
) {
    let respond = site.and_then(|s| Some((s, s.response.as_ref()?)));
    if let (Some((s, p)), Some(r), false) = (respond, shared.responder.as_ref(), found.is_empty()) {
        r.offer(
            &s.name,
            p,
            found,
            secrets,
            obs.network,
            obs.family,
            path,
            obs.at,
        );
    }
    a.record_with_exposures(obs, found, path);
}

/// The host a raw head names in its first `Host` line that holds one (see [`host::parse`]),
/// read leniently: the head is one the HTTP parser refused, or never finished.
fn lenient_host(raw: &[u8]) -> Option<String> {
    let head = &raw[..raw.len().min(64 * 1024)];
    head.split(|b| *b == b'\n').skip(1).find_map(|line| {
        let colon = line.iter().position(|b| *b == b':')?;
        let name = line[..colon].trim_ascii();
        if !name.eq_ignore_ascii_case(b"host") {
            return None;
        }
        let value = std::str::from_utf8(line[colon + 1..].trim_ascii()).ok()?;
        host::parse(value).ok().map(|h| h.as_str().to_owned())
    })
}

/// Counts a connection as active for as long as it lives.
pub(crate) struct ActiveGuard(Arc<Shared>);

impl ActiveGuard {
    pub(crate) fn new(shared: Arc<Shared>) -> ActiveGuard {
        shared
            .stats
            .active_connections
            .fetch_add(1, Ordering::Relaxed);
        ActiveGuard(shared)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0
            .stats
            .active_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connection facts, resolved against the snapshot current when the connection was accepted.
pub(crate) fn conn_info(
    shared: &Arc<Shared>,
    snap: &Snapshot,
    key: (SocketAddr, ListenerKind),
    peer: SocketAddr,
    sni: Option<String>,
    tls: TlsVersion,
) -> ConnInfo {
    let pool = snap
        .listeners
        .get(&key)
        .and_then(|i| snap.pools.get(*i))
        .map(|p| p.name.clone())
        .unwrap_or_default();
    ConnInfo {
        shared: shared.clone(),
        key,
        client: ClientAddr::new(peer.ip()),
        peer: peer.ip(),
        network: Network::of(peer.ip()),
        tls,
        pool,
        sni,
        agent: Default::default(),
        watch: Watch::new(),
        capture: None,
        alt_svc: snap.alt_svc(key.0),
    }
}

/// A TLS connection up to its handshake: sniffed, the ClientHello read, the site found by
/// SNI and the handshake done within the handshake timeout. `None` when the connection ended
/// on the way (each outcome counted here). Boxed by its caller: a connection that is being
/// served keeps none of this state.
async fn tls_handshake(
    shared: &Arc<Shared>,
    key: (SocketAddr, ListenerKind),
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: &CancellationToken,
) -> Option<(
    tokio_rustls::server::TlsStream<TcpStream>,
    Option<String>,
    Arc<Snapshot>,
)> {
    let snap = shared.snapshot.load_full();
    let deadline = Instant::now() + snap.config.edge.handshake_timeout;
    let event = |site: SiteId, outcome: Outcome, scheme: Scheme| {
        if let Some(a) = &shared.analytics {
            a.record(&connection_event(
                site,
                outcome,
                scheme,
                key.0.port(),
                peer.ip(),
            ));
        }
    };
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        _ = shutdown.cancelled() => return None,
        p = timeout_at(deadline, stream.peek(&mut first)) => p,
    };
    match peeked {
        Err(_) => {
            bump(&shared.stats.handshake_timeouts);
            event(0, Outcome::HandshakeTimeout, Scheme::Tls);
            return None;
        }
        Ok(Ok(1)) => {}
        Ok(_) => return None,
    }
    match sniff(first[0]) {
        Sniff::Tls => {}
        Sniff::Http => {
            bump(&shared.stats.cleartext_on_tls_port);
            tracing::debug!(%peer, addr = %key.0, "cleartext HTTP on a TLS port");
            Box::pin(cleartext_on_tls_port(shared, &snap, key, peer, stream)).await;
            return None;
        }
        Sniff::Garbage => {
            bump(&shared.stats.garbage_on_tls_port);
            event(0, Outcome::HandshakeFailed, Scheme::Tls);
            return None;
        }
    }

    // Boxed, as the handshake futures below: what a connection keeps for its whole life is
    // then only what serving it needs, not the largest state it went through.
    let mut acceptor = Box::pin(LazyConfigAcceptor::new(
        rustls::server::Acceptor::default(),
        stream,
    ));
    let start = tokio::select! {
        _ = shutdown.cancelled() => return None,
        s = timeout_at(deadline, acceptor.as_mut()) => s,
    };
    let mut start = match start {
        Err(_) => {
            bump(&shared.stats.handshake_timeouts);
            event(0, Outcome::HandshakeTimeout, Scheme::Tls);
            return None;
        }
        Ok(Err(e)) => {
            bump(&shared.stats.handshake_failures);
            event(0, Outcome::HandshakeFailed, Scheme::Tls);
            tracing::debug!(%peer, error = %e, "bad ClientHello");
            if let Some(mut io) = acceptor.take_io() {
                let _ = io.shutdown().await;
            }
            return None;
        }
        Ok(Ok(s)) => s,
    };
    let sni = start
        .client_hello()
        .server_name()
        .map(|s| s.to_ascii_lowercase());
    if crate::tls::is_acme_validation(&start.client_hello()) {
        // RFC 8737: the handshake is the whole answer; no request is read on it.
        let accepted =
            timeout_at(deadline, start.into_stream(shared.acme_validation.clone())).await;
        match accepted {
            Ok(Ok(mut tls)) => {
                tracing::info!(%peer, sni = sni.as_deref().unwrap_or("(none)"), "answered a TLS-ALPN-01 validation");
                let _ = tls.shutdown().await;
            }
            _ => {
                tracing::debug!(%peer, sni = sni.as_deref().unwrap_or("(none)"), "TLS-ALPN-01 handshake for a name with no validation in progress");
            }
        }
        return None;
    }
    let site = sni
        .as_deref()
        .and_then(|name| snap.site_on(&key, name))
        .map(|s| s.id);
    let Some(site) = site else {
        bump(&shared.stats.unknown_sni);
        event(0, Outcome::HandshakeFailed, Scheme::Tls);
        tracing::debug!(%peer, sni = sni.as_deref().unwrap_or("(none)"), "unrecognized SNI");
        let _ = start.io.write_all(&ALERT_UNRECOGNIZED_NAME).await;
        let _ = start.io.shutdown().await;
        return None;
    };
    drop(acceptor);
    let handshake = tokio::select! {
        _ = shutdown.cancelled() => return None,
        h = Box::pin(timeout_at(deadline, start.into_stream(snap.tls.clone()))) => h,
    };
    let tls = match handshake {
        Err(_) => {
            bump(&shared.stats.handshake_timeouts);
            event(site, Outcome::HandshakeTimeout, Scheme::Tls);
            return None;
        }
        Ok(Err(e)) => {
            bump(&shared.stats.handshake_failures);
            event(site, Outcome::HandshakeFailed, Scheme::Tls);
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return None;
        }
        Ok(Ok(s)) => s,
    };
    Some((tls, sni, snap))
}

async fn tls_conn(
    shared: Arc<Shared>,
    key: (SocketAddr, ListenerKind),
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let Some((tls, sni, snap)) =
        Box::pin(tls_handshake(&shared, key, stream, peer, &shutdown)).await
    else {
        return;
    };
    bump(&shared.stats.handshakes);
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let version = TlsVersion::from_rustls(tls.get_ref().1.protocol_version());
    let info = Arc::new(conn_info(&shared, &snap, key, peer, sni, version));
    drop(snap);
    Box::pin(serve_http(shared, info, tls, h2, shutdown)).await
}

/// Answers cleartext HTTP on a TLS port with the fixed 400. The request head is read first,
/// so the attempt is counted for the right site and any credential it carried is
/// fingerprinted like on a cleartext port; a head that does not parse is searched raw.
async fn cleartext_on_tls_port(
    shared: &Shared,
    snap: &Snapshot,
    key: (SocketAddr, ListenerKind),
    peer: SocketAddr,
    mut stream: TcpStream,
) {
    let mut buf = Vec::new();
    let head = tokio::time::timeout(Duration::from_secs(2), read_head(&mut stream, &mut buf))
        .await
        .ok()
        .flatten();
    if let Some(a) = &shared.analytics {
        match &head {
            Some(req) => parsed_on_tls_port(shared, a, snap, key, peer, req),
            None => {
                let site = lenient_host(&buf).and_then(|h| snap.site_on(&key, &h));
                let network = Network::of(peer.ip());
                let outcome = Outcome::CleartextOnTlsPort;
                observe_raw_head(shared, a, site, key, network, peer.ip(), &buf, outcome);
            }
        }
    }
    answer_and_close(stream, TLS_ONLY_400).await;
}

fn parsed_on_tls_port(
    shared: &Shared,
    a: &crate::analytics::Analytics,
    snap: &Snapshot,
    key: (SocketAddr, ListenerKind),
    peer: SocketAddr,
    req: &http::Request<()>,
) {
    let mut obs = connection_event(
        0,
        Outcome::CleartextOnTlsPort,
        Scheme::Cleartext,
        key.0.port(),
        peer.ip(),
    );
    obs.status_class = 4;
    let mut found = Vec::new();
    let meta = RequestMeta::of(req);
    obs.family = meta.family;
    obs.http = meta.http;
    obs.path = Some(meta.path);
    let mut path = meta.path;
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok());
    let site = host
        .and_then(|h| host::parse(h).ok())
        .and_then(|h| snap.site_on(&key, h.as_str()));
    if let Some(site) = site {
        obs.site = site.id;
    }
    let default = exposure::ExtraPositions::default();
    let extra = site.map_or(&default, |s| &s.exposure);
    if exposure::path_has_token(req.uri().path(), extra) {
        path = PathTemplate::of("/:id");
        obs.path = Some(path);
    }
    let policy = site.and_then(|s| s.response.clone());
    let mut secrets = Vec::new();
    let want = policy.as_ref().map(|p| (&mut secrets, p.include_raw));
    exposure::detect_with_secrets(
        req.headers(),
        req.uri(),
        extra,
        a.fingerprinter(),
        &mut found,
        want,
    );
    record_found(shared, a, site, &obs, &found, secrets, path);
}

/// Reads a cleartext request head into `buf` (at most 16 KiB) and parses it; `None` if it
/// is not one, with what was read left in `buf`.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<http::Request<()>> {
    const MAX: usize = 16 * 1024;
    let mut chunk = [0u8; 4096];
    loop {
        let room = (MAX - buf.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..room]).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        match head_status(buf) {
            HeadStatus::Complete => return parse_head(buf),
            HeadStatus::Partial if buf.len() < MAX => continue,
            _ => return None,
        }
    }
}

enum HeadStatus {
    Complete,
    Partial,
    Invalid,
}

fn head_status(buf: &[u8]) -> HeadStatus {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    match httparse::Request::new(&mut headers).parse(buf) {
        Ok(httparse::Status::Complete(_)) => HeadStatus::Complete,
        Ok(httparse::Status::Partial) => HeadStatus::Partial,
        Err(_) => HeadStatus::Invalid,
    }
}

/// Parses a complete cleartext request head (at most 64 headers); `None` if `buf` does not
/// start with one.
pub fn parse_head(buf: &[u8]) -> Option<http::Request<()>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {
            let mut b = http::Request::builder()
                .method(req.method?)
                .uri(req.path?)
                .version(if req.version == Some(0) {
                    http::Version::HTTP_10
                } else {
                    http::Version::HTTP_11
                });
            for h in req.headers.iter() {
                b = b.header(h.name, h.value);
            }
            b.body(()).ok()
        }
        _ => None,
    }
}

/// How long an HTTP/1.1 keep-alive connection stays quiet between requests before it
/// hibernates (see [`crate::net::Ended::Hibernated`]). nginx frees a keep-alive connection's
/// buffers at once; one second spares a busy connection (a request every few milliseconds)
/// a new HTTP connection per request, while an idle one gives back its 16 KiB of buffers
/// within about two seconds.
const HIBERNATE_AFTER: Duration = Duration::from_secs(1);

async fn serve_http<T>(
    shared: Arc<Shared>,
    info: Arc<ConnInfo>,
    io: T,
    h2: bool,
    shutdown: CancellationToken,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + crate::net::OnSocket + Unpin + Send + 'static,
{
    let edge = shared.snapshot.load().config.edge.clone();
    // Cleartext answers (the reject page above all) must be byte-for-byte stable, so they
    // carry no Date header.
    let date = info.sni.is_some();
    let watch = info.watch.clone();
    let mut io = Activity::new(io, watch.clone());
    let mut timeouts = Timeouts {
        first_request: edge.header_read_timeout,
        idle: edge.idle_timeout,
        close: edge.close_timeout,
        shutdown_grace: edge.shutdown_grace,
        hibernate: None,
    };
    let svc = |info: Arc<ConnInfo>| {
        service_fn(move |req: http::Request<hyper::body::Incoming>| {
            handle(info.clone(), req.map(super::proxy::ClientBody::new))
        })
    };
    let ended = if h2 {
        // Boxed per protocol: an HTTP/1.1 connection does not carry HTTP/2's larger state.
        let mut conn = Box::pin(
            http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(edge.max_header_bytes as u32)
                .serve_connection(TokioIo::new(io), svc(info)),
        );
        crate::net::drive(conn.as_mut(), watch, timeouts, shutdown).await
    } else {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(edge.header_read_timeout)
            // The buffer bound alone lets a head that arrives in one read past it through.
            .max_header_size(edge.max_header_bytes)
            .max_buf_size(edge.max_header_bytes)
            .auto_date_header(date);
        // An idle timeout this short closes a quiet connection about as soon.
        timeouts.hibernate = (edge.idle_timeout > 2 * HIBERNATE_AFTER).then_some(HIBERNATE_AFTER);
        loop {
            // Boxed apart from this future, so that a hibernating connection frees it.
            let mut conn = Box::new(builder.serve_connection(TokioIo::new(io), svc(info.clone())));
            let ended = crate::net::drive(
                Pin::new(&mut *conn),
                watch.clone(),
                timeouts,
                shutdown.clone(),
            )
            .await;
            if ended != Ended::Hibernated {
                break ended;
            }
            let parts = conn.into_parts();
            // Hibernation follows a read that found nothing, so hyper holds no byte.
            debug_assert!(parts.read_buf.is_empty());
            io = parts.io.into_inner();
            watch.wake();
            let asleep = &shared.stats.hibernating_connections;
            asleep.fetch_add(1, Ordering::Relaxed);
            let woke = hibernate(&io, &timeouts, &shutdown).await;
            asleep.fetch_sub(1, Ordering::Relaxed);
            if !woke {
                // Idle past the timeout, or shutting down: close as hyper would.
                let _ = tokio::time::timeout(timeouts.close, io.shutdown()).await;
                break Ended::Normally;
            }
        }
    };
    match ended {
        Ended::Normally | Ended::Hibernated => {}
        Ended::FirstRequestTimeout => bump(&shared.stats.first_request_timeouts),
        Ended::Forced => bump(&shared.stats.forced_closes),
    }
}

/// Waits, holding only the transport, until the client sends again (`true`), or the idle
/// timeout passes or shutdown begins (`false`).
async fn hibernate<T: crate::net::OnSocket>(
    io: &Activity<T>,
    t: &Timeouts,
    shutdown: &CancellationToken,
) -> bool {
    let rest = t.idle.saturating_sub(t.hibernate.unwrap_or_default());
    tokio::select! {
        _ = shutdown.cancelled() => false,
        r = tokio::time::timeout(rest, io.get_ref().socket().readable()) => matches!(r, Ok(Ok(()))),
    }
}

#[cfg(test)]
mod tests {
    use super::lenient_host;

    #[test]
    fn lenient_host_reads_refused_heads_without_panicking() {
        let head =
            b"GET / HTTP/1.1\r\nX-Big: \xff\xfe\r\nHOST :  Legacy.Test.:8080 \r\nbad line\r\n";
        assert_eq!(lenient_host(head).as_deref(), Some("legacy.test"));
        // The request line is never a Host line, and a junk Host line names no host.
        assert_eq!(lenient_host(b"Host: a.test\r\n"), None);
        assert_eq!(lenient_host(b"GET / HTTP/1.1\r\nHost: a b\r\n"), None);
        assert_eq!(lenient_host(b"GET / HTTP/1.1\r\nHost: \xc3\x28\r\n"), None);
        // The first Host line that holds a host wins.
        let two = b"GET / HTTP/1.1\r\nHost:\r\nHost: [::1\r\nHost: b.test\r\nHost: c.test\r\n";
        assert_eq!(lenient_host(two).as_deref(), Some("b.test"));
        for junk in [&b""[..], b"\n", b"\n:", b"\n\n\n", &[0xff; 70_000]] {
            assert_eq!(lenient_host(junk), None);
        }
        let mut beyond = b"GET / HTTP/1.1\r\n".to_vec();
        beyond.extend(std::iter::repeat_n(b'x', 64 * 1024));
        beyond.extend(b"\r\nHost: late.test\r\n");
        assert_eq!(
            lenient_host(&beyond),
            None,
            "only the first 64 KiB are read"
        );
    }
}
