//! The dashboard: server-rendered HTML over the admin API's data, an SVG chart from plotters,
//! no JavaScript needed to read. Login takes the token and sets a `Secure; HttpOnly;
//! SameSite=Strict` session cookie; every change is a POST carrying the session's CSRF token.

use std::sync::Arc;

use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::auth::{session_id, Session, COOKIE, SESSION_LIFETIME};
use super::service::{apply_change, site_view, Change, Refused};
use super::{Ctx, Peer, Role};
use crate::analytics::impact;

fn random_hex(n: usize) -> String {
    crate::hex::random(n)
}

/// Escapes text for HTML bodies and attribute values.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{t} · portcullis</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font-family:system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}}
header{{background:#1b1f24;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.2rem;align-items:center}}
header a{{color:#fff;text-decoration:none}} main{{padding:1.2rem;max-width:72rem}}
table{{border-collapse:collapse;background:#fff;width:100%}} th,td{{text-align:left;padding:.35rem .6rem;border-bottom:1px solid #e3e6ea}}
.bad{{color:#b3261e;font-weight:600}} .good{{color:#1e7b34;font-weight:600}} .muted{{color:#667}}
.card{{background:#fff;padding:1rem;margin:1rem 0;border:1px solid #e3e6ea}} code{{font-size:.9em}}
button{{padding:.3rem .8rem}} .legend i{{display:inline-block;width:.8em;height:.8em;margin:0 .3em 0 1em}}
figure{{margin:0}} figure svg{{width:100%;height:auto}}
</style></head><body><header><strong>portcullis</strong><a href="/">sites</a><a href="/ui/audit">audit log</a>
<form method="post" action="/logout" style="margin-left:auto"><button>log out</button></form></header>
<main><h1>{t}</h1>{body}</main></body></html>"#,
        t = esc(title)
    ))
}

pub(crate) async fn login_form() -> Html<String> {
    Html(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>log in · portcullis</title></head>
<body style="font-family:system-ui,sans-serif;max-width:28rem;margin:4rem auto">
<h1>portcullis</h1><form method="post" action="/login">
<label>Admin token <input type="password" name="token" autocomplete="current-password" autofocus required style="width:100%"></label>
<p><button type="submit">Log in</button></p></form></body></html>"#
            .to_owned(),
    )
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    token: String,
}

pub(crate) async fn login(State(ctx): State<Arc<Ctx>>, req: Request) -> Response {
    let ip = req
        .extensions()
        .get::<Peer>()
        .map(|p| p.0)
        .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    if let Some(wait) = ctx.limited(ip) {
        let mut r = (
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed attempts; try again later\n",
        )
            .into_response();
        if let Ok(v) = HeaderValue::from_str(&wait.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    let Ok(Form(form)) = Form::<LoginForm>::from_request(req, &()).await else {
        return (StatusCode::BAD_REQUEST, "send the form field `token`\n").into_response();
    };
    let Some(role) = ctx.role(form.token.trim()) else {
        ctx.failed(ip);
        return (
            StatusCode::UNAUTHORIZED,
            Html("<p>Wrong token. <a href=\"/login\">Try again</a>.</p>"),
        )
            .into_response();
    };
    let id = random_hex(32);
    let session = Session {
        role,
        csrf: random_hex(16),
        expires: tokio::time::Instant::now() + SESSION_LIFETIME,
    };
    {
        let mut sessions = ctx.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|_, s| s.expires > tokio::time::Instant::now());
        sessions.insert(id.clone(), session);
    }
    let cookie = format!(
        "{COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_LIFETIME.as_secs()
    );
    let mut r = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

use axum::extract::FromRequest;

pub(crate) async fn logout(State(ctx): State<Arc<Ctx>>, headers: HeaderMap) -> Response {
    if let Some(id) = session_id(&headers) {
        ctx.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "portcullis_session=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

pub(crate) async fn overview(State(ctx): State<Arc<Ctx>>) -> Html<String> {
    let hosts: Vec<String> = ctx
        .control
        .config()
        .sites
        .iter()
        .map(|s| s.host.to_string())
        .collect();
    let certs = ctx.control.certs();
    let now = crate::clock::now();
    let mut rows = String::new();
    for h in &hosts {
        let Some(v) = site_view(&ctx, h).await else {
            continue;
        };
        let cert = match certs.iter().find(|c| &c.site == h) {
            None => String::new(),
            Some(c) => {
                let left = c.not_after.map_or(String::new(), |t| {
                    format!(", {} days left", (t as i64 - now as i64) / 86_400)
                });
                let class = if c.source == "development" {
                    "bad"
                } else {
                    "good"
                };
                let error = c.last_error.as_deref().map_or(String::new(), |e| {
                    format!(
                        " <span class=bad title=\"{}\">(last order failed)</span>",
                        esc(e)
                    )
                });
                format!("<span class={class}>{}</span>{left}{error}", c.source)
            }
        };
        let share = v
            .tls_percent_24h
            .map_or("<span class=muted>no traffic</span>".to_owned(), |p| {
                format!("{p:.2}%")
            });
        let verdict = match v.verdict_ready {
            Some(true) => "<span class=good>ready</span>",
            Some(false) => "<span class=bad>not ready</span>",
            None => "<span class=muted>no data</span>",
        };
        rows.push_str(&format!(
            "<tr><td><a href=\"/ui/site/{h}\">{h}</a></td><td>{mode}</td><td>{pool}{closed}</td><td>{req}</td><td>{share}</td><td>{verdict}</td><td class=cert>{cert}</td></tr>",
            h = esc(&v.host),
            mode = v.cleartext,
            pool = esc(&v.pool),
            closed = if v.pool_closed { " (closed)" } else { "" },
            req = v.requests_24h,
        ));
    }
    let mut nodes = String::new();
    if let Ok(list) = ctx.control.store().nodes().await {
        for n in &list {
            let alive = now.saturating_sub(n.last_heartbeat) <= super::service::NODE_SILENCE;
            nodes.push_str(&format!(
                "<tr><td>{name}{this}</td><td class={class}>{state}</td><td>{ago} s ago</td><td>{gen}</td><td>{ver}</td></tr>",
                name = esc(&n.name),
                this = if n.name == ctx.control.node() { " (this node)" } else { "" },
                class = if alive { "good" } else { "bad" },
                state = if alive { "alive" } else { "silent" },
                ago = now.saturating_sub(n.last_heartbeat),
                gen = n.generation,
                ver = esc(&n.version),
            ));
        }
    }
    let nodes = format!(
        "<div class=card id=nodes><h2>Nodes</h2><table><thead><tr><th>node</th><th>state</th><th>last heartbeat</th><th>config generation</th><th>version</th></tr></thead><tbody>{nodes}</tbody></table></div>"
    );
    page(
        "Sites",
        &format!("<table><thead><tr><th>site</th><th>cleartext mode</th><th>pool</th><th>requests, 24 h</th><th>served over TLS, 24 h</th><th>readiness</th><th>certificate</th></tr></thead><tbody>{rows}</tbody></table>{nodes}"),
    )
}

/// TLS against cleartext requests per minute over the last 24 hours, as an SVG.
fn chart(points: &[crate::store::SeriesPoint], from: u64, to: u64) -> String {
    use plotters::prelude::*;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 220)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let max = points
            .iter()
            .map(|p| p.tls.max(p.cleartext))
            .max()
            .unwrap_or(0)
            .max(1);
        let built = ChartBuilder::on(&root)
            .margin(8)
            .build_cartesian_2d(from as f64..to as f64, 0f64..max as f64 * 1.1);
        if let Ok(mut c) = built {
            // No text: the SVG backend has no font here; the page says what the axes are.
            let _ = c
                .configure_mesh()
                .x_labels(0)
                .y_labels(0)
                .light_line_style(WHITE)
                .draw();
            // Each minute as a step of its own, so a lone busy minute still shows as a bar.
            let steps = |f: fn(&crate::store::SeriesPoint) -> u64| -> Vec<(f64, f64)> {
                points
                    .iter()
                    .flat_map(|p| {
                        let (b, v) = (p.bucket as f64, f(p) as f64);
                        [(b, 0.0), (b, v), (b + 60.0, v), (b + 60.0, 0.0)]
                    })
                    .collect()
            };
            let tls = steps(|p| p.tls);
            let clear = steps(|p| p.cleartext);
            let _ = c.draw_series(
                AreaSeries::new(tls, 0.0, RGBColor(30, 123, 52).mix(0.35))
                    .border_style(RGBColor(30, 123, 52)),
            );
            let _ = c.draw_series(
                AreaSeries::new(clear, 0.0, RGBColor(179, 38, 30).mix(0.35))
                    .border_style(RGBColor(179, 38, 30)),
            );
        }
        let _ = root.present();
    }
    svg
}

/// "7 days", "24 hours", "30 minutes".
fn span_text(secs: u64) -> String {
    match secs {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 2 * 3600 => format!("{} hours", s / 3600),
        s => format!("{} minutes", s / 60),
    }
}

fn rows(title: &str, items: &[impact::Row]) -> String {
    let mut s = format!("<h3>{}</h3><table><tbody>", esc(title));
    if items.is_empty() {
        s.push_str("<tr><td class=muted>none</td></tr>");
    }
    for r in items {
        s.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{:.1}%</td></tr>",
            esc(&r.value),
            r.requests,
            r.percent
        ));
    }
    s.push_str("</tbody></table>");
    s
}

pub(crate) async fn site(
    State(ctx): State<Arc<Ctx>>,
    Path(host): Path<String>,
    req: Request,
) -> Response {
    let host = host.to_ascii_lowercase();
    let Some(v) = site_view(&ctx, &host).await else {
        return (
            StatusCode::NOT_FOUND,
            page("Not found", "<p>No such site.</p>"),
        )
            .into_response();
    };
    let session = req.extensions().get::<Session>().cloned();
    let config = ctx.control.config();
    let now = crate::clock::now();
    let store = ctx.control.store();
    let series = store
        .series(&host, now.saturating_sub(86_400), 60)
        .await
        .unwrap_or_default();
    let report = impact::report(
        &*store,
        &host,
        now.saturating_sub(config.readiness.window.as_secs()),
        now,
        &config.readiness,
    )
    .await
    .ok();
    let mut body = format!(
        "<div class=card><p><strong>{mode}</strong> on pool <strong>{pool}</strong>{closed} ({addrs}), TLS ports {tls:?}, cleartext ports {clear:?}. Origin <code>{origin}</code>. HSTS <code>{hsts}</code>.</p></div>",
        mode = v.cleartext,
        pool = esc(&v.pool),
        closed = if v.pool_closed { ", closed to cleartext" } else { "" },
        addrs = esc(&v.addresses.join(", ")),
        tls = v.tls_ports,
        clear = v.cleartext_ports,
        origin = esc(&v.origin),
        hsts = esc(v.hsts.as_deref().unwrap_or("off")),
    );
    // The last hour when that is all there is, else the last 24 hours.
    let first = series.first().map_or(now, |p| p.bucket);
    let (from, label) = if first >= now.saturating_sub(3600) {
        (now.saturating_sub(3600), "last hour")
    } else {
        (now.saturating_sub(86_400), "last 24 hours")
    };
    let peak = series
        .iter()
        .map(|p| p.tls.max(p.cleartext))
        .max()
        .unwrap_or(0);
    if let Some(plan) = &v.stage {
        body.push_str(&format!(
            "<div class=card id=stage><p>Switch-off stage: <strong>{}</strong> since {}{}{}{}</p></div>",
            plan.stage.as_str(),
            plan.since,
            plan.target_pool.as_ref().map(|t| format!(", moving to pool <strong>{}</strong>", esc(t))).unwrap_or_default(),
            plan.sunset.map(|t| format!(", sunset {}", esc(&crate::clock::http_date(t)))).unwrap_or_default(),
            plan.brownout.map(|b| format!(", brownouts of {} s every {} s from {}", b.duration, b.every, b.start)).unwrap_or_default(),
        ));
    }
    body.push_str(&format!(
        "<div class=card><h2>Requests per minute, {label}</h2><p class=legend><i style=\"background:#1e7b34\"></i>over TLS<i style=\"background:#b3261e\"></i>cleartext <span class=muted>(peak {peak} a minute; time runs left to right, up to now)</span></p><figure id=chart>{}</figure></div>",
        chart(&series, from, now + 60)
    ));
    if let Some(r) = &report {
        body.push_str(&format!(
            "<div class=card><h2>Cleartext over the last {}</h2><p id=share>{} of {} requests used cleartext ({:.3}%), from {} of {} client networks; likely people {}, likely automated {}. Credentials exposed: {}.</p><p>Verdict: {}</p>{}{}{}</div>",
            span_text(r.window_seconds),
            r.cleartext_requests,
            r.requests,
            r.cleartext_percent,
            r.cleartext_networks,
            r.networks,
            r.likely_human,
            r.likely_automated,
            r.exposed_credentials,
            if r.verdict.ready { "<span class=good>READY</span>".to_owned() } else { format!("<span class=bad>NOT READY</span>: {}", esc(&r.verdict.reasons.join("; "))) },
            rows("client families", &r.by_family),
            rows("networks", &r.by_network),
            rows("paths", &r.by_path),
        ));
        let events = ctx
            .control
            .store()
            .events(Some(&host))
            .await
            .map(|(e, _)| e)
            .unwrap_or_default();
        let mut exp = String::from("<div class=card><h2>Credentials seen in cleartext</h2><table><thead><tr><th>fingerprint</th><th>where</th><th>seen</th><th>last from</th><th>issuer told</th></tr></thead><tbody>");
        if r.exposures.is_empty() {
            exp.push_str("<tr><td class=muted colspan=5>none</td></tr>");
        }
        for e in &r.exposures {
            let told = match events.iter().find(|ev| ev.fingerprint == e.fingerprint) {
                Some(ev) if ev.state == "delivered" => {
                    format!("<span class=good>{} delivered</span>", esc(&ev.policy))
                }
                Some(ev) => format!(
                    "{} {} ({} attempts{})",
                    esc(&ev.policy),
                    esc(ev.state.as_str()),
                    ev.attempts,
                    ev.last_error
                        .as_deref()
                        .map(|m| format!(", {}", esc(m)))
                        .unwrap_or_default()
                ),
                None => "<span class=muted>no response configured</span>".to_owned(),
            };
            exp.push_str(&format!(
                "<tr><td><code>{}</code></td><td>{} {}</td><td>{}</td><td>{} ({})</td><td>{told}</td></tr>",
                esc(&e.fingerprint),
                esc(&e.kind),
                esc(&e.name),
                e.count,
                esc(&e.network),
                esc(e.family.as_str())
            ));
        }
        exp.push_str("</tbody></table></div>");
        body.push_str(&exp);
    }
    if session.is_some_and(|s| s.role == Role::Admin) && !v.pool_closed {
        let mut options = String::new();
        for m in ["redirect", "reject", "allow"] {
            options.push_str(&format!(
                "<option value=\"{m}\"{}>{m}</option>",
                if m == v.cleartext { " selected" } else { "" }
            ));
        }
        body.push_str(&format!(
            "<div class=card><h2>Cleartext mode</h2><form method=get action=\"/ui/site/{h}/confirm\"><select name=mode id=mode>{options}</select> <button id=review>Review the change</button></form></div>",
            h = esc(&host)
        ));
    }
    page(&host, &body).into_response()
}

#[derive(Deserialize)]
pub(crate) struct ModeQuery {
    mode: String,
}

pub(crate) async fn confirm(
    State(ctx): State<Arc<Ctx>>,
    Path(host): Path<String>,
    Query(q): Query<ModeQuery>,
    req: Request,
) -> Response {
    let host = host.to_ascii_lowercase();
    let Some(session) = req.extensions().get::<Session>().cloned() else {
        return Redirect::to("/login").into_response();
    };
    let Some(v) = site_view(&ctx, &host).await else {
        return (
            StatusCode::NOT_FOUND,
            page("Not found", "<p>No such site.</p>"),
        )
            .into_response();
    };
    let config = ctx.control.config();
    let now = crate::clock::now();
    let report = impact::report(
        &*ctx.control.store(),
        &host,
        now.saturating_sub(config.readiness.window.as_secs()),
        now,
        &config.readiness,
    )
    .await
    .ok();
    let impact_text = match &report {
        Some(r) => format!(
            "<p id=impact>Over the last {}: {} cleartext requests ({:.3}% of {}), from {} client networks ({} likely people, {} likely automated); {} credentials seen in cleartext.</p>",
            span_text(r.window_seconds),
            r.cleartext_requests,
            r.cleartext_percent,
            r.requests,
            r.cleartext_networks,
            r.likely_human,
            r.likely_automated,
            r.exposed_credentials
        ),
        None => "<p id=impact>No traffic recorded yet.</p>".to_owned(),
    };
    let body = format!(
        "<div class=card><p>Switch <strong>{h}</strong> from <strong>{from}</strong> to <strong>{to}</strong>?</p>{impact_text}
<form method=post action=\"/ui/site/{h}/mode\"><input type=hidden name=csrf value=\"{csrf}\"><input type=hidden name=mode value=\"{to}\">
<button id=apply>Apply now</button> <a href=\"/ui/site/{h}\">cancel</a></form></div>",
        h = esc(&host),
        from = v.cleartext,
        to = esc(&q.mode),
        csrf = esc(&session.csrf),
    );
    page("Confirm the change", &body).into_response()
}

#[derive(Deserialize)]
pub(crate) struct ModeForm {
    mode: String,
    csrf: Option<String>,
}

pub(crate) async fn set_mode(
    State(ctx): State<Arc<Ctx>>,
    Path(host): Path<String>,
    req: Request,
) -> Response {
    let host = host.to_ascii_lowercase();
    let Some(session) = req.extensions().get::<Session>().cloned() else {
        return (
            StatusCode::FORBIDDEN,
            "changes from the dashboard need a dashboard session\n",
        )
            .into_response();
    };
    let Ok(Form(form)) = Form::<ModeForm>::from_request(req, &()).await else {
        return (
            StatusCode::BAD_REQUEST,
            "send the form fields mode and csrf\n",
        )
            .into_response();
    };
    let csrf_ok = form.csrf.as_deref().is_some_and(|c| {
        aws_lc_rs::constant_time::verify_slices_are_equal(c.as_bytes(), session.csrf.as_bytes())
            .is_ok()
    });
    if !csrf_ok {
        return (
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token: reload the page and try again\n",
        )
            .into_response();
    }
    if session.role != Role::Admin {
        return (StatusCode::FORBIDDEN, "this session is read-only\n").into_response();
    }
    let change = Change {
        cleartext: Some(form.mode),
        ..Change::default()
    };
    match apply_change(&ctx, session.role, &host, change).await {
        Ok(_) => Redirect::to(&format!("/ui/site/{host}")).into_response(),
        Err(Refused::Invalid(problems)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            page(
                "Not applied",
                &format!(
                    "<p>The change breaks the config; nothing was applied:</p><ul>{}</ul>",
                    problems
                        .iter()
                        .map(|p| format!("<li>{}</li>", esc(p)))
                        .collect::<String>()
                ),
            ),
        )
            .into_response(),
        Err(Refused::Other(status, message)) => (
            status,
            page("Not applied", &format!("<p>{}</p>", esc(&message))),
        )
            .into_response(),
    }
}

pub(crate) async fn audit(State(ctx): State<Arc<Ctx>>) -> Html<String> {
    let entries = match ctx.control.store().audit().await {
        Ok(e) => e,
        Err(e) => {
            return page(
                "Audit log",
                &format!(
                    "<p class=muted>the audit log cannot be read: {}</p>",
                    esc(&e.to_string())
                ),
            )
        }
    };
    let mut rows = String::new();
    for entry in entries.iter().rev() {
        let v = serde_json::to_value(entry).unwrap_or_default();
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td><code>{}</code></td></tr>",
            v["at"],
            esc(v["who"].as_str().unwrap_or("?")),
            esc(v["site"].as_str().unwrap_or("?")),
            esc(&v["before"].to_string()),
            esc(&v["after"].to_string())
        ));
    }
    if rows.is_empty() {
        rows.push_str("<tr><td class=muted colspan=5>no changes yet</td></tr>");
    }
    page(
        "Audit log",
        &format!("<table><thead><tr><th>when (unix time)</th><th>who</th><th>site</th><th>before</th><th>after</th></tr></thead><tbody>{rows}</tbody></table>"),
    )
}
