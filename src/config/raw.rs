//! The config file's schema: one serde struct per TOML table, exactly as the operator writes
//! it. Unknown keys are rejected (`deny_unknown_fields`), so a misspelt key is a parse error
//! that names it instead of a setting silently ignored.
//!
//! This file owns the shape of the text and nothing else: no defaults beyond "absent", no
//! checks, no conversions (those are `validate`'s), and it never reads a file, binds, starts a
//! task or opens a certificate. Like all of `config`, it imports nothing else of this crate.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) state: RawState,
    #[serde(default)]
    pub(super) edge: RawEdge,
    #[serde(default)]
    pub(super) pool: Vec<RawPool>,
    #[serde(default)]
    pub(super) site: Vec<RawSite>,
    #[serde(default)]
    pub(super) analytics: RawAnalytics,
    #[serde(default)]
    pub(super) readiness: RawReadiness,
    pub(super) metrics: Option<RawMetrics>,
    pub(super) dns: Option<RawDns>,
    pub(super) admin: Option<RawAdmin>,
    #[serde(default)]
    pub(super) exposure: RawExposure,
    #[serde(default)]
    pub(super) firewall: RawFirewall,
    pub(super) acme: Option<RawAcme>,
    pub(super) store: Option<RawStore>,
    #[serde(default)]
    pub(super) node: RawNode,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) url: String,
    pub(super) pool_size: Option<i64>,
    pub(super) ca: Option<PathBuf>,
    pub(super) poll_interval: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    pub(super) name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAcme {
    pub(super) directory: String,
    #[serde(default)]
    pub(super) contact: Vec<String>,
    pub(super) directory_ca: Option<PathBuf>,
    pub(super) renew_before: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFirewall {
    pub(super) manage: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: String,
    /// Accepted only as `true`: the admin plane never listens in cleartext.
    pub(super) tls: Option<bool>,
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
    pub(super) read_only_token_sha256: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    pub(super) listen: String,
    pub(super) zones: Vec<String>,
    pub(super) ttl: Option<i64>,
    #[serde(default)]
    pub(super) nameservers: Vec<String>,
    pub(super) hostmaster: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnalytics {
    pub(super) enabled: Option<bool>,
    pub(super) flush_interval: Option<String>,
    pub(super) minute_retention: Option<String>,
    pub(super) hour_retention: Option<String>,
    pub(super) top_k: Option<i64>,
    pub(super) access_log: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReadiness {
    pub(super) max_cleartext_percent: Option<f64>,
    pub(super) max_exposed_credentials: Option<i64>,
    pub(super) window: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: String,
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    pub(super) dir: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEdge {
    pub(super) handshake_timeout: Option<String>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) origin_connect_timeout: Option<String>,
    pub(super) origin_response_timeout: Option<String>,
    pub(super) origin_idle_timeout: Option<String>,
    pub(super) shutdown_grace: Option<String>,
    pub(super) max_header_bytes: Option<i64>,
    pub(super) close_timeout: Option<String>,
    pub(super) max_connections: Option<i64>,
    pub(super) max_connections_per_client: Option<i64>,
    pub(super) quic_retry_above: Option<i64>,
    #[serde(default)]
    pub(super) response_headers: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    pub(super) name: String,
    pub(super) addresses: Vec<String>,
    pub(super) tls_ports: Vec<i64>,
    #[serde(default)]
    pub(super) cleartext_ports: Vec<i64>,
    pub(super) http3: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSite {
    pub(super) host: String,
    pub(super) pool: String,
    pub(super) origin: String,
    pub(super) cleartext: Option<String>,
    /// A PEM path, or `acme`.
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
    pub(super) acme_challenge: Option<String>,
    pub(super) origin_ca: Option<PathBuf>,
    pub(super) hsts: Option<RawHsts>,
    #[serde(default)]
    pub(super) exposure_headers: Vec<String>,
    #[serde(default)]
    pub(super) exposure_params: Vec<String>,
    #[serde(default)]
    pub(super) exposure_cookies: Vec<String>,
    #[serde(default)]
    pub(super) exposure_paths: Vec<String>,
    #[serde(default)]
    pub(super) response_headers: std::collections::BTreeMap<String, String>,
    pub(super) exposure_response: Option<String>,
    pub(super) webhook: Option<RawWebhook>,
    pub(super) http3: Option<bool>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    pub(super) url: String,
    pub(super) secret_file: PathBuf,
    pub(super) ca: Option<PathBuf>,
    #[serde(default)]
    pub(super) include_raw: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExposure {
    pub(super) per_site_per_minute: Option<i64>,
    pub(super) per_network_per_minute: Option<i64>,
    pub(super) max_queue: Option<i64>,
    pub(super) max_attempts: Option<i64>,
    pub(super) scan_body_bytes: Option<i64>,
    pub(super) backoff_base: Option<String>,
    pub(super) backoff_max: Option<String>,
    pub(super) delivery_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHsts {
    pub(super) enabled: Option<bool>,
    pub(super) max_age: Option<i64>,
    pub(super) include_subdomains: Option<bool>,
    pub(super) preload: Option<bool>,
}
