//! How completions travel from an engine's threads back to the awaiting
//! callers.
//!
//! Each request has a oneshot channel. Waking a task from a thread outside
//! the tokio runtime costs a syscall per wake-up (on a current-thread
//! runtime, an eventfd write every time) and, when the runtime's thread
//! sleeps, a cross-CPU wake-up. A device thread therefore does not answer
//! callers itself while a runtime is at hand: it puts a turn's completions
//! into its [`CompletionQueue`] and wakes one pump task, at most once per
//! turn; the pump answers them from the runtime's own thread, where a
//! wake-up is a push onto a local run queue. One turn costs one
//! cross-thread wake-up however many requests it finished, and no caller
//! depends on another being polled.
//!
//! The pump is started by the first submission made inside a tokio
//! runtime. If that runtime shuts down, the pump's drop guard answers what
//! is queued and marks the queue pump-less; the next submission from a
//! runtime starts a new pump, and until then the device thread answers
//! callers directly (as it does for callers outside any runtime).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::{oneshot, Notify};

use super::IoCompletion;

/// The engine's end of one request's completion channel.
#[derive(Debug)]
pub struct CompletionSender(oneshot::Sender<IoCompletion>);

impl CompletionSender {
    /// Answers the caller (a caller that stopped waiting drops the
    /// completion, and with it the buffer, here).
    pub fn send(self, completion: IoCompletion) {
        let _ = self.0.send(completion);
    }
}

type Finished = Vec<(CompletionSender, IoCompletion)>;

/// Completions of one device thread on their way to the runtime's thread.
#[derive(Default)]
pub struct CompletionQueue {
    ready: Mutex<QueueState>,
    /// Whether a pump task answers the queue. Read anywhere, but changed
    /// only under the `ready` lock, so a device thread that saw it set
    /// while holding the lock knows its batch will be answered.
    pump_running: AtomicBool,
    wake_pump: Notify,
}

#[derive(Default)]
struct QueueState {
    finished: Finished,
    closed: bool,
}

impl CompletionQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Device thread: answers a turn's completions (and empties `batch`).
    pub fn deliver(&self, batch: &mut Finished) {
        if batch.is_empty() {
            return;
        }
        let mut state = self.lock();
        if !self.pump_running.load(Ordering::Acquire) {
            drop(state);
            for (sender, completion) in batch.drain(..) {
                sender.send(completion);
            }
            return;
        }
        let pump_idle = state.finished.is_empty();
        state.finished.append(batch);
        drop(state);
        // A non-empty queue means the pump has been woken and not drained yet.
        if pump_idle {
            self.wake_pump.notify_one();
        }
    }

    /// Caller side, on submission: starts the pump if none runs and a
    /// runtime is at hand.
    pub fn ensure_pump(self: &Arc<Self>) {
        if self.pump_running.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let state = self.lock();
        if self.pump_running.load(Ordering::Acquire) || state.closed {
            return;
        }
        self.pump_running.store(true, Ordering::Release);
        drop(state);
        runtime.spawn(pump(PumpGuard(self.clone())));
    }

    /// The engine is going away: the pump answers what is left and ends.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake_pump.notify_one();
    }
}

/// Ends the pump's tenure however its task ends (closed queue, or the
/// runtime dropping the task): whatever is queued is answered here and the
/// device thread answers callers itself from then on.
struct PumpGuard(Arc<CompletionQueue>);

impl Drop for PumpGuard {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        self.0.pump_running.store(false, Ordering::Release);
        let left = std::mem::take(&mut state.finished);
        drop(state);
        for (sender, completion) in left {
            sender.send(completion);
        }
    }
}

async fn pump(guard: PumpGuard) {
    let queue = &guard.0;
    loop {
        queue.wake_pump.notified().await;
        let (batch, closed) = {
            let mut state = queue.lock();
            (std::mem::take(&mut state.finished), state.closed)
        };
        for (sender, completion) in batch {
            sender.send(completion);
        }
        if closed {
            return;
        }
    }
}

/// A request's completion, to be awaited.
#[must_use = "an IO request does nothing useful unless its completion is awaited"]
pub struct PendingIo {
    state: PendingState,
}

enum PendingState {
    Waiting(oneshot::Receiver<IoCompletion>),
    Ready(Option<IoCompletion>),
}

impl PendingIo {
    /// A new request's completion channel.
    pub fn channel() -> (CompletionSender, PendingIo) {
        let (sender, receiver) = oneshot::channel();
        (CompletionSender(sender), Self { state: PendingState::Waiting(receiver) })
    }

    /// A completion known at submission (e.g. a request refused up front).
    pub fn ready(completion: IoCompletion) -> Self {
        Self { state: PendingState::Ready(Some(completion)) }
    }
}

impl Future for PendingIo {
    type Output = IoCompletion;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<IoCompletion> {
        let this = self.get_mut();
        match &mut this.state {
            PendingState::Ready(completion) => {
                Poll::Ready(completion.take().expect("PendingIo polled after it completed"))
            }
            PendingState::Waiting(receiver) => Pin::new(receiver).poll(cx).map(|outcome| {
                outcome.unwrap_or_else(|_| IoCompletion {
                    buf: None,
                    keep_alive: None,
                    result: Err(io::Error::other("the IO engine stopped before completing")),
                })
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(tag: u8) -> IoCompletion {
        IoCompletion {
            buf: None,
            keep_alive: Some(super::super::KeepAlive::new(tag)),
            result: Ok(()),
        }
    }

    fn tag(completion: IoCompletion) -> u8 {
        completion.keep_alive.unwrap().downcast::<u8>().unwrap()
    }

    /// Sends a batch from another thread, as a device thread does.
    fn deliver_from_thread(queue: &Arc<CompletionQueue>, batch: Finished) {
        let queue = queue.clone();
        std::thread::spawn(move || {
            let mut batch = batch;
            queue.deliver(&mut batch);
            assert!(batch.is_empty());
        })
        .join()
        .unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn batches_reach_every_caller_whatever_order_they_are_awaited_in() {
        let queue = Arc::new(CompletionQueue::default());
        queue.ensure_pump();
        assert!(queue.pump_running.load(Ordering::Acquire), "batches must go through the pump");
        for round in 0..3 {
            let mut batch = Vec::new();
            let mut pending = Vec::new();
            for i in 0..5u8 {
                let (sender, waiting) = PendingIo::channel();
                batch.push((sender, done(i)));
                pending.push(waiting);
            }
            deliver_from_thread(&queue, batch);
            if round == 1 {
                pending.reverse();
            }
            let mut tags = Vec::new();
            for waiting in pending {
                tags.push(tag(waiting.await));
            }
            tags.sort();
            assert_eq!(tags, vec![0, 1, 2, 3, 4]);
        }
    }

    #[test]
    fn without_a_runtime_or_after_it_ended_the_device_thread_answers_directly() {
        let queue = Arc::new(CompletionQueue::default());
        queue.ensure_pump(); // outside any runtime: no pump
        let (sender, waiting) = PendingIo::channel();
        deliver_from_thread(&queue, vec![(sender, done(7))]);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(tag(runtime.block_on(waiting)), 7);

        // A pump started in a runtime that then shuts down hands back.
        runtime.block_on(async { queue.ensure_pump() });
        assert!(queue.pump_running.load(Ordering::Acquire));
        drop(runtime);
        assert!(!queue.pump_running.load(Ordering::Acquire));
        let (sender, waiting) = PendingIo::channel();
        deliver_from_thread(&queue, vec![(sender, done(8))]);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(tag(runtime.block_on(waiting)), 8);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn callers_that_stopped_waiting_do_not_stall_the_pump() {
        let queue = Arc::new(CompletionQueue::default());
        queue.ensure_pump();
        let (gone, dropped) = PendingIo::channel();
        let (sender, waiting) = PendingIo::channel();
        drop(dropped);
        deliver_from_thread(&queue, vec![(gone, done(1)), (sender, done(2))]);
        assert_eq!(tag(waiting.await), 2);
        queue.close();
    }
}
