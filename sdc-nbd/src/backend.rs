//! The storage interface the NBD server runs over.
//!
//! [`BlockBackend`] lists and opens exports; [`VolumeIo`] does the IO of
//! one opened export. The NBD server ([`crate::nbd::server`]) knows nothing
//! of chunks, placement or tokens: the cluster implementation
//! ([`crate::cluster`]) does, and [`crate::memory`] is a sparse in-memory
//! implementation for protocol tests.
//!
//! Offsets and lengths reaching a `VolumeIo` have been checked against the
//! export size by the server already; implementations may still refuse
//! with [`BackendError::Invalid`].

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use crate::nbd::proto::Errno;

/// What the server advertises for one export.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
}

/// A run of bytes with one allocation state, as answered to BLOCK_STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Never written (or trimmed): reads as zeroes and holds no storage.
    pub hole: bool,
}

/// Options of a WRITE_ZEROES request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroFlags {
    /// The range must stay allocated (no hole may be punched).
    pub no_hole: bool,
    /// Durable before the reply.
    pub fua: bool,
    /// Fail with [`BackendError::NotFast`] unless zeroing is cheaper than writing.
    pub fast: bool,
}

/// Why an IO failed; each maps to one NBD error value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("no space left")]
    NoSpace,
    #[error("export is read-only")]
    ReadOnly,
    #[error("zeroing this range is not faster than writing it")]
    NotFast,
    #[error("IO error: {0}")]
    Io(String),
    #[error("shutting down")]
    Shutdown,
}

impl BackendError {
    pub fn errno(&self) -> Errno {
        match self {
            BackendError::Invalid(_) => Errno::Inval,
            BackendError::NoSpace => Errno::NoSpc,
            BackendError::ReadOnly => Errno::Perm,
            BackendError::NotFast => Errno::NotSup,
            BackendError::Io(_) => Errno::Io,
            BackendError::Shutdown => Errno::Shutdown,
        }
    }
}

/// The set of exports.
pub trait BlockBackend: Send + Sync + 'static {
    type Volume: VolumeIo;

    /// Every export a client may open, for `NBD_OPT_LIST`.
    fn list(&self) -> impl Future<Output = Vec<ExportInfo>> + Send;

    /// Opens an export by name; `""` is the default export. `None` if no
    /// such export exists (after the backend had a chance to refresh).
    fn open(&self, name: &str) -> impl Future<Output = Option<Arc<Self::Volume>>> + Send;
}

/// IO on one opened export.
pub trait VolumeIo: Send + Sync + 'static {
    /// The export as it was when opened (size and mode are fixed for the
    /// lifetime of an NBD connection).
    fn info(&self) -> ExportInfo;

    /// Reads exactly `length` bytes.
    fn read(
        &self,
        offset: u64,
        length: u32,
    ) -> impl Future<Output = Result<Bytes, BackendError>> + Send;

    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Makes every write acknowledged so far durable.
    fn flush(&self) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Deallocates a range; it reads back as zeroes.
    fn trim(
        &self,
        offset: u64,
        length: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        flags: ZeroFlags,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// A hint that the range will be read soon. There is no cache on this
    /// side, so the default does nothing.
    fn cache(
        &self,
        _offset: u64,
        _length: u64,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        async { Ok(()) }
    }

    /// Allocation state from `offset` on, covering at least one byte and at
    /// most `length` bytes (the server clips whatever comes back).
    fn block_status(
        &self,
        offset: u64,
        length: u64,
    ) -> impl Future<Output = Result<Vec<Extent>, BackendError>> + Send;
}
