//! `pflex bench mdm`: the MDM under the control-plane load of a large
//! cluster, through its real HTTP API.
//!
//! Fake SDS and SDC nodes register with the join key, exactly as real ones
//! do, and heartbeat every `--heartbeat-secs`, spread evenly over the
//! interval. Volumes are created up to each size of `--volumes`; at each
//! size, in windows of `--window-secs` one after the other, SDCs request IO
//! tokens as fast as `--token-clients` callers can, then fetch placement
//! maps, then pages of `GET /vol/list` are read, then volumes are created
//! one at a time, while the heartbeats go on throughout. Every request's
//! latency is recorded; the report gives count, rate, p50, p99 and the
//! worst, per operation and size, beside the goals the MDM is built for.
//!
//! Without `--mdm-url` an MDM is started for the run (plain HTTP on
//! loopback, in `--data-dir`) and stopped afterwards.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pflex_mdm_client::MdmClient;
use pflex_proto::api::{
    DeviceInfo, HeartbeatRequest, NodeMetrics, NodeType, RegisterRequest, VolumeCreate, VolumeMap,
};
use pflex_proto::token::AccessMode;
use serde::Serialize;

/// Options of `pflex bench mdm`.
#[derive(Debug, Clone, clap::Args)]
pub struct MdmBenchArgs {
    /// An MDM already running (then --admin-token-file and --join-key-file are needed);
    /// without it one is started for the run.
    #[arg(long)]
    pub mdm_url: Option<String>,
    /// Admin token of the MDM given by --mdm-url.
    #[arg(long, requires = "mdm_url")]
    pub admin_token_file: Option<PathBuf>,
    /// Join key of the MDM given by --mdm-url.
    #[arg(long, requires = "mdm_url")]
    pub join_key_file: Option<PathBuf>,
    /// Fake SDS nodes to register and keep heartbeating.
    #[arg(long, default_value_t = 1000)]
    pub sds: u64,
    /// Fake SDC clients to register and keep heartbeating.
    #[arg(long, default_value_t = 10_000)]
    pub sdc: u64,
    /// Volume counts to measure at, in increasing order (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    pub volumes: Vec<u64>,
    /// Size of each volume.
    #[arg(long, default_value = "1G", value_parser = pflex_proto::size::parse_size)]
    pub volume_size: u64,
    /// Heartbeat interval of every fake node, seconds.
    #[arg(long, default_value_t = 2)]
    pub heartbeat_secs: u64,
    /// Seconds of measurement at each size.
    #[arg(long, default_value_t = 10)]
    pub window_secs: u64,
    /// Concurrent token requesters during a window.
    #[arg(long, default_value_t = 16)]
    pub token_clients: usize,
    /// Volumes mapped to SDCs (one SDC each), for tokens and map fetches.
    #[arg(long, default_value_t = 1000)]
    pub mapped: u64,
    /// Concurrent volume creators.
    #[arg(long, default_value_t = 8)]
    pub creators: usize,
    /// Data dir of the MDM started for the run.
    #[arg(long, default_value = "/var/tmp/pflex-bench-mdm")]
    pub data_dir: PathBuf,
    /// Port of the MDM started for the run (member N of a replicated one:
    /// this + 10 × (N − 1)).
    #[arg(long, default_value_t = 18001)]
    pub port: u16,
    /// MDMs started for the run: 1, or 3 or 5 replicated (every write is
    /// then committed by a majority before it is answered).
    #[arg(long = "mdm", default_value_t = 1, value_parser = crate::up::mdm_count)]
    pub mdm_count: u16,
    /// Directory of the `mdm` binary (default: beside `pflex`).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Keep the MDM's data dir after the run.
    #[arg(long)]
    pub keep_data: bool,
}

/// Latencies of one operation, in microseconds.
#[derive(Default)]
struct Samples {
    micros: Mutex<Vec<u64>>,
    errors: AtomicU64,
}

impl Samples {
    fn record(&self, started: Instant, ok: bool) {
        if ok {
            let us = started.elapsed().as_micros() as u64;
            self.micros.lock().unwrap_or_else(|p| p.into_inner()).push(us);
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The figures so far, and starts afresh.
    fn take(&self, op: &str, volumes: u64, seconds: f64) -> Figures {
        let mut micros =
            std::mem::take(&mut *self.micros.lock().unwrap_or_else(|p| p.into_inner()));
        micros.sort_unstable();
        let at = |q: f64| -> f64 {
            if micros.is_empty() {
                return 0.0;
            }
            let i = ((micros.len() as f64 - 1.0) * q).round() as usize;
            micros[i] as f64 / 1000.0
        };
        Figures {
            op: op.to_string(),
            volumes,
            count: micros.len() as u64,
            errors: self.errors.swap(0, Ordering::Relaxed),
            per_sec: micros.len() as f64 / seconds.max(0.001),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: at(1.0),
            over_100ms: micros.iter().filter(|&&us| us > 100_000).count() as u64,
        }
    }
}

/// One operation at one size.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub op: String,
    pub volumes: u64,
    pub count: u64,
    pub errors: u64,
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub over_100ms: u64,
}

/// A registered fake node.
#[derive(Clone)]
struct FakeNode {
    id: u64,
    client: MdmClient,
}

/// Runs the benchmark and prints its report.
pub async fn run(args: MdmBenchArgs) -> Result<()> {
    if args.volumes.is_empty() || args.volumes.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--volumes must be increasing counts, e.g. 10000,100000");
    }
    // One connection per fake node, kept open between its heartbeats.
    let files = pflex_dataplane::runtime::raise_open_files_limit()?;
    let needed = args.sds + args.sdc + 256;
    if files < needed {
        bail!(
            "{} fake nodes need {needed} open files; the limit is {files} (ulimit -Hn)",
            args.sds + args.sdc
        );
    }
    let mut started_mdm = Vec::new();
    let (url, admin_token, join_key) = match &args.mdm_url {
        Some(url) => {
            let read = |p: &Option<PathBuf>, what: &str| -> Result<String> {
                let p = p.as_ref().with_context(|| format!("--mdm-url needs --{what}"))?;
                Ok(std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?
                    .trim()
                    .to_string())
            };
            (
                url.clone(),
                read(&args.admin_token_file, "admin-token-file")?,
                read(&args.join_key_file, "join-key-file")?,
            )
        }
        None => {
            let (children, url, token, key) = start_mdm(&args).await?;
            started_mdm = children;
            (url, token, key)
        }
    };
    let result = bench(&args, &url, &admin_token, &join_key).await;
    for child in &mut started_mdm {
        stop(child).await;
    }
    if !started_mdm.is_empty() && !args.keep_data {
        let _ = std::fs::remove_dir_all(&args.data_dir);
    }
    let figures = result?;
    print!("{}", report(&figures));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&figures)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn start_mdm(
    args: &MdmBenchArgs,
) -> Result<(Vec<tokio::process::Child>, String, String, String)> {
    let bins = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.parent().context("pflex has no directory")?.to_path_buf(),
    };
    let mdm = crate::up::binary(&bins, "mdm")?;
    if args.data_dir.exists() {
        std::fs::remove_dir_all(&args.data_dir)
            .with_context(|| format!("clearing {}", args.data_dir.display()))?;
    }
    std::fs::create_dir_all(&args.data_dir)?;
    let join_key = hex::encode(pflex_proto::random_bytes::<32>());
    let key_path = args.data_dir.join("join_key");
    std::fs::write(&key_path, &join_key)?;
    if args.mdm_count > 1 {
        crate::up::provision_mdm_secrets(&args.data_dir, args.mdm_count)?;
    }
    let urls: Vec<String> =
        (0..args.mdm_count).map(|n| format!("http://127.0.0.1:{}", args.port + 10 * n)).collect();
    let mut children = Vec::new();
    for n in 0..args.mdm_count {
        let name = crate::up::mdm_member_name(n);
        let log = std::fs::File::create(args.data_dir.join(format!("{name}.log")))?;
        let mut mdm_args = pflex_launch::mdm_args(
            &format!("127.0.0.1:{}", args.port + 10 * n),
            &args.data_dir.join(&name),
            Some(&key_path.display().to_string()),
            &args.heartbeat_secs.to_string(),
        );
        // The fake nodes never fail: nothing should be re-placed under the load.
        mdm_args.extend(["--failed-after-secs".into(), "3600".into()]);
        mdm_args.extend(["--stale-after-secs".into(), "1800".into()]);
        mdm_args.extend(pflex_launch::mdm_member_args(usize::from(n), &urls));
        let mut command = tokio::process::Command::new(&mdm);
        command.args(&mdm_args).stdout(log.try_clone()?).stderr(log).kill_on_drop(true);
        // SAFETY: prctl(2) is async-signal-safe; between fork and exec it only
        // asks the kernel to end the MDM with this process.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            })
        };
        children.push(command.spawn().with_context(|| format!("starting {}", mdm.display()))?);
    }
    let token_path = args.data_dir.join("mdm").join("admin_token");
    let url = urls.join(",");
    let mut admin = String::new();
    crate::lab::wait_until("the MDM", Duration::from_secs(30), || {
        let token = std::fs::read_to_string(&token_path).ok().map(|t| t.trim().to_string());
        if let Some(t) = &token {
            admin.clone_from(t);
        }
        let url = url.clone();
        async move {
            let Some(token) = token else { return false };
            let Ok(client) = MdmClient::new(&url, Some(token)) else { return false };
            client.health_status().await.is_ok()
        }
    })
    .await?;
    Ok((children, url, admin, join_key))
}

async fn stop(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on the PID of a child this process started and has
        // not reaped; SIGTERM lets it close its database.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

async fn bench(
    args: &MdmBenchArgs,
    url: &str,
    admin_token: &str,
    join_key: &str,
) -> Result<Vec<Figures>> {
    let admin = MdmClient::new(url, Some(admin_token.to_string()))?;
    let anonymous = MdmClient::new(url, None)?;
    let registration = Arc::new(Samples::default());
    let t = Instant::now();
    let sds = register_all(&anonymous, join_key, NodeType::Sds, args.sds, &registration).await?;
    let sdc = register_all(&anonymous, join_key, NodeType::Sdc, args.sdc, &registration).await?;
    let mut figures = vec![registration.take("register", 0, t.elapsed().as_secs_f64())];
    eprintln!("registered {} SDS and {} SDC nodes", sds.len(), sdc.len());

    let heartbeats = Arc::new(Samples::default());
    let stop = Arc::new(AtomicBool::new(false));
    let nodes: Vec<FakeNode> = sds.iter().chain(&sdc).cloned().collect();
    let catching_up = Arc::new(CatchingUp::new());
    let beating = spawn_heartbeats(nodes, args.heartbeat_secs, &heartbeats, &catching_up, &stop);

    let outcome = async {
        let creates = Arc::new(Samples::default());
        let mut created = 0u64;
        let mut mapped: Vec<(u64, FakeNode)> = Vec::new();
        for &target in &args.volumes {
            let t = Instant::now();
            create_volumes(&admin, created, target, args, &creates).await?;
            let secs = t.elapsed().as_secs_f64();
            created = target;
            figures.push(creates.take("create (bulk)", target, secs));
            figures.push(heartbeats.take("heartbeat (during creates)", target, secs));
            eprintln!("{target} volumes created");
            let mapping = Instant::now();
            while (mapped.len() as u64) < args.mapped.min(target) && !sdc.is_empty() {
                let volume = mapped.len() as u64 + 1;
                let node = sdc[(volume as usize) % sdc.len()].clone();
                admin
                    .volume_map(&VolumeMap {
                        volume: format!("bench-{volume}"),
                        sdc: format!("bench-sdc-{}", volume as usize % sdc.len()),
                        access_mode: AccessMode::ReadWrite,
                    })
                    .await
                    .with_context(|| format!("mapping bench-{volume}"))?;
                let id = admin.volume_show(format!("bench-{volume}")).await?.id;
                mapped.push((id, node));
            }
            // Every SDS hears of the new mappings over its next heartbeats,
            // a bounded number per reply: measured apart (with the mapping),
            // and over before the windows start.
            catching_up.settle(Duration::from_secs(args.heartbeat_secs.max(1))).await?;
            figures.push(heartbeats.take(
                "heartbeat (mapping, catch-up)",
                target,
                mapping.elapsed().as_secs_f64(),
            ));
            figures.extend(window(args, &admin, &mapped, target, &heartbeats).await?);
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in beating {
        let _ = task.await;
    }
    outcome?;
    Ok(figures)
}

async fn register_all(
    anonymous: &MdmClient,
    join_key: &str,
    node_type: NodeType,
    count: u64,
    samples: &Arc<Samples>,
) -> Result<Vec<FakeNode>> {
    let next = Arc::new(AtomicU64::new(0));
    let nodes = Arc::new(Mutex::new(Vec::with_capacity(count as usize)));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (anonymous, next, nodes, samples) =
            (anonymous.clone(), next.clone(), nodes.clone(), samples.clone());
        let join_key = join_key.to_string();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<_, anyhow::Error>(());
                }
                let is_sds = node_type == NodeType::Sds;
                let request = RegisterRequest {
                    join_key: join_key.clone(),
                    enrollment_token: None,
                    credential: None,
                    node_type,
                    name: format!("bench-{}-{i}", if is_sds { "sds" } else { "sdc" }),
                    host: "127.0.0.1".to_string(),
                    control_port: 20_000 + (i % 40_000) as u16,
                    mgmt_port: 20_000 + (i % 40_000) as u16,
                    data_port: 20_000 + (i % 40_000) as u16,
                    // Ten fault sets, so every volume finds two.
                    fault_set: is_sds.then(|| format!("fs{}", i % 10)),
                    pool: None,
                    devices: if is_sds {
                        vec![DeviceInfo {
                            path: "/dev/fake".to_string(),
                            capacity_bytes: 64 << 40,
                            used_bytes: 0,
                        }]
                    } else {
                        Vec::new()
                    },
                    data_cluster_id: None,
                };
                let t = Instant::now();
                let reply = anonymous.register(&request).await;
                samples.record(t, reply.is_ok());
                let reply = reply.with_context(|| format!("registering {}", request.name))?;
                let client = anonymous.clone().with_credential(reply.credential);
                nodes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((i, FakeNode { id: reply.node_id, client }));
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let mut nodes = std::mem::take(&mut *nodes.lock().unwrap_or_else(|p| p.into_inner()));
    nodes.sort_by_key(|(i, _)| *i);
    Ok(nodes.into_iter().map(|(_, n)| n).collect())
}

/// When a heartbeat reply last said more changes follow its cursor.
struct CatchingUp {
    epoch: Instant,
    /// Microseconds after `epoch`; 0 for never.
    last_more_at: AtomicU64,
}

impl CatchingUp {
    /// Longest wait for the nodes to catch up.
    const PATIENCE: Duration = Duration::from_secs(120);

    fn new() -> Self {
        Self { epoch: Instant::now(), last_more_at: AtomicU64::new(0) }
    }

    fn seen(&self, at: Instant) {
        let micros = at.saturating_duration_since(self.epoch).as_micros().max(1) as u64;
        self.last_more_at.fetch_max(micros, Ordering::Relaxed);
    }

    /// Returns once a whole heartbeat `period` went by, since the call and
    /// since the last reply that said more changes follow.
    async fn settle(&self, period: Duration) -> Result<()> {
        let (called, deadline) = (Instant::now(), Instant::now() + Self::PATIENCE);
        loop {
            let last_more =
                self.epoch + Duration::from_micros(self.last_more_at.load(Ordering::Relaxed));
            let quiet_from = last_more.max(called) + period;
            let now = Instant::now();
            if now >= quiet_from {
                return Ok(());
            }
            if now >= deadline {
                bail!("the nodes were still catching up on changes after {:?}", Self::PATIENCE);
            }
            tokio::time::sleep_until(quiet_from.min(deadline).into()).await;
        }
    }
}

/// Every node heartbeats once per `period_secs`, node `i` at offset
/// `i / n` of the period, from 64 tasks.
fn spawn_heartbeats(
    nodes: Vec<FakeNode>,
    period_secs: u64,
    samples: &Arc<Samples>,
    catching_up: &Arc<CatchingUp>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    // About 20 nodes per task, each beat awaited in turn: a task keeps up
    // while a beat takes under a tenth of the period, so the MDM is offered
    // every node's beats rather than what a few tasks manage.
    let tasks = (nodes.len() / 20).clamp(64, 1024).min(nodes.len()).max(1);
    let period = Duration::from_secs(period_secs.max(1));
    let n = nodes.len().max(1) as u32;
    let start = tokio::time::Instant::now();
    let nodes = Arc::new(nodes);
    (0..tasks)
        .map(|k| {
            let (nodes, samples, stop) = (nodes.clone(), samples.clone(), stop.clone());
            let catching_up = catching_up.clone();
            tokio::spawn(async move {
                let mine: Vec<usize> = (k..nodes.len()).step_by(tasks).collect();
                if mine.is_empty() {
                    return;
                }
                let mut cursors: Vec<Option<u64>> = vec![None; mine.len()];
                for round in 0u32.. {
                    for (slot, &i) in mine.iter().enumerate() {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let due = start + period * round + period * (i as u32) / n;
                        tokio::time::sleep_until(due).await;
                        let node = &nodes[i];
                        let request = HeartbeatRequest {
                            node_id: node.id,
                            metrics: NodeMetrics { capacity_bytes: 64 << 40, ..Default::default() },
                            volumes_since: cursors[slot],
                        };
                        let t = Instant::now();
                        let reply = node.client.heartbeat(&request).await;
                        samples.record(t, reply.is_ok());
                        if let Ok(reply) = reply {
                            if reply.volumes_more {
                                catching_up.seen(Instant::now());
                            }
                            cursors[slot] = Some(reply.volumes_cursor);
                        }
                    }
                }
            })
        })
        .collect()
}

async fn create_volumes(
    admin: &MdmClient,
    from: u64,
    to: u64,
    args: &MdmBenchArgs,
    samples: &Arc<Samples>,
) -> Result<()> {
    let next = Arc::new(AtomicU64::new(from + 1));
    let mut tasks = Vec::new();
    for _ in 0..args.creators.max(1) {
        let (admin, next, samples) = (admin.clone(), next.clone(), samples.clone());
        let size = args.volume_size;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i > to {
                    return Ok::<_, anyhow::Error>(());
                }
                let t = Instant::now();
                let created = admin
                    .volume_create(&VolumeCreate {
                        name: format!("bench-{i}"),
                        size_bytes: size,
                        pool: None,
                        thick: false,
                    })
                    .await;
                samples.record(t, created.is_ok());
                created.with_context(|| format!("creating bench-{i}"))?;
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// The measurement windows at `volumes` volumes: one per kind of request,
/// each `--window-secs` long, while the heartbeats go on throughout. Each
/// kind is measured beside the cluster's load (the heartbeats), not beside
/// the other kinds' saturating load: token requesters run flat out, and a
/// placement map measured behind them would measure their queue.
async fn window(
    args: &MdmBenchArgs,
    admin: &MdmClient,
    mapped: &[(u64, FakeNode)],
    volumes: u64,
    heartbeats: &Arc<Samples>,
) -> Result<Vec<Figures>> {
    let window = Duration::from_secs(args.window_secs);
    heartbeats.take("", 0, 1.0);
    let mapped = Arc::new(mapped.to_vec());
    let pick =
        |k: usize, round: u64, len: usize| (k * 7919 + round as usize * 104_729) % len.max(1);
    let mut report = WindowReport { heartbeats, volumes, figures: Vec::new() };

    let tokens = Arc::new(Samples::default());
    let (until, started) = (Instant::now() + window, Instant::now());
    let mut tasks = Vec::new();
    for k in 0..args.token_clients {
        let (mapped, tokens) = (mapped.clone(), tokens.clone());
        tasks.push(tokio::spawn(async move {
            let mut round = 0;
            while Instant::now() < until && !mapped.is_empty() {
                let (volume, node) = &mapped[pick(k, round, mapped.len())];
                let t = Instant::now();
                let ok = node.client.request_token(*volume, AccessMode::ReadWrite).await.is_ok();
                tokens.record(t, ok);
                round += 1;
            }
        }));
    }
    report.close(&mut tasks, started, &tokens, "token request", "token requests").await?;

    let maps = Arc::new(Samples::default());
    let (until, started) = (Instant::now() + window, Instant::now());
    for k in 0..2 {
        let (mapped, maps) = (mapped.clone(), maps.clone());
        tasks.push(tokio::spawn(async move {
            let mut round = 0;
            while Instant::now() < until && !mapped.is_empty() {
                let (volume, node) = &mapped[pick(k + 100, round, mapped.len())];
                let t = Instant::now();
                maps.record(t, node.client.placement(volume).await.is_ok());
                round += 1;
            }
        }));
    }
    report.close(&mut tasks, started, &maps, "placement map", "maps").await?;

    let pages = Arc::new(Samples::default());
    let (until, started) = (Instant::now() + window, Instant::now());
    {
        let (admin, pages) = (admin.clone(), pages.clone());
        tasks.push(tokio::spawn(async move {
            let mut round = 0u64;
            while Instant::now() < until {
                let after = (round * 7919) % volumes.max(1);
                let t = Instant::now();
                pages.record(t, admin.volume_page(after, 1000).await.is_ok());
                round += 1;
            }
        }));
    }
    report.close(&mut tasks, started, &pages, "vol list page (1000)", "list pages").await?;

    // A steady trickle of creates (and deletes of what it created), to
    // measure one create at this size without a bulk load beside it.
    let creates = Arc::new(Samples::default());
    let (until, started) = (Instant::now() + window, Instant::now());
    {
        let (admin, creates) = (admin.clone(), creates.clone());
        let size = args.volume_size;
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < until {
                let name = format!("bench-trickle-{volumes}-{i}");
                let t = Instant::now();
                let ok = admin
                    .volume_create(&VolumeCreate {
                        name: name.clone(),
                        size_bytes: size,
                        pool: None,
                        thick: false,
                    })
                    .await
                    .is_ok();
                creates.record(t, ok);
                let _ = admin.volume_delete(&name).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                i += 1;
            }
        }));
    }
    report.close(&mut tasks, started, &creates, "create (alone)", "creates").await?;

    Ok(report.figures)
}

/// The figures of the windows at one size.
struct WindowReport<'a> {
    heartbeats: &'a Samples,
    volumes: u64,
    figures: Vec<Figures>,
}

impl WindowReport<'_> {
    /// Waits for the callers of a window, then reports its requests
    /// (`samples` as `op`) and the heartbeats heard meanwhile (beside
    /// `beside`).
    async fn close(
        &mut self,
        tasks: &mut Vec<tokio::task::JoinHandle<()>>,
        started: Instant,
        samples: &Samples,
        op: &str,
        beside: &str,
    ) -> Result<()> {
        for task in tasks.drain(..) {
            task.await?;
        }
        let secs = started.elapsed().as_secs_f64();
        // When it ran, to line the window up with the MDMs' logs.
        let ended = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        eprintln!("window {op:?}: unix time {:.3} to {ended:.3}", ended - secs);
        let heartbeats = format!("heartbeat (beside {beside})");
        self.figures.push(self.heartbeats.take(&heartbeats, self.volumes, secs));
        self.figures.push(samples.take(op, self.volumes, secs));
        Ok(())
    }
}

/// The goals of the MDM at 10x the seed's cluster, per operation.
fn goal(op: &str) -> &'static str {
    match op {
        op if op.starts_with("heartbeat") => "p99 <= 50, max <= 100",
        "token request" => ">= 2000/s, p99 <= 20",
        "placement map" => "p99 <= 10",
        "create (bulk)" | "create (alone)" => "p99 <= 50",
        _ => "",
    }
}

/// The report as a table.
pub fn report(figures: &[Figures]) -> String {
    let mut out = format!(
        "{:<34} {:>8} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>6}  goal (ms)\n",
        "operation", "volumes", "count", "errors", "per s", "p50 ms", "p99 ms", "max ms", ">100ms"
    );
    for f in figures {
        out.push_str(&format!(
            "{:<34} {:>8} {:>8} {:>7} {:>9.0} {:>9.2} {:>9.2} {:>9.2} {:>6}  {}\n",
            f.op,
            f.volumes,
            f.count,
            f.errors,
            f.per_sec,
            f.p50_ms,
            f.p99_ms,
            f.max_ms,
            f.over_100ms,
            goal(&f.op)
        ));
    }
    out
}
