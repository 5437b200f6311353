//! Where credentials are looked for, as plain data: the names of positions, a site's extra
//! headers, parameters and cookies, and path patterns that carry tokens. Shared by `config`
//! (which validates them) and `exposure` (which searches requests with them).
//!
//! Plain data inside `config`: it holds no credential, computes no fingerprint and imports
//! nothing of ours.

use std::fmt;

use http::header::HeaderName;

/// A position's name, such as `x-api-key`, `session` or `Bearer`: short, plain characters
/// only, so it is safe as a record field.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PositionName {
    len: u8,
    bytes: [u8; 32],
}

impl PositionName {
    pub(crate) fn new(raw: &[u8]) -> PositionName {
        let ok = !raw.is_empty()
            && raw.len() <= 32
            && raw
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b));
        let text: &[u8] = if ok { raw } else { b"?" };
        let mut bytes = [0u8; 32];
        bytes[..text.len()].copy_from_slice(text);
        PositionName {
            len: text.len() as u8,
            bytes,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("?")
    }
}

impl fmt::Debug for PositionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Site-specific positions to search beyond the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtraPositions {
    pub headers: Vec<HeaderName>,
    /// Lowercase parameter names (query, form fields, JSON keys).
    pub params: Vec<String>,
    /// Lowercase cookie names that are credentials, beside [`CREDENTIAL_COOKIES`].
    pub cookies: Vec<String>,
    /// Paths that carry a token, like `/bot{token}/`.
    pub paths: Vec<PathPattern>,
}

/// Why an `exposure_paths` pattern was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PatternError {
    #[error("a path pattern starts with '/', like \"/bot{{token}}/\"")]
    NoLeadingSlash,
    #[error("a path pattern needs one or more {{name}} placeholders, like \"/bot{{token}}/\"")]
    NoPlaceholder,
    #[error("a placeholder is {{name}} with 1 to 32 letters, digits, '-', '_' or '.'")]
    BadName,
    #[error("two placeholders need text between them")]
    Adjacent,
    #[error("unbalanced '{{' or '}}'")]
    Unbalanced,
}

/// A path that carries a credential, like `/bot{token}/`: literal text, and placeholders that
/// each match one or more characters within a path segment. Matched from the path's start;
/// anything may follow the pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    parts: Vec<PathPart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PathPart {
    Literal(String),
    Placeholder(PositionName),
}

impl PathPattern {
    pub fn parse(s: &str) -> Result<PathPattern, PatternError> {
        if !s.starts_with('/') {
            return Err(PatternError::NoLeadingSlash);
        }
        let mut parts = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                Some(i) if rest.as_bytes()[i] == b'}' => return Err(PatternError::Unbalanced),
                Some(i) => {
                    if i > 0 {
                        parts.push(PathPart::Literal(rest[..i].to_owned()));
                    } else if matches!(parts.last(), Some(PathPart::Placeholder(_))) {
                        return Err(PatternError::Adjacent);
                    }
                    let close = rest[i..].find('}').ok_or(PatternError::Unbalanced)? + i;
                    let name = &rest[i + 1..close];
                    let valid = !name.is_empty()
                        && name.len() <= 32
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                    if !valid {
                        return Err(PatternError::BadName);
                    }
                    parts.push(PathPart::Placeholder(PositionName::new(name.as_bytes())));
                    rest = &rest[close + 1..];
                }
                None => {
                    parts.push(PathPart::Literal(rest.to_owned()));
                    rest = "";
                }
            }
        }
        if !parts.iter().any(|p| matches!(p, PathPart::Placeholder(_))) {
            return Err(PatternError::NoPlaceholder);
        }
        Ok(PathPattern { parts })
    }

    /// The placeholders' names and values in `path`, if the pattern matches it.
    pub(crate) fn captures<'p>(
        &self,
        path: &'p [u8],
        mut each: impl FnMut(&PositionName, &'p [u8]),
    ) -> bool {
        let mut pos = 0;
        let mut found: [Option<(&PositionName, &'p [u8])>; 8] = [None; 8];
        let mut n = 0;
        for (i, part) in self.parts.iter().enumerate() {
            match part {
                PathPart::Literal(lit) => {
                    if !path[pos..].starts_with(lit.as_bytes()) {
                        return false;
                    }
                    pos += lit.len();
                }
                PathPart::Placeholder(name) => {
                    let seg_end = path[pos..]
                        .iter()
                        .position(|b| matches!(b, b'/' | b'?' | b'#'))
                        .map_or(path.len(), |e| pos + e);
                    let seg = &path[pos..seg_end];
                    let len = match self.parts.get(i + 1) {
                        Some(PathPart::Literal(l)) if !l.starts_with('/') => {
                            match seg.windows(l.len()).position(|w| w == l.as_bytes()) {
                                Some(at) => at,
                                None => return false,
                            }
                        }
                        _ => seg.len(),
                    };
                    if len == 0 {
                        return false;
                    }
                    if n < found.len() {
                        found[n] = Some((name, &seg[..len]));
                        n += 1;
                    }
                    pos += len;
                }
            }
        }
        for (name, value) in found.iter().flatten() {
            each(name, value);
        }
        true
    }
}
