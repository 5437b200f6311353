//! The config file: its schema, the validation of every invariant that can be checked before
//! anything binds, and the resulting immutable [`Config`].
//!
//! Raw serde structs (unknown keys rejected) convert into validated types; every problem found is
//! collected, so `portcullis check` prints all of them at once, each naming the file, the key and
//! the offending value. This module must never bind a socket or start a task: a config that
//! passes here is only a description, the edge turns it into listeners.
//!
//! Layout: `raw` is the schema as written, `validate` turns it into the types of this file
//! (collecting [`Problem`]s), `positions` says where credentials may appear. This file holds
//! the validated types, the errors, the admin overrides merged into the text before
//! validation, and the entry points ([`Config::from_file`], [`Config::from_toml`]). Config is
//! data: it imports nothing else of this crate, and never binds, starts a task or opens a
//! certificate (files are named, as [`CertFiles`] and [`FileRef`], for the TLS layer to open).

pub mod positions;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use serde::Deserialize;

use raw::{RawConfig, RawHsts, RawSite};
use validate::Validator;

/// HSTS max-age used when a site does not set one: one year, as the preload list asks.
pub const DEFAULT_HSTS_MAX_AGE: u64 = 31_536_000;

/// Why a config could not be loaded. Each variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{path}: cannot read config: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The text is not valid TOML, or does not fit the schema (unknown key, wrong type).
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// The file parsed, but breaks one or more rules; every problem is listed.
    #[error("{}", format_problems(path, problems))]
    Invalid {
        path: String,
        problems: Vec<Problem>,
        /// The certificate and CA files the text names, so the TLS layer can add its own
        /// problems to these in the same report.
        files: Vec<FileRef>,
    },
}

impl ConfigError {
    /// Every problem as its own line, for `portcullis check`.
    pub fn lines(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid { path, problems, .. } => {
                problems.iter().map(|p| format!("{path}: {p}")).collect()
            }
            other => vec![other.to_string()],
        }
    }
}

fn format_problems(path: &str, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(|p| format!("{path}: {p}")).collect();
    format!("{} problem(s):\n{}", problems.len(), lines.join("\n"))
}

/// A certificate chain and its private key, as PEM files. Only the TLS layer opens them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A file the config names whose content only the TLS layer can judge, with the key it was
/// given under, so its problems are reported like the validator's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileRef {
    /// A certificate and its key, at `{at}.cert`; `covers`: the site host it must be valid for.
    CertKey {
        at: String,
        files: CertFiles,
        covers: Option<HostPattern>,
    },
    /// A PEM bundle of extra trust anchors, at key `key`.
    Roots { key: String, path: PathBuf },
}

/// One broken rule: where (`key`), what was there (`value`) and why it is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path to the key, such as `site[1].pool` (with the site's host when known).
    pub key: String,
    /// The offending value as written, quoted when it is a string.
    pub value: String,
    /// What is wrong and, where it helps, what to do.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.key, self.value, self.message)
    }
}

/// Changes made through the admin API, kept in `STATE/overrides.json` and applied on top of
/// the file at every load, before validation: the file stays as the operator wrote it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteOverride {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cleartext: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hsts: Option<HstsOverride>,
}

/// An HSTS change from the admin API.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HstsOverride {
    pub enabled: Option<bool>,
    pub max_age: Option<i64>,
    pub include_subdomains: Option<bool>,
    pub preload: Option<bool>,
}

/// Overrides by site host (as configured).
pub type Overrides = std::collections::BTreeMap<String, SiteOverride>;

/// The state directory when `[state] dir` is not set.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/portcullis";

/// The validated configuration. Immutable once built; reloads build a new one.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where generated keys and development certificates live.
    pub state_dir: PathBuf,
    /// Timeouts and limits of the data plane.
    pub edge: EdgeSettings,
    /// Address pools, in file order.
    pub pools: Vec<Pool>,
    /// Sites, in file order; `Site::pool` indexes `pools`.
    pub sites: Vec<Site>,
    /// Traffic analytics and credential exposure (`[analytics]`).
    pub analytics: AnalyticsSettings,
    /// When a site counts as ready to close cleartext (`[readiness]`).
    pub readiness: Readiness,
    /// The Prometheus endpoint (`[metrics]`), HTTPS only; `None` when not configured.
    pub metrics: Option<MetricsSettings>,
    /// The authoritative DNS server (`[dns]`); `None` when not configured.
    pub dns: Option<DnsSettings>,
    /// The admin plane (`[admin]`), HTTPS only; `None` when not configured.
    pub admin: Option<AdminSettings>,
    /// Delivery and abuse limits of exposure events (`[exposure]`).
    pub exposure: ExposureSettings,
    /// `[firewall] manage = true`: `serve` keeps the nftables table in sync and counts refusals.
    pub manage_firewall: bool,
    /// `[acme]`, for sites with `cert = "acme"`.
    pub acme: Option<AcmeSettings>,
    /// `[store]`: a shared PostgreSQL store; `None`: the embedded SQLite store in `state_dir`.
    pub store: Option<StoreSettings>,
    /// `[node] name`; `None`: the host name.
    pub node: Option<String>,
    /// Every certificate and CA file named above, for the TLS layer to open and check.
    pub files: Vec<FileRef>,
}

/// `[admin]`: the HTTPS-only admin API.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    /// Certificate and key; absent: issued by the development CA for the listen address.
    pub cert: Option<CertFiles>,
    /// SHA-256 (hex) of a second token that may only read.
    pub read_only_token_sha256: Option<String>,
}

/// `[dns]`: the built-in authoritative server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// UDP and TCP address.
    pub listen: SocketAddr,
    /// Zones served, lowercase, without trailing dot.
    pub zones: Vec<String>,
    /// TTL of every answer, seconds.
    pub ttl: u32,
    /// NS names published for every zone; default `ns1.ZONE`.
    pub nameservers: Vec<String>,
    /// SOA responsible mailbox as a name; default `hostmaster.ZONE`.
    pub hostmaster: Option<String>,
}

/// `[store]`: the PostgreSQL database a fleet of nodes shares.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// `postgres://user:password@host:port/db?sslmode=require`: may hold a password, so it is
    /// never printed (see the `Debug` impl).
    pub url: String,
    /// Connections kept open to the database.
    pub pool_size: usize,
    /// Extra trust anchors (PEM) for the database server's certificate.
    pub ca: Option<PathBuf>,
    /// How often each node reads the store's policy generation, whatever LISTEN/NOTIFY says:
    /// the longest a change takes to arrive when a notification was lost.
    pub poll_interval: std::time::Duration,
}

impl fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreSettings")
            .field("url", &"<configured>")
            .field("pool_size", &self.pool_size)
            .field("ca", &self.ca)
            .field("poll_interval", &self.poll_interval)
            .finish()
    }
}

/// `[acme]`: the CA that issues certificates for `cert = "acme"` sites (RFC 8555).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSettings {
    /// The directory URL, `https://` only.
    pub directory: String,
    /// `mailto:` addresses given to the CA.
    pub contact: Vec<String>,
    /// Extra trust anchors for the directory's own TLS (a test CA).
    pub directory_ca: Option<PathBuf>,
    /// How long before expiry to renew; `None`: a third of the certificate's lifetime.
    pub renew_before: Option<Duration>,
}

/// How the CA validates control of a site's name. Neither needs a cleartext port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// RFC 8737: a certificate answered on the site's own TLS listeners with ALPN `acme-tls/1`.
    TlsAlpn01,
    /// A TXT record at `_acme-challenge.NAME`, published by the built-in DNS server. The only
    /// one for wildcard names.
    Dns01,
}

impl AcmeChallenge {
    pub fn as_str(self) -> &'static str {
        match self {
            AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
            AcmeChallenge::Dns01 => "dns-01",
        }
    }
}

/// `[analytics]`: what is measured and how long it is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnalyticsSettings {
    /// Off: no observation, no detection, no store (the benchmark's baseline).
    pub enabled: bool,
    /// How often in-memory counts are written to the store.
    pub flush_interval: Duration,
    /// Minute buckets older than this are rolled up into hours.
    pub minute_retention: Duration,
    /// Hour buckets older than this are deleted.
    pub hour_retention: Duration,
    /// Distinct networks, paths (and families) kept per site, minute and scheme; the rest is
    /// counted as overflow.
    pub top_k: u32,
    /// JSON access log, one line per request, credentials fingerprinted; `None`: off.
    pub access_log: Option<PathBuf>,
}

impl Default for AnalyticsSettings {
    fn default() -> Self {
        AnalyticsSettings {
            enabled: true,
            flush_interval: Duration::from_secs(5),
            minute_retention: Duration::from_secs(48 * 3600),
            hour_retention: Duration::from_secs(90 * 86400),
            top_k: 200,
            access_log: None,
        }
    }
}

/// `[readiness]`: the thresholds behind the impact report's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Readiness {
    /// Highest share of cleartext requests, in percent, that still counts as ready.
    pub max_cleartext_percent: f64,
    /// Most distinct credentials exposed in the window that still counts as ready.
    pub max_exposed_credentials: u64,
    /// The window the verdict looks at by default.
    pub window: Duration,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            max_cleartext_percent: 0.1,
            max_exposed_credentials: 0,
            window: Duration::from_secs(7 * 86400),
        }
    }
}

/// `[metrics]`: where `/metrics` is served, over TLS.
#[derive(Debug, Clone)]
pub struct MetricsSettings {
    pub listen: SocketAddr,
    /// Certificate and key; absent: issued by the development CA for the listen address.
    pub cert: Option<CertFiles>,
}

/// Data-plane timeouts and limits (`[edge]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeSettings {
    /// Time a new connection has to send its first bytes and finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time a client has to send complete request headers.
    pub header_read_timeout: Duration,
    /// A connection with no bytes in either direction for this long is closed once idle.
    pub idle_timeout: Duration,
    /// Time to establish a TCP (and TLS) connection to an origin; past it, 504.
    pub origin_connect_timeout: Duration,
    /// Time an origin has to start its response once the request is sent; past it, 504.
    pub origin_response_timeout: Duration,
    /// An origin connection unused for this long is closed.
    pub origin_idle_timeout: Duration,
    /// How long SIGTERM waits for in-flight requests before exiting anyway.
    pub shutdown_grace: Duration,
    /// Largest request head accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// A connection asked to close because it went idle (HTTP/2: GOAWAY) is dropped if it is
    /// still open this long after.
    pub close_timeout: Duration,
    /// Most client connections open at once over all listeners; `None`: derived from the
    /// descriptor limit at start.
    pub max_connections: Option<usize>,
    /// Most client connections open at once from one address.
    pub max_connections_per_client: usize,
    /// Headers added to every TLS response of every site (a site's own win by name).
    pub response_headers: ResponseHeaders,
    /// QUIC handshakes in progress above which a new client must first prove its address
    /// with a Retry; 0: always.
    pub quic_retry_above: usize,
}

/// Response headers set on TLS answers (`response_headers`), in file order. Each replaces a
/// header of the same name from the origin.
pub type ResponseHeaders = Vec<(http::HeaderName, http::HeaderValue)>;

impl Default for EdgeSettings {
    fn default() -> Self {
        EdgeSettings {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            origin_connect_timeout: Duration::from_secs(5),
            origin_response_timeout: Duration::from_secs(30),
            // Origins usually keep idle connections 60 to 75 s; ours are given up first.
            origin_idle_timeout: Duration::from_secs(50),
            shutdown_grace: Duration::from_secs(30),
            max_header_bytes: 32 * 1024,
            close_timeout: Duration::from_secs(5),
            max_connections: None,
            // One address can be a NAT or a corporate proxy for many clients; 256 still keeps
            // one attacker from taking more than a sliver of the descriptors.
            max_connections_per_client: 256,
            response_headers: Vec::new(),
            // Far above what a busy node has in progress; a flood of spoofed Initials is not.
            quic_retry_above: 256,
        }
    }
}

/// Ports that one large CDN treats as cleartext HTTP; another program listening on one of
/// them, on a wildcard address, defeats a closed pool.
pub const WELL_KNOWN_CLEARTEXT_PORTS: [u16; 7] = [80, 8080, 8880, 2052, 2082, 2086, 2095];

/// A named group of addresses sharing ports. No cleartext ports means closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub tls_ports: Vec<u16>,
    pub cleartext_ports: Vec<u16>,
    /// HTTP/3 (QUIC, UDP) on every TLS port of every address (`http3`, default true).
    pub http3: bool,
}

impl Pool {
    /// A closed pool binds no cleartext socket, so the kernel refuses cleartext connects.
    pub fn is_closed(&self) -> bool {
        self.cleartext_ports.is_empty()
    }

    /// The TLS port redirects point at: the first configured one.
    pub fn redirect_port(&self) -> u16 {
        // Validation guarantees at least one TLS port per pool.
        self.tls_ports.first().copied().unwrap_or(443)
    }

    /// Every socket this pool listens on, with its kind.
    pub fn listeners(&self) -> impl Iterator<Item = (SocketAddr, ListenerKind)> + '_ {
        self.addresses.iter().flat_map(move |ip| {
            let tls = self
                .tls_ports
                .iter()
                .map(move |p| (SocketAddr::new(*ip, *p), ListenerKind::Tls));
            let clear = self
                .cleartext_ports
                .iter()
                .map(move |p| (SocketAddr::new(*ip, *p), ListenerKind::Cleartext));
            let quic = self
                .tls_ports
                .iter()
                .filter(|_| self.http3)
                .map(move |p| (SocketAddr::new(*ip, *p), ListenerKind::Quic));
            tls.chain(clear).chain(quic)
        })
    }
}

/// What a listening socket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListenerKind {
    Tls,
    Cleartext,
    /// HTTP/3 over QUIC: a UDP socket on a TLS port.
    Quic,
}

impl fmt::Display for ListenerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ListenerKind::Tls => "tls",
            ListenerKind::Cleartext => "cleartext",
            ListenerKind::Quic => "quic",
        })
    }
}

/// A hostname a site answers for: exact, or `*.suffix` matching exactly one more label.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Exact(String),
    /// Holds the suffix without the `*.`.
    Wildcard(String),
}

impl HostPattern {
    /// Parses and lowercases a configured host; returns why it is not a valid DNS name.
    pub fn parse(raw: &str) -> Result<HostPattern, String> {
        let lower = raw.trim_end_matches('.').to_ascii_lowercase();
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, lower),
        };
        if name.parse::<IpAddr>().is_ok() {
            return Err("an IP address is not a hostname (SNI cannot carry it)".into());
        }
        validate_dns_name(&name)?;
        if wild && !name.contains('.') {
            return Err("a wildcard needs at least two labels after `*.`".into());
        }
        Ok(if wild {
            HostPattern::Wildcard(name)
        } else {
            HostPattern::Exact(name)
        })
    }

    /// Whether `host` (already lowercase, without port) is covered by this pattern.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Wildcard(suffix) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

fn validate_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err("a hostname has 1 to 253 characters".into());
    }
    for label in name.split('.') {
        let ok_chars = label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if label.is_empty() || label.len() > 63 || !ok_chars {
            return Err(format!(
                "label {label:?} is not a DNS label (letters, digits and '-', 1 to 63 long)"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

/// What a site does with cleartext requests that reach an open pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CleartextMode {
    /// Served only from closed pools: no cleartext listener exists for it at all.
    Closed,
    /// 301 (GET/HEAD) or 308 to the https URL.
    Redirect,
    /// 403 saying the service is HTTPS-only and any credential sent is exposed.
    Reject,
    /// Proxied to the origin with `X-Forwarded-Proto: http`.
    Allow,
}

impl CleartextMode {
    pub fn parse(raw: &str) -> Option<CleartextMode> {
        Some(match raw {
            "closed" => CleartextMode::Closed,
            "redirect" => CleartextMode::Redirect,
            "reject" => CleartextMode::Reject,
            "allow" => CleartextMode::Allow,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CleartextMode::Closed => "closed",
            CleartextMode::Redirect => "redirect",
            CleartextMode::Reject => "reject",
            CleartextMode::Allow => "allow",
        }
    }
}

/// Where a site's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and port; the port is explicit only when written.
    pub authority: Authority,
}

impl Origin {
    pub fn is_https(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }

    fn parse(raw: &str) -> Result<Origin, String> {
        let uri: http::Uri = raw
            .parse()
            .map_err(|e| format!("not a URL ({e}); write it like \"http://127.0.0.1:9000\""))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or("missing scheme; write http:// or https://")?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(format!(
                "scheme {scheme:?} is not supported; use http or https"
            ));
        }
        let authority = uri.authority().cloned().ok_or("missing host")?;
        if authority.as_str().contains('@') {
            return Err("credentials in the origin URL are not supported".into());
        }
        if authority.host().is_empty() {
            return Err("missing host".into());
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err("an origin is scheme://host[:port] only; paths and queries are kept from the request".into());
        }
        Ok(Origin { scheme, authority })
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

/// HSTS policy sent on TLS responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hsts {
    pub max_age: u64,
    pub include_subdomains: bool,
    pub preload: bool,
}

impl Hsts {
    /// The `Strict-Transport-Security` header value.
    pub fn header_value(&self) -> String {
        let mut v = format!("max-age={}", self.max_age);
        if self.include_subdomains {
            v.push_str("; includeSubDomains");
        }
        if self.preload {
            v.push_str("; preload");
        }
        v
    }
}

/// A hostname served by the edge.
#[derive(Clone)]
pub struct Site {
    pub host: HostPattern,
    /// Index into `Config::pools`.
    pub pool: usize,
    pub origin: Origin,
    pub cleartext: CleartextMode,
    /// Certificate chain and key files; `None` means a development certificate is issued at
    /// start (or, with `acme`, served until the first issuance).
    pub cert: Option<CertFiles>,
    /// Set for `cert = "acme"`: how the ACME CA validates the site.
    pub acme: Option<AcmeChallenge>,
    /// Extra trust anchors (a PEM file) for an `https://` origin, beside the system roots.
    pub origin_ca: Option<PathBuf>,
    /// `None` when disabled.
    pub hsts: Option<Hsts>,
    /// Headers and query parameters searched for credentials beyond the defaults.
    pub exposure: positions::ExtraPositions,
    /// What happens when a credential is seen in cleartext here.
    pub response: Option<ExposureResponse>,
    /// Headers set on this site's TLS answers: `[edge] response_headers` with the site's own
    /// on top.
    pub response_headers: ResponseHeaders,
    /// Served over HTTP/3 too (`http3`; default: its pool's): Alt-Svc on its TLS answers,
    /// `h3` in its HTTPS record, its name accepted on the pool's QUIC sockets.
    pub http3: bool,
}

/// A site's exposure response (`exposure_response` and `webhook`).
#[derive(Clone)]
pub struct ExposureResponse {
    /// `revoke` asks the issuer to revoke; `notify` only tells it.
    pub revoke: bool,
    /// HTTPS only.
    pub url: http::Uri,
    /// Signs every event body (HMAC-SHA-256); read from `secret_file`.
    pub secret: Vec<u8>,
    /// Extra trust anchors (a PEM file) for the webhook's certificate.
    pub ca: Option<PathBuf>,
    /// `revoke` only: include the raw credential (held in memory only, never stored).
    pub include_raw: bool,
}

impl fmt::Debug for ExposureResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExposureResponse")
            .field("revoke", &self.revoke)
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("include_raw", &self.include_raw)
            .finish()
    }
}

/// `[exposure]`: delivery and abuse limits of exposure events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExposureSettings {
    /// New events per site per minute; more are dropped and counted.
    pub per_site_per_minute: u32,
    /// New events per client network per minute; more are dropped and counted.
    pub per_network_per_minute: u32,
    /// Events waiting for delivery at most; more are dropped and counted.
    pub max_queue: u32,
    /// Delivery attempts before an event is marked failed.
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How long one webhook delivery may take. A node holds the events it claims for a few of
    /// these (see `exposure::queue`): a node that dies mid-delivery leaves them to another
    /// node after that.
    pub delivery_timeout: Duration,
    /// How much of a cleartext request's form or JSON body is searched for credentials; 0
    /// searches no body.
    pub scan_body_bytes: usize,
}

impl Default for ExposureSettings {
    fn default() -> Self {
        ExposureSettings {
            per_site_per_minute: 60,
            per_network_per_minute: 10,
            max_queue: 10_000,
            max_attempts: 10,
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(600),
            delivery_timeout: Duration::from_secs(10),
            // Login forms and token requests fit easily; a bound keeps the scan cheap.
            scan_body_bytes: 8192,
        }
    }
}

impl fmt::Debug for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Site")
            .field("host", &self.host)
            .field("pool", &self.pool)
            .field("origin", &self.origin)
            .field("cleartext", &self.cleartext)
            .field("cert", &self.cert.as_ref().map(|_| "<configured>"))
            .field("origin_ca", &self.origin_ca)
            .field("hsts", &self.hsts)
            .field("exposure", &self.exposure)
            .field("response", &self.response)
            .finish()
    }
}

impl Default for Config {
    /// No pools, no sites: what the edge serves before its first config.
    fn default() -> Config {
        Config {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            edge: EdgeSettings::default(),
            pools: Vec::new(),
            sites: Vec::new(),
            analytics: AnalyticsSettings::default(),
            readiness: Readiness::default(),
            metrics: None,
            dns: None,
            admin: None,
            exposure: ExposureSettings::default(),
            manage_firewall: false,
            acme: None,
            store: None,
            node: None,
            files: Vec::new(),
        }
    }
}

impl Config {
    /// What is valid but likely not to work, for `portcullis check` and the log at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.sites {
            let pool = &self.pools[s.pool];
            if s.acme == Some(AcmeChallenge::TlsAlpn01) && !pool.tls_ports.contains(&443) {
                out.push(format!(
                    "site {}: public ACME CAs validate tls-alpn-01 on port 443 only, and pool {:?} has TLS ports {:?}; add 443 or use acme_challenge = \"dns-01\"",
                    s.host, pool.name, pool.tls_ports
                ));
            }
        }
        out
    }

    /// Reads and validates a config file. Relative paths inside it are relative to its folder.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let label = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: label.clone(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_toml(&text, &label, base)
    }

    /// Validates TOML text; `label` names it in errors, `base` anchors relative paths.
    pub fn from_toml(text: &str, label: &str, base: &Path) -> Result<Config, ConfigError> {
        Config::from_toml_with(text, label, base, None)
    }

    /// The state directory a config text names, resolved against `base`, without validating
    /// the rest: where to find the store that keeps its overrides.
    pub fn state_dir_in(text: &str, label: &str, base: &Path) -> Result<PathBuf, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: label.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let v = Validator {
            problems: Vec::new(),
            files: Vec::new(),
            base,
        };
        Ok(raw
            .state
            .dir
            .as_ref()
            .map(|d| v.path(d))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)))
    }

    /// The `[store]` and `[node] name` a config text names, read before the rest (the store
    /// holds the overrides the rest is validated with).
    pub fn store_in(
        text: &str,
        label: &str,
        base: &Path,
    ) -> Result<(Option<StoreSettings>, Option<String>), ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: label.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let mut v = Validator {
            problems: Vec::new(),
            files: Vec::new(),
            base,
        };
        let store = raw.store.and_then(|s| v.store(s));
        let node = v.node(raw.node);
        if v.problems.is_empty() {
            Ok((store, node))
        } else {
            Err(ConfigError::Invalid {
                path: label.to_owned(),
                problems: v.problems,
                files: v.files,
            })
        }
    }

    /// Like [`Config::from_toml`], with site `overrides` (made through the admin plane, kept in
    /// the store) applied to the text before validation.
    pub fn from_toml_with(
        text: &str,
        label: &str,
        base: &Path,
        overrides: Option<&Overrides>,
    ) -> Result<Config, ConfigError> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: label.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let mut v = Validator {
            problems: Vec::new(),
            files: Vec::new(),
            base,
        };
        let none = Overrides::new();
        let overrides = overrides.unwrap_or(&none);
        for site in &mut raw.site {
            if let Some(o) = overrides.get(&site.host) {
                site.apply(o);
            }
        }
        let mut config = v.config(raw);
        if v.problems.is_empty() {
            config.files = v.files;
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: label.to_owned(),
                problems: v.problems,
                files: v.files,
            })
        }
    }

    /// Every listening socket across all pools, with the pool that owns it.
    pub fn listeners(&self) -> BTreeMap<(SocketAddr, ListenerKind), usize> {
        let mut out = BTreeMap::new();
        for (i, pool) in self.pools.iter().enumerate() {
            for key in pool.listeners() {
                out.insert(key, i);
            }
        }
        out
    }
}

impl RawSite {
    fn apply(&mut self, o: &SiteOverride) {
        if let Some(c) = &o.cleartext {
            self.cleartext = Some(c.clone());
        }
        if let Some(p) = &o.pool {
            self.pool = p.clone();
        }
        if let Some(origin) = &o.origin {
            self.origin = origin.clone();
        }
        if let Some(h) = &o.hsts {
            let cur = self.hsts.get_or_insert(RawHsts {
                enabled: None,
                max_age: None,
                include_subdomains: None,
                preload: None,
            });
            cur.enabled = h.enabled.or(cur.enabled);
            cur.max_age = h.max_age.or(cur.max_age);
            cur.include_subdomains = h.include_subdomains.or(cur.include_subdomains);
            cur.preload = h.preload.or(cur.preload);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matches_one_label_only() {
        let p = HostPattern::parse("*.Example.com.").expect("valid wildcard");
        assert!(p.matches("a.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("a.b.example.com"));
        assert!(!p.matches(".example.com"));
    }

    #[test]
    fn hostnames_are_checked() {
        assert!(HostPattern::parse("127.0.0.1").is_err());
        assert!(HostPattern::parse("bad_host.com").is_err());
        assert!(HostPattern::parse("*.com").is_err());
        assert!(HostPattern::parse("-a.com").is_err());
        assert_eq!(
            HostPattern::parse("API.example.com").expect("valid"),
            HostPattern::Exact("api.example.com".into())
        );
    }

    #[test]
    fn origins_are_checked() {
        assert!(Origin::parse("http://127.0.0.1:9000").is_ok());
        assert!(Origin::parse("https://origin.example/").is_ok());
        assert!(Origin::parse("ftp://x").is_err());
        assert!(Origin::parse("http://u:p@x").is_err());
        assert!(Origin::parse("http://x/path").is_err());
        assert!(Origin::parse("127.0.0.1:9000").is_err());
    }
}
