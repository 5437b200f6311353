//! What the API and the dashboard both do: a site's view (config, traffic share, stage), a
//! change to a site asked of the root through [`super::Control`], and the audit log. Routes
//! and pages call in here; this file calls neither.

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{ControlError, Ctx, Role};
use crate::analytics::impact;
use crate::config::HstsOverride;
use crate::store::{AuditEntry, AuditEvent, SiteState};

#[derive(Serialize)]
pub(crate) struct SiteView {
    pub(crate) host: String,
    pub(crate) pool: String,
    pub(crate) pool_closed: bool,
    pub(crate) addresses: Vec<String>,
    pub(crate) tls_ports: Vec<u16>,
    pub(crate) cleartext_ports: Vec<u16>,
    /// Served over HTTP/3 as well.
    pub(crate) http3: bool,
    pub(crate) cleartext: &'static str,
    pub(crate) origin: String,
    pub(crate) hsts: Option<String>,
    /// Requests in the last 24 hours, and the share over TLS (from the store).
    pub(crate) requests_24h: u64,
    pub(crate) tls_percent_24h: Option<f64>,
    pub(crate) verdict_ready: Option<bool>,
    /// A drain in progress after a move to a closed pool.
    pub(crate) drain: Option<crate::stages::drain::Drain>,
    /// Set by the API (kept in overrides.json), on top of the file.
    pub(crate) overridden: bool,
    /// The staged switch-off plan, if the site has one.
    pub(crate) stage: Option<crate::stages::Plan>,
}

/// A node that missed this many seconds of heartbeats is shown as gone.
pub(crate) const NODE_SILENCE: u64 = 15;

/// One bucket of a site's traffic as the dashboard charts it and the API serves it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub(crate) struct TrafficPoint {
    /// Start of the bucket, seconds since the epoch (UTC).
    pub(crate) bucket: u64,
    pub(crate) tls: u64,
    pub(crate) cleartext: u64,
    /// Share of the bucket's requests served over TLS, in percent; `None` without requests.
    pub(crate) tls_percent: Option<f64>,
    /// Cleartext traffic by client family: browsers, and everything else.
    pub(crate) cleartext_likely_human: u64,
    pub(crate) cleartext_likely_automated: u64,
}

/// A site's traffic per bucket of `span` seconds from `since` on, oldest first: the store's
/// series with its cleartext client families.
pub(crate) async fn traffic_series(
    ctx: &Ctx,
    host: &str,
    since: u64,
    span: u64,
) -> Result<Vec<TrafficPoint>, crate::store::StoreError> {
    let store = ctx.control.store();
    let series = store.series(host, since, span).await?;
    let families = store.cleartext_families(host, since, span).await?;
    let mut out: Vec<TrafficPoint> = series
        .iter()
        .map(|p| TrafficPoint {
            bucket: p.bucket,
            tls: p.tls,
            cleartext: p.cleartext,
            tls_percent: (p.tls + p.cleartext > 0)
                .then(|| p.tls as f64 * 100.0 / (p.tls + p.cleartext) as f64),
            cleartext_likely_human: 0,
            cleartext_likely_automated: 0,
        })
        .collect();
    for f in families {
        if let Ok(i) = out.binary_search_by_key(&f.bucket, |p| p.bucket) {
            out[i].cleartext_likely_human = f.likely_human;
            out[i].cleartext_likely_automated = f.likely_automated;
        }
    }
    Ok(out)
}

pub(crate) async fn site_view(ctx: &Ctx, host: &str) -> Option<SiteView> {
    let c = ctx.control.config();
    let s = c.sites.iter().find(|s| s.host.to_string() == host)?;
    let pool = &c.pools[s.pool];
    let now = crate::clock::now();
    let store = ctx.control.store();
    let report = impact::report(&*store, host, now.saturating_sub(86_400), now, &c.readiness)
        .await
        .ok();
    Some(SiteView {
        host: host.to_owned(),
        pool: pool.name.clone(),
        pool_closed: pool.is_closed(),
        addresses: pool.addresses.iter().map(|a| a.to_string()).collect(),
        tls_ports: pool.tls_ports.clone(),
        cleartext_ports: pool.cleartext_ports.clone(),
        http3: s.http3,
        cleartext: s.cleartext.as_str(),
        origin: s.origin.to_string(),
        hsts: s.hsts.as_ref().map(|h| h.header_value()),
        requests_24h: report.as_ref().map_or(0, |r| r.requests),
        tls_percent_24h: report
            .as_ref()
            .filter(|r| r.requests > 0)
            .map(|r| 100.0 - r.cleartext_percent),
        verdict_ready: report
            .as_ref()
            .filter(|r| r.requests > 0)
            .map(|r| r.verdict.ready),
        drain: ctx.control.drains().into_iter().find(|d| d.site == host),
        overridden: ctx.control.overrides().contains_key(host),
        stage: ctx.control.stages().get(host).cloned(),
    })
}

/// A change to one site; absent fields stay as they are.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Change {
    pub(crate) cleartext: Option<String>,
    pub(crate) pool: Option<String>,
    pub(crate) origin: Option<String>,
    pub(crate) hsts: Option<HstsOverride>,
}

/// Why a change was not applied.
pub(crate) enum Refused {
    /// The validator's problems, one per line.
    Invalid(Vec<String>),
    Other(StatusCode, String),
}

/// Applies one change: overrides updated, config re-validated, applied like a reload,
/// overrides saved, audit entry appended. Shared by the API and the dashboard.
pub(crate) async fn apply_change(
    ctx: &Ctx,
    role: Role,
    host: &str,
    change: Change,
) -> Result<Option<SiteView>, Refused> {
    let _serial = ctx.changes.lock().await;
    let Some(before) = site_view(ctx, host).await else {
        return Err(Refused::Other(
            StatusCode::NOT_FOUND,
            format!("no site {host:?}"),
        ));
    };
    let mut overrides = ctx.control.overrides();
    let entry = overrides.entry(host.to_owned()).or_default();
    if change.cleartext.is_some() {
        entry.cleartext = change.cleartext.clone();
    }
    if change.pool.is_some() {
        entry.pool = change.pool.clone();
    }
    if change.origin.is_some() {
        entry.origin = change.origin.clone();
    }
    if let Some(h) = &change.hsts {
        let cur = entry.hsts.get_or_insert_with(HstsOverride::default);
        cur.enabled = h.enabled.or(cur.enabled);
        cur.max_age = h.max_age.or(cur.max_age);
        cur.include_subdomains = h.include_subdomains.or(cur.include_subdomains);
        cur.preload = h.preload.or(cur.preload);
    }
    let change = serde_json::to_value(&change).unwrap_or_default();
    commit(ctx, role, host, &before, overrides, change).await
}

/// Drops every change made through the admin plane to one site: the file's settings apply
/// again, live, and the drop is audited. A site without overrides is left as it is.
pub(crate) async fn drop_site_overrides(
    ctx: &Ctx,
    role: Role,
    host: &str,
) -> Result<Option<SiteView>, Refused> {
    let _serial = ctx.changes.lock().await;
    let Some(before) = site_view(ctx, host).await else {
        return Err(Refused::Other(
            StatusCode::NOT_FOUND,
            format!("no site {host:?}"),
        ));
    };
    let mut overrides = ctx.control.overrides();
    let Some(dropped) = overrides.remove(host) else {
        return Ok(Some(before));
    };
    let change = serde_json::json!({ "dropped_overrides": dropped });
    commit(ctx, role, host, &before, overrides, change).await
}

/// Asks the root to apply `overrides`, then records `change` with the site's state before and
/// after it. The caller holds `ctx.changes`.
async fn commit(
    ctx: &Ctx,
    role: Role,
    host: &str,
    before: &SiteView,
    overrides: crate::config::Overrides,
    change: serde_json::Value,
) -> Result<Option<SiteView>, Refused> {
    ctx.control
        .apply_overrides(overrides)
        .await
        .map_err(|e| match e {
            ControlError::Invalid(e) => Refused::Invalid(e.lines()),
            e => Refused::Other(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("not applied: {e}"),
            ),
        })?;
    let after = site_view(ctx, host).await;
    let entry = AuditEntry {
        at: crate::clock::now(),
        who: role.as_str().to_owned(),
        node: Some(ctx.control.node().to_owned()),
        site: host.to_owned(),
        event: AuditEvent::Site {
            change,
            before: site_state(before),
            after: after.as_ref().map(site_state),
        },
    };
    append_audit(ctx, &entry).await;
    tracing::info!(site = %host, who = role.as_str(), "site changed through the admin plane");
    Ok(after)
}

fn site_state(v: &SiteView) -> SiteState {
    SiteState {
        pool: v.pool.clone(),
        cleartext: v.cleartext.to_owned(),
        origin: v.origin.clone(),
        hsts: v.hsts.clone(),
    }
}

/// Records a change in the audit log. A change already applied stays applied if the log
/// cannot be written; the failure is logged.
pub(crate) async fn append_audit(ctx: &Ctx, entry: &AuditEntry) {
    if let Err(e) = ctx.control.store().append_audit(entry).await {
        tracing::error!(error = %e, "cannot append to the audit log");
    }
}
