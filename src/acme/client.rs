//! One ACME conversation: the account (loaded from kept credentials, or created), and an
//! order for one site whose challenges [`Answers`] puts up: TLS-ALPN-01 on the edge's own
//! listeners, or DNS-01 in the built-in DNS server, on every node of a fleet.

use std::future::Future;
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

use super::{AcmeError, Answers, Issued};
use crate::config::{AcmeChallenge, AcmeSettings};
use crate::tls;

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

/// The account whose credentials (JSON) are `creds`; `from` names where they were read.
pub(super) async fn load_account(
    settings: &AcmeSettings,
    creds: &[u8],
    from: &str,
    retry_after: &RetryAfter,
) -> Result<Account, AcmeError> {
    let creds: AccountCredentials = serde_json::from_slice(creds).map_err(|e| {
        AcmeError::Setup(format!(
            "the ACME account in {from} does not parse ({e}); remove it to create a new account"
        ))
    })?;
    Account::builder_with_http(http_client(settings, retry_after)?)
        .from_credentials(creds)
        .await
        .map_err(AcmeError::from_acme)
}

/// A new account at `settings.directory`, and its credentials (JSON, with the account key) to
/// keep.
pub(super) async fn create_account(
    settings: &AcmeSettings,
    retry_after: &RetryAfter,
) -> Result<(Account, Vec<u8>), AcmeError> {
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
    Ok((account, text))
}

/// Orders a certificate for `names` and answers its authorizations: challenge certificates
/// (TLS-ALPN-01) or TXT records (DNS-01) exist only while the validation runs.
pub(super) async fn order(
    account: &Account,
    names: &[String],
    challenge: AcmeChallenge,
    answers: &Answers<'_>,
) -> Result<Issued, AcmeError> {
    let ids: Vec<Identifier> = names.iter().map(|n| Identifier::Dns(n.clone())).collect();
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .map_err(AcmeError::from_acme)?;
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
                    answers.alpn(&name, digest).await?;
                }
                AcmeChallenge::Dns01 => {
                    // A wildcard and its apex share one owner name: both values stay up.
                    answers
                        .txt(
                            &format!("_acme-challenge.{name}"),
                            ch.key_authorization().dns_value(),
                        )
                        .await;
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
    answers.end().await;
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
