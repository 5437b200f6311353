//! Traffic analytics and credential exposure records: who reaches each site over TLS and
//! over cleartext, and which credentials crossed the network in the clear.
//!
//! Invariant 3: the request path only updates in-memory counters of its own worker (one
//! uncontended lock). A background flusher drains them every second and writes them to the
//! store ([`Rollups`]) every `flush_interval`; a slow or failing store delays that write and nothing
//! else. Pending counts are kept (folded from minutes into hours if they grow too large)
//! until the store accepts them. This module never blocks a request and never stores, logs or
//! labels a raw credential (invariant 2): it only ever sees fingerprints.

mod accesslog;
pub mod aggregate;
pub mod impact;
pub mod metrics;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::now;
use crate::observe::{self, ClientFamily, Network, Outcome, PathTemplate, Scheme, TlsVersion};
use crate::store::{Rollups, StoreError};
pub use accesslog::AccessLog;
use aggregate::{Aggregate, ExposureAgg, Observation, SiteId};

use crate::config::{AnalyticsSettings, Config};
use crate::exposure::{CredentialKind, ExposureError, Fingerprinter, Found};
use crate::lock;

/// Pending entries held while the store fails before minutes are folded into hours.
const MAX_PENDING_ENTRIES: usize = 500_000;

/// How often a failing store is reported in the log: once per this period, with a count.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(60);

/// Why analytics could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AnalyticsError {
    #[error(transparent)]
    Key(#[from] ExposureError),
    #[error("access log {path}: {source}")]
    AccessLog {
        path: String,
        source: std::io::Error,
    },
}

/// Cumulative counts since start, for `/metrics`.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    /// By (site, outcome, scheme, status class).
    pub requests: HashMap<(SiteId, Outcome, Scheme, u8), u64>,
    /// Requests by (site, TLS version), TLS only.
    pub tls_versions: HashMap<(SiteId, TlsVersion), u64>,
    /// Cleartext credential sightings by (site, kind).
    pub exposures: HashMap<(SiteId, CredentialKind), u64>,
    pub exposures_dropped: u64,
}

impl Totals {
    fn add(&mut self, agg: &Aggregate) {
        for (k, n) in &agg.traffic {
            *self
                .requests
                .entry((k.site, k.outcome, k.scheme, k.status_class))
                .or_insert(0) += n;
            if k.tls != TlsVersion::None {
                *self.tls_versions.entry((k.site, k.tls)).or_insert(0) += n;
            }
        }
        for ((site, _), e) in &agg.exposures {
            *self.exposures.entry((*site, e.kind)).or_insert(0) += e.count;
        }
        self.exposures_dropped += agg.exposures_dropped;
    }
}

/// Site names and their ids, both ways.
struct Names {
    by_id: Vec<String>,
    ids: HashMap<String, SiteId>,
}

/// The analytics of one running edge.
pub struct Analytics {
    settings: AnalyticsSettings,
    /// One aggregate per worker thread, so request paths never contend.
    slots: Vec<Mutex<Aggregate>>,
    fingerprinter: Fingerprinter,
    /// Site names by id; id 0 is `unknown`. Ids are never reused, so counts drained after a
    /// reload still land on the right name.
    names: RwLock<Names>,
    store: Arc<dyn Rollups>,
    /// Where counts the store could not take at shutdown wait for the next start.
    spill: std::path::PathBuf,
    totals: Mutex<Totals>,
    /// When the oldest drained-but-unstored counts were drained (0: none pending).
    pending_since: AtomicU64,
    access_log: Option<AccessLog>,
    stop: CancellationToken,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl Analytics {
    /// Sets up analytics for `config` with one slot per worker and starts the flusher on the
    /// current runtime; it writes to `store`.
    pub fn start(
        config: &Config,
        workers: usize,
        store: Arc<dyn Rollups>,
    ) -> Result<Arc<Analytics>, AnalyticsError> {
        let settings = config.analytics.clone();
        let fingerprinter = Fingerprinter::open(&config.state_dir)?;
        let access_log = match &settings.access_log {
            None => None,
            Some(p) => Some(
                AccessLog::open(p).map_err(|source| AnalyticsError::AccessLog {
                    path: p.display().to_string(),
                    source,
                })?,
            ),
        };
        let a = Arc::new(Analytics {
            slots: (0..workers.max(1))
                .map(|_| Mutex::new(Aggregate::default()))
                .collect(),
            fingerprinter,
            names: RwLock::new(Names {
                by_id: vec!["unknown".to_owned()],
                ids: HashMap::from([("unknown".to_owned(), 0)]),
            }),
            store,
            spill: config.state_dir.join("analytics-spill.json"),
            totals: Mutex::new(Totals::default()),
            pending_since: AtomicU64::new(0),
            access_log,
            stop: CancellationToken::new(),
            flusher: Mutex::new(None),
            settings,
        });
        let task = tokio::spawn(flusher(a.clone()));
        *lock(&a.flusher) = Some(task);
        Ok(a)
    }

    /// The id of a configured site's name, assigned on first sight.
    pub fn site_id(&self, name: &str) -> SiteId {
        if let Some(&i) = self
            .names
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .ids
            .get(name)
        {
            return i;
        }
        let mut names = self.names.write().unwrap_or_else(|p| p.into_inner());
        if let Some(&i) = names.ids.get(name) {
            return i;
        }
        let id = names.by_id.len() as SiteId;
        names.by_id.push(name.to_owned());
        names.ids.insert(name.to_owned(), id);
        id
    }

    pub fn site_name(&self, id: SiteId) -> String {
        self.names
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_id
            .get(id as usize)
            .cloned()
            .unwrap_or_else(|| "unknown".to_owned())
    }

    pub fn fingerprinter(&self) -> &Fingerprinter {
        &self.fingerprinter
    }

    pub fn access_log(&self) -> Option<&AccessLog> {
        self.access_log.as_ref()
    }

    fn slot(&self) -> &Mutex<Aggregate> {
        &self.slots[crate::net::worker_index() % self.slots.len()]
    }

    /// Counts one observation. Cheap: one uncontended lock and a few map updates.
    pub fn record(&self, o: &Observation) {
        lock(self.slot()).record(o, self.settings.top_k);
    }

    /// Counts an observation and the credentials found in its request.
    pub fn record_with_exposures(&self, o: &Observation, found: &[Found], path: PathTemplate) {
        let mut agg = lock(self.slot());
        agg.record(o, self.settings.top_k);
        for f in found {
            agg.expose(
                o.site,
                f.fingerprint,
                ExposureAgg {
                    kind: f.kind,
                    name: f.name,
                    first_seen: o.at,
                    last_seen: o.at,
                    count: 1,
                    network: o.network,
                    family: o.family,
                    path,
                },
            );
        }
    }

    /// Counts `n` identical observations at once (firewall counters arrive as deltas).
    pub fn record_n(&self, o: &Observation, n: u64) {
        let mut agg = lock(self.slot());
        for _ in 0..n.min(1_000_000) {
            agg.record(o, self.settings.top_k);
        }
    }

    /// Counts since start (up to the last drain, at most a second old).
    pub fn totals(&self) -> Totals {
        lock(&self.totals).clone()
    }

    /// Seconds since the oldest counts not yet in the store were drained; 0 when none wait.
    pub fn flush_lag(&self) -> u64 {
        match self.pending_since.load(Ordering::Relaxed) {
            0 => 0,
            t => now().saturating_sub(t),
        }
    }

    /// Stops the flusher after a last flush. Call once connections have drained.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let task = lock(&self.flusher).take();
        if let Some(t) = task {
            let _ = t.await;
        }
        if let Some(log) = &self.access_log {
            log.close();
        }
    }

    fn drain(&self) -> Aggregate {
        let mut out = Aggregate::default();
        for slot in &self.slots {
            let taken = std::mem::take(&mut *lock(slot));
            out.merge(taken, self.settings.top_k);
        }
        lock(&self.totals).add(&out);
        out
    }
}

/// Drains every second, writes every `flush_interval`, rolls up hourly, and flushes once more
/// on shutdown.
/// Counts kept in the state dir at a shutdown the store did not let write them.
fn read_spill(path: &std::path::Path) -> Option<crate::store::RollupBatch> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "cannot read the counts kept at the last shutdown; the file is left as it is");
            None
        }
    }
}

async fn flusher(a: Arc<Analytics>) {
    let mut pending = Aggregate::default();
    // Counts the last run could not write: written first, once the store takes them.
    let mut spilled = read_spill(&a.spill);
    let drain_every = a.settings.flush_interval.min(Duration::from_secs(1));
    let mut last_write = tokio::time::Instant::now();
    let mut last_rollup: Option<tokio::time::Instant> = None;
    let mut errors = ErrorLog::default();
    loop {
        let stopping = tokio::select! {
            _ = a.stop.cancelled() => true,
            _ = tokio::time::sleep(drain_every) => false,
        };
        let drained = a.drain();
        if !drained.is_empty() {
            if pending.is_empty() {
                a.pending_since.store(now(), Ordering::Relaxed);
            }
            pending.merge(drained, a.settings.top_k);
        }
        if pending.entries() > MAX_PENDING_ENTRIES {
            pending.coarsen(a.settings.top_k);
        }
        let due = stopping || last_write.elapsed() >= a.settings.flush_interval;
        if due {
            if let Some(batch) = &spilled {
                if a.store.write_rollups(batch).await.is_ok() {
                    match std::fs::remove_file(&a.spill) {
                        Ok(()) => {
                            tracing::info!(file = %a.spill.display(), "counts kept at the last shutdown are in the store")
                        }
                        Err(e) => {
                            tracing::error!(file = %a.spill.display(), error = %e, "counts kept at the last shutdown are in the store, but the file cannot be removed: remove it, or they are counted again at the next start")
                        }
                    }
                    spilled = None;
                }
            }
        }
        if due && !pending.is_empty() {
            last_write = tokio::time::Instant::now();
            let batch = std::mem::take(&mut pending);
            let rows = {
                let names = a.names.read().unwrap_or_else(|p| p.into_inner());
                batch.to_batch(&|id| {
                    names
                        .by_id
                        .get(id as usize)
                        .cloned()
                        .unwrap_or_else(|| "unknown".to_owned())
                })
            };
            match a.store.write_rollups(&rows).await {
                Ok(()) => {
                    a.pending_since.store(0, Ordering::Relaxed);
                    errors.recovered();
                }
                Err(e) => {
                    errors.failed(&e);
                    // Kept whole: the transaction rolled back, so nothing was counted twice.
                    let mut back = batch;
                    back.merge(std::mem::take(&mut pending), a.settings.top_k);
                    pending = back;
                }
            }
        }
        let rollup_due = last_rollup.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600));
        if rollup_due && pending.is_empty() && !stopping {
            last_rollup = Some(tokio::time::Instant::now());
            let (minutes, hours) = (a.settings.minute_retention, a.settings.hour_retention);
            if let Err(e) = a
                .store
                .roll_up(now(), minutes.as_secs(), hours.as_secs())
                .await
            {
                tracing::warn!(error = %e, "analytics roll-up failed; will retry");
            }
        }
        if stopping {
            let mut keep = spilled.take().unwrap_or_default();
            if !pending.is_empty() {
                let names = a
                    .names
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .by_id
                    .clone();
                keep.append(pending.to_batch(&|id| {
                    names
                        .get(id as usize)
                        .cloned()
                        .unwrap_or_else(|| "unknown".to_owned())
                }));
            }
            if !keep.is_empty() {
                let requests: u64 = keep.traffic.iter().map(|t| t.count).sum();
                let text = serde_json::to_vec(&keep).unwrap_or_default();
                match crate::tls::write_private_atomic(&a.spill, &text) {
                    Ok(()) => {
                        tracing::warn!(requests, file = %a.spill.display(), "analytics store unavailable at shutdown: counts kept in the state dir, written at the next start")
                    }
                    Err(e) => {
                        tracing::error!(requests, error = %e, "analytics store unavailable at shutdown and the state dir not writable: these counts are lost")
                    }
                }
            }
            return;
        }
    }
}

/// Logs store failures at most once per [`ERROR_LOG_EVERY`], with how many there were.
#[derive(Default)]
struct ErrorLog {
    failures: u64,
    last: Option<tokio::time::Instant>,
}

impl ErrorLog {
    fn failed(&mut self, e: &StoreError) {
        self.failures += 1;
        if self.last.is_none_or(|t| t.elapsed() >= ERROR_LOG_EVERY) {
            tracing::error!(error = %e, failures = self.failures, "analytics store write failed; counts are kept in memory and retried");
            self.last = Some(tokio::time::Instant::now());
        }
    }

    fn recovered(&mut self) {
        if self.failures > 0 {
            tracing::info!(
                failures = self.failures,
                "analytics store writable again; pending counts written"
            );
            self.failures = 0;
            self.last = None;
        }
    }
}

/// The parts of a request analytics keeps, read before the request is handed on.
#[derive(Debug, Clone, Copy)]
pub struct RequestMeta {
    pub family: ClientFamily,
    pub path: PathTemplate,
    pub http: observe::HttpVersion,
}

impl RequestMeta {
    pub fn of<B>(req: &http::Request<B>) -> RequestMeta {
        RequestMeta::with_classifier(req, ClientFamily::classify)
    }

    /// `of`, with the User-Agent classified by `classify` (say, one that remembers a
    /// connection's agent).
    pub fn with_classifier<B>(
        req: &http::Request<B>,
        classify: impl FnOnce(Option<&[u8]>) -> ClientFamily,
    ) -> RequestMeta {
        RequestMeta {
            family: classify(
                req.headers()
                    .get(http::header::USER_AGENT)
                    .map(|v| v.as_bytes()),
            ),
            path: PathTemplate::of(req.uri().path()),
            http: observe::HttpVersion::from_http(req.version()),
        }
    }
}

/// A connection-level observation (no request was read).
pub fn connection_event(
    site: SiteId,
    outcome: Outcome,
    scheme: Scheme,
    port: u16,
    ip: std::net::IpAddr,
) -> Observation {
    Observation {
        at: now(),
        site,
        outcome,
        scheme,
        port,
        tls: TlsVersion::None,
        http: observe::HttpVersion::None,
        status_class: 0,
        family: ClientFamily::None,
        network: Network::of(ip),
        path: None,
    }
}
