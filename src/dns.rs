//! The authoritative DNS server: each site's name answers with its pool's addresses and an
//! HTTPS record (RFC 9460), so capable clients go straight to TLS; answers follow the live
//! config snapshot, and the SOA serial increases whenever they change.
//!
//! Zone data is built once per snapshot ([`Zones::build`]); a query is a few map lookups.
//! Every query, over UDP or TCP, goes through one pure function, [`respond`] (wire bytes in,
//! wire bytes out, hickory's parser and encoder), which nothing can make panic. The UDP and
//! TCP loops are our own: TCP accepts through [`crate::net::Acceptor`] (backing off when out
//! of descriptors) under [`crate::net::Limits`] caps, and every connection has a deadline per
//! message, so silent or flooding clients cannot take the descriptors the edge shares. Every
//! loop and connection ends on the shutdown token. This module never touches the data plane's
//! sockets.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hickory_proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::svcb::{Alpn, IpHint, SvcParamKey, SvcParamValue, SVCB};
use hickory_proto::rr::rdata::{A, AAAA, HTTPS, NS, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder, Queries};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{Config, DnsSettings, HostPattern};
use crate::net::{Acceptor, Limits};

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

    /// These zones with TXT records added (the DNS-01 challenges of ACME orders in progress),
    /// with a TTL of at most a minute. A name in no zone served here is skipped.
    pub fn with_txt(&self, txt: &[(String, String)]) -> Zones {
        let mut out = self.clone();
        let ttl = self.ttl.min(60);
        for (owner, value) in txt {
            let Ok(n) = name(owner) else { continue };
            let lower = LowerName::from(&n);
            let Some(zone) = out
                .zones
                .iter_mut()
                .filter(|z| z.origin.zone_of(&lower))
                .max_by_key(|z| z.origin.num_labels())
            else {
                continue;
            };
            let rdata = RData::TXT(hickory_proto::rr::rdata::TXT::new(vec![value.clone()]));
            zone.exact
                .entry(lower.clone())
                .or_default()
                .push(Record::from_rdata(n, ttl, rdata));
            // The name and every name between it and the apex exist from now on.
            let mut at = lower;
            while at != zone.origin && zone.existing.insert(at.clone()) {
                at = at.base_name();
            }
        }
        out
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
                RData::HTTPS(https_record(
                    &pool.addresses,
                    pool.redirect_port(),
                    site.http3,
                )),
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

/// `1 . alpn=h3,h2,http/1.1 [port=P] ipv4hint=… ipv6hint=…`: ServiceMode at the same name;
/// `h3` only for a site served over HTTP/3 (QUIC on the same port).
fn https_record(addresses: &[IpAddr], port: u16, h3: bool) -> HTTPS {
    let alpn = ["h3", "h2", "http/1.1"].into_iter().skip(usize::from(!h3));
    let mut params = vec![(
        SvcParamKey::Alpn,
        SvcParamValue::Alpn(Alpn(alpn.map(String::from).collect())),
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

    /// The answer to one wire query over `transport`, from the zones of the moment.
    pub fn respond(&self, transport: Transport, query: &[u8]) -> Option<Vec<u8>> {
        respond_over(transport, (self.zones)().as_deref(), query)
    }
}

/// How an answer travels, which decides its size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// At most the client's EDNS payload size (512 bytes without EDNS, RFC 1035 4.2.1);
    /// larger answers are truncated with TC set, so the client retries over TCP.
    Udp,
    /// Up to 65535 bytes, the most a 2-byte length prefix can frame (RFC 1035 4.2.2).
    Tcp,
}

/// The wire answer to the wire query `query` over TCP (no size limit but the framing's), or
/// `None` when it gets none. See [`respond_over`].
pub fn respond(zones: Option<&Zones>, query: &[u8]) -> Option<Vec<u8>> {
    respond_over(Transport::Tcp, zones, query)
}

/// The wire answer to the wire query `query` from `zones` (`None`: no zones, everything is
/// refused), the one answering path of both transports. `None` when nothing is to be sent:
/// fewer than 12 bytes (no header to answer), or a message that is itself a response (answering
/// those would make the server a reflector). Otherwise, in this order:
/// - a message that does not parse past its header: FORMERR, without EDNS;
/// - an opcode other than QUERY: NOTIMP;
/// - not exactly one question: FORMERR;
/// - EDNS version above 0: BADVERS;
/// - a name in no zone served here: REFUSED;
/// - no such name: authoritative NXDOMAIN with the zone's SOA in the authority section;
/// - else an authoritative answer (NODATA with the SOA when there is no record of the type).
///
/// A query with EDNS gets EDNS back, version 0, echoing its payload size (at least 512).
/// Never panics, whatever the bytes.
pub fn respond_over(transport: Transport, zones: Option<&Zones>, query: &[u8]) -> Option<Vec<u8>> {
    let header = Header::read(&mut BinDecoder::new(query)).ok()?;
    // The source address and protocol of a `Request` are not read here.
    let request = match Request::from_bytes(
        query.to_vec(),
        SocketAddr::from(([0, 0, 0, 0], 0)),
        Protocol::Udp,
    ) {
        Ok(request) => request,
        Err(e) => {
            tracing::debug!(id = header.metadata.id, error = %e, "malformed DNS query");
            // No question could be read: the answer echoes none.
            let queries = Queries::read(&mut BinDecoder::new(&[]), 0).ok()?;
            let builder = MessageResponseBuilder::new(&queries, None);
            return encode(
                builder.error_msg(&header.metadata, ResponseCode::FormErr),
                transport,
            );
        }
    };
    if request.metadata.message_type == MessageType::Response {
        return None;
    }
    let resp_edns = request.edns.as_ref().map(|e| {
        let mut r = Edns::new();
        r.set_max_payload(e.max_payload().max(512));
        r.set_version(0);
        r
    });
    let builder = MessageResponseBuilder::new(&request.queries, resp_edns.as_ref());
    if request.metadata.op_code != OpCode::Query {
        return encode(
            builder.error_msg(&request.metadata, ResponseCode::NotImp),
            transport,
        );
    }
    let Ok(info) = request.request_info() else {
        return encode(
            builder.error_msg(&request.metadata, ResponseCode::FormErr),
            transport,
        );
    };
    let query = info.query;
    if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return encode(
            builder.error_msg(&request.metadata, ResponseCode::BADVERS),
            transport,
        );
    }
    let answer = match zones {
        Some(z) => z.answer(query.name(), query.query_type()),
        None => Answer::Refused,
    };
    let mut metadata = Metadata::response_from_request(&request.metadata);
    match answer {
        Answer::Refused => encode(
            builder.error_msg(&request.metadata, ResponseCode::Refused),
            transport,
        ),
        Answer::NxDomain(soa) => {
            metadata.authoritative = true;
            metadata.response_code = ResponseCode::NXDomain;
            encode(
                builder.build(metadata, &[], &[], std::iter::once(&soa), &[]),
                transport,
            )
        }
        Answer::Records { answers, soa, ns } => {
            metadata.authoritative = true;
            encode(
                builder.build(metadata, &answers, &ns, soa.iter(), &[]),
                transport,
            )
        }
    }
}

/// Encodes `response` within the size limit of `transport` (hickory truncates and sets TC); an
/// answer that cannot be encoded becomes a bare SERVFAIL header, as hickory's server does.
fn encode<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    transport: Transport,
) -> Option<Vec<u8>> {
    let id = response.metadata().id;
    let max_size = match transport {
        Transport::Udp => response.edns().map_or(512, Edns::max_payload),
        Transport::Tcp => u16::MAX,
    };
    let mut bytes = Vec::with_capacity(512);
    let emitted = {
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(max_size);
        response.destructive_emit(&mut encoder)
    };
    if let Err(e) = emitted {
        tracing::warn!(id, error = %e, "DNS answer not encodable; SERVFAIL instead");
        bytes.clear();
        let mut metadata = Metadata::new(id, MessageType::Response, OpCode::Query);
        metadata.response_code = ResponseCode::ServFail;
        let header = Header {
            metadata,
            counts: HeaderCounts::default(),
        };
        header.emit(&mut BinEncoder::new(&mut bytes)).ok()?;
    }
    Some(bytes)
}

/// Bounds on DNS over TCP. [`TcpPolicy::default`] holds the values [`start`] uses; tests set
/// others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpPolicy {
    /// Connections open at once, from all clients ([`TCP_MAX_CONNECTIONS`]).
    pub max_connections: usize,
    /// Connections open at once from one client address ([`TCP_MAX_PER_CLIENT`]).
    pub max_per_client: usize,
    /// Time for a complete message, and for writing answers ([`TCP_MESSAGE_TIMEOUT`]).
    pub message_timeout: Duration,
    /// Answers held before they are written out ([`TCP_MAX_IN_FLIGHT`]).
    pub max_in_flight: usize,
}

/// The edge shares the process's descriptors with DNS, so silent connections must run into
/// this cap long before they run out of descriptors; 512 is far more than an authoritative
/// server's TCP traffic (truncated answers and a few zone checks) ever holds at once.
pub const TCP_MAX_CONNECTIONS: usize = 512;
/// Resolvers reuse one connection or a few (RFC 7766 6.2.1), so 16 is generous for one
/// address, and a single client can take at most 1/32 of [`TCP_MAX_CONNECTIONS`].
pub const TCP_MAX_PER_CLIENT: usize = 16;
/// A connection is closed when it has sent no complete message within this time of its accept
/// or of its last answer, however many bytes it trickles, and when an answer cannot be written
/// within it (a client that does not read). 5 s, as under hickory's listener before: RFC 7766
/// 6.2.3 asks for seconds, and a resolver retrying after TC asks at once.
pub const TCP_MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pipelined queries are answered up to this many at a time before the answers are written,
/// so a connection holds at most 16 answers (each at most 64 KiB, in practice a few hundred
/// bytes); the next ones wait unread in the socket, so a client that does not read its
/// answers stops the server reading its queries.
pub const TCP_MAX_IN_FLIGHT: usize = 16;
/// Largest UDP query read; longer datagrams are cut to it, as hickory's server did. A query is
/// one question (and perhaps an OPT record), well under this.
const UDP_RECEIVE_BUFFER: usize = 4096;
/// First pause after a failed UDP receive, doubled on each failure in a row up to
/// [`UDP_BACKOFF_MAX`], so a broken socket costs no CPU (as `net::Acceptor` does for TCP).
const UDP_BACKOFF_START: Duration = Duration::from_millis(10);
/// Longest pause: a failing socket is retried at least once a second.
const UDP_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl Default for TcpPolicy {
    fn default() -> TcpPolicy {
        TcpPolicy {
            max_connections: TCP_MAX_CONNECTIONS,
            max_per_client: TCP_MAX_PER_CLIENT,
            message_timeout: TCP_MESSAGE_TIMEOUT,
            max_in_flight: TCP_MAX_IN_FLIGHT,
        }
    }
}

/// Serves DNS on UDP and TCP at `addr` until `stop` is cancelled. Returns the TCP caps, whose
/// counters `/metrics` reports.
pub async fn start(
    addr: SocketAddr,
    handler: DnsHandler,
    stop: CancellationToken,
) -> Result<Arc<Limits>, DnsError> {
    let bind_err = |source| DnsError::Bind { addr, source };
    let udp = bind_udp(addr).map_err(bind_err)?;
    let tcp = TcpListener::bind(addr).await.map_err(bind_err)?;
    let limits = serve_sockets(udp, tcp, handler, TcpPolicy::default(), stop);
    tracing::info!(%addr, "serving DNS on UDP and TCP");
    Ok(limits)
}

/// Receive buffer asked for the UDP socket (the kernel caps it at `net.core.rmem_max`): a
/// burst of queries waits there while answers are written, instead of being dropped, as the
/// default of about 200 KiB did under dnsperf's load.
const UDP_SOCKET_RECEIVE_BUFFER: usize = 4 << 20;

/// A UDP socket bound to `addr` with a deep receive buffer.
fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    UdpSocket::from_std(crate::net::bind_udp(
        addr,
        false,
        UDP_SOCKET_RECEIVE_BUFFER,
    )?)
}

/// Serves DNS on the bound `udp` and `tcp` sockets until `stop` is cancelled: one receive
/// loop per runtime worker on UDP, and an accept loop on TCP bounded by `policy`. Every task
/// ends on `stop`; the TCP loop closes its listener, then waits for its connections. Returns
/// the TCP caps, whose counters say how many connections each cap refused. Call it within a
/// tokio runtime.
pub fn serve_sockets(
    udp: UdpSocket,
    tcp: TcpListener,
    handler: DnsHandler,
    policy: TcpPolicy,
    stop: CancellationToken,
) -> Arc<Limits> {
    let handler = Arc::new(handler);
    let udp = Arc::new(udp);
    // A loop per worker spreads UDP over the runtime as hickory's task per packet did, with
    // no task, and no unbounded queue, per packet.
    let workers = tokio::runtime::Handle::current()
        .metrics()
        .num_workers()
        .max(1);
    for _ in 0..workers {
        tokio::spawn(serve_udp(udp.clone(), handler.clone(), stop.clone()));
    }
    let limits = Limits::new(policy.max_connections, policy.max_per_client);
    tokio::spawn(serve_tcp(tcp, handler, policy, limits.clone(), stop));
    limits
}

/// Answers datagrams on `socket` until `stop`; answering is a few map lookups, done in place.
async fn serve_udp(socket: Arc<UdpSocket>, handler: Arc<DnsHandler>, stop: CancellationToken) {
    let mut buf = vec![0u8; UDP_RECEIVE_BUFFER];
    let mut backoff = UDP_BACKOFF_START;
    let mut cache = AnswerCache::new();
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => return,
            r = socket.recv_from(&mut buf) => r,
        };
        let (n, src) = match received {
            Ok(r) => {
                backoff = UDP_BACKOFF_START;
                r
            }
            Err(e) => {
                tracing::debug!(error = %e, "DNS UDP receive failed; backing off");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(UDP_BACKOFF_MAX);
                continue;
            }
        };
        if !answerable(src) {
            continue;
        }
        let Some(answer) = cache.respond(&handler, &buf[..n]) else {
            continue;
        };
        if let Err(e) = socket.send_to(answer, src).await {
            tracing::debug!(%src, error = %e, "DNS UDP answer not sent");
        }
    }
}

/// Answers already encoded, by query: an answer over UDP is a function of the zones and of
/// the query's bytes after its ID (the question as written, flags, EDNS), so the same query
/// gets the same bytes with its own ID. Each UDP loop keeps its own (no lock), emptied when the
/// zones change and when full, so a flood of distinct names costs memory only up to the cap.
struct AnswerCache {
    /// The zones the answers came from; held, so their address cannot be reused by others.
    zones: Option<Arc<Zones>>,
    /// Query bytes after the ID -> answer (whose first two bytes are overwritten).
    answers: HashMap<Box<[u8]>, Box<[u8]>, foldhash::fast::RandomState>,
    /// Bytes held by `answers`' keys and values.
    bytes: usize,
    /// The answer being sent, with the query's ID.
    out: Vec<u8>,
}

/// At most this many bytes of queries and answers per UDP loop: typical answers are a few
/// hundred bytes, so a few thousand names stay encoded.
const ANSWER_CACHE_BYTES: usize = 2 << 20;
/// Longer queries (large EDNS options) are answered without the cache.
const ANSWER_CACHE_QUERY_MAX: usize = 512;

impl AnswerCache {
    fn new() -> AnswerCache {
        AnswerCache {
            zones: None,
            answers: HashMap::default(),
            bytes: 0,
            out: Vec::with_capacity(512),
        }
    }

    /// The UDP answer to `query`, from the cache or encoded (and kept) now.
    fn respond(&mut self, handler: &DnsHandler, query: &[u8]) -> Option<&[u8]> {
        let zones = (handler.zones)();
        let same = match (&zones, &self.zones) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            self.answers.clear();
            self.bytes = 0;
            self.zones = zones;
        }
        if query.len() < 12 || query.len() > ANSWER_CACHE_QUERY_MAX {
            self.out = respond_over(Transport::Udp, self.zones.as_deref(), query)?;
            return Some(&self.out);
        }
        let key = &query[2..];
        self.out.clear();
        if let Some(answer) = self.answers.get(key) {
            self.out.extend_from_slice(&query[..2]);
            self.out.extend_from_slice(answer);
            return Some(&self.out);
        }
        let answer = respond_over(Transport::Udp, self.zones.as_deref(), query)?;
        let size = key.len() + answer.len();
        if self.bytes + size > ANSWER_CACHE_BYTES {
            self.answers.clear();
            self.bytes = 0;
        }
        if answer.len() >= 2 {
            self.answers.insert(key.into(), answer[2..].into());
            self.bytes += size;
        }
        self.out = answer;
        Some(&self.out)
    }
}

/// Whether an answer to `src` can go anywhere: not port 0, nor an unspecified or broadcast
/// address (spoofed sources, which hickory's server skipped too).
fn answerable(src: SocketAddr) -> bool {
    let ip = src.ip().to_canonical();
    src.port() != 0 && !ip.is_unspecified() && !matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

/// Accepts DNS-over-TCP connections until `stop`, then waits for them to end. A connection
/// over a cap of `limits` is accepted and closed at once (and counted there), so the client
/// learns at once instead of waiting in the backlog.
async fn serve_tcp(
    listener: TcpListener,
    handler: Arc<DnsHandler>,
    policy: TcpPolicy,
    limits: Arc<Limits>,
    stop: CancellationToken,
) {
    let mut acceptor = Acceptor::new(listener, "dns");
    let tracker = TaskTracker::new();
    while let Some((stream, peer)) = acceptor.accept(&stop).await {
        let permit = match limits.admit(peer.ip()) {
            Ok(p) => p,
            Err(cap) => {
                tracing::debug!(
                    client = %peer,
                    ?cap,
                    refused_global = limits.refused_global.load(Ordering::Relaxed),
                    refused_per_client = limits.refused_per_client.load(Ordering::Relaxed),
                    "DNS TCP connection refused"
                );
                drop(stream);
                continue;
            }
        };
        let (handler, stop) = (handler.clone(), stop.clone());
        let span = tracing::debug_span!("dns_tcp", client = %peer);
        tracker.spawn(
            async move {
                let _permit = permit;
                if let Err(end) = serve_tcp_connection(stream, &handler, policy, &stop).await {
                    tracing::debug!(%end, "DNS TCP connection closed");
                }
            }
            .instrument(span),
        );
    }
    // No new connections from here on: the listener closes before the connections drain.
    drop(acceptor);
    tracker.close();
    tracker.wait().await;
    tracing::debug!("DNS over TCP stopped");
}

/// Why the server closed a DNS-over-TCP connection (other than the client closing it).
#[derive(Debug, thiserror::Error)]
enum TcpEnd {
    #[error("no complete message in time")]
    Idle,
    #[error("answers not written in time")]
    WriteStalled,
    #[error("a message of length 0")]
    EmptyMessage,
    #[error("a message without an answer (shorter than a header, or a response)")]
    Unanswerable,
    #[error("shutting down")]
    Shutdown,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads length-prefixed messages (RFC 1035 4.2.2, RFC 7766 8) from `stream` and writes their
/// answers in order, until the client closes (`Ok`) or the server does (`Err`, the reason).
async fn serve_tcp_connection(
    mut stream: TcpStream,
    handler: &DnsHandler,
    policy: TcpPolicy,
    stop: &CancellationToken,
) -> Result<(), TcpEnd> {
    let mut input = BytesMut::with_capacity(512);
    let mut output: Vec<u8> = Vec::new();
    let mut deadline = Instant::now() + policy.message_timeout;
    loop {
        let mut closing = None;
        let mut answered = 0;
        while answered < policy.max_in_flight.max(1) {
            let Some(len) = input
                .get(..2)
                .map(|p| usize::from(u16::from_be_bytes([p[0], p[1]])))
            else {
                break;
            };
            if len == 0 {
                closing = Some(TcpEnd::EmptyMessage);
                break;
            }
            if input.len() < 2 + len {
                break;
            }
            let message = input.split_to(2 + len);
            let Some(answer) = handler.respond(Transport::Tcp, &message[2..]) else {
                closing = Some(TcpEnd::Unanswerable);
                break;
            };
            // Encoded for TCP, an answer fits the 2-byte prefix; one that did not would be
            // an encoder bug, and gets no answer rather than a wrong frame.
            let Ok(prefix) = u16::try_from(answer.len()) else {
                closing = Some(TcpEnd::Unanswerable);
                break;
            };
            output.extend_from_slice(&prefix.to_be_bytes());
            output.extend_from_slice(&answer);
            answered += 1;
        }
        if !output.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return Err(TcpEnd::Shutdown),
                written = tokio::time::timeout(policy.message_timeout, stream.write_all(&output)) => {
                    written.map_err(|_| TcpEnd::WriteStalled)??;
                }
            }
            output.clear();
            deadline = Instant::now() + policy.message_timeout;
        }
        if let Some(end) = closing {
            return Err(end);
        }
        if answered > 0 {
            // More complete messages may be waiting in `input`.
            continue;
        }
        // Room for the rest of the message being read, or for a typical next one.
        let wanted = match input.get(..2) {
            Some(p) => {
                (2 + usize::from(u16::from_be_bytes([p[0], p[1]]))).saturating_sub(input.len())
            }
            None => 512,
        };
        input.reserve(wanted);
        let read = tokio::select! {
            _ = stop.cancelled() => return Err(TcpEnd::Shutdown),
            r = tokio::time::timeout_at(deadline, stream.read_buf(&mut input)) => r,
        };
        if read.map_err(|_| TcpEnd::Idle)?? == 0 {
            return Ok(());
        }
    }
}

/// The zone file of `zone` for `config`, as `portcullis dns export` prints it.
pub fn export(config: &Config, zone: &str) -> Result<String, DnsError> {
    let zones =
        Zones::build(config, None, crate::clock::now() as u32)?.ok_or(DnsError::NotConfigured)?;
    zones.export(zone)
}

/// `portcullis dns serve`: DNS only, without the edge (for a separate DNS host, or
/// benchmarks). SIGHUP reloads the file; SIGTERM or SIGINT stops.
pub async fn serve_only(path: std::path::PathBuf) -> Result<(), DnsServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let config = Config::from_file(&path)?;
    let settings = config.dns.clone().ok_or(DnsError::NotConfigured)?;
    let zones = Zones::build(&config, None, crate::clock::now() as u32)?.map(Arc::new);
    let live = Arc::new(arc_swap::ArcSwapOption::new(zones));
    let source = live.clone();
    let handler = DnsHandler::new(Arc::new(move || source.load_full()));
    let stop = CancellationToken::new();
    let mut hup = signal(SignalKind::hangup()).map_err(DnsServeError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(DnsServeError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DnsServeError::Signals)?;
    start(settings.listen, handler, stop.clone()).await?;
    loop {
        tokio::select! {
            _ = hup.recv() => match Config::from_file(&path) {
                Err(e) => tracing::error!("reload rejected, previous zones kept: {e}"),
                Ok(c) => match Zones::build(&c, live.load().as_deref(), crate::clock::now() as u32) {
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
