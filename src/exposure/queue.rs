//! The exposure response: one event per credential (site and fingerprint) seen in cleartext,
//! kept in a durable queue (`STATE/exposure-events.db`) and delivered to the site's webhook over
//! verified TLS, signed with HMAC-SHA-256, with an idempotency key, retried with exponential
//! backoff and jitter up to a limit.
//!
//! Abuse limits, since anyone can send fake credentials in cleartext: new events are
//! rate-limited per site and per client network, repeats of one fingerprint are coalesced into
//! its event, the queue is capped, and every drop is counted. The request path only takes one
//! lock and pushes to memory; the database and the network are this module's own task's.
//!
//! Invariant 2 holds in the queue: rows carry the keyed fingerprint only. The credential's
//! SHA-256 and (for `revoke` with `include_raw`) its raw value stay in memory until delivery;
//! after a restart an event is delivered without them, and says so.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::hmac;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rusqlite::{params, Connection};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Found, SecretValue};
use crate::clock::now;
use crate::clock::Timestamp;
use crate::config::{ExposureResponse, ExposureSettings};
use crate::observe::{ClientFamily, Network, PathTemplate};

/// Finds the live policy of a site by name.
pub type PolicySource = Arc<dyn Fn(&str) -> Option<Arc<ExposureResponse>> + Send + Sync>;

/// What the queue holds at start: every (site, fingerprint) with an event, and how many wait.
type Loaded = (HashSet<(String, String)>, u32);

/// The events database in a state directory.
pub fn db_path(state_dir: &Path) -> PathBuf {
    state_dir.join("exposure-events.db")
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY, site TEXT NOT NULL, fingerprint TEXT NOT NULL, kind TEXT NOT NULL,
    name TEXT NOT NULL, policy TEXT NOT NULL, first_seen INTEGER NOT NULL, last_seen INTEGER NOT NULL,
    count INTEGER NOT NULL, network TEXT NOT NULL, family TEXT NOT NULL, path TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL, next_attempt INTEGER NOT NULL,
    last_error TEXT, delivered_at INTEGER, created_at INTEGER NOT NULL,
    UNIQUE (site, fingerprint)
);
CREATE INDEX IF NOT EXISTS events_due ON events (state, next_attempt);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, count INTEGER NOT NULL) WITHOUT ROWID;
";

fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // Only background work and the CLI wait on this lock, never a request: waiting long is
    // better than failing when a loaded machine deschedules the holder (a checkpoint, say).
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// Counts of events not created, by reason, plus repeats folded into existing events.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Counters {
    pub coalesced: u64,
    pub dropped_site_rate: u64,
    pub dropped_network_rate: u64,
    pub dropped_queue_full: u64,
}

struct NewEvent {
    id: String,
    site: String,
    fingerprint: String,
    kind: &'static str,
    name: String,
    policy: &'static str,
    at: Timestamp,
    network: String,
    family: &'static str,
    path: String,
}

/// In memory, between the request path and the worker.
#[derive(Default)]
struct State {
    /// (site, minute) → events created in it.
    site_rate: HashMap<String, (Timestamp, u32)>,
    net_rate: HashMap<(String, Network), (Timestamp, u32)>,
    /// Every (site, fingerprint) with an event: repeats are coalesced into it.
    known: HashSet<(String, String)>,
    incoming: Vec<NewEvent>,
    /// Repeats since the last write: (site, fingerprint) → (count, last seen).
    repeats: HashMap<(String, String), (u64, Timestamp)>,
    /// SHA-256 and raw value by event id, until delivery.
    secrets: HashMap<String, SecretValue>,
    counters: Counters,
    pending: u32,
    loaded: bool,
}

/// The exposure response of one running edge.
pub struct Responder {
    settings: ExposureSettings,
    db: PathBuf,
    state: Mutex<State>,
    wake: Notify,
    stop: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// One row of the queue, as the API, the dashboard and `portcullis exposures` show it.
#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    pub id: String,
    pub site: String,
    pub fingerprint: String,
    pub kind: String,
    pub name: String,
    pub policy: String,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
    pub count: u64,
    pub network: String,
    pub family: String,
    pub state: String,
    pub attempts: u32,
    pub next_attempt: Timestamp,
    pub last_error: Option<String>,
    pub delivered_at: Option<Timestamp>,
}

/// One `events` row, selected in the column order both queries below use.
fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        id: r.get(0)?,
        site: r.get(1)?,
        fingerprint: r.get(2)?,
        kind: r.get(3)?,
        name: r.get(4)?,
        policy: r.get(5)?,
        first_seen: r.get::<_, i64>(6)? as u64,
        last_seen: r.get::<_, i64>(7)? as u64,
        count: r.get::<_, i64>(8)? as u64,
        network: r.get(9)?,
        family: r.get(10)?,
        state: r.get(11)?,
        attempts: r.get::<_, i64>(12)? as u32,
        next_attempt: r.get::<_, i64>(13)? as u64,
        last_error: r.get(14)?,
        delivered_at: r.get::<_, Option<i64>>(15)?.map(|t| t as u64),
    })
}

/// Reads the queue and the counters (for the CLI and the API).
pub fn read(state_dir: &Path, site: Option<&str>) -> Result<(Vec<EventRow>, Counters), String> {
    let path = db_path(state_dir);
    if !path.exists() {
        return Ok((Vec::new(), Counters::default()));
    }
    let conn = open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let err = |e: rusqlite::Error| format!("{}: {e}", path.display());
    let mut q = conn
        .prepare(
            "SELECT id, site, fingerprint, kind, name, policy, first_seen, last_seen, count, network, family,
                    state, attempts, next_attempt, last_error, delivered_at
             FROM events WHERE (?1 IS NULL OR site = ?1) ORDER BY created_at DESC, id",
        )
        .map_err(err)?;
    let rows = q
        .query_map(params![site], event_row)
        .map_err(err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    let mut counters = Counters::default();
    let mut c = conn
        .prepare("SELECT name, count FROM counters")
        .map_err(err)?;
    let pairs = c
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })
        .map_err(err)?;
    for p in pairs {
        let (name, n) = p.map_err(err)?;
        match name.as_str() {
            "coalesced" => counters.coalesced = n,
            "dropped_site_rate" => counters.dropped_site_rate = n,
            "dropped_network_rate" => counters.dropped_network_rate = n,
            "dropped_queue_full" => counters.dropped_queue_full = n,
            _ => {}
        }
    }
    Ok((rows, counters))
}

fn random_id() -> String {
    crate::hex::random(16)
}

/// A factor in [0.5, 1.5) so retries from many events do not line up.
fn jitter() -> f64 {
    let mut b = [0u8; 4];
    let _ = aws_lc_rs::rand::fill(&mut b);
    0.5 + f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
}

impl Responder {
    /// Starts the worker on the current runtime.
    pub fn start(
        settings: ExposureSettings,
        state_dir: &Path,
        policies: PolicySource,
    ) -> Arc<Responder> {
        let r = Arc::new(Responder {
            settings,
            db: db_path(state_dir),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            stop: CancellationToken::new(),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(worker(r.clone(), policies));
        *r.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        r
    }

    /// Offers credentials found in one cleartext request of `site`. Cheap: one lock.
    #[allow(clippy::too_many_arguments)]
    pub fn offer(
        &self,
        site: &str,
        policy: &ExposureResponse,
        found: &[Found],
        mut secrets: Vec<SecretValue>,
        network: Network,
        family: ClientFamily,
        path: PathTemplate,
        at: Timestamp,
    ) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let minute = at / 60;
        for (i, f) in found.iter().enumerate() {
            let key = (site.to_owned(), f.fingerprint.to_string());
            if st.known.contains(&key) {
                st.counters.coalesced += 1;
                let e = st.repeats.entry(key).or_insert((0, at));
                e.0 += 1;
                e.1 = e.1.max(at);
                continue;
            }
            let s = st.site_rate.entry(site.to_owned()).or_insert((minute, 0));
            if s.0 != minute {
                *s = (minute, 0);
            }
            if s.1 >= self.settings.per_site_per_minute {
                st.counters.dropped_site_rate += 1;
                continue;
            }
            let n = st
                .net_rate
                .entry((site.to_owned(), network))
                .or_insert((minute, 0));
            if n.0 != minute {
                *n = (minute, 0);
            }
            if n.1 >= self.settings.per_network_per_minute {
                st.counters.dropped_network_rate += 1;
                continue;
            }
            if st.pending >= self.settings.max_queue {
                st.counters.dropped_queue_full += 1;
                continue;
            }
            if let Some(s) = st.site_rate.get_mut(site) {
                s.1 += 1;
            }
            if let Some(n) = st.net_rate.get_mut(&(site.to_owned(), network)) {
                n.1 += 1;
            }
            // The rate maps only need the current minute.
            if st.net_rate.len() > 100_000 {
                st.net_rate.retain(|_, (m, _)| *m == minute);
            }
            let id = random_id();
            if let Some(secret) = secrets.get_mut(i).map(|s| {
                std::mem::replace(
                    s,
                    SecretValue {
                        sha256: [0; 32],
                        raw: None,
                    },
                )
            }) {
                st.secrets.insert(id.clone(), secret);
            }
            st.known.insert(key);
            st.pending += 1;
            st.incoming.push(NewEvent {
                id,
                site: site.to_owned(),
                fingerprint: f.fingerprint.to_string(),
                kind: f.kind.as_str(),
                name: f.name.as_str().to_owned(),
                policy: if policy.revoke { "revoke" } else { "notify" },
                at,
                network: network.to_string(),
                family: family.as_str(),
                path: path.as_str().to_owned(),
            });
        }
        drop(st);
        self.wake.notify_one();
    }

    /// Stops the worker after it writes what it holds.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}

async fn worker(r: Arc<Responder>, policies: PolicySource) {
    loop {
        let stopping = tokio::select! {
            _ = r.stop.cancelled() => true,
            _ = r.wake.notified() => false,
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
        };
        let written = persist(&r).await;
        if !written {
            tracing::warn!("exposure queue not writable; events stay in memory and are retried");
        }
        if stopping {
            return;
        }
        deliver_due(&r, &policies).await;
    }
}

/// Writes new events, repeats and counters. Returns false (keeping them) if the database fails.
async fn persist(r: &Arc<Responder>) -> bool {
    let (incoming, repeats, counters, load) = {
        let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
        (
            std::mem::take(&mut st.incoming),
            std::mem::take(&mut st.repeats),
            std::mem::take(&mut st.counters),
            !st.loaded,
        )
    };
    let db = r.db.clone();
    let work = tokio::task::spawn_blocking(move || -> rusqlite::Result<Option<Loaded>> {
        if let Some(dir) = db.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let mut conn = open(&db)?;
        let tx = conn.transaction()?;
        for e in &incoming {
            tx.execute(
                "INSERT OR IGNORE INTO events (id, site, fingerprint, kind, name, policy, first_seen, last_seen, count,
                    network, family, path, state, attempts, next_attempt, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, 1, ?8, ?9, ?10, 'pending', 0, ?7, ?7)",
                params![e.id, e.site, e.fingerprint, e.kind, e.name, e.policy, e.at as i64, e.network, e.family, e.path],
            )?;
        }
        for ((site, fp), (n, last)) in &repeats {
            tx.execute(
                "UPDATE events SET count = count + ?3, last_seen = max(last_seen, ?4) WHERE site = ?1 AND fingerprint = ?2",
                params![site, fp, *n as i64, *last as i64],
            )?;
        }
        for (name, n) in [
            ("coalesced", counters.coalesced),
            ("dropped_site_rate", counters.dropped_site_rate),
            ("dropped_network_rate", counters.dropped_network_rate),
            ("dropped_queue_full", counters.dropped_queue_full),
        ] {
            if n > 0 {
                tx.execute(
                    "INSERT INTO counters VALUES (?1, ?2) ON CONFLICT DO UPDATE SET count = count + excluded.count",
                    params![name, n as i64],
                )?;
            }
        }
        tx.commit()?;
        if !load {
            return Ok(None);
        }
        // At start: what is already queued, for coalescing and the queue cap.
        let mut known = HashSet::new();
        let mut q = conn.prepare("SELECT site, fingerprint FROM events")?;
        for row in q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
            known.insert(row?);
        }
        let pending: i64 = conn.query_row(
            "SELECT COUNT(*) FROM events WHERE state = 'pending'",
            [],
            |r| r.get(0),
        )?;
        Ok(Some((known, pending as u32)))
    });
    match work.await {
        Ok(Ok(loaded)) => {
            if let Some((known, pending)) = loaded {
                let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
                st.known.extend(known);
                st.pending = pending.max(st.pending);
                st.loaded = true;
            }
            true
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "exposure queue write failed");
            false
        }
        Err(_) => false,
    }
}

#[derive(Serialize)]
struct EventBody<'a> {
    id: &'a str,
    site: &'a str,
    policy: &'a str,
    kind: &'a str,
    name: &'a str,
    fingerprint: &'a str,
    first_seen: Timestamp,
    last_seen: Timestamp,
    count: u64,
    client_network: &'a str,
    client_family: &'a str,
    /// SHA-256 of the credential, hex; `None` when withheld.
    sha256: Option<String>,
    /// The credential itself: only for `revoke` with `include_raw`, and only from memory.
    raw_value: Option<String>,
    /// Why `sha256` or `raw_value` is missing, if it is.
    withheld: Option<&'static str>,
}

async fn deliver_due(r: &Arc<Responder>, policies: &PolicySource) {
    let db = r.db.clone();
    let due = tokio::task::spawn_blocking(move || -> rusqlite::Result<Vec<EventRow>> {
        if !db.exists() {
            return Ok(Vec::new());
        }
        let conn = open(&db)?;
        let mut q = conn.prepare(
            "SELECT id, site, fingerprint, kind, name, policy, first_seen, last_seen, count, network, family,
                    state, attempts, next_attempt, last_error, delivered_at
             FROM events WHERE state = 'pending' AND next_attempt <= ?1 ORDER BY next_attempt LIMIT 32",
        )?;
        let rows = q.query_map(params![now() as i64], event_row)?;
        rows.collect()
    })
    .await;
    let Ok(Ok(due)) = due else { return };
    for ev in due {
        let Some(policy) = policies(&ev.site) else {
            continue;
        };
        let (sha256, raw, withheld) = {
            let st = r.state.lock().unwrap_or_else(|p| p.into_inner());
            match st.secrets.get(&ev.id) {
                Some(s) => (
                    Some(crate::hex::encode(&s.sha256)),
                    s.raw.clone().filter(|_| policy.include_raw),
                    None,
                ),
                None => (None, None, Some("portcullis restarted before delivery; the credential's hashes and value are kept in memory only")),
            }
        };
        let body = EventBody {
            id: &ev.id,
            site: &ev.site,
            policy: &ev.policy,
            kind: &ev.kind,
            name: &ev.name,
            fingerprint: &ev.fingerprint,
            first_seen: ev.first_seen,
            last_seen: ev.last_seen,
            count: ev.count,
            client_network: &ev.network,
            client_family: &ev.family,
            sha256,
            raw_value: raw,
            withheld,
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        drop(body);
        let result = post(&policy, &ev.id, json).await;
        let attempts = ev.attempts + 1;
        let (state, next, error) = match &result {
            Ok(()) => ("delivered", 0, None),
            Err(e) if attempts >= r.settings.max_attempts => ("failed", 0, Some(e.clone())),
            Err(e) => {
                let exp = r.settings.backoff_base.as_secs_f64()
                    * 2f64.powi(attempts.saturating_sub(1).min(30) as i32);
                let delay = exp.min(r.settings.backoff_max.as_secs_f64()) * jitter();
                ("pending", now() + delay.ceil() as u64, Some(e.clone()))
            }
        };
        if state != "pending" {
            let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
            st.secrets.remove(&ev.id);
            st.pending = st.pending.saturating_sub(1);
        }
        let db = r.db.clone();
        let id = ev.id.clone();
        let recorded = tokio::task::spawn_blocking(move || -> rusqlite::Result<()> {
            let conn = open(&db)?;
            conn.execute(
                "UPDATE events SET state = ?2, attempts = ?3, next_attempt = ?4, last_error = ?5,
                    delivered_at = CASE WHEN ?2 = 'delivered' THEN ?6 ELSE delivered_at END WHERE id = ?1",
                params![id, state, attempts as i64, next as i64, error, now() as i64],
            )?;
            Ok(())
        })
        .await;
        if let Ok(Err(e)) = recorded {
            // The event stays due with its old attempt count and is tried again.
            tracing::warn!(site = %ev.site, event = %ev.id, error = %e, "exposure event attempt not recorded");
        }
        match result {
            Ok(()) => tracing::info!(site = %ev.site, event = %ev.id, "exposure event delivered"),
            Err(e) => {
                tracing::warn!(site = %ev.site, event = %ev.id, attempts, error = %e, "exposure event not delivered")
            }
        }
    }
}

/// POSTs one signed event. Only 2xx counts as delivered.
async fn post(policy: &ExposureResponse, id: &str, body: Vec<u8>) -> Result<(), String> {
    let extra = match &policy.ca {
        Some(path) => crate::tls::load_certs(path).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let cfg = crate::tls::client_config(&extra).map_err(|e| e.to_string())?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(cfg)
        .https_only()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let ts = now();
    let key = hmac::Key::new(hmac::HMAC_SHA256, &policy.secret);
    let mut signed = format!("{ts}.").into_bytes();
    signed.extend_from_slice(&body);
    let sig = crate::hex::encode(hmac::sign(&key, &signed).as_ref());
    let req = http::Request::post(policy.url.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "portcullis-exposure-webhook")
        .header("idempotency-key", id)
        .header("x-portcullis-signature", format!("t={ts},v1={sig}"))
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| {
            let mut s = e.to_string();
            let mut cur = std::error::Error::source(&e);
            while let Some(c) = cur {
                s.push_str(": ");
                s.push_str(&c.to_string());
                cur = c.source();
            }
            s
        })?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("webhook answered {status}"))
    }
}
