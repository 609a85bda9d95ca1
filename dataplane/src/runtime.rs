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

/// Raises this process's soft limit on open files to its hard limit, so the
/// connection caps (`--max-connections`, `--max-handshakes`) are what bound
/// connections, not a default soft limit of 1024. Returns the new soft limit.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit(2) writes one rlimit struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit(2) reads one rlimit struct we own; raising the
        // soft limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}
