//! The storage seam: everything about the running policy that must survive a restart (and,
//! later, be shared by a fleet of nodes): site overrides made through the admin plane, staged
//! switch-off plans, drains, and the audit log of every change.
//!
//! [`PolicyStore`] is the contract; [`sqlite::SqliteStore`] the embedded implementation (one
//! database file in the state directory, `portcullis.db`). Records are typed, and every write
//! is one transaction: a reader sees the state before it or after it, never half of it. The
//! contract tests in `tests/store.rs` run against the trait, so a second backend runs the same
//! ones. This module never reaches into a plane (edge, DNS, admin): they come to it.
//!
//! Still outside the seam, in their own SQLite files: the analytics rollups and exposure
//! records (`analytics.db`) and the exposure delivery queue (`exposure-events.db`).

pub mod sqlite;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::config::Overrides;
use crate::stages::drain::Drain;
use crate::stages::{Plan, Plans, Stage};

pub use sqlite::SqliteStore;

/// Why the store failed. Messages name the database or the file involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be opened, read or written.
    #[error("state store {path}: {source}")]
    Sqlite {
        path: String,
        source: rusqlite::Error,
    },
    /// A record in the database does not decode (written by a newer version, or damaged).
    #[error("state store {path}: {what} of {key:?} does not decode: {reason}")]
    Corrupt {
        path: String,
        what: &'static str,
        key: String,
        reason: String,
    },
    /// A state file of an earlier version could not be imported; it is left in place, and
    /// nothing of it was taken.
    #[error("cannot import {path}: {reason}; fix or remove the file, then start again")]
    Import { path: String, reason: String },
    /// The blocking task running the query was lost (the runtime is shutting down).
    #[error("state store task: {0}")]
    Task(String),
}

/// What a site looked like before or after a change, as the audit log shows it (fields in
/// the order earlier versions wrote them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteState {
    pub cleartext: String,
    pub hsts: Option<String>,
    pub origin: String,
    pub pool: String,
}

/// One stage step in the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageStep {
    pub from: Stage,
    pub to: Stage,
}

/// What an audit entry records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AuditEvent {
    /// A change of a site's mode, pool, origin or HSTS.
    Site {
        /// The change as it was asked for.
        change: serde_json::Value,
        before: SiteState,
        /// `None` if the site is gone after the change.
        after: Option<SiteState>,
    },
    /// A step of a staged switch-off plan.
    Stage {
        stage: StageStep,
        /// Whether failed readiness checks were overridden.
        forced: bool,
        overridden_checks: Vec<String>,
        before: Box<Plan>,
        after: Box<Plan>,
    },
}

/// One change, who made it and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: Timestamp,
    /// The role of the token that made it (`admin`).
    pub who: String,
    pub site: String,
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// The policy state a restart must not lose. Every method is one atomic operation; `set_*`
/// replaces the whole set.
#[async_trait::async_trait]
pub trait PolicyStore: Send + Sync {
    /// Site overrides made through the admin plane, by site host.
    async fn overrides(&self) -> Result<Overrides, StoreError>;
    async fn set_overrides(&self, overrides: &Overrides) -> Result<(), StoreError>;
    /// Staged switch-off plans, by site host.
    async fn stages(&self) -> Result<Plans, StoreError>;
    async fn set_stages(&self, plans: &Plans) -> Result<(), StoreError>;
    /// Sites still served on the open pool they moved away from.
    async fn drains(&self) -> Result<Vec<Drain>, StoreError>;
    async fn set_drains(&self, drains: &[Drain]) -> Result<(), StoreError>;
    /// Appends to the audit log.
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError>;
    /// The audit log, oldest first.
    async fn audit(&self) -> Result<Vec<AuditEntry>, StoreError>;
}
