//! The one HTTPS client helper: a TCP connection and a TLS handshake with a given SNI name and
//! client config ([`connect`]), one HTTP/1.1 request over a stream ([`send`]), or both
//! ([`request`]); and one HTTP/3 request over a QUIC connection of its own ([`h3_request`]). For the CLI's admin calls, the readiness self-probe and `portcullis probe`.
//!
//! A leaf: it imports none of our modules. It sets no timeout (the caller bounds the whole
//! exchange), keeps no connection for reuse and speaks no HTTP/2: a caller that offers `h2` in
//! ALPN handles that answer itself. It never logs a request, so never a credential in one.

use std::sync::Arc;

use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio_rustls::client::TlsStream;

/// Why an HTTPS exchange failed. Each variant keeps its source, so callers word it for their
/// own audience (and say which address it was).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpsError {
    /// The name to send as SNI and verify the certificate for is neither a DNS name nor an IP
    /// address.
    #[error("{0}")]
    Name(#[from] rustls::pki_types::InvalidDnsNameError),
    /// The TCP connection failed (refused, unreachable, the name does not resolve).
    #[error("{0}")]
    Connect(std::io::Error),
    /// The TLS handshake failed (certificate not trusted or not for the name, no common
    /// version or cipher, the peer closed).
    #[error("{0}")]
    Handshake(std::io::Error),
    /// The HTTP/1.1 exchange failed (the peer closed, or answered with something not HTTP).
    #[error("{0}")]
    Http(#[from] hyper::Error),
    /// The QUIC connection or the HTTP/3 exchange failed.
    #[error("{0}")]
    Http3(String),
}

/// Connects to `addr` and completes a TLS handshake sending `name` as SNI and verifying the
/// certificate as `config` says (its roots, or its own verifier) and offering its ALPN. The
/// stream gives the peer's certificates and the negotiated version, cipher and ALPN.
pub async fn connect(
    addr: impl ToSocketAddrs,
    name: &str,
    config: Arc<ClientConfig>,
) -> Result<TlsStream<TcpStream>, HttpsError> {
    let name = ServerName::try_from(name.to_owned())?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(HttpsError::Connect)?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(HttpsError::Handshake)
}

/// Sends one HTTP/1.1 request over `io` (TLS or not) and returns the answer's head, its body
/// still to read. The connection is driven by a spawned task that ends with the stream.
pub async fn send<T, B>(
    io: T,
    req: http::Request<B>,
) -> Result<http::Response<Incoming>, hyper::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    sender.send_request(req).await
}

/// [`connect`], then [`send`] `req` over the TLS stream.
pub async fn request<B>(
    addr: impl ToSocketAddrs,
    name: &str,
    config: Arc<ClientConfig>,
    req: http::Request<B>,
) -> Result<http::Response<Incoming>, HttpsError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tls = connect(addr, name, config).await?;
    Ok(send(tls, req).await?)
}

/// Sends one bodiless HTTP/3 request to `addr` over a QUIC connection of its own (SNI `name`,
/// ALPN `h3`, certificates verified as `config` says) and returns the answer's head and body.
/// The connection is closed once the body is read.
pub async fn h3_request(
    addr: std::net::SocketAddr,
    name: &str,
    mut config: ClientConfig,
    req: http::Request<()>,
) -> Result<http::Response<bytes::Bytes>, HttpsError> {
    use bytes::Buf as _;
    let fail = |e: &dyn std::fmt::Display| HttpsError::Http3(e.to_string());
    config.alpn_protocols = vec![b"h3".to_vec()];
    config.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config).map_err(|e| fail(&e))?;
    let local: std::net::SocketAddr = match addr {
        std::net::SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        std::net::SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let mut endpoint = quinn::Endpoint::client(local).map_err(|e| fail(&e))?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(addr, name)
        .map_err(|e| fail(&e))?
        .await
        .map_err(|e| fail(&e))?;
    let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
        .await
        .map_err(|e| fail(&e))?;
    let drive = tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    let exchange = async {
        let mut stream = send.send_request(req).await.map_err(|e| fail(&e))?;
        stream.finish().await.map_err(|e| fail(&e))?;
        let head = stream.recv_response().await.map_err(|e| fail(&e))?;
        let mut body = bytes::BytesMut::new();
        while let Some(mut chunk) = stream.recv_data().await.map_err(|e| fail(&e))? {
            body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        Ok(head.map(|()| body.freeze()))
    };
    let out = exchange.await;
    conn.close(0u32.into(), b"done");
    drive.abort();
    // Lets the close reach the server before the socket goes.
    let _ = tokio::time::timeout(std::time::Duration::from_millis(200), endpoint.wait_idle()).await;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Arc<ClientConfig> {
        Arc::new(crate::tls::client_config(&[]).expect("client config"))
    }

    #[tokio::test]
    async fn failures_keep_their_kind() {
        let bad_name = connect(("127.0.0.1", 9), "not a name", config()).await;
        assert!(matches!(bad_name, Err(HttpsError::Name(_))), "{bad_name:?}");
        // A port just released: nothing listens on it.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind");
        let refused = connect(addr, "localhost", config()).await;
        assert!(
            matches!(refused, Err(HttpsError::Connect(_))),
            "{refused:?}"
        );
    }
}
