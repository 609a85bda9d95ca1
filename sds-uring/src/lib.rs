//! The pflex storage server (SDS): stores 1 MiB chunks of volumes on local
//! devices and serves them over the binary data plane.
//!
//! - [`engine`]: the IO engines (io_uring with O_DIRECT, and plain
//!   `pread`/`pwrite`) behind one small trait;
//! - [`store`]: the [`store::ChunkStore`]: device files split into 1 MiB
//!   slots and the `sds_local.db` chunk map.

pub mod engine;
pub mod store;
