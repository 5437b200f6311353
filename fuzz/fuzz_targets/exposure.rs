//! The credential detector on any request: the header map and target that `http` accepts,
//! the raw head the parser rejected, and a body with its content type. It never panics and
//! never reports more than `MAX_PER_REQUEST` credentials per call.
//!
//! Input layout: the first line is the request target; following lines up to an empty line
//! are `name: value` headers (lines `http` refuses are skipped); the rest is the body, typed
//! by the last `content-type` header. The whole input also goes to `detect_raw_head`.
#![no_main]

use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Uri};
use libfuzzer_sys::fuzz_target;
use portcullis::exposure::{self, ExtraPositions, Fingerprinter, MAX_PER_REQUEST};

fuzz_target!(|data: &[u8]| {
    let fp = fingerprinter();
    let extra = ExtraPositions::default();

    let (head, body) = match find(data, b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let mut lines = head.split(|b| *b == b'\n');
    let uri = lines
        .next()
        .and_then(|l| Uri::try_from(l).ok())
        .unwrap_or_else(|| Uri::from_static("/"));
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }

    let mut out = Vec::new();
    exposure::detect(&headers, &uri, &extra, fp, &mut out);
    assert!(out.len() <= MAX_PER_REQUEST, "detect: {} found", out.len());

    out.clear();
    exposure::detect_raw_head(data, &extra, fp, &mut out);
    assert!(out.len() <= MAX_PER_REQUEST, "detect_raw_head: {} found", out.len());

    out.clear();
    let content_type = headers
        .get_all(CONTENT_TYPE)
        .iter()
        .last()
        .map_or(&b""[..], |v| v.as_bytes());
    exposure::detect_body(content_type, body, &extra, fp, &mut out);
    assert!(out.len() <= MAX_PER_REQUEST, "detect_body: {} found", out.len());
});

fn fingerprinter() -> &'static Fingerprinter {
    static FP: std::sync::OnceLock<Fingerprinter> = std::sync::OnceLock::new();
    FP.get_or_init(Fingerprinter::ephemeral)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
