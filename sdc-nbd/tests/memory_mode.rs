//! `sdc --memory-export` serves in-memory exports without any cluster.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{run_ok, MemorySdc};
use pflex_testkit::free_port;

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn memory_exports_serve_real_clients_without_a_cluster() {
    let sdc = MemorySdc::start(
        "127.0.0.1",
        &["--memory-export", "scratch:64M", "--memory-export", "tiny:1M"],
    );
    let port = sdc.port;
    let list = run_ok(
        "nbdinfo",
        &["--list", "--json", &format!("nbd://127.0.0.1:{port}")],
        Duration::from_secs(60),
    );
    assert!(list.contains("\"scratch\"") && list.contains("\"tiny\""), "{list}");
    let uri = format!("nbd://127.0.0.1:{port}/scratch");
    let out = run_ok(
        "qemu-io",
        &["-f", "raw", &uri, "-c", "write -P 0x3c 1000 100000", "-c", "read -P 0x3c 1000 100000"],
        Duration::from_secs(60),
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(
        run_ok("nbdinfo", &["--size", &uri], Duration::from_secs(60)).trim(),
        (64u64 << 20).to_string()
    );
}

/// Plain NBD on a non-loopback address is refused with a clear error unless
/// `--insecure` says to accept it.
#[test]
fn plain_nbd_on_a_non_loopback_address_needs_insecure() {
    let port = free_port();
    let sdc = |extra: &[&str]| {
        Command::new(pflex_testkit::workspace_binary("sdc-nbd", "sdc"))
            .args(["--memory-export", "scratch:1M", "--nbd-listen", &format!("0.0.0.0:{port}")])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut refused = Killed(sdc(&[]));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = refused.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the SDC served plain NBD on 0.0.0.0");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(refused.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("--insecure"), "{stderr}");

    // With --insecure it serves (MemorySdc waits until it listens).
    let _accepted = MemorySdc::start("0.0.0.0", &["--memory-export", "scratch:1M", "--insecure"]);
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// Many clients each send a 32 MiB WRITE and all of its payload but the
/// last block, then stall: without a server-wide cap the SDC would hold
/// every payload (48 × 32 MiB = 1.5 GiB); `--max-in-flight-total 64M` keeps
/// its memory for client data under 64 MiB, the other connections wait
/// before their payload is read (it stays in the kernel's socket buffers).
#[test]
fn stalled_writes_cannot_grow_the_sdc_past_its_payload_cap() {
    const CAP: u64 = 64 << 20;
    const CLIENTS: usize = 48;
    const LEN: u32 = 32 << 20;
    let sdc = MemorySdc::start(
        "127.0.0.1",
        &["--memory-export", "scratch:64M", "--max-in-flight-total", "64M"],
    );
    let (port, pid) = (sdc.port, sdc.pid());
    let before = rss(pid);
    let senders: Vec<_> = (0..CLIENTS)
        .map(|i| {
            std::thread::spawn(move || {
                use std::io::Write;
                let mut client = common::NbdClient::open(port, "scratch");
                client.s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut request = 0x2560_9513u32.to_be_bytes().to_vec();
                request.extend_from_slice(&0u16.to_be_bytes()); // flags
                request.extend_from_slice(&1u16.to_be_bytes()); // WRITE
                request.extend_from_slice(&(i as u64).to_be_bytes()); // cookie
                request.extend_from_slice(&0u64.to_be_bytes()); // offset
                request.extend_from_slice(&LEN.to_be_bytes());
                let payload = vec![0xa5u8; LEN as usize - 4096];
                let sent = client.s.write_all(&request).and_then(|()| client.s.write_all(&payload));
                // Kept open (stalled) until the measurement is done.
                (client, sent.is_ok())
            })
        })
        .collect();
    let held: Vec<_> = senders.into_iter().map(|t| t.join().unwrap()).collect();
    let completed = held.iter().filter(|(_, sent)| *sent).count();
    let grown = rss(pid).saturating_sub(before);
    assert!(
        grown < CAP + (32 << 20),
        "the SDC grew by {} MiB holding stalled payloads ({completed} of {CLIENTS} clients sent \
         theirs whole), over its 64 MiB cap",
        grown >> 20
    );
    // Most clients were made to wait: the cap, not a lack of senders, bounded it.
    assert!(completed < CLIENTS / 2, "{completed} of {CLIENTS} payloads were taken in");
    drop(held);
}
