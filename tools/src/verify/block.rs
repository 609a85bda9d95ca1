//! The self-describing block `pflex verify` writes, and the verdict on a
//! block read back. Pure functions only: no I/O, so every rule is tested
//! by a table.
//!
//! A block starts with a 40-byte header (little endian):
//!
//! | bytes  | field                                                    |
//! | ------ | -------------------------------------------------------- |
//! | 0..8   | magic `PFXVRFY1`                                         |
//! | 8..16  | seed of the state file (the run id of the whole history) |
//! | 16..24 | byte offset of the block on the export                   |
//! | 24..32 | generation (`run << 32 | sequence`)                      |
//! | 32..36 | block size                                               |
//! | 36..40 | CRC32 of every other byte of the block                   |
//!
//! and the rest is pseudo-random fill derived from (seed, offset,
//! generation), so any generation of any block can be regenerated exactly,
//! and two generations of the same block differ in every 512-byte sector.

/// First bytes of every block written by `pflex verify`.
pub const MAGIC: [u8; 8] = *b"PFXVRFY1";
/// Bytes of header at the start of a block.
pub const HEADER_LEN: usize = 40;
/// The unit a device may tear a write at; blocks are made of whole sectors.
pub const SECTOR: usize = 512;
const CRC_AT: usize = 36;

/// What a block is supposed to be: which state file and which place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub seed: u64,
    /// Byte offset on the export.
    pub offset: u64,
    pub block_size: usize,
}

/// The header of a block whose checksum holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub seed: u64,
    pub offset: u64,
    pub gen: u64,
}

/// What a block read back looks like, before any history is consulted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// Every byte is zero (a block nobody wrote, or a zeroed one).
    Zero,
    /// A complete block written by `pflex verify` (checksum holds).
    Valid(Header),
    /// Anything else, with the reason.
    Invalid(String),
}

/// Whether `block_size` is one `pflex verify` can use.
pub fn check_block_size(block_size: u64) -> Result<(), String> {
    if block_size < SECTOR as u64
        || !block_size.is_multiple_of(SECTOR as u64)
        || block_size > 1 << 24
    {
        return Err(format!(
            "block size {block_size} must be a multiple of {SECTOR} between {SECTOR} and 16 MiB"
        ));
    }
    Ok(())
}

/// splitmix64: a tiny, well mixed generator; the fill and the block
/// picker only need determinism, not cryptographic strength.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`); the tiny modulo bias does not matter here.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

fn crc(block: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&block[..CRC_AT]);
    h.update(&block[HEADER_LEN..]);
    h.finalize()
}

/// The exact bytes of generation `gen` of the block at `slot`.
pub fn encode(slot: Slot, gen: u64) -> Vec<u8> {
    let mut b = vec![0u8; slot.block_size];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..16].copy_from_slice(&slot.seed.to_le_bytes());
    b[16..24].copy_from_slice(&slot.offset.to_le_bytes());
    b[24..32].copy_from_slice(&gen.to_le_bytes());
    b[32..36].copy_from_slice(&(slot.block_size as u32).to_le_bytes());
    let mut rng = SplitMix::new(
        slot.seed ^ slot.offset.rotate_left(21) ^ gen.wrapping_mul(0xd605_bbb5_8c8a_bbd5),
    );
    for chunk in b[HEADER_LEN..].chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let c = crc(&b);
    b[CRC_AT..HEADER_LEN].copy_from_slice(&c.to_le_bytes());
    b
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

/// Reads the header of `block` and checks its checksum.
pub fn decode(block: &[u8]) -> Decoded {
    if block.iter().all(|&b| b == 0) {
        return Decoded::Zero;
    }
    if block.len() < HEADER_LEN {
        return Decoded::Invalid(format!("only {} bytes", block.len()));
    }
    if block[0..8] != MAGIC {
        return Decoded::Invalid("no pflex verify header (magic missing)".into());
    }
    let size = u32_at(block, 32) as usize;
    if size != block.len() {
        return Decoded::Invalid(format!("header says {size} bytes, block has {}", block.len()));
    }
    let stored = u32_at(block, CRC_AT);
    let computed = crc(block);
    let header =
        Header { seed: u64_at(block, 8), offset: u64_at(block, 16), gen: u64_at(block, 24) };
    if stored != computed {
        return Decoded::Invalid(format!(
            "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}; header says \
             generation {})",
            header.gen
        ));
    }
    Decoded::Valid(header)
}

/// What the state file says about one block.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockHistory {
    /// Some write to the block was issued.
    pub ever_issued: bool,
    /// The newest acknowledged generation.
    pub last_acked: Option<u64>,
    /// Generations issued after `last_acked` and never acknowledged: each
    /// may or may not have reached the device.
    pub in_doubt: Vec<u64>,
}

/// Generation ranges whose issue records may have been lost: the tail of
/// every write run that did not end cleanly (the checker was killed before
/// its last records were synced). A valid block of such a generation is a
/// write that was issued; it cannot have been acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unrecorded(pub Vec<(u64, u64)>);

impl Unrecorded {
    /// `gen` lies strictly inside one of the ranges.
    pub fn contains(&self, gen: u64) -> bool {
        self.0.iter().any(|&(after, before)| gen > after && gen < before)
    }
}

/// The outcome for one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Never written by any run: whatever it holds is fine.
    NeverWritten,
    /// Holds what the history allows.
    Ok,
    /// An acknowledged generation exists, the block holds no generation of
    /// it at all (zeroes, another offset's block, another state's block).
    Lost,
    /// A valid block of this offset, older than the last acknowledged one.
    Stale,
    /// Not a whole block (bad header or checksum, mixed content).
    Torn,
    /// A valid block of this offset of a generation never issued to it.
    Unexpected,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::NeverWritten => "never_written",
            Kind::Ok => "ok",
            Kind::Lost => "lost",
            Kind::Stale => "stale",
            Kind::Torn => "torn",
            Kind::Unexpected => "unexpected",
        }
    }

    /// Counts against the cluster.
    pub fn is_bad(self) -> bool {
        matches!(self, Kind::Lost | Kind::Stale | Kind::Torn | Kind::Unexpected)
    }
}

/// A verdict with the facts behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub kind: Kind,
    /// Generation found on the device, if the block was valid.
    pub found: Option<u64>,
    pub detail: String,
}

fn verdict(kind: Kind, found: Option<u64>, detail: impl Into<String>) -> Verdict {
    Verdict { kind, found, detail: detail.into() }
}

/// Every sector of `block` equals that sector of one of the generations in
/// `candidates`: a write that was never acknowledged stopped half way.
fn sectors_explained(slot: Slot, block: &[u8], candidates: &[u64]) -> bool {
    let images: Vec<Vec<u8>> = candidates.iter().map(|&g| encode(slot, g)).collect();
    block.chunks(SECTOR).enumerate().all(|(i, sector)| {
        images.iter().any(|img| img.get(i * SECTOR..i * SECTOR + sector.len()) == Some(sector))
    })
}

/// The verdict on `block`, read from `slot`, given its history.
///
/// - no write issued: `never_written`; issued but none acknowledged: `ok`
///   whatever it holds (nothing was promised);
/// - the last acknowledged generation, or a newer one that was issued (or
///   may have been, see [`Unrecorded`]): `ok`;
/// - an older generation of this offset: `stale`;
/// - zeroes, or a valid block of another offset or seed: `lost`;
/// - not a valid block: `torn`, unless each sector is the acknowledged
///   generation or a newer in-doubt one (a write that never completed may
///   tear the block, that breaks no promise): then `ok`;
/// - a valid block of a generation never issued to it: `unexpected`.
pub fn classify(
    history: &BlockHistory,
    unrecorded: &Unrecorded,
    slot: Slot,
    block: &[u8],
) -> Verdict {
    if !history.ever_issued {
        return verdict(Kind::NeverWritten, None, "never written");
    }
    let Some(acked) = history.last_acked else {
        return verdict(Kind::Ok, None, "no write acknowledged yet");
    };
    match decode(block) {
        Decoded::Zero => verdict(
            Kind::Lost,
            None,
            format!("reads as zeroes; generation {acked} was acknowledged"),
        ),
        Decoded::Valid(h) if h.seed != slot.seed => verdict(
            Kind::Lost,
            None,
            format!(
                "holds a block of seed {} (expected {}); generation {acked} acknowledged",
                h.seed, slot.seed
            ),
        ),
        Decoded::Valid(h) if h.offset != slot.offset => verdict(
            Kind::Lost,
            None,
            format!(
                "holds the block of offset {} generation {}; generation {acked} acknowledged",
                h.offset, h.gen
            ),
        ),
        Decoded::Valid(h) if h.gen == acked => {
            verdict(Kind::Ok, Some(h.gen), "last acknowledged generation")
        }
        Decoded::Valid(h) if h.gen < acked => verdict(
            Kind::Stale,
            Some(h.gen),
            format!("holds generation {}, generation {acked} was acknowledged", h.gen),
        ),
        Decoded::Valid(h) if history.in_doubt.contains(&h.gen) => {
            verdict(Kind::Ok, Some(h.gen), "newer generation, issued but not acknowledged")
        }
        Decoded::Valid(h) if unrecorded.contains(h.gen) => verdict(
            Kind::Ok,
            Some(h.gen),
            "newer generation from a run whose last records were lost",
        ),
        Decoded::Valid(h) => verdict(
            Kind::Unexpected,
            Some(h.gen),
            format!(
                "holds generation {}, never issued to this block (acknowledged: {acked})",
                h.gen
            ),
        ),
        Decoded::Invalid(reason) => {
            if !history.in_doubt.is_empty() {
                let mut candidates = vec![acked];
                candidates.extend(&history.in_doubt);
                if sectors_explained(slot, block, &candidates) {
                    return verdict(
                        Kind::Ok,
                        None,
                        "torn by a write that was never acknowledged, every sector is an allowed \
                         generation",
                    );
                }
            }
            verdict(Kind::Torn, None, format!("{reason}; generation {acked} was acknowledged"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLOT: Slot = Slot { seed: 7, offset: 8192, block_size: 4096 };

    #[test]
    fn encode_decode_round_trip() {
        for (slot, gen) in [
            (SLOT, 1),
            (SLOT, u64::MAX),
            (Slot { seed: 0, offset: 0, block_size: 512 }, (3 << 32) | 9),
            (Slot { seed: u64::MAX, offset: 1 << 40, block_size: 65536 }, 42),
        ] {
            let b = encode(slot, gen);
            assert_eq!(b.len(), slot.block_size);
            assert_eq!(
                decode(&b),
                Decoded::Valid(Header { seed: slot.seed, offset: slot.offset, gen })
            );
            assert_eq!(encode(slot, gen), b, "deterministic");
        }
    }

    #[test]
    fn generations_differ_in_every_sector() {
        let a = encode(SLOT, 5);
        let b = encode(SLOT, 6);
        for (x, y) in a.chunks(SECTOR).zip(b.chunks(SECTOR)) {
            assert_ne!(x, y);
        }
        assert_ne!(encode(SLOT, 5), encode(Slot { offset: 0, ..SLOT }, 5));
    }

    #[test]
    fn decode_rejects_damage() {
        let good = encode(SLOT, 3);
        assert_eq!(decode(&vec![0; 4096]), Decoded::Zero);
        for at in [0usize, 9, 20, 30, 33, 37, 40, 1000, 4095] {
            let mut b = good.clone();
            b[at] ^= 0x10;
            assert!(matches!(decode(&b), Decoded::Invalid(_)), "byte {at} flipped");
        }
        assert!(matches!(decode(&good[..2048]), Decoded::Invalid(_)));
        assert!(matches!(decode(&[1, 2, 3]), Decoded::Invalid(_)));
        assert!(matches!(decode(&[0xff; 4096]), Decoded::Invalid(_)));
    }

    #[test]
    fn block_sizes() {
        assert!(check_block_size(512).is_ok());
        assert!(check_block_size(4096).is_ok());
        for bad in [0, 100, 513, 1 << 25] {
            assert!(check_block_size(bad).is_err(), "{bad}");
        }
    }

    fn hist(acked: Option<u64>, in_doubt: &[u64]) -> BlockHistory {
        BlockHistory { ever_issued: true, last_acked: acked, in_doubt: in_doubt.to_vec() }
    }

    /// A block whose first sector is generation `a` and the rest `b`.
    fn mixed(a: u64, b: u64) -> Vec<u8> {
        let mut x = encode(SLOT, a);
        x[SECTOR..].copy_from_slice(&encode(SLOT, b)[SECTOR..]);
        x
    }

    #[test]
    fn classify_table() {
        let zero = vec![0u8; 4096];
        let flipped = {
            let mut b = encode(SLOT, 10);
            b[2000] ^= 1;
            b
        };
        let other_offset = encode(Slot { offset: 0, ..SLOT }, 10);
        let other_seed = encode(Slot { seed: 8, ..SLOT }, 10);
        let window = Unrecorded(vec![(20, 30)]);
        let none = Unrecorded::default();
        let never = BlockHistory::default();
        #[rustfmt::skip]
        let cases: Vec<(&str, BlockHistory, &Unrecorded, Vec<u8>, Kind)> = vec![
            ("never written, zeroes", never.clone(), &none, zero.clone(), Kind::NeverWritten),
            ("never written, garbage", never.clone(), &none, vec![0xab; 4096], Kind::NeverWritten),
            ("issued only, zeroes", hist(None, &[3]), &none, zero.clone(), Kind::Ok),
            ("issued only, torn", hist(None, &[3]), &none, flipped.clone(), Kind::Ok),
            ("acked, holds it", hist(Some(10), &[]), &none, encode(SLOT, 10), Kind::Ok),
            ("acked, newer in doubt", hist(Some(10), &[11]), &none, encode(SLOT, 11), Kind::Ok),
            ("acked, in doubt not landed", hist(Some(10), &[11]), &none, encode(SLOT, 10), Kind::Ok),
            ("acked, zeroes", hist(Some(10), &[]), &none, zero.clone(), Kind::Lost),
            ("acked, zeroes with doubt", hist(Some(10), &[11]), &none, zero.clone(), Kind::Lost),
            ("acked, other offset", hist(Some(10), &[]), &none, other_offset, Kind::Lost),
            ("acked, other seed", hist(Some(10), &[]), &none, other_seed, Kind::Lost),
            ("acked, older", hist(Some(10), &[]), &none, encode(SLOT, 9), Kind::Stale),
            ("acked, older with doubt", hist(Some(10), &[11]), &none, encode(SLOT, 9), Kind::Stale),
            ("acked, flipped byte", hist(Some(10), &[]), &none, flipped.clone(), Kind::Torn),
            ("acked, garbage", hist(Some(10), &[]), &none, vec![0xab; 4096], Kind::Torn),
            ("acked, mix with in-doubt", hist(Some(10), &[11]), &none, mixed(10, 11), Kind::Ok),
            ("acked, mix in-doubt first", hist(Some(10), &[11]), &none, mixed(11, 10), Kind::Ok),
            ("acked, mix no doubt", hist(Some(10), &[]), &none, mixed(10, 9), Kind::Torn),
            ("acked, mix with older", hist(Some(10), &[11]), &none, mixed(9, 11), Kind::Torn),
            ("acked, never issued gen", hist(Some(10), &[]), &none, encode(SLOT, 25), Kind::Unexpected),
            ("acked, lost-record gen", hist(Some(10), &[]), &window, encode(SLOT, 25), Kind::Ok),
            ("acked, beyond window", hist(Some(10), &[]), &window, encode(SLOT, 30), Kind::Unexpected),
            ("acked, older in window", hist(Some(22), &[]), &window, encode(SLOT, 21), Kind::Stale),
        ];
        for (name, history, unrecorded, block, want) in cases {
            let got = classify(&history, unrecorded, SLOT, &block);
            assert_eq!(got.kind, want, "{name}: {}", got.detail);
        }
    }

    #[test]
    fn picker_is_deterministic_and_in_range() {
        let mut a = SplitMix::new(1);
        let mut b = SplitMix::new(1);
        for _ in 0..1000 {
            let x = a.below(17);
            assert!(x < 17);
            assert_eq!(x, b.below(17));
        }
    }
}
