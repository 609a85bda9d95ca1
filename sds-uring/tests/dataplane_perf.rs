//! Data-plane load and latency through real processes: 4 KiB replicated
//! writes and reads at queue depth 1 and 32, and 1 MiB writes, from a
//! test-side client to two `sds` nodes. Prints the numbers; asserts every
//! request succeeded and both replicas agree afterwards.
//!
//! Scale with `PFLEX_PERF_OPS` (default 2000); meaningful numbers need a
//! release build: `cargo test --release -p sds-uring --test dataplane_perf -- --nocapture`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern, start_cluster, VolumeSession};
use pflex_proto::frame::Status;
use pflex_proto::token::AccessMode;
use pflex_proto::CHUNK_SIZE;

const VOLUME_SIZE: u64 = 64 << 20;
const BLOCK: usize = 4096;

struct Run {
    name: &'static str,
    ops: usize,
    bytes: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn print(&mut self) {
        self.latencies.sort();
        let pct = |p: f64| {
            let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
            self.latencies[i].as_secs_f64() * 1e6
        };
        let secs = self.elapsed.as_secs_f64();
        println!(
            "{:<18} {:>7} ops {:>9.0} IOPS {:>8.1} MiB/s  p50 {:>7.0} us  p99 {:>7.0} us",
            self.name,
            self.ops,
            self.ops as f64 / secs,
            self.bytes as f64 / secs / (1 << 20) as f64,
            pct(0.5),
            pct(0.99),
        );
    }
}

/// Runs `ops` requests with `depth` workers; `op(i)` returns a status.
async fn measure<F, Fut>(
    name: &'static str,
    ops: usize,
    depth: usize,
    bytes_per_op: usize,
    op: F,
) -> Run
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Status> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..depth {
        let op = op.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = w;
            while i < ops {
                let t = Instant::now();
                assert_eq!(op(i).await, Status::Ok, "request {i}");
                latencies.push(t.elapsed());
                i += depth;
            }
            latencies
        }));
    }
    let mut latencies = Vec::with_capacity(ops);
    for w in workers {
        latencies.extend(w.await.unwrap());
    }
    Run { name, ops, bytes: ops * bytes_per_op, elapsed: started.elapsed(), latencies }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicated_io_latency_and_throughput() {
    let ops: usize =
        std::env::var("PFLEX_PERF_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let cluster = start_cluster(2).await;
    let sdc = cluster.register_sdc("sdc-perf").await.client;
    let volume_id = cluster.create_mapped_volume("perf", VOLUME_SIZE, "sdc-perf").await;
    let session = VolumeSession::open(&sdc, volume_id, AccessMode::ReadWrite).await;
    session.auth_all().await;
    let s = Arc::new(session);
    let chunks = VOLUME_SIZE / CHUNK_SIZE;
    let block_addr = move |i: usize| {
        let x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let block = x % (VOLUME_SIZE / BLOCK as u64);
        (block / (CHUNK_SIZE / BLOCK as u64), ((block * BLOCK as u64) % CHUNK_SIZE) as u32)
    };
    let data = Arc::new(pattern(7, BLOCK));
    let big = Arc::new(pattern(8, CHUNK_SIZE as usize));

    // Warm up: allocate every chunk, connect every pool.
    for chunk in 0..chunks {
        assert_eq!(s.write(chunk, 0, &big).await, Status::Ok);
    }

    let mut runs = Vec::new();
    for (name, depth) in [("write 4k qd1", 1), ("write 4k qd32", 32)] {
        let (s, data) = (s.clone(), data.clone());
        runs.push(
            measure(name, ops, depth, BLOCK, move |i| {
                let (s, data) = (s.clone(), data.clone());
                let (chunk, offset) = block_addr(i);
                async move { s.write(chunk, offset, &data).await }
            })
            .await,
        );
    }
    for (name, depth) in [("read 4k qd1", 1), ("read 4k qd32", 32)] {
        let s = s.clone();
        runs.push(
            measure(name, ops, depth, BLOCK, move |i| {
                let s = s.clone();
                let (chunk, offset) = block_addr(i + 17);
                async move { s.read(chunk, offset, BLOCK as u32).await.0 }
            })
            .await,
        );
    }
    let seq_block = 128 * 1024;
    let seq_data = Arc::new(pattern(9, seq_block));
    let (s3, seq3) = (s.clone(), seq_data.clone());
    let per_chunk = CHUNK_SIZE as usize / seq_block;
    runs.push(
        measure("write 128k seq qd8", (ops / 4).max(64), 8, seq_block, move |i| {
            let (s, data) = (s3.clone(), seq3.clone());
            let chunk = (i / per_chunk) as u64 % chunks;
            let offset = ((i % per_chunk) * seq_block) as u32;
            async move { s.write(chunk, offset, &data).await }
        })
        .await,
    );
    let (s2, big2) = (s.clone(), big.clone());
    runs.push(
        measure("write 1m qd4", (ops / 20).max(16), 4, CHUNK_SIZE as usize, move |i| {
            let (s, big) = (s2.clone(), big2.clone());
            async move { s.write(i as u64 % chunks, 0, &big).await }
        })
        .await,
    );
    println!("replicated data plane (2 SDS, loopback):");
    for run in &mut runs {
        run.print();
    }

    for chunk in 0..chunks {
        let a = cluster.sds_by_node_id(s.primary_of(chunk)).await;
        let b = cluster.sds_by_node_id(s.secondary_of(chunk)).await;
        let (ca, cb) = (
            cluster.checksum(a, volume_id, chunk).await,
            cluster.checksum(b, volume_id, chunk).await,
        );
        assert_eq!(ca.crc32, cb.crc32, "chunk {chunk}: replicas differ after the load");
    }
}
