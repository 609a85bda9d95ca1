//! Shared wire formats of pflex.
//!
//! Everything that crosses a process boundary lives here and nowhere else:
//! - [`token`]: the IO capability token the MDM signs and the SDS verifies,
//!   plus the per-request MAC and the replay window;
//! - [`frame`]: the binary data-plane header (SDC → SDS, SDS → SDS);
//! - [`placement`]: the compact placement map and the chunk → replica lookup;
//! - [`api`]: request/response bodies of the HTTP control plane;
//! - [`size`]: the human size syntax (`4G`, `512M`) every binary's flags accept.
//!
//! This crate does no IO: it turns bytes into typed values and back.

pub mod api;
pub mod fence;
pub mod frame;
pub mod placement;
pub mod size;
pub mod token;

/// Size of one chunk, the unit of placement and replication: 1 MiB.
pub const CHUNK_SIZE: u64 = 1 << 20;

/// Seconds since the Unix epoch (wall clock), the time base of token expiry.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Fills a fresh array with bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    getrandom::getrandom(&mut out).expect("the operating system has no random source");
    out
}
