//! The embedded store ([`PolicyStore`], [`EventQueue`] and [`Rollups`](super::Rollups)): one
//! SQLite database in the state directory (WAL mode), opened once by the running program; CLI
//! reports open it read-only.
//!
//! On first open it imports what earlier versions kept beside it (`overrides.json`,
//! `stages.json`, `drains.json`, `audit.jsonl`, the exposure queue `exposure-events.db` and
//! the analytics rollups `analytics.db`) in the same transaction as the schema, then renames
//! each to `*.imported`, so an upgrade loses nothing and imports once. A file that does not
//! parse stops the open with an error naming it, and is left untouched.
//!
//! Queries are blocking; the async trait runs them on tokio's blocking threads.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, Transaction};

use super::{
    Attempt, AuditEntry, DeliveryState, EventQueue, NewEvent, NodeInfo, PolicyStore, QueueCounters,
    QueuedEvent, Repeat, StoreError,
};
use crate::clock::Timestamp;
use crate::config::{Overrides, SiteOverride};
use crate::stages::drain::Drain;
use crate::stages::{Plan, Plans};

mod certs;
mod import;
mod rollups;

/// Bumped with every change to [`SCHEMA`]; kept in `meta`.
const SCHEMA_VERSION: i64 = 4;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS overrides (site TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stages (site TEXT PRIMARY KEY, plan TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS drains (
    site TEXT PRIMARY KEY, from_pool TEXT NOT NULL, to_pool TEXT NOT NULL, mode TEXT NOT NULL,
    moved_at INTEGER NOT NULL, until INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, site TEXT NOT NULL,
    entry TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY, site TEXT NOT NULL, fingerprint TEXT NOT NULL, kind TEXT NOT NULL,
    name TEXT NOT NULL, policy TEXT NOT NULL, first_seen INTEGER NOT NULL, last_seen INTEGER NOT NULL,
    count INTEGER NOT NULL, network TEXT NOT NULL, family TEXT NOT NULL, path TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL, next_attempt INTEGER NOT NULL,
    last_error TEXT, delivered_at INTEGER, created_at INTEGER NOT NULL,
    lease_until INTEGER, lease_holder TEXT,
    UNIQUE (site, fingerprint)
);
CREATE INDEX IF NOT EXISTS events_due ON events (state, next_attempt);
CREATE TABLE IF NOT EXISTS queue_counters (name TEXT PRIMARY KEY, count INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, info TEXT NOT NULL) WITHOUT ROWID;
";

/// The columns of a [`QueuedEvent`], in the order [`SqliteStore::event`] reads them.
const EVENT_COLUMNS: &str =
    "id, site, fingerprint, kind, name, policy, first_seen, last_seen, count,
    network, family, state, attempts, next_attempt, last_error, delivered_at";

/// The state store of one state directory.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    /// The analytics flusher's own connection, so that a long flush never holds up a policy
    /// read or write (WAL lets readers and one writer run together).
    rollups: Arc<Mutex<Connection>>,
    path: Arc<PathBuf>,
}

impl SqliteStore {
    /// The database file in a state directory.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("portcullis.db")
    }

    /// Opens (creating if needed) the store of `state_dir` for writing, importing the state
    /// files of earlier versions found there.
    pub fn open(state_dir: &Path) -> Result<SqliteStore, StoreError> {
        let path = Self::path(state_dir);
        std::fs::create_dir_all(state_dir).map_err(|e| StoreError::Import {
            path: state_dir.display().to_string(),
            reason: format!("cannot create the state directory: {e}"),
        })?;
        let err = |e| sqlite(&path, e);
        let mut conn = Connection::open(&path).map_err(err)?;
        // Another process (a CLI report) may hold a read lock for a moment.
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        // ATTACH cannot run inside a transaction; the copies below do.
        let legacy = import::attach(&conn, state_dir)?;
        let imported = {
            let tx = conn.transaction().map_err(err)?;
            tx.execute_batch(SCHEMA).map_err(err)?;
            tx.execute_batch(rollups::SCHEMA).map_err(err)?;
            tx.execute_batch(certs::SCHEMA).map_err(err)?;
            // Version 3: delivery leases, on an events table an earlier version created.
            let leased: bool = tx
                .query_row(
                    "SELECT COUNT(*) FROM pragma_table_info('events') WHERE name = 'lease_until'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(err)?
                > 0;
            if !leased {
                tx.execute_batch(
                    "ALTER TABLE events ADD COLUMN lease_until INTEGER;
                     ALTER TABLE events ADD COLUMN lease_holder TEXT;",
                )
                .map_err(err)?;
            }
            tx.execute(
                "INSERT INTO meta VALUES ('schema', ?1) ON CONFLICT DO UPDATE SET value = excluded.value",
                params![SCHEMA_VERSION],
            )
            .map_err(err)?;
            let mut imported = import::files(&tx, state_dir, &path)?;
            imported.extend(import::databases(&tx, &legacy)?);
            tx.commit().map_err(err)?;
            imported
        };
        import::detach(&conn, &legacy).map_err(err)?;
        // Only once the import is committed: a crash before leaves the files to import again.
        let mut files = Vec::new();
        for file in imported {
            // A SQLite file may have its write-ahead log and index beside it.
            for suffix in ["-wal", "-shm"] {
                let side = PathBuf::from(format!("{}{suffix}", file.display()));
                if side.exists() {
                    files.push(side);
                }
            }
            files.push(file);
        }
        for file in files {
            let done = PathBuf::from(format!("{}.imported", file.display()));
            match std::fs::rename(&file, &done) {
                Ok(()) => {
                    tracing::info!(from = %file.display(), to = %done.display(), "state file imported into the store")
                }
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "imported, but cannot rename: it would be imported again only into empty tables")
                }
            }
        }
        let rollups = rollups::connect(&path)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            rollups: Arc::new(Mutex::new(rollups)),
            path: Arc::new(path),
        })
    }

    /// Opens the store of `state_dir` for reading only (CLI reports); `None` when the program
    /// has never run there.
    pub fn open_read_only(state_dir: &Path) -> Result<Option<SqliteStore>, StoreError> {
        let path = Self::path(state_dir);
        if !path.exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| sqlite(&path, e))?;
        conn.busy_timeout(Duration::from_secs(2))
            .map_err(|e| sqlite(&path, e))?;
        let conn = Arc::new(Mutex::new(conn));
        Ok(Some(SqliteStore {
            rollups: conn.clone(),
            conn,
            path: Arc::new(path),
        }))
    }

    /// Forgets every override, plan, drain, audit entry and queued event (the demo starts
    /// fresh each time); traffic counts and exposure records stay, as the demo's own history.
    pub fn clear(&self) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute_batch(
                "DELETE FROM overrides; DELETE FROM stages; DELETE FROM drains; DELETE FROM audit;
                 DELETE FROM events; DELETE FROM queue_counters;",
            )
        })
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        f(&crate::lock(&self.conn))
    }

    fn write(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<()>,
    ) -> Result<(), StoreError> {
        let mut conn = crate::lock(&self.conn);
        let tx = conn.transaction().map_err(|e| sqlite(&self.path, e))?;
        f(&tx).map_err(|e| sqlite(&self.path, e))?;
        tx.commit().map_err(|e| sqlite(&self.path, e))
    }

    fn corrupt(&self, what: &'static str, key: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            path: self.path.display().to_string(),
            what,
            key: key.to_owned(),
            reason: e.to_string(),
        }
    }

    /// Site overrides, by site host.
    pub fn overrides_now(&self) -> Result<Overrides, StoreError> {
        self.read(|c| {
            let rows = self.rows(c, "SELECT site, value FROM overrides")?;
            rows.into_iter()
                .map(|(site, value)| {
                    let o: SiteOverride = serde_json::from_str(&value)
                        .map_err(|e| self.corrupt("override", &site, e))?;
                    Ok((site, o))
                })
                .collect()
        })
    }

    /// Replaces every override.
    pub fn set_overrides_now(&self, overrides: &Overrides) -> Result<(), StoreError> {
        let rows: Vec<(String, String)> = overrides
            .iter()
            .map(|(k, v)| (k.clone(), json(v)))
            .collect();
        self.write(|tx| {
            bump_generation(tx)?;
            tx.execute("DELETE FROM overrides", [])?;
            let mut ins = tx.prepare("INSERT INTO overrides VALUES (?1, ?2)")?;
            for (site, value) in &rows {
                ins.execute(params![site, value])?;
            }
            Ok(())
        })
    }

    /// Staged switch-off plans, by site host.
    pub fn stages_now(&self) -> Result<Plans, StoreError> {
        self.read(|c| {
            let rows = self.rows(c, "SELECT site, plan FROM stages")?;
            rows.into_iter()
                .map(|(site, plan)| {
                    let p: Plan = serde_json::from_str(&plan)
                        .map_err(|e| self.corrupt("stage plan", &site, e))?;
                    Ok((site, p))
                })
                .collect()
        })
    }

    /// Replaces every plan.
    pub fn set_stages_now(&self, plans: &Plans) -> Result<(), StoreError> {
        let rows: Vec<(String, String)> = plans.iter().map(|(k, v)| (k.clone(), json(v))).collect();
        self.write(|tx| {
            bump_generation(tx)?;
            tx.execute("DELETE FROM stages", [])?;
            let mut ins = tx.prepare("INSERT INTO stages VALUES (?1, ?2)")?;
            for (site, plan) in &rows {
                ins.execute(params![site, plan])?;
            }
            Ok(())
        })
    }

    /// Drains in progress.
    pub fn drains_now(&self) -> Result<Vec<Drain>, StoreError> {
        self.read(|c| {
            let mut q = c
                .prepare("SELECT site, from_pool, to_pool, mode, moved_at, until FROM drains ORDER BY site")
                .map_err(|e| sqlite(&self.path, e))?;
            let rows = q
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, i64>(5)?,
                    ))
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(|e| sqlite(&self.path, e))?;
            rows.into_iter()
                .map(|(site, from_pool, to_pool, mode, moved_at, until)| {
                    let mode = crate::config::CleartextMode::parse(&mode).ok_or_else(|| {
                        self.corrupt("drain mode", &site, format!("unknown mode {mode:?}"))
                    })?;
                    Ok(Drain {
                        site,
                        from_pool,
                        to_pool,
                        mode,
                        moved_at: moved_at.max(0) as u64,
                        until: until.max(0) as u64,
                    })
                })
                .collect()
        })
    }

    /// Replaces every drain.
    pub fn set_drains_now(&self, drains: &[Drain]) -> Result<(), StoreError> {
        self.write(|tx| {
            bump_generation(tx)?;
            tx.execute("DELETE FROM drains", [])?;
            let mut ins = tx.prepare("INSERT INTO drains VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
            for d in drains {
                ins.execute(params![
                    d.site,
                    d.from_pool,
                    d.to_pool,
                    d.mode.as_str(),
                    d.moved_at as i64,
                    d.until as i64
                ])?;
            }
            Ok(())
        })
    }

    /// See [`PolicyStore::generation`].
    pub fn generation_now(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            c.query_row(
                "SELECT COALESCE((SELECT value FROM meta WHERE key = 'generation'), 0)",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
            .map_err(|e| sqlite(&self.path, e))
        })
    }

    /// Appends one entry to the audit log.
    pub fn append_audit_now(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let text = json(entry);
        self.write(|tx| {
            tx.execute(
                "INSERT INTO audit (at, site, entry) VALUES (?1, ?2, ?3)",
                params![entry.at as i64, entry.site, text],
            )?;
            Ok(())
        })
    }

    /// The audit log, oldest first.
    pub fn audit_now(&self) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(|c| {
            let rows = self.rows(c, "SELECT CAST(id AS TEXT), entry FROM audit ORDER BY id")?;
            rows.into_iter()
                .map(|(id, entry)| {
                    serde_json::from_str(&entry).map_err(|e| self.corrupt("audit entry", &id, e))
                })
                .collect()
        })
    }

    /// Adds new events, folds repeats and adds to the counters, in one transaction.
    pub fn enqueue_now(
        &self,
        new: &[NewEvent],
        repeats: &[Repeat],
        counters: &QueueCounters,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let mut ins = tx.prepare_cached(
                "INSERT OR IGNORE INTO events (id, site, fingerprint, kind, name, policy, first_seen, last_seen, count,
                    network, family, path, state, attempts, next_attempt, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, 1, ?8, ?9, ?10, 'pending', 0, ?7, ?7)",
            )?;
            for e in new {
                ins.execute(params![
                    e.id, e.site, e.fingerprint, e.kind, e.name, e.policy, e.at as i64, e.network,
                    e.family, e.path
                ])?;
            }
            let mut up = tx.prepare_cached(
                "UPDATE events SET count = count + ?3, last_seen = max(last_seen, ?4)
                 WHERE site = ?1 AND fingerprint = ?2",
            )?;
            for r in repeats {
                up.execute(params![r.site, r.fingerprint, r.count as i64, r.last_seen as i64])?;
            }
            let mut add = tx.prepare_cached(
                "INSERT INTO queue_counters VALUES (?1, ?2)
                 ON CONFLICT DO UPDATE SET count = count + excluded.count",
            )?;
            for (name, n) in [
                ("coalesced", counters.coalesced),
                ("dropped_site_rate", counters.dropped_site_rate),
                ("dropped_network_rate", counters.dropped_network_rate),
                ("dropped_queue_full", counters.dropped_queue_full),
            ] {
                if n > 0 {
                    add.execute(params![name, n as i64])?;
                }
            }
            Ok(())
        })
    }

    /// Every (site, fingerprint) with an event, and how many are pending.
    pub fn known_now(&self) -> Result<(HashSet<(String, String)>, u32), StoreError> {
        self.read(|c| {
            let pairs = self.rows(c, "SELECT site, fingerprint FROM events")?;
            let pending: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM events WHERE state = 'pending'",
                    [],
                    |r| r.get(0),
                )
                .map_err(|e| sqlite(&self.path, e))?;
            Ok((pairs.into_iter().collect(), pending.max(0) as u32))
        })
    }

    /// Claims due events no one holds (see [`EventQueue::claim`]).
    pub fn claim_now(
        &self,
        now: Timestamp,
        limit: u32,
        lease: u64,
        holder: &str,
    ) -> Result<Vec<QueuedEvent>, StoreError> {
        let until = now.saturating_add(lease) as i64;
        self.write(|tx| {
            tx.execute(
                "UPDATE events SET lease_until = ?3, lease_holder = ?4 WHERE id IN (
                    SELECT id FROM events WHERE state = 'pending' AND next_attempt <= ?1
                      AND (lease_until IS NULL OR lease_until <= ?1)
                    ORDER BY next_attempt LIMIT ?2)",
                params![now as i64, limit, until, holder],
            )
            .map(|_| ())
        })?;
        self.read(|c| {
            self.events_where(
                c,
                "state = 'pending' AND lease_holder = ?1 AND lease_until = ?2 ORDER BY next_attempt",
                params![holder, until],
            )
        })
    }

    /// Records an attempt's outcome.
    pub fn record_now(&self, a: &Attempt) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "UPDATE events SET state = ?2, attempts = ?3, next_attempt = ?4, last_error = ?5,
                    delivered_at = CASE WHEN ?2 = 'delivered' THEN ?6 ELSE delivered_at END,
                    lease_until = NULL, lease_holder = NULL WHERE id = ?1",
                params![
                    a.id,
                    a.state.as_str(),
                    a.attempts as i64,
                    a.next_attempt as i64,
                    a.error,
                    a.at as i64
                ],
            )?;
            Ok(())
        })
    }

    /// Events of one site (or all), newest first, with the counters.
    pub fn events_now(
        &self,
        site: Option<&str>,
    ) -> Result<(Vec<QueuedEvent>, QueueCounters), StoreError> {
        self.read(|c| {
            let events = self.events_where(
                c,
                "(?1 IS NULL OR site = ?1) ORDER BY created_at DESC, id",
                params![site],
            )?;
            let mut counters = QueueCounters::default();
            let mut q = c
                .prepare("SELECT name, count FROM queue_counters")
                .map_err(|e| sqlite(&self.path, e))?;
            let pairs = q
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(|e| sqlite(&self.path, e))?;
            for (name, n) in pairs {
                let n = n.max(0) as u64;
                match name.as_str() {
                    "coalesced" => counters.coalesced = n,
                    "dropped_site_rate" => counters.dropped_site_rate = n,
                    "dropped_network_rate" => counters.dropped_network_rate = n,
                    "dropped_queue_full" => counters.dropped_queue_full = n,
                    _ => {}
                }
            }
            Ok((events, counters))
        })
    }

    fn events_where(
        &self,
        c: &Connection,
        filter: &str,
        p: impl rusqlite::Params,
    ) -> Result<Vec<QueuedEvent>, StoreError> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE {filter}");
        let mut q = c.prepare(&sql).map_err(|e| sqlite(&self.path, e))?;
        let rows = q
            .query_map(p, |r| {
                Ok((
                    r.get::<_, String>(11)?,
                    QueuedEvent {
                        id: r.get(0)?,
                        site: r.get(1)?,
                        fingerprint: r.get(2)?,
                        kind: r.get(3)?,
                        name: r.get(4)?,
                        policy: r.get(5)?,
                        first_seen: r.get::<_, i64>(6)?.max(0) as u64,
                        last_seen: r.get::<_, i64>(7)?.max(0) as u64,
                        count: r.get::<_, i64>(8)?.max(0) as u64,
                        network: r.get(9)?,
                        family: r.get(10)?,
                        state: DeliveryState::Pending,
                        attempts: r.get::<_, i64>(12)?.clamp(0, i64::from(u32::MAX)) as u32,
                        next_attempt: r.get::<_, i64>(13)?.max(0) as u64,
                        last_error: r.get(14)?,
                        delivered_at: r.get::<_, Option<i64>>(15)?.map(|t| t.max(0) as u64),
                    },
                ))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| sqlite(&self.path, e))?;
        rows.into_iter()
            .map(|(state, mut e)| {
                e.state = DeliveryState::parse(&state).ok_or_else(|| {
                    self.corrupt("delivery state", &e.id, format!("unknown state {state:?}"))
                })?;
                Ok(e)
            })
            .collect()
    }

    fn rows(&self, c: &Connection, sql: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut q = c.prepare(sql).map_err(|e| sqlite(&self.path, e))?;
        q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| sqlite(&self.path, e))
    }

    /// Runs a blocking query on tokio's blocking threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SqliteStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

#[async_trait::async_trait]
impl PolicyStore for SqliteStore {
    async fn overrides(&self) -> Result<Overrides, StoreError> {
        self.blocking(|s| s.overrides_now()).await
    }

    async fn set_overrides(&self, overrides: &Overrides) -> Result<(), StoreError> {
        let o = overrides.clone();
        self.blocking(move |s| s.set_overrides_now(&o)).await
    }

    async fn stages(&self) -> Result<Plans, StoreError> {
        self.blocking(|s| s.stages_now()).await
    }

    async fn set_stages(&self, plans: &Plans) -> Result<(), StoreError> {
        let p = plans.clone();
        self.blocking(move |s| s.set_stages_now(&p)).await
    }

    async fn drains(&self) -> Result<Vec<Drain>, StoreError> {
        self.blocking(|s| s.drains_now()).await
    }

    async fn set_drains(&self, drains: &[Drain]) -> Result<(), StoreError> {
        let d = drains.to_vec();
        self.blocking(move |s| s.set_drains_now(&d)).await
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let e = entry.clone();
        self.blocking(move |s| s.append_audit_now(&e)).await
    }

    async fn audit(&self) -> Result<Vec<AuditEntry>, StoreError> {
        self.blocking(|s| s.audit_now()).await
    }

    async fn generation(&self) -> Result<u64, StoreError> {
        self.blocking(|s| s.generation_now()).await
    }

    async fn heartbeat(&self, node: &NodeInfo) -> Result<(), StoreError> {
        let (name, info) = (node.name.clone(), json(node));
        self.blocking(move |s| {
            s.write(|tx| {
                tx.execute(
                    "INSERT INTO nodes VALUES (?1, ?2) ON CONFLICT DO UPDATE SET info = excluded.info",
                    params![name, info],
                )
                .map(|_| ())
            })
        })
        .await
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        self.blocking(|s| {
            s.read(|c| {
                let rows = s.rows(c, "SELECT name, info FROM nodes ORDER BY name")?;
                rows.into_iter()
                    .map(|(name, info)| {
                        serde_json::from_str(&info).map_err(|e| s.corrupt("node", &name, e))
                    })
                    .collect()
            })
        })
        .await
    }
}

#[async_trait::async_trait]
impl EventQueue for SqliteStore {
    async fn enqueue(
        &self,
        new: &[NewEvent],
        repeats: &[Repeat],
        counters: &QueueCounters,
    ) -> Result<(), StoreError> {
        let (n, r, c) = (new.to_vec(), repeats.to_vec(), counters.clone());
        self.blocking(move |s| s.enqueue_now(&n, &r, &c)).await
    }

    async fn known(&self) -> Result<(HashSet<(String, String)>, u32), StoreError> {
        self.blocking(|s| s.known_now()).await
    }

    async fn claim(
        &self,
        now: Timestamp,
        limit: u32,
        lease: u64,
        holder: &str,
    ) -> Result<Vec<QueuedEvent>, StoreError> {
        let holder = holder.to_owned();
        self.blocking(move |s| s.claim_now(now, limit, lease, &holder))
            .await
    }

    async fn record(&self, attempt: &Attempt) -> Result<(), StoreError> {
        let a = attempt.clone();
        self.blocking(move |s| s.record_now(&a)).await
    }

    async fn events(
        &self,
        site: Option<&str>,
    ) -> Result<(Vec<QueuedEvent>, QueueCounters), StoreError> {
        let site = site.map(str::to_owned);
        self.blocking(move |s| s.events_now(site.as_deref())).await
    }
}

pub(super) fn sqlite(path: &Path, source: rusqlite::Error) -> StoreError {
    StoreError::Sqlite {
        path: path.display().to_string(),
        source,
    }
}

/// Counts one more policy write (see [`PolicyStore::generation`]).
fn bump_generation(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO meta VALUES ('generation', 1) ON CONFLICT DO UPDATE SET value = value + 1",
        [],
    )
    .map(|_| ())
}

/// Records are plain data: serialising them cannot fail.
pub(super) fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}
