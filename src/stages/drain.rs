//! Safe moves: when a site moves from an open pool to a closed one, clients and resolvers still
//! hold the old DNS answers for up to a TTL. Until then the old addresses keep serving the site
//! as before (TLS, and cleartext in its previous mode); after that deadline cleartext there gets
//! the reject answer, while TLS keeps working for stragglers.
//!
//! Drains are computed on every apply by comparing the old and new configs, and kept in the
//! store so a restart in the middle of one keeps its deadline. This file is pure: it computes
//! drains and never reads or writes them.

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::config::{CleartextMode, Config};

/// One site still reachable on the pool it moved away from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// The site's host pattern, as configured.
    pub site: String,
    /// The open pool the site left.
    pub from_pool: String,
    /// The closed pool it moved to.
    pub to_pool: String,
    /// Its cleartext mode before the move.
    pub mode: CleartextMode,
    pub moved_at: Timestamp,
    /// Move time plus the TTL of the old answers: from then on cleartext gets the reject answer.
    pub until: Timestamp,
}

impl Drain {
    /// The cleartext mode on the old pool at `now`.
    pub fn mode_at(&self, now: Timestamp) -> CleartextMode {
        if now < self.until {
            self.mode
        } else {
            CleartextMode::Reject
        }
    }
}

/// The drains that hold for `new`: those carried over from `kept` whose site still sits on
/// the same closed pool with the old pool still open, plus one per site that moved from an open
/// pool (in `old`) to a closed one (in `new`) now.
pub fn reconcile(
    old: Option<&Config>,
    new: &Config,
    kept: &[Drain],
    now: Timestamp,
    ttl: u32,
) -> Vec<Drain> {
    // Each site's pool and mode by host: one pass per config, so a reload of many sites
    // stays linear.
    let by_host = |c: &Config| -> std::collections::HashMap<String, (usize, CleartextMode)> {
        c.sites
            .iter()
            .map(|s| (s.host.to_string(), (s.pool, s.cleartext)))
            .collect()
    };
    let new_sites = by_host(new);
    let still_open = |name: &str| new.pools.iter().any(|p| p.name == name && !p.is_closed());
    let mut out: Vec<Drain> = kept
        .iter()
        .filter(|d| {
            new_sites.get(&d.site).is_some_and(|&(p, _)| {
                let p = &new.pools[p];
                p.name == d.to_pool && p.is_closed()
            }) && still_open(&d.from_pool)
        })
        .cloned()
        .collect();
    let Some(old) = old else {
        return out;
    };
    let old_sites = by_host(old);
    for site in &new.sites {
        let host = site.host.to_string();
        let to = &new.pools[site.pool];
        let Some(&(from, mode)) = old_sites.get(&host) else {
            continue;
        };
        let from = &old.pools[from];
        if from.name != to.name && !from.is_closed() && to.is_closed() && still_open(&from.name) {
            out.retain(|d| d.site != host);
            out.push(Drain {
                site: host,
                from_pool: from.name.clone(),
                to_pool: to.name.clone(),
                mode,
                moved_at: now,
                until: now + u64::from(ttl),
            });
        }
    }
    out
}
