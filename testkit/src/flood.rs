//! Idle-connection floods for the tests of connection limits: a process held
//! to fewer open files than the flood, and the flood itself.

use std::net::SocketAddr;
use std::time::Duration;

/// Holds process `pid` to `files` open files (`prlimit`, util-linux).
pub fn limit_open_files(pid: u32, files: u32) {
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={files}:{files}")])
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(status.success(), "prlimit --pid {pid} failed");
}

/// Opens up to `count` connections to `addr` that never send anything;
/// stops at the first one that does not connect within 2 s.
pub async fn idle_connections(addr: SocketAddr, count: usize) -> Vec<tokio::net::TcpStream> {
    let mut idle = Vec::with_capacity(count);
    for _ in 0..count {
        let connect = tokio::net::TcpStream::connect(addr);
        match tokio::time::timeout(Duration::from_secs(2), connect).await {
            Ok(Ok(stream)) => idle.push(stream),
            _ => break,
        }
    }
    idle
}
