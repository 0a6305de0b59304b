//! The opening of a connection: it must show which HTTP version it speaks within the
//! header timeout; and, once it speaks HTTP/2, it may not stay without a request for
//! longer than that.
//!
//! hyper's `header_read_timeout` (set in [`crate::http_settings`]) runs only once a
//! connection is known to be HTTP/1. Before that, the listener reads up to 24 bytes to
//! tell HTTP/1 from HTTP/2's preface (`PRI * HTTP/2.0…`), with no time limit: a client
//! that connects and sends nothing, or a few bytes of the preface, would hold the
//! connection forever. [`OpeningDeadline`] gives those bytes the same time as a whole
//! request head, and costs nothing once they are in.
//!
//! HTTP/2 has no request head to time: after its preface a connection may stay open
//! with no stream at all, and hyper has no idle timeout for it (its keep-alive PINGs,
//! also set in [`crate::http_settings`], end only connections whose peer stops
//! answering them; any HTTP/2 library answers them by itself). So, as hyper ends a
//! kept-alive HTTP/1 connection that sends no next head in time, an HTTP/2 connection
//! that has had no exchange open for the same time fails its reads, and hyper closes
//! it. An exchange is open from its request to the end of its response body: a slow
//! answer, a long poll or an event stream keeps its connection, however quiet.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum_server::accept::Accept;
use futures::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The bytes an HTTP/2 connection (prior knowledge or after ALPN) starts with.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An acceptor whose connections fail their reads with `TimedOut` if the bytes that
/// tell their HTTP version are not in within `timeout` of the accept, or, for HTTP/2,
/// once no exchange has been open for `timeout`.
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
    type Service = Exchanges<A::Service>;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, Self::Service)>> + Send>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let accepted = self.inner.accept(stream, service);
        let timeout = self.timeout;
        Box::pin(async move {
            let (stream, service) = accepted.await?;
            let open = timeout.map(|_| Arc::new(Open::default()));
            Ok((
                Opening {
                    inner: stream,
                    phase: match timeout {
                        Some(timeout) => Phase::Telling {
                            timer: Box::pin(tokio::time::sleep(timeout)),
                            seen: 0,
                        },
                        None => Phase::Told,
                    },
                    timeout: timeout.unwrap_or_default(),
                    open: open.clone(),
                },
                Exchanges {
                    inner: service,
                    open,
                },
            ))
        })
    }
}

/// The exchanges open on one HTTP/2 connection, shared by its stream (which times
/// the pauses) and its service (which opens and closes them).
#[derive(Debug, Default)]
struct Open {
    count: AtomicUsize,
    /// The connection's reader, woken when the last exchange ends so that it starts
    /// the idle timer (it may be waiting for bytes with none open).
    reader: AtomicWaker,
}

/// One open exchange, from its request to the drop of its response body.
#[derive(Debug)]
struct Exchange(Arc<Open>);

impl Exchange {
    fn open(open: &Arc<Open>) -> Self {
        open.count.fetch_add(1, Ordering::SeqCst);
        Exchange(open.clone())
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.reader.wake();
        }
    }
}

/// Where a connection under an [`OpeningDeadline`] is.
#[derive(Debug)]
enum Phase {
    /// Its version is not told yet: `seen` bytes of the HTTP/2 preface are in.
    Telling { timer: Pin<Box<Sleep>>, seen: usize },
    /// HTTP/2: the timer runs while no exchange is open (`idle`).
    Http2 { timer: Pin<Box<Sleep>>, idle: bool },
    /// HTTP/1, or no deadline: reads pass through.
    Told,
}

/// A stream under an [`OpeningDeadline`].
#[derive(Debug)]
pub struct Opening<S> {
    inner: S,
    phase: Phase,
    timeout: Duration,
    /// `None` when there is no deadline.
    open: Option<Arc<Open>>,
}

impl<S> Opening<S> {
    /// Takes what was just read into account while the version is not told: it is
    /// told once the bytes stop matching the HTTP/2 preface (HTTP/1), or the whole
    /// preface is in (HTTP/2), or at the end.
    fn read(&mut self, new: &[u8]) {
        let Phase::Telling { seen, .. } = &mut self.phase else {
            return;
        };
        let rest = &H2_PREFACE[*seen..];
        let n = new.len().min(rest.len());
        if new.is_empty() || new[..n] != rest[..n] {
            self.phase = Phase::Told;
        } else if n == rest.len() {
            let Phase::Telling { timer, .. } = std::mem::replace(&mut self.phase, Phase::Told)
            else {
                unreachable!()
            };
            self.phase = Phase::Http2 { timer, idle: false };
        } else {
            *seen += n;
        }
    }

    /// Whether an HTTP/2 connection has been without an open exchange for the
    /// timeout; arranges to be polled again when that may change.
    fn idle_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let (Phase::Http2 { timer, idle }, Some(open)) = (&mut self.phase, &self.open) else {
            return false;
        };
        open.reader.register(cx.waker());
        if open.count.load(Ordering::SeqCst) > 0 {
            *idle = false;
            return false;
        }
        if !*idle {
            *idle = true;
            timer.as_mut().reset(Instant::now() + self.timeout);
        }
        timer.as_mut().poll(cx).is_ready()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Opening<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.phase {
            Phase::Told => Pin::new(&mut this.inner).poll_read(cx, buf),
            Phase::Http2 { .. } => {
                if this.idle_too_long(cx) {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the HTTP/2 client sent no request in time",
                    )));
                }
                Pin::new(&mut this.inner).poll_read(cx, buf)
            }
            Phase::Telling { timer, .. } => {
                let before = buf.filled().len();
                match Pin::new(&mut this.inner).poll_read(cx, buf) {
                    Poll::Ready(Ok(())) => {
                        this.read(&buf.filled()[before..]);
                        Poll::Ready(Ok(()))
                    }
                    Poll::Pending => match timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the client sent no request in time",
                        ))),
                        Poll::Pending => Poll::Pending,
                    },
                    error => error,
                }
            }
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

/// The service of a connection under an [`OpeningDeadline`]: it keeps count of the
/// HTTP/2 exchanges open on its connection (HTTP/1 requests pass uncounted).
#[derive(Debug, Clone)]
pub struct Exchanges<S> {
    inner: S,
    /// `None` when there is no deadline.
    open: Option<Arc<Open>>,
}

impl<S, R, B> tower::Service<http::Request<R>> for Exchanges<S>
where
    S: tower::Service<http::Request<R>, Response = http::Response<B>>,
{
    type Response = http::Response<Exchanging<B>>;
    type Error = S::Error;
    type Future = Answering<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<R>) -> Self::Future {
        let exchange = match &self.open {
            Some(open) if request.version() == http::Version::HTTP_2 => Some(Exchange::open(open)),
            _ => None,
        };
        Answering {
            inner: self.inner.call(request),
            exchange,
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer of an [`Exchanges`] service: the exchange stays open until the
    /// response's body is dropped (or this, if it is dropped unanswered).
    pub struct Answering<F> {
        #[pin]
        inner: F,
        exchange: Option<Exchange>,
    }
}

impl<F, B, E> Future for Answering<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<Exchanging<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let answer = std::task::ready!(this.inner.poll(cx));
        let exchange = this.exchange.take();
        Poll::Ready(answer.map(|response| {
            response.map(|body| Exchanging {
                body,
                _exchange: exchange,
            })
        }))
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its exchange open until it is dropped.
    pub struct Exchanging<B> {
        #[pin]
        body: B,
        _exchange: Option<Exchange>,
    }
}

impl<B: Body> Body for Exchanging<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opening() -> Opening<()> {
        Opening {
            inner: (),
            phase: Phase::Telling {
                timer: Box::pin(tokio::time::sleep(Duration::from_secs(60))),
                seen: 0,
            },
            timeout: Duration::from_secs(60),
            open: Some(Arc::default()),
        }
    }

    fn is_http2(opening: &Opening<()>) -> bool {
        matches!(opening.phase, Phase::Http2 { .. })
    }

    fn is_told(opening: &Opening<()>) -> bool {
        matches!(opening.phase, Phase::Told)
    }

    #[tokio::test]
    async fn the_version_is_told_by_the_first_byte_that_is_not_the_preface() {
        let mut http1 = opening();
        http1.read(b"G");
        assert!(is_told(&http1));

        let mut trickled = opening();
        for byte in &H2_PREFACE[..23] {
            trickled.read(&[*byte]);
            assert!(matches!(trickled.phase, Phase::Telling { .. }));
        }
        trickled.read(&H2_PREFACE[23..]);
        assert!(is_http2(&trickled));

        let mut whole = opening();
        whole.read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0");
        assert!(is_http2(&whole));

        let mut almost = opening();
        almost.read(b"PRI * HTTP/1.1");
        assert!(is_told(&almost));

        let mut ended = opening();
        ended.read(b"PR");
        ended.read(b"");
        assert!(is_told(&ended));
    }

    #[tokio::test]
    async fn an_http2_connection_is_idle_only_with_no_exchange_open() {
        let mut connection = opening();
        connection.timeout = Duration::from_secs(1);
        connection.read(H2_PREFACE);
        let open = connection.open.clone().unwrap();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(!connection.idle_too_long(&mut cx));
        let exchange = Exchange::open(&open);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(!connection.idle_too_long(&mut cx), "an exchange is open");
        drop(exchange);
        assert!(!connection.idle_too_long(&mut cx), "the timer starts now");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(connection.idle_too_long(&mut cx));
    }
}
