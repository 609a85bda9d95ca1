//! Splitting a byte range of a volume at chunk boundaries (pure code).
//!
//! Every data-plane request addresses one chunk, so an NBD request is cut
//! into pieces that each stay inside one 1 MiB chunk; each piece goes to
//! its own chunk's primary.

use std::ops::Range;

/// One chunk-local part of a volume range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub chunk_index: u64,
    /// Offset within the chunk.
    pub offset_in_chunk: u32,
    pub length: u32,
    /// Where this piece sits in the caller's buffer (relative to the range start).
    pub buffer: Range<usize>,
}

impl Piece {
    /// Whether the piece covers its whole chunk.
    pub fn is_whole_chunk(&self, chunk_size: u64) -> bool {
        self.offset_in_chunk == 0 && u64::from(self.length) == chunk_size
    }
}

/// Pieces of `offset .. offset + length`, in order. `chunk_size` must be
/// non-zero and at most `u32::MAX`; a zero length gives no pieces.
pub fn split(offset: u64, length: u64, chunk_size: u64) -> impl Iterator<Item = Piece> {
    let chunk_size = chunk_size.clamp(1, u64::from(u32::MAX));
    let end = offset.saturating_add(length);
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let chunk_index = pos / chunk_size;
        let in_chunk = pos % chunk_size;
        let len = (chunk_size - in_chunk).min(end - pos);
        let start = (pos - offset) as usize;
        let piece = Piece {
            chunk_index,
            offset_in_chunk: in_chunk as u32,
            length: len as u32,
            buffer: start..start + len as usize,
        };
        pos += len;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn unaligned_range_across_a_boundary() {
        let pieces: Vec<_> = split(1_048_000, 5000, MIB).collect();
        assert_eq!(
            pieces,
            vec![
                Piece { chunk_index: 0, offset_in_chunk: 1_048_000, length: 576, buffer: 0..576 },
                Piece { chunk_index: 1, offset_in_chunk: 0, length: 4424, buffer: 576..5000 },
            ]
        );
        assert!(!pieces[0].is_whole_chunk(MIB));
        let whole: Vec<_> = split(MIB, 3 * MIB, MIB).collect();
        assert_eq!(whole.len(), 3);
        assert!(whole.iter().all(|p| p.is_whole_chunk(MIB)));
        assert_eq!(split(5, 0, MIB).count(), 0);
    }

    proptest! {
        #[test]
        fn pieces_tile_the_range(offset in 0u64..(1 << 40), length in 0u64..(40 * MIB)) {
            let mut expect = offset;
            let mut buf = 0usize;
            for p in split(offset, length, MIB) {
                prop_assert_eq!(p.chunk_index * MIB + u64::from(p.offset_in_chunk), expect);
                prop_assert!(u64::from(p.offset_in_chunk) + u64::from(p.length) <= MIB);
                prop_assert!(p.length > 0);
                prop_assert_eq!(p.buffer.start, buf);
                prop_assert_eq!(p.buffer.len(), p.length as usize);
                expect += u64::from(p.length);
                buf = p.buffer.end;
            }
            prop_assert_eq!(expect, offset + length);
        }
    }
}
