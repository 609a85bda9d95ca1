//! `pflex bench`: the fio job files of `fio-jobs/nbd/` against three targets
//! in one run, so the ratios are measured under the same machine load:
//!
//! 1. the pflex volume, through fio's NBD engine (a cluster started for the
//!    run with `pflex up`'s code, or one already running given by `--uri`);
//! 2. the peer: `qemu-nbd --cache=none --aio=io_uring` serving a local file,
//!    through the same NBD engine (one copy, no replication);
//! 3. the floor: fio's io_uring engine with O_DIRECT on a local file;
//! 4. the hop: the same qemu-nbd behind one `nbdkit nbd` proxy on loopback,
//!    which shows what a single extra network hop costs on this machine
//!    (pflex's writes make two: SDC to primary, primary to secondary).
//!
//! Prints IOPS, MB/s and p50/p99 completion latency per job and target, and
//! the ratios of pflex and of the hop to qemu-nbd; `--json FILE` writes
//! every number.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::nbd_probe;
use crate::up::{self, UpArgs};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Another benchmark instead of the fio jobs.
    #[command(subcommand)]
    pub other: Option<Box<OtherBench>>,
    /// NBD URI of an already running pflex volume; without it a fresh local cluster is
    /// started for the run (in --data-dir) and stopped afterwards.
    #[arg(long)]
    pub uri: Option<String>,
    /// Data dir of the cluster started for the run.
    #[arg(long, default_value = "/var/tmp/pflex-bench")]
    pub data_dir: PathBuf,
    /// Directory of fio job files (workload only; the target comes from the command line).
    #[arg(long, default_value = "fio-jobs/nbd")]
    pub jobs_dir: PathBuf,
    /// Only run job files whose name contains one of these (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub filter: Vec<String>,
    /// Targets to run, comma separated, from: pflex, pflex-tls (the same volume over NBD
    /// with TLS and a client certificate), qemu-nbd, floor, hop.
    #[arg(long, default_value = "pflex,pflex-tls,qemu-nbd,floor,hop", value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Scratch directory for the qemu-nbd and floor files (must support O_DIRECT).
    #[arg(long, default_value = "/var/tmp")]
    pub scratch_dir: PathBuf,
    /// Port for qemu-nbd.
    #[arg(long, default_value_t = 10810)]
    pub peer_port: u16,
    /// Write every number as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// SDS IO engine of the cluster started for the run.
    #[arg(long, default_value = "uring")]
    pub io_engine: String,
    /// SDS lease length of the cluster started for the run, in ms (default: the SDS's);
    /// `--lease-ms 0` turns leases off to measure what they cost.
    #[arg(long)]
    pub lease_ms: Option<u64>,
    /// Keep what the run wrote: the data dir it created (its SDS devices take several GiB)
    /// and the qemu-nbd and floor files. Without it they are deleted when the run ends.
    #[arg(long)]
    pub keep_data: bool,
}

/// Benchmarks of `pflex bench` other than the fio jobs.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum OtherBench {
    /// The MDM under the control-plane load of a large cluster (fake nodes through the real
    /// API): heartbeats, volume creates, placement maps, IO tokens, volume list pages.
    Mdm(crate::mdm_bench::MdmBenchArgs),
}

/// One direction (read or write) of one fio job.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    pub iops: f64,
    pub mb_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobResult {
    pub job: String,
    pub target: String,
    pub read: Option<Figures>,
    pub write: Option<Figures>,
    pub error: Option<String>,
}

fn check_tools(targets: &[String]) -> Result<()> {
    let mut tools = vec!["fio", "qemu-nbd"];
    if targets.iter().any(|t| t == "hop") {
        tools.push("nbdkit");
    }
    for tool in tools {
        let ok = std::process::Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            bail!("{tool} is not installed (Debian: apt-get install fio qemu-utils nbdkit)");
        }
    }
    Ok(())
}

pub(crate) fn parse_dir(v: &serde_json::Value) -> Option<Figures> {
    let ios = v.get("total_ios")?.as_u64()?;
    if ios == 0 {
        return None;
    }
    let pct = |p: &str| {
        v.pointer(&format!("/clat_ns/percentile/{p}"))
            .and_then(|x| x.as_f64())
            .map(|ns| ns / 1000.0)
            .unwrap_or(0.0)
    };
    Some(Figures {
        iops: v.get("iops")?.as_f64()?,
        mb_per_s: v.get("bw_bytes")?.as_f64()? / 1e6,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    })
}

async fn run_fio(job: &Path, target_args: &[String]) -> Result<(Option<Figures>, Option<Figures>)> {
    let mut args = target_args.to_vec();
    let doc = match args.first().map(String::as_str) {
        // A launcher (see `tls_fio_launcher`): the program comes first, and
        // the job goes through stdin, since fio's user may not be able to
        // read the checkout.
        Some("setpriv") => {
            let text = std::fs::read(job).with_context(|| format!("reading {}", job.display()))?;
            args.push("-".into());
            fio_json_via(&args[0], &args[1..], Some(text)).await?
        }
        _ => {
            args.push(job.display().to_string());
            fio_json(&args).await?
        }
    };
    let j = doc.pointer("/jobs/0").context("fio JSON has no job")?;
    Ok((j.get("read").and_then(parse_dir), j.get("write").and_then(parse_dir)))
}

/// Runs fio with `args` and JSON output; its document, or why it failed
/// (an exit status, or a job's error).
pub(crate) async fn fio_json(args: &[String]) -> Result<serde_json::Value> {
    fio_json_via("fio", args, None).await
}

/// [`fio_json`] through `program` (fio itself, or a launcher whose
/// arguments end by naming fio).
async fn fio_json_via(
    program: &str,
    args: &[String],
    stdin: Option<Vec<u8>>,
) -> Result<serde_json::Value> {
    use tokio::io::AsyncWriteExt;
    let mut command = tokio::process::Command::new(program);
    if stdin.is_some() {
        // The job comes through stdin; the working directory may not be
        // readable by fio's user.
        command.current_dir("/");
    }
    let mut child = command
        .args(args)
        .arg("--output-format=json")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running fio")?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(&text).await.context("writing the job to fio")?;
    }
    let out = child.wait_with_output().await.context("running fio")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print warnings before the JSON document.
    let start = text.find('{').unwrap_or(0);
    let doc: serde_json::Value = serde_json::from_str(&text[start..]).with_context(|| {
        format!("fio failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim())
    })?;
    let jobs = doc.get("jobs").and_then(|j| j.as_array()).context("fio JSON has no job")?;
    for j in jobs {
        if let Some(err) = j.get("error").and_then(|e| e.as_i64()).filter(|e| *e != 0) {
            bail!("fio job error {err}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
    }
    if !out.status.success() {
        bail!("fio exited {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(doc)
}

/// A qemu-nbd serving a local file, or the nbdkit proxy in front of it
/// (also killed if dropped).
struct Peer {
    child: tokio::process::Child,
}

impl Peer {
    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Port of the hop: `nbdkit nbd` forwarding to the qemu-nbd peer.
fn hop_port(args: &BenchArgs) -> u16 {
    args.peer_port + 1
}

async fn start_hop(args: &BenchArgs) -> Result<Peer> {
    let child = tokio::process::Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "-i", "127.0.0.1", "-p"])
        .arg(hop_port(args).to_string())
        .arg("nbd")
        .arg(format!("uri=nbd://127.0.0.1:{}/peer", args.peer_port))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting nbdkit")?;
    // The proxy lists its upstream's default export, "".
    wait_serving(hop_port(args), "", "nbdkit").await?;
    Ok(Peer { child })
}

async fn wait_serving(port: u16, export: &str, what: &str) -> Result<()> {
    let start = Instant::now();
    while !nbd_probe::export_listed(("127.0.0.1", port), export).await.unwrap_or(false) {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("{what} did not start serving on port {port}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn start_peer(args: &BenchArgs) -> Result<Peer> {
    let file = args.scratch_dir.join("pflex-bench-peer.img");
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&file)?;
    f.set_len(1 << 30)?;
    let child = tokio::process::Command::new("qemu-nbd")
        .args(["-f", "raw", "-x", "peer", "-b", "127.0.0.1", "--persistent", "-e", "8", "-t"])
        .args(["--cache=none", "--aio=io_uring", "-p"])
        .arg(args.peer_port.to_string())
        .arg(&file)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting qemu-nbd")?;
    wait_serving(args.peer_port, "peer", "qemu-nbd").await?;
    Ok(Peer { child })
}

/// Deletes what the run wrote: the data dir if this run created it (a dir that was
/// there before may hold someone's cluster) and the qemu-nbd and floor files.
fn remove_scratch(args: &BenchArgs, created_data_dir: bool) {
    let mut gone = Vec::new();
    if created_data_dir {
        match std::fs::remove_dir_all(&args.data_dir) {
            Ok(()) => gone.push(args.data_dir.clone()),
            Err(e) => eprintln!("bench: could not delete {}: {e}", args.data_dir.display()),
        }
    }
    for name in ["pflex-bench-peer.img", "pflex-bench-floor.img"] {
        let file = args.scratch_dir.join(name);
        match std::fs::remove_file(&file) {
            Ok(()) => gone.push(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("bench: could not delete {}: {e}", file.display()),
        }
    }
    if !gone.is_empty() {
        let list: Vec<String> = gone.iter().map(|p| p.display().to_string()).collect();
        eprintln!("bench: deleted {} (keep them with --keep-data)", list.join(", "));
    }
}

fn fmt_fig(f: &Option<Figures>) -> String {
    match f {
        Some(f) => format!(
            "{:>8.0} IOPS {:>7.1} MB/s p50 {:>7.0} µs p99 {:>7.0} µs",
            f.iops, f.mb_per_s, f.p50_us, f.p99_us
        ),
        None => String::new(),
    }
}

/// `pflex bench`.
pub async fn run(args: BenchArgs) -> Result<()> {
    if let Some(other) = args.other {
        let OtherBench::Mdm(mdm) = *other;
        return crate::mdm_bench::run(mdm).await;
    }
    check_tools(&args.targets)?;
    let mut jobs: Vec<PathBuf> = std::fs::read_dir(&args.jobs_dir)
        .with_context(|| format!("reading job files in {}", args.jobs_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "fio"))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            args.filter.is_empty() || args.filter.iter().any(|f| name.contains(f.as_str()))
        })
        .collect();
    jobs.sort();
    if jobs.is_empty() {
        bail!("no .fio job files in {}", args.jobs_dir.display());
    }

    let mut cluster = None;
    let mut created_data_dir = false;
    let mut peer = None;
    let mut hop = None;
    let mut targets: Vec<(String, Vec<String>)> = Vec::new();
    for t in &args.targets {
        match t.as_str() {
            "pflex" | "pflex-tls" => {
                let tls = t == "pflex-tls";
                let uri = match (&args.uri, tls) {
                    (Some(u), false) => u.clone(),
                    (Some(_), true) => {
                        bail!(
                            "the pflex-tls target needs the cluster started for the run (no --uri)"
                        )
                    }
                    (None, _) => {
                        if cluster.is_none() {
                            if !args.data_dir.exists() {
                                created_data_dir = true;
                            }
                            cluster = Some(up::start(&bench_up_args(&args)).await?);
                        }
                        let up_args = bench_up_args(&args);
                        if tls {
                            format!("nbds://localhost:{}/{}", up_args.nbd_port, up_args.volume)
                        } else {
                            format!("nbd://127.0.0.1:{}/{}", up_args.nbd_port, up_args.volume)
                        }
                    }
                };
                let mut fio = Vec::new();
                if tls {
                    let certs = up::nbd_client_tls_dir(&bench_up_args(&args).data_dir);
                    fio = tls_fio_launcher(&certs, &fio_home(&args))?;
                }
                fio.extend(["--ioengine=nbd".to_string(), format!("--uri={uri}")]);
                targets.push((t.clone(), fio));
            }
            "qemu-nbd" => {
                if peer.is_none() {
                    peer = Some(start_peer(&args).await?);
                }
                targets.push((
                    "qemu-nbd".into(),
                    vec![
                        "--ioengine=nbd".into(),
                        format!("--uri=nbd://127.0.0.1:{}/peer", args.peer_port),
                    ],
                ));
            }
            "floor" => {
                let file = args.scratch_dir.join("pflex-bench-floor.img");
                targets.push((
                    "floor".into(),
                    vec![
                        "--ioengine=io_uring".into(),
                        "--direct=1".into(),
                        format!("--filename={}", file.display()),
                    ],
                ));
            }
            "hop" => {
                if peer.is_none() {
                    peer = Some(start_peer(&args).await?);
                }
                hop = Some(start_hop(&args).await?);
                targets.push((
                    "hop".into(),
                    vec![
                        "--ioengine=nbd".into(),
                        format!("--uri=nbd://127.0.0.1:{}/", hop_port(&args)),
                    ],
                ));
            }
            other => bail!("unknown target {other:?} (pflex, pflex-tls, qemu-nbd, floor, hop)"),
        }
    }

    let mut results = Vec::new();
    for job in &jobs {
        let name = job.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        for (target, targs) in &targets {
            eprintln!("bench: {name} on {target}");
            let r = run_fio(job, targs).await;
            let (read, write, error) = match r {
                Ok((r, w)) => (r, w, None),
                Err(e) => (None, None, Some(format!("{e:#}"))),
            };
            let jr = JobResult { job: name.clone(), target: target.clone(), read, write, error };
            let mut label = format!("{:<34} {:<9}", jr.job, jr.target);
            for (dir, fig) in [("R", &jr.read), ("W", &jr.write)] {
                if fig.is_some() {
                    println!("{label} {dir} {}", fmt_fig(fig));
                    label = " ".repeat(44);
                }
            }
            if let Some(e) = &jr.error {
                println!("{label} ERROR {e}");
            }
            results.push(jr);
        }
    }
    if let Some(h) = hop {
        h.stop().await;
    }
    if let Some(p) = peer {
        p.stop().await;
    }
    if let Some(mut c) = cluster {
        c.stop().await;
    }
    if !args.keep_data {
        remove_scratch(&args, created_data_dir);
    }
    // Copies of the client key: never kept.
    let _ = std::fs::remove_dir_all(fio_home(&args));

    let ratios = print_ratios(&jobs, &results, "pflex", "qemu-nbd");
    let hop_ratios = print_ratios(&jobs, &results, "hop", "qemu-nbd");
    let tls_ratios = print_ratios(&jobs, &results, "pflex-tls", "pflex");
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "results": results,
            "ratios_to_qemu_nbd": ratios,
            "hop_ratios_to_qemu_nbd": hop_ratios,
            "tls_ratios_to_plain": tls_ratios,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: numbers written to {}", path.display());
    }
    if let Some(bad) = results.iter().find(|r| r.error.is_some()) {
        bail!("job {} on {} failed", bad.job, bad.target);
    }
    Ok(())
}

/// fio's home for the pflex-tls target (removed when the run ends).
fn fio_home(args: &BenchArgs) -> PathBuf {
    args.scratch_dir.join("pflex-bench-fio-home")
}

/// How fio reaches a TLS export with the cluster's client certificate.
/// fio's nbd engine refuses URIs that name local files (`tls-certificates=`),
/// so the certificates go where libnbd looks by default, and libnbd looks in
/// `$HOME/.pki/libnbd` only for a user other than root: fio runs as `nobody`
/// with `HOME` set to a directory of its own holding a copy of them.
fn tls_fio_launcher(certs: &Path, home: &Path) -> Result<Vec<String>> {
    use std::os::unix::fs::PermissionsExt;
    const NOBODY: u32 = 65534;
    let pki = home.join(".pki").join("libnbd");
    std::fs::create_dir_all(&pki).with_context(|| format!("creating {}", pki.display()))?;
    for name in [pflex_tls::CA_CERT, pflex_tls::CLIENT_CERT, pflex_tls::CLIENT_KEY] {
        let to = pki.join(name);
        std::fs::copy(certs.join(name), &to)
            .with_context(|| format!("copying {} to {}", name, pki.display()))?;
        std::os::unix::fs::chown(&to, Some(NOBODY), Some(NOBODY))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))?;
    }
    for dir in [home, &home.join(".pki"), &pki] {
        std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(vec![
        "setpriv".into(),
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
        "env".into(),
        format!("HOME={}", home.display()),
        "fio".into(),
    ])
}

/// The cluster `pflex bench` starts when it is not given `--uri`.
fn bench_up_args(args: &BenchArgs) -> UpArgs {
    let mut up_args = UpArgs::for_bench(&args.data_dir, &args.io_engine);
    up_args.lease_ms = args.lease_ms;
    up_args
}

/// Prints (and returns) `target`'s IOPS, p50 and MB/s ratios to `base` per job.
fn print_ratios(
    jobs: &[PathBuf],
    results: &[JobResult],
    target: &str,
    base: &str,
) -> Vec<serde_json::Value> {
    let find =
        |job: &str, target: &str| results.iter().find(|r| r.job == job && r.target == target);
    let mut ratios = Vec::new();
    let mut header = false;
    for job in jobs {
        let name = job.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let (Some(p), Some(q)) = (find(&name, target), find(&name, base)) else { continue };
        if !std::mem::replace(&mut header, true) {
            println!("\n{target} / {base} (IOPS ratio, p50 latency ratio):");
        }
        for (dir, pf, qf) in [("read", &p.read, &q.read), ("write", &p.write, &q.write)] {
            if let (Some(pf), Some(qf)) = (pf, qf) {
                let iops = pf.iops / qf.iops.max(1e-9);
                let p50 = pf.p50_us / qf.p50_us.max(1e-9);
                println!("  {name:<34} {dir:<5} IOPS ×{iops:.2}  p50 ×{p50:.2}");
                ratios.push(serde_json::json!({"job": name, "dir": dir, "iops_ratio": iops, "p50_ratio": p50}));
            }
        }
    }
    ratios
}
