//! The network runtime of the data-path processes (SDS and SDC).
//!
//! With one thread (the default) every connection, request task and writer
//! task of the process runs on a single tokio event loop, in the manner of
//! one reactor per storage daemon: a request handed from a connection's
//! reader to its handler and on to its writer never crosses threads, so it
//! costs no wake-up of another CPU. Disk IO still runs on the SDS's device
//! threads. More threads use tokio's work-stealing scheduler, which pays
//! those cross-thread wake-ups for the use of more cores by the network
//! side alone.

use std::io;

use tokio::runtime::{Builder, Runtime};

/// A runtime with `network_threads` threads running tasks (at least one).
pub fn network_runtime(network_threads: usize) -> io::Result<Runtime> {
    match network_threads {
        0 | 1 => Builder::new_current_thread().enable_all().build(),
        threads => Builder::new_multi_thread().worker_threads(threads).enable_all().build(),
    }
}
