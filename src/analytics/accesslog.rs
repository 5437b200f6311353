//! The optional JSON access log: one line per request, written by its own thread. Lines are
//! built from what analytics already keeps (credentials as fingerprints), so the log holds no
//! secret. A full queue drops lines and counts them; it never slows a request.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Mutex;
use std::thread::JoinHandle;

/// Lines queued before the writer; past this, lines are dropped and counted.
const QUEUE: usize = 65_536;

pub struct AccessLog {
    /// Lock-free for senders; an empty line tells the writer to stop.
    tx: SyncSender<String>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Lines dropped because the writer fell behind.
    pub dropped: AtomicU64,
}

impl AccessLog {
    pub fn open(path: &Path) -> std::io::Result<AccessLog> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)?;
        let (tx, rx) = sync_channel::<String>(QUEUE);
        let writer = std::thread::Builder::new()
            .name("portcullis-access-log".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(file);
                'lines: while let Ok(line) = rx.recv() {
                    if line.is_empty() {
                        break;
                    }
                    let _ = out.write_all(line.as_bytes());
                    let _ = out.write_all(b"\n");
                    // Flush whenever the queue runs dry, so the file is current when idle.
                    while let Ok(more) = rx.try_recv() {
                        if more.is_empty() {
                            break 'lines;
                        }
                        let _ = out.write_all(more.as_bytes());
                        let _ = out.write_all(b"\n");
                    }
                    let _ = out.flush();
                }
                let _ = out.flush();
            })?;
        Ok(AccessLog {
            tx,
            writer: Mutex::new(Some(writer)),
            dropped: AtomicU64::new(0),
        })
    }

    pub fn write(&self, line: String) {
        if line.is_empty() {
            return;
        }
        if let Err(TrySendError::Full(_)) = self.tx.try_send(line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes what is queued and stops the writer.
    pub fn close(&self) {
        let _ = self.tx.send(String::new());
        if let Some(w) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = w.join();
        }
    }
}
