//! Worker threads, one single-threaded runtime each, in the manner of nginx's worker
//! processes: every listener is bound once per worker with SO_REUSEPORT, so the kernel spreads
//! connections across them, and a connection with all its tasks (including the origin
//! connection it uses) stays on one thread. That locality avoids the cross-thread wake-ups that
//! a work-stealing runtime pays on every proxied request. Workers only run tasks handed to
//! them; they never hold state of their own beyond their index.

use std::cell::Cell;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    /// Index of the worker running on this thread; 0 elsewhere (tests, the control thread).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the worker running the current thread (0 outside workers), used to pick
/// per-worker origin client pools and analytics slots.
pub fn worker_index() -> usize {
    WORKER.with(|w| w.get())
}

/// A set of worker threads. Dropping it stops them (and every task they run).
pub struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `n` worker threads (at least one).
    pub fn spawn(n: usize) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("portcullis-worker-{i}"))
                    .spawn(move || {
                        WORKER.with(|w| w.set(i));
                        rt.block_on(stop.cancelled());
                    })?,
            );
        }
        Ok(Workers {
            handles,
            stop,
            threads,
        })
    }

    pub(crate) fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
