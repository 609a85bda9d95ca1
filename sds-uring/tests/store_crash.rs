//! `kill -9` of a process writing through the chunk store: every write the
//! store acknowledged — including first writes that allocated a chunk and
//! whole-chunk trims that freed one — is there after reopening.
//!
//! The writer is this same test binary re-executed with an environment
//! variable set; it prints one line per acknowledged operation and is
//! killed with SIGKILL in the middle of its work.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use pflex_proto::CHUNK_SIZE;
use pflex_sds_uring::engine::EngineKind;
use pflex_sds_uring::store::{ChunkStore, StoreConfig};

const CHILD_DIR_VAR: &str = "PFLEX_STORE_CRASH_WRITER_DIR";
const CHILD_ENGINE_VAR: &str = "PFLEX_STORE_CRASH_WRITER_ENGINE";
const CHUNKS: u64 = 8;

fn config(dir: &Path, engine: EngineKind) -> StoreConfig {
    StoreConfig {
        data_dir: dir.to_path_buf(),
        devices: vec![
            (dir.join("dev0.img"), 16 * CHUNK_SIZE),
            (dir.join("dev1.img"), 16 * CHUNK_SIZE),
        ],
        engine,
        health: Default::default(),
    }
}

/// Write number `n`: a unique region of its own, aligned or not, with bytes
/// derived from `n` (so regions never overlap and content is checkable).
fn region(n: u64) -> (u64, u32, u32) {
    let chunk = n % CHUNKS;
    let slot_in_chunk = (n / CHUNKS) as u32; // 0.. : 16 KiB apart
    let unaligned = n.is_multiple_of(3);
    let offset = slot_in_chunk * 16384 + if unaligned { 1000 } else { 0 };
    let len = if unaligned { 5000 } else { 8192 };
    (chunk, offset, len)
}

fn content(n: u64, len: u32) -> Vec<u8> {
    (0..len as u64).map(|i| (n.wrapping_mul(31) ^ i.wrapping_mul(7)) as u8 | 1).collect()
}

/// The writer: runs until killed. Operation `n` is a write of region `n`
/// of volume 1 (while regions last); every 7th also writes a chunk of
/// volume 2 (allocating it if it was free) and every 11th trims a whole
/// chunk of volume 2 (freeing its slot).
async fn write_forever(dir: PathBuf, engine: EngineKind) -> ! {
    let store = ChunkStore::open(config(&dir, engine)).unwrap();
    for n in 0u64.. {
        let (chunk, offset, len) = region(n);
        if u64::from(offset) + u64::from(len) <= CHUNK_SIZE {
            store.write(1, chunk, offset, &content(n, len), false).await.unwrap();
            println!("ACK write {n}");
        }
        if n % 7 == 0 {
            store.write(2, n % CHUNKS, 0, &content(n, 4096), false).await.unwrap();
            println!("ACK v2 {} {n}", n % CHUNKS);
        }
        if n % 11 == 0 {
            let victim = (n / 11) % CHUNKS;
            store.trim(2, victim, 0, CHUNK_SIZE as u32).await.unwrap();
            println!("ACK trim {victim} {n}");
        }
    }
    unreachable!()
}

/// Volume 2 chunks that operations `n` and `n + 1` touch: one of them may
/// have been in flight, unacknowledged, when the writer was killed.
fn maybe_in_flight(n: u64) -> [u64; 4] {
    [n % CHUNKS, (n / 11) % CHUNKS, (n + 1) % CHUNKS, ((n + 1) / 11) % CHUNKS]
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn acknowledged_writes_survive(engine: EngineKind, test_name: &str) {
    if let Ok(dir) = std::env::var(CHILD_DIR_VAR) {
        let engine = std::env::var(CHILD_ENGINE_VAR).unwrap().parse().unwrap();
        write_forever(PathBuf::from(dir), engine).await;
    }
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("crash-tests").join(format!("{engine}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    let child = Command::new(std::env::current_exe().unwrap())
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_VAR, &dir)
        .env(CHILD_ENGINE_VAR, engine.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().unwrap();

    let mut writes = Vec::new();
    let mut trims = 0;
    let mut last_n = 0;
    let mut volume2: std::collections::HashMap<u64, Option<u64>> = Default::default();
    let mut record = |line: &str, writes: &mut Vec<u64>, trims: &mut usize| {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["ACK", "write", n] => {
                last_n = n.parse().unwrap();
                writes.push(last_n);
            }
            ["ACK", "v2", chunk, n] => {
                last_n = n.parse().unwrap();
                volume2.insert(chunk.parse().unwrap(), Some(last_n));
            }
            ["ACK", "trim", chunk, n] => {
                last_n = n.parse().unwrap();
                volume2.insert(chunk.parse().unwrap(), None);
                *trims += 1;
            }
            _ => {}
        }
    };
    let mut lines = BufReader::new(stdout).lines();
    // Enough acknowledgements that allocation, read-modify-write and slot
    // reuse are in the history, then SIGKILL without warning.
    while writes.len() < 300 || trims < 20 {
        let line = lines.next().expect("the writer stopped early").unwrap();
        record(&line, &mut writes, &mut trims);
    }
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    // Acknowledgements still in the pipe count too; a torn last line does not.
    for line in lines.map_while(Result::ok) {
        record(&line, &mut writes, &mut trims);
    }
    drop(child);

    let store = ChunkStore::open(config(&dir, engine)).unwrap();
    for &n in &writes {
        let (chunk, offset, len) = region(n);
        let got = store.read(1, chunk, offset, len).await.unwrap();
        assert!(got == content(n, len), "acknowledged write {n} is missing after kill -9");
    }
    let unsure = maybe_in_flight(last_n);
    for (&chunk, state) in volume2.iter().filter(|(chunk, _)| !unsure.contains(chunk)) {
        let got = store.read(2, chunk, 0, 4096).await.unwrap();
        match state {
            // The last acknowledged operation on the chunk was a write...
            Some(n) => assert!(got == content(*n, 4096), "volume 2 chunk {chunk} lost write {n}"),
            // ...or a whole-chunk trim, after which it reads as zeroes.
            None => assert!(got.iter().all(|&b| b == 0), "volume 2 chunk {chunk} not trimmed"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill_uring() {
    acknowledged_writes_survive(EngineKind::Uring, "acknowledged_writes_survive_sigkill_uring")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill_sync() {
    acknowledged_writes_survive(EngineKind::Sync, "acknowledged_writes_survive_sigkill_sync").await;
}
