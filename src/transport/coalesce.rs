//! Fewer, fuller socket writes: every connection's bytes pass through
//! [`Coalesce`] on their way to the socket (or to TLS).
//!
//! The HTTP/2 server writes whatever frames are queued each time its
//! connection task runs. A unary reply is produced by a separate stream task
//! in two steps (headers and message, then the trailers), and on a
//! multi-threaded runtime the connection task usually runs in between: every
//! reply left in two `writev`s, and replies of concurrent calls on one
//! connection never shared one. Over loopback each write costs the sender
//! the whole TCP path of both ends, so the second write was about a tenth of
//! a hit's server CPU (docs/performance.md).
//!
//! [`Coalesce`] keeps small writes in a buffer and, when asked to flush,
//! first lets the runtime run the tasks that are already ready (one yield),
//! so the trailers and the replies of other calls finished meanwhile join
//! the same write. It never waits for time or for new work: the yield costs
//! one trip through the scheduler, and the bytes go out at the next flush.
//! Large writes (a ByteStream read's DATA frames) go straight through, with
//! anything buffered before them in the same `writev`.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes up to this many bytes in total are copied into the buffer; a write
/// that would take it past this goes straight to the socket. It bounds the
/// memory a connection holds for coalescing.
pub const BUFFER_LIMIT: usize = 16 * 1024;

/// The most slices one vectored write passes on (the buffer and the caller's
/// first slices); a partial write of the rest is allowed by the contract.
const MAX_SLICES: usize = 16;

/// An I/O stream whose small writes are gathered and sent together at the
/// next flush, after one yield to the runtime (see the module comment).
#[derive(Debug)]
pub struct Coalesce<IO> {
    inner: IO,
    /// Bytes accepted from the caller and not yet written to `inner`;
    /// `buf[sent..]` is what remains.
    buf: Vec<u8>,
    sent: usize,
    /// Whether the current flush already yielded once.
    yielded: bool,
}

impl<IO> Coalesce<IO> {
    /// Wraps a freshly accepted connection.
    pub fn new(inner: IO) -> Self {
        Self { inner, buf: Vec::new(), sent: 0, yielded: false }
    }

    /// The wrapped connection (its peer address and certificates).
    pub fn get_ref(&self) -> &IO {
        &self.inner
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.sent..]
    }

    fn mark_sent(&mut self, n: usize) {
        self.sent += n;
        if self.sent == self.buf.len() {
            self.buf.clear();
            self.sent = 0;
        }
    }
}

impl<IO: AsyncWrite + Unpin> Coalesce<IO> {
    /// Writes every buffered byte to `inner`.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending().is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.mark_sent(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Writes the buffered bytes and then `bufs` in one vectored write,
    /// returning how many bytes of `bufs` went out.
    fn poll_write_through(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        loop {
            let pending = self.buf.len() - self.sent;
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            slices[0] = IoSlice::new(&self.buf[self.sent..]);
            let count = 1 + bufs.len().min(MAX_SLICES - 1);
            slices[1..count].copy_from_slice(&bufs[..count - 1]);
            let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &slices[..count]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n < pending {
                self.mark_sent(n);
                continue;
            }
            self.mark_sent(pending);
            if n > pending {
                return Poll::Ready(Ok(n - pending));
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Coalesce<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Coalesce<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        if self.buf.len() + total > BUFFER_LIMIT {
            return self.poll_write_through(cx, bufs);
        }
        for b in bufs {
            self.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.pending().is_empty() && !self.yielded {
            // Let the tasks that are ready add their frames first; the
            // runtime polls this task again right after them.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(self.poll_drain(cx))?;
        self.yielded = false;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Coalesce<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A socket stand-in that records each write it was given.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        /// Accept at most this many bytes per write (a full socket buffer).
        limit: Option<usize>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let n = self.limit.map_or(buf.len(), |l| l.min(buf.len()));
            self.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            if let Some(l) = self.limit {
                all.truncate(l);
            }
            let n = all.len();
            self.writes.push(all);
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn small_writes_reach_the_socket_as_one_write_at_the_flush() {
        let mut c = Coalesce::new(Recorder::default());
        c.write_all(b"headers+message").await.unwrap();
        c.write_all(b"trailers").await.unwrap();
        assert!(c.get_ref().writes.is_empty(), "nothing is written before the flush");
        c.flush().await.unwrap();
        assert_eq!(c.get_ref().writes, vec![b"headers+messagetrailers".to_vec()]);
    }

    #[tokio::test]
    async fn a_flush_yields_once_to_the_runtime_before_writing() {
        let mut c = Coalesce::new(Recorder::default());
        c.write_all(b"x").await.unwrap();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        assert!(c.get_ref().writes.is_empty());
        assert!(matches!(Pin::new(&mut c).poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(c.get_ref().writes.len(), 1);
        // With nothing buffered a flush does not yield.
        assert!(matches!(Pin::new(&mut c).poll_flush(&mut cx), Poll::Ready(Ok(()))));
    }

    #[tokio::test]
    async fn a_large_write_goes_out_at_once_after_the_bytes_buffered_before_it() {
        let mut c = Coalesce::new(Recorder::default());
        c.write_all(b"frame header").await.unwrap();
        let big = vec![7u8; BUFFER_LIMIT];
        c.write_all(&big).await.unwrap();
        let mut expected = b"frame header".to_vec();
        expected.extend_from_slice(&big);
        assert_eq!(c.get_ref().writes, vec![expected]);
        c.flush().await.unwrap();
        assert_eq!(c.get_ref().writes.len(), 1, "nothing was left to flush");
    }

    #[tokio::test]
    async fn partial_socket_writes_lose_no_byte_and_keep_the_order() {
        let mut c = Coalesce::new(Recorder { limit: Some(5), ..Default::default() });
        let mut expected = Vec::new();
        for i in 0..50u8 {
            let piece = vec![i; 1 + (i as usize * 997) % 3000];
            c.write_all(&piece).await.unwrap();
            expected.extend_from_slice(&piece);
        }
        c.shutdown().await.unwrap();
        let written: Vec<u8> = c.get_ref().writes.concat();
        assert_eq!(written, expected);
        assert!(c.get_ref().writes.iter().all(|w| w.len() <= 5));
    }

    #[tokio::test]
    async fn reads_pass_through_unchanged() {
        let (client, server) = tokio::io::duplex(64);
        let mut c = Coalesce::new(server);
        let mut client = client;
        client.write_all(b"request").await.unwrap();
        let mut got = [0u8; 7];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"request");
        c.write_all(b"reply").await.unwrap();
        c.flush().await.unwrap();
        let mut back = [0u8; 5];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"reply");
    }
}
