//! The `serve` life cycle on the root: start everything a config file describes, reload it on
//! SIGHUP, drain and stop on SIGTERM or SIGINT; with the checks that belong to a running
//! program (other programs on cleartext ports, the firewall's counters).
//!
//! A reload first validates the new file; on any error the running config stays and the error
//! is logged. This module never exits the process itself: it returns to `main`.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

use super::{ConfigSource, Inner, Runtime, RuntimeError};
use crate::config::{Config, WELL_KNOWN_CLEARTEXT_PORTS};
use crate::net::Workers;

/// Runs everything the config file at `path` describes until SIGTERM or SIGINT, reloading it
/// on SIGHUP.
pub async fn serve(path: PathBuf, workers: &Workers) -> Result<(), RuntimeError> {
    let signals = Signals::install()?;
    let rt = Runtime::start(ConfigSource::File(path), Some(workers)).await?;
    if let Some(a) = rt.admin() {
        announce_token(a, &rt.inner.state_dir);
    }
    run_until_signal(&rt, true, signals).await
}

/// Shows a newly created admin token once, on standard output (never in the log).
pub fn announce_token(a: &crate::admin::Admin, state_dir: &Path) {
    use std::io::Write;
    if let Some(t) = &a.new_token {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "admin token (shown once; only its SHA-256 is kept, in {}): {t}",
            crate::admin::token_path(state_dir).display()
        );
        let _ = out.flush();
    }
}

/// The signals `serve` and `demo` answer to. Install them before announcing readiness, so a
/// signal sent right after never meets the default action (which kills the process).
pub struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    pub fn install() -> Result<Signals, RuntimeError> {
        let s = |kind| signal(kind).map_err(RuntimeError::Signals);
        Ok(Signals {
            hup: s(SignalKind::hangup())?,
            term: s(SignalKind::terminate())?,
            int: s(SignalKind::interrupt())?,
        })
    }
}

/// Serves until SIGTERM or SIGINT; on SIGHUP reloads the config from its source when `reload`
/// is set (a rejected reload keeps the running config), then shuts down in order.
pub async fn run_until_signal(
    rt: &Runtime,
    reload: bool,
    mut signals: Signals,
) -> Result<(), RuntimeError> {
    loop {
        tokio::select! {
            _ = signals.hup.recv() => match reload {
                true => match rt.reload().await {
                    Ok(()) => tracing::info!(generation = rt.snapshot().generation, "config reloaded"),
                    Err(RuntimeError::Config(e)) => {
                        for line in e.lines() {
                            tracing::error!("reload rejected, previous config kept: {line}");
                        }
                    }
                    Err(e) => tracing::error!("reload failed, previous config kept: {e}"),
                },
                false => tracing::info!("SIGHUP ignored: no config file to reload"),
            },
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
        }
    }
    let grace = rt.snapshot().config.edge.shutdown_grace;
    tracing::info!(grace = ?grace, "shutting down: no new connections, draining in-flight requests");
    if rt.shutdown(grace).await {
        tracing::info!("drained; bye");
    } else {
        tracing::warn!("grace period over; closing the remaining connections");
    }
    Ok(())
}

/// Reads the firewall's counters every 10 seconds and records the new refusals, per closed
/// address, as observations of the address's site (or `unknown` when the pool has several).
pub(super) async fn count_refusals(rt: Arc<Inner>, stop: CancellationToken) {
    let mut seen: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {}
            _ = stop.cancelled() => return,
        }
        let Ok(Ok(counters)) = tokio::task::spawn_blocking(crate::firewall::counters).await else {
            continue;
        };
        let Some(analytics) = rt.analytics.as_deref() else {
            continue;
        };
        let snap = rt.edge.snapshot();
        for (name, packets) in counters {
            // The table was applied at start, which resets its counters: they start at 0.
            let before = seen.insert(name.clone(), packets).unwrap_or(0);
            let delta = packets.saturating_sub(before);
            if delta == 0 {
                continue;
            }
            let found = crate::firewall::closed_addresses(&snap.config)
                .into_iter()
                .find(|(ip, _)| crate::firewall::counter_name(ip) == name);
            let Some((ip, pool)) = found else { continue };
            let sites: Vec<&crate::config::Site> = snap
                .config
                .sites
                .iter()
                .filter(|s| snap.config.pools[s.pool].name == pool)
                .collect();
            let site = match sites.as_slice() {
                [one] => analytics.site_id(&one.host.to_string()),
                _ => 0,
            };
            let obs = crate::analytics::connection_event(
                site,
                crate::observe::Outcome::RefusedByFirewall,
                crate::observe::Scheme::Cleartext,
                0,
                // The counters carry no client address: refusals land in 0.0.0.0/24.
                std::net::IpAddr::from([0u8, 0, 0, 0]),
            );
            tracing::debug!(address = %ip, refused = delta, "cleartext refused by the firewall");
            analytics.record_n(&obs, delta);
        }
    }
}

/// Warnings about sockets other programs hold that would accept cleartext on a closed pool's
/// addresses: a listener on the address itself, or on the wildcard of its family.
pub fn foreign_listeners(config: &Config) -> Vec<String> {
    let listening = listening_sockets();
    let mut ports: Vec<u16> = WELL_KNOWN_CLEARTEXT_PORTS.to_vec();
    for p in &config.pools {
        ports.extend(&p.cleartext_ports);
    }
    let mut out = Vec::new();
    for pool in config.pools.iter().filter(|p| p.is_closed()) {
        for addr in &pool.addresses {
            let wildcard: IpAddr = if addr.is_ipv4() {
                IpAddr::from([0u8; 4])
            } else {
                IpAddr::from([0u8; 16])
            };
            for port in &ports {
                for holder in [
                    SocketAddr::new(*addr, *port),
                    SocketAddr::new(wildcard, *port),
                ] {
                    if listening.contains(&holder) {
                        out.push(format!(
                            "another program listens on {holder}, so cleartext connections to {addr}:{port} of closed pool {:?} are accepted, not refused; stop it, bind it to other addresses, or apply the nftables rules",
                            pool.name
                        ));
                    }
                }
            }
        }
    }
    out
}

/// Listening TCP sockets from /proc/net/tcp{,6}; empty where those files do not exist.
fn listening_sockets() -> HashSet<SocketAddr> {
    let mut out = HashSet::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // Column 3 is the state; 0A is LISTEN.
            if cols.len() > 3 && cols[3] == "0A" {
                if let Some(a) = parse_proc_addr(cols[1]) {
                    out.insert(a);
                }
            }
        }
    }
    out
}

/// Parses `0100007F:1F90`: 32-bit words printed in host order, then a hex port.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (hex, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..hex.len()).step_by(8) {
        let word = u32::from_str_radix(hex.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn proc_addresses_parse() {
        assert_eq!(
            parse_proc_addr("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().expect("addr"))
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().expect("addr"))
        );
        assert_eq!(parse_proc_addr("zz:1"), None);
    }
}
