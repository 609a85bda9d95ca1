//! The pflex storage server (SDS): stores 1 MiB chunks of volumes on local
//! devices and serves them over the binary data plane.
//!
//! - [`engine`]: the IO engines (io_uring with O_DIRECT, and plain
//!   `pread`/`pwrite`) behind one small trait;
//! - [`store`]: the [`store::ChunkStore`]: device files split into 1 MiB
//!   slots and the `sds_local.db` chunk map;
//! - [`server`]: the `sds` process: membership with the MDM, the data plane
//!   with its token checks, replication to the secondary, HTTP ports.

pub mod engine;
pub mod server;
pub mod store;
