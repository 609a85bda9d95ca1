//! IO engines: how the chunk store reaches its device files.
//!
//! Two engines sit behind one small trait, [`IoEngine`]:
//! - [`uring::UringEngine`]: the `io-uring` crate directly. Each device has
//!   its own thread with its own ring; the file is opened `O_DIRECT` and
//!   registered with the ring; requests arriving together are submitted
//!   together with one `io_uring_enter`. Callers live on the tokio runtime;
//!   they hand requests to the device thread through a channel and get the
//!   completion back through a oneshot channel, so many requests from many
//!   tasks are in flight in the ring at once. A request that finds its
//!   device idle is instead submitted by its caller into one shared ring
//!   and reaped on the caller's runtime (no thread hand-off at depth 1).
//! - [`sync::SyncEngine`]: plain `pread`/`pwrite` on a few threads per device,
//!   on a buffered file. It serves tests and filesystems without O_DIRECT.
//!
//! # Who owns a buffer
//! A read or write request *moves* its [`AlignedBuf`] into the engine. While
//! the kernel may still read from or write into that memory, the buffer is
//! owned by the engine's in-flight table and by nothing else; the caller
//! gets it back in the [`IoCompletion`], on success and on error alike.
//! If the caller stops waiting (its future is dropped, e.g. a cancelled
//! task), the engine still holds the buffer until the kernel reports the
//! completion and only then frees it (back to its pool). Nothing is ever
//! freed or reused while an operation on it is in flight, so dropping a
//! [`PendingIo`] is always safe.
//!
//! # Alignment
//! The uring engine uses O_DIRECT: offsets and lengths must be multiples of
//! [`IO_ALIGN`] and the memory aligned to it, which [`AlignedBuf`] ensures.
//! Requests that break this fail with `InvalidInput` before reaching the
//! kernel. Unaligned requests are the chunk store's job (read-modify-write).

pub mod aligned;
pub mod completion;
pub mod faults;
pub mod sync;
pub mod uring;

use std::any::Any;
use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::str::FromStr;

pub use aligned::{AlignedBuf, BufferPool, IO_ALIGN};
pub use completion::{CompletionQueue, CompletionSender, PendingIo};

/// Which IO engine a store uses (`--io-engine uring|sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EngineKind {
    /// io_uring with O_DIRECT files, one ring per device thread.
    #[default]
    Uring,
    /// Plain `pread`/`pwrite` on buffered files.
    Sync,
}

impl FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "uring" | "io_uring" => Ok(Self::Uring),
            "sync" => Ok(Self::Sync),
            other => Err(format!("unknown IO engine {other:?}; expected \"uring\" or \"sync\"")),
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Uring => "uring",
            Self::Sync => "sync",
        })
    }
}

/// What an [`IoRequest`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// Fill the buffer from the device at the offset.
    Read,
    /// Write the buffer to the device at the offset; `fua` makes it durable
    /// before it completes (`RWF_DSYNC`).
    Write { fua: bool },
    /// `fdatasync` the device; carries no buffer.
    DataSync,
}

/// One operation on one device.
#[derive(Debug)]
pub struct IoRequest {
    /// Index of the device in the list the engine was opened with.
    pub device: usize,
    pub op: IoOp,
    /// Byte offset on the device.
    pub offset: u64,
    /// The data (write) or the space to read into (read); `None` for `DataSync`.
    pub buf: Option<AlignedBuf>,
    /// Whatever must stay alive until the operation has completed, even if
    /// the caller stops waiting (a lock guard, a slot reservation). It comes
    /// back in the completion, or is dropped by the engine after completion.
    pub keep_alive: Option<KeepAlive>,
}

impl IoRequest {
    pub fn read(device: usize, offset: u64, buf: AlignedBuf) -> Self {
        Self { device, op: IoOp::Read, offset, buf: Some(buf), keep_alive: None }
    }
    pub fn write(device: usize, offset: u64, buf: AlignedBuf, fua: bool) -> Self {
        Self { device, op: IoOp::Write { fua }, offset, buf: Some(buf), keep_alive: None }
    }
    pub fn data_sync(device: usize) -> Self {
        Self { device, op: IoOp::DataSync, offset: 0, buf: None, keep_alive: None }
    }
    /// Attaches `value` to live until the operation completes.
    pub fn keeping(mut self, value: KeepAlive) -> Self {
        self.keep_alive = Some(value);
        self
    }

    /// Checks what every engine requires before anything reaches a device.
    fn validate(&self, device_count: usize, needs_alignment: bool) -> io::Result<()> {
        if self.device >= device_count {
            return Err(invalid_input(format!("no device {}", self.device)));
        }
        match (&self.op, &self.buf) {
            (IoOp::DataSync, _) => Ok(()),
            (_, None) => Err(invalid_input("read or write without a buffer".into())),
            (_, Some(buf)) => {
                if buf.len() > u32::MAX as usize {
                    return Err(invalid_input(format!("transfer of {} bytes", buf.len())));
                }
                self.offset
                    .checked_add(buf.len() as u64)
                    .ok_or_else(|| invalid_input("offset + length overflows".into()))?;
                if needs_alignment
                    && (!self.offset.is_multiple_of(IO_ALIGN as u64) || !buf.is_io_aligned())
                {
                    return Err(invalid_input(format!(
                        "O_DIRECT needs {IO_ALIGN}-byte alignment: offset {} length {}",
                        self.offset,
                        buf.len()
                    )));
                }
                Ok(())
            }
        }
    }
}

/// A value tied to an in-flight operation's lifetime (see [`IoRequest::keep_alive`]).
pub struct KeepAlive(Box<dyn Any + Send>);

impl KeepAlive {
    pub fn new(value: impl Any + Send) -> Self {
        Self(Box::new(value))
    }
    /// The value, if it is a `T`.
    pub fn downcast<T: Any>(self) -> Result<T, Self> {
        self.0.downcast::<T>().map(|value| *value).map_err(Self)
    }
}

impl fmt::Debug for KeepAlive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeepAlive(..)")
    }
}

fn invalid_input(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// The outcome of an [`IoRequest`]: `Ok` means the whole buffer was
/// transferred. The request's buffer comes back in `buf` either way.
#[derive(Debug)]
pub struct IoCompletion {
    pub buf: Option<AlignedBuf>,
    pub result: io::Result<()>,
    /// The request's [`IoRequest::keep_alive`], handed back.
    pub keep_alive: Option<KeepAlive>,
}

impl IoCompletion {
    /// The completion of `request` with `result`.
    pub fn of(request: IoRequest, result: io::Result<()>) -> Self {
        Self { buf: request.buf, result, keep_alive: request.keep_alive }
    }
    /// The completion of a request that never reached a device.
    pub fn failed(request: IoRequest, error: io::Error) -> Self {
        Self::of(request, Err(error))
    }
}

/// What an engine opens: one device file (or block device) per entry.
#[derive(Debug, Clone)]
pub struct DeviceFile {
    pub path: PathBuf,
}

/// The small interface every IO engine offers.
pub trait IoEngine: Send + Sync {
    fn kind(&self) -> EngineKind;
    /// Queues `request`; the returned future resolves once it has completed.
    /// The request (and its buffer) belongs to the engine until then.
    fn submit(&self, request: IoRequest) -> PendingIo;
    fn device_count(&self) -> usize;
    /// The file descriptor the engine does its IO through (for diagnostics
    /// and tests, e.g. to check the O_DIRECT flag).
    fn device_fd(&self, device: usize) -> Option<RawFd>;
    /// The most operations one device has had in flight at once since the
    /// engine was opened (shows whether queue depth reaches the kernel).
    fn in_flight_peak(&self) -> usize;
}

/// Opens an engine of `kind` over `devices` (which must already exist with
/// their final size).
pub fn open_engine(kind: EngineKind, devices: &[DeviceFile]) -> io::Result<Box<dyn IoEngine>> {
    open_engine_with(kind, devices, uring::UringConfig::default())
}

/// [`open_engine`] with tuning for the uring engine (ignored by the sync engine).
pub fn open_engine_with(
    kind: EngineKind,
    devices: &[DeviceFile],
    uring: uring::UringConfig,
) -> io::Result<Box<dyn IoEngine>> {
    Ok(match kind {
        EngineKind::Uring => Box::new(uring::UringEngine::open(devices, uring)?),
        EngineKind::Sync => Box::new(sync::SyncEngine::open(devices, sync::DEFAULT_THREADS)?),
    })
}
