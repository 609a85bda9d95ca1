//! Requests alone on their device, submitted from the caller's own thread.
//!
//! A request handed to a device thread costs two cross-thread wake-ups: the
//! device thread's (to submit) and the caller's (for the completion). At
//! depth those overlap with IO, but a request alone on its device pays both
//! in series, and on a VM each wakes a halted vCPU. So a request that finds
//! its device idle is pushed by the caller itself into one ring shared by
//! all devices of the engine, and submitted with one non-blocking
//! `io_uring_enter`. The kernel signals an eventfd registered with the ring
//! for every completion; a reaper task on the caller's runtime waits for
//! that eventfd in the runtime's own poller, so the completion wakes the
//! runtime thread once and nothing else. Measured end to end (three SDS and
//! one SDC on a two-vCPU VM, fio 4 KiB QD1 through NBD): see
//! `docs/ARCHITECTURE.md`.
//!
//! The ring is a plain one (no `SINGLE_ISSUER`): any runtime thread may
//! submit, under the ring's lock. A device holds at most one such request at
//! a time (the next one finds it busy and goes to the device thread), so the
//! ring stays tiny.
//!
//! Buffer ownership is the device thread's rule: an operation and its
//! buffer live in the in-flight table until the kernel has reported its
//! completion. The ring is dropped only after every operation in it has
//! completed ([`Drop`] waits for them), so a caller that stops waiting, an
//! engine closed with requests in flight and a runtime that shuts down
//! under the reaper are all safe.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use io_uring::{types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::runtime::Handle;

use super::{new_eventfd, signal_eventfd, InFlight, InFlightTable};
use crate::engine::{CompletionSender, IoCompletion, IoRequest};

/// The shared ring for requests submitted on their caller's thread.
pub(super) struct InlineRing {
    state: Mutex<InlineState>,
    /// Registered with the ring: the kernel adds to it on every completion.
    eventfd: OwnedFd,
    /// A reaper task is waiting on `eventfd` somewhere.
    reaper_running: AtomicBool,
    /// The engine is gone: the reaper ends once nothing is in flight.
    closed: AtomicBool,
    /// Per device, shared with the device threads: requests not answered yet.
    busy: Vec<Arc<AtomicUsize>>,
    /// Requests submitted here so far (tests and diagnostics).
    submitted: AtomicU64,
}

struct InlineState {
    ring: IoUring,
    in_flight: InFlightTable,
    /// Completions of one reap: (user_data, result); kept to reuse its memory.
    reaped: Vec<(u64, i32)>,
}

impl InlineRing {
    /// A ring over the engine's device files (registered as files 0..n).
    pub(super) fn open(files: &[RawFd], busy: Vec<Arc<AtomicUsize>>) -> io::Result<Arc<Self>> {
        let entries = (files.len() as u32 * 2).next_power_of_two().max(8);
        // COOP_TASKRUN: a completion wakes a sleeping runtime thread but does
        // not interrupt a running one; that one posts it at its next syscall.
        let ring = match IoUring::builder().setup_clamp().setup_coop_taskrun().build(entries) {
            Ok(ring) => ring,
            Err(_) => IoUring::builder().setup_clamp().build(entries)?,
        };
        ring.submitter().register_files(files)?;
        let eventfd = new_eventfd(libc::EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let capacity = ring.params().sq_entries().saturating_sub(1) as usize;
        Ok(Arc::new(Self {
            state: Mutex::new(InlineState {
                ring,
                in_flight: InFlightTable::with_capacity(capacity),
                reaped: Vec::with_capacity(capacity),
            }),
            eventfd,
            reaper_running: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            busy,
            submitted: AtomicU64::new(0),
        }))
    }

    /// Requests submitted through this ring so far.
    pub(super) fn submitted(&self) -> u64 {
        self.submitted.load(Ordering::Relaxed)
    }

    /// Submits `request` now, on this thread; its completion is answered
    /// through `reply` by the reaper on `runtime`. The caller has counted
    /// the request in its device's `busy`.
    pub(super) fn submit(
        self: &Arc<Self>,
        runtime: &Handle,
        request: IoRequest,
        reply: CompletionSender,
    ) {
        self.ensure_reaper(runtime);
        let mut state = self.lock();
        let op = InFlight { request, reply, done: 0 };
        let index = state.in_flight.insert(op);
        state.push_entry(index);
        self.submitted.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = state.ring.submit() {
            // The entry stays queued; the reaper's next turn submits it.
            tracing::warn!(%error, "io_uring submit failed; retrying from the reaper");
            self.wake_reaper();
        }
    }

    /// Lets the reaper end once nothing is in flight (the engine is closing).
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake_reaper();
    }

    fn lock(&self) -> MutexGuard<'_, InlineState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wake_reaper(&self) {
        signal_eventfd(&self.eventfd);
    }

    fn ensure_reaper(self: &Arc<Self>, runtime: &Handle) {
        if !self.reaper_running.swap(true, Ordering::AcqRel) {
            runtime.spawn(self.clone().reap_forever());
        }
    }

    /// Answers completions as the eventfd reports them, until the engine
    /// has closed and nothing is in flight (or the runtime shuts down).
    async fn reap_forever(self: Arc<Self>) {
        /// Lets the next submission start a reaper if this one is dropped.
        struct Running<'a>(&'a AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _running = Running(&self.reaper_running);
        // SAFETY: the eventfd is owned by `self`, which this task holds (an
        // Arc) for longer than `events` lives, so the descriptor stays open
        // and refers to the same eventfd throughout.
        let registered = unsafe {
            AsyncFd::register_with_interest(self.eventfd.as_raw_fd(), Interest::READABLE)
        };
        let events = match registered.map_err(io::Error::from) {
            Ok(events) => events,
            Err(error) => {
                tracing::error!(%error, "cannot watch the inline ring's eventfd");
                return;
            }
        };
        loop {
            self.reap();
            if self.closed.load(Ordering::SeqCst) && self.lock().in_flight.count == 0 {
                return;
            }
            let mut ready = match events.readable().await {
                Ok(ready) => ready,
                Err(error) => {
                    tracing::error!(%error, "waiting on the inline ring's eventfd failed");
                    return;
                }
            };
            let mut counter = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a live local array; the
            // eventfd is non-blocking, so this never waits.
            let _ = unsafe { libc::read(self.eventfd.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
            ready.clear_ready();
        }
    }

    /// Answers every completion in the queue and resubmits the rest of
    /// short transfers. Answering under the lock is fine: it only schedules
    /// the waiting task, which runs later.
    fn reap(&self) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut reaped = std::mem::take(&mut state.reaped);
        reaped.extend(state.ring.completion().map(|cqe| (cqe.user_data(), cqe.result())));
        let mut resubmit = !state.ring.submission().is_empty();
        for &(user_data, result) in &reaped {
            let index = user_data as usize;
            let Some(op) = state.in_flight.get_mut(index) else {
                tracing::error!(index, "inline completion for an unknown operation");
                continue;
            };
            match op.transfer_outcome(result) {
                None => {
                    state.push_entry(index);
                    resubmit = true;
                }
                Some(result) => {
                    let op = state.in_flight.remove(index).expect("completed op is in flight");
                    self.busy[op.request.device].fetch_sub(1, Ordering::AcqRel);
                    op.reply.send(IoCompletion::of(op.request, result));
                }
            }
        }
        reaped.clear();
        state.reaped = reaped;
        if resubmit {
            if let Err(error) = state.ring.submit() {
                tracing::warn!(%error, "io_uring resubmit failed; retrying");
                self.wake_reaper();
            }
        }
    }
}

impl InlineState {
    /// Queues (the rest of) in-flight operation `index` on its device's file.
    fn push_entry(&mut self, index: usize) {
        let op = self.in_flight.get_mut(index).expect("pushing an operation that is not in flight");
        let entry = op.entry(types::Fixed(op.request.device as u32)).user_data(index as u64);
        loop {
            // SAFETY: the entry points into a buffer owned by the in-flight
            // table, which keeps it until the entry's completion is reaped
            // (Drop waits for every completion); the files stay registered
            // for the ring's life.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // At most one request per device is here, so the queue cannot
            // be full; never drop an entry all the same.
            let _ = self.ring.submit();
        }
    }
}

impl Drop for InlineRing {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        while state.in_flight.count > 0 {
            match state.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(error) => {
                    // The kernel may still use the buffers: never free them.
                    tracing::error!(%error, "io_uring wait failed at shutdown; leaking buffers");
                    std::mem::forget(std::mem::replace(
                        &mut state.in_flight,
                        InFlightTable::with_capacity(0),
                    ));
                    return;
                }
            }
            let reaped: Vec<u64> = state.ring.completion().map(|cqe| cqe.user_data()).collect();
            for user_data in reaped {
                // Nobody waits any more: finish without resubmitting the rest.
                if let Some(op) = state.in_flight.remove(user_data as usize) {
                    self.busy[op.request.device].fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }
}
