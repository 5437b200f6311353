//! The admin plane: an HTTPS-only JSON API (axum) to read sites, pools, traffic, impact and
//! exposures, and to change a site's cleartext mode, pool, origin or HSTS live.
//!
//! Invariant 5: it only ever listens with TLS (cleartext gets the fixed 400), and every route
//! but `/healthz` needs a bearer token. The token is generated at first start, shown once on
//! standard output, and stored only as its SHA-256 (file mode 0600); comparisons are
//! constant-time; failed attempts are rate-limited per client address. Changes are asked of
//! the composition root through [`Control`]: it validates them like the file, applies them with
//! the same `apply` as SIGHUP and keeps them; this module records them in the store's audit log.
//! It never touches the edge or the firewall itself. A token never reaches a log.

mod api;
pub mod client;
mod service;
mod stage;
mod ui;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::digest;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{AdminSettings, Config, ConfigError, ListenerKind, Overrides};
use crate::stages::drain::Drain;
use crate::stages::Plans;

pub use api::{OPENAPI, ROUTES};

/// Failed authentications allowed per client address and window before 429.
const MAX_FAILURES: u32 = 5;
/// The rate limiter's window.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Admin connections open at once: a handful of operators and scripts need far fewer, and
/// the cap keeps the control plane from taking the descriptors the edge serves with.
const MAX_CONNECTIONS: usize = 64;
/// Admin connections from one address at once (a browser opens about six).
const MAX_CONNECTIONS_PER_CLIENT: usize = 16;

/// Why the admin plane could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    #[error("admin listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin token file {path}: {reason}")]
    Token { path: String, reason: String },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// What the admin plane may ask of the running program. The composition root implements it;
/// every change goes through its one `apply`, so an admin change and a SIGHUP behave alike.
#[async_trait::async_trait]
pub trait Control: Send + Sync {
    /// The running config.
    fn config(&self) -> Arc<Config>;
    /// Configs applied since start (1 for the first).
    fn generation(&self) -> u64;
    /// Sites still served on the open pool they left.
    fn drains(&self) -> Vec<Drain>;
    /// The staged switch-off plans.
    fn stages(&self) -> Arc<Plans>;
    /// Sockets the edge listens on now.
    async fn listening(&self) -> Vec<(SocketAddr, ListenerKind)>;
    /// The `/metrics` exposition text.
    fn metrics(&self) -> String;
    /// Validates the config with `overrides` on top of its source, applies it and keeps the
    /// overrides. On error nothing changes.
    async fn apply_overrides(&self, overrides: Overrides) -> Result<(), ControlError>;
    /// Keeps `plans` and applies them (a target pool starts serving the site over TLS).
    async fn set_stages(&self, plans: Plans) -> Result<(), ControlError>;
    /// The site overrides in force.
    fn overrides(&self) -> Overrides;
    /// Where the audit log is kept.
    fn store(&self) -> Arc<dyn crate::store::PolicyStore>;
}

/// Why a change asked through [`Control`] was not applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The config with the change breaks a rule; nothing was applied.
    #[error(transparent)]
    Invalid(ConfigError),
    /// The change is valid but could not be applied or kept (a socket, a certificate, the
    /// state directory).
    #[error("{0}")]
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

/// The client's address, set per connection.
#[derive(Clone, Copy)]
pub(crate) struct Peer(pub IpAddr);

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    ReadOnly,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ReadOnly => "read-only",
        }
    }
}

pub(crate) struct Ctx {
    control: Arc<dyn Control>,
    state_dir: PathBuf,
    token: [u8; 32],
    read_only: Option<[u8; 32]>,
    failures: Mutex<HashMap<IpAddr, (u32, tokio::time::Instant)>>,
    /// Serialises changes: read overrides, validate, apply, persist.
    changes: tokio::sync::Mutex<()>,
    /// Dashboard sessions by cookie value.
    sessions: Mutex<HashMap<String, ui::Session>>,
}

impl Ctx {
    /// The role of a presented token, comparing digests in constant time.
    fn role(&self, presented: &str) -> Option<Role> {
        let d = digest::digest(&digest::SHA256, presented.as_bytes());
        let is =
            |h: &[u8; 32]| aws_lc_rs::constant_time::verify_slices_are_equal(d.as_ref(), h).is_ok();
        if is(&self.token) {
            Some(Role::Admin)
        } else if self.read_only.as_ref().is_some_and(is) {
            Some(Role::ReadOnly)
        } else {
            None
        }
    }

    /// Seconds to wait before trying again, if `ip` has failed too often.
    fn limited(&self, ip: IpAddr) -> Option<u64> {
        let map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let (n, since) = map.get(&ip)?;
        let left = FAILURE_WINDOW.checked_sub(since.elapsed())?;
        (*n >= MAX_FAILURES).then(|| left.as_secs().max(1))
    }

    fn failed(&self, ip: IpAddr) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let e = map.entry(ip).or_insert((0, tokio::time::Instant::now()));
        if e.1.elapsed() >= FAILURE_WINDOW {
            *e = (0, tokio::time::Instant::now());
        }
        e.0 += 1;
        // Bounded: forget stale entries once the map grows.
        if map.len() > 10_000 {
            map.retain(|_, (_, t)| t.elapsed() < FAILURE_WINDOW);
        }
    }
}

/// The token file in a state directory.
pub fn token_path(state_dir: &Path) -> PathBuf {
    state_dir.join("admin-token.sha256")
}

/// Loads the admin token's digest, or creates a token: returns the new token (to show once).
fn token(state_dir: &Path) -> Result<([u8; 32], Option<String>), AdminError> {
    let path = token_path(state_dir);
    let fail = |reason: String| AdminError::Token {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::read_to_string(&path) {
        Ok(hex) => Ok((
            parse_hex32(hex.trim()).ok_or_else(|| fail("not a SHA-256 in hex".into()))?,
            None,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut raw = [0u8; 24];
            aws_lc_rs::rand::fill(&mut raw).map_err(|_| fail("no system randomness".into()))?;
            let token = format!("pct_{}", crate::hex::encode(&raw));
            let d = digest::digest(&digest::SHA256, token.as_bytes());
            let hex = crate::hex::encode(d.as_ref());
            std::fs::create_dir_all(state_dir).map_err(|e| fail(e.to_string()))?;
            crate::tls::write_private(&path, format!("{hex}\n").as_bytes())
                .map_err(|e| fail(e.to_string()))?;
            let mut h = [0u8; 32];
            h.copy_from_slice(d.as_ref());
            Ok((h, Some(token)))
        }
        Err(e) => Err(fail(e.to_string())),
    }
}

/// The SHA-256 of a token, in hex, for `read_only_token_sha256`.
pub fn hash_token(token: &str) -> String {
    crate::hex::encode(digest::digest(&digest::SHA256, token.trim().as_bytes()).as_ref())
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    crate::hex::decode::<32>(s)
}

/// A running admin plane.
#[derive(Debug, Clone)]
pub struct Admin {
    /// The token, when it was created by this start (to be shown once).
    pub new_token: Option<String>,
    pub addr: SocketAddr,
}

/// Starts the admin listener on the current runtime, as a task of `tasks`; it stops (and
/// closes its socket) with `stop`.
pub async fn start(
    settings: &AdminSettings,
    state_dir: &Path,
    control: Arc<dyn Control>,
    stop: CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> Result<Admin, AdminError> {
    let (token, new_token) = token(state_dir)?;
    let ck = match &settings.cert {
        Some(files) => crate::tls::load_cert_files(files)?,
        None => crate::tls::DevCa::open(state_dir)?
            .certificate_for(&settings.listen.ip().to_string())?,
    };
    let tls = tokio_rustls::TlsAcceptor::from(crate::tls::single_cert_config(ck)?);
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|source| AdminError::Bind {
            addr: settings.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| AdminError::Bind {
        addr: settings.listen,
        source,
    })?;
    let ctx = Arc::new(Ctx {
        control,
        state_dir: state_dir.to_owned(),
        token,
        read_only: settings
            .read_only_token_sha256
            .as_deref()
            .and_then(parse_hex32),
        failures: Mutex::new(HashMap::new()),
        changes: tokio::sync::Mutex::new(()),
        sessions: Mutex::new(HashMap::new()),
    });
    let router = api::router(ctx);
    tracing::info!(%addr, "admin API listening (HTTPS only)");
    let acceptor = crate::net::Acceptor::new(listener, "admin");
    let limits = crate::net::Limits::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT);
    let service = move |peer: SocketAddr| {
        TowerToHyperService::new(router.clone().layer(axum::Extension(Peer(peer.ip()))))
    };
    tasks.spawn(crate::net::serve_control(
        acceptor, limits, tls, service, stop,
    ));
    Ok(Admin { new_token, addr })
}
