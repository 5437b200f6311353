//! The data plane: one listener per pool address and port, TLS termination, cleartext modes,
//! HSTS and the reverse proxy to origins.
//!
//! The running configuration is an immutable [`Snapshot`] swapped atomically on reload; every
//! request reads the current one, so reloads never touch established connections. A closed
//! pool gets no cleartext socket at all: that absence is what makes the kernel refuse the
//! connection before a request byte is sent. This module never touches a store and never waits
//! on anything but the client and the origin.

mod capture;
mod http;
mod listener;
mod proxy;
mod snapshot;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::analytics::{Analytics, AnalyticsError};
use crate::config::{Config, ListenerKind};
use crate::net::Workers;
use crate::tls::{DevCa, Resumption, TlsError};

pub use listener::{parse_head, sniff, Sniff};
pub use snapshot::Snapshot;

/// Why the edge could not start or apply a config.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EdgeError {
    /// A listening socket could not be opened (address not local, port in use, no permission).
    #[error("cannot listen on {addr} ({kind}): {source}")]
    Bind {
        addr: SocketAddr,
        kind: ListenerKind,
        source: std::io::Error,
    },
    /// Certificates or the TLS configuration could not be prepared.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// An origin's TLS client could not be built.
    #[error("origin client for site {site}: {reason}")]
    Origin { site: String, reason: String },
    /// Analytics could not start (fingerprint key, access log).
    #[error(transparent)]
    Analytics(#[from] AnalyticsError),
    /// The DNS server could not start, or the zones could not be built.
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    /// The `/metrics` listener could not be opened.
    #[error("metrics listener {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Counters of events that happen before any request exists. The analytics module reads them.
#[derive(Debug, Default)]
pub struct Stats {
    /// Cleartext HTTP sent to a TLS port, answered with 400.
    pub cleartext_on_tls_port: AtomicU64,
    /// Bytes on a TLS port that were neither TLS nor HTTP; closed.
    pub garbage_on_tls_port: AtomicU64,
    /// Connections that sent nothing (or too little) within the handshake timeout.
    pub handshake_timeouts: AtomicU64,
    /// TLS handshakes that failed (bad ClientHello, no shared version or cipher, ...).
    pub handshake_failures: AtomicU64,
    /// ClientHellos whose SNI named no site on that address, or had none.
    pub unknown_sni: AtomicU64,
    /// TLS handshakes completed.
    pub handshakes: AtomicU64,
    /// Cleartext connections accepted on open pools.
    pub cleartext_connections: AtomicU64,
    /// Client connections open now.
    pub active_connections: std::sync::atomic::AtomicI64,
    /// Connections that sent no complete request head within the header-read timeout.
    pub first_request_timeouts: AtomicU64,
    /// Connections asked to close (idle, shutdown) that were dropped for not closing in time.
    pub forced_closes: AtomicU64,
    /// Cleartext connections that ended inside a request head (refused by the parser, or never
    /// finished).
    pub malformed_requests: AtomicU64,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub cleartext_on_tls_port: u64,
    pub garbage_on_tls_port: u64,
    pub handshake_timeouts: u64,
    pub handshake_failures: u64,
    pub unknown_sni: u64,
    pub handshakes: u64,
    pub cleartext_connections: u64,
    pub active_connections: i64,
    pub first_request_timeouts: u64,
    pub forced_closes: u64,
    pub malformed_requests: u64,
    /// Connections refused because the edge held `max_connections`.
    pub refused_global: u64,
    /// Connections refused because their address held `max_connections_per_client`.
    pub refused_per_client: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            cleartext_on_tls_port: r(&self.cleartext_on_tls_port),
            garbage_on_tls_port: r(&self.garbage_on_tls_port),
            handshake_timeouts: r(&self.handshake_timeouts),
            handshake_failures: r(&self.handshake_failures),
            unknown_sni: r(&self.unknown_sni),
            handshakes: r(&self.handshakes),
            cleartext_connections: r(&self.cleartext_connections),
            active_connections: self.active_connections.load(Ordering::Relaxed),
            first_request_timeouts: r(&self.first_request_timeouts),
            forced_closes: r(&self.forced_closes),
            malformed_requests: r(&self.malformed_requests),
            refused_global: 0,
            refused_per_client: 0,
        }
    }
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// State every task of the edge shares.
pub(crate) struct Shared {
    /// The live config; swapped whole on reload.
    pub(crate) snapshot: ArcSwap<Snapshot>,
    pub(crate) stats: Stats,
    /// Cancelled once at shutdown: listeners stop accepting, connections drain.
    pub(crate) shutdown: CancellationToken,
    /// Every listener and connection task, so shutdown can wait for them.
    pub(crate) tracker: TaskTracker,
    /// Session cache and ticket keys kept across reloads, so resumption survives them.
    resumption: Resumption,
    /// Opened on first need: only sites without a configured certificate use it.
    dev_ca: std::sync::Mutex<Option<Arc<DevCa>>>,
    /// Runtimes that run accept loops and connections; empty means the caller's runtime.
    workers: Vec<tokio::runtime::Handle>,
    /// `None` when `[analytics] enabled = false`.
    pub(crate) analytics: Option<Arc<Analytics>>,
    /// Staged switch-off plans by site, read per cleartext request.
    pub(crate) stages: ArcSwap<crate::stages::Plans>,
    /// The exposure response queue; set once at start, with analytics.
    pub(crate) responder: std::sync::OnceLock<Arc<crate::exposure::queue::Responder>>,
    /// Caps on client connections, over every listener and worker (`max_connections`,
    /// `max_connections_per_client`), fixed at start.
    pub(crate) limits: Arc<crate::net::Limits>,
    /// The caps of the listeners the edge starts beside its own (DNS over TCP, metrics), by
    /// listener name, for `/metrics`.
    pub(crate) side_limits: std::sync::Mutex<Vec<(&'static str, Arc<crate::net::Limits>)>>,
}

/// The edge's connection caps. Without `max_connections`, the descriptor limit decides: each
/// client connection may hold an origin connection too, and a reserve is kept for listeners,
/// the store, DNS and the control plane.
fn connection_limits(edge: &crate::config::EdgeSettings) -> Arc<crate::net::Limits> {
    const RESERVE: u64 = 200;
    let global = edge.max_connections.unwrap_or_else(|| {
        let nofile = crate::net::nofile_limit().min(1 << 24);
        (nofile.saturating_sub(RESERVE) / 2).max(32) as usize
    });
    tracing::info!(
        max_connections = global,
        max_connections_per_client = edge.max_connections_per_client,
        "edge connection caps"
    );
    crate::net::Limits::new(global, edge.max_connections_per_client)
}

impl Shared {
    fn stats_snapshot(&self) -> StatsSnapshot {
        let mut s = self.stats.snapshot();
        s.refused_global = self.limits.refused_global.load(Ordering::Relaxed);
        s.refused_per_client = self.limits.refused_per_client.load(Ordering::Relaxed);
        s
    }

    /// How many accept loops (and origin client pools) each listener gets.
    pub(crate) fn worker_count(&self) -> usize {
        self.workers.len().max(1)
    }
}

struct ListenerHandle {
    stop: CancellationToken,
    /// One accept loop per worker.
    tasks: Vec<JoinHandle<()>>,
}

/// A running edge: listeners, the live snapshot and the connections they serve.
pub struct Edge {
    shared: Arc<Shared>,
    /// Accept loops by socket; the async mutex serialises reloads.
    listeners: Mutex<HashMap<(SocketAddr, ListenerKind), ListenerHandle>>,
}

impl Edge {
    /// Binds every listener of `config` and starts serving on the caller's runtime. Fails
    /// without side effects if any socket cannot be bound.
    pub async fn start(config: Config) -> Result<Edge, EdgeError> {
        Edge::start_on(config, None).await
    }

    /// Like [`Edge::start`], with connections served on `workers` when given.
    pub async fn start_on(config: Config, workers: Option<&Workers>) -> Result<Edge, EdgeError> {
        let resumption = Resumption::new()?;
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::empty(&resumption)?),
            stats: Stats::default(),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            resumption,
            dev_ca: std::sync::Mutex::new(None),
            workers: workers.map(|w| w.handles().to_vec()).unwrap_or_default(),
            analytics: match config.analytics.enabled {
                true => Some(Analytics::start(
                    &config,
                    workers.map_or(1, |w| w.handles().len()),
                )?),
                false => None,
            },
            responder: std::sync::OnceLock::new(),
            stages: ArcSwap::from_pointee(crate::stages::load(&config.state_dir)),
            limits: connection_limits(&config.edge),
            side_limits: std::sync::Mutex::new(Vec::new()),
        });
        if config.analytics.enabled {
            // The worker finds each site's live policy through the snapshot; a weak reference
            // keeps the edge and its queue from owning each other.
            let weak = Arc::downgrade(&shared);
            let policies: crate::exposure::queue::PolicySource = Arc::new(move |host: &str| {
                let shared = weak.upgrade()?;
                let snap = shared.snapshot.load();
                snap.sites.iter().find(|s| s.name == host)?.response.clone()
            });
            let r = crate::exposure::queue::Responder::start(
                config.exposure.clone(),
                &config.state_dir,
                policies,
            );
            let _ = shared.responder.set(r);
        }
        let edge = Edge {
            shared,
            listeners: Mutex::new(HashMap::new()),
        };
        let metrics = config.metrics.clone();
        let dns = config.dns.clone();
        let state_dir = config.state_dir.clone();
        edge.reload(config).await?;
        if let Some(m) = metrics {
            edge.start_metrics(&m, &state_dir)?;
        }
        if let Some(d) = dns {
            let handler = crate::dns::DnsHandler::for_edge(edge.view());
            let limits =
                crate::dns::start(d.listen, handler, edge.shared.shutdown.child_token()).await?;
            crate::lock(&edge.shared.side_limits).push(("dns", limits));
        }
        Ok(edge)
    }

    fn start_metrics(
        &self,
        m: &crate::config::MetricsSettings,
        state_dir: &std::path::Path,
    ) -> Result<(), EdgeError> {
        let ck = match &m.cert {
            Some(files) => crate::tls::load_cert_files(files)?,
            None => self
                .shared
                .dev_ca(state_dir)?
                .certificate_for(&m.listen.ip().to_string())?,
        };
        let tls = tokio_rustls::TlsAcceptor::from(crate::tls::single_cert_config(ck)?);
        let metrics_err = |source| EdgeError::Metrics {
            addr: m.listen,
            source,
        };
        let std_listener = listener::bind(m.listen, false).map_err(metrics_err)?;
        let l = tokio::net::TcpListener::from_std(std_listener).map_err(metrics_err)?;
        tracing::info!(addr = %m.listen, "serving /metrics over TLS");
        // Prometheus scrapes over one connection; a few more for people and tests.
        let limits = crate::net::Limits::new(16, 8);
        crate::lock(&self.shared.side_limits).push(("metrics", limits.clone()));
        tokio::spawn(crate::analytics::metrics::serve(
            l,
            tls,
            limits,
            self.view(),
            self.shared.shutdown.child_token(),
        ));
        Ok(())
    }

    /// Replaces the staged switch-off plans (already saved) and rebuilds routes for them.
    pub async fn set_stages(&self, plans: crate::stages::Plans) -> Result<(), EdgeError> {
        self.shared.stages.store(Arc::new(plans));
        let config = (*self.shared.snapshot.load().config).clone();
        self.reload(config).await
    }

    /// The live staged switch-off plans.
    pub fn stages(&self) -> Arc<crate::stages::Plans> {
        self.shared.stages.load_full()
    }

    /// A read-only handle on the edge's counters and analytics, for reporting.
    pub fn view(&self) -> EdgeView {
        EdgeView(self.shared.clone())
    }

    /// Applies a validated config: binds new sockets, swaps the snapshot, closes removed
    /// sockets. On error nothing changes and the previous config keeps serving.
    pub async fn reload(&self, config: Config) -> Result<(), EdgeError> {
        let mut listeners = self.listeners.lock().await;
        let generation = self.shared.snapshot.load().generation + 1;
        let snap = Snapshot::build(config, generation, &self.shared)?;
        let wanted = snap.listener_keys();
        let removed: Vec<_> = listeners
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        let freed: Vec<SocketAddr> = removed.iter().map(|(a, _)| *a).collect();
        // Sockets whose address a removed listener still holds (a port switching between TLS
        // and cleartext) can only be bound once that listener is gone.
        let (later, now): (Vec<&(SocketAddr, ListenerKind)>, Vec<_>) = wanted
            .iter()
            .filter(|k| !listeners.contains_key(k))
            .partition(|(a, _)| freed.contains(a));
        let mut bound = Vec::new();
        for key in now {
            bound.push((
                *key,
                self.bind(key.0).map_err(|source| bind_err(*key, source))?,
            ));
        }
        self.shared.snapshot.store(Arc::new(snap));
        for key in removed {
            if let Some(h) = listeners.remove(&key) {
                h.stop.cancel();
                for t in h.tasks {
                    let _ = t.await;
                }
                tracing::info!(addr = %key.0, kind = %key.1, "stopped listening");
            }
        }
        let mut late_error = None;
        for key in later {
            match self.bind(key.0) {
                Ok(l) => bound.push((*key, l)),
                Err(source) => late_error = Some(bind_err(*key, source)),
            }
        }
        for (key, sockets) in bound {
            tracing::info!(addr = %key.0, kind = %key.1, "listening");
            let stop = self.shared.shutdown.child_token();
            let tasks = sockets
                .into_iter()
                .enumerate()
                .map(|(i, l)| {
                    let accept = listener::accept_loop(self.shared.clone(), key, l, stop.clone());
                    match self.shared.workers.get(i) {
                        Some(h) => h.spawn(accept),
                        None => tokio::spawn(accept),
                    }
                })
                .collect();
            listeners.insert(key, ListenerHandle { stop, tasks });
        }
        match late_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// One socket per worker; several share the address through SO_REUSEPORT.
    fn bind(&self, addr: SocketAddr) -> std::io::Result<Vec<std::net::TcpListener>> {
        let n = self.shared.workers.len();
        (0..n.max(1)).map(|_| listener::bind(addr, n > 1)).collect()
    }

    /// The live snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// Pre-request event counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats_snapshot()
    }

    /// Sockets currently listening.
    pub async fn listening(&self) -> Vec<(SocketAddr, ListenerKind)> {
        let mut v: Vec<_> = self.listeners.lock().await.keys().copied().collect();
        v.sort();
        v
    }

    /// The development CA's certificate path, if any site uses it.
    pub fn dev_ca_path(&self) -> Option<std::path::PathBuf> {
        self.shared
            .dev_ca
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|ca| ca.ca_path())
    }

    /// Stops accepting, asks every connection to finish its in-flight requests, and waits up to
    /// `grace` for them. Returns whether everything drained in time.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.shared.shutdown.cancel();
        let listeners = std::mem::take(&mut *self.listeners.lock().await);
        for (_, h) in listeners {
            for t in h.tasks {
                let _ = t.await;
            }
        }
        self.shared.tracker.close();
        let drained = tokio::time::timeout(grace, self.shared.tracker.wait())
            .await
            .is_ok();
        if let Some(a) = &self.shared.analytics {
            a.shutdown().await;
        }
        if let Some(r) = self.shared.responder.get() {
            r.shutdown().await;
        }
        drained
    }
}

/// What reporting code (metrics, admin) may see of a running edge.
#[derive(Clone)]
pub struct EdgeView(Arc<Shared>);

impl EdgeView {
    pub fn stats(&self) -> StatsSnapshot {
        self.0.stats_snapshot()
    }

    /// Connections refused by a cap, as (listener, reason, count): the edge's, then those of
    /// the listeners it started (DNS over TCP, metrics).
    pub fn refusals(&self) -> Vec<(&'static str, &'static str, u64)> {
        let mut out = Vec::new();
        let mut add = |listener, l: &crate::net::Limits| {
            out.push((
                listener,
                "max_connections",
                l.refused_global.load(Ordering::Relaxed),
            ));
            out.push((
                listener,
                "max_connections_per_client",
                l.refused_per_client.load(Ordering::Relaxed),
            ));
        };
        add("edge", &self.0.limits);
        for (name, l) in crate::lock(&self.0.side_limits).iter() {
            add(name, l);
        }
        out
    }

    pub fn analytics(&self) -> Option<&Analytics> {
        self.0.analytics.as_deref()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.0.snapshot.load_full()
    }
}

fn bind_err(key: (SocketAddr, ListenerKind), source: std::io::Error) -> EdgeError {
    EdgeError::Bind {
        addr: key.0,
        kind: key.1,
        source,
    }
}

impl Shared {
    /// The development CA, opened on first use.
    pub(crate) fn dev_ca(&self, dir: &std::path::Path) -> Result<Arc<DevCa>, TlsError> {
        let mut slot = self.dev_ca.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ca) = slot.as_ref() {
            return Ok(ca.clone());
        }
        let ca = Arc::new(DevCa::open(dir)?);
        *slot = Some(ca.clone());
        Ok(ca)
    }
}
