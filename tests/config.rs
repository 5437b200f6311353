//! `portcullis check`: every rule of the validator, reported with file, key and value, all at
//! once, with exit status 1; and the example configs pass.

mod support;

use std::path::Path;
use std::process::Command;

use support::TestCa;

fn check(path: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check", "-c"])
        .arg(path)
        .output()
        .expect("run portcullis check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("bad.toml");
    std::fs::write(&p, text).expect("write");
    p
}

#[test]
fn example_configs_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).expect("examples") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (ok, stdout, stderr) = check(&path);
            assert!(ok, "{}: {stderr}", path.display());
            assert!(stdout.contains("OK"), "{stdout}");
            n += 1;
        }
    }
    assert!(n >= 1);
}

#[test]
fn every_problem_is_reported_with_file_key_value_and_the_parties_involved() {
    let dir = tempfile::tempdir().expect("tmp");
    let ca = TestCa::new();
    let (cert_a, _) = ca.issue(dir.path(), "a", &["mismatch.test"]);
    let (_, key_b) = ca.issue(dir.path(), "b", &["mismatch.test"]);
    let (cert_c, key_c) = ca.issue(dir.path(), "c", &["someone-else.test"]);
    let text = format!(
        r#"
[[pool]]
name = "closed"
addresses = ["192.0.2.10"]
tls_ports = [443]

[[pool]]
name = "open"
addresses = ["192.0.2.20", "192.0.2.10"]
tls_ports = [443, 70000]
cleartext_ports = [80, 0]

[[pool]]
name = "everywhere"
addresses = ["0.0.0.0"]
tls_ports = [8443]
cleartext_ports = [8080]

[[pool]]
name = "noquic"
addresses = ["192.0.2.30"]
tls_ports = [443]
http3 = false

[[site]]
host = "h3-on-noquic.test"
pool = "noquic"
origin = "http://127.0.0.1:9000"
http3 = true

[[site]]
host = "closed-on-open.test"
pool = "open"
origin = "http://127.0.0.1:9000"
cleartext = "closed"

[[site]]
host = "redirect-on-closed.test"
pool = "closed"
origin = "http://127.0.0.1:9000"
cleartext = "redirect"

[[site]]
host = "twice.test"
pool = "closed"
origin = "http://127.0.0.1:9000"

[[site]]
host = "TWICE.test"
pool = "closed"
origin = "http://127.0.0.1:9000"

[[site]]
host = "lost.test"
pool = "nowhere"
origin = "http://127.0.0.1:9000"

[[site]]
host = "badorigin.test"
pool = "closed"
origin = "ftp://files.example/dir"

[[site]]
host = "unreadable.test"
pool = "closed"
origin = "http://127.0.0.1:9000"
cert = "/nonexistent/cert.pem"
key = "/nonexistent/key.pem"

[[site]]
host = "mismatch.test"
pool = "closed"
origin = "http://127.0.0.1:9000"
cert = "{cert_a}"
key = "{key_b}"

[[site]]
host = "notcovered.test"
pool = "closed"
origin = "http://127.0.0.1:9000"
cert = "{cert_c}"
key = "{key_c}"

[[site]]
host = "mode.test"
pool = "open"
origin = "http://127.0.0.1:9000"
cleartext = "maybe"

[exposure]
delivery_timeout = "1h"

[store]
url = "postgres://portcullis@db.internal/portcullis"
poll_interval = "50ms"
"#,
        cert_a = cert_a.display(),
        key_b = key_b.display(),
        cert_c = cert_c.display(),
        key_c = key_c.display(),
    );
    let path = write(dir.path(), &text);
    let (ok, _, stderr) = check(&path);
    assert!(!ok, "check must fail");
    let file = path.display().to_string();
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.iter().all(|l| l.starts_with(&file)),
        "every line names the file:\n{stderr}"
    );
    let expect = |fragments: &[&str]| {
        assert!(
            lines
                .iter()
                .any(|l| fragments.iter().all(|f| l.contains(f))),
            "no line contains all of {fragments:?}:\n{stderr}"
        );
    };
    // HTTP/3 asked of a site whose pool has no QUIC socket.
    expect(&[
        "h3-on-noquic.test",
        "http3 = true",
        "\"noquic\" has http3 = false",
    ]);
    // A closed site on a pool with cleartext ports: site, pool and address named.
    expect(&[
        "closed-on-open.test",
        "\"open\"",
        "192.0.2.20",
        "cleartext = \"closed\"",
    ]);
    // A site on a closed pool with another mode.
    expect(&[
        "redirect-on-closed.test",
        "\"closed\"",
        "192.0.2.10",
        "\"redirect\"",
    ]);
    // An address in two pools.
    expect(&["addresses[1]", "192.0.2.10", "\"closed\"", "\"open\""]);
    // The same host twice (case-insensitive).
    expect(&["TWICE.test", "twice", "configured twice"]);
    // Unknown pool.
    expect(&["lost.test", "pool = \"nowhere\"", "no pool"]);
    // Bad origin URL.
    expect(&["badorigin.test", "origin = \"ftp://files.example/dir\""]);
    // Unreadable and mismatched certificate files; certificate not covering the host.
    expect(&["unreadable.test", "/nonexistent/cert.pem"]);
    expect(&["mismatch.test", "does not match"]);
    expect(&["notcovered.test", "does not cover"]);
    // Ports out of range.
    expect(&["tls_ports[1] = 70000", "out of range"]);
    expect(&["cleartext_ports[1] = 0", "out of range"]);
    // A wildcard address with cleartext ports while a closed pool exists.
    expect(&[
        "\"everywhere\"",
        "0.0.0.0",
        "closed pool \"closed\"",
        "192.0.2.10",
    ]);
    // Unknown mode.
    expect(&["mode.test", "\"maybe\"", "unknown mode"]);
    // A delivery timeout that would let a dead node's claims block a fleet for hours.
    expect(&["exposure.delivery_timeout", "\"1h\"", "at most \"5m\""]);
    // A poll that would load the database for little gain.
    expect(&[
        "store.poll_interval",
        "\"50ms\"",
        "between \"100ms\" and \"60s\"",
    ]);
    assert!(lines.len() >= 15, "all problems at once:\n{stderr}");
}

#[test]
fn unknown_keys_and_syntax_errors_name_the_place() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = write(
        dir.path(),
        "[[pool]]\nname = \"p\"\naddresses = [\"192.0.2.1\"]\ntls_ports = [443]\nclear_ports = [80]\n",
    );
    let (ok, _, stderr) = check(&path);
    assert!(!ok);
    assert!(stderr.contains("clear_ports"), "{stderr}");
    assert!(stderr.contains("line 5"), "{stderr}");

    let path = write(dir.path(), "[[site]\nhost = 1\n");
    let (ok, _, stderr) = check(&path);
    assert!(!ok);
    assert!(stderr.contains("line 1"), "{stderr}");

    let (ok, _, stderr) = check(&dir.path().join("missing.toml"));
    assert!(!ok);
    assert!(
        stderr.contains("missing.toml") && stderr.contains("cannot read"),
        "{stderr}"
    );
}

#[test]
fn another_program_listening_on_a_closed_address_cleartext_port_is_warned_about() {
    let ip = support::loopback();
    // Stands in for another program holding a cleartext port on the closed address.
    let other = std::net::TcpListener::bind((ip, 8880)).expect("bind");
    let dir = tempfile::tempdir().expect("tmp");
    let path = write(
        dir.path(),
        &format!(
            "[[pool]]\nname = \"api\"\naddresses = [\"{ip}\"]\ntls_ports = [443]\n\n[[site]]\nhost = \"api.test\"\npool = \"api\"\norigin = \"http://127.0.0.1:9\"\n"
        ),
    );
    let (ok, stdout, _) = check(&path);
    assert!(ok, "a warning, not an error");
    assert!(
        stdout.contains(&format!("warning: another program listens on {ip}:8880"))
            && stdout.contains("\"api\""),
        "{stdout}"
    );
    drop(other);
    let (_, stdout, _) = check(&path);
    assert!(!stdout.contains("warning"), "{stdout}");
}

#[test]
fn cleartext_admin_and_unsafe_webhooks_are_rejected() {
    let dir = tempfile::tempdir().expect("tmp");
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, "short").expect("secret");
    let text = format!(
        r#"
[admin]
listen = "http://127.0.0.1:9443"
[[pool]]
name = "open"
addresses = ["192.0.2.20"]
tls_ports = [443]
cleartext_ports = [80]
[[site]]
host = "plain-hook.test"
pool = "open"
origin = "http://127.0.0.1:9"
cleartext = "reject"
exposure_response = "revoke"
webhook = {{ url = "http://hooks.example/x", secret_file = "{secret}" }}
[[site]]
host = "weak-secret.test"
pool = "open"
origin = "http://127.0.0.1:9"
cleartext = "reject"
exposure_response = "notify"
webhook = {{ url = "https://hooks.example/x", secret_file = "{secret}", include_raw = true }}
[[site]]
host = "no-hook.test"
pool = "open"
origin = "http://127.0.0.1:9"
cleartext = "reject"
exposure_response = "notify"
"#,
        secret = secret.display()
    );
    let path = write(dir.path(), &text);
    let (ok, _, stderr) = check(&path);
    assert!(!ok);
    for fragment in [
        "admin.listen = \"http://127.0.0.1:9443\": the admin plane is HTTPS-only",
        "plain-hook.test",
        "an https:// URL",
        "the secret needs at least 16 bytes",
        "no-hook.test",
        "notify and revoke need webhook",
    ] {
        assert!(stderr.contains(fragment), "{fragment:?} not in:\n{stderr}");
    }
    let path = write(
        dir.path(),
        "[admin]\nlisten = \"127.0.0.1:9443\"\ntls = false\n",
    );
    let (ok, _, stderr) = check(&path);
    assert!(
        !ok && stderr.contains("admin.tls = false: the admin plane is HTTPS-only"),
        "{stderr}"
    );
}

#[test]
fn hash_token_prints_the_digest_the_config_expects() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("hash-token")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"my-read-only-token\n")
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    // SHA-256 of the token without its newline, computed independently of portcullis.
    let want: String = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b"my-read-only-token")
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want);
}

#[test]
fn check_refuses_acme_sites_that_cannot_be_validated_and_names_each() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad = write(
        dir.path(),
        r#"
[dns]
listen = "192.0.2.53:53"
zones = ["served.test"]
[[pool]]
name = "closed"
addresses = ["192.0.2.10"]
tls_ports = [443]
[[site]]
host = "*.wild.served.test"
pool = "closed"
origin = "http://127.0.0.1:9000"
cert = "acme"
acme_challenge = "tls-alpn-01"
[[site]]
host = "www.elsewhere.test"
pool = "closed"
origin = "http://127.0.0.1:9000"
cert = "acme"
acme_challenge = "dns-01"
[[site]]
host = "keyed.served.test"
pool = "closed"
origin = "http://127.0.0.1:9000"
cert = "acme"
key = "k.pem"
acme_challenge = "http-01"
"#,
    );
    let (ok, _, stderr) = check(&bad);
    assert!(!ok);
    for (key, what) in [
        (
            r#"site[0] ("*.wild.served.test").acme_challenge"#,
            "dns-01 only",
        ),
        (
            r#"site[0] ("*.wild.served.test").cert"#,
            "needs an [acme] section",
        ),
        (
            r#"site[1] ("www.elsewhere.test").acme_challenge"#,
            "_acme-challenge.www.elsewhere.test",
        ),
        (r#"site[2] ("keyed.served.test").key"#, "remove key"),
        (
            r#"site[2] ("keyed.served.test").acme_challenge"#,
            "no challenge that needs cleartext",
        ),
    ] {
        assert!(
            stderr.lines().any(|l| l.contains(key) && l.contains(what)),
            "{key}: {what}\n{stderr}"
        );
    }

    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        r#"
[acme]
directory = "https://acme-staging-v02.api.letsencrypt.org/directory"
contact = ["mailto:ops@served.test"]
renew_before = "30d"
[dns]
listen = "192.0.2.53:53"
zones = ["served.test"]
[[pool]]
name = "closed"
addresses = ["192.0.2.10"]
tls_ports = [8443]
[[site]]
host = "*.wild.served.test"
pool = "closed"
origin = "http://127.0.0.1:9000"
cert = "acme"
[[site]]
host = "www.served.test"
pool = "closed"
origin = "http://127.0.0.1:9000"
cert = "acme"
"#,
    )
    .expect("write");
    let (ok, stdout, stderr) = check(&good);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(
            "site *.wild.served.test gets its certificate from the ACME CA through dns-01"
        ),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("warning: site www.served.test") && l.contains("port 443 only")),
        "{stdout}"
    );
    assert!(
        !stdout.contains("warning: site *.wild"),
        "dns-01 needs no port: {stdout}"
    );

    let cleartext = dir.path().join("cleartext.toml");
    std::fs::write(
        &cleartext,
        std::fs::read_to_string(&good)
            .expect("read")
            .replace("https://acme-staging", "http://acme-staging"),
    )
    .expect("write");
    let (ok, _, stderr) = check(&cleartext);
    assert!(!ok);
    assert!(
        stderr.contains("acme.directory") && stderr.contains("https://"),
        "{stderr}"
    );
}
