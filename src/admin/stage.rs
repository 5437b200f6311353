//! Stage changes through the admin plane: readiness gates, `force`, the move and its rollback,
//! and the audit trail. Plans are kept and applied by the root (`Control::set_stages`); this
//! file never writes them itself.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::service::{append_audit, apply_change, site_view, Change, Refused};
use super::{Ctx, Role};
use crate::analytics::impact;
use crate::https::HttpsError;
use crate::stages::{self, Brownout, Plan, Stage};
use crate::store::{AuditEntry, AuditEvent, StageStep};

/// Exposures newer than this block a step unless acknowledged.
const EXPOSURE_WINDOW: u64 = 24 * 3600;

/// A stage change, and plan settings to update with it.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StageRequest {
    /// The stage to go to; absent: only update the settings.
    pub(crate) stage: Option<String>,
    #[serde(default)]
    pub(crate) force: bool,
    pub(crate) target_pool: Option<String>,
    /// The planned closing date, seconds since the epoch.
    pub(crate) sunset: Option<u64>,
    pub(crate) notice: Option<String>,
    pub(crate) brownout: Option<Brownout>,
    /// Acknowledge the exposures seen so far, so they no longer block a step.
    #[serde(default)]
    pub(crate) acknowledge_exposures: bool,
}

/// Why a stage change did not happen.
pub(crate) enum StageRefused {
    /// Readiness checks failed; `force` would override them.
    Blocked(Vec<String>),
    Other(StatusCode, String),
}

/// Readiness checks for going to `to`. Empty: ready.
async fn gates(ctx: &Ctx, host: &str, plan: &Plan, to: Stage) -> Vec<String> {
    let mut reasons = Vec::new();
    let config = ctx.control.config();
    // 1. A live TLS probe through the closed pool the site moves to, certificate verified.
    match plan
        .target_pool
        .as_deref()
        .and_then(|t| config.pools.iter().find(|p| p.name == t))
    {
        None => reasons.push("no target closed pool: set target_pool".to_owned()),
        Some(p) if !p.is_closed() => reasons.push(format!(
            "target pool {:?} has cleartext ports: it is not closed",
            p.name
        )),
        Some(p) => {
            if let Err(e) = self_probe(ctx, host, p).await {
                reasons.push(format!(
                    "TLS self-probe through pool {:?} failed: {e}",
                    p.name
                ));
            }
        }
    }
    let now = crate::clock::now();
    let store = ctx.control.store();
    // 2. The cleartext share, for the steps that take cleartext away for good.
    if to >= Stage::Move {
        let since = now.saturating_sub(config.readiness.window.as_secs());
        match impact::report(&*store, host, since, now, &config.readiness).await {
            Ok(r) if r.cleartext_percent > config.readiness.max_cleartext_percent => {
                reasons.push(format!(
                    "{:.3}% of requests used cleartext over the last {} days; the threshold is {}%",
                    r.cleartext_percent,
                    config.readiness.window.as_secs() / 86_400,
                    config.readiness.max_cleartext_percent
                ))
            }
            Ok(r) if r.requests > 0 => {}
            _ => reasons.push("no traffic recorded yet: nothing to base the step on".to_owned()),
        }
    }
    // 3. No fresh exposure, unless acknowledged, from brownout on.
    if to >= Stage::Brownout {
        let since = now
            .saturating_sub(EXPOSURE_WINDOW)
            .max(plan.exposures_acknowledged_at.unwrap_or(0) + 1);
        let fresh = store.exposures(host, since).await.map_or(0, |e| e.len());
        if fresh > 0 {
            reasons.push(format!(
                "{fresh} credential(s) seen in cleartext in the last 24 hours and not acknowledged: rotate them, then acknowledge"
            ));
        }
    }
    reasons
}

/// A TLS handshake with certificate verification and one request through `pool`'s first
/// address and TLS port, with the site's name.
async fn self_probe(ctx: &Ctx, host: &str, pool: &crate::config::Pool) -> Result<(), String> {
    let addr = pool.addresses.first().ok_or("the pool has no address")?;
    let port = pool.redirect_port();
    let name = match host.strip_prefix("*.") {
        Some(suffix) => format!("portcullis-probe.{suffix}"),
        None => host.to_owned(),
    };
    let dev =
        crate::tls::load_certs(&crate::tls::DevCa::cert_path(&ctx.state_dir)).unwrap_or_default();
    let cfg = crate::tls::client_config(&dev).map_err(|e| e.to_string())?;
    let req = http::Request::get("/")
        .header(http::header::HOST, &name)
        .header(http::header::USER_AGENT, "portcullis-readiness-probe")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let work = crate::https::request((*addr, port), &name, Arc::new(cfg), req);
    match tokio::time::timeout(Duration::from_secs(5), work).await {
        Err(_) => Err("timed out".to_owned()),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(HttpsError::Connect(e))) => Err(format!("connect {addr}:{port}: {e}")),
        Ok(Err(HttpsError::Handshake(e))) => Err(format!("TLS to {addr}:{port}: {e}")),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

/// Applies a stage change (or just settings): gates, the move or its rollback, saving,
/// routing, audit.
pub(crate) async fn change_stage(
    ctx: &Ctx,
    role: Role,
    host: &str,
    req: StageRequest,
) -> Result<Plan, StageRefused> {
    let _serial = ctx.changes.lock().await;
    let Some(view) = site_view(ctx, host).await else {
        return Err(StageRefused::Other(
            StatusCode::NOT_FOUND,
            format!("no site {host:?}"),
        ));
    };
    let to = match req.stage.as_deref() {
        None => None,
        Some(s) => Some(Stage::parse(s).ok_or_else(|| {
            StageRefused::Other(
                StatusCode::BAD_REQUEST,
                format!("stage {s:?}: use observe, warn, brownout, move or closed"),
            )
        })?),
    };
    let plans = (*ctx.control.stages()).clone();
    let before = plans.get(host).cloned().unwrap_or_else(|| Plan {
        since: crate::clock::now(),
        ..Plan::default()
    });
    let mut plan = before.clone();
    if let Some(t) = &req.target_pool {
        plan.target_pool = Some(t.clone());
    }
    if req.sunset.is_some() {
        plan.sunset = req.sunset;
    }
    if req.notice.is_some() {
        plan.notice = req.notice.clone();
    }
    if req.brownout.is_some() {
        plan.brownout = req.brownout;
    }
    if req.acknowledge_exposures {
        plan.exposures_acknowledged_at = Some(crate::clock::now());
    }
    let mut reasons = Vec::new();
    let mut plans = plans;
    if plan.target_pool != before.target_pool {
        // Serve the site over TLS on its new pool first: the self-probe goes through it.
        let mut warmed = plans.clone();
        let mut settings = before.clone();
        settings.target_pool = plan.target_pool.clone();
        warmed.insert(host.to_owned(), settings);
        ctx.control
            .set_stages(warmed.clone())
            .await
            .map_err(|e| StageRefused::Other(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        plans = warmed;
    }
    let to = to.unwrap_or(plan.stage);
    if to > plan.stage {
        reasons = gates(ctx, host, &plan, to).await;
        if !reasons.is_empty() && !req.force {
            return Err(StageRefused::Blocked(reasons));
        }
    }
    // Crossing the move changes the site's pool, through the same path as an API change.
    let pool_change = if to >= Stage::Move && plan.stage < Stage::Move {
        let Some(target) = plan.target_pool.clone() else {
            return Err(StageRefused::Other(
                StatusCode::CONFLICT,
                "moving needs target_pool".into(),
            ));
        };
        plan.previous_pool = Some(view.pool.clone());
        plan.previous_mode = Some(view.cleartext.to_owned());
        Some(Change {
            pool: Some(target),
            cleartext: Some("closed".into()),
            ..Change::default()
        })
    } else if to < Stage::Move && plan.stage >= Stage::Move {
        Some(Change {
            pool: plan.previous_pool.clone(),
            cleartext: plan.previous_mode.clone(),
            ..Change::default()
        })
    } else {
        None
    };
    // apply_change takes the same lock.
    drop(_serial);
    if let Some(change) = pool_change {
        apply_change(ctx, role, host, change)
            .await
            .map_err(refused)?;
    }
    finish(ctx, role, host, plans, before, plan, to, req.force, reasons).await
}

fn refused(r: Refused) -> StageRefused {
    match r {
        Refused::Invalid(p) => StageRefused::Other(StatusCode::UNPROCESSABLE_ENTITY, p.join("; ")),
        Refused::Other(s, m) => StageRefused::Other(s, m),
    }
}

#[allow(clippy::too_many_arguments)]
async fn finish(
    ctx: &Ctx,
    role: Role,
    host: &str,
    mut plans: stages::Plans,
    before: Plan,
    mut plan: Plan,
    to: Stage,
    forced: bool,
    reasons: Vec<String>,
) -> Result<Plan, StageRefused> {
    if to != plan.stage {
        plan.stage = to;
        plan.since = crate::clock::now();
    }
    if plan.stage >= Stage::Warn && plan.deprecated_at.is_none() {
        plan.deprecated_at = Some(crate::clock::now());
    }
    if plan.stage < Stage::Warn {
        plan.deprecated_at = None;
    }
    plans.insert(host.to_owned(), plan.clone());
    ctx.control.set_stages(plans).await.map_err(|e| {
        StageRefused::Other(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot apply the plan: {e}"),
        )
    })?;
    let entry = AuditEntry {
        at: crate::clock::now(),
        who: role.as_str().to_owned(),
        node: Some(ctx.control.node().to_owned()),
        site: host.to_owned(),
        event: AuditEvent::Stage {
            stage: StageStep {
                from: before.stage,
                to: plan.stage,
            },
            forced: forced && !reasons.is_empty(),
            overridden_checks: if forced { reasons } else { Vec::new() },
            before: Box::new(before),
            after: Box::new(plan.clone()),
        },
    };
    append_audit(ctx, &entry).await;
    Ok(plan)
}
