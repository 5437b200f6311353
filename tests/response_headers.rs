//! `response_headers`: an `[edge]` default and a site's own, set on every TLS answer of the
//! site (replacing the origin's), never on cleartext answers; bad tables are refused by
//! `check` with the key and the reason.

mod support;

use std::net::SocketAddr;

use support::{get, get_h2, http, https, loopback, Harness, TestOrigin};

#[tokio::test]
async fn tls_answers_carry_the_configured_headers_and_cleartext_answers_do_not() {
    let origin = TestOrigin::start().await;
    let ip = loopback();
    let toml = format!(
        r#"
[state]
dir = "STATE"
[edge.response_headers]
"X-Content-Type-Options" = "nosniff"
"X-Frame-Options" = "DENY"
[[pool]]
name = "open"
addresses = ["{ip}"]
tls_ports = [7443]
cleartext_ports = [7080]
[[site]]
host = "www.test"
pool = "open"
origin = "{o}"
cleartext = "redirect"
response_headers = {{ "X-Frame-Options" = "SAMEORIGIN", "Content-Security-Policy" = "default-src 'self'", "X-End-To-End" = "edge" }}
[[site]]
host = "plain.test"
pool = "open"
origin = "{o}"
cleartext = "allow"
"#,
        o = origin.url()
    );
    let h = Harness::start(&toml).await;
    let tls = SocketAddr::from((ip, 7443));
    for h2 in [false, true] {
        let req = if h2 {
            get_h2("https://www.test/hop")
        } else {
            get("https://www.test/hop")
        };
        let got = https(tls, "www.test", h.roots(), h2, req).await;
        assert_eq!(got.status, 200);
        let v = |n: &str| got.headers.get(n).and_then(|v| v.to_str().ok());
        assert_eq!(
            v("x-content-type-options"),
            Some("nosniff"),
            "the edge default"
        );
        assert_eq!(
            v("x-frame-options"),
            Some("SAMEORIGIN"),
            "the site's own wins"
        );
        assert_eq!(v("content-security-policy"), Some("default-src 'self'"));
        assert_eq!(
            got.headers.get_all("x-end-to-end").iter().count(),
            1,
            "the origin's header is replaced, not doubled"
        );
        assert_eq!(v("x-end-to-end"), Some("edge"));
        assert!(
            got.headers.contains_key("strict-transport-security"),
            "HSTS stays its own key"
        );
    }
    let other = https(
        tls,
        "plain.test",
        h.roots(),
        false,
        get("https://plain.test/"),
    )
    .await;
    assert_eq!(
        other
            .headers
            .get("x-frame-options")
            .and_then(|v| v.to_str().ok()),
        Some("DENY"),
        "a site without its own gets the default"
    );
    // Cleartext: a redirect and an allowed answer, neither with the headers.
    let clear = SocketAddr::from((ip, 7080));
    for url in ["http://www.test/", "http://plain.test/"] {
        let got = http(clear, get(url)).await;
        assert!(
            got.status == 301 || got.status == 200,
            "{url}: {}",
            got.status
        );
        for n in [
            "x-content-type-options",
            "x-frame-options",
            "content-security-policy",
        ] {
            assert!(!got.headers.contains_key(n), "{url} has {n}");
        }
    }
}

#[test]
fn check_refuses_headers_that_the_edge_owns_or_http_forbids() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[edge.response_headers]
"Strict-Transport-Security" = "max-age=1"
"Bad Name" = "x"
[[pool]]
name = "p"
addresses = ["127.0.0.1"]
tls_ports = [443]
[[site]]
host = "a.test"
pool = "p"
origin = "http://127.0.0.1:9"
response_headers = { "Connection" = "close", "X-Ok" = "line\nbreak" }
"#,
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("check");
    assert!(!out.status.success());
    let err =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    for want in [
        "edge.response_headers.\"Strict-Transport-Security\"",
        "HSTS has its own key",
        "edge.response_headers.\"Bad Name\"",
        "not a header name",
        "response_headers.\"Connection\"",
        "connection management belongs to the edge",
        "response_headers.\"X-Ok\"",
        "not a header value",
    ] {
        assert!(err.contains(want), "{want:?} missing from:\n{err}");
    }
}
