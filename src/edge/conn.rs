//! What one client connection carries from request to request: its addresses, SNI, network
//! and agent family worked out once, the watchdog's request count, and the cleartext capture.
//! Plain state: it never does I/O.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use http::HeaderValue;

use super::capture::HeadCapture;
use super::Shared;
use crate::config::ListenerKind;
use crate::observe::{ClientFamily, Network, TlsVersion};

/// What a connection knows about itself, fixed at accept time.
pub(crate) struct ConnInfo {
    /// The edge, reached through the connection so a request clones no edge-wide Arc.
    pub(crate) shared: Arc<Shared>,
    pub(crate) key: (SocketAddr, ListenerKind),
    /// The client's address as forwarding headers write it.
    pub(crate) client: ClientAddr,
    /// The client's address.
    pub(crate) peer: std::net::IpAddr,
    /// The pool the listener belonged to at accept time, used if a reload removes it.
    pub(crate) pool: String,
    /// Lowercase SNI of a TLS connection.
    pub(crate) sni: Option<String>,
    /// Negotiated TLS version (`None` for cleartext).
    pub(crate) tls: TlsVersion,
    /// The client's network, for analytics.
    pub(crate) network: Network,
    /// The family of the connection's User-Agent: clients rarely change agent mid-connection.
    pub(crate) agent: FirstSeen<Vec<u8>, ClientFamily>,
    /// Requests begun and in flight, for the connection's watchdog.
    pub(crate) watch: Arc<crate::net::Watch>,
    /// Cleartext connections only: what the client sent since its last complete head.
    pub(crate) capture: Option<Arc<HeadCapture>>,
    /// `Alt-Svc` advertising HTTP/3 on this port, when the listener's address has a QUIC
    /// socket on it; set on the answers of sites that serve HTTP/3.
    pub(crate) alt_svc: Option<HeaderValue>,
}

/// A request in flight on its connection; dropped when its response has been sent (with the
/// origin's body that carries it) or abandoned.
pub(crate) struct InFlight {
    pub(crate) conn: Arc<ConnInfo>,
    /// Whether the connection reads another request after this one.
    pub(crate) keep_alive: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn.request_done(self.keep_alive);
    }
}

impl ConnInfo {
    /// Keeps what the client sends between requests (cleartext connections).
    pub(crate) fn with_capture(mut self, c: Arc<HeadCapture>) -> ConnInfo {
        self.capture = Some(c);
        self
    }

    pub(crate) fn request_started(&self) {
        self.watch.request_started();
        if let Some(c) = &self.capture {
            c.disarm();
        }
    }

    pub(crate) fn request_done(&self, keep_alive: bool) {
        self.watch.request_done();
        if let (Some(c), true) = (&self.capture, keep_alive) {
            c.arm();
        }
    }

    pub(crate) fn client_family(&self, ua: Option<&[u8]>) -> ClientFamily {
        match ua {
            Some(ua) => self.agent.get(ua, |ua| ClientFamily::classify(Some(ua))),
            None => ClientFamily::None,
        }
    }
}

/// A value worked out from a connection's first request and reused for later requests that
/// bring the same key (nearly all do); any other key gets it worked out afresh.
pub(crate) struct FirstSeen<K, V>(OnceLock<(K, V)>);

impl<K, V> Default for FirstSeen<K, V> {
    fn default() -> Self {
        FirstSeen(OnceLock::new())
    }
}

impl<K, V: Clone> FirstSeen<K, V> {
    pub(crate) fn get<Q>(&self, key: &Q, make: impl FnOnce(&Q) -> V) -> V
    where
        Q: PartialEq + ToOwned<Owned = K> + ?Sized,
        K: std::borrow::Borrow<Q>,
    {
        if let Some((k, v)) = self.0.get() {
            if k.borrow() == key {
                return v.clone();
            }
        }
        let v = make(key);
        let _ = self.0.set((key.to_owned(), v.clone()));
        v
    }
}

/// How a client address is written in forwarding headers, prepared once per connection.
pub(crate) struct ClientAddr {
    /// `X-Forwarded-For` value.
    pub(crate) xff: HeaderValue,
    /// `for=` parameter of `Forwarded` (RFC 7239: IPv6 quoted and bracketed).
    pub(crate) node: String,
    /// The `Forwarded` value by the host of the connection's first request: later requests
    /// nearly always name the same host, and a connection keeps one protocol. The host is
    /// kept as bytes of its own: a `HeaderValue` from the request would pin hyper's whole read
    /// buffer (8 KiB or more) for the connection's life.
    pub(crate) forwarded: FirstSeen<Vec<u8>, Option<HeaderValue>>,
}

impl ClientAddr {
    pub(crate) fn new(ip: IpAddr) -> ClientAddr {
        let ip = match ip {
            IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        let node = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        ClientAddr {
            // An IP address's text is always a valid header value.
            xff: HeaderValue::try_from(ip.to_string())
                .unwrap_or(HeaderValue::from_static("unknown")),
            node,
            forwarded: FirstSeen::default(),
        }
    }
}
