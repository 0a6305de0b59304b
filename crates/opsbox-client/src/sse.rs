//! Server-Sent Events as the native API sends them, decoded into typed items.
//!
//! Framing (fields, blank-line separators, comments used as keep-alives) is left to the
//! `eventsource-stream` crate; this module only knows which event names carry what:
//!
//! | stream           | `event:`            | `data:`                         |
//! |------------------|---------------------|---------------------------------|
//! | job log follow   | `output`, `end`     | a [`LogEvent`] as JSON          |
//! | event watch      | `event` (`id: rev`) | an [`Event`] as JSON            |
//! | either           | `error`             | an [`ErrorBody`] as JSON; last  |

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use opsbox_api::{ErrorBody, Event, LogEvent};
use serde::de::DeserializeOwned;

use crate::error::{ClientError, Result};

/// One message of an SSE stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseMessage {
    /// The `event:` field; `message` when absent.
    pub event: String,
    pub data: String,
}

/// Splits a body into SSE messages. A framing or connection error is an `Err` with its
/// description; the caller decides whether to resume.
pub(crate) fn messages<S, E>(
    body: S,
) -> impl Stream<Item = Result<SseMessage, String>> + Send + Unpin + 'static
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    body.eventsource()
        .map(|item| match item {
            Ok(message) => Ok(SseMessage {
                event: message.event,
                data: message.data,
            }),
            Err(error) => Err(error.to_string()),
        })
        .boxed()
}

/// A message of a followed job log: `Some` event, `None` for a message of no interest,
/// or the error the server sent.
pub(crate) fn decode_log_message(message: &SseMessage) -> Result<Option<LogEvent>> {
    match message.event.as_str() {
        "output" | "end" => decode(message, "a job log event").map(Some),
        "error" => Err(server_error(message)),
        _ => Ok(None),
    }
}

/// A message of the event watch.
pub(crate) fn decode_watch_message(message: &SseMessage) -> Result<Option<Event>> {
    match message.event.as_str() {
        "event" => decode(message, "a watched event").map(Some),
        "error" => Err(server_error(message)),
        _ => Ok(None),
    }
}

fn decode<T: DeserializeOwned>(message: &SseMessage, what: &str) -> Result<T> {
    serde_json::from_str(&message.data).map_err(|source| ClientError::Decode {
        what: format!("{what} (`event: {}`)", message.event),
        source,
    })
}

fn server_error(message: &SseMessage) -> ClientError {
    match serde_json::from_str::<ErrorBody>(&message.data) {
        Ok(body) => ClientError::from_stream_body(body),
        Err(_) => ClientError::Stream(format!("the server sent an error: {}", message.data)),
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use opsbox_api::{LogChunk, Stream as OutStream};

    use super::*;

    /// Feeds raw bytes, split at awkward places, through the framing and decoding.
    async fn framed(raw: &str, split_every: usize) -> Vec<SseMessage> {
        let pieces: Vec<Result<Bytes, Infallible>> = raw
            .as_bytes()
            .chunks(split_every)
            .map(|piece| Ok(Bytes::copy_from_slice(piece)))
            .collect();
        messages(futures::stream::iter(pieces))
            .map(|m| m.unwrap())
            .collect()
            .await
    }

    #[tokio::test]
    async fn log_stream_output_then_end() {
        let raw = concat!(
            ": keep-alive\n\n",
            "event: output\n",
            "data: {\"type\":\"output\",\"seq\":1,\"stream\":\"stdout\",\"data\":\"hi\\n\"}\n\n",
            "event: output\r\n",
            "data: {\"type\":\"output\",\"seq\":2,\"stream\":\"stderr\",\"data\":\"oops\"}\r\n\r\n",
        );
        for split in [1, 7, raw.len()] {
            let decoded: Vec<LogEvent> = framed(raw, split)
                .await
                .iter()
                .filter_map(|m| decode_log_message(m).unwrap())
                .collect();
            assert_eq!(
                decoded,
                vec![
                    LogEvent::Output(LogChunk {
                        seq: 1,
                        stream: OutStream::Stdout,
                        data: "hi\n".into()
                    }),
                    LogEvent::Output(LogChunk {
                        seq: 2,
                        stream: OutStream::Stderr,
                        data: "oops".into()
                    }),
                ],
                "split every {split} bytes"
            );
        }
    }

    #[tokio::test]
    async fn watch_stream_events_and_gone() {
        let raw = concat!(
            "id: 5\nevent: event\n",
            "data: {\"rev\":5,\"at\":\"2024-01-02T03:04:05Z\",\"kind\":\"job.created\",\"subject\":\"echo@1:2:3\",\"data\":{}}\n\n",
            "event: error\n",
            "data: {\"error\":\"gone\",\"message\":\"revision 1 was compacted\",\"current_revision\":9}\n\n",
        );
        let messages = framed(raw, 13).await;
        let event = decode_watch_message(&messages[0]).unwrap().unwrap();
        assert_eq!((event.rev, event.kind.as_str()), (5, "job.created"));
        assert!(matches!(
            decode_watch_message(&messages[1]),
            Err(ClientError::Gone {
                current_revision: 9,
                ..
            })
        ));
    }

    #[test]
    fn unknown_events_are_skipped_and_bad_json_is_a_decode_error() {
        let other = SseMessage {
            event: "message".into(),
            data: "whatever".into(),
        };
        assert_eq!(decode_log_message(&other).unwrap(), None);
        let broken = SseMessage {
            event: "end".into(),
            data: "{not json".into(),
        };
        assert!(matches!(
            decode_log_message(&broken),
            Err(ClientError::Decode { .. })
        ));
    }
}
