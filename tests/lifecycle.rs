//! The `serve` life cycle over real processes and signals: SIGHUP reloads by diff under
//! continuous traffic without a failed request, a bad reload keeps the old config, SIGTERM
//! drains in-flight requests and exits 0; and idle connections are closed.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use support::{
    client_config, get, get_h2, https, loopback, refused, roots_from, tls_connect, wait_until,
    Harness, Serve, TestOrigin, PATIENCE,
};
use tokio::io::AsyncReadExt;

fn config(
    a: std::net::Ipv4Addr,
    b: Option<std::net::Ipv4Addr>,
    origin: &str,
    extra: &str,
) -> String {
    let mut t = format!(
        r#"
[state]
dir = "STATE"
[edge]
shutdown_grace = "5s"
[[pool]]
name = "a"
addresses = ["{a}"]
tls_ports = [6443]
[[site]]
host = "one.test"
pool = "a"
origin = "{origin}"
"#
    );
    if let Some(b) = b {
        t.push_str(&format!(
            r#"
[[pool]]
name = "b"
addresses = ["{b}"]
tls_ports = [6443]
[[site]]
host = "two.test"
pool = "b"
origin = "{origin}"
"#
        ));
    }
    t.push_str(extra);
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_by_diff_under_continuous_traffic_without_a_failed_request() {
    let origin = TestOrigin::start().await;
    let (a, b) = (loopback(), loopback());
    let serve = Serve::start(&config(a, None, &origin.url(), ""));
    let addr_a = SocketAddr::from((a, 6443));
    let addr_b = SocketAddr::from((b, 6443));
    wait_until("serve listens", || async {
        tokio::net::TcpStream::connect(addr_a).await.is_ok()
    })
    .await;
    let roots = roots_from(&serve.ca());

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    // Two clients each keep one connection for the whole test (it must survive reloads) and
    // two open a new connection per request (they must never hit a gap in accepting).
    for i in 0..4 {
        let (stop, ok, failed, roots) = (stop.clone(), ok.clone(), failed.clone(), roots.clone());
        clients.push(tokio::spawn(async move {
            let keep = i < 2;
            let mut sender = None;
            while !stop.load(Ordering::Relaxed) {
                let result = if keep {
                    if sender.is_none() {
                        let tls =
                            tls_connect(addr_a, "one.test", client_config(roots.clone(), &[b"h2"]))
                                .await
                                .expect("first connect");
                        let (s, conn) = hyper::client::conn::http2::handshake(
                            hyper_util::rt::TokioExecutor::new(),
                            TokioIo::new(tls),
                        )
                        .await
                        .expect("h2");
                        tokio::spawn(conn);
                        sender = Some(s);
                    }
                    let s = sender.as_mut().expect("sender");
                    match s.send_request(get_h2("https://one.test/kept")).await {
                        Ok(r) => r.status() == 200,
                        Err(_) => false,
                    }
                } else {
                    match tls_connect(
                        addr_a,
                        "one.test",
                        client_config(roots.clone(), &[b"http/1.1"]),
                    )
                    .await
                    {
                        Ok(tls) => {
                            let got = support::send(
                                TokioIo::new(tls),
                                false,
                                get("https://one.test/new"),
                            )
                            .await;
                            got.status == 200
                        }
                        Err(_) => false,
                    }
                };
                if result {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    let served = |at_least: u64| {
        let ok = ok.clone();
        move || {
            let n = ok.load(Ordering::Relaxed);
            async move { n >= at_least }
        }
    };
    wait_until("the clients have traffic going", served(20)).await;
    // 1: add a pool, a listener and a site.
    serve.write(&config(a, Some(b), &origin.url(), ""));
    serve.signal("-HUP");
    wait_until("the new listener serves two.test", || {
        let roots = roots.clone();
        async move {
            match tls_connect(addr_b, "two.test", client_config(roots, &[])).await {
                Ok(t) => {
                    support::send(TokioIo::new(t), false, get("https://two.test/"))
                        .await
                        .status
                        == 200
                }
                Err(_) => false,
            }
        }
    })
    .await;
    // 2: a broken config is rejected and changes nothing.
    serve.write("[[pool]]\nname = 1\n");
    serve.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = https(
        addr_b,
        "two.test",
        roots.clone(),
        false,
        get("https://two.test/"),
    )
    .await;
    assert_eq!(got.status, 200, "the previous config still serves");
    // 3: remove the pool again: its listener closes, the other keeps serving.
    serve.write(&config(a, None, &origin.url(), ""));
    serve.signal("-HUP");
    wait_until("the removed listener is closed", || async move {
        refused(addr_b).await
    })
    .await;
    // As much traffic again after the removal, and enough in all for the check below.
    let after_removal = ok.load(Ordering::Relaxed) + 20;
    wait_until(
        "the clients keep being served after the removal",
        served(after_removal.max(51)),
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client task");
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} failed requests out of {}", ok + failed);
    assert!(ok > 50, "too little traffic to mean anything: {ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_slow_in_flight_request_then_exits_0() {
    let origin = TestOrigin::start().await;
    let a = loopback();
    let mut serve = Serve::start(&config(a, None, &origin.url(), ""));
    let addr = SocketAddr::from((a, 6443));
    wait_until("serve listens", || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
    let roots = roots_from(&serve.ca());
    let slow = tokio::spawn(async move {
        https(
            addr,
            "one.test",
            roots,
            true,
            get_h2("https://one.test/slow/1500"),
        )
        .await
    });
    wait_until("the slow request reached the origin", || {
        let hits = origin.hits.clone();
        async move { hits.load(Ordering::Relaxed) == 1 }
    })
    .await;
    serve.signal("-TERM");
    wait_until("new connections are refused", || async move {
        refused(addr).await
    })
    .await;
    let got = slow.await.expect("slow request task");
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "slept 1500\n");
    let status = tokio::task::spawn_blocking(move || {
        let s = serve.child.wait().expect("wait");
        (s, serve)
    })
    .await
    .expect("join")
    .0;
    assert!(status.success(), "exit status {status:?}");
}

/// One TLS site on `ip`:6443 with `idle_timeout` set, and a header-read timeout longer than
/// PATIENCE, so only the idle timeout can close a connection within it.
fn idle_config(ip: std::net::Ipv4Addr, host: &str, origin: &str, idle: &str) -> String {
    format!(
        r#"
[state]
dir = "STATE"
[edge]
idle_timeout = "{idle}"
header_read_timeout = "60s"
[[pool]]
name = "p"
addresses = ["{ip}"]
tls_ports = [6443]
[[site]]
host = "{host}"
pool = "p"
origin = "{origin}"
"#
    )
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let origin = TestOrigin::start().await;
    let ip = loopback();
    let h = Harness::start(&idle_config(ip, "idle.test", &origin.url(), "300ms")).await;
    let addr = SocketAddr::from((ip, 6443));
    let tls = tls_connect(addr, "idle.test", client_config(h.roots(), &[b"http/1.1"]))
        .await
        .expect("tls");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1");
    let conn = tokio::spawn(conn);
    let resp = sender
        .send_request(get("https://idle.test/"))
        .await
        .expect("resp");
    assert_eq!(resp.status(), 200);
    drop(resp);
    let started = tokio::time::Instant::now();
    tokio::time::timeout(PATIENCE, conn)
        .await
        .expect("the edge closes the idle connection")
        .expect("join")
        .ok();
    assert!(started.elapsed() >= Duration::from_millis(250));

    // A raw TLS connection that never sends a request is closed too.
    let mut tls = tls_connect(addr, "idle.test", client_config(h.roots(), &[b"http/1.1"]))
        .await
        .expect("tls");
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, tls.read_to_end(&mut buf))
        .await
        .expect("closed")
        .ok();
}

#[tokio::test]
async fn quiet_keep_alive_connections_hibernate_serve_on_and_still_close_when_idle() {
    let origin = TestOrigin::start().await;
    let ip = loopback();
    let h = Harness::start(&idle_config(ip, "sleepy.test", &origin.url(), "4s")).await;
    let addr = SocketAddr::from((ip, 6443));
    let hibernating = |n: i64| {
        let edge = &h.runtime;
        move || async move { edge.stats().hibernating_connections == n }
    };
    let connect = || async {
        let tls = tls_connect(
            addr,
            "sleepy.test",
            client_config(h.roots(), &[b"http/1.1"]),
        )
        .await
        .expect("tls");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("h1");
        (sender, tokio::spawn(conn))
    };
    let (mut sender, conn) = connect().await;
    let first = sender
        .send_request(get("https://sleepy.test/first"))
        .await
        .expect("first response");
    let first = support::read(first).await;
    assert_eq!(first.status, 200);
    assert!(first.body.contains("path: /first"), "{}", first.body);
    wait_until("the quiet connection hibernates", hibernating(1)).await;

    // The same connection serves on: a request with a body, streamed to the origin and back.
    let post = http::Request::post("/echo-body")
        .header("host", "sleepy.test")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            "after hibernation",
        )))
        .expect("request");
    let echoed = support::read(sender.send_request(post).await.expect("echo")).await;
    assert_eq!(echoed.status, 200);
    assert_eq!(echoed.body, "after hibernation");
    assert_eq!(h.runtime.stats().hibernating_connections, 0);

    // Hibernating again, it is still closed by the idle timeout, with a TLS close_notify (a
    // clean end for the client, not a cut connection).
    wait_until("the connection hibernates again", hibernating(1)).await;
    let slept = tokio::time::Instant::now();
    let ended = tokio::time::timeout(PATIENCE, conn)
        .await
        .expect("the edge closes the hibernating connection")
        .expect("join");
    assert!(ended.is_ok(), "a clean close: {ended:?}");
    assert!(
        slept.elapsed() >= Duration::from_secs(2),
        "closed {:?} after hibernating, before the idle timeout",
        slept.elapsed()
    );
    wait_until("no connection hibernates", hibernating(0)).await;

    // Shutdown closes a hibernating connection at once.
    let (mut sender, conn) = connect().await;
    let resp = sender
        .send_request(get("https://sleepy.test/"))
        .await
        .expect("response");
    assert_eq!(support::read(resp).await.status, 200);
    wait_until("the new connection hibernates", hibernating(1)).await;
    let stopping = tokio::time::Instant::now();
    assert!(h.runtime.shutdown(Duration::from_secs(10)).await, "drained");
    tokio::time::timeout(PATIENCE, conn)
        .await
        .expect("closed at shutdown")
        .expect("join")
        .ok();
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "{:?}",
        stopping.elapsed()
    );
}

#[tokio::test]
async fn reload_swaps_certificates_and_switches_a_port_between_tls_and_cleartext() {
    let origin = TestOrigin::start().await;
    let ca = support::TestCa::new();
    let files = tempfile::tempdir().expect("tmp");
    let (cert, key) = ca.issue(files.path(), "site", &["cert.test"]);
    let ip = loopback();
    let toml = |tls: u16, clear: u16| {
        format!(
            r#"
[state]
dir = "STATE"
[[pool]]
name = "p"
addresses = ["{ip}"]
tls_ports = [{tls}]
cleartext_ports = [{clear}]
[[site]]
host = "cert.test"
pool = "p"
origin = "{o}"
cleartext = "reject"
cert = "{cert}"
key = "{key}"
"#,
            o = origin.url(),
            cert = cert.display(),
            key = key.display()
        )
    };
    let h = Harness::start(&toml(6443, 6080)).await;
    let first = tls_connect(
        SocketAddr::from((ip, 6443)),
        "cert.test",
        client_config(ca.roots(), &[]),
    )
    .await
    .expect("tls");
    let serial = |t: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        t.get_ref().1.peer_certificates().expect("certs")[0].clone()
    };
    let before = serial(&first);
    // New certificate in the same files, and the two ports trade roles.
    ca.issue(files.path(), "site", &["cert.test"]);
    h.reload(&toml(6080, 6443)).await.expect("reload");
    let second = tls_connect(
        SocketAddr::from((ip, 6080)),
        "cert.test",
        client_config(ca.roots(), &[]),
    )
    .await
    .expect("TLS on the former cleartext port");
    assert_ne!(serial(&second), before, "the new certificate is served");
    let got = support::http(SocketAddr::from((ip, 6443)), get("http://cert.test/")).await;
    assert_eq!(got.status, 403, "cleartext on the former TLS port");
    // The connection made before the reload still works.
    let got = support::send(TokioIo::new(first), false, get("https://cert.test/")).await;
    assert_eq!(got.status, 200);
    assert_eq!(h.runtime.snapshot().generation, 2);
}
