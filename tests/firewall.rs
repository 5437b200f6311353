//! Kernel-level refusal, inside a network namespace this test creates for itself: with another
//! program listening on a wildcard cleartext port, the closed address still refuses (TCP
//! reset) once `portcullis firewall apply` ran, and its counter rises; `remove` restores the
//! previous behaviour and leaves no table behind; `serve` keeps the table in step with its
//! config, at start and on SIGHUP. Needs root, `ip` and `nft`.

use std::process::{Child, Command, Stdio};

#[path = "support/mod.rs"]
mod support;

/// A namespace, and what runs in it, removed when the test ends however it ends.
struct Netns {
    name: String,
    listener: Option<Child>,
    /// Other processes run in the namespace.
    others: Vec<Child>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for mut l in self
            .listener
            .take()
            .into_iter()
            .chain(self.others.drain(..))
        {
            let _ = l.kill();
            let _ = l.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(ns: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .expect("ip netns exec");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `curl` inside the namespace: the HTTP status, or curl's exit code as a negative number.
fn curl(ns: &str, url: &str) -> i32 {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            // Generous: a refusal is immediate, so this only bounds a request expected to work.
            "--max-time",
            "30",
            url,
        ])
        .output()
        .expect("curl");
    match out.status.code() {
        Some(0) => String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0),
        Some(c) => -c,
        None => -255,
    }
}

/// A fresh network namespace with loopback up, removed when the guard drops. Needs root and
/// the tools the tests drive; says which Debian package is missing.
fn fresh_netns(prefix: &str) -> Netns {
    let uid = Command::new("id").arg("-u").output().expect("id");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "this test needs root (network namespaces, nftables)"
    );
    for (tool, package) in [
        ("nft", "nftables"),
        ("ip", "iproute2"),
        ("curl", "curl"),
        ("python3", "python3"),
    ] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .status()
                .expect("sh")
                .success(),
            "{tool} is missing: install Debian's {package} (scripts/test.sh does it as root)"
        );
    }
    let name = format!(
        "{prefix}{}x{}",
        std::process::id(),
        support::loopback().octets()[2]
    );
    assert!(Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .expect("ip")
        .success());
    let ns = Netns {
        name: name.clone(),
        listener: None,
        others: Vec::new(),
    };
    assert!(run(&name, &["ip", "link", "set", "lo", "up"]).0);
    ns
}

#[test]
fn the_table_resets_cleartext_on_closed_addresses_counts_it_and_goes_away() {
    let mut ns = fresh_netns("pc");
    let name = ns.name.clone();
    // Another program holds a wildcard cleartext port: without the table, the closed address
    // would accept cleartext.
    ns.listener = Some(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &name,
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                "0.0.0.0",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("listener"),
    );
    support::wait_until_blocking(
        "the foreign listener answers on the closed address before the table exists",
        || curl(&name, "http://127.0.0.2:8080/") == 200,
    );

    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        r#"
[[pool]]
name = "closed"
addresses = ["127.0.0.2"]
tls_ports = [8443]
[[pool]]
name = "open"
addresses = ["127.0.0.3"]
tls_ports = [8443]
cleartext_ports = [8080]
[[site]]
host = "a.test"
pool = "closed"
origin = "http://127.0.0.1:9"
[[site]]
host = "b.test"
pool = "open"
origin = "http://127.0.0.1:9"
cleartext = "reject"
"#,
    )
    .expect("config");
    let bin = env!("CARGO_BIN_EXE_portcullis");
    let config = config.display().to_string();
    let (ok, printed) = run(&name, &[bin, "firewall", "print", "-c", &config]);
    assert!(
        ok && printed.contains("\"tcp reset\"") && printed.contains("refused_127_0_0_2"),
        "{printed}"
    );
    let (ok, out) = run(&name, &[bin, "firewall", "apply", "-c", &config]);
    assert!(ok, "{out}");
    // Refused by the kernel (curl exit 7: could not connect), on every closed port …
    assert_eq!(curl(&name, "http://127.0.0.2:8080/"), -7);
    assert_eq!(curl(&name, "http://127.0.0.2:80/"), -7);
    // … and counted; the open address is untouched.
    let (_, counters) = run(&name, &[bin, "firewall", "counters"]);
    let count: u64 = counters
        .lines()
        .find_map(|l| l.strip_prefix("refused_127_0_0_2 "))
        .and_then(|n| n.trim().parse().ok())
        .expect("a counter for the closed address");
    assert!(count >= 2, "{counters}");
    assert_eq!(curl(&name, "http://127.0.0.3:8080/"), 200);
    // Applying again replaces the table rather than adding a second set of rules.
    assert!(run(&name, &[bin, "firewall", "apply", "-c", &config]).0);
    let (_, listed) = run(&name, &["nft", "list", "table", "inet", "portcullis"]);
    assert_eq!(listed.matches("tcp reset").count(), 1, "{listed}");
    // Removed: behaviour reverts and no table is left.
    assert!(run(&name, &[bin, "firewall", "remove"]).0);
    assert_eq!(curl(&name, "http://127.0.0.2:8080/"), 200);
    let (_, tables) = run(&name, &["nft", "list", "tables"]);
    assert!(!tables.contains("portcullis"), "{tables}");
    drop(ns);
}

#[test]
fn serve_keeps_the_table_and_counts_refused_knocks_into_analytics() {
    let mut ns = fresh_netns("pd");
    let name = ns.name.clone();
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state");
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[state]
dir = "{}"
[analytics]
flush_interval = "1s"
[firewall]
manage = true
[[pool]]
name = "closed"
addresses = ["127.0.0.2"]
tls_ports = [8443]
[[site]]
host = "a.test"
pool = "closed"
origin = "http://127.0.0.1:9"
"#,
            state.display()
        ),
    )
    .expect("config");
    let bin = env!("CARGO_BIN_EXE_portcullis");
    ns.listener = Some(
        Command::new("ip")
            .args(["netns", "exec", &name, bin, "serve", "-c"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("serve"),
    );
    support::wait_until_blocking("serve applied the table", || {
        run(&name, &["nft", "list", "table", "inet", "portcullis"]).0
    });
    for _ in 0..3 {
        assert_eq!(curl(&name, "http://127.0.0.2:80/"), -7);
    }
    // serve reads the counters every 10 s; the store is written every second.
    let mut refused = 0;
    let deadline = support::Deadline::start();
    while !deadline.passed() {
        support::pause(std::time::Duration::from_millis(500));
        let out = Command::new(bin)
            .args(["impact", "a.test", "--json", "--state-dir"])
            .arg(&state)
            .output()
            .expect("impact");
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            refused = v["by_port"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["value"] == "refused by the firewall")
                .and_then(|r| r["requests"].as_u64())
                .unwrap_or(0);
            if refused >= 3 {
                break;
            }
        }
    }
    assert_eq!(
        refused, 3,
        "the knocks after closing are visible in the impact report"
    );
    // Deleting the namespace stops serve and takes the namespace's table with it.
    drop(ns);
}

/// A config for `serve` with the firewall managed and one closed pool on `closed`.
fn managed(state: &std::path::Path, closed: &[&str]) -> String {
    let addresses: Vec<String> = closed.iter().map(|a| format!("{a:?}")).collect();
    format!(
        r#"
[state]
dir = "{}"
[firewall]
manage = true
[[pool]]
name = "closed"
addresses = [{}]
tls_ports = [8443]
[[site]]
host = "a.test"
pool = "closed"
origin = "http://127.0.0.1:9"
"#,
        state.display(),
        addresses.join(", ")
    )
}

#[test]
fn sighup_applies_the_table_of_the_new_config() {
    let mut ns = fresh_netns("ph");
    let name = ns.name.clone();
    // Another program holds the wildcard cleartext port 80: only the table keeps a closed
    // address from accepting cleartext there.
    ns.listener = Some(
        Command::new("ip")
            .args(["netns", "exec", &name, "python3", "-m", "http.server", "80"])
            .args(["--bind", "0.0.0.0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("listener"),
    );
    support::wait_until_blocking("the foreign listener answers", || {
        curl(&name, "http://127.0.0.3:80/") == 200
    });
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state");
    let config = dir.path().join("portcullis.toml");
    std::fs::write(&config, managed(&state, &["127.0.0.2"])).expect("config");
    let serve = Command::new("ip")
        .args([
            "netns",
            "exec",
            &name,
            env!("CARGO_BIN_EXE_portcullis"),
            "serve",
            "-c",
        ])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    // `ip netns exec` execs the command: the child is portcullis itself.
    let pid = serve.id().to_string();
    ns.others.push(serve);
    support::wait_until_blocking("serve applied the table", || {
        curl(&name, "http://127.0.0.2:80/") == -7
    });
    assert_eq!(
        curl(&name, "http://127.0.0.3:80/"),
        200,
        "127.0.0.3 is in no closed pool yet"
    );

    // The closed pool grows by 127.0.0.3; a SIGHUP must guard it too, as an admin change does.
    std::fs::write(&config, managed(&state, &["127.0.0.2", "127.0.0.3"])).expect("config");
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill")
        .success());
    support::wait_until_blocking("the reload put 127.0.0.3 in the table", || {
        curl(&name, "http://127.0.0.3:80/") == -7
    });
    let (_, table) = run(&name, &["nft", "list", "table", "inet", "portcullis"]);
    assert!(table.contains("127.0.0.3"), "{table}");
    assert_eq!(curl(&name, "http://127.0.0.2:80/"), -7, "still guarded");
    drop(ns);
}
