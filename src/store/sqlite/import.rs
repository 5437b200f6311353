//! The one-time import of what earlier versions kept beside the store: JSON state files and
//! two SQLite files of their own (the exposure queue and the analytics rollups). Each goes
//! into tables that are still empty, in the transaction that creates the schema.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::{json, sqlite};
use crate::config::Overrides;
use crate::stages::drain::Drain;
use crate::stages::Plans;
use crate::store::{AuditEntry, StoreError};

/// A SQLite file of an earlier version, the schema name it is attached as, and its tables.
struct Legacy {
    file: &'static str,
    schema: &'static str,
    tables: &'static [Table],
}

/// A table copied: its name there, its name here, and the columns selected there.
struct Table {
    there: &'static str,
    here: &'static str,
    columns: &'static str,
}

const DATABASES: &[Legacy] = &[
    Legacy {
        file: "exposure-events.db",
        schema: "legacy_queue",
        tables: &[
            Table {
                there: "events",
                here: "events",
                columns: "id, site, fingerprint, kind, name, policy, first_seen, last_seen, count,
                    network, family, path, state, attempts, next_attempt, last_error, delivered_at,
                    created_at, NULL, NULL",
            },
            Table {
                there: "counters",
                here: "queue_counters",
                columns: "name, count",
            },
        ],
    },
    Legacy {
        file: "analytics.db",
        schema: "legacy_analytics",
        tables: &[
            Table {
                there: "traffic",
                here: "traffic",
                columns: "*",
            },
            Table {
                there: "dims",
                here: "dims",
                columns: "*",
            },
            Table {
                there: "overflow",
                here: "overflow",
                columns: "*",
            },
            Table {
                there: "exposures",
                here: "exposures",
                columns: "site, fingerprint, kind, name, first_seen, last_seen, count, network,
                    family, path",
            },
            Table {
                there: "counters",
                here: "rollup_counters",
                columns: "name, count",
            },
        ],
    },
];

/// The earlier databases found in the state directory, attached.
pub(super) struct Attached(Vec<(PathBuf, &'static Legacy)>);

/// Attaches every earlier database found in `state_dir`.
pub(super) fn attach(conn: &Connection, state_dir: &Path) -> Result<Attached, StoreError> {
    let mut found = Vec::new();
    for legacy in DATABASES {
        let path = state_dir.join(legacy.file);
        if !path.exists() {
            continue;
        }
        conn.execute(
            &format!("ATTACH DATABASE ?1 AS {}", legacy.schema),
            params![path.display().to_string()],
        )
        .map_err(|e| StoreError::Import {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        found.push((path, legacy));
    }
    Ok(Attached(found))
}

pub(super) fn detach(conn: &Connection, attached: &Attached) -> rusqlite::Result<()> {
    for (_, legacy) in &attached.0 {
        conn.execute(&format!("DETACH DATABASE {}", legacy.schema), [])?;
    }
    Ok(())
}

/// Copies each attached database into the tables here that are still empty. Returns the
/// files taken, to rename once the transaction is committed.
pub(super) fn databases(
    tx: &Transaction<'_>,
    attached: &Attached,
) -> Result<Vec<PathBuf>, StoreError> {
    let mut taken = Vec::new();
    for (file, legacy) in &attached.0 {
        let schema = legacy.schema;
        let bad = |e: rusqlite::Error| StoreError::Import {
            path: file.display().to_string(),
            reason: e.to_string(),
        };
        for Table {
            there,
            here,
            columns,
        } in legacy.tables
        {
            let present = tx
                .query_row(
                    &format!(
                        "SELECT 1 FROM {schema}.sqlite_master WHERE type = 'table' AND name = ?1"
                    ),
                    params![there],
                    |_| Ok(()),
                )
                .optional()
                .map_err(bad)?
                .is_some();
            let empty = tx
                .query_row(
                    &format!("SELECT 1 FROM main.{here} LIMIT 1"),
                    [],
                    |_| Ok(()),
                )
                .optional()
                .map_err(bad)?
                .is_none();
            if present && empty {
                tx.execute(
                    &format!("INSERT INTO main.{here} SELECT {columns} FROM {schema}.{there}"),
                    [],
                )
                .map_err(bad)?;
            }
        }
        taken.push(file.clone());
    }
    Ok(taken)
}

/// Imports the state files of earlier versions into tables that are still empty. Returns the
/// files taken, to rename once the transaction is committed.
pub(super) fn files(
    tx: &Transaction<'_>,
    state_dir: &Path,
    db: &Path,
) -> Result<Vec<PathBuf>, StoreError> {
    let mut taken = Vec::new();
    let empty = |table: &str| -> Result<bool, StoreError> {
        tx.query_row(&format!("SELECT 1 FROM {table} LIMIT 1"), [], |_| Ok(()))
            .optional()
            .map(|r| r.is_none())
            .map_err(|e| sqlite(db, e))
    };
    let read = |name: &str| -> Result<Option<(PathBuf, String)>, StoreError> {
        let path = state_dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some((path, text))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Import {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
        }
    };
    let bad = |path: &Path, e: &dyn std::fmt::Display| StoreError::Import {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let exec = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> Result<(), StoreError> {
        tx.execute(sql, p).map(|_| ()).map_err(|e| sqlite(db, e))
    };
    if let Some((path, text)) = read("overrides.json")? {
        if empty("overrides")? {
            let o: Overrides = serde_json::from_str(&text).map_err(|e| bad(&path, &e))?;
            for (site, v) in &o {
                exec("INSERT INTO overrides VALUES (?1, ?2)", &[site, &json(v)])?;
            }
        }
        taken.push(path);
    }
    if let Some((path, text)) = read("stages.json")? {
        if empty("stages")? {
            let p: Plans = serde_json::from_str(&text).map_err(|e| bad(&path, &e))?;
            for (site, v) in &p {
                exec("INSERT INTO stages VALUES (?1, ?2)", &[site, &json(v)])?;
            }
        }
        taken.push(path);
    }
    if let Some((path, text)) = read("drains.json")? {
        if empty("drains")? {
            let drains: Vec<Drain> = serde_json::from_str(&text).map_err(|e| bad(&path, &e))?;
            for d in &drains {
                exec(
                    "INSERT INTO drains VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    &[
                        &d.site,
                        &d.from_pool,
                        &d.to_pool,
                        &d.mode.as_str(),
                        &(d.moved_at as i64),
                        &(d.until as i64),
                    ],
                )?;
            }
        }
        taken.push(path);
    }
    if let Some((path, text)) = read("audit.jsonl")? {
        if empty("audit")? {
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let e: AuditEntry = serde_json::from_str(line)
                    .map_err(|e| bad(&path, &format!("line {}: {e}", i + 1)))?;
                exec(
                    "INSERT INTO audit (at, site, entry) VALUES (?1, ?2, ?3)",
                    &[&(e.at as i64), &e.site, &json(&e)],
                )?;
            }
        }
        taken.push(path);
    }
    Ok(taken)
}
