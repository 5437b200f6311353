//! An ACME CA that cannot be reached: the site keeps being served (with the development
//! certificate until a first issuance), each failure is reported with its reason, attempts back
//! off exponentially, and the first attempt after the CA is back succeeds. The clock is moved
//! (`portcullis::clock::advance`), so an hour of outage takes seconds; this file runs alone in
//! its process because that clock is global.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use portcullis::acme::CertSource;
use portcullis::clock;
use support::pebble::{acme_config, start, Pebble};
use support::{get, https, loopback, roots_from, wait_until, TestOrigin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_ca_backs_off_keeps_serving_and_recovers_when_it_returns() {
    let dir = tempfile::tempdir().expect("tmp");
    let origin = TestOrigin::start().await;
    let (closed, dns_addr) = (loopback(), loopback());
    let dns = SocketAddr::from((dns_addr, 5353));
    // Named in the config, not started yet: nothing listens at the directory's address.
    let mut pebble = Pebble::new(dir.path());
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
            "",
        ),
    )
    .expect("write");
    let rt = start(&path).await;
    let status = || rt.acme().status()[0].clone();
    let tls = SocketAddr::from((closed, 8443));
    let dev_roots = || roots_from(&state.join("dev-ca.pem"));

    // An hour of outage, attempt by attempt.
    let mut gaps = Vec::new();
    let mut failures = 0;
    let mut waited = 0;
    while waited < 3600 {
        wait_until("the next attempt fails", || {
            let f = status().failures;
            async move { f > failures }
        })
        .await;
        let st = status();
        failures = st.failures;
        assert_eq!(st.source, CertSource::Development, "{st:?}");
        let error = st.last_error.clone().expect("the failure is reported");
        assert!(error.contains("unreachable"), "{error}");
        let gap = st.next_attempt.saturating_sub(clock::now());
        gaps.push(gap);
        // Served throughout, with the development certificate.
        let got = https(
            tls,
            "www.acme.test",
            dev_roots(),
            false,
            get("https://www.acme.test/"),
        )
        .await;
        assert_eq!(got.status, 200);
        clock::advance(gap);
        waited += gap;
    }
    eprintln!(
        "an hour without the CA: {} attempts, waits {gaps:?} s",
        gaps.len()
    );
    // Each wait doubles (within a second of rounding), from 30 s.
    assert!((29..=31).contains(&gaps[0]), "{gaps:?}");
    for w in gaps.windows(2) {
        assert!(w[1] + 2 >= 2 * w[0] && w[1] <= 2 * w[0] + 2, "{gaps:?}");
    }
    assert_eq!(gaps.len(), 7, "{gaps:?}");
    assert_eq!(rt.acme().failures_total(), gaps.len() as u64);

    // The CA comes back: the next attempt gets the certificate.
    pebble.start(8443, dns).await;
    clock::advance(status().next_attempt.saturating_sub(clock::now()));
    wait_until("the certificate is issued once the CA is back", || {
        let st = status();
        async move { st.source == CertSource::Acme }
    })
    .await;
    let st = status();
    assert_eq!((st.failures, st.last_error.clone()), (0, None), "{st:?}");
    let roots = pebble.root().await;
    let got = https(
        tls,
        "www.acme.test",
        roots,
        false,
        get("https://www.acme.test/"),
    )
    .await;
    assert_eq!(got.status, 200);
    rt.shutdown(Duration::from_secs(2)).await;
}
