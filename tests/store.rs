//! The storage seam: the contract every `PolicyStore` backend meets (run here against the
//! embedded SQLite store; a second backend runs the same `contract`), that what is written
//! survives a reopen, and the one-time import of the JSON state files earlier versions kept,
//! which loses nothing, happens once, and refuses a damaged file without taking any of it.

use portcullis::config::{CleartextMode, HstsOverride, Overrides, SiteOverride};
use portcullis::stages::drain::Drain;
use portcullis::stages::{Brownout, Plan, Plans, Stage};
use portcullis::store::{
    AuditEntry, AuditEvent, PolicyStore, SiteState, SqliteStore, StageStep, StoreError,
};

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

    for e in audit() {
        store.append_audit(&e).await.expect("append");
    }
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
