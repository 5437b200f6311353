//! The one reading of the host a request names, wherever it comes from: a `Host` header, an
//! HTTP/2 `:authority` or absolute-form URI, or the `Host` line of a raw head that the HTTP
//! parser refused. Lowercase, without the port (also after a bracketed IPv6 literal), without
//! one trailing dot, and only if it can be a host at all.
//!
//! Its input is whatever a client sent: it must never panic, and it never says whether a site
//! serves the name (routing does that with the result). It never reads more than its input.

use std::borrow::Cow;
use std::net::Ipv6Addr;

/// Longest DNS name (RFC 1035), without the trailing dot.
const MAX_NAME: usize = 253;
/// Longest DNS label (RFC 1035).
const MAX_LABEL: usize = 63;

/// A host a request names: DNS labels (letters, digits, `-`, `_`; 1 to 63 long; 253 in all)
/// or a bracketed IPv6 literal, lowercase, without port or trailing dot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestHost<'a>(Cow<'a, str>);

impl RequestHost<'_> {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a request names no host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BadHost {
    /// Nothing is left once the port and the trailing dot are gone (``, `:80`, `.`).
    Missing,
    /// Something is there, but it cannot be a host: a space, a non-ASCII or other character
    /// no DNS label has, an empty or over-long label, a port that is not digits, a bracketed
    /// part that is not an IPv6 address.
    Invalid,
}

/// Reads a `Host` value or an authority's host (`host`, `host:port`, `[v6]`, `[v6]:port`).
///
/// The port may be empty or any digits (RFC 3986's `port = *DIGIT`): only the host is checked,
/// and the port is dropped. Underscores are accepted in labels because real names carry them,
/// though no configured site can (routing then finds no site).
pub(crate) fn parse(raw: &str) -> Result<RequestHost<'_>, BadHost> {
    let name = match raw.strip_prefix('[') {
        Some(rest) => {
            let (literal, after) = rest.split_once(']').ok_or(BadHost::Invalid)?;
            literal.parse::<Ipv6Addr>().map_err(|_| BadHost::Invalid)?;
            match after.strip_prefix(':') {
                Some(port) if port.bytes().all(|b| b.is_ascii_digit()) => {}
                None if after.is_empty() => {}
                _ => return Err(BadHost::Invalid),
            }
            // `[` + literal + `]`: kept bracketed, so it can never read as a DNS name.
            return Ok(lowercase(&raw[..literal.len() + 2]));
        }
        None => match raw.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            Some(_) => return Err(BadHost::Invalid),
            None => raw,
        },
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(BadHost::Missing);
    }
    let label_ok = |label: &str| {
        (1..=MAX_LABEL).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.len() > MAX_NAME || !name.split('.').all(label_ok) {
        return Err(BadHost::Invalid);
    }
    Ok(lowercase(name))
}

fn lowercase(s: &str) -> RequestHost<'_> {
    RequestHost(if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(raw: &str) -> Result<String, BadHost> {
        parse(raw).map(|h| h.as_str().to_owned())
    }

    #[test]
    fn names_are_lowercased_without_port_and_one_trailing_dot() {
        assert_eq!(host("example.com"), Ok("example.com".into()));
        assert_eq!(host("EXAMPLE.com.:8080"), Ok("example.com".into()));
        assert_eq!(host("Api.Example.COM:443"), Ok("api.example.com".into()));
        assert_eq!(host("example.com:"), Ok("example.com".into()));
        assert_eq!(host("example.com."), Ok("example.com".into()));
        assert_eq!(host("127.0.0.1:80"), Ok("127.0.0.1".into()));
        assert_eq!(host("_acme.example.com"), Ok("_acme.example.com".into()));
        assert!(matches!(
            parse("example.com"),
            Ok(RequestHost(Cow::Borrowed(_)))
        ));
    }

    #[test]
    fn ipv6_literals_keep_their_brackets_and_lose_their_port() {
        assert_eq!(host("[::1]:80"), Ok("[::1]".into()));
        assert_eq!(host("[::1]"), Ok("[::1]".into()));
        assert_eq!(host("[2001:DB8::1]:8443"), Ok("[2001:db8::1]".into()));
        for bad in [
            "[::1",
            "[::1]x",
            "[::1]:8o",
            "[example.com]",
            "[]",
            "[]:80",
            "::1",
        ] {
            assert_eq!(host(bad), Err(BadHost::Invalid), "{bad:?}");
        }
    }

    #[test]
    fn nothing_left_is_missing() {
        for missing in ["", ":", ":80", ".", ".:443"] {
            assert_eq!(host(missing), Err(BadHost::Missing), "{missing:?}");
        }
    }

    #[test]
    fn hostile_values_are_invalid_and_never_panic() {
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}com", "abcdefghi.".repeat(26));
        let huge = "x".repeat(1 << 20);
        for bad in [
            " example.com",
            "example.com ",
            "exa mple.com",
            "example.com:80 ",
            "example.com:8o",
            "example.com:-1",
            "example.com..",
            "..",
            ".example.com",
            "a..b",
            "bücher.example",
            "例え.jp",
            "example.com\u{0}",
            "ex\tample.com",
            "user@example.com",
            "example.com/path",
            "*.example.com",
            "a:b:80",
            long_label.as_str(),
            long_name.as_str(),
            huge.as_str(),
        ] {
            let shown: String = bad.chars().take(40).collect();
            assert_eq!(host(bad), Err(BadHost::Invalid), "{shown:?}");
        }
        assert_eq!(long_name.len(), 263);
        let label = "a".repeat(63);
        let longest = format!("{label}.{label}.{label}.{}", "b".repeat(61));
        assert_eq!(host(&longest).map(|h| h.len()), Ok(253));
        assert_eq!(host(&format!("{longest}b")), Err(BadHost::Invalid));
        assert_eq!(host(&format!("{longest}.:80")).map(|h| h.len()), Ok(253));
    }
}
