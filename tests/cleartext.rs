//! Invariant 1 and the cleartext modes: closed pools refuse at the transport layer; open pools
//! redirect, reject or allow, and answer 421 to hosts they do not serve.

mod support;

use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use portcullis::config::WELL_KNOWN_CLEARTEXT_PORTS;
use support::{echoed, get, http, loopback, refused, Harness, TestOrigin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Setup {
    h: Harness,
    closed: std::net::Ipv4Addr,
    open: std::net::Ipv4Addr,
    origin: TestOrigin,
}

async fn setup() -> Setup {
    let origin = TestOrigin::start().await;
    let (closed, open) = (loopback(), loopback());
    let toml = format!(
        r#"
[state]
dir = "STATE"

[[pool]]
name = "closed"
addresses = ["{closed}"]
tls_ports = [8443]

[[pool]]
name = "open"
addresses = ["{open}"]
tls_ports = [8443]
cleartext_ports = [8080, 8880]

[[site]]
host = "api.test"
pool = "closed"
origin = "{o}"

[[site]]
host = "www.test"
pool = "open"
origin = "{o}"
cleartext = "redirect"

[[site]]
host = "*.apps.test"
pool = "open"
origin = "{o}"
cleartext = "redirect"

[[site]]
host = "legacy.test"
pool = "open"
origin = "{o}"
cleartext = "reject"

[[site]]
host = "old.test"
pool = "open"
origin = "{o}"
cleartext = "allow"
"#,
        o = origin.url()
    );
    let h = Harness::start(&toml).await;
    Setup {
        h,
        closed,
        open,
        origin,
    }
}

#[tokio::test]
async fn closed_address_refuses_every_cleartext_port_while_open_pool_answers() {
    let s = setup().await;
    let mut ports: Vec<u16> = WELL_KNOWN_CLEARTEXT_PORTS.to_vec();
    ports.extend([8080, 8880]);
    for port in ports {
        let addr = SocketAddr::from((s.closed, port));
        assert!(
            refused(addr).await,
            "cleartext connect to {addr} must be refused"
        );
    }
    // The open pool, on another address, serves the same cleartext port.
    let got = http(SocketAddr::from((s.open, 8080)), get("http://www.test/")).await;
    assert_eq!(got.status, 301);
    // The closed address still serves TLS.
    let got = support::https(
        SocketAddr::from((s.closed, 8443)),
        "api.test",
        s.h.roots(),
        false,
        get("https://api.test:8443/"),
    )
    .await;
    assert_eq!(got.status, 200);
    // And the edge never bound a cleartext socket there.
    let listening = s.h.runtime.listening().await;
    assert!(listening
        .iter()
        .all(|(a, k)| a.ip() != std::net::IpAddr::V4(s.closed)
            || *k != portcullis::config::ListenerKind::Cleartext));
}

#[tokio::test]
async fn redirect_uses_301_for_get_head_and_308_otherwise_to_the_configured_host() {
    let s = setup().await;
    let addr = SocketAddr::from((s.open, 8080));
    let got = http(addr, get("http://WWW.test:8080/a/b?x=1&y=%20")).await;
    assert_eq!(got.status, 301);
    assert_eq!(
        got.headers["location"],
        "https://www.test:8443/a/b?x=1&y=%20"
    );
    assert_eq!(got.headers["connection"], "close");

    let head = Request::head("/h")
        .header("host", "www.test")
        .body(Full::new(Bytes::new()))
        .expect("req");
    assert_eq!(http(addr, head).await.status, 301);

    let post = Request::post("/form")
        .header("host", "www.test")
        .body(Full::new(Bytes::from("a=1")))
        .expect("req");
    let got = http(addr, post).await;
    assert_eq!(got.status, 308);
    assert_eq!(got.headers["location"], "https://www.test:8443/form");

    // A wildcard site redirects to the matched name, nothing else.
    let got = http(addr, get("http://shop.apps.test/x")).await;
    assert_eq!(got.headers["location"], "https://shop.apps.test:8443/x");
    assert_eq!(
        s.origin.hits.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "redirects never reach the origin"
    );
}

#[tokio::test]
async fn unknown_host_on_cleartext_port_gets_421_and_no_redirect() {
    let s = setup().await;
    let addr = SocketAddr::from((s.open, 8080));
    for host in ["evil.example", "api.test", "a.b.apps.test"] {
        let got = http(addr, get(&format!("http://{host}/steal"))).await;
        assert_eq!(got.status, 421, "host {host}");
        assert!(got.headers.get("location").is_none());
        assert!(!got.body.contains(host), "the body does not echo the Host");
    }
}

/// Sends raw bytes on a fresh connection and returns everything until the server closes.
async fn raw(addr: SocketAddr, request: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(support::PATIENCE, s.read_to_end(&mut out))
        .await
        .expect("server closes the connection")
        .expect("read");
    out
}

#[tokio::test]
async fn reject_is_403_byte_for_byte_identical_with_or_without_credentials_and_closes() {
    let s = setup().await;
    let addr = SocketAddr::from((s.open, 8080));
    let plain = raw(addr, "GET /v1/items HTTP/1.1\r\nHost: legacy.test\r\n\r\n").await;
    let with_creds = raw(
        addr,
        "GET /v1/items?api_key=sk_live_123 HTTP/1.1\r\nHost: legacy.test\r\nAuthorization: Bearer tok_abc\r\nX-API-Key: k1\r\nCookie: session=s3cr3t\r\n\r\n",
    )
    .await;
    // read_to_end returning proves the server closed the connection.
    assert_eq!(plain, with_creds);
    let text = String::from_utf8(plain).expect("utf8");
    assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
    assert!(text.contains("HTTPS-only"));
    assert!(text.contains("rotate"));
    assert!(text.to_ascii_lowercase().contains("connection: close"));
    assert_eq!(s.origin.hits.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn redirect_closes_the_connection() {
    let s = setup().await;
    let out = raw(
        SocketAddr::from((s.open, 8080)),
        "GET / HTTP/1.1\r\nHost: www.test\r\n\r\nGET /second HTTP/1.1\r\nHost: www.test\r\n\r\n",
    )
    .await;
    let text = String::from_utf8(out).expect("utf8");
    assert_eq!(
        text.matches("HTTP/1.1 301").count(),
        1,
        "one answer, then close: {text}"
    );
}

#[tokio::test]
async fn allow_proxies_with_forwarded_proto_http_and_no_hsts() {
    let s = setup().await;
    let got = http(
        SocketAddr::from((s.open, 8080)),
        get("http://old.test/legacy?q=1"),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(echoed(&got.body, "x-forwarded-proto"), Some("http"));
    assert_eq!(echoed(&got.body, "host"), Some("old.test"));
    assert!(got.body.contains("path: /legacy?q=1"));
    assert!(
        got.headers.get("strict-transport-security").is_none(),
        "HSTS only over TLS"
    );
}

#[tokio::test]
async fn ipv6_loopback_pools_listen_and_refuse_too() {
    let origin = TestOrigin::start().await;
    // ::1 is the only IPv6 loopback address, so pick a random port pair for it.
    let base =
        20000 + (loopback().octets()[2] as u16) * 100 + (loopback().octets()[3] as u16 % 100);
    let (tls, clear) = (base, base + 1);
    let v4 = loopback();
    let toml = format!(
        r#"
[state]
dir = "STATE"
[[pool]]
name = "closed6"
addresses = ["::1"]
tls_ports = [{tls}]
[[pool]]
name = "open4"
addresses = ["{v4}"]
tls_ports = [{tls}]
cleartext_ports = [{clear}]
[[site]]
host = "v6.test"
pool = "closed6"
origin = "{o}"
[[site]]
host = "v4.test"
pool = "open4"
origin = "{o}"
cleartext = "reject"
"#,
        o = origin.url()
    );
    let h = Harness::start(&toml).await;
    let six: SocketAddr = format!("[::1]:{tls}").parse().expect("addr");
    let got = support::https(
        six,
        "v6.test",
        h.roots(),
        true,
        support::get_h2(&format!("https://v6.test:{tls}/")),
    )
    .await;
    assert_eq!(got.status, 200);
    assert!(refused(format!("[::1]:{clear}").parse().expect("addr")).await);
    assert_eq!(
        http(SocketAddr::from((v4, clear)), get("http://v4.test/"))
            .await
            .status,
        403
    );
}

#[tokio::test]
async fn absolute_form_targets_cannot_smuggle_another_host_and_connect_is_refused() {
    let s = setup().await;
    let addr = SocketAddr::from((s.open, 8080));
    let out = raw(
        addr,
        "GET http://evil.example/x HTTP/1.1\r\nHost: www.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8(out).expect("utf8");
    assert!(text.starts_with("HTTP/1.1 421"), "{text}");
    assert!(!text.to_ascii_lowercase().contains("location"));
    let out = raw(
        addr,
        "CONNECT www.test:443 HTTP/1.1\r\nHost: www.test:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8(out).expect("utf8");
    assert!(text.starts_with("HTTP/1.1 405"), "{text}");
}
