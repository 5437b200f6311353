//! Command-line parsing only; everything else lives in the library.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use portcullis::analytics::impact;
use portcullis::analytics::store::Store;
use portcullis::config::{Config, Readiness};
use portcullis::demo::{self, DemoOptions};
use portcullis::net::Workers;
use portcullis::probe::{self, Grade, ProbeOptions};

/// An HTTPS-only edge: closed pools refuse cleartext at the transport layer.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything on loopback with a built-in origin; prints curl lines to try.
    ///
    /// Example: portcullis demo
    Demo {
        /// Loopback address of the closed pool.
        #[arg(long, default_value = "127.0.0.2")]
        closed_addr: Ipv4Addr,
        /// Loopback address of the open pool.
        #[arg(long, default_value = "127.0.0.3")]
        open_addr: Ipv4Addr,
        #[arg(long, default_value_t = 8443)]
        tls_port: u16,
        #[arg(long, default_value_t = 8080)]
        cleartext_port: u16,
        /// Port of the TLS-only /metrics endpoint, on the closed address.
        #[arg(long, default_value_t = 9464)]
        metrics_port: u16,
        /// Port of the demo's DNS server (zone demo.test), on the closed address.
        #[arg(long, default_value_t = 8053)]
        dns_port: u16,
        /// Port of the admin API (HTTPS), on the closed address.
        #[arg(long, default_value_t = 9443)]
        admin_port: u16,
        /// Where the demo's development CA is kept [default: $TMPDIR/portcullis-demo].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Runtime worker threads [default: one per core].
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Run the edge from a config file. SIGHUP reloads it, SIGTERM drains and exits.
    ///
    /// Example: portcullis serve -c /etc/portcullis/portcullis.toml
    Serve {
        #[arg(short, long)]
        config: PathBuf,
        /// Runtime worker threads [default: one per core].
        #[arg(long)]
        workers: Option<usize>,
    },
    /// What closing cleartext for HOST would break, from recorded traffic.
    ///
    /// Example: portcullis impact api.example.com -c /etc/portcullis/portcullis.toml --since 7d
    Impact {
        /// A configured site name, such as api.example.com or *.example.com.
        host: String,
        /// Config file: gives the state dir and the readiness thresholds.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// State dir holding analytics.db, when no config file is given.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// How far back to look, like 30m, 24h or 7d [default: readiness.window, 7d].
        #[arg(long)]
        since: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Audit any endpoint's cleartext exposure: refused, redirected, rejected or served?
    ///
    /// Example: portcullis probe https://api.example.com/ --min-grade B
    Probe {
        /// A URL or host name.
        target: String,
        /// Cleartext ports to try [default: 80,8080,8880,2052,2082,2086,2095].
        #[arg(long, value_delimiter = ',')]
        ports: Vec<u16>,
        /// Use ADDR for HOST, like curl: --resolve api.example.com:192.0.2.10 (repeatable).
        #[arg(long)]
        resolve: Vec<String>,
        /// Ask this DNS server (ADDR:PORT) instead of the system's.
        #[arg(long)]
        dns: Option<std::net::SocketAddr>,
        /// Extra trust anchors (PEM) for the certificate check.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Per connection and per answer.
        #[arg(long, default_value = "3s")]
        timeout: String,
        /// Print JSON instead of a report.
        #[arg(long)]
        json: bool,
        /// Exit with status 2 when the overall grade is worse than this (A to F).
        #[arg(long)]
        min_grade: Option<String>,
    },
    /// List every site with its pool, mode and TLS share (admin API).
    ///
    /// Example: portcullis sites --admin https://127.0.0.1:9443 --token "$TOKEN" --ca dev-ca.pem
    Sites {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// One site's state and recent traffic, as JSON (admin API).
    ///
    /// Example: portcullis site api.example.com
    Site {
        host: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Change a site's cleartext mode, live (admin API; validated, kept, audited).
    ///
    /// Example: portcullis set-mode www.example.com reject
    SetMode {
        host: String,
        /// closed, redirect, reject or allow
        mode: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The exposure response queue: events per credential, delivery state, dropped counts.
    ///
    /// Example: portcullis exposures -c portcullis.toml --site api.example.com
    Exposures {
        #[arg(short, long)]
        config: Option<PathBuf>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Only this site.
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Move a site through the staged switch-off, or back (admin API). Without STAGE, updates
    /// the plan's settings and shows it.
    ///
    /// Example: portcullis stage www.example.com warn --target-pool api --sunset 2027-03-01 --notice https://example.com/https-only
    Stage {
        host: String,
        /// observe, warn, brownout, move or closed
        stage: Option<String>,
        /// Step even if readiness checks fail (recorded in the audit log).
        #[arg(long)]
        force: bool,
        /// The closed pool the site will move to.
        #[arg(long)]
        target_pool: Option<String>,
        /// Planned closing date (YYYY-MM-DD, UTC), sent in the Sunset header.
        #[arg(long)]
        sunset: Option<String>,
        /// A page explaining the change, sent in the Link header.
        #[arg(long)]
        notice: Option<String>,
        /// Brownout windows: START (YYYY-MM-DDTHH:MM:SSZ or unix seconds),DURATION,EVERY (like 10m,1d).
        #[arg(long)]
        brownout: Option<String>,
        /// Acknowledge the credentials seen in cleartext so far.
        #[arg(long)]
        ack_exposures: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print the SHA-256 of a token read from standard input, for read_only_token_sha256.
    ///
    /// Example: portcullis hash-token < read-only.token
    HashToken,
    /// Kernel-level refusal: an nftables table resetting cleartext on closed addresses (root).
    #[command(subcommand)]
    Firewall(FirewallCommand),
    /// DNS tools.
    #[command(subcommand)]
    Dns(DnsCommand),
    /// Validate a config file, print every problem, and exit 1 if there is any.
    ///
    /// Example: portcullis check -c examples/portcullis.toml
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
}

/// Where the admin API is and how to authenticate.
#[derive(clap::Args)]
struct AdminArgs {
    /// The admin API, like https://127.0.0.1:9443.
    #[arg(long, env = "PORTCULLIS_ADMIN")]
    admin: String,
    /// The bearer token.
    #[arg(long, env = "PORTCULLIS_TOKEN", hide_env_values = true)]
    token: String,
    /// PEM trust anchors for the admin certificate (such as STATE/dev-ca.pem).
    #[arg(long, env = "PORTCULLIS_CA")]
    ca: Option<PathBuf>,
}

impl AdminArgs {
    fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<String> {
        let call = portcullis::admin::client::call(
            &self.admin,
            &self.token,
            self.ca.as_deref(),
            method,
            path,
            body,
        );
        Ok(control_runtime()?.block_on(call)?)
    }
}

/// A path segment for a site name (`*` is fine in a path; `/` cannot occur in a host).
fn site_path(host: &str) -> String {
    format!("/api/sites/{}", host.to_ascii_lowercase())
}

#[derive(Subcommand)]
enum FirewallCommand {
    /// Print the ruleset as nft JSON, without applying it.
    ///
    /// Example: portcullis firewall print -c portcullis.toml
    Print {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Install or replace the `inet portcullis` table through nft.
    ///
    /// Example: sudo portcullis firewall apply -c portcullis.toml
    Apply {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Delete the `inet portcullis` table.
    ///
    /// Example: sudo portcullis firewall remove
    Remove,
    /// Refused packets per closed address, from the table's counters.
    ///
    /// Example: sudo portcullis firewall counters
    Counters,
}

#[derive(Subcommand)]
enum DnsCommand {
    /// Print ZONE as an RFC 1035 zone file (HTTPS records included) for BIND, Knot or NSD.
    ///
    /// Example: portcullis dns export example.com -c portcullis.toml > example.com.zone
    Export {
        zone: String,
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Serve only the DNS of a config (no edge): for a separate DNS host, or benchmarks.
    /// SIGHUP reloads the file.
    ///
    /// Example: portcullis dns serve -c portcullis.toml
    Serve {
        #[arg(short, long)]
        config: PathBuf,
        /// Runtime threads [default: one per core].
        #[arg(long)]
        workers: Option<usize>,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => Ok(check(&config)),
        Command::Sites { admin } => {
            let body = admin.call(http::Method::GET, "/api/sites", None)?;
            let sites: Vec<serde_json::Value> = serde_json::from_str(&body)?;
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
            Ok(ExitCode::SUCCESS)
        }
        Command::Site { host, admin } => {
            let body = admin.call(http::Method::GET, &site_path(&host), None)?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            emit(&format!("{}\n", serde_json::to_string_pretty(&v)?));
            Ok(ExitCode::SUCCESS)
        }
        Command::SetMode { host, mode, admin } => {
            let body = serde_json::json!({ "cleartext": mode }).to_string();
            let answer = admin.call(http::Method::PATCH, &site_path(&host), Some(body))?;
            let v: serde_json::Value = serde_json::from_str(&answer)?;
            emit(&format!(
                "{} is now {}\n",
                v["host"].as_str().unwrap_or(&host),
                v["cleartext"].as_str().unwrap_or("?")
            ));
            Ok(ExitCode::SUCCESS)
        }
        Command::Exposures {
            config,
            state_dir,
            site,
            json,
        } => {
            let dir = match (config, state_dir) {
                (Some(c), None) => Config::from_file(&c)?.state_dir,
                (None, Some(d)) => d,
                (None, None) => Config::default().state_dir,
                (Some(_), Some(_)) => {
                    anyhow::bail!("give either --config or --state-dir, not both")
                }
            };
            let site = site.map(|s| s.to_ascii_lowercase());
            let (events, counters) = portcullis::exposure::queue::read(&dir, site.as_deref())
                .map_err(anyhow::Error::msg)?;
            if json {
                emit(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(
                        &serde_json::json!({ "events": events, "counters": counters })
                    )?
                ));
            } else {
                let mut out = format!(
                    "{:<24} {:<32} {:<8} {:<10} {:>8} {:>6}  {}\n",
                    "SITE", "FINGERPRINT", "POLICY", "STATE", "ATTEMPTS", "SEEN", "LAST ERROR"
                );
                for e in &events {
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
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Stage {
            host,
            stage,
            force,
            target_pool,
            sunset,
            notice,
            brownout,
            ack_exposures,
            admin,
        } => {
            let time = |s: &str| -> anyhow::Result<u64> {
                if let Ok(n) = s.parse::<u64>() {
                    return Ok(n);
                }
                let full = if s.len() == 10 {
                    format!("{s}T00:00:00Z")
                } else {
                    s.to_owned()
                };
                let t = humantime::parse_rfc3339(&full).with_context(|| {
                    format!("{s:?}: write a date like 2027-03-01 or 2027-03-01T12:00:00Z")
                })?;
                Ok(t.duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()))
            };
            let brownout = match brownout {
                None => None,
                Some(b) => {
                    let parts: Vec<&str> = b.split(',').collect();
                    let [start, duration, every] = parts.as_slice() else {
                        anyhow::bail!("--brownout {b:?}: write START,DURATION,EVERY like 2027-01-10T14:00:00Z,10m,1d");
                    };
                    let dur = |s: &str| {
                        humantime::parse_duration(s)
                            .map(|d| d.as_secs())
                            .with_context(|| format!("{s:?} in --brownout"))
                    };
                    Some(
                        serde_json::json!({ "start": time(start)?, "duration": dur(duration)?, "every": if *every == "0" { 0 } else { dur(every)? } }),
                    )
                }
            };
            let sunset = sunset.as_deref().map(time).transpose()?;
            let mut body =
                serde_json::json!({ "force": force, "acknowledge_exposures": ack_exposures });
            for (k, v) in [
                ("stage", stage.map(serde_json::Value::from)),
                ("target_pool", target_pool.map(serde_json::Value::from)),
                ("sunset", sunset.map(serde_json::Value::from)),
                ("notice", notice.map(serde_json::Value::from)),
                ("brownout", brownout),
            ] {
                if let Some(v) = v {
                    body[k] = v;
                }
            }
            let answer = admin.call(
                http::Method::POST,
                &format!("{}/stage", site_path(&host)),
                Some(body.to_string()),
            )?;
            let v: serde_json::Value = serde_json::from_str(&answer)?;
            emit(&format!("{}\n", serde_json::to_string_pretty(&v)?));
            Ok(ExitCode::SUCCESS)
        }
        Command::HashToken => {
            let mut token = String::new();
            std::io::stdin()
                .read_line(&mut token)
                .context("reading the token from standard input")?;
            emit(&format!("{}\n", portcullis::admin::hash_token(&token)));
            Ok(ExitCode::SUCCESS)
        }
        Command::Probe {
            target,
            ports,
            resolve,
            dns,
            ca,
            timeout,
            json,
            min_grade,
        } => {
            let min = match min_grade.as_deref() {
                None => None,
                Some(g) => Some(
                    Grade::parse(g)
                        .with_context(|| format!("--min-grade {g:?}: use a letter from A to F"))?,
                ),
            };
            let options = ProbeOptions {
                target,
                ports,
                resolve: resolve
                    .iter()
                    .map(|r| probe::parse_resolve(r))
                    .collect::<Result<_, _>>()?,
                dns,
                ca: match ca {
                    Some(p) => portcullis::tls::load_certs(&p)?,
                    None => Vec::new(),
                },
                timeout: humantime::parse_duration(&timeout)
                    .with_context(|| format!("--timeout {timeout:?}"))?,
            };
            let report = control_runtime()?.block_on(probe::probe(&options))?;
            if json {
                emit(&format!("{}\n", serde_json::to_string_pretty(&report)?));
            } else {
                emit(&report.render());
            }
            Ok(match min {
                Some(m) if report.grade > m => ExitCode::from(2),
                _ => ExitCode::SUCCESS,
            })
        }
        Command::Firewall(cmd) => {
            match cmd {
                FirewallCommand::Print { config } => emit(&format!(
                    "{}\n",
                    portcullis::firewall::print(&Config::from_file(&config)?)
                )),
                FirewallCommand::Apply { config } => {
                    let c = Config::from_file(&config)?;
                    portcullis::firewall::apply(&c)?;
                    let addrs: Vec<String> = portcullis::firewall::closed_addresses(&c)
                        .iter()
                        .map(|(a, _)| a.to_string())
                        .collect();
                    emit(&format!(
                        "table inet {} applied: cleartext ports {:?} refused on {}\n",
                        portcullis::firewall::TABLE,
                        portcullis::firewall::refused_ports(&c),
                        if addrs.is_empty() {
                            "no address (no closed pool)".to_owned()
                        } else {
                            addrs.join(", ")
                        }
                    ));
                }
                FirewallCommand::Remove => {
                    portcullis::firewall::remove()?;
                    emit(&format!(
                        "table inet {} removed\n",
                        portcullis::firewall::TABLE
                    ));
                }
                FirewallCommand::Counters => {
                    for (name, packets) in portcullis::firewall::counters()? {
                        emit(&format!("{name} {packets}\n"));
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dns(DnsCommand::Serve { config, workers }) => {
            init_logging();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(worker_count(workers))
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(portcullis::dns::serve_only(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dns(DnsCommand::Export { zone, config }) => {
            let c = Config::from_file(&config)?;
            emit(&portcullis::dns::export(&c, &zone)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Impact {
            host,
            config,
            state_dir,
            since,
            json,
        } => impact(&host, config, state_dir, since, json),
        Command::Serve { config, workers } => {
            init_logging();
            let workers = Workers::spawn(worker_count(workers))?;
            control_runtime()?.block_on(portcullis::runtime::serve(config, &workers))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            closed_addr,
            open_addr,
            tls_port,
            cleartext_port,
            metrics_port,
            dns_port,
            admin_port,
            state_dir,
            workers,
        } => {
            init_logging();
            let mut options = DemoOptions {
                closed_addr,
                open_addr,
                tls_port,
                cleartext_port,
                metrics_port,
                dns_port,
                admin_port,
                ..DemoOptions::default()
            };
            if let Some(dir) = state_dir {
                options.state_dir = dir;
            }
            let workers = Workers::spawn(worker_count(workers))?;
            control_runtime()?.block_on(async {
                let signals = portcullis::runtime::Signals::install()?;
                let d = demo::start(options, Some(&workers)).await?;
                // A reader that went away (`portcullis demo | head`) must not stop the demo.
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(demo::instructions(&d.options, &d.admin_token).as_bytes());
                let _ = out.flush();
                drop(out);
                portcullis::runtime::run_until_signal(&d.runtime, false, signals).await?;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn impact(
    host: &str,
    config: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    since: Option<String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let (dir, readiness) = match (&config, state_dir) {
        (Some(path), None) => {
            let c = Config::from_file(path)?;
            if !c
                .sites
                .iter()
                .any(|s| s.host.to_string() == host.to_ascii_lowercase())
            {
                let names: Vec<String> = c.sites.iter().map(|s| s.host.to_string()).collect();
                anyhow::bail!(
                    "{host:?} is not a site in {} (sites: {})",
                    path.display(),
                    names.join(", ")
                );
            }
            (c.state_dir, c.readiness)
        }
        (None, Some(dir)) => (dir, Readiness::default()),
        (None, None) => (Config::default().state_dir, Readiness::default()),
        (Some(_), Some(_)) => anyhow::bail!("give either --config or --state-dir, not both"),
    };
    let window = match since {
        None => readiness.window,
        Some(s) => humantime::parse_duration(&s)
            .with_context(|| format!("--since {s:?}: write it like 30m, 24h or 7d"))?,
    };
    let store = Store::open_read_only(&Store::path(&dir))?;
    let now = portcullis::clock::now();
    let mut report = impact::report(
        &store,
        &host.to_ascii_lowercase(),
        now.saturating_sub(window.as_secs()),
        now,
        &readiness,
    )?;
    let drains = match portcullis::store::SqliteStore::open_read_only(&dir)? {
        Some(s) => s.drains_now()?,
        None => Vec::new(),
    };
    report.drain = drains
        .into_iter()
        .find(|d| d.site == host.to_ascii_lowercase());
    if json {
        emit(&format!("{}\n", serde_json::to_string_pretty(&report)?));
    } else {
        emit(&report.render());
    }
    Ok(ExitCode::SUCCESS)
}

fn check(path: &std::path::Path) -> ExitCode {
    match portcullis::runtime::load(path) {
        Ok(c) => {
            let listeners = c.listeners().len();
            emit(&format!(
                "{}: OK ({} pools, {} sites, {} listeners)\n",
                path.display(),
                c.pools.len(),
                c.sites.len(),
                listeners
            ));
            for s in c.sites.iter().filter(|s| s.cert.is_none()) {
                emit(&format!(
                    "{}: note: site {} has no cert; a development certificate (untrusted by clients) will be issued\n",
                    path.display(),
                    s.host
                ));
            }
            for w in portcullis::runtime::foreign_listeners(&c) {
                emit(&format!("{}: warning: {w}\n", path.display()));
            }
            ExitCode::SUCCESS
        }
        Err(portcullis::runtime::RuntimeError::Config(e)) => {
            for line in e.lines() {
                eprintln!("{line}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

/// The runtime of the main thread: signals, reloads, the demo origin. Connections run on the
/// worker threads.
/// Writes to stdout; a reader that went away (`| head`) ends the output quietly instead of
/// panicking.
fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    if out
        .write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        std::process::exit(0);
    }
}

fn control_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn worker_count(flag: Option<usize>) -> usize {
    flag.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in a log file or a journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // The servers start here: connection caps, not the default soft limit of 1024, should
    // decide how many clients are served.
    match portcullis::net::raise_nofile_limit() {
        Ok(l) if l.after > l.before => tracing::info!(
            before = l.before,
            after = l.after,
            "raised the open file limit (RLIMIT_NOFILE) to its hard limit"
        ),
        Ok(l) => tracing::info!(limit = l.after, "open file limit (RLIMIT_NOFILE)"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
}
