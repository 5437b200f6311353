//! Shared test harness: a real edge on a random loopback address, a test origin, and clients
//! that speak real TLS (rustls) and HTTP/1.1 or HTTP/2 (hyper) to it.
//!
//! Each test picks its own 127.x.y.z addresses, so tests run in parallel without port clashes.

// Each test file uses a different subset of the harness.
#![allow(dead_code)]

pub mod pebble;
pub mod postgres;
pub mod webhook;

use std::collections::hash_map::RandomState;
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::config::Config;
use portcullis::runtime::{ConfigSource, Runtime};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A `portcullis serve` child process, killed if the test ends early.
pub struct Serve {
    pub child: Child,
    pub dir: tempfile::TempDir,
}

impl Serve {
    pub fn start(toml: &str) -> Serve {
        Serve::start_logging(toml, None)
    }

    /// Starts `portcullis serve`; with `log`, its stderr (at RUST_LOG=trace) goes to that file.
    pub fn start_logging(toml: &str, log: Option<&Path>) -> Serve {
        let dir = tempfile::tempdir().expect("tmp");
        write_config(dir.path(), toml);
        let child = spawn_serve(dir.path(), log);
        Serve { child, dir }
    }

    /// Starts a new process on the same directory (after [`Serve::stop`]).
    pub fn respawn(&mut self) {
        self.child = spawn_serve(self.dir.path(), None);
    }

    pub fn write(&self, toml: &str) {
        write_config(self.dir.path(), toml);
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    pub fn ca(&self) -> std::path::PathBuf {
        self.dir.path().join("state").join("dev-ca.pem")
    }
}

pub fn write_config(dir: &std::path::Path, toml: &str) {
    let text = toml.replace("STATE", &dir.join("state").display().to_string());
    std::fs::write(dir.join("portcullis.toml"), text).expect("write config");
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_serve(dir: &Path, log: Option<&Path>) -> Child {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["serve", "--workers", "2", "-c"])
        .arg(dir.join("portcullis.toml"))
        .env("RUST_LOG", if log.is_some() { "trace" } else { "info" })
        .stdout(Stdio::null())
        .stderr(match log {
            Some(p) => Stdio::from(std::fs::File::create(p).expect("log file")),
            None => Stdio::null(),
        })
        .spawn()
        .expect("spawn serve")
}

impl Serve {
    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        self.child.wait().expect("wait")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

/// How long a test waits for something that should happen: far more than it takes on an idle
/// machine, so a loaded one (a CI runner, another build on the same cores) makes the test slower
/// rather than failing it. It stays below the edge's default idle timeouts (60 s, and 50 s for
/// origin connections), so a bound of `PATIENCE` still tells a short configured timeout from
/// those.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A wall-clock deadline `PATIENCE` from now. Wall clock on purpose: a paused tokio clock would
/// run through a deadline in virtual time without the edge having had any real time at all.
pub struct Deadline(std::time::Instant);

impl Deadline {
    #[allow(clippy::disallowed_methods)]
    pub fn start() -> Deadline {
        Deadline(std::time::Instant::now())
    }

    pub fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }

    pub fn passed(&self) -> bool {
        self.elapsed() >= PATIENCE
    }
}

/// Polls `f` until it returns true, every 25 ms for up to [`PATIENCE`]; panics naming `what`
/// and how long it waited.
pub async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Deadline::start();
    while !f().await {
        if deadline.passed() {
            panic!(
                "timed out waiting until {what}: still not true after {:.1?}",
                deadline.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// [`wait_until`] for a plain `#[test]` thread, with no runtime to block: polls every 100 ms.
pub fn wait_until_blocking(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Deadline::start();
    while !f() {
        if deadline.passed() {
            panic!(
                "timed out waiting until {what}: still not true after {:.1?}",
                deadline.elapsed()
            );
        }
        pause(Duration::from_millis(100));
    }
}

/// Sleeps the calling thread, for tests that run without a runtime.
#[allow(clippy::disallowed_methods)]
pub fn pause(d: Duration) {
    std::thread::sleep(d);
}

/// Pushes onto a vector behind a mutex, poisoned or not.
pub fn lock_push<T>(m: &std::sync::Mutex<Vec<T>>, v: T) {
    m.lock().unwrap_or_else(|p| p.into_inner()).push(v);
}

/// A random address in 127.0.0.0/8, away from 127.0.0.x which people use by hand.
pub fn loopback() -> Ipv4Addr {
    static N: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    let r = h.finish();
    Ipv4Addr::new(
        127,
        1 + (r % 250) as u8,
        ((r >> 8) % 256) as u8,
        1 + ((r >> 16) % 250) as u8,
    )
}

/// A running portcullis built from a TOML text, with its temporary directory.
pub struct Harness {
    pub runtime: Runtime,
    pub dir: tempfile::TempDir,
}

impl Harness {
    /// Writes `toml` (with `STATE` replaced by a temp state dir) and starts the edge.
    pub async fn start(toml: &str) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = toml.replace("STATE", &dir.path().join("state").display().to_string());
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, text).expect("write config");
        let runtime = Runtime::start(ConfigSource::File(path), None)
            .await
            .unwrap_or_else(|e| panic!("portcullis starts: {e}"));
        Harness { runtime, dir }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("portcullis.toml")
    }

    /// The development CA that signs certificates of sites without a configured one.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("state").join("dev-ca.pem")
    }

    pub fn roots(&self) -> RootCertStore {
        roots_from(&self.ca())
    }

    /// Applies a new TOML text as a reload.
    pub async fn reload(&self, toml: &str) -> Result<(), String> {
        let text = toml.replace(
            "STATE",
            &self.dir.path().join("state").display().to_string(),
        );
        let config =
            Config::from_toml(&text, "reload", self.dir.path()).map_err(|e| e.to_string())?;
        self.runtime.apply(config).await.map_err(|e| e.to_string())
    }
}

pub fn roots_from(pem: &Path) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for c in portcullis::tls::load_certs(pem).expect("CA pem") {
        roots.add(c).expect("CA cert");
    }
    roots
}

/// A TLS client config trusting `roots`, offering the given ALPN protocols.
pub fn client_config(roots: RootCertStore, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// Connects to `addr` and completes a TLS handshake with SNI `name`.
pub async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from(name.to_owned()).expect("server name");
    TlsConnector::from(cfg).connect(server_name, tcp).await
}

/// A response read whole.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
    pub version: http::Version,
}

/// Sends one request over a fresh TLS connection, HTTP/2 if `h2`.
pub async fn https(
    addr: SocketAddr,
    sni: &str,
    roots: RootCertStore,
    h2: bool,
    req: Request<Full<Bytes>>,
) -> Got {
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let tls = tls_connect(addr, sni, client_config(roots, alpn))
        .await
        .expect("TLS handshake");
    send(TokioIo::new(tls), h2, req).await
}

/// Sends one cleartext HTTP/1.1 request.
pub async fn http(addr: SocketAddr, req: Request<Full<Bytes>>) -> Got {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    send(TokioIo::new(tcp), false, req).await
}

pub async fn send<T>(io: TokioIo<T>, h2: bool, req: Request<Full<Bytes>>) -> Got
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let resp = if h2 {
        let (mut s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        s.send_request(req).await.expect("h2 response")
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        s.send_request(req).await.expect("h1 response")
    };
    read(resp).await
}

pub async fn read(resp: Response<Incoming>) -> Got {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        version: parts.version,
    }
}

/// A GET request with a Host header (HTTP/1.1) or authority (HTTP/2).
pub fn get(url: &str) -> Request<Full<Bytes>> {
    let uri: http::Uri = url.parse().expect("url");
    let host = uri.authority().expect("authority").to_string();
    Request::get(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .expect("request")
}

/// An HTTP/2 request carries the authority in the URI, not in Host.
pub fn get_h2(url: &str) -> Request<Full<Bytes>> {
    Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request")
}

/// A loopback origin for tests. Routes:
/// - `/slow/MS`: answers after MS milliseconds;
/// - `/stream`: sends "first\n" at once, then "second\n" after `/release` is requested;
/// - `/echo-body`: streams the request body back as it arrives;
/// - `/chunked`: two chunks at once, with no length (chunked transfer coding);
/// - `/close`: answers with `Connection: close`, then closes;
/// - anything else: the method, path and every request header, one per line.
pub struct TestOrigin {
    pub addr: SocketAddr,
    release: Arc<tokio::sync::Notify>,
    pub hits: Arc<AtomicU64>,
    /// TCP connections accepted, to observe pooling.
    pub conns: Arc<AtomicU64>,
    /// TCP connections that have ended, to observe the edge closing idle ones.
    pub closed: Arc<AtomicU64>,
}

impl TestOrigin {
    pub async fn start() -> TestOrigin {
        TestOrigin::start_inner(None).await
    }

    /// An origin speaking HTTPS with a certificate for `localhost` from `ca`.
    pub async fn start_tls(ca: &TestCa) -> TestOrigin {
        let dir = tempfile::tempdir().expect("tmp");
        let (cert, key) = ca.issue(dir.path(), "origin", &["localhost"]);
        let ck = portcullis::tls::load_certified_key(&cert, &key).expect("origin cert");
        let cfg = rustls::ServerConfig::builder_with_provider(portcullis::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_cert_resolver({
                let mut certs = portcullis::tls::SniCerts::default();
                certs.insert(
                    &portcullis::config::HostPattern::Exact("localhost".into()),
                    ck,
                );
                Arc::new(certs)
            });
        TestOrigin::start_inner(Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))).await
    }

    async fn start_inner(tls: Option<tokio_rustls::TlsAcceptor>) -> TestOrigin {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("origin bind");
        let addr = listener.local_addr().expect("origin addr");
        let release = Arc::new(tokio::sync::Notify::new());
        let hits = Arc::new(AtomicU64::new(0));
        let conns = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(AtomicU64::new(0));
        let (r, h, c, d) = (release.clone(), hits.clone(), conns.clone(), closed.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::Relaxed);
                let (r, h, d) = (r.clone(), h.clone(), d.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| origin_handle(req, r.clone(), h.clone()));
                    let b = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = b.serve_connection(TokioIo::new(s), svc).await;
                        }
                        Some(acceptor) => {
                            if let Ok(t) = acceptor.accept(s).await {
                                let _ = b.serve_connection(TokioIo::new(t), svc).await;
                            }
                        }
                    }
                    d.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        TestOrigin {
            addr,
            release,
            hits,
            conns,
            closed,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn release(&self) {
        self.release.notify_waiters();
        self.release.notify_one();
    }
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn origin_handle(
    req: Request<Incoming>,
    release: Arc<tokio::sync::Notify>,
    hits: Arc<AtomicU64>,
) -> Result<Response<OriginBody>, Infallible> {
    hits.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_owned();
    if let Some(ms) = path.strip_prefix("/slow/") {
        let ms: u64 = ms.parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return Ok(Response::new(
            Full::new(Bytes::from(format!("slept {ms}\n"))).boxed(),
        ));
    }
    if path == "/hop" {
        let resp = Response::builder()
            .header("connection", "x-resp-hop")
            .header("x-resp-hop", "1")
            .header("keep-alive", "timeout=9")
            .header("x-end-to-end", "kept")
            .body(Full::new(Bytes::from("hop\n")).boxed())
            .expect("response");
        return Ok(resp);
    }
    if path == "/release" {
        release.notify_waiters();
        return Ok(Response::new(Full::new(Bytes::from("released\n")).boxed()));
    }
    if path == "/stream" {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
        tokio::spawn(async move {
            let _ = tx.send(Ok(Frame::data(Bytes::from("first\n")))).await;
            release.notified().await;
            let _ = tx.send(Ok(Frame::data(Bytes::from("second\n")))).await;
        });
        let body = StreamBody::new(tokio_stream_from(rx));
        return Ok(Response::new(BodyExt::boxed(body)));
    }
    if path == "/chunked" {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
        let _ = tx.try_send(Ok(Frame::data(Bytes::from("one\n"))));
        let _ = tx.try_send(Ok(Frame::data(Bytes::from("two\n"))));
        return Ok(Response::new(BodyExt::boxed(StreamBody::new(
            tokio_stream_from(rx),
        ))));
    }
    if path == "/close" {
        let resp = Response::builder()
            .header("connection", "close")
            .body(Full::new(Bytes::from("closing\n")).boxed())
            .expect("response");
        return Ok(resp);
    }
    if path == "/echo-body" {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
        let mut body = req.into_body();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    if tx.send(Ok(Frame::data(data))).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Ok(Response::new(BodyExt::boxed(StreamBody::new(
            tokio_stream_from(rx),
        ))));
    }
    let mut text = format!("method: {}\npath: {}\n", req.method(), req.uri());
    for (k, v) in req.headers() {
        text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
    }
    Ok(Response::new(Full::new(Bytes::from(text)).boxed()))
}

/// Adapts an mpsc receiver into a `Stream` without pulling in tokio-stream.
pub fn tokio_stream_from<T>(rx: tokio::sync::mpsc::Receiver<T>) -> ReceiverStream<T> {
    ReceiverStream(rx)
}

pub struct ReceiverStream<T>(tokio::sync::mpsc::Receiver<T>);

impl<T> futures_core::Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

/// The value of the header line `name: value` in an origin echo.
pub fn echoed<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(": ")))
}

/// Whether a TCP connect to `addr` is refused by the kernel.
pub async fn refused(addr: SocketAddr) -> bool {
    match TcpStream::connect(addr).await {
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Ok(_) => false,
    }
}

/// Certificate files signed by a throwaway CA, for sites that configure `cert` and `key`.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub cert_pem: String,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "portcullis test CA");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed");
        TestCa {
            cert_pem: cert.pem(),
            der: cert.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// Writes `NAME.pem` and `NAME.key` for the given DNS names into `dir`.
    pub fn issue(&self, dir: &Path, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let c = dir.join(format!("{file}.pem"));
        let k = dir.join(format!("{file}.key"));
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k)
    }

    pub fn roots(&self) -> RootCertStore {
        let mut r = RootCertStore::empty();
        r.add(self.der.clone()).expect("root");
        r
    }

    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let p = dir.join("test-ca.pem");
        std::fs::write(&p, &self.cert_pem).expect("write ca");
        p
    }
}
