//! The pflex SDC (storage data client).
//!
//! It exposes each volume mapped to this SDC as an NBD export, so real
//! clients (the kernel's `nbd-client`, qemu, libnbd tools, fio) use pflex
//! volumes, and turns every NBD request into data-plane operations on the
//! SDS nodes that hold the volume's chunks.
//!
//! - [`nbd`]: the NBD protocol ([`nbd::proto`], pure) and server ([`nbd::server`]);
//! - [`backend`]: the [`backend::BlockBackend`] trait between the two halves;
//! - [`memory`]: an in-memory backend for protocol tests;
//! - [`metrics`]: counters and Prometheus text.

pub mod backend;
pub mod memory;
pub mod metrics;
pub mod nbd;
