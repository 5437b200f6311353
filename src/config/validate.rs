//! Validation: turns the raw schema (`raw`) into the validated types of this module, checking
//! every invariant that can be checked before anything binds.
//!
//! The [`Validator`] never stops at the first problem: each check records a [`Problem`] naming
//! the key, the value as written and what to do, and carries on with a default, so
//! `portcullis check` prints every problem at once. Certificate, key and CA files are only
//! named here ([`FileRef`]), never opened: their content is the TLS layer's to judge. It never
//! binds, never starts a task, and, like all of `config`, imports nothing else of this crate.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{
    RawAcme, RawAdmin, RawAnalytics, RawConfig, RawDns, RawEdge, RawExposure, RawHsts, RawMetrics,
    RawNode, RawPool, RawReadiness, RawSite, RawStore, RawWebhook,
};
use super::{
    positions, validate_dns_name, AcmeChallenge, AcmeSettings, AdminSettings, AnalyticsSettings,
    CertFiles, CleartextMode, Config, DnsSettings, EdgeSettings, ExposureResponse,
    ExposureSettings, FileRef, HostPattern, Hsts, MetricsSettings, Origin, Pool, Problem,
    Readiness, ResponseHeaders, Site, StoreSettings, DEFAULT_HSTS_MAX_AGE,
};

/// Collects the problems of one config text while converting it.
pub(super) struct Validator<'a> {
    /// Every broken rule found so far, in the order the keys are checked.
    pub(super) problems: Vec<Problem>,
    /// Certificate and CA files named so far, for the TLS layer to open.
    pub(super) files: Vec<FileRef>,
    /// The config file's folder: relative paths inside it are relative to it.
    pub(super) base: &'a Path,
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

    pub(super) fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }

    pub(super) fn config(&mut self, raw: RawConfig) -> Config {
        let state_dir = raw
            .state
            .dir
            .map(|d| self.path(&d))
            .unwrap_or_else(|| PathBuf::from(super::DEFAULT_STATE_DIR));
        let edge = self.edge(raw.edge);
        let pools = self.pools(raw.pool);
        let dns = raw.dns.and_then(|d| self.dns(d));
        let acme_present = raw.acme.is_some();
        let acme = raw.acme.and_then(|a| self.acme(a));
        let sites = self.sites(raw.site, &pools, &edge.response_headers);
        self.acme_sites(&sites, acme_present, dns.as_ref());
        let analytics = self.analytics(raw.analytics);
        let readiness = self.readiness(raw.readiness);
        let metrics = raw.metrics.and_then(|m| self.metrics(m));
        let admin = raw.admin.and_then(|a| self.admin(a));
        let exposure = self.exposure(raw.exposure);
        let manage_firewall = raw.firewall.manage.unwrap_or(false);
        let store = raw.store.and_then(|s| self.store(s));
        let node = self.node(raw.node);
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
            acme,
            store,
            node,
            files: Vec::new(),
        }
    }

    pub(super) fn store(&mut self, raw: RawStore) -> Option<StoreSettings> {
        let mut ok = true;
        let scheme_ok = raw.url.starts_with("postgres://") || raw.url.starts_with("postgresql://");
        if !scheme_ok {
            // The value may hold a password: it is never echoed.
            self.problem(
                "store.url",
                "(not shown)",
                "a postgres:// URL, such as postgres://portcullis@db.internal/portcullis?sslmode=require",
            );
            ok = false;
        }
        let pool_size = match raw.pool_size {
            None => 8,
            Some(n) if (1..=1024).contains(&n) => n as usize,
            Some(n) => {
                self.problem("store.pool_size", n, "between 1 and 1024");
                ok = false;
                8
            }
        };
        let ca = raw.ca.as_deref().map(|p| {
            let path = self.path(p);
            self.files.push(FileRef::Roots {
                key: "store.ca".into(),
                path: path.clone(),
            });
            path
        });
        let default_poll = Duration::from_secs(1);
        let mut poll_interval = self.duration(
            "store.poll_interval",
            raw.poll_interval.clone(),
            default_poll,
        );
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&poll_interval) {
            self.problem(
                "store.poll_interval",
                format!("{:?}", raw.poll_interval.unwrap_or_default()),
                "between \"100ms\" and \"60s\": a change whose notification was lost takes up to this long to reach a node",
            );
            poll_interval = default_poll;
            ok = false;
        }
        ok.then_some(StoreSettings {
            url: raw.url,
            pool_size,
            ca,
            poll_interval,
        })
    }

    pub(super) fn node(&mut self, raw: RawNode) -> Option<String> {
        let name = raw.name?;
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !valid {
            self.problem(
                "node.name",
                format!("{name:?}"),
                "1 to 64 letters, digits, '-', '_' or '.'",
            );
            return None;
        }
        Some(name)
    }

    fn acme(&mut self, raw: RawAcme) -> Option<AcmeSettings> {
        let mut ok = true;
        match raw.directory.parse::<http::Uri>() {
            Ok(u) if u.scheme_str() == Some("https") && u.host().is_some() => {}
            _ => {
                self.problem(
                    "acme.directory",
                    format!("{:?}", raw.directory),
                    "an https:// URL of an RFC 8555 directory, such as https://acme-v02.api.letsencrypt.org/directory (cleartext is never used)",
                );
                ok = false;
            }
        }
        for (i, c) in raw.contact.iter().enumerate() {
            let valid = c.strip_prefix("mailto:").is_some_and(|a| {
                a.contains('@') && !a.contains(|ch: char| ch.is_whitespace() || ch == ',')
            });
            if !valid {
                self.problem(
                    format!("acme.contact[{i}]"),
                    format!("{c:?}"),
                    "a mailto: address, such as mailto:ops@example.com",
                );
                ok = false;
            }
        }
        let directory_ca = raw.directory_ca.as_deref().map(|p| {
            let path = self.path(p);
            self.files.push(FileRef::Roots {
                key: "acme.directory_ca".into(),
                path: path.clone(),
            });
            path
        });
        let renew_before = match raw.renew_before {
            None => None,
            Some(text) => match humantime::parse_duration(&text) {
                Ok(d) if !d.is_zero() => Some(d),
                _ => {
                    self.problem(
                        "acme.renew_before",
                        format!("{text:?}"),
                        "a duration such as 30d or 12h, more than zero",
                    );
                    ok = false;
                    None
                }
            },
        };
        ok.then_some(AcmeSettings {
            directory: raw.directory,
            contact: raw.contact,
            directory_ca,
            renew_before,
        })
    }

    /// What `cert = "acme"` sites need from the rest of the config.
    fn acme_sites(&mut self, sites: &[Site], acme_present: bool, dns: Option<&DnsSettings>) {
        for (i, s) in sites.iter().enumerate() {
            let Some(challenge) = s.acme else { continue };
            let at = format!("site[{i}] ({:?})", s.host.to_string());
            if !acme_present {
                self.problem(
                    format!("{at}.cert"),
                    "\"acme\"",
                    "needs an [acme] section naming the CA's directory",
                );
            }
            let name = match &s.host {
                HostPattern::Exact(h) => h.as_str(),
                HostPattern::Wildcard(suffix) => suffix.as_str(),
            };
            match challenge {
                AcmeChallenge::TlsAlpn01 if matches!(s.host, HostPattern::Wildcard(_)) => {
                    self.problem(
                        format!("{at}.acme_challenge"),
                        "\"tls-alpn-01\"",
                        "CAs issue wildcard names through dns-01 only; set acme_challenge = \"dns-01\"",
                    );
                }
                AcmeChallenge::Dns01 => {
                    let served = dns.is_some_and(|d| {
                        d.zones
                            .iter()
                            .any(|z| name == z || name.ends_with(&format!(".{z}")))
                    });
                    if !served {
                        self.problem(
                            format!("{at}.acme_challenge"),
                            "\"dns-01\"",
                            format!(
                                "the built-in DNS server does not serve a zone holding _acme-challenge.{name}; add the zone to [dns] zones, or use tls-alpn-01"
                            ),
                        );
                    }
                }
                AcmeChallenge::TlsAlpn01 => {}
            }
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
        let mut delivery_timeout = self.duration(
            "exposure.delivery_timeout",
            raw.delivery_timeout.clone(),
            d.delivery_timeout,
        );
        if delivery_timeout > Duration::from_secs(300) {
            self.problem(
                "exposure.delivery_timeout",
                format!("{:?}", raw.delivery_timeout.unwrap_or_default()),
                "must be at most \"5m\": the events a node claims wait this long per delivery if it dies",
            );
            delivery_timeout = d.delivery_timeout;
        }
        ExposureSettings {
            per_site_per_minute,
            per_network_per_minute,
            max_queue,
            max_attempts,
            backoff_base: self.duration("exposure.backoff_base", raw.backoff_base, d.backoff_base),
            backoff_max: self.duration("exposure.backoff_max", raw.backoff_max, d.backoff_max),
            delivery_timeout,
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
        let quic_retry_above = match raw.quic_retry_above {
            None => d.quic_retry_above,
            Some(n @ 0..=10_000_000) => n as usize,
            Some(n) => {
                self.problem(
                    "edge.quic_retry_above",
                    n,
                    "must be between 0 (always ask new QUIC clients to prove their address) and 10000000",
                );
                d.quic_retry_above
            }
        };
        let response_headers = self.response_headers("edge", &raw.response_headers);
        EdgeSettings {
            quic_retry_above,
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
                http3: rp.http3.unwrap_or(true),
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
        // Where each host was first configured, so a duplicate is found without a scan.
        let mut seen: std::collections::HashMap<HostPattern, usize> =
            std::collections::HashMap::with_capacity(raw.len());
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
                if let Some(j) = seen.get(h) {
                    self.problem(
                        format!("{at}.host"),
                        format!("{:?}", rs.host),
                        format!("the same host is configured twice (also site[{j}])"),
                    );
                } else {
                    seen.insert(h.clone(), i);
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
            let (cert, acme) = self.site_source(&at, &rs, host.as_ref());
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
            let pool_http3 = pool.is_some_and(|p| pools[p].http3);
            if rs.http3 == Some(true) && !pool_http3 && pool.is_some() {
                self.problem(
                    format!("{at}.http3"),
                    "true",
                    format!(
                        "pool {:?} has http3 = false: it has no QUIC socket to serve the site on",
                        rs.pool
                    ),
                );
            }
            let http3 = pool_http3 && rs.http3.unwrap_or(true);
            if let (Some(host), Some(pool), Some(origin), Some(cleartext)) =
                (host, pool, origin, cleartext)
            {
                sites.push(Site {
                    host,
                    pool,
                    origin,
                    cleartext,
                    cert,
                    acme,
                    origin_ca,
                    hsts,
                    exposure,
                    response,
                    response_headers,
                    http3,
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

    /// A site's certificate: PEM files, `acme` with its challenge, or neither.
    fn site_source(
        &mut self,
        at: &str,
        rs: &RawSite,
        host: Option<&HostPattern>,
    ) -> (Option<CertFiles>, Option<AcmeChallenge>) {
        let is_acme = rs.cert.as_deref() == Some(Path::new("acme"));
        if !is_acme {
            if let Some(c) = &rs.acme_challenge {
                self.problem(
                    format!("{at}.acme_challenge"),
                    format!("{c:?}"),
                    "only for cert = \"acme\"",
                );
            }
            return (
                self.site_cert(at, rs.cert.as_deref(), rs.key.as_deref(), host),
                None,
            );
        }
        if let Some(k) = &rs.key {
            self.problem(
                format!("{at}.key"),
                format!("{:?}", k.display().to_string()),
                "cert = \"acme\" keeps its key in the state dir; remove key",
            );
        }
        let wildcard = matches!(host, Some(HostPattern::Wildcard(_)));
        let challenge = match rs.acme_challenge.as_deref() {
            None if wildcard => AcmeChallenge::Dns01,
            None | Some("tls-alpn-01") => AcmeChallenge::TlsAlpn01,
            Some("dns-01") => AcmeChallenge::Dns01,
            Some(other) => {
                self.problem(
                    format!("{at}.acme_challenge"),
                    format!("{other:?}"),
                    "use tls-alpn-01 or dns-01 (no challenge that needs cleartext is offered)",
                );
                AcmeChallenge::TlsAlpn01
            }
        };
        (None, Some(challenge))
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
