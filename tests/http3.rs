//! HTTP/3 toward clients: QUIC sockets on the TLS ports, the same sites, answers, headers and
//! analytics as over TCP; Alt-Svc and the HTTPS record advertise it; reloads, idle timeouts
//! and unknown names behave as over TCP. The client is the h3 crate's over quinn, on real
//! UDP sockets.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use bytes::{Buf, Bytes};
use http::Request;
use support::{client_config, get, get_h2, https, loopback, wait_until, Harness, TestOrigin};

const PORT: u16 = 7443;

fn config(ip: Ipv4Addr, origin: &str, edge: &str) -> String {
    format!(
        r#"
[state]
dir = "STATE"
[edge]
{edge}
[[pool]]
name = "closed"
addresses = ["{ip}"]
tls_ports = [{PORT}]
[[site]]
host = "app.test"
pool = "closed"
origin = "{origin}"
response_headers = {{ "X-Frame-Options" = "DENY" }}
[[site]]
host = "tcp-only.test"
pool = "closed"
origin = "{origin}"
http3 = false
"#
    )
}

struct Setup {
    h: Harness,
    ip: Ipv4Addr,
    origin: TestOrigin,
}

async fn setup(edge: &str) -> Setup {
    let origin = TestOrigin::start().await;
    let ip = loopback();
    let h = Harness::start(&config(ip, &origin.url(), edge)).await;
    Setup { h, ip, origin }
}

/// An HTTP/3 client connection: the QUIC connection (to watch it end) and h3's request
/// sender. Its own idle timeout is long, so any earlier close is the server's doing.
struct H3 {
    quic: quinn::Connection,
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
}

async fn quic_connect(s: &Setup, name: &str) -> Result<quinn::Connection, quinn::ConnectionError> {
    let mut tls = (*client_config(s.h.roots(), &[b"h3"])).clone();
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS config");
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(120)).expect("idle"),
    ));
    cfg.transport_config(Arc::new(t));
    let mut endpoint = quinn::Endpoint::client(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))
        .expect("client endpoint");
    endpoint.set_default_client_config(cfg);
    // The connection keeps its endpoint running once this handle is dropped.
    endpoint
        .connect(SocketAddr::new(IpAddr::V4(s.ip), PORT), name)
        .expect("connect")
        .await
}

async fn h3_connect(s: &Setup, name: &str) -> H3 {
    let quic = quic_connect(s, name).await.expect("QUIC handshake");
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(quic.clone()))
        .await
        .expect("h3 connection");
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    H3 { quic, send }
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

/// A request stream whose answer is read by the test.
type Stream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// Reads what is left of a response body.
async fn rest_of(stream: &mut Stream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.expect("body") {
        out.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    out
}

impl H3 {
    /// Starts a GET of the origin's `/stream` (its second half waits for `release`) and reads
    /// the response head.
    async fn start_stream(&mut self) -> Stream {
        let req = Request::get(format!("https://app.test:{PORT}/stream"))
            .body(())
            .expect("request");
        let mut stream = self.send.send_request(req).await.expect("send");
        stream.finish().await.expect("finish");
        let resp = stream.recv_response().await.expect("head");
        assert_eq!(resp.status(), 200);
        stream
    }

    /// Sends a request with `body` and reads the whole answer.
    async fn request(&mut self, req: Request<()>, body: Option<&str>) -> Answer {
        let mut stream = self.send.send_request(req).await.expect("send request");
        if let Some(b) = body {
            stream
                .send_data(Bytes::copy_from_slice(b.as_bytes()))
                .await
                .expect("send body");
        }
        stream.finish().await.expect("finish");
        let resp = stream.recv_response().await.expect("response");
        let out = rest_of(&mut stream).await;
        Answer {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: String::from_utf8_lossy(&out).into_owned(),
        }
    }

    async fn get(&mut self, url: &str) -> Answer {
        let req = Request::get(url).body(()).expect("request");
        self.request(req, None).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_over_http3_on_a_closed_pool_is_proxied_with_the_sites_headers_and_counted_as_h3() {
    let s = setup("").await;
    let mut c = h3_connect(&s, "app.test").await;
    let a = c.get(&format!("https://app.test:{PORT}/hello?x=1")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(
        a.body.starts_with("method: GET\npath: /hello?x=1\n"),
        "{}",
        a.body
    );
    // The origin saw an HTTP/1.1 request with the forwarding headers of a TLS request.
    assert!(a.body.contains("x-forwarded-proto: https"), "{}", a.body);
    assert!(a.body.contains("host: app.test:7443"), "{}", a.body);
    assert!(
        !a.body.contains("transfer-encoding"),
        "a GET reaches the origin without a body: {}",
        a.body
    );
    assert!(a.headers.contains_key("strict-transport-security"));
    assert_eq!(a.headers["x-frame-options"], "DENY");
    assert_eq!(a.headers["alt-svc"], "h3=\":7443\"; ma=86400");

    // A request body streams through to the origin and back.
    let req = Request::post(format!("https://app.test:{PORT}/echo-body"))
        .body(())
        .expect("request");
    let a = c.request(req, Some("key=value&more=1")).await;
    assert_eq!((a.status, a.body.as_str()), (200, "key=value&more=1"));

    // An unknown Host on a known connection: 421, as over TCP.
    let a = c.get(&format!("https://other.test:{PORT}/")).await;
    assert_eq!(a.status, 421);

    // Counted as TLS traffic, with its own scheme and HTTP version.
    let want = "portcullis_requests_total{site=\"app.test\",scheme=\"h3\",status=\"2xx\"} 2";
    wait_until("the requests are counted", || async {
        s.h.runtime.metrics().contains(want)
    })
    .await;
    let m = s.h.runtime.metrics();
    assert!(
        m.contains("portcullis_handshakes_total{transport=\"quic\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_answers_advertise_h3_only_for_sites_that_serve_it() {
    let s = setup("").await;
    let roots = s.h.roots();
    let addr = SocketAddr::new(IpAddr::V4(s.ip), PORT);
    let got = https(
        addr,
        "app.test",
        roots.clone(),
        false,
        get(&format!("https://app.test:{PORT}/")),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.headers["alt-svc"], "h3=\":7443\"; ma=86400");
    let got = https(
        addr,
        "app.test",
        roots.clone(),
        true,
        get_h2(&format!("https://app.test:{PORT}/")),
    )
    .await;
    assert_eq!(
        got.headers["alt-svc"], "h3=\":7443\"; ma=86400",
        "HTTP/2 too"
    );
    let got = https(
        addr,
        "tcp-only.test",
        roots,
        false,
        get(&format!("https://tcp-only.test:{PORT}/")),
    )
    .await;
    assert_eq!(got.status, 200);
    assert!(!got.headers.contains_key("alt-svc"), "{:?}", got.headers);

    // Over QUIC, the site with `http3 = false` is refused like an unknown name.
    let err = match quic_connect(&s, "tcp-only.test").await {
        Ok(conn) => conn.closed().await,
        Err(e) => e,
    };
    assert!(
        matches!(err, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == quinn::VarInt::from_u32(0x10b)),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_name_fails_the_quic_handshake() {
    let s = setup("").await;
    let err = quic_connect(&s, "unknown.test").await.expect_err("refused");
    // rustls finds no certificate: the handshake ends with a TLS alert, before any request.
    assert!(
        matches!(err, quinn::ConnectionError::ConnectionClosed(ref c)
            if String::from_utf8_lossy(&c.reason).contains("no server certificate")),
        "{err:?}"
    );
    wait_until("the failure is counted", || async {
        s.h.runtime.stats().handshake_failures >= 1
    })
    .await;
    assert_eq!(s.h.runtime.stats().quic_handshakes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_an_open_quic_connection_and_its_request_in_flight() {
    let s = setup("").await;
    let mut c = h3_connect(&s, "app.test").await;
    let mut stream = c.start_stream().await;
    let mut first = stream
        .recv_data()
        .await
        .expect("data")
        .expect("first chunk");
    assert_eq!(&first.copy_to_bytes(first.remaining())[..], b"first\n");

    // A reload that changes the sites (and so the certificates the QUIC socket serves).
    let more = format!(
        "{}\n[[site]]\nhost = \"new.test\"\npool = \"closed\"\norigin = \"{}\"\n",
        config(s.ip, &s.origin.url(), ""),
        s.origin.url()
    );
    s.h.reload(&more).await.expect("reload");
    s.origin.release();
    assert_eq!(rest_of(&mut stream).await, b"second\n");
    // The same connection serves on, and a new one reaches the new site.
    let a = c.get(&format!("https://app.test:{PORT}/after")).await;
    assert_eq!(a.status, 200);
    let mut n = h3_connect(&s, "new.test").await;
    assert_eq!(
        n.get(&format!("https://new.test:{PORT}/")).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_quic_client_is_closed_by_the_idle_timeout() {
    let s = setup("idle_timeout = \"1s\"").await;
    let c = h3_connect(&s, "app.test").await;
    let start = Instant::now();
    wait_until("the server counts the connection", || async {
        s.h.runtime.stats().active_connections == 1
    })
    .await;
    let err = tokio::time::timeout(Duration::from_secs(5), c.quic.closed())
        .await
        .expect("closed within the idle timeout");
    let waited = start.elapsed();
    assert!(matches!(err, quinn::ConnectionError::TimedOut), "{err:?}");
    assert!(
        waited >= Duration::from_millis(800),
        "not before: {waited:?}"
    );
    wait_until("the server forgets it", || async {
        s.h.runtime.stats().active_connections == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_request_in_flight_finish_then_closes_the_connection() {
    let s = setup("close_timeout = \"1s\"").await;
    let mut c = h3_connect(&s, "app.test").await;
    let mut stream = c.start_stream().await;
    let runtime = Arc::new(s.h.runtime);
    let r = runtime.clone();
    let down = tokio::spawn(async move { r.shutdown(Duration::from_secs(10)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!down.is_finished(), "shutdown waits for the request");
    s.origin.release();
    assert_eq!(rest_of(&mut stream).await, b"first\nsecond\n");
    assert!(down.await.expect("join"), "drained in time");
    let err = tokio::time::timeout(Duration::from_secs(5), c.quic.closed())
        .await
        .expect("closed after the drain");
    assert!(
        !matches!(err, quinn::ConnectionError::TimedOut),
        "closed by the server, not timed out: {err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_new_clients_prove_their_address_with_a_retry_first() {
    // Threshold 0: every new client counts as arriving under load.
    let s = setup("quic_retry_above = 0").await;
    let mut c = h3_connect(&s, "app.test").await;
    assert_eq!(
        c.get(&format!("https://app.test:{PORT}/")).await.status,
        200
    );
    assert_eq!(
        s.h.runtime.stats().quic_retries,
        1,
        "one Retry, then served"
    );
    let m = s.h.runtime.metrics();
    assert!(m.contains("portcullis_quic_retries_total 1"), "{m}");

    // The default threshold asks nothing of a lone client.
    let s = setup("").await;
    let mut c = h3_connect(&s, "app.test").await;
    assert_eq!(
        c.get(&format!("https://app.test:{PORT}/")).await.status,
        200
    );
    assert_eq!(s.h.runtime.stats().quic_retries, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_connections_count_against_the_per_client_cap_with_tcp_ones() {
    let s = setup("max_connections_per_client = 1").await;
    let mut first = h3_connect(&s, "app.test").await;
    assert_eq!(
        first.get(&format!("https://app.test:{PORT}/")).await.status,
        200
    );
    // A second QUIC connection from the same address is refused before any handshake.
    let err = quic_connect(&s, "app.test").await.expect_err("refused");
    assert!(
        matches!(err, quinn::ConnectionError::ConnectionClosed(ref c)
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED),
        "{err:?}"
    );
    // And so is a TCP one: the place is taken.
    let tcp = support::tls_connect(
        SocketAddr::new(IpAddr::V4(s.ip), PORT),
        "app.test",
        client_config(s.h.roots(), &[b"http/1.1"]),
    )
    .await;
    assert!(tcp.is_err(), "the TCP connection is closed at accept");
    assert_eq!(s.h.runtime.stats().refused_per_client, 2);
    // The first connection still serves.
    assert_eq!(
        first
            .get(&format!("https://app.test:{PORT}/x"))
            .await
            .status,
        200
    );
}
