//! The composition root: it loads the config, starts every part of the program as a peer
//! (analytics, the exposure queue, the edge, DNS, `/metrics`, the admin plane, the firewall
//! counters), hands each only what it needs, and owns the one [`Runtime::apply`] through which
//! every new config passes, whether it comes from SIGHUP, the admin API or a stage change, and
//! the shutdown order.
//!
//! No other module starts another: the edge gets its analytics and queue from here, DNS gets a
//! view of the live zones, `/metrics` and the admin plane get narrow traits
//! ([`crate::analytics::metrics::Counters`], [`crate::admin::Control`]) implemented here.

mod serve;
mod source;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use serve::{foreign_listeners, run_until_signal, serve, Signals};
pub use source::{load, node_name, open_store, open_store_read, ConfigSource};

use crate::acme::{Acme, AcmeParts};
use crate::admin::{Admin, Control, ControlError};
use crate::analytics::metrics::{Counters, StatsSnapshot};
use crate::analytics::{Analytics, AnalyticsError};
use crate::config::{Config, ConfigError, ListenerKind, Overrides};
use crate::dns::{DnsError, DnsHandler, Zones};
use crate::edge::{Edge, EdgeError, EdgeParts};
use crate::exposure::queue::{PolicySource, Responder};
use crate::net::{Limits, Workers};
use crate::stages::drain::{self, Drain};
use crate::stages::Plans;
use crate::store::{EventQueue, Store};
use crate::tls::LiveCerts;

/// Why the program could not start, or a config could not be applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Edge(#[from] EdgeError),
    #[error(transparent)]
    Analytics(#[from] AnalyticsError),
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    #[error(transparent)]
    Firewall(#[from] crate::firewall::FirewallError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The `/metrics` listener could not be opened.
    #[error("metrics listener {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// TTL assumed for the old answers of a moved site when the built-in DNS is not configured.
pub const DEFAULT_DRAIN_TTL: u32 = 300;

/// The running program.
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    /// Where the config comes from, to reload it (SIGHUP) or re-validate it with overrides.
    source: ConfigSource,
    state_dir: PathBuf,
    /// Overrides, plans, drains and the audit log.
    store: Arc<dyn Store>,
    /// The overrides applied last (the store holds the same).
    overrides: Mutex<Overrides>,
    /// The config applied last; the exposure queue reads each site's response policy here.
    config: Arc<ArcSwap<Config>>,
    edge: Edge,
    /// Orders and renews the certificates of `cert = "acme"` sites.
    acme: Arc<Acme>,
    analytics: Option<Arc<Analytics>>,
    responder: Option<Arc<Responder>>,
    /// DNS answers of the applied config, read by the DNS server per query.
    zones: Arc<ZoneView>,
    /// Caps of the listeners started beside the edge (DNS over TCP, metrics), for `/metrics`.
    side_limits: Mutex<Vec<(&'static str, Arc<Limits>)>>,
    /// Serialises applies: each reconciles drains and listeners against the one before.
    applying: tokio::sync::Mutex<()>,
    /// The drains read at start (from the store, or the last-known-good copy), for the first apply.
    start_drains: Mutex<Option<Vec<crate::stages::drain::Drain>>>,
    /// Whether the store is shared (PostgreSQL): then a last-known-good copy is kept locally.
    shared_store: bool,
    /// How often the follower reads the store's generation (`[store] poll_interval`).
    poll_every: Duration,
    /// Whether the store answered its last query.
    store_up: std::sync::atomic::AtomicBool,
    /// `[node] name`, or the host name.
    node: String,
    started_at: crate::clock::Timestamp,
    /// Cancelled at shutdown: DNS, metrics, the admin plane and background tasks stop.
    stop: CancellationToken,
    /// The metrics and admin listeners and the background tasks, so shutdown can wait until
    /// their sockets are closed.
    tasks: TaskTracker,
    admin: OnceLock<Admin>,
}

impl Runtime {
    /// Opens the store of the config's state directory, loads the config from `source` with
    /// the overrides kept there, and starts everything it describes. Connections are served on
    /// `workers` when given.
    pub async fn start(
        source: ConfigSource,
        workers: Option<&Workers>,
    ) -> Result<Runtime, RuntimeError> {
        let state_dir = source.state_dir()?;
        let store = source::open_store(&source).await?;
        let shared = source.store_settings()?.0.is_some();
        // A shared store may be down: the node then starts from the policy it applied last.
        let policy = async {
            Ok::<_, crate::store::StoreError>(source::LastKnownGood {
                overrides: store.overrides().await?,
                stages: store.stages().await?,
                drains: store.drains().await?,
            })
        }
        .await;
        let (policy, store_up) = match policy {
            Ok(p) => (p, true),
            Err(e @ crate::store::StoreError::Postgres { .. }) if shared => {
                let lkg = source::LastKnownGood::read(&state_dir);
                tracing::warn!(error = %e, last_known_good = lkg.is_some(), "the shared store is unreachable: serving the last-known-good policy until it is back");
                (lkg.unwrap_or_default(), false)
            }
            Err(e) => return Err(e.into()),
        };
        let overrides = policy.overrides.clone();
        let config = source.load(&overrides)?;
        let config_cell = Arc::new(ArcSwap::from_pointee(config.clone()));
        let analytics = match config.analytics.enabled {
            true => Some(Analytics::start(
                &config,
                workers.map_or(1, |w| w.handles().len()),
                store.clone(),
            )?),
            false => None,
        };
        let responder = analytics.as_ref().map(|_| {
            let live = config_cell.clone();
            let policies: PolicySource = Arc::new(move |host: &str| {
                let config = live.load();
                let site = config.sites.iter().find(|s| s.host.to_string() == host)?;
                site.response.clone().map(Arc::new)
            });
            Responder::start(
                config.exposure.clone(),
                store.clone() as Arc<dyn EventQueue>,
                policies,
                source::node_name(config.node.clone()),
                state_dir.join("exposure-spill.json"),
            )
        });
        // Stored ACME certificates go into the slots before the first snapshot is built, so a
        // restart serves them from its first handshake.
        let live = Arc::new(LiveCerts::default());
        let zones = Arc::new(ZoneView::default());
        let txt = zones.clone();
        let acme = Acme::start(
            &config,
            AcmeParts {
                live: live.clone(),
                txt: Arc::new(move |records| txt.set_txt(records)),
                store: store.clone(),
                node: source::node_name(config.node.clone()),
                shared,
            },
        )
        .await;
        let edge = Edge::start(EdgeParts {
            settings: &config.edge,
            analytics: analytics.clone(),
            responder: responder.clone(),
            stages: policy.stages.clone(),
            workers,
            live,
        })?;
        let inner = Arc::new(Inner {
            source,
            state_dir,
            store,
            overrides: Mutex::new(overrides),
            config: config_cell,
            edge,
            acme,
            analytics,
            responder,
            zones,
            side_limits: Mutex::new(Vec::new()),
            applying: tokio::sync::Mutex::new(()),
            start_drains: Mutex::new(Some(policy.drains.clone())),
            shared_store: shared,
            poll_every: config
                .store
                .as_ref()
                .map_or(FOLLOW_EVERY, |s| s.poll_interval),
            store_up: std::sync::atomic::AtomicBool::new(store_up),
            node: source::node_name(config.node.clone()),
            started_at: crate::clock::now(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            admin: OnceLock::new(),
        });
        let rt = Runtime { inner };
        rt.apply(config.clone()).await?;
        if let Some(m) = &config.metrics {
            rt.start_metrics(m)?;
        }
        if let Some(d) = &config.dns {
            let zones = rt.inner.zones.clone();
            let handler = DnsHandler::new(Arc::new(move || zones.live.load_full()));
            let limits = crate::dns::start(d.listen, handler, rt.inner.stop.child_token()).await?;
            crate::lock(&rt.inner.side_limits).push(("dns", limits));
        }
        if let Some(settings) = &config.admin {
            let control: Arc<dyn Control> = rt.inner.clone();
            let a = crate::admin::start(
                settings,
                &rt.inner.state_dir,
                control,
                rt.inner.stop.child_token(),
                &rt.inner.tasks,
            )
            .await?;
            let _ = rt.inner.admin.set(a);
        }
        if config.manage_firewall {
            rt.inner.tasks.spawn(serve::count_refusals(
                rt.inner.clone(),
                rt.inner.stop.child_token(),
            ));
        }
        rt.inner
            .tasks
            .spawn(follow_store(rt.inner.clone(), rt.inner.stop.child_token()));
        Ok(rt)
    }

    fn start_metrics(&self, m: &crate::config::MetricsSettings) -> Result<(), RuntimeError> {
        let tls = crate::tls::listener_acceptor(m.cert.as_ref(), &self.inner.state_dir, m.listen)?;
        let metrics_err = |source| RuntimeError::Metrics {
            addr: m.listen,
            source,
        };
        let std_listener = crate::net::bind_tcp(m.listen, false).map_err(metrics_err)?;
        let l = tokio::net::TcpListener::from_std(std_listener).map_err(metrics_err)?;
        tracing::info!(addr = %m.listen, "serving /metrics over TLS");
        // Prometheus scrapes over one connection; a few more for people and tests.
        let limits = Limits::new(16, 8);
        crate::lock(&self.inner.side_limits).push(("metrics", limits.clone()));
        let counters: Arc<dyn Counters> = self.inner.clone();
        self.inner.tasks.spawn(crate::analytics::metrics::serve(
            l,
            tls,
            limits,
            counters,
            self.inner.stop.child_token(),
        ));
        Ok(())
    }

    /// Applies a validated config: the one path for every change. Warns about other programs
    /// holding cleartext ports of closed addresses, reconciles drains, builds the DNS answers,
    /// updates the nftables table when the config manages it, then rebinds the edge. On error
    /// nothing changes and the previous config keeps serving.
    pub async fn apply(&self, config: Config) -> Result<(), RuntimeError> {
        self.inner.apply(config).await
    }

    /// Reloads the config from its source with the stored overrides, as SIGHUP does.
    pub async fn reload(&self) -> Result<(), RuntimeError> {
        self.inner.reload().await
    }

    /// The live edge snapshot (config, routes, drains).
    pub fn snapshot(&self) -> Arc<crate::edge::Snapshot> {
        self.inner.edge.snapshot()
    }

    /// The edge's pre-request counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.edge.stats()
    }

    /// Sockets the edge listens on now.
    pub async fn listening(&self) -> Vec<(SocketAddr, ListenerKind)> {
        self.inner.edge.listening().await
    }

    /// Whether the store answered its last query.
    pub fn store_up(&self) -> bool {
        Counters::store_up(&*self.inner)
    }

    /// The certificate state of every `cert = "acme"` site.
    pub fn acme(&self) -> &Acme {
        &self.inner.acme
    }

    /// The analytics, when enabled.
    pub fn analytics(&self) -> Option<&Analytics> {
        self.inner.analytics.as_deref()
    }

    /// The admin plane, when `[admin]` is configured.
    pub fn admin(&self) -> Option<&Admin> {
        self.inner.admin.get()
    }

    /// The `/metrics` text, as the metrics listener serves it.
    pub fn metrics(&self) -> String {
        crate::analytics::metrics::render(&*self.inner)
    }

    /// Stops in order: DNS, metrics, the admin plane and background tasks; then the edge stops
    /// accepting and drains in-flight requests for up to `grace`; then the analytics and the
    /// exposure queue write what they hold. Returns whether the edge drained in time.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        self.inner.acme.shutdown().await;
        let drained = self.inner.edge.shutdown(grace).await;
        if let Some(a) = &self.inner.analytics {
            a.shutdown().await;
        }
        if let Some(r) = &self.inner.responder {
            r.shutdown().await;
        }
        drained
    }
}

/// The DNS answers: the applied config's, plus the TXT records of DNS-01 challenges in
/// progress, which come and go between applies.
#[derive(Default)]
struct ZoneView {
    base: Mutex<Option<Arc<Zones>>>,
    txt: Mutex<Vec<(String, String)>>,
    /// What the DNS server answers from.
    live: ArcSwapOption<Zones>,
}

impl ZoneView {
    fn base(&self) -> Option<Arc<Zones>> {
        crate::lock(&self.base).clone()
    }

    fn set_base(&self, zones: Option<Zones>) {
        let mut base = crate::lock(&self.base);
        *base = zones.map(Arc::new);
        self.publish(&base, &crate::lock(&self.txt));
    }

    fn set_txt(&self, records: Vec<(String, String)>) {
        let base = crate::lock(&self.base);
        let mut txt = crate::lock(&self.txt);
        *txt = records;
        self.publish(&base, &txt);
    }

    fn publish(&self, base: &Option<Arc<Zones>>, txt: &[(String, String)]) {
        self.live.store(match base {
            Some(b) if !txt.is_empty() => Some(Arc::new(b.with_txt(txt))),
            b => b.clone(),
        });
    }
}

/// How often the embedded store's policy generation is read (`[store] poll_interval` for a
/// shared one, which also wakes the follower on LISTEN/NOTIFY).
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

/// How often a node tells the store it is alive; one silent for three is shown as gone.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// Applies the policy other nodes write to the shared store: whenever the store's generation
/// moves, the stored overrides and plans are compared with those applied here, and applied if
/// they differ (a node's own writes compare equal and cost nothing more).
async fn follow_store(inner: Arc<Inner>, stop: CancellationToken) {
    use std::sync::atomic::Ordering;
    let mut seen = inner.store.generation().await.ok();
    if seen.is_some() && inner.shared_store {
        inner.save_last_known_good().await;
    }
    // A notification wakes at once; the poll catches what a lost one would have said.
    let wake = inner.store.wake_ups();
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll = tokio::time::interval(inner.poll_every);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = heartbeat.tick() => {
                inner.heartbeat().await;
                continue;
            }
            _ = poll.tick() => {}
            _ = async {
                match &wake {
                    Some(w) => w.notified().await,
                    None => std::future::pending().await,
                }
            } => poll.reset(),
        }
        let now = match inner.store.generation().await {
            Ok(g) => g,
            Err(e) => {
                if inner.store_up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "the store is unreachable: serving the policy applied last; counts and events are kept in memory until it is back");
                }
                continue;
            }
        };
        if !inner.store_up.swap(true, Ordering::Relaxed) {
            tracing::info!("the store is reachable again");
        }
        if seen == Some(now) {
            continue;
        }
        match inner.sync_from_store().await {
            Ok(()) => {
                seen = Some(now);
                if inner.shared_store {
                    inner.save_last_known_good().await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the store's policy changed but cannot be applied here; retrying")
            }
        }
    }
}

impl Inner {
    /// Tells the store this node is alive and what it runs (best effort).
    async fn heartbeat(&self) {
        let info = crate::store::NodeInfo {
            name: self.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            generation: self.edge.snapshot().generation,
            started_at: self.started_at,
            last_heartbeat: crate::clock::now(),
        };
        if let Err(e) = self.store.heartbeat(&info).await {
            tracing::debug!(error = %e, "heartbeat not recorded");
        }
    }

    /// Keeps a local copy of the shared policy, to start from while the store is down.
    async fn save_last_known_good(&self) {
        let copy = async {
            Ok::<_, crate::store::StoreError>(source::LastKnownGood {
                overrides: self.store.overrides().await?,
                stages: self.store.stages().await?,
                drains: self.store.drains().await?,
            })
        }
        .await;
        match copy.map(|c| c.write(&self.state_dir)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot write the last-known-good policy"),
            Err(e) => tracing::debug!(error = %e, "cannot read the policy to keep a copy"),
        }
    }

    /// Applies the stored overrides and plans if they differ from those applied here.
    async fn sync_from_store(&self) -> Result<(), RuntimeError> {
        let _serial = self.applying.lock().await;
        let overrides = self.store.overrides().await?;
        let stages = self.store.stages().await?;
        let same_overrides = *crate::lock(&self.overrides) == overrides;
        let same_stages = *self.edge.stages() == stages;
        if same_overrides && same_stages {
            return Ok(());
        }
        if !same_stages {
            self.edge.set_stages(stages);
        }
        let config = self.source.load(&overrides)?;
        self.apply_locked(config).await?;
        *crate::lock(&self.overrides) = overrides;
        tracing::info!("applied the policy another node wrote to the store");
        Ok(())
    }

    async fn apply(&self, config: Config) -> Result<(), RuntimeError> {
        let _serial = self.applying.lock().await;
        self.apply_locked(config).await
    }

    /// SIGHUP: the source read again, with the overrides read under the same lock as the
    /// apply, so an admin change in flight is never undone by a reload that read before it.
    async fn reload(&self) -> Result<(), RuntimeError> {
        let _serial = self.applying.lock().await;
        let overrides = self.store.overrides().await?;
        let config = self.source.load(&overrides)?;
        self.apply_locked(config).await?;
        *crate::lock(&self.overrides) = overrides;
        Ok(())
    }

    /// The apply itself; the caller holds `applying`.
    async fn apply_locked(&self, config: Config) -> Result<(), RuntimeError> {
        for warning in config
            .warnings()
            .into_iter()
            .chain(foreign_listeners(&config))
        {
            tracing::warn!("{warning}");
        }
        let config = Arc::new(config);
        let previous = self.edge.snapshot();
        let first = previous.generation == 0;
        let kept = match first {
            true => {
                let read_at_start = crate::lock(&self.start_drains).take();
                match read_at_start {
                    Some(d) => d,
                    None => self.store.drains().await?,
                }
            }
            false => previous.drains().to_vec(),
        };
        let ttl = config.dns.as_ref().map_or(DEFAULT_DRAIN_TTL, |d| d.ttl);
        let old = (!first).then_some(&*previous.config);
        let drains = drain::reconcile(old, &config, &kept, crate::clock::now(), ttl);
        let zones = Zones::build(
            &config,
            self.zones.base().as_deref(),
            crate::clock::now() as u32,
        )?;
        if config.manage_firewall {
            // Pools and addresses may have changed: the kernel must guard the closed ones now.
            firewall(config.clone()).await?;
            tracing::info!(table = crate::firewall::TABLE, "nftables table applied");
        }
        if let Err(e) = self.edge.reload(config.clone(), drains.clone()).await {
            if !first && previous.config.manage_firewall && config.manage_firewall {
                if let Err(e) = firewall(previous.config.clone()).await {
                    tracing::error!("nftables table not restored: {e}");
                }
            }
            return Err(e.into());
        }
        self.zones.set_base(zones);
        self.acme.configure(&config);
        self.config.store(config);
        if drains != kept {
            for d in drains.iter().filter(|d| !kept.contains(d)) {
                tracing::info!(site = %d.site, from = %d.from_pool, to = %d.to_pool, until = d.until, "site moved to a closed pool: its old addresses keep its cleartext mode until the old DNS answers expire");
            }
            if let Err(e) = self.store.set_drains(&drains).await {
                tracing::warn!(error = %e, "cannot record drains; a restart would forget them");
            }
        }
        tracing::info!(
            generation = self.edge.snapshot().generation,
            "config applied"
        );
        Ok(())
    }
}

/// Writes the nftables table for `config`, off the async threads (it runs `nft`).
async fn firewall(config: Arc<Config>) -> Result<(), crate::firewall::FirewallError> {
    tokio::task::spawn_blocking(move || crate::firewall::apply(&config))
        .await
        .unwrap_or_else(|e| Err(crate::firewall::FirewallError::Nft(e.to_string())))
}

impl Counters for Inner {
    fn certs(&self) -> Vec<crate::tls::SiteCert> {
        crate::acme::report(&self.config.load(), &self.acme.status())
    }

    fn acme_failures(&self) -> u64 {
        self.acme.failures_total()
    }

    fn store_up(&self) -> bool {
        self.store_up.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn edge(&self) -> StatsSnapshot {
        self.edge.stats()
    }

    fn refusals(&self) -> Vec<(&'static str, &'static str, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut out = Vec::new();
        let mut add = |listener, l: &Limits| {
            out.push((listener, "max_connections", l.refused_global.load(Relaxed)));
            out.push((
                listener,
                "max_connections_per_client",
                l.refused_per_client.load(Relaxed),
            ));
        };
        add("edge", self.edge.limits());
        for (name, l) in crate::lock(&self.side_limits).iter() {
            add(name, l);
        }
        out
    }

    fn analytics(&self) -> Option<&Analytics> {
        self.analytics.as_deref()
    }
}

#[async_trait::async_trait]
impl Control for Inner {
    fn config(&self) -> Arc<Config> {
        self.edge.snapshot().config.clone()
    }

    fn generation(&self) -> u64 {
        self.edge.snapshot().generation
    }

    fn drains(&self) -> Vec<Drain> {
        self.edge.snapshot().drains().to_vec()
    }

    fn stages(&self) -> Arc<Plans> {
        self.edge.stages()
    }

    async fn listening(&self) -> Vec<(SocketAddr, ListenerKind)> {
        self.edge.listening().await
    }

    fn metrics(&self) -> String {
        crate::analytics::metrics::render(self)
    }

    fn certs(&self) -> Vec<crate::tls::SiteCert> {
        Counters::certs(self)
    }

    fn store_up(&self) -> bool {
        Counters::store_up(self)
    }

    fn node(&self) -> &str {
        &self.node
    }

    async fn apply_overrides(&self, overrides: Overrides) -> Result<(), ControlError> {
        let _serial = self.applying.lock().await;
        let config = self
            .source
            .load(&overrides)
            .map_err(ControlError::Invalid)?;
        self.apply_locked(config)
            .await
            .map_err(|e| ControlError::Failed(Box::new(e)))?;
        if let Err(e) = self.store.set_overrides(&overrides).await {
            tracing::error!(error = %e, "change applied but not saved: it will not survive a restart");
        }
        *crate::lock(&self.overrides) = overrides;
        Ok(())
    }

    async fn set_stages(&self, plans: Plans) -> Result<(), ControlError> {
        let _serial = self.applying.lock().await;
        self.store
            .set_stages(&plans)
            .await
            .map_err(|e| ControlError::Failed(Box::new(e)))?;
        self.edge.set_stages(plans);
        // Read under the lock: the config of the last apply, not one an apply in flight replaces.
        let config = (*self.edge.snapshot().config).clone();
        self.apply_locked(config)
            .await
            .map_err(|e| ControlError::Failed(Box::new(e)))
    }

    fn overrides(&self) -> Overrides {
        crate::lock(&self.overrides).clone()
    }

    fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }
}
