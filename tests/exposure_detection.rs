//! Every credential that crosses the wire in cleartext is found, whatever shape the request
//! has: heads the parser refuses (400, 431), heads never finished, form and JSON bodies,
//! `;`-separated queries, tokens in the path; and a harmless cookie is not a credential. Each
//! is checked by its exact keyed fingerprint, and no raw value reaches a file or a log.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use support::{loopback, wait_until, Serve, TestOrigin, PATIENCE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` and reads the answer until the server closes.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one HTTP/1.1 response with a Content-Length from `s`, leaving the connection open.
async fn read_one_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            let n = s.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed before a whole response");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            let Some(end) = text.find("\r\n\r\n") else {
                continue;
            };
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().expect("length"))
                })
                .expect("content-length");
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("a whole response")
}

/// The installation's fingerprint of `secret`, computed as the edge does: HMAC-SHA-256 under
/// the key in the state dir, first 16 bytes, hex.
fn fingerprint(state: &Path, secret: &str) -> String {
    let key = std::fs::read(state.join("fingerprint.key")).expect("fingerprint key");
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key);
    let tag = aws_lc_rs::hmac::sign(&key, secret.as_bytes());
    tag.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn impact(state: &Path, host: &str, json: bool) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.args(["impact", host, "--state-dir"]).arg(state);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("impact");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every file under `dir`, as bytes.
fn files(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else if let Ok(b) = std::fs::read(&p) {
            out.push((p.display().to_string(), b));
        }
    }
}

#[tokio::test]
async fn credentials_in_malformed_requests_bodies_queries_and_paths_are_fingerprinted() {
    let origin = TestOrigin::start().await;
    let (open, closed) = (loopback(), loopback());
    let toml = format!(
        r#"
[state]
dir = "STATE"
[edge]
header_read_timeout = "1s"
[analytics]
flush_interval = "200ms"
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
exposure_paths = ["/bot{{token}}/"]
exposure_cookies = ["prefs_v2"]
[[site]]
host = "old.test"
pool = "open"
origin = "{o}"
cleartext = "allow"
"#,
        o = origin.url()
    );
    let log = tempfile::NamedTempFile::new().expect("log file");
    let serve = Serve::start_logging(&toml, Some(log.path()));
    let clear = SocketAddr::from((open, 5080));
    let tls_port = SocketAddr::from((open, 5443));
    wait_until("serve listens", || async move {
        TcpStream::connect(clear).await.is_ok()
    })
    .await;
    let s: Vec<String> = (0..12).map(|i| format!("wire-secret-{i}-q8Zr")).collect();

    // A bad header line: 400 from the parser.
    let out = raw(clear, format!("GET / HTTP/1.1\r\nHost: legacy.test\r\nX-API-Key: {}\r\nthis line is no header\r\n\r\n", s[0]).as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // A head past max_header_bytes: 431.
    let big = "a".repeat(40 * 1024);
    let out = raw(clear, format!("GET / HTTP/1.1\r\nHost: legacy.test\r\nAuthorization: Bearer {}\r\nX-Big: {big}\r\n\r\n", s[1]).as_bytes()).await;
    assert!(
        out.starts_with("HTTP/1.1 431"),
        "{}",
        &out[..out.len().min(200)]
    );
    // A head never finished: closed by the header-read timeout.
    raw(
        clear,
        format!(
            "GET / HTTP/1.1\r\nHost: legacy.test\r\nX-Auth-Token: {}\r\n",
            s[2]
        )
        .as_bytes(),
    )
    .await;
    // A login form, refused: the body was read before the 403.
    let form = format!("user=alice&password={}&remember=1", s[3]);
    let out = raw(clear, format!("POST /login HTTP/1.1\r\nHost: legacy.test\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}", form.len()).as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    // A JSON body in allow mode, longer than the part searched: the origin gets it whole.
    let json = format!(
        "{{\"client_secret\": \"{}\", \"pad\": \"{}\"}}",
        s[4],
        "p".repeat(20_000)
    );
    let req = http::Request::post("/echo-body")
        .header("host", "old.test")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(json.clone())))
        .expect("request");
    let got = support::http(clear, req).await;
    assert_eq!(got.status, 200);
    assert!(got.body == json, "the origin received the whole body");
    // A malformed head after a good one on the same keep-alive connection: what the client
    // sent after the first answer is searched too.
    let mut conn = TcpStream::connect(clear).await.expect("connect");
    conn.write_all(b"GET / HTTP/1.1\r\nHost: old.test\r\n\r\n")
        .await
        .expect("write");
    let first = read_one_response(&mut conn).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    conn.write_all(
        format!(
            "GET / HTTP/1.1\r\nHost: old.test\r\nX-API-Key: {}\r\nno header here\r\n\r\n",
            s[10]
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut second = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, conn.read_to_end(&mut second)).await;
    assert!(
        second.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&second)
    );
    // `;` between query parameters, and a token in the path.
    let out = raw(
        clear,
        format!(
            "GET /x?page=1;api_key={} HTTP/1.1\r\nHost: legacy.test\r\n\r\n",
            s[5]
        )
        .as_bytes(),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    let out = raw(
        clear,
        format!(
            "GET /bot{}/sendMessage HTTP/1.1\r\nHost: legacy.test\r\n\r\n",
            s[6]
        )
        .as_bytes(),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    // A client waiting for 100-continue has not sent its body: nothing is read, so nothing of
    // it is found.
    let out = raw(clear, b"POST /login HTTP/1.1\r\nHost: legacy.test\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 40\r\nExpect: 100-continue\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    // Cookies: the site's own credential cookie counts, a theme does not.
    let out = raw(clear, format!("GET / HTTP/1.1\r\nHost: legacy.test\r\nCookie: theme=dark; prefs_v2={}; lang={}\r\n\r\n", s[8], s[7]).as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    // Cleartext to a TLS port with a head that does not parse.
    let out = raw(
        tls_port,
        format!(
            "GET / HTTP/1.1\r\nHost: legacy.test\r\nX-API-Key: {}\r\nbad line\r\n\r\n",
            s[9]
        )
        .as_bytes(),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");

    let state = serve.state();
    let expected: Vec<(usize, &str, &str)> = vec![
        (0, "header", "x-api-key"),
        (1, "authorization", "Bearer"),
        (2, "header", "x-auth-token"),
        (3, "body", "password"),
        (5, "query", "api_key"),
        (6, "path", "token"),
        (8, "cookie", "prefs_v2"),
        (9, "header", "x-api-key"),
    ];
    let want = expected.len() as u64;
    wait_until("every exposure reaches the store", || {
        let state = state.clone();
        async move {
            let json = impact(&state, "legacy.test", true);
            serde_json::from_str::<serde_json::Value>(&json)
                .ok()
                .and_then(|v| v["exposed_credentials"].as_u64())
                == Some(want)
        }
    })
    .await;
    let report: serde_json::Value =
        serde_json::from_str(&impact(&state, "legacy.test", true)).expect("json");
    let rows = report["exposures"].as_array().expect("exposures");
    for (i, kind, name) in &expected {
        let fp = fingerprint(&state, &s[*i]);
        let row = rows
            .iter()
            .find(|r| r["fingerprint"] == fp.as_str())
            .unwrap_or_else(|| panic!("secret {i} ({kind} {name}) is not in {rows:#?}"));
        assert_eq!(
            (row["kind"].as_str(), row["name"].as_str()),
            (Some(*kind), Some(*name))
        );
    }
    for row in rows {
        assert!(!row["path"].as_str().unwrap_or("").contains(&s[6]), "{row}");
    }
    // The allow-mode site's credentials are its own: the JSON body's, and the malformed head's
    // sent after a good request on one connection.
    wait_until("the allow-mode site's credentials are recorded", || {
        let state = state.clone();
        let fps = [fingerprint(&state, &s[4]), fingerprint(&state, &s[10])];
        async move {
            let report = impact(&state, "old.test", true);
            fps.iter().all(|fp| report.contains(fp.as_str()))
        }
    })
    .await;

    // The text report counts what it lists, one line per credential.
    let text = impact(&state, "legacy.test", false);
    assert!(
        text.contains(&format!(
            "credentials exposed in cleartext: {}",
            expected.len()
        )),
        "{text}"
    );
    let listed = text
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            l.len() > 32 && l[..32].bytes().all(|b| b.is_ascii_hexdigit())
        })
        .count();
    assert_eq!(listed, expected.len(), "{text}");

    // No raw value anywhere: state files (databases, logs), the server's log, the reports.
    let mut all = Vec::new();
    files(&state, &mut all);
    all.push(("serve log".into(), std::fs::read(log.path()).expect("log")));
    all.push(("text report".into(), text.into_bytes()));
    all.push(("json report".into(), report.to_string().into_bytes()));
    for (what, bytes) in &all {
        let hay = String::from_utf8_lossy(bytes);
        for secret in &s {
            assert!(!hay.contains(secret.as_str()), "{secret} found in {what}");
        }
    }
    drop(serve);
}
