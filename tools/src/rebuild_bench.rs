//! `pflex lab rebuild-bench`: what a rebuild costs clients, and what the
//! movement throttle buys back.
//!
//! Each case runs in a fresh lab (three SDS, each its own fault set, a
//! 5-second failure timeout): the volume is filled, the movement policy is
//! set, sds3 is killed, and once the MDM has started rebuilding its copies
//! fio runs two jobs at once for `--runtime` seconds: 4 KiB random reads at
//! queue depth 32 (IOPS) and 4 KiB random writes at queue depth 1 (p50
//! latency). The rebuild rate is the bytes the rebuild jobs reported sent
//! during that window. The `undisturbed` case runs the same fio jobs with
//! no failure.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pflex_mdm_client::MdmClient;
use pflex_proto::api::{CopyKind, MovementPolicy, MovementPriority};
use serde::Serialize;

use crate::lab::{self, wait_until, LabUp};

/// Options of `pflex lab rebuild-bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct RebuildBenchArgs {
    /// Per-SDS movement limits to measure, MB/s (0: no limit).
    #[arg(long, value_delimiter = ',', default_value = "0,50")]
    pub limits: Vec<u64>,
    /// Movement priority of every case.
    #[arg(long, default_value = "client", value_parser = ["client", "movement"])]
    pub priority: String,
    /// Size of the volume (filled before each case).
    #[arg(long, default_value = "2G", value_parser = pflex_proto::size::parse_size)]
    pub volume_size: u64,
    /// Seconds fio measures in each case.
    #[arg(long, default_value_t = 6)]
    pub runtime: u64,
    /// Namespace prefix and address octet of the labs.
    #[arg(long, default_value = "rbench")]
    pub name: String,
    #[arg(long, default_value_t = 216)]
    pub net: u8,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One case's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildCase {
    /// `undisturbed`, or the limit (`no limit`, `50 MB/s`).
    pub case: String,
    pub rebuild_mb_per_s: f64,
    pub read_qd32_iops: f64,
    pub write_qd1_p50_us: f64,
    /// Rebuild bytes sent in the window, MB.
    pub rebuild_mb: f64,
}

/// `pflex lab rebuild-bench`.
pub async fn run(dir: &Path, args: RebuildBenchArgs) -> Result<()> {
    let fio = std::process::Command::new("sh")
        .args(["-c", "command -v fio"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !fio {
        bail!("fio is not installed");
    }
    let priority = if args.priority == "movement" {
        MovementPriority::Movement
    } else {
        MovementPriority::Client
    };
    let mut cases: Vec<Option<u64>> = vec![None];
    cases.extend(args.limits.iter().map(|&l| Some(l)));
    let mut results = Vec::new();
    for limit in cases {
        let run_dir = dir.join(match limit {
            None => "undisturbed".to_string(),
            Some(l) => format!("limit-{l}"),
        });
        if run_dir.exists() {
            let _ = lab::down(&run_dir).await;
            std::fs::remove_dir_all(&run_dir)?;
        }
        let up = LabUp {
            mdm_count: 1,
            sds: 3,
            spare_sds: 0,
            spare_mdm: false,
            name: args.name.clone(),
            net: args.net,
            device_size: (args.volume_size * 3 / 2).max(1 << 30),
            volume_size: args.volume_size,
            heartbeat_interval_secs: 1,
            failure_timeout_secs: 5,
            token_ttl_secs: 3600,
            io_retry_secs: 30,
            bin_dir: None,
            no_tls: false,
            // One CA for every case's lab: this process trusts the first it meets.
            ca_dir: Some(dir.join("tls").join("ca")),
        };
        let layout = lab::up_lab(&run_dir, &up).await?;
        let outcome = one_case(&run_dir, &layout, limit, priority, &args).await;
        let down = lab::down(&run_dir).await;
        let case = outcome?;
        down?;
        if !args.json {
            println!(
                "{:<12} rebuild {:>7.1} MB/s  read QD32 {:>8.0} IOPS  write QD1 p50 {:>6.0} µs",
                case.case, case.rebuild_mb_per_s, case.read_qd32_iops, case.write_qd1_p50_us
            );
        }
        results.push(case);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(())
}

async fn one_case(
    dir: &Path,
    layout: &lab::LabLayout,
    limit: Option<u64>,
    priority: MovementPriority,
    args: &RebuildBenchArgs,
) -> Result<RebuildCase> {
    let token = std::fs::read_to_string(dir.join("mdm").join("admin_token"))?;
    let mdm = MdmClient::new(&layout.mdm_url, Some(token.trim().to_string()))?;
    fill(&layout.nbd_uri).await?;
    let case = match limit {
        None => "undisturbed".to_string(),
        Some(0) => "no limit".to_string(),
        Some(l) => format!("{l} MB/s"),
    };
    let mut rebuilt_before = 0;
    if let Some(limit) = limit {
        let policy = MovementPolicy { mb_per_sec: limit, priority, ..MovementPolicy::default() };
        mdm.set_movement_policy(&policy).await?;
        lab::signal(dir, "sds3", libc::SIGKILL)?;
        wait_until("the rebuild to start", Duration::from_secs(60), || async {
            mdm.movement_status().await.is_ok_and(|s| s.rebuild_jobs > 0)
        })
        .await?;
        rebuilt_before = rebuilt_bytes(&mdm).await?;
    }
    let started = Instant::now();
    let (read, write) = fio_pair(&layout.nbd_uri, args.runtime).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let rebuilt =
        if limit.is_some() { rebuilt_bytes(&mdm).await?.saturating_sub(rebuilt_before) } else { 0 };
    Ok(RebuildCase {
        case,
        rebuild_mb_per_s: rebuilt as f64 / 1e6 / elapsed,
        read_qd32_iops: read,
        write_qd1_p50_us: write,
        rebuild_mb: rebuilt as f64 / 1e6,
    })
}

/// Bytes every rebuild job has reported sent.
async fn rebuilt_bytes(mdm: &MdmClient) -> Result<u64> {
    Ok(mdm
        .rebuild_jobs()
        .await?
        .iter()
        .filter(|j| j.kind == CopyKind::Rebuild)
        .map(|j| j.bytes_copied.max(j.chunks_copied * pflex_proto::CHUNK_SIZE))
        .sum())
}

/// Writes the whole volume, 1 MiB at a time, and flushes.
async fn fill(uri: &str) -> Result<()> {
    let uri = crate::verify::nbd::NbdUri::parse(uri)?;
    let client = crate::verify::nbd::Client::connect(&uri).await?;
    let block: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8 | 1).collect();
    let mut offset = 0;
    while offset < client.size() {
        let len = (client.size() - offset).min(block.len() as u64) as usize;
        client.write(offset, &block[..len]).await.context("filling the volume")?;
        offset += len as u64;
    }
    client.flush().await?;
    client.disconnect().await;
    Ok(())
}

/// fio: QD32 4 KiB random reads and QD1 4 KiB random writes side by side;
/// (read IOPS, write p50 µs).
async fn fio_pair(uri: &str, runtime: u64) -> Result<(f64, f64)> {
    let args: Vec<String> = [
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--time_based=1",
        &format!("--runtime={runtime}"),
        "--randrepeat=0",
        "--norandommap=1",
        "--bs=4k",
        "--name=read-qd32",
        "--rw=randread",
        "--iodepth=32",
        "--name=write-qd1",
        "--new_group",
        "--rw=randwrite",
        "--iodepth=1",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let doc = crate::bench::fio_json(&args).await?;
    let figures = |job: &str, dir: &str| {
        doc.pointer(&format!("/jobs/{job}/{dir}")).and_then(crate::bench::parse_dir)
    };
    let read = figures("0", "read").context("no read figures from fio")?;
    let write = figures("1", "write").context("no write figures from fio")?;
    Ok((read.iops, write.p50_us))
}
