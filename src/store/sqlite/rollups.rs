//! [`Rollups`] on SQLite: upserts that add counts, a roll-up of old minutes into hours, and
//! the readers' queries. The flusher writes on a connection of its own with a short busy
//! timeout: when another program holds the database, a flush fails quickly and the analytics
//! keep the batch for the next one.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection};

use super::{sqlite, SqliteStore};
use crate::clock::Timestamp;
use crate::observe::{ClientFamily, DimKind, Outcome, Scheme, TlsVersion};
use crate::store::{
    ExposureRow, FamilyPoint, RollupBatch, Rollups, SeriesPoint, StoreError, TrafficRow,
};

/// The column order of `traffic`, `dims`, `overflow` and `exposures` is that of the
/// `analytics.db` of earlier versions, which the import copies with `SELECT *`.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS traffic (
    bucket INTEGER NOT NULL, span INTEGER NOT NULL, site TEXT NOT NULL, outcome TEXT NOT NULL,
    scheme TEXT NOT NULL, port INTEGER NOT NULL, tls TEXT NOT NULL, http TEXT NOT NULL,
    status_class INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (bucket, span, site, outcome, scheme, port, tls, http, status_class)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS traffic_site ON traffic (site, bucket);
CREATE TABLE IF NOT EXISTS dims (
    bucket INTEGER NOT NULL, span INTEGER NOT NULL, site TEXT NOT NULL, scheme TEXT NOT NULL,
    kind TEXT NOT NULL, value TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (bucket, span, site, scheme, kind, value)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dims_site ON dims (site, kind, bucket);
CREATE TABLE IF NOT EXISTS overflow (
    bucket INTEGER NOT NULL, span INTEGER NOT NULL, site TEXT NOT NULL, scheme TEXT NOT NULL,
    kind TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (bucket, span, site, scheme, kind)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS exposures (
    site TEXT NOT NULL, fingerprint TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    first_seen INTEGER NOT NULL, last_seen INTEGER NOT NULL, count INTEGER NOT NULL,
    network TEXT NOT NULL, family TEXT NOT NULL, path TEXT NOT NULL,
    PRIMARY KEY (site, fingerprint)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollup_counters (name TEXT PRIMARY KEY, count INTEGER NOT NULL) WITHOUT ROWID;
";

/// The flusher's connection to the database at `path` (schema already in place).
pub(super) fn connect(path: &Path) -> Result<Connection, StoreError> {
    let err = |e| sqlite(path, e);
    let conn = Connection::open(path).map_err(err)?;
    // A locked database must fail a flush quickly, not stall the flusher for long.
    conn.busy_timeout(Duration::from_millis(200)).map_err(err)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(err)?;
    Ok(conn)
}

fn ts(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Timestamp> {
    Ok(r.get::<_, i64>(i)?.max(0) as u64)
}

impl SqliteStore {
    /// Adds a batch in one transaction.
    pub fn write_rollups_now(&self, b: &RollupBatch) -> Result<(), StoreError> {
        let mut conn = crate::lock(&self.rollups);
        let err = |e| sqlite(&self.path, e);
        let tx = conn.transaction().map_err(err)?;
        {
            let mut t = tx
                .prepare_cached(
                    "INSERT INTO traffic VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT DO UPDATE SET count = count + excluded.count",
                )
                .map_err(err)?;
            for r in &b.traffic {
                t.execute(params![
                    r.bucket as i64,
                    r.span,
                    r.site,
                    r.outcome.as_str(),
                    r.scheme.as_str(),
                    r.port,
                    r.tls.as_str(),
                    r.http.as_str(),
                    r.status_class,
                    r.count as i64
                ])
                .map_err(err)?;
            }
            let mut d = tx
                .prepare_cached(
                    "INSERT INTO dims VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT DO UPDATE SET count = count + excluded.count",
                )
                .map_err(err)?;
            for r in &b.dims {
                d.execute(params![
                    r.bucket as i64,
                    r.span,
                    r.site,
                    r.scheme.as_str(),
                    r.kind.as_str(),
                    r.value,
                    r.count as i64
                ])
                .map_err(err)?;
            }
            let mut o = tx
                .prepare_cached(
                    "INSERT INTO overflow VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT DO UPDATE SET count = count + excluded.count",
                )
                .map_err(err)?;
            for r in &b.overflow {
                o.execute(params![
                    r.bucket as i64,
                    r.span,
                    r.site,
                    r.scheme.as_str(),
                    r.kind.as_str(),
                    r.count as i64
                ])
                .map_err(err)?;
            }
            let mut x = tx
                .prepare_cached(
                    "INSERT INTO exposures VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT DO UPDATE SET
                        count = count + excluded.count,
                        first_seen = min(first_seen, excluded.first_seen),
                        network = CASE WHEN excluded.last_seen >= last_seen THEN excluded.network ELSE network END,
                        family = CASE WHEN excluded.last_seen >= last_seen THEN excluded.family ELSE family END,
                        path = CASE WHEN excluded.last_seen >= last_seen THEN excluded.path ELSE path END,
                        last_seen = max(last_seen, excluded.last_seen)",
                )
                .map_err(err)?;
            for e in &b.exposures {
                x.execute(params![
                    e.site,
                    e.fingerprint,
                    e.kind,
                    e.name,
                    e.first_seen as i64,
                    e.last_seen as i64,
                    e.count as i64,
                    e.network,
                    e.family.as_str(),
                    e.path
                ])
                .map_err(err)?;
            }
            if b.exposures_dropped > 0 {
                tx.execute(
                    "INSERT INTO rollup_counters VALUES ('exposures_dropped', ?1)
                     ON CONFLICT DO UPDATE SET count = count + excluded.count",
                    params![b.exposures_dropped as i64],
                )
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Folds old minutes into hours and expires old hours and exposure records.
    pub fn roll_up_now(&self, now: Timestamp, minutes: u64, hours: u64) -> Result<(), StoreError> {
        let minute_cut = now.saturating_sub(minutes) as i64;
        let hour_cut = now.saturating_sub(hours) as i64;
        let mut conn = crate::lock(&self.rollups);
        let err = |e| sqlite(&self.path, e);
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch(&format!(
            "INSERT INTO traffic SELECT bucket - bucket % 3600, 3600, site, outcome, scheme, port, tls, http, status_class, SUM(count)
               FROM traffic WHERE span = 60 AND bucket < {minute_cut}
               GROUP BY bucket - bucket % 3600, site, outcome, scheme, port, tls, http, status_class
               ON CONFLICT DO UPDATE SET count = count + excluded.count;
             DELETE FROM traffic WHERE span = 60 AND bucket < {minute_cut};
             INSERT INTO dims SELECT bucket - bucket % 3600, 3600, site, scheme, kind, value, SUM(count)
               FROM dims WHERE span = 60 AND bucket < {minute_cut}
               GROUP BY bucket - bucket % 3600, site, scheme, kind, value
               ON CONFLICT DO UPDATE SET count = count + excluded.count;
             DELETE FROM dims WHERE span = 60 AND bucket < {minute_cut};
             INSERT INTO overflow SELECT bucket - bucket % 3600, 3600, site, scheme, kind, SUM(count)
               FROM overflow WHERE span = 60 AND bucket < {minute_cut}
               GROUP BY bucket - bucket % 3600, site, scheme, kind
               ON CONFLICT DO UPDATE SET count = count + excluded.count;
             DELETE FROM overflow WHERE span = 60 AND bucket < {minute_cut};
             DELETE FROM traffic WHERE bucket < {hour_cut};
             DELETE FROM dims WHERE bucket < {hour_cut};
             DELETE FROM overflow WHERE bucket < {hour_cut};
             DELETE FROM exposures WHERE last_seen < {hour_cut};"
        ))
        .map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Counts of a site from `since` on, by scheme, outcome, port, TLS version and status.
    pub fn traffic_now(&self, site: &str, since: Timestamp) -> Result<Vec<TrafficRow>, StoreError> {
        let conn = crate::lock(&self.rollups);
        let mut q = conn
            .prepare_cached(
                "SELECT scheme, outcome, port, tls, status_class, SUM(count) FROM traffic
                 WHERE site = ?1 AND bucket >= ?2 GROUP BY scheme, outcome, port, tls, status_class",
            )
            .map_err(|e| sqlite(&self.path, e))?;
        let rows = q
            .query_map(params![site, since as i64], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u16>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, u8>(4)?,
                    ts(r, 5)?,
                ))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| sqlite(&self.path, e))?;
        rows.into_iter()
            .map(|(scheme, outcome, port, tls, status_class, count)| {
                let bad = |what, v: &str| self.corrupt(what, site, format!("unknown value {v:?}"));
                Ok(TrafficRow {
                    scheme: Scheme::parse(&scheme).ok_or_else(|| bad("traffic scheme", &scheme))?,
                    outcome: Outcome::parse(&outcome)
                        .ok_or_else(|| bad("traffic outcome", &outcome))?,
                    port,
                    tls: TlsVersion::parse(&tls).ok_or_else(|| bad("traffic TLS version", &tls))?,
                    status_class,
                    count,
                })
            })
            .collect()
    }

    /// Responses per bucket of `span` seconds and scheme, oldest first.
    pub fn series_now(
        &self,
        site: &str,
        since: Timestamp,
        span: u64,
    ) -> Result<Vec<SeriesPoint>, StoreError> {
        let conn = crate::lock(&self.rollups);
        let mut q = conn
            .prepare_cached(
                "SELECT bucket - bucket % ?3 AS b, scheme, SUM(count) FROM traffic
                 WHERE site = ?1 AND bucket >= ?2 AND outcome = 'response' GROUP BY b, scheme ORDER BY b",
            )
            .map_err(|e| sqlite(&self.path, e))?;
        let rows = q
            .query_map(params![site, since as i64, span.max(60) as i64], |r| {
                Ok((ts(r, 0)?, r.get::<_, String>(1)?, ts(r, 2)?))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| sqlite(&self.path, e))?;
        let mut out: Vec<SeriesPoint> = Vec::new();
        for (bucket, scheme, n) in rows {
            if out.last().is_none_or(|p| p.bucket != bucket) {
                out.push(SeriesPoint {
                    bucket,
                    tls: 0,
                    cleartext: 0,
                });
            }
            if let Some(p) = out.last_mut() {
                match Scheme::parse(&scheme) {
                    Some(Scheme::Tls | Scheme::H3) => p.tls += n,
                    Some(Scheme::Cleartext) => p.cleartext += n,
                    None => {
                        return Err(self.corrupt(
                            "traffic scheme",
                            site,
                            format!("unknown value {scheme:?}"),
                        ))
                    }
                }
            }
        }
        Ok(out)
    }

    /// Cleartext traffic per bucket by likely people against likely programs.
    pub fn cleartext_families_now(
        &self,
        site: &str,
        since: Timestamp,
        span: u64,
    ) -> Result<Vec<FamilyPoint>, StoreError> {
        let conn = crate::lock(&self.rollups);
        let mut q = conn
            .prepare_cached(
                "SELECT bucket - bucket % ?3 AS b, value, SUM(count) FROM dims
                 WHERE site = ?1 AND bucket >= ?2 AND kind = 'family' AND scheme = 'cleartext'
                 GROUP BY b, value ORDER BY b",
            )
            .map_err(|e| sqlite(&self.path, e))?;
        let rows = q
            .query_map(params![site, since as i64, span.max(60) as i64], |r| {
                Ok((ts(r, 0)?, r.get::<_, String>(1)?, ts(r, 2)?))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| sqlite(&self.path, e))?;
        Ok(FamilyPoint::fold(rows))
    }

    /// Counts per value of one dimension, largest first.
    pub fn dims_now(
        &self,
        site: &str,
        since: Timestamp,
        scheme: Option<Scheme>,
        kind: DimKind,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let conn = crate::lock(&self.rollups);
        let mut q = conn
            .prepare_cached(
                "SELECT value, SUM(count) AS n FROM dims
                 WHERE site = ?1 AND bucket >= ?2 AND kind = ?3 AND (?4 IS NULL OR scheme = ?4)
                 GROUP BY value ORDER BY n DESC, value",
            )
            .map_err(|e| sqlite(&self.path, e))?;
        let scheme = scheme.map(Scheme::as_str);
        q.query_map(params![site, since as i64, kind.as_str(), scheme], |r| {
            Ok((r.get::<_, String>(0)?, ts(r, 1)?))
        })
        .and_then(|rows| rows.collect())
        .map_err(|e| sqlite(&self.path, e))
    }

    /// Counts that did not fit under the cap of one dimension.
    pub fn overflow_now(
        &self,
        site: &str,
        since: Timestamp,
        scheme: Option<Scheme>,
        kind: DimKind,
    ) -> Result<u64, StoreError> {
        let conn = crate::lock(&self.rollups);
        conn.query_row(
            "SELECT COALESCE(SUM(count), 0) FROM overflow
             WHERE site = ?1 AND bucket >= ?2 AND kind = ?3 AND (?4 IS NULL OR scheme = ?4)",
            params![
                site,
                since as i64,
                kind.as_str(),
                scheme.map(Scheme::as_str)
            ],
            |r| ts(r, 0),
        )
        .map_err(|e| sqlite(&self.path, e))
    }

    /// Exposure records of a site last seen from `since` on, most recent first.
    pub fn exposures_now(
        &self,
        site: &str,
        since: Timestamp,
    ) -> Result<Vec<ExposureRow>, StoreError> {
        let conn = crate::lock(&self.rollups);
        let mut q = conn
            .prepare_cached(
                "SELECT fingerprint, kind, name, first_seen, last_seen, count, network, family, path
                 FROM exposures WHERE site = ?1 AND last_seen >= ?2 ORDER BY last_seen DESC, fingerprint",
            )
            .map_err(|e| sqlite(&self.path, e))?;
        let rows = q
            .query_map(params![site, since as i64], |r| {
                Ok((
                    ExposureRow {
                        site: site.to_owned(),
                        fingerprint: r.get(0)?,
                        kind: r.get(1)?,
                        name: r.get(2)?,
                        first_seen: ts(r, 3)?,
                        last_seen: ts(r, 4)?,
                        count: ts(r, 5)?,
                        network: r.get(6)?,
                        family: ClientFamily::Other,
                        path: r.get(8)?,
                    },
                    r.get::<_, String>(7)?,
                ))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| sqlite(&self.path, e))?;
        rows.into_iter()
            .map(|(mut e, family)| {
                e.family = ClientFamily::parse(&family).ok_or_else(|| {
                    self.corrupt(
                        "exposure family",
                        &e.fingerprint,
                        format!("unknown value {family:?}"),
                    )
                })?;
                Ok(e)
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl Rollups for SqliteStore {
    async fn write_rollups(&self, batch: &RollupBatch) -> Result<(), StoreError> {
        let b = batch.clone();
        self.blocking(move |s| s.write_rollups_now(&b)).await
    }

    async fn roll_up(&self, now: Timestamp, minutes: u64, hours: u64) -> Result<(), StoreError> {
        self.blocking(move |s| s.roll_up_now(now, minutes, hours))
            .await
    }

    async fn traffic(&self, site: &str, since: Timestamp) -> Result<Vec<TrafficRow>, StoreError> {
        let site = site.to_owned();
        self.blocking(move |s| s.traffic_now(&site, since)).await
    }

    async fn series(
        &self,
        site: &str,
        since: Timestamp,
        span: u64,
    ) -> Result<Vec<SeriesPoint>, StoreError> {
        let site = site.to_owned();
        self.blocking(move |s| s.series_now(&site, since, span))
            .await
    }

    async fn cleartext_families(
        &self,
        site: &str,
        since: Timestamp,
        span: u64,
    ) -> Result<Vec<FamilyPoint>, StoreError> {
        let site = site.to_owned();
        self.blocking(move |s| s.cleartext_families_now(&site, since, span))
            .await
    }

    async fn dims(
        &self,
        site: &str,
        since: Timestamp,
        scheme: Option<Scheme>,
        kind: DimKind,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let site = site.to_owned();
        self.blocking(move |s| s.dims_now(&site, since, scheme, kind))
            .await
    }

    async fn overflow(
        &self,
        site: &str,
        since: Timestamp,
        scheme: Option<Scheme>,
        kind: DimKind,
    ) -> Result<u64, StoreError> {
        let site = site.to_owned();
        self.blocking(move |s| s.overflow_now(&site, since, scheme, kind))
            .await
    }

    async fn exposures(
        &self,
        site: &str,
        since: Timestamp,
    ) -> Result<Vec<ExposureRow>, StoreError> {
        let site = site.to_owned();
        self.blocking(move |s| s.exposures_now(&site, since)).await
    }
}
