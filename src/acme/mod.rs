//! Certificates from an ACME CA (RFC 8555) for sites with `cert = "acme"`, validated without
//! any cleartext port: TLS-ALPN-01 (RFC 8737) on the edge's own TLS listeners, or DNS-01
//! through the built-in DNS server (the only way to a wildcard certificate).
//!
//! Owns: one account per directory (`STATE/acme/account-HASH.json`, 0600), each site's
//! certificate and key (`STATE/acme/NAME.pem` and `NAME.key`, the key 0600, and the directory
//! it came from in `NAME.directory`), and one background task that loads
//! them at start (a restart serves at once and never re-orders a valid certificate), orders
//! what is missing or due, and renews at `renew_before` (default: a third of the lifetime)
//! with jitter, backing off exponentially up to [`MAX_BACKOFF`] while the CA fails. New
//! certificates go into the edge's [`LiveCerts`] slots: a hot swap, no connection dropped.
//! Until a site's first issuance the edge serves a development certificate, and
//! [`Acme::status`] says so.
//!
//! A fleet shares all of it through the store ([`CertStore`]): the account and certificates
//! (keys sealed with the installation secret, [`crate::seal`]), the challenge answers of an
//! order in progress (every node puts them up, since the CA may validate against any), and an
//! order lease per site, so one node orders while the others wait and then serve what it got.
//! The files stay as each node's own copy: a node starting while the database is down serves
//! them.
//!
//! Never: logs or returns key material, opens a cleartext port, or blocks a handshake (the
//! edge reads `LiveCerts`; this module only writes it).

mod client;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::sign::CertifiedKey;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::{now, Timestamp};
use crate::config::{AcmeChallenge, AcmeSettings, Config, HostPattern};
use crate::seal::Sealer;
use crate::store::{CertStore, OrderClaim, PendingChallenge, StoredCert};
use crate::tls::{self, LiveCerts};

/// The longest wait between two attempts while the CA fails.
pub const MAX_BACKOFF: Duration = Duration::from_secs(6 * 3600);
/// The first wait after a failure.
const FIRST_BACKOFF: Duration = Duration::from_secs(30);
/// The shortest time from one issuance to the next renewal, even when `renew_before` is longer
/// than what the CA issues: renewing in a loop would only run into its rate limits.
const MIN_RENEWAL_GAP: Duration = Duration::from_secs(3600);
/// How often the schedule is looked at even when nothing is due (so a clock moved by a test,
/// or a changed config, is seen).
const TICK: Duration = Duration::from_secs(1);
/// How long a node holds a site's order lease: longer than an order takes (two validation
/// timeouts and the account). A node that dies mid-order blocks the others this long at most.
const ORDER_LEASE: Duration = Duration::from_secs(600);
/// How often a node of a fleet reads the certificates and challenge answers other nodes wrote.
const SYNC: Duration = Duration::from_millis(500);
/// How long an orderer waits between sharing a challenge answer and telling the CA to
/// validate: a few of the other nodes' reads, so that whichever node the CA reaches answers.
const PROPAGATION: Duration = Duration::from_millis(1500);
/// The longest a start waits for the store's certificates before serving the files'.
const FIRST_SYNC: Duration = Duration::from_secs(2);

/// Why an order or the account failed. Never holds key material.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AcmeError {
    /// Something here: a file, a key, the HTTPS client.
    #[error("{0}")]
    Setup(String),
    /// The CA could not be reached or answered out of protocol.
    #[error("CA unreachable or failing: {0}")]
    Unreachable(String),
    /// The CA refused (bad request, unauthorized, invalid authorization).
    #[error("CA refused: {0}")]
    Refused(String),
    /// The CA asks to slow down.
    #[error("CA rate limit: {0}")]
    RateLimited(String),
}

impl AcmeError {
    fn from_acme(e: instant_acme::Error) -> AcmeError {
        match e {
            instant_acme::Error::Api(p) => {
                let kind = p.r#type.clone().unwrap_or_default();
                let text = format!(
                    "{} ({})",
                    p.detail.as_deref().unwrap_or("no detail"),
                    kind.rsplit(':').next().unwrap_or("problem")
                );
                if kind.ends_with(":rateLimited") {
                    AcmeError::RateLimited(text)
                } else {
                    AcmeError::Refused(text)
                }
            }
            other => AcmeError::Unreachable(other.to_string()),
        }
    }
}

/// Where DNS-01 TXT records go: the whole set of `(owner name, value)` to publish now, empty
/// once validation is over.
pub type TxtSink = Arc<dyn Fn(Vec<(String, String)>) + Send + Sync>;

/// A certificate just issued.
pub(crate) struct Issued {
    pub(crate) chain_pem: String,
    pub(crate) key_pem: String,
    pub(crate) key: Arc<CertifiedKey>,
}

/// Where a site's certificate comes from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertSource {
    /// Issued by the ACME CA.
    Acme,
    /// The development CA's, until the first issuance.
    Development,
}

/// The state of an ACME site's certificate, kept in `STATE/acme/status.json` after every
/// attempt (no key material in it) for `portcullis certs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CertStatus {
    pub site: String,
    pub challenge: String,
    pub source: CertSource,
    pub issuer: Option<String>,
    pub not_after: Option<Timestamp>,
    /// When the next order is due (renewal or retry).
    pub next_attempt: Timestamp,
    pub last_error: Option<String>,
    /// Failed attempts since the last success.
    pub failures: u32,
}

/// An ACME site as the task schedules it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    site: String,
    names: Vec<String>,
    challenge: AcmeChallenge,
}

/// The ACME sites of `config`.
fn wanted(config: &Config) -> Vec<Wanted> {
    config
        .sites
        .iter()
        .filter_map(|s| {
            let challenge = s.acme?;
            let names = match &s.host {
                HostPattern::Exact(h) => vec![h.clone()],
                HostPattern::Wildcard(suffix) => vec![format!("*.{suffix}")],
            };
            Some(Wanted {
                site: s.host.to_string(),
                names,
                challenge,
            })
        })
        .collect()
}

/// What the ACME client works with.
pub struct AcmeParts {
    /// The edge's certificate slots and challenge certificates.
    pub live: Arc<LiveCerts>,
    /// The DNS server's TXT records.
    pub txt: TxtSink,
    /// Where the account, certificates, challenges and order leases are shared.
    pub store: Arc<dyn CertStore>,
    /// This node's name (`[node] name`): the holder of its order leases.
    pub node: String,
    /// Whether the store is shared by a fleet (then other nodes' work is followed).
    pub shared: bool,
}

/// Challenge answers other nodes of the fleet have up, which this node answers too.
#[derive(Default)]
struct Remote {
    /// TLS-ALPN-01: validated name, key authorization digest (hex).
    alpn: HashMap<String, String>,
    /// DNS-01: owner name, value.
    txt: Vec<(String, String)>,
}

/// The running ACME client.
pub struct Acme {
    settings: Mutex<Option<AcmeSettings>>,
    sites: Mutex<Vec<Wanted>>,
    status: Mutex<HashMap<String, CertStatus>>,
    dir: PathBuf,
    live: Arc<LiveCerts>,
    txt: TxtSink,
    store: Arc<dyn CertStore>,
    /// Seals keys for the store; an error (the installation secret unreadable) keeps keys out
    /// of the store, and the node works on its own files.
    sealer: Result<Sealer, String>,
    node: String,
    shared: bool,
    /// The newest certificate version read from the store.
    seen: AtomicU64,
    remote: Mutex<Remote>,
    /// The DNS-01 records of this node's own order in progress.
    local_txt: Mutex<Vec<(String, String)>>,
    failures_total: AtomicU64,
    wake: Notify,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Acme {
    fn new(config: &Config, parts: AcmeParts) -> Acme {
        Acme {
            settings: Mutex::new(config.acme.clone()),
            sites: Mutex::new(Vec::new()),
            status: Mutex::new(HashMap::new()),
            dir: config.state_dir.join("acme"),
            live: parts.live,
            txt: parts.txt,
            store: parts.store,
            sealer: Sealer::open_dir(&config.state_dir),
            node: parts.node,
            shared: parts.shared,
            seen: AtomicU64::new(0),
            remote: Mutex::new(Remote::default()),
            local_txt: Mutex::new(Vec::new()),
            failures_total: Default::default(),
            wake: Notify::new(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// Loads the stored certificates of `config`'s ACME sites into the edge's slots (the
    /// store's when it has newer ones) and starts the task that orders and renews them.
    pub async fn start(config: &Config, parts: AcmeParts) -> Arc<Acme> {
        let a = Arc::new(Acme::new(config, parts));
        a.configure(config);
        if a.shared || !crate::lock(&a.sites).is_empty() {
            // A database that is slow to answer delays the start by this much at most; the
            // files' certificates are served meanwhile.
            let _ = tokio::time::timeout(FIRST_SYNC, a.sync(true)).await;
        }
        a.tasks.spawn(run(a.clone()));
        if a.shared {
            a.tasks.spawn(follow(a.clone()));
        }
        a
    }

    /// Follows a new config: sites added get their stored certificate (or an order), sites
    /// removed are forgotten.
    pub fn configure(&self, config: &Config) {
        let want = wanted(config);
        let directory = config.acme.as_ref().map(|a| a.directory.clone());
        let previous = std::mem::replace(&mut *crate::lock(&self.settings), config.acme.clone());
        let switched = previous.map(|a| a.directory) != directory;
        {
            let mut status = crate::lock(&self.status);
            if switched {
                // Another CA: what it did not issue is ordered from it now, and served until then.
                for st in status.values_mut() {
                    let from = std::fs::read_to_string(self.origin_file(&st.site)).ok();
                    if from != directory {
                        st.next_attempt = now();
                        st.failures = 0;
                    }
                }
            }
            status.retain(|site, _| want.iter().any(|w| &w.site == site));
            for w in &want {
                if status.contains_key(&w.site) {
                    continue;
                }
                let st = self.load_stored(w);
                status.insert(w.site.clone(), st);
            }
        }
        *crate::lock(&self.sites) = want;
        self.wake.notify_one();
    }

    /// Every ACME site's certificate state, by site name.
    pub fn status(&self) -> Vec<CertStatus> {
        let mut v: Vec<CertStatus> = crate::lock(&self.status).values().cloned().collect();
        v.sort_by(|a, b| a.site.cmp(&b.site));
        v
    }

    /// Failed orders since start, for `/metrics`.
    pub fn failures_total(&self) -> u64 {
        self.failures_total.load(Ordering::Relaxed)
    }

    /// Stops the task; an order in progress is abandoned (it is made again at the next start).
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn files(&self, site: &str) -> (PathBuf, PathBuf) {
        let base = site.replace('*', "_wildcard");
        (
            self.dir.join(format!("{base}.pem")),
            self.dir.join(format!("{base}.key")),
        )
    }

    /// Beside a site's certificate: the directory URL it was ordered from.
    fn origin_file(&self, site: &str) -> PathBuf {
        self.dir
            .join(format!("{}.directory", site.replace('*', "_wildcard")))
    }

    /// The account of one directory: switching CAs (staging to production) makes a new one.
    fn account_file(&self, directory: &str) -> PathBuf {
        self.dir
            .join(format!("account-{:016x}.json", fnv(directory)))
    }

    /// The status of `w` from its stored certificate, installed in the edge when it still
    /// covers the site's names and has not expired.
    fn load_stored(&self, w: &Wanted) -> CertStatus {
        let mut st = CertStatus {
            site: w.site.clone(),
            challenge: w.challenge.as_str().to_owned(),
            source: CertSource::Development,
            issuer: None,
            not_after: None,
            next_attempt: now(),
            last_error: None,
            failures: 0,
        };
        let (pem, key) = self.files(&w.site);
        let (Ok(chain), Ok(key)) = (std::fs::read_to_string(&pem), std::fs::read_to_string(&key))
        else {
            return st;
        };
        let loaded = verified(&w.site, &chain, &key);
        let directory = crate::lock(&self.settings)
            .as_ref()
            .map(|s| s.directory.clone());
        let ordered_from = std::fs::read_to_string(self.origin_file(&w.site)).ok();
        let other_ca = directory.is_some() && ordered_from.as_deref() != directory.as_deref();
        match loaded {
            Ok((info, ck)) if info.not_after > now() => {
                self.live.install(&w.site, ck);
                st.next_attempt = self.renewal_time(&w.site, &info);
                if other_ca {
                    // Served until the configured CA issues one, which is ordered now.
                    st.next_attempt = now();
                    tracing::info!(site = %w.site, "the stored ACME certificate comes from another directory; ordering from the configured one");
                }
                st.source = CertSource::Acme;
                st.issuer = Some(info.issuer);
                st.not_after = Some(info.not_after);
                tracing::info!(site = %w.site, file = %pem.display(), not_after = %crate::clock::http_date(info.not_after), "serving the stored ACME certificate");
            }
            Ok(_) => {
                tracing::warn!(site = %w.site, file = %pem.display(), "the stored ACME certificate has expired; ordering a new one");
            }
            Err(e) => {
                tracing::warn!(site = %w.site, file = %pem.display(), error = %e, "the stored ACME certificate cannot be used; ordering a new one");
            }
        }
        st
    }

    /// `renew_before` (or a third of the lifetime) before expiry, a little earlier for some
    /// sites than others so a fleet of certificates does not renew in one burst.
    fn renewal_time(&self, site: &str, info: &tls::CertInfo) -> Timestamp {
        let lifetime = info.not_after.saturating_sub(info.not_before);
        let before = crate::lock(&self.settings)
            .as_ref()
            .and_then(|s| s.renew_before)
            .map_or(lifetime / 3, |d| d.as_secs());
        // Up to 1/16 of the margin earlier, fixed per site and certificate.
        let jitter = (fnv(site) ^ info.not_after) % (before / 16).max(1);
        info.not_after.saturating_sub(before).saturating_sub(jitter)
    }

    /// One attempt for `w`, if this node gets the site's order lease; updates its status.
    async fn attempt(&self, w: &Wanted) {
        let t = now();
        let claim = self
            .store
            .claim_order(&w.site, &self.node, t, ORDER_LEASE.as_secs())
            .await;
        let fleet_failures = match claim {
            Ok(OrderClaim::Granted { failures }) => Some(failures),
            Ok(OrderClaim::Held { holder, until }) => {
                if let Some(st) = crate::lock(&self.status).get_mut(&w.site) {
                    st.next_attempt = until.max(t + 1);
                }
                tracing::info!(site = %w.site, node = %holder, until = %crate::clock::http_date(until), "not ordering here: another node orders this certificate, or the fleet waits after a failure");
                return;
            }
            Err(e) if self.shared => {
                // Ordering without the lease could order twice: wait for the store.
                if let Some(st) = crate::lock(&self.status).get_mut(&w.site) {
                    st.next_attempt = t + FIRST_BACKOFF.as_secs();
                    st.last_error = Some(format!("cannot take the order lease: {e}"));
                }
                tracing::warn!(site = %w.site, error = %e, "the store is unreachable: the order waits for it");
                return;
            }
            // The embedded store: this node is the only one that orders.
            Err(e) => {
                tracing::warn!(site = %w.site, error = %e, "cannot record the order lease; ordering all the same");
                None
            }
        };
        if self.shared {
            // The lease may be free because another node just ordered this certificate: it put
            // the certificate into the store before ending its lease, so it is there to read.
            self.sync(false).await;
            let still_due = crate::lock(&self.status)
                .get(&w.site)
                .is_some_and(|st| st.next_attempt <= t);
            if !still_due {
                let failures = fleet_failures.unwrap_or(0);
                if let Err(e) = self
                    .store
                    .finish_order(&w.site, &self.node, 0, failures)
                    .await
                {
                    tracing::debug!(site = %w.site, error = %e, "cannot end the order lease in the store; it runs out by itself");
                }
                return;
            }
        }
        let settings = crate::lock(&self.settings).clone();
        let retry_after = client::RetryAfter::default();
        let result = match &settings {
            None => Err(AcmeError::Setup("no [acme] section".into())),
            Some(settings) => self.order(settings, w, &retry_after).await,
        };
        let (retry_at, failures, issued) = {
            let mut status = crate::lock(&self.status);
            let Some(st) = status.get_mut(&w.site) else {
                return;
            };
            if let Some(f) = fleet_failures {
                st.failures = f;
            }
            match result {
                Ok((info, issued)) => {
                    self.live.install(&w.site, issued.key.clone());
                    let renewal = self.renewal_time(&w.site, &info);
                    let earliest = now() + MIN_RENEWAL_GAP.as_secs();
                    if renewal < earliest {
                        tracing::warn!(site = %w.site, not_after = %crate::clock::http_date(info.not_after), "renew_before is longer than what is left of the new certificate; renewing in an hour");
                    }
                    st.next_attempt = renewal.max(earliest);
                    st.source = CertSource::Acme;
                    st.issuer = Some(info.issuer);
                    st.not_after = Some(info.not_after);
                    st.last_error = None;
                    st.failures = 0;
                    tracing::info!(site = %w.site, not_after = %crate::clock::http_date(info.not_after), renewal = %crate::clock::http_date(st.next_attempt), "ACME certificate issued and served");
                    (0, 0, Some(issued))
                }
                Err(e) => {
                    self.failures_total.fetch_add(1, Ordering::Relaxed);
                    st.failures = st.failures.saturating_add(1);
                    let mut wait = FIRST_BACKOFF
                        .saturating_mul(2u32.saturating_pow(st.failures.saturating_sub(1).min(16)))
                        .min(MAX_BACKOFF);
                    if matches!(e, AcmeError::RateLimited(_)) {
                        wait = wait.max(Duration::from_secs(3600));
                    }
                    // The CA's own word on when to come back wins over a shorter backoff (but
                    // not beyond the cap: a CA asking for days is asked again in six hours).
                    if let Some(asked) = *crate::lock(&retry_after) {
                        wait = wait.max(asked.min(MAX_BACKOFF));
                    }
                    st.next_attempt = now() + wait.as_secs();
                    st.last_error = Some(e.to_string());
                    let serving = match st.source {
                        CertSource::Acme => "the previous ACME certificate",
                        CertSource::Development => "a development certificate",
                    };
                    tracing::warn!(site = %w.site, error = %e, retry_in = %humantime::format_duration(wait), "ACME order failed; still serving {serving}");
                    (st.next_attempt, st.failures, None)
                }
            }
        };
        // The certificate before the lease ends: a node that may order next finds it there.
        if let (Some(issued), Some(settings)) = (issued, &settings) {
            self.share_cert(
                &w.site,
                &issued.chain_pem,
                &issued.key_pem,
                &settings.directory,
            )
            .await;
        }
        if let Err(e) = self
            .store
            .finish_order(&w.site, &self.node, retry_at, failures)
            .await
        {
            tracing::warn!(site = %w.site, error = %e, "cannot end the order lease in the store; it runs out by itself");
        }
    }

    /// Puts a certificate this node has into the store, its key sealed, for the other nodes.
    async fn share_cert(&self, site: &str, chain_pem: &str, key_pem: &str, directory: &str) {
        let Ok(sealer) = &self.sealer else {
            return;
        };
        let sealed_key = sealer.seal(&StoredCert::key_label(site), key_pem.as_bytes());
        if sealed_key.is_empty() {
            return;
        }
        let cert = StoredCert {
            site: site.to_owned(),
            chain_pem: chain_pem.to_owned(),
            sealed_key,
            directory: directory.to_owned(),
            version: 0,
        };
        if let Err(e) = self.store.put_acme_cert(&cert).await {
            tracing::warn!(site = %site, error = %e, "cannot put the certificate into the store: other nodes order their own when due");
        }
    }

    /// Reads what other nodes wrote to the store: certificates newer than this node's are
    /// served (and kept in the files), challenge answers are put up here too. At the first
    /// read (`initial`), certificates this node has that the store lacks are put there.
    async fn sync(&self, initial: bool) {
        let since = self.seen.load(Ordering::Relaxed);
        match self.store.acme_certs(since).await {
            Ok(rows) => {
                let mut in_store = std::collections::HashSet::new();
                for row in &rows {
                    self.seen.fetch_max(row.version, Ordering::Relaxed);
                    in_store.insert(row.site.clone());
                    self.adopt(row);
                }
                if initial && since == 0 {
                    self.share_own(&in_store).await;
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the store's certificates"),
        }
        if self.shared {
            match self.store.acme_challenges().await {
                Ok(all) => self.answer_remote(all),
                Err(e) => tracing::debug!(error = %e, "cannot read the store's challenges"),
            }
        }
    }

    /// Puts the ACME certificates this node serves from its files, and the store lacks, into
    /// the store (a node that joins a fleet with certificates of its own).
    async fn share_own(&self, in_store: &std::collections::HashSet<String>) {
        let Some(directory) = crate::lock(&self.settings)
            .as_ref()
            .map(|s| s.directory.clone())
        else {
            return;
        };
        let own: Vec<String> = crate::lock(&self.status)
            .values()
            .filter(|st| st.source == CertSource::Acme && !in_store.contains(&st.site))
            .map(|st| st.site.clone())
            .collect();
        for site in own {
            let (pem, key) = self.files(&site);
            let from = std::fs::read_to_string(self.origin_file(&site)).ok();
            if from.as_deref() != Some(directory.as_str()) {
                continue;
            }
            if let (Ok(chain), Ok(key)) =
                (std::fs::read_to_string(pem), std::fs::read_to_string(key))
            {
                self.share_cert(&site, &chain, &key, &directory).await;
            }
        }
    }

    /// Serves `row` if it is for a site here, from the configured CA, and newer than what this
    /// node serves.
    fn adopt(&self, row: &StoredCert) {
        let directory = crate::lock(&self.settings)
            .as_ref()
            .map(|s| s.directory.clone());
        if directory.as_deref() != Some(row.directory.as_str()) {
            return;
        }
        if !crate::lock(&self.sites).iter().any(|w| w.site == row.site) {
            return;
        }
        let Ok(sealer) = &self.sealer else {
            return;
        };
        let Some(key) = sealer
            .open(&StoredCert::key_label(&row.site), &row.sealed_key)
            .and_then(|k| String::from_utf8(k).ok())
        else {
            tracing::warn!(site = %row.site, "the store's key for this certificate does not open here: every node of a fleet needs the same STATE/fingerprint.key");
            return;
        };
        let (info, ck) = match verified(&row.site, &row.chain_pem, &key) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(site = %row.site, error = %e, "the store's certificate cannot be used here");
                return;
            }
        };
        let mut status = crate::lock(&self.status);
        let Some(st) = status.get_mut(&row.site) else {
            return;
        };
        let newer =
            st.source == CertSource::Development || st.not_after.is_none_or(|n| n < info.not_after);
        if !newer || info.not_after <= now() {
            return;
        }
        self.live.install(&row.site, ck);
        if let Err(e) = self.keep_files(&row.site, &row.chain_pem, &key, &row.directory) {
            tracing::warn!(site = %row.site, error = %e, "cannot keep a copy of the store's certificate");
        }
        st.next_attempt = self.renewal_time(&row.site, &info);
        st.source = CertSource::Acme;
        st.issuer = Some(info.issuer);
        st.not_after = Some(info.not_after);
        st.last_error = None;
        st.failures = 0;
        tracing::info!(site = %row.site, not_after = %crate::clock::http_date(info.not_after), "serving the ACME certificate another node ordered");
    }

    /// Puts up the challenge answers of other nodes' orders, and takes down those that ended.
    fn answer_remote(&self, all: Vec<PendingChallenge>) {
        let theirs: Vec<PendingChallenge> =
            all.into_iter().filter(|c| c.holder != self.node).collect();
        let txt: Vec<(String, String)> = theirs
            .iter()
            .filter(|c| c.kind == AcmeChallenge::Dns01.as_str())
            .map(|c| (c.name.clone(), c.value.clone()))
            .collect();
        let alpn: HashMap<String, String> = theirs
            .into_iter()
            .filter(|c| c.kind == AcmeChallenge::TlsAlpn01.as_str())
            .map(|c| (c.name, c.value))
            .collect();
        let txt_changed = {
            let mut remote = crate::lock(&self.remote);
            for (name, value) in &alpn {
                if remote.alpn.get(name) == Some(value) {
                    continue;
                }
                let cert = crate::hex::decode::<32>(value)
                    .ok_or_else(|| tls::TlsError::Acme("not a SHA-256 in hex".into()))
                    .and_then(|digest| tls::acme_challenge_cert(name, &digest));
                match cert {
                    Ok(cert) => {
                        self.live.begin_challenge(name, cert);
                        remote.alpn.insert(name.clone(), value.clone());
                        tracing::info!(name = %name, "answering another node's TLS-ALPN-01 validation");
                    }
                    Err(e) => {
                        tracing::warn!(name = %name, error = %e, "cannot answer another node's TLS-ALPN-01 validation")
                    }
                }
            }
            let gone: Vec<String> = remote
                .alpn
                .keys()
                .filter(|n| !alpn.contains_key(*n))
                .cloned()
                .collect();
            for name in gone {
                self.live.end_challenge(&name);
                remote.alpn.remove(&name);
            }
            let changed = remote.txt != txt;
            remote.txt = txt;
            changed
        };
        if txt_changed {
            self.publish_txt();
        }
    }

    /// Publishes this node's DNS-01 records and other nodes'.
    fn publish_txt(&self) {
        let mut all = crate::lock(&self.local_txt).clone();
        all.extend(crate::lock(&self.remote).txt.iter().cloned());
        (self.txt)(all);
    }

    /// Writes a site's certificate, key and directory to its files (the key first: a chain on
    /// disk always has its key beside it).
    fn keep_files(
        &self,
        site: &str,
        chain_pem: &str,
        key_pem: &str,
        directory: &str,
    ) -> Result<(), AcmeError> {
        let (pem, key) = self.files(site);
        let write = |path: &Path, text: &str| {
            std::fs::create_dir_all(&self.dir)
                .and_then(|()| tls::write_private_atomic(path, text.as_bytes()))
                .map_err(|e| AcmeError::Setup(format!("cannot write {}: {e}", path.display())))
        };
        write(&key, key_pem)?;
        write(&pem, chain_pem)?;
        write(&self.origin_file(site), directory)
    }

    /// The account of `settings.directory`: the fleet's from the store, else this node's file,
    /// else a new one (kept in both).
    async fn account(
        &self,
        settings: &AcmeSettings,
        retry_after: &client::RetryAfter,
    ) -> Result<instant_acme::Account, AcmeError> {
        let file = self.account_file(&settings.directory);
        let label = format!("acme account of {}", settings.directory);
        let keep_file = |creds: &[u8]| {
            let written = std::fs::create_dir_all(&self.dir)
                .and_then(|()| tls::write_private_atomic(&file, creds));
            if let Err(e) = written {
                tracing::warn!(file = %file.display(), error = %e, "cannot keep the ACME account");
            }
        };
        let sealer = self.sealer.as_ref().ok();
        if let Some(sealer) = sealer {
            match self.store.acme_account(&settings.directory).await {
                Ok(Some(sealed)) => match sealer.open(&label, &sealed) {
                    Some(creds) => {
                        if !file.exists() {
                            keep_file(&creds);
                        }
                        return client::load_account(settings, &creds, "the store", retry_after)
                            .await;
                    }
                    None => {
                        tracing::warn!(directory = %settings.directory, "the store's ACME account does not open here: every node of a fleet needs the same STATE/fingerprint.key; using this node's own")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the store's ACME account; using this node's file")
                }
            }
        }
        if let Ok(creds) = std::fs::read(&file) {
            if let Some(sealer) = sealer {
                let _ = self
                    .store
                    .add_acme_account(&settings.directory, &sealer.seal(&label, &creds))
                    .await;
            }
            let from = file.display().to_string();
            return client::load_account(settings, &creds, &from, retry_after).await;
        }
        let (account, creds) = client::create_account(settings, retry_after).await?;
        tracing::info!(directory = %settings.directory, file = %file.display(), "ACME account created");
        // Two nodes creating one at once: the one the store kept is the fleet's.
        if let Some(sealer) = sealer {
            let sealed = sealer.seal(&label, &creds);
            if let Ok(kept) = self
                .store
                .add_acme_account(&settings.directory, &sealed)
                .await
            {
                if kept != sealed {
                    if let Some(theirs) = sealer.open(&label, &kept) {
                        keep_file(&theirs);
                        return client::load_account(settings, &theirs, "the store", retry_after)
                            .await;
                    }
                }
            }
        }
        keep_file(&creds);
        Ok(account)
    }

    /// Writes the status of every site for `portcullis certs` (best effort: it is a report).
    fn save_status(&self) {
        let text = serde_json::to_vec_pretty(&self.status()).unwrap_or_default();
        let path = self.dir.join("status.json");
        let written = std::fs::create_dir_all(&self.dir)
            .and_then(|()| tls::write_private_atomic(&path, &text));
        if let Err(e) = written {
            tracing::debug!(file = %path.display(), error = %e, "cannot write the ACME status");
        }
    }

    async fn order(
        &self,
        settings: &AcmeSettings,
        w: &Wanted,
        retry_after: &client::RetryAfter,
    ) -> Result<(tls::CertInfo, Issued), AcmeError> {
        let account = self.account(settings, retry_after).await?;
        let answers = Answers {
            acme: self,
            site: &w.site,
            alpn: Mutex::new(Vec::new()),
            up: Mutex::new(Vec::new()),
        };
        let issued = client::order(&account, &w.names, w.challenge, &answers).await?;
        let info = tls::cert_info(&issued.key).map_err(|e| AcmeError::Refused(e.to_string()))?;
        self.keep_files(
            &w.site,
            &issued.chain_pem,
            &issued.key_pem,
            &settings.directory,
        )?;
        Ok((info, issued))
    }
}

/// Where one order's challenge answers go: this node's edge or DNS server at once, and the
/// store, so that every node of a fleet answers whichever the CA reaches.
pub(crate) struct Answers<'a> {
    acme: &'a Acme,
    site: &'a str,
    /// Names whose TLS-ALPN-01 certificate this order put up.
    alpn: Mutex<Vec<String>>,
    /// What this order shared through the store.
    up: Mutex<Vec<PendingChallenge>>,
}

impl Answers<'_> {
    /// Answers TLS-ALPN-01 for `name` with the key authorization's `digest`.
    pub(crate) async fn alpn(&self, name: &str, digest: [u8; 32]) -> Result<(), AcmeError> {
        let cert =
            tls::acme_challenge_cert(name, &digest).map_err(|e| AcmeError::Setup(e.to_string()))?;
        self.acme.live.begin_challenge(name, cert);
        crate::lock(&self.alpn).push(name.to_owned());
        self.share(AcmeChallenge::TlsAlpn01, name, crate::hex::encode(&digest))
            .await;
        Ok(())
    }

    /// Publishes the DNS-01 record `owner` TXT `value` (beside this order's others).
    pub(crate) async fn txt(&self, owner: &str, value: String) {
        crate::lock(&self.acme.local_txt).push((owner.to_owned(), value.clone()));
        self.acme.publish_txt();
        self.share(AcmeChallenge::Dns01, owner, value).await;
    }

    /// Tells the other nodes of a fleet to answer too, and gives them time to read it.
    async fn share(&self, kind: AcmeChallenge, name: &str, value: String) {
        if !self.acme.shared {
            return;
        }
        let all = {
            let mut up = crate::lock(&self.up);
            up.push(PendingChallenge {
                site: self.site.to_owned(),
                holder: self.acme.node.clone(),
                kind: kind.as_str().to_owned(),
                name: name.to_owned(),
                value,
            });
            up.clone()
        };
        match self.acme.store.set_acme_challenges(self.site, &all).await {
            Ok(()) => tokio::time::sleep(PROPAGATION).await,
            Err(e) => {
                tracing::warn!(site = %self.site, error = %e, "cannot share the challenge answer through the store: only this node answers the CA")
            }
        }
    }

    /// Takes every answer of this order down, here and in the store.
    pub(crate) async fn end(&self) {
        let names = std::mem::take(&mut *crate::lock(&self.alpn));
        for name in &names {
            self.acme.live.end_challenge(name);
        }
        let had_txt = !std::mem::take(&mut *crate::lock(&self.acme.local_txt)).is_empty();
        if had_txt {
            self.acme.publish_txt();
        }
        if !crate::lock(&self.up).is_empty() {
            if let Err(e) = self.acme.store.set_acme_challenges(self.site, &[]).await {
                tracing::warn!(site = %self.site, error = %e, "cannot take the challenge answers out of the store");
            }
        }
    }
}

/// The certificate `chain` with `key`, if it covers `site`, with what it says of itself.
fn verified(
    site: &str,
    chain: &str,
    key: &str,
) -> Result<(tls::CertInfo, Arc<CertifiedKey>), tls::TlsError> {
    let ck = tls::certified_key_from_pem(chain, key)?;
    let host = HostPattern::parse(site).map_err(tls::TlsError::Acme)?;
    tls::check_covers(&ck, &host)?;
    Ok((tls::cert_info(&ck)?, ck))
}

/// Every site's certificate, as `portcullis certs`, `GET /api/certs`, the dashboard and
/// `/metrics` show it: `status` gives the ACME sites' state (the running client's, or the one
/// it saved last); PEM files are read for the others.
pub fn report(config: &Config, status: &[CertStatus]) -> Vec<tls::SiteCert> {
    config
        .sites
        .iter()
        .map(|s| {
            let site = s.host.to_string();
            let mut out = tls::SiteCert {
                site: site.clone(),
                source: "development",
                acme_challenge: s.acme.map(|c| c.as_str().to_owned()),
                issuer: Some("portcullis development CA".into()),
                not_after: None,
                next_renewal: None,
                last_error: None,
            };
            if let Some(files) = &s.cert {
                out.source = "file";
                match tls::load_cert_files(files).and_then(|ck| tls::cert_info(&ck)) {
                    Ok(info) => {
                        out.issuer = Some(info.issuer);
                        out.not_after = Some(info.not_after);
                    }
                    Err(e) => {
                        out.issuer = None;
                        out.last_error = Some(e.to_string());
                    }
                }
            } else if s.acme.is_some() {
                if let Some(st) = status.iter().find(|st| st.site == site) {
                    if st.source == CertSource::Acme {
                        out.source = "acme";
                        out.issuer = st.issuer.clone();
                        out.not_after = st.not_after;
                    }
                    out.next_renewal = Some(st.next_attempt);
                    out.last_error = st.last_error.clone();
                }
            }
            out
        })
        .collect()
}

/// The ACME state `serve` saved last in `state_dir` (empty if it never ran an ACME site).
pub fn saved_status(state_dir: &Path) -> Vec<CertStatus> {
    std::fs::read(state_dir.join("acme").join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// FNV-1a, for a jitter that is stable per site.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Orders what is due, one site at a time, until stopped.
async fn run(a: Arc<Acme>) {
    loop {
        let due: Vec<Wanted> = {
            let sites = crate::lock(&a.sites).clone();
            let status = crate::lock(&a.status);
            let t = now();
            sites
                .into_iter()
                .filter(|w| status.get(&w.site).is_some_and(|s| s.next_attempt <= t))
                .collect()
        };
        for w in &due {
            tokio::select! {
                _ = a.stop.cancelled() => return,
                _ = a.attempt(w) => a.save_status(),
            }
        }
        tokio::select! {
            _ = a.stop.cancelled() => return,
            _ = a.wake.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

/// In a fleet: follows what the other nodes write to the store, until stopped.
async fn follow(a: Arc<Acme>) {
    loop {
        tokio::select! {
            _ = a.stop.cancelled() => return,
            _ = tokio::time::sleep(SYNC) => a.sync(false).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_in_seconds_or_as_a_date() {
        let mut h = http::HeaderMap::new();
        assert_eq!(client::retry_after(&h), None);
        h.insert(http::header::RETRY_AFTER, "120".parse().expect("v"));
        assert_eq!(client::retry_after(&h), Some(Duration::from_secs(120)));
        let later = std::time::SystemTime::now() + Duration::from_secs(3600);
        h.insert(
            http::header::RETRY_AFTER,
            httpdate::fmt_http_date(later).parse().expect("v"),
        );
        let d = client::retry_after(&h).expect("date");
        assert!(
            d > Duration::from_secs(3590) && d <= Duration::from_secs(3600),
            "{d:?}"
        );
        h.insert(http::header::RETRY_AFTER, "soon".parse().expect("v"));
        assert_eq!(client::retry_after(&h), None);
    }

    #[test]
    fn renewal_comes_before_expiry_by_the_margin_with_a_bounded_jitter() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut config = Config {
            state_dir: dir.path().to_owned(),
            ..Config::default()
        };
        config.acme = None;
        let a = Acme::new(
            &config,
            AcmeParts {
                live: Arc::new(LiveCerts::default()),
                txt: Arc::new(|_| {}),
                store: Arc::new(crate::store::SqliteStore::open(dir.path()).expect("store")),
                node: "test".into(),
                shared: false,
            },
        );
        let info = tls::CertInfo {
            issuer: "x".into(),
            not_before: 0,
            not_after: 90 * 86_400,
        };
        let t = a.renewal_time("a.test", &info);
        let margin = 30 * 86_400;
        assert!(t <= info.not_after - margin, "{t}");
        assert!(t >= info.not_after - margin - margin / 16, "{t}");
    }
}
