//! The storage seam: the contracts every `PolicyStore`, `EventQueue`, `Rollups` and
//! `CertStore` backend meets (run against the embedded SQLite store and PostgreSQL: `contract`,
//! `queue_contract`, `rollups_contract` and `certs_contract`), that what is written survives a reopen, and the one-time import of the
//! state files earlier versions kept, which loses nothing, happens once, and refuses a damaged
//! file without taking any of it.

mod support;

use portcullis::config::{CleartextMode, HstsOverride, Overrides, SiteOverride};
use portcullis::observe::{ClientFamily, DimKind, HttpVersion, Outcome, Scheme, TlsVersion};
use portcullis::stages::drain::Drain;
use portcullis::stages::{Brownout, Plan, Plans, Stage};
use portcullis::store::{
    Attempt, AuditEntry, AuditEvent, DeliveryState, DimCount, EventQueue, ExposureRow, FamilyPoint,
    NewEvent, NodeInfo, OverflowCount, PgSettings, PgStore, PolicyStore, QueueCounters, Repeat,
    RollupBatch, Rollups, SeriesPoint, SiteState, SqliteStore, StageStep, StoreError, TrafficCount,
    TrafficRow,
};
use portcullis::store::{CertStore, OrderClaim, PendingChallenge, StoredCert};

fn overrides() -> Overrides {
    let mut o = Overrides::new();
    o.insert(
        "www.test".into(),
        SiteOverride {
            cleartext: Some("reject".into()),
            pool: Some("closed".into()),
            origin: None,
            hsts: Some(HstsOverride {
                enabled: Some(true),
                max_age: Some(600),
                include_subdomains: None,
                preload: Some(false),
            }),
        },
    );
    o.insert(
        "*.api.test".into(),
        SiteOverride {
            origin: Some("https://10.0.0.1:9443".into()),
            ..SiteOverride::default()
        },
    );
    o
}

fn plans() -> Plans {
    let mut p = Plans::new();
    p.insert(
        "www.test".into(),
        Plan {
            stage: Stage::Brownout,
            since: 1_800_000_000,
            deprecated_at: Some(1_799_000_000),
            sunset: Some(1_810_000_000),
            notice: Some("https://status.test/https-only".into()),
            brownout: Some(Brownout {
                start: 1_800_000_100,
                duration: 600,
                every: 3600,
            }),
            target_pool: Some("closed".into()),
            previous_pool: None,
            previous_mode: None,
            exposures_acknowledged_at: Some(1_799_500_000),
        },
    );
    p
}

fn drains() -> Vec<Drain> {
    vec![Drain {
        site: "shop.test".into(),
        from_pool: "legacy".into(),
        to_pool: "closed".into(),
        mode: CleartextMode::Redirect,
        moved_at: 1_800_000_000,
        until: 1_800_000_300,
    }]
}

fn audit() -> Vec<AuditEntry> {
    let state = |mode: &str| SiteState {
        pool: "legacy".into(),
        cleartext: mode.into(),
        origin: "http://127.0.0.1:9000/".into(),
        hsts: Some("max-age=31536000".into()),
    };
    vec![
        AuditEntry {
            at: 1_800_000_000,
            who: "admin".into(),
            node: None,
            site: "www.test".into(),
            event: AuditEvent::Site {
                change: serde_json::json!({ "cleartext": "reject" }),
                before: state("redirect"),
                after: Some(state("reject")),
            },
        },
        AuditEntry {
            at: 1_800_000_050,
            who: "admin".into(),
            node: None,
            site: "www.test".into(),
            event: AuditEvent::Stage {
                stage: StageStep {
                    from: Stage::Warn,
                    to: Stage::Brownout,
                },
                forced: true,
                overridden_checks: vec!["2.5% of requests used cleartext".into()],
                before: Box::default(),
                after: Box::new(plans()["www.test"].clone()),
            },
        },
    ]
}

/// What every backend must do, from an empty store.
async fn contract(store: &dyn PolicyStore) {
    assert!(store.overrides().await.expect("overrides").is_empty());
    assert!(store.stages().await.expect("stages").is_empty());
    assert!(store.drains().await.expect("drains").is_empty());
    assert!(store.audit().await.expect("audit").is_empty());

    store.set_overrides(&overrides()).await.expect("write");
    assert_eq!(store.overrides().await.expect("read"), overrides());
    // A set replaces the whole set: a site taken out is gone.
    let mut fewer = overrides();
    fewer.remove("*.api.test");
    store.set_overrides(&fewer).await.expect("write");
    assert_eq!(store.overrides().await.expect("read"), fewer);

    store.set_stages(&plans()).await.expect("write");
    assert_eq!(store.stages().await.expect("read"), plans());
    store.set_stages(&Plans::new()).await.expect("write");
    assert!(store.stages().await.expect("read").is_empty());

    store.set_drains(&drains()).await.expect("write");
    assert_eq!(store.drains().await.expect("read"), drains());

    // Every policy write moves the generation other nodes poll; appending to the log does not.
    let mut g = store.generation().await.expect("generation");
    for write in 0..3 {
        match write {
            0 => store.set_overrides(&fewer).await.expect("write"),
            1 => store.set_stages(&Plans::new()).await.expect("write"),
            _ => store.set_drains(&drains()).await.expect("write"),
        }
        let next = store.generation().await.expect("generation");
        assert!(next > g, "write {write}: {next} after {g}");
        g = next;
    }
    for e in audit() {
        store.append_audit(&e).await.expect("append");
    }
    assert_eq!(store.generation().await.expect("generation"), g);

    // Heartbeats: one row per node, the latest wins.
    let node = |name: &str, generation: u64, at: u64| NodeInfo {
        name: name.into(),
        version: "0.1.0".into(),
        generation,
        started_at: 100,
        last_heartbeat: at,
    };
    store
        .heartbeat(&node("edge-2", 1, 110))
        .await
        .expect("beat");
    store
        .heartbeat(&node("edge-1", 1, 110))
        .await
        .expect("beat");
    store
        .heartbeat(&node("edge-1", 3, 120))
        .await
        .expect("beat");
    assert_eq!(
        store.nodes().await.expect("nodes"),
        vec![node("edge-1", 3, 120), node("edge-2", 1, 110)]
    );
    // Appended, in order, typed as written.
    assert_eq!(store.audit().await.expect("read"), audit());
    // Overrides, plans and drains are independent of each other and of the log.
    assert_eq!(store.overrides().await.expect("read"), fewer);
    assert_eq!(store.drains().await.expect("read"), drains());
}

#[tokio::test]
async fn the_sqlite_store_meets_the_contract_and_keeps_it_across_a_reopen() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = SqliteStore::open(dir.path()).expect("open");
    contract(&store).await;
    drop(store);
    let again = SqliteStore::open(dir.path()).expect("reopen");
    assert_eq!(again.drains().await.expect("drains"), drains());
    assert_eq!(again.audit().await.expect("audit"), audit());
    // A reader opened read-only (the CLI) sees the same.
    let reader = SqliteStore::open_read_only(dir.path())
        .expect("open")
        .expect("exists");
    assert_eq!(reader.audit_now().expect("audit").len(), 2);
    assert!(SqliteStore::open_read_only(&dir.path().join("elsewhere"))
        .expect("no error")
        .is_none());
}

/// The files an earlier version wrote, as it wrote them.
fn write_legacy(dir: &std::path::Path) {
    std::fs::write(
        dir.join("overrides.json"),
        serde_json::to_string_pretty(&overrides()).expect("json"),
    )
    .expect("write");
    std::fs::write(
        dir.join("stages.json"),
        serde_json::to_string_pretty(&plans()).expect("json"),
    )
    .expect("write");
    std::fs::write(
        dir.join("drains.json"),
        r#"[{"site":"shop.test","from_pool":"legacy","to_pool":"closed","mode":"redirect","moved_at":1800000000,"until":1800000300}]"#,
    )
    .expect("write");
    let lines: Vec<String> = audit()
        .iter()
        .map(|e| serde_json::to_string(e).expect("json"))
        .collect();
    std::fs::write(dir.join("audit.jsonl"), lines.join("\n") + "\n").expect("write");
}

#[tokio::test]
async fn the_state_files_of_an_earlier_version_are_imported_once_and_kept_aside() {
    let dir = tempfile::tempdir().expect("tmp");
    write_legacy(dir.path());
    let store = SqliteStore::open(dir.path()).expect("open imports");
    assert_eq!(store.overrides().await.expect("read"), overrides());
    assert_eq!(store.stages().await.expect("read"), plans());
    assert_eq!(store.drains().await.expect("read"), drains());
    assert_eq!(store.audit().await.expect("read"), audit());
    for f in [
        "overrides.json",
        "stages.json",
        "drains.json",
        "audit.jsonl",
    ] {
        assert!(!dir.path().join(f).exists(), "{f} is moved aside");
        assert!(
            dir.path().join(format!("{f}.imported")).exists(),
            "{f} is kept as {f}.imported"
        );
    }
    drop(store);
    // A second start imports nothing again, even if a file came back.
    std::fs::copy(
        dir.path().join("audit.jsonl.imported"),
        dir.path().join("audit.jsonl"),
    )
    .expect("copy");
    let store = SqliteStore::open(dir.path()).expect("reopen");
    assert_eq!(store.audit().await.expect("read").len(), 2);
}

#[tokio::test]
async fn a_damaged_state_file_stops_the_import_names_the_file_and_takes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    write_legacy(dir.path());
    std::fs::write(
        dir.path().join("stages.json"),
        "{\"www.test\": {\"stage\": ",
    )
    .expect("write");
    let err = match SqliteStore::open(dir.path()) {
        Err(e) => e,
        Ok(_) => panic!("a damaged stages.json must not be read as empty"),
    };
    assert!(matches!(err, StoreError::Import { .. }), "{err:?}");
    assert!(err.to_string().contains("stages.json"), "{err}");
    // Nothing was taken: every file is still there, and the tables are empty.
    for f in [
        "overrides.json",
        "stages.json",
        "drains.json",
        "audit.jsonl",
    ] {
        assert!(dir.path().join(f).exists(), "{f} left in place");
    }
    std::fs::remove_file(dir.path().join("stages.json")).expect("remove");
    let store = SqliteStore::open(dir.path()).expect("open once fixed");
    assert_eq!(store.overrides().await.expect("read"), overrides());
    assert!(store.stages().await.expect("read").is_empty());
}

fn event(id: &str, site: &str, fingerprint: &str, at: u64) -> NewEvent {
    NewEvent {
        id: id.into(),
        site: site.into(),
        fingerprint: fingerprint.into(),
        kind: "header".into(),
        name: "x-api-key".into(),
        policy: "notify".into(),
        at,
        network: "203.0.113.0/24".into(),
        family: "python-requests".into(),
        path: "/v1/orders".into(),
    }
}

/// What every exposure queue backend must do, from an empty queue.
async fn queue_contract(q: &dyn EventQueue) {
    let (known, pending) = q.known().await.expect("known");
    assert!(known.is_empty());
    assert_eq!(pending, 0);
    let counters = QueueCounters {
        coalesced: 2,
        dropped_site_rate: 1,
        ..QueueCounters::default()
    };
    q.enqueue(
        &[
            event("e1", "a.test", "fp1", 100),
            event("e2", "b.test", "fp2", 110),
        ],
        &[],
        &counters,
    )
    .await
    .expect("enqueue");
    // One event per (site, fingerprint): a second one for the same pair is not added, and
    // repeats fold into the first.
    q.enqueue(
        &[event("e3", "a.test", "fp1", 120)],
        &[Repeat {
            site: "a.test".into(),
            fingerprint: "fp1".into(),
            count: 4,
            last_seen: 130,
        }],
        &counters,
    )
    .await
    .expect("enqueue");
    let (known, pending) = q.known().await.expect("known");
    assert_eq!(pending, 2);
    assert!(known.contains(&("a.test".to_owned(), "fp1".to_owned())));
    let (events, totals) = q.events(None).await.expect("events");
    assert_eq!(events.len(), 2);
    assert_eq!(totals.coalesced, 4, "counters add up");
    assert_eq!(totals.dropped_site_rate, 2);
    let a = q.events(Some("a.test")).await.expect("events").0;
    assert_eq!(a.len(), 1);
    assert_eq!(
        (a[0].id.as_str(), a[0].count, a[0].last_seen),
        ("e1", 5, 130)
    );
    assert_eq!(a[0].state, DeliveryState::Pending);

    // Claimed: pending, next attempt reached, soonest first, and held by one node at a time.
    let due = q.claim(105, 10, 60, "node-a").await.expect("claim");
    assert_eq!(
        due.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["e1"]
    );
    assert!(
        q.claim(105, 10, 60, "node-b")
            .await
            .expect("claim")
            .is_empty(),
        "another node does not get an event under lease"
    );
    // The holder died: once the lease has run out, another node takes it.
    let due = q.claim(200, 1, 60, "node-b").await.expect("claim");
    assert_eq!(due.len(), 1, "the limit holds");
    assert_eq!(due[0].id, "e1", "the expired lease is taken over");
    // A failed attempt postpones it; a delivery ends it.
    q.record(&Attempt {
        id: "e1".into(),
        state: DeliveryState::Pending,
        attempts: 1,
        next_attempt: 500,
        error: Some("503 from the webhook".into()),
        at: 200,
    })
    .await
    .expect("record");
    let due: Vec<String> = q
        .claim(200, 10, 60, "node-a")
        .await
        .expect("claim")
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(due, ["e2"]);
    q.record(&Attempt {
        id: "e2".into(),
        state: DeliveryState::Delivered,
        attempts: 1,
        next_attempt: 0,
        error: None,
        at: 210,
    })
    .await
    .expect("record");
    let b = &q.events(Some("b.test")).await.expect("events").0[0];
    assert_eq!(b.state, DeliveryState::Delivered);
    assert_eq!(b.delivered_at, Some(210));
    let a = &q.events(Some("a.test")).await.expect("events").0[0];
    assert_eq!(a.last_error.as_deref(), Some("503 from the webhook"));
    assert_eq!((a.attempts, a.next_attempt), (1, 500));
    assert_eq!(q.known().await.expect("known").1, 1, "one still pending");
}

#[tokio::test]
async fn the_sqlite_store_meets_the_queue_contract() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = SqliteStore::open(dir.path()).expect("open");
    queue_contract(&store).await;
    drop(store);
    let again = SqliteStore::open(dir.path()).expect("reopen");
    assert_eq!(again.events(None).await.expect("events").0.len(), 2);
}

#[tokio::test]
async fn the_exposure_queue_of_an_earlier_version_is_imported() {
    let dir = tempfile::tempdir().expect("tmp");
    let old = dir.path().join("exposure-events.db");
    {
        let c = rusqlite::Connection::open(&old).expect("old db");
        c.execute_batch(
            "CREATE TABLE events (
                id TEXT PRIMARY KEY, site TEXT NOT NULL, fingerprint TEXT NOT NULL, kind TEXT NOT NULL,
                name TEXT NOT NULL, policy TEXT NOT NULL, first_seen INTEGER NOT NULL, last_seen INTEGER NOT NULL,
                count INTEGER NOT NULL, network TEXT NOT NULL, family TEXT NOT NULL, path TEXT NOT NULL,
                state TEXT NOT NULL, attempts INTEGER NOT NULL, next_attempt INTEGER NOT NULL,
                last_error TEXT, delivered_at INTEGER, created_at INTEGER NOT NULL,
                UNIQUE (site, fingerprint));
             CREATE TABLE counters (name TEXT PRIMARY KEY, count INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO events VALUES ('old1', 'legacy.test', 'ab12', 'header', 'x-api-key', 'revoke',
                10, 20, 3, '198.51.100.0/24', 'curl', '/', 'failed', 8, 0, 'timed out', NULL, 10);
             INSERT INTO counters VALUES ('dropped_queue_full', 7);",
        )
        .expect("old schema");
    }
    let store = SqliteStore::open(dir.path()).expect("open imports");
    let (events, counters) = store.events(None).await.expect("events");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].id, "old1");
    assert_eq!(events[0].state, DeliveryState::Failed);
    assert_eq!(events[0].last_error.as_deref(), Some("timed out"));
    assert_eq!(counters.dropped_queue_full, 7);
    assert!(!old.exists(), "moved aside");
    assert!(dir.path().join("exposure-events.db.imported").exists());
}

#[test]
fn the_cli_reads_the_overrides_the_store_keeps() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state");
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[state]
dir = "{}"
[dns]
listen = "127.0.0.1:5353"
zones = ["example.test"]
[[pool]]
name = "open"
addresses = ["192.0.2.20"]
tls_ports = [443]
cleartext_ports = [80]
[[pool]]
name = "closed"
addresses = ["192.0.2.10"]
tls_ports = [443]
[[site]]
host = "www.example.test"
pool = "open"
origin = "http://127.0.0.1:9000"
cleartext = "redirect"
"#,
            state.display()
        ),
    )
    .expect("config");
    let export = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["dns", "export", "example.test", "-c"])
            .arg(&config)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = export();
    assert!(
        before.contains("192.0.2.20") && !before.contains("192.0.2.10"),
        "{before}"
    );
    // An admin change moved the site to the closed pool: the CLI answers as `serve` would.
    let mut o = Overrides::new();
    o.insert(
        "www.example.test".into(),
        SiteOverride {
            pool: Some("closed".into()),
            cleartext: Some("closed".into()),
            ..SiteOverride::default()
        },
    );
    SqliteStore::open(&state)
        .expect("store")
        .set_overrides_now(&o)
        .expect("write");
    let after = export();
    assert!(
        after.contains("192.0.2.10") && !after.contains("192.0.2.20"),
        "{after}"
    );
}

/// The real SQLite queue, refusing its first `n` writes as a full disk would.
struct Refusing {
    inner: SqliteStore,
    refusals: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl EventQueue for Refusing {
    async fn enqueue(
        &self,
        new: &[NewEvent],
        repeats: &[Repeat],
        counters: &QueueCounters,
    ) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::Relaxed;
        if self
            .refusals
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::Task("disk full (test)".into()));
        }
        self.inner.enqueue(new, repeats, counters).await
    }
    async fn known(
        &self,
    ) -> Result<(std::collections::HashSet<(String, String)>, u32), StoreError> {
        self.inner.known().await
    }
    async fn claim(
        &self,
        now: u64,
        limit: u32,
        lease: u64,
        holder: &str,
    ) -> Result<Vec<portcullis::store::QueuedEvent>, StoreError> {
        self.inner.claim(now, limit, lease, holder).await
    }
    async fn record(&self, attempt: &Attempt) -> Result<(), StoreError> {
        self.inner.record(attempt).await
    }
    async fn events(
        &self,
        site: Option<&str>,
    ) -> Result<(Vec<portcullis::store::QueuedEvent>, QueueCounters), StoreError> {
        self.inner.events(site).await
    }
}

#[tokio::test]
async fn events_the_queue_could_not_write_are_kept_and_written_on_the_next_try() {
    use portcullis::exposure::queue::Responder;
    let dir = tempfile::tempdir().expect("tmp");
    let store = SqliteStore::open(dir.path()).expect("open");
    let queue = std::sync::Arc::new(Refusing {
        inner: store.clone(),
        refusals: std::sync::atomic::AtomicU32::new(2),
    });
    // No policy: nothing is delivered, so what is queued stays visible.
    let r = Responder::start(
        portcullis::config::ExposureSettings::default(),
        queue,
        std::sync::Arc::new(|_: &str| None),
        "node-a".into(),
        dir.path().join("exposure-spill.json"),
    );
    let fp = portcullis::exposure::Fingerprinter::open(dir.path()).expect("key");
    let policy = portcullis::config::ExposureResponse {
        revoke: false,
        url: "https://hooks.test/exposed".parse().expect("url"),
        secret: vec![7; 32],
        ca: None,
        include_raw: false,
    };
    for (i, key) in ["key-one-0000000000", "key-two-0000000000"]
        .iter()
        .enumerate()
    {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-api-key", key.parse().expect("value"));
        let mut found = Vec::new();
        portcullis::exposure::detect(
            &headers,
            &"/v1".parse().expect("uri"),
            &Default::default(),
            &fp,
            &mut found,
        );
        assert_eq!(found.len(), 1);
        r.offer(
            "legacy.test",
            &policy,
            &found,
            Vec::new(),
            portcullis::observe::Network::of("203.0.113.9".parse().expect("ip")),
            portcullis::observe::ClientFamily::classify(Some(b"curl/8.5")),
            portcullis::observe::PathTemplate::of("/v1"),
            1_800_000_000 + i as u64,
        );
        // The first offer is written (and refused) before the second arrives.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    }
    // Two refused writes, then one that takes both events.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (events, _) = store.events(Some("legacy.test")).await.expect("events");
        if events.len() == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events lost after a refused write: {events:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    r.shutdown().await;
}

fn traffic(bucket: u64, site: &str, scheme: Scheme, count: u64) -> TrafficCount {
    TrafficCount {
        bucket,
        span: 60,
        site: site.into(),
        outcome: Outcome::Response,
        scheme,
        port: if scheme == Scheme::Tls { 443 } else { 80 },
        tls: if scheme == Scheme::Tls {
            TlsVersion::Tls13
        } else {
            TlsVersion::None
        },
        http: HttpVersion::Http11,
        status_class: 2,
        count,
    }
}

fn exposure(site: &str, fingerprint: &str, at: u64, network: &str) -> ExposureRow {
    ExposureRow {
        site: site.into(),
        fingerprint: fingerprint.into(),
        kind: "bearer".into(),
        name: "authorization".into(),
        first_seen: at,
        last_seen: at,
        count: 1,
        network: network.into(),
        family: ClientFamily::Curl,
        path: "/v1".into(),
    }
}

fn family(bucket: u64, scheme: Scheme, value: &str, count: u64) -> DimCount {
    DimCount {
        bucket,
        span: 60,
        site: "s.test".into(),
        scheme,
        kind: DimKind::Family,
        value: value.into(),
        count,
    }
}

/// What every `Rollups` backend must do: counts add up (writing twice counts twice), readers
/// see them by site, window, scheme and dimension, exposures merge per (site, fingerprint)
/// with the latest sighting's details, and the roll-up folds old minutes into hours without
/// losing a count and expires what is older than the hour retention.
async fn rollups_contract(r: &dyn Rollups) {
    let day = 86_400;
    let now = 100 * day;
    let old = now - 3 * day; // an old hour, on an hour boundary
    let batch = RollupBatch {
        traffic: vec![
            traffic(old, "s.test", Scheme::Cleartext, 2),
            traffic(old + 60, "s.test", Scheme::Cleartext, 3),
            traffic(old + 120, "s.test", Scheme::Tls, 4),
            traffic(now - 60, "s.test", Scheme::Tls, 5),
            traffic(now - 60, "other.test", Scheme::Tls, 100),
        ],
        dims: vec![
            family(old, Scheme::Cleartext, "browser", 1),
            family(old, Scheme::Cleartext, "curl", 1),
            family(old + 60, Scheme::Cleartext, "python", 3),
            // TLS traffic has families too; they are not cleartext.
            family(old + 120, Scheme::Tls, "browser", 4),
            DimCount {
                bucket: old,
                span: 60,
                site: "s.test".into(),
                scheme: Scheme::Cleartext,
                kind: DimKind::Path,
                value: "/a".into(),
                count: 5,
            },
            DimCount {
                bucket: now - 60,
                span: 60,
                site: "s.test".into(),
                scheme: Scheme::Tls,
                kind: DimKind::Path,
                value: "/b".into(),
                count: 1,
            },
        ],
        overflow: vec![OverflowCount {
            bucket: old + 60,
            span: 60,
            site: "s.test".into(),
            scheme: Scheme::Cleartext,
            kind: DimKind::Network,
            count: 9,
        }],
        exposures: vec![exposure("s.test", "fp1", old, "192.0.2.0/24")],
        exposures_dropped: 0,
    };
    r.write_rollups(&batch).await.expect("write");
    // Again, each count split over two rows of the same key in one batch (as a spilled batch
    // appended to a new one has): the store sums them.
    let mut split = batch.clone();
    let halves = |c: u64| [c / 2, c - c / 2];
    split.traffic = batch
        .traffic
        .iter()
        .flat_map(|t| halves(t.count).map(|count| TrafficCount { count, ..t.clone() }))
        .collect();
    split.dims = batch
        .dims
        .iter()
        .flat_map(|d| halves(d.count).map(|count| DimCount { count, ..d.clone() }))
        .collect();
    split.overflow = batch
        .overflow
        .iter()
        .flat_map(|o| halves(o.count).map(|count| OverflowCount { count, ..o.clone() }))
        .collect();
    r.write_rollups(&split).await.expect("write again, split");
    // The same credential seen later from elsewhere: one record, widened.
    r.write_rollups(&RollupBatch {
        exposures: vec![exposure("s.test", "fp1", now - 30, "198.51.100.0/24")],
        ..RollupBatch::default()
    })
    .await
    .expect("write a later sighting");

    let total = |rows: Vec<TrafficRow>, scheme: Scheme| -> u64 {
        rows.iter()
            .filter(|t| t.scheme == scheme)
            .map(|t| t.count)
            .sum()
    };
    let rows = r.traffic("s.test", 0).await.expect("traffic");
    assert_eq!(total(rows.clone(), Scheme::Cleartext), 10);
    assert_eq!(total(rows.clone(), Scheme::Tls), 18);
    assert!(rows
        .iter()
        .all(|t| t.outcome == Outcome::Response && t.status_class == 2));
    assert!(rows
        .iter()
        .any(|t| t.port == 443 && t.tls == TlsVersion::Tls13));
    // The window starts where asked.
    let recent = r.traffic("s.test", now - 120).await.expect("traffic");
    assert_eq!(total(recent, Scheme::Tls), 10);
    assert_eq!(
        r.series("s.test", 0, 60).await.expect("series"),
        vec![
            SeriesPoint {
                bucket: old,
                tls: 0,
                cleartext: 4
            },
            SeriesPoint {
                bucket: old + 60,
                tls: 0,
                cleartext: 6
            },
            SeriesPoint {
                bucket: old + 120,
                tls: 8,
                cleartext: 0
            },
            SeriesPoint {
                bucket: now - 60,
                tls: 10,
                cleartext: 0
            },
        ]
    );
    assert_eq!(
        r.dims("s.test", 0, Some(Scheme::Cleartext), DimKind::Path)
            .await
            .expect("dims"),
        vec![("/a".to_owned(), 10)]
    );
    // Each count was written twice (whole, then split in halves).
    let point = |bucket, likely_human, likely_automated| FamilyPoint {
        bucket,
        likely_human,
        likely_automated,
    };
    assert_eq!(
        r.cleartext_families("s.test", 0, 60)
            .await
            .expect("families"),
        vec![point(old, 2, 2), point(old + 60, 0, 6)]
    );
    assert_eq!(
        r.cleartext_families("s.test", 0, 3600)
            .await
            .expect("families by hour"),
        vec![point(old, 2, 8)]
    );
    assert!(r
        .cleartext_families("s.test", old + 120, 60)
        .await
        .expect("window")
        .is_empty());
    assert_eq!(
        r.dims("s.test", 0, None, DimKind::Path)
            .await
            .expect("dims"),
        vec![("/a".to_owned(), 10), ("/b".to_owned(), 2)]
    );
    assert_eq!(
        r.overflow("s.test", 0, None, DimKind::Network)
            .await
            .expect("overflow"),
        18
    );
    assert_eq!(
        r.overflow("s.test", 0, Some(Scheme::Tls), DimKind::Network)
            .await
            .expect("overflow"),
        0
    );
    let exposures = r.exposures("s.test", 0).await.expect("exposures");
    assert_eq!(exposures.len(), 1);
    let e = &exposures[0];
    assert_eq!((e.first_seen, e.last_seen, e.count), (old, now - 30, 3));
    assert_eq!(
        e.network, "198.51.100.0/24",
        "the latest sighting's network"
    );
    assert_eq!(e.family, ClientFamily::Curl);
    assert!(r.exposures("other.test", 0).await.expect("none").is_empty());

    // Minutes older than two days become one hour; nothing is lost.
    r.roll_up(now, 2 * day, 30 * day).await.expect("roll up");
    assert_eq!(
        r.series("s.test", 0, 60).await.expect("series"),
        vec![
            SeriesPoint {
                bucket: old,
                tls: 8,
                cleartext: 10
            },
            SeriesPoint {
                bucket: now - 60,
                tls: 10,
                cleartext: 0
            },
        ]
    );
    assert_eq!(
        r.dims("s.test", 0, None, DimKind::Path)
            .await
            .expect("dims"),
        vec![("/a".to_owned(), 10), ("/b".to_owned(), 2)]
    );
    assert_eq!(
        r.overflow("s.test", 0, None, DimKind::Network)
            .await
            .expect("overflow"),
        18
    );
    // Rolling up again changes nothing.
    r.roll_up(now, 2 * day, 30 * day)
        .await
        .expect("roll up again");
    assert_eq!(
        total(r.traffic("s.test", 0).await.expect("t"), Scheme::Cleartext),
        10
    );
    // Hours older than a day go, with exposure records last seen before then.
    r.roll_up(now, 2 * day, day).await.expect("expire");
    assert_eq!(
        r.series("s.test", 0, 3600).await.expect("series"),
        vec![SeriesPoint {
            bucket: now - 3600,
            tls: 10,
            cleartext: 0
        }]
    );
    assert_eq!(
        r.overflow("s.test", 0, None, DimKind::Network)
            .await
            .expect("o"),
        0
    );
    assert_eq!(r.exposures("s.test", 0).await.expect("kept").len(), 1);
    r.roll_up(now + 2 * day, 2 * day, day)
        .await
        .expect("expire all");
    assert!(r.exposures("s.test", 0).await.expect("gone").is_empty());
    assert!(r.traffic("s.test", 0).await.expect("gone").is_empty());
    assert_eq!(
        total(r.traffic("other.test", 0).await.expect("t"), Scheme::Tls),
        0
    );
}

#[tokio::test]
async fn the_sqlite_store_meets_the_rollups_contract() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = SqliteStore::open(dir.path()).expect("open");
    rollups_contract(&store).await;
}

#[tokio::test]
async fn the_analytics_database_of_an_earlier_version_is_imported() {
    let dir = tempfile::tempdir().expect("tmp");
    let old = dir.path().join("analytics.db");
    {
        let c = rusqlite::Connection::open(&old).expect("old db");
        c.execute_batch(
            "CREATE TABLE traffic (
                bucket INTEGER NOT NULL, span INTEGER NOT NULL, site TEXT NOT NULL, outcome TEXT NOT NULL,
                scheme TEXT NOT NULL, port INTEGER NOT NULL, tls TEXT NOT NULL, http TEXT NOT NULL,
                status_class INTEGER NOT NULL, count INTEGER NOT NULL,
                PRIMARY KEY (bucket, span, site, outcome, scheme, port, tls, http, status_class)) WITHOUT ROWID;
             CREATE TABLE dims (
                bucket INTEGER NOT NULL, span INTEGER NOT NULL, site TEXT NOT NULL, scheme TEXT NOT NULL,
                kind TEXT NOT NULL, value TEXT NOT NULL, count INTEGER NOT NULL,
                PRIMARY KEY (bucket, span, site, scheme, kind, value)) WITHOUT ROWID;
             CREATE TABLE overflow (
                bucket INTEGER NOT NULL, span INTEGER NOT NULL, site TEXT NOT NULL, scheme TEXT NOT NULL,
                kind TEXT NOT NULL, count INTEGER NOT NULL,
                PRIMARY KEY (bucket, span, site, scheme, kind)) WITHOUT ROWID;
             CREATE TABLE exposures (
                site TEXT NOT NULL, fingerprint TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
                first_seen INTEGER NOT NULL, last_seen INTEGER NOT NULL, count INTEGER NOT NULL,
                network TEXT NOT NULL, family TEXT NOT NULL, path TEXT NOT NULL,
                PRIMARY KEY (site, fingerprint)) WITHOUT ROWID;
             CREATE TABLE counters (name TEXT PRIMARY KEY, count INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO traffic VALUES (3600, 3600, 'legacy.test', 'response', 'cleartext', 80, 'none', 'HTTP/1.1', 4, 12);
             INSERT INTO traffic VALUES (3600, 3600, 'legacy.test', 'response', 'tls', 443, 'TLSv1.3', 'HTTP/2', 2, 30);
             INSERT INTO dims VALUES (3600, 3600, 'legacy.test', 'cleartext', 'family', 'curl', 12);
             INSERT INTO overflow VALUES (3600, 3600, 'legacy.test', 'cleartext', 'network', 2);
             INSERT INTO exposures VALUES ('legacy.test', 'ab12', 'bearer', 'authorization', 3600, 3700, 4,
                '198.51.100.0/24', 'curl', '/v1');",
        )
        .expect("old schema");
    }
    let store = SqliteStore::open(dir.path()).expect("open imports");
    let rows = store.traffic("legacy.test", 0).await.expect("traffic");
    assert_eq!(rows.iter().map(|r| r.count).sum::<u64>(), 42);
    assert!(rows.iter().any(|r| r.scheme == Scheme::Cleartext
        && r.outcome == Outcome::Response
        && r.count == 12
        && r.status_class == 4));
    assert_eq!(
        store
            .dims("legacy.test", 0, Some(Scheme::Cleartext), DimKind::Family)
            .await
            .expect("dims"),
        vec![("curl".to_owned(), 12)]
    );
    assert_eq!(
        store
            .overflow("legacy.test", 0, None, DimKind::Network)
            .await
            .expect("overflow"),
        2
    );
    let e = store.exposures("legacy.test", 0).await.expect("exposures");
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].fingerprint.as_str(), e[0].count), ("ab12", 4));
    assert!(!old.exists(), "moved aside");
    assert!(dir.path().join("analytics.db.imported").exists());
    drop(store);
    // Imported once: a second start does not count the old rows again.
    std::fs::copy(dir.path().join("analytics.db.imported"), &old).expect("copy back");
    let store = SqliteStore::open(dir.path()).expect("reopen");
    let rows = store.traffic("legacy.test", 0).await.expect("traffic");
    assert_eq!(rows.iter().map(|r| r.count).sum::<u64>(), 42);
}

/// A PgStore on a fresh database of the test process's PostgreSQL server.
async fn pg() -> PgStore {
    let url = support::postgres::Postgres::shared().database().await;
    PgStore::connect(&PgSettings {
        url,
        pool_size: 4,
        ca: Vec::new(),
        node: "node-a".into(),
    })
    .await
    .expect("connect")
}

#[tokio::test]
async fn the_postgres_store_meets_the_contract() {
    let store = pg().await;
    contract(&store).await;
}

#[tokio::test]
async fn the_postgres_store_meets_the_queue_contract() {
    let store = pg().await;
    queue_contract(&store).await;
}

#[tokio::test]
async fn the_postgres_store_meets_the_rollups_contract() {
    let store = pg().await;
    rollups_contract(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_migrate_once_and_sum_their_counts() {
    let url = support::postgres::Postgres::shared().database().await;
    let settings = |node: &str| PgSettings {
        url: url.clone(),
        pool_size: 2,
        ca: Vec::new(),
        node: node.into(),
    };
    // Eight nodes connect at once to an empty database: the advisory lock serialises their
    // migrations, and every one of them starts.
    let mut starts = Vec::new();
    for i in 0..8 {
        let s = settings(&format!("node-{i}"));
        starts.push(tokio::spawn(async move { PgStore::connect(&s).await }));
    }
    let mut nodes = Vec::new();
    for s in starts {
        nodes.push(s.await.expect("task").expect("every node starts"));
    }
    // Each node counts its own requests in the same bucket; a read sums them.
    for (i, n) in nodes.iter().enumerate() {
        n.write_rollups(&RollupBatch {
            traffic: vec![traffic(600, "s.test", Scheme::Cleartext, i as u64 + 1)],
            ..RollupBatch::default()
        })
        .await
        .expect("write");
    }
    let total: u64 = nodes[3]
        .traffic("s.test", 0)
        .await
        .expect("read")
        .iter()
        .map(|r| r.count)
        .sum();
    assert_eq!(total, (1..=8).sum::<u64>());
    assert_eq!(
        nodes[0].migrate().await.expect("again"),
        nodes[7].migrate().await.expect("again")
    );
}

#[tokio::test]
async fn a_bad_store_url_is_refused_without_echoing_its_password() {
    let err = match PgStore::connect(&PgSettings {
        url: "postgres://app:s3cret-pw@127.0.0.1:1/nowhere?sslmode=disable".into(),
        pool_size: 1,
        ca: Vec::new(),
        node: "n".into(),
    })
    .await
    {
        Err(e) => e.to_string(),
        Ok(_) => panic!("nothing listens on port 1"),
    };
    assert!(!err.contains("s3cret-pw"), "{err}");
    assert!(err.contains("127.0.0.1:1/nowhere"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_claiming_at_once_take_each_due_event_exactly_once() {
    let url = support::postgres::Postgres::shared().database().await;
    let mut nodes = Vec::new();
    for i in 0..4 {
        nodes.push(std::sync::Arc::new(
            PgStore::connect(&PgSettings {
                url: url.clone(),
                pool_size: 2,
                ca: Vec::new(),
                node: format!("node-{i}"),
            })
            .await
            .expect("connect"),
        ));
    }
    let new: Vec<NewEvent> = (0..20)
        .map(|i| event(&format!("e{i}"), "s.test", &format!("fp{i}"), 100))
        .collect();
    nodes[0]
        .enqueue(&new, &[], &QueueCounters::default())
        .await
        .expect("enqueue");
    // Four nodes claim five each, at the same moment: twenty distinct events between them.
    let mut claims = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let n = n.clone();
        claims.push(tokio::spawn(async move {
            n.claim(150, 5, 60, &format!("node-{i}")).await
        }));
    }
    let mut ids = Vec::new();
    for c in claims {
        ids.extend(
            c.await
                .expect("task")
                .expect("claim")
                .into_iter()
                .map(|e| e.id),
        );
    }
    ids.sort();
    let before = ids.len();
    ids.dedup();
    assert_eq!((before, ids.len()), (20, 20), "{ids:?}");
    assert!(nodes[1]
        .claim(150, 20, 60, "late")
        .await
        .expect("claim")
        .is_empty());
}

#[tokio::test]
async fn a_store_of_the_previous_version_gets_delivery_leases() {
    let dir = tempfile::tempdir().expect("tmp");
    {
        // portcullis.db as the previous version left it: events without lease columns.
        let c = rusqlite::Connection::open(SqliteStore::path(dir.path())).expect("db");
        c.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO meta VALUES ('schema', 1);
             CREATE TABLE events (
                id TEXT PRIMARY KEY, site TEXT NOT NULL, fingerprint TEXT NOT NULL, kind TEXT NOT NULL,
                name TEXT NOT NULL, policy TEXT NOT NULL, first_seen INTEGER NOT NULL, last_seen INTEGER NOT NULL,
                count INTEGER NOT NULL, network TEXT NOT NULL, family TEXT NOT NULL, path TEXT NOT NULL,
                state TEXT NOT NULL, attempts INTEGER NOT NULL, next_attempt INTEGER NOT NULL,
                last_error TEXT, delivered_at INTEGER, created_at INTEGER NOT NULL,
                UNIQUE (site, fingerprint));
             INSERT INTO events VALUES ('old1', 'legacy.test', 'ab12', 'header', 'x-api-key', 'notify',
                10, 20, 3, '198.51.100.0/24', 'curl', '/', 'pending', 1, 50, NULL, NULL, 10);",
        )
        .expect("old schema");
    }
    let store = SqliteStore::open(dir.path()).expect("open upgrades");
    let claimed = store.claim(60, 10, 60, "node-a").await.expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!((claimed[0].id.as_str(), claimed[0].count), ("old1", 3));
    assert!(store
        .claim(60, 10, 60, "node-b")
        .await
        .expect("claim")
        .is_empty());
}

fn stored(site: &str, chain: &str) -> StoredCert {
    StoredCert {
        site: site.into(),
        chain_pem: chain.into(),
        sealed_key: vec![1, 2, 3, site.len() as u8],
        directory: "https://ca.test/dir".into(),
        version: 0,
    }
}

fn pending(site: &str, holder: &str, name: &str) -> PendingChallenge {
    PendingChallenge {
        site: site.into(),
        holder: holder.into(),
        kind: "tls-alpn-01".into(),
        name: name.into(),
        value: "ab".repeat(32),
    }
}

/// What the ACME client relies on: one account per directory (the first one kept), versioned
/// certificates read incrementally, challenge answers replaced per site, and an order lease
/// that one holder at a time gets, that carries the fleet's backoff, and that a dead holder's
/// expiry releases.
async fn certs_contract(c: &dyn CertStore) {
    let dir = "https://ca.test/dir";
    assert_eq!(c.acme_account(dir).await.expect("account"), None);
    assert_eq!(
        c.add_acme_account(dir, b"first").await.expect("add"),
        b"first"
    );
    assert_eq!(
        c.add_acme_account(dir, b"second").await.expect("add"),
        b"first"
    );
    assert_eq!(
        c.acme_account(dir).await.expect("account").as_deref(),
        Some(&b"first"[..])
    );
    assert_eq!(
        c.acme_account("https://other.test/dir")
            .await
            .expect("account"),
        None
    );

    let v1 = c.put_acme_cert(&stored("a.test", "A1")).await.expect("put");
    let v2 = c.put_acme_cert(&stored("b.test", "B1")).await.expect("put");
    assert!(v2 > v1, "{v1} {v2}");
    let all = c.acme_certs(0).await.expect("certs");
    assert_eq!(
        all.iter().map(|s| s.site.as_str()).collect::<Vec<_>>(),
        ["a.test", "b.test"]
    );
    assert_eq!(all[0].sealed_key, stored("a.test", "").sealed_key);
    assert_eq!((all[0].version, all[1].version), (v1, v2));
    let v3 = c
        .put_acme_cert(&stored("a.test", "A2"))
        .await
        .expect("renew");
    let since = c.acme_certs(v2).await.expect("since");
    assert_eq!(since.len(), 1);
    assert_eq!((since[0].chain_pem.as_str(), since[0].version), ("A2", v3));
    assert!(c.acme_certs(v3).await.expect("none").is_empty());

    c.set_acme_challenges("a.test", &[pending("a.test", "n1", "a.test")])
        .await
        .expect("set");
    c.set_acme_challenges(
        "b.test",
        &[
            pending("b.test", "n2", "b.test"),
            pending("b.test", "n2", "www.b.test"),
        ],
    )
    .await
    .expect("set");
    assert_eq!(c.acme_challenges().await.expect("list").len(), 3);
    c.set_acme_challenges("b.test", &[]).await.expect("clear");
    assert_eq!(
        c.acme_challenges().await.expect("list"),
        vec![pending("a.test", "n1", "a.test")]
    );

    // One holder at a time; the holder may claim again (a restart with the same node name).
    assert_eq!(
        c.claim_order("a.test", "n1", 1000, 600)
            .await
            .expect("claim"),
        OrderClaim::Granted { failures: 0 }
    );
    assert_eq!(
        c.claim_order("a.test", "n2", 1100, 600)
            .await
            .expect("claim"),
        OrderClaim::Held {
            holder: "n1".into(),
            until: 1600
        }
    );
    assert_eq!(
        c.claim_order("a.test", "n1", 1100, 600)
            .await
            .expect("claim"),
        OrderClaim::Granted { failures: 0 }
    );
    assert_eq!(
        c.claim_order("b.test", "n2", 1100, 600)
            .await
            .expect("other site"),
        OrderClaim::Granted { failures: 0 }
    );
    // A failure sets the fleet's backoff: nobody, not even the holder, orders before it.
    c.finish_order("a.test", "n1", 2000, 3)
        .await
        .expect("finish");
    assert_eq!(
        c.claim_order("a.test", "n2", 1500, 600)
            .await
            .expect("claim"),
        OrderClaim::Held {
            holder: "n1".into(),
            until: 2000
        }
    );
    assert_eq!(
        c.claim_order("a.test", "n1", 1500, 600)
            .await
            .expect("claim"),
        OrderClaim::Held {
            holder: "n1".into(),
            until: 2000
        }
    );
    // After it, another node goes on counting where the fleet left off.
    assert_eq!(
        c.claim_order("a.test", "n2", 2000, 600)
            .await
            .expect("claim"),
        OrderClaim::Granted { failures: 3 }
    );
    // A finish by a node that no longer holds the lease changes nothing.
    c.finish_order("a.test", "n1", 0, 0)
        .await
        .expect("stale finish");
    assert_eq!(
        c.claim_order("a.test", "n3", 2100, 600)
            .await
            .expect("claim"),
        OrderClaim::Held {
            holder: "n2".into(),
            until: 2600
        }
    );
    // n2 dies mid-order: its lease runs out and n3 takes over.
    assert_eq!(
        c.claim_order("a.test", "n3", 2600, 600)
            .await
            .expect("claim"),
        OrderClaim::Granted { failures: 3 }
    );
    c.finish_order("a.test", "n3", 0, 0).await.expect("success");
    assert_eq!(
        c.claim_order("a.test", "n1", 2700, 600)
            .await
            .expect("claim"),
        OrderClaim::Granted { failures: 0 }
    );
}

#[tokio::test]
async fn the_sqlite_store_meets_the_certs_contract() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = SqliteStore::open(dir.path()).expect("open");
    certs_contract(&store).await;
    drop(store);
    let again = SqliteStore::open(dir.path()).expect("reopen");
    assert_eq!(again.acme_certs(0).await.expect("certs").len(), 2);
}

#[tokio::test]
async fn the_postgres_store_meets_the_certs_contract() {
    let store = pg().await;
    certs_contract(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_claiming_one_order_at_once_grant_it_to_exactly_one() {
    let url = support::postgres::Postgres::shared().database().await;
    let mut nodes = Vec::new();
    for i in 0..6 {
        nodes.push(std::sync::Arc::new(
            PgStore::connect(&PgSettings {
                url: url.clone(),
                pool_size: 1,
                ca: Vec::new(),
                node: format!("node-{i}"),
            })
            .await
            .expect("connect"),
        ));
    }
    let mut claims = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let n = n.clone();
        claims.push(tokio::spawn(async move {
            n.claim_order("race.test", &format!("node-{i}"), 5000, 600)
                .await
        }));
    }
    let mut granted = 0;
    for c in claims {
        if let OrderClaim::Granted { .. } = c.await.expect("task").expect("claim") {
            granted += 1;
        }
    }
    assert_eq!(granted, 1);
}
