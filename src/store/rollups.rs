//! The analytics side of the seam: request counts per time bucket, the capped dimensions
//! (networks, client families, paths) with their overflow, and one exposure record per
//! (site, fingerprint). Analytics hands over plain rows ([`RollupBatch`]); readers (the impact
//! report, the dashboard, the readiness gates) ask by site and time.
//!
//! Counts only ever add up: writing the same batch twice counts it twice, so a writer keeps a
//! batch until the store took all of it (one transaction) and never sends it again after.
//! Nothing here is a raw credential: exposures arrive as fingerprints.

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::clock::Timestamp;
use crate::observe::{ClientFamily, DimKind, HttpVersion, Outcome, Scheme, TlsVersion};

/// `serde` for the observation enums, as the labels they are stored under.
macro_rules! as_label {
    ($($m:ident: $t:ty),* $(,)?) => {$(
        mod $m {
            use serde::Deserialize;
            pub fn serialize<S: serde::Serializer>(v: &$t, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(v.as_str())
            }
            pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                let s = String::deserialize(d)?;
                <$t>::parse(&s)
                    .ok_or_else(|| serde::de::Error::custom(format!("unknown value {s:?}")))
            }
        }
    )*};
}

as_label! {
    outcome_label: crate::observe::Outcome,
    scheme_label: crate::observe::Scheme,
    tls_label: crate::observe::TlsVersion,
    http_label: crate::observe::HttpVersion,
    dim_label: crate::observe::DimKind,
    family_label: crate::observe::ClientFamily,
}

/// Requests (or connections) counted in one bucket of `span` seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficCount {
    /// Start of the bucket.
    pub bucket: Timestamp,
    /// 60 (minute) or 3600 (hour).
    pub span: u32,
    pub site: String,
    #[serde(with = "outcome_label")]
    pub outcome: Outcome,
    #[serde(with = "scheme_label")]
    pub scheme: Scheme,
    pub port: u16,
    #[serde(with = "tls_label")]
    pub tls: TlsVersion,
    #[serde(with = "http_label")]
    pub http: HttpVersion,
    /// 1 to 5; 0 when no response was sent.
    pub status_class: u8,
    pub count: u64,
}

/// Requests from one value of a capped dimension in one bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DimCount {
    pub bucket: Timestamp,
    pub span: u32,
    pub site: String,
    #[serde(with = "scheme_label")]
    pub scheme: Scheme,
    #[serde(with = "dim_label")]
    pub kind: DimKind,
    /// The network (`192.0.2.0/24`), family (`curl`) or path template (`/v1/users/:id`).
    pub value: String,
    pub count: u64,
}

/// Requests whose value did not fit under the cap of a dimension in one bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverflowCount {
    pub bucket: Timestamp,
    pub span: u32,
    pub site: String,
    #[serde(with = "scheme_label")]
    pub scheme: Scheme,
    #[serde(with = "dim_label")]
    pub kind: DimKind,
    pub count: u64,
}

/// One credential seen in cleartext on a site: fingerprint only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposureRow {
    pub site: String,
    pub fingerprint: String,
    pub kind: String,
    /// The header, cookie, parameter or field it was found in.
    pub name: String,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
    pub count: u64,
    /// Of the last sighting.
    pub network: String,
    #[serde(with = "family_label")]
    pub family: ClientFamily,
    pub path: String,
}

/// What one flush of the analytics adds, in one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollupBatch {
    pub traffic: Vec<TrafficCount>,
    pub dims: Vec<DimCount>,
    pub overflow: Vec<OverflowCount>,
    /// Merged into the record of the same (site, fingerprint): counts add, first and last
    /// sighting widen, network, family and path follow the latest sighting.
    pub exposures: Vec<ExposureRow>,
    /// Sightings not recorded because the in-memory table was full.
    pub exposures_dropped: u64,
}

impl RollupBatch {
    /// Adds `other`'s rows (a store adds counts of equal keys up when it takes them).
    pub fn append(&mut self, other: RollupBatch) {
        self.traffic.extend(other.traffic);
        self.dims.extend(other.dims);
        self.overflow.extend(other.overflow);
        self.exposures.extend(other.exposures);
        self.exposures_dropped += other.exposures_dropped;
    }

    pub fn is_empty(&self) -> bool {
        self.traffic.is_empty()
            && self.dims.is_empty()
            && self.overflow.is_empty()
            && self.exposures.is_empty()
            && self.exposures_dropped == 0
    }
}

/// Request counts of a site by how they came and ended, summed over a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficRow {
    pub scheme: Scheme,
    pub outcome: Outcome,
    pub port: u16,
    pub tls: TlsVersion,
    pub status_class: u8,
    pub count: u64,
}

/// Requests answered in one time bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeriesPoint {
    /// Start of the bucket, seconds since the epoch.
    pub bucket: Timestamp,
    pub tls: u64,
    pub cleartext: u64,
}

/// Cleartext traffic of one time bucket by who likely sent it: people (browsers) or programs
/// (scripts, SDKs, bots, devices, no User-Agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FamilyPoint {
    /// Start of the bucket, seconds since the epoch.
    pub bucket: Timestamp,
    pub likely_human: u64,
    pub likely_automated: u64,
}

impl FamilyPoint {
    /// Folds `(bucket, family, count)` rows, ordered by bucket, into points.
    pub(crate) fn fold(
        rows: impl IntoIterator<Item = (Timestamp, String, u64)>,
    ) -> Vec<FamilyPoint> {
        let mut out: Vec<FamilyPoint> = Vec::new();
        for (bucket, family, n) in rows {
            if out.last().is_none_or(|p| p.bucket != bucket) {
                out.push(FamilyPoint {
                    bucket,
                    likely_human: 0,
                    likely_automated: 0,
                });
            }
            if let Some(p) = out.last_mut() {
                // An unknown label (written by a newer version) counts as automated.
                match crate::observe::ClientFamily::parse(&family).is_some_and(|f| f.likely_human())
                {
                    true => p.likely_human += n,
                    false => p.likely_automated += n,
                }
            }
        }
        out
    }
}

/// The analytics rollups. Every write is one transaction.
#[async_trait::async_trait]
pub trait Rollups: Send + Sync {
    /// Adds a batch: all of it or, on error, none of it.
    async fn write_rollups(&self, batch: &RollupBatch) -> Result<(), StoreError>;
    /// Folds minute buckets older than `now - minutes` into hour buckets, and deletes buckets
    /// (and exposure records, by last sighting) older than `now - hours`.
    async fn roll_up(&self, now: Timestamp, minutes: u64, hours: u64) -> Result<(), StoreError>;
    /// Counts of a site from `since` on.
    async fn traffic(&self, site: &str, since: Timestamp) -> Result<Vec<TrafficRow>, StoreError>;
    /// Responses per bucket of `span` seconds (at least 60) from `since` on, oldest first.
    async fn series(
        &self,
        site: &str,
        since: Timestamp,
        span: u64,
    ) -> Result<Vec<SeriesPoint>, StoreError>;
    /// Cleartext traffic per bucket of `span` seconds (at least 60) from `since` on, by likely
    /// people against likely programs, oldest first.
    async fn cleartext_families(
        &self,
        site: &str,
        since: Timestamp,
        span: u64,
    ) -> Result<Vec<FamilyPoint>, StoreError>;
    /// Counts per value of one dimension (of one scheme, or both), largest first.
    async fn dims(
        &self,
        site: &str,
        since: Timestamp,
        scheme: Option<Scheme>,
        kind: DimKind,
    ) -> Result<Vec<(String, u64)>, StoreError>;
    /// Counts that did not fit under the cap of one dimension.
    async fn overflow(
        &self,
        site: &str,
        since: Timestamp,
        scheme: Option<Scheme>,
        kind: DimKind,
    ) -> Result<u64, StoreError>;
    /// Exposure records of a site last seen from `since` on, most recent first.
    async fn exposures(&self, site: &str, since: Timestamp)
        -> Result<Vec<ExposureRow>, StoreError>;
}
