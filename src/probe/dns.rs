//! The probe's DNS side: which addresses to audit (the `--resolve` overrides, an IP literal,
//! or A/AAAA lookups) and whether the host publishes an HTTPS (RFC 9460) record.
//!
//! It only asks the resolver it is given (`--dns`, else the system's); it never connects to
//! the audited host and never decides a grade.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::TokioResolver;

use super::report::DnsRecordStatus;
use super::{ProbeError, ProbeOptions};

/// The resolver to ask: the `--dns` server, else the system's (none if it cannot be read).
pub(super) fn resolver(dns: Option<SocketAddr>) -> Result<Option<TokioResolver>, ProbeError> {
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

/// The addresses to audit: the `--resolve` overrides for `host` if any, else `host` itself
/// if it is an IP address, else its A and AAAA records.
pub(super) async fn addresses(
    o: &ProbeOptions,
    host: &str,
    resolver: Option<&TokioResolver>,
) -> Result<Vec<IpAddr>, ProbeError> {
    let overridden: Vec<IpAddr> = o
        .resolve
        .iter()
        .filter(|(h, _)| *h == host)
        .map(|(_, ip)| *ip)
        .collect();
    if !overridden.is_empty() {
        return Ok(overridden);
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let r = resolver.ok_or_else(|| ProbeError::NoAddress {
        host: host.to_owned(),
        reason: "no DNS resolver available (give --resolve or --dns)".into(),
    })?;
    let found = r.lookup_ip(host).await.map_err(|e| ProbeError::NoAddress {
        host: host.to_owned(),
        reason: e.to_string(),
    })?;
    let ips: Vec<IpAddr> = found.iter().collect();
    if ips.is_empty() {
        return Err(ProbeError::NoAddress {
            host: host.to_owned(),
            reason: "no A or AAAA records".into(),
        });
    }
    Ok(ips)
}

/// Whether `host` publishes an HTTPS record; not asked when `--resolve` is given without
/// `--dns`.
pub(super) async fn https_record(
    o: &ProbeOptions,
    host: &str,
    resolver: Option<&TokioResolver>,
) -> DnsRecordStatus {
    match (resolver, o.dns.is_none() && !o.resolve.is_empty()) {
        (_, true) => DnsRecordStatus::NotChecked {
            why: "--resolve given without --dns".into(),
        },
        (None, _) => DnsRecordStatus::NotChecked {
            why: "no DNS resolver available".into(),
        },
        (Some(r), false) => match r.lookup(host, hickory_proto::rr::RecordType::HTTPS).await {
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
    }
}
