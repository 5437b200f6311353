//! The dashboard in a real headless Chromium (Debian's, driven through chromedriver by
//! fantoccini): log in with the token, find a site with the traffic this test sent, switch its
//! cleartext mode after the confirmation page shows the impact, then check over real sockets
//! that the edge's behaviour changed. Saves a screenshot in target/.

mod support;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{ClientBuilder, Locator};
use portcullis::observe::{HttpVersion, Outcome, Scheme, TlsVersion};
use portcullis::runtime::{ConfigSource, Runtime};
use portcullis::store::{RollupBatch, Rollups as _, TrafficCount};
use support::{get, http, https, loopback, wait_until, Deadline, TestOrigin, PATIENCE};

/// chromedriver in a process group of its own, with the browsers it starts: dropping it kills
/// the whole group, so a test that fails before closing its session leaves no Chromium behind.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .status();
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

/// A portcullis with an admin plane, a closed pool (`api.test`) and an open one (`shop.test`,
/// redirect), and its admin token.
struct Edge {
    _runtime: Runtime,
    token: String,
    admin: SocketAddr,
    open: std::net::Ipv4Addr,
    state: std::path::PathBuf,
    _dir: tempfile::TempDir,
    _origin: TestOrigin,
}

async fn edge() -> Edge {
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
    Edge {
        token: a.new_token.expect("token"),
        admin: a.addr,
        _runtime: runtime,
        open,
        state,
        _dir: dir,
        _origin: origin,
    }
}

/// 7 cleartext requests from a script (with an API key) and 13 over TLS to `shop.test`,
/// waited for until the store has all 20.
async fn traffic(e: &Edge) {
    let clear = SocketAddr::from((e.open, 4080));
    for _ in 0..7 {
        let req = http::Request::get("/cart")
            .header("host", "shop.test")
            .header("user-agent", "python-requests/2.31")
            .header("x-api-key", "k-visible-nowhere")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("req");
        assert_eq!(http(clear, req).await.status, 301);
    }
    let roots = support::roots_from(&e.state.join("dev-ca.pem"));
    for _ in 0..13 {
        let got = https(
            SocketAddr::from((e.open, 4443)),
            "shop.test",
            roots.clone(),
            false,
            get("https://shop.test/"),
        )
        .await;
        assert_eq!(got.status, 200);
    }
    // All 20 requests, and with them the exposure, which is written in the same transaction.
    let state = e.state.clone();
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
}

/// A headless Chromium driven through chromedriver; both end with it.
struct Browser {
    c: fantoccini::Client,
    _driver: Driver,
    _profile: tempfile::TempDir,
}

async fn browser() -> Browser {
    browser_with(&[]).await
}

/// A browser with more Chromium flags.
async fn browser_with(extra: &[&str]) -> Browser {
    for (tool, package) in [
        ("chromedriver", "chromium-driver"),
        ("chromium", "chromium"),
    ] {
        assert!(
            Command::new(tool).arg("--version").output().is_ok(),
            "{tool} is missing: install Debian's {package} (scripts/test.sh does it as root)"
        );
    }
    let port = free_port();
    let driver = Driver(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
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
    let mut caps = caps;
    if let Some(args) = caps["goog:chromeOptions"]["args"].as_array_mut() {
        args.extend(extra.iter().map(|a| serde_json::json!(a)));
    }
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
    Browser {
        c,
        _driver: driver,
        _profile: profile,
    }
}

/// Logs in with the token on the login form the dashboard sends a stranger to.
async fn log_in(c: &fantoccini::Client, base: &str, token: &str) {
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
        .send_keys(token)
        .await
        .expect("type");
    click(c, Locator::Css("button[type=submit]"), "button").await;
}

/// Waits for an element to be on the page.
async fn shown(c: &fantoccini::Client, at: Locator<'_>, what: &str) {
    c.wait()
        .at_most(PATIENCE)
        .for_element(at)
        .await
        .expect(what);
}

/// Clicks an element.
async fn click(c: &fantoccini::Client, at: Locator<'_>, what: &str) {
    c.find(at).await.expect(what).click().await.expect("click");
}

/// The text of an element, once it is there.
async fn text_of(c: &fantoccini::Client, at: Locator<'_>, what: &str) -> String {
    c.wait()
        .at_most(PATIENCE)
        .for_element(at)
        .await
        .expect(what)
        .text()
        .await
        .expect("text")
}

/// Saves a screenshot under target/ (kept as a CI artifact; nothing is asserted on pixels).
async fn screenshot(c: &fantoccini::Client, name: &str) {
    std::fs::create_dir_all(concat!(env!("CARGO_MANIFEST_DIR"), "/target")).expect("target dir");
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(
        format!("{}/target/{name}.png", env!("CARGO_MANIFEST_DIR")),
        png,
    )
    .expect("save");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_in_find_the_site_and_switch_its_mode_in_a_real_browser() {
    let e = edge().await;
    traffic(&e).await;
    let b = browser().await;
    let c = &b.c;
    let base = format!("https://{}", e.admin);
    let (state, clear) = (e.state.clone(), SocketAddr::from((e.open, 4080)));

    // Not logged in: the dashboard sends us to the login form.
    log_in(c, &base, &e.token).await;

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
    let nodes = text_of(c, Locator::Id("nodes"), "nodes panel").await;
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

    click(c, Locator::LinkText("shop.test"), "link").await;

    // The site page: chart, top cleartext families, the exposed key as a fingerprint.
    shown(c, Locator::Css("#share-chart svg"), "chart").await;
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
    click(c, Locator::Id("review"), "review").await;
    let impact = text_of(c, Locator::Id("impact"), "impact").await;
    assert!(impact.contains("7 cleartext requests"), "{impact}");
    screenshot(c, "dashboard-confirm").await;
    click(c, Locator::Id("apply"), "apply").await;
    // Back on the site page, which shows the new mode and no longer offers a review.
    shown(
        c,
        Locator::Css("#mode option[value=reject][selected]"),
        "new mode shown",
    )
    .await;
    let url = c.current_url().await.expect("url");
    assert!(url.as_str().ends_with("/ui/site/shop.test"), "{url}");
    screenshot(c, "dashboard").await;
    b.c.clone().close().await.expect("close");

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

/// One hour of `shop.test` responses of one scheme, as the store keeps them.
fn hour_of(bucket: u64, scheme: Scheme, count: u64) -> TrafficCount {
    TrafficCount {
        bucket,
        span: 3600,
        site: "shop.test".into(),
        outcome: Outcome::Response,
        scheme,
        port: if scheme == Scheme::Cleartext {
            4080
        } else {
            4443
        },
        tls: if scheme == Scheme::Cleartext {
            TlsVersion::None
        } else {
            TlsVersion::Tls13
        },
        http: HttpVersion::Http11,
        status_class: 2,
        count,
    }
}

/// The plotted points of one series of a chart: bucket and value, as the SVG carries them.
async fn plotted(c: &fantoccini::Client, chart: &str, series: &str) -> Vec<(String, String)> {
    let css = format!("#{chart} g.series[data-series='{series}'] circle.point");
    let mut out = Vec::new();
    for p in c.find_all(Locator::Css(&css)).await.expect("points") {
        let bucket = p.attr("data-bucket").await.expect("attr").expect("bucket");
        let value = p.attr("data-value").await.expect("attr").expect("value");
        out.push((bucket, value));
    }
    out
}

/// The page's width against the window's: no horizontal scroll when the first is not larger.
async fn widths(c: &fantoccini::Client) -> (u64, u64) {
    let v = c
        .execute(
            "return [document.documentElement.scrollWidth, window.innerWidth]",
            vec![],
        )
        .await
        .expect("script");
    let w = |i: usize| v[i].as_u64().expect("number");
    (w(0), w(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_share_is_charted_as_the_api_reports_it_over_each_range_and_fits_a_phone() {
    let e = edge().await;
    traffic(&e).await;
    // Three days ago: 30 requests over TLS and 10 in cleartext, as the store holds old hours.
    let now = portcullis::clock::now();
    let old = (now - 3 * 86_400) / 3600 * 3600;
    let store = portcullis::store::SqliteStore::open(&e.state).expect("store");
    store
        .write_rollups(&RollupBatch {
            traffic: vec![
                hour_of(old, Scheme::Tls, 30),
                hour_of(old, Scheme::Cleartext, 10),
            ],
            ..RollupBatch::default()
        })
        .await
        .expect("write an old hour");
    // A switch-off plan: warn, then brownouts of 10 minutes every hour from half an hour ago.
    let roots = support::roots_from(&e.state.join("dev-ca.pem"));
    for body in [
        serde_json::json!({"stage": "warn", "target_pool": "closed", "force": true}),
        serde_json::json!({"stage": "brownout", "force": true, "acknowledge_exposures": true,
            "brownout": {"start": now - 1800, "duration": 600, "every": 3600}}),
    ] {
        let req = http::Request::post(format!("https://{}/api/sites/shop.test/stage", e.admin))
            .header("authorization", format!("Bearer {}", e.token))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .expect("request");
        let got = https(
            e.admin,
            &e.admin.ip().to_string(),
            roots.clone(),
            false,
            req,
        )
        .await;
        assert_eq!(got.status, 200, "{}", got.body);
    }
    let b = browser().await;
    let c = &b.c;
    let base = format!("https://{}", e.admin);
    log_in(c, &base, &e.token).await;

    // The overview: a chart with labelled axes, a legend and the sites' series.
    shown(c, Locator::Css("#share-chart svg"), "overview chart").await;
    let svg = c
        .find(Locator::Css("#share-chart svg"))
        .await
        .expect("svg")
        .html(false)
        .await
        .expect("html");
    for text in [
        "time (UTC)",
        "served over TLS (%)",
        "readiness threshold (99.9%)",
        "all sites",
        "shop.test",
    ] {
        assert!(svg.contains(text), "{text:?} not in the chart");
    }
    // The closed site gets no line of its own; every site together does.
    assert!(plotted(c, "share-chart", "api.test").await.is_empty());
    let day = plotted(c, "share-chart", "shop.test").await;
    assert!(!day.is_empty() && !plotted(c, "share-chart", "all sites").await.is_empty());
    assert!(day
        .iter()
        .all(|(b, _)| b.parse::<u64>().expect("bucket") > old));

    // The range switch: 7 days reach the old hour.
    click(c, Locator::LinkText("7d"), "7d link").await;
    shown(
        c,
        Locator::Css("nav.ranges a.current[href='/?range=7d']"),
        "7d shown",
    )
    .await;
    let week = plotted(c, "share-chart", "shop.test").await;
    // The table links each site's series for the range shown.
    let links = c
        .find(Locator::XPath(
            "//tr[td/a[text()='shop.test']]/td[@class='series']/a[text()='CSV']",
        ))
        .await
        .expect("CSV link in the table")
        .attr("href")
        .await
        .expect("attr")
        .expect("href");
    assert!(
        links.contains("since=604800s&resolution=3600s&format=csv"),
        "{links}"
    );
    assert!(
        week.contains(&(old.to_string(), "75.000".into())),
        "{week:?}"
    );
    assert_ne!(week, day, "the range changes the series");

    // The site page: the plan beside the chart, its stage changes and brownouts on the time
    // axis, and exact figures on hover.
    c.goto(&format!("{base}/ui/site/shop.test"))
        .await
        .expect("site page");
    let plan = text_of(c, Locator::Id("stage"), "plan").await;
    assert!(
        plan.contains("Stage brownout") && plan.contains("moving to pool closed"),
        "{plan}"
    );
    let svg = c
        .find(Locator::Css("#share-chart svg"))
        .await
        .expect("svg")
        .html(false)
        .await
        .expect("html");
    // plotters writes each text on a line of its own.
    let flat = svg.split_whitespace().collect::<Vec<_>>().join(" ");
    for text in [
        "> warn </text>",
        "> brownout </text>",
        "readiness threshold",
    ] {
        assert!(flat.contains(text), "{text:?} not in the chart: {svg}");
    }
    let title = c
        .find(Locator::Css("#share-chart g.series circle.point title"))
        .await
        .expect("hover title")
        .html(true)
        .await
        .expect("text");
    assert!(
        title.contains("% over TLS (") && title.contains("UTC"),
        "{title}"
    );

    screenshot(c, "dashboard-site-24h").await;

    // The site page over 7 days: what is plotted is what the API's JSON link says.
    c.goto(&format!("{base}/ui/site/shop.test?range=7d"))
        .await
        .expect("site page");
    let drawn = plotted(c, "share-chart", "shop.test").await;
    assert!(drawn.len() >= 2, "{drawn:?}");
    for chart in ["requests-chart", "clients-chart"] {
        assert!(
            !c.find_all(Locator::Css(&format!("#{chart} g.series circle.point")))
                .await
                .expect("points")
                .is_empty(),
            "{chart} has data"
        );
    }
    let href = |id: &'static str| async move {
        c.find(Locator::Id(id))
            .await
            .expect("download link")
            .attr("href")
            .await
            .expect("attr")
            .expect("href")
    };
    let (json, csv) = (href("json").await, href("csv").await);
    assert!(csv.ends_with("&format=csv"), "{csv}");
    screenshot(c, "dashboard-site-7d").await;
    c.goto(&format!("{base}{json}")).await.expect("API");
    let text = c
        .find(Locator::Css("body"))
        .await
        .expect("body")
        .text()
        .await
        .expect("text");
    let api: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let from_api: Vec<(String, String)> = api["points"]
        .as_array()
        .expect("points")
        .iter()
        .filter_map(|p| {
            Some((
                p["bucket"].as_u64()?.to_string(),
                format!("{:.3}", p["tls_percent"].as_f64()?),
            ))
        })
        .collect();
    assert_eq!(drawn, from_api);
    let human: u64 = api["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| p["cleartext_likely_automated"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(human, 7, "the script's requests are likely automated");

    // A phone: 360 px wide, no horizontal scroll on either page.
    c.set_window_size(360, 800).await.expect("resize");
    for page in ["/", "/ui/site/shop.test"] {
        c.goto(&format!("{base}{page}")).await.expect("page");
        shown(c, Locator::Css("#share-chart svg"), "chart").await;
        let (page_width, window) = widths(c).await;
        assert!(window <= 400, "the window is phone-sized: {window}");
        assert!(
            page_width <= window,
            "{page}: {page_width} px wide in {window}"
        );
    }
    screenshot(c, "dashboard-site-360px").await;
    b.c.clone().close().await.expect("close");

    // Dark mode: the page follows the system's preference, the charts with it.
    let dark = browser_with(&["--force-dark-mode"]).await;
    let c = &dark.c;
    log_in(c, &base, &e.token).await;
    c.goto(&format!("{base}/ui/site/shop.test"))
        .await
        .expect("page");
    shown(c, Locator::Css("#share-chart svg"), "chart").await;
    let styles = c
        .execute(
            "return [getComputedStyle(document.body).backgroundColor, getComputedStyle(document.querySelector('#share-chart svg')).filter]",
            vec![],
        )
        .await
        .expect("script");
    assert_eq!(styles[0], "rgb(17, 20, 24)", "{styles:?}");
    assert!(
        styles[1].as_str().is_some_and(|f| f.contains("invert")),
        "{styles:?}"
    );
    screenshot(c, "dashboard-site-dark").await;
    dark.c.clone().close().await.expect("close");
}
