//! The staged switch-off over real sockets and the admin API: a full walk from observe to
//! closed with requests at each stage, a blocked step, a forced step recorded in the audit log,
//! a rollback, and a restart in the middle of a brownout window. Schedule time is moved with
//! `clock::advance` (see `clock::advance` for why not tokio's paused clock).

mod support;

use std::net::{Ipv4Addr, SocketAddr};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use portcullis::runtime::{ConfigSource, Runtime};
use support::{
    client_config, get, http, https, loopback, roots_from, tls_connect, wait_until, TestOrigin,
};

struct Setup {
    runtime: Runtime,
    admin: SocketAddr,
    token: String,
    dir: tempfile::TempDir,
    path: std::path::PathBuf,
    open: Ipv4Addr,
    closed: Ipv4Addr,
    _origin: TestOrigin,
}

async fn setup() -> Setup {
    let origin = TestOrigin::start().await;
    let (open, closed) = (loopback(), loopback());
    let admin_addr = SocketAddr::from((loopback(), 9443));
    let dir = tempfile::tempdir().expect("tmp");
    let text = format!(
        r#"
[state]
dir = "{state}"
[analytics]
flush_interval = "200ms"
[readiness]
max_cleartext_percent = 20
[admin]
listen = "{admin_addr}"
[[pool]]
name = "closed"
addresses = ["{closed}"]
tls_ports = [3443]
[[pool]]
name = "open"
addresses = ["{open}"]
tls_ports = [3443]
cleartext_ports = [3080]
[[site]]
host = "shop.test"
pool = "open"
origin = "{o}"
cleartext = "redirect"
"#,
        state = dir.path().join("state").display(),
        o = origin.url()
    );
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, text).expect("write");
    let runtime = Runtime::start(ConfigSource::File(path.clone()), None)
        .await
        .expect("portcullis starts");
    let a = runtime.admin().expect("admin plane").clone();
    Setup {
        runtime,
        admin: a.addr,
        token: a.new_token.expect("token"),
        dir,
        path,
        open,
        closed,
        _origin: origin,
    }
}

impl Setup {
    async fn stage(&self, body: serde_json::Value) -> (StatusCode, serde_json::Value) {
        let ca = self.dir.path().join("state").join("dev-ca.pem");
        let tls = tls_connect(
            self.admin,
            &self.admin.ip().to_string(),
            client_config(roots_from(&ca), &[b"http/1.1"]),
        )
        .await
        .expect("tls");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("h1");
        tokio::spawn(conn);
        let req = Request::builder()
            .method(Method::POST)
            .uri("/api/sites/shop.test/stage")
            .header("host", self.admin.to_string())
            .header("authorization", format!("Bearer {}", self.token))
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("req");
        let resp = sender.send_request(req).await.expect("answer");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    async fn clear(&self) -> support::Got {
        http(
            SocketAddr::from((self.open, 3080)),
            get("http://shop.test/cart"),
        )
        .await
    }

    async fn tls_traffic(&self, n: usize) {
        let roots = roots_from(&self.dir.path().join("state").join("dev-ca.pem"));
        for _ in 0..n {
            let got = https(
                SocketAddr::from((self.open, 3443)),
                "shop.test",
                roots.clone(),
                false,
                get("https://shop.test/"),
            )
            .await;
            assert_eq!(got.status, 200);
        }
    }

    /// The audit log, as the store keeps it.
    fn audit(&self) -> Vec<serde_json::Value> {
        portcullis::store::SqliteStore::open_read_only(&self.dir.path().join("state"))
            .expect("store")
            .map(|s| s.audit_now().expect("audit"))
            .unwrap_or_default()
            .iter()
            .map(|e| serde_json::to_value(e).expect("json"))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_walk_with_a_blocked_step_a_forced_one_a_rollback_and_a_restart_mid_brownout() {
    let s = setup().await;
    // observe: traffic is measured, nothing changes for clients.
    assert_eq!(s.clear().await.status, 301);
    let (status, plan) = s.stage(serde_json::json!({})).await;
    assert_eq!(status, StatusCode::OK, "{plan}");
    assert_eq!(plan["stage"], "observe");

    // warn needs a target closed pool to probe through.
    let (status, body) = s.stage(serde_json::json!({ "stage": "warn" })).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["reasons"].to_string().contains("target_pool"),
        "{body}"
    );
    let sunset = 1_900_000_000u64;
    let (status, plan) = s
        .stage(serde_json::json!({ "stage": "warn", "target_pool": "closed", "sunset": sunset, "notice": "https://shop.test/https-only" }))
        .await;
    assert_eq!(status, StatusCode::OK, "{plan}");
    // The site is already served over TLS on the closed pool (the probe went through it).
    let roots = roots_from(&s.dir.path().join("state").join("dev-ca.pem"));
    let got = https(
        SocketAddr::from((s.closed, 3443)),
        "shop.test",
        roots.clone(),
        false,
        get("https://shop.test/"),
    )
    .await;
    assert_eq!(got.status, 200);
    // Cleartext answers carry Deprecation, Sunset and Link.
    let got = s.clear().await;
    assert_eq!(got.status, 301);
    assert!(got.headers["deprecation"]
        .to_str()
        .expect("ascii")
        .starts_with('@'));
    assert_eq!(got.headers["sunset"], "Sun, 17 Mar 2030 17:46:40 GMT");
    assert!(got.headers["link"]
        .to_str()
        .expect("ascii")
        .contains("rel=\"sunset\""));

    // brownout: a window from now, 10 minutes every day.
    let now = portcullis::clock::now();
    let (status, plan) = s
        .stage(serde_json::json!({ "stage": "brownout", "brownout": { "start": now, "duration": 600, "every": 86400 } }))
        .await;
    assert_eq!(status, StatusCode::OK, "{plan}");
    assert_eq!(
        s.clear().await.status,
        403,
        "inside the window: the reject answer"
    );

    // A restart in the middle of the window keeps the plan and the window.
    s.runtime.shutdown(std::time::Duration::from_secs(1)).await;
    let restarted = Runtime::start(ConfigSource::File(s.path.clone()), None)
        .await
        .expect("restart");
    assert_eq!(
        s.clear().await.status,
        403,
        "still inside the window after a restart"
    );
    // After the window, the previous mode again.
    portcullis::clock::advance(601);
    assert_eq!(s.clear().await.status, 301);
    restarted.shutdown(std::time::Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_is_blocked_by_the_cleartext_share_forced_with_an_audit_trail_and_rolled_back() {
    let s = setup().await;
    for _ in 0..3 {
        s.clear().await;
    }
    s.tls_traffic(2).await;
    let state = s.dir.path().join("state");
    wait_until("traffic is stored", || {
        let state = state.clone();
        async move {
            portcullis::store::SqliteStore::open_read_only(&state)
                .ok()
                .flatten()
                .and_then(|st| st.traffic_now("shop.test", 0).ok())
                .map(|t| t.iter().map(|r| r.count).sum::<u64>() >= 5)
                .unwrap_or(false)
        }
    })
    .await;
    let (status, _) = s
        .stage(serde_json::json!({ "stage": "warn", "target_pool": "closed" }))
        .await;
    assert_eq!(status, StatusCode::OK);
    // 60% cleartext against a 20% threshold: the move is blocked, and says why.
    let (status, body) = s.stage(serde_json::json!({ "stage": "move" })).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["reasons"]
            .to_string()
            .contains("60.000% of requests used cleartext"),
        "{body}"
    );
    assert_eq!(s.clear().await.status, 301, "nothing changed");
    // Forced: the site moves to the closed pool; the override of the check is audited.
    let (status, plan) = s
        .stage(serde_json::json!({ "stage": "move", "force": true }))
        .await;
    assert_eq!(status, StatusCode::OK, "{plan}");
    assert_eq!(plan["previous_pool"], "open");
    assert_eq!(plan["previous_mode"], "redirect");
    let forced = s
        .audit()
        .into_iter()
        .find(|e| e["stage"]["to"] == "move")
        .expect("audit entry");
    assert_eq!(forced["forced"], true);
    assert!(
        forced["overridden_checks"]
            .to_string()
            .contains("cleartext"),
        "{forced}"
    );
    // DNS-wise the site is on the closed pool now; the old address drains (its previous mode
    // until the TTL of the old answers has passed).
    assert_eq!(s.runtime.snapshot().drains().len(), 1);
    assert_eq!(s.clear().await.status, 301);
    // closed, then a rollback to observe in one call: back on the open pool, redirecting.
    let (status, _) = s
        .stage(serde_json::json!({ "stage": "closed", "force": true }))
        .await;
    assert_eq!(status, StatusCode::OK);
    // The rollback, from the command line.
    let (admin_url, token, ca) = (
        format!("https://{}", s.admin),
        s.token.clone(),
        s.dir.path().join("state").join("dev-ca.pem"),
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args([
                "stage",
                "shop.test",
                "observe",
                "--admin",
                &admin_url,
                "--token",
                &token,
                "--ca",
            ])
            .arg(&ca)
            .output()
            .expect("cli")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(plan["stage"], "observe");
    assert!(s.runtime.snapshot().drains().is_empty());
    let got = s.clear().await;
    assert_eq!(got.status, 301);
    assert!(
        got.headers.get("deprecation").is_none(),
        "observe sends no warning"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_seen_in_cleartext_blocks_the_brownout_until_acknowledged() {
    let s = setup().await;
    let (status, _) = s
        .stage(serde_json::json!({ "stage": "warn", "target_pool": "closed" }))
        .await;
    assert_eq!(status, StatusCode::OK);
    let req = Request::get("/cart")
        .header("host", "shop.test")
        .header("authorization", "Bearer leaked-token")
        .body(Full::new(Bytes::new()))
        .expect("req");
    assert_eq!(
        http(SocketAddr::from((s.open, 3080)), req).await.status,
        301
    );
    let state = s.dir.path().join("state");
    wait_until("the exposure is stored", || {
        let state = state.clone();
        async move {
            portcullis::store::SqliteStore::open_read_only(&state)
                .ok()
                .flatten()
                .and_then(|st| st.exposures_now("shop.test", 0).ok())
                .map(|e| e.len() == 1)
                .unwrap_or(false)
        }
    })
    .await;
    let (status, body) = s.stage(serde_json::json!({ "stage": "brownout" })).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["reasons"].to_string().contains("not acknowledged"),
        "{body}"
    );
    // Acknowledged (the key was rotated): the same step goes through, unforced.
    let (status, plan) = s
        .stage(serde_json::json!({ "stage": "brownout", "acknowledge_exposures": true }))
        .await;
    assert_eq!(status, StatusCode::OK, "{plan}");
    let last = s.audit().into_iter().last().expect("audit");
    assert_eq!(last["forced"], false);
}
