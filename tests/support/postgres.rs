//! A PostgreSQL server from Debian's packages, started by the tests: initdb into a temporary
//! directory (as the `postgres` user when the tests run as root, since PostgreSQL refuses to
//! run as root), listening on a random loopback address with trust authentication. One server
//! per test process, killed with it (parent-death signal); a database per test.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::{loopback, wait_until_blocking};

/// The running server of this test process.
pub struct Postgres {
    pub addr: SocketAddr,
    dir: PathBuf,
    data: PathBuf,
    owner: Option<(u32, u32)>,
    /// The command line of the server.
    server: Vec<String>,
    /// Their standard input closes when this is dropped or the process exits, which stops the
    /// server and removes its directory.
    servers: std::sync::Mutex<Vec<std::process::Child>>,
}

/// A PostgreSQL program (`initdb`, `postgres`, `pg_dump`) of the newest version installed.
pub fn bin(name: &str) -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: apt-get install postgresql (scripts/test.sh does it)")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found
        .pop()
        .unwrap_or_else(|| panic!("no {name} under /usr/lib/postgresql/*/bin"))
}

/// The uid and gid to run the server as: `postgres` when we are root, else ourselves.
fn owner() -> Option<(u32, u32)> {
    if rustix::process::geteuid().is_root() {
        let id = |flag: &str| -> u32 {
            let out = Command::new("id")
                .args([flag, "postgres"])
                .output()
                .expect("id");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("the postgres user exists")
        };
        Some((id("-u"), id("-g")))
    } else {
        None
    }
}

fn as_owner(cmd: &mut Command, owner: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

impl Postgres {
    /// The server of this process, started on first use.
    pub fn shared() -> &'static Postgres {
        static PG: OnceLock<Postgres> = OnceLock::new();
        PG.get_or_init(Postgres::start)
    }

    /// A server of the caller's own, which it may stop and resume; gone when dropped.
    pub fn start() -> Postgres {
        Postgres::start_with(None)
    }

    /// A server of the caller's own that takes test databases over TLS only, with a
    /// certificate for its address from `ca` (cleartext only to the `postgres` database, for
    /// [`Postgres::database`]).
    pub fn start_tls(ca: &super::TestCa) -> Postgres {
        Postgres::start_with(Some(ca))
    }

    fn start_with(tls: Option<&super::TestCa>) -> Postgres {
        static N: AtomicU64 = AtomicU64::new(0);
        let owner = owner();
        let dir = std::env::temp_dir().join(format!(
            "portcullis-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("pg dir");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown");
        }
        let data = dir.join("data");
        let out = as_owner(Command::new(bin("initdb")).arg("-D").arg(&data), owner)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ip: Ipv4Addr = loopback();
        let hba = match tls {
            None => "local all all trust\nhost all all 127.0.0.0/8 trust\n",
            Some(_) => "local all all trust\nhost postgres postgres 127.0.0.0/8 trust\nhostssl all all 127.0.0.0/8 trust\n",
        };
        std::fs::write(data.join("pg_hba.conf"), hba).expect("pg_hba");
        let mut tls_args = Vec::new();
        if let Some(ca) = tls {
            let (cert, key) = ca.issue(&dir, "server", &[&ip.to_string()]);
            use std::os::unix::fs::PermissionsExt;
            for f in [&cert, &key] {
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(f, Some(uid), Some(gid)).expect("chown");
                }
            }
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            tls_args = vec![
                "-c".to_owned(),
                "ssl=on".to_owned(),
                "-c".to_owned(),
                format!("ssl_cert_file={}", cert.display()),
                "-c".to_owned(),
                format!("ssl_key_file={}", key.display()),
            ];
        }
        let addr = SocketAddr::from((ip, 5432));
        let mut server = vec![bin("postgres").display().to_string()];
        server.extend(
            [
                "-D",
                &data.display().to_string(),
                "-k",
                &dir.display().to_string(),
                "-p",
                "5432",
                "-c",
                &format!("listen_addresses={ip}"),
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ]
            .map(str::to_owned),
        );
        server.extend(tls_args);
        if owner.is_some() {
            let mut as_postgres: Vec<String> = [
                "setpriv",
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
            ]
            .map(str::to_owned)
            .to_vec();
            as_postgres.extend(server);
            server = as_postgres;
        }
        let pg = Postgres {
            addr,
            dir,
            data,
            owner,
            server,
            servers: std::sync::Mutex::new(Vec::new()),
        };
        pg.resume();
        pg
    }

    /// Starts the server (again); returns once it accepts connections.
    pub fn resume(&self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("postgres.log"))
            .expect("log");
        // The server dies with this test process: the shell kills it when its standard input,
        // held open by this process, closes.
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"dir=$1; shift; "$@" & pid=$!; cat >/dev/null; kill -9 $pid; wait; rm -rf "$dir""#)
            .arg("sh")
            .arg(&self.dir)
            .args(&self.server)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("postgres runs");
        crate::support::lock_push(&self.servers, child);
        let addr = self.addr;
        wait_until_blocking("PostgreSQL accepts connections", || {
            std::net::TcpStream::connect(addr).is_ok()
        });
    }

    /// Stops the server at once (clients see their connections drop), keeping its data.
    pub fn stop(&self) {
        let out = as_owner(
            Command::new(bin("pg_ctl")).arg("-D").arg(&self.data),
            self.owner,
        )
        .args(["stop", "-m", "immediate", "-w"])
        .output()
        .expect("pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A new, empty database; its URL.
    pub async fn database(&self) -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let admin = self.url("postgres");
        let (client, conn) = loop {
            match tokio_postgres::connect(&admin, tokio_postgres::NoTls).await {
                Ok(c) => break c,
                // Up but still starting.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        };
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        self.url(&name)
    }

    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@{}:{}/{db}?sslmode=disable",
            self.addr.ip(),
            self.addr.port()
        )
    }
}
