//! The config file: its schema, the validation of every invariant that can be checked before
//! anything binds, and the resulting immutable [`Config`].
//!
//! Raw serde structs (unknown keys rejected) convert into validated types; every problem found is
//! collected, so `portcullis check` prints all of them at once, each naming the file, the key and
//! the offending value. This module must never bind a socket or start a task: a config that
//! passes here is only a description, the edge turns it into listeners.

pub mod positions;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use serde::Deserialize;

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
            tls.chain(clear)
        })
    }
}

/// What a listening socket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListenerKind {
    Tls,
    Cleartext,
}

impl fmt::Display for ListenerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ListenerKind::Tls => "tls",
            ListenerKind::Cleartext => "cleartext",
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
    /// start.
    pub cert: Option<CertFiles>,
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
            state_dir: PathBuf::from("/var/lib/portcullis"),
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
            files: Vec::new(),
        }
    }
}

impl Config {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    edge: RawEdge,
    #[serde(default)]
    pool: Vec<RawPool>,
    #[serde(default)]
    site: Vec<RawSite>,
    #[serde(default)]
    analytics: RawAnalytics,
    #[serde(default)]
    readiness: RawReadiness,
    metrics: Option<RawMetrics>,
    dns: Option<RawDns>,
    admin: Option<RawAdmin>,
    #[serde(default)]
    exposure: RawExposure,
    #[serde(default)]
    firewall: RawFirewall,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFirewall {
    manage: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: String,
    /// Accepted only as `true`: the admin plane never listens in cleartext.
    tls: Option<bool>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    read_only_token_sha256: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    listen: String,
    zones: Vec<String>,
    ttl: Option<i64>,
    #[serde(default)]
    nameservers: Vec<String>,
    hostmaster: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAnalytics {
    enabled: Option<bool>,
    flush_interval: Option<String>,
    minute_retention: Option<String>,
    hour_retention: Option<String>,
    top_k: Option<i64>,
    access_log: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReadiness {
    max_cleartext_percent: Option<f64>,
    max_exposed_credentials: Option<i64>,
    window: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: String,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEdge {
    handshake_timeout: Option<String>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    origin_connect_timeout: Option<String>,
    origin_response_timeout: Option<String>,
    origin_idle_timeout: Option<String>,
    shutdown_grace: Option<String>,
    max_header_bytes: Option<i64>,
    close_timeout: Option<String>,
    max_connections: Option<i64>,
    max_connections_per_client: Option<i64>,
    #[serde(default)]
    response_headers: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: String,
    addresses: Vec<String>,
    tls_ports: Vec<i64>,
    #[serde(default)]
    cleartext_ports: Vec<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    host: String,
    pool: String,
    origin: String,
    cleartext: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    origin_ca: Option<PathBuf>,
    hsts: Option<RawHsts>,
    #[serde(default)]
    exposure_headers: Vec<String>,
    #[serde(default)]
    exposure_params: Vec<String>,
    #[serde(default)]
    exposure_cookies: Vec<String>,
    #[serde(default)]
    exposure_paths: Vec<String>,
    #[serde(default)]
    response_headers: std::collections::BTreeMap<String, String>,
    exposure_response: Option<String>,
    webhook: Option<RawWebhook>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    secret_file: PathBuf,
    ca: Option<PathBuf>,
    #[serde(default)]
    include_raw: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawExposure {
    per_site_per_minute: Option<i64>,
    per_network_per_minute: Option<i64>,
    max_queue: Option<i64>,
    max_attempts: Option<i64>,
    scan_body_bytes: Option<i64>,
    backoff_base: Option<String>,
    backoff_max: Option<String>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHsts {
    enabled: Option<bool>,
    max_age: Option<i64>,
    include_subdomains: Option<bool>,
    preload: Option<bool>,
}

struct Validator<'a> {
    problems: Vec<Problem>,
    /// Certificate and CA files named so far, for the TLS layer to open.
    files: Vec<FileRef>,
    base: &'a Path,
}

impl Validator<'_> {
    fn problem(
        &mut self,
        key: impl Into<String>,
        value: impl fmt::Display,
        message: impl Into<String>,
    ) {
        self.problems.push(Problem {
            key: key.into(),
            value: value.to_string(),
            message: message.into(),
        });
    }

    fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let state_dir = raw
            .state
            .dir
            .map(|d| self.path(&d))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let edge = self.edge(raw.edge);
        let pools = self.pools(raw.pool);
        let sites = self.sites(raw.site, &pools, &edge.response_headers);
        let analytics = self.analytics(raw.analytics);
        let readiness = self.readiness(raw.readiness);
        let metrics = raw.metrics.and_then(|m| self.metrics(m));
        let dns = raw.dns.and_then(|d| self.dns(d));
        let admin = raw.admin.and_then(|a| self.admin(a));
        let exposure = self.exposure(raw.exposure);
        let manage_firewall = raw.firewall.manage.unwrap_or(false);
        Config {
            state_dir,
            edge,
            pools,
            sites,
            analytics,
            readiness,
            metrics,
            dns,
            admin,
            exposure,
            manage_firewall,
            files: Vec::new(),
        }
    }

    fn exposure(&mut self, raw: RawExposure) -> ExposureSettings {
        let d = ExposureSettings::default();
        let mut count = |key: &str, v: Option<i64>, default: u32, max: i64| match v {
            None => default,
            Some(n) if (1..=max).contains(&n) => n as u32,
            Some(n) => {
                self.problem(format!("exposure.{key}"), n, format!("between 1 and {max}"));
                default
            }
        };
        let per_site_per_minute = count(
            "per_site_per_minute",
            raw.per_site_per_minute,
            d.per_site_per_minute,
            100_000,
        );
        let per_network_per_minute = count(
            "per_network_per_minute",
            raw.per_network_per_minute,
            d.per_network_per_minute,
            100_000,
        );
        let max_queue = count("max_queue", raw.max_queue, d.max_queue, 10_000_000);
        let max_attempts = count("max_attempts", raw.max_attempts, d.max_attempts, 1000);
        let scan_body_bytes = match raw.scan_body_bytes {
            None => d.scan_body_bytes,
            Some(n @ 0..=1_048_576) => n as usize,
            Some(n) => {
                self.problem(
                    "exposure.scan_body_bytes",
                    n,
                    "must be between 0 (no body scan) and 1048576",
                );
                d.scan_body_bytes
            }
        };
        ExposureSettings {
            per_site_per_minute,
            per_network_per_minute,
            max_queue,
            max_attempts,
            backoff_base: self.duration("exposure.backoff_base", raw.backoff_base, d.backoff_base),
            backoff_max: self.duration("exposure.backoff_max", raw.backoff_max, d.backoff_max),
            scan_body_bytes,
        }
    }

    fn response(
        &mut self,
        at: &str,
        policy: Option<&str>,
        hook: Option<RawWebhook>,
    ) -> Option<ExposureResponse> {
        let revoke = match policy.unwrap_or("none") {
            "none" => {
                if hook.is_some() {
                    self.problem(
                        format!("{at}.webhook"),
                        "{ … }",
                        "a webhook needs exposure_response = \"notify\" or \"revoke\"",
                    );
                }
                return None;
            }
            "notify" => false,
            "revoke" => true,
            other => {
                self.problem(
                    format!("{at}.exposure_response"),
                    format!("{other:?}"),
                    "use none, notify or revoke",
                );
                return None;
            }
        };
        let Some(hook) = hook else {
            self.problem(
                format!("{at}.webhook"),
                "(missing)",
                "notify and revoke need webhook = { url = \"https://…\", secret_file = \"…\" }",
            );
            return None;
        };
        let url = match hook.url.parse::<http::Uri>() {
            Ok(u) if u.scheme_str() == Some("https") && u.host().is_some() => u,
            _ => {
                self.problem(
                    format!("{at}.webhook.url"),
                    format!("{:?}", hook.url),
                    "an https:// URL: events are only delivered over verified TLS",
                );
                return None;
            }
        };
        let path = self.path(&hook.secret_file);
        let secret = match std::fs::read(&path) {
            Ok(b) if b.trim_ascii().len() >= 16 => b.trim_ascii().to_vec(),
            Ok(_) => {
                self.problem(
                    format!("{at}.webhook.secret_file"),
                    format!("{:?}", path.display().to_string()),
                    "the secret needs at least 16 bytes",
                );
                return None;
            }
            Err(e) => {
                self.problem(
                    format!("{at}.webhook.secret_file"),
                    format!("{:?}", path.display().to_string()),
                    format!("cannot read: {e}"),
                );
                return None;
            }
        };
        let ca = hook.ca.as_deref().map(|p| {
            let path = self.path(p);
            self.files.push(FileRef::Roots {
                key: format!("{at}.webhook.ca"),
                path: path.clone(),
            });
            path
        });
        if hook.include_raw && !revoke {
            self.problem(
                format!("{at}.webhook.include_raw"),
                "true",
                "only a revoke response may include the raw credential",
            );
        }
        Some(ExposureResponse {
            revoke,
            url,
            secret,
            ca,
            include_raw: hook.include_raw && revoke,
        })
    }

    fn admin(&mut self, raw: RawAdmin) -> Option<AdminSettings> {
        const HTTPS_ONLY: &str = "the admin plane is HTTPS-only: it never listens in cleartext";
        if raw.tls == Some(false) {
            self.problem("admin.tls", "false", HTTPS_ONLY);
        }
        let listen = raw.listen.strip_prefix("https://").unwrap_or(&raw.listen);
        if raw.listen.starts_with("http://") {
            self.problem("admin.listen", format!("{:?}", raw.listen), HTTPS_ONLY);
            return None;
        }
        let listen = match listen.trim_end_matches('/').parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 => a,
            _ => {
                self.problem(
                    "admin.listen",
                    format!("{:?}", raw.listen),
                    "an address and port, like \"127.0.0.1:9443\"",
                );
                return None;
            }
        };
        let hash = raw.read_only_token_sha256.map(|h| h.to_ascii_lowercase());
        if let Some(h) = &hash {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                self.problem(
                    "admin.read_only_token_sha256",
                    format!("{h:?}"),
                    "64 hex characters: the SHA-256 of the token (portcullis token hash < token-file)",
                );
            }
        }
        let cert = self.site_cert("admin", raw.cert.as_deref(), raw.key.as_deref(), None);
        Some(AdminSettings {
            listen,
            cert,
            read_only_token_sha256: hash,
        })
    }

    fn dns(&mut self, raw: RawDns) -> Option<DnsSettings> {
        let listen = match raw.listen.parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 => Some(a),
            _ => {
                self.problem(
                    "dns.listen",
                    format!("{:?}", raw.listen),
                    "an address and port, like \"127.0.0.1:5353\"",
                );
                None
            }
        };
        let mut zones: Vec<String> = Vec::new();
        if raw.zones.is_empty() {
            self.problem("dns.zones", "[]", "list at least one zone to serve");
        }
        for (i, z) in raw.zones.iter().enumerate() {
            let name = z.trim_end_matches('.').to_ascii_lowercase();
            match validate_dns_name(&name) {
                Err(e) => self.problem(format!("dns.zones[{i}]"), format!("{z:?}"), e),
                Ok(()) if zones.contains(&name) => self.problem(
                    format!("dns.zones[{i}]"),
                    format!("{z:?}"),
                    "zone listed twice",
                ),
                Ok(()) => zones.push(name),
            }
        }
        let ttl = match raw.ttl {
            None => 300,
            Some(t @ 1..=604_800) => t as u32,
            Some(t) => {
                self.problem("dns.ttl", t, "seconds, 1 to 604800 (a week)");
                300
            }
        };
        let mut names = |key: &str, list: Vec<String>| -> Vec<String> {
            let mut out = Vec::new();
            for (i, n) in list.iter().enumerate() {
                let name = n.trim_end_matches('.').to_ascii_lowercase();
                match validate_dns_name(&name) {
                    Ok(()) => out.push(name),
                    Err(e) => self.problem(format!("dns.{key}[{i}]"), format!("{n:?}"), e),
                }
            }
            out
        };
        let nameservers = names("nameservers", raw.nameservers);
        let hostmaster = names("hostmaster", raw.hostmaster.into_iter().collect()).pop();
        Some(DnsSettings {
            listen: listen?,
            zones,
            ttl,
            nameservers,
            hostmaster,
        })
    }

    fn duration(&mut self, key: &str, v: Option<String>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match humantime::parse_duration(&s) {
                Ok(x) if !x.is_zero() => x,
                Ok(_) => {
                    self.problem(key, format!("{s:?}"), "must be more than zero");
                    default
                }
                Err(e) => {
                    self.problem(
                        key,
                        format!("{s:?}"),
                        format!("not a duration ({e}); write it like \"10s\", \"48h\" or \"90d\""),
                    );
                    default
                }
            },
        }
    }

    fn analytics(&mut self, raw: RawAnalytics) -> AnalyticsSettings {
        let d = AnalyticsSettings::default();
        let top_k = match raw.top_k {
            None => d.top_k,
            Some(n @ 1..=100_000) => n as u32,
            Some(n) => {
                self.problem("analytics.top_k", n, "must be between 1 and 100000");
                d.top_k
            }
        };
        let minute_retention = self.duration(
            "analytics.minute_retention",
            raw.minute_retention,
            d.minute_retention,
        );
        let hour_retention = self.duration(
            "analytics.hour_retention",
            raw.hour_retention,
            d.hour_retention,
        );
        if hour_retention < minute_retention {
            self.problem(
                "analytics.hour_retention",
                format!(
                    "{:?}",
                    humantime::format_duration(hour_retention).to_string()
                ),
                "must be at least minute_retention: hours are rolled up from expired minutes",
            );
        }
        AnalyticsSettings {
            enabled: raw.enabled.unwrap_or(d.enabled),
            flush_interval: self.duration(
                "analytics.flush_interval",
                raw.flush_interval,
                d.flush_interval,
            ),
            minute_retention,
            hour_retention,
            top_k,
            access_log: raw.access_log.map(|p| self.path(&p)),
        }
    }

    fn readiness(&mut self, raw: RawReadiness) -> Readiness {
        let d = Readiness::default();
        let max_cleartext_percent = match raw.max_cleartext_percent {
            None => d.max_cleartext_percent,
            Some(p) if (0.0..=100.0).contains(&p) => p,
            Some(p) => {
                self.problem(
                    "readiness.max_cleartext_percent",
                    p,
                    "a percentage: 0 to 100",
                );
                d.max_cleartext_percent
            }
        };
        let max_exposed_credentials = match raw.max_exposed_credentials {
            None => d.max_exposed_credentials,
            Some(n) if n >= 0 => n as u64,
            Some(n) => {
                self.problem(
                    "readiness.max_exposed_credentials",
                    n,
                    "must be zero or more",
                );
                d.max_exposed_credentials
            }
        };
        Readiness {
            max_cleartext_percent,
            max_exposed_credentials,
            window: self.duration("readiness.window", raw.window, d.window),
        }
    }

    fn metrics(&mut self, raw: RawMetrics) -> Option<MetricsSettings> {
        let listen = match raw.listen.parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 => a,
            _ => {
                self.problem(
                    "metrics.listen",
                    format!("{:?}", raw.listen),
                    "an address and port, like \"127.0.0.1:9464\"",
                );
                return None;
            }
        };
        let cert = self.site_cert("metrics", raw.cert.as_deref(), raw.key.as_deref(), None);
        Some(MetricsSettings { listen, cert })
    }

    fn edge(&mut self, raw: RawEdge) -> EdgeSettings {
        let d = EdgeSettings::default();
        let handshake_timeout = self.duration(
            "edge.handshake_timeout",
            raw.handshake_timeout,
            d.handshake_timeout,
        );
        let header_read_timeout = self.duration(
            "edge.header_read_timeout",
            raw.header_read_timeout,
            d.header_read_timeout,
        );
        let idle_timeout = self.duration("edge.idle_timeout", raw.idle_timeout, d.idle_timeout);
        let origin_connect_timeout = self.duration(
            "edge.origin_connect_timeout",
            raw.origin_connect_timeout,
            d.origin_connect_timeout,
        );
        let origin_response_timeout = self.duration(
            "edge.origin_response_timeout",
            raw.origin_response_timeout,
            d.origin_response_timeout,
        );
        let origin_idle_timeout = self.duration(
            "edge.origin_idle_timeout",
            raw.origin_idle_timeout,
            d.origin_idle_timeout,
        );
        let shutdown_grace =
            self.duration("edge.shutdown_grace", raw.shutdown_grace, d.shutdown_grace);
        let max_header_bytes = match raw.max_header_bytes {
            None => d.max_header_bytes,
            // hyper's smallest read buffer is 8 KiB; 1 MiB is far past any sane request head.
            Some(n @ 8192..=1_048_576) => n as usize,
            Some(n) => {
                self.problem(
                    "edge.max_header_bytes",
                    n,
                    "must be between 8192 and 1048576",
                );
                d.max_header_bytes
            }
        };
        let close_timeout = self.duration("edge.close_timeout", raw.close_timeout, d.close_timeout);
        let max_connections = match raw.max_connections {
            None => d.max_connections,
            Some(n @ 1..=10_000_000) => Some(n as usize),
            Some(n) => {
                self.problem(
                    "edge.max_connections",
                    n,
                    "must be between 1 and 10000000 (leave it out to derive it from the descriptor limit)",
                );
                d.max_connections
            }
        };
        let max_connections_per_client = match raw.max_connections_per_client {
            None => d.max_connections_per_client,
            Some(n @ 1..=10_000_000) => n as usize,
            Some(n) => {
                self.problem(
                    "edge.max_connections_per_client",
                    n,
                    "must be between 1 and 10000000",
                );
                d.max_connections_per_client
            }
        };
        let response_headers = self.response_headers("edge", &raw.response_headers);
        EdgeSettings {
            handshake_timeout,
            header_read_timeout,
            idle_timeout,
            origin_connect_timeout,
            origin_response_timeout,
            origin_idle_timeout,
            shutdown_grace,
            max_header_bytes,
            close_timeout,
            max_connections,
            max_connections_per_client,
            response_headers,
        }
    }

    /// Validates a `response_headers` table: names and values HTTP allows, and none that would
    /// break framing or that another key owns.
    fn response_headers(
        &mut self,
        at: &str,
        raw: &std::collections::BTreeMap<String, String>,
    ) -> ResponseHeaders {
        // Framing and connection management belong to the edge; HSTS has its own key.
        const REFUSED: [(&str, &str); 10] = [
            ("connection", "connection management belongs to the edge"),
            ("keep-alive", "connection management belongs to the edge"),
            (
                "proxy-connection",
                "connection management belongs to the edge",
            ),
            ("transfer-encoding", "message framing belongs to the edge"),
            ("content-length", "message framing belongs to the edge"),
            ("te", "connection management belongs to the edge"),
            ("trailer", "message framing belongs to the edge"),
            ("upgrade", "connection management belongs to the edge"),
            (
                "strict-transport-security",
                "HSTS has its own key: hsts = { ... }",
            ),
            ("alt-svc", "the edge advertises its own protocols"),
        ];
        let mut out = ResponseHeaders::new();
        for (name, value) in raw {
            let key = format!("{at}.response_headers.{name:?}");
            let Ok(n) = http::HeaderName::from_bytes(name.as_bytes()) else {
                self.problem(key, format!("{name:?}"), "not a header name");
                continue;
            };
            if let Some((_, why)) = REFUSED.iter().find(|(r, _)| *r == n.as_str()) {
                self.problem(
                    key,
                    format!("{name:?}"),
                    format!("cannot be set here: {why}"),
                );
                continue;
            }
            match http::HeaderValue::from_str(value) {
                Ok(v) => out.push((n, v)),
                Err(_) => self.problem(
                    key,
                    format!("{value:?}"),
                    "not a header value (visible ASCII and spaces only)",
                ),
            }
        }
        out
    }

    fn ports(&mut self, key: &str, raw: &[i64]) -> Vec<u16> {
        let mut out = Vec::new();
        for (i, &p) in raw.iter().enumerate() {
            match u16::try_from(p) {
                Ok(port) if port != 0 => {
                    if out.contains(&port) {
                        self.problem(format!("{key}[{i}]"), p, "port listed twice");
                    } else {
                        out.push(port);
                    }
                }
                _ => self.problem(format!("{key}[{i}]"), p, "port out of range (1 to 65535)"),
            }
        }
        out
    }

    fn pools(&mut self, raw: Vec<RawPool>) -> Vec<Pool> {
        let mut pools: Vec<Pool> = Vec::new();
        // Which pool first claimed each address, to report an address in two pools.
        let mut owner: HashMap<IpAddr, String> = HashMap::new();
        for (i, rp) in raw.into_iter().enumerate() {
            let at = format!("pool[{i}]");
            let named = format!("pool[{i}] ({:?})", rp.name);
            if rp.name.trim().is_empty() {
                self.problem(
                    format!("{at}.name"),
                    format!("{:?}", rp.name),
                    "a pool needs a name",
                );
            } else if pools.iter().any(|p| p.name == rp.name) {
                self.problem(
                    format!("{at}.name"),
                    format!("{:?}", rp.name),
                    "two pools have this name",
                );
            }
            let mut addresses = Vec::new();
            if rp.addresses.is_empty() {
                self.problem(
                    format!("{named}.addresses"),
                    "[]",
                    "a pool needs at least one address",
                );
            }
            for (j, a) in rp.addresses.iter().enumerate() {
                let key = format!("{named}.addresses[{j}]");
                match a.parse::<IpAddr>() {
                    Err(_) => self.problem(key, format!("{a:?}"), "not an IP address"),
                    Ok(ip) => {
                        if let Some(other) = owner.get(&ip) {
                            let msg = if *other == rp.name {
                                "address listed twice in this pool".to_owned()
                            } else {
                                format!(
                                    "address {ip} is in pool {other:?} and pool {:?}; an address belongs to one pool",
                                    rp.name
                                )
                            };
                            self.problem(key, format!("{a:?}"), msg);
                        } else {
                            owner.insert(ip, rp.name.clone());
                            addresses.push(ip);
                        }
                    }
                }
            }
            let tls_ports = self.ports(&format!("{named}.tls_ports"), &rp.tls_ports);
            let cleartext_ports =
                self.ports(&format!("{named}.cleartext_ports"), &rp.cleartext_ports);
            if rp.tls_ports.is_empty() {
                self.problem(
                    format!("{named}.tls_ports"),
                    "[]",
                    "a pool needs at least one TLS port",
                );
            }
            for p in &cleartext_ports {
                if tls_ports.contains(p) {
                    self.problem(
                        format!("{named}.cleartext_ports"),
                        p,
                        "port is also in tls_ports; a port speaks TLS or cleartext, not both",
                    );
                }
            }
            pools.push(Pool {
                name: rp.name,
                addresses,
                tls_ports,
                cleartext_ports,
            });
        }
        self.wildcards(&pools);
        pools
    }

    /// A wildcard address overlaps every address of its family on the same port, and with
    /// cleartext ports it would listen on closed addresses too (invariant 1).
    fn wildcards(&mut self, pools: &[Pool]) {
        let closed: Vec<&Pool> = pools.iter().filter(|p| p.is_closed()).collect();
        for (i, pool) in pools.iter().enumerate() {
            for (j, wild) in pool.addresses.iter().enumerate() {
                if !wild.is_unspecified() {
                    continue;
                }
                let key = format!("pool[{i}] ({:?}).addresses[{j}]", pool.name);
                if !pool.cleartext_ports.is_empty() {
                    if let Some(c) = closed.first() {
                        let addrs: Vec<String> =
                            c.addresses.iter().map(|a| a.to_string()).collect();
                        self.problem(
                            key.clone(),
                            format!("\"{wild}\""),
                            format!(
                                "wildcard address with cleartext ports {:?} would also listen on closed pool {:?} ({}); list the open pool's addresses explicitly",
                                pool.cleartext_ports,
                                c.name,
                                addrs.join(", ")
                            ),
                        );
                    }
                }
                let ports: Vec<u16> = pool
                    .tls_ports
                    .iter()
                    .chain(&pool.cleartext_ports)
                    .copied()
                    .collect();
                for other in pools.iter().filter(|o| o.name != pool.name) {
                    for addr in other
                        .addresses
                        .iter()
                        .filter(|a| a.is_ipv4() == wild.is_ipv4())
                    {
                        let shared: Vec<u16> = other
                            .tls_ports
                            .iter()
                            .chain(&other.cleartext_ports)
                            .filter(|p| ports.contains(p))
                            .copied()
                            .collect();
                        if !shared.is_empty() {
                            self.problem(
                                key.clone(),
                                format!("\"{wild}\""),
                                format!(
                                    "wildcard address overlaps address {addr} of pool {:?} on port(s) {shared:?}",
                                    other.name
                                ),
                            );
                        }
                    }
                }
            }
        }
    }

    fn sites(
        &mut self,
        raw: Vec<RawSite>,
        pools: &[Pool],
        edge_headers: &ResponseHeaders,
    ) -> Vec<Site> {
        let mut sites: Vec<Site> = Vec::new();
        for (i, rs) in raw.into_iter().enumerate() {
            let at = format!("site[{i}] ({:?})", rs.host);
            let host = match HostPattern::parse(&rs.host) {
                Ok(h) => Some(h),
                Err(e) => {
                    self.problem(format!("site[{i}].host"), format!("{:?}", rs.host), e);
                    None
                }
            };
            if let Some(h) = &host {
                if let Some(j) = sites.iter().position(|s| &s.host == h) {
                    self.problem(
                        format!("{at}.host"),
                        format!("{:?}", rs.host),
                        format!("the same host is configured twice (also site[{j}])"),
                    );
                }
            }
            let pool = pools.iter().position(|p| p.name == rs.pool);
            if pool.is_none() {
                let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
                self.problem(
                    format!("{at}.pool"),
                    format!("{:?}", rs.pool),
                    format!("no pool has this name (pools: {names:?})"),
                );
            }
            let origin = match Origin::parse(&rs.origin) {
                Ok(o) => Some(o),
                Err(e) => {
                    self.problem(format!("{at}.origin"), format!("{:?}", rs.origin), e);
                    None
                }
            };
            let mode_raw = rs.cleartext.as_deref().unwrap_or("closed");
            let cleartext = CleartextMode::parse(mode_raw);
            if cleartext.is_none() {
                self.problem(
                    format!("{at}.cleartext"),
                    format!("{mode_raw:?}"),
                    "unknown mode; use closed, redirect, reject or allow",
                );
            }
            if let (Some(mode), Some(p)) = (cleartext, pool) {
                self.mode_fits_pool(&at, &rs.host, mode, &pools[p]);
            }
            let cert = self.site_cert(&at, rs.cert.as_deref(), rs.key.as_deref(), host.as_ref());
            let origin_ca = rs.origin_ca.as_deref().map(|p| {
                let path = self.path(p);
                self.files.push(FileRef::Roots {
                    key: format!("{at}.origin_ca"),
                    path: path.clone(),
                });
                path
            });
            let exposure = self.exposure_positions(&at, &rs);
            let hsts = self.hsts(&at, rs.hsts);
            let mut response_headers = edge_headers.clone();
            for (name, value) in self.response_headers(&at, &rs.response_headers) {
                response_headers.retain(|(n, _)| *n != name);
                response_headers.push((name, value));
            }
            let response = self.response(&at, rs.exposure_response.as_deref(), rs.webhook.clone());
            if let (Some(host), Some(pool), Some(origin), Some(cleartext)) =
                (host, pool, origin, cleartext)
            {
                sites.push(Site {
                    host,
                    pool,
                    origin,
                    cleartext,
                    cert,
                    origin_ca,
                    hsts,
                    exposure,
                    response,
                    response_headers,
                });
            }
        }
        sites
    }

    fn exposure_positions(&mut self, at: &str, rs: &RawSite) -> positions::ExtraPositions {
        let mut out = positions::ExtraPositions::default();
        for (i, c) in rs.exposure_cookies.iter().enumerate() {
            if c.is_empty() || c.len() > 64 || c.bytes().any(|b| b <= b' ' || b"=;,\"".contains(&b))
            {
                self.problem(
                    format!("{at}.exposure_cookies[{i}]"),
                    format!("{c:?}"),
                    "a cookie name of 1 to 64 characters, without spaces, '=', ';', ',' or quotes",
                );
            } else {
                out.cookies.push(c.to_ascii_lowercase());
            }
        }
        for (i, p) in rs.exposure_paths.iter().enumerate() {
            match positions::PathPattern::parse(p) {
                Ok(pattern) => out.paths.push(pattern),
                Err(e) => self.problem(
                    format!("{at}.exposure_paths[{i}]"),
                    format!("{p:?}"),
                    e.to_string(),
                ),
            }
        }
        let (headers, params) = (&rs.exposure_headers, &rs.exposure_params);
        for (i, h) in headers.iter().enumerate() {
            match http::HeaderName::from_bytes(h.as_bytes()) {
                Ok(name) => out.headers.push(name),
                Err(_) => self.problem(
                    format!("{at}.exposure_headers[{i}]"),
                    format!("{h:?}"),
                    "not a header name",
                ),
            }
        }
        for (i, p) in params.iter().enumerate() {
            if p.is_empty() || p.len() > 64 {
                self.problem(
                    format!("{at}.exposure_params[{i}]"),
                    format!("{p:?}"),
                    "a parameter name of 1 to 64 characters",
                );
            } else {
                out.params.push(p.to_ascii_lowercase());
            }
        }
        out
    }

    fn mode_fits_pool(&mut self, at: &str, host: &str, mode: CleartextMode, pool: &Pool) {
        let addrs: Vec<String> = pool.addresses.iter().map(|a| a.to_string()).collect();
        let addrs = addrs.join(", ");
        if mode == CleartextMode::Closed && !pool.is_closed() {
            self.problem(
                format!("{at}.cleartext"),
                "\"closed\"",
                format!(
                    "site {host:?} is closed to cleartext but pool {:?} listens for cleartext on port(s) {:?} of {addrs}; move the site to a pool without cleartext_ports, or choose redirect, reject or allow",
                    pool.name, pool.cleartext_ports
                ),
            );
        } else if mode != CleartextMode::Closed && pool.is_closed() {
            self.problem(
                format!("{at}.cleartext"),
                format!("{:?}", mode.as_str()),
                format!(
                    "site {host:?} is on pool {:?} ({addrs}), which has no cleartext ports, so its cleartext mode must be \"closed\"",
                    pool.name
                ),
            );
        }
    }

    fn site_cert(
        &mut self,
        at: &str,
        cert: Option<&Path>,
        key: Option<&Path>,
        host: Option<&HostPattern>,
    ) -> Option<CertFiles> {
        let (cert, key) = match (cert, key) {
            (None, None) => return None,
            (Some(c), Some(k)) => (self.path(c), self.path(k)),
            (Some(c), None) => {
                self.problem(
                    format!("{at}.key"),
                    "(missing)",
                    format!(
                        "cert {:?} is set, so key must be too",
                        c.display().to_string()
                    ),
                );
                return None;
            }
            (None, Some(k)) => {
                self.problem(
                    format!("{at}.cert"),
                    "(missing)",
                    format!(
                        "key {:?} is set, so cert must be too",
                        k.display().to_string()
                    ),
                );
                return None;
            }
        };
        let files = CertFiles { cert, key };
        self.files.push(FileRef::CertKey {
            at: at.to_owned(),
            files: files.clone(),
            covers: host.cloned(),
        });
        Some(files)
    }

    fn hsts(&mut self, at: &str, raw: Option<RawHsts>) -> Option<Hsts> {
        let Some(raw) = raw else {
            return Some(Hsts {
                max_age: DEFAULT_HSTS_MAX_AGE,
                include_subdomains: false,
                preload: false,
            });
        };
        if raw.enabled == Some(false) {
            return None;
        }
        let max_age = match raw.max_age {
            None => DEFAULT_HSTS_MAX_AGE,
            Some(n) if n >= 0 => n as u64,
            Some(n) => {
                self.problem(
                    format!("{at}.hsts.max_age"),
                    n,
                    "must be zero or more seconds",
                );
                DEFAULT_HSTS_MAX_AGE
            }
        };
        let hsts = Hsts {
            max_age,
            include_subdomains: raw.include_subdomains.unwrap_or(false),
            preload: raw.preload.unwrap_or(false),
        };
        if hsts.preload && (!hsts.include_subdomains || hsts.max_age < DEFAULT_HSTS_MAX_AGE) {
            self.problem(
                format!("{at}.hsts.preload"),
                "true",
                "the preload list requires include_subdomains = true and max_age >= 31536000",
            );
        }
        Some(hsts)
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
