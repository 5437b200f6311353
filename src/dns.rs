//! The authoritative DNS server: each site's name answers with its pool's addresses and an
//! HTTPS record (RFC 9460), so capable clients go straight to TLS; answers follow the live
//! config snapshot, and the SOA serial increases whenever they change.
//!
//! Zone data is built once per snapshot ([`Zones::build`]); a query is a few map lookups.
//! Malformed packets are rejected by hickory's parser before they reach this module, and
//! nothing here can panic on a query. This module never touches the data plane's sockets.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::svcb::{Alpn, IpHint, SvcParamKey, SvcParamValue, SVCB};
use hickory_proto::rr::rdata::{A, AAAA, HTTPS, NS, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};

use crate::config::{Config, DnsSettings, HostPattern};
use crate::edge::EdgeView;

/// Why the DNS server could not start or a zone could not be exported.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    #[error("DNS listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0:?} is not a zone in [dns] zones ({1})")]
    UnknownZone(String, String),
    #[error("the config has no [dns] section")]
    NotConfigured,
    #[error("name {name:?}: {reason}")]
    Name { name: String, reason: String },
}

/// Every zone's records for one snapshot.
#[derive(Debug, Clone)]
pub struct Zones {
    zones: Vec<Zone>,
    /// SOA serial of this generation of answers.
    pub serial: u32,
    /// Digest of every record but the SOA, to tell whether answers changed.
    digest: u64,
    ttl: u32,
}

#[derive(Debug, Clone)]
struct Zone {
    origin: LowerName,
    soa: Record,
    ns: Vec<Record>,
    /// Records by owner name (exact names, the apex and in-zone nameservers).
    exact: HashMap<LowerName, Vec<Record>>,
    /// Records of `*.SUFFIX` sites by suffix; the owner name is set per query.
    wildcard: HashMap<LowerName, Vec<Record>>,
    /// Every name that exists, including empty non-terminals, for NXDOMAIN versus NODATA.
    existing: HashSet<LowerName>,
}

/// What a query gets.
#[derive(Debug)]
pub enum Answer {
    /// The name is in no zone served here.
    Refused,
    /// No such name in the zone; the SOA goes in the authority section.
    NxDomain(Record),
    /// The name exists, with records of the asked type (possibly none: NODATA, with the SOA).
    Records {
        answers: Vec<Record>,
        soa: Option<Record>,
        ns: Vec<Record>,
    },
}

fn name(s: &str) -> Result<Name, DnsError> {
    Name::from_ascii(format!("{}.", s.trim_end_matches('.'))).map_err(|e| DnsError::Name {
        name: s.to_owned(),
        reason: e.to_string(),
    })
}

impl Zones {
    /// Builds the zones of `config`; the serial follows `previous` (increasing only when the
    /// answers changed) or starts from `now`.
    pub fn build(
        config: &Config,
        previous: Option<&Zones>,
        now: u32,
    ) -> Result<Option<Zones>, DnsError> {
        let Some(dns) = &config.dns else {
            return Ok(None);
        };
        let mut zones = Vec::new();
        for z in &dns.zones {
            zones.push(Zone::build(z, dns, config)?);
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        dns.ttl.hash(&mut h);
        for z in &zones {
            let mut lines: Vec<String> = z
                .exact
                .values()
                .chain(z.wildcard.values())
                .flatten()
                .chain(&z.ns)
                .map(|r| r.to_string())
                .collect();
            lines.extend(z.wildcard.keys().map(|k| format!("*.{k}")));
            lines.sort();
            lines.hash(&mut h);
        }
        let digest = h.finish();
        let serial = match previous {
            Some(p) if p.digest == digest => p.serial,
            Some(p) => p.serial.wrapping_add(1).max(now),
            None => now,
        };
        let mut out = Zones {
            zones,
            serial,
            digest,
            ttl: dns.ttl,
        };
        for z in &mut out.zones {
            if let RData::SOA(soa) = &mut z.soa.data {
                soa.serial = serial;
            }
        }
        Ok(Some(out))
    }

    /// The answer to one question.
    pub fn answer(&self, qname: &LowerName, qtype: RecordType) -> Answer {
        let Some(zone) = self
            .zones
            .iter()
            .filter(|z| z.origin.zone_of(qname))
            .max_by_key(|z| z.origin.num_labels())
        else {
            return Answer::Refused;
        };
        let owned: Vec<Record>;
        let records: &[Record] = if let Some(r) = zone.exact.get(qname) {
            r
        } else if let Some(r) = zone
            .wildcard
            .get(&qname.base_name())
            .filter(|_| !zone.existing.contains(qname))
        {
            // One label under a wildcard site's suffix, as the edge's wildcard matching does.
            let owner = Name::from(qname);
            owned = r
                .iter()
                .map(|rec| {
                    let mut rec = rec.clone();
                    rec.name = owner.clone();
                    rec
                })
                .collect();
            &owned
        } else if zone.existing.contains(qname) {
            &[]
        } else {
            return Answer::NxDomain(zone.soa.clone());
        };
        let mut answers: Vec<Record> = records
            .iter()
            .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
            .cloned()
            .collect();
        let at_apex = *qname == zone.origin;
        if at_apex && matches!(qtype, RecordType::SOA | RecordType::ANY) {
            answers.push(zone.soa.clone());
        }
        if at_apex && matches!(qtype, RecordType::NS | RecordType::ANY) {
            answers.extend(zone.ns.iter().cloned());
        }
        let soa = answers.is_empty().then(|| zone.soa.clone());
        let ns = if answers.is_empty() {
            Vec::new()
        } else {
            zone.ns.clone()
        };
        Answer::Records { answers, soa, ns }
    }

    /// The zone as an RFC 1035 master file (HTTPS records in RFC 9460 presentation format).
    pub fn export(&self, zone: &str) -> Result<String, DnsError> {
        let wanted = LowerName::from(name(zone)?);
        let z = self
            .zones
            .iter()
            .find(|z| z.origin == wanted)
            .ok_or_else(|| {
                let names: Vec<String> = self.zones.iter().map(|z| z.origin.to_string()).collect();
                DnsError::UnknownZone(zone.to_owned(), names.join(", "))
            })?;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "; zone {} exported by portcullis, serial {}",
            z.origin, self.serial
        );
        let _ = writeln!(o, "$ORIGIN {}", z.origin);
        let _ = writeln!(o, "$TTL {}", self.ttl);
        let _ = writeln!(o, "{}", z.soa);
        for r in &z.ns {
            let _ = writeln!(o, "{r}");
        }
        let mut names: Vec<&LowerName> = z.exact.keys().collect();
        names.sort_by_key(|n| n.to_string());
        for n in names {
            for r in &z.exact[n] {
                let _ = writeln!(o, "{}", presentation(r, &r.name.to_string()));
            }
        }
        let mut suffixes: Vec<&LowerName> = z.wildcard.keys().collect();
        suffixes.sort_by_key(|n| n.to_string());
        for s in suffixes {
            for r in &z.wildcard[s] {
                let _ = writeln!(o, "{}", presentation(r, &format!("*.{s}")));
            }
        }
        Ok(o)
    }
}

impl Zone {
    fn build(zone: &str, dns: &DnsSettings, config: &Config) -> Result<Zone, DnsError> {
        let origin = name(zone)?;
        let ttl = dns.ttl;
        let ns_names: Vec<Name> = if dns.nameservers.is_empty() {
            vec![name(&format!("ns1.{zone}"))?]
        } else {
            dns.nameservers
                .iter()
                .map(|n| name(n))
                .collect::<Result<_, _>>()?
        };
        let hostmaster = match &dns.hostmaster {
            Some(h) => name(h)?,
            None => name(&format!("hostmaster.{zone}"))?,
        };
        let soa = Record::from_rdata(
            origin.clone(),
            ttl,
            // Refresh, retry, expire as common for small zones; the negative-cache TTL is the
            // answer TTL, so a new site becomes visible as fast as a changed one.
            RData::SOA(SOA::new(
                ns_names[0].clone(),
                hostmaster,
                0,
                3600,
                600,
                604_800,
                ttl,
            )),
        );
        let ns: Vec<Record> = ns_names
            .iter()
            .map(|n| Record::from_rdata(origin.clone(), ttl, RData::NS(NS(n.clone()))))
            .collect();
        let mut z = Zone {
            origin: LowerName::from(origin.clone()),
            soa,
            ns,
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            existing: HashSet::new(),
        };
        z.existing.insert(z.origin.clone());
        // In-zone nameservers get glue from the listen address when it is a real one.
        for n in &ns_names {
            if origin.zone_of(n) && !dns.listen.ip().is_unspecified() {
                let rec = address_record(n.clone(), ttl, dns.listen.ip());
                z.add(LowerName::from(n.clone()), vec![rec]);
            }
        }
        for site in &config.sites {
            let (pattern, suffix) = match &site.host {
                HostPattern::Exact(h) => (h.as_str(), None),
                HostPattern::Wildcard(s) => (s.as_str(), Some(())),
            };
            let owner = name(pattern)?;
            if !origin.zone_of(&owner) {
                continue;
            }
            let pool = &config.pools[site.pool];
            let mut records: Vec<Record> = pool
                .addresses
                .iter()
                .filter(|a| !a.is_unspecified())
                .map(|a| address_record(owner.clone(), ttl, *a))
                .collect();
            records.push(Record::from_rdata(
                owner.clone(),
                ttl,
                RData::HTTPS(https_record(&pool.addresses, pool.redirect_port())),
            ));
            match suffix {
                None => z.add(LowerName::from(owner), records),
                Some(()) => {
                    // The suffix of `*.SUFFIX` exists as a name (an empty non-terminal).
                    let lower = LowerName::from(owner);
                    z.mark_ancestors(&lower);
                    z.existing.insert(lower.clone());
                    z.wildcard.insert(lower, records);
                }
            }
        }
        Ok(z)
    }

    fn add(&mut self, owner: LowerName, records: Vec<Record>) {
        self.mark_ancestors(&owner);
        self.existing.insert(owner.clone());
        self.exact.entry(owner).or_default().extend(records);
    }

    /// Marks every name between `owner` and the apex as existing (empty non-terminals).
    fn mark_ancestors(&mut self, owner: &LowerName) {
        let mut n = owner.base_name();
        while self.origin.zone_of(&n) && n != self.origin {
            self.existing.insert(n.clone());
            n = n.base_name();
        }
    }
}

/// A record in master-file syntax. HTTPS records are written here in RFC 9460 presentation
/// format (hickory's own Display is not accepted by BIND or Knot).
fn presentation(r: &Record, owner: &str) -> String {
    let RData::HTTPS(HTTPS(svcb)) = &r.data else {
        let text = r.to_string();
        // Replace the owner (first field) so wildcard records carry their `*.` label.
        return match text.split_once(' ') {
            Some((_, rest)) => format!("{owner} {rest}"),
            None => text,
        };
    };
    format!("{owner} {} IN HTTPS {}", r.ttl, svcb_text(svcb))
}

/// An SVCB/HTTPS record's data in RFC 9460 presentation format.
pub fn svcb_text(svcb: &SVCB) -> String {
    let mut out = format!("{} {}", svcb.svc_priority, svcb.target_name);
    for (key, value) in &svcb.svc_params {
        let text = match value {
            SvcParamValue::Alpn(Alpn(ids)) => format!("alpn=\"{}\"", ids.join(",")),
            SvcParamValue::Port(p) => format!("port={p}"),
            SvcParamValue::Ipv4Hint(IpHint(ips)) => {
                format!(
                    "ipv4hint={}",
                    ips.iter()
                        .map(|a| a.0.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
            SvcParamValue::Ipv6Hint(IpHint(ips)) => {
                format!(
                    "ipv6hint={}",
                    ips.iter()
                        .map(|a| a.0.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
            other => format!("{key}={other}"),
        };
        out.push(' ');
        out.push_str(&text);
    }
    out
}

fn address_record(owner: Name, ttl: u32, ip: IpAddr) -> Record {
    match ip {
        IpAddr::V4(v4) => Record::from_rdata(owner, ttl, RData::A(A(v4))),
        IpAddr::V6(v6) => Record::from_rdata(owner, ttl, RData::AAAA(AAAA(v6))),
    }
}

/// `1 . alpn=h2,http/1.1 [port=P] ipv4hint=… ipv6hint=…`: ServiceMode at the same name.
fn https_record(addresses: &[IpAddr], port: u16) -> HTTPS {
    let mut params = vec![(
        SvcParamKey::Alpn,
        SvcParamValue::Alpn(Alpn(vec!["h2".into(), "http/1.1".into()])),
    )];
    if port != 443 {
        params.push((SvcParamKey::Port, SvcParamValue::Port(port)));
    }
    let v4: Vec<A> = addresses
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(v) if !v.is_unspecified() => Some(A(*v)),
            _ => None,
        })
        .collect();
    let v6: Vec<AAAA> = addresses
        .iter()
        .filter_map(|a| match a {
            IpAddr::V6(v) if !v.is_unspecified() => Some(AAAA(*v)),
            _ => None,
        })
        .collect();
    if !v4.is_empty() {
        params.push((SvcParamKey::Ipv4Hint, SvcParamValue::Ipv4Hint(IpHint(v4))));
    }
    if !v6.is_empty() {
        params.push((SvcParamKey::Ipv6Hint, SvcParamValue::Ipv6Hint(IpHint(v6))));
    }
    HTTPS(SVCB::new(1, Name::root(), params))
}

/// Where the handler finds the zones of the moment.
pub type ZoneSource = Arc<dyn Fn() -> Option<Arc<Zones>> + Send + Sync>;

/// Answers queries from the live zones.
pub struct DnsHandler {
    zones: ZoneSource,
}

impl DnsHandler {
    pub fn new(zones: ZoneSource) -> DnsHandler {
        DnsHandler { zones }
    }

    /// Zones from the edge's live snapshot.
    pub fn for_edge(edge: EdgeView) -> DnsHandler {
        DnsHandler::new(Arc::new(move || edge.snapshot().dns.clone()))
    }
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let resp_edns = request.edns.as_ref().map(|e| {
            let mut r = Edns::new();
            r.set_max_payload(e.max_payload().max(512));
            r.set_version(0);
            r
        });
        let builder = MessageResponseBuilder::new(&request.queries, resp_edns.as_ref());
        let mut metadata = Metadata::response_from_request(&request.metadata);
        let refusal = match (request.metadata.message_type, request.metadata.op_code) {
            (MessageType::Query, OpCode::Query) => None,
            (MessageType::Query, _) => Some(ResponseCode::NotImp),
            (MessageType::Response, _) => Some(ResponseCode::FormErr),
        };
        let query = match (refusal, request.request_info()) {
            (None, Ok(info)) => info.query,
            (Some(code), _) => {
                return send(response_handle, builder.error_msg(&request.metadata, code)).await
            }
            (None, Err(_)) => {
                return send(
                    response_handle,
                    builder.error_msg(&request.metadata, ResponseCode::FormErr),
                )
                .await
            }
        };
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return send(
                response_handle,
                builder.error_msg(&request.metadata, ResponseCode::BADVERS),
            )
            .await;
        }
        let answer = match (self.zones)() {
            Some(z) => z.answer(query.name(), query.query_type()),
            None => Answer::Refused,
        };
        match answer {
            Answer::Refused => {
                send(
                    response_handle,
                    builder.error_msg(&request.metadata, ResponseCode::Refused),
                )
                .await
            }
            Answer::NxDomain(soa) => {
                metadata.authoritative = true;
                metadata.response_code = ResponseCode::NXDomain;
                let resp = builder.build(metadata, &[], &[], std::iter::once(&soa), &[]);
                let _ = &mut response_handle;
                send(response_handle, resp).await
            }
            Answer::Records { answers, soa, ns } => {
                metadata.authoritative = true;
                let resp = builder.build(metadata, &answers, &ns, soa.iter(), &[]);
                send(response_handle, resp).await
            }
        }
    }
}

async fn send<'a, R: ResponseHandler>(
    mut handle: R,
    response: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> ResponseInfo {
    let id = response.metadata().id;
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "DNS response not sent");
            let mut metadata = Metadata::new(id, MessageType::Response, OpCode::Query);
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        }
    }
}

/// Serves DNS on UDP and TCP at `addr` until the edge shuts down.
pub async fn start(
    addr: SocketAddr,
    handler: DnsHandler,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), DnsError> {
    let bind_err = |source| DnsError::Bind { addr, source };
    let udp = UdpSocket::bind(addr).await.map_err(bind_err)?;
    let tcp = TcpListener::bind(addr).await.map_err(bind_err)?;
    let mut server = hickory_server::Server::new(handler);
    server.register_socket(udp);
    // A TCP client has 5 s per message; responses queue up to 64 deep per connection.
    server.register_listener(tcp, std::time::Duration::from_secs(5), 64);
    tracing::info!(%addr, "serving DNS on UDP and TCP");
    tokio::spawn(async move {
        stop.cancelled().await;
        let _ = server.shutdown_gracefully().await;
    });
    Ok(())
}

/// The zone file of `zone` for `config`, as `portcullis dns export` prints it.
pub fn export(config: &Config, zone: &str) -> Result<String, DnsError> {
    let zones = Zones::build(config, None, crate::analytics::now() as u32)?
        .ok_or(DnsError::NotConfigured)?;
    zones.export(zone)
}

/// Shared by snapshots: the zones of the live config.
pub type LiveZones = Option<Arc<Zones>>;

/// `portcullis dns serve`: DNS only, without the edge (for a separate DNS host, or
/// benchmarks). SIGHUP reloads the file; SIGTERM or SIGINT stops.
pub async fn serve_only(path: std::path::PathBuf) -> Result<(), DnsServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let config = Config::from_file(&path)?;
    let settings = config.dns.clone().ok_or(DnsError::NotConfigured)?;
    let zones = Zones::build(&config, None, crate::analytics::now() as u32)?.map(Arc::new);
    let live = Arc::new(arc_swap::ArcSwapOption::new(zones));
    let source = live.clone();
    let handler = DnsHandler::new(Arc::new(move || source.load_full()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut hup = signal(SignalKind::hangup()).map_err(DnsServeError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(DnsServeError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DnsServeError::Signals)?;
    start(settings.listen, handler, stop.clone()).await?;
    loop {
        tokio::select! {
            _ = hup.recv() => match Config::from_file(&path) {
                Err(e) => tracing::error!("reload rejected, previous zones kept: {e}"),
                Ok(c) => match Zones::build(&c, live.load().as_deref(), crate::analytics::now() as u32) {
                    Ok(z) => {
                        live.store(z.map(Arc::new));
                        tracing::info!("zones reloaded");
                    }
                    Err(e) => tracing::error!("reload rejected, previous zones kept: {e}"),
                },
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    stop.cancel();
    Ok(())
}

/// Why `dns serve` stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsServeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}
