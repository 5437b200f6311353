//! TLS termination: certificate by SNI (exact, wildcard, files), no default certificate,
//! versions, ALPN, resumption, and what non-TLS bytes on a TLS port get.

mod support;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::{AlertDescription, HandshakeKind, ProtocolVersion};
use support::{
    client_config, get, get_h2, https, loopback, tls_connect, Harness, TestCa, TestOrigin, PATIENCE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Setup {
    h: Harness,
    a: SocketAddr,
    other: SocketAddr,
    ca: TestCa,
}

async fn setup() -> Setup {
    let origin = TestOrigin::start().await;
    let ca = TestCa::new();
    let files = tempfile::tempdir().expect("tmp");
    let (cert, key) = ca.issue(files.path(), "files", &["files.test"]);
    let (ip, other_ip) = (loopback(), loopback());
    let toml = format!(
        r#"
[state]
dir = "STATE"
[edge]
handshake_timeout = "400ms"
[[pool]]
name = "main"
addresses = ["{ip}"]
tls_ports = [9443]
[[pool]]
name = "other"
addresses = ["{other_ip}"]
tls_ports = [9443]
[[site]]
host = "exact.test"
pool = "main"
origin = "{o}"
[[site]]
host = "*.wild.test"
pool = "main"
origin = "{o}"
[[site]]
host = "files.test"
pool = "main"
origin = "{o}"
cert = "{cert}"
key = "{key}"
[[site]]
host = "elsewhere.test"
pool = "other"
origin = "{o}"
"#,
        o = origin.url(),
        cert = cert.display(),
        key = key.display(),
    );
    let h = Harness::start(&toml).await;
    // The files were read at load time; the temp dir may go.
    drop(files);
    Setup {
        h,
        a: SocketAddr::from((ip, 9443)),
        other: SocketAddr::from((other_ip, 9443)),
        ca,
    }
}

fn alert(e: &io::Error) -> Option<AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

#[tokio::test]
async fn certificate_is_chosen_by_exact_and_wildcard_sni_and_from_files() {
    let s = setup().await;
    for name in ["exact.test", "shop.wild.test", "a-b.wild.test"] {
        let got = https(
            s.a,
            name,
            s.h.roots(),
            false,
            get(&format!("https://{name}:9443/")),
        )
        .await;
        assert_eq!(got.status, 200, "{name}");
    }
    // The configured certificate is served (trusted through the test CA, not the dev CA).
    let got = https(
        s.a,
        "files.test",
        s.ca.roots(),
        true,
        get_h2("https://files.test:9443/"),
    )
    .await;
    assert_eq!(got.status, 200);
    let dev_ca_fails = tls_connect(s.a, "files.test", client_config(s.h.roots(), &[])).await;
    assert!(
        dev_ca_fails.is_err(),
        "files.test must not be signed by the dev CA"
    );
}

#[tokio::test]
async fn unknown_missing_or_foreign_sni_gets_unrecognized_name_and_no_certificate() {
    let s = setup().await;
    let before = s.h.runtime.stats().unknown_sni;
    for name in ["nope.test", "wild.test", "a.b.wild.test", "elsewhere.test"] {
        let e = tls_connect(s.a, name, client_config(s.h.roots(), &[]))
            .await
            .expect_err(name);
        assert_eq!(
            alert(&e),
            Some(AlertDescription::UnrecognisedName),
            "{name}: {e}"
        );
    }
    // An IP address as server name means no SNI extension at all.
    let e = tls_connect(s.a, &s.a.ip().to_string(), client_config(s.h.roots(), &[]))
        .await
        .expect_err("no SNI");
    assert_eq!(alert(&e), Some(AlertDescription::UnrecognisedName), "{e}");
    assert_eq!(s.h.runtime.stats().unknown_sni, before + 5);
    // The site of the other pool is served on its own address.
    let got = https(
        s.other,
        "elsewhere.test",
        s.h.roots(),
        false,
        get("https://elsewhere.test/"),
    )
    .await;
    assert_eq!(got.status, 200);
}

fn versioned(
    roots: rustls::RootCertStore,
    v: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(portcullis::tls::provider())
        .with_protocol_versions(&[v])
        .expect("version")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

#[tokio::test]
async fn tls12_and_tls13_negotiate_with_alpn_and_sessions_resume() {
    let s = setup().await;
    for (v, want) in [
        (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
        (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
    ] {
        let cfg = versioned(s.h.roots(), v);
        let first = tls_connect(s.a, "exact.test", cfg.clone())
            .await
            .expect("handshake");
        let conn = first.get_ref().1;
        assert_eq!(conn.protocol_version(), Some(want));
        assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
        assert_eq!(conn.handshake_kind(), Some(HandshakeKind::Full));
        // Run a request so TLS 1.3 tickets, sent after the handshake, reach the client.
        let got = support::send(
            hyper_util::rt::TokioIo::new(first),
            true,
            get_h2("https://exact.test:9443/"),
        )
        .await;
        assert_eq!(got.status, 200);
        let second = tls_connect(s.a, "exact.test", cfg)
            .await
            .expect("handshake");
        assert_eq!(
            second.get_ref().1.handshake_kind(),
            Some(HandshakeKind::Resumed),
            "{want:?}"
        );
    }
    let h1 = tls_connect(
        s.a,
        "exact.test",
        client_config(s.h.roots(), &[b"http/1.1"]),
    )
    .await
    .expect("h1");
    assert_eq!(h1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
}

#[tokio::test]
async fn host_or_authority_of_another_site_gets_421() {
    let s = setup().await;
    // HTTP/1.1: SNI exact.test, Host of another site on the same pool.
    let got = https(
        s.a,
        "exact.test",
        s.h.roots(),
        false,
        get("https://files.test/"),
    )
    .await;
    assert_eq!(got.status, 421);
    // HTTP/2: :authority of another site than the SNI's.
    let got = https(
        s.a,
        "a.wild.test",
        s.h.roots(),
        true,
        get_h2("https://exact.test:9443/"),
    )
    .await;
    assert_eq!(got.status, 421);
    // A sibling name under the same wildcard belongs to the same site (HTTP/2 coalescing).
    let got = https(
        s.a,
        "a.wild.test",
        s.h.roots(),
        true,
        get_h2("https://b.wild.test:9443/"),
    )
    .await;
    assert_eq!(got.status, 200);
    let got = https(
        s.a,
        "exact.test",
        s.h.roots(),
        true,
        get_h2("https://unknown.test/"),
    )
    .await;
    assert_eq!(got.status, 421);
    // The matching name works on the same kind of connection.
    let got = https(
        s.a,
        "a.wild.test",
        s.h.roots(),
        true,
        get_h2("https://a.wild.test:9443/"),
    )
    .await;
    assert_eq!(got.status, 200);
}

#[tokio::test]
async fn cleartext_http_on_tls_port_gets_400_and_is_counted() {
    let s = setup().await;
    let before = s.h.runtime.stats().cleartext_on_tls_port;
    let mut c = TcpStream::connect(s.a).await.expect("connect");
    c.write_all(b"GET /secret?api_key=xyz HTTP/1.1\r\nHost: exact.test\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    tokio::time::timeout(PATIENCE, c.read_to_string(&mut out))
        .await
        .expect("closed")
        .expect("read");
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    assert!(out.contains("HTTPS only"));
    let (head, body) = out.split_once("\r\n\r\n").expect("head and body");
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{head}"
    );
    assert_eq!(s.h.runtime.stats().cleartext_on_tls_port, before + 1);
}

#[tokio::test]
async fn garbage_and_silence_on_tls_port_are_closed_and_counted() {
    let s = setup().await;
    let before = s.h.runtime.stats();
    let mut c = TcpStream::connect(s.a).await.expect("connect");
    c.write_all(&[0x00, 0x01, 0xff, 0x42]).await.expect("write");
    let mut buf = Vec::new();
    let n = tokio::time::timeout(PATIENCE, c.read_to_end(&mut buf))
        .await
        .expect("closed");
    assert!(buf.is_empty(), "nothing is answered to garbage: {n:?}");

    let mut silent = TcpStream::connect(s.a).await.expect("connect");
    let started = tokio::time::Instant::now();
    // Within PATIENCE only the handshake timeout can close it: the idle timeout is 60 s.
    let _ = tokio::time::timeout(PATIENCE, silent.read_to_end(&mut buf))
        .await
        .expect("closed by the handshake timeout");
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "closed too early"
    );
    let after = s.h.runtime.stats();
    assert_eq!(after.garbage_on_tls_port, before.garbage_on_tls_port + 1);
    assert_eq!(after.handshake_timeouts, before.handshake_timeouts + 1);
}

#[tokio::test]
async fn a_stalled_handshake_is_closed_after_the_handshake_timeout() {
    let s = setup().await;
    let before = s.h.runtime.stats().handshake_timeouts;
    let mut c = TcpStream::connect(s.a).await.expect("connect");
    // The start of a TLS record, then nothing.
    c.write_all(&[0x16, 0x03, 0x01]).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, c.read_to_end(&mut buf))
        .await
        .expect("closed")
        .ok();
    assert_eq!(s.h.runtime.stats().handshake_timeouts, before + 1);
}
