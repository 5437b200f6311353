//! The CLI's side of the admin API: one HTTPS request with the bearer token.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};

use crate::https::HttpsError;

/// Why a CLI call to the admin API failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error(
        "admin address {0:?}: write it like https://127.0.0.1:9443 (the admin API is HTTPS only)"
    )]
    BadAddress(String),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot reach the admin API at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("admin API answered {status}: {body}")]
    Status { status: u16, body: String },
}

/// Sends one request and returns the body of a 2xx answer.
pub async fn call(
    admin: &str,
    token: &str,
    ca: Option<&Path>,
    method: Method,
    path: &str,
    body: Option<String>,
) -> Result<String, ClientError> {
    let uri: http::Uri = admin
        .parse()
        .map_err(|_| ClientError::BadAddress(admin.to_owned()))?;
    if uri.scheme_str() != Some("https") {
        return Err(ClientError::BadAddress(admin.to_owned()));
    }
    let host = uri
        .host()
        .ok_or_else(|| ClientError::BadAddress(admin.to_owned()))?
        .trim_matches(['[', ']'])
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let extra = match ca {
        Some(ca) => crate::tls::load_certs(ca)?,
        None => Vec::new(),
    };
    let unreachable = |reason: String| ClientError::Unreachable {
        addr: admin.to_owned(),
        reason,
    };
    let cfg = crate::tls::client_config(&extra)?;
    let tls = crate::https::connect((host.as_str(), port), &host, Arc::new(cfg))
        .await
        .map_err(|e| match e {
            HttpsError::Name(_) => ClientError::BadAddress(admin.to_owned()),
            HttpsError::Handshake(e) => {
                unreachable(format!("TLS: {e} (give the admin CA with --ca)"))
            }
            e => unreachable(e.to_string()),
        })?;
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, format!("{host}:{port}"))
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| unreachable(e.to_string()))?;
    let resp = crate::https::send(tls, req)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if status.is_success() {
        Ok(body)
    } else {
        Err(ClientError::Status {
            status: status.as_u16(),
            body,
        })
    }
}
