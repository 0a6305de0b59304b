//! Connection tasks that wake themselves while they are polled are polled again at
//! once, instead of going back through tokio's scheduler.
//!
//! Why: hyper's HTTP/1 connection task registers its waker with a request body's
//! channel when it sends the body's bytes, and drops its end of the channel once the
//! declared length is in; the registration stays. The handler runs inside that same
//! task, and taking the bytes from the channel wakes the stale registration: the task
//! wakes itself. tokio re-queues a task woken during its own poll as a yield, behind
//! the rest of the run queue, and on the multi-thread runtime also wakes an idle worker
//! to steal it (an `eventfd` write or a futex wake, and a context switch on the other
//! CPU), for a second poll that finds nothing to do. Every `POST` with a body paid it:
//! ~2 context switches per call against ~1 for a `GET` (`/proc/PID/task/*/status`,
//! one keep-alive client), and half an `eventfd` write per call (strace).
//!
//! A [`SelfWakes`] future notes a wake that comes while it polls its inner future and
//! polls it again straight away. A wake from outside a poll (I/O readiness, a timer,
//! another task) goes to the task's waker as before. Only one extra poll is made
//! inline: a future that keeps waking itself (hyper yields that way after 16 rounds
//! of work on one connection, tokio's resources when the task's budget is spent) gets
//! a real wake the second time, so it still yields to the other tasks.
//!
//! No library does this: tokio has no setting for how it reschedules self-wakes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;

/// Not inside a poll of the inner future: a wake goes to the task.
const IDLE: u8 = 0;
/// Inside a poll, no wake yet.
const POLLING: u8 = 1;
/// Inside a poll, and woken during it.
const WOKEN: u8 = 2;

/// How many times in a row the inner future is polled again at once after waking
/// itself.
const INLINE_REPOLLS: usize = 1;

/// A future whose wakes during its own poll lead to an immediate second poll.
pub struct SelfWakes<F> {
    inner: Pin<Box<F>>,
    shared: Arc<Shared>,
    waker: Waker,
}

struct Shared {
    state: AtomicU8,
    task: AtomicWaker,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self
            .state
            .compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire)
        {
            // Noted: the poll in progress polls again.
            Ok(_) | Err(WOKEN) => {}
            // Outside a poll: the task must be scheduled. (Should a poll start in
            // between, the task is woken once for nothing, which is harmless.)
            Err(_) => self.task.wake(),
        }
    }
}

impl<F> SelfWakes<F> {
    pub fn new(inner: F) -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU8::new(IDLE),
            task: AtomicWaker::new(),
        });
        SelfWakes {
            inner: Box::pin(inner),
            waker: Waker::from(shared.clone()),
            shared,
        }
    }
}

impl<F: Future> Future for SelfWakes<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // Registered before the poll: a wake from another thread during it that finds
        // the state already back to IDLE must reach this task.
        this.shared.task.register(cx.waker());
        let mut inner_cx = Context::from_waker(&this.waker);
        let mut repolls = 0;
        loop {
            this.shared.state.store(POLLING, Ordering::Release);
            let result = this.inner.as_mut().poll(&mut inner_cx);
            let woken = this.shared.state.swap(IDLE, Ordering::AcqRel) == WOKEN;
            match result {
                Poll::Ready(output) => return Poll::Ready(output),
                Poll::Pending if !woken => return Poll::Pending,
                Poll::Pending if repolls == INLINE_REPOLLS => {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Pending => repolls += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the task's own wakes.
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Wakes itself during its first `self_wakes` polls, then is ready; counts polls.
    struct Waking {
        polls: Arc<AtomicUsize>,
        self_wakes: usize,
        stored: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Waking {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            let n = self.polls.fetch_add(1, Ordering::SeqCst);
            *self.stored.lock().unwrap() = Some(cx.waker().clone());
            if n < self.self_wakes {
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        }
    }

    fn setup(self_wakes: usize) -> (SelfWakes<Waking>, Arc<AtomicUsize>, Arc<Counter>, Waker) {
        let polls = Arc::new(AtomicUsize::new(0));
        let future = SelfWakes::new(Waking {
            polls: polls.clone(),
            self_wakes,
            stored: Default::default(),
        });
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        (future, polls, counter, waker)
    }

    #[test]
    fn a_wake_during_the_poll_is_answered_by_a_second_poll_without_the_task() {
        let (mut future, polls, task, waker) = setup(1);
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut future).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
        assert_eq!(task.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_future_that_keeps_waking_itself_yields_to_the_task() {
        let (mut future, polls, task, waker) = setup(3);
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut future).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1 + INLINE_REPOLLS);
        assert_eq!(
            task.0.load(Ordering::SeqCst),
            1,
            "the task is woken to yield"
        );
        assert!(Pin::new(&mut future).poll(&mut cx).is_ready());
    }

    #[test]
    fn a_wake_after_the_poll_reaches_the_task() {
        let polls = Arc::new(AtomicUsize::new(0));
        let stored: Arc<std::sync::Mutex<Option<Waker>>> = Default::default();
        let mut future = SelfWakes::new(Waking {
            polls: polls.clone(),
            self_wakes: 0,
            stored: stored.clone(),
        });
        // Ready at once with no self-wake: check that a later wake from elsewhere
        // (the stored waker, as I/O readiness would use it) reaches the task.
        let task = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut future).poll(&mut cx).is_ready());
        let inner_waker = stored.lock().unwrap().take().unwrap();
        inner_waker.wake_by_ref();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert_eq!(polls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_pending_future_woken_from_another_task_is_polled_again() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        rt.block_on(async {
            let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
            let waiting = tokio::spawn(SelfWakes::new(rx));
            tokio::task::yield_now().await;
            tx.send(7).unwrap();
            assert_eq!(waiting.await.unwrap().unwrap(), 7);
        });
    }
}
