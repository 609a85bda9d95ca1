//! Benchmark of the chunk store alone: 4 KiB random writes and reads at
//! queue depth 1 and 32 on a file-backed device, with fio's io_uring engine
//! on a file of the same size and the same pattern printed beside it.
//!
//! Run it in release mode on a real filesystem (not tmpfs):
//! `cargo run --release -p sds-uring --bin sds-store-bench -- --size 1G --seconds 10`.
//! Latency is measured per request from the caller's side (the store's
//! `read`/`write` future), fio's as `lat` (submission to completion).
//! Every chunk is written once before measuring (fio lays its file out
//! too); that pass is reported as the cost of allocating chunks.
//!
//! Measured on the development VM (2 vCPUs, ext4 on virtio, 1 GiB device,
//! 3 s × 3 rounds, medians), quiet moment (load ≈ 1):
//!
//! | pattern   | QD | store IOPS | p50 µs | p99 µs | fio IOPS | p50 µs | p99 µs | p50 × |
//! |-----------|----|-----------:|-------:|-------:|---------:|-------:|-------:|------:|
//! | no polling (`--idle-poll-us 0`)                                                   |
//! | randwrite |  1 |      16656 |   58.3 |   97.6 |    23909 |   36.1 |   87.6 |  1.62 |
//! | randwrite | 32 |      71281 |  439.8 |  655.7 |    66973 |  464.9 |  741.4 |  0.95 |
//! | randread  |  1 |      18553 |   51.2 |  103.4 |    32593 |   28.3 |   55.0 |  1.81 |
//! | randread  | 32 |      71394 |  436.1 |  957.2 |   101578 |  284.7 |  700.4 |  1.53 |
//! | `--idle-poll-us 30` (fixed polling, before it became adaptive)                    |
//! | randwrite |  1 |      21182 |   45.0 |   69.4 |    22174 |   36.6 |  115.2 |  1.23 |
//! | randwrite | 32 |      71089 |  440.2 |  663.5 |    51458 |  593.9 |  913.4 |  0.74 |
//! | randread  |  1 |      21815 |   44.4 |   76.0 |    29443 |   32.1 |   56.1 |  1.38 |
//! | randread  | 32 |      80207 |  366.6 |  870.7 |   100010 |  288.8 |  708.6 |  1.27 |
//! | default: adaptive polling up to 20 µs                                             |
//! | randwrite |  1 |      21699 |   43.2 |   67.6 |    23911 |   36.1 |   83.5 |  1.20 |
//! | randwrite | 32 |      88263 |  348.0 |  563.8 |    57597 |  544.8 |  815.1 |  0.64 |
//! | randread  |  1 |      23947 |   40.4 |   69.9 |    33916 |   27.5 |   50.4 |  1.47 |
//! | randread  | 32 |      75048 |  408.3 |  933.9 |   102293 |  276.5 |  774.1 |  1.48 |
//!
//! Where the QD1 gap comes from (per-request timestamps, 4 KiB reads, quiet
//! VM): caller → device thread 6–10 µs, device time 29–33 µs (as fio),
//! completion → caller resumed 7–10 µs. Both hand-offs wake a thread whose
//! vCPU is halted, which on this VM costs far more than on bare metal (on a
//! busy VM they fell to 2–5 µs each and the ratio to 1.05–1.3 for writes,
//! 1.35–1.5 for reads). Polling the device queue (`idle_poll`) removes the
//! first hand-off (0.6 µs); the second is tokio waking the awaiting task.
//!
//! Since then a request alone on its device is submitted by its caller and
//! reaped by the runtime, with no device thread in between (see
//! `engine::uring::inline`; `--no-inline-submit` turns that off). Same VM,
//! 3 s × 2 rounds: randwrite QD1 p50 37.1 µs against fio's 37.1 µs (1.00×;
//! 45.8 µs through the device thread), randread QD1 38.0 µs against
//! 30.8 µs (1.23×).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use pflex_proto::CHUNK_SIZE;
use pflex_sds_uring::engine::uring::UringConfig;
use pflex_sds_uring::engine::{AlignedBuf, EngineKind, IoRequest};
use pflex_sds_uring::store::{ChunkStore, StoreConfig};

#[derive(Parser, Debug)]
#[command(about = "4 KiB random IO on the SDS chunk store, beside fio on the same kind of file")]
struct Args {
    /// Working directory for the device file and fio's file (must support O_DIRECT).
    #[arg(long, default_value = "/var/tmp/pflex-store-bench")]
    dir: PathBuf,
    /// Device (and fio file) size, e.g. 1G, 512M.
    #[arg(long, default_value = "1G", value_parser = pflex_proto::size::parse_size)]
    size: u64,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// IO engine of the chunk store.
    #[arg(long, default_value = "uring")]
    engine: EngineKind,
    /// Longest a uring device thread polls its queue before sleeping, in
    /// microseconds (adaptive, see `UringConfig::idle_poll`; 0: never polls).
    #[arg(long, default_value_t = 20)]
    idle_poll_us: u64,
    /// Use plain io_uring rings (no SINGLE_ISSUER | DEFER_TASKRUN).
    #[arg(long)]
    plain_ring: bool,
    /// Hand every request to its device thread, also one alone on its device
    /// (see `UringConfig::inline_submit`)
    #[arg(long)]
    no_inline_submit: bool,
    /// Measure the IO engine alone (same offsets, straight on the device,
    /// no chunk map or locks) instead of the chunk store.
    #[arg(long)]
    engine_only: bool,
    /// Leave the device and fio files in place afterwards (for inspection).
    #[arg(long)]
    keep_files: bool,
    /// Skip the fio comparison.
    #[arg(long)]
    no_fio: bool,
    /// Repetitions of each case (store and fio alternating); medians are printed.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Threads of the runtime the callers run on (1: one event loop, as
    /// the `sds` binary runs by default; more: tokio's multi-threaded scheduler).
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    RandWrite,
    RandRead,
}

impl Pattern {
    fn fio_name(self) -> &'static str {
        match self {
            Pattern::RandWrite => "randwrite",
            Pattern::RandRead => "randread",
        }
    }
}

/// The outcome of one measurement.
#[derive(Debug, Clone, Copy)]
struct Measured {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = pflex_dataplane::runtime::network_runtime(args.workers)?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let volume_chunks = args.size / CHUNK_SIZE;
    if volume_chunks == 0 {
        bail!("--size must be at least 1 MiB");
    }
    let store_dir = args.dir.join("store");
    let _ = std::fs::remove_dir_all(&store_dir);
    std::fs::create_dir_all(&store_dir)?;
    let cfg = StoreConfig {
        data_dir: store_dir.clone(),
        devices: vec![(store_dir.join("dev0.img"), args.size)],
        engine: args.engine,
        health: Default::default(),
    };
    let tuning = UringConfig {
        idle_poll: Duration::from_micros(args.idle_poll_us),
        defer_taskrun: !args.plain_ring,
        inline_submit: !args.no_inline_submit,
        ..Default::default()
    };
    let store = ChunkStore::open_with(cfg, tuning).context("opening the chunk store")?;
    println!(
        "{}: {} engine, device {} ({} MiB), idle poll {} µs, inline submission {}, {} s per test",
        if args.engine_only { "IO engine alone" } else { "chunk store" },
        args.engine,
        store_dir.join("dev0.img").display(),
        args.size >> 20,
        args.idle_poll_us,
        if args.no_inline_submit { "off" } else { "on" },
        args.seconds
    );

    // Every chunk is written once first, as fio lays out its file before it
    // measures; this is also the cost of allocating chunks.
    let started = Instant::now();
    let first_writes = fill(&store, volume_chunks).await?;
    let elapsed = started.elapsed();
    println!(
        "allocation: {volume_chunks} first writes of 1 MiB (slot write + map commit) at QD8: \
         {:.0} MiB/s, latency p50 {:.0} µs p99 {:.0} µs",
        volume_chunks as f64 / elapsed.as_secs_f64(),
        first_writes.p50_us,
        first_writes.p99_us
    );

    let fio = if args.no_fio { None } else { fio_available() };
    if !args.no_fio && fio.is_none() {
        println!("fio was not found on PATH: install fio to print its numbers beside these.");
    }
    let fio_file = args.dir.join("fio.img");
    if let Some(fio) = &fio {
        // fio lays its file out on first use; do that outside the measurements.
        run_fio(fio, &fio_file, args.size, Pattern::RandRead, 1, 1)?;
    }

    // Each case runs the store and fio back to back, `rounds` times, so a
    // busy machine disturbs both sides alike; the medians are reported.
    let duration = Duration::from_secs(args.seconds);
    println!(
        "{:<10} {:>3} | {:>10} {:>8} {:>8} {:>8} | {:>9} {:>8} {:>8} {:>8} | {:>6}",
        "pattern",
        "QD",
        "store IOPS",
        "mean µs",
        "p50 µs",
        "p99 µs",
        "fio IOPS",
        "mean µs",
        "p50 µs",
        "p99 µs",
        "p50 ×"
    );
    for pattern in [Pattern::RandWrite, Pattern::RandRead] {
        for depth in [1usize, 32] {
            let mut ours = Vec::new();
            let mut theirs = Vec::new();
            for _round in 0..args.rounds.max(1) {
                ours.push(
                    measure_store(
                        &store,
                        pattern,
                        depth,
                        volume_chunks,
                        duration,
                        args.engine_only,
                    )
                    .await?,
                );
                if let Some(fio) = &fio {
                    theirs.push(run_fio(fio, &fio_file, args.size, pattern, depth, args.seconds)?);
                }
            }
            let ours = median(&ours);
            let fio_columns = match theirs.is_empty() {
                false => {
                    let t = median(&theirs);
                    format!(
                        "{:>9.0} {:>8.1} {:>8.1} {:>8.1} | {:>6.2}",
                        t.iops,
                        t.mean_us,
                        t.p50_us,
                        t.p99_us,
                        ours.p50_us / t.p50_us
                    )
                }
                true => format!("{:>9} {:>8} {:>8} {:>8} | {:>6}", "-", "-", "-", "-", "-"),
            };
            println!(
                "{:<10} {:>3} | {:>10.0} {:>8.1} {:>8.1} {:>8.1} | {fio_columns}",
                pattern.fio_name(),
                depth,
                ours.iops,
                ours.mean_us,
                ours.p50_us,
                ours.p99_us,
            );
        }
    }
    println!(
        "(medians of {} round(s); p50 × = store p50 latency / fio p50 latency; \
         most requests in flight on the device at once: {})",
        args.rounds.max(1),
        store.engine().in_flight_peak()
    );
    drop(store);
    if !args.keep_files {
        let _ = std::fs::remove_file(&fio_file);
        let _ = std::fs::remove_dir_all(&store_dir);
    }
    Ok(())
}

/// Field-wise median of several measurements.
fn median(runs: &[Measured]) -> Measured {
    let pick = |field: fn(&Measured) -> f64| {
        let mut values: Vec<f64> = runs.iter().map(field).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    Measured {
        iops: pick(|m| m.iops),
        p50_us: pick(|m| m.p50_us),
        p99_us: pick(|m| m.p99_us),
        mean_us: pick(|m| m.mean_us),
    }
}

/// Writes every chunk once with 1 MiB writes, 8 at a time.
async fn fill(store: &Arc<ChunkStore>, chunks: u64) -> Result<Measured> {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let data = vec![0xA5u8; CHUNK_SIZE as usize];
            let mut latencies = Vec::new();
            loop {
                let chunk = next.fetch_add(1, Ordering::Relaxed);
                if chunk >= chunks {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let at = Instant::now();
                store.write(1, chunk, 0, &data, false).await?;
                latencies.push(at.elapsed().as_nanos() as u64);
            }
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    Ok(summarize(latencies, started.elapsed()))
}

async fn measure_store(
    store: &Arc<ChunkStore>,
    pattern: Pattern,
    depth: usize,
    chunks: u64,
    duration: Duration,
    engine_only: bool,
) -> Result<Measured> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..depth {
        let store = store.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng =
                0x9E37_79B9_7F4A_7C15u64 ^ (worker as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            let data = vec![0x3Cu8; 4096];
            let mut engine_buf = Some(AlignedBuf::from_slice(&data));
            let blocks_per_chunk = CHUNK_SIZE / 4096;
            let mut latencies = Vec::with_capacity(1 << 20);
            while !stop.load(Ordering::Relaxed) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let block = rng % (chunks * blocks_per_chunk);
                let chunk = block / blocks_per_chunk;
                let offset = ((block % blocks_per_chunk) * 4096) as u32;
                let at = Instant::now();
                if engine_only {
                    // The same offsets straight on the device, through the engine.
                    let device_offset = block * 4096;
                    let buf = engine_buf.take().expect("the buffer comes back after each IO");
                    let request = match pattern {
                        Pattern::RandWrite => IoRequest::write(0, device_offset, buf, false),
                        Pattern::RandRead => IoRequest::read(0, device_offset, buf),
                    };
                    let completion = store.engine().submit(request).await;
                    completion.result?;
                    engine_buf = completion.buf;
                } else {
                    match pattern {
                        Pattern::RandWrite => store.write(1, chunk, offset, &data, false).await?,
                        Pattern::RandRead => {
                            let read = store.read(1, chunk, offset, 4096).await?;
                            debug_assert_eq!(read.len(), 4096);
                        }
                    }
                }
                latencies.push(at.elapsed().as_nanos() as u64);
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    Ok(summarize(latencies, started.elapsed()))
}

fn summarize(mut latencies_ns: Vec<u64>, elapsed: Duration) -> Measured {
    latencies_ns.sort_unstable();
    let count = latencies_ns.len().max(1);
    let pick = |q: f64| latencies_ns.get(((count as f64 * q) as usize).min(count - 1)).copied();
    let mean = latencies_ns.iter().sum::<u64>() as f64 / count as f64;
    Measured {
        iops: latencies_ns.len() as f64 / elapsed.as_secs_f64(),
        p50_us: pick(0.50).unwrap_or(0) as f64 / 1000.0,
        p99_us: pick(0.99).unwrap_or(0) as f64 / 1000.0,
        mean_us: mean / 1000.0,
    }
}

fn fio_available() -> Option<PathBuf> {
    let output = Command::new("fio").arg("--version").output().ok()?;
    output.status.success().then(|| PathBuf::from("fio"))
}

fn run_fio(
    fio: &Path,
    file: &Path,
    size: u64,
    pattern: Pattern,
    depth: usize,
    seconds: u64,
) -> Result<Measured> {
    let output = Command::new(fio)
        .arg("--name=pflex-store-bench")
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--size={size}"))
        .arg("--ioengine=io_uring")
        .arg("--direct=1")
        .arg(format!("--rw={}", pattern.fio_name()))
        .arg("--bs=4k")
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--runtime={seconds}"))
        .arg("--time_based")
        .arg("--lat_percentiles=1")
        .arg("--randrepeat=0")
        .arg("--output-format=json")
        .output()
        .context("running fio")?;
    if !output.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("parsing fio's JSON output")?;
    let side = match pattern {
        Pattern::RandWrite => "write",
        Pattern::RandRead => "read",
    };
    let job = &report["jobs"][0][side];
    let number = |value: &serde_json::Value, what: &str| {
        value.as_f64().with_context(|| format!("fio output lacks {what}"))
    };
    let lat = &job["lat_ns"];
    Ok(Measured {
        iops: number(&job["iops"], "iops")?,
        p50_us: number(&lat["percentile"]["50.000000"], "lat p50")? / 1000.0,
        p99_us: number(&lat["percentile"]["99.000000"], "lat p99")? / 1000.0,
        mean_us: number(&lat["mean"], "lat mean")? / 1000.0,
    })
}
