//! The data plane: one listener per pool address and port, TLS termination, cleartext modes,
//! HSTS and the reverse proxy to origins.
//!
//! The running configuration is an immutable [`Snapshot`] swapped atomically on reload; every
//! request reads the current one, so reloads never touch established connections. A closed
//! pool gets no cleartext socket at all: that absence is what makes the kernel refuse the
//! connection before a request byte is sent. This module never touches a store and never waits
//! on anything but the client and the origin. It starts nothing but its own listeners: the
//! analytics, the exposure queue and the stage plans it reads are handed to it by the root
//! (`runtime`), and it hands them observations.

mod capture;
mod conn;
mod host;
mod http;
mod listener;
mod proxy;
mod quic;
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

pub use crate::analytics::metrics::StatsSnapshot;
use crate::analytics::Analytics;
use crate::config::{Config, EdgeSettings, ListenerKind};
use crate::exposure::queue::Responder;
use crate::net::{Limits, Workers};
use crate::stages::drain::Drain;
use crate::stages::Plans;
use crate::tls::{DevCa, LiveCerts, Resumption, TlsError};

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
    /// TLS handshakes completed (QUIC's included).
    pub handshakes: AtomicU64,
    /// QUIC (HTTP/3) handshakes completed.
    pub quic_handshakes: AtomicU64,
    /// QUIC clients asked to prove their address with a Retry, under load.
    pub quic_retries: AtomicU64,
    /// Cleartext connections accepted on open pools.
    pub cleartext_connections: AtomicU64,
    /// Client connections open now.
    pub active_connections: std::sync::atomic::AtomicI64,
    /// HTTP/1.1 connections hibernating now: quiet between requests, holding no HTTP state.
    pub hibernating_connections: std::sync::atomic::AtomicI64,
    /// Connections that sent no complete request head within the header-read timeout.
    pub first_request_timeouts: AtomicU64,
    /// Connections asked to close (idle, shutdown) that were dropped for not closing in time.
    pub forced_closes: AtomicU64,
    /// Cleartext connections that ended inside a request head (refused by the parser, or never
    /// finished).
    pub malformed_requests: AtomicU64,
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
            quic_handshakes: r(&self.quic_handshakes),
            quic_retries: r(&self.quic_retries),
            cleartext_connections: r(&self.cleartext_connections),
            active_connections: self.active_connections.load(Ordering::Relaxed),
            hibernating_connections: self.hibernating_connections.load(Ordering::Relaxed),
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
    pub(crate) stages: ArcSwap<Plans>,
    /// The exposure response queue (notify, revoke); `None` with analytics off.
    pub(crate) responder: Option<Arc<Responder>>,
    /// Caps on client connections, over every listener and worker (`max_connections`,
    /// `max_connections_per_client`), fixed at start.
    pub(crate) limits: Arc<Limits>,
    /// Certificates swapped in place (ACME sites) and TLS-ALPN-01 challenges in progress.
    pub(crate) live: Arc<LiveCerts>,
    /// The server config of TLS-ALPN-01 validation handshakes.
    pub(crate) acme_validation: Arc<rustls::ServerConfig>,
    /// What the QUIC sockets keep across reloads.
    pub(crate) quic: quic::QuicState,
}

/// What the edge is handed at start: the parts it reads but does not own.
pub struct EdgeParts<'a> {
    /// Connection caps and timeouts; the caps are fixed at start.
    pub settings: &'a EdgeSettings,
    /// Where observations go; `None` when analytics is off.
    pub analytics: Option<Arc<Analytics>>,
    /// Where credentials seen in cleartext are sent for notify or revoke.
    pub responder: Option<Arc<Responder>>,
    /// The staged switch-off plans at start.
    pub stages: Plans,
    /// Runtimes that serve connections; `None`: the caller's runtime.
    pub workers: Option<&'a Workers>,
    /// ACME certificates and challenges, written by the ACME client.
    pub live: Arc<LiveCerts>,
}

/// The edge's connection caps. Without `max_connections`, the descriptor limit decides: each
/// client connection may hold an origin connection too, and a reserve is kept for listeners,
/// the store, DNS and the control plane.
fn connection_limits(edge: &EdgeSettings) -> Arc<Limits> {
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
    Limits::new(global, edge.max_connections_per_client)
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
    /// One accept loop per worker (one in all for QUIC).
    tasks: Vec<JoinHandle<()>>,
    /// A QUIC listener's endpoint, pointed at each new snapshot.
    quic: Option<quinn::Endpoint>,
}

/// A listener's bound sockets.
enum Sockets {
    /// One per worker; several share the address through SO_REUSEPORT.
    Tcp(Vec<std::net::TcpListener>),
    Udp(std::net::UdpSocket),
}

/// A running edge: listeners, the live snapshot and the connections they serve.
pub struct Edge {
    shared: Arc<Shared>,
    /// Accept loops by socket; the async mutex serialises reloads.
    listeners: Mutex<HashMap<(SocketAddr, ListenerKind), ListenerHandle>>,
}

impl Edge {
    /// An edge serving nothing yet: [`Edge::reload`] binds the listeners of a config.
    pub fn start(parts: EdgeParts<'_>) -> Result<Edge, EdgeError> {
        let resumption = Resumption::new()?;
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::empty(&resumption)?),
            stats: Stats::default(),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            resumption,
            dev_ca: std::sync::Mutex::new(None),
            workers: parts
                .workers
                .map(|w| w.handles().to_vec())
                .unwrap_or_default(),
            analytics: parts.analytics,
            responder: parts.responder,
            stages: ArcSwap::from_pointee(parts.stages),
            limits: connection_limits(parts.settings),
            acme_validation: crate::tls::acme_validation_config(parts.live.clone())?,
            live: parts.live,
            quic: quic::QuicState::default(),
        });
        Ok(Edge {
            shared,
            listeners: Mutex::new(HashMap::new()),
        })
    }

    /// Replaces the staged switch-off plans the requests read. Routes follow them at the next
    /// [`Edge::reload`].
    pub fn set_stages(&self, plans: Plans) {
        self.shared.stages.store(Arc::new(plans));
    }

    /// The live staged switch-off plans.
    pub fn stages(&self) -> Arc<Plans> {
        self.shared.stages.load_full()
    }

    /// Applies a validated config with the drains the root reconciled for it: binds new
    /// sockets, swaps the snapshot, closes removed sockets. On error nothing changes and the
    /// previous config keeps serving.
    pub async fn reload(&self, config: Arc<Config>, drains: Vec<Drain>) -> Result<(), EdgeError> {
        let mut listeners = self.listeners.lock().await;
        let generation = self.shared.snapshot.load().generation + 1;
        let snap = Snapshot::build(config, drains, generation, &self.shared)?;
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
                self.bind(*key).map_err(|source| bind_err(*key, source))?,
            ));
        }
        let snap = Arc::new(snap);
        self.shared.snapshot.store(snap.clone());
        for h in listeners.values() {
            if let Some(endpoint) = &h.quic {
                quic::update(&snap, endpoint);
            }
        }
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
            match self.bind(*key) {
                Ok(l) => bound.push((*key, l)),
                Err(source) => late_error = Some(bind_err(*key, source)),
            }
        }
        for (key, sockets) in bound {
            match self.start_listener(key, sockets, &snap) {
                Ok(h) => {
                    tracing::info!(addr = %key.0, kind = %key.1, "listening");
                    listeners.insert(key, h);
                }
                Err(source) => late_error = Some(bind_err(key, source)),
            }
        }
        match late_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// A TCP listener's sockets, one per worker, or a QUIC listener's UDP socket.
    fn bind(&self, key: (SocketAddr, ListenerKind)) -> std::io::Result<Sockets> {
        let n = self.shared.workers.len();
        match key.1 {
            ListenerKind::Quic => {
                crate::net::bind_udp(key.0, true, QUIC_RECEIVE_BUFFER).map(Sockets::Udp)
            }
            _ => (0..n.max(1))
                .map(|_| crate::net::bind_tcp(key.0, n > 1))
                .collect::<std::io::Result<_>>()
                .map(Sockets::Tcp),
        }
    }

    /// Starts the accept loops of bound sockets: TCP ones on every worker in turn, a QUIC
    /// endpoint (and the connections it drives) on the first.
    fn start_listener(
        &self,
        key: (SocketAddr, ListenerKind),
        sockets: Sockets,
        snap: &Snapshot,
    ) -> std::io::Result<ListenerHandle> {
        let stop = self.shared.shutdown.child_token();
        let spawn =
            |i: usize, f: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| {
                match self.shared.workers.get(i) {
                    Some(h) => h.spawn(f),
                    None => tokio::spawn(f),
                }
            };
        match sockets {
            Sockets::Tcp(sockets) => Ok(ListenerHandle {
                tasks: sockets
                    .into_iter()
                    .enumerate()
                    .map(|(i, l)| {
                        let accept =
                            listener::accept_loop(self.shared.clone(), key, l, stop.clone());
                        spawn(i, Box::pin(accept))
                    })
                    .collect(),
                stop,
                quic: None,
            }),
            Sockets::Udp(socket) => {
                let endpoint = {
                    let _rt = self.shared.workers.first().map(|h| h.enter());
                    quic::endpoint(snap, socket)?
                };
                let accept =
                    quic::accept_loop(self.shared.clone(), key, endpoint.clone(), stop.clone());
                Ok(ListenerHandle {
                    tasks: vec![spawn(0, Box::pin(accept))],
                    stop,
                    quic: Some(endpoint),
                })
            }
        }
    }

    /// The live snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// Pre-request event counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats_snapshot()
    }

    /// The edge's connection caps, with their refusal counters.
    pub fn limits(&self) -> &Arc<Limits> {
        &self.shared.limits
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
        tokio::time::timeout(grace, self.shared.tracker.wait())
            .await
            .is_ok()
    }
}

/// A QUIC socket's receive buffer: bursts of handshakes and of full-size packets from many
/// clients wait here while the endpoint catches up.
const QUIC_RECEIVE_BUFFER: usize = 4 << 20;

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
