//! The storage seam: everything that must survive a restart (and, later, be shared by a fleet
//! of nodes): site overrides made through the admin plane, staged switch-off plans, drains,
//! the audit log of every change, the exposure queue and the analytics rollups.
//!
//! [`PolicyStore`] is the contract; [`sqlite::SqliteStore`] the embedded implementation (one
//! database file in the state directory, `portcullis.db`). Records are typed, and every write
//! is one transaction: a reader sees the state before it or after it, never half of it. The
//! contract tests in `tests/store.rs` run against the trait, so a second backend runs the same
//! ones. This module never reaches into a plane (edge, DNS, admin): they come to it.
//!
//! [`EventQueue`] is the durable queue of exposure events waiting for their webhook, with
//! their delivery state; [`Rollups`] the analytics counts and exposure records; [`CertStore`]
//! the ACME state a fleet shares. [`Store`] is all four, as the composition root opens it.

pub mod certs;
pub mod postgres;
pub mod rollups;
pub mod sqlite;

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::config::Overrides;
use crate::stages::drain::Drain;
use crate::stages::{Plan, Plans, Stage};

pub use certs::{CertStore, OrderClaim, PendingChallenge, StoredCert};
pub use postgres::{PgSettings, PgStore};
pub use rollups::{
    DimCount, ExposureRow, FamilyPoint, OverflowCount, RollupBatch, Rollups, SeriesPoint,
    TrafficCount, TrafficRow,
};
pub use sqlite::SqliteStore;

/// Everything the running program keeps: the policy, the exposure queue, the rollups and the
/// ACME state.
pub trait Store: PolicyStore + EventQueue + Rollups + CertStore {}

impl<T: PolicyStore + EventQueue + Rollups + CertStore> Store for T {}

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
    /// The PostgreSQL store could not be reached, or refused a query. `db` is `host:port/name`:
    /// never the password.
    #[error("state store {db}: {reason}")]
    Postgres { db: String, reason: String },
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

/// A node of the fleet as its heartbeats describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// The portcullis version it runs.
    pub version: String,
    /// The config generation it has applied (counts applies since its start).
    pub generation: u64,
    pub started_at: Timestamp,
    pub last_heartbeat: Timestamp,
}

/// One change, who made it and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: Timestamp,
    /// The role of the token that made it (`admin`).
    pub who: String,
    /// The node whose admin plane took the change (`[node] name`); absent in entries written
    /// before fleets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
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
    /// A number that grows with every write of overrides, plans or drains (in the same
    /// transaction), so a node polling it learns that the shared policy changed.
    async fn generation(&self) -> Result<u64, StoreError>;
    /// A wake-up for the follower, woken when another node may have moved the generation
    /// (PostgreSQL's LISTEN/NOTIFY). Only a hint: lost while disconnected, so the generation is
    /// still polled. Each call starts a listener, which ends when the `Notify` is dropped.
    fn wake_ups(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }
    /// Records that `node` is alive, with what it runs (one row per node name).
    async fn heartbeat(&self, node: &NodeInfo) -> Result<(), StoreError>;
    /// Every node that ever sent a heartbeat, by name.
    async fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError>;
    /// The audit log, oldest first.
    async fn audit(&self) -> Result<Vec<AuditEntry>, StoreError>;
}

/// Where an exposure event stands with its webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Waiting for its first or next attempt.
    Pending,
    /// The webhook answered 2xx.
    Delivered,
    /// Every attempt failed; no more are made.
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryState> {
        Some(match s {
            "pending" => DeliveryState::Pending,
            "delivered" => DeliveryState::Delivered,
            "failed" => DeliveryState::Failed,
            _ => return None,
        })
    }
}

impl std::fmt::Display for DeliveryState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, so column widths in `portcullis exposures` apply.
        f.pad(self.as_str())
    }
}

impl PartialEq<&str> for DeliveryState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A credential seen in cleartext for the first time at a site: the event to deliver. Carries
/// the keyed fingerprint only, never the credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    pub id: String,
    pub site: String,
    pub fingerprint: String,
    pub kind: String,
    /// The header, cookie, parameter or field name it was found in.
    pub name: String,
    /// `notify` or `revoke`.
    pub policy: String,
    pub at: Timestamp,
    pub network: String,
    pub family: String,
    pub path: String,
}

/// More sightings of a credential that already has an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repeat {
    pub site: String,
    pub fingerprint: String,
    pub count: u64,
    pub last_seen: Timestamp,
}

/// Counts of events not created, by reason, plus repeats folded into existing events.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueCounters {
    pub coalesced: u64,
    pub dropped_site_rate: u64,
    pub dropped_network_rate: u64,
    pub dropped_queue_full: u64,
}

impl QueueCounters {
    pub fn add(&mut self, other: &QueueCounters) {
        self.coalesced += other.coalesced;
        self.dropped_site_rate += other.dropped_site_rate;
        self.dropped_network_rate += other.dropped_network_rate;
        self.dropped_queue_full += other.dropped_queue_full;
    }
}

/// One event of the queue, as the API, the dashboard and `portcullis exposures` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueuedEvent {
    pub id: String,
    pub site: String,
    pub fingerprint: String,
    pub kind: String,
    pub name: String,
    pub policy: String,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
    pub count: u64,
    pub network: String,
    pub family: String,
    pub state: DeliveryState,
    pub attempts: u32,
    pub next_attempt: Timestamp,
    pub last_error: Option<String>,
    pub delivered_at: Option<Timestamp>,
}

/// The outcome of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub id: String,
    pub state: DeliveryState,
    /// Attempts made so far, this one included.
    pub attempts: u32,
    /// When to try again (pending only).
    pub next_attempt: Timestamp,
    pub error: Option<String>,
    pub at: Timestamp,
}

/// The durable queue of exposure events. One event per (site, fingerprint).
#[async_trait::async_trait]
pub trait EventQueue: Send + Sync {
    /// Adds new events (one already there for the same site and fingerprint is kept), folds
    /// repeats into their events and adds to the counters, all in one transaction.
    async fn enqueue(
        &self,
        new: &[NewEvent],
        repeats: &[Repeat],
        counters: &QueueCounters,
    ) -> Result<(), StoreError>;
    /// Every (site, fingerprint) with an event, and how many events are pending.
    async fn known(&self) -> Result<(HashSet<(String, String)>, u32), StoreError>;
    /// Claims pending events whose next attempt is due at `now` and that no one holds, soonest
    /// first, at most `limit`: each is leased to `holder` until `now + lease` seconds, so no
    /// other node takes it meanwhile. A holder that dies leaves the lease to run out, and the
    /// event is claimed again after it.
    async fn claim(
        &self,
        now: Timestamp,
        limit: u32,
        lease: u64,
        holder: &str,
    ) -> Result<Vec<QueuedEvent>, StoreError>;
    /// Records an attempt's outcome, ending the lease.
    async fn record(&self, attempt: &Attempt) -> Result<(), StoreError>;
    /// Events (of one site, or all), newest first, with the counters.
    async fn events(
        &self,
        site: Option<&str>,
    ) -> Result<(Vec<QueuedEvent>, QueueCounters), StoreError>;
}
