//! What the binary prints: the tables and JSON of `sites`, `exposures`, `check`, `firewall`,
//! `impact` and `probe`, and how a closed standard output is handled.
//!
//! A module of the binary, not of the library. It formats and writes only: it never parses
//! arguments (that is `cli`'s), never starts a runtime, never calls the admin API or changes
//! anything, and imports only the library (`portcullis::...`).

use std::io::Write;
use std::path::Path;

use portcullis::config::{Config, ConfigError};
use portcullis::exposure::queue::{Counters, EventRow};

/// Writes to stdout; a reader that went away (`| head`) ends the output quietly instead of
/// panicking.
pub fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    if out
        .write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        std::process::exit(0);
    }
}

/// `value` as pretty JSON, on its own line.
pub fn json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    emit(&format!("{}\n", serde_json::to_string_pretty(value)?));
    Ok(())
}

/// The demo's instructions. A reader that went away (`portcullis demo | head`) must not stop
/// the demo, so unlike [`emit`] a failed write is ignored.
pub fn instructions(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// `portcullis sites`: one line per site of `GET /api/sites`.
pub fn sites(sites: &[serde_json::Value]) {
    let mut out = format!(
        "{:<32} {:<12} {:<9} {:>10} {:>8}  {}\n",
        "SITE", "POOL", "MODE", "REQ 24H", "TLS %", "READY"
    );
    for s in sites {
        let pct = s["tls_percent_24h"]
            .as_f64()
            .map_or("-".to_owned(), |p| format!("{p:.2}"));
        let ready = match s["verdict_ready"].as_bool() {
            Some(true) => "ready",
            Some(false) => "not ready",
            None => "-",
        };
        out.push_str(&format!(
            "{:<32} {:<12} {:<9} {:>10} {:>8}  {ready}\n",
            s["host"].as_str().unwrap_or("?"),
            s["pool"].as_str().unwrap_or("?"),
            s["cleartext"].as_str().unwrap_or("?"),
            s["requests_24h"].as_u64().unwrap_or(0),
            pct
        ));
    }
    emit(&out);
}

/// `portcullis set-mode`: the admin API's answer; `host` as given when the answer has none.
pub fn mode_set(answer: &serde_json::Value, host: &str) {
    emit(&format!(
        "{} is now {}\n",
        answer["host"].as_str().unwrap_or(host),
        answer["cleartext"].as_str().unwrap_or("?")
    ));
}

/// `portcullis exposures`, as JSON or as a table followed by the queue's counters.
pub fn exposures(events: &[EventRow], counters: &Counters, json: bool) -> anyhow::Result<()> {
    if json {
        return self::json(&serde_json::json!({ "events": events, "counters": counters }));
    }
    let mut out = format!(
        "{:<24} {:<32} {:<8} {:<10} {:>8} {:>6}  {}\n",
        "SITE", "FINGERPRINT", "POLICY", "STATE", "ATTEMPTS", "SEEN", "LAST ERROR"
    );
    for e in events {
        out.push_str(&format!(
            "{:<24} {:<32} {:<8} {:<10} {:>8} {:>6}  {}\n",
            e.site,
            e.fingerprint,
            e.policy,
            e.state,
            e.attempts,
            e.count,
            e.last_error.as_deref().unwrap_or("")
        ));
    }
    out.push_str(&format!(
        "coalesced repeats: {}; dropped by the per-site limit: {}, per-network limit: {}, full queue: {}\n",
        counters.coalesced, counters.dropped_site_rate, counters.dropped_network_rate, counters.dropped_queue_full
    ));
    emit(&out);
    Ok(())
}

/// `portcullis certs`: every site's certificate source, issuer, expiry and next renewal.
pub fn certs(certs: &[portcullis::tls::SiteCert], json: bool) -> anyhow::Result<()> {
    if json {
        return self::json(&certs);
    }
    let date = |t: Option<u64>| t.map_or("-".to_owned(), portcullis::clock::http_date);
    let mut out = format!(
        "{:<28} {:<12} {:<32} {:<30} {:<30}  {}\n",
        "SITE", "SOURCE", "ISSUER", "NOT AFTER", "NEXT RENEWAL", "LAST ERROR"
    );
    for c in certs {
        let source = match &c.acme_challenge {
            Some(ch) if c.source == "development" => {
                format!("development (acme {ch}, not issued yet)")
            }
            _ => c.source.to_owned(),
        };
        out.push_str(&format!(
            "{:<28} {:<12} {:<32} {:<30} {:<30}  {}\n",
            c.site,
            source,
            c.issuer.as_deref().unwrap_or("-"),
            date(c.not_after),
            date(c.next_renewal),
            c.last_error.as_deref().unwrap_or("")
        ));
    }
    emit(&out);
    Ok(())
}

/// `portcullis check` of a valid config: a summary, a note per site without a certificate,
/// and the `warnings` (listeners of other programs).
pub fn check_ok(path: &Path, c: &Config, warnings: &[String]) {
    let listeners = c.listeners().len();
    emit(&format!(
        "{}: OK ({} pools, {} sites, {} listeners)\n",
        path.display(),
        c.pools.len(),
        c.sites.len(),
        listeners
    ));
    for s in c.sites.iter().filter(|s| s.cert.is_none()) {
        let note = match s.acme {
            Some(ch) => format!("gets its certificate from the ACME CA through {}; a development certificate (untrusted by clients) is served until the first issuance", ch.as_str()),
            None => "has no cert; a development certificate (untrusted by clients) will be issued".to_owned(),
        };
        emit(&format!(
            "{}: note: site {} {note}\n",
            path.display(),
            s.host
        ));
    }
    for w in warnings {
        emit(&format!("{}: warning: {w}\n", path.display()));
    }
}

/// `portcullis check` of an invalid config: every problem on its own line, on stderr.
pub fn check_failed(e: &ConfigError) {
    for line in e.lines() {
        eprintln!("{line}");
    }
}

/// `portcullis firewall apply`: the table, the refused ports and the closed addresses.
pub fn firewall_applied(c: &Config) {
    let addrs: Vec<String> = portcullis::firewall::closed_addresses(c)
        .iter()
        .map(|(a, _)| a.to_string())
        .collect();
    emit(&format!(
        "table inet {} applied: cleartext ports {:?} refused on {}\n",
        portcullis::firewall::TABLE,
        portcullis::firewall::refused_ports(c),
        if addrs.is_empty() {
            "no address (no closed pool)".to_owned()
        } else {
            addrs.join(", ")
        }
    ));
}

/// `portcullis firewall remove`.
pub fn firewall_removed() {
    emit(&format!(
        "table inet {} removed\n",
        portcullis::firewall::TABLE
    ));
}

/// `portcullis firewall counters`: one `NAME PACKETS` line per counter.
pub fn firewall_counters(counters: impl IntoIterator<Item = (String, u64)>) {
    for (name, packets) in counters {
        emit(&format!("{name} {packets}\n"));
    }
}
