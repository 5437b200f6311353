//! The dashboard in a real headless Chromium (Debian's, driven through chromedriver by
//! fantoccini): log in with the token, find a site with the traffic this test sent, switch its
//! cleartext mode after the confirmation page shows the impact, then check over real sockets
//! that the edge's behaviour changed. Saves a screenshot in target/.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{ClientBuilder, Locator};
use portcullis::runtime::{ConfigSource, Runtime};
use support::{get, http, https, loopback, wait_until, Deadline, TestOrigin, PATIENCE};

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_in_find_the_site_and_switch_its_mode_in_a_real_browser() {
    for (tool, package) in [
        ("chromedriver", "chromium-driver"),
        ("chromium", "chromium"),
    ] {
        assert!(
            Command::new(tool).arg("--version").output().is_ok(),
            "{tool} is missing: install Debian's {package} (scripts/test.sh does it as root)"
        );
    }
    let origin = TestOrigin::start().await;
    let (open, closed) = (loopback(), loopback());
    let admin_addr = SocketAddr::from((loopback(), 9443));
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state");
    let text = format!(
        r#"
[state]
dir = "{state}"
[analytics]
flush_interval = "200ms"
[admin]
listen = "{admin_addr}"
[[pool]]
name = "closed"
addresses = ["{closed}"]
tls_ports = [4443]
[[pool]]
name = "open"
addresses = ["{open}"]
tls_ports = [4443]
cleartext_ports = [4080]
[[site]]
host = "shop.test"
pool = "open"
origin = "{o}"
cleartext = "redirect"
[[site]]
host = "api.test"
pool = "closed"
origin = "{o}"
"#,
        state = state.display(),
        o = origin.url()
    );
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, &text).expect("write");
    let runtime = Runtime::start(ConfigSource::File(path), None)
        .await
        .expect("portcullis starts");
    let a = runtime.admin().expect("admin plane").clone();
    let token = a.new_token.expect("token");

    // Traffic: cleartext from a script, and TLS.
    let clear = SocketAddr::from((open, 4080));
    for _ in 0..7 {
        let req = http::Request::get("/cart")
            .header("host", "shop.test")
            .header("user-agent", "python-requests/2.31")
            .header("x-api-key", "k-visible-nowhere")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("req");
        assert_eq!(http(clear, req).await.status, 301);
    }
    let roots = support::roots_from(&state.join("dev-ca.pem"));
    for _ in 0..13 {
        let got = https(
            SocketAddr::from((open, 4443)),
            "shop.test",
            roots.clone(),
            false,
            get("https://shop.test/"),
        )
        .await;
        assert_eq!(got.status, 200);
    }
    // All 20 requests, and with them the exposure, which is written in the same transaction.
    wait_until("the 20 requests reach the store", || {
        let state = state.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                portcullis::store::SqliteStore::open_read_only(&state)
                    .ok()
                    .flatten()
                    .and_then(|s| s.traffic_now("shop.test", 0).ok())
                    .map(|rows| rows.iter().map(|r| r.count).sum::<u64>() == 20)
                    .unwrap_or(false)
            })
            .await
            .unwrap_or(false)
        }
    })
    .await;

    let port = free_port();
    let _driver = Driver(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver"),
    );
    let profile = tempfile::tempdir().expect("profile");
    let caps = serde_json::json!({
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1200,1400",
                // The admin certificate comes from this test's throwaway development CA.
                "--ignore-certificate-errors",
                format!("--user-data-dir={}", profile.path().display()),
            ]
        }
    });
    let caps = caps.as_object().expect("object").clone();
    // chromedriver starts listening some time after it is spawned; until then, connecting fails.
    let deadline = Deadline::start();
    let c = loop {
        match ClientBuilder::rustls()
            .expect("rustls")
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => break c,
            Err(e) if deadline.passed() => {
                panic!("no browser session after {:.1?}: {e}", deadline.elapsed())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let base = format!("https://{}", a.addr);

    // Not logged in: the dashboard sends us to the login form.
    c.goto(&format!("{base}/")).await.expect("goto");
    assert!(c
        .current_url()
        .await
        .expect("url")
        .as_str()
        .ends_with("/login"));
    c.wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css("input[name=token]"))
        .await
        .expect("token field")
        .send_keys(&token)
        .await
        .expect("type");
    c.find(Locator::Css("button[type=submit]"))
        .await
        .expect("button")
        .click()
        .await
        .expect("click");

    // The overview lists the site with its TLS share.
    let row = c
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::XPath("//tr[td/a[text()='shop.test']]"))
        .await
        .expect("shop.test row")
        .text()
        .await
        .expect("text");
    assert!(row.contains("redirect") && row.contains("65.00%"), "{row}");
    // Its certificate column says it is not a trusted one (no cert configured).
    let cert = c
        .find(Locator::XPath(
            "//tr[td/a[text()='shop.test']]/td[@class='cert']",
        ))
        .await
        .expect("certificate cell")
        .text()
        .await
        .expect("text");
    assert_eq!(cert, "development", "{cert}");
    // The nodes panel shows this node, alive.
    let nodes = c
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Id("nodes"))
        .await
        .expect("nodes panel")
        .text()
        .await
        .expect("text");
    assert!(
        nodes.contains("(this node)") && nodes.contains("alive"),
        "{nodes}"
    );
    // The session cookie has the right flags.
    let cookie = c
        .get_named_cookie("portcullis_session")
        .await
        .expect("session cookie");
    assert_eq!(cookie.secure(), Some(true));
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(format!("{:?}", cookie.same_site()), "Some(Strict)");

    c.find(Locator::LinkText("shop.test"))
        .await
        .expect("link")
        .click()
        .await
        .expect("click");

    // The site page: chart, top cleartext families, the exposed key as a fingerprint.
    c.wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css("#chart svg"))
        .await
        .expect("chart");
    let page = c.source().await.expect("source");
    assert!(page.contains("python"), "client family shown");
    assert!(page.contains("x-api-key"), "exposure shown");
    assert!(!page.contains("k-visible-nowhere"), "never the key itself");
    let share = c
        .find(Locator::Id("share"))
        .await
        .expect("share")
        .text()
        .await
        .expect("text");
    assert!(share.contains("7 of 20 requests used cleartext"), "{share}");

    // Switch to reject: the confirmation shows the impact first.
    c.find(Locator::Css("#mode option[value=reject]"))
        .await
        .expect("option")
        .click()
        .await
        .expect("select");
    c.find(Locator::Id("review"))
        .await
        .expect("review")
        .click()
        .await
        .expect("click");
    let impact = c
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Id("impact"))
        .await
        .expect("impact")
        .text()
        .await
        .expect("text");
    assert!(impact.contains("7 cleartext requests"), "{impact}");
    std::fs::create_dir_all(concat!(env!("CARGO_MANIFEST_DIR"), "/target")).expect("target dir");
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/dashboard-confirm.png"),
        png,
    )
    .expect("save");
    c.find(Locator::Id("apply"))
        .await
        .expect("apply")
        .click()
        .await
        .expect("click");
    // Back on the site page, which shows the new mode and no longer offers a review.
    c.wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css("#mode option[value=reject][selected]"))
        .await
        .expect("new mode shown");
    let url = c.current_url().await.expect("url");
    assert!(url.as_str().ends_with("/ui/site/shop.test"), "{url}");
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/dashboard.png"),
        png,
    )
    .expect("save");
    c.close().await.expect("close");

    // The edge changed, over a real socket; the audit log has it.
    assert_eq!(http(clear, get("http://shop.test/cart")).await.status, 403);
    let audit = portcullis::store::SqliteStore::open_read_only(&state)
        .expect("store")
        .expect("a store exists")
        .audit_now()
        .expect("audit");
    let audit = serde_json::to_string(&audit).expect("json");
    assert!(
        audit.contains("\"site\":\"shop.test\"") && audit.contains("\"who\":\"admin\""),
        "{audit}"
    );
}
