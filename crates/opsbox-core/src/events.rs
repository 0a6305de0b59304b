//! The watch stream: reads the revisioned event log from a revision, then follows it
//! live. Resuming from revision N yields exactly the events after N; a revision that
//! compaction dropped is [`CoreError::Gone`], with the revision to re-list from.

use std::sync::Arc;

use futures::Stream;
use opsbox_api::{Event, EventPage};

use crate::error::{CoreError, CoreResult};
use crate::store::{EventsSince, Store};

/// Events read per store query while catching up.
const PAGE: u32 = 500;

#[derive(Clone)]
pub struct Events {
    store: Arc<dyn Store>,
}

impl Events {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Events { store }
    }

    pub async fn current_revision(&self) -> CoreResult<u64> {
        Ok(self.store.current_revision().await?)
    }

    /// One page of at most `limit` events after `since` (at most 10,000; 0 gives none,
    /// only the current revision).
    pub async fn page(&self, since: u64, limit: u32) -> CoreResult<EventPage> {
        let current = self.store.current_revision().await?;
        ahead(since, current)?;
        match self.store.events_since(since, limit.min(10_000)).await? {
            EventsSince::Events(events) => Ok(EventPage {
                events,
                current_revision: current,
            }),
            EventsSince::Gone { current } => Err(CoreError::Gone { since, current }),
        }
    }

    /// Every event after `since` (after the current revision when `None`), then each new
    /// one as it is committed. Fails at once with [`CoreError::Gone`] when `since` was
    /// compacted away; the stream itself ends with `Gone` if it falls that far behind.
    pub async fn follow(
        &self,
        since: Option<u64>,
    ) -> CoreResult<impl Stream<Item = CoreResult<Event>> + Send + 'static> {
        let mut changes = self.store.changes();
        changes.borrow_and_update();
        let mut since = match since {
            Some(rev) => {
                ahead(rev, self.store.current_revision().await?)?;
                rev
            }
            None => self.store.current_revision().await?,
        };
        let first = match self.store.events_since(since, PAGE).await? {
            EventsSince::Events(events) => events,
            EventsSince::Gone { current } => return Err(CoreError::Gone { since, current }),
        };
        let store = self.store.clone();
        Ok(async_stream::stream! {
            let mut batch = first;
            loop {
                if batch.is_empty() {
                    if changes.changed().await.is_err() {
                        return;
                    }
                } else {
                    for event in batch.drain(..) {
                        since = event.rev;
                        yield Ok(event);
                    }
                }
                changes.borrow_and_update();
                batch = match store.events_since(since, PAGE).await {
                    Ok(EventsSince::Events(events)) => events,
                    Ok(EventsSince::Gone { current }) => {
                        yield Err(CoreError::Gone { since, current });
                        return;
                    }
                    Err(e) => {
                        yield Err(e.into());
                        return;
                    }
                };
            }
        })
    }
}

/// A revision past the newest one was never given out (another store, a typo): waiting
/// for it would skip every event up to it without a word.
fn ahead(since: u64, current: u64) -> CoreResult<()> {
    if since > current {
        return Err(CoreError::Invalid(format!(
            "revision {since} is ahead of the event log (its newest is {current}); \
             resume from a revision this server gave out"
        )));
    }
    Ok(())
}
