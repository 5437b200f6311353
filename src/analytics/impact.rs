//! The impact report: what closing cleartext for one hostname would break, from recorded
//! traffic, with a readiness verdict against configured thresholds.

use std::fmt::Write as _;

use serde::Serialize;

use crate::clock::Timestamp;
use crate::config::Readiness;
use crate::observe::{ClientFamily, DimKind, Outcome, Scheme};
use crate::store::{ExposureRow, Rollups, StoreError};

/// Rows shown per breakdown.
const TOP: usize = 10;
/// Most exposed credentials the text report lists one by one.
const MAX_LISTED: usize = 1000;

#[derive(Debug, Clone, Serialize)]
pub struct ImpactReport {
    pub host: String,
    pub since: Timestamp,
    pub window_seconds: u64,
    pub requests: u64,
    pub cleartext_requests: u64,
    /// Cleartext share of all requests, in percent.
    pub cleartext_percent: f64,
    pub networks: u64,
    pub cleartext_networks: u64,
    /// Share of distinct client networks that used cleartext at least once, in percent.
    pub cleartext_networks_percent: f64,
    /// Requests whose network did not fit under the per-minute cap (not in the counts above).
    pub networks_overflow: u64,
    /// Cleartext requests from browsers (likely people).
    pub likely_human: u64,
    /// Cleartext requests from scripts, SDKs, bots, devices or no User-Agent.
    pub likely_automated: u64,
    pub by_family: Vec<Row>,
    pub by_network: Vec<Row>,
    pub by_path: Vec<Row>,
    pub by_port: Vec<Row>,
    /// Distinct credentials seen in cleartext in the window.
    pub exposed_credentials: u64,
    pub exposures: Vec<ExposureRow>,
    /// Set when the site moved from an open pool to a closed one and its old addresses still
    /// serve it: the deadline after which cleartext there gets the reject answer.
    pub drain: Option<crate::stages::drain::Drain>,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub value: String,
    pub requests: u64,
    /// Percent of the site's cleartext requests.
    pub percent: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub ready: bool,
    pub reasons: Vec<String>,
    pub max_cleartext_percent: f64,
    pub max_exposed_credentials: u64,
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// Builds the report for `host` (a configured site name, such as `api.example.com` or
/// `*.example.com`) from `since` on.
pub async fn report(
    store: &dyn Rollups,
    host: &str,
    since: Timestamp,
    now: Timestamp,
    readiness: &Readiness,
) -> Result<ImpactReport, StoreError> {
    let clear = Some(Scheme::Cleartext);
    let traffic = store.traffic(host, since).await?;
    let requests: u64 = traffic.iter().map(|r| r.count).sum();
    let cleartext: Vec<_> = traffic
        .iter()
        .filter(|r| r.scheme == Scheme::Cleartext)
        .collect();
    let cleartext_requests: u64 = cleartext.iter().map(|r| r.count).sum();
    let networks = store.dims(host, since, None, DimKind::Network).await?.len() as u64;
    let clear_networks = store.dims(host, since, clear, DimKind::Network).await?;
    let networks_overflow = store.overflow(host, since, None, DimKind::Network).await?;
    let families = store.dims(host, since, clear, DimKind::Family).await?;
    let paths = store.dims(host, since, clear, DimKind::Path).await?;
    let likely_human: u64 = families
        .iter()
        .filter(|(f, _)| ClientFamily::parse(f).is_some_and(|f| f.likely_human()))
        .map(|(_, n)| n)
        .sum();
    let rows = |v: &[(String, u64)]| -> Vec<Row> {
        v.iter()
            .take(TOP)
            .map(|(value, n)| Row {
                value: value.clone(),
                requests: *n,
                percent: percent(*n, cleartext_requests),
            })
            .collect()
    };
    let mut ports: Vec<(String, u64)> = Vec::new();
    for r in &cleartext {
        let label = match r.outcome {
            Outcome::CleartextOnTlsPort => format!("{} (a TLS port)", r.port),
            Outcome::RefusedByFirewall => "refused by the firewall".to_owned(),
            _ => r.port.to_string(),
        };
        match ports.iter_mut().find(|(p, _)| *p == label) {
            Some((_, n)) => *n += r.count,
            None => ports.push((label, r.count)),
        }
    }
    ports.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let exposures = store.exposures(host, since).await?;
    let exposed_credentials = exposures.len() as u64;
    let cleartext_percent = percent(cleartext_requests, requests);
    let mut reasons = Vec::new();
    if cleartext_percent > readiness.max_cleartext_percent {
        reasons.push(format!(
            "{cleartext_percent:.3}% of requests ({cleartext_requests} of {requests}) used cleartext; the threshold is {}%",
            readiness.max_cleartext_percent
        ));
    }
    if exposed_credentials > readiness.max_exposed_credentials {
        reasons.push(format!(
            "{exposed_credentials} distinct credential(s) were sent in cleartext; rotate them and tell their owners first (threshold {})",
            readiness.max_exposed_credentials
        ));
    }
    if requests == 0 {
        reasons.push("no traffic recorded in the window: nothing to base a verdict on".into());
    }
    Ok(ImpactReport {
        host: host.to_owned(),
        since,
        window_seconds: now.saturating_sub(since),
        requests,
        cleartext_requests,
        cleartext_percent,
        networks,
        cleartext_networks: clear_networks.len() as u64,
        cleartext_networks_percent: percent(clear_networks.len() as u64, networks),
        networks_overflow,
        likely_human,
        likely_automated: cleartext_requests.saturating_sub(likely_human),
        by_family: rows(&families),
        by_network: rows(&clear_networks),
        by_path: rows(&paths),
        by_port: rows(&ports),
        exposed_credentials,
        exposures,
        drain: None,
        verdict: Verdict {
            ready: reasons.is_empty(),
            reasons,
            max_cleartext_percent: readiness.max_cleartext_percent,
            max_exposed_credentials: readiness.max_exposed_credentials,
        },
    })
}

impl ImpactReport {
    /// The report as a readable text table.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "Impact of closing cleartext for {}", self.host);
        let _ = writeln!(
            o,
            "window: the last {}",
            humantime::format_duration(std::time::Duration::from_secs(self.window_seconds))
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "requests            {:>10}   cleartext {:>10}  ({:.3}%)",
            self.requests, self.cleartext_requests, self.cleartext_percent
        );
        let _ = writeln!(
            o,
            "client networks     {:>10}   cleartext {:>10}  ({:.1}%)",
            self.networks, self.cleartext_networks, self.cleartext_networks_percent
        );
        if self.networks_overflow > 0 {
            let _ = writeln!(
                o,
                "  ({} requests came from networks beyond the per-minute cap)",
                self.networks_overflow
            );
        }
        let _ = writeln!(
            o,
            "cleartext by kind   likely human (browsers) {}  ({:.1}%), likely automated {}  ({:.1}%)",
            self.likely_human,
            percent(self.likely_human, self.cleartext_requests),
            self.likely_automated,
            percent(self.likely_automated, self.cleartext_requests)
        );
        for (title, rows) in [
            ("cleartext by client family", &self.by_family),
            ("cleartext by network", &self.by_network),
            ("cleartext by path", &self.by_path),
            ("cleartext by port", &self.by_port),
        ] {
            let _ = writeln!(o, "\n{title}");
            if rows.is_empty() {
                let _ = writeln!(o, "  (none)");
            }
            for r in rows.iter() {
                let _ = writeln!(
                    o,
                    "  {:<40} {:>10}  {:>6.1}%",
                    r.value, r.requests, r.percent
                );
            }
        }
        let _ = writeln!(
            o,
            "\ncredentials exposed in cleartext: {}",
            self.exposed_credentials
        );
        // Every exposed credential must be rotated, so the list is whole: unlike the top
        // lists above it is not cut at TOP (only a flood past MAX_LISTED is).
        for e in self.exposures.iter().take(MAX_LISTED) {
            let _ = writeln!(
                o,
                "  {}  {:<20} {:<20} seen {} time(s), last from {} ({})",
                e.fingerprint,
                e.kind,
                e.name,
                e.count,
                e.network,
                e.family.as_str()
            );
        }
        if self.exposures.len() > MAX_LISTED {
            let _ = writeln!(
                o,
                "  ... and {} more: `--json` lists them all",
                self.exposures.len() - MAX_LISTED
            );
        }
        if let Some(d) = &self.drain {
            let now = self.since + self.window_seconds;
            let left = if d.until > now {
                format!("{} s from now", d.until - now)
            } else {
                "passed".to_owned()
            };
            let _ = writeln!(
                o,
                "\nmoved from pool {:?} to closed pool {:?} at {}: cleartext on the old addresses keeps mode {:?} until {} ({left}), then gets the reject answer; TLS there keeps working",
                d.from_pool, d.to_pool, d.moved_at, d.mode, d.until
            );
        }
        let _ = writeln!(o);
        if self.verdict.ready {
            let _ = writeln!(o, "verdict: READY to close cleartext");
        } else {
            let _ = writeln!(o, "verdict: NOT READY");
            for r in &self.verdict.reasons {
                let _ = writeln!(o, "  - {r}");
            }
        }
        o
    }
}
