//! Routes of the admin API: the router, with the JSON handlers over [`super::service`] and the
//! root's [`super::Control`], and the dashboard's pages mounted beside them. `ROUTES` lists
//! every route for the OpenAPI document's test. Handlers never touch the edge, the firewall or
//! a file: they read through `Control` and the stores, and ask `Control` for every change.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::service::{apply_change, drop_site_overrides, site_view, Change, Refused, SiteView};
use super::{Ctx, Role};
use crate::analytics::impact;
use crate::store::AuditEntry;

/// Every route: method and path (axum syntax). The OpenAPI document must list exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/api/openapi.json"),
    ("GET", "/api/sites"),
    ("GET", "/api/sites/{host}"),
    ("PATCH", "/api/sites/{host}"),
    ("GET", "/api/sites/{host}/traffic"),
    ("GET", "/api/sites/{host}/impact"),
    ("GET", "/api/sites/{host}/exposures"),
    ("GET", "/api/pools"),
    ("GET", "/api/certs"),
    ("GET", "/api/nodes"),
    ("GET", "/api/audit"),
    ("GET", "/api/exposure-events"),
    ("POST", "/api/sites/{host}/stage"),
    ("DELETE", "/api/sites/{host}/overrides"),
];

/// The OpenAPI 3.1 document served at `/api/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

pub(crate) fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/api/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .route("/api/sites", get(sites))
        .route("/api/sites/{host}", get(site).patch(change))
        .route("/api/sites/{host}/traffic", get(traffic))
        .route("/api/sites/{host}/impact", get(site_impact))
        .route("/api/sites/{host}/exposures", get(exposures))
        .route("/api/pools", get(pools))
        .route(
            "/api/certs",
            get(|State(ctx): State<Arc<Ctx>>| async move { Json(ctx.control.certs()) }),
        )
        .route("/api/nodes", get(nodes))
        .route("/api/audit", get(audit))
        .route("/api/exposure-events", get(exposure_events))
        .route("/api/sites/{host}/stage", axum::routing::post(stage_change))
        .route(
            "/api/sites/{host}/overrides",
            axum::routing::delete(drop_overrides),
        )
        .route("/", get(super::pages::overview))
        .route(
            "/login",
            get(super::pages::login_form).post(super::pages::login),
        )
        .route("/logout", axum::routing::post(super::pages::logout))
        .route("/ui/site/{host}", get(super::pages::site))
        .route("/ui/site/{host}/confirm", get(super::pages::confirm))
        .route(
            "/ui/site/{host}/mode",
            axum::routing::post(super::pages::set_mode),
        )
        .route("/ui/audit", get(super::pages::audit))
        .layer(middleware::from_fn_with_state(
            ctx.clone(),
            super::auth::check,
        ))
        .with_state(ctx)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// An error answer: small enough to travel in a `Result`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

async fn readyz(State(ctx): State<Arc<Ctx>>) -> Json<Value> {
    Json(json!({
        "ready": true,
        "generation": ctx.control.generation(),
        "sites": ctx.control.config().sites.len(),
        "store": if ctx.control.store_up() { "up" } else { "down" },
    }))
}

async fn metrics(State(ctx): State<Arc<Ctx>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ctx.control.metrics(),
    )
        .into_response()
}

async fn sites(State(ctx): State<Arc<Ctx>>) -> Json<Vec<SiteView>> {
    let hosts: Vec<String> = ctx
        .control
        .config()
        .sites
        .iter()
        .map(|s| s.host.to_string())
        .collect();
    let mut views = Vec::with_capacity(hosts.len());
    for h in &hosts {
        views.extend(site_view(&ctx, h).await);
    }
    Json(views)
}

async fn site(State(ctx): State<Arc<Ctx>>, Path(host): Path<String>) -> Response {
    match site_view(&ctx, &host.to_ascii_lowercase()).await {
        Some(v) => Json(v).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no site {host:?}")),
    }
}

async fn change(
    State(ctx): State<Arc<Ctx>>,
    Extension(role): Extension<Role>,
    Path(host): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let change: Change = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body: {e}; send JSON like {{\"cleartext\": \"reject\"}}"),
            )
        }
    };
    changed(
        apply_change(&ctx, role, &host.to_ascii_lowercase(), change).await,
        "the change breaks the config; nothing was applied",
    )
}

/// The answer to a change: the site after it, or why it was refused (422 with the validator's
/// problems, under `invalid`).
fn changed(result: Result<Option<SiteView>, Refused>, invalid: &str) -> Response {
    match result {
        Ok(after) => Json(after).into_response(),
        Err(Refused::Invalid(problems)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "error": invalid, "problems": problems })),
        )
            .into_response(),
        Err(Refused::Other(status, message)) => error(status, message),
    }
}

async fn drop_overrides(
    State(ctx): State<Arc<Ctx>>,
    Extension(role): Extension<Role>,
    Path(host): Path<String>,
) -> Response {
    changed(
        drop_site_overrides(&ctx, role, &host.to_ascii_lowercase()).await,
        "without its overrides the config breaks; nothing was applied",
    )
}

async fn nodes(State(ctx): State<Arc<Ctx>>) -> Result<Json<Value>, ApiError> {
    let nodes = ctx.control.store().nodes().await.map_err(unavailable)?;
    let now = crate::clock::now();
    let rows: Vec<Value> = nodes
        .iter()
        .map(|n| {
            let mut v = json!(n);
            v["alive"] =
                json!(now.saturating_sub(n.last_heartbeat) <= super::service::NODE_SILENCE);
            v["this_node"] = json!(n.name == ctx.control.node());
            v
        })
        .collect();
    Ok(Json(Value::Array(rows)))
}

async fn audit(State(ctx): State<Arc<Ctx>>) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    ctx.control
        .store()
        .audit()
        .await
        .map(Json)
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
}

#[derive(Deserialize)]
struct Window {
    since: Option<String>,
}

fn since(w: &Window, default: u64) -> Result<u64, ApiError> {
    let now = crate::clock::now();
    match &w.since {
        None => Ok(now.saturating_sub(default)),
        Some(s) => humantime::parse_duration(s)
            .map(|d| now.saturating_sub(d.as_secs()))
            .map_err(|e| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("since={s:?}: {e}; write it like 24h or 7d"),
                )
            }),
    }
}

fn unavailable(e: crate::store::StoreError) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

fn known(ctx: &Ctx, host: &str) -> Result<(), ApiError> {
    let found = ctx
        .control
        .config()
        .sites
        .iter()
        .any(|s| s.host.to_string() == host);
    if found {
        Ok(())
    } else {
        Err(ApiError(StatusCode::NOT_FOUND, format!("no site {host:?}")))
    }
}

/// A series' bucket size: `minute`, `hour`, or a duration (`10m`, `6h`, `1d`), a whole number
/// of minutes up to a week.
pub(crate) fn resolution(r: Option<&str>) -> Result<u64, String> {
    let secs = match r {
        None | Some("minute") => 60,
        Some("hour") => 3600,
        Some(other) => humantime::parse_duration(other)
            .map_err(|e| {
                format!("resolution={other:?}: {e}; use minute, hour or a duration like 10m or 6h")
            })?
            .as_secs(),
    };
    if secs < 60 || secs % 60 != 0 || secs > 7 * 86_400 {
        return Err(format!(
            "resolution of {secs} s: use a whole number of minutes, from 1 minute to 7 days"
        ));
    }
    Ok(secs)
}

#[derive(Deserialize)]
struct SeriesQuery {
    since: Option<String>,
    resolution: Option<String>,
    format: Option<String>,
}

async fn traffic(
    State(ctx): State<Arc<Ctx>>,
    Path(host): Path<String>,
    Query(q): Query<SeriesQuery>,
) -> Result<Response, ApiError> {
    let host = host.to_ascii_lowercase();
    let span =
        resolution(q.resolution.as_deref()).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let csv = match q.format.as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("format={other:?}: use json or csv"),
            ))
        }
    };
    known(&ctx, &host)?;
    let w = Window { since: q.since };
    let since = since(&w, 86_400)?;
    let points = super::service::traffic_series(&ctx, &host, since, span)
        .await
        .map_err(unavailable)?;
    if csv {
        let mut out = String::from(
            "bucket,utc,tls,cleartext,tls_percent,cleartext_likely_human,cleartext_likely_automated\n",
        );
        for p in &points {
            out.push_str(&format!(
                "{},{},{},{},{},{},{}\n",
                p.bucket,
                crate::clock::iso_utc(p.bucket),
                p.tls,
                p.cleartext,
                p.tls_percent.map_or(String::new(), |v| format!("{v:.3}")),
                p.cleartext_likely_human,
                p.cleartext_likely_automated
            ));
        }
        let name = format!(
            "attachment; filename=\"{}-traffic.csv\"",
            host.replace('*', "_")
        );
        return Ok((
            [
                (
                    axum::http::header::CONTENT_TYPE,
                    "text/csv; charset=utf-8".to_owned(),
                ),
                (axum::http::header::CONTENT_DISPOSITION, name),
            ],
            out,
        )
            .into_response());
    }
    Ok(
        Json(json!({ "site": host, "since": since, "resolution_seconds": span, "points": points }))
            .into_response(),
    )
}

async fn site_impact(
    State(ctx): State<Arc<Ctx>>,
    Path(host): Path<String>,
    Query(w): Query<Window>,
) -> Result<Response, ApiError> {
    let host = host.to_ascii_lowercase();
    known(&ctx, &host)?;
    let readiness = ctx.control.config().readiness.clone();
    let since = since(&w, readiness.window.as_secs())?;
    let now = crate::clock::now();
    let mut report = impact::report(&*ctx.control.store(), &host, since, now, &readiness)
        .await
        .map_err(unavailable)?;
    report.drain = ctx.control.drains().into_iter().find(|d| d.site == host);
    Ok(Json(report).into_response())
}

async fn exposures(
    State(ctx): State<Arc<Ctx>>,
    Path(host): Path<String>,
    Query(w): Query<Window>,
) -> Result<Response, ApiError> {
    let host = host.to_ascii_lowercase();
    known(&ctx, &host)?;
    let since = since(&w, 90 * 86_400)?;
    let rows = ctx
        .control
        .store()
        .exposures(&host, since)
        .await
        .map_err(unavailable)?;
    Ok(Json(rows).into_response())
}

async fn stage_change(
    State(ctx): State<Arc<Ctx>>,
    Extension(role): Extension<Role>,
    Path(host): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let req: super::stage::StageRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                "body: {e}; send JSON like {{\"stage\": \"warn\", \"target_pool\": \"closed\"}}"
            ),
            )
        }
    };
    match super::stage::change_stage(&ctx, role, &host.to_ascii_lowercase(), req).await {
        Ok(plan) => Json(plan).into_response(),
        Err(super::stage::StageRefused::Blocked(reasons)) => (
            StatusCode::CONFLICT,
            Json(json!({ "error": "readiness checks failed; fix them, or send \"force\": true (recorded in the audit log)", "reasons": reasons })),
        )
            .into_response(),
        Err(super::stage::StageRefused::Other(status, message)) => error(status, message),
    }
}

#[derive(Deserialize)]
struct SiteFilter {
    site: Option<String>,
}

async fn exposure_events(
    State(ctx): State<Arc<Ctx>>,
    Query(f): Query<SiteFilter>,
) -> Result<Response, ApiError> {
    let site = f.site.map(|s| s.to_ascii_lowercase());
    let (events, counters) = ctx
        .control
        .store()
        .events(site.as_deref())
        .await
        .map_err(unavailable)?;
    Ok(Json(json!({ "events": events, "counters": counters })).into_response())
}

async fn pools(State(ctx): State<Arc<Ctx>>) -> Json<Value> {
    let config = ctx.control.config();
    let listening = ctx.control.listening().await;
    let pools: Vec<Value> = config
        .pools
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let sockets: Vec<String> = listening
                .iter()
                .filter(|(a, _)| p.addresses.contains(&a.ip()))
                .map(|(a, k)| format!("{a} {k}"))
                .collect();
            let sites: Vec<String> = config
                .sites
                .iter()
                .filter(|s| s.pool == i)
                .map(|s| s.host.to_string())
                .collect();
            json!({
                "name": p.name,
                "closed": p.is_closed(),
                "addresses": p.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "tls_ports": p.tls_ports,
                "cleartext_ports": p.cleartext_ports,
                "http3": p.http3,
                "listening": sockets,
                "sites": sites,
            })
        })
        .collect();
    Json(Value::Array(pools))
}
