//! What a probe finds: the report types, serialised as the `--json` output, and the reading
//! of a `Strict-Transport-Security` value.
//!
//! Data and pure functions only: nothing here connects anywhere, and the grading is `grade`'s.

use std::net::IpAddr;

use serde::Serialize;

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
    pub(super) fn describe(&self) -> String {
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
    /// The `Alt-Svc` header of the HTTPS answer, if any.
    pub alt_svc: Option<String>,
    /// Whether a QUIC handshake offering `h3` succeeds on the TLS port (UDP).
    pub http3: Http3,
}

/// HTTP/3 on the TLS port's number, over UDP.
#[derive(Debug, Clone, Serialize)]
pub struct Http3 {
    /// A QUIC handshake negotiated `h3` and a GET was answered.
    pub offered: bool,
    /// The GET's status.
    pub status: Option<u16>,
    /// Why not, when it did not.
    pub error: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsts_preload_requirements() {
        let h = parse_hsts("max-age=63072000; includeSubDomains; preload");
        assert!(h.preload_missing.is_empty());
        let h = parse_hsts("max-age=300");
        assert_eq!(h.preload_missing.len(), 3);
    }
}
