//! The shared store of a fleet: the same four traits on PostgreSQL (tokio-postgres with a
//! deadpool pool, TLS by rustls). The schema is versioned; [`PgStore::connect`] applies the
//! missing migrations in one transaction under an advisory lock, so nodes starting together
//! never race. Analytics rows carry the writing node's name and reads sum over nodes, so fleet
//! totals are exact.
//!
//! Never: logs or returns the connection URL's password (errors name the database by host,
//! port and name only).

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::types::ToSql;

use super::{
    Attempt, AuditEntry, DeliveryState, EventQueue, ExposureRow, FamilyPoint, NewEvent, NodeInfo,
    PolicyStore, QueueCounters, QueuedEvent, Repeat, RollupBatch, Rollups, SeriesPoint, StoreError,
    TrafficRow,
};
use crate::clock::Timestamp;
use crate::config::{CleartextMode, Overrides};
use crate::observe::{ClientFamily, DimKind, Outcome, Scheme, TlsVersion};
use crate::stages::drain::Drain;
use crate::stages::Plans;

mod certs;
mod listen;

/// Any number will do, as long as every node takes the same one.
const MIGRATION_LOCK: i64 = 0x706f_7274_6375_6c6c; // "portcull"

/// Each entry brings the schema from its index to the next version. Never edit one that has
/// shipped: add another.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE overrides (site TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE stages (site TEXT PRIMARY KEY, plan TEXT NOT NULL);
CREATE TABLE drains (
    site TEXT PRIMARY KEY, from_pool TEXT NOT NULL, to_pool TEXT NOT NULL, mode TEXT NOT NULL,
    moved_at BIGINT NOT NULL, until BIGINT NOT NULL
);
CREATE TABLE audit (
    id BIGSERIAL PRIMARY KEY, at BIGINT NOT NULL, site TEXT NOT NULL, entry TEXT NOT NULL
);
CREATE TABLE events (
    id TEXT PRIMARY KEY, site TEXT NOT NULL, fingerprint TEXT NOT NULL, kind TEXT NOT NULL,
    name TEXT NOT NULL, policy TEXT NOT NULL, first_seen BIGINT NOT NULL, last_seen BIGINT NOT NULL,
    count BIGINT NOT NULL, network TEXT NOT NULL, family TEXT NOT NULL, path TEXT NOT NULL,
    state TEXT NOT NULL, attempts BIGINT NOT NULL, next_attempt BIGINT NOT NULL,
    last_error TEXT, delivered_at BIGINT, created_at BIGINT NOT NULL, seq BIGSERIAL,
    lease_until BIGINT, lease_holder TEXT,
    UNIQUE (site, fingerprint)
);
CREATE INDEX events_due ON events (state, next_attempt);
CREATE TABLE queue_counters (name TEXT PRIMARY KEY, count BIGINT NOT NULL);
CREATE TABLE traffic (
    node TEXT NOT NULL, bucket BIGINT NOT NULL, span INTEGER NOT NULL, site TEXT NOT NULL,
    outcome TEXT NOT NULL, scheme TEXT NOT NULL, port INTEGER NOT NULL, tls TEXT NOT NULL,
    http TEXT NOT NULL, status_class INTEGER NOT NULL, count BIGINT NOT NULL,
    PRIMARY KEY (node, bucket, span, site, outcome, scheme, port, tls, http, status_class)
);
CREATE INDEX traffic_site ON traffic (site, bucket);
CREATE TABLE dims (
    node TEXT NOT NULL, bucket BIGINT NOT NULL, span INTEGER NOT NULL, site TEXT NOT NULL,
    scheme TEXT NOT NULL, kind TEXT NOT NULL, value TEXT NOT NULL, count BIGINT NOT NULL,
    PRIMARY KEY (node, bucket, span, site, scheme, kind, value)
);
CREATE INDEX dims_site ON dims (site, kind, bucket);
CREATE TABLE overflow (
    node TEXT NOT NULL, bucket BIGINT NOT NULL, span INTEGER NOT NULL, site TEXT NOT NULL,
    scheme TEXT NOT NULL, kind TEXT NOT NULL, count BIGINT NOT NULL,
    PRIMARY KEY (node, bucket, span, site, scheme, kind)
);
CREATE TABLE exposures (
    site TEXT NOT NULL, fingerprint TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    first_seen BIGINT NOT NULL, last_seen BIGINT NOT NULL, count BIGINT NOT NULL,
    network TEXT NOT NULL, family TEXT NOT NULL, path TEXT NOT NULL,
    PRIMARY KEY (site, fingerprint)
);
CREATE TABLE rollup_counters (name TEXT PRIMARY KEY, count BIGINT NOT NULL);
CREATE TABLE policy_generation (value BIGINT NOT NULL);
CREATE TABLE nodes (name TEXT PRIMARY KEY, info TEXT NOT NULL);
INSERT INTO policy_generation VALUES (0);
",
    "
CREATE TABLE acme_accounts (directory TEXT PRIMARY KEY, sealed BYTEA NOT NULL);
CREATE SEQUENCE acme_cert_version;
CREATE TABLE acme_certs (
    site TEXT PRIMARY KEY, chain_pem TEXT NOT NULL, sealed_key BYTEA NOT NULL,
    directory TEXT NOT NULL, version BIGINT NOT NULL
);
CREATE TABLE acme_challenges (
    seq BIGSERIAL PRIMARY KEY, site TEXT NOT NULL, holder TEXT NOT NULL, kind TEXT NOT NULL,
    name TEXT NOT NULL, value TEXT NOT NULL
);
CREATE TABLE acme_orders (
    site TEXT PRIMARY KEY, holder TEXT NOT NULL, lease_until BIGINT NOT NULL,
    retry_at BIGINT NOT NULL, failures INTEGER NOT NULL
);
",
];

/// How to reach the database: `[store]`.
#[derive(Clone)]
pub struct PgSettings {
    /// `postgres://user:password@host:port/db?sslmode=require`.
    pub url: String,
    pub pool_size: usize,
    /// Extra trust anchors (PEM) for the server's certificate.
    pub ca: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// This node's name, kept with each analytics row it writes.
    pub node: String,
}

/// The PostgreSQL store.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// `host:port/db`, for errors: never the password.
    name: String,
    node: String,
    /// Set once the schema is known to be current: until then every use tries the migration
    /// first, so a node that started while the database was down catches up when it returns.
    migrated: Arc<tokio::sync::OnceCell<()>>,
    /// For the notification connection, outside the pool (see [`listen`]).
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// `connect_timeout`: the longest a new connection may take.
    connect_within: std::time::Duration,
}

impl PgStore {
    /// Connects, checks the database answers, and brings its schema up to date.
    pub async fn connect(settings: &PgSettings) -> Result<PgStore, StoreError> {
        let store = PgStore::new(settings)?;
        store.migrated().await?;
        Ok(store)
    }

    /// The store, without reaching the database yet (a node may start while it is down).
    pub fn new(settings: &PgSettings) -> Result<PgStore, StoreError> {
        let mut cfg =
            tokio_postgres::Config::from_str(&settings.url).map_err(|e| StoreError::Postgres {
                db: "[store] url".into(),
                reason: format!("does not parse: {}", redact(&e.to_string(), &settings.url)),
            })?;
        // An unreachable or silent database must fail a query in seconds, not wait for TCP's
        // minutes. As with libpq, `connect_timeout` (default 5 s here) bounds the whole
        // connection: TCP, TLS and the startup exchange.
        let connect_within = cfg
            .get_connect_timeout()
            .copied()
            .unwrap_or(std::time::Duration::from_secs(5));
        cfg.connect_timeout(connect_within);
        let name = describe(&cfg);
        let tls = crate::tls::client_config(&settings.ca).map_err(|e| StoreError::Postgres {
            db: name.clone(),
            reason: e.to_string(),
        })?;
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
        let mgr = Manager::from_config(
            cfg.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(settings.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(std::time::Duration::from_secs(10)))
            .create_timeout(Some(connect_within))
            .build()
            .map_err(|e| StoreError::Postgres {
                db: name.clone(),
                reason: e.to_string(),
            })?;
        Ok(PgStore {
            pool,
            name,
            node: settings.node.clone(),
            migrated: Arc::new(tokio::sync::OnceCell::new()),
            config: cfg,
            tls,
            connect_within,
        })
    }

    async fn migrated(&self) -> Result<(), StoreError> {
        self.migrated
            .get_or_try_init(|| async { self.migrate().await.map(|_| ()) })
            .await
            .map(|_| ())
    }

    /// The error with its causes ([`crate::error_chain`]).
    fn err(&self, e: impl std::error::Error) -> StoreError {
        self.problem(crate::error_chain(&e))
    }

    fn problem(&self, reason: String) -> StoreError {
        StoreError::Postgres {
            db: self.name.clone(),
            reason,
        }
    }

    fn corrupt(&self, what: &'static str, key: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            path: self.name.clone(),
            what,
            key: key.to_owned(),
            reason: e.to_string(),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.migrated().await?;
        self.raw_client().await
    }

    async fn raw_client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        use deadpool_postgres::{PoolError, TimeoutType};
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => self.problem(format!("cannot connect: {}", crate::error_chain(&e))),
            PoolError::Timeout(TimeoutType::Create) => self.problem(format!(
                "no answer within connect_timeout ({}s): is this the database's address, and is it up?",
                self.connect_within.as_secs_f32()
            )),
            PoolError::Timeout(_) => self.problem(format!(
                "every one of the {} connections of [store] pool_size stayed busy for 10s",
                self.pool.status().max_size
            )),
            e => self.err(e),
        })
    }

    /// The schema version now, after applying what is missing.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        let mut c = self.raw_client().await?;
        let tx = c.transaction().await.map_err(|e| self.err(e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(|e| self.err(e))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS portcullis_schema (version INTEGER NOT NULL);",
        )
        .await
        .map_err(|e| self.err(e))?;
        let version: i32 = tx
            .query_opt("SELECT version FROM portcullis_schema", &[])
            .await
            .map_err(|e| self.err(e))?
            .map_or(0, |r| r.get(0));
        let version = version.max(0) as usize;
        if version > MIGRATIONS.len() {
            return Err(self.problem(format!(
                "the schema is at version {version}, newer than this build knows ({}): upgrade portcullis",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.batch_execute(sql).await.map_err(|e| {
                self.problem(format!("migration {}: {}", i + 1, crate::error_chain(&e)))
            })?;
        }
        tx.execute("DELETE FROM portcullis_schema", &[])
            .await
            .map_err(|e| self.err(e))?;
        tx.execute(
            "INSERT INTO portcullis_schema VALUES ($1)",
            &[&(MIGRATIONS.len() as i32)],
        )
        .await
        .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        if version < MIGRATIONS.len() {
            tracing::info!(db = %self.name, from = version, to = MIGRATIONS.len(), "store schema migrated");
        }
        Ok(MIGRATIONS.len())
    }

    async fn pairs(&self, sql: &str) -> Result<Vec<(String, String)>, StoreError> {
        let c = self.client().await?;
        let rows = c.query(sql, &[]).await.map_err(|e| self.err(e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Rows of (site, JSON) decoded by site; `what` names a record that does not decode.
    async fn decoded<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        what: &'static str,
    ) -> Result<std::collections::BTreeMap<String, T>, StoreError> {
        self.pairs(sql)
            .await?
            .into_iter()
            .map(|(site, v)| {
                let t = serde_json::from_str(&v).map_err(|e| self.corrupt(what, &site, e))?;
                Ok((site, t))
            })
            .collect()
    }

    /// Replaces every row of `table` with `rows` of (site, text), in one transaction.
    async fn replace(&self, table: &str, rows: Vec<(String, String)>) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.err(e))?;
        bump_generation(&tx).await.map_err(|e| self.err(e))?;
        tx.execute(&format!("DELETE FROM {table}"), &[])
            .await
            .map_err(|e| self.err(e))?;
        let ins = tx
            .prepare(&format!("INSERT INTO {table} VALUES ($1, $2)"))
            .await
            .map_err(|e| self.err(e))?;
        for (k, v) in &rows {
            tx.execute(&ins, &[k, v]).await.map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    async fn events_where(
        &self,
        filter: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<QueuedEvent>, StoreError> {
        let c = self.client().await?;
        let sql = format!(
            "SELECT id, site, fingerprint, kind, name, policy, first_seen, last_seen, count,
                network, family, state, attempts, next_attempt, last_error, delivered_at
             FROM events WHERE {filter}"
        );
        let rows = c.query(&sql, params).await.map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| {
                let id: String = r.get(0);
                let state: String = r.get(11);
                let state = DeliveryState::parse(&state).ok_or_else(|| {
                    self.corrupt("delivery state", &id, format!("unknown state {state:?}"))
                })?;
                Ok(QueuedEvent {
                    site: r.get(1),
                    fingerprint: r.get(2),
                    kind: r.get(3),
                    name: r.get(4),
                    policy: r.get(5),
                    first_seen: ts(r.get(6)),
                    last_seen: ts(r.get(7)),
                    count: ts(r.get(8)),
                    network: r.get(9),
                    family: r.get(10),
                    state,
                    attempts: r.get::<_, i64>(12).clamp(0, i64::from(u32::MAX)) as u32,
                    next_attempt: ts(r.get(13)),
                    last_error: r.get(14),
                    delivered_at: r.get::<_, Option<i64>>(15).map(ts),
                    id,
                })
            })
            .collect()
    }
}

/// The columns every rollup row has, as arrays for `UNNEST`.
#[allow(clippy::type_complexity)]
fn columns<'a>(
    rows: impl Iterator<Item = (Timestamp, u32, &'a String, u64)>,
) -> (Vec<i64>, Vec<i32>, Vec<&'a str>, Vec<i64>) {
    let (mut bucket, mut span, mut site, mut count) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (b, s, name, n) in rows {
        bucket.push(b as i64);
        span.push(s as i32);
        site.push(name.as_str());
        count.push(n as i64);
    }
    (bucket, span, site, count)
}

/// Counts one more policy write (see [`PolicyStore::generation`]); the notification wakes the
/// other nodes at once (it is only a wake-up: they poll the number too).
async fn bump_generation(
    tx: &deadpool_postgres::Transaction<'_>,
) -> Result<(), tokio_postgres::Error> {
    tx.execute("UPDATE policy_generation SET value = value + 1", &[])
        .await?;
    tx.execute(&format!("NOTIFY {}", listen::CHANNEL), &[])
        .await
        .map(|_| ())
}

fn ts(v: i64) -> Timestamp {
    v.max(0) as u64
}

/// Records are plain data: serialising them cannot fail.
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// `host:port/db` of a connection config.
fn describe(cfg: &tokio_postgres::Config) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres {host}:{port}/{}",
        cfg.get_dbname().unwrap_or("(default database)")
    )
}

/// `text` with the URL's password, if any, replaced.
fn redact(text: &str, url: &str) -> String {
    let password = tokio_postgres::Config::from_str(url).ok().and_then(|c| {
        c.get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
    });
    match password {
        Some(p) if !p.is_empty() => text.replace(&p, "***"),
        _ => text.to_owned(),
    }
}

#[async_trait::async_trait]
impl PolicyStore for PgStore {
    async fn overrides(&self) -> Result<Overrides, StoreError> {
        self.decoded("SELECT site, value FROM overrides", "override")
            .await
    }

    async fn set_overrides(&self, overrides: &Overrides) -> Result<(), StoreError> {
        let rows = overrides
            .iter()
            .map(|(k, v)| (k.clone(), json(v)))
            .collect();
        self.replace("overrides", rows).await
    }

    async fn stages(&self) -> Result<Plans, StoreError> {
        self.decoded("SELECT site, plan FROM stages", "stage plan")
            .await
    }

    async fn set_stages(&self, plans: &Plans) -> Result<(), StoreError> {
        let rows = plans.iter().map(|(k, v)| (k.clone(), json(v))).collect();
        self.replace("stages", rows).await
    }

    async fn drains(&self) -> Result<Vec<Drain>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT site, from_pool, to_pool, mode, moved_at, until FROM drains ORDER BY site",
                &[],
            )
            .await
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| {
                let site: String = r.get(0);
                let mode: String = r.get(3);
                let mode = CleartextMode::parse(&mode).ok_or_else(|| {
                    self.corrupt("drain mode", &site, format!("unknown mode {mode:?}"))
                })?;
                Ok(Drain {
                    from_pool: r.get(1),
                    to_pool: r.get(2),
                    mode,
                    moved_at: ts(r.get(4)),
                    until: ts(r.get(5)),
                    site,
                })
            })
            .collect()
    }

    async fn set_drains(&self, drains: &[Drain]) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.err(e))?;
        bump_generation(&tx).await.map_err(|e| self.err(e))?;
        tx.execute("DELETE FROM drains", &[])
            .await
            .map_err(|e| self.err(e))?;
        for d in drains {
            tx.execute(
                "INSERT INTO drains VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &d.site,
                    &d.from_pool,
                    &d.to_pool,
                    &d.mode.as_str(),
                    &(d.moved_at as i64),
                    &(d.until as i64),
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO audit (at, site, entry) VALUES ($1, $2, $3)",
            &[&(entry.at as i64), &entry.site, &json(entry)],
        )
        .await
        .map(|_| ())
        .map_err(|e| self.err(e))
    }

    async fn generation(&self) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one("SELECT value FROM policy_generation", &[])
            .await
            .map_err(|e| self.err(e))?;
        Ok(ts(row.get(0)))
    }

    fn wake_ups(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(listen::spawn(
            self.config.clone(),
            self.tls.clone(),
            self.name.clone(),
        ))
    }

    async fn heartbeat(&self, node: &NodeInfo) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "INSERT INTO nodes VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET info = EXCLUDED.info",
            &[&node.name, &json(node)],
        )
        .await
        .map(|_| ())
        .map_err(|e| self.err(e))
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        self.pairs("SELECT name, info FROM nodes ORDER BY name")
            .await?
            .into_iter()
            .map(|(name, info)| {
                serde_json::from_str(&info).map_err(|e| self.corrupt("node", &name, e))
            })
            .collect()
    }

    async fn audit(&self) -> Result<Vec<AuditEntry>, StoreError> {
        self.pairs("SELECT id::TEXT, entry FROM audit ORDER BY id")
            .await?
            .into_iter()
            .map(|(id, e)| {
                serde_json::from_str(&e).map_err(|err| self.corrupt("audit entry", &id, err))
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl EventQueue for PgStore {
    async fn enqueue(
        &self,
        new: &[NewEvent],
        repeats: &[Repeat],
        counters: &QueueCounters,
    ) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.err(e))?;
        for e in new {
            let at = e.at as i64;
            tx.execute(
                "INSERT INTO events (id, site, fingerprint, kind, name, policy, first_seen, last_seen,
                    count, network, family, path, state, attempts, next_attempt, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $7, 1, $8, $9, $10, 'pending', 0, $7, $7)
                 ON CONFLICT DO NOTHING",
                &[
                    &e.id, &e.site, &e.fingerprint, &e.kind, &e.name, &e.policy, &at, &e.network,
                    &e.family, &e.path,
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        }
        for r in repeats {
            tx.execute(
                "UPDATE events SET count = count + $3, last_seen = GREATEST(last_seen, $4)
                 WHERE site = $1 AND fingerprint = $2",
                &[
                    &r.site,
                    &r.fingerprint,
                    &(r.count as i64),
                    &(r.last_seen as i64),
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        }
        for (name, n) in [
            ("coalesced", counters.coalesced),
            ("dropped_site_rate", counters.dropped_site_rate),
            ("dropped_network_rate", counters.dropped_network_rate),
            ("dropped_queue_full", counters.dropped_queue_full),
        ] {
            if n > 0 {
                tx.execute(
                    "INSERT INTO queue_counters VALUES ($1, $2)
                     ON CONFLICT (name) DO UPDATE SET count = queue_counters.count + EXCLUDED.count",
                    &[&name, &(n as i64)],
                )
                .await
                .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    async fn known(&self) -> Result<(HashSet<(String, String)>, u32), StoreError> {
        let pairs = self.pairs("SELECT site, fingerprint FROM events").await?;
        let c = self.client().await?;
        let pending: i64 = c
            .query_one("SELECT COUNT(*) FROM events WHERE state = 'pending'", &[])
            .await
            .map_err(|e| self.err(e))?
            .get(0);
        Ok((pairs.into_iter().collect(), pending.max(0) as u32))
    }

    async fn claim(
        &self,
        now: Timestamp,
        limit: u32,
        lease: u64,
        holder: &str,
    ) -> Result<Vec<QueuedEvent>, StoreError> {
        let c = self.client().await?;
        // SKIP LOCKED: nodes claiming at the same moment take different events, none waits.
        let rows = c
            .query(
                "WITH c AS (
                    SELECT id FROM events WHERE state = 'pending' AND next_attempt <= $1
                      AND (lease_until IS NULL OR lease_until <= $1)
                    ORDER BY next_attempt, seq LIMIT $2 FOR UPDATE SKIP LOCKED)
                 UPDATE events e SET lease_until = $3, lease_holder = $4 FROM c WHERE e.id = c.id
                 RETURNING e.id",
                &[
                    &(now as i64),
                    &i64::from(limit),
                    &(now.saturating_add(lease) as i64),
                    &holder,
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.events_where("id = ANY($1) ORDER BY next_attempt, seq", &[&ids])
            .await
    }

    async fn record(&self, a: &Attempt) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute(
            "UPDATE events SET state = $2, attempts = $3, next_attempt = $4, last_error = $5,
                delivered_at = CASE WHEN $2 = 'delivered' THEN $6 ELSE delivered_at END,
                lease_until = NULL, lease_holder = NULL
             WHERE id = $1",
            &[
                &a.id,
                &a.state.as_str(),
                &i64::from(a.attempts),
                &(a.next_attempt as i64),
                &a.error,
                &(a.at as i64),
            ],
        )
        .await
        .map(|_| ())
        .map_err(|e| self.err(e))
    }

    async fn events(
        &self,
        site: Option<&str>,
    ) -> Result<(Vec<QueuedEvent>, QueueCounters), StoreError> {
        let events = self
            .events_where(
                "($1::TEXT IS NULL OR site = $1) ORDER BY created_at DESC, id",
                &[&site],
            )
            .await?;
        let mut counters = QueueCounters::default();
        let c = self.client().await?;
        let rows = c
            .query("SELECT name, count FROM queue_counters", &[])
            .await
            .map_err(|e| self.err(e))?;
        for r in rows {
            let name: String = r.get(0);
            let n = ts(r.get(1));
            match name.as_str() {
                "coalesced" => counters.coalesced = n,
                "dropped_site_rate" => counters.dropped_site_rate = n,
                "dropped_network_rate" => counters.dropped_network_rate = n,
                "dropped_queue_full" => counters.dropped_queue_full = n,
                _ => {}
            }
        }
        Ok((events, counters))
    }
}

#[async_trait::async_trait]
impl Rollups for PgStore {
    async fn write_rollups(&self, b: &RollupBatch) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.err(e))?;
        // One statement per table, each row a position in column arrays: a flush of thousands
        // of rows is three round trips, not thousands. Equal keys in a batch are summed first
        // (an upsert may not touch one row twice).
        let (bucket, span, site, count) = columns(
            b.traffic
                .iter()
                .map(|r| (r.bucket, r.span, &r.site, r.count)),
        );
        let outcome: Vec<&str> = b.traffic.iter().map(|r| r.outcome.as_str()).collect();
        let scheme: Vec<&str> = b.traffic.iter().map(|r| r.scheme.as_str()).collect();
        let port: Vec<i32> = b.traffic.iter().map(|r| i32::from(r.port)).collect();
        let tls: Vec<&str> = b.traffic.iter().map(|r| r.tls.as_str()).collect();
        let http: Vec<&str> = b.traffic.iter().map(|r| r.http.as_str()).collect();
        let class: Vec<i32> = b
            .traffic
            .iter()
            .map(|r| i32::from(r.status_class))
            .collect();
        if !bucket.is_empty() {
            tx.execute(
                "INSERT INTO traffic
                 SELECT $1, bucket, span, site, outcome, scheme, port, tls, http, status_class, SUM(count)
                 FROM UNNEST($2::BIGINT[], $3::INTEGER[], $4::TEXT[], $5::TEXT[], $6::TEXT[],
                             $7::INTEGER[], $8::TEXT[], $9::TEXT[], $10::INTEGER[], $11::BIGINT[])
                   AS t(bucket, span, site, outcome, scheme, port, tls, http, status_class, count)
                 GROUP BY bucket, span, site, outcome, scheme, port, tls, http, status_class
                 ON CONFLICT (node, bucket, span, site, outcome, scheme, port, tls, http, status_class)
                 DO UPDATE SET count = traffic.count + EXCLUDED.count",
                &[
                    &self.node, &bucket, &span, &site, &outcome, &scheme, &port, &tls, &http,
                    &class, &count,
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        }
        let (bucket, span, site, count) =
            columns(b.dims.iter().map(|r| (r.bucket, r.span, &r.site, r.count)));
        let scheme: Vec<&str> = b.dims.iter().map(|r| r.scheme.as_str()).collect();
        let kind: Vec<&str> = b.dims.iter().map(|r| r.kind.as_str()).collect();
        let value: Vec<&str> = b.dims.iter().map(|r| r.value.as_str()).collect();
        if !bucket.is_empty() {
            tx.execute(
                "INSERT INTO dims
                 SELECT $1, bucket, span, site, scheme, kind, value, SUM(count)
                 FROM UNNEST($2::BIGINT[], $3::INTEGER[], $4::TEXT[], $5::TEXT[], $6::TEXT[],
                             $7::TEXT[], $8::BIGINT[])
                   AS t(bucket, span, site, scheme, kind, value, count)
                 GROUP BY bucket, span, site, scheme, kind, value
                 ON CONFLICT (node, bucket, span, site, scheme, kind, value)
                 DO UPDATE SET count = dims.count + EXCLUDED.count",
                &[
                    &self.node, &bucket, &span, &site, &scheme, &kind, &value, &count,
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        }
        let (bucket, span, site, count) = columns(
            b.overflow
                .iter()
                .map(|r| (r.bucket, r.span, &r.site, r.count)),
        );
        let scheme: Vec<&str> = b.overflow.iter().map(|r| r.scheme.as_str()).collect();
        let kind: Vec<&str> = b.overflow.iter().map(|r| r.kind.as_str()).collect();
        if !bucket.is_empty() {
            tx.execute(
                "INSERT INTO overflow
                 SELECT $1, bucket, span, site, scheme, kind, SUM(count)
                 FROM UNNEST($2::BIGINT[], $3::INTEGER[], $4::TEXT[], $5::TEXT[], $6::TEXT[],
                             $7::BIGINT[])
                   AS t(bucket, span, site, scheme, kind, count)
                 GROUP BY bucket, span, site, scheme, kind
                 ON CONFLICT (node, bucket, span, site, scheme, kind)
                 DO UPDATE SET count = overflow.count + EXCLUDED.count",
                &[&self.node, &bucket, &span, &site, &scheme, &kind, &count],
            )
            .await
            .map_err(|e| self.err(e))?;
        }
        let x = tx
            .prepare(
                "INSERT INTO exposures VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (site, fingerprint) DO UPDATE SET
                    count = exposures.count + EXCLUDED.count,
                    first_seen = LEAST(exposures.first_seen, EXCLUDED.first_seen),
                    network = CASE WHEN EXCLUDED.last_seen >= exposures.last_seen THEN EXCLUDED.network ELSE exposures.network END,
                    family = CASE WHEN EXCLUDED.last_seen >= exposures.last_seen THEN EXCLUDED.family ELSE exposures.family END,
                    path = CASE WHEN EXCLUDED.last_seen >= exposures.last_seen THEN EXCLUDED.path ELSE exposures.path END,
                    last_seen = GREATEST(exposures.last_seen, EXCLUDED.last_seen)",
            )
            .await
            .map_err(|e| self.err(e))?;
        for e in &b.exposures {
            tx.execute(
                &x,
                &[
                    &e.site,
                    &e.fingerprint,
                    &e.kind,
                    &e.name,
                    &(e.first_seen as i64),
                    &(e.last_seen as i64),
                    &(e.count as i64),
                    &e.network,
                    &e.family.as_str(),
                    &e.path,
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        }
        if b.exposures_dropped > 0 {
            tx.execute(
                "INSERT INTO rollup_counters VALUES ('exposures_dropped', $1)
                 ON CONFLICT (name) DO UPDATE SET count = rollup_counters.count + EXCLUDED.count",
                &[&(b.exposures_dropped as i64)],
            )
            .await
            .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    async fn roll_up(&self, now: Timestamp, minutes: u64, hours: u64) -> Result<(), StoreError> {
        let minute_cut = now.saturating_sub(minutes) as i64;
        let hour_cut = now.saturating_sub(hours) as i64;
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.err(e))?;
        let steps: [(&str, &[&(dyn ToSql + Sync)]); 10] = [
            (
                "INSERT INTO traffic SELECT node, bucket - bucket % 3600, 3600, site, outcome, scheme, port, tls, http, status_class, SUM(count)
                   FROM traffic WHERE span = 60 AND bucket < $1
                   GROUP BY node, bucket - bucket % 3600, site, outcome, scheme, port, tls, http, status_class
                   ON CONFLICT (node, bucket, span, site, outcome, scheme, port, tls, http, status_class)
                   DO UPDATE SET count = traffic.count + EXCLUDED.count",
                &[&minute_cut],
            ),
            ("DELETE FROM traffic WHERE span = 60 AND bucket < $1", &[&minute_cut]),
            (
                "INSERT INTO dims SELECT node, bucket - bucket % 3600, 3600, site, scheme, kind, value, SUM(count)
                   FROM dims WHERE span = 60 AND bucket < $1
                   GROUP BY node, bucket - bucket % 3600, site, scheme, kind, value
                   ON CONFLICT (node, bucket, span, site, scheme, kind, value)
                   DO UPDATE SET count = dims.count + EXCLUDED.count",
                &[&minute_cut],
            ),
            ("DELETE FROM dims WHERE span = 60 AND bucket < $1", &[&minute_cut]),
            (
                "INSERT INTO overflow SELECT node, bucket - bucket % 3600, 3600, site, scheme, kind, SUM(count)
                   FROM overflow WHERE span = 60 AND bucket < $1
                   GROUP BY node, bucket - bucket % 3600, site, scheme, kind
                   ON CONFLICT (node, bucket, span, site, scheme, kind)
                   DO UPDATE SET count = overflow.count + EXCLUDED.count",
                &[&minute_cut],
            ),
            ("DELETE FROM overflow WHERE span = 60 AND bucket < $1", &[&minute_cut]),
            ("DELETE FROM traffic WHERE bucket < $1", &[&hour_cut]),
            ("DELETE FROM dims WHERE bucket < $1", &[&hour_cut]),
            ("DELETE FROM overflow WHERE bucket < $1", &[&hour_cut]),
            ("DELETE FROM exposures WHERE last_seen < $1", &[&hour_cut]),
        ];
        for (sql, params) in steps {
            tx.execute(sql, params).await.map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    async fn traffic(&self, site: &str, since: Timestamp) -> Result<Vec<TrafficRow>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT scheme, outcome, port, tls, status_class, SUM(count)::BIGINT FROM traffic
                 WHERE site = $1 AND bucket >= $2 GROUP BY scheme, outcome, port, tls, status_class",
                &[&site, &(since as i64)],
            )
            .await
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| {
                let bad =
                    |what, v: String| self.corrupt(what, site, format!("unknown value {v:?}"));
                let (scheme, outcome, tls): (String, String, String) =
                    (r.get(0), r.get(1), r.get(3));
                Ok(TrafficRow {
                    scheme: Scheme::parse(&scheme)
                        .ok_or_else(|| bad("traffic scheme", scheme.clone()))?,
                    outcome: Outcome::parse(&outcome)
                        .ok_or_else(|| bad("traffic outcome", outcome.clone()))?,
                    port: r.get::<_, i32>(2).clamp(0, 65535) as u16,
                    tls: TlsVersion::parse(&tls)
                        .ok_or_else(|| bad("traffic TLS version", tls.clone()))?,
                    status_class: r.get::<_, i32>(4).clamp(0, 9) as u8,
                    count: ts(r.get(5)),
                })
            })
            .collect()
    }

    async fn cleartext_families(
        &self,
        site: &str,
        since: Timestamp,
        span: u64,
    ) -> Result<Vec<FamilyPoint>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT bucket - bucket % $3 AS b, value, SUM(count)::BIGINT FROM dims
                 WHERE site = $1 AND bucket >= $2 AND kind = 'family' AND scheme = 'cleartext'
                 GROUP BY b, value ORDER BY b",
                &[&site, &(since as i64), &(span.max(60) as i64)],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(FamilyPoint::fold(rows.iter().map(|r| {
            let (bucket, family, n): (i64, String, i64) = (r.get(0), r.get(1), r.get(2));
            (ts(bucket), family, ts(n))
        })))
    }

    async fn series(
        &self,
        site: &str,
        since: Timestamp,
        span: u64,
    ) -> Result<Vec<SeriesPoint>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT bucket - bucket % $3 AS b, scheme, SUM(count)::BIGINT FROM traffic
                 WHERE site = $1 AND bucket >= $2 AND outcome = 'response' GROUP BY b, scheme ORDER BY b",
                &[&site, &(since as i64), &(span.max(60) as i64)],
            )
            .await
            .map_err(|e| self.err(e))?;
        let mut out: Vec<SeriesPoint> = Vec::new();
        for r in rows {
            let (bucket, scheme, n): (i64, String, i64) = (r.get(0), r.get(1), r.get(2));
            let bucket = ts(bucket);
            if out.last().is_none_or(|p| p.bucket != bucket) {
                out.push(SeriesPoint {
                    bucket,
                    tls: 0,
                    cleartext: 0,
                });
            }
            if let Some(p) = out.last_mut() {
                match Scheme::parse(&scheme) {
                    Some(Scheme::Tls | Scheme::H3) => p.tls += ts(n),
                    Some(Scheme::Cleartext) => p.cleartext += ts(n),
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

    async fn dims(
        &self,
        site: &str,
        since: Timestamp,
        scheme: Option<Scheme>,
        kind: DimKind,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT value, SUM(count)::BIGINT AS n FROM dims
                 WHERE site = $1 AND bucket >= $2 AND kind = $3 AND ($4::TEXT IS NULL OR scheme = $4)
                 GROUP BY value ORDER BY n DESC, value",
                &[&site, &(since as i64), &kind.as_str(), &scheme.map(Scheme::as_str)],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(rows.iter().map(|r| (r.get(0), ts(r.get(1)))).collect())
    }

    async fn overflow(
        &self,
        site: &str,
        since: Timestamp,
        scheme: Option<Scheme>,
        kind: DimKind,
    ) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one(
                "SELECT COALESCE(SUM(count), 0)::BIGINT FROM overflow
                 WHERE site = $1 AND bucket >= $2 AND kind = $3 AND ($4::TEXT IS NULL OR scheme = $4)",
                &[&site, &(since as i64), &kind.as_str(), &scheme.map(Scheme::as_str)],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(ts(row.get(0)))
    }

    async fn exposures(
        &self,
        site: &str,
        since: Timestamp,
    ) -> Result<Vec<ExposureRow>, StoreError> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT fingerprint, kind, name, first_seen, last_seen, count, network, family, path
                 FROM exposures WHERE site = $1 AND last_seen >= $2
                 ORDER BY last_seen DESC, fingerprint",
                &[&site, &(since as i64)],
            )
            .await
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| {
                let fingerprint: String = r.get(0);
                let family: String = r.get(7);
                let family = ClientFamily::parse(&family).ok_or_else(|| {
                    self.corrupt(
                        "exposure family",
                        &fingerprint,
                        format!("unknown value {family:?}"),
                    )
                })?;
                Ok(ExposureRow {
                    site: site.to_owned(),
                    kind: r.get(1),
                    name: r.get(2),
                    first_seen: ts(r.get(3)),
                    last_seen: ts(r.get(4)),
                    count: ts(r.get(5)),
                    network: r.get(6),
                    family,
                    path: r.get(8),
                    fingerprint,
                })
            })
            .collect()
    }
}
