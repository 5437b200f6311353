//! Certificates from an ACME CA with no cleartext port: Debian's pebble, started here on
//! loopback, validates TLS-ALPN-01 on a closed pool's own TLS listener, resolving the site's
//! name through portcullis's DNS server. What portcullis then serves is verified against
//! pebble's root, fetched from pebble's management port.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use portcullis::acme::CertSource;
use portcullis::runtime::{ConfigSource, Runtime};
use rustls::RootCertStore;
use support::{get, https, loopback, refused, wait_until, TestCa, TestOrigin};

/// pebble on its own loopback address, killed when dropped.
struct Pebble {
    child: Child,
    addr: Ipv4Addr,
    ca: PathBuf,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pebble {
    /// Starts pebble validating TLS-ALPN-01 on `tls_port`, resolving names through `dns`.
    /// Pebble's default nonce rejection stays on: the client must retry `badNonce`.
    async fn start(dir: &Path, tls_port: u16, dns: SocketAddr) -> Pebble {
        let addr = loopback();
        let ca = TestCa::new();
        let (cert, key) = ca.issue(dir, "pebble", &[&addr.to_string()]);
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("{addr}:14000"),
                "managementListenAddress": format!("{addr}:15000"),
                "certificate": cert,
                "privateKey": key,
                "httpPort": 5002,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        let path = dir.join("pebble.json");
        std::fs::write(&path, config.to_string()).expect("pebble config");
        let log = std::fs::File::create(dir.join("pebble.log")).expect("pebble log");
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&path)
            .arg("-dnsserver")
            .arg(dns.to_string())
            .env("PEBBLE_VA_NOSLEEP", "1")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("pebble runs (apt-get install pebble)");
        let p = Pebble {
            child,
            addr,
            ca: ca.write_ca(dir),
        };
        let api = SocketAddr::from((addr, 14000));
        wait_until("pebble listens", || async move {
            tokio::net::TcpStream::connect(api).await.is_ok()
        })
        .await;
        p
    }

    fn directory(&self) -> String {
        format!("https://{}:14000/dir", self.addr)
    }

    /// The root that signs what pebble issues (a new one at every pebble start).
    async fn root(&self) -> RootCertStore {
        let got = https(
            SocketAddr::from((self.addr, 15000)),
            &self.addr.to_string(),
            support::roots_from(&self.ca),
            false,
            get(&format!("https://{}:15000/roots/0", self.addr)),
        )
        .await;
        assert_eq!(got.status, 200, "{}", got.body);
        let mut roots = RootCertStore::empty();
        for c in rustls_pki_types::pem::PemObject::pem_slice_iter(got.body.as_bytes()) {
            let c: rustls_pki_types::CertificateDer = c.expect("root pem");
            roots.add(c).expect("root");
        }
        roots
    }
}

fn config(
    closed: Ipv4Addr,
    dns: SocketAddr,
    origin: &str,
    pebble: &Pebble,
    state: &Path,
) -> String {
    format!(
        r#"
[state]
dir = "{state}"
[acme]
directory = "{dir}"
contact = ["mailto:ops@acme.test"]
directory_ca = "{ca}"
[dns]
listen = "{dns}"
zones = ["acme.test"]
[[pool]]
name = "closed"
addresses = ["{closed}"]
tls_ports = [8443]
[[site]]
host = "www.acme.test"
pool = "closed"
origin = "{origin}"
cert = "acme"
"#,
        state = state.display(),
        dir = pebble.directory(),
        ca = pebble.ca.display(),
    )
}

async fn start(path: &Path) -> Runtime {
    Runtime::start(ConfigSource::File(path.to_owned()), None)
        .await
        .unwrap_or_else(|e| panic!("portcullis starts: {e}"))
}

/// The DER of the certificate served for `name` at `addr`, verified against `roots`.
async fn served(addr: SocketAddr, name: &str, roots: RootCertStore) -> Vec<u8> {
    let tls = support::tls_connect(addr, name, support::client_config(roots, &[b"http/1.1"]))
        .await
        .expect("a handshake verified against pebble's root");
    let (_, conn) = tls.get_ref();
    conn.peer_certificates().expect("certs")[0]
        .as_ref()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_01_on_a_closed_pool_issues_a_certificate_that_a_restart_serves_without_the_ca() {
    let dir = tempfile::tempdir().expect("tmp");
    let origin = TestOrigin::start().await;
    let (closed, dns_addr) = (loopback(), loopback());
    let dns = SocketAddr::from((dns_addr, 5353));
    let pebble = Pebble::start(dir.path(), 8443, dns).await;
    let state = dir.path().join("state");
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, config(closed, dns, &origin.url(), &pebble, &state)).expect("write");

    let started = tokio::time::Instant::now();
    let rt = start(&path).await;
    // Until the CA issues, the development certificate is served, and the status says so.
    let st = &rt.acme().status()[0];
    assert_eq!(st.site, "www.acme.test");
    assert_eq!(st.challenge, "tls-alpn-01");
    wait_until("the ACME certificate is issued", || {
        let done = rt
            .acme()
            .status()
            .iter()
            .all(|s| s.source == CertSource::Acme);
        async move { done }
    })
    .await;
    let took = started.elapsed();
    let tls = SocketAddr::from((closed, 8443));
    let roots = pebble.root().await;
    let first = served(tls, "www.acme.test", roots.clone()).await;
    let got = https(
        tls,
        "www.acme.test",
        roots.clone(),
        false,
        get("https://www.acme.test/"),
    )
    .await;
    assert_eq!(
        got.status, 200,
        "the site is served with the issued certificate"
    );
    let st = rt.acme().status()[0].clone();
    assert!(st.last_error.is_none(), "{st:?}");
    assert!(
        st.issuer.as_deref().is_some_and(|i| i.contains("Pebble")),
        "{st:?}"
    );
    let not_after = st.not_after.expect("not after");
    assert!(st.next_attempt < not_after && st.next_attempt > portcullis::clock::now());
    // No cleartext listener at any time: the closed pool refuses port 80 and 443's cleartext
    // twin, and the state dir keeps the key to its owner.
    for port in [80, 8080] {
        assert!(
            refused(SocketAddr::from((closed, port))).await,
            "port {port}"
        );
    }
    use std::os::unix::fs::PermissionsExt;
    for f in ["account.json", "www.acme.test.key"] {
        let mode = std::fs::metadata(state.join("acme").join(f))
            .expect(f)
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f} is readable by its owner only");
    }
    eprintln!("issued in {took:?}");

    // A restart serves the stored certificate from its first handshake, with the CA gone:
    // nothing is ordered again.
    rt.shutdown(Duration::from_secs(2)).await;
    drop(pebble);
    let rt = start(&path).await;
    let st = rt.acme().status()[0].clone();
    assert_eq!(st.source, CertSource::Acme, "{st:?}");
    assert_eq!(st.not_after, Some(not_after));
    assert_eq!(served(tls, "www.acme.test", roots).await, first);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = rt.acme().status()[0].clone();
    assert_eq!(st.failures, 0, "no order was attempted: {st:?}");
    rt.shutdown(Duration::from_secs(2)).await;
}
