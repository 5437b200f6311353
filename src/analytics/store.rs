//! The SQLite store (WAL mode): per-minute and per-hour counters, capped dimensions with their
//! overflow, and one exposure record per (site, fingerprint).
//!
//! Everything here is blocking and runs off the request path, on the flusher's blocking
//! thread or in a CLI command. Nothing stored is ever a raw credential: exposures arrive here
//! as fingerprints.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags};

use super::aggregate::{Aggregate, SiteId};
use crate::clock::Timestamp;

/// Why the store failed. Messages name the database file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("analytics store {path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    #[error("no analytics store at {0}: nothing has been recorded there yet (is this the state dir `portcullis serve` uses?)")]
    Missing(String),
}

/// An open store.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

const SCHEMA: &str = "
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
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, count INTEGER NOT NULL) WITHOUT ROWID;
";

impl Store {
    /// The database file in a state directory.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("analytics.db")
    }

    /// Opens (creating if needed) the store for writing.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(|e| sqlite(path, e))?;
        // A locked database must fail a flush quickly, not stall the flusher for long.
        conn.busy_timeout(Duration::from_millis(200))
            .map_err(|e| sqlite(path, e))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| sqlite(path, e))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| sqlite(path, e))?;
        conn.execute_batch(SCHEMA).map_err(|e| sqlite(path, e))?;
        Ok(Store {
            conn,
            path: path.to_owned(),
        })
    }

    /// Opens an existing store for reading only (CLI reports).
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing(path.display().to_string()));
        }
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| sqlite(path, e))?;
        conn.busy_timeout(Duration::from_secs(2))
            .map_err(|e| sqlite(path, e))?;
        Ok(Store {
            conn,
            path: path.to_owned(),
        })
    }

    fn err(&self, e: rusqlite::Error) -> StoreError {
        sqlite(&self.path, e)
    }

    /// Adds an aggregate in one transaction: all of it or, on error, none of it.
    pub fn write(
        &mut self,
        agg: &Aggregate,
        name: &dyn Fn(SiteId) -> String,
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| sqlite(&path, e))?;
        {
            let mut t = tx
                .prepare_cached(
                    "INSERT INTO traffic VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT DO UPDATE SET count = count + excluded.count",
                )
                .map_err(|e| sqlite(&path, e))?;
            for (k, n) in &agg.traffic {
                t.execute(params![
                    k.bucket as i64,
                    k.span,
                    name(k.site),
                    k.outcome.as_str(),
                    k.scheme.as_str(),
                    k.port,
                    k.tls.as_str(),
                    k.http.as_str(),
                    k.status_class,
                    *n as i64
                ])
                .map_err(|e| sqlite(&path, e))?;
            }
            let mut d = tx
                .prepare_cached(
                    "INSERT INTO dims VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT DO UPDATE SET count = count + excluded.count",
                )
                .map_err(|e| sqlite(&path, e))?;
            for (k, n) in &agg.dims {
                d.execute(params![
                    k.bucket as i64,
                    k.span,
                    name(k.site),
                    k.scheme.as_str(),
                    k.dim.kind().as_str(),
                    k.dim.value(),
                    *n as i64
                ])
                .map_err(|e| sqlite(&path, e))?;
            }
            let mut o = tx
                .prepare_cached(
                    "INSERT INTO overflow VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT DO UPDATE SET count = count + excluded.count",
                )
                .map_err(|e| sqlite(&path, e))?;
            for (k, n) in &agg.overflow {
                o.execute(params![
                    k.bucket as i64,
                    k.span,
                    name(k.site),
                    k.scheme.as_str(),
                    k.kind.as_str(),
                    *n as i64
                ])
                .map_err(|e| sqlite(&path, e))?;
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
                .map_err(|e| sqlite(&path, e))?;
            for ((site, fp), e) in &agg.exposures {
                x.execute(params![
                    name(*site),
                    fp.to_string(),
                    e.kind.as_str(),
                    e.name.as_str(),
                    e.first_seen as i64,
                    e.last_seen as i64,
                    e.count as i64,
                    e.network.to_string(),
                    e.family.as_str(),
                    e.path.as_str()
                ])
                .map_err(|e| sqlite(&path, e))?;
            }
            if agg.exposures_dropped > 0 {
                tx.execute(
                    "INSERT INTO counters VALUES ('exposures_dropped', ?1)
                     ON CONFLICT DO UPDATE SET count = count + excluded.count",
                    params![agg.exposures_dropped as i64],
                )
                .map_err(|e| sqlite(&path, e))?;
            }
        }
        tx.commit().map_err(|e| sqlite(&path, e))
    }

    /// Rolls minute buckets older than `minutes` into hour buckets, and deletes hour buckets
    /// older than `hours`. Exposure records older than `hours` (by last sighting) go too.
    pub fn roll_up(
        &mut self,
        now: Timestamp,
        minutes: Duration,
        hours: Duration,
    ) -> Result<(), StoreError> {
        let minute_cut = now.saturating_sub(minutes.as_secs()) as i64;
        let hour_cut = now.saturating_sub(hours.as_secs()) as i64;
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| sqlite(&path, e))?;
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
        .map_err(|e| sqlite(&path, e))?;
        tx.commit().map_err(|e| sqlite(&path, e))
    }

    /// Request counts for a site since a time, by scheme, outcome and port.
    pub fn traffic(&self, site: &str, since: Timestamp) -> Result<Vec<TrafficRow>, StoreError> {
        let mut q = self
            .conn
            .prepare_cached(
                "SELECT scheme, outcome, port, tls, status_class, SUM(count) FROM traffic
                 WHERE site = ?1 AND bucket >= ?2 GROUP BY scheme, outcome, port, tls, status_class",
            )
            .map_err(|e| self.err(e))?;
        let rows = q
            .query_map(params![site, since as i64], |r| {
                Ok(TrafficRow {
                    scheme: r.get(0)?,
                    outcome: r.get(1)?,
                    port: r.get(2)?,
                    tls: r.get(3)?,
                    status_class: r.get(4)?,
                    count: r.get::<_, i64>(5)? as u64,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Requests answered per bucket of `span` seconds and scheme, oldest first.
    pub fn series(
        &self,
        site: &str,
        since: Timestamp,
        span: u64,
    ) -> Result<Vec<SeriesPoint>, StoreError> {
        let mut q = self
            .conn
            .prepare_cached(
                "SELECT bucket - bucket % ?3 AS b, scheme, SUM(count) FROM traffic
                 WHERE site = ?1 AND bucket >= ?2 AND outcome = 'response' GROUP BY b, scheme ORDER BY b",
            )
            .map_err(|e| self.err(e))?;
        let rows = q
            .query_map(params![site, since as i64, span.max(60) as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut out: Vec<SeriesPoint> = Vec::new();
        for row in rows {
            let (b, scheme, n) = row.map_err(|e| self.err(e))?;
            if out.last().is_none_or(|p| p.bucket != b as u64) {
                out.push(SeriesPoint {
                    bucket: b as u64,
                    tls: 0,
                    cleartext: 0,
                });
            }
            if let Some(p) = out.last_mut() {
                if scheme == "tls" {
                    p.tls += n as u64;
                } else {
                    p.cleartext += n as u64;
                }
            }
        }
        Ok(out)
    }

    /// Counts per value of one dimension (`network`, `family` or `path`), largest first.
    pub fn dims(
        &self,
        site: &str,
        since: Timestamp,
        scheme: Option<&str>,
        kind: &str,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let mut q = self
            .conn
            .prepare_cached(
                "SELECT value, SUM(count) AS n FROM dims
                 WHERE site = ?1 AND bucket >= ?2 AND kind = ?3 AND (?4 IS NULL OR scheme = ?4)
                 GROUP BY value ORDER BY n DESC, value",
            )
            .map_err(|e| self.err(e))?;
        let rows = q
            .query_map(params![site, since as i64, kind, scheme], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Counts that did not fit under the cap for one dimension.
    pub fn overflow(
        &self,
        site: &str,
        since: Timestamp,
        scheme: Option<&str>,
        kind: &str,
    ) -> Result<u64, StoreError> {
        self.conn
            .query_row(
                "SELECT COALESCE(SUM(count), 0) FROM overflow
                 WHERE site = ?1 AND bucket >= ?2 AND kind = ?3 AND (?4 IS NULL OR scheme = ?4)",
                params![site, since as i64, kind, scheme],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(|e| self.err(e))
    }

    /// Exposure records of a site last seen since a time, most recent first.
    pub fn exposures(&self, site: &str, since: Timestamp) -> Result<Vec<ExposureRow>, StoreError> {
        let mut q = self
            .conn
            .prepare_cached(
                "SELECT fingerprint, kind, name, first_seen, last_seen, count, network, family, path
                 FROM exposures WHERE site = ?1 AND last_seen >= ?2 ORDER BY last_seen DESC, fingerprint",
            )
            .map_err(|e| self.err(e))?;
        let rows = q
            .query_map(params![site, since as i64], |r| {
                Ok(ExposureRow {
                    fingerprint: r.get(0)?,
                    kind: r.get(1)?,
                    name: r.get(2)?,
                    first_seen: r.get::<_, i64>(3)? as u64,
                    last_seen: r.get::<_, i64>(4)? as u64,
                    count: r.get::<_, i64>(5)? as u64,
                    network: r.get(6)?,
                    family: r.get(7)?,
                    path: r.get(8)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }
}

fn sqlite(path: &Path, source: rusqlite::Error) -> StoreError {
    StoreError::Sqlite {
        path: path.display().to_string(),
        source,
    }
}

/// Requests in one time bucket.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SeriesPoint {
    /// Start of the bucket, seconds since the epoch.
    pub bucket: Timestamp,
    pub tls: u64,
    pub cleartext: u64,
}

/// A slice of traffic counts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TrafficRow {
    pub scheme: String,
    pub outcome: String,
    pub port: u16,
    pub tls: String,
    pub status_class: u8,
    pub count: u64,
}

/// One credential seen in cleartext on a site: fingerprint only.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExposureRow {
    pub fingerprint: String,
    pub kind: String,
    pub name: String,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
    pub count: u64,
    pub network: String,
    pub family: String,
    pub path: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::aggregate::Observation;
    use crate::observe::{
        ClientFamily, HttpVersion, Network, Outcome, PathTemplate, Scheme, TlsVersion,
    };

    fn obs(at: Timestamp) -> Observation {
        Observation {
            at,
            site: 1,
            outcome: Outcome::Response,
            scheme: Scheme::Cleartext,
            port: 80,
            tls: TlsVersion::None,
            http: HttpVersion::Http11,
            status_class: 3,
            family: ClientFamily::Curl,
            network: Network::of("192.0.2.1".parse().expect("ip")),
            path: Some(PathTemplate::of("/a")),
        }
    }

    fn spans(store: &Store) -> Vec<(i64, i64, i64)> {
        let mut q = store
            .conn
            .prepare("SELECT bucket, span, count FROM traffic ORDER BY bucket, span")
            .expect("query");
        q.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("collect")
    }

    #[test]
    fn old_minutes_roll_up_into_hours_and_old_hours_expire() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut store = Store::open(&Store::path(dir.path())).expect("open");
        let day = 86_400;
        let now = 100 * day;
        let mut agg = Aggregate::default();
        // Three minutes in one old hour, one recent minute.
        for (at, n) in [
            (now - 3 * day, 2),
            (now - 3 * day + 60, 3),
            (now - 3 * day + 120, 4),
            (now - 60, 5),
        ] {
            for _ in 0..n {
                agg.record(&obs(at), 10);
            }
        }
        let name = |_| "s.test".to_owned();
        store.write(&agg, &name).expect("write");
        // Writing twice adds up (upserts), it does not replace.
        store.write(&agg, &name).expect("write again");
        store
            .roll_up(
                now,
                Duration::from_secs(2 * day),
                Duration::from_secs(30 * day),
            )
            .expect("roll up");
        let old_hour = (now - 3 * day) - (now - 3 * day) % 3600;
        assert_eq!(
            spans(&store),
            vec![(old_hour as i64, 3600, 18), ((now - 60) as i64, 60, 10)]
        );
        assert_eq!(
            store
                .dims("s.test", 0, Some("cleartext"), "path")
                .expect("dims"),
            vec![("/a".to_owned(), 28)]
        );
        store
            .roll_up(now, Duration::from_secs(2 * day), Duration::from_secs(day))
            .expect("expire");
        assert_eq!(spans(&store), vec![((now - 60) as i64, 60, 10)]);
    }
}
