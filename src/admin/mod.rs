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

mod auth;
mod charts;
pub mod client;
mod pages;
mod routes;
mod service;
mod stage;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{AdminSettings, Config, ConfigError, ListenerKind, Overrides};
use crate::stages::drain::Drain;
use crate::stages::Plans;

pub use auth::{hash_token, token_path};
use auth::{parse_hex32, token};
pub use routes::{OPENAPI, ROUTES};

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
    /// Every site's certificate (source, issuer, expiry, next renewal, last error).
    fn certs(&self) -> Vec<crate::tls::SiteCert>;
    /// Whether the store answered its last query (a node serves on while it does not).
    fn store_up(&self) -> bool;
    /// This node's name in the fleet.
    fn node(&self) -> &str;
    /// Validates the config with `overrides` on top of its source, applies it and keeps the
    /// overrides. On error nothing changes.
    async fn apply_overrides(&self, overrides: Overrides) -> Result<(), ControlError>;
    /// Keeps `plans` and applies them (a target pool starts serving the site over TLS).
    async fn set_stages(&self, plans: Plans) -> Result<(), ControlError>;
    /// The site overrides in force.
    fn overrides(&self) -> Overrides;
    /// The store: the audit log, the exposure queue and the analytics rollups.
    fn store(&self) -> Arc<dyn crate::store::Store>;
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
    sessions: Mutex<HashMap<String, auth::Session>>,
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
    let tls = crate::tls::listener_acceptor(settings.cert.as_ref(), state_dir, settings.listen)?;
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
    let router = routes::router(ctx);
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
