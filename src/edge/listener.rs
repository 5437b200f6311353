//! Accept loops and the life of one connection: protocol sniffing on TLS ports, the TLS
//! handshake with SNI checked against the pool, then HTTP/1.1 or HTTP/2 until drained or idle.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{sleep, timeout_at, Instant};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::http::{handle, ConnInfo};
use super::io::Activity;
use super::proxy::ClientAddr;
use super::{bump, Shared, Snapshot};
use crate::analytics::aggregate::SiteId;
use crate::analytics::observe::{Network, Outcome, PathTemplate, Scheme, TlsVersion};
use crate::analytics::{connection_event, RequestMeta};
use crate::config::ListenerKind;
use crate::exposure;

/// The answer to cleartext HTTP on a TLS port. Fixed bytes: no input is echoed.
const TLS_ONLY_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Length: 76\r\n\
Connection: close\r\n\
\r\n\
This port speaks HTTPS only: plain HTTP is not served here. Use https:// .\r\n";

/// A fatal TLS alert record, `unrecognized_name` (112), sent when SNI names no site here.
const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112];

/// Opens a listening socket. IPv6 sockets are v6-only, so `::` never also takes IPv4.
/// `reuse_port` lets each worker bind its own socket on the same address.
pub(crate) fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Lets a restarted edge bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // A deep backlog absorbs bursts of new TLS connections.
    socket.listen(4096)?;
    Ok(socket.into())
}

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
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let shared2 = shared.clone();
                // One span per connection; free unless debug logging is on.
                let span = tracing::debug_span!("conn", %peer, listener = %key.0, kind = %key.1);
                let conn = async move {
                    let _active = ActiveGuard::new(shared2.clone());
                    let shutdown = shared2.shutdown.clone();
                    match key.1 {
                        ListenerKind::Tls => tls_conn(shared2, key, stream, peer, shutdown).await,
                        ListenerKind::Cleartext => {
                            bump(&shared2.stats.cleartext_connections);
                            let info = conn_info(
                                &shared2,
                                &shared2.snapshot.load(),
                                key,
                                peer,
                                None,
                                TlsVersion::None,
                            );
                            serve_http(shared2, info, stream, false, shutdown).await
                        }
                    }
                };
                shared.tracker.spawn(conn.instrument(span));
            }
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::warn!(addr = %key.0, error = %e, "accept failed");
                sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Counts a connection as active for as long as it lives.
struct ActiveGuard(Arc<Shared>);

impl ActiveGuard {
    fn new(shared: Arc<Shared>) -> ActiveGuard {
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
fn conn_info(
    shared: &Arc<Shared>,
    snap: &Snapshot,
    key: (SocketAddr, ListenerKind),
    peer: SocketAddr,
    sni: Option<String>,
    tls: TlsVersion,
) -> Arc<ConnInfo> {
    let pool = snap
        .listeners
        .get(&key)
        .and_then(|i| snap.pools.get(*i))
        .map(|p| p.name.clone())
        .unwrap_or_default();
    Arc::new(ConnInfo {
        shared: shared.clone(),
        key,
        client: ClientAddr::new(peer.ip()),
        network: Network::of(peer.ip()),
        tls,
        pool,
        sni,
        agent: Default::default(),
    })
}

async fn tls_conn(
    shared: Arc<Shared>,
    key: (SocketAddr, ListenerKind),
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
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
        _ = shutdown.cancelled() => return,
        p = timeout_at(deadline, stream.peek(&mut first)) => p,
    };
    match peeked {
        Err(_) => {
            bump(&shared.stats.handshake_timeouts);
            event(0, Outcome::HandshakeTimeout, Scheme::Tls);
            return;
        }
        Ok(Ok(1)) => {}
        Ok(_) => return,
    }
    match first[0] {
        // TLS handshake record.
        0x16 => {}
        // Every HTTP method token starts with an uppercase letter.
        b'A'..=b'Z' => {
            bump(&shared.stats.cleartext_on_tls_port);
            tracing::debug!(%peer, addr = %key.0, "cleartext HTTP on a TLS port");
            cleartext_on_tls_port(&shared, &snap, key, peer, stream).await;
            return;
        }
        _ => {
            bump(&shared.stats.garbage_on_tls_port);
            event(0, Outcome::HandshakeFailed, Scheme::Tls);
            return;
        }
    }

    let mut acceptor = pin!(LazyConfigAcceptor::new(
        rustls::server::Acceptor::default(),
        stream
    ));
    let start = tokio::select! {
        _ = shutdown.cancelled() => return,
        s = timeout_at(deadline, acceptor.as_mut()) => s,
    };
    let mut start = match start {
        Err(_) => {
            bump(&shared.stats.handshake_timeouts);
            event(0, Outcome::HandshakeTimeout, Scheme::Tls);
            return;
        }
        Ok(Err(e)) => {
            bump(&shared.stats.handshake_failures);
            event(0, Outcome::HandshakeFailed, Scheme::Tls);
            tracing::debug!(%peer, error = %e, "bad ClientHello");
            if let Some(mut io) = acceptor.take_io() {
                let _ = io.shutdown().await;
            }
            return;
        }
        Ok(Ok(s)) => s,
    };
    let sni = start
        .client_hello()
        .server_name()
        .map(|s| s.to_ascii_lowercase());
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
        return;
    };
    let handshake = tokio::select! {
        _ = shutdown.cancelled() => return,
        h = timeout_at(deadline, start.into_stream(snap.tls.clone())) => h,
    };
    let tls = match handshake {
        Err(_) => {
            bump(&shared.stats.handshake_timeouts);
            event(site, Outcome::HandshakeTimeout, Scheme::Tls);
            return;
        }
        Ok(Err(e)) => {
            bump(&shared.stats.handshake_failures);
            event(site, Outcome::HandshakeFailed, Scheme::Tls);
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Ok(Ok(s)) => s,
    };
    bump(&shared.stats.handshakes);
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let version = TlsVersion::from_rustls(tls.get_ref().1.protocol_version());
    let info = conn_info(&shared, &snap, key, peer, sni, version);
    drop(snap);
    serve_http(shared, info, tls, h2, shutdown).await
}

/// Answers cleartext HTTP on a TLS port with the fixed 400. The request head is read first,
/// so the attempt is counted for the right site and any credential it carried is
/// fingerprinted like on a cleartext port.
async fn cleartext_on_tls_port(
    shared: &Shared,
    snap: &Snapshot,
    key: (SocketAddr, ListenerKind),
    peer: SocketAddr,
    mut stream: TcpStream,
) {
    let head = tokio::time::timeout(Duration::from_secs(2), read_head(&mut stream)).await;
    if let Some(a) = &shared.analytics {
        let mut obs = connection_event(
            0,
            Outcome::CleartextOnTlsPort,
            Scheme::Cleartext,
            key.0.port(),
            peer.ip(),
        );
        obs.status_class = 4;
        let mut found = Vec::new();
        let mut path = PathTemplate::of("/");
        if let Ok(Some(req)) = &head {
            let meta = RequestMeta::of(req);
            obs.family = meta.family;
            obs.http = meta.http;
            obs.path = Some(meta.path);
            path = meta.path;
            let host = req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok());
            let site = host
                .map(|h| {
                    h.rsplit_once(':')
                        .map_or(h, |(name, _)| name)
                        .to_ascii_lowercase()
                })
                .and_then(|h| snap.site_on(&key, &h));
            if let Some(site) = site {
                obs.site = site.id;
            }
            let extra = site.map(|s| s.exposure.clone()).unwrap_or_default();
            let policy = site.and_then(|s| s.response.clone());
            let mut secrets = Vec::new();
            let want = policy.as_ref().map(|p| (&mut secrets, p.include_raw));
            exposure::detect_with_secrets(
                req.headers(),
                req.uri(),
                &extra,
                a.fingerprinter(),
                &mut found,
                want,
            );
            if let (Some(p), Some(s), Some(r)) = (policy, site, shared.responder.get()) {
                if !found.is_empty() {
                    let family = obs.family;
                    r.offer(
                        &s.name,
                        &p,
                        &found,
                        secrets,
                        obs.network,
                        family,
                        path,
                        obs.at,
                    );
                }
            }
        }
        a.record_with_exposures(&obs, &found, path);
    }
    answer_and_close(stream, TLS_ONLY_400).await;
}

/// Reads and parses a cleartext request head (at most 16 KiB); `None` if it is not one.
async fn read_head(stream: &mut TcpStream) -> Option<http::Request<()>> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..]).await.ok()?;
        if n == 0 {
            return None;
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
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
                return b.body(()).ok();
            }
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => return None,
        }
    }
}

/// For other TLS-only listeners (admin, metrics): waits for the first byte (up to `timeout`)
/// and, if the client speaks cleartext HTTP, answers with the fixed 400 and closes. Returns the
/// stream when the client starts a TLS handshake.
pub async fn tls_only(stream: TcpStream, timeout: Duration) -> Option<TcpStream> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == 0x16 => Some(stream),
        Ok(Ok(1)) if first[0].is_ascii_uppercase() => {
            answer_and_close(stream, TLS_ONLY_400).await;
            None
        }
        _ => None,
    }
}

/// Writes a fixed answer, stops sending, and reads a little of what the client sent so the
/// close does not turn into a reset that destroys the answer before the client reads it.
async fn answer_and_close(mut stream: TcpStream, answer: &[u8]) {
    if stream.write_all(answer).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut total = 0;
        // 64 KiB is more than any request head we would have accepted.
        while total < 65_536 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

async fn serve_http<T>(
    shared: Arc<Shared>,
    info: Arc<ConnInfo>,
    io: T,
    h2: bool,
    shutdown: CancellationToken,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let edge = shared.snapshot.load().config.edge.clone();
    // Cleartext answers (the reject page above all) must be byte-for-byte stable, so they
    // carry no Date header.
    let date = info.sni.is_some();
    let (io, ticks) = Activity::new(io);
    let io = TokioIo::new(io);
    let svc = service_fn(move |req| handle(info.clone(), req));
    if h2 {
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(edge.max_header_bytes as u32)
            .serve_connection(io, svc);
        drive(conn, shutdown, ticks, edge.idle_timeout).await;
    } else {
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(edge.header_read_timeout)
            .max_buf_size(edge.max_header_bytes)
            .auto_date_header(date)
            .serve_connection(io, svc);
        drive(conn, shutdown, ticks, edge.idle_timeout).await;
    }
}

/// Runs a connection until it ends; on shutdown, or after `idle` without a byte either way,
/// asks it to finish in-flight requests and close.
///
/// The decision is a watchdog task's, woken only by its timer and by shutdown: polling the
/// connection then also polls one oneshot receiver, instead of a timer and a cancellation
/// future on every wake-up.
async fn drive<C>(conn: C, shutdown: CancellationToken, ticks: Arc<AtomicU64>, idle: Duration)
where
    C: GracefulConnection<Error = hyper::Error>,
{
    let (close_tx, mut close_rx) = oneshot::channel();
    let watchdog = tokio::spawn(watch(close_tx, shutdown, ticks, idle));
    let mut conn = pin!(conn);
    let mut closing = false;
    let r = poll_fn(|cx| {
        if !closing && Pin::new(&mut close_rx).poll(cx).is_ready() {
            closing = true;
            conn.as_mut().graceful_shutdown();
        }
        conn.as_mut().poll(cx)
    })
    .await;
    watchdog.abort();
    if let Err(e) = r {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Waits for shutdown or for `idle` without activity, then tells the connection to close.
async fn watch(
    close: oneshot::Sender<()>,
    shutdown: CancellationToken,
    ticks: Arc<AtomicU64>,
    idle: Duration,
) {
    let mut seen = ticks.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    // Checking four times per period closes an idle connection within 1.25 periods.
    let step = idle / 4;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = sleep(step) => {
                let now = ticks.load(Ordering::Relaxed);
                if now != seen {
                    seen = now;
                    quiet_since = Instant::now();
                } else if quiet_since.elapsed() >= idle {
                    break;
                }
            }
        }
    }
    let _ = close.send(());
}
