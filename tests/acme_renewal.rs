//! Renewal: when a certificate is due (`renew_before`, on a clock the test moves), a new one is
//! ordered and swapped in while a connection stays open and keeps being served; when the CA is
//! gone at renewal time, the previous certificate stays in service and the failure is reported.
//! Alone in its process: the clock it moves is global.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Full;
use hyper_util::rt::TokioIo;
use portcullis::acme::CertSource;
use portcullis::clock;
use support::pebble::{acme_config, served, start, Pebble};
use support::{get, loopback, wait_until, TestOrigin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_certificate_is_renewed_in_place_and_a_failed_renewal_keeps_the_old_one() {
    let dir = tempfile::tempdir().expect("tmp");
    let origin = TestOrigin::start().await;
    let (closed, dns_addr) = (loopback(), loopback());
    let dns = SocketAddr::from((dns_addr, 5353));
    let mut pebble = Pebble::new(dir.path());
    pebble.start(8443, dns).await;
    let state = dir.path().join("state");
    let path = dir.path().join("portcullis.toml");
    std::fs::write(
        &path,
        acme_config(
            &pebble,
            &state,
            closed,
            dns,
            &origin.url(),
            "www.acme.test",
            "renew_before = \"30d\"",
        ),
    )
    .expect("write");
    let rt = start(&path).await;
    let status = || rt.acme().status()[0].clone();
    wait_until("the first certificate is issued", || {
        let st = status();
        async move { st.source == CertSource::Acme }
    })
    .await;
    let first = status();
    let not_after = first.not_after.expect("not after");
    // 30 days before expiry, less at most 1/16 of that as jitter.
    let margin = 30 * 86_400;
    assert!(first.next_attempt <= not_after - margin, "{first:?}");
    assert!(
        first.next_attempt >= not_after - margin - margin / 16,
        "{first:?}"
    );
    let tls = SocketAddr::from((closed, 8443));
    let roots = pebble.root().await;
    let first_der = served(tls, "www.acme.test", roots.clone()).await;

    // A keep-alive connection opened before the renewal.
    let stream = support::tls_connect(
        tls,
        "www.acme.test",
        support::client_config(roots.clone(), &[b"http/1.1"]),
    )
    .await
    .expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<bytes::Bytes>>(TokioIo::new(stream))
            .await
            .expect("h1");
    tokio::spawn(conn);
    let resp = sender
        .send_request(get("https://www.acme.test/"))
        .await
        .expect("before");
    assert_eq!(resp.status(), 200);

    // Renewal time: a new certificate is ordered and served.
    clock::advance(first.next_attempt.saturating_sub(clock::now()) + 1);
    wait_until("the renewed certificate is served", || {
        let roots = roots.clone();
        let first_der = first_der.clone();
        async move { served(tls, "www.acme.test", roots).await != first_der }
    })
    .await;
    let renewed = status();
    assert_eq!(renewed.source, CertSource::Acme);
    assert!(renewed.last_error.is_none(), "{renewed:?}");
    assert!(renewed.next_attempt >= clock::now() + 3000, "{renewed:?}");
    // The connection opened before the swap is still served.
    sender
        .ready()
        .await
        .expect("the old connection is still open");
    let resp = sender
        .send_request(get("https://www.acme.test/"))
        .await
        .expect("after the swap");
    assert_eq!(resp.status(), 200);
    let second_der = served(tls, "www.acme.test", roots.clone()).await;

    // The CA is gone at the next renewal: the certificate in service stays.
    pebble.stop();
    clock::advance(status().next_attempt.saturating_sub(clock::now()) + 1);
    wait_until("the renewal fails", || {
        let st = status();
        async move { st.failures >= 1 }
    })
    .await;
    let st = status();
    assert_eq!(st.source, CertSource::Acme, "{st:?}");
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("unreachable")),
        "{st:?}"
    );
    assert_eq!(served(tls, "www.acme.test", roots).await, second_der);
    rt.shutdown(Duration::from_secs(2)).await;
}
