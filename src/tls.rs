//! TLS material: PEM loading, the development certificate authority, and the rustls server
//! config whose certificate is chosen by SNI.
//!
//! Only TLS 1.2 and 1.3 with the aws-lc-rs provider. The resolver answers for configured names
//! only: there is no default certificate, so a client with an unknown or missing SNI never
//! learns which other hostnames live here. This module must never log key material.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

use crate::config::{CertFiles, Config, ConfigError, FileRef, HostPattern, Problem};

/// ALPN protocols offered to clients, preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The ALPN protocol of TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Why TLS material could not be loaded or made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or holds no usable item.
    #[error("cannot load {path}: {reason}")]
    Pem { path: String, reason: String },
    /// The private key is not the one the certificate was issued for.
    #[error("key {key} does not match certificate {cert}")]
    KeyMismatch { cert: String, key: String },
    /// The certificate does not cover the site's hostname.
    #[error("certificate does not cover host {host}: {reason}")]
    NotCovering { host: String, reason: String },
    /// The state directory or the development CA in it could not be used.
    #[error("development CA in {dir}: {reason}")]
    DevCa { dir: String, reason: String },
    /// An ACME certificate, challenge certificate or key could not be made or read.
    #[error("ACME: {0}")]
    Acme(String),
    /// rustls refused the configuration (should not happen with the fixed settings here).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The one crypto provider used everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Every certificate in a PEM file, in order.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |reason: String| TlsError::Pem {
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no CERTIFICATE block in the file".into()));
    }
    Ok(certs)
}

/// The system's trust anchors plus `extra`. The system store is read once per process.
pub fn trust_anchors(extra: &[CertificateDer<'static>]) -> rustls::RootCertStore {
    static SYSTEM: std::sync::OnceLock<rustls::RootCertStore> = std::sync::OnceLock::new();
    let system = SYSTEM.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "reading system trust anchors");
        }
        roots.add_parsable_certificates(found.certs);
        roots
    });
    let mut roots = system.clone();
    roots.add_parsable_certificates(extra.iter().cloned());
    roots
}

/// A verifying TLS 1.2/1.3 client config trusting the system anchors plus `extra`: every
/// outgoing TLS connection (origins, webhooks, probes, the CLI) starts from this.
pub fn client_config(extra: &[CertificateDer<'static>]) -> Result<rustls::ClientConfig, TlsError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(trust_anchors(extra))
        .with_no_client_auth())
}

/// A certificate chain and its private key, checked to belong together.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = load_certs(cert)?;
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| TlsError::Pem {
            path: key.display().to_string(),
            reason: e.to_string(),
        })?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|_| TlsError::KeyMismatch {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
    })?;
    Ok(Arc::new(ck))
}

/// The certificate and key of `files`, checked to belong together.
pub fn load_cert_files(files: &CertFiles) -> Result<Arc<CertifiedKey>, TlsError> {
    load_certified_key(&files.cert, &files.key)
}

/// Opens every certificate, key and CA bundle a config names, as `check` and every apply do.
/// Problems come back in the validator's form (key, value as written, what is wrong).
pub fn check_files(files: &[FileRef]) -> Vec<Problem> {
    let quoted = |p: &Path| format!("{:?}", p.display().to_string());
    let mut out = Vec::new();
    for f in files {
        match f {
            FileRef::CertKey { at, files, covers } => {
                let problem = |message: String| Problem {
                    key: format!("{at}.cert"),
                    value: quoted(&files.cert),
                    message,
                };
                match load_cert_files(files) {
                    Err(e) => out.push(problem(format!("{e} (key {})", quoted(&files.key)))),
                    Ok(ck) => {
                        if let Some(Err(e)) = covers.as_ref().map(|h| check_covers(&ck, h)) {
                            out.push(problem(e.to_string()));
                        }
                    }
                }
            }
            FileRef::Roots { key, path } => {
                if let Err(e) = load_certs(path) {
                    out.push(Problem {
                        key: key.clone(),
                        value: quoted(path),
                        message: e.to_string(),
                    });
                }
            }
        }
    }
    out
}

/// A config as it may run: the validator's verdict on the text of `label`, with the problems
/// of the certificate and CA files it names added, all in one report.
pub fn checked(label: &str, loaded: Result<Config, ConfigError>) -> Result<Config, ConfigError> {
    match loaded {
        Ok(config) => {
            let problems = check_files(&config.files);
            if problems.is_empty() {
                Ok(config)
            } else {
                Err(ConfigError::Invalid {
                    path: label.to_owned(),
                    problems,
                    files: config.files,
                })
            }
        }
        Err(ConfigError::Invalid {
            path,
            mut problems,
            files,
        }) => {
            problems.extend(check_files(&files));
            Err(ConfigError::Invalid {
                path,
                problems,
                files,
            })
        }
        Err(other) => Err(other),
    }
}

/// The TLS acceptor of a control-plane listener (admin, `/metrics`): its configured
/// certificate, or one the development CA issues for the address it listens on.
pub fn listener_acceptor(
    cert: Option<&CertFiles>,
    state_dir: &Path,
    listen: std::net::SocketAddr,
) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let ck = match cert {
        Some(files) => load_cert_files(files)?,
        None => DevCa::open(state_dir)?.certificate_for(&listen.ip().to_string())?,
    };
    Ok(tokio_rustls::TlsAcceptor::from(single_cert_config(ck)?))
}

/// Checks that the leaf certificate is valid for the host (or, for a wildcard site, for a
/// name the wildcard matches).
pub fn check_covers(ck: &CertifiedKey, host: &HostPattern) -> Result<(), TlsError> {
    let name = match host {
        HostPattern::Exact(h) => h.clone(),
        HostPattern::Wildcard(s) => format!("portcullis-check.{s}"),
    };
    let not_covering = |reason: String| TlsError::NotCovering {
        host: host.to_string(),
        reason,
    };
    let leaf = ck
        .end_entity_cert()
        .map_err(|e| not_covering(e.to_string()))?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| not_covering(e.to_string()))?;
    let server_name = ServerName::try_from(name).map_err(|e| not_covering(e.to_string()))?;
    ee.verify_is_valid_for_subject_name(&server_name)
        .map_err(|e| not_covering(e.to_string()))
}

/// A site's certificate as the resolver holds it: fixed for the snapshot, or a slot that an
/// ACME issuance or renewal swaps while connections go on.
#[derive(Debug, Clone)]
enum CertRef {
    Fixed(Arc<CertifiedKey>),
    Live(Arc<ArcSwap<CertifiedKey>>),
}

impl CertRef {
    fn get(&self) -> Arc<CertifiedKey> {
        match self {
            CertRef::Fixed(ck) => ck.clone(),
            CertRef::Live(slot) => slot.load_full(),
        }
    }
}

/// Certificates by SNI: exact names first, then `*.suffix` for one extra label.
#[derive(Debug, Default)]
pub struct SniCerts {
    exact: HashMap<String, CertRef>,
    wildcard: HashMap<String, CertRef>,
}

impl SniCerts {
    pub fn insert(&mut self, host: &HostPattern, ck: Arc<CertifiedKey>) {
        self.put(host, CertRef::Fixed(ck));
    }

    /// A site whose certificate is swapped in place (see [`LiveCerts`]).
    pub fn insert_live(&mut self, host: &HostPattern, slot: Arc<ArcSwap<CertifiedKey>>) {
        self.put(host, CertRef::Live(slot));
    }

    fn put(&mut self, host: &HostPattern, c: CertRef) {
        match host {
            HostPattern::Exact(h) => self.exact.insert(h.clone(), c),
            HostPattern::Wildcard(s) => self.wildcard.insert(s.clone(), c),
        };
    }

    /// The certificate for a lowercase SNI name, if any site covers it.
    pub fn get(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let found = self.exact.get(sni).or_else(|| {
            let (label, rest) = sni.split_once('.')?;
            if label.is_empty() {
                return None;
            }
            self.wildcard.get(rest)
        });
        found.map(CertRef::get)
    }
}

impl ResolvesServerCert for SniCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls hands over the SNI already lowercased and validated as a DNS name.
        self.get(hello.server_name()?)
    }
}

/// Certificates that change while a snapshot stands: a slot per ACME site, swapped by each
/// issuance and renewal (connections in progress keep the certificate they got), and the
/// TLS-ALPN-01 challenge certificates of validations in progress. Shared by the edge, which
/// reads it on each handshake, and the ACME client, which writes it.
#[derive(Debug, Default)]
pub struct LiveCerts {
    slots: Mutex<HashMap<String, Arc<ArcSwap<CertifiedKey>>>>,
    challenges: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
}

impl LiveCerts {
    /// The slot of `site`, created holding `fallback()` if this is its first use.
    pub fn slot(
        &self,
        site: &str,
        fallback: impl FnOnce() -> Result<Arc<CertifiedKey>, TlsError>,
    ) -> Result<Arc<ArcSwap<CertifiedKey>>, TlsError> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.get(site) {
            return Ok(s.clone());
        }
        let slot = Arc::new(ArcSwap::new(fallback()?));
        slots.insert(site.to_owned(), slot.clone());
        Ok(slot)
    }

    /// Serves `ck` for `site` from the next handshake on.
    pub fn install(&self, site: &str, ck: Arc<CertifiedKey>) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        match slots.get(site) {
            Some(slot) => slot.store(ck),
            None => {
                slots.insert(site.to_owned(), Arc::new(ArcSwap::new(ck)));
            }
        }
    }

    /// What `site` is served with now, if it has a slot.
    pub fn current(&self, site: &str) -> Option<Arc<CertifiedKey>> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get(site).map(|s| s.load_full())
    }

    /// Answers TLS-ALPN-01 validation of `name` with `ck` until [`LiveCerts::end_challenge`].
    pub fn begin_challenge(&self, name: &str, ck: Arc<CertifiedKey>) {
        self.challenges.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(name.to_owned(), ck.clone());
            m
        });
    }

    pub fn end_challenge(&self, name: &str) {
        self.challenges.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.remove(name);
            m
        });
    }

    /// The challenge certificate for a lowercase SNI name, while its validation is on.
    pub fn challenge(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.challenges.load().get(name).cloned()
    }
}

/// Whether a ClientHello is a TLS-ALPN-01 validation: it offers `acme-tls/1` and nothing else.
pub fn is_acme_validation(hello: &ClientHello<'_>) -> bool {
    hello.alpn().is_some_and(|mut offered| {
        offered.next() == Some(ACME_TLS_ALPN) && offered.next().is_none()
    })
}

/// Resolves validation handshakes to the pending challenge certificate of their SNI.
#[derive(Debug)]
struct ChallengeCerts(Arc<LiveCerts>);

impl ResolvesServerCert for ChallengeCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.challenge(hello.server_name()?)
    }
}

/// The server config for TLS-ALPN-01 validation handshakes: ALPN `acme-tls/1` only, TLS 1.2
/// and 1.3, the challenge certificate of the SNI or no handshake at all.
pub fn acme_validation_config(live: Arc<LiveCerts>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ChallengeCerts(live)));
    cfg.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// A self-signed certificate for `name` carrying the `acmeIdentifier` extension with the
/// SHA-256 digest of the key authorization (RFC 8737 section 3).
pub fn acme_challenge_cert(name: &str, digest: &[u8; 32]) -> Result<Arc<CertifiedKey>, TlsError> {
    let fail = |e: rcgen::Error| TlsError::Acme(format!("challenge certificate for {name}: {e}"));
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(fail)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let cert = params.self_signed(&key).map_err(fail)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider().key_provider.load_private_key(der)?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

/// A fresh ECDSA P-256 key (PKCS#8 PEM) and a certificate signing request for `names`.
pub fn key_and_csr(names: &[String]) -> Result<(String, Vec<u8>), TlsError> {
    let fail = |e: rcgen::Error| TlsError::Acme(format!("signing request: {e}"));
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let mut params = CertificateParams::new(names.to_vec()).map_err(fail)?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(fail)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// Where a site's certificate comes from, with what it says of itself: `portcullis certs`,
/// `GET /api/certs`, the dashboard and `/metrics` show this.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SiteCert {
    pub site: String,
    /// `file` (PEM files in the config), `acme` (issued by the ACME CA) or `development` (the
    /// development CA's: no configured certificate, or an ACME site before its first issuance).
    pub source: &'static str,
    /// `tls-alpn-01` or `dns-01` for `cert = "acme"` sites.
    pub acme_challenge: Option<String>,
    pub issuer: Option<String>,
    /// Seconds since the epoch.
    pub not_after: Option<u64>,
    /// ACME sites: when the next order is due (renewal, or retry after a failure).
    pub next_renewal: Option<u64>,
    pub last_error: Option<String>,
}

/// What a served certificate says of itself: its issuer and validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The issuer's common name (or whole name when it has none).
    pub issuer: String,
    /// Seconds since the epoch.
    pub not_before: u64,
    pub not_after: u64,
}

/// The issuer and validity of the end-entity certificate of `ck`.
pub fn cert_info(ck: &CertifiedKey) -> Result<CertInfo, TlsError> {
    let der = ck
        .cert
        .first()
        .ok_or_else(|| TlsError::Acme("empty certificate chain".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| TlsError::Acme(format!("certificate does not parse: {e}")))?;
    let issuer = cert
        .issuer()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| cert.issuer().to_string());
    let v = cert.validity();
    Ok(CertInfo {
        issuer,
        not_before: v.not_before.timestamp().max(0) as u64,
        not_after: v.not_after.timestamp().max(0) as u64,
    })
}

/// A chain and key in PEM, as an ACME CA hands them over, checked to belong together.
pub fn certified_key_from_pem(chain: &str, key: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    let bad = |reason: String| TlsError::Acme(reason);
    let certs = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(bad("certificate chain: no certificate in it".into()));
    }
    let der = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|e| bad(format!("private key: {e}")))?;
    let signing = provider().key_provider.load_private_key(der)?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match()
        .map_err(|_| bad("the key does not match the certificate".into()))?;
    Ok(Arc::new(ck))
}

/// State shared by every server config across reloads, so sessions resume after a reload.
#[derive(Debug)]
pub struct Resumption {
    storage: Arc<dyn StoresServerSessions>,
    ticketer: Arc<dyn ProducesTickets>,
}

impl Resumption {
    pub fn new() -> Result<Resumption, TlsError> {
        Ok(Resumption {
            // Stateful cache for TLS 1.2 session IDs; 4096 entries is a few hundred KiB.
            storage: rustls::server::ServerSessionMemoryCache::new(4096),
            ticketer: rustls::crypto::aws_lc_rs::Ticketer::new()?,
        })
    }
}

/// A server config for TLS 1.2 and 1.3, ALPN h2 and http/1.1, certificates by SNI.
pub fn server_config(
    certs: SniCerts,
    resumption: &Resumption,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(certs));
    cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    cfg.session_storage = resumption.storage.clone();
    cfg.ticketer = resumption.ticketer.clone();
    Ok(Arc::new(cfg))
}

/// The TLS side of the QUIC sockets: `tls`'s certificates, session tickets and resolver,
/// ALPN `h3` only, TLS 1.3 only (QUIC has no other), and no 0-RTT: early data can be
/// replayed by anyone who recorded it, and a proxied request is not known to be idempotent.
pub fn quic_server_config(
    tls: &ServerConfig,
) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsError> {
    let mut cfg = tls.clone();
    cfg.alpn_protocols = vec![b"h3".to_vec()];
    cfg.max_early_data_size = 0;
    quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
        .map(Arc::new)
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))
}

/// A certificate authority kept in the state directory, issuing certificates for sites that
/// configure none. Operators (and the demo's curl lines) trust `dev-ca.pem` explicitly.
pub struct DevCa {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// Issued certificates by host, so reloads keep serving the same certificate.
    issued: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl DevCa {
    /// Path of the CA certificate that clients can trust.
    pub fn cert_path(dir: &Path) -> PathBuf {
        dir.join("dev-ca.pem")
    }

    /// Opens the CA in `dir`, creating the directory, key (mode 0600) and certificate if absent.
    pub fn open(dir: &Path) -> Result<DevCa, TlsError> {
        let fail = |reason: String| TlsError::DevCa {
            dir: dir.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create: {e}")))?;
        let key_path = dir.join("dev-ca.key");
        let cert_path = Self::cert_path(dir);
        let key = if key_path.exists() && cert_path.exists() {
            let pem = std::fs::read_to_string(&key_path)
                .map_err(|e| fail(format!("cannot read dev-ca.key: {e}")))?;
            KeyPair::from_pem(&pem).map_err(|e| fail(format!("dev-ca.key: {e}")))?
        } else {
            let key =
                KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(e.to_string()))?;
            let cert = ca_params()
                .self_signed(&key)
                .map_err(|e| fail(e.to_string()))?;
            write_private(&key_path, key.serialize_pem().as_bytes())
                .map_err(|e| fail(format!("cannot write dev-ca.key: {e}")))?;
            std::fs::write(&cert_path, cert.pem())
                .map_err(|e| fail(format!("cannot write dev-ca.pem: {e}")))?;
            key
        };
        Ok(DevCa {
            dir: dir.to_owned(),
            issuer: Issuer::new(ca_params(), key),
            issued: Mutex::new(HashMap::new()),
        })
    }

    /// Path of the CA certificate that clients can trust.
    pub fn ca_path(&self) -> PathBuf {
        Self::cert_path(&self.dir)
    }

    /// A certificate for `host`, issued once per process and reused.
    pub fn certificate(&self, host: &HostPattern) -> Result<Arc<CertifiedKey>, TlsError> {
        self.certificate_for(&host.to_string())
    }

    /// A certificate for a DNS name, `*.` wildcard or IP address, issued once per process.
    pub fn certificate_for(&self, name: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        let mut issued = self
            .issued
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(ck) = issued.get(name) {
            return Ok(ck.clone());
        }
        let fail = |reason: String| TlsError::DevCa {
            dir: self.dir.display().to_string(),
            reason,
        };
        let mut params =
            CertificateParams::new(vec![name.to_owned()]).map_err(|e| fail(e.to_string()))?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(e.to_string()))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| fail(e.to_string()))?;
        let ca_der = load_certs(&self.ca_path())?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(ca_der);
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = provider().key_provider.load_private_key(der)?;
        let ck = Arc::new(CertifiedKey::new(chain, signing));
        issued.insert(name.to_owned(), ck.clone());
        Ok(ck)
    }
}

/// Always the same certificate: for single-purpose listeners such as `/metrics`.
#[derive(Debug)]
pub struct SingleCert(pub Arc<CertifiedKey>);

impl ResolvesServerCert for SingleCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A TLS 1.2/1.3 server config for one certificate, ALPN http/1.1.
pub fn single_cert_config(ck: Arc<CertifiedKey>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCert(ck)));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Fixed dates: the issuer is rebuilt from these parameters at every start.
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "portcullis development CA");
    params
}

/// Writes a file readable by its owner only, atomically: a reader (or a crash) sees the old
/// content or the new, never part of it.
pub fn write_private_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    write_private(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}
