//! ACME state in the store, so that a fleet orders each certificate once and any node answers
//! the CA: the account of each directory, each site's certificate, the challenge answers in
//! progress, and one order lease per site.
//!
//! Keys are sealed by the caller ([`crate::seal::Sealer`]) before they reach a row: the store
//! only ever holds their ciphertext.

use crate::clock::Timestamp;

use super::StoreError;

/// A site's certificate as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCert {
    pub site: String,
    pub chain_pem: String,
    /// The private key (PEM), sealed under the label [`StoredCert::key_label`].
    pub sealed_key: Vec<u8>,
    /// The directory URL it was ordered from.
    pub directory: String,
    /// Grows with every write of any certificate (set by the store; ignored when writing).
    pub version: u64,
}

impl StoredCert {
    /// What a site's key is sealed under: a sealed key copied to another site's row does not
    /// open there.
    pub fn key_label(site: &str) -> String {
        format!("acme certificate key of {site}")
    }
}

/// A challenge answer some node has up while the CA validates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingChallenge {
    /// The site whose order it answers.
    pub site: String,
    /// The node that ordered.
    pub holder: String,
    /// `tls-alpn-01` or `dns-01`.
    pub kind: String,
    /// The DNS name validated (TLS-ALPN-01), or the TXT record's owner name (DNS-01).
    pub name: String,
    /// The key authorization's SHA-256 in hex (TLS-ALPN-01), or the TXT value (DNS-01).
    /// Neither is a secret: the CA reads both from anyone who asks.
    pub value: String,
}

/// The answer to [`CertStore::claim_order`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderClaim {
    /// This node orders now; `failures` is how many orders for the site failed in a row, on
    /// any node, so the backoff goes on where the fleet left it.
    Granted { failures: u32 },
    /// Another node orders now (its lease ends at `until`), or the fleet's backoff lasts until
    /// `until`.
    Held { holder: String, until: Timestamp },
}

/// The ACME state a fleet shares. Every method is one atomic operation.
#[async_trait::async_trait]
pub trait CertStore: Send + Sync {
    /// The account of `directory` (sealed credentials), if a node made one.
    async fn acme_account(&self, directory: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Keeps `sealed` as the account of `directory` unless one is there already; returns the
    /// one kept, so two nodes creating accounts at once end up using the same.
    async fn add_acme_account(&self, directory: &str, sealed: &[u8])
        -> Result<Vec<u8>, StoreError>;
    /// Certificates written after `since` (a [`StoredCert::version`]); 0 for all of them.
    async fn acme_certs(&self, since: u64) -> Result<Vec<StoredCert>, StoreError>;
    /// Replaces the site's certificate; returns its new version.
    async fn put_acme_cert(&self, cert: &StoredCert) -> Result<u64, StoreError>;
    /// Every challenge answer in progress.
    async fn acme_challenges(&self) -> Result<Vec<PendingChallenge>, StoreError>;
    /// Replaces the challenge answers of `site` with `challenges` (none: validation is over).
    async fn set_acme_challenges(
        &self,
        site: &str,
        challenges: &[PendingChallenge],
    ) -> Result<(), StoreError>;
    /// Takes the order lease of `site` for `holder` until `now + lease` seconds, unless another
    /// holder's lease runs on, or the fleet's backoff after a failure lasts beyond `now`.
    async fn claim_order(
        &self,
        site: &str,
        holder: &str,
        now: Timestamp,
        lease: u64,
    ) -> Result<OrderClaim, StoreError>;
    /// Ends `holder`'s lease: no node orders the site again before `retry_at` (0 after a
    /// success: renewal is then due by the certificate), and `failures` failed in a row.
    async fn finish_order(
        &self,
        site: &str,
        holder: &str,
        retry_at: Timestamp,
        failures: u32,
    ) -> Result<(), StoreError>;
}
