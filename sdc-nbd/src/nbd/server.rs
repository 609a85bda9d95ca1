//! The NBD server: handshake, then concurrent request execution.
//!
//! One task per connection negotiates (fixed newstyle, see
//! [`super::proto`]) and then becomes the *reader*: it reads requests
//! continuously, reads WRITE payloads, and spawns one task per request. The
//! request tasks run against the [`VolumeIo`] concurrently and hand their
//! encoded replies to the connection's single *writer* task, so replies go
//! out in completion order, never interleaved.
//!
//! Back-pressure: a connection holds at most
//! [`ServerConfig::max_in_flight_requests`] requests and
//! [`ServerConfig::max_in_flight_bytes`] of READ/WRITE payload at once,
//! counted from the moment the request is read until its reply is written;
//! the reader stops reading the socket until a reply has gone out, so
//! memory stays bounded whatever the client sends (or fails to read).
//!
//! Limits: at most [`ServerConfig::max_handshakes`] connections may be in
//! the handshake at once (a new one evicts the one waiting longest, so idle
//! sockets cannot lock clients out), each has [`ServerConfig::handshake_timeout`]
//! to finish it, then at most [`ServerConfig::max_connections`] sessions are
//! served; all sessions together hold at most
//! [`ServerConfig::max_total_in_flight_bytes`] of payload, and a WRITE payload
//! must arrive within [`ServerConfig::payload_timeout`].
//!
//! TLS (the NBD spec's "TLS" section): with [`ServerConfig::tls`] set the
//! server accepts `NBD_OPT_STARTTLS`, answers it, runs the TLS handshake
//! (client certificates from the cluster CA required) and negotiates again
//! over TLS, forgetting what was negotiated before. When TLS is *required*
//! every option but STARTTLS and ABORT is refused with `NBD_REP_ERR_TLS_REQD`
//! until then, and an `NBD_OPT_EXPORT_NAME` (which has no error reply) closes
//! the connection: no export is listed, described or served in the clear.
//! The decision is [`tls_gate`], a pure function.
//!
//! Failure scope: anything that breaks the framing (bad magic, unknown
//! client flags, a stream that ends mid-request) closes that connection and
//! nothing else. Bad requests that can still be framed (out of range, bad
//! flags, too large) are answered with an error and the connection goes on.
//! On `NBD_CMD_DISC` (or EOF) the reader stops, in-flight requests finish
//! and are answered, then the socket closes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::proto::{self, cmd_flags, opt, rep, tx_flags, ClientOption, Command, Errno, Request};
use crate::backend::{BackendError, BlockBackend, ExportInfo, Extent, VolumeIo, ZeroFlags};
use crate::metrics::NbdStats;

/// The id this server gives `base:allocation` in SET_META_CONTEXT replies.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Option data larger than this closes the connection (nothing legitimate
/// comes close: names and queries are at most 4 KiB each).
const MAX_OPTION_DATA: u32 = 1 << 20;
/// Most options one handshake may send, so a client cannot loop forever.
const MAX_OPTIONS: u32 = 10_000;
/// Accounting unit of the in-flight byte budget.
const BUDGET_UNIT: usize = 4096;

/// Tunables of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub max_in_flight_requests: usize,
    /// Must be at least the maximum payload (32 MiB).
    pub max_in_flight_bytes: usize,
    /// The whole handshake must finish within this.
    pub handshake_timeout: Duration,
    /// Sessions (past the handshake) served at once; more are closed.
    pub max_connections: usize,
    /// Connections in the handshake at once; a new one evicts the oldest.
    pub max_handshakes: usize,
    /// Payload bytes every session together may hold (the SDC's memory cap
    /// for client data); at least one maximum payload.
    pub max_total_in_flight_bytes: usize,
    /// A WRITE's payload must arrive within this once its header has.
    pub payload_timeout: Duration,
    /// TLS, when this server offers it.
    pub tls: Option<NbdTls>,
}

/// TLS on the NBD server.
#[derive(Clone)]
pub struct NbdTls {
    /// Presents the SDC's certificate and requires a client certificate
    /// issued by the cluster CA.
    pub acceptor: pflex_tls::TlsAcceptor,
    /// Refuse everything but STARTTLS before TLS is on.
    pub required: bool,
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdTls").field("required", &self.required).finish_non_exhaustive()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_in_flight_requests: 256,
            max_in_flight_bytes: 128 << 20,
            handshake_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_handshakes: 64,
            max_total_in_flight_bytes: 512 << 20,
            payload_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(#[from] proto::ProtocolError),
    #[error("option data of {0} bytes is too large")]
    OptionTooLarge(u32),
    #[error("too many options")]
    TooManyOptions,
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("closed in the handshake to make room for a newer connection")]
    HandshakeEvicted,
    #[error("too many sessions")]
    TooManySessions,
    #[error("a WRITE payload did not arrive in time")]
    PayloadTimeout,
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("NBD_OPT_EXPORT_NAME without TLS on a server that requires TLS")]
    TlsRequired,
}

/// The connection's stream: plain until a STARTTLS, then TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<pflex_tls::ServerTlsStream<TcpStream>>),
}

/// The NBD server over one backend.
pub struct NbdServer<B: BlockBackend> {
    backend: Arc<B>,
    config: ServerConfig,
    stats: Arc<NbdStats>,
    handshakes: pflex_dataplane::Slots,
    sessions: Arc<Semaphore>,
    /// Payload units (of [`BUDGET_UNIT`]) all sessions may hold together.
    total_bytes: Arc<Semaphore>,
}

impl<B: BlockBackend> NbdServer<B> {
    pub fn new(backend: Arc<B>, config: ServerConfig, stats: Arc<NbdStats>) -> Arc<Self> {
        let handshakes = pflex_dataplane::Slots::new(config.max_handshakes);
        let sessions = Arc::new(Semaphore::new(config.max_connections.max(1)));
        let total_units = (config.max_total_in_flight_bytes / BUDGET_UNIT)
            .max(proto::BLOCK_SIZES.maximum as usize / BUDGET_UNIT)
            .min(Semaphore::MAX_PERMITS);
        let total_bytes = Arc::new(Semaphore::new(total_units));
        Arc::new(Self { backend, config, stats, handshakes, sessions, total_bytes })
    }

    pub fn stats(&self) -> &Arc<NbdStats> {
        &self.stats
    }

    /// Accepts connections until the listener fails for good.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let server = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = server.handle_connection(stream).await {
                            tracing::debug!(%peer, error = %e, "NBD connection closed");
                        }
                    });
                }
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Serves one client connection from greeting to close.
    pub async fn handle_connection(
        self: Arc<Self>,
        stream: TcpStream,
    ) -> Result<(), ConnectionError> {
        let _ = stream.set_nodelay(true);
        self.stats.connections_total.fetch_add(1, Ordering::Relaxed);
        self.stats.connections_active.fetch_add(1, Ordering::Relaxed);
        let _active = ActiveGuard(self.stats.clone());
        let mut handshake_slot = self.handshakes.admit();
        let negotiated = tokio::select! {
            outcome = tokio::time::timeout(
                self.config.handshake_timeout,
                self.handshake(stream),
            ) => outcome.map_err(|_| ConnectionError::HandshakeTimeout).and_then(|r| r),
            _ = &mut handshake_slot.evicted => {
                self.stats.handshakes_evicted.fetch_add(1, Ordering::Relaxed);
                Err(ConnectionError::HandshakeEvicted)
            }
        };
        drop(handshake_slot);
        let (conn, session) = match negotiated {
            Ok(Some(done)) => done,
            Ok(None) => return Ok(()),
            Err(e) => {
                self.stats.handshakes_failed.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        let Ok(_session_slot) = self.sessions.clone().try_acquire_owned() else {
            self.stats.sessions_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("too many NBD sessions; closing a new one");
            return Err(ConnectionError::TooManySessions);
        };
        tracing::debug!(export = %session.info.name, structured = session.limits.structured_replies,
                        tls = matches!(conn, Conn::Tls(_)), "NBD transmission phase");
        match conn {
            Conn::Plain(stream) => {
                let (read_half, write_half) = stream.into_split();
                self.transmission(read_half, write_half, session).await
            }
            Conn::Tls(stream) => {
                let (read_half, write_half) = tokio::io::split(*stream);
                self.transmission(read_half, write_half, session).await
            }
        }
    }

    /// Greeting, option haggling and, if the client asks, the switch to
    /// TLS; the session, or `None` if the client left without one.
    async fn handshake(
        &self,
        mut stream: TcpStream,
    ) -> Result<Option<(Conn, Session<B::Volume>)>, ConnectionError> {
        stream.write_all(&proto::greeting()).await?;
        let mut flags = [0u8; 4];
        stream.read_exact(&mut flags).await?;
        let client = proto::parse_client_flags(&flags)?;
        let mut phase = TlsPhase {
            offered: self.config.tls.is_some(),
            required: self.config.tls.as_ref().is_some_and(|t| t.required),
            active: false,
        };
        match negotiate(&mut stream, &*self.backend, client, phase, &self.stats).await? {
            Negotiated::Session(session) => return Ok(Some((Conn::Plain(stream), session))),
            Negotiated::Closed => return Ok(None),
            Negotiated::StartTls => {}
        }
        let Some(tls) = &self.config.tls else { return Err(ConnectionError::TlsRequired) };
        let mut stream = tls.acceptor.accept(stream).await.map_err(ConnectionError::Tls)?;
        self.stats.tls_sessions.fetch_add(1, Ordering::Relaxed);
        phase.active = true;
        // Everything negotiated in the clear is forgotten (a fresh state).
        match negotiate(&mut stream, &*self.backend, client, phase, &self.stats).await? {
            Negotiated::Session(session) => Ok(Some((Conn::Tls(Box::new(stream)), session))),
            Negotiated::Closed => Ok(None),
            Negotiated::StartTls => Err(ConnectionError::TooManyOptions),
        }
    }

    async fn transmission<R, W>(
        &self,
        read_half: R,
        write_half: W,
        session: Session<B::Volume>,
    ) -> Result<(), ConnectionError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut reader = BufReader::with_capacity(128 * 1024, read_half);
        let (tx, rx) = mpsc::unbounded_channel::<ReplyFrame>();
        // Requests executing on this connection (decremented just before
        // their reply is queued), so the writer knows whether to wait for more.
        let executing = Arc::new(AtomicUsize::new(0));
        let writer = tokio::spawn(write_replies(write_half, rx, executing.clone()));
        let session = Arc::new(session);
        let requests = Arc::new(Semaphore::new(self.config.max_in_flight_requests.max(1)));
        let budget_units = (self.config.max_in_flight_bytes / BUDGET_UNIT)
            .max(proto::BLOCK_SIZES.maximum as usize / BUDGET_UNIT)
            .min(Semaphore::MAX_PERMITS);
        let bytes = Arc::new(Semaphore::new(budget_units));

        let result: Result<(), ConnectionError> = loop {
            let mut header = [0u8; proto::REQUEST_LEN];
            match reader.read_exact(&mut header).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(e.into()),
            }
            let request = match proto::parse_request(&header) {
                Ok(r) => r,
                Err(e) => {
                    self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    break Err(e.into());
                }
            };
            if request.command == Command::Disc {
                break Ok(());
            }
            let Ok(request_permit) = requests.clone().acquire_owned().await else {
                break Ok(());
            };
            let units = payload_units(&request);
            let Ok(byte_permit) = bytes.clone().acquire_many_owned(units).await else {
                break Ok(());
            };
            let Ok(total_permit) = self.total_bytes.clone().acquire_many_owned(units).await else {
                break Ok(());
            };
            let mut payload = Bytes::new();
            if request.command == Command::Write {
                if request.length > session.limits.max_payload {
                    // Too large to buffer: drain it and let validation answer EINVAL.
                    let mut limited = (&mut reader).take(u64::from(request.length));
                    match tokio::io::copy(&mut limited, &mut tokio::io::sink()).await {
                        Ok(n) if n == u64::from(request.length) => {}
                        Ok(_) => {
                            self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                            break Ok(());
                        }
                        Err(e) => break Err(e.into()),
                    }
                } else {
                    let read = tokio::time::timeout(
                        self.config.payload_timeout,
                        read_payload(&mut reader, request.length as usize),
                    )
                    .await;
                    match read {
                        Ok(Ok(p)) => payload = p,
                        Ok(Err(e)) => {
                            self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                            break Err(e.into());
                        }
                        Err(_) => {
                            self.stats.payload_timeouts.fetch_add(1, Ordering::Relaxed);
                            break Err(ConnectionError::PayloadTimeout);
                        }
                    }
                }
            }
            let tx = tx.clone();
            let session = session.clone();
            let stats = self.stats.clone();
            stats.requests_in_flight.fetch_add(1, Ordering::Relaxed);
            executing.fetch_add(1, Ordering::Relaxed);
            let executing = executing.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let (frame, ok) = execute(&session, &request, payload).await;
                if let Some(c) = stats.command(request.command) {
                    let moved = match request.command {
                        Command::Read | Command::Write => u64::from(request.length),
                        _ => 0,
                    };
                    c.record(moved, ok, started.elapsed());
                }
                executing.fetch_sub(1, Ordering::Relaxed);
                stats.requests_in_flight.fetch_sub(1, Ordering::Relaxed);
                // The permits travel with the reply and are released once it
                // is written: a client that stops reading replies stops the
                // reader too, instead of piling replies up in memory.
                let _ = tx.send(ReplyFrame {
                    _permits: Some((request_permit, byte_permit, total_permit)),
                    ..frame
                });
            });
        };
        // Let every in-flight request finish and be answered, then close.
        drop(tx);
        match writer.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "NBD reply writer stopped"),
            Err(e) => tracing::warn!(error = %e, "NBD reply writer panicked"),
        }
        result
    }
}

/// Reads exactly `len` payload bytes into a fresh buffer (not zeroed first).
async fn read_payload<R: AsyncRead + Unpin>(reader: &mut R, len: usize) -> std::io::Result<Bytes> {
    let mut buf = bytes::BytesMut::with_capacity(len);
    while buf.len() < len {
        let want = (len - buf.len()) as u64;
        if (&mut *reader).take(want).read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}

struct ActiveGuard(Arc<NbdStats>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Budget units a request holds while in flight: its payload either way.
fn payload_units(r: &Request) -> u32 {
    let len = match r.command {
        Command::Read | Command::Write => (r.length.min(proto::BLOCK_SIZES.maximum)) as usize,
        _ => 0,
    };
    (len.div_ceil(BUDGET_UNIT).max(1)) as u32
}

/// What a connection negotiated.
struct Session<V> {
    volume: Arc<V>,
    info: ExportInfo,
    limits: proto::SessionLimits,
}

/// Transmission flags of an export.
pub fn transmission_flags(info: &ExportInfo, structured: bool) -> u16 {
    let mut f = tx_flags::HAS_FLAGS
        | tx_flags::SEND_FLUSH
        | tx_flags::SEND_CACHE
        | tx_flags::CAN_MULTI_CONN;
    if info.read_only {
        f |= tx_flags::READ_ONLY;
    } else {
        f |= tx_flags::SEND_FUA
            | tx_flags::SEND_TRIM
            | tx_flags::SEND_WRITE_ZEROES
            | tx_flags::SEND_FAST_ZERO;
    }
    if structured {
        f |= tx_flags::SEND_DF;
    }
    f
}

/// Handshake state between options.
#[derive(Default)]
struct Negotiation {
    structured: bool,
    /// Export name of the last SET_META_CONTEXT that selected `base:allocation`.
    meta_export: Option<String>,
}

/// Runs option haggling. `Ok(None)` when the client aborted or asked for
/// an export that does not exist with EXPORT_NAME (which has no error reply).
/// Where a connection stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsPhase {
    /// The server can start TLS.
    pub offered: bool,
    /// The server serves nothing before TLS.
    pub required: bool,
    /// TLS is on.
    pub active: bool,
}

/// What to do with an option, as far as TLS is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsGate {
    /// Handle it as usual.
    Proceed,
    /// Answer with this error reply (type, message) and go on.
    Refuse(u32, &'static str),
    /// Close the connection (an EXPORT_NAME has no error reply).
    Close,
    /// Acknowledge, then run the TLS handshake.
    StartTls,
}

/// Decides an option under the spec's TLS rules.
pub fn tls_gate(phase: TlsPhase, option: &ClientOption) -> TlsGate {
    match option {
        ClientOption::StartTls if phase.active => {
            TlsGate::Refuse(rep::ERR_INVALID, "TLS is already on")
        }
        ClientOption::StartTls if !phase.offered => {
            TlsGate::Refuse(rep::ERR_POLICY, "TLS is not available on this server")
        }
        ClientOption::StartTls => TlsGate::StartTls,
        _ if phase.active || !phase.required => TlsGate::Proceed,
        ClientOption::Abort => TlsGate::Proceed,
        ClientOption::ExportName(_) => TlsGate::Close,
        _ => TlsGate::Refuse(rep::ERR_TLS_REQD, "this server requires TLS: send NBD_OPT_STARTTLS"),
    }
}

/// How one round of option haggling ended.
enum Negotiated<V> {
    Session(Session<V>),
    /// The client left (ABORT, or an unknown EXPORT_NAME).
    Closed,
    /// STARTTLS was acknowledged: the TLS handshake comes next.
    StartTls,
}

async fn negotiate<S, B>(
    stream: &mut S,
    backend: &B,
    client: proto::ClientFlags,
    tls: TlsPhase,
    stats: &NbdStats,
) -> Result<Negotiated<B::Volume>, ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: BlockBackend,
{
    let mut state = Negotiation::default();
    for _ in 0..MAX_OPTIONS {
        let mut header = [0u8; proto::OPTION_HEADER_LEN];
        stream.read_exact(&mut header).await?;
        let header = proto::parse_option_header(&header)?;
        if header.length > MAX_OPTION_DATA {
            return Err(ConnectionError::OptionTooLarge(header.length));
        }
        let mut data = vec![0u8; header.length as usize];
        stream.read_exact(&mut data).await?;
        let option = header.option;
        let parsed = match proto::parse_option(option, &data) {
            Ok(o) => o,
            Err(e) => {
                let msg = e.to_string();
                stream
                    .write_all(&proto::option_reply(option, e.reply_type(), msg.as_bytes()))
                    .await?;
                continue;
            }
        };
        match tls_gate(tls, &parsed) {
            TlsGate::Proceed => {}
            TlsGate::Refuse(reply, message) => {
                if reply == rep::ERR_TLS_REQD {
                    stats.tls_required_refusals.fetch_add(1, Ordering::Relaxed);
                }
                stream.write_all(&proto::option_reply(option, reply, message.as_bytes())).await?;
                continue;
            }
            TlsGate::Close => {
                stats.tls_required_refusals.fetch_add(1, Ordering::Relaxed);
                return Err(ConnectionError::TlsRequired);
            }
            TlsGate::StartTls => {
                stream.write_all(&proto::option_reply(option, rep::ACK, &[])).await?;
                stream.flush().await?;
                return Ok(Negotiated::StartTls);
            }
        }
        match parsed {
            ClientOption::ExportName(name) => {
                let Some(volume) = backend.open(&name).await else {
                    tracing::debug!(%name, "EXPORT_NAME for an unknown export");
                    return Ok(Negotiated::Closed);
                };
                let info = volume.info();
                let flags = transmission_flags(&info, state.structured);
                stream
                    .write_all(&proto::export_name_reply(info.size, flags, client.no_zeroes))
                    .await?;
                let block_status = state.meta_export.as_deref() == Some(info.name.as_str())
                    || (state.meta_export.as_deref() == Some(name.as_str()));
                return Ok(Negotiated::Session(new_session(
                    volume,
                    info,
                    state.structured,
                    block_status,
                )));
            }
            ClientOption::Abort => {
                // The client may already have closed; the ACK is a courtesy.
                let _ = stream.write_all(&proto::option_reply(option, rep::ACK, &[])).await;
                return Ok(Negotiated::Closed);
            }
            ClientOption::List => {
                let mut out = Vec::new();
                for e in backend.list().await {
                    out.extend(proto::option_reply(
                        option,
                        rep::SERVER,
                        &proto::rep_server_data(&e.name, &e.description),
                    ));
                }
                out.extend(proto::option_reply(option, rep::ACK, &[]));
                stream.write_all(&out).await?;
            }
            // Answered by `tls_gate` above, never handled here.
            ClientOption::StartTls => {}
            ClientOption::StructuredReply => {
                state.structured = true;
                stream.write_all(&proto::option_reply(option, rep::ACK, &[])).await?;
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let go = option == opt::GO;
                let Some(volume) = backend.open(&req.export).await else {
                    let msg = format!("no export named {:?}", req.export);
                    stream
                        .write_all(&proto::option_reply(option, rep::ERR_UNKNOWN, msg.as_bytes()))
                        .await?;
                    continue;
                };
                let info = volume.info();
                let flags = transmission_flags(&info, state.structured);
                let mut out =
                    proto::option_reply(option, rep::INFO, &proto::info_export(info.size, flags));
                if req.requests.contains(&proto::info::NAME) {
                    out.extend(proto::option_reply(
                        option,
                        rep::INFO,
                        &proto::info_string(proto::info::NAME, &info.name),
                    ));
                }
                if req.requests.contains(&proto::info::DESCRIPTION) && !info.description.is_empty()
                {
                    out.extend(proto::option_reply(
                        option,
                        rep::INFO,
                        &proto::info_string(proto::info::DESCRIPTION, &info.description),
                    ));
                }
                out.extend(proto::option_reply(
                    option,
                    rep::INFO,
                    &proto::info_block_size(proto::BLOCK_SIZES),
                ));
                out.extend(proto::option_reply(option, rep::ACK, &[]));
                stream.write_all(&out).await?;
                if go {
                    let block_status = matches!(state.meta_export.as_deref(),
                        Some(m) if m == req.export || m == info.name);
                    return Ok(Negotiated::Session(new_session(
                        volume,
                        info,
                        state.structured,
                        block_status,
                    )));
                }
            }
            ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
                let listing = option == opt::LIST_META_CONTEXT;
                if !listing {
                    // SET replaces the selection even when it fails.
                    state.meta_export = None;
                }
                if !state.structured {
                    stream
                        .write_all(&proto::option_reply(
                            option,
                            rep::ERR_INVALID,
                            b"negotiate structured replies first",
                        ))
                        .await?;
                    continue;
                }
                if backend.open(&req.export).await.is_none() {
                    let msg = format!("no export named {:?}", req.export);
                    stream
                        .write_all(&proto::option_reply(option, rep::ERR_UNKNOWN, msg.as_bytes()))
                        .await?;
                    continue;
                }
                let selected = if listing && req.queries.is_empty() {
                    true
                } else {
                    req.queries.iter().any(|q| proto::query_selects_base_allocation(q, listing))
                };
                let mut out = Vec::new();
                if selected {
                    let id = if listing { 0 } else { BASE_ALLOCATION_ID };
                    out.extend(proto::option_reply(
                        option,
                        rep::META_CONTEXT,
                        &proto::meta_context_data(id, proto::BASE_ALLOCATION),
                    ));
                    if !listing {
                        state.meta_export = Some(req.export.clone());
                    }
                }
                out.extend(proto::option_reply(option, rep::ACK, &[]));
                stream.write_all(&out).await?;
            }
            ClientOption::Unsupported(code) => {
                let msg = format!("option {code} is not supported");
                stream
                    .write_all(&proto::option_reply(option, rep::ERR_UNSUP, msg.as_bytes()))
                    .await?;
            }
        }
    }
    Err(ConnectionError::TooManyOptions)
}

fn new_session<V: VolumeIo>(
    volume: Arc<V>,
    info: ExportInfo,
    structured: bool,
    block_status: bool,
) -> Session<V> {
    let limits = proto::SessionLimits {
        export_size: info.size,
        read_only: info.read_only,
        structured_replies: structured,
        block_status: structured && block_status,
        max_payload: proto::BLOCK_SIZES.maximum,
    };
    Session { volume, info, limits }
}

/// One encoded reply: a header (whole message for most replies) and,
/// for READ, the data that follows it.
struct ReplyFrame {
    head: Head,
    data: Bytes,
    /// The request's share of the connection's and the server's in-flight budgets.
    _permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

/// Reply headers up to an OFFSET_DATA header are kept inline: no
/// allocation for the replies of READ, WRITE and the other common commands.
enum Head {
    Inline { bytes: [u8; proto::OFFSET_DATA_HEADER_LEN], len: usize },
    Heap(Vec<u8>),
}

impl Head {
    fn as_slice(&self) -> &[u8] {
        match self {
            Head::Inline { bytes, len } => &bytes[..*len],
            Head::Heap(v) => v,
        }
    }
}

impl ReplyFrame {
    /// A reply whose header is `head`, followed by `data`.
    fn new(head: &[u8], data: Bytes) -> Self {
        let head = if head.len() <= proto::OFFSET_DATA_HEADER_LEN {
            let mut bytes = [0u8; proto::OFFSET_DATA_HEADER_LEN];
            bytes[..head.len()].copy_from_slice(head);
            Head::Inline { bytes, len: head.len() }
        } else {
            Head::Heap(head.to_vec())
        };
        Self { head, data, _permits: None }
    }

    /// A reply that is all header (no READ data).
    fn head(head: impl AsRef<[u8]>) -> Self {
        Self::new(head.as_ref(), Bytes::new())
    }
}

/// Writes replies in the order they complete; batches what is queued
/// into one flush.
async fn write_replies<W: AsyncWrite + Unpin>(
    write_half: W,
    mut rx: mpsc::UnboundedReceiver<ReplyFrame>,
    in_flight: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(256 * 1024, write_half);
    while let Some(frame) = rx.recv().await {
        write_frame(&mut w, &frame).await?;
        while let Ok(frame) = rx.try_recv() {
            write_frame(&mut w, &frame).await?;
        }
        if in_flight.load(Ordering::Relaxed) > 0 {
            // More replies are coming: let their tasks run once so one
            // send carries several replies.
            tokio::task::yield_now().await;
            while let Ok(frame) = rx.try_recv() {
                write_frame(&mut w, &frame).await?;
            }
        }
        w.flush().await?;
    }
    w.shutdown().await
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &ReplyFrame) -> std::io::Result<()> {
    w.write_all(frame.head.as_slice()).await?;
    if !frame.data.is_empty() {
        w.write_all(&frame.data).await?;
    }
    Ok(())
}

/// The error reply for a request: an ERROR chunk where a structured reply
/// is mandatory (READ, BLOCK_STATUS), a simple reply otherwise.
fn error_frame<V>(session: &Session<V>, req: &Request, errno: Errno, message: &str) -> ReplyFrame {
    let structured_required = matches!(req.command, Command::Read | Command::BlockStatus);
    if session.limits.structured_replies && structured_required {
        ReplyFrame::head(proto::error_chunk(req.cookie, errno, message))
    } else {
        ReplyFrame::head(proto::simple_reply(req.cookie, errno as u32))
    }
}

fn ok_frame(req: &Request) -> ReplyFrame {
    ReplyFrame::head(proto::simple_reply(req.cookie, 0))
}

/// Runs one request against the volume and encodes its reply. The bool
/// says whether it succeeded (for the statistics).
async fn execute<V: VolumeIo>(
    session: &Session<V>,
    req: &Request,
    payload: Bytes,
) -> (ReplyFrame, bool) {
    if let Err(errno) = proto::validate_request(req, &session.limits) {
        return (error_frame(session, req, errno, "invalid request"), false);
    }
    let volume = &session.volume;
    let fua = req.has_flag(cmd_flags::FUA);
    let offset = req.offset;
    let length = u64::from(req.length);
    let result: Result<ReplyFrame, BackendError> = match req.command {
        Command::Read => match volume.read(offset, req.length).await {
            Ok(data) if data.len() == req.length as usize => {
                Ok(if session.limits.structured_replies {
                    let head = proto::offset_data_header(req.cookie, true, offset, req.length);
                    ReplyFrame::new(&head, data)
                } else {
                    ReplyFrame::new(&proto::simple_reply(req.cookie, 0), data)
                })
            }
            Ok(data) => Err(BackendError::Io(format!(
                "backend returned {} bytes for a {}-byte read",
                data.len(),
                req.length
            ))),
            Err(e) => Err(e),
        },
        Command::Write => volume.write(offset, payload, fua).await.map(|()| ok_frame(req)),
        Command::Flush => volume.flush().await.map(|()| ok_frame(req)),
        Command::Trim => volume.trim(offset, length, fua).await.map(|()| ok_frame(req)),
        Command::WriteZeroes => {
            let flags = ZeroFlags {
                no_hole: req.has_flag(cmd_flags::NO_HOLE),
                fua,
                fast: req.has_flag(cmd_flags::FAST_ZERO),
            };
            volume.write_zeroes(offset, length, flags).await.map(|()| ok_frame(req))
        }
        Command::Cache => volume.cache(offset, length).await.map(|()| ok_frame(req)),
        Command::BlockStatus => volume.block_status(offset, length).await.and_then(|extents| {
            let descriptors = descriptors_for(&extents, length, req.has_flag(cmd_flags::REQ_ONE));
            if descriptors.is_empty() {
                return Err(BackendError::Io("no allocation information".into()));
            }
            Ok(ReplyFrame::head(proto::block_status_chunk(
                req.cookie,
                BASE_ALLOCATION_ID,
                &descriptors,
            )))
        }),
        Command::Disc | Command::Unsupported(_) => Err(BackendError::Invalid("unsupported".into())),
    };
    match result {
        Ok(frame) => (frame, true),
        Err(e) => {
            tracing::debug!(cmd = req.command.name(), offset, length, error = %e, "NBD request failed");
            (error_frame(session, req, e.errno(), &e.to_string()), false)
        }
    }
}

/// Turns backend extents into `base:allocation` descriptors covering at
/// most `length` bytes, merging neighbours of equal state; only the first
/// with REQ_ONE.
pub fn descriptors_for(extents: &[Extent], length: u64, req_one: bool) -> Vec<proto::Descriptor> {
    let mut out: Vec<proto::Descriptor> = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        if covered >= length {
            break;
        }
        let len = e.length.min(length - covered);
        if len == 0 {
            continue;
        }
        covered += len;
        let status = if e.hole { proto::allocation::HOLE | proto::allocation::ZERO } else { 0 };
        match out.last_mut() {
            Some(last)
                if last.status == status && u64::from(last.length) + len <= u64::from(u32::MAX) =>
            {
                last.length += len as u32;
            }
            _ => out.push(proto::Descriptor { length: len as u32, status }),
        }
    }
    if req_one {
        out.truncate(1);
    }
    out
}

#[cfg(test)]
mod tests;
