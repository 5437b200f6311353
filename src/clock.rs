//! Time for the whole crate: one [`Timestamp`] type and one [`now`].
//!
//! Everything that records or schedules (analytics buckets, exposure events, stage plans,
//! drain deadlines, DNS serials, certificate checks) reads the same clock, so a test that moves
//! it with [`advance`] moves all of them together. A leaf: it imports nothing of ours.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (UTC).
pub type Timestamp = u64;

/// Seconds added to the wall clock by [`advance`]; 0 outside tests.
static OFFSET: AtomicU64 = AtomicU64::new(0);

/// Seconds since the Unix epoch, now: the wall clock plus what tests moved it by.
pub fn now() -> Timestamp {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .saturating_add(OFFSET.load(Ordering::Relaxed))
}

/// Moves the clock forward, for tests of schedules (deadlines, brownout windows). tokio's
/// paused clock does not mix with the real sockets the tests use: it jumps to the next timer
/// whenever tasks wait on I/O, firing every timeout.
pub fn advance(secs: u64) {
    OFFSET.fetch_add(secs, Ordering::Relaxed);
}

/// An HTTP-date (RFC 9110), as `Sunset` and `Retry-After` carry it.
pub fn http_date(t: Timestamp) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(t))
}

/// `2026-12-06T04:05:00Z`.
pub fn iso_utc(t: Timestamp) -> String {
    let d = utc(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        d.year(),
        d.month() as u8,
        d.day(),
        d.hour(),
        d.minute(),
        d.second()
    )
}

/// The UTC date and time of a timestamp (one past the year 9999 reads as the epoch: no clock
/// here gets there).
pub fn utc(t: Timestamp) -> time::OffsetDateTime {
    i64::try_from(t)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_are_imf_fixdate() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(1_767_225_600), "Thu, 01 Jan 2026 00:00:00 GMT");
        assert_eq!(iso_utc(1_767_225_600 + 3723), "2026-01-01T01:02:03Z");
    }
}
