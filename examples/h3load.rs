//! A small HTTP/3 load generator for `bench/bench.py` (h2load has no HTTP/3 in Debian):
//! `--conns` QUIC connections, each keeping `--streams` GET requests in flight, for
//! `--duration` seconds after a one-second warm-up. Prints `done N failed F rps R`.
//!
//! cargo run --release --example h3load -- --addr 127.0.0.21:9443 --host portcullis.bench.test --ca cert.pem

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

struct Args {
    addr: SocketAddr,
    host: String,
    ca: String,
    conns: usize,
    streams: usize,
    duration: u64,
    agent: String,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        addr: "127.0.0.1:443".parse().map_err(|e| format!("{e}"))?,
        host: "localhost".into(),
        ca: String::new(),
        conns: 16,
        streams: 16,
        duration: 8,
        agent: "h3load".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{k} {v}: {e}");
        match k.as_str() {
            "--addr" => a.addr = v.parse().map_err(|e| bad(&e))?,
            "--host" => a.host = v,
            "--ca" => a.ca = v,
            "--conns" => a.conns = v.parse().map_err(|e| bad(&e))?,
            "--streams" => a.streams = v.parse().map_err(|e| bad(&e))?,
            "--duration" => a.duration = v.parse().map_err(|e| bad(&e))?,
            "--user-agent" => a.agent = v,
            _ => return Err(format!("unknown option {k}")),
        }
    }
    if a.ca.is_empty() {
        return Err("--ca FILE (the server certificate's issuer, PEM) is required".into());
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let a = Arc::new(args()?);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&a.ca).map_err(|e| format!("{}: {e}", a.ca))? {
        roots
            .add(c.map_err(|e| format!("{}: {e}", a.ca))?)
            .map_err(|e| format!("{}: {e}", a.ca))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut endpoint = quinn::Endpoint::client("0.0.0.0:0".parse().map_err(|e| format!("{e}"))?)
        .map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));

    let counting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..a.conns {
        let conn = endpoint
            .connect(a.addr, &a.host)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("QUIC connection to {}: {e}", a.addr))?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        for _ in 0..a.streams {
            let (mut send, a) = (send.clone(), a.clone());
            let (counting, stop, done, failed) =
                (counting.clone(), stop.clone(), done.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                let url = format!("https://{}:{}/", a.host, a.addr.port());
                while !stop.load(Ordering::Relaxed) {
                    let ok = get(&mut send, &url, &a.agent).await;
                    if counting.load(Ordering::Relaxed) {
                        match ok {
                            true => done.fetch_add(1, Ordering::Relaxed),
                            false => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    counting.store(true, Ordering::Relaxed);
    let start = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(a.duration)).await;
    counting.store(false, Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let n = done.load(Ordering::Relaxed);
    println!(
        "done {n} failed {} rps {:.0}",
        failed.load(Ordering::Relaxed),
        n as f64 / secs
    );
    Ok(())
}

/// One GET, its body read to the end; whether it got a 200.
async fn get(
    send: &mut h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    url: &str,
    agent: &str,
) -> bool {
    let Ok(req) = http::Request::get(url).header("user-agent", agent).body(()) else {
        return false;
    };
    let Ok(mut stream) = send.send_request(req).await else {
        return false;
    };
    if stream.finish().await.is_err() {
        return false;
    }
    let Ok(resp) = stream.recv_response().await else {
        return false;
    };
    while let Ok(Some(mut chunk)) = stream.recv_data().await {
        chunk.advance(chunk.remaining());
    }
    resp.status() == http::StatusCode::OK
}
