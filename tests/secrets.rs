//! Invariant 2, proved end to end: credentials sent in cleartext, in every position the edge
//! searches, are recorded as exposures, yet none of their values appears in the SQLite files
//! (WAL included), the trace-level log, `/metrics`, the access log or any CLI output.

mod support;

use std::net::SocketAddr;

use support::{loopback, roots_from, wait_until, Serve, TestOrigin, PATIENCE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A distinctive secret no code path could produce by accident.
fn secret(i: usize) -> String {
    format!("PcSecret{i:02}q7Zx{}", std::process::id())
}

/// Sends raw bytes and reads until the server closes (every request here asks it to, or goes
/// to a TLS port, which answers cleartext and closes) or, at worst, stops answering.
async fn raw(addr: SocketAddr, request: String) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn base64(s: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &c)| acc | (c as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_value_reaches_any_file_log_metric_or_output() {
    let origin = TestOrigin::start().await;
    let (closed, open, metrics_ip) = (loopback(), loopback(), loopback());
    let toml = format!(
        r#"
[state]
dir = "STATE"
[analytics]
flush_interval = "200ms"
access_log = "STATE/access.log"
[metrics]
listen = "{metrics_ip}:9464"
[[pool]]
name = "closed"
addresses = ["{closed}"]
tls_ports = [5443]
[[pool]]
name = "open"
addresses = ["{open}"]
tls_ports = [5443]
cleartext_ports = [5080]
[[site]]
host = "api.test"
pool = "closed"
origin = "{o}"
[[site]]
host = "legacy.test"
pool = "open"
origin = "{o}"
cleartext = "reject"
exposure_headers = ["x-custom-secret"]
exposure_params = ["customkey"]
[[site]]
host = "old.test"
pool = "open"
origin = "{o}"
cleartext = "allow"
[[site]]
host = "www.test"
pool = "open"
origin = "{o}"
cleartext = "redirect"
"#,
        o = origin.url()
    );
    let log = tempfile::NamedTempFile::new().expect("log file");
    let mut serve = Serve::start_logging(&toml, Some(log.path()));
    let clear = SocketAddr::from((open, 5080));
    wait_until("serve listens", || async move {
        TcpStream::connect(clear).await.is_ok()
    })
    .await;

    let s: Vec<String> = (0..40).map(secret).collect();
    let basic = base64(&format!("alice:{}", s[1]));
    let proxy_basic = base64(&format!("bob:{}", s[4]));
    let header_sets = [
        format!("Authorization: Bearer {}\r\nCookie: session={}; remember_token={}; theme=dark\r\nX-API-Key: {}\r\n", s[0], s[5], s[6], s[7]),
        format!("Authorization: Basic {basic}\r\nApi-Key: {}\r\nX-Auth-Token: {}\r\nX-Auth-Key: {}\r\n", s[8], s[9], s[10]),
        format!(
            "Authorization: Digest username=\"u\", realm=\"r\", response=\"{}\"\r\nX-Access-Token: {}\r\nPrivate-Token: {}\r\n",
            s[2], s[11], s[12]
        ),
        format!("Authorization: Token {}\r\nProxy-Authorization: Basic {proxy_basic}\r\nX-Custom-Secret: {}\r\n", s[3], s[13]),
    ];
    let params = [
        "api_key",
        "apikey",
        "access_token",
        "token",
        "key",
        "secret",
        "password",
        "client_secret",
        "sig",
        "signature",
        "auth",
        "customkey",
    ];
    let query: Vec<String> = params
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{p}={}", s[14 + i]))
        .collect();
    let query = query.join("&");
    let mut expected_fingerprints = 0;
    for (host, status) in [
        ("legacy.test", "403"),
        ("old.test", "200"),
        ("www.test", "301"),
    ] {
        for headers in &header_sets {
            let out = raw(clear, format!("GET /v1/items?{query} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n")).await;
            assert!(
                out.starts_with(&format!("HTTP/1.1 {status}")),
                "{host}: {out}"
            );
        }
    }
    expected_fingerprints += 14 + params.len();
    // Userinfo in an absolute request target.
    let out = raw(clear, format!("GET http://carol:{}@legacy.test/x HTTP/1.1\r\nHost: legacy.test\r\nConnection: close\r\n\r\n", s[30])).await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    expected_fingerprints += 1;
    // A host no site answers for, and cleartext sent to a TLS port.
    let out = raw(clear, format!("GET /?token={} HTTP/1.1\r\nHost: nobody.test\r\nX-API-Key: {}\r\nConnection: close\r\n\r\n", s[31], s[32])).await;
    assert!(out.starts_with("HTTP/1.1 421"), "{out}");
    let out = raw(
        SocketAddr::from((open, 5443)),
        format!(
            "GET /?api_key={} HTTP/1.1\r\nHost: legacy.test\r\nAuthorization: Bearer {}\r\n\r\n",
            s[33], s[34]
        ),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    expected_fingerprints += 2;

    // Every credential was recorded, as a fingerprint.
    let state = serve.state();
    wait_until("exposures reach the store", || {
        let state = state.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let Ok(Some(store)) = portcullis::store::SqliteStore::open_read_only(&state) else {
                    return 0;
                };
                store
                    .exposures_now("legacy.test", 0)
                    .map(|e| e.len())
                    .unwrap_or(0)
            })
            .await
            .unwrap_or(0)
                == expected_fingerprints
        }
    })
    .await;

    // Everything a person or a program can read back.
    let mut outputs = Vec::new();
    let metrics_roots = roots_from(&serve.ca());
    let tls = support::tls_connect(
        SocketAddr::from((metrics_ip, 9464)),
        &metrics_ip.to_string(),
        support::client_config(metrics_roots, &[b"http/1.1"]),
    )
    .await
    .expect("metrics TLS");
    let got = support::send(
        hyper_util::rt::TokioIo::new(tls),
        false,
        support::get(&format!("https://{metrics_ip}:9464/metrics")),
    )
    .await;
    assert!(
        got.body
            .contains("portcullis_exposures_total{site=\"legacy.test\""),
        "{}",
        got.body
    );
    outputs.push(("/metrics".to_owned(), got.body.into_bytes()));
    for site in ["legacy.test", "old.test", "www.test", "unknown"] {
        for json in [false, true] {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
            cmd.args(["impact", site, "--state-dir"]).arg(&state);
            if json {
                cmd.arg("--json");
            }
            let out = cmd.output().expect("impact");
            assert!(out.status.success());
            outputs.push((
                format!("impact {site} json={json}"),
                [out.stdout, out.stderr].concat(),
            ));
        }
    }
    let (back, status) = tokio::task::spawn_blocking(move || {
        let st = serve.stop();
        (serve, st)
    })
    .await
    .expect("join");
    assert!(status.success());
    for entry in std::fs::read_dir(back.state()).expect("state dir") {
        let path = entry.expect("entry").path();
        outputs.push((
            path.display().to_string(),
            std::fs::read(&path).expect("read"),
        ));
    }
    let log_bytes = std::fs::read(log.path()).expect("log");
    assert!(log_bytes.len() > 1000, "the trace log is not empty");
    outputs.push(("trace log".into(), log_bytes));
    let access = outputs
        .iter()
        .find(|(name, _)| name.ends_with("access.log"))
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .expect("access log written");
    assert!(access.lines().count() >= 14, "{access}");
    assert!(access.contains("\"fingerprint\""));
    assert!(outputs.iter().any(|(n, _)| n.ends_with("portcullis.db")));

    let mut needles: Vec<String> = s.clone();
    needles.push(basic);
    needles.push(proxy_basic);
    for (name, bytes) in &outputs {
        for needle in &needles {
            let found = bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
            assert!(!found, "secret {needle} found in {name}");
        }
    }
}
