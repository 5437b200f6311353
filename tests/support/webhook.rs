//! An HTTPS webhook receiver on 127.0.0.1 with a certificate from a throwaway CA, recording
//! every request it gets (headers, JSON body, and the raw body as `x-test-raw-body`).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::TestCa;

pub type Received = Arc<Mutex<Vec<(HeaderMap, serde_json::Value)>>>;

/// An HTTPS receiver on 127.0.0.1:`port` with a certificate for `localhost` from `ca`.
pub async fn receiver(ca: &TestCa, port: u16) -> (Received, tokio::task::JoinHandle<()>) {
    receiver_hanging(ca, port, 0).await
}

/// [`receiver`], except that the first `hang` requests are recorded and never answered (a
/// delivery in flight when its sender dies).
pub async fn receiver_hanging(
    ca: &TestCa,
    port: u16,
    hang: usize,
) -> (Received, tokio::task::JoinHandle<()>) {
    let dir = tempfile::tempdir().expect("tmp");
    let (cert, key) = ca.issue(dir.path(), "hook", &["localhost"]);
    let ck = portcullis::tls::load_certified_key(&cert, &key).expect("cert");
    let tls =
        tokio_rustls::TlsAcceptor::from(portcullis::tls::single_cert_config(ck).expect("tls"));
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind receiver");
    let got: Received = Arc::new(Mutex::new(Vec::new()));
    let got2 = got.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let (tls, got) = (tls.clone(), got2.clone());
            tokio::spawn(async move {
                let Ok(s) = tls.accept(s).await else { return };
                let svc = service_fn(move |req: Request<Incoming>| {
                    let got = got.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                        let mut headers = parts.headers;
                        headers.insert(
                            "x-test-raw-body",
                            String::from_utf8_lossy(&body).parse().expect("header"),
                        );
                        let n = {
                            let mut got = got.lock().expect("lock");
                            got.push((headers, json));
                            got.len()
                        };
                        if n <= hang {
                            std::future::pending::<()>().await;
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (got, task)
}
