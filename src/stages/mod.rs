//! Staged switch-off: a site moves from open to closed through observe, warn, brownout, move
//! and closed, each step guarded by readiness checks, each reversible.
//!
//! Plans are kept in the store and read by the request path (warn headers, brownout
//! windows) through the edge's snapshot of them. Time comes from [`crate::clock::now`],
//! which tests move forward.

pub mod drain;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::{http_date, Timestamp};

/// The stages, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    #[default]
    Observe,
    Warn,
    Brownout,
    Move,
    Closed,
}

impl Stage {
    pub fn parse(s: &str) -> Option<Stage> {
        Some(match s {
            "observe" => Stage::Observe,
            "warn" => Stage::Warn,
            "brownout" => Stage::Brownout,
            "move" => Stage::Move,
            "closed" => Stage::Closed,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Observe => "observe",
            Stage::Warn => "warn",
            Stage::Brownout => "brownout",
            Stage::Move => "move",
            Stage::Closed => "closed",
        }
    }
}

/// Scheduled windows during which cleartext gets the reject answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Brownout {
    /// First window's start, seconds since the epoch.
    pub start: Timestamp,
    /// Length of each window, seconds.
    pub duration: u64,
    /// Seconds between window starts; 0: one window only.
    pub every: u64,
}

impl Brownout {
    pub fn active(&self, now: Timestamp) -> bool {
        if now < self.start {
            return false;
        }
        let since = now - self.start;
        let offset = if self.every == 0 {
            since
        } else {
            since % self.every
        };
        offset < self.duration
    }
}

/// One site's migration plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Plan {
    pub stage: Stage,
    /// When the site entered its current stage.
    pub since: Timestamp,
    /// When warn started (the `Deprecation` date).
    pub deprecated_at: Option<Timestamp>,
    /// The planned closing date (the `Sunset` date).
    pub sunset: Option<Timestamp>,
    /// Where clients can read about the change (the `Link`).
    pub notice: Option<String>,
    pub brownout: Option<Brownout>,
    /// The closed pool the site moves to.
    pub target_pool: Option<String>,
    /// The open pool and mode it had before the move, for a rollback.
    pub previous_pool: Option<String>,
    pub previous_mode: Option<String>,
    /// Exposures seen up to this time are acknowledged: they no longer block a step.
    pub exposures_acknowledged_at: Option<Timestamp>,
}

/// Plans by site host.
pub type Plans = BTreeMap<String, Plan>;

/// Headers a cleartext answer carries from the warn stage on.
pub fn warn_headers(plan: &Plan) -> Vec<(&'static str, String)> {
    if plan.stage < Stage::Warn {
        return Vec::new();
    }
    let mut h = vec![(
        "deprecation",
        format!("@{}", plan.deprecated_at.unwrap_or(plan.since)),
    )];
    if let Some(s) = plan.sunset {
        h.push(("sunset", http_date(s)));
    }
    if let Some(n) = &plan.notice {
        h.push((
            "link",
            format!("<{n}>; rel=\"deprecation\", <{n}>; rel=\"sunset\""),
        ));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brownout_windows_recur() {
        let b = Brownout {
            start: 1000,
            duration: 60,
            every: 3600,
        };
        assert!(!b.active(999));
        assert!(b.active(1000));
        assert!(b.active(1059));
        assert!(!b.active(1060));
        assert!(b.active(1000 + 3600 + 30));
        let once = Brownout {
            start: 1000,
            duration: 60,
            every: 0,
        };
        assert!(!once.active(1000 + 3600 + 30));
    }
}
