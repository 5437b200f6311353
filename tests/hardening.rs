//! Silent and hostile clients over real sockets: connections that never send a request, HTTP/2
//! peers that ignore GOAWAY's PING, connection caps per client and in all, and descriptor floods
//! of the control plane and the edge under a low `RLIMIT_NOFILE`, with no accept loop spinning.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{
    client_config, get, https, loopback, roots_from, tls_connect, wait_until, Deadline, Harness,
    TestOrigin, PATIENCE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn one_site(ip: Ipv4Addr, origin: &str, edge: &str) -> String {
    format!(
        r#"
[state]
dir = "STATE"
[edge]
{edge}
[[pool]]
name = "p"
addresses = ["{ip}"]
tls_ports = [7443]
[[site]]
host = "hard.test"
pool = "p"
origin = "{origin}"
"#
    )
}

/// Reads until the peer closes; returns what was read and how long it took, or panics if the
/// connection is still open after `PATIENCE`.
async fn until_closed<T: tokio::io::AsyncRead + Unpin>(
    io: &mut T,
    what: &str,
) -> (Vec<u8>, Duration) {
    let started = Deadline::start();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // One deadline for the whole wait: a peer that keeps sending must not extend it.
    let read = async {
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    if tokio::time::timeout(PATIENCE, read).await.is_err() {
        panic!("{what}: still open after {:?}", started.elapsed());
    }
    (out, started.elapsed())
}

#[tokio::test]
async fn connections_that_send_no_request_are_closed_within_the_header_read_timeout() {
    let origin = TestOrigin::start().await;
    let ip = loopback();
    let edge = "header_read_timeout = \"1s\"\nidle_timeout = \"60s\"";
    let h = Harness::start(&one_site(ip, &origin.url(), edge)).await;
    let addr = SocketAddr::from((ip, 7443));
    for alpn in [&b"h2"[..], b"http/1.1"] {
        let mut tls = tls_connect(addr, "hard.test", client_config(h.roots(), &[alpn]))
            .await
            .expect("tls");
        let what = format!("a silent {} connection", String::from_utf8_lossy(alpn));
        let (_, took) = until_closed(&mut tls, &what).await;
        assert!(
            took >= Duration::from_millis(800),
            "{what} closed after {took:?}, before the header-read timeout"
        );
    }
    assert!(
        h.runtime.stats().first_request_timeouts >= 1,
        "{:?}",
        h.runtime.stats()
    );
}

/// HTTP/2 frames, hand-made so the client can misbehave: it never acknowledges anything.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The types of the frames in `bytes`, a stream of whole frames after the server preface.
fn frame_types(bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut i = 0;
    while i + 9 <= bytes.len() {
        let len = (bytes[i] as usize) << 16 | (bytes[i + 1] as usize) << 8 | bytes[i + 2] as usize;
        types.push(bytes[i + 3]);
        i += 9 + len;
    }
    types
}

#[tokio::test]
async fn an_http2_peer_that_pings_but_ignores_goaway_is_dropped() {
    let origin = TestOrigin::start().await;
    let ip = loopback();
    let edge = "idle_timeout = \"1s\"\nclose_timeout = \"1s\"";
    let h = Harness::start(&one_site(ip, &origin.url(), edge)).await;
    let addr = SocketAddr::from((ip, 7443));
    let tls = tls_connect(addr, "hard.test", client_config(h.roots(), &[b"h2"]))
        .await
        .expect("tls");
    let (mut rd, mut wr) = tokio::io::split(tls);
    // Preface, empty SETTINGS, then one GET: :method GET, :scheme https, :path /, and a
    // literal :authority (HPACK static indexes 2, 7, 4 and 1).
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(0x4, 0, 0, &[]));
    let mut block = vec![0x82, 0x87, 0x84, 0x41, 9];
    block.extend_from_slice(b"hard.test");
    hello.extend(frame(0x1, 0x5, 1, &block));
    wr.write_all(&hello).await.expect("write");
    // Then only PINGs of its own, every 200 ms: bytes keep moving, but no stream is open, and
    // the server's PING (sent with GOAWAY) is never answered.
    let pinger = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if wr.write_all(&frame(0x6, 0, 0, &[7; 8])).await.is_err() {
                return;
            }
        }
    });
    let (bytes, took) = until_closed(&mut rd, "an HTTP/2 connection that ignores GOAWAY").await;
    pinger.abort();
    let types = frame_types(&bytes);
    assert!(types.contains(&0x1), "the GET was answered: {types:?}");
    assert!(types.contains(&0x7), "GOAWAY before the drop: {types:?}");
    assert!(took >= Duration::from_secs(1), "closed after {took:?}");
    assert!(
        h.runtime.stats().forced_closes >= 1,
        "{:?}",
        h.runtime.stats()
    );
}

/// A TCP connection from `from` (a loopback address of the test's own) to `to`.
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::from((from, 0))).expect("bind");
    s.connect(to).await.expect("connect")
}

/// Whether the edge closed `s` at once, without a byte.
async fn closed_at_once(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(PATIENCE, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

async fn get_from(from: Ipv4Addr, addr: SocketAddr, roots: rustls::RootCertStore) -> u16 {
    let tcp = connect_from(from, addr).await;
    let name = rustls::pki_types::ServerName::try_from("hard.test").expect("name");
    let tls = tokio_rustls::TlsConnector::from(client_config(roots, &[b"http/1.1"]))
        .connect(name, tcp)
        .await
        .expect("tls");
    let got = support::send(
        hyper_util::rt::TokioIo::new(tls),
        false,
        get("https://hard.test/"),
    )
    .await;
    got.status.as_u16()
}

#[tokio::test]
async fn connection_caps_refuse_a_greedy_client_and_keep_serving_others() {
    let origin = TestOrigin::start().await;
    let ip = loopback();
    let metrics_ip = loopback();
    let edge = "handshake_timeout = \"60s\"\nmax_connections = 4\nmax_connections_per_client = 2";
    let toml = format!(
        "{}\n[metrics]\nlisten = \"{metrics_ip}:9464\"\n",
        one_site(ip, &origin.url(), edge)
    );
    let h = Harness::start(&toml).await;
    let addr = SocketAddr::from((ip, 7443));
    let (a, b, c) = (loopback(), loopback(), loopback());
    // Connections hold their place only once the edge has accepted them.
    let accepted = |n: i64| {
        let edge = &h.runtime;
        move || async move { edge.stats().active_connections >= n }
    };

    // One address: two connections, the third is closed at once.
    let mut held = vec![connect_from(a, addr).await, connect_from(a, addr).await];
    wait_until("two connections are accepted", accepted(2)).await;
    let mut third = connect_from(a, addr).await;
    assert!(
        closed_at_once(&mut third).await,
        "a third connection from one address"
    );
    assert_eq!(h.runtime.stats().refused_per_client, 1);
    assert_eq!(
        get_from(b, addr, h.roots()).await,
        200,
        "another address is served"
    );

    wait_until("the served connection is gone", || async {
        h.runtime.stats().active_connections == 2
    })
    .await;
    // In all: four, the fifth is closed whoever sends it.
    held.push(connect_from(b, addr).await);
    held.push(connect_from(c, addr).await);
    wait_until("four connections are accepted", accepted(4)).await;
    let mut fifth = connect_from(loopback(), addr).await;
    assert!(closed_at_once(&mut fifth).await, "a fifth connection");
    assert!(h.runtime.stats().refused_global >= 1);
    // A place freed is a place to serve.
    held.pop();
    wait_until("a place is free again", || async {
        h.runtime.stats().active_connections < 4
    })
    .await;
    assert_eq!(get_from(loopback(), addr, h.roots()).await, 200);

    let metrics = https(
        SocketAddr::from((metrics_ip, 9464)),
        &metrics_ip.to_string(),
        h.roots(),
        false,
        get(&format!("https://{metrics_ip}:9464/metrics")),
    )
    .await;
    assert!(
        metrics.body.contains(
            "portcullis_connections_refused_total{listener=\"edge\",reason=\"max_connections_per_client\"} 1"
        ),
        "{}",
        metrics.body
    );
    assert!(
        metrics.body.contains(
            "portcullis_connections_refused_total{listener=\"metrics\",reason=\"max_connections\"} 0"
        ),
        "the metrics listener's own caps are reported: {}",
        metrics.body
    );
    drop(held);
}

/// `portcullis serve` under a shell's `ulimit` (soft and hard, or soft only), logging to `log`.
fn serve_with_ulimit(dir: &Path, ulimit: &str, log: &Path) -> Child {
    let cmd = format!("ulimit {ulimit} && exec \"$0\" serve --workers 2 -c \"$1\"",);
    Command::new("sh")
        .args(["-c", &cmd, env!("CARGO_BIN_EXE_portcullis")])
        .arg(dir.join("portcullis.toml"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).expect("log")))
        .spawn()
        .expect("spawn serve")
}

/// User plus system CPU time of a process, in clock ticks (1/100 s on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// CPU ticks the process uses over two seconds.
async fn cpu_over_two_seconds(pid: u32) -> u64 {
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    cpu_ticks(pid) - before
}

/// Opens up to `n` connections to `addr` and holds them; some may be closed by the server.
async fn flood(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut v = Vec::new();
    for _ in 0..n {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => v.push(s),
            // The backlog is full: the server is not accepting, which is the point.
            _ => break,
        }
    }
    v
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_floods_under_a_low_ulimit_leave_the_edge_serving_without_spinning() {
    // This test holds some 700 sockets itself.
    let _ = portcullis::net::raise_nofile_limit();
    let origin = TestOrigin::start().await;
    let (ip, admin_ip, metrics_ip) = (loopback(), loopback(), loopback());
    let dir = tempfile::tempdir().expect("tmp");
    let edge = "handshake_timeout = \"60s\"\nmax_connections = 1000";
    let toml = format!(
        "{}\n[admin]\nlisten = \"{admin_ip}:9443\"\n[metrics]\nlisten = \"{metrics_ip}:9464\"\n",
        one_site(ip, &origin.url(), edge)
    );
    support::write_config(dir.path(), &toml);
    let log = dir.path().join("serve.log");
    let child = Killed(serve_with_ulimit(dir.path(), "-n 256", &log));
    let pid = child.0.id();
    let admin = SocketAddr::from((admin_ip, 9443));
    wait_until("the admin port listens", || async move {
        TcpStream::connect(admin).await.is_ok()
    })
    .await;
    let edge_addr = SocketAddr::from((ip, 7443));
    let roots = roots_from(&dir.path().join("state").join("dev-ca.pem"));
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(
        logged.contains("open file limit") && logged.contains("256"),
        "the log states the descriptor limit: {logged}"
    );

    // 300 silent admin connections and 100 silent metrics ones: the control plane keeps to
    // its caps, and the edge still has descriptors to serve with.
    let admin_flood = flood(admin, 300).await;
    let metrics_flood = flood(SocketAddr::from((metrics_ip, 9464)), 100).await;
    assert!(
        admin_flood.len() >= 200,
        "only {} admin connections",
        admin_flood.len()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ticks = cpu_over_two_seconds(pid).await;
    assert!(ticks < 60, "{ticks} ticks of CPU in 2 s: a loop spins");
    let got = https(
        edge_addr,
        "hard.test",
        roots.clone(),
        false,
        get("https://hard.test/"),
    )
    .await;
    assert_eq!(
        got.status, 200,
        "the edge serves beside a flooded control plane"
    );
    drop((admin_flood, metrics_flood));

    // The edge itself flooded past the descriptor limit (max_connections is set above it):
    // accept fails with EMFILE, and the loop backs off instead of spinning.
    let edge_flood = flood(edge_addr, 400).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ticks = cpu_over_two_seconds(pid).await;
    assert!(
        ticks < 60,
        "{ticks} ticks of CPU in 2 s while out of descriptors: a loop spins"
    );
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(logged.contains("accept failed; backing off"), "{logged}");
    drop(edge_flood);
    // Once descriptors are free, the edge accepts again.
    wait_until("the edge serves again", || {
        let roots = roots.clone();
        async move {
            let Ok(Ok(tls)) = tokio::time::timeout(
                Duration::from_secs(5),
                tls_connect(edge_addr, "hard.test", client_config(roots, &[b"http/1.1"])),
            )
            .await
            else {
                return false;
            };
            let got = support::send(
                hyper_util::rt::TokioIo::new(tls),
                false,
                get("https://hard.test/"),
            )
            .await;
            got.status == 200
        }
    })
    .await;
    drop(child);
}

#[tokio::test]
async fn serve_raises_a_low_soft_descriptor_limit_and_says_so() {
    let origin = TestOrigin::start().await;
    let ip = loopback();
    let dir = tempfile::tempdir().expect("tmp");
    support::write_config(dir.path(), &one_site(ip, &origin.url(), ""));
    let log = dir.path().join("serve.log");
    let hard = Command::new("sh")
        .args(["-c", "ulimit -H -n"])
        .output()
        .expect("ulimit");
    let hard = String::from_utf8_lossy(&hard.stdout).trim().to_owned();
    let _child = Killed(serve_with_ulimit(dir.path(), "-S -n 300", &log));
    wait_until("serve logs its descriptor limit", || {
        let log = log.clone();
        async move { std::fs::read_to_string(&log).is_ok_and(|l| l.contains("open file limit")) }
    })
    .await;
    let logged = std::fs::read_to_string(&log).expect("log");
    if hard == "300" {
        return;
    }
    assert!(
        logged.contains("raised the open file limit") && logged.contains("before=300"),
        "{logged}"
    );
}

#[tokio::test]
async fn silent_admin_and_metrics_connections_are_closed() {
    let origin = TestOrigin::start().await;
    let (ip, admin_ip, metrics_ip) = (loopback(), loopback(), loopback());
    let toml = format!(
        "{}\n[admin]\nlisten = \"{admin_ip}:9443\"\n[metrics]\nlisten = \"{metrics_ip}:9464\"\n",
        one_site(ip, &origin.url(), "")
    );
    let serve = support::Serve::start(&toml);
    let admin = SocketAddr::from((admin_ip, 9443));
    let metrics = SocketAddr::from((metrics_ip, 9464));
    wait_until("the admin port listens", || async move {
        TcpStream::connect(admin).await.is_ok()
    })
    .await;
    let roots = roots_from(&serve.ca());
    // A TCP connection that sends nothing, and a TLS one that sends no request, to each port.
    let mut open = Vec::new();
    for (addr, ip) in [(admin, admin_ip), (metrics, metrics_ip)] {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let tls = tls_connect(
            addr,
            &ip.to_string(),
            client_config(roots.clone(), &[b"http/1.1"]),
        )
        .await
        .expect("tls");
        open.push((addr, tcp, tls, Deadline::start()));
    }
    let waits = open
        .into_iter()
        .map(|(addr, mut tcp, mut tls, opened)| async move {
            until_closed(&mut tcp, &format!("a silent TCP connection to {addr}")).await;
            let took = opened.elapsed();
            assert!(took >= Duration::from_secs(5), "closed after {took:?}");
            until_closed(&mut tls, &format!("a silent TLS connection to {addr}")).await;
        });
    for w in waits.collect::<Vec<_>>() {
        w.await;
    }
}
