//! Traffic analytics over real sockets: exact counts across SIGTERM and restart, capped
//! dimensions with counted overflow, a store that cannot be written, and the impact report.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use portcullis::observe::{Outcome, Scheme};
use portcullis::store::SqliteStore;
use support::{get, http, https, loopback, roots_from, wait_until, Harness, Serve, TestOrigin};
use tokio::net::TcpSocket;

fn two_pools(closed: Ipv4Addr, open: Ipv4Addr, origin: &str, analytics: &str) -> String {
    format!(
        r#"
[state]
dir = "STATE"
[analytics]
{analytics}
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
origin = "{origin}"
[[site]]
host = "www.test"
pool = "open"
origin = "{origin}"
cleartext = "redirect"
[[site]]
host = "legacy.test"
pool = "open"
origin = "{origin}"
cleartext = "reject"
"#
    )
}

/// Total stored count for a site and scheme, over all time.
fn stored(state: &std::path::Path, site: &str, scheme: &str) -> u64 {
    let store = SqliteStore::open_read_only(state)
        .expect("store")
        .expect("the store exists");
    let scheme = Scheme::parse(scheme).expect("scheme");
    store
        .traffic_now(site, 0)
        .expect("traffic")
        .iter()
        .filter(|r| r.scheme == scheme && r.outcome == Outcome::Response)
        .map(|r| r.count)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_exact_across_sigterm_and_restart() {
    let origin = TestOrigin::start().await;
    let (closed, open) = (loopback(), loopback());
    // Flushes are an hour apart, so only the shutdown flush can have written the counts.
    let toml = two_pools(closed, open, &origin.url(), "flush_interval = \"1h\"");
    let mut tally = [0u64; 3];
    let mut serve = Serve::start(&toml);
    for round in 0..2 {
        let tls = SocketAddr::from((closed, 5443));
        wait_until("serve listens", || async move {
            tokio::net::TcpStream::connect(tls).await.is_ok()
        })
        .await;
        let roots = roots_from(&serve.ca());
        let n = 17 + round * 5;
        for i in 0..n {
            let h2 = i % 2 == 0;
            let req = if h2 {
                support::get_h2("https://api.test/x")
            } else {
                get("https://api.test/x")
            };
            assert_eq!(
                https(tls, "api.test", roots.clone(), h2, req).await.status,
                200
            );
            tally[0] += 1;
        }
        for _ in 0..n + 3 {
            assert_eq!(
                http(SocketAddr::from((open, 5080)), get("http://www.test/"))
                    .await
                    .status,
                301
            );
            tally[1] += 1;
        }
        for _ in 0..n + 7 {
            assert_eq!(
                http(SocketAddr::from((open, 5080)), get("http://legacy.test/"))
                    .await
                    .status,
                403
            );
            tally[2] += 1;
        }
        let (back, status) = tokio::task::spawn_blocking(move || {
            let status = serve.stop();
            (serve, status)
        })
        .await
        .expect("join");
        serve = back;
        assert!(status.success());
        let state = serve.state();
        assert_eq!(stored(&state, "api.test", "tls"), tally[0], "round {round}");
        assert_eq!(stored(&state, "www.test", "cleartext"), tally[1]);
        assert_eq!(stored(&state, "legacy.test", "cleartext"), tally[2]);
        // Restart on the same state dir.
        serve.respawn();
    }
}

/// Connects from a chosen loopback source address, so requests come from distinct networks.
async fn http_from(src: Ipv4Addr, addr: SocketAddr, req: Request<Full<Bytes>>) -> support::Got {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::from((src, 0))).expect("bind source");
    let tcp = sock.connect(addr).await.expect("connect");
    support::send(hyper_util::rt::TokioIo::new(tcp), false, req).await
}

fn ua(url: &str, agent: &str) -> Request<Full<Bytes>> {
    let uri: http::Uri = url.parse().expect("url");
    Request::get(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header("host", uri.host().expect("host"))
        .header("user-agent", agent)
        .body(Full::new(Bytes::new()))
        .expect("request")
}

const CHROME: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impact_report_breaks_cleartext_down_and_gives_a_verdict() {
    let origin = TestOrigin::start().await;
    let (closed, open) = (loopback(), loopback());
    let toml = two_pools(
        closed,
        open,
        &origin.url(),
        "flush_interval = \"200ms\"\ntop_k = 5",
    );
    let h = Harness::start(&toml).await;
    let clear = SocketAddr::from((open, 5080));
    let tls = SocketAddr::from((open, 5443));
    // 12 distinct client networks: 5 fit under top_k, 7 overflow.
    for i in 0..12u8 {
        let src = Ipv4Addr::new(127, 200 + (i % 50), i, 9);
        let got = http_from(
            src,
            clear,
            ua("http://legacy.test/v1/items/42", "python-requests/2.31"),
        )
        .await;
        assert_eq!(got.status, 403);
    }
    for _ in 0..3 {
        http(clear, ua("http://legacy.test/login", CHROME)).await;
    }
    let with_key = Request::get("/v2/x?api_key=k-123")
        .header("host", "legacy.test")
        .header("authorization", "Bearer t-456")
        .body(Full::new(Bytes::new()))
        .expect("req");
    http(clear, with_key).await;
    for _ in 0..84 {
        let got = https(
            tls,
            "legacy.test",
            h.roots(),
            false,
            get("https://legacy.test/v1"),
        )
        .await;
        assert_eq!(got.status, 200);
    }
    let api = SocketAddr::from((closed, 5443));
    for _ in 0..10 {
        https(
            api,
            "api.test",
            h.roots(),
            true,
            support::get_h2("https://api.test/"),
        )
        .await;
    }
    let state = h.dir.path().join("state");
    wait_until("counts reach the store", || {
        let state = state.clone();
        async move {
            SqliteStore::path(&state).exists()
                && tokio::task::spawn_blocking(move || {
                    stored(&state, "legacy.test", "tls") == 84
                        && stored(&state, "api.test", "tls") == 10
                })
                .await
                .unwrap_or(false)
        }
    })
    .await;

    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("impact")
            .args(args)
            .arg("--state-dir")
            .arg(&state)
            .output()
            .expect("impact");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    };
    let json: serde_json::Value =
        serde_json::from_str(&run(&["legacy.test", "--json"])).expect("json");
    assert_eq!(json["requests"], 100);
    assert_eq!(json["cleartext_requests"], 16);
    assert!((json["cleartext_percent"].as_f64().expect("pct") - 16.0).abs() < 1e-9);
    assert_eq!(json["likely_human"], 3);
    assert_eq!(json["likely_automated"], 13);
    assert_eq!(json["exposed_credentials"], 2);
    // Networks past top_k (5 per site, minute and scheme) are counted, not kept: every cleartext
    // request is either under a kept network or in the overflow.
    let kept: u64 = json["by_network"]
        .as_array()
        .expect("nets")
        .iter()
        .map(|r| r["requests"].as_u64().expect("n"))
        .sum();
    assert_eq!(
        kept + json["networks_overflow"].as_u64().expect("overflow"),
        16,
        "{json}"
    );
    assert!(json["networks_overflow"].as_u64().expect("overflow") >= 7);
    assert_eq!(json["verdict"]["ready"], false);
    let families: Vec<(String, u64)> = json["by_family"]
        .as_array()
        .expect("families")
        .iter()
        .map(|r| {
            (
                r["value"].as_str().expect("v").to_owned(),
                r["requests"].as_u64().expect("n"),
            )
        })
        .collect();
    assert_eq!(
        families,
        vec![
            ("python".into(), 12),
            ("browser".into(), 3),
            ("none".into(), 1)
        ]
    );
    let paths: Vec<&str> = json["by_path"]
        .as_array()
        .expect("paths")
        .iter()
        .map(|r| r["value"].as_str().expect("v"))
        .collect();
    assert_eq!(paths, vec!["/v1", "/login", "/v2"]);
    assert_eq!(json["by_port"][0]["value"], "5080");
    let kinds: Vec<&str> = json["exposures"]
        .as_array()
        .expect("exp")
        .iter()
        .map(|e| e["kind"].as_str().expect("k"))
        .collect();
    assert!(
        kinds.contains(&"query") && kinds.contains(&"authorization"),
        "{kinds:?}"
    );

    let table = run(&["legacy.test"]);
    assert!(table.contains("verdict: NOT READY"), "{table}");
    assert!(table.contains("16.000%"), "{table}");
    // A site whose traffic is all TLS is ready.
    let api_json: serde_json::Value =
        serde_json::from_str(&run(&["api.test", "--json", "--since", "1h"])).expect("json");
    assert_eq!(api_json["requests"], 10);
    assert_eq!(api_json["verdict"]["ready"], true, "{api_json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_store_never_fails_or_slows_a_request_and_loses_no_count() {
    let origin = TestOrigin::start().await;
    let (closed, open) = (loopback(), loopback());
    let toml = two_pools(closed, open, &origin.url(), "flush_interval = \"100ms\"");
    let h = Harness::start(&toml).await;
    let clear = SocketAddr::from((open, 5080));
    assert_eq!(http(clear, get("http://legacy.test/")).await.status, 403);
    let db = SqliteStore::path(&h.dir.path().join("state"));
    wait_until("the store exists", || {
        let db = db.clone();
        async move { db.exists() }
    })
    .await;
    // Another program takes the write lock and keeps it.
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let db2 = db.clone();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(&db2).expect("open");
        conn.execute_batch("BEGIN EXCLUSIVE").expect("lock");
        locked_tx.send(()).expect("signal");
        release_rx.recv().ok();
        conn.execute_batch("COMMIT").expect("unlock");
    });
    locked_rx.recv().expect("locked");
    let analytics_lag = || h.runtime.analytics().map(|a| a.flush_lag()).unwrap_or(0);
    let mut slowest = Duration::ZERO;
    let started = tokio::time::Instant::now();
    let mut sent = 1u64;
    while started.elapsed() < Duration::from_secs(4) {
        let t = tokio::time::Instant::now();
        let got = http(clear, get("http://legacy.test/")).await;
        slowest = slowest.max(t.elapsed());
        assert_eq!(got.status, 403);
        sent += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The lock is held for 4 s and each flush attempt waits 200 ms for it: a request that
    // waited on the store would take that long. Half of it is far more than any request takes,
    // even on a loaded machine.
    assert!(
        slowest < Duration::from_secs(2),
        "a request took {slowest:?} while the store was locked"
    );
    assert!(analytics_lag() >= 1, "the metrics show the flush lag");
    release_tx.send(()).expect("release");
    holder.join().expect("holder");
    let state = h.dir.path().join("state");
    wait_until("pending counts are written once the lock is gone", || {
        let state = state.clone();
        async move {
            tokio::task::spawn_blocking(move || stored(&state, "legacy.test", "cleartext"))
                .await
                .unwrap_or(0)
                == sent
        }
    })
    .await;
    // The flusher clears its lag just after the write it waited for commits.
    wait_until("the flush lag returns to 0", || async {
        analytics_lag() == 0
    })
    .await;
}

#[tokio::test]
async fn analytics_can_be_turned_off() {
    let origin = TestOrigin::start().await;
    let (closed, open) = (loopback(), loopback());
    let h = Harness::start(&two_pools(closed, open, &origin.url(), "enabled = false")).await;
    assert_eq!(
        http(SocketAddr::from((open, 5080)), get("http://legacy.test/"))
            .await
            .status,
        403
    );
    assert!(h.runtime.analytics().is_none());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The store is there (it keeps the policy too), but no count reached it.
    let store = SqliteStore::open_read_only(&h.dir.path().join("state"))
        .expect("store")
        .expect("the store exists");
    assert_eq!(
        store.traffic_now("legacy.test", 0).expect("traffic"),
        vec![]
    );
}

#[tokio::test]
async fn each_request_on_a_connection_is_classified_by_its_own_user_agent() {
    let origin = TestOrigin::start().await;
    let (closed, open) = (loopback(), loopback());
    let toml = two_pools(
        closed,
        open,
        &origin.url(),
        "access_log = \"STATE/access.log\"",
    );
    let h = Harness::start(&toml).await;
    let tls = support::tls_connect(
        SocketAddr::from((closed, 5443)),
        "api.test",
        support::client_config(h.roots(), &[b"http/1.1"]),
    )
    .await
    .expect("tls");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1");
    tokio::spawn(conn);
    // One keep-alive connection: the edge remembers the connection's agent, and must notice
    // when it changes.
    let agents = [
        Some(CHROME),
        Some("python-requests/2.31"),
        Some(CHROME),
        None,
        Some("curl/8.5.0"),
    ];
    for agent in agents {
        let mut req = Request::get("/").header("host", "api.test");
        if let Some(a) = agent {
            req = req.header("user-agent", a);
        }
        let resp = sender
            .send_request(req.body(Full::new(Bytes::new())).expect("req"))
            .await
            .expect("response");
        assert_eq!(support::read(resp).await.status, 200);
    }
    let log = h.dir.path().join("state/access.log");
    let families = || -> Vec<String> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| v["family"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    wait_until("five access log lines", || {
        let n = families().len();
        async move { n == 5 }
    })
    .await;
    assert_eq!(families(), ["browser", "python", "browser", "none", "curl"]);
}
