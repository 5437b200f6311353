//! [`CertStore`] on PostgreSQL: the order lease is one upsert whose condition decides, so two
//! nodes claiming at the same moment cannot both win.

use super::{ts, PgStore};
use crate::clock::Timestamp;
use crate::store::{CertStore, OrderClaim, PendingChallenge, StoreError, StoredCert};

#[async_trait::async_trait]
impl CertStore for PgStore {
    async fn acme_account(&self, directory: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT sealed FROM acme_accounts WHERE directory = $1",
                &[&directory],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn add_acme_account(
        &self,
        directory: &str,
        sealed: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO acme_accounts VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&directory, &sealed],
        )
        .await
        .map_err(|e| self.err(e))?;
        let row = c
            .query_one(
                "SELECT sealed FROM acme_accounts WHERE directory = $1",
                &[&directory],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(row.get(0))
    }

    async fn acme_certs(&self, since: u64) -> Result<Vec<StoredCert>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT site, chain_pem, sealed_key, directory, version FROM acme_certs
                 WHERE version > $1 ORDER BY version",
                &[&(since as i64)],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(rows
            .iter()
            .map(|r| StoredCert {
                site: r.get(0),
                chain_pem: r.get(1),
                sealed_key: r.get(2),
                directory: r.get(3),
                version: ts(r.get(4)),
            })
            .collect())
    }

    async fn put_acme_cert(&self, cert: &StoredCert) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one(
                "INSERT INTO acme_certs VALUES ($1, $2, $3, $4, nextval('acme_cert_version'))
                 ON CONFLICT (site) DO UPDATE SET chain_pem = excluded.chain_pem,
                    sealed_key = excluded.sealed_key, directory = excluded.directory,
                    version = excluded.version
                 RETURNING version",
                &[
                    &cert.site,
                    &cert.chain_pem,
                    &cert.sealed_key,
                    &cert.directory,
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(ts(row.get(0)))
    }

    async fn acme_challenges(&self) -> Result<Vec<PendingChallenge>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT site, holder, kind, name, value FROM acme_challenges ORDER BY seq",
                &[],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(rows
            .iter()
            .map(|r| PendingChallenge {
                site: r.get(0),
                holder: r.get(1),
                kind: r.get(2),
                name: r.get(3),
                value: r.get(4),
            })
            .collect())
    }

    async fn set_acme_challenges(
        &self,
        site: &str,
        challenges: &[PendingChallenge],
    ) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.err(e))?;
        tx.execute("DELETE FROM acme_challenges WHERE site = $1", &[&site])
            .await
            .map_err(|e| self.err(e))?;
        for ch in challenges {
            tx.execute(
                "INSERT INTO acme_challenges (site, holder, kind, name, value)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&site, &ch.holder, &ch.kind, &ch.name, &ch.value],
            )
            .await
            .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    async fn claim_order(
        &self,
        site: &str,
        holder: &str,
        now: Timestamp,
        lease: u64,
    ) -> Result<OrderClaim, StoreError> {
        let c = self.client().await?;
        let now_i = now as i64;
        let granted = c
            .query_opt(
                "INSERT INTO acme_orders VALUES ($1, $2, $3, 0, 0)
                 ON CONFLICT (site) DO UPDATE SET holder = excluded.holder,
                    lease_until = excluded.lease_until
                 WHERE (acme_orders.holder = excluded.holder OR acme_orders.lease_until <= $4)
                   AND acme_orders.retry_at <= $4
                 RETURNING failures",
                &[&site, &holder, &(now.saturating_add(lease) as i64), &now_i],
            )
            .await
            .map_err(|e| self.err(e))?;
        if let Some(r) = granted {
            return Ok(OrderClaim::Granted {
                failures: r.get::<_, i32>(0).max(0) as u32,
            });
        }
        let r = c
            .query_one(
                "SELECT holder, lease_until, retry_at FROM acme_orders WHERE site = $1",
                &[&site],
            )
            .await
            .map_err(|e| self.err(e))?;
        let lease_until = ts(r.get(1));
        let retry_at = ts(r.get(2));
        Ok(OrderClaim::Held {
            holder: r.get(0),
            until: if lease_until > now {
                lease_until.max(retry_at)
            } else {
                retry_at
            },
        })
    }

    async fn finish_order(
        &self,
        site: &str,
        holder: &str,
        retry_at: Timestamp,
        failures: u32,
    ) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "UPDATE acme_orders SET lease_until = 0, retry_at = $3, failures = $4
             WHERE site = $1 AND holder = $2",
            &[
                &site,
                &holder,
                &(retry_at as i64),
                &(failures.min(i32::MAX as u32) as i32),
            ],
        )
        .await
        .map(|_| ())
        .map_err(|e| self.err(e))
    }
}
