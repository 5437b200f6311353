//! In-memory aggregation: per-minute counters keyed by small copyable values, with a cap on
//! distinct networks, families and paths per site, minute and scheme. Past the cap, counts go
//! to an overflow counter: memory stays bounded and no count is lost.

use std::collections::HashMap;

use crate::exposure::{CredentialKind, Fingerprint, PositionName};
use crate::observe::{
    ClientFamily, DimKind, HttpVersion, Network, Outcome, PathTemplate, Scheme, TlsVersion,
};
use crate::store::{DimCount, ExposureRow, OverflowCount, RollupBatch, TrafficCount};

/// A stable number for a site name, kept across reloads; 0 is the `unknown` bucket.
pub type SiteId = u32;

use crate::clock::Timestamp;

/// One request, or one connection that never produced a request.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    pub at: Timestamp,
    pub site: SiteId,
    pub outcome: Outcome,
    pub scheme: Scheme,
    pub port: u16,
    pub tls: TlsVersion,
    pub http: HttpVersion,
    /// 1 to 5; 0 when no response was sent.
    pub status_class: u8,
    pub family: ClientFamily,
    pub network: Network,
    /// `None` when no request line was read.
    pub path: Option<PathTemplate>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrafficKey {
    /// Start of the bucket, seconds.
    pub bucket: Timestamp,
    /// Bucket length: 60 or 3600 seconds.
    pub span: u32,
    pub site: SiteId,
    pub outcome: Outcome,
    pub scheme: Scheme,
    pub port: u16,
    pub tls: TlsVersion,
    pub http: HttpVersion,
    pub status_class: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    Network(Network),
    Family(ClientFamily),
    Path(PathTemplate),
}

impl Dim {
    pub fn kind(&self) -> DimKind {
        match self {
            Dim::Network(_) => DimKind::Network,
            Dim::Family(_) => DimKind::Family,
            Dim::Path(_) => DimKind::Path,
        }
    }

    pub fn value(&self) -> String {
        match self {
            Dim::Network(n) => n.to_string(),
            Dim::Family(f) => f.as_str().to_owned(),
            Dim::Path(p) => p.as_str().to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DimKey {
    pub bucket: Timestamp,
    pub span: u32,
    pub site: SiteId,
    pub scheme: Scheme,
    pub dim: Dim,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CapKey {
    pub bucket: Timestamp,
    pub span: u32,
    pub site: SiteId,
    pub scheme: Scheme,
    pub kind: DimKind,
}

/// What is known of one credential seen on one site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExposureAgg {
    pub kind: CredentialKind,
    pub name: PositionName,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
    pub count: u64,
    pub network: Network,
    pub family: ClientFamily,
    pub path: PathTemplate,
}

impl ExposureAgg {
    fn merge(&mut self, other: &ExposureAgg) {
        self.first_seen = self.first_seen.min(other.first_seen);
        if other.last_seen >= self.last_seen {
            self.last_seen = other.last_seen;
            self.network = other.network;
            self.family = other.family;
            self.path = other.path;
        }
        self.count += other.count;
    }
}

/// The maps every request updates: keyed with foldhash (randomly seeded) rather than
/// SipHash, which cost more than the rest of counting a request. Their size is bounded by the
/// per-bucket caps, whatever clients send.
pub type CountMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Counters gathered since the last drain.
#[derive(Debug, Default, Clone)]
pub struct Aggregate {
    pub traffic: CountMap<TrafficKey, u64>,
    pub dims: CountMap<DimKey, u64>,
    /// Distinct values held per (bucket, site, scheme, kind), for the cap.
    pub distinct: CountMap<CapKey, u32>,
    /// Counts whose value did not fit under the cap.
    pub overflow: CountMap<CapKey, u64>,
    pub exposures: CountMap<(SiteId, Fingerprint), ExposureAgg>,
    /// Exposure records refused because too many distinct credentials arrived at once.
    pub exposures_dropped: u64,
}

/// Most distinct credentials held between two drains: beyond, they are counted as dropped.
pub const MAX_EXPOSURES_PENDING: usize = 100_000;

impl Aggregate {
    pub fn is_empty(&self) -> bool {
        self.traffic.is_empty() && self.exposures.is_empty() && self.exposures_dropped == 0
    }

    /// The plain rows the store takes, with site ids turned into names by `name`.
    pub fn to_batch(&self, name: &dyn Fn(SiteId) -> String) -> RollupBatch {
        RollupBatch {
            traffic: self
                .traffic
                .iter()
                .map(|(k, n)| TrafficCount {
                    bucket: k.bucket,
                    span: k.span,
                    site: name(k.site),
                    outcome: k.outcome,
                    scheme: k.scheme,
                    port: k.port,
                    tls: k.tls,
                    http: k.http,
                    status_class: k.status_class,
                    count: *n,
                })
                .collect(),
            dims: self
                .dims
                .iter()
                .map(|(k, n)| DimCount {
                    bucket: k.bucket,
                    span: k.span,
                    site: name(k.site),
                    scheme: k.scheme,
                    kind: k.dim.kind(),
                    value: k.dim.value(),
                    count: *n,
                })
                .collect(),
            overflow: self
                .overflow
                .iter()
                .map(|(k, n)| OverflowCount {
                    bucket: k.bucket,
                    span: k.span,
                    site: name(k.site),
                    scheme: k.scheme,
                    kind: k.kind,
                    count: *n,
                })
                .collect(),
            exposures: self
                .exposures
                .iter()
                .map(|((site, fp), e)| ExposureRow {
                    site: name(*site),
                    fingerprint: fp.to_string(),
                    kind: e.kind.as_str().to_owned(),
                    name: e.name.as_str().to_owned(),
                    first_seen: e.first_seen,
                    last_seen: e.last_seen,
                    count: e.count,
                    network: e.network.to_string(),
                    family: e.family,
                    path: e.path.as_str().to_owned(),
                })
                .collect(),
            exposures_dropped: self.exposures_dropped,
        }
    }

    /// Rough number of entries held, to bound memory while the store is failing.
    pub fn entries(&self) -> usize {
        self.traffic.len() + self.dims.len() + self.overflow.len() + self.exposures.len()
    }

    pub fn record(&mut self, o: &Observation, top_k: u32) {
        let bucket = o.at - o.at % 60;
        let key = TrafficKey {
            bucket,
            span: 60,
            site: o.site,
            outcome: o.outcome,
            scheme: o.scheme,
            port: o.port,
            tls: o.tls,
            http: o.http,
            status_class: o.status_class,
        };
        *self.traffic.entry(key).or_insert(0) += 1;
        self.dim(
            bucket,
            60,
            o.site,
            o.scheme,
            Dim::Network(o.network),
            1,
            top_k,
        );
        self.dim(
            bucket,
            60,
            o.site,
            o.scheme,
            Dim::Family(o.family),
            1,
            top_k,
        );
        if let Some(p) = o.path {
            self.dim(bucket, 60, o.site, o.scheme, Dim::Path(p), 1, top_k);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn dim(
        &mut self,
        bucket: Timestamp,
        span: u32,
        site: SiteId,
        scheme: Scheme,
        dim: Dim,
        n: u64,
        top_k: u32,
    ) {
        let key = DimKey {
            bucket,
            span,
            site,
            scheme,
            dim,
        };
        if let Some(c) = self.dims.get_mut(&key) {
            *c += n;
            return;
        }
        let cap = CapKey {
            bucket,
            span,
            site,
            scheme,
            kind: dim.kind(),
        };
        let held = self.distinct.entry(cap).or_insert(0);
        if *held < top_k {
            *held += 1;
            self.dims.insert(key, n);
        } else {
            *self.overflow.entry(cap).or_insert(0) += n;
        }
    }

    pub fn expose(&mut self, site: SiteId, fp: Fingerprint, e: ExposureAgg) {
        if let Some(cur) = self.exposures.get_mut(&(site, fp)) {
            cur.merge(&e);
        } else if self.exposures.len() < MAX_EXPOSURES_PENDING {
            self.exposures.insert((site, fp), e);
        } else {
            self.exposures_dropped += 1;
        }
    }

    /// Adds `other` into `self`. Caps still hold: values beyond them go to overflow.
    pub fn merge(&mut self, other: Aggregate, top_k: u32) {
        for (k, n) in other.traffic {
            *self.traffic.entry(k).or_insert(0) += n;
        }
        for (k, n) in other.dims {
            self.dim(k.bucket, k.span, k.site, k.scheme, k.dim, n, top_k);
        }
        for (k, n) in other.overflow {
            *self.overflow.entry(k).or_insert(0) += n;
        }
        for ((site, fp), e) in other.exposures {
            self.expose(site, fp, e);
        }
        self.exposures_dropped += other.exposures_dropped;
    }

    /// Folds minute buckets into hour buckets: used when the store has been failing long
    /// enough that pending minutes would outgrow memory. Counts stay exact; only time
    /// resolution is lost.
    pub fn coarsen(&mut self, top_k: u32) {
        let old = std::mem::take(self);
        let hour = |b: Timestamp| b - b % 3600;
        for (mut k, n) in old.traffic {
            k.bucket = hour(k.bucket);
            k.span = 3600;
            *self.traffic.entry(k).or_insert(0) += n;
        }
        for (k, n) in old.dims {
            self.dim(hour(k.bucket), 3600, k.site, k.scheme, k.dim, n, top_k);
        }
        for (mut k, n) in old.overflow {
            k.bucket = hour(k.bucket);
            k.span = 3600;
            *self.overflow.entry(k).or_insert(0) += n;
        }
        self.exposures = old.exposures;
        self.exposures_dropped = old.exposures_dropped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(at: Timestamp, ip: &str, path: &str) -> Observation {
        Observation {
            at,
            site: 1,
            outcome: Outcome::Response,
            scheme: Scheme::Cleartext,
            port: 80,
            tls: TlsVersion::None,
            http: HttpVersion::Http11,
            status_class: 4,
            family: ClientFamily::Curl,
            network: Network::of(ip.parse().expect("ip")),
            path: Some(PathTemplate::of(path)),
        }
    }

    fn total_networks(a: &Aggregate) -> u64 {
        let held: u64 = a
            .dims
            .iter()
            .filter(|(k, _)| k.dim.kind() == DimKind::Network)
            .map(|(_, n)| n)
            .sum();
        let over: u64 = a
            .overflow
            .iter()
            .filter(|(k, _)| k.kind == DimKind::Network)
            .map(|(_, n)| n)
            .sum();
        held + over
    }

    #[test]
    fn distinct_values_are_capped_and_the_rest_counted() {
        let mut a = Aggregate::default();
        for i in 0..50u32 {
            a.record(&obs(120, &format!("10.0.{i}.1"), "/v1"), 10);
        }
        let networks = a
            .dims
            .keys()
            .filter(|k| k.dim.kind() == DimKind::Network)
            .count();
        assert_eq!(networks, 10);
        assert_eq!(total_networks(&a), 50, "no count lost");
        assert_eq!(a.traffic.values().sum::<u64>(), 50);
    }

    #[test]
    fn merge_and_coarsen_keep_every_count() {
        let mut a = Aggregate::default();
        let mut b = Aggregate::default();
        for i in 0..30u64 {
            a.record(&obs(3600 + i * 60, "10.0.0.1", "/a"), 5);
            b.record(&obs(3600 + i * 60, &format!("10.0.{i}.1"), "/b"), 5);
        }
        a.merge(b, 5);
        assert_eq!(a.traffic.values().sum::<u64>(), 60);
        assert_eq!(total_networks(&a), 60);
        a.coarsen(5);
        assert_eq!(a.traffic.len(), 1, "one hour bucket");
        assert_eq!(a.traffic.values().sum::<u64>(), 60);
        assert_eq!(total_networks(&a), 60);
        assert!(a.traffic.keys().all(|k| k.span == 3600 && k.bucket == 3600));
    }
}
