//! The life of one served connection, alike on every listener: a transport wrapper that counts
//! reads and writes, a watchdog that closes a connection that never sends a complete request,
//! goes idle or ignores a close, and the fixed answer to cleartext on a TLS-only port.
//!
//! It knows hyper's connection futures and sockets, nothing of sites or config. A connection
//! is closed in two steps: first asked (HTTP/1.1 stops keep-alive, HTTP/2 sends GOAWAY), then,
//! if it is still open after a bound, dropped, so no peer can hold a socket by ignoring us.
//!
//! An HTTP/1.1 keep-alive connection that has been quiet for [`Timeouts::hibernate`] can be
//! *hibernated*: its HTTP state (hyper's read and write buffers, 16 KiB or more) is dropped and
//! only the transport is kept until the client sends again, as nginx frees a keep-alive
//! connection's buffers. [`Activity`] makes hyper see the end of its input at that moment, and
//! [`drive`] reports [`Ended::Hibernated`] so the caller can take the transport back.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;

/// The answer to cleartext HTTP on a TLS port. Fixed bytes: no input is echoed.
pub const TLS_ONLY_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Length: 76\r\n\
Connection: close\r\n\
\r\n\
This port speaks HTTPS only: plain HTTP is not served here. Use https:// .\r\n";

/// What a connection's watchdog reads: bytes moved, requests begun, requests not yet done.
/// Every field is bumped by the connection's own task and read by its watchdog, which only
/// compares successive values, so Relaxed ordering is enough.
#[derive(Debug, Default)]
pub struct Watch {
    /// Successful reads and writes.
    ticks: AtomicU64,
    /// Requests whose head was complete.
    started: AtomicU64,
    /// Requests whose response has not yet been sent to its end.
    open: AtomicU64,
    /// Whether the last successful I/O was a write: between requests hyper has then read no
    /// byte of the next head, so nothing is lost when it is told the input ended.
    wrote_last: AtomicBool,
    /// [`AWAKE`], [`ASKED`] or [`HIBERNATED`].
    sleep: AtomicU8,
}

/// Served as usual.
const AWAKE: u8 = 0;
/// The next read that finds nothing to read ends hyper's input (see [`Activity`]).
const ASKED: u8 = 1;
/// A read found nothing: hyper was told its input ended, and a shutdown is not passed on.
const HIBERNATED: u8 = 2;

impl Watch {
    pub fn new() -> Arc<Watch> {
        Arc::new(Watch::default())
    }

    /// A complete request head arrived; pair with [`Watch::request_done`].
    pub fn request_started(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    /// A response was sent to its end (or abandoned).
    pub fn request_done(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    fn tick(&self, wrote: bool) {
        self.ticks.fetch_add(1, Ordering::Relaxed);
        self.wrote_last.store(wrote, Ordering::Relaxed);
    }

    /// The connection serves again after a hibernation (or an attempt that found input).
    pub fn wake(&self) {
        self.sleep.store(AWAKE, Ordering::Relaxed);
    }

    fn sleep_state(&self) -> u8 {
        self.sleep.load(Ordering::Relaxed)
    }

    fn sample(&self) -> (u64, u64, u64) {
        (
            self.ticks.load(Ordering::Relaxed),
            self.started.load(Ordering::Relaxed),
            self.open.load(Ordering::Relaxed),
        )
    }
}

/// How long a connection may take at each step of its life.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From the start of HTTP until the first complete request head.
    pub first_request: Duration,
    /// With no request in flight and none begun, or no byte either way, for this long, the
    /// connection is asked to close.
    pub idle: Duration,
    /// After an idle close was asked, the connection is dropped if still open this long.
    pub close: Duration,
    /// After shutdown was asked, in-flight requests have this long before the drop.
    pub shutdown_grace: Duration,
    /// HTTP/1.1 only: with no request in flight and no byte moved for this long, the
    /// connection hibernates ([`Ended::Hibernated`]). `None`: never.
    pub hibernate: Option<Duration>,
}

/// Why [`drive`] ended a connection, for counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The connection finished by itself (client closed, error, or a close it agreed to).
    Normally,
    /// No complete request within [`Timeouts::first_request`]: dropped.
    FirstRequestTimeout,
    /// Asked to close (idle or shutdown) and still open past its bound: dropped.
    Forced,
    /// Quiet between requests: hyper's connection ended at an idle point without touching
    /// the transport, which the caller takes back (`into_parts`) and waits on.
    Hibernated,
}

/// What the watchdog tells the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Finish in-flight requests and close.
    Close,
    /// Drop now, for the given reason.
    Drop(Ended),
    /// Quiet between requests: end hyper's input at the next read that finds nothing.
    Hibernate,
}

/// Runs a connection until it ends. The decisions are a watchdog task's, woken only by its
/// timer and by shutdown: polling the connection then also polls two oneshot receivers,
/// instead of a timer and a cancellation future on every wake-up.
pub async fn drive<C, E>(
    mut conn: Pin<&mut C>,
    watch: Arc<Watch>,
    timeouts: Timeouts,
    shutdown: CancellationToken,
) -> Ended
where
    C: GracefulConnection<Error = E>,
    E: std::fmt::Display,
{
    loop {
        let (close_tx, close_rx) = oneshot::channel();
        let (drop_tx, drop_rx) = oneshot::channel();
        let dog = watchdog(close_tx, drop_tx, shutdown.clone(), watch.clone(), timeouts);
        let watchdog = tokio::spawn(dog);
        // Each receiver is polled until it completes, never after: a sender dropped unsent
        // (the watchdog ended) completes it too.
        let (mut close_rx, mut drop_rx) = (Some(close_rx), Some(drop_rx));
        let mut asked = false;
        let r = poll_fn(|cx| {
            if let Some(rx) = &mut drop_rx {
                if let Poll::Ready(order) = Pin::new(rx).poll(cx) {
                    drop_rx = None;
                    if let Ok(why) = order {
                        return Poll::Ready(Err(Some(why)));
                    }
                }
            }
            if let Some(rx) = &mut close_rx {
                if let Poll::Ready(order) = Pin::new(rx).poll(cx) {
                    close_rx = None;
                    match order {
                        Ok(Order::Hibernate) => {
                            watch.sleep.store(ASKED, Ordering::Relaxed);
                            asked = true;
                        }
                        Ok(_) => conn.as_mut().graceful_shutdown(),
                        Err(_) => {}
                    }
                }
            }
            let r = conn.as_mut().poll(cx);
            if r.is_pending() && asked && watch.sleep_state() == AWAKE {
                // A request arrived as the connection was to hibernate: serve on, under a
                // new watchdog.
                return Poll::Ready(Err(None));
            }
            r.map(Ok)
        })
        .await;
        watchdog.abort();
        return match r {
            Err(None) => continue,
            Ok(Ok(())) if watch.sleep_state() == HIBERNATED => Ended::Hibernated,
            Ok(Ok(())) => Ended::Normally,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "connection ended with an error");
                Ended::Normally
            }
            Err(Some(why)) => {
                tracing::debug!(?why, "connection dropped");
                why
            }
        };
    }
}

/// Sends [`Order`]s: a drop if no request head arrives in time; a close after shutdown or
/// idleness, then a drop if the connection outlives the close's bound.
async fn watchdog(
    close: oneshot::Sender<Order>,
    drop: oneshot::Sender<Ended>,
    shutdown: CancellationToken,
    watch: Arc<Watch>,
    t: Timeouts,
) {
    let order = first_and_idle(&shutdown, &watch, t).await;
    let bound = match order {
        Order::Drop(why) => {
            let _ = drop.send(why);
            return;
        }
        Order::Hibernate => {
            // The connection either hibernates or, if a request came in meanwhile, starts
            // a new watchdog.
            let _ = close.send(Order::Hibernate);
            return;
        }
        Order::Close if shutdown.is_cancelled() => t.shutdown_grace,
        Order::Close => t.close,
    };
    let _ = close.send(Order::Close);
    // A shutdown arriving during an idle close shortens nothing: the idle bound is the
    // shorter one in any sane config, and shutdown_grace bounds the process anyway.
    sleep(bound).await;
    let _ = drop.send(Ended::Forced);
}

async fn first_and_idle(shutdown: &CancellationToken, watch: &Watch, t: Timeouts) -> Order {
    let first_deadline = Instant::now() + t.first_request;
    let mut seen = watch.sample();
    let mut quiet_since = Instant::now();
    // The check at which bytes were last seen moving.
    let mut moved_at = Instant::now();
    // Checking four times per period closes an idle connection within 1.25 periods; a
    // connection that may hibernate is checked at least once per hibernation delay.
    let step = match t.hibernate {
        Some(h) => (t.idle / 4).min(h),
        None => t.idle / 4,
    };
    let mut next = Instant::now() + step;
    loop {
        // Until the first request, its deadline is a wake-up too.
        let wake = if seen.1 == 0 {
            next.min(first_deadline)
        } else {
            next
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Order::Close,
            _ = sleep_until(wake) => {}
        }
        let now = watch.sample();
        if now.1 == 0 && Instant::now() >= first_deadline {
            return Order::Drop(Ended::FirstRequestTimeout);
        }
        if Instant::now() < next {
            continue;
        }
        next = Instant::now() + step;
        // Quiet: no byte moved, or nothing in flight and no new request (so pings, which
        // move bytes, do not keep an HTTP/2 connection with no stream alive).
        let quiet = now.0 == seen.0 || (now.2 == 0 && now.1 == seen.1);
        if now.0 != seen.0 {
            moved_at = Instant::now();
        }
        // Between requests with the last response written, and no byte moved for the
        // hibernation delay: hyper holds nothing of a next request.
        let between = now.1 > 0 && now.2 == 0 && watch.wrote_last.load(Ordering::Relaxed);
        if between && t.hibernate.is_some_and(|h| moved_at.elapsed() >= h) {
            return Order::Hibernate;
        }
        if !quiet {
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= t.idle {
            return Order::Close;
        }
        seen = now;
    }
}

/// Timeouts of the control plane's connections (admin API, dashboard, metrics): fixed, since
/// these serve a few operators and scrapers, never the public.
pub const CONTROL_TIMEOUTS: Timeouts = Timeouts {
    first_request: Duration::from_secs(10),
    idle: Duration::from_secs(60),
    close: Duration::from_secs(5),
    shutdown_grace: Duration::from_secs(5),
    hibernate: None,
};

/// Accepts and serves a control-plane listener (admin, metrics) until `stop`: TLS only, each
/// connection within `limits`, HTTP/1.1 with [`CONTROL_TIMEOUTS`]. `service` makes the
/// service of a connection from its peer's address.
pub async fn serve_control<F, S, B>(
    mut acceptor: super::Acceptor,
    limits: Arc<super::Limits>,
    tls: tokio_rustls::TlsAcceptor,
    service: F,
    stop: CancellationToken,
) where
    F: Fn(std::net::SocketAddr) -> S,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let t = CONTROL_TIMEOUTS;
    while let Some((stream, peer)) = acceptor.accept(&stop).await {
        let Ok(permit) = limits.admit(peer.ip()) else {
            tracing::debug!(%peer, "control-plane connection refused by a cap");
            continue;
        };
        let (tls, svc, stop) = (tls.clone(), service(peer), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Some(stream) = tls_only(stream, t.first_request).await else {
                return;
            };
            let Ok(Ok(stream)) = tokio::time::timeout(t.first_request, tls.accept(stream)).await
            else {
                return;
            };
            let watch = Watch::new();
            let io = hyper_util::rt::TokioIo::new(Activity::new(stream, watch.clone()));
            let w = watch.clone();
            let svc = Arc::new(svc);
            let svc = hyper::service::service_fn(move |req| {
                w.request_started();
                let (w, svc) = (w.clone(), svc.clone());
                async move {
                    let r = svc.call(req).await;
                    w.request_done();
                    r
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(t.first_request)
                .serve_connection(io, svc);
            drive(pin!(conn), watch, t, stop).await;
        });
    }
}

/// For TLS-only listeners without sniffing of their own (admin, metrics): waits for the first
/// byte (up to `timeout`) and, if the client speaks cleartext HTTP, answers with the fixed 400
/// and closes. Returns the stream when the client starts a TLS handshake.
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
pub async fn answer_and_close(mut stream: TcpStream, answer: &[u8]) {
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

/// A transport over a TCP socket, which a hibernated connection waits on: readable again
/// means the client sent something (or closed).
pub trait OnSocket {
    fn socket(&self) -> &TcpStream;
}

impl OnSocket for TcpStream {
    fn socket(&self) -> &TcpStream {
        self
    }
}

impl<T: OnSocket> OnSocket for tokio_rustls::server::TlsStream<T> {
    fn socket(&self) -> &TcpStream {
        self.get_ref().0.socket()
    }
}

/// Wraps `T`; every successful read or write bumps the watch's byte counter. When the
/// watch asks for hibernation, the next read that finds nothing to read reports the end of
/// input instead of waiting, and shutdowns are then not passed on: hyper's connection ends
/// and the transport is left as it was, for the caller to take back.
pub struct Activity<T> {
    inner: T,
    /// Shared with the connection's watchdog.
    watch: Arc<Watch>,
}

impl<T> Activity<T> {
    pub fn new(inner: T, watch: Arc<Watch>) -> Activity<T> {
        Activity { inner, watch }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        match r {
            Poll::Ready(Ok(())) => {
                this.watch.tick(false);
                if this.watch.sleep_state() == ASKED {
                    // Input (or its real end) came first: no hibernation.
                    this.watch.wake();
                }
                r
            }
            Poll::Pending if this.watch.sleep_state() == ASKED => {
                this.watch.sleep.store(HIBERNATED, Ordering::Relaxed);
                Poll::Ready(Ok(()))
            }
            r => r,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(_)) = r {
            this.watch.tick(true);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(_)) = r {
            this.watch.tick(true);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.watch.sleep_state() == HIBERNATED {
            // hyper closes after the end of input it was shown; the transport stays open.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
