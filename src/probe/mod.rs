//! `portcullis probe`: audits any endpoint's cleartext exposure the way a careful auditor
//! would. For each address of the host: does each cleartext port refuse the connection, and if
//! not, what does it answer, with and without a credential? What does the TLS port offer
//! (version, cipher, ALPN, certificate, HSTS), and what does cleartext sent to it get? Then a
//! grade with its reasons.
//!
//! The credential sent is a canary: random, and marked as a probe in its value and in a header,
//! so no real secret is ever sent. This module only connects to the addresses it is given or
//! that the host resolves to.
//!
//! Layout: this file holds the entry point ([`probe`]), its options and the target parsing;
//! [`dns`] finds the addresses and the HTTPS record; `cleartext` and `tls_port` talk to the
//! endpoint; `grade` judges what they found; [`report`] holds what comes back, and `render`
//! its text form (the JSON form is the report's `Serialize`).

mod cleartext;
mod dns;
mod grade;
mod render;
mod report;
mod tls_port;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::Uri;
use rustls::pki_types::CertificateDer;

use crate::config::WELL_KNOWN_CLEARTEXT_PORTS;

pub use report::{
    parse_hsts, AddressReport, Answer, DnsRecordStatus, Grade, Hsts, Http3, PortReport,
    ProbeReport, TlsInfo, TlsReport,
};

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

/// Runs the whole audit.
pub async fn probe(o: &ProbeOptions) -> Result<ProbeReport, ProbeError> {
    let (host, tls_port, path) = parse_target(&o.target)?;
    let resolver = dns::resolver(o.dns)?;
    let addresses = dns::addresses(o, &host, resolver.as_ref()).await?;
    let https_record = dns::https_record(o, &host, resolver.as_ref()).await;
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
        grade::grade_address(r, has_https);
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
            cleartext::probe_cleartext(&o, &host, SocketAddr::new(ip, port), &path).await
        }));
    }
    for j in jobs {
        if let Ok(r) = j.await {
            cleartext.push(r);
        }
    }
    let tls = tls_port::probe_tls(o, host, SocketAddr::new(ip, tls_port), path).await;
    AddressReport {
        address: ip,
        cleartext,
        tls,
        grade: Grade::F,
        reasons: Vec::new(),
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
}
