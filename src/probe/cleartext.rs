//! The cleartext checks: does a cleartext port refuse the connection, and if not, what does
//! it answer to one GET with the canary credential and one without? The same request, sent in
//! cleartext to the TLS port, is asked from here too.
//!
//! The only credential this sends is the canary made here: random, and marked as a probe's in
//! its value and in a header. It never follows a redirect, and reads an answer's body only to
//! discard it, for half a second at most.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::report::{Answer, PortReport};
use super::ProbeOptions;

/// A random canary credential, clearly marked as a probe's.
fn canary() -> String {
    format!(
        "portcullis-probe-canary-not-a-secret-{}",
        crate::hex::random(12)
    )
}

pub(super) async fn probe_cleartext(
    o: &ProbeOptions,
    host: &str,
    addr: SocketAddr,
    path: &str,
) -> PortReport {
    let refused = |connect: &str| PortReport {
        port: addr.port(),
        connect: connect.to_owned(),
        with_credential: None,
        without_credential: None,
        differs: false,
    };
    match tokio::time::timeout(o.timeout, TcpStream::connect(addr)).await {
        Err(_) => refused("filtered"),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused("refused"),
        Ok(Err(_)) => refused("unreachable"),
        Ok(Ok(first)) => {
            let authority = if addr.port() == 80 {
                host.to_owned()
            } else {
                format!("{host}:{}", addr.port())
            };
            let with = ask(o, first, &authority, path, Some(&canary()), host).await;
            let without = match tokio::time::timeout(o.timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => ask(o, s, &authority, path, None, host).await,
                _ => Answer::Closed,
            };
            PortReport {
                port: addr.port(),
                connect: "accepted".into(),
                differs: with != without,
                with_credential: Some(with),
                without_credential: Some(without),
            }
        }
    }
}

/// Sends one GET and classifies the answer.
pub(super) async fn ask<T>(
    o: &ProbeOptions,
    io: T,
    authority: &str,
    path: &str,
    credential: Option<&str>,
    host: &str,
) -> Answer
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let exchange = async {
        let mut req = Request::get(path)
            .header(http::header::HOST, authority)
            .header(http::header::USER_AGENT, "portcullis-probe")
            .header("x-portcullis-probe", "canary credential, not a secret");
        if let Some(c) = credential {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {c}"));
        }
        let resp = crate::https::send(io, req.body(Empty::<Bytes>::new()).ok()?)
            .await
            .ok()?;
        let location = resp
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let hsts = resp
            .headers()
            .get(http::header::STRICT_TRANSPORT_SECURITY)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let status = resp.status();
        // Read (and discard) a bounded amount of body so keep-alive servers finish cleanly.
        let _ = tokio::time::timeout(Duration::from_millis(500), resp.into_body().collect()).await;
        Some((status, location, hsts))
    };
    match tokio::time::timeout(o.timeout, exchange).await {
        Err(_) => Answer::TimedOut,
        Ok(None) => Answer::Closed,
        Ok(Some((status, location, _))) => classify(status, location, host),
    }
}

fn classify(status: StatusCode, location: Option<String>, host: &str) -> Answer {
    let s = status.as_u16();
    match s {
        200..=299 => Answer::Content { status: s },
        300..=399 => {
            let location = location.unwrap_or_default();
            let same = location.parse::<Uri>().ok().is_some_and(|u| {
                u.scheme_str() == Some("https")
                    && u.host().is_some_and(|h| h.eq_ignore_ascii_case(host))
            });
            Answer::Redirect {
                status: s,
                location,
                to_https_same_host: same,
            }
        }
        400..=499 => Answer::ClientError { status: s },
        500..=599 => Answer::ServerError { status: s },
        _ => Answer::Other { status: s },
    }
}
