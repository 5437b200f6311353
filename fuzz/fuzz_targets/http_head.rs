//! The first byte of a connection through the cleartext/TLS sniffer, and the rest as a
//! request head through the parser: both must answer for any bytes, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(first) = data.first() {
        let _ = portcullis::edge::sniff(*first);
    }
    if let Some(req) = portcullis::edge::parse_head(data) {
        // What the edge reads next from a parsed head must be there to read.
        let _ = (req.method(), req.uri().path(), req.headers().len());
    }
});
