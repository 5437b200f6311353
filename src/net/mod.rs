//! Accepting and serving connections the same way on every listener: back off when `accept()`
//! fails (out of descriptors above all, instead of spinning a core), cap connections globally
//! and per client address, raise the descriptor limit at start, and bound each connection's
//! life with one watchdog ([`drive`]).
//!
//! A leaf: it knows sockets, hyper's connection futures and counts, nothing of sites or config. It must never
//! block, and never hold a lock across an await.

mod conn;
mod workers;

pub use conn::{
    answer_and_close, drive, serve_control, tls_only, Activity, Ended, OnSocket, Timeouts, Watch,
    CONTROL_TIMEOUTS, TLS_ONLY_400,
};
pub use workers::{worker_index, Workers};

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// First pause after a failed `accept()`; doubled on each failure in a row.
const BACKOFF_START: Duration = Duration::from_millis(10);
/// Longest pause: a listener out of descriptors retries at least once a second.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A listener whose failed accepts pause instead of retrying at once.
pub struct Acceptor {
    listener: TcpListener,
    /// Label for log lines ("edge", "admin", "metrics", "dns").
    what: &'static str,
    backoff: Duration,
    /// Failures since the last success; only the first of a run is logged as a warning.
    failures: u64,
}

impl Acceptor {
    pub fn new(listener: TcpListener, what: &'static str) -> Acceptor {
        Acceptor {
            listener,
            what,
            backoff: BACKOFF_START,
            failures: 0,
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection, or `None` once `stop` is cancelled. A failed accept (EMFILE,
    /// ENFILE, ENOBUFS, ...) is logged once per run of failures and followed by a pause that
    /// doubles up to a second, so a listener out of descriptors costs no CPU while it waits.
    pub async fn accept(&mut self, stop: &CancellationToken) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return None,
                a = self.listener.accept() => a,
            };
            match accepted {
                Ok(conn) => {
                    if self.failures > 0 {
                        tracing::info!(
                            listener = self.what,
                            failures = self.failures,
                            "accepting again"
                        );
                    }
                    self.failures = 0;
                    self.backoff = BACKOFF_START;
                    return Some(conn);
                }
                Err(e) => {
                    if self.failures == 0 {
                        tracing::warn!(listener = self.what, error = %e, "accept failed; backing off");
                    }
                    self.failures += 1;
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(self.backoff) => {}
                    }
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// Why a connection was refused by a [`Limits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener group holds its maximum number of connections.
    Global,
    /// This client address holds its maximum number of connections.
    PerClient,
}

/// Connection caps for a group of listeners: at most `global` connections in all and at most
/// `per_client` from one address. Shared by every worker, so the caps hold for the process.
pub struct Limits {
    global: usize,
    per_client: usize,
    open: AtomicUsize,
    /// Open connections by client address; entries are removed when they reach zero, so the
    /// map holds at most `global` entries.
    by_client: Mutex<HashMap<IpAddr, usize, foldhash::fast::RandomState>>,
    /// Connections refused because of `global`.
    pub refused_global: AtomicU64,
    /// Connections refused because of `per_client`.
    pub refused_per_client: AtomicU64,
}

impl Limits {
    /// Caps of `global` and `per_client` connections (each at least 1).
    pub fn new(global: usize, per_client: usize) -> Arc<Limits> {
        Arc::new(Limits {
            global: global.max(1),
            per_client: per_client.max(1),
            open: AtomicUsize::new(0),
            by_client: Mutex::new(HashMap::default()),
            refused_global: AtomicU64::new(0),
            refused_per_client: AtomicU64::new(0),
        })
    }

    /// Admits a connection from `ip`, or says which cap refuses it. The permit releases the
    /// connection's place when dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refusal> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.global {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refused_global.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Global);
        }
        let ip = canonical(ip);
        {
            let mut map = crate::lock(&self.by_client);
            let n = map.entry(ip).or_insert(0);
            if *n >= self.per_client {
                drop(map);
                self.open.fetch_sub(1, Ordering::AcqRel);
                self.refused_per_client.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::PerClient);
            }
            *n += 1;
        }
        Ok(Permit {
            limits: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn global(&self) -> usize {
        self.global
    }

    pub fn per_client(&self) -> usize {
        self.per_client
    }
}

/// IPv4-mapped IPv6 addresses count as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One admitted connection's place in its [`Limits`].
pub struct Permit {
    limits: Arc<Limits>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        {
            let mut map = crate::lock(&self.limits.by_client);
            if let Some(n) = map.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.ip);
                }
            }
        }
        self.limits.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The descriptor limit before and after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    pub before: u64,
    pub after: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, so connection caps and not the default
/// of 1024 decide how many clients are served. Returns the soft limit before and after.
pub fn raise_nofile_limit() -> std::io::Result<NofileLimit> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let current = getrlimit(Resource::Nofile);
    let before = current.current.unwrap_or(u64::MAX);
    let Some(hard) = current.maximum else {
        // No hard limit: set a generous finite one rather than "unlimited", which some
        // kernels refuse for descriptors.
        let want = 1 << 20;
        if before < want {
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(want),
                    maximum: None,
                },
            )
            .map_err(std::io::Error::from)?;
        }
        return Ok(NofileLimit {
            before,
            after: nofile_limit(),
        });
    };
    if before < hard {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            },
        )
        .map_err(std::io::Error::from)?;
    }
    Ok(NofileLimit {
        before,
        after: nofile_limit(),
    })
}

/// The soft descriptor limit now.
pub fn nofile_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// Opens a listening socket. IPv6 sockets are v6-only, so `::` never also takes IPv4.
/// `reuse_port` lets each worker bind its own socket on the same address.
pub fn bind_tcp(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Lets a restarted edge bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // A deep backlog absorbs bursts of new TLS connections.
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Opens a UDP socket (non-blocking; IPv6 ones v6-only if `only_v6`) with a receive buffer
/// of `recv_buffer` bytes if the kernel allows that much (`net.core.rmem_max`), less otherwise.
pub fn bind_udp(
    addr: SocketAddr,
    only_v6: bool,
    recv_buffer: usize,
) -> std::io::Result<std::net::UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() && only_v6 {
        socket.set_only_v6(true)?;
    }
    // Best effort: a smaller buffer still serves.
    let _ = socket.set_recv_buffer_size(recv_buffer);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_and_permits_release_their_place() {
        let limits = Limits::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().expect("ip");
        let b: IpAddr = "127.0.0.2".parse().expect("ip");
        let a1 = limits.admit(a).expect("first");
        let a2 = limits.admit(a).expect("second");
        assert_eq!(limits.admit(a).err(), Some(Refusal::PerClient));
        // The mapped form of the same address is the same client.
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().expect("ip");
        assert_eq!(limits.admit(mapped).err(), Some(Refusal::PerClient));
        let b1 = limits.admit(b).expect("other client");
        assert_eq!(limits.admit(b).err(), Some(Refusal::Global));
        assert_eq!(limits.open(), 3);
        drop(a1);
        let _a3 = limits.admit(a).expect("a place was released");
        drop((a2, b1));
        assert_eq!(limits.open(), 1);
        assert_eq!(limits.refused_global.load(Ordering::Relaxed), 1);
        assert_eq!(limits.refused_per_client.load(Ordering::Relaxed), 2);
        assert_eq!(crate::lock(&limits.by_client).len(), 1);
    }
}
