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
//! Never: logs or returns key material, opens a cleartext port, or blocks a handshake (the
//! edge reads `LiveCerts`; this module only writes it).

mod client;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::sign::CertifiedKey;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::{now, Timestamp};
use crate::config::{AcmeChallenge, AcmeSettings, Config, HostPattern};
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

/// The running ACME client.
pub struct Acme {
    settings: Mutex<Option<AcmeSettings>>,
    sites: Mutex<Vec<Wanted>>,
    status: Mutex<HashMap<String, CertStatus>>,
    dir: PathBuf,
    live: Arc<LiveCerts>,
    txt: TxtSink,
    failures_total: std::sync::atomic::AtomicU64,
    wake: Notify,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Acme {
    /// Loads the stored certificates of `config`'s ACME sites into `live` and starts the task
    /// that orders and renews them.
    pub fn start(config: &Config, live: Arc<LiveCerts>, txt: TxtSink) -> Arc<Acme> {
        let a = Arc::new(Acme {
            settings: Mutex::new(config.acme.clone()),
            sites: Mutex::new(Vec::new()),
            status: Mutex::new(HashMap::new()),
            dir: config.state_dir.join("acme"),
            live,
            txt,
            failures_total: Default::default(),
            wake: Notify::new(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        a.configure(config);
        a.tasks.spawn(run(a.clone()));
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
        self.failures_total
            .load(std::sync::atomic::Ordering::Relaxed)
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
        let loaded = tls::certified_key_from_pem(&chain, &key).and_then(|ck| {
            let host = HostPattern::parse(&w.site).map_err(tls::TlsError::Acme)?;
            tls::check_covers(&ck, &host)?;
            Ok((tls::cert_info(&ck)?, ck))
        });
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

    /// One attempt for `w`; updates its status.
    async fn attempt(&self, w: &Wanted) {
        let settings = crate::lock(&self.settings).clone();
        let retry_after = client::RetryAfter::default();
        let result = match settings {
            None => Err(AcmeError::Setup("no [acme] section".into())),
            Some(settings) => self.order(&settings, w, &retry_after).await,
        };
        let mut status = crate::lock(&self.status);
        let Some(st) = status.get_mut(&w.site) else {
            return;
        };
        match result {
            Ok((info, issued)) => {
                self.live.install(&w.site, issued.key);
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
            }
            Err(e) => {
                self.failures_total
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                st.failures = st.failures.saturating_add(1);
                let mut wait = FIRST_BACKOFF
                    .saturating_mul(2u32.saturating_pow(st.failures.saturating_sub(1).min(16)))
                    .min(MAX_BACKOFF);
                if matches!(e, AcmeError::RateLimited(_)) {
                    wait = wait.max(Duration::from_secs(3600));
                }
                // The CA's own word on when to come back wins over a shorter backoff (but not
                // beyond the cap: a CA asking for days is asked again in six hours).
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
            }
        }
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
        let account = client::account(
            settings,
            &self.account_file(&settings.directory),
            retry_after,
        )
        .await?;
        let issued = client::order(&account, &w.names, w.challenge, &self.live, &self.txt).await?;
        let info = tls::cert_info(&issued.key).map_err(|e| AcmeError::Refused(e.to_string()))?;
        let (pem, key) = self.files(&w.site);
        let write = |path: &Path, text: &str| {
            tls::write_private_atomic(path, text.as_bytes())
                .map_err(|e| AcmeError::Setup(format!("cannot write {}: {e}", path.display())))
        };
        // The key first: a chain on disk always has its key beside it.
        write(&key, &issued.key_pem)?;
        write(&pem, &issued.chain_pem)?;
        write(&self.origin_file(&w.site), &settings.directory)?;
        Ok((info, issued))
    }
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
        let a = Acme {
            settings: Mutex::new(config.acme.take()),
            sites: Mutex::new(Vec::new()),
            status: Mutex::new(HashMap::new()),
            dir: dir.path().join("acme"),
            live: Arc::new(LiveCerts::default()),
            txt: Arc::new(|_| {}),
            failures_total: Default::default(),
            wake: Notify::new(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
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
