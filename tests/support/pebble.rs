//! Debian's pebble (a test ACME CA), started by the tests on its own loopback address. Its
//! default nonce rejection stays on, so clients must retry `badNonce` as real CAs need.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use rustls::RootCertStore;

use super::{get, https, loopback, roots_from, wait_until, TestCa};

/// Where a pebble listens and the CA of its listener's certificate, known before it starts
/// (so a config can name it while it is down).
pub struct Pebble {
    pub addr: Ipv4Addr,
    /// The trust anchor of pebble's own HTTPS listener (`directory_ca`).
    pub ca: PathBuf,
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    child: Option<Child>,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Pebble {
    /// Prepares a pebble in `dir` (not started).
    pub fn new(dir: &Path) -> Pebble {
        let addr = loopback();
        let ca = TestCa::new();
        let (cert, key) = ca.issue(dir, "pebble", &[&addr.to_string()]);
        Pebble {
            addr,
            ca: ca.write_ca(dir),
            dir: dir.to_owned(),
            cert,
            key,
            child: None,
        }
    }

    /// Starts it, validating TLS-ALPN-01 on `tls_port` and resolving every name through
    /// `dns`; returns once its API accepts connections.
    pub async fn start(&mut self, tls_port: u16, dns: SocketAddr) {
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("{}:14000", self.addr),
                "managementListenAddress": format!("{}:15000", self.addr),
                "certificate": self.cert,
                "privateKey": self.key,
                "httpPort": 5002,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        let path = self.dir.join("pebble.json");
        std::fs::write(&path, config.to_string()).expect("pebble config");
        let log = std::fs::File::create(self.dir.join("pebble.log")).expect("pebble log");
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
        self.child = Some(child);
        let api = SocketAddr::from((self.addr, 14000));
        wait_until("pebble listens", || async move {
            tokio::net::TcpStream::connect(api).await.is_ok()
        })
        .await;
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn directory(&self) -> String {
        format!("https://{}:14000/dir", self.addr)
    }

    /// The root that signs what pebble issues (a new one at every pebble start).
    pub async fn root(&self) -> RootCertStore {
        let got = https(
            SocketAddr::from((self.addr, 15000)),
            &self.addr.to_string(),
            roots_from(&self.ca),
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
