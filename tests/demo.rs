//! `portcullis demo`: runs the real binary and executes every curl line it prints, exactly as
//! printed, checking that each shows the behaviour its comment promises.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[path = "support/mod.rs"]
mod support;

#[test]
fn every_printed_curl_line_works_when_pasted() {
    assert!(
        Command::new("curl").arg("--version").output().is_ok(),
        "curl is missing: install Debian's curl (scripts/test.sh does it as root)"
    );
    let (closed, open) = (support::loopback(), support::loopback());
    let state = tempfile::tempdir().expect("tmp");
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "demo",
            "--closed-addr",
            &closed.to_string(),
            "--open-addr",
            &open.to_string(),
        ])
        .arg("--state-dir")
        .arg(state.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(state.path().join("demo.log")).expect("log"),
        ))
        .spawn()
        .expect("spawn demo");
    let stdout = child.stdout.take().expect("stdout");
    let mut printed = Vec::new();
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.expect("line");
        let done = line.starts_with("Press Ctrl-C");
        printed.push(line);
        if done {
            break;
        }
    }
    // Keep reading whatever else it prints, so the demo never writes into a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let exe = env!("CARGO_BIN_EXE_portcullis");
    let curls: Vec<&String> = printed
        .iter()
        .filter(|l| l.starts_with("curl ") || l.starts_with("dig ") || l.starts_with(exe))
        .collect();
    assert_eq!(curls.len(), 18, "{printed:#?}");
    let run = |line: &str| {
        let out = Command::new("sh")
            .args(["-c", line])
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .output()
            .expect("sh");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text.to_ascii_lowercase())
    };
    let expectations: [(Option<i32>, &[&str]); 18] = [
        (Some(7), &["failed to connect"]),
        (
            Some(0),
            &[
                "http/2 200",
                "strict-transport-security: max-age=31536000",
                "x-content-type-options: nosniff",
                "referrer-policy: no-referrer",
                "alt-svc: h3=\":8443\"; ma=86400",
                "over tls: yes",
                "path: /v1/items",
            ],
        ),
        (
            Some(0),
            &[
                "301 moved permanently",
                "location: https://www.demo.test:8443/login?next=/",
            ],
        ),
        (Some(0), &["403 forbidden", "https-only", "rotate"]),
        (Some(0), &["403 forbidden", "https-only"]),
        (Some(0), &["400 bad request", "https only"]),
        (Some(35), &["unrecognized name"]),
        (
            Some(0),
            &[
                "impact of closing cleartext for legacy.demo.test",
                "credentials exposed in cleartext: 2",
                "x-api-key",
                "password",
                "verdict: not ready",
            ],
        ),
        (Some(0), &["legacy.demo.test", "notify", "delivered"]),
        (
            Some(0),
            &[
                "portcullis_requests_total{site=\"legacy.demo.test\",scheme=\"cleartext\",status=\"4xx\"} 2",
                // The demo's warm-up request over HTTP/3.
                "portcullis_requests_total{site=\"api.demo.test\",scheme=\"h3\",status=\"2xx\"} 1",
                "portcullis_exposures_total{site=\"legacy.demo.test\",kind=\"header\"} 1",
                "portcullis_exposures_total{site=\"legacy.demo.test\",kind=\"body\"} 1",
            ],
        ),
        (
            Some(0),
            &[
                "status: noerror",
                &format!("api.demo.test.\t\t60\tin\ta\t{closed}"),
                &format!("api.demo.test.\t\t60\tin\thttps\t1 . alpn=\"h3,h2,http/1.1\" port=8443 ipv4hint={closed}"),
                &format!("legacy.demo.test.\t60\tin\thttps\t1 . alpn=\"h3,h2,http/1.1\" port=8443 ipv4hint={open}"),
            ],
        ),
        (Some(0), &["cleartext port 8080  refused", "https dns record: present", "http/3: offered", "overall grade: a"]),
        (Some(0), &["cleartext port 8080  accepted", "answers 403", "http/3: offered", "overall grade: b"]),
        (Some(0), &["\"host\":\"www.demo.test\"", "\"cleartext\":\"redirect\""]),
        (Some(0), &["\"host\":\"www.demo.test\"", "\"cleartext\":\"reject\"", "\"overridden\":true"]),
        (Some(0), &["403 forbidden"]),
        (Some(0), &["\"who\":\"admin\"", "\"before\":{\"cleartext\":\"redirect\""]),
        (Some(0), &["\"site\":\"api.demo.test\"", "\"source\":\"development\""]),
    ];
    for (i, (line, (code, fragments))) in curls.iter().zip(expectations).enumerate() {
        // Lines 7, 7b and 8 show what background work wrote: the counts (stored every second),
        // the webhook's delivery, the metrics. They only read, so each runs again until it
        // shows what it promises or PATIENCE has passed; every other line runs once.
        let eventual = (7..=9).contains(&i);
        let deadline = support::Deadline::start();
        let (got_code, text) = loop {
            let (got_code, text) = run(line);
            assert!(
                !text.contains("demo-key-123") && !text.contains("demo-pass-456"),
                "the demo's key is never shown in the clear: {line}\n{text}"
            );
            let shows = got_code == code && fragments.iter().all(|f| text.contains(f));
            if shows || !eventual || deadline.passed() {
                break (got_code, text);
            }
            support::pause(std::time::Duration::from_millis(250));
        };
        assert_eq!(got_code, code, "{line}\n{text}");
        for f in fragments {
            assert!(text.contains(f), "{line}: expected {f:?} in\n{text}");
        }
    }
    // The admin token was printed once, on standard output; it never reaches the log.
    let token = printed
        .iter()
        .find_map(|l| l.split("Bearer ").nth(1).and_then(|t| t.split('\'').next()))
        .expect("token printed")
        .to_owned();
    // The warm-up traffic the demo sent at start is in the dashboard's series: the website
    // over TLS and from a script in cleartext, with the script's API key counted as exposed.
    let ca = state.path().join("dev-ca.pem");
    let api = |path: &str| {
        let (_, text) = run(&format!(
            "curl -sS --cacert {} -H 'Authorization: Bearer {token}' https://{closed}:9443{path}",
            ca.display()
        ));
        text
    };
    let deadline = support::Deadline::start();
    let series = loop {
        let text = api("/api/sites/www.demo.test/traffic?since=1h&resolution=1h");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let sum = |k: &str| {
            v["points"].as_array().map_or(0, |p| {
                p.iter().map(|p| p[k].as_u64().unwrap_or(0)).sum::<u64>()
            })
        };
        let got = (sum("tls"), sum("cleartext_likely_automated"));
        if (got.0 >= 2 && got.1 >= 2) || deadline.passed() {
            break (got, text);
        }
        support::pause(std::time::Duration::from_millis(250));
    };
    assert!(series.0 .0 >= 2 && series.0 .1 >= 2, "{}", series.1);
    let exposures = api("/api/sites/www.demo.test/exposures");
    assert!(exposures.contains("x-api-key"), "{exposures}");
    assert!(!exposures.contains("demo-warmup-key-789"), "{exposures}");
    let log = std::fs::read_to_string(state.path().join("demo.log")).expect("log");
    assert!(log.contains("admin API listening"), "{log}");
    assert!(!log.contains(&token), "the admin token is in the log");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let status = child.wait().expect("wait");
    assert!(status.success(), "demo exits 0 on SIGTERM: {status:?}");
}
