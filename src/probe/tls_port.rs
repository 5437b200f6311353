//! The TLS port's checks: what cleartext sent to it gets, then a handshake that records the
//! version, cipher, ALPN and certificate (trusted? matching the host? expiring?), then one GET
//! for the status and the HSTS header.
//!
//! An untrusted certificate must not stop the audit, so the handshake accepts any certificate
//! and records the real verification's verdict for the report; that connection must never be
//! used for anything but this audit's one request.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::cleartext::ask;
use super::report::{parse_hsts, Http3, TlsInfo, TlsReport};
use super::ProbeOptions;
use crate::https::HttpsError;

/// Accepts any certificate but records what the real verification said, so the audit can go
/// on and report an invalid certificate instead of stopping at it.
#[derive(Debug)]
struct RecordingVerifier {
    inner: Arc<WebPkiServerVerifier>,
    result: Mutex<Option<String>>,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let r = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = r.err().map(|e| e.to_string());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The TLS port over TCP and, at the same time, HTTP/3 on its number over UDP.
pub(super) async fn probe_tls(
    o: &ProbeOptions,
    host: &str,
    addr: SocketAddr,
    path: &str,
) -> TlsReport {
    let (mut report, http3) = tokio::join!(
        probe_tcp(o, host, addr, path),
        probe_h3(o, host, addr, path)
    );
    report.http3 = http3;
    report
}

async fn probe_tcp(o: &ProbeOptions, host: &str, addr: SocketAddr, path: &str) -> TlsReport {
    let mut report = TlsReport {
        handshake: None,
        error: None,
        hsts: None,
        cleartext_to_tls_port: None,
        alt_svc: None,
        // Filled in by `probe_tls`.
        http3: Http3 {
            offered: false,
            status: None,
            error: None,
        },
    };
    // What cleartext sent to the TLS port gets.
    if let Ok(Ok(s)) = tokio::time::timeout(o.timeout, TcpStream::connect(addr)).await {
        let authority = format!("{host}:{}", addr.port());
        report.cleartext_to_tls_port = Some(ask(o, s, &authority, path, None, host).await);
    }
    let (mut cfg, verifier) = match recording_config(o) {
        Ok(c) => c,
        Err(e) => {
            report.error = Some(e);
            return report;
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec(), b"h2".to_vec()];
    let connect = crate::https::connect(addr, host, Arc::new(cfg));
    let tls = match tokio::time::timeout(o.timeout, connect).await {
        Err(_) => {
            report.error = Some("TLS handshake timed out".into());
            return report;
        }
        Ok(Err(e)) => {
            report.error = Some(match e {
                HttpsError::Name(e) => format!("{host:?} is not a server name: {e}"),
                HttpsError::Connect(e) => format!("connect: {e}"),
                e => format!("handshake: {e}"),
            });
            return report;
        }
        Ok(Ok(t)) => t,
    };
    let conn = tls.get_ref().1;
    let leaf = conn.peer_certificates().and_then(|c| c.first()).cloned();
    let hostname_match = leaf.as_ref().is_some_and(|l| {
        webpki::EndEntityCert::try_from(l).is_ok_and(|ee| {
            ServerName::try_from(host.to_owned())
                .is_ok_and(|n| ee.verify_is_valid_for_subject_name(&n).is_ok())
        })
    });
    let days_to_expiry = leaf.as_ref().and_then(|l| {
        let (_, cert) = x509_parser::parse_x509_certificate(l).ok()?;
        let not_after = cert.validity().not_after.timestamp();
        Some((not_after - crate::clock::now() as i64).div_euclid(86_400))
    });
    let mut info = TlsInfo {
        version: conn
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default(),
        cipher: conn
            .negotiated_cipher_suite()
            .map(|c| format!("{:?}", c.suite()))
            .unwrap_or_default(),
        alpn: conn
            .alpn_protocol()
            .map(|a| String::from_utf8_lossy(a).into_owned()),
        chain_error: verifier
            .result
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        hostname_match,
        days_to_expiry,
        status: None,
    };
    let h2 = info.alpn.as_deref() == Some("h2");
    let (status, hsts, alt_svc) = https_get(o, tls, host, addr.port(), path, h2).await;
    info.status = status;
    report.hsts = hsts.as_deref().map(parse_hsts);
    report.alt_svc = alt_svc;
    report.handshake = Some(info);
    report
}

async fn https_get<T>(
    o: &ProbeOptions,
    io: T,
    host: &str,
    port: u16,
    path: &str,
    h2: bool,
) -> (Option<u16>, Option<String>, Option<String>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let authority = if port == 443 {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    };
    let exchange = async {
        let resp = if h2 {
            let (mut s, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                TokioIo::new(io),
            )
            .await
            .ok()?;
            tokio::spawn(conn);
            let uri = format!("https://{authority}{path}");
            s.send_request(Request::get(uri).body(Empty::<Bytes>::new()).ok()?)
                .await
                .ok()?
        } else {
            let req = Request::get(path)
                .header(http::header::HOST, &authority)
                .body(Empty::<Bytes>::new())
                .ok()?;
            crate::https::send(io, req).await.ok()?
        };
        let header = |name| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let hsts = header(http::header::STRICT_TRANSPORT_SECURITY);
        let alt_svc = header(http::header::ALT_SVC);
        Some((resp.status().as_u16(), hsts, alt_svc))
    };
    match tokio::time::timeout(o.timeout, exchange).await {
        Ok(Some((s, h, a))) => (Some(s), h, a),
        _ => (None, None, None),
    }
}

/// A client config that accepts any certificate and records the real verification's verdict.
fn recording_config(
    o: &ProbeOptions,
) -> Result<(rustls::ClientConfig, Arc<RecordingVerifier>), String> {
    let roots = crate::tls::trust_anchors(&o.ca);
    let inner =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), crate::tls::provider())
            .build()
            .map_err(|e| format!("no trust anchors: {e}"))?;
    let verifier = Arc::new(RecordingVerifier {
        inner,
        result: Mutex::new(None),
    });
    let cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|_| "no TLS versions".to_owned())?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    Ok((cfg, verifier))
}

/// One HTTP/3 GET of `path` on the TLS port's number over UDP (ALPN `h3` only). UDP has no
/// refusal to wait for, so silence past a few seconds (or `--timeout`, if shorter) means no
/// HTTP/3. The certificate is recorded, not required, as on TCP.
async fn probe_h3(o: &ProbeOptions, host: &str, addr: SocketAddr, path: &str) -> Http3 {
    const QUIC_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);
    let failed = |e: String| Http3 {
        offered: false,
        status: None,
        error: Some(e),
    };
    let cfg = match recording_config(o) {
        Ok((cfg, _)) => cfg,
        Err(e) => return failed(e),
    };
    let authority = if addr.port() == 443 {
        host.to_owned()
    } else {
        format!("{host}:{}", addr.port())
    };
    let Ok(req) = Request::get(format!("https://{authority}{path}")).body(()) else {
        return failed(format!("{authority}{path} is not a request target"));
    };
    let patience = o.timeout.min(QUIC_PATIENCE);
    match tokio::time::timeout(patience, crate::https::h3_request(addr, host, cfg, req)).await {
        Err(_) => failed(format!(
            "no QUIC answer within {}",
            humantime::format_duration(patience)
        )),
        Ok(Err(e)) => failed(format!("QUIC: {e}")),
        Ok(Ok(resp)) => Http3 {
            offered: true,
            status: Some(resp.status().as_u16()),
            error: None,
        },
    }
}
