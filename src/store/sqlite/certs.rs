//! [`CertStore`] on SQLite. One process owns the database, so the order lease never meets
//! another holder; it is kept all the same, so both backends pass the same contract tests.

use rusqlite::{params, OptionalExtension, Transaction};

use super::{sqlite, SqliteStore};
use crate::clock::Timestamp;
use crate::store::{CertStore, OrderClaim, PendingChallenge, StoreError, StoredCert};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS acme_accounts (directory TEXT PRIMARY KEY, sealed BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS acme_certs (
    site TEXT PRIMARY KEY, chain_pem TEXT NOT NULL, sealed_key BLOB NOT NULL,
    directory TEXT NOT NULL, version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS acme_challenges (
    site TEXT NOT NULL, holder TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS acme_orders (
    site TEXT PRIMARY KEY, holder TEXT NOT NULL, lease_until INTEGER NOT NULL,
    retry_at INTEGER NOT NULL, failures INTEGER NOT NULL
) WITHOUT ROWID;
";

impl SqliteStore {
    fn transact<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut conn = crate::lock(&self.conn);
        let tx = conn.transaction().map_err(|e| sqlite(&self.path, e))?;
        let out = f(&tx).map_err(|e| sqlite(&self.path, e))?;
        tx.commit().map_err(|e| sqlite(&self.path, e))?;
        Ok(out)
    }
}

#[async_trait::async_trait]
impl CertStore for SqliteStore {
    async fn acme_account(&self, directory: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let directory = directory.to_owned();
        self.blocking(move |s| {
            s.transact(|tx| {
                tx.query_row(
                    "SELECT sealed FROM acme_accounts WHERE directory = ?1",
                    params![directory],
                    |r| r.get(0),
                )
                .optional()
            })
        })
        .await
    }

    async fn add_acme_account(
        &self,
        directory: &str,
        sealed: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let (directory, sealed) = (directory.to_owned(), sealed.to_vec());
        self.blocking(move |s| {
            s.transact(|tx| {
                tx.execute(
                    "INSERT INTO acme_accounts VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                    params![directory, sealed],
                )?;
                tx.query_row(
                    "SELECT sealed FROM acme_accounts WHERE directory = ?1",
                    params![directory],
                    |r| r.get(0),
                )
            })
        })
        .await
    }

    async fn acme_certs(&self, since: u64) -> Result<Vec<StoredCert>, StoreError> {
        self.blocking(move |s| {
            s.transact(|tx| {
                let mut q = tx.prepare(
                    "SELECT site, chain_pem, sealed_key, directory, version FROM acme_certs
                     WHERE version > ?1 ORDER BY version",
                )?;
                let rows = q.query_map(params![since as i64], |r| {
                    Ok(StoredCert {
                        site: r.get(0)?,
                        chain_pem: r.get(1)?,
                        sealed_key: r.get(2)?,
                        directory: r.get(3)?,
                        version: r.get::<_, i64>(4)?.max(0) as u64,
                    })
                })?;
                rows.collect()
            })
        })
        .await
    }

    async fn put_acme_cert(&self, cert: &StoredCert) -> Result<u64, StoreError> {
        let c = cert.clone();
        self.blocking(move |s| {
            s.transact(|tx| {
                let version: i64 = tx.query_row(
                    "SELECT COALESCE(MAX(version), 0) + 1 FROM acme_certs",
                    [],
                    |r| r.get(0),
                )?;
                tx.execute(
                    "INSERT INTO acme_certs VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO UPDATE SET
                        chain_pem = excluded.chain_pem, sealed_key = excluded.sealed_key,
                        directory = excluded.directory, version = excluded.version",
                    params![c.site, c.chain_pem, c.sealed_key, c.directory, version],
                )?;
                Ok(version.max(0) as u64)
            })
        })
        .await
    }

    async fn acme_challenges(&self) -> Result<Vec<PendingChallenge>, StoreError> {
        self.blocking(|s| {
            s.transact(|tx| {
                let mut q = tx.prepare(
                    "SELECT site, holder, kind, name, value FROM acme_challenges ORDER BY rowid",
                )?;
                let rows = q.query_map([], |r| {
                    Ok(PendingChallenge {
                        site: r.get(0)?,
                        holder: r.get(1)?,
                        kind: r.get(2)?,
                        name: r.get(3)?,
                        value: r.get(4)?,
                    })
                })?;
                rows.collect()
            })
        })
        .await
    }

    async fn set_acme_challenges(
        &self,
        site: &str,
        challenges: &[PendingChallenge],
    ) -> Result<(), StoreError> {
        let (site, challenges) = (site.to_owned(), challenges.to_vec());
        self.blocking(move |s| {
            s.transact(|tx| {
                tx.execute("DELETE FROM acme_challenges WHERE site = ?1", params![site])?;
                let mut ins =
                    tx.prepare("INSERT INTO acme_challenges VALUES (?1, ?2, ?3, ?4, ?5)")?;
                for c in &challenges {
                    ins.execute(params![site, c.holder, c.kind, c.name, c.value])?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn claim_order(
        &self,
        site: &str,
        holder: &str,
        now: Timestamp,
        lease: u64,
    ) -> Result<OrderClaim, StoreError> {
        let (site, holder) = (site.to_owned(), holder.to_owned());
        self.blocking(move |s| {
            s.transact(|tx| {
                let row: Option<(String, i64, i64, i64)> = tx
                    .query_row(
                        "SELECT holder, lease_until, retry_at, failures FROM acme_orders WHERE site = ?1",
                        params![site],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                    )
                    .optional()?;
                let (held_by, lease_until, retry_at, failures) =
                    row.unwrap_or((holder.clone(), 0, 0, 0));
                let (lease_until, retry_at) = (lease_until.max(0) as u64, retry_at.max(0) as u64);
                let leased = held_by != holder && lease_until > now;
                if leased || retry_at > now {
                    return Ok(OrderClaim::Held {
                        holder: held_by,
                        until: lease_until.max(retry_at),
                    });
                }
                tx.execute(
                    "INSERT INTO acme_orders VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO UPDATE SET
                        holder = excluded.holder, lease_until = excluded.lease_until",
                    params![site, holder, now.saturating_add(lease) as i64, retry_at as i64, failures],
                )?;
                Ok(OrderClaim::Granted {
                    failures: failures.clamp(0, i64::from(u32::MAX)) as u32,
                })
            })
        })
        .await
    }

    async fn finish_order(
        &self,
        site: &str,
        holder: &str,
        retry_at: Timestamp,
        failures: u32,
    ) -> Result<(), StoreError> {
        let (site, holder) = (site.to_owned(), holder.to_owned());
        self.blocking(move |s| {
            s.transact(|tx| {
                tx.execute(
                    "UPDATE acme_orders SET lease_until = 0, retry_at = ?3, failures = ?4
                     WHERE site = ?1 AND holder = ?2",
                    params![site, holder, retry_at as i64, failures],
                )
                .map(|_| ())
            })
        })
        .await
    }
}
