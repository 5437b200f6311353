//! The authoritative DNS server over real UDP and TCP queries (hickory's message codec and,
//! for one test, Debian's `dig`), the zone export through `named-checkzone`, and a few
//! thousand malformed packets; DNS over TCP's message timeout, per-client cap, framing and
//! shutdown.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::rdata::svcb::{SvcParamKey, SvcParamValue};
use hickory_proto::rr::{Name, RData, RecordType};
use portcullis::config::Config;
use portcullis::dns::{serve_sockets, DnsHandler, TcpPolicy, Zones, TCP_MAX_PER_CLIENT};
use portcullis::net::Limits;
use support::{loopback, Harness, TestOrigin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// `closed_extra`: more addresses for the closed pool (loopback ones, so the edge can bind them).
fn config(
    closed: Ipv4Addr,
    closed_extra: &[String],
    tls_port: u16,
    open: Ipv4Addr,
    dns: SocketAddr,
    origin: &str,
    api_pool: &str,
) -> String {
    let extra: String = closed_extra.iter().map(|a| format!(", \"{a}\"")).collect();
    format!(
        r#"
[state]
dir = "STATE"
[dns]
listen = "{dns}"
zones = ["example.test"]
ttl = 120
[[pool]]
name = "closed"
addresses = ["{closed}"{extra}]
tls_ports = [{tls_port}]
[[pool]]
name = "open"
addresses = ["{open}"]
tls_ports = [7443]
cleartext_ports = [7080]
[[site]]
host = "api.example.test"
pool = "{api_pool}"
origin = "{origin}"
cleartext = "{api_mode}"
[[site]]
host = "*.apps.example.test"
pool = "open"
origin = "{origin}"
cleartext = "redirect"
[[site]]
host = "outside.other.test"
pool = "open"
origin = "{origin}"
cleartext = "reject"
"#,
        api_mode = if api_pool == "closed" {
            "closed"
        } else {
            "redirect"
        },
    )
}

struct Setup {
    h: Harness,
    dns: SocketAddr,
    closed: Ipv4Addr,
    extra: Vec<String>,
    tls_port: u16,
    open: Ipv4Addr,
    origin: TestOrigin,
}

async fn setup(extra: Vec<String>, tls_port: u16) -> Setup {
    let origin = TestOrigin::start().await;
    let (closed, open) = (loopback(), loopback());
    let dns = SocketAddr::from((loopback(), 5353));
    let h = Harness::start(&config(
        closed,
        &extra,
        tls_port,
        open,
        dns,
        &origin.url(),
        "closed",
    ))
    .await;
    Setup {
        h,
        dns,
        closed,
        extra,
        tls_port,
        open,
        origin,
    }
}

/// A port for `[::1]`, the one IPv6 loopback address, unlikely to clash with another test.
fn v6_port() -> u16 {
    let o = loopback().octets();
    30000 + (u16::from(o[1]) * 97 + u16::from(o[2])) % 20000
}

fn query(name: &str, t: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 4242;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), t));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m.to_vec().expect("encode")
}

async fn udp(server: SocketAddr, packet: &[u8]) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    sock.send_to(packet, server).await.expect("send");
    let mut buf = vec![0u8; 65_535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
        .await
        .expect("an answer")
        .expect("recv");
    Message::from_vec(&buf[..n]).expect("decode")
}

async fn tcp(server: SocketAddr, packet: &[u8]) -> Message {
    let mut s = TcpStream::connect(server).await.expect("connect");
    s.write_all(&(packet.len() as u16).to_be_bytes())
        .await
        .expect("len");
    s.write_all(packet).await.expect("write");
    let len = s.read_u16().await.expect("read len") as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await.expect("read");
    Message::from_vec(&buf).expect("decode")
}

async fn ask(server: SocketAddr, name: &str, t: RecordType) -> Message {
    udp(server, &query(name, t, true)).await
}

fn addresses(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn serial(m: &Message) -> u32 {
    m.answers
        .iter()
        .chain(&m.authorities)
        .find_map(|r| match &r.data {
            RData::SOA(s) => Some(s.serial),
            _ => None,
        })
        .expect("an SOA")
}

#[tokio::test]
async fn sites_answer_with_their_pool_addresses_and_an_https_record() {
    let s = setup(vec!["::1".into()], v6_port()).await;
    let a = ask(s.dns, "api.example.test.", RecordType::A).await;
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(a.metadata.authoritative);
    assert_eq!(addresses(&a), vec![IpAddr::V4(s.closed)]);
    assert_eq!(a.answers[0].ttl, 120);
    let aaaa = ask(s.dns, "API.Example.Test.", RecordType::AAAA).await;
    assert_eq!(addresses(&aaaa), vec!["::1".parse::<IpAddr>().expect("ip")]);

    let https = ask(s.dns, "api.example.test.", RecordType::HTTPS).await;
    let RData::HTTPS(rec) = &https.answers[0].data else {
        panic!("not HTTPS: {https:?}")
    };
    assert_eq!(rec.0.svc_priority, 1);
    assert!(rec.0.target_name.is_root());
    assert!(rec
        .0
        .svc_params
        .contains(&(SvcParamKey::Port, SvcParamValue::Port(s.tls_port))));
    let alpn = rec.0.svc_params.iter().find_map(|(_, v)| match v {
        SvcParamValue::Alpn(a) => Some(a.0.clone()),
        _ => None,
    });
    assert_eq!(
        alpn,
        Some(vec!["h3".into(), "h2".into(), "http/1.1".into()]),
        "h3 first: the pool serves HTTP/3"
    );
    assert!(rec
        .0
        .svc_params
        .iter()
        .any(|(k, _)| *k == SvcParamKey::Ipv4Hint));
    assert!(rec
        .0
        .svc_params
        .iter()
        .any(|(k, _)| *k == SvcParamKey::Ipv6Hint));

    // A site on a pool whose TLS port is not 443 says which port.
    let https = ask(s.dns, "shop.apps.example.test.", RecordType::HTTPS).await;
    let RData::HTTPS(rec) = &https.answers[0].data else {
        panic!("not HTTPS")
    };
    assert!(rec
        .0
        .svc_params
        .contains(&(SvcParamKey::Port, SvcParamValue::Port(7443))));
    assert_eq!(https.answers[0].name.to_ascii(), "shop.apps.example.test.");
    drop(s.origin);
}

#[tokio::test]
async fn soa_ns_nxdomain_nodata_and_refused() {
    let s = setup(vec![], 9443).await;
    let soa = ask(s.dns, "example.test.", RecordType::SOA).await;
    assert!(matches!(soa.answers[0].data, RData::SOA(_)));
    let ns = ask(s.dns, "example.test.", RecordType::NS).await;
    assert!(matches!(ns.answers[0].data, RData::NS(_)));
    // A name under the wildcard suffix but two labels deep, and a plain unknown name.
    for name in ["nope.example.test.", "a.b.apps.example.test."] {
        let nx = ask(s.dns, name, RecordType::A).await;
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(
            matches!(nx.authorities[0].data, RData::SOA(_)),
            "SOA in authority for {name}"
        );
    }
    // The name exists (as an empty non-terminal, or without AAAA): NODATA, not NXDOMAIN.
    for (name, t) in [
        ("apps.example.test.", RecordType::A),
        ("api.example.test.", RecordType::AAAA),
    ] {
        let nodata = ask(s.dns, name, t).await;
        assert_eq!(
            nodata.metadata.response_code,
            ResponseCode::NoError,
            "{name}"
        );
        assert!(nodata.answers.is_empty());
        assert!(matches!(nodata.authorities[0].data, RData::SOA(_)));
    }
    // Outside every zone: refused, even for a configured site.
    for name in ["outside.other.test.", "example.com."] {
        assert_eq!(
            ask(s.dns, name, RecordType::A).await.metadata.response_code,
            ResponseCode::Refused
        );
    }
    // TCP answers the same.
    let t = tcp(s.dns, &query("api.example.test.", RecordType::A, false)).await;
    assert_eq!(addresses(&t), vec![IpAddr::V4(s.closed)]);
}

#[tokio::test]
async fn a_udp_answer_too_big_for_512_bytes_is_truncated_and_tcp_gives_all() {
    // 40 more loopback addresses: 41 A records do not fit in 512 bytes.
    let extra: Vec<String> = (0..40).map(|_| loopback().to_string()).collect();
    let s = setup(extra, 9443).await;
    let packet = query("api.example.test.", RecordType::A, false);
    let over_udp = udp(s.dns, &packet).await;
    assert!(over_udp.metadata.truncation, "TC set without EDNS");
    let over_tcp = tcp(s.dns, &packet).await;
    assert!(!over_tcp.metadata.truncation);
    assert_eq!(addresses(&over_tcp).len(), 41);
}

#[tokio::test]
async fn answers_follow_reloads_and_the_serial_increases() {
    let s = setup(vec![], 9443).await;
    let before = ask(s.dns, "example.test.", RecordType::SOA).await;
    // Asked before the reload too: an answer kept for these exact bytes must not outlive it.
    let a = ask(s.dns, "api.example.test.", RecordType::A).await;
    assert_eq!(addresses(&a), vec![IpAddr::V4(s.closed)]);
    // A reload that changes nothing keeps the serial.
    let same = config(
        s.closed,
        &s.extra,
        s.tls_port,
        s.open,
        s.dns,
        &s.origin.url(),
        "closed",
    );
    s.h.reload(&same).await.expect("reload");
    assert_eq!(
        serial(&ask(s.dns, "example.test.", RecordType::SOA).await),
        serial(&before)
    );
    // Moving the API to the open pool changes its answer at once.
    let moved = config(
        s.closed,
        &s.extra,
        s.tls_port,
        s.open,
        s.dns,
        &s.origin.url(),
        "open",
    );
    s.h.reload(&moved).await.expect("reload");
    let a = ask(s.dns, "api.example.test.", RecordType::A).await;
    assert_eq!(addresses(&a), vec![IpAddr::V4(s.open)]);
    let after = ask(s.dns, "api.example.test.", RecordType::SOA).await;
    assert!(serial(&after) > serial(&before));
}

#[tokio::test]
async fn the_same_query_again_gets_the_same_answer_under_its_own_id() {
    let s = setup(vec![], 9443).await;
    let mut packet = query("API.example.test.", RecordType::A, true);
    let first = udp(s.dns, &packet).await;
    for id in [1u16, 4242, 65535] {
        packet[..2].copy_from_slice(&id.to_be_bytes());
        let again = udp(s.dns, &packet).await;
        assert_eq!(again.metadata.id, id);
        assert_eq!(again.answers, first.answers);
        // The question comes back as it was asked, case included.
        assert_eq!(again.queries[0].name().to_ascii(), "API.example.test.");
    }
    // Without EDNS the same name is another query: its answer carries no OPT record.
    let plain = udp(s.dns, &query("API.example.test.", RecordType::A, false)).await;
    assert!(plain.edns.is_none());
    assert_eq!(plain.answers, first.answers);
    assert!(first.edns.is_some());
}

#[tokio::test]
async fn malformed_and_random_packets_never_stop_the_server() {
    let s = setup(vec![], 9443).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let valid = query("api.example.test.", RecordType::A, true);
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15 ^ std::process::id() as u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..3000 {
        let packet: Vec<u8> = if i % 2 == 0 {
            let len = (next() % 600) as usize;
            (0..len).map(|_| next() as u8).collect()
        } else {
            // A valid query with a few bytes flipped, truncated or extended.
            let mut p = valid.clone();
            for _ in 0..(1 + next() % 4) {
                let at = (next() as usize) % p.len();
                p[at] = next() as u8;
            }
            match next() % 3 {
                0 => p.truncate((next() as usize) % p.len()),
                1 => p.extend((0..(next() % 40)).map(|_| next() as u8)),
                _ => {}
            }
            p
        };
        let _ = sock.send_to(&packet, s.dns).await;
        if i % 100 == 0 {
            // Random bytes on TCP too, then a close.
            if let Ok(mut t) = TcpStream::connect(s.dns).await {
                let _ = t.write_all(&packet).await;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a = ask(s.dns, "api.example.test.", RecordType::A).await;
    assert_eq!(addresses(&a), vec![IpAddr::V4(s.closed)]);
    let t = tcp(s.dns, &query("api.example.test.", RecordType::A, false)).await;
    assert_eq!(t.metadata.response_code, ResponseCode::NoError);
}

// dig runs as a blocking child process: the server needs threads of its own meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_sees_the_answers_and_named_checkzone_loads_the_export() {
    for tool in ["dig", "named-checkzone"] {
        assert!(
            std::process::Command::new(tool).arg("-v").output().is_ok(),
            "{tool} is missing: install Debian's bind9-dnsutils and bind9-utils (scripts/test.sh does it as root)"
        );
    }
    let s = setup(vec![], 9443).await;
    let dig = |args: &[&str]| {
        let out = std::process::Command::new("dig")
            .args([
                "+norec",
                "+time=2",
                "+tries=1",
                &format!("@{}", s.dns.ip()),
                "-p",
                &s.dns.port().to_string(),
            ])
            .args(args)
            .output()
            .expect("dig");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = dig(&["api.example.test", "HTTPS"]);
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(out.contains("flags: qr aa"), "authoritative: {out}");
    assert!(
        out.contains(&format!(
            "alpn=\"h3,h2,http/1.1\" port=9443 ipv4hint={}",
            s.closed
        )),
        "{out}"
    );
    let out = dig(&["+tcp", "x.apps.example.test", "A", "+short"]);
    assert_eq!(out.trim(), s.open.to_string());
    let out = dig(&["missing.example.test", "A"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");

    // Exported from a config with IPv6 and port 443 (export binds nothing).
    let file = s.h.dir.path().join("export.toml");
    let text = config(
        s.closed,
        &["2001:db8::10".into()],
        443,
        s.open,
        s.dns,
        &s.origin.url(),
        "closed",
    )
    .replace("STATE", &s.h.dir.path().join("state").display().to_string());
    std::fs::write(&file, text).expect("write");
    let export = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["dns", "export", "example.test", "-c"])
        .arg(&file)
        .output()
        .expect("export");
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let zone = s.h.dir.path().join("example.test.zone");
    std::fs::write(&zone, &export.stdout).expect("write zone");
    let check = std::process::Command::new("named-checkzone")
        .arg("example.test")
        .arg(&zone)
        .output()
        .expect("named-checkzone");
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && text.contains("OK"),
        "{text}\n{}",
        String::from_utf8_lossy(&export.stdout)
    );
    let exported = String::from_utf8_lossy(&export.stdout);
    assert!(
        exported
            .contains("*.apps.example.test. 120 IN HTTPS 1 . alpn=\"h3,h2,http/1.1\" port=7443"),
        "{exported}"
    );
    let api = format!(
        "api.example.test. 120 IN HTTPS 1 . alpn=\"h3,h2,http/1.1\" ipv4hint={} ipv6hint=2001:db8::10",
        s.closed
    );
    assert!(
        exported.contains(&api),
        "port 443 needs no port parameter: {exported}"
    );
}

fn move_config(
    closed: Ipv4Addr,
    open: Ipv4Addr,
    dns: SocketAddr,
    origin: &str,
    shop_pool: &str,
) -> String {
    format!(
        r#"
[state]
dir = "STATE"
[analytics]
flush_interval = "200ms"
[dns]
listen = "{dns}"
zones = ["example.test"]
ttl = 2
[[pool]]
name = "closed"
addresses = ["{closed}"]
tls_ports = [9443]
[[pool]]
name = "open"
addresses = ["{open}"]
tls_ports = [9443]
cleartext_ports = [9080]
[[site]]
host = "shop.example.test"
pool = "{shop_pool}"
origin = "{origin}"
cleartext = "{mode}"
[[site]]
host = "www.example.test"
pool = "open"
origin = "{origin}"
cleartext = "allow"
"#,
        mode = if shop_pool == "closed" {
            "closed"
        } else {
            "redirect"
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_moved_to_a_closed_pool_drains_from_its_old_addresses() {
    let origin = TestOrigin::start().await;
    let (closed, open) = (loopback(), loopback());
    let dns = SocketAddr::from((loopback(), 5353));
    let h = Harness::start(&move_config(closed, open, dns, &origin.url(), "open")).await;
    let old_clear = SocketAddr::from((open, 9080));
    let old_tls = SocketAddr::from((open, 9443));
    assert_eq!(
        support::http(old_clear, support::get("http://shop.example.test/"))
            .await
            .status,
        301
    );

    h.reload(&move_config(closed, open, dns, &origin.url(), "closed"))
        .await
        .expect("move");
    // DNS answers with the closed pool at once.
    assert_eq!(
        addresses(&ask(dns, "shop.example.test.", RecordType::A).await),
        vec![IpAddr::V4(closed)]
    );
    // Until the old answers expire, the old address behaves as before, TLS and cleartext.
    assert_eq!(
        support::http(old_clear, support::get("http://shop.example.test/a"))
            .await
            .status,
        301
    );
    let got = support::https(
        old_tls,
        "shop.example.test",
        h.roots(),
        false,
        support::get("https://shop.example.test/"),
    )
    .await;
    assert_eq!(got.status, 200);
    let drains = h.runtime.snapshot().drains().to_vec();
    assert_eq!(drains.len(), 1);
    assert_eq!(drains[0].until, drains[0].moved_at + 2);
    // The deadline is shown by the impact report.
    let state = h.dir.path().join("state");
    // The store needs a flush for the impact report; the drain deadline is moved past with the
    // schedule clock rather than waited for.
    tokio::time::sleep(Duration::from_millis(500)).await;
    portcullis::clock::advance(3);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["impact", "shop.example.test", "--state-dir"])
        .arg(&state)
        .output()
        .expect("impact");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("moved from pool \"open\" to closed pool \"closed\""),
        "{text}{err}"
    );
    // After the deadline: cleartext on the old address gets the reject answer; TLS still works.
    let got = support::http(old_clear, support::get("http://shop.example.test/a")).await;
    assert_eq!(got.status, 403, "{}", got.body);
    let got = support::https(
        old_tls,
        "shop.example.test",
        h.roots(),
        false,
        support::get("https://shop.example.test/"),
    )
    .await;
    assert_eq!(got.status, 200);
    // Other sites on the open pool are untouched.
    assert_eq!(
        support::http(old_clear, support::get("http://www.example.test/"))
            .await
            .status,
        200
    );

    // A restart on the same state directory keeps the drain.
    let toml = move_config(closed, open, dns, &origin.url(), "closed")
        .replace("STATE", &state.display().to_string());
    let source = portcullis::runtime::ConfigSource::Text {
        text: toml,
        label: "restart".into(),
        base: h.dir.path().to_owned(),
    };
    let grace = Duration::from_secs(1);
    h.runtime.shutdown(grace).await;
    let edge = portcullis::runtime::Runtime::start(source, None)
        .await
        .expect("restart");
    assert_eq!(edge.snapshot().drains(), &drains[..]);
    let got = support::https(
        old_tls,
        "shop.example.test",
        h_roots(&state),
        false,
        support::get("https://shop.example.test/"),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(
        support::http(old_clear, support::get("http://shop.example.test/"))
            .await
            .status,
        403
    );
    // Moving it back ends the drain.
    let back = move_config(closed, open, dns, &origin.url(), "open")
        .replace("STATE", &state.display().to_string());
    edge.apply(portcullis::config::Config::from_toml(&back, "back", h.dir.path()).expect("config"))
        .await
        .expect("reload");
    assert!(edge.snapshot().drains().is_empty());
    assert_eq!(
        support::http(old_clear, support::get("http://shop.example.test/"))
            .await
            .status,
        301
    );
}

fn h_roots(state: &std::path::Path) -> rustls::RootCertStore {
    support::roots_from(&state.join("dev-ca.pem"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_serve_answers_without_the_edge_and_reloads_on_sighup() {
    // Documentation addresses: `dns serve` binds only the DNS socket, never the pools.
    let dns = SocketAddr::from((loopback(), 5353));
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("dns.toml");
    let write = |addr: &str| {
        std::fs::write(
            &path,
            format!(
                "[dns]\nlisten = \"{dns}\"\nzones = [\"example.test\"]\n[[pool]]\nname = \"p\"\naddresses = [\"{addr}\"]\ntls_ports = [443]\n[[site]]\nhost = \"www.example.test\"\npool = \"p\"\norigin = \"http://127.0.0.1:9\"\n"
            ),
        )
        .expect("write")
    };
    write("192.0.2.10");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["dns", "serve", "--workers", "1", "-c"])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("dns serve");
    let answer = || async {
        let sock = UdpSocket::bind("127.0.0.1:0").await.ok()?;
        sock.send_to(&query("www.example.test.", RecordType::A, true), dns)
            .await
            .ok()?;
        let mut buf = vec![0u8; 4096];
        let (n, _) = tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(addresses(&Message::from_vec(&buf[..n]).ok()?))
    };
    let mut first = None;
    for _ in 0..50 {
        first = answer().await;
        if first.is_some() {
            break;
        }
    }
    assert_eq!(
        first,
        Some(vec!["192.0.2.10".parse::<IpAddr>().expect("ip")])
    );
    write("192.0.2.20");
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .expect("kill")
        .success());
    let mut reloaded = false;
    for _ in 0..50 {
        if answer().await == Some(vec!["192.0.2.20".parse::<IpAddr>().expect("ip")]) {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(reloaded, "SIGHUP changed the answer");
}

/// How long a test waits for what must happen: far more than an idle machine needs, so a loaded
/// one makes the test slower rather than failing it. Every wait returns once its condition holds.
const PATIENCE: Duration = Duration::from_secs(30);

/// A DNS server alone (no edge), on a loopback address of its own, serving the zones of
/// [`config`] under `policy`.
struct DnsOnly {
    addr: SocketAddr,
    closed: Ipv4Addr,
    stop: CancellationToken,
    limits: Arc<Limits>,
}

async fn dns_only(policy: TcpPolicy) -> DnsOnly {
    let (closed, open, ip) = (loopback(), loopback(), loopback());
    let tcp = tokio::net::TcpListener::bind((ip, 0))
        .await
        .expect("bind TCP");
    let addr = tcp.local_addr().expect("TCP address");
    let udp = UdpSocket::bind(addr).await.expect("bind UDP");
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config(
        closed,
        &[],
        9443,
        open,
        addr,
        "http://127.0.0.1:9",
        "closed",
    )
    .replace("STATE", &dir.path().join("state").display().to_string());
    let config = Config::from_toml(&text, "dns.toml", dir.path()).expect("config");
    let zones = Zones::build(&config, None, 1).expect("zones").map(Arc::new);
    let handler = DnsHandler::new(Arc::new(move || zones.clone()));
    let stop = CancellationToken::new();
    let limits = serve_sockets(udp, tcp, handler, policy, stop.clone());
    DnsOnly {
        addr,
        closed,
        stop,
        limits,
    }
}

/// A policy whose message timeout never fires within a test, so only the caps close anything.
fn patient_policy() -> TcpPolicy {
    TcpPolicy {
        message_timeout: PATIENCE * 4,
        ..TcpPolicy::default()
    }
}

/// Connects to `server` from the loopback address `from`, so a per-client cap counts only this
/// test's connections.
async fn connect_from(from: Ipv4Addr, server: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("bind client");
    socket.connect(server).await.expect("connect")
}

/// Writes `packet` behind its 2-byte length and reads one framed answer; `None` when the server
/// closed the connection (end of stream or reset) instead.
async fn exchange(s: &mut TcpStream, packet: &[u8]) -> Option<Message> {
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(packet);
    if s.write_all(&framed).await.is_err() {
        return None;
    }
    read_answer(s).await
}

/// One framed answer from `s`, or `None` when the server closed it; panics if neither comes
/// within [`PATIENCE`].
async fn read_answer(s: &mut TcpStream) -> Option<Message> {
    let read = async {
        let len = s.read_u16().await.ok()? as usize;
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).await.ok()?;
        Some(Message::from_vec(&buf).expect("the answer parses"))
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("an answer or a close in time")
}

#[tokio::test]
async fn a_silent_or_trickling_tcp_client_is_closed_after_the_message_timeout() {
    let s = setup(vec![], 9443).await;
    let mut silent = TcpStream::connect(s.dns).await.expect("connect");
    let mut trickler = TcpStream::connect(s.dns).await.expect("connect");
    let silent_end = async {
        let mut byte = [0u8; 1];
        tokio::time::timeout(PATIENCE, silent.read(&mut byte)).await
    };
    // A length of 100, then a byte every 250 ms: bytes keep coming, a message never completes.
    // Once the server has closed, a write fails (the first one after the close draws a reset).
    let trickle_end = async {
        trickler.write_all(&100u16.to_be_bytes()).await?;
        for _ in 0..98 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            trickler.write_all(&[0]).await?;
        }
        Ok::<(), std::io::Error>(())
    };
    let (silent_end, trickle_end) = tokio::join!(silent_end, trickle_end);
    match silent_end {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("the server sent {n} bytes to a client that asked nothing"),
        Err(_) => panic!("a silent client stayed connected for {PATIENCE:?}"),
    }
    assert!(
        trickle_end.is_err(),
        "a client that never completes a message stayed connected for 24 s"
    );
    // The server goes on.
    let t = tcp(s.dns, &query("api.example.test.", RecordType::A, false)).await;
    assert_eq!(addresses(&t), vec![IpAddr::V4(s.closed)]);
}

#[tokio::test]
async fn tcp_connections_over_the_per_client_cap_are_closed_at_once() {
    let d = dns_only(patient_policy()).await;
    let q = query("api.example.test.", RecordType::A, false);
    let client = loopback();
    let mut admitted = Vec::new();
    for i in 0..TCP_MAX_PER_CLIENT {
        let mut c = connect_from(client, d.addr).await;
        let a = exchange(&mut c, &q).await;
        let a = a.unwrap_or_else(|| panic!("connection {i} under the cap was closed"));
        assert_eq!(addresses(&a), vec![IpAddr::V4(d.closed)]);
        admitted.push(c);
    }
    for i in 0..4 {
        let mut extra = connect_from(client, d.addr).await;
        assert!(
            exchange(&mut extra, &q).await.is_none(),
            "connection {i} over the cap got an answer"
        );
    }
    assert_eq!(d.limits.refused_per_client.load(Ordering::Relaxed), 4);
    assert_eq!(d.limits.refused_global.load(Ordering::Relaxed), 0);
    // The admitted connections still answer, and so does another client.
    for c in admitted.iter_mut().step_by(TCP_MAX_PER_CLIENT - 1) {
        let a = exchange(c, &q)
            .await
            .expect("an admitted connection answers");
        assert_eq!(addresses(&a), vec![IpAddr::V4(d.closed)]);
    }
    let mut other = connect_from(loopback(), d.addr).await;
    assert!(exchange(&mut other, &q).await.is_some(), "another client");
    // A connection that ends gives its place back.
    drop(admitted.pop());
    let started = Instant::now();
    loop {
        let mut c = connect_from(client, d.addr).await;
        if exchange(&mut c, &q).await.is_some() {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "a closed connection's place was not given back"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn tcp_connections_over_the_global_cap_are_closed_at_once() {
    let d = dns_only(TcpPolicy {
        max_connections: 3,
        ..patient_policy()
    })
    .await;
    let q = query("api.example.test.", RecordType::A, false);
    let mut admitted = Vec::new();
    for i in 0..3 {
        let mut c = connect_from(loopback(), d.addr).await;
        let a = exchange(&mut c, &q).await;
        assert!(a.is_some(), "connection {i} under the cap was closed");
        admitted.push(c);
    }
    let mut extra = connect_from(loopback(), d.addr).await;
    assert!(
        exchange(&mut extra, &q).await.is_none(),
        "a fourth client got an answer"
    );
    assert_eq!(d.limits.refused_global.load(Ordering::Relaxed), 1);
    for c in &mut admitted {
        assert!(exchange(c, &q).await.is_some(), "an admitted connection");
    }
}

#[tokio::test]
async fn malformed_tcp_messages_get_formerr_or_a_close_and_the_server_goes_on() {
    let s = setup(vec![], 9443).await;
    let q = query("api.example.test.", RecordType::A, false);
    // A header announcing a question, then a label cut short: FORMERR with the query's id,
    // and the connection carries on.
    let mut bad = q[..12].to_vec();
    bad.extend_from_slice(&[5, b'a', b'b']);
    let mut c = TcpStream::connect(s.dns).await.expect("connect");
    let a = exchange(&mut c, &bad)
        .await
        .expect("an answer to a malformed query");
    assert_eq!(a.metadata.response_code, ResponseCode::FormErr);
    assert_eq!(a.metadata.id, 4242);
    let a = exchange(&mut c, &q)
        .await
        .expect("the connection carries on");
    assert_eq!(addresses(&a), vec![IpAddr::V4(s.closed)]);
    // Shorter than a header: nothing to answer, the connection is closed.
    let mut c = TcpStream::connect(s.dns).await.expect("connect");
    assert!(exchange(&mut c, &[1, 2, 3, 4, 5]).await.is_none());
    // A length of 0 closes the connection: the query behind it is not answered.
    let mut c = TcpStream::connect(s.dns).await.expect("connect");
    c.write_all(&[0, 0]).await.expect("write");
    assert!(
        exchange(&mut c, &q).await.is_none(),
        "answered after a length of 0"
    );
    // Random bytes behind a length: an answer that parses (read_answer checks) or a close.
    let mut seed: u64 = 0x2545_F491_4F6C_DD1D ^ u64::from(std::process::id());
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..50 {
        let len = 1 + (next() % 300) as usize;
        let garbage: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let mut c = TcpStream::connect(s.dns).await.expect("connect");
        let _ = exchange(&mut c, &garbage).await;
    }
    let t = tcp(s.dns, &q).await;
    assert_eq!(addresses(&t), vec![IpAddr::V4(s.closed)]);
}

#[tokio::test]
async fn dns_stops_on_its_token_open_connections_included() {
    let d = dns_only(patient_policy()).await;
    let q = query("api.example.test.", RecordType::A, false);
    let mut c = TcpStream::connect(d.addr).await.expect("connect");
    assert!(exchange(&mut c, &q).await.is_some());
    assert_eq!(
        addresses(&udp(d.addr, &query("api.example.test.", RecordType::A, true)).await),
        vec![IpAddr::V4(d.closed)]
    );
    d.stop.cancel();
    let started = Instant::now();
    // The open connection is closed rather than answering on.
    while exchange(&mut c, &q).await.is_some() {
        assert!(
            started.elapsed() < PATIENCE,
            "a TCP connection still answers after the stop"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // The listener and the UDP socket are closed: new connections are refused, and the UDP
    // address can be bound again.
    while !support::refused(d.addr).await {
        assert!(
            started.elapsed() < PATIENCE,
            "the TCP listener still accepts after the stop"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    while UdpSocket::bind(d.addr).await.is_err() {
        assert!(
            started.elapsed() < PATIENCE,
            "the UDP socket is still open after the stop"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[test]
fn a_site_without_http3_gets_no_h3_in_its_https_record() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("p.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[state]
dir = "{}"
[dns]
listen = "127.0.0.1:5300"
zones = ["example.test"]
[[pool]]
name = "quic"
addresses = ["192.0.2.1"]
tls_ports = [443]
[[pool]]
name = "tcp"
addresses = ["192.0.2.2"]
tls_ports = [443]
http3 = false
[[site]]
host = "a.example.test"
pool = "quic"
origin = "http://127.0.0.1:9"
[[site]]
host = "b.example.test"
pool = "quic"
origin = "http://127.0.0.1:9"
http3 = false
[[site]]
host = "c.example.test"
pool = "tcp"
origin = "http://127.0.0.1:9"
"#,
            dir.path().join("state").display()
        ),
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["dns", "export", "example.test", "-c"])
        .arg(&file)
        .output()
        .expect("export");
    let zone = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{zone}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (name, alpn) in [
        ("a", "h3,h2,http/1.1"),
        ("b", "h2,http/1.1"),
        ("c", "h2,http/1.1"),
    ] {
        assert!(
            zone.contains(&format!(
                "{name}.example.test. 300 IN HTTPS 1 . alpn=\"{alpn}\""
            )),
            "{name}: {zone}"
        );
    }
}
