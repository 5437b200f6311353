//! The immutable runtime view of one config: routing tables per pool, the TLS server config,
//! origin clients and precomputed header values. Built once per apply, then only read: a
//! request never locks or changes it, and building it never touches a store or a socket.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderValue;
use rustls::ServerConfig;

use super::proxy::OriginClient;
use super::{EdgeError, Shared};
use crate::analytics::aggregate::SiteId;
use crate::config::{CleartextMode, Config, HostPattern, ListenerKind};
use crate::exposure::ExtraPositions;
use crate::stages::drain::Drain;
use crate::tls::{self, SniCerts};

/// One config made ready to serve.
pub struct Snapshot {
    /// The validated config this was built from.
    pub config: Arc<Config>,
    /// Increases by one on each successful reload.
    pub generation: u64,
    pub(crate) tls: Arc<ServerConfig>,
    /// The QUIC sockets' config (same certificates, ALPN h3, the edge's timeouts); `None`
    /// without any QUIC socket.
    pub(crate) quic: Option<quinn::ServerConfig>,
    /// `Alt-Svc: h3=":PORT"; ma=86400` by the address of every QUIC socket: what TLS
    /// connections to the same address and port advertise.
    alt_svc: HashMap<SocketAddr, HeaderValue>,
    pub(crate) pools: Vec<PoolRoutes>,
    pub(crate) sites: Vec<SiteRuntime>,
    pub(crate) listeners: BTreeMap<(SocketAddr, ListenerKind), usize>,
    /// Sites still served on the open pool they moved away from.
    pub(crate) drains: Vec<Drain>,
}

/// Which site answers a hostname on one pool's addresses.
#[derive(Default)]
pub(crate) struct PoolRoutes {
    pub(crate) name: String,
    /// Index into `Config::pools`.
    pub(crate) index: usize,
    exact: HostMap,
    wildcard: HostMap,
}

/// Looked up once per request with the client's hostname; the keys are the configured ones.
type HostMap = HashMap<String, usize, foldhash::fast::RandomState>;

impl PoolRoutes {
    /// The site index for a lowercase hostname.
    pub(crate) fn find(&self, host: &str) -> Option<usize> {
        if let Some(i) = self.exact.get(host) {
            return Some(*i);
        }
        let (label, rest) = host.split_once('.')?;
        if label.is_empty() {
            return None;
        }
        self.wildcard.get(rest).copied()
    }
}

/// A site with everything a request needs, prepared once per snapshot.
pub(crate) struct SiteRuntime {
    pub(crate) host: HostPattern,
    /// `host` as text, made once: stage plans and exposure events are keyed by it.
    pub(crate) name: String,
    pub(crate) mode: CleartextMode,
    /// `Strict-Transport-Security` value, `None` when disabled.
    pub(crate) hsts: Option<HeaderValue>,
    /// The TLS port of the site's pool that redirects point at.
    pub(crate) redirect_port: u16,
    pub(crate) origin: OriginClient,
    /// The analytics id of the site's name (0 when analytics is off).
    pub(crate) id: SiteId,
    /// Credential positions searched beyond the defaults.
    pub(crate) exposure: ExtraPositions,
    /// The pool the site is configured on.
    pub(crate) pool: usize,
    /// Set while the site is still served on the open pool it moved away from.
    pub(crate) drain: Option<Drain>,
    /// The exposure response (notify or revoke), if any.
    pub(crate) response: Option<Arc<crate::config::ExposureResponse>>,
    /// Set on every TLS answer of the site (`response_headers`).
    pub(crate) response_headers: crate::config::ResponseHeaders,
    /// Served over HTTP/3 too: Alt-Svc on its TLS answers, its name accepted over QUIC.
    pub(crate) http3: bool,
}

impl SiteRuntime {
    /// The cleartext mode on pool `pool` at `now`: the site's own on its pool; on the pool it
    /// left, the previous mode until the drain deadline, then reject.
    pub(crate) fn mode_on(&self, pool: usize, now: crate::clock::Timestamp) -> CleartextMode {
        if pool == self.pool {
            return self.mode;
        }
        self.drain
            .as_ref()
            .map_or(CleartextMode::Reject, |d| d.mode_at(now))
    }
}

impl Snapshot {
    /// A snapshot serving nothing, in place until the first config is applied.
    pub(crate) fn empty(resumption: &tls::Resumption) -> Result<Snapshot, EdgeError> {
        Ok(Snapshot {
            config: Arc::new(Config::default()),
            generation: 0,
            tls: tls::server_config(SniCerts::default(), resumption)?,
            quic: None,
            alt_svc: HashMap::new(),
            pools: Vec::new(),
            sites: Vec::new(),
            listeners: BTreeMap::new(),
            drains: Vec::new(),
        })
    }

    pub(crate) fn build(
        config: Arc<Config>,
        drains: Vec<Drain>,
        generation: u64,
        shared: &Shared,
    ) -> Result<Snapshot, EdgeError> {
        let mut certs = SniCerts::default();
        let mut pools: Vec<PoolRoutes> = config
            .pools
            .iter()
            .enumerate()
            .map(|(index, p)| PoolRoutes {
                name: p.name.clone(),
                index,
                ..Default::default()
            })
            .collect();
        let mut sites = Vec::with_capacity(config.sites.len());
        // Sites served from the development CA: one warning per apply, not one per site.
        let mut dev_ca_sites: Vec<&HostPattern> = Vec::new();
        let mut connectors = super::proxy::Connectors::default();
        for (i, site) in config.sites.iter().enumerate() {
            match (&site.cert, site.acme) {
                (Some(files), _) => certs.insert(&site.host, tls::load_cert_files(files)?),
                (None, Some(_)) => {
                    // Until the CA issues one (or one is loaded from the state dir), the
                    // development CA's; the ACME client swaps the slot in place.
                    let slot = shared.live.slot(&site.host.to_string(), || {
                        let ca = shared.dev_ca(&config.state_dir)?;
                        tracing::warn!(
                            site = %site.host,
                            "no ACME certificate yet: serving one from the development CA until the first issuance"
                        );
                        ca.certificate(&site.host)
                    })?;
                    certs.insert_live(&site.host, slot);
                }
                (None, None) => {
                    let ca = shared.dev_ca(&config.state_dir)?;
                    dev_ca_sites.push(&site.host);
                    certs.insert(&site.host, ca.certificate(&site.host)?);
                }
            }
            let routes = &mut pools[site.pool];
            match &site.host {
                HostPattern::Exact(h) => routes.exact.insert(h.clone(), i),
                HostPattern::Wildcard(s) => routes.wildcard.insert(s.clone(), i),
            };
            let hsts = site
                .hsts
                .as_ref()
                .map(|h| HeaderValue::from_str(&h.header_value()))
                .transpose()
                .map_err(|e| EdgeError::Origin {
                    site: site.host.to_string(),
                    reason: format!("HSTS header: {e}"),
                })?;
            sites.push(SiteRuntime {
                id: shared
                    .analytics
                    .as_ref()
                    .map_or(0, |a| a.site_id(&site.host.to_string())),
                exposure: site.exposure.clone(),
                response_headers: site.response_headers.clone(),
                pool: site.pool,
                drain: None,
                response: site.response.clone().map(Arc::new),
                name: site.host.to_string(),
                host: site.host.clone(),
                mode: site.cleartext,
                hsts,
                redirect_port: config.pools[site.pool].redirect_port(),
                http3: site.http3,
                origin: OriginClient::new(
                    site,
                    &config.edge,
                    shared.worker_count(),
                    &mut connectors,
                )
                .map_err(|reason| EdgeError::Origin {
                    site: site.host.to_string(),
                    reason,
                })?,
            });
        }
        if !dev_ca_sites.is_empty() {
            let ca = shared.dev_ca(&config.state_dir)?;
            let shown: Vec<String> = dev_ca_sites.iter().take(5).map(|h| h.to_string()).collect();
            tracing::warn!(
                sites = dev_ca_sites.len(),
                names = %shown.join(", "),
                ca = %ca.ca_path().display(),
                "no cert configured: serving certificates from the development CA, which clients do not trust unless told to"
            );
        }
        let tls = tls::server_config(certs, &shared.resumption)?;
        let listeners = config.listeners();
        // A site being staged toward a closed pool is served over TLS there already, so the
        // readiness probe and early clients can use it before the move.
        for (host, plan) in shared.stages.load().iter() {
            let target = plan
                .target_pool
                .as_deref()
                .and_then(|t| config.pools.iter().position(|p| p.name == t));
            let site = config
                .sites
                .iter()
                .position(|s| s.host.to_string() == *host);
            if let (Some(t), Some(i)) = (target, site) {
                if config.sites[i].pool != t {
                    let routes = &mut pools[t];
                    match &config.sites[i].host {
                        HostPattern::Exact(h) => routes.exact.entry(h.clone()).or_insert(i),
                        HostPattern::Wildcard(w) => routes.wildcard.entry(w.clone()).or_insert(i),
                    };
                }
            }
        }
        for d in &drains {
            let site = config
                .sites
                .iter()
                .position(|s| s.host.to_string() == d.site);
            let from = config.pools.iter().position(|p| p.name == d.from_pool);
            if let (Some(i), Some(from)) = (site, from) {
                sites[i].drain = Some(d.clone());
                let routes = &mut pools[from];
                match &config.sites[i].host {
                    HostPattern::Exact(h) => routes.exact.entry(h.clone()).or_insert(i),
                    HostPattern::Wildcard(w) => routes.wildcard.entry(w.clone()).or_insert(i),
                };
            }
        }
        let alt_svc: HashMap<SocketAddr, HeaderValue> = listeners
            .keys()
            .filter(|(_, kind)| *kind == ListenerKind::Quic)
            .filter_map(|(addr, _)| {
                let v = HeaderValue::from_str(&format!("h3=\":{}\"; ma=86400", addr.port()));
                Some((*addr, v.ok()?))
            })
            .collect();
        let quic = match alt_svc.is_empty() {
            true => None,
            false => Some(
                shared
                    .quic
                    .server_config(tls::quic_server_config(&tls)?, &config.edge),
            ),
        };
        Ok(Snapshot {
            config,
            generation,
            tls,
            quic,
            alt_svc,
            pools,
            sites,
            listeners,
            drains,
        })
    }

    /// Sites still served on the pool they left.
    pub fn drains(&self) -> &[Drain] {
        &self.drains
    }

    /// The site a lowercase name reaches on a listener, if any.
    pub(crate) fn site_on(
        &self,
        key: &(SocketAddr, ListenerKind),
        name: &str,
    ) -> Option<&SiteRuntime> {
        let pool = self.pools.get(*self.listeners.get(key)?)?;
        self.sites.get(pool.find(name)?)
    }

    /// The `Alt-Svc` value a connection to `addr` advertises: there is a QUIC socket on the
    /// same address and port.
    pub(crate) fn alt_svc(&self, addr: SocketAddr) -> Option<HeaderValue> {
        self.alt_svc.get(&addr).cloned()
    }

    pub(crate) fn listener_keys(&self) -> Vec<(SocketAddr, ListenerKind)> {
        self.listeners.keys().copied().collect()
    }

    /// The pool serving a listener, or, for a connection whose listener was removed by a
    /// reload, the pool it was accepted for (by name).
    pub(crate) fn pool_for(
        &self,
        key: &(SocketAddr, ListenerKind),
        name: &str,
    ) -> Option<&PoolRoutes> {
        match self.listeners.get(key) {
            Some(i) => self.pools.get(*i),
            None => self.pools.iter().find(|p| p.name == name),
        }
    }
}
