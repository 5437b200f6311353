//! The wake-up of a fleet: one connection per node that `LISTEN`s on the channel every policy
//! write notifies, so a change reaches the other nodes in milliseconds instead of a poll
//! interval. It is only a wake-up: a notification sent while this connection is down is lost,
//! so every (re)connection wakes the follower once too, and the follower polls the generation
//! number regardless.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;

/// The channel [`super::bump_generation`] notifies.
pub(super) const CHANNEL: &str = "portcullis_policy";

/// Waits after a failed or lost connection before the next try: doubles up to the last.
const RETRY: [Duration; 4] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// How often a listener whose follower is gone notices and closes its connection.
const ORPHAN_CHECK: Duration = Duration::from_secs(1);

/// TCP keepalive on the notification connection, so a database host that vanished without a
/// word is noticed in about 30 s (the operating system's default would take hours).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// Starts listening; the returned `Notify` is woken on every notification and every
/// (re)connection. The task and its connection end once the `Notify` is dropped.
pub(super) fn spawn(
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    db: String,
) -> Arc<Notify> {
    let mut config = config;
    config
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(3);
    let wake = Arc::new(Notify::new());
    tokio::spawn(run(config, tls, db, Arc::downgrade(&wake)));
    wake
}

async fn run(
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    db: String,
    wake: Weak<Notify>,
) {
    let mut failures = 0usize;
    while wake.strong_count() > 0 {
        match listen(&config, &tls, &wake).await {
            Ok(Ended::Orphaned) => return,
            Ok(Ended::Closed) => {
                tracing::debug!(%db, "the store's notification connection closed; reconnecting");
                failures = 0;
            }
            Ok(Ended::Silent) => {
                if failures == 0 {
                    tracing::debug!(%db, "the store did not answer the notification connection in time; polling covers it until it does");
                }
                failures += 1;
            }
            Err(e) => {
                if failures == 0 {
                    tracing::debug!(%db, error = %e, "no notification connection to the store; polling covers it until it is back");
                }
                failures += 1;
            }
        }
        let wait = RETRY[failures.min(RETRY.len() - 1)];
        tokio::time::sleep(wait).await;
    }
}

enum Ended {
    /// The follower is gone.
    Orphaned,
    /// The server closed the connection.
    Closed,
    /// The server did not complete the connection within `connect_timeout`.
    Silent,
}

/// One connection's life: connect, `LISTEN`, wake on every notification until it ends.
async fn listen(
    config: &tokio_postgres::Config,
    tls: &tokio_postgres_rustls::MakeRustlsConnect,
    wake: &Weak<Notify>,
) -> Result<Ended, tokio_postgres::Error> {
    // The whole connection within `connect_timeout`, as for the pool's connections.
    let within = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(5));
    let started = tokio::time::Instant::now();
    let (client, mut connection) =
        match tokio::time::timeout(within, config.connect(tls.clone())).await {
            Ok(connected) => connected?,
            Err(_) => return Ok(Ended::Silent),
        };
    let statement = format!("LISTEN {CHANNEL}");
    let subscribe = client.batch_execute(&statement);
    tokio::pin!(subscribe);
    let mut subscribed = false;
    let mut check = tokio::time::interval(ORPHAN_CHECK);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(started + within), if !subscribed => {
                return Ok(Ended::Silent);
            }
            done = &mut subscribe, if !subscribed => {
                done?;
                subscribed = true;
                // Whatever was notified while no connection listened is caught up now.
                if !woke(wake) {
                    return Ok(Ended::Orphaned);
                }
            }
            message = std::future::poll_fn(|cx| connection.poll_message(cx)) => match message {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    if !woke(wake) {
                        return Ok(Ended::Orphaned);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(Ended::Closed),
            },
            _ = check.tick() => {
                if wake.strong_count() == 0 {
                    return Ok(Ended::Orphaned);
                }
            }
        }
    }
}

/// Wakes the follower; false when it is gone.
fn woke(wake: &Weak<Notify>) -> bool {
    match wake.upgrade() {
        Some(w) => {
            w.notify_one();
            true
        }
        None => false,
    }
}
