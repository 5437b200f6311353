//! Certificates from an ACME CA with no cleartext port: Debian's pebble, started here on
//! loopback, validates TLS-ALPN-01 on a closed pool's own TLS listener, resolving the site's
//! name through portcullis's DNS server. What portcullis then serves is verified against
//! pebble's root, fetched from pebble's management port.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use portcullis::acme::CertSource;
use portcullis::runtime::Runtime;
use support::pebble::{acme_config, served, start, Pebble};
use support::{get, https, loopback, refused, wait_until, TestOrigin};

fn config(
    closed: Ipv4Addr,
    dns: SocketAddr,
    origin: &str,
    pebble: &Pebble,
    state: &Path,
) -> String {
    site_config(closed, dns, origin, pebble, state, "www.acme.test")
}

fn site_config(
    closed: Ipv4Addr,
    dns: SocketAddr,
    origin: &str,
    pebble: &Pebble,
    state: &Path,
    host: &str,
) -> String {
    acme_config(pebble, state, closed, dns, origin, host, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_01_on_a_closed_pool_issues_a_certificate_that_a_restart_serves_without_the_ca() {
    let dir = tempfile::tempdir().expect("tmp");
    let origin = TestOrigin::start().await;
    let (closed, dns_addr) = (loopback(), loopback());
    let dns = SocketAddr::from((dns_addr, 5353));
    let mut pebble = Pebble::new(dir.path());
    pebble.start(8443, dns).await;
    let state = dir.path().join("state");
    let path = dir.path().join("portcullis.toml");
    let admin = SocketAddr::from((loopback(), 9443));
    let text = config(closed, dns, &origin.url(), &pebble, &state)
        + &format!("[admin]\nlisten = \"{admin}\"\n");
    std::fs::write(&path, text).expect("write");

    let started = tokio::time::Instant::now();
    let rt = start(&path).await;
    // Nothing but TLS is ever bound: not before the first issuance, not after.
    let cleartext = |l: Vec<(SocketAddr, portcullis::config::ListenerKind)>| {
        l.into_iter()
            .filter(|(_, k)| *k == portcullis::config::ListenerKind::Cleartext)
            .count()
    };
    assert_eq!(cleartext(rt.listening().await), 0);
    // Until the CA issues, the development certificate is served, and the status says so.
    let st = &rt.acme().status()[0];
    assert_eq!(st.site, "www.acme.test");
    assert_eq!(st.challenge, "tls-alpn-01");
    wait_until("the ACME certificate is issued", || {
        let done = rt
            .acme()
            .status()
            .iter()
            .all(|s| s.source == CertSource::Acme);
        async move { done }
    })
    .await;
    let took = started.elapsed();
    let tls = SocketAddr::from((closed, 8443));
    let roots = pebble.root().await;
    let first = served(tls, "www.acme.test", roots.clone()).await;
    let got = https(
        tls,
        "www.acme.test",
        roots.clone(),
        false,
        get("https://www.acme.test/"),
    )
    .await;
    assert_eq!(
        got.status, 200,
        "the site is served with the issued certificate"
    );
    let st = rt.acme().status()[0].clone();
    assert!(st.last_error.is_none(), "{st:?}");
    assert!(
        st.issuer.as_deref().is_some_and(|i| i.contains("Pebble")),
        "{st:?}"
    );
    let not_after = st.not_after.expect("not after");
    assert!(st.next_attempt < not_after && st.next_attempt > portcullis::clock::now());
    assert_eq!(cleartext(rt.listening().await), 0);
    // The closed pool refuses cleartext ports in the kernel, and the state dir keeps the keys
    // to their owner.
    for port in [80, 8080] {
        assert!(
            refused(SocketAddr::from((closed, port))).await,
            "port {port}"
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let account = std::fs::read_dir(state.join("acme"))
        .expect("acme dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("account-") && n.ends_with(".json"))
        .expect("an account file");
    for f in [account.as_str(), "www.acme.test.key"] {
        let mode = std::fs::metadata(state.join("acme").join(f))
            .expect(f)
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f} is readable by its owner only");
    }
    eprintln!("issued in {took:?}");

    // Visible everywhere: the admin API, /metrics and `portcullis certs`.
    let token = rt.admin().expect("admin").new_token.clone().expect("token");
    let mut req = get(&format!("https://{admin}/api/certs"));
    req.headers_mut().insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    let dev = support::roots_from(&state.join("dev-ca.pem"));
    let got = https(admin, &admin.ip().to_string(), dev, false, req).await;
    assert_eq!(got.status, 200, "{}", got.body);
    let certs: serde_json::Value = serde_json::from_str(&got.body).expect("json");
    let c = &certs[0];
    assert_eq!(c["site"], "www.acme.test");
    assert_eq!(c["source"], "acme", "{c}");
    assert_eq!(c["acme_challenge"], "tls-alpn-01");
    assert_eq!(c["not_after"], not_after);
    assert!(
        c["issuer"].as_str().is_some_and(|i| i.contains("Pebble")),
        "{c}"
    );
    assert!(c["last_error"].is_null());
    let metrics = rt.metrics();
    assert!(
        metrics.contains("portcullis_cert_source{site=\"www.acme.test\",source=\"acme\"} 1"),
        "{metrics}"
    );
    let left: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_cert_expiry_seconds{site=\"www.acme.test\"} "))
        .expect("expiry series")
        .parse()
        .expect("number");
    let expected = not_after as i64 - portcullis::clock::now() as i64;
    assert!((expected - left).abs() <= 1, "{left} against {expected}");
    assert!(
        metrics.contains("portcullis_acme_failures_total 0"),
        "{metrics}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["certs", "--json", "-c"])
        .arg(&path)
        .output()
        .expect("certs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(cli, certs, "the CLI reads what the running edge reports");

    // A restart serves the stored certificate from its first handshake, with the CA gone:
    // nothing is ordered again.
    rt.shutdown(Duration::from_secs(2)).await;
    drop(pebble);
    let rt = start(&path).await;
    let st = rt.acme().status()[0].clone();
    assert_eq!(st.source, CertSource::Acme, "{st:?}");
    assert_eq!(st.not_after, Some(not_after));
    assert_eq!(served(tls, "www.acme.test", roots).await, first);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = rt.acme().status()[0].clone();
    assert_eq!(st.failures, 0, "no order was attempted: {st:?}");

    // Another CA in the config (staging to production, say): reloaded, the certificate in
    // service stays until the new CA has issued one, ordered at once with a new account.
    let dir2 = tempfile::tempdir().expect("tmp");
    let mut other = Pebble::new(dir2.path());
    other.start(8443, dns).await;
    let text = config(closed, dns, &origin.url(), &other, &state)
        + &format!("[admin]\nlisten = \"{admin}\"\n");
    std::fs::write(&path, &text).expect("write");
    rt.apply(portcullis::config::Config::from_file(&path).expect("config"))
        .await
        .expect("reload");
    let other_roots = other.root().await;
    wait_until("the new CA's certificate is served", || {
        let roots = other_roots.clone();
        async move {
            let cfg = support::client_config(roots, &[b"http/1.1"]);
            support::tls_connect(tls, "www.acme.test", cfg)
                .await
                .is_ok()
        }
    })
    .await;
    let accounts = std::fs::read_dir(state.join("acme"))
        .expect("acme dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("account-"))
        .count();
    assert_eq!(accounts, 2, "one account per directory");
    rt.shutdown(Duration::from_secs(2)).await;
}

/// Waits until every ACME site is served with a CA-issued certificate.
async fn issued(rt: &Runtime) {
    wait_until("the ACME certificate is issued", || {
        let done = rt
            .acme()
            .status()
            .iter()
            .all(|s| s.source == CertSource::Acme);
        async move { done }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_01_through_the_built_in_dns_server_issues_a_wildcard_certificate() {
    let dir = tempfile::tempdir().expect("tmp");
    let origin = TestOrigin::start().await;
    let (closed, dns_addr) = (loopback(), loopback());
    let dns = SocketAddr::from((dns_addr, 5353));
    let mut pebble = Pebble::new(dir.path());
    pebble.start(8443, dns).await;
    let state = dir.path().join("state");
    let path = dir.path().join("portcullis.toml");
    let text = site_config(
        closed,
        dns,
        &origin.url(),
        &pebble,
        &state,
        "*.apps.acme.test",
    );
    std::fs::write(&path, text).expect("write");
    let started = tokio::time::Instant::now();
    let rt = start(&path).await;
    assert_eq!(rt.acme().status()[0].challenge, "dns-01");
    issued(&rt).await;
    eprintln!("wildcard issued through dns-01 in {:?}", started.elapsed());
    // The challenge's TXT record is gone once the order is done.
    let txt = std::process::Command::new("dig")
        .args(["+short", "-p", "5353", &format!("@{dns_addr}")])
        .args(["TXT", "_acme-challenge.apps.acme.test"])
        .output()
        .expect("dig");
    assert!(txt.status.success());
    assert_eq!(
        String::from_utf8_lossy(&txt.stdout).trim(),
        "",
        "no TXT left"
    );
    let roots = pebble.root().await;
    let tls = SocketAddr::from((closed, 8443));
    for name in ["a.apps.acme.test", "shop.apps.acme.test"] {
        let got = https(
            tls,
            name,
            roots.clone(),
            false,
            get(&format!("https://{name}/")),
        )
        .await;
        assert_eq!(
            got.status, 200,
            "{name} is served with the wildcard certificate"
        );
    }
    assert!(rt.acme().status()[0].last_error.is_none());

    // A site added by a reload gets its own certificate; the wildcard's stays as it is.
    let text = site_config(
        closed,
        dns,
        &origin.url(),
        &pebble,
        &state,
        "*.apps.acme.test",
    ) + &format!(
        "[[site]]\nhost = \"www.acme.test\"\npool = \"closed\"\norigin = \"{}\"\ncert = \"acme\"\n",
        origin.url()
    );
    std::fs::write(&path, &text).expect("write");
    let wildcard = rt.acme().status()[0].clone();
    rt.apply(portcullis::config::Config::from_file(&path).expect("config"))
        .await
        .expect("reload");
    assert_eq!(rt.acme().status().len(), 2);
    issued(&rt).await;
    let got = https(
        tls,
        "www.acme.test",
        roots.clone(),
        false,
        get("https://www.acme.test/"),
    )
    .await;
    assert_eq!(got.status, 200);
    let st = rt.acme().status();
    assert_eq!(
        st.iter()
            .find(|s| s.site == "www.acme.test")
            .expect("new")
            .challenge,
        "tls-alpn-01"
    );
    assert_eq!(
        st.iter()
            .find(|s| s.site == "*.apps.acme.test")
            .expect("kept"),
        &wildcard
    );
    rt.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_refuses_the_validation_is_reported_and_the_site_stays_served() {
    let dir = tempfile::tempdir().expect("tmp");
    let origin = TestOrigin::start().await;
    let (closed, dns_addr) = (loopback(), loopback());
    let dns = SocketAddr::from((dns_addr, 5353));
    // pebble validates on 9443, where nothing listens: the pool serves 8443 only.
    let mut pebble = Pebble::new(dir.path());
    pebble.start(9443, dns).await;
    let state = dir.path().join("state");
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, config(closed, dns, &origin.url(), &pebble, &state)).expect("write");
    let rt = start(&path).await;
    wait_until("the order fails", || {
        let f = rt.acme().status()[0].failures;
        async move { f >= 1 }
    })
    .await;
    let st = rt.acme().status()[0].clone();
    assert_eq!(st.source, CertSource::Development);
    let error = st.last_error.clone().expect("reported");
    assert!(error.starts_with("CA refused"), "{error}");
    assert!(
        st.next_attempt > portcullis::clock::now() + 20,
        "backs off: {st:?}"
    );
    let dev = support::roots_from(&state.join("dev-ca.pem"));
    let tls = SocketAddr::from((closed, 8443));
    let got = https(
        tls,
        "www.acme.test",
        dev,
        false,
        get("https://www.acme.test/"),
    )
    .await;
    assert_eq!(
        got.status, 200,
        "still served, with the development certificate"
    );
    let metrics = rt.metrics();
    assert!(
        metrics.contains("portcullis_cert_source{site=\"www.acme.test\",source=\"development\"} 1"),
        "marked as not yet issued: {metrics}"
    );
    assert!(
        !metrics.contains("portcullis_acme_failures_total 0"),
        "{metrics}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["certs", "-c"])
        .arg(&path)
        .output()
        .expect("certs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("development (acme tls-alpn-01, not issued yet)"),
        "{text}"
    );
    assert!(text.contains("CA refused"), "{text}");
    rt.shutdown(Duration::from_secs(2)).await;
}

/// An HTTPS server at `addr` that answers every request 503 with `Retry-After: 7200`, as a CA
/// in maintenance does.
async fn overloaded_ca(addr: SocketAddr, dir: &Path) -> std::path::PathBuf {
    let ca = support::TestCa::new();
    let (cert, key) = ca.issue(dir, "busy", &[&addr.ip().to_string()]);
    let ck = portcullis::tls::load_certified_key(&cert, &key).expect("cert");
    let cfg = rustls::ServerConfig::builder_with_provider(portcullis::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_cert_resolver(std::sync::Arc::new(portcullis::tls::SingleCert(ck)));
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(t) = acceptor.accept(s).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req| async {
                    let resp = http::Response::builder()
                        .status(503)
                        .header("retry-after", "7200")
                        .header("content-type", "application/problem+json")
                        .body(http_body_util::Full::new(bytes::Bytes::from_static(
                            br#"{"type":"urn:ietf:params:acme:error:serverInternal","detail":"down for maintenance"}"#,
                        )))
                        .expect("response");
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(t), svc)
                    .await;
            });
        }
    });
    ca.write_ca(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_asking_to_come_back_later_is_not_asked_again_before_its_retry_after() {
    let dir = tempfile::tempdir().expect("tmp");
    let origin = TestOrigin::start().await;
    let (closed, ca_addr) = (loopback(), loopback());
    let busy = SocketAddr::from((ca_addr, 14000));
    let ca = overloaded_ca(busy, dir.path()).await;
    let state = dir.path().join("state");
    let path = dir.path().join("portcullis.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[state]
dir = "{state}"
[acme]
directory = "https://{busy}/dir"
directory_ca = "{ca}"
[[pool]]
name = "closed"
addresses = ["{closed}"]
tls_ports = [8443]
[[site]]
host = "www.acme.test"
pool = "closed"
origin = "{origin}"
cert = "acme"
"#,
            state = state.display(),
            ca = ca.display(),
            origin = origin.url(),
        ),
    )
    .expect("write");
    let rt = start(&path).await;
    wait_until("the order fails", || {
        let f = rt.acme().status()[0].failures;
        async move { f >= 1 }
    })
    .await;
    let st = rt.acme().status()[0].clone();
    let wait = st.next_attempt.saturating_sub(portcullis::clock::now());
    // Retry-After: 7200, not the 30 s of a first failure.
    assert!(
        (7190..=7200).contains(&wait),
        "next attempt in {wait} s: {st:?}"
    );
    rt.shutdown(Duration::from_secs(2)).await;
}
