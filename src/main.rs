//! The binary: parses the command line (`cli`), calls the library, and prints what it answers
//! (`output`). Everything else lives in the library.
//!
//! This file owns the dispatch of each subcommand, logging, and the runtimes (the main
//! thread's and the connection workers'). It never formats a table or a report itself, and
//! declares no flag: those are `output`'s and `cli`'s, modules of this binary that, like it,
//! import only the library.

mod cli;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use portcullis::analytics::impact;
use portcullis::config::{Config, Readiness};
use portcullis::demo;
use portcullis::net::Workers;
use portcullis::probe;

use cli::{AdminArgs, Cli, Command, DnsCommand, FirewallCommand, ImpactArgs};

// The call needs a runtime, and runtimes are this file's; `cli` only describes the flags.
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
            output::sites(&sites);
            Ok(ExitCode::SUCCESS)
        }
        Command::Site { host, admin } => {
            let body = admin.call(http::Method::GET, &site_path(&host), None)?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            output::json(&v)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::SetMode { host, mode, admin } => {
            let body = serde_json::json!({ "cleartext": mode }).to_string();
            let answer = admin.call(http::Method::PATCH, &site_path(&host), Some(body))?;
            let v: serde_json::Value = serde_json::from_str(&answer)?;
            output::mode_set(&v, &host);
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs { config, json } => {
            let c = portcullis::runtime::load(&config)?;
            let status = portcullis::acme::saved_status(&c.state_dir);
            output::certs(&portcullis::acme::report(&c, &status), json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Exposures {
            config,
            state_dir,
            site,
            json,
        } => {
            let source = match (config, state_dir) {
                (Some(c), None) => portcullis::runtime::ConfigSource::File(c),
                (None, d) => {
                    let dir = d.unwrap_or_else(|| Config::default().state_dir);
                    portcullis::runtime::ConfigSource::Text {
                        text: format!("[state]\ndir = {:?}\n", dir.display().to_string()),
                        label: "--state-dir".into(),
                        base: PathBuf::from("."),
                    }
                }
                (Some(_), Some(_)) => {
                    anyhow::bail!("give either --config or --state-dir, not both")
                }
            };
            let site = site.map(|s| s.to_ascii_lowercase());
            let (events, counters) = control_runtime()?.block_on(async {
                match portcullis::runtime::open_store_read(&source).await? {
                    None => Ok::<_, anyhow::Error>(Default::default()),
                    Some(store) => Ok(store.events(site.as_deref()).await?),
                }
            })?;
            output::exposures(&events, &counters, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stage(args) => {
            let body = args.body()?;
            let answer = args.admin.call(
                http::Method::POST,
                &format!("{}/stage", site_path(&args.host)),
                Some(body.to_string()),
            )?;
            let v: serde_json::Value = serde_json::from_str(&answer)?;
            output::json(&v)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::HashToken => {
            let mut token = String::new();
            std::io::stdin()
                .read_line(&mut token)
                .context("reading the token from standard input")?;
            output::emit(&format!("{}\n", portcullis::admin::hash_token(&token)));
            Ok(ExitCode::SUCCESS)
        }
        Command::Probe(args) => {
            let min = args.min_grade()?;
            let options = args.options()?;
            let report = control_runtime()?.block_on(probe::probe(&options))?;
            if args.json {
                output::json(&report)?;
            } else {
                output::emit(&report.render());
            }
            Ok(match min {
                Some(m) if report.grade > m => ExitCode::from(2),
                _ => ExitCode::SUCCESS,
            })
        }
        Command::Firewall(cmd) => {
            match cmd {
                FirewallCommand::Print { config } => output::emit(&format!(
                    "{}\n",
                    portcullis::firewall::print(&portcullis::runtime::load(&config)?)
                )),
                FirewallCommand::Apply { config } => {
                    let c = portcullis::runtime::load(&config)?;
                    portcullis::firewall::apply(&c)?;
                    output::firewall_applied(&c);
                }
                FirewallCommand::Remove => {
                    portcullis::firewall::remove()?;
                    output::firewall_removed();
                }
                FirewallCommand::Counters => {
                    output::firewall_counters(portcullis::firewall::counters()?);
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
            let c = portcullis::runtime::load(&config)?;
            output::emit(&portcullis::dns::export(&c, &zone)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Impact(args) => impact(&args),
        Command::Serve { config, workers } => {
            init_logging();
            let workers = Workers::spawn(worker_count(workers))?;
            control_runtime()?.block_on(portcullis::runtime::serve(config, &workers))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => {
            init_logging();
            let options = args.options();
            let workers = Workers::spawn(worker_count(args.workers))?;
            control_runtime()?.block_on(async {
                let signals = portcullis::runtime::Signals::install()?;
                let d = demo::start(options, Some(&workers)).await?;
                output::instructions(&demo::instructions(&d.options, &d.admin_token));
                portcullis::runtime::run_until_signal(&d.runtime, false, signals).await?;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn impact(args: &ImpactArgs) -> anyhow::Result<ExitCode> {
    let host = args.host.as_str();
    let (dir, readiness): (PathBuf, Readiness) = match (&args.config, &args.state_dir) {
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
        (None, Some(dir)) => (dir.clone(), Readiness::default()),
        (None, None) => (Config::default().state_dir, Readiness::default()),
        (Some(_), Some(_)) => anyhow::bail!("give either --config or --state-dir, not both"),
    };
    let window = args.window(readiness.window)?;
    let source = match &args.config {
        Some(path) => portcullis::runtime::ConfigSource::File(path.clone()),
        // A state dir alone: the embedded store in it.
        None => portcullis::runtime::ConfigSource::Text {
            text: format!("[state]\ndir = {:?}\n", dir.display().to_string()),
            label: "--state-dir".into(),
            base: PathBuf::from("."),
        },
    };
    let now = portcullis::clock::now();
    let host = host.to_ascii_lowercase();
    let since = now.saturating_sub(window.as_secs());
    let report = control_runtime()?.block_on(async {
        let Some(store) = portcullis::runtime::open_store_read(&source).await? else {
            anyhow::bail!(
                "no store at {}: nothing has been recorded there yet (is this the state dir `portcullis serve` uses?)",
                portcullis::store::SqliteStore::path(&dir).display()
            );
        };
        let mut report = impact::report(&*store, &host, since, now, &readiness).await?;
        report.drain = store.drains().await?.into_iter().find(|d| d.site == host);
        Ok(report)
    })?;
    if args.json {
        output::json(&report)?;
    } else {
        output::emit(&report.render());
    }
    Ok(ExitCode::SUCCESS)
}

fn check(path: &std::path::Path) -> ExitCode {
    match portcullis::runtime::load(path) {
        Ok(c) => {
            let mut warnings = c.warnings();
            warnings.extend(portcullis::runtime::foreign_listeners(&c));
            output::check_ok(path, &c, &warnings);
            ExitCode::SUCCESS
        }
        Err(portcullis::runtime::RuntimeError::Config(e)) => {
            output::check_failed(&e);
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
