//! A copy of what a cleartext client sent since its last complete request head, kept so that
//! a head the HTTP parser refuses (400, 431) or that never ends is still searched for the
//! credentials it carried over the wire.
//!
//! Bounded by the largest head accepted, and only on cleartext connections: TLS connections
//! never pay for it. The copy lives in memory only, for the connection's life, and is never
//! logged: only [`crate::exposure`] reads it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The bytes read while no request is being served.
pub(crate) struct HeadCapture {
    /// Set between requests: bytes read then belong to the next head. Read without the lock
    /// so a request body streaming through costs one load per read.
    armed: AtomicBool,
    buf: Mutex<Vec<u8>>,
    limit: usize,
}

impl HeadCapture {
    pub(crate) fn new(limit: usize) -> Arc<HeadCapture> {
        Arc::new(HeadCapture {
            armed: AtomicBool::new(true),
            buf: Mutex::new(Vec::new()),
            limit,
        })
    }

    /// A complete head was parsed: what was kept is not needed.
    pub(crate) fn disarm(&self) {
        self.armed.store(false, Ordering::Relaxed);
        let mut buf = crate::lock(&self.buf);
        buf.clear();
        buf.shrink_to_fit();
    }

    /// The response is done: the next bytes are the next head.
    pub(crate) fn arm(&self) {
        self.armed.store(true, Ordering::Relaxed);
    }

    /// What was read since the last complete head, if anything.
    pub(crate) fn take(&self) -> Vec<u8> {
        if !self.armed.load(Ordering::Relaxed) {
            return Vec::new();
        }
        std::mem::take(&mut *crate::lock(&self.buf))
    }

    fn keep(&self, data: &[u8]) {
        if data.is_empty() || !self.armed.load(Ordering::Relaxed) {
            return;
        }
        let mut buf = crate::lock(&self.buf);
        let room = self.limit.saturating_sub(buf.len());
        buf.extend_from_slice(&data[..data.len().min(room)]);
    }
}

/// A transport whose reads are copied into a [`HeadCapture`] while it is armed.
pub(crate) struct Captured<T> {
    inner: T,
    capture: Arc<HeadCapture>,
}

impl<T> Captured<T> {
    pub(crate) fn new(inner: T, capture: Arc<HeadCapture>) -> Captured<T> {
        Captured { inner, capture }
    }
}

impl<T: crate::net::OnSocket> crate::net::OnSocket for Captured<T> {
    fn socket(&self) -> &tokio::net::TcpStream {
        self.inner.socket()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Captured<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.capture.keep(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Captured<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
