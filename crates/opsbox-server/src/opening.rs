//! The opening of a connection and the pauses between its requests: a connection must
//! show which HTTP version it speaks, and then send each request head, within the
//! header timeout of its last exchange's end (or of the accept).
//!
//! The listener first reads up to 24 bytes to tell HTTP/1 from HTTP/2's preface
//! (`PRI * HTTP/2.0…`): a client that connects and sends nothing, or a few bytes of the
//! preface, would hold the connection forever without a deadline there.
//!
//! After that, a connection may not stay without an open exchange for longer than the
//! timeout: an exchange is open from its request head to the end of its response body,
//! so a slow answer, a long poll or an event stream keeps its connection, however
//! quiet. For HTTP/1 this is the head timeout (a client that trickles a head, or keeps
//! a connection alive and sends nothing, is cut off); HTTP/2 has no request head to
//! time and hyper no idle timeout for it (its keep-alive PINGs, set in
//! [`crate::http_settings`], end only connections whose peer stops answering them). A
//! connection upgraded to another protocol (a WebSocket) is not timed any more.
//!
//! Why here and not hyper's `header_read_timeout`: hyper's runs only once a connection
//! is known to be HTTP/1, and it arms a new timer for every request head (an
//! allocation, a clock read, and an insert into and a removal from tokio's timer wheel
//! per request, a few percent of a small request's CPU). Here one timer per connection
//! is armed lazily: an exchange's end only records the time, and the timer, when it
//! fires, moves itself to the deadline that time gives. Its deadline is never later
//! than that (it was set from an earlier end, or while an exchange was open), so an
//! idle connection is still closed the timeout after its last exchange ended; the
//! cost is at most one extra wake-up per timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum_server::accept::Accept;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The bytes an HTTP/2 connection (prior knowledge or after ALPN) starts with.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An acceptor whose connections fail their reads with `TimedOut` once they have been
/// for `timeout` without an open exchange (see the module docs).
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
            let open = timeout.map(|_| Arc::new(Open::new()));
            Ok((
                Opening {
                    inner: stream,
                    telling: Some(0),
                    timer: timeout.map(|timeout| Box::pin(tokio::time::sleep(timeout))),
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

/// The exchanges of one connection, shared by its stream (which times the pauses)
/// and its service (which opens and closes them).
#[derive(Debug)]
struct Open {
    count: AtomicUsize,
    /// When the last exchange ended (at first: the accept), in ms after `start`.
    idle_since: AtomicU64,
    start: Instant,
    /// A response switched the connection to another protocol.
    upgraded: AtomicBool,
}

impl Open {
    fn new() -> Self {
        Open {
            count: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            start: Instant::now(),
            upgraded: AtomicBool::new(false),
        }
    }

    /// When the connection may be closed if no exchange opens before; `None` while
    /// one is open.
    fn deadline(&self, timeout: Duration) -> Option<Instant> {
        // `Exchange::drop` records the time before it counts down: with no exchange
        // counted, the time read next is that of the last end.
        if self.count.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since.load(Ordering::SeqCst));
        Some(self.start + since + timeout)
    }
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
        let open = &self.0;
        let now = u64::try_from(open.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        open.idle_since.fetch_max(now, Ordering::SeqCst);
        open.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A stream under an [`OpeningDeadline`].
#[derive(Debug)]
pub struct Opening<S> {
    inner: S,
    /// While its version is not told: how many bytes of the HTTP/2 preface are in.
    telling: Option<usize>,
    /// `None` when there is no deadline, or once the connection is upgraded.
    timer: Option<Pin<Box<Sleep>>>,
    timeout: Duration,
    /// `None` when there is no deadline.
    open: Option<Arc<Open>>,
}

impl<S> Opening<S> {
    /// Takes what was just read into account while the version is not told: it is
    /// told once the bytes stop matching the HTTP/2 preface (HTTP/1), or the whole
    /// preface is in (HTTP/2), or at the end.
    fn read(&mut self, new: &[u8]) {
        let Some(seen) = &mut self.telling else {
            return;
        };
        let rest = &H2_PREFACE[*seen..];
        let n = new.len().min(rest.len());
        if new.is_empty() || new[..n] != rest[..n] || n == rest.len() {
            self.telling = None;
        } else {
            *seen += n;
        }
    }

    /// Whether the connection has been without an open exchange for the timeout;
    /// arranges to be polled again when that may change.
    fn idle_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(open) = &self.open else {
            return false;
        };
        if open.upgraded.load(Ordering::SeqCst) {
            self.timer = None;
            return false;
        }
        let Some(timer) = &mut self.timer else {
            return false;
        };
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let now = Instant::now();
            let deadline = open.deadline(self.timeout).unwrap_or(now + self.timeout);
            if deadline <= now {
                return true;
            }
            timer.as_mut().reset(deadline);
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
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.read(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.idle_too_long(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client sent no request in time",
            ))),
            other => other,
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
/// exchanges open on its connection, and notes when one switches protocols.
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
        let exchange = self.open.as_ref().map(Exchange::open);
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
            if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                if let Some(exchange) = &exchange {
                    exchange.0.upgraded.store(true, Ordering::SeqCst);
                }
            }
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

    fn opening(timeout: Duration) -> Opening<()> {
        Opening {
            inner: (),
            telling: Some(0),
            timer: Some(Box::pin(tokio::time::sleep(timeout))),
            timeout,
            open: Some(Arc::new(Open::new())),
        }
    }

    /// [`Opening::idle_too_long`], polled from a test with no task to wake.
    fn idle(connection: &mut Opening<()>) -> bool {
        let waker = futures::task::noop_waker();
        connection.idle_too_long(&mut Context::from_waker(&waker))
    }

    fn is_told(opening: &Opening<()>) -> bool {
        opening.telling.is_none()
    }

    #[tokio::test]
    async fn the_version_is_told_by_the_first_byte_that_is_not_the_preface() {
        let secs = Duration::from_secs(60);
        let mut http1 = opening(secs);
        http1.read(b"G");
        assert!(is_told(&http1));

        let mut trickled = opening(secs);
        for byte in &H2_PREFACE[..23] {
            trickled.read(&[*byte]);
            assert!(!is_told(&trickled));
        }
        trickled.read(&H2_PREFACE[23..]);
        assert!(is_told(&trickled));

        let mut whole = opening(secs);
        whole.read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0");
        assert!(is_told(&whole));

        let mut almost = opening(secs);
        almost.read(b"PRI * HTTP/1.1");
        assert!(is_told(&almost));

        let mut ended = opening(secs);
        ended.read(b"PR");
        assert!(!is_told(&ended));
        ended.read(b"");
        assert!(is_told(&ended));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_with_no_exchange_open() {
        let mut connection = opening(Duration::from_secs(1));
        let open = connection.open.clone().unwrap();
        assert!(!idle(&mut connection));
        let exchange = Exchange::open(&open);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!idle(&mut connection), "an exchange is open");
        drop(exchange);
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(!idle(&mut connection), "idle for less than 1 s");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(idle(&mut connection));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_any_request_is_idle_from_its_accept() {
        let mut connection = opening(Duration::from_secs(1));
        connection.read(b"GET / HTTP/1.1\r\n");
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(!idle(&mut connection));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(idle(&mut connection));
    }

    #[tokio::test(start_paused = true)]
    async fn an_upgraded_connection_is_never_idle() {
        let mut connection = opening(Duration::from_secs(1));
        let open = connection.open.clone().unwrap();
        let exchange = Exchange::open(&open);
        open.upgraded.store(true, Ordering::SeqCst);
        drop(exchange);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!idle(&mut connection));
        assert!(connection.timer.is_none());
    }
}
