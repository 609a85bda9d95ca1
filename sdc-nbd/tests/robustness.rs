//! Garbage and truncated handshakes and requests on the NBD port never
//! crash the SDC, and connections already serving IO keep working.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{cmd, pseudo_random, run_ok, rw, NbdClient as Client, MIB};
use pflex_testkit::cluster::Component;

const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";

fn send_and_close(port: u16, bytes: &[u8]) {
    if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        let _ = s.write_all(bytes);
        let mut sink = [0u8; 256];
        let _ = s.read(&mut sink);
    }
}

#[tokio::test]
async fn garbage_and_truncated_streams_close_only_their_own_connection() {
    let mut cluster = common::start(&[rw("vol1", 64 * MIB)]).await;
    let port = cluster.sdc(0).data_port;
    let mut good = Client::open(port, "vol1");
    let block = pseudo_random(7, 8192);
    good.request(cmd::WRITE, MIB - 4096, 8192, &block).unwrap();

    let mut go = IHAVEOPT.to_vec();
    go.extend_from_slice(&7u32.to_be_bytes());
    let mut cases: Vec<Vec<u8>> = vec![
        vec![],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0xff; 4],                                      // unknown client flags
        3u32.to_be_bytes().to_vec(),                        // flags, then nothing
        [&3u32.to_be_bytes()[..], &IHAVEOPT[..5]].concat(), // half an option header
        [&3u32.to_be_bytes()[..], b"NOTMAGIC", &[0u8; 8][..]].concat(),
        [&3u32.to_be_bytes()[..], &go[..], &u32::MAX.to_be_bytes()[..]].concat(), // huge option
        [&3u32.to_be_bytes()[..], &go[..], &100u32.to_be_bytes()[..], &[1u8; 10][..]].concat(),
    ];
    for seed in 1..100u64 {
        let len = (seed as usize * 37) % 300;
        let mut junk = 3u32.to_be_bytes().to_vec();
        if seed % 2 == 0 {
            junk.extend_from_slice(IHAVEOPT);
        }
        junk.extend(pseudo_random(seed, len));
        cases.push(junk);
    }
    for case in &cases {
        send_and_close(port, case);
    }
    // Garbage after a successful handshake: bad magic, truncated write, odd lengths.
    for tail in [vec![0xAA; 28], vec![0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1], pseudo_random(99, 1000)]
    {
        let mut c = Client::open(port, "vol1");
        let _ = c.s.write_all(&tail);
        drop(c);
    }
    let mut c = Client::open(port, "vol1");
    let mut w = 0x2560_9513u32.to_be_bytes().to_vec();
    w.extend_from_slice(&[0, 0, 0, 1]);
    w.extend_from_slice(&5u64.to_be_bytes());
    w.extend_from_slice(&0u64.to_be_bytes());
    w.extend_from_slice(&65536u32.to_be_bytes());
    w.extend_from_slice(&[9u8; 100]);
    let _ = c.s.write_all(&w);
    drop(c);

    assert!(cluster.is_running(Component::Sdc(0)), "the SDC died\n{}", cluster.log_tails());
    // The connection opened before all this still serves IO.
    let back = good.request(cmd::READ, MIB - 4096, 8192, &[]).unwrap();
    assert!(back == block, "data read back on the surviving connection differs");
    good.request(cmd::FLUSH, 0, 0, &[]).unwrap();
    // New clients are still served.
    let out = run_ok("nbdinfo", &["--size", &cluster.nbd_uri("vol1")], Duration::from_secs(60));
    assert_eq!(out.trim(), (64 * MIB).to_string());
    let metrics = cluster.get_text(cluster.sdc(0).mgmt_port, "/metrics").await.unwrap();
    let failed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pflex_sdc_nbd_handshakes_failed_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(failed >= 5, "handshake failures not counted: {failed}");
    assert!(metrics.contains("pflex_sdc_nbd_protocol_errors_total"));
}

/// 2000 idle connections on the NBD port (a local user trying to hold every
/// slot, with the SDC allowed fewer files than that): a real client still
/// connects at once and the SDC keeps heartbeating; the idle sockets are
/// closed in the handshake to make room (`--max-handshakes`, 64).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_cannot_lock_clients_out_of_the_nbd_port() {
    pflex_dataplane::runtime::raise_open_files_limit().unwrap();
    let cluster = common::start(&[rw("vol1", 64 * MIB)]).await;
    let sdc = cluster.sdc(0);
    pflex_testkit::flood::limit_open_files(sdc.pid().expect("the SDC runs"), 1500);
    let idle = pflex_testkit::flood::idle_connections(sdc.data_addr(), 2000).await;
    assert_eq!(idle.len(), 2000, "the SDC stopped accepting connections");
    let uri = cluster.nbd_uri("vol1");
    let size = tokio::task::spawn_blocking(move || {
        run_ok("nbdinfo", &["--size", &uri], Duration::from_secs(20))
    })
    .await
    .unwrap();
    assert_eq!(size.trim(), (64 * MIB).to_string());
    let metrics = cluster.metrics(sdc).await;
    let evicted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pflex_sdc_nbd_handshakes_evicted_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the eviction counter");
    assert!(evicted >= 2000 - 64, "only {evicted} idle connections were closed");
    // Heartbeats went on: the MDM still counts the SDC as live.
    let sdcs = cluster.admin().sdc_list().await.unwrap();
    assert!(sdcs.iter().all(|c| c.status == "ACTIVE"), "{sdcs:?}");
    drop(idle);
}
