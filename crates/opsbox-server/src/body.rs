//! Reading request bodies: [`read`] takes a whole body against a limit and says why
//! it could not ([`BodyError`]), so each face answers in its own error shape; and
//! [`EndsWhenComplete`], a body that ends as soon as its whole declared length has
//! arrived, fails when it stalls, and is read to its end when a handler answers
//! without reading it all (see below).
//!
//! hyper hands an HTTP/1 request body to the handler through a channel, and closes the
//! channel only once its connection task has gone round again and read the body's end.
//! A handler that reads until the body says `None` (axum's `Json` and `Bytes`
//! extractors, `to_bytes`) waits for that close: a second wake-up of the connection
//! task per request, and on a multi-thread runtime a task woken while it runs also
//! wakes an idle worker to steal it (a futex wake and a context switch on the other
//! CPU). When `is_end_stream()` already says the whole body is here (a `Content-Length`
//! body whose bytes all came in), there is nothing left to wait for. With one
//! keep-alive client on `POST /rpc` this took the server from 2.5 to 2.26 context
//! switches per call and from ~300 to ~80 task migrations per second.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};

/// A body that reports its end as soon as its inner body knows it has ended, and that
/// fails with `TimedOut` when no new bytes come for `stall` (a client that sends a head
/// and then trickles or withholds its body would otherwise hold its connection and its
/// handler for ever; the head has its own timeout, see [`crate::http_settings`]).
///
/// The timer starts only when a read has to wait: a body that is all there, the usual
/// case, costs no timer. (tower-http's `TimeoutBody` arms one at every read.)
///
/// Dropped before its end (a handler refused it: too large for an extractor's
/// `DefaultBodyLimit` or for [`read`], unauthenticated, not found), it reads the rest
/// in the background ([`drain`]) so that the client gets the answer, not a reset, and
/// keeps its connection. A body that stalled is not drained: its client is gone or
/// hostile.
pub struct EndsWhenComplete {
    body: Body,
    stall: Option<Duration>,
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
    stalled: bool,
}

impl EndsWhenComplete {
    /// The request body every handler sees (mapped in [`crate::router`]); `stall`:
    /// `limits.body_read_timeout_secs`, `None` for no limit.
    pub fn wrap(body: Body, stall: Option<Duration>) -> Body {
        Body::new(EndsWhenComplete {
            body,
            stall,
            waiting: None,
            stalled: false,
        })
    }
}

impl http_body::Body for EndsWhenComplete {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if this.body.is_end_stream() {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            this.waiting = None;
            return Poll::Ready(frame);
        }
        let Some(stall) = this.stall else {
            return Poll::Pending;
        };
        let waiting = this
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match waiting.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.stalled = true;
                Poll::Ready(Some(Err(axum::Error::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the request body stalled: no bytes for {} s",
                        stall.as_secs()
                    ),
                )))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for EndsWhenComplete {
    fn drop(&mut self) {
        if self.stalled || self.body.is_end_stream() {
            return;
        }
        // Outside a runtime (a test dropping a body by hand) there is no one to drain.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drain(std::mem::take(&mut self.body)));
        }
    }
}

/// Why a request body could not be read whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// It is longer than the limit, by its `Content-Length` or by what arrived: 413.
    TooLarge { limit: usize },
    /// It broke off, or its framing is invalid (a malformed chunked encoding): the
    /// client's request is bad, 400.
    Malformed(String),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge { limit } => {
                write!(f, "the request body is larger than {limit} bytes")
            }
            BodyError::Malformed(reason) => {
                write!(f, "the request body could not be read: {reason}")
            }
        }
    }
}

impl std::error::Error for BodyError {}

/// How much of an over-limit body is read and thrown away before the 413 goes out,
/// and for how long at most.
const DRAIN_BYTES: u64 = 16 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Reads the rest of a refused body, up to [`DRAIN_BYTES`] and [`DRAIN_TIME`], so that
/// the answer can be read. A server that leaves a body unread must close the
/// connection, and closing a socket with unread bytes resets it: a client still
/// sending (urllib3, for scirocco-pyclient's 1.5 MB test push) then sees a reset
/// instead of the 413, unless it happens to read first. Express, which the Scirocco
/// clients were written against, read such bodies to the end as well. A body longer
/// than the cap still gets the reset. Run by [`EndsWhenComplete`] when it is dropped,
/// beside the answer: hyper writes the answer while the drain takes the body, and the
/// connection is kept once both are done.
async fn drain(mut body: Body) {
    if body.size_hint().lower() > DRAIN_BYTES {
        return;
    }
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) =
            std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > DRAIN_BYTES {
                break;
            }
        }
    })
    .await;
}

/// Reads a whole request body of at most `limit` bytes. A body over the limit (by its
/// declared length or by what arrives) is not kept; as the router's bodies are
/// [`EndsWhenComplete`], its rest is read and thrown away beside the answer.
pub async fn read(body: Body, limit: usize) -> Result<Bytes, BodyError> {
    let too_large = || BodyError::TooLarge { limit };
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    let mut body = body;
    // Most bodies are one frame: that one is handed on without a copy.
    let mut first: Option<Bytes> = None;
    let mut more: Option<bytes::BytesMut> = None;
    let mut length = 0usize;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| BodyError::Malformed(reasons(&e)))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        length = length.saturating_add(data.len());
        if length > limit {
            return Err(too_large());
        }
        match (&mut first, &mut more) {
            (None, _) => first = Some(data),
            (Some(head), None) => {
                let mut joined = bytes::BytesMut::with_capacity(length);
                joined.extend_from_slice(head);
                joined.extend_from_slice(&data);
                more = Some(joined);
            }
            (Some(_), Some(joined)) => joined.extend_from_slice(&data),
        }
    }
    Ok(match (first, more) {
        (_, Some(joined)) => joined.freeze(),
        (Some(only), None) => only,
        (None, None) => Bytes::new(),
    })
}

/// An error with its causes, `outer: inner`, each said once (the body wrappers
/// repeat the text of what they wrap).
fn reasons(error: &(dyn std::error::Error + 'static)) -> String {
    let mut said: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if said.last() != Some(&text) {
            said.push(text);
        }
        next = e.source();
    }
    said.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn whole_bodies_read_the_same() {
        for body in [
            Body::from("abc"),
            Body::empty(),
            Body::from_stream(futures::stream::iter(
                ["a", "b", "c"].map(|s| Ok::<_, std::io::Error>(Bytes::from(s))),
            )),
        ] {
            let read = axum::body::to_bytes(EndsWhenComplete::wrap(body, None), 100).await;
            assert!(matches!(read.as_deref(), Ok(b"abc" | b"")), "{read:?}");
        }
    }

    fn chunks(parts: &[&'static str]) -> Body {
        Body::from_stream(futures::stream::iter(
            parts
                .iter()
                .map(|s| Ok::<_, std::io::Error>(Bytes::from_static(s.as_bytes())))
                .collect::<Vec<_>>(),
        ))
    }

    #[tokio::test]
    async fn read_takes_bodies_up_to_the_limit() {
        assert_eq!(read(Body::from("abc"), 3).await.unwrap(), "abc");
        assert_eq!(read(chunks(&["a", "b", "c"]), 3).await.unwrap(), "abc");
        assert_eq!(read(Body::empty(), 0).await.unwrap(), "");
        for body in [Body::from("abcd"), chunks(&["ab", "cd"])] {
            assert_eq!(read(body, 3).await, Err(BodyError::TooLarge { limit: 3 }));
        }
    }

    #[tokio::test]
    async fn a_body_that_fails_is_malformed_not_too_large() {
        let broken = Body::from_stream(futures::stream::iter([
            Ok(Bytes::from_static(b"ab")),
            Err(std::io::Error::other("invalid chunk size line")),
        ]));
        match read(broken, 100).await {
            Err(BodyError::Malformed(reason)) => {
                assert!(reason.contains("invalid chunk size line"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}
