//! The built-in demo: a closed pool and an open pool on two loopback addresses, three sites
//! (an HTTPS-only API, a redirecting website, a legacy API in reject mode) and an echo origin,
//! with curl lines that show each behaviour.
//!
//! The demo config is TOML text run through the same validator as any file, so the demo can
//! never show something a real config could not do. It must never bind outside loopback.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::net::Workers;
use crate::runtime::{ConfigSource, Runtime, RuntimeError};
use crate::tls::DevCa;

/// Where the demo listens; every address must be loopback.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Address of the closed pool (no cleartext listener).
    pub closed_addr: Ipv4Addr,
    /// Address of the open pool (cleartext listener in redirect/reject modes).
    pub open_addr: Ipv4Addr,
    pub tls_port: u16,
    pub cleartext_port: u16,
    /// `/metrics` listens on the closed address at this port, over TLS.
    pub metrics_port: u16,
    /// The DNS server for `demo.test` listens on the closed address at this port.
    pub dns_port: u16,
    /// The admin API listens on the closed address at this port (HTTPS only).
    pub admin_port: u16,
    /// Holds the development CA that signs the demo's certificates.
    pub state_dir: PathBuf,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            closed_addr: Ipv4Addr::new(127, 0, 0, 2),
            open_addr: Ipv4Addr::new(127, 0, 0, 3),
            tls_port: 8443,
            cleartext_port: 8080,
            metrics_port: 9464,
            dns_port: 8053,
            admin_port: 9443,
            state_dir: std::env::temp_dir().join("portcullis-demo"),
        }
    }
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    #[error("demo addresses must be loopback (127.0.0.0/8), got {0}")]
    NotLoopback(Ipv4Addr),
    #[error("the closed and open pools need two different addresses")]
    SameAddress,
    #[error("cannot start the demo origin: {0}")]
    Origin(std::io::Error),
    #[error("{0} (another demo running? pick other addresses with --closed-addr/--open-addr or ports with --tls-port/--cleartext-port)")]
    Runtime(#[from] RuntimeError),
}

/// A running demo: the program, the address of its echo origin, and the admin token.
pub struct Demo {
    pub runtime: Runtime,
    /// A fresh admin token: the demo makes a new one at every start, so it can print it.
    pub admin_token: String,
    pub origin: SocketAddr,
    pub options: DemoOptions,
}

/// Starts the echo origin and the edge.
pub async fn start(options: DemoOptions, workers: Option<&Workers>) -> Result<Demo, DemoError> {
    for a in [options.closed_addr, options.open_addr] {
        if !a.is_loopback() {
            return Err(DemoError::NotLoopback(a));
        }
    }
    if options.closed_addr == options.open_addr {
        return Err(DemoError::SameAddress);
    }
    let origin_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(DemoError::Origin)?;
    let origin = origin_listener.local_addr().map_err(DemoError::Origin)?;
    tokio::spawn(echo_origin(origin_listener));
    // Every demo starts fresh: no API changes, plans, drains, events or token from an earlier
    // run.
    crate::store::SqliteStore::open(&options.state_dir)
        .and_then(|s| s.clear())
        .map_err(|e| DemoError::Runtime(e.into()))?;
    let hook = demo_webhook(&options.state_dir).await?;
    let text = demo_toml(&options, origin, hook);
    let _ = std::fs::remove_file(crate::admin::token_path(&options.state_dir));
    let source = ConfigSource::Text {
        text,
        label: "(demo config)".into(),
        base: PathBuf::from("."),
    };
    let runtime = Runtime::start(source, workers).await?;
    warm_up(&options).await;
    let admin_token = runtime
        .admin()
        .and_then(|a| a.new_token.clone())
        .unwrap_or_default();
    Ok(Demo {
        admin_token,
        runtime,
        origin,
        options,
    })
}

/// A little traffic of each kind, so the dashboard has something to show from the start:
/// requests over TLS to two sites (one of them over HTTP/3 too), and a script in cleartext to the website, one of its
/// requests with an API key (counted as exposed, as the dashboard and `impact` show). None of
/// it reaches the legacy API, whose figures the printed commands explain.
async fn warm_up(o: &DemoOptions) {
    use http_body_util::Empty;
    let Ok(ca) = crate::tls::load_certs(&DevCa::cert_path(&o.state_dir)) else {
        return;
    };
    let Ok(cfg) = crate::tls::client_config(&ca) else {
        return;
    };
    let cfg = Arc::new(cfg);
    let get = |host: &str, port: u16, path: &str, agent: &str| {
        http::Request::get(path)
            .header(http::header::HOST, format!("{host}:{port}"))
            .header(http::header::USER_AGENT, agent)
            .body(Empty::<Bytes>::new())
    };
    const BROWSER: &str =
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36";
    let tls = [
        ("api.demo.test", o.closed_addr, "/v1/items"),
        ("api.demo.test", o.closed_addr, "/v1/orders"),
        ("www.demo.test", o.open_addr, "/"),
        ("www.demo.test", o.open_addr, "/pricing"),
    ];
    for (host, addr, path) in tls {
        if let Ok(req) = get(host, o.tls_port, path, BROWSER) {
            let _ = crate::https::request((addr, o.tls_port), host, cfg.clone(), req).await;
        }
    }
    // And once over HTTP/3, as a browser that read the Alt-Svc header would.
    if let Ok(req) = http::Request::get(format!("https://api.demo.test:{}/v1/items", o.tls_port))
        .header(http::header::USER_AGENT, BROWSER)
        .body(())
    {
        let addr = std::net::SocketAddr::from((o.closed_addr, o.tls_port));
        let _ = crate::https::h3_request(addr, "api.demo.test", (*cfg).clone(), req).await;
    }
    let script = "python-requests/2.31.0";
    for (path, key) in [
        ("/feed.xml", None),
        ("/api/status", Some("demo-warmup-key-789")),
    ] {
        let Ok(mut req) = get("www.demo.test", o.cleartext_port, path, script) else {
            continue;
        };
        if let Some(k) = key.and_then(|k| http::HeaderValue::from_str(k).ok()) {
            req.headers_mut().insert("x-api-key", k);
        }
        if let Ok(tcp) = tokio::net::TcpStream::connect((o.open_addr, o.cleartext_port)).await {
            let _ = crate::https::send(tcp, req).await;
        }
    }
}

/// The demo's config, as a file would say it.
pub fn demo_toml(o: &DemoOptions, origin: SocketAddr, hook: SocketAddr) -> String {
    let state = toml_string(&o.state_dir.display().to_string());
    let secret = toml_string(
        &o.state_dir
            .join("demo-webhook.secret")
            .display()
            .to_string(),
    );
    let ca = toml_string(&DevCa::cert_path(&o.state_dir).display().to_string());
    let hook_port = hook.port();
    format!(
        r#"[state]
dir = {state}

[edge.response_headers]
"X-Content-Type-Options" = "nosniff"
"Referrer-Policy" = "no-referrer"

[analytics]
flush_interval = "1s"

[metrics]
listen = "{closed}:{metrics}"

[admin]
listen = "{closed}:{admin}"

[dns]
listen = "{closed}:{dns}"
zones = ["demo.test"]
ttl = 60

[[pool]]
name = "closed"
addresses = ["{closed}"]
tls_ports = [{tls}]
cleartext_ports = []

[[pool]]
name = "legacy"
addresses = ["{open}"]
tls_ports = [{tls}]
cleartext_ports = [{clear}]

[[site]]
host = "api.demo.test"
pool = "closed"
origin = "http://{origin}"
cleartext = "closed"

[[site]]
host = "www.demo.test"
pool = "legacy"
origin = "http://{origin}"
cleartext = "redirect"

[[site]]
host = "legacy.demo.test"
pool = "legacy"
origin = "http://{origin}"
cleartext = "reject"
exposure_response = "notify"
webhook = {{ url = "https://localhost:{hook_port}/portcullis-events", secret_file = {secret}, ca = {ca} }}
"#,
        closed = o.closed_addr,
        open = o.open_addr,
        tls = o.tls_port,
        clear = o.cleartext_port,
        metrics = o.metrics_port,
        dns = o.dns_port,
        admin = o.admin_port,
    )
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// What to try, as printed by `portcullis demo`. Every `curl` line works pasted as is.
pub fn instructions(o: &DemoOptions, admin_token: &str) -> String {
    let ca = DevCa::cert_path(&o.state_dir).display().to_string();
    let ca = shell_quote(&ca);
    let (c, op, t, p, m, d, a) = (
        o.closed_addr,
        o.open_addr,
        o.tls_port,
        o.cleartext_port,
        o.metrics_port,
        o.dns_port,
        o.admin_port,
    );
    let exe = std::env::current_exe()
        .map(|p| shell_quote(&p.display().to_string()))
        .unwrap_or_else(|_| "portcullis".to_owned());
    let state = shell_quote(&o.state_dir.display().to_string());
    format!(
        r#"portcullis demo: an HTTPS-only edge on loopback.
  closed pool  {c}  TLS port {t}, no cleartext listener at all
  open pool    {op}  TLS port {t}, cleartext port {p}
  sites        api.demo.test (closed), www.demo.test (redirect), legacy.demo.test (reject)
  DNS          zone demo.test on {c} port {d} (UDP and TCP)
  admin API    https://{c}:{a}/ (token below, new at every start)
  warm-up      a few requests sent at start: over TLS to the API (HTTP/3 once) and the
               website, and a script in cleartext to the website, one with an API key (exposed)

Try these; each works pasted as is:

# 1. HTTPS-only API, cleartext: the kernel refuses the connection, no request byte is sent
curl -sS http://api.demo.test:{p}/v1/items --resolve api.demo.test:{p}:{c}
#    -> curl: (7) Failed to connect ...: the connection was refused (RST)

# 2. The same API over TLS, HTTP/2: 200 with HSTS and the configured security headers, and the
#    origin's echo
curl -sS -i --http2 --cacert {ca} --resolve api.demo.test:{t}:{c} https://api.demo.test:{t}/v1/items

# 3. Website on the open pool, cleartext: redirected to https
curl -sS -i --resolve www.demo.test:{p}:{op} 'http://www.demo.test:{p}/login?next=/'
#    -> HTTP/1.1 301 Moved Permanently, location: https://www.demo.test:{t}/login?next=/

# 4. Legacy API in reject mode: 403, and the key it just sent in the clear must be rotated
curl -sS -i -H 'X-API-Key: demo-key-123' --resolve legacy.demo.test:{p}:{op} http://legacy.demo.test:{p}/v1/items

# 4b. A login form sent in cleartext: 403 too, and its password counts as exposed as well
curl -sS -i -d 'user=demo&password=demo-pass-456' --resolve legacy.demo.test:{p}:{op} http://legacy.demo.test:{p}/login

# 5. Cleartext HTTP sent to a TLS port: 400 saying the port speaks HTTPS only
curl -sS -i --resolve www.demo.test:{t}:{op} http://www.demo.test:{t}/

# 6. A name this address does not serve: no certificate, TLS alert unrecognized_name
curl -sS --cacert {ca} --resolve www.demo.test:{t}:{c} https://www.demo.test:{t}/
#    -> curl: (35) ... unrecognized name

# 7. What closing cleartext for the legacy API would break, from the traffic above (counts are
#    written every second); its X-API-Key and the password appear as fingerprints, never in
#    the clear
{exe} impact legacy.demo.test --state-dir {state} --since 1h

# 7b. The legacy API tells its issuer about exposed keys: the event went to its webhook, signed
{exe} exposures --state-dir {state}

# 8. Prometheus metrics, served over TLS only
curl -sS --cacert {ca} https://{c}:{m}/metrics

# 9. DNS steers each name to its pool, with an HTTPS record so capable clients go straight to TLS
dig +norec @{c} -p {d} api.demo.test A api.demo.test HTTPS legacy.demo.test HTTPS

# 10. Audit an endpoint as an outsider would: the HTTPS-only API gets an A, the legacy API less
{exe} probe https://api.demo.test:{t}/ --dns {c}:{d} --ports {p} --ca {ca}
{exe} probe https://legacy.demo.test:{t}/v1 --dns {c}:{d} --ports {p} --ca {ca}

# 11. The admin API (HTTPS only, bearer token): every site with its TLS share, then switch the
#     website from redirect to reject, live, and see the audit log
curl -sS --cacert {ca} -H 'Authorization: Bearer {admin_token}' https://{c}:{a}/api/sites
curl -sS --cacert {ca} -H 'Authorization: Bearer {admin_token}' -X PATCH -d '{{"cleartext":"reject"}}' https://{c}:{a}/api/sites/www.demo.test
curl -sS -i --resolve www.demo.test:{p}:{op} http://www.demo.test:{p}/
curl -sS --cacert {ca} -H 'Authorization: Bearer {admin_token}' https://{c}:{a}/api/audit
#     every site's certificate (all from the development CA here; cert = "acme" gets them from
#     an ACME CA with no cleartext port, see the README)
curl -sS --cacert {ca} -H 'Authorization: Bearer {admin_token}' https://{c}:{a}/api/certs
#     the same from the command line: {exe} sites --admin https://{c}:{a} --token {admin_token} --ca {ca}
#     and in a browser: https://{c}:{a}/ (log in with the token; trust {ca} or accept the warning)

Press Ctrl-C to stop (in-flight requests drain first).
"#
    )
}

fn shell_quote(s: &str) -> String {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The demo's stand-in for the API's issuer: an HTTPS webhook receiver on localhost (with a
/// certificate from the demo's development CA) that logs each exposure event it gets, by
/// site, position and fingerprint only.
async fn demo_webhook(state_dir: &Path) -> Result<SocketAddr, DemoError> {
    let ca = DevCa::open(state_dir)
        .map_err(|e| DemoError::Origin(std::io::Error::other(e.to_string())))?;
    let ck = ca
        .certificate_for("localhost")
        .map_err(|e| DemoError::Origin(std::io::Error::other(e.to_string())))?;
    let tls = tokio_rustls::TlsAcceptor::from(
        crate::tls::single_cert_config(ck)
            .map_err(|e| DemoError::Origin(std::io::Error::other(e.to_string())))?,
    );
    let secret = crate::hex::random(24);
    crate::tls::write_private(&state_dir.join("demo-webhook.secret"), secret.as_bytes())
        .map_err(DemoError::Origin)?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(DemoError::Origin)?;
    let addr = listener.local_addr().map_err(DemoError::Origin)?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let tls = tls.clone();
            tokio::spawn(async move {
                let Ok(stream) = tls.accept(stream).await else {
                    return;
                };
                let svc = service_fn(|req: Request<Incoming>| async move {
                    use http_body_util::BodyExt;
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    tracing::info!(
                        site = v["site"].as_str().unwrap_or("?"),
                        kind = v["kind"].as_str().unwrap_or("?"),
                        fingerprint = v["fingerprint"].as_str().unwrap_or("?"),
                        "demo webhook: the issuer was told about an exposed credential"
                    );
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// An origin that says what it received: method, path, host, and whether the client reached
/// the edge over TLS (from `X-Forwarded-Proto`).
pub async fn echo_origin(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(echo))
                .await;
        });
    }
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let h = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let proto = h("x-forwarded-proto");
    let tls = if proto == "https" { "yes" } else { "no" };
    let body = format!(
        "portcullis demo origin\nmethod: {}\npath: {}\nhost: {}\nover TLS: {tls} (X-Forwarded-Proto: {proto})\nclient: {}\n",
        req.method(),
        req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        h("host"),
        h("x-forwarded-for"),
    );
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(resp)
}
