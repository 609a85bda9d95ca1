//! The pflex SDC (storage data client).
//!
//! It exposes each volume mapped to this SDC as an NBD export, so real
//! clients (the kernel's `nbd-client`, qemu, libnbd tools, fio) use pflex
//! volumes, and turns every NBD request into data-plane operations on the
//! SDS nodes that hold the volume's chunks.
//!
//! - [`nbd`]: the NBD protocol ([`nbd::proto`], pure) and server ([`nbd::server`]);
//! - [`backend`]: the [`backend::BlockBackend`] trait between the two halves;
//! - [`cluster`]: the backend over the cluster (mappings, placement,
//!   tokens, chunk IO to the SDS primaries);
//! - [`agent`]: registration, heartbeats, token renewal, completion acks;
//! - [`state_db`]: the SDC's own SQLite files;
//! - [`http`]: the mgmt (`/health`, `/metrics`) and control (`/volumes`) ports;
//! - [`app`]: command line and process wiring of the `sdc` binary;
//! - [`memory`]: an in-memory backend for protocol tests;
//! - [`metrics`]: counters and Prometheus text.

pub mod agent;
pub mod app;
pub mod backend;
pub mod cluster;
pub mod http;
pub mod memory;
pub mod metrics;
pub mod nbd;
pub mod state_db;
