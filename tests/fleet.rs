//! A fleet on one PostgreSQL store: nodes with their own addresses and state dirs, one policy,
//! counts that sum exactly, one audit log. PostgreSQL is Debian's, started by the tests.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use portcullis::runtime::{ConfigSource, Runtime};
use support::{get, http, https, loopback, roots_from, wait_until, TestOrigin};

struct Node {
    rt: Runtime,
    open: Ipv4Addr,
    admin: SocketAddr,
    token: Option<String>,
    path: std::path::PathBuf,
    state: std::path::PathBuf,
}

/// More keys for a node's config.
#[derive(Default)]
struct Extra<'a> {
    /// In `[store]`.
    store: &'a str,
    /// In its site's table.
    site: &'a str,
}

fn config(
    name: &str,
    url: &str,
    open: Ipv4Addr,
    admin: SocketAddr,
    origin: &str,
    state: &Path,
    extra: &Extra,
) -> String {
    format!(
        r#"
[state]
dir = "{state}"
[node]
name = "{name}"
[store]
url = "{url}"
pool_size = 4
{store}
[analytics]
flush_interval = "100ms"
[admin]
listen = "{admin}"
[[pool]]
name = "open"
addresses = ["{open}"]
tls_ports = [6443]
cleartext_ports = [6080]
[[site]]
host = "legacy.test"
pool = "open"
origin = "{origin}"
cleartext = "reject"
{site}
"#,
        state = state.display(),
        store = extra.store,
        site = extra.site,
    )
}

async fn node(dir: &Path, name: &str, url: &str, origin: &str) -> Node {
    node_with(dir, name, url, origin, Extra::default()).await
}

/// A node with more `[store]` keys, and more keys for its site.
async fn node_with(dir: &Path, name: &str, url: &str, origin: &str, extra: Extra<'_>) -> Node {
    let (open, admin) = (loopback(), SocketAddr::from((loopback(), 6444)));
    let state = dir.join(name);
    let path = dir.join(format!("{name}.toml"));
    let text = config(name, url, open, admin, origin, &state, &extra);
    std::fs::write(&path, text).expect("write");
    let rt = Runtime::start(ConfigSource::File(path.clone()), None)
        .await
        .unwrap_or_else(|e| panic!("node {name} starts: {e}"));
    let token = rt.admin().and_then(|a| a.new_token.clone());
    Node {
        rt,
        open,
        admin,
        token,
        path,
        state,
    }
}

impl Node {
    async fn api(&self, token: &str, method: Method, path: &str, body: &str) -> (u16, String) {
        let req = Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", self.admin))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("request");
        let got = https(
            self.admin,
            &self.admin.ip().to_string(),
            roots_from(&self.state.join("dev-ca.pem")),
            false,
            req,
        )
        .await;
        (got.status.as_u16(), got.body)
    }

    async fn cleartext(&self) -> u16 {
        http(
            SocketAddr::from((self.open, 6080)),
            get("http://legacy.test/"),
        )
        .await
        .status
        .as_u16()
    }
}

fn impact(config: &Path) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["impact", "legacy.test", "--json", "-c"])
        .arg(config)
        .output()
        .expect("impact");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_policy_one_audit_log_and_counts_that_sum_exactly() {
    let dir = tempfile::tempdir().expect("tmp");
    let origin = TestOrigin::start().await;
    let url = support::postgres::Postgres::shared().database().await;
    let a = node(dir.path(), "a", &url, &origin.url()).await;
    let b = node(dir.path(), "b", &url, &origin.url()).await;

    // Cleartext seen by each node, summed in either node's impact report.
    for _ in 0..3 {
        assert_eq!(a.cleartext().await, 403);
    }
    for _ in 0..4 {
        assert_eq!(b.cleartext().await, 403);
    }
    let (pa, pb) = (a.path.clone(), b.path.clone());
    wait_until("both nodes' counts reach the store", || {
        let (pa, pb) = (pa.clone(), pb.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                impact(&pa)["cleartext_requests"] == 7 && impact(&pb)["cleartext_requests"] == 7
            })
            .await
            .unwrap_or(false)
        }
    })
    .await;

    // A credential sent in cleartext to b is recorded as a fingerprint only: a dump of the
    // whole database holds no raw secret.
    const KEY: &str = "fleet-secret-key-4b1c9e77";
    let mut req = get("http://legacy.test/v1");
    req.headers_mut()
        .insert("x-api-key", KEY.parse().expect("header"));
    assert_eq!(
        http(SocketAddr::from((b.open, 6080)), req).await.status,
        403
    );
    let pb2 = b.path.clone();
    wait_until("the exposure reaches the store", || {
        let p = pb2.clone();
        async move {
            tokio::task::spawn_blocking(move || impact(&p)["exposed_credentials"] == 1)
                .await
                .unwrap_or(false)
        }
    })
    .await;
    let dump = std::process::Command::new(support::postgres::bin("pg_dump"))
        .arg(&url)
        .output()
        .expect("pg_dump");
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dump = String::from_utf8_lossy(&dump.stdout);
    let fingerprint = impact(&b.path)["exposures"][0]["fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_owned();
    assert!(
        dump.contains(&fingerprint),
        "the dump holds the exposure record"
    );
    assert!(
        !dump.contains(KEY),
        "a raw credential is in the database dump"
    );

    // A change through node a is in the audit log node b serves.
    let token_a = a.token.clone().expect("a's token");
    let (status, body) = a
        .api(
            &token_a,
            Method::PATCH,
            "/api/sites/legacy.test",
            r#"{"cleartext":"redirect"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(a.cleartext().await, 301, "applied on a at once");
    // ... and on b, which polls the store's generation, within 2 s.
    let changed = tokio::time::Instant::now();
    while b.cleartext().await != 301 {
        assert!(
            changed.elapsed() < Duration::from_secs(2),
            "b still answers the old mode after {:?}",
            changed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("a change on a reached b in {:?}", changed.elapsed());
    let token_b = b.token.clone().expect("b's token");
    let (status, audit) = b.api(&token_b, Method::GET, "/api/audit", "").await;
    assert_eq!(status, 200, "{audit}");
    let audit: serde_json::Value = serde_json::from_str(&audit).expect("json");
    let last = audit.as_array().and_then(|v| v.last()).expect("an entry");
    assert_eq!(last["site"], "legacy.test");
    assert_eq!(last["after"]["cleartext"], "redirect", "{last}");
    assert_eq!(
        last["node"], "a",
        "the entry names the node that took the change"
    );
    // Every node is listed with its heartbeat, from either node.
    let (status, nodes) = b.api(&token_b, Method::GET, "/api/nodes", "").await;
    assert_eq!(status, 200, "{nodes}");
    let nodes: serde_json::Value = serde_json::from_str(&nodes).expect("json");
    let names: Vec<&str> = nodes
        .as_array()
        .expect("list")
        .iter()
        .filter(|n| n["alive"] == true)
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(names, ["a", "b"], "{nodes}");
    assert!(
        nodes[1]["this_node"] == true && nodes[0]["this_node"] == false,
        "{nodes}"
    );
    assert_eq!(nodes[0]["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        nodes[0]["generation"].as_u64().is_some_and(|g| g >= 1),
        "{nodes}"
    );

    // A node started after a change starts from the shared policy.
    let (status, body) = a
        .api(
            &token_a,
            Method::PATCH,
            "/api/sites/legacy.test",
            r#"{"cleartext":"allow"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    b.rt.shutdown(Duration::from_secs(2)).await;
    let b_path = b.path.clone();
    let b_open = b.open;
    drop(b);
    let rt = Runtime::start(ConfigSource::File(b_path), None)
        .await
        .expect("b restarts");
    let got = http(SocketAddr::from((b_open, 6080)), get("http://legacy.test/")).await;
    assert_eq!(
        got.status, 200,
        "b, restarted, starts from the latest mode in the store"
    );
    rt.shutdown(Duration::from_secs(2)).await;
    a.rt.shutdown(Duration::from_secs(2)).await;
}

/// Waits up to `within` for `node` to answer cleartext with `status`; returns how long it took.
async fn serves(node: &Node, status: u16, within: Duration, what: &str) -> Duration {
    let since = tokio::time::Instant::now();
    loop {
        let got = node.cleartext().await;
        if got == status {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < within,
            "{what}: still {got} instead of {status} after {:?}",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn psql(url: &str, sql: &str) -> String {
    let out = std::process::Command::new(support::postgres::bin("psql"))
        .args([url, "-v", "ON_ERROR_STOP=1", "-tA", "-c", sql])
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_wakes_every_node_at_once_and_the_poll_catches_up_what_a_lost_one_missed() {
    let dir = tempfile::tempdir().expect("tmp");
    let origin = TestOrigin::start().await;
    let url = support::postgres::Postgres::shared().database().await;
    let a = node(dir.path(), "a", &url, &origin.url()).await;
    // b polls so rarely that, within this test, only a notification can tell it of a change;
    // c polls often.
    let b = node_with(
        dir.path(),
        "b",
        &url,
        &origin.url(),
        Extra {
            store: r#"poll_interval = "60s""#,
            ..Extra::default()
        },
    )
    .await;
    let c = node_with(
        dir.path(),
        "c",
        &url,
        &origin.url(),
        Extra {
            store: r#"poll_interval = "200ms""#,
            ..Extra::default()
        },
    )
    .await;
    let token = a.token.clone().expect("a's token");
    let mode = |m: &str| format!(r#"{{"cleartext":"{m}"}}"#);
    let patch = |m: &'static str| {
        let (a, token, body) = (&a, token.clone(), mode(m));
        async move {
            let (status, body) = a
                .api(&token, Method::PATCH, "/api/sites/legacy.test", &body)
                .await;
            assert_eq!(status, 200, "{body}");
        }
    };

    patch("redirect").await;
    let took = serves(&b, 301, Duration::from_secs(2), "b, woken by NOTIFY").await;
    eprintln!("a change on a reached b (60 s poll) in {took:?}");

    // Every node's notification connection is cut: each reconnects, and a change made
    // meanwhile still arrives (the reconnection wakes the follower to read the generation).
    let cut = psql(
        &url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE query = 'LISTEN portcullis_policy' AND datname = current_database()",
    );
    assert_eq!(cut, "3", "one notification connection per node");
    patch("allow").await;
    serves(
        &b,
        200,
        Duration::from_secs(3),
        "b, after its listener was cut",
    )
    .await;
    wait_until("every node listens again", || {
        let url = url.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                psql(
                    &url,
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE query = 'LISTEN portcullis_policy' AND datname = current_database()",
                ) == "3"
            })
            .await
            .unwrap_or(false)
        }
    })
    .await;

    // A write that sends no notification (as one lost on the way) reaches c by its poll,
    // and not b, which only polls every minute.
    patch("redirect").await;
    serves(&b, 301, Duration::from_secs(2), "b").await;
    serves(&c, 301, Duration::from_secs(2), "c").await;
    psql(
        &url,
        "BEGIN; \
         UPDATE overrides SET value = replace(value, '\"redirect\"', '\"reject\"') \
           WHERE site = 'legacy.test'; \
         UPDATE policy_generation SET value = value + 1; COMMIT",
    );
    serves(&c, 403, Duration::from_secs(2), "c, by its poll").await;
    assert_eq!(b.cleartext().await, 301, "b heard of the silent write");

    for n in [a, b, c] {
        n.rt.shutdown(Duration::from_secs(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_serve_on_while_the_database_is_down_and_catch_up_when_it_returns() {
    let dir = tempfile::tempdir().expect("tmp");
    let origin = TestOrigin::start().await;
    let pg = support::postgres::Postgres::start();
    let url = pg.database().await;
    let a = node(dir.path(), "a", &url, &origin.url()).await;
    // b reports exposures to a webhook that is not there: its events stay pending.
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, "s".repeat(32)).expect("secret");
    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let hook = format!(
        "exposure_response = \"notify\"\nwebhook = {{ url = \"https://localhost:{unused}/hook\", secret_file = \"{}\" }}",
        secret.display()
    );
    let b = node_with(
        dir.path(),
        "b",
        &url,
        &origin.url(),
        Extra {
            site: &hook,
            ..Extra::default()
        },
    )
    .await;
    let token_a = a.token.clone().expect("a's token");
    let (status, body) = a
        .api(
            &token_a,
            Method::PATCH,
            "/api/sites/legacy.test",
            r#"{"cleartext":"redirect"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let lkg = b.state.join("last-known-good.json");
    wait_until("b applies the change and keeps a copy of it", || {
        let lkg = lkg.clone();
        let b_open = b.open;
        async move {
            let copy = std::fs::read_to_string(&lkg).unwrap_or_default();
            copy.contains("redirect")
                && http(SocketAddr::from((b_open, 6080)), get("http://legacy.test/"))
                    .await
                    .status
                    == 301
        }
    })
    .await;

    // Every count so far is in the store (the flushes run every 100 ms).
    let a_path = a.path.clone();
    let total = move || {
        let p = a_path.clone();
        async move {
            tokio::task::spawn_blocking(move || impact(&p)["cleartext_requests"].as_u64())
                .await
                .ok()
                .flatten()
                .unwrap_or(0)
        }
    };
    let mut before = total().await;
    loop {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let again = total().await;
        if again == before {
            break;
        }
        before = again;
    }

    // The database goes away: both nodes keep serving the policy they have, and say so.
    pg.stop();
    wait_until("the nodes see the store down", || {
        let down = !a.rt.store_up() && !b.rt.store_up();
        async move { down }
    })
    .await;
    assert_eq!(a.cleartext().await, 301);
    assert!(a.rt.metrics().contains("portcullis_store_up 0"));
    let (status, ready) = a.api(&token_a, Method::GET, "/readyz", "").await;
    assert_eq!(status, 200);
    assert!(ready.contains("\"store\":\"down\""), "{ready}");

    // b counts two requests, one with a credential, then restarts meanwhile: the counts and
    // the exposure event it could not write are kept in its state dir (fingerprints only),
    // and it starts from its last-known-good copy, not the file's reject.
    const KEY: &str = "outage-secret-key-9d2e61";
    assert_eq!(b.cleartext().await, 301);
    let mut with_key = get("http://legacy.test/v1");
    with_key
        .headers_mut()
        .insert("x-api-key", KEY.parse().expect("header"));
    assert_eq!(
        http(SocketAddr::from((b.open, 6080)), with_key)
            .await
            .status,
        301
    );
    b.rt.shutdown(Duration::from_secs(2)).await;
    let (b_path, b_open, b_state) = (b.path.clone(), b.open, b.state.clone());
    drop(b);
    let spill = b_state.join("analytics-spill.json");
    assert!(spill.exists(), "b kept its unwritten counts");
    let events_spill = b_state.join("exposure-spill.json");
    let kept = std::fs::read_to_string(&events_spill).expect("b kept its unwritten event");
    assert!(kept.contains("x-api-key"), "{kept}");
    assert!(!kept.contains(KEY), "the raw credential is in {kept}");
    let b = Runtime::start(ConfigSource::File(b_path.clone()), None)
        .await
        .expect("b starts without its database");
    assert!(!b.store_up());
    let clear = SocketAddr::from((b_open, 6080));
    for _ in 0..3 {
        assert_eq!(http(clear, get("http://legacy.test/")).await.status, 301);
    }

    // The database is back: b catches up, and changes flow to it again.
    pg.resume();
    wait_until("b sees the store again", || {
        let up = b.store_up();
        async move { up }
    })
    .await;
    let (status, body) = a
        .api(
            &token_a,
            Method::PATCH,
            "/api/sites/legacy.test",
            r#"{"cleartext":"allow"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let changed = tokio::time::Instant::now();
    let mut polls = 1;
    while http(clear, get("http://legacy.test/")).await.status != 200 {
        polls += 1;
        assert!(
            changed.elapsed() < Duration::from_secs(2),
            "not applied on b"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // What the nodes counted while the database was down reached it, exactly: one request on
    // a, two on b before its restart (kept in its state dir), three after; then the polls.
    wait_until("the counts from the outage are in the store", || {
        let total = total.clone();
        async move { total().await >= before + 6 + polls }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        total().await,
        before + 6 + polls,
        "nothing lost, nothing counted twice"
    );
    assert!(
        !spill.exists(),
        "the kept counts are in the store, and the file is gone"
    );
    // The event b kept is in the fleet's queue, once, and its file is gone.
    let (status, events) = a
        .api(&token_a, Method::GET, "/api/exposure-events", "")
        .await;
    assert_eq!(status, 200, "{events}");
    let events: serde_json::Value = serde_json::from_str(&events).expect("json");
    let events = events["events"].as_array().expect("events");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["name"], "x-api-key", "{events:?}");
    assert!(!events_spill.exists(), "the kept event is in the store");
    b.shutdown(Duration::from_secs(2)).await;
    a.rt.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_credential_seen_by_two_nodes_reaches_the_webhook_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let ca = support::TestCa::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let (got, _receiver) = support::webhook::receiver(&ca, port).await;
    assert_eq!(ca.write_ca(dir.path()), dir.path().join("test-ca.pem"));
    std::fs::write(
        dir.path().join("hook.secret"),
        "webhook-signing-secret-for-tests",
    )
    .expect("secret");
    let url = support::postgres::Postgres::shared().database().await;
    // One fingerprint key for the fleet, so one credential has one fingerprint on every node.
    let key: Vec<u8> = (0..32u8).collect();
    let mut nodes = Vec::new();
    for name in ["a", "b"] {
        let state = dir.path().join(name);
        std::fs::create_dir_all(&state).expect("state");
        std::fs::write(state.join("fingerprint.key"), &key).expect("key");
        let open = loopback();
        let path = webhook_node(dir.path(), name, &url, open, port);
        let rt = Runtime::start(ConfigSource::File(path), None)
            .await
            .unwrap_or_else(|e| panic!("node {name} starts: {e}"));
        nodes.push((rt, open));
    }
    for (_, open) in &nodes {
        let mut req = get("http://legacy.test/v1");
        req.headers_mut().insert(
            "x-api-key",
            "shared-key-seen-by-both-nodes".parse().expect("h"),
        );
        assert_eq!(http(SocketAddr::from((*open, 6080)), req).await.status, 403);
    }
    wait_until("the event is delivered", || {
        let n = got.lock().expect("lock").len();
        async move { n >= 1 }
    })
    .await;
    // Both nodes' responders keep claiming: still one delivery after a few of their rounds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deliveries = got.lock().expect("lock").clone();
    assert_eq!(deliveries.len(), 1, "{deliveries:?}");
    let body = &deliveries[0].1;
    assert_eq!(body["site"], "legacy.test");
    assert!(body["count"].as_u64().is_some_and(|c| c >= 1), "{body}");
    assert!(deliveries[0].0.get("idempotency-key").is_some());
    for (rt, _) in nodes {
        rt.shutdown(Duration::from_secs(2)).await;
    }
}

/// An ACME node of a fleet: its own closed address and DNS server, the shared store; the site
/// takes its certificate from the CA when `acme` (else the development CA's).
#[allow(clippy::too_many_arguments)]
fn acme_node(
    dir: &Path,
    name: &str,
    url: &str,
    pebble: &support::pebble::Pebble,
    closed: Ipv4Addr,
    dns: SocketAddr,
    origin: &str,
    acme: bool,
) -> std::path::PathBuf {
    let state = dir.join(name);
    let mut text =
        support::pebble::acme_config(pebble, &state, closed, dns, origin, "www.acme.test", "");
    if !acme {
        text = text.replace("cert = \"acme\"\n", "");
    }
    text += &format!("[node]\nname = \"{name}\"\n[store]\nurl = \"{url}\"\npool_size = 2\n");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write");
    path
}

/// Two ACME nodes' addresses and a Pebble that resolves names through b's DNS server, which
/// answers with b's address only: every validation reaches b, whichever node ordered. Both
/// state dirs hold one installation secret, so each node opens the keys the other sealed.
struct AcmeFleet {
    pebble: support::pebble::Pebble,
    key: [u8; 32],
    closed_a: Ipv4Addr,
    closed_b: Ipv4Addr,
    dns_a: SocketAddr,
    dns_b: SocketAddr,
}

async fn acme_fleet(dir: &Path) -> AcmeFleet {
    let (closed_a, closed_b) = (loopback(), loopback());
    let (dns_a, dns_b) = (
        SocketAddr::from((loopback(), 5353)),
        SocketAddr::from((loopback(), 5353)),
    );
    let mut pebble = support::pebble::Pebble::new(dir);
    pebble.start(8443, dns_b).await;
    let mut key = [0u8; 32];
    aws_lc_rs::rand::fill(&mut key).expect("random");
    for name in ["a", "b"] {
        std::fs::create_dir_all(dir.join(name)).expect("state");
        std::fs::write(dir.join(name).join("fingerprint.key"), key).expect("key");
    }
    AcmeFleet {
        pebble,
        key,
        closed_a,
        closed_b,
        dns_a,
        dns_b,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_orders_one_certificate_that_any_node_validates_and_every_node_serves() {
    use portcullis::acme::CertSource;
    use support::pebble::{served, start};

    let dir = tempfile::tempdir().expect("tmp");
    let url = support::postgres::Postgres::shared().database().await;
    let origin = TestOrigin::start().await;
    let AcmeFleet {
        pebble,
        key,
        closed_a,
        closed_b,
        dns_a,
        dns_b,
    } = acme_fleet(dir.path()).await;
    // b serves the site with a development certificate and orders nothing; a orders.
    let path_b = acme_node(
        dir.path(),
        "b",
        &url,
        &pebble,
        closed_b,
        dns_b,
        &origin.url(),
        false,
    );
    let b = start(&path_b).await;
    let path_a = acme_node(
        dir.path(),
        "a",
        &url,
        &pebble,
        closed_a,
        dns_a,
        &origin.url(),
        true,
    );
    let a = start(&path_a).await;
    let issued = |rt: &Runtime| {
        rt.acme()
            .status()
            .iter()
            .all(|s| s.source == CertSource::Acme)
    };
    wait_until("a's order is validated on b and issued", || {
        let done = issued(&a);
        async move { done }
    })
    .await;
    let st = a.acme().status()[0].clone();
    assert!(st.last_error.is_none(), "{st:?}");
    let roots = pebble.root().await;
    let on_a = served(
        SocketAddr::from((closed_a, 8443)),
        "www.acme.test",
        roots.clone(),
    )
    .await;

    // b takes the site's certificate from the CA too: it finds a's in the store and orders none.
    std::fs::write(
        &path_b,
        std::fs::read_to_string(&path_b)
            .expect("read")
            .replace("origin = ", "cert = \"acme\"\norigin = "),
    )
    .expect("write");
    b.reload().await.expect("reload");
    wait_until("b serves the fleet's certificate", || {
        let done = issued(&b);
        async move { done }
    })
    .await;
    let on_b = served(
        SocketAddr::from((closed_b, 8443)),
        "www.acme.test",
        roots.clone(),
    )
    .await;
    assert_eq!(on_a, on_b, "one certificate for the fleet: b ordered none");
    let kept =
        std::fs::read_to_string(dir.path().join("b/acme/www.acme.test.pem")).expect("b's copy");
    assert!(kept.contains("BEGIN CERTIFICATE"));

    // A node joining later, with no files of its own, serves it from its first handshake.
    std::fs::create_dir_all(dir.path().join("c")).expect("state");
    std::fs::write(dir.path().join("c").join("fingerprint.key"), key).expect("key");
    let closed_c = loopback();
    let path_c = acme_node(
        dir.path(),
        "c",
        &url,
        &pebble,
        closed_c,
        SocketAddr::from((loopback(), 5353)),
        &origin.url(),
        true,
    );
    let c = start(&path_c).await;
    assert!(issued(&c), "{:?}", c.acme().status());
    let on_c = served(SocketAddr::from((closed_c, 8443)), "www.acme.test", roots).await;
    assert_eq!(on_a, on_c);

    // The store holds the certificate key and the account key sealed only.
    let dump = std::process::Command::new(support::postgres::bin("pg_dump"))
        .arg(&url)
        .output()
        .expect("pg_dump");
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("acme_certs"),
        "the dump holds the ACME tables"
    );
    assert!(
        !dump.contains("PRIVATE KEY"),
        "a key in the clear in the database dump"
    );
    let key_pem =
        std::fs::read_to_string(dir.path().join("a/acme/www.acme.test.key")).expect("key");
    for line in key_pem.lines().filter(|l| l.len() > 40) {
        assert!(
            !dump.contains(line),
            "a line of the certificate key is in the dump"
        );
    }
    let account = std::fs::read_dir(dir.path().join("a/acme"))
        .expect("dir")
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("account-"))
        .expect("account file");
    let creds: serde_json::Value =
        serde_json::from_slice(&std::fs::read(account.path()).expect("read")).expect("json");
    let pkcs8 = creds["key_pkcs8"].as_str().expect("account key");
    assert!(
        !dump.contains(&pkcs8[pkcs8.len() / 2..]),
        "the account key is in the dump"
    );
    for rt in [&a, &b, &c] {
        rt.shutdown(Duration::from_secs(2)).await;
    }
}

/// A webhook node's config: `legacy.test` on an open pool at `open`, exposure events to the
/// receiver at `port`, deliveries timing out after 1 s.
fn webhook_node(
    dir: &Path,
    name: &str,
    url: &str,
    open: Ipv4Addr,
    port: u16,
) -> std::path::PathBuf {
    let state = dir.join(name);
    let ca = dir.join("test-ca.pem");
    let secret = dir.join("hook.secret");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
[state]
dir = "{state}"
[node]
name = "{name}"
[store]
url = "{url}"
pool_size = 2
[analytics]
flush_interval = "100ms"
[exposure]
delivery_timeout = "1s"
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
exposure_response = "notify"
webhook = {{ url = "https://localhost:{port}/hook", secret_file = "{secret}", ca = "{ca}" }}
"#,
            state = state.display(),
            secret = secret.display(),
            ca = ca.display(),
        ),
    )
    .expect("write");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_during_delivery_leaves_the_event_to_another_node_which_delivers_it_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let ca = support::TestCa::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    // The first delivery reaches the receiver and is never answered: its sender dies meanwhile.
    let (got, _receiver) = support::webhook::receiver_hanging(&ca, port, 1).await;
    assert_eq!(ca.write_ca(dir.path()), dir.path().join("test-ca.pem"));
    std::fs::write(
        dir.path().join("hook.secret"),
        "webhook-signing-secret-for-tests",
    )
    .expect("secret");
    let url = support::postgres::Postgres::shared().database().await;

    // Node a runs as its own process, so it can be killed with SIGKILL mid-delivery.
    let open_a = loopback();
    let path_a = webhook_node(dir.path(), "a", &url, open_a, port);
    let log = std::fs::File::create(dir.path().join("a.log")).expect("log");
    let mut a = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("serve")
        .arg("-c")
        .arg(&path_a)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("portcullis serve");
    let cleartext = SocketAddr::from((open_a, 6080));
    wait_until("node a listens", || async move {
        tokio::net::TcpStream::connect(cleartext).await.is_ok()
    })
    .await;
    let mut req = get("http://legacy.test/v1");
    req.headers_mut().insert(
        "x-api-key",
        "key-whose-delivery-is-cut-short".parse().expect("h"),
    );
    assert_eq!(http(cleartext, req).await.status, 403);
    wait_until("a's delivery reaches the receiver", || {
        let n = got.lock().expect("lock").len();
        async move { n >= 1 }
    })
    .await;
    let killed_at = tokio::time::Instant::now();
    a.kill().expect("kill a");
    a.wait().expect("a is gone");

    // Node b has never seen the credential: it takes the event once a's lease runs out.
    let b = Runtime::start(
        ConfigSource::File(webhook_node(dir.path(), "b", &url, loopback(), port)),
        None,
    )
    .await
    .expect("b starts");
    wait_until("b delivers the event", || {
        let n = got.lock().expect("lock").len();
        async move { n >= 2 }
    })
    .await;
    let took = killed_at.elapsed();
    // Both of b's claim rounds since, and nothing more: delivered once, not again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deliveries = got.lock().expect("lock").clone();
    assert_eq!(deliveries.len(), 2, "{deliveries:?}");
    let key = |i: usize| {
        deliveries[i]
            .0
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .expect("idempotency key")
    };
    assert_eq!(
        key(0),
        key(1),
        "the receiver can tell the retry from a new event"
    );
    assert_eq!(
        deliveries[0].1["fingerprint"],
        deliveries[1].1["fingerprint"]
    );
    // The lease is 10 delivery timeouts: b took over after it, not before.
    assert!(took >= Duration::from_secs(7), "{took:?}");
    let store = portcullis::store::PgStore::connect(&portcullis::store::PgSettings {
        url,
        pool_size: 1,
        ca: Vec::new(),
        node: "test".into(),
    })
    .await
    .expect("connect");
    let (events, _) = portcullis::store::EventQueue::events(&store, None)
        .await
        .expect("events");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].state, portcullis::store::DeliveryState::Delivered);
    assert_eq!(events[0].attempts, 1, "a's cut attempt was never recorded");
    b.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_its_database_over_verified_tls_and_a_silent_database_fails_fast() {
    use portcullis::store::{PgSettings, PgStore};
    let dir = tempfile::tempdir().expect("tmp");
    let origin = TestOrigin::start().await;
    let ca = support::TestCa::new();
    let ca_file = ca.write_ca(dir.path());
    let pg = support::postgres::Postgres::start_tls(&ca);
    let cleartext = pg.database().await;
    // A password in the URL, which no error may repeat.
    let url = cleartext
        .replace("sslmode=disable", "sslmode=require")
        .replacen("postgres@", "postgres:hunter2-db-secret@", 1);
    let settings = |url: &str, ca: Vec<_>| PgSettings {
        url: url.to_owned(),
        pool_size: 1,
        ca,
        node: "t".into(),
    };
    let db = format!("{}:{}", pg.addr.ip(), pg.addr.port());

    // The server takes this database over TLS only...
    let refused = PgStore::connect(&settings(&cleartext, Vec::new()))
        .await
        .err()
        .expect("cleartext is refused");
    assert!(refused.to_string().contains(&db), "{refused}");
    // ... and without its CA the server's certificate is not trusted.
    let untrusted = PgStore::connect(&settings(&url, Vec::new()))
        .await
        .err()
        .expect("an untrusted server is refused")
        .to_string();
    assert!(
        untrusted.contains(&db) && untrusted.to_lowercase().contains("certificate"),
        "{untrusted}"
    );
    assert!(!untrusted.contains("hunter2"), "{untrusted}");
    eprintln!("cleartext: {refused}\nuntrusted: {untrusted}");

    // A node with `[store] ca` works over TLS: it starts, reaches the store, writes to it, and
    // its CLI reads it the same way.
    let store = format!("ca = \"{}\"", ca_file.display());
    let a = node_with(
        dir.path(),
        "a",
        &url,
        &origin.url(),
        Extra {
            store: &store,
            ..Extra::default()
        },
    )
    .await;
    wait_until("a reaches its store", || {
        let up = a.rt.store_up();
        async move { up }
    })
    .await;
    let token = a.token.clone().expect("token");
    let (status, body) = a
        .api(
            &token,
            Method::PATCH,
            "/api/sites/legacy.test",
            r#"{"cleartext":"redirect"}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(a.cleartext().await, 301);
    let path = a.path.clone();
    let report = tokio::task::spawn_blocking(move || impact(&path))
        .await
        .expect("impact");
    assert_eq!(report["host"], "legacy.test", "{report}");
    a.rt.shutdown(Duration::from_secs(2)).await;

    // A database host that accepts TCP and then says nothing: a query fails within the URL's
    // connect_timeout, naming the database, instead of hanging.
    let silent = std::net::TcpListener::bind((loopback(), 0)).expect("bind");
    let addr = silent.local_addr().expect("addr");
    let url = format!("postgres://postgres@{addr}/fleet?sslmode=disable&connect_timeout=1");
    let since = tokio::time::Instant::now();
    let err = PgStore::connect(&settings(&url, Vec::new()))
        .await
        .err()
        .expect("a silent database fails")
        .to_string();
    assert!(
        since.elapsed() < Duration::from_secs(4),
        "took {:?}",
        since.elapsed()
    );
    assert!(
        err.contains(&addr.to_string()) && err.contains("connect_timeout"),
        "{err}"
    );
    eprintln!("silent: {err}");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_started_together_with_the_same_acme_site_order_its_certificate_once() {
    use portcullis::acme::CertSource;
    use support::pebble::{served, start};

    let dir = tempfile::tempdir().expect("tmp");
    let url = support::postgres::Postgres::shared().database().await;
    let origin = TestOrigin::start().await;
    let AcmeFleet {
        pebble,
        key: _,
        closed_a,
        closed_b,
        dns_a,
        dns_b,
    } = acme_fleet(dir.path()).await;
    let path_a = acme_node(
        dir.path(),
        "a",
        &url,
        &pebble,
        closed_a,
        dns_a,
        &origin.url(),
        true,
    );
    let path_b = acme_node(
        dir.path(),
        "b",
        &url,
        &pebble,
        closed_b,
        dns_b,
        &origin.url(),
        true,
    );
    // The same config, started at the same moment: both want the certificate at once.
    let (a, b) = tokio::join!(start(&path_a), start(&path_b));
    let issued = |rt: &Runtime| {
        rt.acme()
            .status()
            .iter()
            .all(|s| s.source == CertSource::Acme)
    };
    wait_until("both nodes serve a certificate from the CA", || {
        let done = issued(&a) && issued(&b);
        async move { done }
    })
    .await;
    let roots = pebble.root().await;
    let on_a = served(
        SocketAddr::from((closed_a, 8443)),
        "www.acme.test",
        roots.clone(),
    )
    .await;
    let on_b = served(SocketAddr::from((closed_b, 8443)), "www.acme.test", roots).await;
    assert_eq!(on_a, on_b, "one certificate for the fleet");
    // The CA has one order: the other node waited for the lease and took the certificate
    // from the store. (Pebble logs each order it creates; requests are no measure, since it
    // rejects some nonces and the client sends those again.)
    let log = pebble.log();
    let orders = log.matches("Added order").count();
    assert_eq!(orders, 1, "orders the CA created:\n{log}");
    for rt in [&a, &b] {
        rt.shutdown(Duration::from_secs(2)).await;
    }
}
