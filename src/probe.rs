//! `portcullis probe`: audits any endpoint's cleartext exposure the way a careful auditor
//! would. For each address of the host: does each cleartext port refuse the connection, and if
//! not, what does it answer, with and without a credential? What does the TLS port offer
//! (version, cipher, ALPN, certificate, HSTS), and what does cleartext sent to it get? Then a
//! grade with its reasons.
//!
//! The credential sent is a canary: random, and marked as a probe in its value and in a header,
//! so no real secret is ever sent. This module only connects to the addresses it is given or
//! that the host resolves to.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::WELL_KNOWN_CLEARTEXT_PORTS;

/// Why a probe could not run at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    #[error("{0:?} is not a URL or host name; write it like https://api.example.com/ or api.example.com")]
    BadTarget(String),
    #[error("--resolve {0:?}: write it like api.example.com:127.0.0.1")]
    BadResolve(String),
    #[error("{host} does not resolve: {reason}")]
    NoAddress { host: String, reason: String },
    #[error("DNS resolver: {0}")]
    Resolver(String),
}

/// A letter grade, A best.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Grade {
    A,
    B,
    C,
    D,
    F,
}

impl Grade {
    pub fn parse(s: &str) -> Option<Grade> {
        Some(match s.to_ascii_uppercase().as_str() {
            "A" => Grade::A,
            "B" => Grade::B,
            "C" => Grade::C,
            "D" => Grade::D,
            "F" => Grade::F,
            _ => return None,
        })
    }
}

/// What to probe and how.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub target: String,
    /// Cleartext ports; default: the CDN list.
    pub ports: Vec<u16>,
    /// curl-style `HOST:ADDR` overrides; with them, the host is not resolved for addresses.
    pub resolve: Vec<(String, IpAddr)>,
    /// A DNS server to ask (for the HTTPS record, and addresses without `--resolve`).
    pub dns: Option<SocketAddr>,
    /// Extra trust anchors for the certificate check.
    pub ca: Vec<CertificateDer<'static>>,
    /// Per connection and per answer.
    pub timeout: Duration,
}

/// The whole audit.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub host: String,
    pub tls_port: u16,
    pub path: String,
    pub https_record: DnsRecordStatus,
    pub addresses: Vec<AddressReport>,
    pub grade: Grade,
    pub reasons: Vec<String>,
}

/// Whether the host publishes an HTTPS (RFC 9460) record.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum DnsRecordStatus {
    Present { records: Vec<String> },
    Absent,
    NotChecked { why: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct AddressReport {
    pub address: IpAddr,
    pub cleartext: Vec<PortReport>,
    pub tls: TlsReport,
    pub grade: Grade,
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PortReport {
    pub port: u16,
    /// `refused`, `filtered` (timed out) or `accepted`.
    pub connect: String,
    /// With the canary credential.
    pub with_credential: Option<Answer>,
    pub without_credential: Option<Answer>,
    /// The two answers differ: the server tells a client whether its credential matters.
    pub differs: bool,
}

/// What a server answered to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Answer {
    /// 2xx: content served.
    Content {
        status: u16,
    },
    Redirect {
        status: u16,
        location: String,
        to_https_same_host: bool,
    },
    ClientError {
        status: u16,
    },
    ServerError {
        status: u16,
    },
    Other {
        status: u16,
    },
    /// The connection closed without an answer.
    Closed,
    TimedOut,
}

impl Answer {
    fn describe(&self) -> String {
        match self {
            Answer::Content { status } => format!("serves content ({status})"),
            Answer::Redirect {
                status,
                location,
                to_https_same_host,
            } => format!(
                "redirects ({status}) to {location}{}",
                if *to_https_same_host {
                    " (https, same host)"
                } else {
                    " (not https on the same host)"
                }
            ),
            Answer::ClientError { status } => format!("answers {status}"),
            Answer::ServerError { status } => format!("answers {status}"),
            Answer::Other { status } => format!("answers {status}"),
            Answer::Closed => "closes without an answer".into(),
            Answer::TimedOut => "accepts but never answers".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TlsReport {
    /// `None` when the handshake failed; then `error` says why.
    pub handshake: Option<TlsInfo>,
    pub error: Option<String>,
    pub hsts: Option<Hsts>,
    /// What cleartext HTTP sent to the TLS port gets.
    pub cleartext_to_tls_port: Option<Answer>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
    pub alpn: Option<String>,
    /// `None` when the chain verifies; else why not.
    pub chain_error: Option<String>,
    pub hostname_match: bool,
    pub days_to_expiry: Option<i64>,
    pub status: Option<u16>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Hsts {
    pub header: String,
    pub max_age: Option<u64>,
    pub include_subdomains: bool,
    pub preload: bool,
    /// What the HSTS preload list would still require (empty: meets it).
    pub preload_missing: Vec<String>,
}

/// Parses a `Strict-Transport-Security` value and checks the preload list's published
/// requirements on it (max-age of at least a year, includeSubDomains, preload).
pub fn parse_hsts(header: &str) -> Hsts {
    let mut max_age = None;
    let mut include_subdomains = false;
    let mut preload = false;
    for part in header.split(';') {
        let part = part.trim();
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        match k.trim().to_ascii_lowercase().as_str() {
            "max-age" => max_age = v.trim().trim_matches('"').parse().ok(),
            "includesubdomains" => include_subdomains = true,
            "preload" => preload = true,
            _ => {}
        }
    }
    let mut missing = Vec::new();
    if max_age.is_none_or(|a| a < 31_536_000) {
        missing.push("max-age of at least 31536000".to_owned());
    }
    if !include_subdomains {
        missing.push("includeSubDomains".to_owned());
    }
    if !preload {
        missing.push("preload".to_owned());
    }
    Hsts {
        header: header.to_owned(),
        max_age,
        include_subdomains,
        preload,
        preload_missing: missing,
    }
}

/// Target parsed: host, TLS port and path.
fn parse_target(target: &str) -> Result<(String, u16, String), ProbeError> {
    let bad = || ProbeError::BadTarget(target.to_owned());
    let with_scheme = if target.contains("://") {
        target.to_owned()
    } else {
        format!("https://{target}")
    };
    let uri: Uri = with_scheme.parse().map_err(|_| bad())?;
    let host = uri
        .host()
        .ok_or_else(bad)?
        .trim_matches(['[', ']'])
        .to_ascii_lowercase();
    if host.is_empty() {
        return Err(bad());
    }
    let port = match (uri.scheme_str(), uri.port_u16()) {
        (_, Some(p)) if uri.scheme_str() == Some("https") => p,
        // An http:// URL names a cleartext port; the TLS port is then the default one.
        _ => 443,
    };
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    Ok((host, port, path))
}

/// Parses a curl-style `HOST:ADDR` (ADDR may be an IPv6 address, with or without brackets).
pub fn parse_resolve(s: &str) -> Result<(String, IpAddr), ProbeError> {
    let bad = || ProbeError::BadResolve(s.to_owned());
    let (host, addr) = s.split_once(':').ok_or_else(bad)?;
    // curl's form is HOST:PORT:ADDR; accept it too and ignore the port.
    let addr = match addr.split_once(':') {
        Some((port, rest)) if port.bytes().all(|b| b.is_ascii_digit()) && !rest.is_empty() => rest,
        _ => addr,
    };
    let ip = addr.trim_matches(['[', ']']).parse().map_err(|_| bad())?;
    Ok((host.to_ascii_lowercase(), ip))
}

/// Runs the whole audit.
pub async fn probe(o: &ProbeOptions) -> Result<ProbeReport, ProbeError> {
    let (host, tls_port, path) = parse_target(&o.target)?;
    let resolver = resolver(o.dns)?;
    let overridden: Vec<IpAddr> = o
        .resolve
        .iter()
        .filter(|(h, _)| *h == host)
        .map(|(_, ip)| *ip)
        .collect();
    let addresses = if !overridden.is_empty() {
        overridden
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        vec![ip]
    } else {
        let r = resolver.as_ref().ok_or_else(|| ProbeError::NoAddress {
            host: host.clone(),
            reason: "no DNS resolver available (give --resolve or --dns)".into(),
        })?;
        let found = r
            .lookup_ip(host.as_str())
            .await
            .map_err(|e| ProbeError::NoAddress {
                host: host.clone(),
                reason: e.to_string(),
            })?;
        let ips: Vec<IpAddr> = found.iter().collect();
        if ips.is_empty() {
            return Err(ProbeError::NoAddress {
                host,
                reason: "no A or AAAA records".into(),
            });
        }
        ips
    };
    let https_record = match (&resolver, o.dns.is_none() && !o.resolve.is_empty()) {
        (_, true) => DnsRecordStatus::NotChecked {
            why: "--resolve given without --dns".into(),
        },
        (None, _) => DnsRecordStatus::NotChecked {
            why: "no DNS resolver available".into(),
        },
        (Some(r), false) => match r
            .lookup(host.as_str(), hickory_proto::rr::RecordType::HTTPS)
            .await
        {
            Ok(l) => {
                let records: Vec<String> = l
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        hickory_proto::rr::RData::HTTPS(h) => Some(crate::dns::svcb_text(&h.0)),
                        _ => None,
                    })
                    .collect();
                if records.is_empty() {
                    DnsRecordStatus::Absent
                } else {
                    DnsRecordStatus::Present { records }
                }
            }
            Err(_) => DnsRecordStatus::Absent,
        },
    };
    let ports = if o.ports.is_empty() {
        WELL_KNOWN_CLEARTEXT_PORTS.to_vec()
    } else {
        o.ports.clone()
    };
    let mut tasks = Vec::new();
    for ip in addresses {
        let (host, path, ports, o2) = (host.clone(), path.clone(), ports.clone(), o.clone());
        tasks.push(tokio::spawn(async move {
            probe_address(&o2, &host, ip, tls_port, &path, &ports).await
        }));
    }
    let mut reports = Vec::new();
    for t in tasks {
        if let Ok(r) = t.await {
            reports.push(r);
        }
    }
    let has_https = matches!(https_record, DnsRecordStatus::Present { .. });
    for r in &mut reports {
        grade_address(r, has_https);
    }
    let grade = reports.iter().map(|r| r.grade).max().unwrap_or(Grade::F);
    let mut reasons: Vec<String> = Vec::new();
    for r in &reports {
        for reason in &r.reasons {
            let line = format!("{}: {reason}", r.address);
            if !reasons.contains(&line) {
                reasons.push(line);
            }
        }
    }
    Ok(ProbeReport {
        host,
        tls_port,
        path,
        https_record,
        addresses: reports,
        grade,
        reasons,
    })
}

fn resolver(
    dns: Option<SocketAddr>,
) -> Result<Option<hickory_resolver::TokioResolver>, ProbeError> {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    match dns {
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            ns.connections = vec![udp, tcp];
            let config = ResolverConfig::from_name_servers(vec![ns]);
            let r = hickory_resolver::Resolver::builder_with_config(config, Default::default())
                .build()
                .map_err(|e| ProbeError::Resolver(e.to_string()))?;
            Ok(Some(r))
        }
        None => Ok(hickory_resolver::Resolver::builder_tokio()
            .ok()
            .and_then(|b| b.build().ok())),
    }
}

async fn probe_address(
    o: &ProbeOptions,
    host: &str,
    ip: IpAddr,
    tls_port: u16,
    path: &str,
    ports: &[u16],
) -> AddressReport {
    let mut cleartext = Vec::new();
    let mut jobs = Vec::new();
    for &port in ports {
        let (host, path, o) = (host.to_owned(), path.to_owned(), o.clone());
        jobs.push(tokio::spawn(async move {
            probe_cleartext(&o, &host, SocketAddr::new(ip, port), &path).await
        }));
    }
    for j in jobs {
        if let Ok(r) = j.await {
            cleartext.push(r);
        }
    }
    let tls = probe_tls(o, host, SocketAddr::new(ip, tls_port), path).await;
    AddressReport {
        address: ip,
        cleartext,
        tls,
        grade: Grade::F,
        reasons: Vec::new(),
    }
}

/// A random canary credential, clearly marked as a probe's.
fn canary() -> String {
    format!(
        "portcullis-probe-canary-not-a-secret-{}",
        crate::hex::random(12)
    )
}

async fn probe_cleartext(o: &ProbeOptions, host: &str, addr: SocketAddr, path: &str) -> PortReport {
    let refused = |connect: &str| PortReport {
        port: addr.port(),
        connect: connect.to_owned(),
        with_credential: None,
        without_credential: None,
        differs: false,
    };
    match tokio::time::timeout(o.timeout, TcpStream::connect(addr)).await {
        Err(_) => refused("filtered"),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused("refused"),
        Ok(Err(_)) => refused("unreachable"),
        Ok(Ok(first)) => {
            let authority = if addr.port() == 80 {
                host.to_owned()
            } else {
                format!("{host}:{}", addr.port())
            };
            let with = ask(o, first, &authority, path, Some(&canary()), host).await;
            let without = match tokio::time::timeout(o.timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => ask(o, s, &authority, path, None, host).await,
                _ => Answer::Closed,
            };
            PortReport {
                port: addr.port(),
                connect: "accepted".into(),
                differs: with != without,
                with_credential: Some(with),
                without_credential: Some(without),
            }
        }
    }
}

/// Sends one GET and classifies the answer.
async fn ask<T>(
    o: &ProbeOptions,
    io: T,
    authority: &str,
    path: &str,
    credential: Option<&str>,
    host: &str,
) -> Answer
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let exchange = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .ok()?;
        tokio::spawn(conn);
        let mut req = Request::get(path)
            .header(http::header::HOST, authority)
            .header(http::header::USER_AGENT, "portcullis-probe")
            .header("x-portcullis-probe", "canary credential, not a secret");
        if let Some(c) = credential {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {c}"));
        }
        let resp = sender
            .send_request(req.body(Empty::<Bytes>::new()).ok()?)
            .await
            .ok()?;
        let location = resp
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let hsts = resp
            .headers()
            .get(http::header::STRICT_TRANSPORT_SECURITY)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let status = resp.status();
        // Read (and discard) a bounded amount of body so keep-alive servers finish cleanly.
        let _ = tokio::time::timeout(Duration::from_millis(500), resp.into_body().collect()).await;
        Some((status, location, hsts))
    };
    match tokio::time::timeout(o.timeout, exchange).await {
        Err(_) => Answer::TimedOut,
        Ok(None) => Answer::Closed,
        Ok(Some((status, location, _))) => classify(status, location, host),
    }
}

fn classify(status: StatusCode, location: Option<String>, host: &str) -> Answer {
    let s = status.as_u16();
    match s {
        200..=299 => Answer::Content { status: s },
        300..=399 => {
            let location = location.unwrap_or_default();
            let same = location.parse::<Uri>().ok().is_some_and(|u| {
                u.scheme_str() == Some("https")
                    && u.host().is_some_and(|h| h.eq_ignore_ascii_case(host))
            });
            Answer::Redirect {
                status: s,
                location,
                to_https_same_host: same,
            }
        }
        400..=499 => Answer::ClientError { status: s },
        500..=599 => Answer::ServerError { status: s },
        _ => Answer::Other { status: s },
    }
}

/// Accepts any certificate but records what the real verification said, so the audit can go
/// on and report an invalid certificate instead of stopping at it.
#[derive(Debug)]
struct RecordingVerifier {
    inner: Arc<WebPkiServerVerifier>,
    result: Mutex<Option<String>>,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let r = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = r.err().map(|e| e.to_string());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

async fn probe_tls(o: &ProbeOptions, host: &str, addr: SocketAddr, path: &str) -> TlsReport {
    let mut report = TlsReport {
        handshake: None,
        error: None,
        hsts: None,
        cleartext_to_tls_port: None,
    };
    // What cleartext sent to the TLS port gets.
    if let Ok(Ok(s)) = tokio::time::timeout(o.timeout, TcpStream::connect(addr)).await {
        let authority = format!("{host}:{}", addr.port());
        report.cleartext_to_tls_port = Some(ask(o, s, &authority, path, None, host).await);
    }
    let roots = crate::tls::trust_anchors(&o.ca);
    let inner =
        match WebPkiServerVerifier::builder_with_provider(Arc::new(roots), crate::tls::provider())
            .build()
        {
            Ok(v) => v,
            Err(e) => {
                report.error = Some(format!("no trust anchors: {e}"));
                return report;
            }
        };
    let verifier = Arc::new(RecordingVerifier {
        inner,
        result: Mutex::new(None),
    });
    let Ok(builder) = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
    else {
        report.error = Some("no TLS versions".into());
        return report;
    };
    let mut cfg = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec(), b"h2".to_vec()];
    let name = match ServerName::try_from(host.to_owned()) {
        Ok(n) => n,
        Err(e) => {
            report.error = Some(format!("{host:?} is not a server name: {e}"));
            return report;
        }
    };
    let connect = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))
    };
    let tls = match tokio::time::timeout(o.timeout, connect).await {
        Err(_) => {
            report.error = Some("TLS handshake timed out".into());
            return report;
        }
        Ok(Err(e)) => {
            report.error = Some(e);
            return report;
        }
        Ok(Ok(t)) => t,
    };
    let conn = tls.get_ref().1;
    let leaf = conn.peer_certificates().and_then(|c| c.first()).cloned();
    let hostname_match = leaf.as_ref().is_some_and(|l| {
        webpki::EndEntityCert::try_from(l).is_ok_and(|ee| {
            ServerName::try_from(host.to_owned())
                .is_ok_and(|n| ee.verify_is_valid_for_subject_name(&n).is_ok())
        })
    });
    let days_to_expiry = leaf.as_ref().and_then(|l| {
        let (_, cert) = x509_parser::parse_x509_certificate(l).ok()?;
        let not_after = cert.validity().not_after.timestamp();
        Some((not_after - crate::clock::now() as i64).div_euclid(86_400))
    });
    let mut info = TlsInfo {
        version: conn
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default(),
        cipher: conn
            .negotiated_cipher_suite()
            .map(|c| format!("{:?}", c.suite()))
            .unwrap_or_default(),
        alpn: conn
            .alpn_protocol()
            .map(|a| String::from_utf8_lossy(a).into_owned()),
        chain_error: verifier
            .result
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        hostname_match,
        days_to_expiry,
        status: None,
    };
    let h2 = info.alpn.as_deref() == Some("h2");
    let (status, hsts) = https_get(o, tls, host, addr.port(), path, h2).await;
    info.status = status;
    report.hsts = hsts.as_deref().map(parse_hsts);
    report.handshake = Some(info);
    report
}

async fn https_get<T>(
    o: &ProbeOptions,
    io: T,
    host: &str,
    port: u16,
    path: &str,
    h2: bool,
) -> (Option<u16>, Option<String>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let authority = if port == 443 {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    };
    let exchange = async {
        let resp = if h2 {
            let (mut s, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                TokioIo::new(io),
            )
            .await
            .ok()?;
            tokio::spawn(conn);
            let uri = format!("https://{authority}{path}");
            s.send_request(Request::get(uri).body(Empty::<Bytes>::new()).ok()?)
                .await
                .ok()?
        } else {
            let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .ok()?;
            tokio::spawn(conn);
            let req = Request::get(path)
                .header(http::header::HOST, &authority)
                .body(Empty::<Bytes>::new())
                .ok()?;
            s.send_request(req).await.ok()?
        };
        let hsts = resp
            .headers()
            .get(http::header::STRICT_TRANSPORT_SECURITY)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Some((resp.status().as_u16(), hsts))
    };
    match tokio::time::timeout(o.timeout, exchange).await {
        Ok(Some((s, h))) => (Some(s), h),
        _ => (None, None),
    }
}

/// Grades one address, worst finding wins:
/// - F: content served over cleartext, or no TLS with a valid certificate for the host;
/// - D: a cleartext port answers differently when a credential is present;
/// - C: cleartext connections accepted (redirect, 4xx, close) and no HSTS, or a certificate
///   expiring within two weeks;
/// - B: cleartext accepted with HSTS; or HSTS or the HTTPS DNS record missing;
/// - A: every cleartext port refused (or filtered), HSTS, and an HTTPS record.
fn grade_address(r: &mut AddressReport, has_https_record: bool) {
    let mut reasons = Vec::new();
    let mut grade = Grade::A;
    let mut worse = |g: Grade, reason: String, reasons: &mut Vec<String>| {
        grade = grade.max(g);
        reasons.push(reason);
    };
    let hsts_ok = r
        .tls
        .hsts
        .as_ref()
        .is_some_and(|h| h.max_age.is_some_and(|a| a > 0));
    for p in &r.cleartext {
        let (Some(with), Some(without)) = (&p.with_credential, &p.without_credential) else {
            continue;
        };
        if matches!(with, Answer::Content { .. }) || matches!(without, Answer::Content { .. }) {
            let served = if matches!(with, Answer::Content { .. }) {
                with
            } else {
                without
            };
            worse(
                Grade::F,
                format!("port {} {} in cleartext", p.port, served.describe()),
                &mut reasons,
            );
        } else {
            // HSTS only protects browsers that already visited; without it, nothing does.
            let g = if hsts_ok { Grade::B } else { Grade::C };
            worse(g, format!("port {} accepts cleartext (so requests and their credentials cross in the clear) and {}", p.port, with.describe()), &mut reasons);
        }
        if p.differs {
            worse(
                Grade::D,
                format!("port {} answers differently when a credential is sent: it reveals whether credentials matter", p.port),
                &mut reasons,
            );
        }
    }
    match (&r.tls.handshake, &r.tls.error) {
        (None, e) => worse(
            Grade::F,
            format!("no TLS: {}", e.clone().unwrap_or_default()),
            &mut reasons,
        ),
        (Some(info), _) => {
            if let Some(e) = &info.chain_error {
                worse(
                    Grade::F,
                    format!("certificate not trusted: {e}"),
                    &mut reasons,
                );
            }
            if !info.hostname_match {
                worse(
                    Grade::F,
                    "certificate does not match the host name".into(),
                    &mut reasons,
                );
            }
            if let Some(d) = info.days_to_expiry.filter(|d| *d < 14) {
                worse(
                    Grade::C,
                    format!("certificate expires in {d} days"),
                    &mut reasons,
                );
            }
        }
    }
    if !hsts_ok {
        worse(
            Grade::B,
            "no HSTS (or max-age 0) over TLS".into(),
            &mut reasons,
        );
    }
    if !has_https_record {
        worse(
            Grade::B,
            "no HTTPS DNS record: clients do not learn to go straight to TLS".into(),
            &mut reasons,
        );
    }
    r.grade = grade;
    r.reasons = reasons;
}

impl ProbeReport {
    /// A readable report.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "Probe of {} (TLS port {}, path {})",
            self.host, self.tls_port, self.path
        );
        let _ = writeln!(
            o,
            "HTTPS DNS record: {}",
            match &self.https_record {
                DnsRecordStatus::Present { records } => format!("present: {}", records.join(" | ")),
                DnsRecordStatus::Absent => "absent".into(),
                DnsRecordStatus::NotChecked { why } => format!("not checked ({why})"),
            }
        );
        for a in &self.addresses {
            let _ = writeln!(o, "\n{}  grade {:?}", a.address, a.grade);
            for p in &a.cleartext {
                match (&p.with_credential, &p.without_credential) {
                    (Some(w), Some(wo)) => {
                        let _ = writeln!(
                            o,
                            "  cleartext port {:<5} accepted: with a credential it {}; without, it {}{}",
                            p.port,
                            w.describe(),
                            wo.describe(),
                            if p.differs { "  <- DIFFERENT" } else { "" }
                        );
                    }
                    _ => {
                        let _ = writeln!(o, "  cleartext port {:<5} {}", p.port, p.connect);
                    }
                }
            }
            match &a.tls.handshake {
                Some(t) => {
                    let _ = writeln!(
                        o,
                        "  TLS port {}: {} {} ALPN {}; certificate {}, {}, {}",
                        self.tls_port,
                        t.version,
                        t.cipher,
                        t.alpn.as_deref().unwrap_or("none"),
                        t.chain_error
                            .as_ref()
                            .map_or("trusted".to_owned(), |e| format!("NOT trusted ({e})")),
                        if t.hostname_match {
                            "matches the host"
                        } else {
                            "does NOT match the host"
                        },
                        t.days_to_expiry
                            .map_or("expiry unknown".to_owned(), |d| format!(
                                "expires in {d} days"
                            ))
                    );
                }
                None => {
                    let _ = writeln!(
                        o,
                        "  TLS port {}: {}",
                        self.tls_port,
                        a.tls.error.as_deref().unwrap_or("no answer")
                    );
                }
            }
            match &a.tls.hsts {
                Some(h) => {
                    let _ = writeln!(
                        o,
                        "  HSTS: {}{}",
                        h.header,
                        if h.preload_missing.is_empty() {
                            " (meets the preload list's requirements)".to_owned()
                        } else {
                            format!(
                                " (for preloading, still needs: {})",
                                h.preload_missing.join(", ")
                            )
                        }
                    );
                }
                None => {
                    let _ = writeln!(o, "  HSTS: none");
                }
            }
            if let Some(c) = &a.tls.cleartext_to_tls_port {
                let _ = writeln!(o, "  cleartext sent to the TLS port: it {}", c.describe());
            }
            for r in &a.reasons {
                let _ = writeln!(o, "  - {r}");
            }
        }
        let _ = writeln!(o, "\noverall grade: {:?}", self.grade);
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_resolve_overrides_parse() {
        assert_eq!(
            parse_target("api.example.com").expect("host"),
            ("api.example.com".into(), 443, "/".into())
        );
        assert_eq!(
            parse_target("https://API.example.com:8443/v1?x=1").expect("url"),
            ("api.example.com".into(), 8443, "/v1?x=1".into())
        );
        assert!(parse_target("https://").is_err());
        assert_eq!(
            parse_resolve("a.test:127.0.0.5").expect("r"),
            ("a.test".into(), "127.0.0.5".parse().expect("ip"))
        );
        assert_eq!(
            parse_resolve("a.test:443:[::1]").expect("r"),
            ("a.test".into(), "::1".parse().expect("ip"))
        );
        assert!(parse_resolve("a.test").is_err());
    }

    #[test]
    fn hsts_preload_requirements() {
        let h = parse_hsts("max-age=63072000; includeSubDomains; preload");
        assert!(h.preload_missing.is_empty());
        let h = parse_hsts("max-age=300");
        assert_eq!(h.preload_missing.len(), 3);
    }
}
