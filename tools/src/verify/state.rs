//! The state file of `pflex verify`: an append-only text log of every
//! write issued and acknowledged, which `check` later holds the device to.
//!
//! ```text
//! pflex-verify 1 seed=1 block_size=4096 blocks=4096 offset=0
//! run 1 1767225600000          a write run starts (unix ms); synced before its first write
//! issued 17 4294967297         block 17, generation (1 << 32) | 1, sent to the device
//! acked 17 4294967297          ... and acknowledged by it
//! failed 18 4294967298         error reply or connection lost: may or may not be written
//! stall 12                     longest stall so far (ms) of this run
//! end 1                        the run ended cleanly, every record before it is synced
//! ```
//!
//! Generations are `run << 32 | sequence`, so a later run's generations
//! are above anything an earlier run could have issued, even when that run
//! was killed before its newest records reached the disk. Records are
//! appended in the order things happen and synced at least every 100 ms;
//! losing the newest ones can only make `check` more lenient (an ack not
//! recorded leaves its write "in doubt"), never report a false loss. A
//! partial last line (a crash mid-append) is ignored, and cut off before
//! the next run appends.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use super::block::{check_block_size, BlockHistory, Unrecorded};

const HEADER_WORD: &str = "pflex-verify";
const VERSION: u32 = 1;
/// Most blocks a region may have (`check` keeps a history per block).
pub const MAX_BLOCKS: u64 = 1 << 24;
/// Records are synced at least this often while a run writes.
pub const SYNC_EVERY: Duration = Duration::from_millis(100);

/// The region and content a state file describes; fixed by its first run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub seed: u64,
    pub block_size: u64,
    pub blocks: u64,
    /// Byte offset of block 0 on the export.
    pub offset: u64,
}

impl Params {
    pub const DEFAULT: Params = Params { seed: 1, block_size: 4096, blocks: 4096, offset: 0 };

    fn validate(&self) -> Result<()> {
        check_block_size(self.block_size).map_err(anyhow::Error::msg)?;
        if self.blocks == 0 || self.blocks > MAX_BLOCKS {
            bail!("blocks must be between 1 and {MAX_BLOCKS} (got {})", self.blocks);
        }
        if !self.offset.is_multiple_of(512) {
            bail!("offset {} is not a multiple of 512", self.offset);
        }
        self.end()?;
        Ok(())
    }

    /// Byte offset just past the region.
    pub fn end(&self) -> Result<u64> {
        self.blocks
            .checked_mul(self.block_size)
            .and_then(|len| len.checked_add(self.offset))
            .ok_or_else(|| anyhow::anyhow!("region overflows 64 bits"))
    }

    /// Byte offset of block `index` on the export.
    pub fn block_offset(&self, index: u64) -> u64 {
        self.offset + index * self.block_size
    }
}

/// Flags of `write` that may set the parameters; `None` = not given.
#[derive(Debug, Clone, Copy, Default)]
pub struct Requested {
    pub seed: Option<u64>,
    pub block_size: Option<u64>,
    pub blocks: Option<u64>,
    pub offset: Option<u64>,
}

impl Requested {
    fn params(&self) -> Params {
        let d = Params::DEFAULT;
        Params {
            seed: self.seed.unwrap_or(d.seed),
            block_size: self.block_size.unwrap_or(d.block_size),
            blocks: self.blocks.unwrap_or(d.blocks),
            offset: self.offset.unwrap_or(d.offset),
        }
    }

    /// Errors if a flag given contradicts the state file.
    fn agrees(&self, p: &Params) -> Result<()> {
        for (flag, given, have) in [
            ("--seed", self.seed, p.seed),
            ("--block-size", self.block_size, p.block_size),
            ("--blocks", self.blocks, p.blocks),
            ("--offset", self.offset, p.offset),
        ] {
            if let Some(given) = given {
                if given != have {
                    bail!(
                        "the state file was made with {flag} {have}, not {given}: drop the flag \
                         or use a new state file"
                    );
                }
            }
        }
        Ok(())
    }
}

/// One write run as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub run: u64,
    /// An `end` record was written: nothing of this run was lost.
    pub ended: bool,
    /// Highest generation recorded as issued in this run.
    pub max_gen: Option<u64>,
}

/// Everything a state file says.
#[derive(Debug, Clone)]
pub struct State {
    pub params: Params,
    pub blocks: Vec<BlockHistory>,
    pub runs: Vec<RunRecord>,
    pub issued: u64,
    pub acked: u64,
    pub failed: u64,
    pub longest_stall_ms: u64,
    /// Bytes up to the end of the last complete line.
    pub valid_len: u64,
}

impl State {
    /// Generation ranges that may hold issued writes without a record.
    pub fn unrecorded(&self) -> Unrecorded {
        Unrecorded(
            self.runs
                .iter()
                .filter(|r| !r.ended)
                .map(|r| (r.max_gen.unwrap_or(r.run << 32), (r.run + 1) << 32))
                .collect(),
        )
    }

    pub fn last_run(&self) -> u64 {
        self.runs.last().map_or(0, |r| r.run)
    }
}

fn header_line(p: &Params) -> String {
    format!(
        "{HEADER_WORD} {VERSION} seed={} block_size={} blocks={} offset={}\n",
        p.seed, p.block_size, p.blocks, p.offset
    )
}

fn parse_header(line: &str) -> Result<Params> {
    let mut words = line.split(' ');
    if words.next() != Some(HEADER_WORD) {
        bail!("not a pflex verify state file (first line: {line:?})");
    }
    match words.next().map(str::parse::<u32>) {
        Some(Ok(VERSION)) => {}
        _ => {
            bail!("unsupported state file version in {line:?} (this pflex reads version {VERSION})")
        }
    }
    let mut field = |name: &str| -> Result<u64> {
        let word = words.next().ok_or_else(|| anyhow::anyhow!("header lacks {name}="))?;
        let value = word
            .strip_prefix(name)
            .and_then(|w| w.strip_prefix('='))
            .ok_or_else(|| anyhow::anyhow!("header field {word:?} is not {name}=N"))?;
        value.parse().with_context(|| format!("header field {word:?}"))
    };
    let p = Params {
        seed: field("seed")?,
        block_size: field("block_size")?,
        blocks: field("blocks")?,
        offset: field("offset")?,
    };
    if words.next().is_some() {
        bail!("trailing words in header {line:?}");
    }
    p.validate()?;
    Ok(p)
}

/// Parses a whole state file.
pub fn parse(data: &[u8]) -> Result<State> {
    // A crash mid-append leaves a last line without its newline: ignore it.
    let valid_len = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let text = std::str::from_utf8(&data[..valid_len])
        .map_err(|e| anyhow::anyhow!("state file is not text (byte {})", e.valid_up_to()))?;
    let mut lines = text.lines().enumerate();
    let Some((_, first)) = lines.next() else {
        bail!("state file is empty (no write run recorded)");
    };
    let params = parse_header(first)?;
    let mut st = State {
        params,
        blocks: vec![BlockHistory::default(); params.blocks as usize],
        runs: Vec::new(),
        issued: 0,
        acked: 0,
        failed: 0,
        longest_stall_ms: 0,
        valid_len: valid_len as u64,
    };
    for (i, line) in lines {
        apply(&mut st, line).with_context(|| format!("state file line {}: {line:?}", i + 1))?;
    }
    Ok(st)
}

fn apply(st: &mut State, line: &str) -> Result<()> {
    let words: Vec<&str> = line.split(' ').collect();
    let num = |i: usize| -> Result<u64> {
        words.get(i).ok_or_else(|| anyhow::anyhow!("missing field"))?.parse().context("bad number")
    };
    let expect_len = |n: usize| -> Result<()> {
        if words.len() != n {
            bail!("expected {} fields, got {}", n, words.len());
        }
        Ok(())
    };
    match words[0] {
        "run" => {
            expect_len(3)?;
            let run = num(1)?;
            if run <= st.last_run() || run >= 1 << 31 {
                bail!("run {run} does not follow run {}", st.last_run());
            }
            num(2)?;
            st.runs.push(RunRecord { run, ended: false, max_gen: None });
        }
        "issued" | "acked" | "failed" => {
            expect_len(3)?;
            let (block, gen) = (num(1)?, num(2)?);
            let run = st.runs.last_mut().ok_or_else(|| anyhow::anyhow!("record before any run"))?;
            if run.ended {
                bail!("record after the end of run {}", run.run);
            }
            if gen >> 32 != run.run || gen & 0xffff_ffff == 0 {
                bail!("generation {gen} does not belong to run {}", run.run);
            }
            let h = st
                .blocks
                .get_mut(block as usize)
                .ok_or_else(|| anyhow::anyhow!("block {block} outside the region"))?;
            match words[0] {
                "issued" => {
                    let newest = h.in_doubt.last().copied().or(h.last_acked).unwrap_or(0);
                    if gen <= newest {
                        bail!("generation {gen} issued after generation {newest}");
                    }
                    h.ever_issued = true;
                    h.in_doubt.push(gen);
                    run.max_gen = Some(gen);
                    st.issued += 1;
                }
                "acked" => {
                    if !h.in_doubt.contains(&gen) {
                        bail!(
                            "generation {gen} acknowledged but not issued (or acknowledged twice)"
                        );
                    }
                    h.in_doubt.retain(|&g| g > gen);
                    h.last_acked = Some(gen);
                    st.acked += 1;
                }
                _ => {
                    if !h.in_doubt.contains(&gen) {
                        bail!("generation {gen} failed but is not in flight");
                    }
                    st.failed += 1;
                }
            }
        }
        "stall" => {
            expect_len(2)?;
            st.longest_stall_ms = st.longest_stall_ms.max(num(1)?);
        }
        "end" => {
            expect_len(2)?;
            let run = st.runs.last_mut().ok_or_else(|| anyhow::anyhow!("end before any run"))?;
            if num(1)? != run.run || run.ended {
                bail!("end does not close run {}", run.run);
            }
            run.ended = true;
        }
        other => bail!("unknown record {other:?}"),
    }
    Ok(())
}

/// Reads and parses the state file at `path` for `check`.
pub fn load(path: &Path) -> Result<State> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock_shared() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            bail!("{} is in use by a running `pflex verify write`", path.display())
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
    let mut data = Vec::new();
    file.read_to_end(&mut data).with_context(|| format!("reading {}", path.display()))?;
    parse(&data).with_context(|| format!("state file {}", path.display()))
}

/// Appends records for one write run; the file stays locked meanwhile.
pub struct StateWriter {
    file: File,
    path: PathBuf,
    buf: Vec<u8>,
    last_sync: Instant,
}

impl StateWriter {
    /// Opens (or creates, with `requested` and the defaults) the state file
    /// at `path`, locks it, and returns what it recorded so far. A file
    /// without any run yet (the first run could not connect) takes the
    /// flags of this one.
    pub fn open(path: &Path, requested: Requested) -> Result<(StateWriter, State)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                bail!("{} is in use by another `pflex verify`", path.display())
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
        let mut data = Vec::new();
        file.read_to_end(&mut data).with_context(|| format!("reading {}", path.display()))?;
        let fresh = match parse(&data) {
            _ if !data.contains(&b'\n') => true,
            Ok(state) => state.runs.is_empty(),
            Err(_) => false,
        };
        let state = if fresh {
            let params = requested.params();
            params.validate()?;
            let header = header_line(&params);
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(header.as_bytes())?;
            file.sync_all().with_context(|| format!("syncing {}", path.display()))?;
            sync_parent(path)?;
            parse(header.as_bytes())?
        } else {
            let state = parse(&data).with_context(|| format!("state file {}", path.display()))?;
            requested.agrees(&state.params)?;
            if state.valid_len < data.len() as u64 {
                // The partial record of a crashed run: cut it off.
                file.set_len(state.valid_len)?;
                file.sync_all()?;
            }
            file.seek(SeekFrom::Start(state.valid_len))?;
            state
        };
        let writer = StateWriter {
            file,
            path: path.to_path_buf(),
            buf: Vec::new(),
            last_sync: Instant::now(),
        };
        Ok((writer, state))
    }

    /// Records the start of `run` and syncs it before any write of the run.
    pub fn start_run(&mut self, run: u64) -> Result<()> {
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        self.line(format_args!("run {run} {ms}"));
        self.sync()
    }

    fn line(&mut self, args: std::fmt::Arguments<'_>) {
        // Writing into a Vec cannot fail.
        let _ = self.buf.write_fmt(args);
        self.buf.push(b'\n');
    }

    pub fn issued(&mut self, block: u64, gen: u64) {
        self.line(format_args!("issued {block} {gen}"));
    }

    pub fn acked(&mut self, block: u64, gen: u64) {
        self.line(format_args!("acked {block} {gen}"));
    }

    pub fn failed(&mut self, block: u64, gen: u64) {
        self.line(format_args!("failed {block} {gen}"));
    }

    pub fn stall(&mut self, ms: u64) {
        self.line(format_args!("stall {ms}"));
    }

    /// Records the clean end of `run` and syncs.
    pub fn end_run(&mut self, run: u64) -> Result<()> {
        self.line(format_args!("end {run}"));
        self.sync()
    }

    /// Appends what is buffered and `fdatasync`s it.
    pub fn sync(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.file
                .write_all(&self.buf)
                .with_context(|| format!("appending to {}", self.path.display()))?;
            self.buf.clear();
        }
        self.file.sync_data().with_context(|| format!("syncing {}", self.path.display()))?;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// [`Self::sync`] if the last one is [`SYNC_EVERY`] old.
    pub fn sync_if_due(&mut self) -> Result<()> {
        if self.last_sync.elapsed() >= SYNC_EVERY {
            self.sync()?;
        }
        Ok(())
    }
}

/// Makes a newly created file's directory entry durable.
fn sync_parent(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const G1: u64 = 1 << 32;
    const G2: u64 = 2 << 32;

    fn file(body: &str) -> String {
        format!("pflex-verify 1 seed=3 block_size=512 blocks=4 offset=1024\n{body}")
    }

    #[test]
    fn parses_runs_and_histories() {
        let text = file(&format!(
            "run 1 100\nissued 0 {a}\nacked 0 {a}\nissued 0 {b}\nissued 1 {c}\nfailed 1 {c}\n\
             stall 40\nend 1\nrun 2 200\nissued 2 {d}\nacked 2 {d}\nstall 7\nissued 0 {e}\nacked 0 {e}\n",
            a = G1 + 1,
            b = G1 + 2,
            c = G1 + 3,
            d = G2 + 1,
            e = G2 + 2,
        ));
        let st = parse(text.as_bytes()).unwrap();
        assert_eq!(st.params, Params { seed: 3, block_size: 512, blocks: 4, offset: 1024 });
        assert_eq!((st.issued, st.acked, st.failed, st.longest_stall_ms), (5, 3, 1, 40));
        assert_eq!(st.blocks[0].last_acked, Some(G2 + 2));
        assert!(st.blocks[0].in_doubt.is_empty());
        assert_eq!(
            st.blocks[1],
            BlockHistory { ever_issued: true, last_acked: None, in_doubt: vec![G1 + 3] }
        );
        assert_eq!(st.blocks[3], BlockHistory::default());
        assert_eq!(st.last_run(), 2);
        // Run 1 ended; run 2 did not, so anything after its last issue may be unrecorded.
        assert_eq!(st.unrecorded(), Unrecorded(vec![(G2 + 2, 3 << 32)]));
        assert_eq!(st.params.block_offset(2), 2048);
    }

    #[test]
    fn partial_last_line_is_ignored() {
        let text = file(&format!("run 1 100\nissued 0 {}\nacked 0 {}\nacked 0 4", G1 + 1, G1 + 1));
        let st = parse(text.as_bytes()).unwrap();
        assert_eq!(st.acked, 1);
        assert_eq!(st.valid_len as usize, text.len() - "acked 0 4".len());
    }

    #[test]
    fn malformed_files_are_clear_errors() {
        let bad = [
            ("", "empty"),
            ("hello\n", "not a pflex verify state file"),
            ("pflex-verify 9 seed=1 block_size=512 blocks=1 offset=0\n", "version"),
            ("pflex-verify 1 seed=1 block_size=100 blocks=1 offset=0\n", "block size"),
            ("pflex-verify 1 seed=x block_size=512 blocks=1 offset=0\n", "seed=x"),
            ("pflex-verify 1 seed=1 block_size=512 blocks=99999999999 offset=0\n", "blocks must"),
            ("pflex-verify 1 seed=1 block_size=512 blocks=1 offset=7\n", "multiple of 512"),
            (&file("issued 0 1\n"), "before any run"),
            (&file("run 1 5\nissued 9 4294967297\n"), "outside the region"),
            (&file("run 1 5\nissued 0 8589934593\n"), "does not belong"),
            (&file("run 1 5\nacked 0 4294967297\n"), "not issued"),
            (&file("run 1 5\nissued 0 4294967298\nissued 0 4294967297\n"), "issued after"),
            (&file("run 2 5\nrun 1 5\n"), "does not follow"),
            (&file("run 1 5\nbogus 1\n"), "unknown record"),
            (&file("run 1 5\nissued 0\n"), "expected 3 fields"),
            (&file("run 1 5\nend 2\n"), "does not close"),
        ];
        for (text, want) in bad {
            let err = format!("{:#}", parse(text.as_bytes()).unwrap_err());
            assert!(err.contains(want), "{text:?}: {err}");
        }
        assert!(format!("{:#}", parse(b"\xff\xfe\n").unwrap_err()).contains("not text"));
    }

    #[test]
    fn writer_creates_continues_and_checks_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        // A file the first run made but never ran in takes the next run's flags.
        drop(
            StateWriter::open(&path, Requested { blocks: Some(3), ..Default::default() }).unwrap(),
        );
        let req = Requested { blocks: Some(8), block_size: Some(512), ..Default::default() };
        {
            let (mut w, st) = StateWriter::open(&path, req).unwrap();
            assert_eq!(st.last_run(), 0);
            assert!(StateWriter::open(&path, req).is_err(), "locked while a run writes");
            w.start_run(1).unwrap();
            w.issued(3, G1 + 1);
            w.acked(3, G1 + 1);
            w.stall(5);
            w.end_run(1).unwrap();
        }
        // A crashed append leaves half a line.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"run 2").unwrap();
        let err = StateWriter::open(&path, Requested { blocks: Some(9), ..Default::default() });
        assert!(format!("{:#}", err.err().unwrap()).contains("--blocks 8"));
        let (mut w, st) = StateWriter::open(&path, Requested::default()).unwrap();
        assert_eq!((st.last_run(), st.acked, st.params.blocks), (1, 1, 8));
        w.start_run(2).unwrap();
        w.issued(3, G2 + 1);
        w.sync().unwrap();
        drop(w);
        let st = load(&path).unwrap();
        assert_eq!(st.runs.len(), 2);
        assert_eq!(st.blocks[3].in_doubt, vec![G2 + 1]);
        assert_eq!(st.longest_stall_ms, 5);
    }
}
