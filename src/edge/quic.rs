//! HTTP/3: a QUIC socket (UDP) on each TLS port of a pool's addresses (`http3`), served with
//! quinn and h3 from the same snapshot as TCP: certificates by SNI, the site found on the
//! pool, the same answers, headers, analytics (scheme `h3`) and caps. Origins are still
//! reached over HTTP/1.1.
//!
//! QUIC validates a client's address itself (no amplification past 3x before that, RFC 9000
//! 8.1); under load, new clients are also asked to prove their address with a Retry before
//! any handshake state is kept for them.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use h3::error::{Code, StreamError};
use h3::server::RequestStream;
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, Response};
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::listener::{conn_info, ActiveGuard};
use super::proxy::ClientBody;
use super::{bump, Shared, Snapshot};
use crate::analytics::aggregate::SiteId;
use crate::analytics::connection_event;
use crate::config::{EdgeSettings, ListenerKind};
use crate::observe::{Outcome, Scheme, TlsVersion};

/// Request streams a client may open at once on one connection.
const MAX_STREAMS: u32 = 128;

/// Unidirectional streams a client may open: HTTP/3's control stream and QPACK's two, with
/// room for the grease streams clients send.
const MAX_UNI_STREAMS: u32 = 8;

/// QUIC state kept across reloads: the Retry token key lives in the server config, so a
/// Retry issued before a reload is still honoured after it.
#[derive(Default)]
pub(crate) struct QuicState {
    template: std::sync::Mutex<Option<quinn::ServerConfig>>,
    /// Handshakes in progress over every QUIC socket.
    handshaking: AtomicUsize,
}

impl QuicState {
    /// The server config for `crypto` (a snapshot's) and the edge's timeouts; built once per
    /// snapshot, shared by every QUIC socket.
    pub(crate) fn server_config(
        &self,
        crypto: Arc<quinn::crypto::rustls::QuicServerConfig>,
        edge: &EdgeSettings,
    ) -> quinn::ServerConfig {
        let mut slot = crate::lock(&self.template);
        let mut cfg = match slot.take() {
            Some(mut cfg) => {
                cfg.crypto = crypto;
                cfg
            }
            None => quinn::ServerConfig::with_crypto(crypto),
        };
        let mut t = quinn::TransportConfig::default();
        // Silence for this long closes the connection (both ends take the shorter of the
        // two values they announce, so a client cannot keep it open longer).
        t.max_idle_timeout(quinn::IdleTimeout::try_from(edge.idle_timeout).ok());
        t.max_concurrent_bidi_streams(MAX_STREAMS.into());
        t.max_concurrent_uni_streams(MAX_UNI_STREAMS.into());
        cfg.transport_config(Arc::new(t));
        *slot = Some(cfg.clone());
        cfg
    }
}

/// Opens the QUIC endpoint of one listener, serving `snap`'s config, on the runtime this is
/// called in.
pub(crate) fn endpoint(
    snap: &Snapshot,
    socket: std::net::UdpSocket,
) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        snap.quic.clone(),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Points a running endpoint at a new snapshot's certificates and settings; connections in
/// progress keep what they negotiated.
pub(crate) fn update(snap: &Snapshot, endpoint: &quinn::Endpoint) {
    if let Some(c) = &snap.quic {
        endpoint.set_server_config(Some(c.clone()));
    }
}

pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    key: (SocketAddr, ListenerKind),
    endpoint: quinn::Endpoint,
    stop: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            _ = stop.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let peer = incoming.remote_address();
        // Read per client: a reload may change it.
        let retry_above = shared.snapshot.load().config.edge.quic_retry_above;
        if !incoming.remote_address_validated()
            && incoming.may_retry()
            && shared.quic.handshaking.load(Ordering::Relaxed) >= retry_above
        {
            bump(&shared.stats.quic_retries);
            let _ = incoming.retry();
            continue;
        }
        let permit = match shared.limits.admit(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                tracing::debug!(%peer, listener = %key.0, ?why, "QUIC connection refused by a cap");
                incoming.refuse();
                continue;
            }
        };
        let span = tracing::debug_span!("conn", %peer, listener = %key.0, kind = %key.1);
        let shared2 = shared.clone();
        let stop = stop.clone();
        let conn = async move {
            let _permit = permit;
            let _active = ActiveGuard::new(shared2.clone());
            connection(shared2, key, incoming, peer, stop).await;
        };
        shared.tracker.spawn(conn.instrument(span));
    }
    // New connections are refused from here on; those open finish (they were told to go).
    endpoint.set_server_config(None);
}

/// Counts a handshake in progress for as long as it lives.
struct Handshaking<'a>(&'a AtomicUsize);

impl<'a> Handshaking<'a> {
    fn enter(n: &'a AtomicUsize) -> Handshaking<'a> {
        n.fetch_add(1, Ordering::Relaxed);
        Handshaking(n)
    }
}

impl Drop for Handshaking<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One QUIC connection: the handshake within the handshake timeout, the site checked on the
/// pool, then requests until the client goes, the idle timeout, or `stop` (GOAWAY, then the
/// requests in flight finish).
async fn connection(
    shared: Arc<Shared>,
    key: (SocketAddr, ListenerKind),
    incoming: quinn::Incoming,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let snap = shared.snapshot.load_full();
    let event = |site: SiteId, outcome: Outcome| {
        if let Some(a) = &shared.analytics {
            a.record(&connection_event(
                site,
                outcome,
                Scheme::H3,
                key.0.port(),
                peer.ip(),
            ));
        }
    };
    let handshaking = Handshaking::enter(&shared.quic.handshaking);
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            bump(&shared.stats.handshake_failures);
            event(0, Outcome::HandshakeFailed);
            tracing::debug!(%peer, error = %e, "QUIC connection refused");
            return;
        }
    };
    let conn = tokio::select! {
        _ = stop.cancelled() => return,
        c = timeout(snap.config.edge.handshake_timeout, connecting) => c,
    };
    drop(handshaking);
    let conn = match conn {
        Err(_) => {
            bump(&shared.stats.handshake_timeouts);
            event(0, Outcome::HandshakeTimeout);
            return;
        }
        Ok(Err(e)) => {
            // An unknown SNI ends here: the resolver has no certificate for it.
            bump(&shared.stats.handshake_failures);
            event(0, Outcome::HandshakeFailed);
            tracing::debug!(%peer, error = %e, "QUIC handshake failed");
            return;
        }
        Ok(Ok(c)) => c,
    };
    let sni = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.server_name)
        .map(|s| s.to_ascii_lowercase());
    let site = sni
        .as_deref()
        .and_then(|name| snap.site_on(&key, name))
        .filter(|s| s.http3);
    if site.is_none() {
        // A name with a certificate here but no site on this pool, or a site with
        // `http3 = false`: as on TCP, the name is refused.
        bump(&shared.stats.unknown_sni);
        event(0, Outcome::HandshakeFailed);
        tracing::debug!(%peer, sni = sni.as_deref().unwrap_or("(none)"), "unrecognized SNI over QUIC");
        conn.close(
            Code::H3_REQUEST_REJECTED
                .value()
                .try_into()
                .unwrap_or_default(),
            b"no site by that name on this address",
        );
        return;
    }
    bump(&shared.stats.handshakes);
    bump(&shared.stats.quic_handshakes);
    let info = Arc::new(conn_info(&shared, &snap, key, peer, sni, TlsVersion::Tls13));
    let edge = snap.config.edge.clone();
    drop(snap);
    let mut builder = h3::server::builder();
    builder.max_field_section_size(edge.max_header_bytes as u64);
    let built = builder.build::<_, Bytes>(h3_quinn::Connection::new(conn));
    let mut h3 = match timeout(edge.header_read_timeout, built).await {
        Ok(Ok(h3)) => h3,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "HTTP/3 connection setup failed");
            return;
        }
        Err(_) => return,
    };
    // This connection's requests: after a GOAWAY the connection closes once they are done
    // (closing it drops every stream it carries).
    let requests = tokio_util::task::TaskTracker::new();
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => {
                // GOAWAY: no new request; those in flight finish, then the connection closes.
                let _ = h3.shutdown(0).await;
                requests.close();
                loop {
                    tokio::select! {
                        _ = requests.wait() => break,
                        r = h3.accept() => match r {
                            // Past the GOAWAY's limit h3 refuses these itself.
                            Ok(Some(_)) => continue,
                            Ok(None) | Err(_) => break,
                        },
                    }
                }
                // Closing discards whatever the client has not yet acknowledged, so the end
                // of the last answers could be lost: the client, told to go, closes once it
                // has them; past `close_timeout` the edge closes.
                let _ = timeout(edge.close_timeout, async {
                    while let Ok(Some(_)) = h3.accept().await {}
                })
                .await;
                break;
            }
            r = h3.accept() => r,
        };
        match next {
            Ok(Some(resolver)) => {
                let info = info.clone();
                let header_timeout = edge.header_read_timeout;
                let req = async move {
                    let Ok(Ok((req, stream))) =
                        timeout(header_timeout, resolver.resolve_request()).await
                    else {
                        return;
                    };
                    request(info, req, stream).await;
                };
                shared
                    .tracker
                    .spawn(requests.track_future(req).in_current_span());
            }
            Ok(None) => break,
            Err(e) => {
                if !e.is_h3_no_error() {
                    tracing::debug!(%peer, error = %e, "HTTP/3 connection ended");
                }
                break;
            }
        }
    }
}

/// One request: answered exactly as over TCP, the response streamed back.
async fn request(
    info: Arc<super::conn::ConnInfo>,
    req: http::Request<()>,
    stream: RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>,
) {
    let (mut send, recv) = stream.split();
    let body = H3Body::new(recv, req.headers()).await;
    let Ok(resp) = super::http::handle(info, req.map(|()| ClientBody::boxed(body))).await;
    let (parts, mut body) = resp.into_parts();
    if send
        .send_response(Response::from_parts(parts, ()))
        .await
        .is_err()
    {
        return;
    }
    while let Some(frame) = body.frame().await {
        let sent = match frame {
            Ok(f) => match f.into_data() {
                Ok(data) => send.send_data(data).await,
                Err(f) => match f.into_trailers() {
                    Ok(t) => send.send_trailers(t).await,
                    Err(_) => Ok(()),
                },
            },
            Err(e) => {
                // The origin's body broke off: so does the client's, visibly.
                tracing::debug!(error = %e, "origin body ended early");
                send.stop_stream(Code::H3_INTERNAL_ERROR);
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
    let _ = send.finish().await;
}

/// An HTTP/3 request body as an HTTP body: DATA frames, then trailers.
struct H3Body {
    stream: RequestStream<h3_quinn::RecvStream, Bytes>,
    state: State,
    /// A frame read ahead by [`H3Body::new`].
    ahead: Option<Result<Frame<Bytes>, StreamError>>,
    /// From `content-length`, when the client sent one.
    length: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Data,
    Trailers,
    Done,
}

impl H3Body {
    /// Polls the stream once, so that a request whose stream already ended (a GET, nearly
    /// always) is known to have no body and reaches the origin without one.
    async fn new(
        stream: RequestStream<h3_quinn::RecvStream, Bytes>,
        headers: &HeaderMap,
    ) -> H3Body {
        let length = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let mut body = H3Body {
            stream,
            state: State::Data,
            ahead: None,
            length,
        };
        let first =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        if let Poll::Ready(Some(f)) = first {
            body.ahead = Some(f);
        }
        body
    }
}

impl hyper::body::Body for H3Body {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamError>>> {
        if let Some(f) = self.ahead.take() {
            return Poll::Ready(Some(f));
        }
        loop {
            match self.state {
                State::Data => match self.stream.poll_recv_data(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(Some(mut buf))) => {
                        let data = buf.copy_to_bytes(buf.remaining());
                        if !data.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                    }
                    Poll::Ready(Ok(None)) => self.state = State::Trailers,
                    Poll::Ready(Err(e)) => {
                        self.state = State::Done;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                State::Trailers => {
                    let r = match self.stream.poll_recv_trailers(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(r) => r,
                    };
                    self.state = State::Done;
                    return Poll::Ready(match r {
                        Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
                        Ok(None) => None,
                        Err(e) => Some(Err(e)),
                    });
                }
                State::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_none() && self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match (self.state, self.length) {
            (State::Done, _) if self.ahead.is_none() => SizeHint::with_exact(0),
            (State::Data, Some(n)) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}
