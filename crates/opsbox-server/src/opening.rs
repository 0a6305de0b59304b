//! The opening of a connection: it must show which HTTP version it speaks within the
//! header timeout.
//!
//! hyper's `header_read_timeout` (set in [`crate::http_settings`]) runs only once a
//! connection is known to be HTTP/1. Before that, the listener reads up to 24 bytes to
//! tell HTTP/1 from HTTP/2's preface (`PRI * HTTP/2.0…`), with no time limit: a client
//! that connects and sends nothing, or a few bytes of the preface, would hold the
//! connection forever. [`OpeningDeadline`] gives those bytes the same time as a whole
//! request head, and costs nothing once they are in.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum_server::accept::Accept;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The bytes an HTTP/2 connection (prior knowledge or after ALPN) starts with.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An acceptor whose connections fail their reads with `TimedOut` if the bytes that
/// tell their HTTP version are not in within `timeout` of the accept.
#[derive(Debug, Clone)]
pub struct OpeningDeadline<A> {
    /// The acceptor whose streams are wrapped (TCP_NODELAY, TLS).
    inner: A,
    /// `None`: no deadline, streams pass through unchanged.
    timeout: Option<Duration>,
}

impl<A> OpeningDeadline<A> {
    pub fn new(inner: A, timeout: Option<Duration>) -> Self {
        OpeningDeadline { inner, timeout }
    }
}

impl<A, I, S> Accept<I, S> for OpeningDeadline<A>
where
    A: Accept<I, S>,
    A::Future: Send + 'static,
    A::Stream: Send + 'static,
    A::Service: Send + 'static,
{
    type Stream = Opening<A::Stream>;
    type Service = A::Service;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, Self::Service)>> + Send>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let accepted = self.inner.accept(stream, service);
        let timeout = self.timeout;
        Box::pin(async move {
            let (stream, service) = accepted.await?;
            let deadline = timeout.map(|t| Box::pin(tokio::time::sleep(t)));
            Ok((
                Opening {
                    inner: stream,
                    deadline,
                    seen: 0,
                },
                service,
            ))
        })
    }
}

/// A stream under an [`OpeningDeadline`].
#[derive(Debug)]
pub struct Opening<S> {
    inner: S,
    /// Until the version is told; `None` from then on.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes read so far that match the HTTP/2 preface.
    seen: usize,
}

impl<S> Opening<S> {
    /// Takes what was just read into account: the version is told once the bytes
    /// stop matching the HTTP/2 preface, or the whole preface is in, or at the end.
    fn read(&mut self, new: &[u8]) {
        let told = new.is_empty()
            || new.iter().enumerate().any(|(i, byte)| {
                H2_PREFACE
                    .get(self.seen + i)
                    .is_none_or(|expected| expected != byte)
            })
            || self.seen + new.len() >= H2_PREFACE.len();
        if told {
            self.deadline = None;
        } else {
            self.seen += new.len();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Opening<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.deadline.is_none() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.read(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client sent no request in time",
                ))),
                _ => Poll::Pending,
            },
            error => error,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Opening<S> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn opening() -> Opening<()> {
        Opening {
            inner: (),
            deadline: Some(Box::pin(tokio::time::sleep(Duration::from_secs(60)))),
            seen: 0,
        }
    }

    #[tokio::test]
    async fn the_version_is_told_by_the_first_byte_that_is_not_the_preface() {
        let mut http1 = opening();
        http1.read(b"G");
        assert!(http1.deadline.is_none());

        let mut trickled = opening();
        for byte in &H2_PREFACE[..23] {
            trickled.read(&[*byte]);
            assert!(trickled.deadline.is_some());
        }
        trickled.read(&H2_PREFACE[23..]);
        assert!(trickled.deadline.is_none());

        let mut almost = opening();
        almost.read(b"PRI * HTTP/1.1");
        assert!(almost.deadline.is_none());

        let mut ended = opening();
        ended.read(b"PR");
        ended.read(b"");
        assert!(ended.deadline.is_none());
    }
}
