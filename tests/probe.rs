//! `portcullis probe` against servers started here: portcullis itself in its closed,
//! redirect, reject and allow configurations, and small deliberately bad cleartext servers
//! (one serving content, one redirecting elsewhere, one answering differently when a
//! credential is present) beside a portcullis TLS listener.

mod support;

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use support::{loopback, Harness, TestOrigin};
use tokio::net::TcpListener;

/// One portcullis on `addr`: site `t.test` in `mode` (closed: closed pool; else an open pool
/// with cleartext port 5080), DNS for `test` on port 5353 of the same address.
async fn portcullis(addr: Ipv4Addr, mode: &str, origin: &TestOrigin) -> Harness {
    portcullis_with(addr, mode, origin, "").await
}

/// `portcullis` with more keys in the pool.
async fn portcullis_with(addr: Ipv4Addr, mode: &str, origin: &TestOrigin, pool: &str) -> Harness {
    let clear = if mode == "closed" {
        ""
    } else {
        "cleartext_ports = [5080]"
    };
    Harness::start(&format!(
        r#"
[state]
dir = "STATE"
[dns]
listen = "{addr}:5353"
zones = ["t.test"]
[[pool]]
name = "p"
addresses = ["{addr}"]
tls_ports = [5443]
{clear}
{pool}
[[site]]
host = "t.test"
pool = "p"
origin = "{o}"
cleartext = "{mode}"
"#,
        o = origin.url()
    ))
    .await
}

async fn probe(h: &Harness, addr: Ipv4Addr, extra: &[&str]) -> (i32, Value) {
    let mut args: Vec<String> = vec![
        "probe".into(),
        "https://t.test:5443/x".into(),
        "--dns".into(),
        format!("{addr}:5353"),
        "--ports".into(),
        "5080,5081".into(),
        // Every step here is answered or refused at once; the bound is for a loaded machine.
        "--timeout".into(),
        "30s".into(),
        "--ca".into(),
        h.ca().display().to_string(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(&args)
            .output()
            .expect("probe")
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("not JSON: {text}{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), json)
}

fn port(report: &Value, port: u64) -> &Value {
    report["addresses"][0]["cleartext"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["port"] == port)
        .expect("port reported")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_portcullis_gets_an_a() {
    let origin = TestOrigin::start().await;
    let addr = loopback();
    let h = portcullis(addr, "closed", &origin).await;
    let (code, r) = probe(&h, addr, &["--min-grade", "A"]).await;
    assert_eq!(r["grade"], "A", "{r:#}");
    assert_eq!(code, 0);
    assert_eq!(port(&r, 5080)["connect"], "refused");
    assert_eq!(port(&r, 5081)["connect"], "refused");
    assert_eq!(r["https_record"]["status"], "present");
    let tls = &r["addresses"][0]["tls"];
    assert_eq!(tls["handshake"]["version"], "TLSv1_3");
    assert_eq!(tls["handshake"]["alpn"], "h2");
    assert_eq!(tls["handshake"]["chain_error"], Value::Null);
    assert_eq!(tls["handshake"]["hostname_match"], true);
    assert!(tls["handshake"]["days_to_expiry"].as_i64().expect("days") > 300);
    assert_eq!(tls["hsts"]["max_age"], 31_536_000);
    assert_eq!(tls["cleartext_to_tls_port"]["kind"], "client_error");
    assert_eq!(tls["cleartext_to_tls_port"]["status"], 400);
    assert_eq!(tls["http3"]["offered"], true, "{r:#}");
    assert_eq!(
        tls["http3"]["status"], 200,
        "the GET over HTTP/3 reached the origin"
    );
    assert_eq!(tls["alt_svc"], "h3=\":5443\"; ma=86400");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_is_reported_missing_where_the_pool_has_none() {
    let origin = TestOrigin::start().await;
    let addr = loopback();
    let h = portcullis_with(addr, "closed", &origin, "http3 = false").await;
    let (_, r) = probe(&h, addr, &[]).await;
    let tls = &r["addresses"][0]["tls"];
    assert_eq!(tls["handshake"]["alpn"], "h2", "TCP still serves: {r:#}");
    assert_eq!(tls["http3"]["offered"], false, "{r:#}");
    assert!(
        tls["http3"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("QUIC")),
        "{r:#}"
    );
    assert_eq!(tls["alt_svc"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_and_reject_modes_get_a_b_and_allow_an_f() {
    let origin = TestOrigin::start().await;
    for (mode, grade, kind) in [
        ("redirect", "B", "redirect"),
        ("reject", "B", "client_error"),
        ("allow", "F", "content"),
    ] {
        let addr = loopback();
        let h = portcullis(addr, mode, &origin).await;
        let (code, r) = probe(&h, addr, &["--min-grade", "B"]).await;
        assert_eq!(r["grade"], grade, "{mode}: {r:#}");
        assert_eq!(code, if grade == "B" { 0 } else { 2 }, "{mode}");
        let p = port(&r, 5080);
        assert_eq!(p["connect"], "accepted");
        assert_eq!(p["with_credential"]["kind"], kind, "{mode}");
        assert_eq!(
            p["differs"], false,
            "portcullis answers the same with or without a credential"
        );
        assert_eq!(port(&r, 5081)["connect"], "refused");
        if mode == "redirect" {
            assert_eq!(p["with_credential"]["location"], "https://t.test:5443/x");
            assert_eq!(p["with_credential"]["to_https_same_host"], true);
        }
    }
}

/// A cleartext server on `addr:5080` answering with `answer(has_credential)`.
async fn bad_server(addr: Ipv4Addr, answer: fn(bool) -> Response<Full<Bytes>>) {
    let l = TcpListener::bind(SocketAddr::from((addr, 5080)))
        .await
        .expect("bind");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(answer(req.headers().contains_key("authorization")))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(b"hello\n")));
    *r.status_mut() = code;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cleartext_servers_are_found_out() {
    let origin = TestOrigin::start().await;
    // Serves content in cleartext: F.
    let addr = loopback();
    let h = portcullis(addr, "closed", &origin).await;
    bad_server(addr, |_| status(StatusCode::OK)).await;
    let (code, r) = probe(&h, addr, &["--min-grade", "C"]).await;
    assert_eq!(r["grade"], "F", "{r:#}");
    assert_eq!(code, 2);
    assert!(
        r["reasons"]
            .to_string()
            .contains("serves content (200) in cleartext"),
        "{r:#}"
    );

    // Redirects, but to another host over plain http: accepted cleartext with HSTS, B, and the
    // finding says where.
    let addr = loopback();
    let h = portcullis(addr, "closed", &origin).await;
    bad_server(addr, |_| {
        let mut r = status(StatusCode::FOUND);
        r.headers_mut().insert(
            "location",
            "http://elsewhere.example/login".parse().expect("value"),
        );
        r
    })
    .await;
    let (_, r) = probe(&h, addr, &[]).await;
    let p = port(&r, 5080);
    assert_eq!(p["with_credential"]["kind"], "redirect");
    assert_eq!(
        p["with_credential"]["location"],
        "http://elsewhere.example/login"
    );
    assert_eq!(p["with_credential"]["to_https_same_host"], false);
    assert_eq!(r["grade"], "B");

    // Answers 401 without a credential and 403 with one: it tells an eavesdropper's victim
    // apart, D.
    let addr = loopback();
    let h = portcullis(addr, "closed", &origin).await;
    bad_server(addr, |has| {
        status(if has {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNAUTHORIZED
        })
    })
    .await;
    let (_, r) = probe(&h, addr, &[]).await;
    let p = port(&r, 5080);
    assert_eq!(p["differs"], true, "{r:#}");
    assert_eq!(p["with_credential"]["status"], 403);
    assert_eq!(p["without_credential"]["status"], 401);
    assert_eq!(r["grade"], "D");
    assert!(r["reasons"]
        .to_string()
        .contains("answers differently when a credential is sent"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_do_not_resolve_and_bad_targets_get_clear_errors() {
    let origin = TestOrigin::start().await;
    let addr = loopback();
    let _h = portcullis(addr, "closed", &origin).await;
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
                .args(&args)
                .output()
                .expect("probe")
        })
    };
    let out = run(vec![
        "probe".into(),
        "https://nope.t.test/".into(),
        "--dns".into(),
        format!("{addr}:5353"),
    ])
    .await
    .expect("join");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope.t.test does not resolve"), "{err}");
    let out = run(vec!["probe".into(), "https://".into()])
        .await
        .expect("join");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a URL or host name"));
    let out = run(vec![
        "probe".into(),
        "t.test".into(),
        "--resolve".into(),
        "t.test".into(),
    ])
    .await
    .expect("join");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resolve \"t.test\""));
}
