//! The exposure response against a local HTTPS webhook receiver with a throwaway CA: signed,
//! idempotent events with the credential's SHA-256 (and, for revoke with include_raw, the
//! value), delivery retried while the receiver is down and completed after a portcullis
//! restart, rate limits and coalescing under a flood of fake credentials, and the raw value
//! never in the state files.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use support::webhook::receiver;
use support::{http, loopback, wait_until, Harness, Serve, TestCa};
use tokio::net::{TcpListener, TcpSocket};

const SECRET: &str = "webhook-signing-secret-for-tests";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn config(
    dir: &std::path::Path,
    open: Ipv4Addr,
    hook_port: u16,
    ca: &std::path::Path,
    limits: &str,
) -> String {
    let secret = dir.join("hook.secret");
    std::fs::write(&secret, SECRET).expect("secret");
    format!(
        r#"
[state]
dir = "STATE"
[analytics]
flush_interval = "200ms"
[exposure]
backoff_base = "1s"
backoff_max = "2s"
{limits}
[[pool]]
name = "open"
addresses = ["{open}"]
tls_ports = [6443]
cleartext_ports = [6080]
[[site]]
host = "legacy.test"
pool = "open"
origin = "http://127.0.0.1:9"
cleartext = "reject"
exposure_response = "revoke"
webhook = {{ url = "https://localhost:{hook_port}/hook", secret_file = "{secret}", ca = "{ca}", include_raw = true }}
[[site]]
host = "notify.test"
pool = "open"
origin = "http://127.0.0.1:9"
cleartext = "reject"
exposure_response = "notify"
webhook = {{ url = "https://localhost:{hook_port}/hook", secret_file = "{secret}", ca = "{ca}" }}
"#,
        secret = secret.display(),
        ca = ca.display(),
    )
}

fn with_key(host: &str, header: &str, value: &str) -> Request<Full<Bytes>> {
    Request::get("/v1/items")
        .header("host", host)
        .header(header, value)
        .body(Full::new(Bytes::new()))
        .expect("request")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sha256(s: &str) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes()).as_ref())
}

/// Checks `X-Portcullis-Signature: t=…,v1=…` against the shared secret.
fn verify(headers: &HeaderMap) -> bool {
    let sig = headers["x-portcullis-signature"].to_str().expect("ascii");
    let (t, v1) = sig.split_once(",v1=").expect("t=…,v1=…");
    let t = t.strip_prefix("t=").expect("t=");
    let body = headers["x-test-raw-body"].to_str().expect("body");
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, SECRET.as_bytes());
    hex(aws_lc_rs::hmac::sign(&key, format!("{t}.{body}").as_bytes()).as_ref()) == v1
}

/// Every file of the state directory, searched for `needle`.
fn in_state_files(state: &std::path::Path, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    for e in std::fs::read_dir(state).expect("state dir") {
        let p = e.expect("entry").path();
        if let Ok(bytes) = std::fs::read(&p) {
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                hits.push(p.display().to_string());
            }
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_signed_idempotent_and_carry_hashes_and_only_for_revoke_the_value() {
    let ca = TestCa::new();
    let files = tempfile::tempdir().expect("tmp");
    let ca_file = ca.write_ca(files.path());
    let port = free_port();
    let (got, _rx) = receiver(&ca, port).await;
    let open = loopback();
    let h = Harness::start(&config(files.path(), open, port, &ca_file, "")).await;
    let clear = SocketAddr::from((open, 6080));
    assert_eq!(
        http(
            clear,
            with_key("legacy.test", "x-api-key", "key-revoke-123")
        )
        .await
        .status,
        403
    );
    assert_eq!(
        http(
            clear,
            with_key("notify.test", "authorization", "Bearer tok-notify-456")
        )
        .await
        .status,
        403
    );
    wait_until("both events arrive", || {
        let got = got.clone();
        async move { got.lock().expect("lock").len() >= 2 }
    })
    .await;
    let events = got.lock().expect("lock").clone();
    for (headers, body) in &events {
        assert!(verify(headers), "signature checks out");
        assert_eq!(
            headers["idempotency-key"].to_str().expect("ascii"),
            body["id"].as_str().expect("id")
        );
        assert_eq!(body["fingerprint"].as_str().expect("fp").len(), 32);
        assert!(body["client_network"]
            .as_str()
            .expect("net")
            .ends_with("/24"));
        assert_eq!(body["withheld"], serde_json::Value::Null);
    }
    let revoke = events
        .iter()
        .find(|(_, b)| b["site"] == "legacy.test")
        .expect("revoke event")
        .1
        .clone();
    assert_eq!(revoke["policy"], "revoke");
    assert_eq!(revoke["kind"], "header");
    assert_eq!(revoke["name"], "x-api-key");
    assert_eq!(revoke["sha256"], sha256("key-revoke-123"));
    assert_eq!(revoke["raw_value"], "key-revoke-123");
    let notify = events
        .iter()
        .find(|(_, b)| b["site"] == "notify.test")
        .expect("notify event")
        .1
        .clone();
    assert_eq!(notify["policy"], "notify");
    assert_eq!(notify["sha256"], sha256("tok-notify-456"));
    assert_eq!(
        notify["raw_value"],
        serde_json::Value::Null,
        "notify never carries the value"
    );
    // Delivered, visible in the queue; the values are in no state file.
    let state = h.dir.path().join("state");
    wait_until("delivery recorded", || {
        let state = state.clone();
        async move {
            portcullis::exposure::queue::read(&state, None)
                .map(|(e, _)| e.len() == 2 && e.iter().all(|e| e.state == "delivered"))
                .unwrap_or(false)
        }
    })
    .await;
    for value in [
        "key-revoke-123",
        "tok-notify-456",
        &sha256("key-revoke-123"),
    ] {
        assert_eq!(
            in_state_files(&state, value),
            Vec::<String>::new(),
            "{value}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_queued_while_the_receiver_is_down_are_delivered_after_a_restart() {
    let ca = TestCa::new();
    let files = tempfile::tempdir().expect("tmp");
    let ca_file = ca.write_ca(files.path());
    // The receiver is down: its port is held by a listener that closes every connection, so
    // no other test's listener can take the port meanwhile and every delivery fails.
    let down = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = down.local_addr().expect("addr").port();
    let refuser = tokio::spawn(async move {
        while let Ok((s, _)) = down.accept().await {
            drop(s);
        }
    });
    let open = loopback();
    let mut serve = Serve::start(&config(files.path(), open, port, &ca_file, ""));
    let clear = SocketAddr::from((open, 6080));
    wait_until("serve listens", || async move {
        tokio::net::TcpStream::connect(clear).await.is_ok()
    })
    .await;
    assert_eq!(
        http(
            clear,
            with_key("legacy.test", "x-api-key", "key-while-down-789")
        )
        .await
        .status,
        403
    );
    let state = serve.state();
    // The receiver is down: the event waits, with failed attempts recorded.
    let deadline = support::Deadline::start();
    loop {
        let queue = portcullis::exposure::queue::read(&state, None);
        let recorded = queue
            .as_ref()
            .is_ok_and(|(e, _)| e.len() == 1 && e[0].attempts >= 1 && e[0].state == "pending");
        if recorded {
            break;
        }
        assert!(
            !deadline.passed(),
            "no failed attempt recorded after {:?}; the queue holds {queue:?}",
            deadline.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        in_state_files(&state, "key-while-down-789"),
        Vec::<String>::new(),
        "raw value never stored"
    );
    let (back, status) = tokio::task::spawn_blocking(move || {
        let st = serve.stop();
        (serve, st)
    })
    .await
    .expect("join");
    serve = back;
    assert!(status.success());
    assert_eq!(
        in_state_files(&state, "key-while-down-789"),
        Vec::<String>::new(),
        "nor at shutdown"
    );
    // The receiver comes up, then portcullis again: the event is delivered, without the
    // in-memory extras, and says why.
    refuser.abort();
    let _ = refuser.await;
    let (got, _rx) = receiver(&ca, port).await;
    serve.respawn();
    wait_until("the event is delivered after the restart", || {
        let got = got.clone();
        async move { !got.lock().expect("lock").is_empty() }
    })
    .await;
    let (headers, body) = got.lock().expect("lock")[0].clone();
    assert!(verify(&headers));
    assert_eq!(body["site"], "legacy.test");
    assert_eq!(body["sha256"], serde_json::Value::Null);
    assert_eq!(body["raw_value"], serde_json::Value::Null);
    assert!(body["withheld"]
        .as_str()
        .expect("withheld")
        .contains("restarted"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["exposures", "--state-dir"])
        .arg(&state)
        .output()
        .expect("exposures");
    let text = String::from_utf8_lossy(&out.stdout);
    wait_until("the CLI shows it delivered", || {
        let state = state.clone();
        async move {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
                .args(["exposures", "--state-dir"])
                .arg(&state)
                .output()
                .expect("exposures");
            String::from_utf8_lossy(&out.stdout).contains("delivered")
        }
    })
    .await;
    assert!(text.contains("legacy.test"), "{text}");
    drop(serve);
}

/// A cleartext request from a chosen loopback source address (a distinct client network).
async fn from(src: Ipv4Addr, addr: SocketAddr, req: Request<Full<Bytes>>) -> u16 {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::from((src, 0))).expect("bind");
    let tcp = sock.connect(addr).await.expect("connect");
    support::send(TokioIo::new(tcp), false, req)
        .await
        .status
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_fake_credentials_is_limited_coalesced_and_counted() {
    let ca = TestCa::new();
    let files = tempfile::tempdir().expect("tmp");
    let ca_file = ca.write_ca(files.path());
    let port = free_port();
    let (got, _rx) = receiver(&ca, port).await;
    let open = loopback();
    // The limits count per calendar minute: start well inside one.
    let into_minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        % 60;
    if into_minute > 45 {
        tokio::time::sleep(Duration::from_secs(61 - into_minute)).await;
    }
    let limits = "per_network_per_minute = 3\nper_site_per_minute = 6";
    let h = Harness::start(&config(files.path(), open, port, &ca_file, limits)).await;
    let clear = SocketAddr::from((open, 6080));
    // 20 different fake keys from one network: 3 events, 17 dropped by the network limit.
    for i in 0..20 {
        assert_eq!(
            from(
                Ipv4Addr::new(127, 77, 1, 1),
                clear,
                with_key("legacy.test", "x-api-key", &format!("fake-{i}"))
            )
            .await,
            403
        );
    }
    // 6 more networks, one key each: the site limit (6 a minute) lets 3 more through.
    for n in 0..6u8 {
        from(
            Ipv4Addr::new(127, 78, n, 1),
            clear,
            with_key("legacy.test", "x-api-key", &format!("other-{n}")),
        )
        .await;
    }
    // One key sent again and again: one event, the repeats coalesced into it.
    for _ in 0..10 {
        from(
            Ipv4Addr::new(127, 77, 1, 1),
            clear,
            with_key("legacy.test", "x-api-key", "fake-0"),
        )
        .await;
    }
    let state = h.dir.path().join("state");
    wait_until("counters written", || {
        let state = state.clone();
        async move {
            portcullis::exposure::queue::read(&state, None)
                .map(|(_, c)| {
                    c.coalesced == 10 && c.dropped_network_rate == 17 && c.dropped_site_rate == 3
                })
                .unwrap_or(false)
        }
    })
    .await;
    let (events, _) = portcullis::exposure::queue::read(&state, None).expect("queue");
    assert_eq!(
        events.len(),
        6,
        "3 from the first network, 3 more until the site limit"
    );
    let repeated = events.iter().filter(|e| e.count == 11).count();
    assert_eq!(
        repeated, 1,
        "the repeated key's event counts every sighting"
    );
    wait_until("the 6 events are delivered", || {
        let got = got.clone();
        async move { got.lock().expect("lock").len() == 6 }
    })
    .await;
    // The API shows the same.
    let (_, counters) =
        portcullis::exposure::queue::read(&state, Some("legacy.test")).expect("queue");
    assert_eq!(counters.dropped_network_rate, 17);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_whose_certificate_is_not_trusted_gets_nothing() {
    let trusted = TestCa::new();
    let other = TestCa::new();
    let files = tempfile::tempdir().expect("tmp");
    let ca_file = trusted.write_ca(files.path());
    let port = free_port();
    // The receiver's certificate comes from a CA the site does not trust.
    let (got, _rx) = receiver(&other, port).await;
    let open = loopback();
    let h = Harness::start(&config(files.path(), open, port, &ca_file, "")).await;
    let clear = SocketAddr::from((open, 6080));
    assert_eq!(
        http(
            clear,
            with_key("notify.test", "x-api-key", "key-for-an-impostor")
        )
        .await
        .status,
        403
    );
    let state = h.dir.path().join("state");
    wait_until("a failed attempt is recorded", || {
        let state = state.clone();
        async move {
            portcullis::exposure::queue::read(&state, None)
                .map(|(e, _)| e.len() == 1 && e[0].attempts >= 1)
                .unwrap_or(false)
        }
    })
    .await;
    let (events, _) = portcullis::exposure::queue::read(&state, None).expect("queue");
    assert_eq!(events[0].state, "pending");
    assert!(
        events[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("certificate"),
        "{:?}",
        events[0].last_error
    );
    assert!(
        got.lock().expect("lock").is_empty(),
        "nothing reached the untrusted receiver"
    );
}
