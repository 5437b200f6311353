//! Lowercase hex for digests, tokens, signatures and ids: the crate's one encoder and decoder,
//! and its one source of random hex ids. A leaf: it imports nothing of ours.

use std::fmt::Write;

/// `bytes` as lowercase hex, two digits per byte.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing into a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Exactly `2 * N` hex digits (either case) as `N` bytes; `None` for anything else.
pub fn decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// `n` random bytes from the system's generator, as hex. Panics never: a failing generator
/// would leave zeros, which is why this is only used for ids and canaries, never for keys.
pub fn random(n: usize) -> String {
    let mut b = vec![0u8; n];
    let _ = aws_lc_rs::rand::fill(&mut b);
    encode(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_input() {
        assert_eq!(encode(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(decode::<3>("00ABff"), Some([0, 0xab, 0xff]));
        assert_eq!(decode::<3>("00abf"), None);
        assert_eq!(decode::<2>("zz00"), None);
        assert_eq!(decode::<1>("é"), None);
        assert_eq!(random(8).len(), 16);
    }
}
