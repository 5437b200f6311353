//! What one request (or failed connection) tells the analytics, reduced on the spot to small
//! copyable values: no Host string, path or User-Agent is ever kept as it came, so an
//! arbitrary client input can never become an unbounded key or a label.

use std::fmt;
use std::net::IpAddr;
use std::sync::LazyLock;

use aho_corasick::AhoCorasick;

/// How the client reached the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scheme {
    Tls,
    Cleartext,
    /// HTTP/3 over QUIC: TLS 1.3 too, so it counts in the TLS share.
    H3,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Tls => "tls",
            Scheme::Cleartext => "cleartext",
            Scheme::H3 => "h3",
        }
    }
}

/// What happened: a request answered, or a connection that never got that far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Response,
    /// Cleartext HTTP sent to a TLS port (answered with 400).
    CleartextOnTlsPort,
    /// The TLS handshake failed or named no site here.
    HandshakeFailed,
    /// Nothing (or not enough) arrived before the handshake timeout.
    HandshakeTimeout,
    /// A cleartext connection the nftables table reset (counted from its counters).
    RefusedByFirewall,
    /// A cleartext request head the parser refused (400, 431) or that was never finished.
    MalformedRequest,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Response => "response",
            Outcome::CleartextOnTlsPort => "cleartext_on_tls_port",
            Outcome::HandshakeFailed => "handshake_failed",
            Outcome::HandshakeTimeout => "handshake_timeout",
            Outcome::RefusedByFirewall => "refused_by_firewall",
            Outcome::MalformedRequest => "malformed_request",
        }
    }
}

/// Negotiated TLS version, or none for cleartext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TlsVersion {
    None,
    Tls12,
    Tls13,
}

impl TlsVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::None => "none",
            TlsVersion::Tls12 => "TLSv1.2",
            TlsVersion::Tls13 => "TLSv1.3",
        }
    }

    pub fn from_rustls(v: Option<rustls::ProtocolVersion>) -> TlsVersion {
        match v {
            Some(rustls::ProtocolVersion::TLSv1_3) => TlsVersion::Tls13,
            Some(rustls::ProtocolVersion::TLSv1_2) => TlsVersion::Tls12,
            _ => TlsVersion::None,
        }
    }
}

/// Which capped dimension a count is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DimKind {
    Network,
    Family,
    Path,
}

impl DimKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DimKind::Network => "network",
            DimKind::Family => "family",
            DimKind::Path => "path",
        }
    }
}

/// `parse`, the inverse of `as_str`, for the values the store keeps as labels.
macro_rules! parse_label {
    ($($t:ident => [$($v:ident),*];)*) => {$(
        impl $t {
            /// The value whose label (`as_str`) is `s`.
            pub fn parse(s: &str) -> Option<$t> {
                [$($t::$v),*].into_iter().find(|v| v.as_str() == s)
            }
        }
    )*};
}

parse_label! {
    Scheme => [Tls, Cleartext, H3];
    Outcome => [Response, CleartextOnTlsPort, HandshakeFailed, HandshakeTimeout, RefusedByFirewall, MalformedRequest];
    TlsVersion => [None, Tls12, Tls13];
    HttpVersion => [None, Http10, Http11, Http2, Http3];
    DimKind => [Network, Family, Path];
}

/// HTTP version of the request, `None` for connection-level outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HttpVersion {
    None,
    Http10,
    Http11,
    Http2,
    Http3,
}

impl HttpVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpVersion::None => "none",
            HttpVersion::Http10 => "HTTP/1.0",
            HttpVersion::Http11 => "HTTP/1.1",
            HttpVersion::Http2 => "HTTP/2",
            HttpVersion::Http3 => "HTTP/3",
        }
    }

    pub fn from_http(v: http::Version) -> HttpVersion {
        match v {
            http::Version::HTTP_10 | http::Version::HTTP_09 => HttpVersion::Http10,
            http::Version::HTTP_2 => HttpVersion::Http2,
            http::Version::HTTP_3 => HttpVersion::Http3,
            _ => HttpVersion::Http11,
        }
    }
}

/// Who the client probably is, from its User-Agent. Only browsers count as likely-human.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientFamily {
    Browser,
    Curl,
    Wget,
    Python,
    Go,
    Java,
    Node,
    DotNet,
    PowerShell,
    Bot,
    Iot,
    Other,
    None,
}

impl ClientFamily {
    pub const ALL: [ClientFamily; 13] = [
        ClientFamily::Browser,
        ClientFamily::Curl,
        ClientFamily::Wget,
        ClientFamily::Python,
        ClientFamily::Go,
        ClientFamily::Java,
        ClientFamily::Node,
        ClientFamily::DotNet,
        ClientFamily::PowerShell,
        ClientFamily::Bot,
        ClientFamily::Iot,
        ClientFamily::Other,
        ClientFamily::None,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ClientFamily::Browser => "browser",
            ClientFamily::Curl => "curl",
            ClientFamily::Wget => "wget",
            ClientFamily::Python => "python",
            ClientFamily::Go => "go",
            ClientFamily::Java => "java",
            ClientFamily::Node => "node",
            ClientFamily::DotNet => "dotnet",
            ClientFamily::PowerShell => "powershell",
            ClientFamily::Bot => "bot",
            ClientFamily::Iot => "iot",
            ClientFamily::Other => "other",
            ClientFamily::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<ClientFamily> {
        ClientFamily::ALL.into_iter().find(|f| f.as_str() == s)
    }

    /// Browsers are likely people; everything else (scripts, SDKs, bots, devices, no
    /// User-Agent at all) is likely automated.
    pub fn likely_human(self) -> bool {
        self == ClientFamily::Browser
    }

    /// Classifies a User-Agent. Order matters: crawlers announce themselves as browsers, and
    /// PowerShell's agent mentions Mozilla. One pass over the agent finds every token (a
    /// browser's agent is over 100 bytes and arrives with every request).
    pub fn classify(user_agent: Option<&[u8]>) -> ClientFamily {
        let Some(ua) = user_agent else {
            return ClientFamily::None;
        };
        if ua.iter().all(u8::is_ascii_whitespace) {
            return ClientFamily::None;
        }
        let (searcher, families) = &*UA_TOKENS;
        // The families whose tokens appear, one bit per `FAMILY_ORDER` position.
        let mut seen = 0u32;
        for m in searcher.find_overlapping_iter(ua) {
            seen |= 1 << families[m.pattern().as_usize()];
        }
        if ua.starts_with(b"curl/") {
            seen |= 1 << order_of(ClientFamily::Curl);
        }
        if ua.starts_with(b"Go ") {
            seen |= 1 << order_of(ClientFamily::Go);
        }
        // Browser tokens only count in an agent that starts like a browser's.
        if !ua.starts_with(b"Mozilla/") {
            seen &= !(1 << order_of(ClientFamily::Browser));
        }
        match seen {
            0 => ClientFamily::Other,
            // The lowest bit is the family that takes precedence.
            _ => FAMILY_ORDER[seen.trailing_zeros() as usize],
        }
    }
}

/// Families by precedence, browsers last (many agents claim to be Mozilla).
const FAMILY_ORDER: [ClientFamily; 11] = [
    ClientFamily::Bot,
    ClientFamily::Iot,
    ClientFamily::PowerShell,
    ClientFamily::Curl,
    ClientFamily::Wget,
    ClientFamily::Python,
    ClientFamily::Go,
    ClientFamily::Java,
    ClientFamily::Node,
    ClientFamily::DotNet,
    ClientFamily::Browser,
];

fn order_of(f: ClientFamily) -> usize {
    FAMILY_ORDER.iter().position(|x| *x == f).unwrap_or(0)
}

/// Tokens (matched without regard to ASCII case) and the family each one points to.
const UA_TOKEN_LIST: &[(&str, ClientFamily)] = &[
    ("bot", ClientFamily::Bot),
    ("crawler", ClientFamily::Bot),
    ("spider", ClientFamily::Bot),
    ("slurp", ClientFamily::Bot),
    ("facebookexternalhit", ClientFamily::Bot),
    ("crawl", ClientFamily::Bot),
    ("headlesschrome", ClientFamily::Bot),
    ("lighthouse", ClientFamily::Bot),
    ("monitor", ClientFamily::Bot),
    ("esp8266", ClientFamily::Iot),
    ("esp32", ClientFamily::Iot),
    ("arduino", ClientFamily::Iot),
    ("tasmota", ClientFamily::Iot),
    ("shelly", ClientFamily::Iot),
    ("esphome", ClientFamily::Iot),
    ("lwip", ClientFamily::Iot),
    ("zephyr", ClientFamily::Iot),
    ("contiki", ClientFamily::Iot),
    ("micropython", ClientFamily::Iot),
    ("espressif", ClientFamily::Iot),
    ("embedded", ClientFamily::Iot),
    ("powershell", ClientFamily::PowerShell),
    ("libcurl", ClientFamily::Curl),
    ("wget", ClientFamily::Wget),
    ("python", ClientFamily::Python),
    ("aiohttp", ClientFamily::Python),
    ("httpx", ClientFamily::Python),
    ("urllib", ClientFamily::Python),
    ("go-http-client", ClientFamily::Go),
    ("okhttp", ClientFamily::Java),
    ("java/", ClientFamily::Java),
    ("apache-httpclient", ClientFamily::Java),
    ("jetty", ClientFamily::Java),
    ("axios", ClientFamily::Node),
    ("node-fetch", ClientFamily::Node),
    ("undici", ClientFamily::Node),
    ("node.js", ClientFamily::Node),
    ("got (", ClientFamily::Node),
    (".net", ClientFamily::DotNet),
    ("dotnet", ClientFamily::DotNet),
    ("system.net.http", ClientFamily::DotNet),
    ("chrome/", ClientFamily::Browser),
    ("firefox/", ClientFamily::Browser),
    ("safari/", ClientFamily::Browser),
    ("edg/", ClientFamily::Browser),
    ("msie", ClientFamily::Browser),
    ("trident/", ClientFamily::Browser),
];

/// The searcher over `UA_TOKEN_LIST`, and each pattern's `FAMILY_ORDER` position.
static UA_TOKENS: LazyLock<(AhoCorasick, Vec<usize>)> = LazyLock::new(|| {
    let searcher = AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build(UA_TOKEN_LIST.iter().map(|(t, _)| t))
        // A fixed list of short literals always builds.
        .expect("user agent tokens");
    let families = UA_TOKEN_LIST.iter().map(|(_, f)| order_of(*f)).collect();
    (searcher, families)
});

/// The client's network: IPv4 /24 or IPv6 /48, enough to tell networks apart without keeping
/// individual addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Network {
    V4(u32),
    V6(u128),
}

impl Network {
    pub fn of(ip: IpAddr) -> Network {
        match ip {
            IpAddr::V4(v4) => Network::V4(u32::from(v4) & 0xffff_ff00),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Network::of(IpAddr::V4(v4)),
                None => Network::V6(u128::from(v6) & !((1u128 << 80) - 1)),
            },
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Network::V4(n) => write!(f, "{}/24", std::net::Ipv4Addr::from(*n)),
            Network::V6(n) => write!(f, "{}/48", std::net::Ipv6Addr::from(*n)),
        }
    }
}

/// The first segment of a request path, kept only when it looks like a route name: short,
/// plain characters, not an identifier or a token (which might be a secret).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathTemplate {
    len: u8,
    bytes: [u8; PathTemplate::MAX],
}

impl PathTemplate {
    const MAX: usize = 24;

    pub fn of(path: &str) -> PathTemplate {
        let seg = path
            .strip_prefix('/')
            .unwrap_or(path)
            .split(['/', '?', ';'])
            .next()
            .unwrap_or("");
        let plain = seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b));
        let digits = seg.bytes().filter(u8::is_ascii_digit).count();
        // Long segments, mostly-digit ones and hex-looking runs are identifiers or tokens.
        let looks_like_id = digits * 2 > seg.len()
            || (seg.len() >= 16 && seg.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'));
        let text: &[u8] = if seg.is_empty() {
            b"/"
        } else if !plain || seg.len() > Self::MAX - 1 || looks_like_id {
            b"/:id"
        } else {
            seg.as_bytes()
        };
        let mut bytes = [0u8; Self::MAX];
        let mut len = 0;
        if text != b"/" && text != b"/:id" {
            bytes[0] = b'/';
            len = 1;
        }
        bytes[len..len + text.len()].copy_from_slice(text);
        PathTemplate {
            len: (len + text.len()) as u8,
            bytes,
        }
    }

    pub fn as_str(&self) -> &str {
        // Built only from ASCII above.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("/")
    }
}

impl fmt::Debug for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// HTTP status class 1 to 5; 0 when no response was sent.
pub fn status_class(status: u16) -> u8 {
    (status / 100).min(9) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families() {
        let c = |ua: &str| ClientFamily::classify(Some(ua.as_bytes()));
        assert_eq!(c("curl/8.5.0"), ClientFamily::Curl);
        assert_eq!(c("Wget/1.21.3"), ClientFamily::Wget);
        assert_eq!(c("python-requests/2.31.0"), ClientFamily::Python);
        assert_eq!(c("python-httpx/0.27.0"), ClientFamily::Python);
        assert_eq!(c("Python-urllib/3.11"), ClientFamily::Python);
        assert_eq!(c("Python/3.11 aiohttp/3.9.1"), ClientFamily::Python);
        assert_eq!(c("Go-http-client/1.1"), ClientFamily::Go);
        assert_eq!(c("okhttp/4.12.0"), ClientFamily::Java);
        assert_eq!(c("Java/17.0.2"), ClientFamily::Java);
        assert_eq!(c("axios/1.6.7"), ClientFamily::Node);
        assert_eq!(c("undici"), ClientFamily::Node);
        assert_eq!(c("node-fetch/1.0"), ClientFamily::Node);
        assert_eq!(
            c("Mozilla/5.0 (Windows NT; Windows NT 10.0; en-US) WindowsPowerShell/5.1"),
            ClientFamily::PowerShell
        );
        assert_eq!(
            c("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"),
            ClientFamily::Bot
        );
        assert_eq!(c("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36"), ClientFamily::Browser);
        assert_eq!(
            c("Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"),
            ClientFamily::Browser
        );
        assert_eq!(c("ESP8266HTTPClient"), ClientFamily::Iot);
        assert_eq!(c("Shelly/20230913-114010"), ClientFamily::Iot);
        assert_eq!(c("SomethingElse/1.0"), ClientFamily::Other);
        // Precedence when an agent carries tokens of several families.
        assert_eq!(
            c("Mozilla/5.0 (X11) HeadlessChrome/120.0 Safari/537.36"),
            ClientFamily::Bot
        );
        assert_eq!(c("Mozilla/5.0 Chrome/120.0 Wget/1.21"), ClientFamily::Wget);
        assert_eq!(c("Mozilla/5.0 python-requests/2.31"), ClientFamily::Python);
        assert_eq!(c("Java/17 okhttp/4.12 axios"), ClientFamily::Java);
        assert_eq!(c("ESP32 Python/3.11"), ClientFamily::Iot);
        assert_eq!(c("libcurl-agent/1.0"), ClientFamily::Curl);
        assert_eq!(c("Go 1.1 package http"), ClientFamily::Go);
        assert_eq!(c("Microsoft .NET Framework"), ClientFamily::DotNet);
        assert_eq!(c("MOZILLA/5.0 CHROME/120"), ClientFamily::Other);
        assert_eq!(c("Chrome/120.0 Safari/537.36"), ClientFamily::Other);
        assert_eq!(
            c("Mozilla/4.0 (compatible; MSIE 8.0)"),
            ClientFamily::Browser
        );
        assert_eq!(c("   "), ClientFamily::None);
        assert_eq!(ClientFamily::classify(None), ClientFamily::None);
    }

    #[test]
    fn networks() {
        assert_eq!(
            Network::of("203.0.113.77".parse().expect("ip")).to_string(),
            "203.0.113.0/24"
        );
        assert_eq!(
            Network::of("2001:db8:1234:5678::1".parse().expect("ip")).to_string(),
            "2001:db8:1234::/48"
        );
        assert_eq!(
            Network::of("::ffff:198.51.100.9".parse().expect("ip")).to_string(),
            "198.51.100.0/24"
        );
    }

    #[test]
    fn path_templates_keep_route_names_only() {
        let t = |p: &str| PathTemplate::of(p).as_str().to_owned();
        assert_eq!(t("/v1/users/42"), "/v1");
        assert_eq!(t("/"), "/");
        assert_eq!(t(""), "/");
        assert_eq!(t("/login?next=/"), "/login");
        assert_eq!(t("/12345"), "/:id");
        assert_eq!(t("/0123456789abcdef0123"), "/:id");
        assert_eq!(t("/sk_live_51Habcdefghijklmnopqrstuvwxyz"), "/:id");
        assert_eq!(t("/%2e%2e"), "/:id");
        assert_eq!(t("/api"), "/api");
    }
}
