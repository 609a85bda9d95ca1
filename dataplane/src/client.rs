//! [`DataPlaneClient`]: pooled, pipelined data-plane client.
//!
//! The client keeps up to `connections` TCP connections to one SDS, opened
//! lazily and picked round-robin. Each connection has one writer task (see
//! the `writer` module) and one reader task that hands every reply to the
//! waiting caller by request id, so any number of requests are in flight
//! per connection and replies may arrive in any order.
//!
//! A broken connection fails every request still waiting on it with
//! [`ClientError::Transport`]; the next call on that slot opens a new
//! connection. Requests are not retried here: whether a request may be
//! repeated (a fresh `seq`, a new token) is the caller's decision.
//!
//! Cancellation: dropping a `call` future is safe. A queued frame is still
//! written whole; its reply, if one comes, is discarded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pflex_proto::frame::{crc32, FrameHeader, Op, Status, MAX_PAYLOAD};
use pflex_proto::token::SessionKey;
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::server::read_reply;
use crate::writer::{run_frame_writer, OutFrame, QUEUE_DEPTH};

const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_BUFFER: usize = 256 * 1024;

/// Why a call did not produce a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("data-plane connection failed: {0}")]
    Transport(String),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("payload of {0} bytes exceeds the frame maximum")]
    PayloadTooLarge(usize),
    #[error("op {0} carries no request payload")]
    UnexpectedPayload(u8),
    #[error("reply payload does not match its CRC32")]
    BadReplyCrc,
    /// A reply (status in it) without a valid MAC, where one is required:
    /// changed on the way, or not from the node holding the key.
    #[error("{} reply without a valid MAC", .0.name())]
    BadReplyMac(Status),
    #[error("reply does not match its request: {0}")]
    Protocol(String),
    #[error("request rejected: {}", .0.name())]
    Rejected(Status),
}

/// A reply frame and its payload (READ data, ALLOCATION bitmap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub header: FrameHeader,
    pub payload: Vec<u8>,
}

impl Reply {
    /// The reply's status; an unknown code counts as an IO error.
    pub fn status(&self) -> Status {
        Status::from_u16(self.header.status).unwrap_or(Status::IoError)
    }
    /// `Ok(self)` for status `Ok`, otherwise [`ClientError::Rejected`].
    pub fn into_ok(self) -> Result<Reply, ClientError> {
        match self.status() {
            Status::Ok => Ok(self),
            other => Err(ClientError::Rejected(other)),
        }
    }
}

/// Pooled, pipelined client to one SDS data port. Cheap to clone.
#[derive(Clone)]
pub struct DataPlaneClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    addr: SocketAddr,
    slots: Vec<tokio::sync::Mutex<Option<Arc<Connection>>>>,
    next_slot: AtomicUsize,
    next_request_id: AtomicU64,
    request_timeout: Duration,
    connect_timeout: Duration,
}

impl std::fmt::Debug for DataPlaneClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlaneClient")
            .field("addr", &self.inner.addr)
            .field("connections", &self.inner.slots.len())
            .finish()
    }
}

impl DataPlaneClient {
    /// A client for `addr` using up to `connections` sockets (at least one).
    /// Nothing is connected until the first call.
    pub fn new(addr: SocketAddr, connections: usize) -> Self {
        Self::with_timeouts(addr, connections, DEFAULT_REQUEST_TIMEOUT, DEFAULT_CONNECT_TIMEOUT)
    }

    /// Like [`DataPlaneClient::new`] with explicit timeouts: `request` bounds
    /// the wait for one reply, `connect` one connection attempt.
    pub fn with_timeouts(
        addr: SocketAddr,
        connections: usize,
        request: Duration,
        connect: Duration,
    ) -> Self {
        let slots = (0..connections.max(1)).map(|_| tokio::sync::Mutex::new(None)).collect();
        Self {
            inner: Arc::new(ClientInner {
                addr,
                slots,
                next_slot: AtomicUsize::new(0),
                next_request_id: AtomicU64::new(1),
                request_timeout: request,
                connect_timeout: connect,
            }),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Sends one request and waits for its reply. Copies `payload`; see
    /// [`DataPlaneClient::call_owned`] to hand over a buffer instead.
    pub async fn call(
        &self,
        header: FrameHeader,
        key: &SessionKey,
        payload: &[u8],
    ) -> Result<Reply, ClientError> {
        self.call_owned(header, key, payload.to_vec()).await
    }

    /// Sends one request (taking ownership of the payload) and waits for its
    /// reply. See [`DataPlaneClient::call_shared`].
    pub async fn call_owned(
        &self,
        header: FrameHeader,
        key: &SessionKey,
        payload: Vec<u8>,
    ) -> Result<Reply, ClientError> {
        self.call_shared(header, key, Bytes::from(payload)).await
    }

    /// Sends one request with a shared payload and waits for its reply.
    /// Sets `request_id`, `payload_crc`, `length` (WRITE, AUTH) and the MAC
    /// under `key`; the caller sets the other fields.
    pub async fn call_shared(
        &self,
        mut header: FrameHeader,
        key: &SessionKey,
        payload: Bytes,
    ) -> Result<Reply, ClientError> {
        let op = Op::from_u8(header.op);
        if matches!(op, Some(Op::Write) | Some(Op::Auth)) {
            if payload.len() > MAX_PAYLOAD as usize {
                return Err(ClientError::PayloadTooLarge(payload.len()));
            }
            header.length = payload.len() as u32;
        } else if !payload.is_empty() {
            return Err(ClientError::UnexpectedPayload(header.op));
        }
        let request_id = self.inner.next_request_id.fetch_add(1, Ordering::Relaxed);
        header.request_id = request_id;
        header.status = 0;
        header.payload_crc = crc32(&payload);
        header.seal(key, &payload);

        let connection = self.connection().await?;
        let (reply_tx, reply_rx) = oneshot::channel();
        connection.pending.register(request_id, reply_tx)?;
        let _forget_on_drop = PendingGuard { pending: &connection.pending, request_id };
        connection
            .frames
            .send(OutFrame { header: header.encode(), payload })
            .await
            .map_err(|_| ClientError::Transport("connection writer has stopped".into()))?;
        let reply = match tokio::time::timeout(self.inner.request_timeout, reply_rx).await {
            Err(_) => return Err(ClientError::Timeout(self.inner.request_timeout)),
            Ok(Err(_)) => return Err(ClientError::Transport("connection dropped".into())),
            Ok(Ok(result)) => result?,
        };
        check_reply(&header, &reply, key)?;
        Ok(reply)
    }

    /// A healthy connection of the next slot, opening one if needed.
    async fn connection(&self) -> Result<Arc<Connection>, ClientError> {
        let inner = &self.inner;
        let index = inner.next_slot.fetch_add(1, Ordering::Relaxed) % inner.slots.len();
        let mut slot = inner.slots[index].lock().await;
        if let Some(existing) = slot.as_ref() {
            if !existing.pending.is_broken() {
                return Ok(existing.clone());
            }
        }
        *slot = None;
        let fresh = Arc::new(Connection::open(inner.addr, inner.connect_timeout).await?);
        *slot = Some(fresh.clone());
        Ok(fresh)
    }
}

fn check_reply(request: &FrameHeader, reply: &Reply, key: &SessionKey) -> Result<(), ClientError> {
    let sealed = reply.header.verify_reply_mac(key, &request.mac, &reply.payload);
    if !sealed && request.op != Op::Ping as u8 && !reply.status().may_be_unsealed() {
        return Err(ClientError::BadReplyMac(reply.status()));
    }
    if reply.header.op != request.op {
        return Err(ClientError::Protocol(format!(
            "reply op {} to request op {}",
            reply.header.op, request.op
        )));
    }
    if !reply.payload.is_empty() && crc32(&reply.payload) != reply.header.payload_crc {
        return Err(ClientError::BadReplyCrc);
    }
    if request.op == Op::Read as u8
        && reply.status() == Status::Ok
        && reply.payload.len() != request.length as usize
    {
        return Err(ClientError::Protocol(format!(
            "read of {} bytes answered with {}",
            request.length,
            reply.payload.len()
        )));
    }
    Ok(())
}

type ReplySender = oneshot::Sender<Result<Reply, ClientError>>;

/// Requests waiting for their reply on one connection.
#[derive(Default)]
struct PendingReplies {
    state: Mutex<PendingState>,
}

#[derive(Default)]
struct PendingState {
    waiting: HashMap<u64, ReplySender>,
    /// Set once the connection failed; no request may wait on it after.
    broken: Option<String>,
}

impl PendingReplies {
    fn lock(&self) -> std::sync::MutexGuard<'_, PendingState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
    fn is_broken(&self) -> bool {
        self.lock().broken.is_some()
    }
    fn register(&self, request_id: u64, sender: ReplySender) -> Result<(), ClientError> {
        let mut state = self.lock();
        if let Some(reason) = &state.broken {
            return Err(ClientError::Transport(reason.clone()));
        }
        state.waiting.insert(request_id, sender);
        Ok(())
    }
    fn forget(&self, request_id: u64) {
        self.lock().waiting.remove(&request_id);
    }
    fn complete(&self, reply: Reply) {
        let sender = self.lock().waiting.remove(&reply.header.request_id);
        if let Some(sender) = sender {
            let _ = sender.send(Ok(reply));
        }
    }
    /// Marks the connection broken and fails everything waiting on it.
    fn fail(&self, reason: String) {
        let waiting = {
            let mut state = self.lock();
            if state.broken.is_none() {
                state.broken = Some(reason.clone());
            }
            std::mem::take(&mut state.waiting)
        };
        for (_, sender) in waiting {
            let _ = sender.send(Err(ClientError::Transport(reason.clone())));
        }
    }
}

/// Removes a request from the pending table when its caller stops waiting.
struct PendingGuard<'a> {
    pending: &'a PendingReplies,
    request_id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.forget(self.request_id);
    }
}

/// One socket with its reader and writer tasks.
struct Connection {
    frames: mpsc::Sender<OutFrame>,
    pending: Arc<PendingReplies>,
    reader: AbortHandle,
    writer: AbortHandle,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl Connection {
    async fn open(addr: SocketAddr, connect_timeout: Duration) -> Result<Self, ClientError> {
        let connect_error = |reason: String| ClientError::Connect { addr, reason };
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_error(format!("timed out after {connect_timeout:?}")))?
            .map_err(|e| connect_error(e.to_string()))?;
        stream.set_nodelay(true).map_err(|e| connect_error(e.to_string()))?;
        let (read_half, write_half) = stream.into_split();
        let pending = Arc::new(PendingReplies::default());
        let (frames, queued) = mpsc::channel(QUEUE_DEPTH);

        let writer_pending = pending.clone();
        let writer = tokio::spawn(async move {
            let outcome = run_frame_writer(write_half, queued).await;
            let reason = match outcome {
                Ok(()) => "connection closed".to_string(),
                Err(e) => format!("write failed: {e}"),
            };
            writer_pending.fail(reason);
        })
        .abort_handle();

        let reader_pending = pending.clone();
        let reader = tokio::spawn(async move {
            let mut replies = BufReader::with_capacity(READ_BUFFER, read_half);
            let reason = loop {
                match read_reply(&mut replies).await {
                    Ok(Some((header, payload))) => {
                        reader_pending.complete(Reply { header, payload });
                    }
                    Ok(None) => break "closed by the server".to_string(),
                    Err(e) => break e.to_string(),
                }
            };
            tracing::debug!(%addr, %reason, "data-plane connection ended");
            reader_pending.fail(reason);
        })
        .abort_handle();

        Ok(Connection { frames, pending, reader, writer })
    }
}

#[cfg(test)]
mod tests;
