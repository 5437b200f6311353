//! One ACME conversation: the account (created once, kept in the state dir with mode 0600),
//! and an order for one site answered through TLS-ALPN-01 on the site's own listeners.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType,
    HttpClient, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;

use super::{AcmeError, Issued, TxtSink};
use crate::config::{AcmeChallenge, AcmeSettings};
use crate::tls::{self, LiveCerts};

/// How long a validation may take before the order is given up (and retried later).
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(90);

/// The longest `Retry-After` of the CA's error answers in one conversation.
pub(super) type RetryAfter = Arc<Mutex<Option<Duration>>>;

/// The HTTPS client of the conversation: the system's roots plus `directory_ca`, HTTP/1.1.
/// It notes the `Retry-After` of error answers, which the problem documents do not carry.
struct Https {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>,
    retry_after: RetryAfter,
}

/// A `Retry-After` value (seconds or an HTTP-date) as a wait from now.
pub(super) fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

impl HttpClient for Https {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let fut = self.client.request(req);
        let noted = self.retry_after.clone();
        Box::pin(async move {
            match tokio::time::timeout(Duration::from_secs(30), fut).await {
                Ok(Ok(rsp)) => {
                    if !rsp.status().is_success() {
                        if let Some(wait) = retry_after(rsp.headers()) {
                            let mut n = crate::lock(&noted);
                            *n = Some(n.map_or(wait, |w| w.max(wait)));
                        }
                    }
                    Ok(BytesResponse::from(rsp))
                }
                Ok(Err(e)) => Err(instant_acme::Error::Other(Box::new(e))),
                Err(_) => Err(instant_acme::Error::Str(
                    "the ACME server did not answer in 30 s",
                )),
            }
        })
    }
}

fn http_client(
    settings: &AcmeSettings,
    retry_after: &RetryAfter,
) -> Result<Box<dyn HttpClient>, AcmeError> {
    let extra = match &settings.directory_ca {
        Some(path) => tls::load_certs(path).map_err(|e| AcmeError::Setup(e.to_string()))?,
        None => Vec::new(),
    };
    let cfg = tls::client_config(&extra).map_err(|e| AcmeError::Setup(e.to_string()))?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(cfg)
        .https_only()
        .enable_http1()
        .build();
    Ok(Box::new(Https {
        client: Client::builder(TokioExecutor::new()).build(connector),
        retry_after: retry_after.clone(),
    }))
}

/// The account of `settings.directory`: read from `file`, or created there (0600) once.
pub(super) async fn account(
    settings: &AcmeSettings,
    file: &Path,
    retry_after: &RetryAfter,
) -> Result<Account, AcmeError> {
    if let Ok(text) = std::fs::read_to_string(file) {
        let creds: AccountCredentials = serde_json::from_str(&text).map_err(|e| {
            AcmeError::Setup(format!(
                "account file {} does not parse ({e}); move it away to create a new account",
                file.display()
            ))
        })?;
        return Account::builder_with_http(http_client(settings, retry_after)?)
            .from_credentials(creds)
            .await
            .map_err(AcmeError::from_acme);
    }
    let contact: Vec<&str> = settings.contact.iter().map(String::as_str).collect();
    let (account, creds) = Account::builder_with_http(http_client(settings, retry_after)?)
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            settings.directory.clone(),
            None,
        )
        .await
        .map_err(AcmeError::from_acme)?;
    let text = serde_json::to_vec(&creds).map_err(|e| AcmeError::Setup(e.to_string()))?;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| AcmeError::Setup(e.to_string()))?;
    }
    tls::write_private_atomic(file, &text)
        .map_err(|e| AcmeError::Setup(format!("cannot write {}: {e}", file.display())))?;
    tracing::info!(directory = %settings.directory, file = %file.display(), "ACME account created");
    Ok(account)
}

/// Orders a certificate for `names` and answers its authorizations: challenge certificates
/// (TLS-ALPN-01) or TXT records (DNS-01) exist only while the validation runs.
pub(super) async fn order(
    account: &Account,
    names: &[String],
    challenge: AcmeChallenge,
    live: &LiveCerts,
    txt: &TxtSink,
) -> Result<Issued, AcmeError> {
    let ids: Vec<Identifier> = names.iter().map(|n| Identifier::Dns(n.clone())).collect();
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .map_err(AcmeError::from_acme)?;
    let mut answering: Vec<String> = Vec::new();
    let mut records: Vec<(String, String)> = Vec::new();
    let result = async {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(AcmeError::from_acme)?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(AcmeError::Refused(format!(
                        "authorization is {other:?}, not pending"
                    )))
                }
            }
            let kind = match challenge {
                AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
                AcmeChallenge::Dns01 => ChallengeType::Dns01,
            };
            let mut ch = authz.challenge(kind).ok_or_else(|| {
                AcmeError::Refused(format!("the CA offers no {} challenge", challenge.as_str()))
            })?;
            let Identifier::Dns(name) = ch.identifier().identifier.clone() else {
                return Err(AcmeError::Refused(
                    "an identifier that is not a DNS name".into(),
                ));
            };
            match challenge {
                AcmeChallenge::TlsAlpn01 => {
                    let digest: [u8; 32] = ch
                        .key_authorization()
                        .digest()
                        .as_ref()
                        .try_into()
                        .map_err(|_| {
                            AcmeError::Setup("key authorization digest is not 32 bytes".into())
                        })?;
                    let cert = tls::acme_challenge_cert(&name, &digest)
                        .map_err(|e| AcmeError::Setup(e.to_string()))?;
                    live.begin_challenge(&name, cert);
                    answering.push(name);
                }
                AcmeChallenge::Dns01 => {
                    // A wildcard and its apex share one owner name: both values stay up.
                    records.push((
                        format!("_acme-challenge.{name}"),
                        ch.key_authorization().dns_value(),
                    ));
                    txt(records.clone());
                }
            }
            ch.set_ready().await.map_err(AcmeError::from_acme)?;
        }
        let retry = RetryPolicy::default().timeout(VALIDATION_TIMEOUT);
        let status = order
            .poll_ready(&retry)
            .await
            .map_err(AcmeError::from_acme)?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Refused(format!(
                "the order is {status:?} after validation; see the CA's authorization for why"
            )));
        }
        Ok(())
    }
    .await;
    for name in &answering {
        live.end_challenge(name);
    }
    if !records.is_empty() {
        txt(Vec::new());
    }
    result?;
    let (key_pem, csr) = tls::key_and_csr(names).map_err(|e| AcmeError::Setup(e.to_string()))?;
    order
        .finalize_csr(&csr)
        .await
        .map_err(AcmeError::from_acme)?;
    let chain_pem = order
        .poll_certificate(&RetryPolicy::default().timeout(VALIDATION_TIMEOUT))
        .await
        .map_err(AcmeError::from_acme)?;
    let key: Arc<CertifiedKey> = tls::certified_key_from_pem(&chain_pem, &key_pem)
        .map_err(|e| AcmeError::Refused(format!("the CA's certificate: {e}")))?;
    Ok(Issued {
        chain_pem,
        key_pem,
        key,
    })
}
