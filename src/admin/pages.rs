//! The dashboard: server-rendered HTML over the admin API's data, an SVG chart from plotters,
//! no JavaScript needed to read. Login takes the token and sets a `Secure; HttpOnly;
//! SameSite=Strict` session cookie; every change is a POST carrying the session's CSRF token.

use std::sync::Arc;

use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::auth::{session_id, Session, COOKIE, SESSION_LIFETIME};
use super::service::{apply_change, site_view, traffic_series, Change, Refused, TrafficPoint};
use super::{charts, Ctx, Peer, Role};
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
figure{{margin:0}} figure svg{{width:100%;min-width:30rem;height:auto;display:block}}
h1{{overflow-wrap:anywhere}} header{{flex-wrap:wrap}} .card,.wide{{overflow-x:auto}}
.split{{display:flex;flex-wrap:wrap;gap:0 1rem}} .split>#share-card{{flex:3 1 34rem;min-width:0}} .split>#stage{{flex:1 1 12rem}}
nav.ranges{{margin:.2rem 0 .4rem}} nav.ranges a{{margin-right:.8rem}} nav.ranges a.current{{font-weight:700;color:inherit;text-decoration:none}}
@media (max-width:40rem){{main{{padding:.6rem}} .split>#share-card{{flex-basis:100%}}}}
@media (prefers-color-scheme:dark){{body{{background:#111418;color:#e3e6ea}} .card,table{{background:#1b1f24;border-color:#2c3138}} th,td{{border-color:#2c3138}} a{{color:#8ab4f8}} .muted{{color:#9aa3ad}} .good{{color:#6fcf83}} .bad{{color:#ff8a80}} figure svg{{filter:invert(.88) hue-rotate(180deg)}}}}
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

#[derive(Deserialize)]
pub(crate) struct RangeQuery {
    range: Option<String>,
}

/// Links to the other ranges of the same page, the current one marked.
fn range_links(current: &charts::Range, base: &str) -> String {
    let mut s = String::from("<nav class=ranges aria-label=\"time range\">");
    for r in &charts::RANGES {
        if r.name == current.name {
            s.push_str(&format!(
                "<a class=current aria-current=page href=\"{base}?range={n}\">{n}</a>",
                n = r.name
            ));
        } else {
            s.push_str(&format!("<a href=\"{base}?range={n}\">{n}</a>", n = r.name));
        }
    }
    s.push_str("</nav>");
    s
}

/// The end of a chart ending now: the end of the current bucket.
fn chart_end(range: &charts::Range, now: u64) -> u64 {
    now - now % range.span + range.span
}

/// Lines a chart shows besides the total, at most: more would not be told apart.
const SITE_LINES: usize = charts::PALETTE.len();

pub(crate) async fn overview(
    State(ctx): State<Arc<Ctx>>,
    Query(q): Query<RangeQuery>,
) -> Html<String> {
    let config = ctx.control.config();
    let hosts: Vec<String> = config.sites.iter().map(|s| s.host.to_string()).collect();
    let range = charts::range(q.range.as_deref());
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
            "<tr><td><a href=\"/ui/site/{h}\">{h}</a></td><td>{mode}</td><td>{pool}{closed}</td><td>{req}</td><td>{share}</td><td>{verdict}</td><td class=cert>{cert}</td><td class=series><a href=\"{api}&amp;format=csv\">CSV</a> · <a href=\"{api}\">JSON</a></td></tr>",
            api = format!(
                "/api/sites/{}/traffic?{}",
                esc(&urlencode(&v.host)),
                range.query()
            ),
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
    let chart = overview_chart(&ctx, &config, &hosts, range, now).await;
    page(
        "Sites",
        &format!("{chart}<div class=wide><table><thead><tr><th>site</th><th>cleartext mode</th><th>pool</th><th>requests, 24 h</th><th>served over TLS, 24 h</th><th>readiness</th><th>certificate</th><th>series, {r}</th></tr></thead><tbody>{rows}</tbody></table></div>{nodes}", r = range.name),
    )
}

/// The TLS share of every site together, and a line per site not yet closed (the ones with
/// the most cleartext first).
async fn overview_chart(
    ctx: &Ctx,
    config: &crate::config::Config,
    hosts: &[String],
    range: &charts::Range,
    now: u64,
) -> String {
    let (from, to) = (range.start(now), chart_end(range, now));
    let mut total: std::collections::BTreeMap<u64, TrafficPoint> = Default::default();
    let mut open = Vec::new();
    for (h, site) in hosts.iter().zip(&config.sites) {
        let points = traffic_series(ctx, h, from, range.span)
            .await
            .unwrap_or_default();
        for p in &points {
            let t = total.entry(p.bucket).or_insert_with(|| TrafficPoint {
                bucket: p.bucket,
                tls: 0,
                cleartext: 0,
                tls_percent: None,
                cleartext_likely_human: 0,
                cleartext_likely_automated: 0,
            });
            t.tls += p.tls;
            t.cleartext += p.cleartext;
        }
        if !config.pools[site.pool].is_closed() {
            let clear: u64 = points.iter().map(|p| p.cleartext).sum();
            open.push((clear, h.clone(), points));
        }
    }
    let total: Vec<TrafficPoint> = total
        .into_values()
        .map(|mut p| {
            let all = p.tls + p.cleartext;
            p.tls_percent = (all > 0).then(|| p.tls as f64 * 100.0 / all as f64);
            p
        })
        .collect();
    open.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let left_out = open.len().saturating_sub(SITE_LINES);
    let mut lines = vec![charts::Line {
        label: "all sites".into(),
        color: charts::FIRST,
        points: &total,
    }];
    for ((_, host, points), color) in open.iter().zip(charts::PALETTE) {
        lines.push(charts::Line {
            label: host.clone(),
            color,
            points,
        });
    }
    let marks = charts::Marks {
        threshold: Some(100.0 - config.readiness.max_cleartext_percent),
        ..Default::default()
    };
    let svg = charts::share_chart(&lines, range, from, to, &marks);
    let more = match left_out {
        0 => String::new(),
        n => format!(" {n} more sites that accept cleartext are in the table, not drawn."),
    };
    format!(
        "<div class=card id=share-card><h2>Served over TLS, last {label}</h2>{links}<p class=muted>Every site together, and each site that still accepts cleartext, per {bucket}; the dashed line is the readiness threshold. Hover a point for its figures.{more}</p><figure id=share-chart>{svg}</figure></div>",
        label = span_text(range.secs),
        links = range_links(range, "/"),
        bucket = range.bucket_text(),
    )
}

/// Brownout windows overlapping `from..to` (at most 1,000 of them).
fn brownout_windows(b: crate::stages::Brownout, from: u64, to: u64) -> Vec<(u64, u64)> {
    if b.every == 0 {
        return vec![(b.start, b.start + b.duration)];
    }
    let first = from.saturating_sub(b.start + b.duration) / b.every;
    (first..)
        .map(|k| b.start + k * b.every)
        .take_while(|&s| s < to)
        .map(|s| (s, s + b.duration))
        .filter(|&(_, e)| e > from)
        .take(1000)
        .collect()
}

/// A site name in a URL path (`*` of a wildcard site escaped).
fn urlencode(s: &str) -> String {
    s.replace('*', "%2A")
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
    let q = Query::<RangeQuery>::try_from_uri(req.uri())
        .map(|q| q.0.range)
        .unwrap_or_default();
    let range = charts::range(q.as_deref());
    let config = ctx.control.config();
    let now = crate::clock::now();
    let store = ctx.control.store();
    let (from, to) = (range.start(now), chart_end(range, now));
    let points = traffic_series(&ctx, &host, from, range.span)
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
        "<div class=card><p><strong>{mode}</strong> on pool <strong>{pool}</strong>{closed} ({addrs}), TLS ports {tls:?}, cleartext ports {clear:?}{h3}. Origin <code>{origin}</code>. HSTS <code>{hsts}</code>.</p></div>",
        mode = v.cleartext,
        pool = esc(&v.pool),
        closed = if v.pool_closed { ", closed to cleartext" } else { "" },
        addrs = esc(&v.addresses.join(", ")),
        tls = v.tls_ports,
        clear = v.cleartext_ports,
        h3 = if v.http3 { ", HTTP/3 on" } else { ", no HTTP/3" },
        origin = esc(&v.origin),
        hsts = esc(v.hsts.as_deref().unwrap_or("off")),
    );
    // Stage changes from the audit log, brownout windows from the plan.
    let events: Vec<(u64, String)> = store
        .audit()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.site == host)
        .filter_map(|e| match e.event {
            crate::store::AuditEvent::Stage { after, .. } => {
                Some((e.at, after.stage.as_str().to_owned()))
            }
            _ => None,
        })
        .collect();
    let brownouts = v
        .stage
        .as_ref()
        .and_then(|p| p.brownout)
        .map(|b| brownout_windows(b, from, to))
        .unwrap_or_default();
    let marks = charts::Marks {
        threshold: Some(100.0 - config.readiness.max_cleartext_percent),
        events,
        brownouts,
    };
    let line = [charts::Line {
        label: host.clone(),
        color: charts::FIRST,
        points: &points,
    }];
    let share = charts::share_chart(&line, range, from, to, &marks);
    let plan = match &v.stage {
        Some(plan) => format!(
            "<div class=card id=stage><h2>Switch-off plan</h2><p>Stage <strong>{}</strong> since {}.</p><ul>{}{}{}{}</ul></div>",
            plan.stage.as_str(),
            esc(&crate::clock::http_date(plan.since)),
            plan.deprecated_at.map(|t| format!("<li>deprecated (warn) since {}</li>", esc(&crate::clock::http_date(t)))).unwrap_or_default(),
            plan.sunset.map(|t| format!("<li>sunset {}</li>", esc(&crate::clock::http_date(t)))).unwrap_or_default(),
            plan.brownout.map(|b| format!("<li>brownouts of {} s every {} s from {}</li>", b.duration, b.every, esc(&crate::clock::http_date(b.start)))).unwrap_or_default(),
            plan.target_pool.as_ref().map(|t| format!("<li>moving to pool <strong>{}</strong></li>", esc(t))).unwrap_or_default(),
        ),
        None => "<div class=card id=stage><h2>Switch-off plan</h2><p class=muted>None: the site keeps its cleartext mode until changed.</p></div>".to_owned(),
    };
    let api = format!(
        "/api/sites/{}/traffic?{}",
        esc(&urlencode(&host)),
        range.query()
    );
    body.push_str(&format!(
        "<div class=split><div class=card id=share-card><h2>Served over TLS, last {label}</h2>{links}<p class=muted>Per {bucket}; the dashed line is the readiness threshold ({th}% over TLS), dashed verticals are stage changes, shaded spans brownouts. Hover a point for its figures. Download: <a id=csv href=\"{api}&amp;format=csv\">CSV</a> · <a id=json href=\"{api}\">JSON</a></p><figure id=share-chart>{share}</figure></div>{plan}</div>",
        label = span_text(range.secs),
        links = range_links(range, &format!("/ui/site/{}", esc(&host))),
        bucket = range.bucket_text(),
        th = 100.0 - config.readiness.max_cleartext_percent,
    ));
    body.push_str(&format!(
        "<div class=card><h2>Requests per {bucket}</h2><figure id=requests-chart>{}</figure><h2>Cleartext requests by who likely sent them</h2><figure id=clients-chart>{}</figure></div>",
        charts::stacked_chart(&points, &charts::TLS_AND_CLEARTEXT, range, from, to),
        charts::stacked_chart(&points, &charts::HUMAN_AND_AUTOMATED, range, from, to),
        bucket = range.bucket_text(),
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
