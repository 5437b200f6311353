//! Portcullis: an HTTPS-only edge.
//!
//! # Layout
//!
//! - [`config`]: the TOML schema, every load-time invariant, and the validated [`config::Config`].
//! - [`tls`]: PEM loading, the development CA, and the rustls server config (certificate by SNI).
//! - [`https`]: the one HTTPS client helper: TLS connect with an SNI name, one HTTP/1.1 request.
//! - [`analytics`]: observations, in-memory aggregation, the SQLite store, the impact report and
//!   `/metrics`.
//! - [`exposure`]: credential detection in cleartext requests and keyed fingerprints.
//! - [`edge`]: listeners per pool address, protocol sniffing, cleartext modes, HSTS, proxying;
//!   reloads by diff and graceful drain.
//! - [`dns`]: the authoritative DNS server, zones built from the snapshot, zone file export.
//! - [`probe`]: `portcullis probe`, an audit of any endpoint's cleartext behaviour.
//! - [`net`]: accept loops that back off, connection caps, the descriptor limit.
//! - [`firewall`]: the nftables table that refuses cleartext on closed addresses in the kernel.
//! - [`runtime`]: the composition root: starts every part, the one `apply`, signals, shutdown.
//! - [`seal`]: the installation secret: fingerprint key, and sealing of what the store keeps.
//! - [`stages`]: staged switch-off plans: warn headers, brownout windows, the move.
//! - [`demo`]: the built-in demo: a loopback config and an echo origin.
//!
//! The binary (`main.rs`) only parses arguments and calls into these modules; its flags live in
//! `cli.rs` and what it prints in `output.rs`, modules of the binary, not of this library.

#![forbid(unsafe_code)]

pub mod acme;
pub mod admin;
pub mod analytics;
pub mod clock;
pub mod config;
pub mod demo;
pub mod dns;
pub mod edge;
pub mod exposure;
pub mod firewall;
pub mod hex;
pub mod https;
pub mod net;
pub mod observe;
pub mod probe;
pub mod runtime;
pub mod seal;
pub mod stages;
pub mod store;
pub mod tls;

/// Locks `m`, going on with the data if another thread panicked while holding it: every
/// mutex here guards counters or caches that stay usable.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An error with its causes ("error performing TLS handshake: invalid peer certificate:
/// UnknownIssuer"): the first line alone rarely says what to fix. A cause whose text the
/// message already holds is not repeated.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}
