//! `pflex cluster rotate` under IO: the SDC goes on writing and reading
//! through a rotation of the token signing key. Its renewed tokens are
//! signed with the new key, which every SDS learned from a heartbeat before
//! the MDM used it; tokens of the old key stay valid meanwhile. No request
//! fails and IO under a token of the new key is acknowledged by the SDS.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{cmd, rw, NbdClient, Options, MIB};
use pflex_testkit::wait_for;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_goes_on_through_a_key_rotation() {
    // Tokens live 6 s, so the SDC renews every 2 s and the rotation is
    // reached within the test.
    let options = Options { token_ttl_secs: 6, ..Options::default() };
    let cluster = common::start_with(&[rw("vol1", 64 * MIB)], options).await;
    let port = cluster.sdc(0).data_port;
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let io = {
        let (stop, ops, failures) = (stop.clone(), ops.clone(), failures.clone());
        std::thread::spawn(move || {
            let mut client = NbdClient::open(port, "vol1");
            let mut i: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                let offset = (i % 1024) * 4096;
                let block = vec![(i % 251) as u8; 4096];
                let result = client
                    .request(cmd::WRITE, offset, 4096, &block)
                    .and_then(|_| client.request(cmd::READ, offset, 4096, &[]));
                match result {
                    Ok(data) if data == block => {}
                    Ok(_) => failures.lock().unwrap().push(format!("op {i}: read back other data")),
                    Err(errno) => {
                        failures.lock().unwrap().push(format!("op {i}: NBD error {errno}"))
                    }
                }
                ops.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    };
    let ops_at = |n: u64| {
        let ops = ops.clone();
        move || {
            let ops = ops.clone();
            async move { ops.load(Ordering::Relaxed) >= n }
        }
    };
    wait_for("IO before the rotation", Duration::from_secs(30), ops_at(50)).await;

    let rotated = cluster.admin().cluster_rotate().await.unwrap();
    assert_eq!(rotated.signing_generation, 1);

    // Wait until IO under a token issued once the new key signs has been
    // acknowledged by an SDS (the token table counts acknowledged ops).
    let db = cluster.mdm_dir().join("powerflex.db");
    let signs_from = rotated.signs_from;
    wait_for("IO acknowledged under a token of the new key", Duration::from_secs(60), || {
        let db = db.clone();
        async move {
            let conn = rusqlite::Connection::open_with_flags(
                &db,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .unwrap();
            conn.query_row(
                "SELECT COUNT(*) FROM io_tokens WHERE issued_at > ?1 AND ops > 0",
                [signs_from],
                |r| r.get::<_, i64>(0),
            )
            .unwrap_or(0)
                > 0
        }
    })
    .await;
    let after = ops.load(Ordering::Relaxed);
    wait_for("more IO after that", Duration::from_secs(30), ops_at(after + 50)).await;
    stop.store(true, Ordering::Relaxed);
    io.join().unwrap();
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "IO failed across the rotation: {:?}",
        &failures[..failures.len().min(5)]
    );
}
