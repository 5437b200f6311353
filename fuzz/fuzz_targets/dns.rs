//! Any bytes as a DNS query, against no zones and against a small served zone, over TCP and
//! UDP: the answer is `None` or a message that parses back, a UDP one within the size the
//! query allows (512 bytes, or its EDNS payload size), and nothing panics.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use portcullis::config::{Config, Overrides};
use portcullis::dns::{self, Transport, Zones};

/// An apex, an exact site on two address families, a wildcard site, and a name outside every
/// zone, so queries reach NOERROR, NODATA, NXDOMAIN, wildcard and REFUSED answers.
const CONFIG: &str = r#"
[state]
dir = "/nonexistent"
[dns]
listen = "127.0.0.1:5353"
zones = ["example.test", "sub.example.test"]
ttl = 120
nameservers = ["ns1.example.test", "ns.elsewhere.test"]
[[pool]]
name = "closed"
addresses = ["192.0.2.10", "2001:db8::10"]
tls_ports = [443]
[[pool]]
name = "open"
addresses = ["192.0.2.20"]
tls_ports = [443]
cleartext_ports = [80]
[[site]]
host = "api.example.test"
pool = "closed"
origin = "http://127.0.0.1:9"
cleartext = "closed"
[[site]]
host = "*.apps.example.test"
pool = "open"
origin = "http://127.0.0.1:9"
cleartext = "redirect"
[[site]]
host = "www.sub.example.test"
pool = "open"
origin = "http://127.0.0.1:9"
cleartext = "redirect"
[[site]]
host = "outside.other.test"
pool = "open"
origin = "http://127.0.0.1:9"
cleartext = "reject"
"#;

fn zones() -> &'static Zones {
    static ZONES: OnceLock<Zones> = OnceLock::new();
    ZONES.get_or_init(|| {
        let config = Config::from_toml_with(
            CONFIG,
            "fuzz.toml",
            Path::new("/nonexistent"),
            Some(&Overrides::new()),
        )
        .expect("the fuzz config is valid");
        Zones::build(&config, None, 1_700_000_000)
            .expect("the fuzz zones build")
            .expect("the fuzz config has [dns]")
    })
}

fuzz_target!(|data: &[u8]| {
    // What the query allows over UDP, when it parses as a message at all (else the answer is
    // a bare FORMERR header).
    let udp_limit = Message::from_vec(data).map_or(512, |m| {
        m.edns.as_ref().map_or(512, |e| usize::from(e.max_payload().max(512)))
    });
    for z in [None, Some(zones())] {
        if let Some(resp) = dns::respond(z, data) {
            parses(&resp);
        }
        if let Some(resp) = dns::respond_over(Transport::Udp, z, data) {
            parses(&resp);
            assert!(
                resp.len() <= udp_limit,
                "UDP answer of {} bytes, over the {udp_limit} the query allows",
                resp.len()
            );
        }
    }
});

fn parses(resp: &[u8]) {
    if let Err(e) = Message::from_vec(resp) {
        panic!("the answer does not parse ({e}): {resp:02x?}");
    }
}
