//! `pflex lab chaos SCENARIO`: one fault, injected into a fresh lab while
//! `pflex verify` writes through NBD, then checked.
//!
//! Each run brings a lab up (its own data dir, namespaces and addresses),
//! starts `pflex verify write` at the given queue depth, injects the fault on
//! a fixed timeline, undoes it (heal, SIGCONT, restart), lets the writer
//! finish, runs `pflex verify check`, then waits until the cluster has
//! recovered (every SDS ACTIVE, no rebuild running) and both copies of every
//! chunk the writer touched are equal. The report gives acknowledged writes,
//! lost, stale and torn blocks, the longest stall and the recovery time. The
//! lab is removed afterwards, pass or fail.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pflex_mdm_client::MdmClient;
use pflex_proto::api::{CopyKind, MovementPolicy};
use serde::Serialize;

use crate::lab::{self, wait_until, LabUp};

/// A fault the suite knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// `kill -9` of sds2, restarted 5 s later.
    KillSds,
    /// SIGSTOP of sds2 for 7 s (longer than the IO timeout), then SIGCONT.
    StopSds,
    /// sds1 cut from the MDM only for 10 s (the MDM fails it after 5 s of silence).
    CutPrimaryFromMdm,
    /// sds1 cut from the SDC only, for 4 s.
    CutSdsFromSdc,
    /// sds1 cut from its peer sds2 only, for 4 s.
    CutSdsFromPeer,
    /// The MDM killed for --mdm-down-secs, then restarted; tokens live twice
    /// that plus 10 s, so a renewal falls inside the outage.
    MdmDown,
    /// The SDC's and the SDS's data-plane connections reset (`ss -K`) five
    /// times while writes to the same blocks are in flight.
    ConnectionReset,
    /// sds2 killed; once its copies are rebuilt, sds3 killed (four SDS).
    TwoFailures,
    /// sds1's device hangs (every IO held) and stays hung: sds1 fails the
    /// device after its IO deadline and the MDM moves its copies.
    DeviceHang,
    /// sds1's device returns EIO from then on: the same.
    DeviceEio,
    /// A fourth SDS (a spare host) starts while the writer runs over a
    /// volume whose other blocks are full: copies move onto it (at 5 MB/s
    /// per SDS, so moves outlast the writer) until every node's capacity
    /// use is within 5 percentage points.
    AddSds,
    /// sds4 of four is drained and removed (`pflex sds remove`) while the
    /// writer runs over a full volume; a watcher polls the placement map and
    /// counts every moment a PG had fewer than two complete copies.
    DrainSds,
    /// Three MDMs; the leader is killed (`kill -9`) and restarted 5 s later.
    /// The control plane must serve a volume create within 5 s of the kill,
    /// and every change acknowledged before it must still be there.
    KillMdmLeader,
    /// Three MDMs; the leader is cut from the other two for 7 s (still
    /// reachable by every other host). It must stop answering once the
    /// others have elected a leader; after the heal every member holds the
    /// same log.
    CutMdmLeader,
    /// Three MDMs; one member (`mdm3`) is killed for good, removed from the
    /// cluster (`pflex mdm remove`), and a new member with an empty database
    /// is started on its host and added (`pflex mdm add`). It must catch up
    /// to the leader (one history), and no acknowledged change is lost.
    ReplaceMdm,
}

impl Scenario {
    pub const ALL: [Scenario; 15] = [
        Scenario::KillSds,
        Scenario::StopSds,
        Scenario::CutPrimaryFromMdm,
        Scenario::CutSdsFromSdc,
        Scenario::CutSdsFromPeer,
        Scenario::MdmDown,
        Scenario::ConnectionReset,
        Scenario::TwoFailures,
        Scenario::DeviceHang,
        Scenario::DeviceEio,
        Scenario::AddSds,
        Scenario::DrainSds,
        Scenario::KillMdmLeader,
        Scenario::CutMdmLeader,
        Scenario::ReplaceMdm,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::KillSds => "kill-sds",
            Scenario::StopSds => "stop-sds",
            Scenario::CutPrimaryFromMdm => "cut-primary-from-mdm",
            Scenario::CutSdsFromSdc => "cut-sds-from-sdc",
            Scenario::CutSdsFromPeer => "cut-sds-from-peer",
            Scenario::MdmDown => "mdm-down",
            Scenario::ConnectionReset => "connection-reset",
            Scenario::TwoFailures => "two-failures",
            Scenario::DeviceHang => "device-hang",
            Scenario::DeviceEio => "device-eio",
            Scenario::AddSds => "add-sds",
            Scenario::DrainSds => "drain-sds",
            Scenario::KillMdmLeader => "kill-mdm-leader",
            Scenario::CutMdmLeader => "cut-mdm-leader",
            Scenario::ReplaceMdm => "replace-mdm",
        }
    }

    fn mdm_members(self) -> u16 {
        match self {
            Scenario::KillMdmLeader | Scenario::CutMdmLeader | Scenario::ReplaceMdm => 3,
            _ => 1,
        }
    }
}

/// Options of `pflex lab chaos`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// The scenario (or `all`, one after the other).
    #[arg(value_enum)]
    pub scenario: Vec<Scenario>,
    /// Queue depths to run the checker at, one fresh lab each.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub qd: Vec<u32>,
    /// How long the MDM stays down in `mdm-down` (600 for the full ten minutes).
    #[arg(long, default_value_t = 20)]
    pub mdm_down_secs: u64,
    /// Namespace prefix and address octet of the labs (see `pflex lab up`).
    #[arg(long, default_value = "chaos")]
    pub name: String,
    #[arg(long, default_value_t = 214)]
    pub net: u8,
    /// Print the reports as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The outcome of one scenario at one queue depth.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    pub scenario: String,
    pub qd: u32,
    pub acknowledged: u64,
    pub write_errors: u64,
    pub lost: u64,
    pub stale: u64,
    pub torn: u64,
    pub unexpected: u64,
    pub longest_stall_ms: u64,
    /// From the end of the fault (restart, heal, SIGCONT) until every SDS
    /// was ACTIVE again and no rebuild ran (copies are compared after the
    /// writer stopped).
    pub recovery_ms: u64,
    pub chunks_compared: u64,
    /// Copy jobs the MDM ran for the fault: resyncs of a copy that came
    /// back (only the chunks written meanwhile) and full rebuilds elsewhere.
    pub resync_jobs: u64,
    pub resync_chunks: u64,
    pub rebuild_jobs: u64,
    pub rebuild_chunks: u64,
    /// Moves of rebalance and drain, and the chunks they sent.
    pub move_jobs: u64,
    pub move_chunks: u64,
    /// Largest minus smallest capacity use across the SDS nodes at the end,
    /// in percentage points (add-sds and drain-sds).
    pub capacity_spread_points: Option<f64>,
    /// Placement polls that found a PG with fewer than two complete copies
    /// (degraded, or a copy still being rebuilt); drain-sds and add-sds.
    pub single_copy_windows: u64,
    /// Placement epochs the watcher saw.
    pub epochs_watched: u64,
    /// MDM leader faults: from the fault until a volume create succeeded.
    pub control_plane_ms: Option<u64>,
    /// Volumes whose creation was acknowledged and that were missing after.
    pub control_changes_lost: u64,
    /// Requests the cut-off MDM leader answered after another was elected.
    pub deposed_leader_answers: u64,
    pub passed: bool,
}

/// `pflex lab chaos`: every scenario at every queue depth; fails if any did.
pub async fn run(dir: &Path, args: ChaosArgs) -> Result<()> {
    let scenarios =
        if args.scenario.is_empty() { Scenario::ALL.to_vec() } else { args.scenario.clone() };
    let mut reports = Vec::new();
    for scenario in scenarios {
        for &qd in &args.qd {
            let run_dir = dir.join(format!("{}-qd{qd}", scenario.name()));
            let report = run_one(&run_dir, scenario, qd, &args).await?;
            if !args.json {
                println!(
                    "{:<22} qd {:<3} acknowledged {:>7}  errors {}  lost {}  stale {}  torn {}  stall {:>5} ms  recovery {:>6} ms  resync {}/{}  rebuild {}/{}  move {}/{}{}  {}",
                    report.scenario,
                    report.qd,
                    report.acknowledged,
                    report.write_errors,
                    report.lost,
                    report.stale,
                    report.torn,
                    report.longest_stall_ms,
                    report.recovery_ms,
                    report.resync_chunks,
                    report.resync_jobs,
                    report.rebuild_chunks,
                    report.rebuild_jobs,
                    report.move_chunks,
                    report.move_jobs,
                    report.control_plane_ms.map_or(String::new(), |ms| format!(
                        "  {} in {ms} ms, {} changes lost, {} answers from the deposed leader",
                        if scenario == Scenario::ReplaceMdm {
                            "new member caught up"
                        } else {
                            "control plane back"
                        },
                        report.control_changes_lost,
                        report.deposed_leader_answers
                    )),
                    if report.passed { "ok" } else { "FAILED" }
                );
            }
            reports.push(report);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    if reports.iter().any(|r| !r.passed) {
        bail!("a scenario lost, tore or served stale data, or did not recover");
    }
    Ok(())
}

/// One fresh lab, one scenario, one queue depth; the lab is removed after.
pub async fn run_one(
    dir: &Path,
    scenario: Scenario,
    qd: u32,
    args: &ChaosArgs,
) -> Result<ChaosReport> {
    if dir.exists() {
        let _ = lab::down(dir).await;
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let moving = matches!(scenario, Scenario::AddSds | Scenario::DrainSds);
    let up = LabUp {
        mdm_count: scenario.mdm_members(),
        sds: if matches!(scenario, Scenario::TwoFailures | Scenario::DrainSds) { 4 } else { 3 },
        spare_sds: u16::from(scenario == Scenario::AddSds),
        spare_mdm: scenario == Scenario::ReplaceMdm,
        name: args.name.clone(),
        net: args.net,
        // Data movement is watched on nodes about half full.
        device_size: if moving { 512 << 20 } else { 1 << 30 },
        volume_size: if moving { 384 << 20 } else { 256 << 20 },
        heartbeat_interval_secs: 1,
        // Short where the scenario needs copies rebuilt elsewhere; long
        // elsewhere, so a node that comes back is resynced.
        failure_timeout_secs: match scenario {
            Scenario::CutPrimaryFromMdm | Scenario::TwoFailures => 5,
            _ => 120,
        },
        // The MDM outage covers a token renewal (due at a third of the
        // lifetime) and ends before expiry: IO must go on through a failed
        // renewal, then renew once the MDM is back.
        token_ttl_secs: if scenario == Scenario::MdmDown {
            2 * (args.mdm_down_secs + 5)
        } else {
            3600
        },
        io_retry_secs: 30,
        bin_dir: None,
        no_tls: false,
        // One CA for every scenario's lab: this process trusts the first it meets.
        ca_dir: dir.parent().map(|root| root.join("tls").join("ca")),
    };
    lab::up_lab(dir, &up).await?;
    let outcome = drive(dir, scenario, qd, args).await;
    let down = lab::down(dir).await;
    let report = outcome?;
    down?;
    Ok(report)
}

fn pflex_exe() -> Result<PathBuf> {
    std::env::current_exe().context("locating the pflex binary")
}

async fn pflex(args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(pflex_exe()?).args(args).output().await?;
    if !out.status.success() {
        bail!("pflex {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn lab_cmd(dir: &Path, args: &[&str]) -> Result<String> {
    let d = dir.display().to_string();
    let mut all = vec!["lab", "--data-dir", d.as_str()];
    all.extend_from_slice(args);
    pflex(&all).await
}

async fn node_start(dir: &Path, host: &str) -> Result<()> {
    let d = dir.display().to_string();
    pflex(&["node", "start", host, "--data-dir", &d]).await.map(|_| ())
}

/// `ss -K` the data-plane connections between the SDC and sds1, on both sides.
async fn reset_connections(layout: &lab::LabLayout) -> Result<()> {
    let sdc = layout.hosts.iter().find(|h| h.name == "sdc1").context("no sdc1")?;
    let sds = layout.hosts.iter().find(|h| h.name == "sds1").context("no sds1")?;
    for (ns, peer) in [(&sdc.namespace, &sds.address), (&sds.namespace, &sdc.address)] {
        let out = tokio::process::Command::new("ip")
            .args(["netns", "exec", ns, "ss", "-K", "-tn", "dst", peer])
            .output()
            .await?;
        if !out.status.success() {
            bail!("ss -K in {ns}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

async fn drive(dir: &Path, scenario: Scenario, qd: u32, args: &ChaosArgs) -> Result<ChaosReport> {
    let layout: lab::LabLayout =
        serde_json::from_str(&std::fs::read_to_string(dir.join("lab.json"))?)?;
    let state = dir.join("verify.state");
    let write_secs: u64 = match scenario {
        Scenario::MdmDown => args.mdm_down_secs + 10,
        Scenario::TwoFailures => 30,
        Scenario::CutPrimaryFromMdm => 18,
        Scenario::AddSds | Scenario::DrainSds => 12,
        Scenario::ReplaceMdm => 20,
        _ => 14,
    };
    let moving = matches!(scenario, Scenario::AddSds | Scenario::DrainSds);
    if moving {
        fill_beyond_checker(&layout.nbd_uri).await?;
    }
    let writer = tokio::process::Command::new(pflex_exe()?)
        .args(["verify", "write", &layout.nbd_uri, "--state"])
        .arg(&state)
        .args(["--qd", &qd.to_string(), "--duration", &write_secs.to_string(), "--blocks", "16384"])
        .arg("--json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let t0 = Instant::now();
    let at = |secs: f64| async move {
        let due = t0 + Duration::from_secs_f64(secs);
        tokio::time::sleep_until(due.into()).await;
    };
    let mdm = admin_client(dir, &layout)?;
    let watch = moving.then(|| {
        let mdm = admin_client(dir, &layout).expect("admin client");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        (stop.clone(), tokio::spawn(watch_copies(mdm, stop)))
    });
    if moving {
        // Throttled so that moves are still copying when the writer stops:
        // a write a joining copy missed is then never overwritten, and the
        // copy comparison at the end sees it.
        let policy = MovementPolicy { mb_per_sec: MOVE_MB_PER_SEC, ..MovementPolicy::default() };
        mdm.set_movement_policy(&policy).await?;
    }
    at(3.0).await;
    let mut control: Option<ControlOutcome> = None;
    let fault_end: Instant = match scenario {
        Scenario::KillSds => {
            lab_cmd(dir, &["kill", "sds2"]).await?;
            at(8.0).await;
            node_start(dir, "sds2").await?;
            Instant::now()
        }
        Scenario::StopSds => {
            lab_cmd(dir, &["stop", "sds2"]).await?;
            at(10.0).await;
            lab_cmd(dir, &["cont", "sds2"]).await?;
            Instant::now()
        }
        Scenario::CutPrimaryFromMdm => {
            lab_cmd(dir, &["cut", "sds1", "--from", "mdm"]).await?;
            at(13.0).await;
            lab_cmd(dir, &["heal", "sds1", "--from", "mdm"]).await?;
            Instant::now()
        }
        Scenario::CutSdsFromSdc => {
            lab_cmd(dir, &["cut", "sds1", "--from", "sdc1"]).await?;
            at(7.0).await;
            lab_cmd(dir, &["heal", "sds1", "--from", "sdc1"]).await?;
            Instant::now()
        }
        Scenario::CutSdsFromPeer => {
            lab_cmd(dir, &["cut", "sds1", "--from", "sds2"]).await?;
            at(7.0).await;
            lab_cmd(dir, &["heal", "sds1", "--from", "sds2"]).await?;
            Instant::now()
        }
        Scenario::MdmDown => {
            lab_cmd(dir, &["kill", "mdm"]).await?;
            at(3.0 + args.mdm_down_secs as f64).await;
            node_start(dir, "mdm").await?;
            Instant::now()
        }
        Scenario::ConnectionReset => {
            for i in 0..5 {
                at(3.0 + i as f64).await;
                reset_connections(&layout).await?;
            }
            Instant::now()
        }
        Scenario::TwoFailures => {
            lab_cmd(dir, &["kill", "sds2"]).await?;
            let failed = node_id(&mdm, "sds2").await?;
            wait_until("sds2's copies to be rebuilt", Duration::from_secs(60), || async {
                rebuilds_done_for(&mdm, failed).await
            })
            .await?;
            lab_cmd(dir, &["kill", "sds3"]).await?;
            at(write_secs as f64 - 4.0).await;
            node_start(dir, "sds2").await?;
            node_start(dir, "sds3").await?;
            Instant::now()
        }
        Scenario::DeviceHang | Scenario::DeviceEio => {
            let fault = if scenario == Scenario::DeviceHang { "hang" } else { "eio" };
            lab_cmd(dir, &["fault", "sds1", fault]).await?;
            // The device stays bad: recovery is the rebuild of its copies
            // elsewhere, counted from the fault.
            let injected = Instant::now();
            let failed = node_id(&mdm, "sds1").await?;
            wait_until("sds1's lost copies to be rebuilt", Duration::from_secs(90), || async {
                rebuilds_done_for(&mdm, failed).await
            })
            .await?;
            injected
        }
        Scenario::AddSds => {
            node_start(dir, "sds4").await?;
            Instant::now()
        }
        Scenario::DrainSds => {
            mdm.remove_sds("sds4").await?;
            Instant::now()
        }
        Scenario::KillMdmLeader | Scenario::CutMdmLeader => {
            let (outcome, healed) = mdm_leader_fault(dir, &layout, &mdm, scenario, &at).await?;
            control = Some(outcome);
            healed
        }
        Scenario::ReplaceMdm => {
            let outcome = replace_mdm_member(dir, &layout, &mdm).await?;
            control = Some(outcome);
            Instant::now()
        }
    };
    // Recovery: from the end of the fault until every SDS is ACTIVE and no
    // rebuild runs, watched while the writer goes on.
    let healthy = {
        let mdm = admin_client(dir, &layout)?;
        tokio::spawn(async move {
            loop {
                if cluster_healthy(&mdm).await {
                    return fault_end.elapsed();
                }
                if fault_end.elapsed() > Duration::from_secs(180) {
                    return fault_end.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let written = writer.wait_with_output().await?;
    let write: serde_json::Value = serde_json::from_slice(&written.stdout).with_context(|| {
        format!("pflex verify write said: {}", String::from_utf8_lossy(&written.stderr))
    })?;
    let checked = tokio::process::Command::new(pflex_exe()?)
        .args(["verify", "check", &layout.nbd_uri, "--state"])
        .arg(&state)
        .arg("--json")
        .output()
        .await?;
    let check: serde_json::Value = serde_json::from_slice(&checked.stdout).with_context(|| {
        format!("pflex verify check said: {}", String::from_utf8_lossy(&checked.stderr))
    })?;
    let device_scenario = matches!(scenario, Scenario::DeviceHang | Scenario::DeviceEio);
    let mut chunks = recover(&mdm, &layout).await;
    let mut spread = None;
    if moving && chunks.is_ok() {
        match settle_movement(&mdm, scenario).await {
            Ok(points) => spread = Some(points),
            Err(e) => chunks = Err(e),
        }
        if chunks.is_ok() {
            // The moves changed placements: compare the copies again.
            chunks = recover(&mdm, &layout).await;
        }
        if chunks.is_ok() && scenario == Scenario::DrainSds {
            // The removed node is told so by its next heartbeat and stops.
            let stopped = wait_until("sds4 to stop", Duration::from_secs(30), || async {
                crate::up::running_pid(dir, "sds4").is_none()
            });
            if let Err(e) = stopped.await {
                chunks = Err(e);
            }
        }
    }
    let (single_copy_windows, epochs_watched) = match watch {
        Some((stop, task)) => {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            task.await?
        }
        None => (0, 0),
    };
    if chunks.is_ok() && !device_scenario {
        // Only a device fault may fail a device: a paused or cut-off node's
        // disks are fine.
        if let Err(e) = no_failed_device(&layout, &mdm).await {
            chunks = Err(e);
        }
    }
    let recovery_ms = healthy.await?.as_millis() as u64;
    let jobs = mdm.rebuild_jobs().await.unwrap_or_default();
    let done = |kind: CopyKind| jobs.iter().filter(move |j| j.kind == kind && j.state == "done");
    let (resync_jobs, resync_chunks) = (
        done(CopyKind::Resync).count() as u64,
        done(CopyKind::Resync).map(|j| j.chunks_copied).sum(),
    );
    let (rebuild_jobs, rebuild_chunks) = (
        done(CopyKind::Rebuild).count() as u64,
        done(CopyKind::Rebuild).map(|j| j.chunks_copied).sum(),
    );
    let (move_jobs, move_chunks) =
        (done(CopyKind::Move).count() as u64, done(CopyKind::Move).map(|j| j.chunks_copied).sum());
    let n = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    let (lost, stale, torn, unexpected) =
        (n(&check, "lost"), n(&check, "stale"), n(&check, "torn"), n(&check, "unexpected"));
    let chunks_compared = chunks.as_ref().copied().unwrap_or(0);
    let control_ok = control.as_ref().is_none_or(|c| {
        c.lost == 0
            && c.deposed_answers == 0
            && c.one_history
            && (scenario != Scenario::KillMdmLeader || c.serving_after_ms <= 5000)
    });
    if let Err(e) = &chunks {
        eprintln!("pflex lab chaos {}: {e:#}", scenario.name());
    }
    Ok(ChaosReport {
        scenario: scenario.name().into(),
        qd,
        acknowledged: n(&write, "acknowledged"),
        write_errors: n(&write, "errors"),
        lost,
        stale,
        torn,
        unexpected,
        longest_stall_ms: n(&write, "longest_stall_ms").max(n(&check, "longest_stall_ms")),
        recovery_ms,
        chunks_compared,
        resync_jobs,
        resync_chunks,
        rebuild_jobs,
        rebuild_chunks,
        move_jobs,
        move_chunks,
        capacity_spread_points: spread,
        single_copy_windows,
        epochs_watched,
        control_plane_ms: control.as_ref().map(|c| c.serving_after_ms),
        control_changes_lost: control.as_ref().map_or(0, |c| c.lost),
        deposed_leader_answers: control.as_ref().map_or(0, |c| c.deposed_answers),
        passed: lost + stale + torn + unexpected == 0
            && control_ok
            && single_copy_windows == 0
            && (!moving || (move_jobs > 0 && spread.is_some_and(|p| p <= MAX_SPREAD_POINTS)))
            // A failed device is the one fault a client never sees: its
            // copies are served from the other node.
            && (n(&write, "errors") == 0
                || !matches!(scenario, Scenario::DeviceHang | Scenario::DeviceEio))
            && chunks.is_ok()
            && checked.status.success()
            && n(&write, "acknowledged") > 0,
    })
}

/// What an MDM leader fault did to the control plane.
struct ControlOutcome {
    serving_after_ms: u64,
    lost: u64,
    deposed_answers: u64,
    /// After the fault ended, every member reached the same term and applied
    /// the leader's last entry.
    one_history: bool,
}

/// The member that leads now, by host name (`mdm`, `mdm2`, ...).
async fn mdm_leader(layout: &lab::LabLayout, mdm: &MdmClient) -> Option<(String, String)> {
    let urls: Vec<&str> = layout.mdm_url.split(',').collect();
    for (url, answer) in mdm.mdm_status_each().await {
        if let Ok(status) = answer {
            if status.role == "Leader" {
                let n = urls.iter().position(|u| u.trim_end_matches('/') == url)?;
                return Some((crate::up::mdm_member_name(n as u16), url));
            }
        }
    }
    None
}

/// Kills or cuts off the MDM leader while the writer runs; measures how
/// soon a volume create succeeds, checks that nothing acknowledged was lost
/// and (when cut) that the old leader stops answering.
async fn mdm_leader_fault<F, Fut>(
    dir: &Path,
    layout: &lab::LabLayout,
    mdm: &MdmClient,
    scenario: Scenario,
    at: &F,
) -> Result<(ControlOutcome, Instant)>
where
    F: Fn(f64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut acknowledged = Vec::new();
    for i in 0..5 {
        let name = format!("before-{i}");
        create_small_volume(mdm, &name).await?;
        acknowledged.push(name);
    }
    let (leader, leader_url) =
        mdm_leader(layout, mdm).await.context("no MDM leader before the fault")?;
    let members: Vec<String> = (0..layout.mdm_url.split(',').count() as u16)
        .map(crate::up::mdm_member_name)
        .filter(|m| *m != leader)
        .collect();
    let fault = Instant::now();
    match scenario {
        Scenario::KillMdmLeader => lab_cmd(dir, &["kill", &leader]).await.map(|_| ())?,
        _ => {
            for other in &members {
                lab_cmd(dir, &["cut", &leader, "--from", other]).await?;
            }
        }
    }
    // The first create that succeeds after the fault, retried at once; and
    // for a cut leader, whether it still answered once another led.
    let first_create = async {
        let mut attempt = 0;
        while fault.elapsed() < Duration::from_secs(60) {
            let name = format!("after-fault-{attempt}");
            let create = create_small_volume(mdm, &name);
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(15), create).await {
                return Some((fault.elapsed(), name));
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    };
    let watch_deposed = async {
        if scenario == Scenario::CutMdmLeader {
            deposed_leader_answers(layout, mdm, &leader_url).await
        } else {
            Ok(0)
        }
    };
    let (created, deposed_answers) = tokio::join!(first_create, watch_deposed);
    let deposed_answers = deposed_answers?;
    let (serving_after, name) = created.context("no volume create succeeded within 60 s")?;
    acknowledged.push(name);
    at(10.0).await;
    match scenario {
        Scenario::KillMdmLeader => node_start(dir, &leader).await?,
        _ => {
            for other in &members {
                lab_cmd(dir, &["heal", &leader, "--from", other]).await?;
            }
        }
    }
    let healed = Instant::now();
    create_small_volume(mdm, "after-heal").await?;
    acknowledged.push("after-heal".to_string());
    let listed: std::collections::HashSet<String> =
        mdm.volume_list().await?.into_iter().map(|v| v.name).collect();
    let lost = acknowledged.iter().filter(|name| !listed.contains(*name)).count() as u64;
    // One history: every member reaches the leader's applied entry, in one term.
    let one_history =
        wait_until("every MDM member to catch up", Duration::from_secs(30), || async {
            let each = mdm.mdm_status_each().await;
            let statuses: Vec<_> = each.iter().filter_map(|(_, a)| a.as_ref().ok()).collect();
            let Some(leader) = statuses.iter().find(|s| s.role == "Leader") else { return false };
            statuses.len() == each.len()
                && statuses
                    .iter()
                    .all(|s| s.term == leader.term && s.applied_index >= leader.applied_index)
        })
        .await
        .is_ok();
    Ok((
        ControlOutcome {
            serving_after_ms: serving_after.as_millis() as u64,
            lost,
            deposed_answers,
            one_history,
        },
        healed,
    ))
}

/// Kills the last MDM member for good while the writer runs, removes it
/// from the cluster, starts the spare member (an empty database) on its
/// host and adds it; measures how soon after the kill the new member has
/// caught up with the leader, and checks that nothing acknowledged was lost.
async fn replace_mdm_member(
    dir: &Path,
    layout: &lab::LabLayout,
    mdm: &MdmClient,
) -> Result<ControlOutcome> {
    let urls: Vec<&str> = layout.mdm_url.split(',').collect();
    let members = urls.len() as u16;
    let dead = crate::up::mdm_member_name(members - 1);
    let (dead_id, dead_url) = (u64::from(members), urls[urls.len() - 1].to_string());
    let (spare, spare_id) = (crate::up::mdm_member_name(members), u64::from(members) + 1);
    let mut acknowledged = Vec::new();
    for i in 0..5 {
        let name = format!("before-{i}");
        create_small_volume(mdm, &name).await?;
        acknowledged.push(name);
    }
    let fault = Instant::now();
    lab_cmd(dir, &["kill", &dead]).await?;
    // Retried while the others elect a leader, when the dead member led.
    let mut removed = Err(anyhow::anyhow!("not tried"));
    while fault.elapsed() < Duration::from_secs(30) {
        removed = mdm.mdm_remove(dead_id).await.map(drop).map_err(anyhow::Error::from);
        if removed.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    removed.with_context(|| format!("removing {dead} (member {dead_id})"))?;
    create_small_volume(mdm, "after-remove").await?;
    acknowledged.push("after-remove".to_string());
    node_start(dir, &spare).await?;
    mdm.mdm_add(spare_id, &dead_url)
        .await
        .with_context(|| format!("adding {spare} (member {spare_id}) at {dead_url}"))?;
    // One history: the new member, at the dead one's address, is a voter in
    // the leader's term and has applied the leader's last entry.
    let caught_up = wait_until("the new MDM member to catch up", Duration::from_secs(60), || {
        let dead_url = dead_url.clone();
        async move {
            let each = mdm.mdm_status_each().await;
            let statuses: Vec<_> = each.iter().filter_map(|(_, a)| a.as_ref().ok()).collect();
            let Some(leader) = statuses.iter().find(|s| s.role == "Leader") else { return false };
            let new_member = each
                .iter()
                .find(|(url, _)| url.trim_end_matches('/') == dead_url.trim_end_matches('/'));
            let Some((_, Ok(new_member))) = new_member else { return false };
            new_member.id == spare_id
                && leader.members.iter().any(|m| m.id == spare_id && m.voter)
                && !leader.members.iter().any(|m| m.id == dead_id)
                && statuses.len() == each.len()
                && statuses
                    .iter()
                    .all(|s| s.term == leader.term && s.applied_index >= leader.applied_index)
        }
    })
    .await
    .is_ok();
    let replaced_after = fault.elapsed();
    create_small_volume(mdm, "after-replace").await?;
    acknowledged.push("after-replace".to_string());
    let listed: std::collections::HashSet<String> =
        mdm.volume_list().await?.into_iter().map(|v| v.name).collect();
    let lost = acknowledged.iter().filter(|name| !listed.contains(*name)).count() as u64;
    Ok(ControlOutcome {
        serving_after_ms: replaced_after.as_millis() as u64,
        lost,
        deposed_answers: 0,
        one_history: caught_up,
    })
}

/// Polls the cut-off leader (reads, every 50 ms, for 6 s) and the other
/// members: how many times the old leader answered after another member
/// said it led in a later term. Its lease must have ended before that.
async fn deposed_leader_answers(
    layout: &lab::LabLayout,
    mdm: &MdmClient,
    leader_url: &str,
) -> Result<u64> {
    let credential = mdm.credential().map(str::to_string);
    // Plain requests: a client would follow the refusal to the new leader.
    let http = pflex_mdm_client::trust::http_client_builder()
        .timeout(Duration::from_millis(300))
        .build()?;
    let token = credential.clone().unwrap_or_default();
    let old_leader_answers = || {
        let request = http.get(format!("{leader_url}/health/status")).bearer_auth(&token);
        async move { request.send().await.is_ok_and(|r| r.status().is_success()) }
    };
    let old_term =
        MdmClient::with_timeout(leader_url, credential.clone(), Duration::from_millis(300))?
            .mdm_status()
            .await
            .map(|s| s.term)
            .unwrap_or(0);
    let others: Vec<MdmClient> = layout
        .mdm_url
        .split(',')
        .filter(|u| u.trim_end_matches('/') != leader_url)
        .map(|u| MdmClient::with_timeout(u, credential.clone(), Duration::from_millis(300)))
        .collect::<Result<_, _>>()?;
    let mut successor_seen = false;
    let mut answers_after = 0;
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        if !successor_seen {
            for other in &others {
                if let Ok(s) = other.mdm_status().await {
                    successor_seen |= s.role == "Leader" && s.term > old_term;
                }
            }
        }
        if old_leader_answers().await && successor_seen {
            answers_after += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::ensure!(successor_seen, "no other MDM took the lead within 6 s of the cut");
    Ok(answers_after)
}

async fn create_small_volume(mdm: &MdmClient, name: &str) -> Result<()> {
    let request = pflex_proto::api::VolumeCreate {
        name: name.to_string(),
        size_bytes: 8 << 20,
        pool: None,
        thick: false,
    };
    mdm.volume_create(&request).await?;
    Ok(())
}

fn admin_client(dir: &Path, layout: &lab::LabLayout) -> Result<MdmClient> {
    let token = std::fs::read_to_string(dir.join("mdm").join("admin_token"))?;
    Ok(MdmClient::new(&layout.mdm_url, Some(token.trim().to_string()))?)
}

async fn node_id(mdm: &MdmClient, name: &str) -> Result<u64> {
    let list = mdm.sds_list().await?;
    list.iter().find(|s| s.name == name).map(|s| s.id).with_context(|| format!("no SDS {name}"))
}

async fn cluster_healthy(mdm: &MdmClient) -> bool {
    let (Ok(nodes), Ok(jobs)) = (mdm.sds_list().await, mdm.rebuild_jobs().await) else {
        return false;
    };
    nodes.iter().all(|n| n.status == "ACTIVE")
        && jobs.iter().all(|j| j.state == "done" || j.state == "failed")
}

async fn rebuilds_done_for(mdm: &MdmClient, failed: u64) -> bool {
    let Ok(jobs) = mdm.rebuild_jobs().await else { return false };
    let ours: Vec<_> = jobs.iter().filter(|j| j.failed_sds == failed).collect();
    !ours.is_empty() && ours.iter().all(|j| j.state == "done")
}

/// Waits until every SDS is ACTIVE, no rebuild runs and both copies of
/// every chunk of vol1 are equal; returns how many chunks were compared.
async fn recover(mdm: &MdmClient, layout: &lab::LabLayout) -> Result<u64> {
    let http = pflex_mdm_client::trust::http_client_builder().build()?;
    let start = Instant::now();
    loop {
        let last = match copies_equal(mdm, layout, &http).await {
            Ok(compared) => return Ok(compared),
            Err(e) => format!("{e:#}"),
        };
        if start.elapsed() > Duration::from_secs(120) {
            bail!("the cluster did not recover within 120 s: {last}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Fails if any SDS of the cluster reports a failed device.
async fn no_failed_device(layout: &lab::LabLayout, mdm: &MdmClient) -> Result<()> {
    let http = pflex_mdm_client::trust::http_client_builder().build()?;
    let members: Vec<String> = mdm.sds_list().await?.into_iter().map(|s| s.name).collect();
    for host in layout.hosts.iter().filter(|h| members.contains(&h.name)) {
        let url = layout.url(&host.name, 9100, "/devices")?;
        let devices: Vec<serde_json::Value> =
            http.get(&url).timeout(Duration::from_secs(5)).send().await?.json().await?;
        if let Some(d) = devices.iter().find(|d| d.get("failed").is_some()) {
            bail!("{}: device {} failed: {}", host.name, d["path"], d["failed"]);
        }
    }
    Ok(())
}

/// Per-SDS movement limit of add-sds and drain-sds (MB/s): their moves
/// last past the writer's end.
const MOVE_MB_PER_SEC: u64 = 5;

/// Capacity use may differ by this many percentage points across nodes
/// once a rebalance or drain is over.
const MAX_SPREAD_POINTS: f64 = 5.0;

/// Blocks `pflex verify write` uses (16384 of 4 KiB from offset 0); the
/// rest of the volume is filled first so that moves have data to carry.
const CHECKER_BYTES: u64 = 16384 * 4096;

/// Writes a non-zero pattern over the volume beyond the checker's blocks,
/// 1 MiB at a time, and flushes.
async fn fill_beyond_checker(uri: &str) -> Result<()> {
    let uri = crate::verify::nbd::NbdUri::parse(uri)?;
    let client = crate::verify::nbd::Client::connect(&uri).await?;
    let block: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    let mut offset = CHECKER_BYTES;
    while offset < client.size() {
        let len = (client.size() - offset).min(block.len() as u64) as usize;
        client.write(offset, &block[..len]).await.context("filling the volume")?;
        offset += len as u64;
    }
    client.flush().await.context("flushing the fill")?;
    client.disconnect().await;
    Ok(())
}

/// Polls vol1's placement every 50 ms until `stop`; counts polls that found
/// a PG without two complete copies (degraded, or a copy still being
/// rebuilt or resynced), and the epochs seen.
async fn watch_copies(
    mdm: MdmClient,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (u64, u64) {
    let (mut windows, mut epochs) = (0, std::collections::BTreeSet::new());
    let Ok(volume) = mdm.volume_show("vol1").await else { return (1, 0) };
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if let (Ok(map), Ok(jobs)) = (mdm.placement(volume.id).await, mdm.rebuild_jobs().await) {
            epochs.insert(map.epoch);
            let single = map.pgs.iter().any(|pg| pg.secondary == 0 || pg.absent != 0)
                || jobs.iter().any(|j| {
                    j.kind != CopyKind::Move && (j.state == "pending" || j.state == "running")
                });
            if single {
                windows += 1;
                eprintln!("a PG of vol1 had one complete copy at epoch {}", map.epoch);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (windows, epochs.len() as u64)
}

/// Waits until no move is outstanding (and, for drain-sds, sds4 is gone);
/// returns the spread of capacity use across the nodes, in points.
async fn settle_movement(mdm: &MdmClient, scenario: Scenario) -> Result<f64> {
    let start = Instant::now();
    // Capacity use settles after the last move: the nodes a copy left
    // release its chunks, and heartbeats carry the new figures.
    let mut recent: Vec<Vec<u64>> = Vec::new();
    loop {
        let status = mdm.movement_status().await?;
        let nodes = mdm.sds_list().await?;
        let uses: Vec<f64> = nodes
            .iter()
            .map(|n| n.used_bytes as f64 * 100.0 / n.capacity_bytes.max(1) as f64)
            .collect();
        let spread = uses.iter().cloned().fold(f64::MIN, f64::max)
            - uses.iter().cloned().fold(f64::MAX, f64::min);
        let gone = scenario != Scenario::DrainSds || !nodes.iter().any(|n| n.name == "sds4");
        let joined = scenario != Scenario::AddSds || nodes.iter().any(|n| n.name == "sds4");
        recent.push(nodes.iter().map(|n| n.used_bytes).collect());
        let steady =
            recent.len() >= 5 && recent[recent.len() - 5..].windows(2).all(|w| w[0] == w[1]);
        if status.move_jobs == 0 && gone && joined && steady && spread <= MAX_SPREAD_POINTS {
            return Ok(spread);
        }
        if start.elapsed() > Duration::from_secs(180) {
            bail!(
                "data movement did not settle within 180 s: {} moves outstanding, capacity use {uses:.1?} %, sds4 gone: {gone}",
                status.move_jobs
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn copies_equal(
    mdm: &MdmClient,
    layout: &lab::LabLayout,
    http: &reqwest::Client,
) -> Result<u64> {
    let nodes = mdm.sds_list().await?;
    if let Some(n) = nodes.iter().find(|n| n.status != "ACTIVE") {
        bail!("{} is {}", n.name, n.status);
    }
    let jobs = mdm.rebuild_jobs().await?;
    if let Some(j) = jobs.iter().find(|j| j.state != "done" && j.state != "failed") {
        bail!("rebuild job {} is {}", j.job_id, j.state);
    }
    let volume = mdm.volume_show("vol1").await?;
    let map = mdm.placement(volume.id).await?;
    let address = |id: u64| -> Result<String> {
        let name = &nodes.iter().find(|n| n.id == id).context("a copy on an unknown SDS")?.name;
        let host = layout.hosts.iter().find(|h| &h.name == name).context("SDS not in the lab")?;
        Ok(host.address.clone())
    };
    let mut compared = 0;
    for chunk in 0..map.chunk_count() {
        let pg = map.pg_of(chunk).context("no PGs")?;
        let mut sums = Vec::new();
        for id in [pg.primary, pg.secondary] {
            let url = format!(
                "{}://{}:9100/chunk/{}/{chunk}/checksum",
                layout.scheme(),
                address(id)?,
                volume.id
            );
            let sum: pflex_proto::api::ChunkChecksum =
                http.get(&url).timeout(Duration::from_secs(5)).send().await?.json().await?;
            sums.push((sum.allocated, sum.crc32));
        }
        if sums[0] != sums[1] {
            bail!(
                "chunk {chunk}: copies differ ({:?} on SDS {}, {:?} on SDS {})",
                sums[0],
                pg.primary,
                sums[1],
                pg.secondary
            );
        }
        compared += 1;
    }
    Ok(compared)
}
