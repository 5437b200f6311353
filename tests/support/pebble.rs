//! Debian's pebble (a test ACME CA), started by the tests on its own loopback address. Its
//! default nonce rejection stays on, so clients must retry `badNonce` as real CAs need.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use portcullis::runtime::{ConfigSource, Runtime};
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

    /// What pebble has logged so far (one line per request it handled).
    #[allow(dead_code)] // not every test binary reads it
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pebble.log")).unwrap_or_default()
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

/// A config with one `cert = "acme"` site `host` on a closed pool (`closed`:8443) whose CA is
/// `pebble`, with the zone `acme.test` served at `dns`; `acme_extra` goes into `[acme]`.
pub fn acme_config(
    pebble: &Pebble,
    state: &Path,
    closed: Ipv4Addr,
    dns: SocketAddr,
    origin: &str,
    host: &str,
    acme_extra: &str,
) -> String {
    format!(
        r#"
[state]
dir = "{state}"
[acme]
directory = "{dir}"
contact = ["mailto:ops@acme.test"]
directory_ca = "{ca}"
{acme_extra}
[dns]
listen = "{dns}"
zones = ["acme.test"]
[[pool]]
name = "closed"
addresses = ["{closed}"]
tls_ports = [8443]
[[site]]
host = "{host}"
pool = "closed"
origin = "{origin}"
cert = "acme"
"#,
        state = state.display(),
        dir = pebble.directory(),
        ca = pebble.ca.display(),
    )
}

/// Starts portcullis on the config file at `path`.
pub async fn start(path: &Path) -> Runtime {
    Runtime::start(ConfigSource::File(path.to_owned()), None)
        .await
        .unwrap_or_else(|e| panic!("portcullis starts: {e}"))
}

/// The DER of the certificate served for `name` at `addr`, verified against `roots`.
pub async fn served(addr: SocketAddr, name: &str, roots: RootCertStore) -> Vec<u8> {
    let tls = super::tls_connect(addr, name, super::client_config(roots, &[b"http/1.1"]))
        .await
        .expect("a handshake verified against pebble's root");
    tls.get_ref().1.peer_certificates().expect("certs")[0]
        .as_ref()
        .to_vec()
}
