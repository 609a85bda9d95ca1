//! The write side of one socket, shared by client and server.
//!
//! Whoever has a frame to send writes it straight to the socket from its own
//! task when nothing is queued and the socket takes it without waiting: one
//! non-blocking `writev`, no hand-off to another task. Otherwise (another
//! frame is being written, or the socket is full) the frame is queued to the
//! socket's writer task, which writes queued frames back to back, several per
//! system call, until the queue is empty, then hands the socket back.
//!
//! A frame is always written whole even if the future that sent it is
//! dropped: the direct write is synchronous, and whatever part of a frame the
//! socket did not take is queued (ahead of everything else) before returning.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use pflex_proto::frame::HEADER_LEN;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore};

/// Frames waiting for one socket; bounded so a slow peer pushes back.
pub(crate) const QUEUE_DEPTH: usize = 512;
/// The writer task gathers queued frames up to this many bytes per write.
const WRITE_BUFFER: usize = 256 * 1024;
/// Payloads at least this large are written from their own buffer, not copied.
const COPY_LIMIT: usize = 64 * 1024;

type Socket = Box<dyn AsyncWrite + Unpin + Send>;

/// One encoded header and its payload (shared, so a payload sent to a
/// peer and written locally at the same time is not copied).
pub(crate) struct OutFrame {
    pub header: [u8; HEADER_LEN],
    pub payload: Bytes,
}

/// A frame on its way out: how much of it the socket already took.
struct Pending {
    frame: OutFrame,
    written: usize,
    /// Whether it holds a permit of the queue bound.
    counted: bool,
}

impl Pending {
    fn new(frame: OutFrame) -> Self {
        Self { frame, written: 0, counted: false }
    }
    fn len(&self) -> usize {
        HEADER_LEN + self.frame.payload.len()
    }
    fn is_done(&self) -> bool {
        self.written >= self.len()
    }
    /// The unwritten part: the rest of the header and of the payload.
    fn remaining(&self) -> [&[u8]; 2] {
        if self.written < HEADER_LEN {
            [&self.frame.header[self.written..], &self.frame.payload[..]]
        } else {
            [&[], &self.frame.payload[self.written - HEADER_LEN..]]
        }
    }
}

/// The connection's write side was closed or failed.
#[derive(Debug, Clone)]
pub(crate) struct SendFailed(pub String);

struct State {
    /// `None` while the writer task holds the socket.
    socket: Option<Socket>,
    queue: VecDeque<Pending>,
    failed: Option<String>,
    /// Every [`FrameSender`] is gone: write what is queued, then shut down.
    senders_gone: bool,
}

struct Shared {
    state: Mutex<State>,
    wake_writer: Notify,
    room: Semaphore,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
    fn fail(&self, state: &mut State, reason: String) {
        if state.failed.is_none() {
            state.failed = Some(reason);
        }
        state.queue.clear();
        self.room.close();
        self.wake_writer.notify_one();
    }
}

/// Cloneable handle sending frames on one socket.
#[derive(Clone)]
pub(crate) struct FrameSender {
    handle: Arc<SenderHandle>,
}

struct SenderHandle {
    shared: Arc<Shared>,
}

impl Drop for SenderHandle {
    fn drop(&mut self) {
        self.shared.lock().senders_gone = true;
        self.shared.wake_writer.notify_one();
    }
}

/// Outcome of trying to send without waiting.
enum Attempt {
    Sent,
    MustQueue(Pending),
}

impl FrameSender {
    /// A sender over `socket` and the writer task future that must be
    /// spawned next to it. The task ends once every sender is dropped
    /// (after writing what was queued) or on a socket error.
    pub(crate) fn new<W>(
        socket: W,
    ) -> (FrameSender, impl std::future::Future<Output = std::io::Result<()>> + Send + 'static)
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                socket: Some(Box::new(socket)),
                queue: VecDeque::new(),
                failed: None,
                senders_gone: false,
            }),
            wake_writer: Notify::new(),
            room: Semaphore::new(QUEUE_DEPTH),
        });
        let sender = FrameSender { handle: Arc::new(SenderHandle { shared: shared.clone() }) };
        (sender, run_writer(shared))
    }

    /// Sends one frame: written right away when the socket is free,
    /// queued to the writer task otherwise (waiting for room in the queue).
    pub(crate) async fn send(&self, frame: OutFrame) -> Result<(), SendFailed> {
        let shared = &self.handle.shared;
        let pending = match self.try_direct(Pending::new(frame))? {
            Attempt::Sent => return Ok(()),
            Attempt::MustQueue(pending) => pending,
        };
        let permit = shared.room.acquire().await.map_err(|_| self.failure())?;
        permit.forget();
        let mut pending = match self.try_direct(pending) {
            Ok(Attempt::MustQueue(pending)) => pending,
            other => {
                shared.room.add_permits(1);
                return other.map(|_| ());
            }
        };
        pending.counted = true;
        let mut state = shared.lock();
        if let Some(reason) = &state.failed {
            return Err(SendFailed(reason.clone()));
        }
        state.queue.push_back(pending);
        drop(state);
        shared.wake_writer.notify_one();
        Ok(())
    }

    fn failure(&self) -> SendFailed {
        let reason = self.handle.shared.lock().failed.clone();
        SendFailed(reason.unwrap_or_else(|| "connection writer has stopped".into()))
    }

    /// Writes the frame now if nothing is queued and the socket is here;
    /// a frame the socket took only in part is queued first in line.
    fn try_direct(&self, mut pending: Pending) -> Result<Attempt, SendFailed> {
        let shared = &self.handle.shared;
        let mut state = shared.lock();
        if let Some(reason) = &state.failed {
            return Err(SendFailed(reason.clone()));
        }
        if !state.queue.is_empty() {
            return Ok(Attempt::MustQueue(pending));
        }
        let Some(socket) = state.socket.as_mut() else {
            return Ok(Attempt::MustQueue(pending));
        };
        match write_without_waiting(socket, &mut pending) {
            Ok(true) => Ok(Attempt::Sent),
            Ok(false) => {
                // The rest goes first; the writer task waits for the socket.
                state.queue.push_front(pending);
                drop(state);
                shared.wake_writer.notify_one();
                Ok(Attempt::Sent)
            }
            Err(e) => {
                let reason = format!("write failed: {e}");
                shared.fail(&mut state, reason.clone());
                Err(SendFailed(reason))
            }
        }
    }
}

/// Writes as much of `pending` as the socket takes without blocking;
/// `Ok(true)` once all of it is written.
fn write_without_waiting(socket: &mut Socket, pending: &mut Pending) -> std::io::Result<bool> {
    let mut context = Context::from_waker(Waker::noop());
    while !pending.is_done() {
        let [head, body] = pending.remaining();
        let slices = [IoSlice::new(head), IoSlice::new(body)];
        let slices = if head.is_empty() { &slices[1..] } else { &slices[..] };
        match Pin::new(&mut **socket).poll_write_vectored(&mut context, slices) {
            Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => pending.written += n,
            Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok(false),
        }
    }
    Ok(true)
}

/// What the writer task does next.
enum Work {
    Write(Socket, Vec<Pending>),
    Shutdown(Socket),
    Stop(Option<String>),
    Wait,
}

/// Takes the socket and every queued frame, if there is work.
fn take_work(shared: &Shared) -> Work {
    let mut state = shared.lock();
    if let Some(reason) = &state.failed {
        return Work::Stop(Some(reason.clone()));
    }
    if !state.queue.is_empty() {
        if let Some(socket) = state.socket.take() {
            let batch: Vec<Pending> = state.queue.drain(..).collect();
            let counted = batch.iter().filter(|p| p.counted).count();
            drop(state);
            shared.room.add_permits(counted);
            return Work::Write(socket, batch);
        }
    }
    if state.senders_gone {
        return match state.socket.take() {
            Some(socket) => Work::Shutdown(socket),
            None => Work::Stop(None),
        };
    }
    Work::Wait
}

/// The writer task: writes queued frames whenever there are some.
async fn run_writer(shared: Arc<Shared>) -> std::io::Result<()> {
    let mut gather = Vec::with_capacity(WRITE_BUFFER);
    loop {
        match take_work(&shared) {
            Work::Wait => shared.wake_writer.notified().await,
            Work::Stop(None) => return Ok(()),
            Work::Stop(Some(reason)) => return Err(std::io::Error::other(reason)),
            Work::Shutdown(mut socket) => return socket.shutdown().await,
            Work::Write(mut socket, mut batch) => loop {
                if let Err(e) = write_batch(&mut socket, &batch, &mut gather).await {
                    let mut state = shared.lock();
                    shared.fail(&mut state, format!("write failed: {e}"));
                    return Err(e);
                }
                // Keep the socket while frames keep coming; else hand it back.
                let mut state = shared.lock();
                if state.failed.is_some() || state.queue.is_empty() {
                    state.socket = Some(socket);
                    break;
                }
                batch = state.queue.drain(..).collect();
                let counted = batch.iter().filter(|p| p.counted).count();
                drop(state);
                shared.room.add_permits(counted);
            },
        }
    }
}

/// Writes every frame of `batch` (the rest of each), gathering small ones.
async fn write_batch(
    socket: &mut Socket,
    batch: &[Pending],
    gather: &mut Vec<u8>,
) -> std::io::Result<()> {
    gather.clear();
    for pending in batch {
        let [head, body] = pending.remaining();
        gather.extend_from_slice(head);
        if body.len() >= COPY_LIMIT {
            socket.write_all(gather).await?;
            gather.clear();
            socket.write_all(body).await?;
        } else {
            gather.extend_from_slice(body);
            if gather.len() >= WRITE_BUFFER {
                socket.write_all(gather).await?;
                gather.clear();
            }
        }
    }
    if !gather.is_empty() {
        socket.write_all(gather).await?;
        gather.clear();
    }
    socket.flush().await
}
