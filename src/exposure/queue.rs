//! The exposure response: one event per credential (site and fingerprint) seen in cleartext,
//! kept in the store's durable queue ([`crate::store::EventQueue`]) and delivered to the site's webhook over
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
//!
//! What a node still holds when it stops while the store refuses writes (new events, repeats,
//! counters: fingerprints only) is kept in `STATE/exposure-spill.json` and written at its next
//! start.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::hmac;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Found, SecretValue};
use crate::clock::now;
use crate::clock::Timestamp;
use crate::config::{ExposureResponse, ExposureSettings};
use crate::observe::{ClientFamily, Network, PathTemplate};
use crate::store::{Attempt, DeliveryState, EventQueue, NewEvent, Repeat};
pub use crate::store::{QueueCounters as Counters, QueuedEvent as EventRow};

/// Finds the live policy of a site by name.
pub type PolicySource = Arc<dyn Fn(&str) -> Option<Arc<ExposureResponse>> + Send + Sync>;

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
    queue: Arc<dyn EventQueue>,
    /// This node's name: the holder of the delivery leases it takes.
    holder: String,
    /// Where unwritten events go at a shutdown the store refused.
    spill: PathBuf,
    state: Mutex<State>,
    wake: Notify,
    stop: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Reads the queue and the counters of a state directory (for the CLI and the API), without
/// creating anything.
pub fn read(
    state_dir: &Path,
    site: Option<&str>,
) -> Result<(Vec<EventRow>, Counters), crate::store::StoreError> {
    match crate::store::SqliteStore::open_read_only(state_dir)? {
        None => Ok((Vec::new(), Counters::default())),
        Some(store) => store.events_now(site),
    }
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
        queue: Arc<dyn EventQueue>,
        policies: PolicySource,
        holder: String,
        spill: PathBuf,
    ) -> Arc<Responder> {
        let r = Arc::new(Responder {
            settings,
            queue,
            holder,
            spill,
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
                kind: f.kind.as_str().to_owned(),
                name: f.name.as_str().to_owned(),
                policy: if policy.revoke { "revoke" } else { "notify" }.to_owned(),
                at,
                network: network.to_string(),
                family: family.as_str().to_owned(),
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

/// What the last run could not write, kept in the state dir.
#[derive(Default, Serialize, Deserialize)]
struct Spill {
    incoming: Vec<NewEvent>,
    repeats: Vec<Repeat>,
    counters: Counters,
}

impl State {
    /// The repeats since the last write, as rows.
    fn take_repeats(&mut self) -> Vec<Repeat> {
        std::mem::take(&mut self.repeats)
            .into_iter()
            .map(|((site, fingerprint), (count, last_seen))| Repeat {
                site,
                fingerprint,
                count,
                last_seen,
            })
            .collect()
    }

    fn add_repeats(&mut self, repeats: Vec<Repeat>) {
        for rep in repeats {
            let e = self
                .repeats
                .entry((rep.site, rep.fingerprint))
                .or_insert((0, rep.last_seen));
            e.0 += rep.count;
            e.1 = e.1.max(rep.last_seen);
        }
    }
}

/// Takes back what the last run kept in the state dir; true when there was something.
fn unspill(r: &Responder) -> bool {
    let bytes = match std::fs::read(&r.spill) {
        Ok(b) => b,
        Err(_) => return false,
    };
    let spill: Spill = match serde_json::from_slice(&bytes) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(file = %r.spill.display(), error = %e, "cannot read the exposure events kept at the last shutdown; the file is left as it is");
            return false;
        }
    };
    let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
    for ev in &spill.incoming {
        st.known.insert((ev.site.clone(), ev.fingerprint.clone()));
    }
    st.pending += spill.incoming.len() as u32;
    let newer = std::mem::replace(&mut st.incoming, spill.incoming);
    st.incoming.extend(newer);
    st.add_repeats(spill.repeats);
    st.counters.add(&spill.counters);
    true
}

/// At a shutdown the store refused: keeps what is unwritten for the next start.
fn spill(r: &Responder) {
    let spill = {
        let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
        Spill {
            incoming: std::mem::take(&mut st.incoming),
            repeats: st.take_repeats(),
            counters: std::mem::take(&mut st.counters),
        }
    };
    let events = spill.incoming.len();
    if events == 0 && spill.repeats.is_empty() && spill.counters == Counters::default() {
        return;
    }
    let text = serde_json::to_vec(&spill).unwrap_or_default();
    match crate::tls::write_private_atomic(&r.spill, &text) {
        Ok(()) => {
            tracing::warn!(events, file = %r.spill.display(), "exposure queue unavailable at shutdown: events kept in the state dir, written at the next start")
        }
        Err(e) => {
            tracing::error!(events, error = %e, "exposure queue unavailable at shutdown and the state dir not writable: these events are lost")
        }
    }
}

async fn worker(r: Arc<Responder>, policies: PolicySource) {
    let mut spilled = unspill(&r);
    loop {
        let stopping = tokio::select! {
            _ = r.stop.cancelled() => true,
            _ = r.wake.notified() => false,
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
        };
        let written = persist(&r).await;
        if !written {
            tracing::warn!("exposure queue not writable; events stay in memory and are retried");
            if stopping {
                spill(&r);
            }
        } else if std::mem::take(&mut spilled) {
            match std::fs::remove_file(&r.spill) {
                Ok(()) => {
                    tracing::info!(file = %r.spill.display(), "exposure events kept at the last shutdown are in the store")
                }
                Err(e) => {
                    tracing::error!(file = %r.spill.display(), error = %e, "exposure events kept at the last shutdown are in the store, but the file cannot be removed: remove it, or their repeats are counted again")
                }
            }
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
            st.take_repeats(),
            std::mem::take(&mut st.counters),
            !st.loaded,
        )
    };
    let written = r.queue.enqueue(&incoming, &repeats, &counters).await;
    if let Err(e) = written {
        tracing::warn!(error = %e, "exposure queue write failed");
        // Kept for the next try: nothing the request path handed over is lost.
        let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
        let newer = std::mem::replace(&mut st.incoming, incoming);
        st.incoming.extend(newer);
        st.add_repeats(repeats);
        st.counters.add(&counters);
        return false;
    }
    if load {
        // At start: what is already queued, for coalescing and the queue cap.
        match r.queue.known().await {
            Ok((known, pending)) => {
                let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
                st.known.extend(known);
                st.pending = pending.max(st.pending);
                st.loaded = true;
            }
            Err(e) => {
                tracing::warn!(error = %e, "exposure queue not readable");
                return false;
            }
        }
    }
    true
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

/// Events claimed per round. The claim holds for `CLAIM_BATCH + 2` delivery timeouts: long
/// enough for each of them to time out once, after which another node may take what a dead
/// one held.
const CLAIM_BATCH: u32 = 8;

async fn deliver_due(r: &Arc<Responder>, policies: &PolicySource) {
    let Ok(due) = r
        .queue
        .claim(
            now(),
            CLAIM_BATCH,
            r.settings.delivery_timeout.as_secs().max(1) * u64::from(CLAIM_BATCH + 2),
            &r.holder,
        )
        .await
    else {
        return;
    };
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
                None => (None, None, Some("the credential's hashes and value are kept in memory only, by the node that saw it: it restarted before delivery, or another node of the fleet delivers")),
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
        let result = post(&policy, &ev.id, json, r.settings.delivery_timeout).await;
        let attempts = ev.attempts + 1;
        let (state, next, error) = match &result {
            Ok(()) => (DeliveryState::Delivered, 0, None),
            Err(e) if attempts >= r.settings.max_attempts => {
                (DeliveryState::Failed, 0, Some(e.clone()))
            }
            Err(e) => {
                let exp = r.settings.backoff_base.as_secs_f64()
                    * 2f64.powi(attempts.saturating_sub(1).min(30) as i32);
                let delay = exp.min(r.settings.backoff_max.as_secs_f64()) * jitter();
                (
                    DeliveryState::Pending,
                    now() + delay.ceil() as u64,
                    Some(e.clone()),
                )
            }
        };
        if state != DeliveryState::Pending {
            let mut st = r.state.lock().unwrap_or_else(|p| p.into_inner());
            st.secrets.remove(&ev.id);
            st.pending = st.pending.saturating_sub(1);
        }
        let recorded = r
            .queue
            .record(&Attempt {
                id: ev.id.clone(),
                state,
                attempts,
                next_attempt: next,
                error,
                at: now(),
            })
            .await;
        if let Err(e) = recorded {
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
async fn post(
    policy: &ExposureResponse,
    id: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<(), String> {
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
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| crate::error_chain(&e))?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("webhook answered {status}"))
    }
}
