//! `pflex verify`: the "no acknowledged write lost" check, run against any
//! NBD export (a pflex volume, or anything else) across faults.
//!
//! `pflex verify write` writes self-describing blocks (see [`block`]) to a
//! region of the export, rewriting the same blocks over and over with
//! increasing generations, at most one write in flight per block so their
//! order is defined, and records every write issued and acknowledged in an
//! append-only, regularly synced state file (see [`state`]). Kill nodes,
//! cut links, restart the cluster meanwhile: failed writes are counted, a
//! lost connection is reconnected (for up to 60 s), and the longest stall
//! is measured. `pflex verify check` then reads the whole region back and
//! holds every block to its history: anything acknowledged must still be
//! there, whole, and not replaced by an older generation.
//!
//! The block format and the verdict are pure ([`block`]), the state file
//! is plain text ([`state`]), and the NBD client ([`nbd`]) knows nothing of
//! either.

pub mod block;
pub mod nbd;
pub mod state;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use tokio::sync::mpsc;

use block::{classify, encode, Kind, Slot, SplitMix};
use nbd::{Client, NbdError, NbdUri};
use state::{Params, Requested, StateWriter, SYNC_EVERY};

/// How long failing reconnects are retried before a run gives up.
const RECONNECT_FOR: Duration = Duration::from_secs(60);
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);
/// `ESHUTDOWN`: the server is going away; the spec asks for a disconnect.
const ESHUTDOWN: u32 = 108;
/// How many bad blocks `check` describes one by one.
const BAD_SHOWN: usize = 10;

/// `pflex verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(subcommand)]
    pub command: VerifyCommand,
}

#[derive(Debug, Subcommand)]
pub enum VerifyCommand {
    /// Write self-describing blocks and record every acknowledgment in the state file.
    Write(WriteArgs),
    /// Read the region back and report every block that lost an acknowledged write.
    Check(CheckArgs),
}

/// Options of `pflex verify write`.
#[derive(Debug, Args)]
pub struct WriteArgs {
    /// The export, as nbd://host[:port]/export (port 10809 by default).
    pub uri: String,
    /// State file: created by the first run, appended to by later runs.
    #[arg(long, value_name = "FILE")]
    pub state: PathBuf,
    /// Writes in flight at once, pipelined on one connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub qd: u32,
    /// Seed of the block picker and the block contents [default: 1; a new state file only].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write for this many seconds [default: 10, unless --writes is given].
    #[arg(long, value_name = "SECS", conflicts_with = "writes")]
    pub duration: Option<f64>,
    /// Issue exactly this many writes.
    #[arg(long, value_name = "COUNT")]
    pub writes: Option<u64>,
    /// Blocks in the region [default: 4096; a new state file only].
    #[arg(long)]
    pub blocks: Option<u64>,
    /// Block size in bytes, a multiple of 512 [default: 4096; a new state file only].
    #[arg(long = "block-size", value_name = "B")]
    pub block_size: Option<u64>,
    /// Byte offset of the region on the export [default: 0; a new state file only].
    #[arg(long, value_name = "BYTES")]
    pub offset: Option<u64>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Options of `pflex verify check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The export, as nbd://host[:port]/export (port 10809 by default).
    pub uri: String,
    /// State file written by `pflex verify write`.
    #[arg(long, value_name = "FILE")]
    pub state: PathBuf,
    /// Reads in flight at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub qd: u32,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: VerifyArgs) -> Result<()> {
    match args.command {
        VerifyCommand::Write(a) => write(a).await,
        VerifyCommand::Check(a) => check(a).await,
    }
}

fn check_region(conn: &Client, p: &Params, writing: bool) -> Result<()> {
    let end = p.end()?;
    if end > conn.size() {
        bail!(
            "the region (bytes {}..{end}: {} blocks of {}) does not fit the export ({} bytes)",
            p.offset,
            p.blocks,
            p.block_size,
            conn.size()
        );
    }
    if writing && conn.read_only() {
        bail!("the export is read-only");
    }
    Ok(())
}

/// The longest time without an acknowledgment while writes were pending
/// (in flight, or waiting for a reconnect to be resent).
#[derive(Debug, Default)]
struct Stall {
    since: Option<Instant>,
    longest: Duration,
    recorded_ms: u64,
}

impl Stall {
    fn issued(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    fn observe(&mut self, now: Instant) {
        if let Some(since) = self.since {
            self.longest = self.longest.max(now - since);
        }
    }

    fn acked(&mut self, now: Instant, still_in_flight: bool) {
        self.observe(now);
        self.since = still_in_flight.then_some(now);
    }

    fn longest_ms(&self) -> u64 {
        self.longest.as_millis() as u64
    }

    /// Records a new longest stall in the state file.
    fn record(&mut self, log: &mut StateWriter) {
        let ms = self.longest_ms();
        if ms > self.recorded_ms {
            log.stall(ms);
            self.recorded_ms = ms;
        }
    }
}

/// A random block that is neither in flight nor quarantined.
fn pick(rng: &mut SplitMix, blocks: u64, busy: &HashSet<u64>, skip: &HashSet<u64>) -> Option<u64> {
    let free = |b: &u64| !busy.contains(b) && !skip.contains(b);
    for _ in 0..32 {
        let b = rng.below(blocks);
        if free(&b) {
            return Some(b);
        }
    }
    let start = rng.below(blocks);
    (0..blocks).map(|i| (start + i) % blocks).find(free)
}

/// What a write run counted.
#[derive(Debug, Default)]
struct Counts {
    issued: u64,
    acked: u64,
    errors: u64,
    reconnects: u64,
    quarantined: u64,
    flushed: bool,
}

struct Completion {
    block: u64,
    gen: u64,
    result: Result<(), NbdError>,
}

#[derive(Debug, Serialize)]
struct WriteSummary {
    state: String,
    uri: String,
    run: u64,
    qd: u32,
    issued: u64,
    acknowledged: u64,
    errors: u64,
    reconnects: u64,
    /// Blocks left alone for the rest of the run after their write was cut
    /// off by a lost connection (it might still land late).
    quarantined_blocks: u64,
    flushed: bool,
    longest_stall_ms: u64,
    elapsed_ms: u64,
    iops: f64,
    error: Option<String>,
}

/// Reconnects, retrying for up to [`RECONNECT_FOR`]; syncs the state file meanwhile.
async fn reconnect(uri: &NbdUri, p: &Params, log: &mut StateWriter) -> Result<Client> {
    let deadline = Instant::now() + RECONNECT_FOR;
    loop {
        log.sync_if_due()?;
        let err = match Client::connect(uri).await {
            Ok(conn) => {
                check_region(&conn, p, true)?;
                return Ok(conn);
            }
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            bail!("gave up reconnecting after {} s: {err:#}", RECONNECT_FOR.as_secs());
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

async fn write(args: WriteArgs) -> Result<()> {
    let uri = NbdUri::parse(&args.uri)?;
    let requested = Requested {
        seed: args.seed,
        block_size: args.block_size,
        blocks: args.blocks,
        offset: args.offset,
    };
    if matches!(args.duration, Some(d) if !(d.is_finite() && d >= 0.0)) {
        bail!("--duration must be a number of seconds");
    }
    let (mut log, state) = StateWriter::open(&args.state, requested)?;
    let p = state.params;
    let run = state.last_run() + 1;
    if run >= 1 << 31 {
        bail!("the state file has run out of run numbers");
    }
    let mut conn = Arc::new(Client::connect(&uri).await?);
    check_region(&conn, &p, true)?;
    log.start_run(run)?;

    let limit = args.writes.unwrap_or(u64::MAX).min(u32::MAX as u64);
    let duration = match (args.duration, args.writes) {
        (Some(d), _) => Some(Duration::from_secs_f64(d)),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    let qd = args.qd as usize;
    let (tx, mut rx) = mpsc::unbounded_channel::<Completion>();
    let mut rng = SplitMix::new(p.seed ^ run.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut busy = HashSet::new();
    let mut quarantined = HashSet::new();
    let mut seq = 0u64;
    let mut n = Counts::default();
    let mut stall = Stall::default();
    let mut broken = false;
    let mut stopping = false;
    let mut interrupted = false;
    let mut failure: Option<anyhow::Error> = None;
    let started = Instant::now();
    let mut tick = tokio::time::interval(SYNC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    loop {
        if n.issued >= limit || duration.is_some_and(|d| started.elapsed() >= d) {
            stopping = true;
        }
        while !stopping && !broken && busy.len() < qd {
            let Some(block) = pick(&mut rng, p.blocks, &busy, &quarantined) else {
                if busy.is_empty() {
                    failure =
                        Some(anyhow::anyhow!("every block is quarantined after lost connections"));
                    stopping = true;
                }
                break;
            };
            seq += 1;
            let gen = (run << 32) | seq;
            log.issued(block, gen);
            busy.insert(block);
            stall.issued(Instant::now());
            let offset = p.block_offset(block);
            let data =
                encode(Slot { seed: p.seed, offset, block_size: p.block_size as usize }, gen);
            let (c, tx) = (conn.clone(), tx.clone());
            tokio::spawn(async move {
                let result = c.write(offset, &data).await;
                let _ = tx.send(Completion { block, gen, result });
            });
            n.issued += 1;
            if n.issued >= limit {
                stopping = true;
            }
        }
        if busy.is_empty() {
            if stopping {
                break;
            }
            if broken {
                if let Ok(old) = Arc::try_unwrap(conn) {
                    old.disconnect().await;
                }
                let again = tokio::select! {
                    r = reconnect(&uri, &p, &mut log) => Some(r),
                    _ = &mut ctrl_c, if !interrupted => None,
                };
                match again {
                    Some(Ok(c)) => {
                        conn = Arc::new(c);
                        broken = false;
                        n.reconnects += 1;
                        continue;
                    }
                    Some(Err(e)) => failure = Some(e),
                    None => {} // Ctrl-C while reconnecting
                }
                // No connection to flush or disconnect: record and stop.
                stall.observe(Instant::now());
                n.quarantined = quarantined.len() as u64;
                return finish_write(&args, &uri, run, log, stall, started, n, failure);
            }
        }
        tokio::select! {
            Some(c) = rx.recv() => {
                busy.remove(&c.block);
                let now = Instant::now();
                match c.result {
                    Ok(()) => {
                        log.acked(c.block, c.gen);
                        n.acked += 1;
                        stall.acked(now, !busy.is_empty());
                    }
                    Err(e) => {
                        log.failed(c.block, c.gen);
                        n.errors += 1;
                        stall.observe(now);
                        match e {
                            NbdError::Disconnected(_) => {
                                // It may still land after a newer write: leave the block alone.
                                quarantined.insert(c.block);
                                broken = true;
                            }
                            NbdError::Server(ESHUTDOWN) => broken = true,
                            NbdError::Server(_) => {}
                        }
                    }
                }
                log.sync_if_due()?;
            }
            _ = tick.tick() => {
                stall.observe(Instant::now());
                stall.record(&mut log);
                log.sync_if_due()?;
            }
            _ = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                stopping = true;
            }
        }
    }

    // Everything acknowledged is flushed to stable storage before leaving.
    match conn.flush().await {
        Ok(()) => n.flushed = true,
        Err(e) => {
            n.errors += 1;
            failure.get_or_insert(anyhow::anyhow!("final flush failed: {e}"));
        }
    }
    n.quarantined = quarantined.len() as u64;
    if let Ok(c) = Arc::try_unwrap(conn) {
        c.disconnect().await;
    }
    finish_write(&args, &uri, run, log, stall, started, n, failure)
}

/// Writes the last records, prints the summary, and returns the run's outcome.
#[allow(clippy::too_many_arguments)]
fn finish_write(
    args: &WriteArgs,
    uri: &NbdUri,
    run: u64,
    mut log: StateWriter,
    mut stall: Stall,
    started: Instant,
    n: Counts,
    failure: Option<anyhow::Error>,
) -> Result<()> {
    let Counts { issued, acked, errors, reconnects, quarantined, flushed } = n;
    stall.record(&mut log);
    log.end_run(run)?;
    let elapsed = started.elapsed();
    let summary = WriteSummary {
        state: args.state.display().to_string(),
        uri: uri.to_string(),
        run,
        qd: args.qd,
        issued,
        acknowledged: acked,
        errors,
        reconnects,
        quarantined_blocks: quarantined,
        flushed,
        longest_stall_ms: stall.longest_ms(),
        elapsed_ms: elapsed.as_millis() as u64,
        iops: (acked as f64 / elapsed.as_secs_f64().max(1e-9) * 10.0).round() / 10.0,
        error: failure.as_ref().map(|e| format!("{e:#}")),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "pflex verify write: run {run} on {}: {issued} writes issued, {acked} acknowledged, \
             {errors} errors, {reconnects} reconnects",
            summary.uri
        );
        println!(
            "  {:.2} s, {:.0} IOPS, longest stall {} ms{}",
            elapsed.as_secs_f64(),
            summary.iops,
            summary.longest_stall_ms,
            if quarantined > 0 {
                format!(", {quarantined} blocks quarantined")
            } else {
                String::new()
            }
        );
        println!("  state: {}", summary.state);
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[derive(Debug, Serialize)]
struct BadBlock {
    block: u64,
    offset: u64,
    verdict: &'static str,
    found_gen: Option<u64>,
    last_acked_gen: Option<u64>,
    detail: String,
}

#[derive(Debug, Serialize)]
struct CheckSummary {
    state: String,
    uri: String,
    runs: usize,
    issued_writes: u64,
    acknowledged_writes: u64,
    failed_writes: u64,
    blocks_checked: u64,
    ok: u64,
    never_written: u64,
    lost: u64,
    stale: u64,
    torn: u64,
    unexpected: u64,
    read_errors: u64,
    longest_stall_ms: u64,
    elapsed_ms: u64,
    passed: bool,
    bad: Vec<BadBlock>,
}

async fn check(args: CheckArgs) -> Result<()> {
    let uri = NbdUri::parse(&args.uri)?;
    let state = state::load(&args.state)?;
    let p = state.params;
    let unrecorded = state.unrecorded();
    let started = Instant::now();
    let mut conn = Arc::new(Client::connect(&uri).await?);
    check_region(&conn, &p, false)?;

    let qd = args.qd as usize;
    let mut counts: BTreeMap<Kind, u64> = BTreeMap::new();
    let mut bad = Vec::new();
    let mut read_errors = 0u64;
    let mut retry: Vec<u64> = Vec::new();
    let mut next = 0u64;
    let mut broken = false;
    let mut reads = tokio::task::JoinSet::new();
    loop {
        while !broken && reads.len() < qd {
            let block = match retry.pop() {
                Some(b) => b,
                None if next < p.blocks => {
                    next += 1;
                    next - 1
                }
                None => break,
            };
            let c = conn.clone();
            let offset = p.block_offset(block);
            let len = p.block_size as u32;
            reads.spawn(async move { (block, c.read(offset, len).await) });
        }
        let Some(done) = reads.join_next().await else {
            if broken {
                let deadline = Instant::now() + RECONNECT_FOR;
                conn = Arc::new(loop {
                    match Client::connect(&uri).await {
                        Ok(c) => break c,
                        Err(e) if Instant::now() >= deadline => {
                            bail!("gave up reconnecting after {} s: {e:#}", RECONNECT_FOR.as_secs())
                        }
                        Err(_) => tokio::time::sleep(RECONNECT_PAUSE).await,
                    }
                });
                broken = false;
                continue;
            }
            break;
        };
        let (block, result) = done?;
        let offset = p.block_offset(block);
        let history = &state.blocks[block as usize];
        match result {
            Ok(data) => {
                let slot = Slot { seed: p.seed, offset, block_size: p.block_size as usize };
                let v = classify(history, &unrecorded, slot, &data);
                *counts.entry(v.kind).or_default() += 1;
                if v.kind.is_bad() && bad.len() < BAD_SHOWN {
                    bad.push(BadBlock {
                        block,
                        offset,
                        verdict: v.kind.name(),
                        found_gen: v.found,
                        last_acked_gen: history.last_acked,
                        detail: v.detail,
                    });
                }
            }
            Err(NbdError::Disconnected(_)) => {
                retry.push(block);
                broken = true;
            }
            Err(e) => {
                read_errors += 1;
                if bad.len() < BAD_SHOWN {
                    bad.push(BadBlock {
                        block,
                        offset,
                        verdict: "read_error",
                        found_gen: None,
                        last_acked_gen: history.last_acked,
                        detail: e.to_string(),
                    });
                }
            }
        }
    }
    if let Ok(c) = Arc::try_unwrap(conn) {
        c.disconnect().await;
    }

    let n = |k: Kind| counts.get(&k).copied().unwrap_or(0);
    let failures =
        n(Kind::Lost) + n(Kind::Stale) + n(Kind::Torn) + n(Kind::Unexpected) + read_errors;
    bad.sort_by_key(|b| b.block);
    let summary = CheckSummary {
        state: args.state.display().to_string(),
        uri: uri.to_string(),
        runs: state.runs.len(),
        issued_writes: state.issued,
        acknowledged_writes: state.acked,
        failed_writes: state.failed,
        blocks_checked: counts.values().sum::<u64>() + read_errors,
        ok: n(Kind::Ok),
        never_written: n(Kind::NeverWritten),
        lost: n(Kind::Lost),
        stale: n(Kind::Stale),
        torn: n(Kind::Torn),
        unexpected: n(Kind::Unexpected),
        read_errors,
        longest_stall_ms: state.longest_stall_ms,
        elapsed_ms: started.elapsed().as_millis() as u64,
        passed: failures == 0,
        bad,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let s = &summary;
        println!(
            "pflex verify check: {} blocks checked on {}, {} acknowledged writes over {} runs",
            s.blocks_checked, s.uri, s.acknowledged_writes, s.runs
        );
        println!(
            "  ok {}, never written {}, lost {}, stale {}, torn {}, unexpected {}, read errors {}",
            s.ok, s.never_written, s.lost, s.stale, s.torn, s.unexpected, s.read_errors
        );
        println!("  longest stall of the write runs: {} ms", s.longest_stall_ms);
        for b in &s.bad {
            println!("  block {} (offset {}): {}: {}", b.block, b.offset, b.verdict, b.detail);
        }
        if failures as usize > s.bad.len() {
            println!("  ... and {} more", failures as usize - s.bad.len());
        }
    }
    if failures > 0 {
        bail!(
            "{failures} blocks failed verification (lost {}, stale {}, torn {}, unexpected {}, \
             read errors {read_errors})",
            summary.lost,
            summary.stale,
            summary.torn,
            summary.unexpected
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_avoids_busy_and_quarantined() {
        let mut rng = SplitMix::new(3);
        let busy: HashSet<u64> = (0..7).collect();
        let skip: HashSet<u64> = [8].into();
        for _ in 0..100 {
            assert_eq!(pick(&mut rng, 9, &busy, &skip), Some(7));
        }
        let all: HashSet<u64> = (0..9).collect();
        assert_eq!(pick(&mut rng, 9, &all, &HashSet::new()), None);
    }

    #[test]
    fn stall_counts_time_without_acks_while_pending() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut s = Stall::default();
        s.issued(ms(0));
        s.acked(ms(5), true);
        s.acked(ms(50), false);
        assert_eq!(s.longest_ms(), 45);
        // Idle time with nothing pending is no stall.
        s.issued(ms(1000));
        s.observe(ms(1010)); // a failed write is no progress
        s.acked(ms(1100), false);
        assert_eq!(s.longest_ms(), 100);
    }
}
