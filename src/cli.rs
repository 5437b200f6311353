//! The command line: clap's description of every subcommand and flag, and the conversion of
//! raw arguments into the library's settings (`ProbeOptions`, `DemoOptions`, a stage change).
//!
//! A module of the binary, not of the library. It parses and converts only: it never prints
//! (that is `output`'s), never starts a runtime, never reads a config file, and imports only
//! the library (`portcullis::...`).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use portcullis::demo::DemoOptions;
use portcullis::probe::{self, Grade, ProbeOptions};

/// An HTTPS-only edge: closed pools refuse cleartext at the transport layer.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run everything on loopback with a built-in origin; prints curl lines to try.
    ///
    /// Example: portcullis demo
    Demo(DemoArgs),
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
    Impact(ImpactArgs),
    /// Audit any endpoint's cleartext exposure: refused, redirected, rejected or served?
    ///
    /// Example: portcullis probe https://api.example.com/ --min-grade B
    Probe(ProbeArgs),
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
    /// Every site's certificate: source (file, acme, development), issuer, expiry, next
    /// renewal and the last ACME error, as `serve` keeps them in the state dir.
    ///
    /// Example: portcullis certs -c /etc/portcullis/portcullis.toml
    Certs {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
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
    Stage(StageArgs),
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

/// The flags of `portcullis demo`; the description is the `Command` variant's.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Loopback address of the closed pool.
    #[arg(long, default_value = "127.0.0.2")]
    pub closed_addr: Ipv4Addr,
    /// Loopback address of the open pool.
    #[arg(long, default_value = "127.0.0.3")]
    pub open_addr: Ipv4Addr,
    #[arg(long, default_value_t = 8443)]
    pub tls_port: u16,
    #[arg(long, default_value_t = 8080)]
    pub cleartext_port: u16,
    /// Port of the TLS-only /metrics endpoint, on the closed address.
    #[arg(long, default_value_t = 9464)]
    pub metrics_port: u16,
    /// Port of the demo's DNS server (zone demo.test), on the closed address.
    #[arg(long, default_value_t = 8053)]
    pub dns_port: u16,
    /// Port of the admin API (HTTPS), on the closed address.
    #[arg(long, default_value_t = 9443)]
    pub admin_port: u16,
    /// Where the demo's development CA is kept [default: $TMPDIR/portcullis-demo].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Runtime worker threads [default: one per core].
    #[arg(long)]
    pub workers: Option<usize>,
}

impl DemoArgs {
    /// The demo's settings; `workers` is the binary's to use.
    pub fn options(&self) -> DemoOptions {
        let mut options = DemoOptions {
            closed_addr: self.closed_addr,
            open_addr: self.open_addr,
            tls_port: self.tls_port,
            cleartext_port: self.cleartext_port,
            metrics_port: self.metrics_port,
            dns_port: self.dns_port,
            admin_port: self.admin_port,
            ..DemoOptions::default()
        };
        if let Some(dir) = &self.state_dir {
            options.state_dir = dir.clone();
        }
        options
    }
}

/// The flags of `portcullis impact`; the description is the `Command` variant's.
#[derive(clap::Args)]
pub struct ImpactArgs {
    /// A configured site name, such as api.example.com or *.example.com.
    pub host: String,
    /// Config file: gives the state dir and the readiness thresholds.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// State dir holding the store (portcullis.db), when no config file is given.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// How far back to look, like 30m, 24h or 7d [default: readiness.window, 7d].
    #[arg(long)]
    pub since: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl ImpactArgs {
    /// `--since`, or `default` (the readiness window) without it.
    pub fn window(&self, default: Duration) -> anyhow::Result<Duration> {
        match &self.since {
            None => Ok(default),
            Some(s) => humantime::parse_duration(s)
                .with_context(|| format!("--since {s:?}: write it like 30m, 24h or 7d")),
        }
    }
}

/// The flags of `portcullis probe`; the description is the `Command` variant's.
#[derive(clap::Args)]
pub struct ProbeArgs {
    /// A URL or host name.
    pub target: String,
    /// Cleartext ports to try [default: 80,8080,8880,2052,2082,2086,2095].
    #[arg(long, value_delimiter = ',')]
    pub ports: Vec<u16>,
    /// Use ADDR for HOST, like curl: --resolve api.example.com:192.0.2.10 (repeatable).
    #[arg(long)]
    pub resolve: Vec<String>,
    /// Ask this DNS server (ADDR:PORT) instead of the system's.
    #[arg(long)]
    pub dns: Option<std::net::SocketAddr>,
    /// Extra trust anchors (PEM) for the certificate check.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Per connection and per answer.
    #[arg(long, default_value = "3s")]
    pub timeout: String,
    /// Print JSON instead of a report.
    #[arg(long)]
    pub json: bool,
    /// Exit with status 2 when the overall grade is worse than this (A to F).
    #[arg(long)]
    pub min_grade: Option<String>,
}

impl ProbeArgs {
    /// `--min-grade`, if given.
    pub fn min_grade(&self) -> anyhow::Result<Option<Grade>> {
        match self.min_grade.as_deref() {
            None => Ok(None),
            Some(g) => Ok(Some(Grade::parse(g).with_context(|| {
                format!("--min-grade {g:?}: use a letter from A to F")
            })?)),
        }
    }

    /// What to probe and how; reads the `--ca` file.
    pub fn options(&self) -> anyhow::Result<ProbeOptions> {
        Ok(ProbeOptions {
            target: self.target.clone(),
            ports: self.ports.clone(),
            resolve: self
                .resolve
                .iter()
                .map(|r| probe::parse_resolve(r))
                .collect::<Result<_, _>>()?,
            dns: self.dns,
            ca: match &self.ca {
                Some(p) => portcullis::tls::load_certs(p)?,
                None => Vec::new(),
            },
            timeout: humantime::parse_duration(&self.timeout)
                .with_context(|| format!("--timeout {:?}", self.timeout))?,
        })
    }
}

/// The flags of `portcullis stage`; the description is the `Command` variant's.
#[derive(clap::Args)]
pub struct StageArgs {
    pub host: String,
    /// observe, warn, brownout, move or closed
    pub stage: Option<String>,
    /// Step even if readiness checks fail (recorded in the audit log).
    #[arg(long)]
    pub force: bool,
    /// The closed pool the site will move to.
    #[arg(long)]
    pub target_pool: Option<String>,
    /// Planned closing date (YYYY-MM-DD, UTC), sent in the Sunset header.
    #[arg(long)]
    pub sunset: Option<String>,
    /// A page explaining the change, sent in the Link header.
    #[arg(long)]
    pub notice: Option<String>,
    /// Brownout windows: START (YYYY-MM-DDTHH:MM:SSZ or unix seconds),DURATION,EVERY (like 10m,1d).
    #[arg(long)]
    pub brownout: Option<String>,
    /// Acknowledge the credentials seen in cleartext so far.
    #[arg(long)]
    pub ack_exposures: bool,
    #[command(flatten)]
    pub admin: AdminArgs,
}

impl StageArgs {
    /// The body of `POST /api/sites/HOST/stage`: only the settings given, with dates and
    /// durations in seconds.
    pub fn body(&self) -> anyhow::Result<serde_json::Value> {
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
        let brownout = match &self.brownout {
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
        let sunset = self.sunset.as_deref().map(time).transpose()?;
        let mut body =
            serde_json::json!({ "force": self.force, "acknowledge_exposures": self.ack_exposures });
        for (k, v) in [
            ("stage", self.stage.clone().map(serde_json::Value::from)),
            (
                "target_pool",
                self.target_pool.clone().map(serde_json::Value::from),
            ),
            ("sunset", sunset.map(serde_json::Value::from)),
            ("notice", self.notice.clone().map(serde_json::Value::from)),
            ("brownout", brownout),
        ] {
            if let Some(v) = v {
                body[k] = v;
            }
        }
        Ok(body)
    }
}

/// Where the admin API is and how to authenticate.
#[derive(clap::Args)]
pub struct AdminArgs {
    /// The admin API, like https://127.0.0.1:9443.
    #[arg(long, env = "PORTCULLIS_ADMIN")]
    pub admin: String,
    /// The bearer token.
    #[arg(long, env = "PORTCULLIS_TOKEN", hide_env_values = true)]
    pub token: String,
    /// PEM trust anchors for the admin certificate (such as STATE/dev-ca.pem).
    #[arg(long, env = "PORTCULLIS_CA")]
    pub ca: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum FirewallCommand {
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
pub enum DnsCommand {
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
