//! Forwarding to origins: a pooled keep-alive client per site (certificate-verified for
//! `https://` origins), hop-by-hop headers removed, forwarding headers set, bodies streamed.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use tokio::net::TcpStream;
use tower_service::Service as _;

use super::conn::{ClientAddr, InFlight};
use crate::config::{EdgeSettings, Origin, Site};
use crate::{lock, tls};

/// Bodies the edge sends: the origin's, streamed, or a short one of its own.
pub(crate) type Body = Either<OriginBody, Full<Bytes>>;

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

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Idle origin connections kept per worker and site.
const POOL_MAX_IDLE: usize = 1024;

/// A site's way to its origin: a pool of keep-alive HTTP/1.1 connections per worker, so an
/// origin connection is only ever used by the worker thread that drives it.
///
/// This is hyper's connection-level client with a pool of our own rather than
/// hyper-util's pooled client: on a single-threaded worker the pool is a stack behind an
/// uncontended lock, a connection goes back to it when the response body ends (no task per
/// request to watch for that), and no hashing of the origin's address per request.
pub(crate) struct OriginClient {
    pools: Vec<Arc<Pool>>,
    connector: HttpsConnector<HttpConnector>,
    origin: Origin,
    /// The origin as a URI, for the connector.
    target: Uri,
}

/// Idle connections to one origin on one worker, most recently used last.
struct Pool {
    idle: Mutex<Vec<Idle>>,
    /// How long a connection may stay idle.
    keep: Duration,
    /// Whether the task that closes connections idle too long runs.
    sweeping: AtomicBool,
    /// Quarters of `keep` counted by that task: idle times are measured in them, so putting
    /// a connection back reads no clock.
    quarter: AtomicU64,
}

struct Idle {
    conn: Conn,
    /// `Pool::quarter` when the connection went idle.
    since: u64,
}

type OriginIo = hyper_rustls::MaybeHttpsStream<TokioIo<TcpStream>>;

/// One origin connection: the handle requests are sent on, and the connection itself. It
/// has no task of its own: whoever waits on it (the request being sent, then its response
/// body) polls it, so the origin's answer wakes the client connection's task directly.
struct Conn {
    tx: SendRequest<ClientBody>,
    /// `None` once the connection has ended.
    io: Option<Pin<Box<http1::Connection<OriginIo, ClientBody>>>>,
}

impl Conn {
    /// Lets the connection make progress: write the request, read the response.
    fn poll_io(&mut self, cx: &mut Context<'_>) {
        if let Some(io) = &mut self.io {
            if let Poll::Ready(r) = io.as_mut().poll(cx) {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "origin connection ended with an error");
                }
                self.io = None;
            }
        }
    }

    /// Open and idle, ready for the next request.
    fn reusable(&self) -> bool {
        self.io.is_some() && self.tx.is_ready()
    }
}

impl Pool {
    fn new(keep: Duration) -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            keep,
            sweeping: AtomicBool::new(false),
            quarter: AtomicU64::new(0),
        }
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = lock(&self.idle);
        while let Some(mut c) = idle.pop() {
            // Nobody polls an idle connection: this notices an origin that closed it
            // (reading costs no system call unless the socket has become readable).
            c.conn
                .poll_io(&mut Context::from_waker(std::task::Waker::noop()));
            if c.conn.reusable() {
                return Some(c.conn);
            }
        }
        None
    }

    fn checkin(self: &Arc<Self>, conn: Conn) {
        {
            let mut idle = lock(&self.idle);
            if idle.len() >= POOL_MAX_IDLE {
                idle.remove(0);
            }
            idle.push(Idle {
                conn,
                since: self.quarter.load(Ordering::Relaxed),
            });
        }
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(sweep(Arc::downgrade(self)));
            }
        }
    }
}

/// Closes a pool's connections once idle longer than its limit (within a quarter more), and
/// ends with the pool. A connection that went idle during quarter q has been idle four to five
/// quarters when quarter q + 5 begins.
async fn sweep(pool: Weak<Pool>) {
    let every = match pool.upgrade() {
        Some(p) => (p.keep / 4).max(Duration::from_millis(10)),
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let now = pool.quarter.fetch_add(1, Ordering::Relaxed) + 1;
        let mut idle = lock(&pool.idle);
        // Oldest first: the stale ones are a prefix.
        let stale = idle.iter().take_while(|c| now - c.since >= 5).count();
        idle.drain(..stale);
    }
}

/// The connectors of one apply, shared by the sites with the same kind of origin: building a
/// TLS client config (trust anchors, session cache) once instead of once per site keeps an
/// apply of many sites fast and small, and lets sites on one origin resume its TLS sessions.
#[derive(Default)]
pub(crate) struct Connectors {
    /// By (origin is https, extra trust anchors file).
    built: std::collections::HashMap<
        (bool, Option<std::path::PathBuf>),
        HttpsConnector<HttpConnector>,
    >,
}

impl Connectors {
    fn get(
        &mut self,
        site: &Site,
        edge: &EdgeSettings,
    ) -> Result<HttpsConnector<HttpConnector>, String> {
        let key = (site.origin.is_https(), site.origin_ca.clone());
        if let Some(c) = self.built.get(&key) {
            return Ok(c.clone());
        }
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(edge.origin_connect_timeout));
        let connector = if site.origin.is_https() {
            let extra = match &site.origin_ca {
                Some(path) => tls::load_certs(path).map_err(|e| e.to_string())?,
                None => Vec::new(),
            };
            let cfg = tls::client_config(&extra).map_err(|e| e.to_string())?;
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(cfg)
                .https_only()
                .enable_http1()
                .wrap_connector(http)
        } else {
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(empty_client_config()?)
                .https_or_http()
                .enable_http1()
                .wrap_connector(http)
        };
        self.built.insert(key, connector.clone());
        Ok(connector)
    }
}

impl OriginClient {
    pub(crate) fn new(
        site: &Site,
        edge: &EdgeSettings,
        workers: usize,
        connectors: &mut Connectors,
    ) -> Result<OriginClient, String> {
        let connector = connectors.get(site, edge)?;
        let target = Uri::builder()
            .scheme(site.origin.scheme.clone())
            .authority(site.origin.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| format!("origin {}: {e}", site.origin))?;
        Ok(OriginClient {
            pools: (0..workers.max(1))
                .map(|_| Arc::new(Pool::new(edge.origin_idle_timeout)))
                .collect(),
            connector,
            origin: site.origin.clone(),
            target,
        })
    }

    /// Sends `req` on a pooled connection, or a new one. A pooled connection the origin closed
    /// just before we wrote to it hands the request back unsent; it is then sent once more on a
    /// new connection.
    async fn send(
        &self,
        mut req: Request<ClientBody>,
    ) -> Result<Response<OriginBody>, Box<dyn std::error::Error + Send + Sync>> {
        let pool = &self.pools[crate::net::worker_index() % self.pools.len()];
        loop {
            let (mut conn, pooled) = match pool.checkout() {
                Some(c) => (c, true),
                None => (self.connect().await?, false),
            };
            let mut sent = pin!(conn.tx.try_send_request(req));
            let answer = poll_fn(|cx| {
                conn.poll_io(cx);
                sent.as_mut().poll(cx)
            })
            .await;
            match answer {
                Ok(resp) => {
                    let pool = pool.clone();
                    return Ok(resp.map(|body| OriginBody {
                        body,
                        done: false,
                        conn: Some(conn),
                        pool,
                        in_flight: None,
                    }));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if pooled => req = unsent,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }

    async fn connect(&self) -> Result<Conn, Box<dyn std::error::Error + Send + Sync>> {
        let io = self.connector.clone().call(self.target.clone()).await?;
        let (tx, io) = http1::Builder::new().handshake(io).await?;
        Ok(Conn {
            tx,
            io: Some(Box::pin(io)),
        })
    }
}

/// A client's request body on its way to the origin: the client's stream, after the part
/// of it the edge already read (to search a cleartext form or JSON body for credentials).
pub(crate) struct ClientBody {
    /// Data read ahead, sent first.
    prefix: Option<Bytes>,
    /// Trailers read ahead, when the body ended within the part read.
    trailers: Option<http::HeaderMap>,
    rest: Rest,
}

/// The client's stream: hyper's (HTTP/1.1, HTTP/2), or any other (an HTTP/3 request stream),
/// boxed: its state is several times hyper's, and this module need not know its type.
enum Rest {
    Hyper(Incoming),
    Boxed(http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError>),
}

/// What a request body can fail with: hyper's error, or the HTTP/3 stream's.
type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl ClientBody {
    pub(crate) fn new(rest: Incoming) -> ClientBody {
        ClientBody {
            prefix: None,
            trailers: None,
            rest: Rest::Hyper(rest),
        }
    }

    /// A body from elsewhere than hyper (HTTP/3).
    pub(crate) fn boxed<B>(rest: B) -> ClientBody
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BodyError>,
    {
        use http_body_util::BodyExt as _;
        ClientBody {
            prefix: None,
            trailers: None,
            rest: Rest::Boxed(rest.map_err(Into::into).boxed_unsync()),
        }
    }

    /// Reads up to `limit` bytes of the body (within `deadline`), returning them with a body
    /// that will send them first. The flag says whether the body ended within them.
    pub(crate) async fn read_prefix(
        mut self,
        limit: usize,
        deadline: std::time::Duration,
    ) -> (Bytes, bool, ClientBody) {
        use http_body_util::BodyExt as _;
        let mut buf = bytes::BytesMut::new();
        let mut trailers = None;
        let mut ended = self.is_end_stream();
        let read = async {
            while !ended && buf.len() < limit {
                match self.frame().await {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => buf.extend_from_slice(&data),
                        Err(frame) => {
                            trailers = frame.into_trailers().ok();
                            ended = true;
                        }
                    },
                    // An error or the end: what was read is all there is.
                    Some(Err(_)) | None => ended = true,
                }
            }
        };
        let _ = tokio::time::timeout(deadline, read).await;
        let prefix = buf.freeze();
        let body = ClientBody {
            prefix: (!prefix.is_empty()).then(|| prefix.clone()),
            trailers,
            rest: self.rest,
        };
        (prefix, ended, body)
    }
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(p) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        if let Some(t) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        match &mut self.rest {
            Rest::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Rest::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        let rest = match &self.rest {
            Rest::Hyper(b) => b.is_end_stream(),
            Rest::Boxed(b) => b.is_end_stream(),
        };
        self.prefix.is_none() && self.trailers.is_none() && rest
    }

    fn size_hint(&self) -> SizeHint {
        let rest = match &self.rest {
            Rest::Hyper(b) => b.size_hint(),
            Rest::Boxed(b) => b.size_hint(),
        };
        let ahead = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        if ahead == 0 {
            return rest;
        }
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + ahead);
        if let Some(u) = rest.upper() {
            hint.set_upper(u + ahead);
        }
        hint
    }
}

/// An origin's response body, streamed; it drives the origin connection while it is read,
/// and once read to its end the connection returns to its pool.
pub(crate) struct OriginBody {
    body: Incoming,
    done: bool,
    conn: Option<Conn>,
    pool: Arc<Pool>,
    /// The client connection's count of requests in flight, released when the body ends or
    /// is dropped.
    in_flight: Option<InFlight>,
}

impl OriginBody {
    /// Keeps `g` until this body is dropped.
    pub(crate) fn hold(&mut self, g: InFlight) {
        self.in_flight = Some(g);
    }
}

impl hyper::body::Body for OriginBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(c) = &mut this.conn {
            c.poll_io(cx);
        }
        let r = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = r {
            this.done = true;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for OriginBody {
    fn drop(&mut self) {
        // A body dropped before its end leaves the connection mid-response: it is closed.
        if !(self.done || self.body.is_end_stream()) {
            return;
        }
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if conn.reusable() {
            self.pool.checkin(conn);
        } else if let Ok(rt) = tokio::runtime::Handle::try_current() {
            // The connection has not finished the exchange yet (say, the rest of a request
            // body the origin answered early): drive it to the end, then pool it.
            let pool = self.pool.clone();
            rt.spawn(async move {
                let ready = poll_fn(|cx| {
                    conn.poll_io(cx);
                    if conn.io.is_none() {
                        return Poll::Ready(false);
                    }
                    conn.tx.poll_ready(cx).map(|r| r.is_ok())
                })
                .await;
                if ready {
                    pool.checkin(conn);
                }
            });
        }
    }
}

/// For plain-http origins the connector never uses TLS; it still needs a config.
fn empty_client_config() -> Result<rustls::ClientConfig, String> {
    Ok(rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth())
}

/// Sends `req` to the site's origin and returns its response, or 502/504 of our own.
pub(crate) async fn forward(
    origin: &OriginClient,
    mut req: Request<ClientBody>,
    client: &ClientAddr,
    proto: &'static str,
    edge: &EdgeSettings,
) -> Response<Body> {
    let authority_for_host = req.headers().get(HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    // Origin-form: the connection already goes to the origin.
    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(pq);
    *req.version_mut() = Version::HTTP_11;
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    let host = authority_for_host.unwrap_or(HeaderValue::from_static(""));
    set_forwarding(headers, client, proto, &host);
    if !host.is_empty() {
        headers.insert(HOST, host);
    }

    match tokio::time::timeout(edge.origin_response_timeout, origin.send(req)).await {
        Ok(Ok(mut resp)) => {
            strip_hop_by_hop(resp.headers_mut());
            resp.map(Either::Left)
        }
        Ok(Err(e)) if is_timeout(&*e) => gateway_timeout(),
        Ok(Err(e)) => {
            tracing::warn!(origin = %origin.origin, error = %crate::error_chain(&*e), "origin unreachable");
            text(
                StatusCode::BAD_GATEWAY,
                "502 Bad Gateway: the origin server could not be reached.\n",
            )
        }
        Err(_) => gateway_timeout(),
    }
}

fn gateway_timeout() -> Response<Body> {
    text(
        StatusCode::GATEWAY_TIMEOUT,
        "504 Gateway Timeout: the origin server did not answer in time.\n",
    )
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Removes headers that describe one connection (RFC 9110 section 7.6.1), including those
/// the Connection header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One scan of the names finds which are present; most messages carry none, or only
    // `Connection: keep-alive`, and then nothing else is hashed or allocated.
    let mut present = [false; HOP_COUNT];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    if present[0] {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|n| !n.eq_ignore_ascii_case("keep-alive") && !n.eq_ignore_ascii_case("close"))
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
}

/// Connection first: `strip_hop_by_hop` reads the names it lists.
const HOP_COUNT: usize = 8;
const HOP_BY_HOP: [HeaderName; HOP_COUNT] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
];

/// The edge is the first hop clients reach, so it states the client address itself rather
/// than trusting forwarding headers the client may have forged.
fn set_forwarding(
    headers: &mut HeaderMap,
    client: &ClientAddr,
    proto: &'static str,
    host: &HeaderValue,
) {
    headers.insert(X_FORWARDED_FOR, client.xff.clone());
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    // Keyed by host alone: a connection's protocol never changes.
    let forwarded = client
        .forwarded
        .get(host.as_bytes(), |_| forwarded(client, proto, host));
    if let Some(v) = forwarded {
        headers.insert(header::FORWARDED, v);
    }
}

/// RFC 7239: `host` is the Host header as the proxy received it. It is safe to quote: it
/// matched a configured site, so it is a DNS name with at most a numeric port.
fn forwarded(client: &ClientAddr, proto: &str, host: &HeaderValue) -> Option<HeaderValue> {
    let host = host.to_str().ok()?;
    let mut v = String::with_capacity(client.node.len() + host.len() + 24);
    v.push_str("for=");
    v.push_str(&client.node);
    v.push_str(";proto=");
    v.push_str(proto);
    v.push_str(";host=\"");
    v.push_str(host);
    v.push('"');
    HeaderValue::try_from(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_including_named_ones() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn forwarding_headers_replace_client_supplied_ones() {
        let client = ClientAddr::new("2001:db8::1".parse().expect("ip"));
        // The connection's first host, again (from the per-connection cache), then another.
        for host in ["a.example", "a.example", "b.example:8443"] {
            let mut h = HeaderMap::new();
            h.insert(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
            h.insert(header::FORWARDED, HeaderValue::from_static("for=6.6.6.6"));
            set_forwarding(&mut h, &client, "https", &HeaderValue::from_static(host));
            assert_eq!(h[X_FORWARDED_FOR], "2001:db8::1");
            assert_eq!(
                h[header::FORWARDED],
                format!("for=\"[2001:db8::1]\";proto=https;host=\"{host}\"")
            );
        }
    }
}
