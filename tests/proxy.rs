//! The reverse proxy: HTTP/1.1 and HTTP/2 clients, forwarding headers, streaming both ways,
//! pooled origin connections, https origins, HSTS, and the edge's own error answers.

mod support;

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{
    client_config, echoed, get, get_h2, https, loopback, tls_connect, wait_until, Harness, TestCa,
    TestOrigin, PATIENCE,
};

struct Setup {
    h: Harness,
    a: SocketAddr,
    origin: TestOrigin,
}

async fn setup(extra_sites: &str) -> Setup {
    setup_with("", extra_sites).await
}

/// `setup` with more `[edge]` keys.
async fn setup_with(edge: &str, extra_sites: &str) -> Setup {
    let origin = TestOrigin::start().await;
    let dead = {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        l.local_addr().expect("addr")
    };
    let ip = loopback();
    let toml = format!(
        r#"
[state]
dir = "STATE"
[edge]
origin_response_timeout = "500ms"
max_header_bytes = 8192
{edge}
[[pool]]
name = "main"
addresses = ["{ip}"]
tls_ports = [7443]
[[site]]
host = "app.test"
pool = "main"
origin = "{o}"
hsts = {{ max_age = 63072000, include_subdomains = true, preload = true }}
[[site]]
host = "nohsts.test"
pool = "main"
origin = "{o}"
hsts = {{ enabled = false }}
[[site]]
host = "dead.test"
pool = "main"
origin = "http://{dead}"
{extra_sites}
"#,
        o = origin.url()
    );
    let h = Harness::start(&toml).await;
    Setup {
        h,
        a: SocketAddr::from((ip, 7443)),
        origin,
    }
}

/// An HTTP/2 connection to `app.test`, and the task driving it (abort it to hang up).
async fn h2_app<B>(
    s: &Setup,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
)
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tls = tls_connect(s.a, "app.test", client_config(s.h.roots(), &[b"h2"]))
        .await
        .expect("tls");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2");
    (sender, tokio::spawn(conn))
}

/// GET `https://app.test{path}` over a fresh TLS connection, HTTP/2 if `h2`.
async fn get_app(s: &Setup, path: &str, h2: bool) -> support::Got {
    let url = format!("https://app.test{path}");
    let req = if h2 { get_h2(&url) } else { get(&url) };
    https(s.a, "app.test", s.h.roots(), h2, req).await
}

/// Two more requests to `app.test`, each answered 200. One stuck behind a response that never
/// ends would wait forever, so any finite bound tells them apart: a generous one, so that a
/// loaded machine does not.
async fn answers_twice_in_time(s: &Setup, why: &str) {
    for _ in 0..2 {
        let got = tokio::time::timeout(
            PATIENCE,
            https(
                s.a,
                "app.test",
                s.h.roots(),
                false,
                get("https://app.test/"),
            ),
        )
        .await
        .expect(why);
        assert_eq!(got.status, 200);
    }
}

type Chunks = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, Infallible>>;
type StreamedBody = StreamBody<support::ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

/// A POST whose body has sent `first` and stays open: the sender writes the rest (or drops to
/// end it).
async fn streaming_post(url: &str, first: &'static str) -> (Chunks, Request<StreamedBody>) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let req = Request::post(url)
        .body(StreamBody::new(support::tokio_stream_from(rx)))
        .expect("req");
    tx.send(Ok(Frame::data(Bytes::from(first))))
        .await
        .expect("send");
    (tx, req)
}

#[tokio::test]
async fn http1_and_http2_are_proxied_with_forwarding_headers_and_host_kept() {
    let s = setup("").await;
    for h2 in [false, true] {
        let req = Request::get(if h2 {
            "https://app.test:7443/p/q?x=1"
        } else {
            "/p/q?x=1"
        })
        .header("x-forwarded-for", "6.6.6.6")
        .header("forwarded", "for=6.6.6.6")
        .header("x-client", "kept");
        let req = if h2 {
            req
        } else {
            req.header("host", "app.test:7443")
        };
        let got = https(
            s.a,
            "app.test",
            s.h.roots(),
            h2,
            req.body(Full::new(Bytes::new())).expect("req"),
        )
        .await;
        assert_eq!(got.status, 200, "h2={h2}");
        assert_eq!(
            got.version,
            if h2 {
                http::Version::HTTP_2
            } else {
                http::Version::HTTP_11
            }
        );
        let b = &got.body;
        assert!(b.contains("path: /p/q?x=1"), "{b}");
        assert_eq!(echoed(b, "host"), Some("app.test:7443"), "{b}");
        assert_eq!(echoed(b, "x-forwarded-for"), Some("127.0.0.1"), "{b}");
        assert_eq!(echoed(b, "x-forwarded-proto"), Some("https"));
        assert_eq!(
            echoed(b, "forwarded"),
            Some("for=127.0.0.1;proto=https;host=\"app.test:7443\"")
        );
        assert_eq!(echoed(b, "x-client"), Some("kept"));
        assert_eq!(
            got.headers["strict-transport-security"],
            "max-age=63072000; includeSubDomains; preload"
        );
    }
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let s = setup("").await;
    let req = Request::get("/echo")
        .header("host", "app.test")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret-hop")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let got = https(s.a, "app.test", s.h.roots(), false, req).await;
    for h in ["x-hop", "keep-alive", "proxy-connection"] {
        assert_eq!(
            echoed(&got.body, h),
            None,
            "{h} reached the origin: {}",
            got.body
        );
    }
    let got = get_app(&s, "/hop", true).await;
    assert_eq!(got.status, 200);
    assert!(got.headers.get("x-resp-hop").is_none());
    assert!(got.headers.get("keep-alive").is_none());
    assert_eq!(got.headers["x-end-to-end"], "kept");
}

#[tokio::test]
async fn hsts_can_be_disabled_per_site() {
    let s = setup("").await;
    let got = https(
        s.a,
        "nohsts.test",
        s.h.roots(),
        false,
        get("https://nohsts.test/"),
    )
    .await;
    assert_eq!(got.status, 200);
    assert!(got.headers.get("strict-transport-security").is_none());
}

#[tokio::test]
async fn origin_connections_are_pooled_and_kept_alive() {
    let s = setup("").await;
    for _ in 0..5 {
        let got = get_app(&s, "/", false).await;
        assert_eq!(got.status, 200);
    }
    assert_eq!(s.origin.hits.load(Ordering::Relaxed), 5);
    assert_eq!(
        s.origin.conns.load(Ordering::Relaxed),
        1,
        "five client connections, one origin connection"
    );
}

#[tokio::test]
async fn chunked_responses_keep_the_origin_connection_and_closed_ones_are_replaced() {
    let s = setup("").await;
    for _ in 0..3 {
        let got = get_app(&s, "/chunked", false).await;
        assert_eq!(
            (got.status.as_u16(), got.body.as_str()),
            (200, "one\ntwo\n")
        );
    }
    assert_eq!(
        s.origin.conns.load(Ordering::Relaxed),
        1,
        "a chunked response read to its end returns the connection to the pool"
    );
    // The origin closes the connection after each of these answers: every next request must
    // find a new connection, not fail on the closed one.
    for i in 0..3 {
        let got = get_app(&s, "/close", true).await;
        assert_eq!(
            (got.status.as_u16(), got.body.as_str()),
            (200, "closing\n"),
            "request {i}"
        );
    }
    let got = get_app(&s, "/", false).await;
    assert_eq!(got.status, 200);
    assert_eq!(s.origin.conns.load(Ordering::Relaxed), 4);
}

#[tokio::test]
async fn origin_connections_idle_past_origin_idle_timeout_are_closed() {
    let s = setup_with(r#"origin_idle_timeout = "200ms""#, "").await;
    for _ in 0..2 {
        assert_eq!(get_app(&s, "/", false).await.status, 200);
    }
    assert_eq!(
        s.origin.conns.load(Ordering::Relaxed),
        1,
        "reused while fresh"
    );
    // Closed by the edge, not merely old: the origin sees the connection end.
    wait_until("the edge closes the idle origin connection", || {
        let closed = s.origin.closed.clone();
        async move { closed.load(Ordering::Relaxed) == 1 }
    })
    .await;
    assert_eq!(get_app(&s, "/", false).await.status, 200);
    assert_eq!(
        s.origin.conns.load(Ordering::Relaxed),
        2,
        "the idle connection was closed and a new one opened"
    );
}

#[tokio::test]
async fn a_response_the_client_abandons_does_not_leave_its_origin_connection_in_the_pool() {
    let s = setup("").await;
    let (mut sender, conn) = h2_app(&s).await;
    let resp = sender
        .send_request(get_h2("https://app.test/stream"))
        .await
        .expect("resp");
    let mut body = resp.into_body();
    let first = body.frame().await.expect("frame").expect("ok");
    assert_eq!(first.into_data().expect("data"), "first\n");
    // The client goes away mid-response.
    drop((body, sender));
    conn.abort();
    // The origin connection still carries the rest of /stream: a new request must not be
    // queued behind it.
    answers_twice_in_time(&s, "answered on another origin connection").await;
    assert_eq!(s.origin.conns.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn response_bodies_stream_without_waiting_for_the_end() {
    let s = setup("").await;
    let (mut sender, _conn) = h2_app(&s).await;
    let resp = sender
        .send_request(get_h2("https://app.test/stream"))
        .await
        .expect("resp");
    let mut body = resp.into_body();
    let first = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .expect("first chunk arrives while the origin still holds the rest")
        .expect("frame")
        .expect("ok");
    assert_eq!(first.into_data().expect("data"), "first\n");
    s.origin.release();
    let rest = body.collect().await.expect("rest").to_bytes();
    assert_eq!(rest, "second\n");
}

#[tokio::test]
async fn request_bodies_stream_to_the_origin_without_waiting_for_the_end() {
    let s = setup("").await;
    let (mut sender, _conn) = h2_app(&s).await;
    let (tx, req) = streaming_post("https://app.test/echo-body", "ping-1").await;
    let resp = sender.send_request(req).await.expect("resp");
    let mut body = resp.into_body();
    let echoed = tokio::time::timeout(PATIENCE, body.frame())
        .await
        .expect("the origin saw the first chunk while the request body is still open")
        .expect("frame")
        .expect("ok");
    assert_eq!(echoed.into_data().expect("data"), "ping-1");
    tx.send(Ok(Frame::data(Bytes::from("ping-2"))))
        .await
        .expect("send");
    drop(tx);
    let rest = body.collect().await.expect("rest").to_bytes();
    assert_eq!(rest, "ping-2");
}

#[tokio::test]
async fn an_origin_answering_before_the_request_body_ends_is_served_and_the_next_request_too() {
    let s = setup("").await;
    let (mut sender, _conn) = h2_app(&s).await;
    // The origin's default route answers without reading the body.
    let (tx, req) = streaming_post("https://app.test/early", "part-1").await;
    let resp = tokio::time::timeout(PATIENCE, sender.send_request(req))
        .await
        .expect("answered while the request body is still open")
        .expect("resp");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("path: /early"));
    let _ = tx.send(Ok(Frame::data(Bytes::from("part-2")))).await;
    drop(tx);
    answers_twice_in_time(&s, "the next request is not stuck behind the earlier one").await;
}

#[tokio::test]
async fn unreachable_origin_is_502_and_slow_origin_is_504() {
    let s = setup("").await;
    let got = https(
        s.a,
        "dead.test",
        s.h.roots(),
        false,
        get("https://dead.test/"),
    )
    .await;
    assert_eq!(got.status, 502);
    assert!(got.body.contains("could not be reached"));
    let got = get_app(&s, "/slow/3000", true).await;
    assert_eq!(got.status, 504);
    assert!(got.body.contains("did not answer in time"));
    let got = get_app(&s, "/slow/10", true).await;
    assert_eq!(got.status, 200);
}

#[tokio::test]
async fn oversized_request_headers_get_431_on_http1_and_http2() {
    let s = setup("").await;
    let big = "x".repeat(20_000);
    let req = Request::get("/")
        .header("host", "app.test")
        .header("x-big", big.as_str());
    let got = https(
        s.a,
        "app.test",
        s.h.roots(),
        false,
        req.body(Full::new(Bytes::new())).expect("req"),
    )
    .await;
    assert_eq!(got.status, 431);
    let req = Request::get("https://app.test/").header("x-big", big.as_str());
    let got = https(
        s.a,
        "app.test",
        s.h.roots(),
        true,
        req.body(Full::new(Bytes::new())).expect("req"),
    )
    .await;
    assert_eq!(got.status, 431);
    assert_eq!(s.origin.hits.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn https_origins_are_certificate_verified() {
    let ca = TestCa::new();
    let tls_origin = TestOrigin::start_tls(&ca).await;
    let ca_dir = tempfile::tempdir().expect("tmp");
    let ca_file = ca.write_ca(ca_dir.path());
    let port = tls_origin.addr.port();
    let sites = format!(
        r#"
[[site]]
host = "secure.test"
pool = "main"
origin = "https://localhost:{port}"
origin_ca = "{ca}"
[[site]]
host = "untrusted.test"
pool = "main"
origin = "https://localhost:{port}"
"#,
        ca = ca_file.display()
    );
    let s = setup(&sites).await;
    let got = https(
        s.a,
        "secure.test",
        s.h.roots(),
        false,
        get("https://secure.test/x"),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(echoed(&got.body, "x-forwarded-proto"), Some("https"));
    let got = https(
        s.a,
        "untrusted.test",
        s.h.roots(),
        false,
        get("https://untrusted.test/x"),
    )
    .await;
    assert_eq!(
        got.status, 502,
        "an origin certificate from an unknown CA is refused"
    );
    assert_eq!(tls_origin.hits.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_client_slow_to_send_its_headers_is_cut_off_after_the_header_read_timeout() {
    let origin = TestOrigin::start().await;
    let ip = loopback();
    let toml = format!(
        r#"
[state]
dir = "STATE"
[edge]
header_read_timeout = "300ms"
[[pool]]
name = "p"
addresses = ["{ip}"]
tls_ports = [7443]
[[site]]
host = "slow.test"
pool = "p"
origin = "{o}"
"#,
        o = origin.url()
    );
    let h = Harness::start(&toml).await;
    let mut tls = tls_connect(
        SocketAddr::from((ip, 7443)),
        "slow.test",
        client_config(h.roots(), &[b"http/1.1"]),
    )
    .await
    .expect("tls");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"GET / HTTP/1.1\r\nHost: slow.test\r\nX-Slow: ")
        .await
        .expect("write");
    let started = tokio::time::Instant::now();
    let mut buf = Vec::new();
    // Within PATIENCE only the header read timeout can close it: the idle timeout is 60 s.
    let _ = tokio::time::timeout(PATIENCE, tls.read_to_end(&mut buf))
        .await
        .expect("the edge closes the connection");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed too early"
    );
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    assert_eq!(origin.hits.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn an_origin_that_does_not_accept_the_connection_in_time_is_504() {
    // A listener with a zero backlog that never accepts: once its queue is full, the kernel
    // drops further SYNs, so connecting to it hangs until the edge's connect timeout.
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .expect("bind");
    socket.listen(0).expect("listen");
    let stuck: SocketAddr = socket
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet");
    // Connects started and never awaited: the kernel completes the first, which fills the
    // queue, and every socket is kept. (Awaiting each under a short timeout would close the
    // one that filled the queue if a loaded machine woke the task late.)
    let _fillers: Vec<socket2::Socket> = (0..4)
        .map(|_| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            s.set_nonblocking(true).expect("nonblocking");
            // In progress (EINPROGRESS) is the expected answer.
            let _ = s.connect(&stuck.into());
            s
        })
        .collect();
    let ip = loopback();
    let toml = format!(
        r#"
[state]
dir = "STATE"
[edge]
origin_connect_timeout = "300ms"
# Longer than PATIENCE, so only the connect timeout can answer within it.
origin_response_timeout = "120s"
[[pool]]
name = "p"
addresses = ["{ip}"]
tls_ports = [7443]
[[site]]
host = "stuck.test"
pool = "p"
origin = "http://{stuck}"
"#
    );
    let h = Harness::start(&toml).await;
    let started = tokio::time::Instant::now();
    let got = https(
        SocketAddr::from((ip, 7443)),
        "stuck.test",
        h.roots(),
        false,
        get("https://stuck.test/"),
    )
    .await;
    assert_eq!(got.status, 504, "{}", got.body);
    assert!(
        started.elapsed() < PATIENCE,
        "bounded by the connect timeout: {:?}",
        started.elapsed()
    );
}
