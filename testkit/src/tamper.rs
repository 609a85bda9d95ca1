//! An on-path attacker for data-plane tests: a relay that parses pflex
//! frames and changes payload bytes in flight while keeping their CRC32, so
//! only a MAC that covers every payload byte can notice.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pflex_proto::frame::{crc32, FrameHeader, Op, Status, HEADER_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Which frames the relay changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    /// The payload of every WRITE request.
    WriteRequests,
    /// The payload of every `Ok` READ reply.
    ReadReplies,
}

/// A relay to one data-plane address that tampers with frames.
pub struct TamperingRelay {
    pub addr: SocketAddr,
    tampered: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TamperingRelay {
    pub async fn start(target: SocketAddr, tamper: Tamper) -> TamperingRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tampered = Arc::new(AtomicU64::new(0));
        let count = tampered.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else { continue };
                let (client_read, client_write) = inbound.into_split();
                let (server_read, server_write) = outbound.into_split();
                let up = tamper == Tamper::WriteRequests;
                tokio::spawn(pump(client_read, server_write, false, up, count.clone()));
                tokio::spawn(pump(server_read, client_write, true, !up, count.clone()));
            }
        });
        TamperingRelay { addr, tampered, task }
    }

    /// How many frames were changed so far.
    pub fn tampered(&self) -> u64 {
        self.tampered.load(Ordering::Relaxed)
    }
}

impl Drop for TamperingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards frames one way, changing the payloads `tamper` asks for.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    replies: bool,
    tamper: bool,
    count: Arc<AtomicU64>,
) {
    loop {
        let mut raw = [0u8; HEADER_LEN];
        if from.read_exact(&mut raw).await.is_err() {
            return;
        }
        let Ok(header) = FrameHeader::decode(&raw) else { return };
        let mut payload = vec![0u8; header.payload_len(replies)];
        if from.read_exact(&mut payload).await.is_err() {
            return;
        }
        let wanted = if replies {
            header.op == Op::Read as u8 && header.status == Status::Ok as u16
        } else {
            header.op == Op::Write as u8
        };
        if tamper && wanted && payload.len() >= 16 {
            let before = crc32(&payload);
            let fix = payload.len() - 4;
            flip_keeping_crc32(&mut payload, 1, fix);
            assert_eq!(crc32(&payload), before, "the change keeps the CRC32");
            count.fetch_add(1, Ordering::Relaxed);
        }
        if to.write_all(&raw).await.is_err() || to.write_all(&payload).await.is_err() {
            return;
        }
    }
}

/// Flips the low bit of `data[at]` and rewrites the 4 bytes at `fix` so that
/// the CRC32 of `data` is unchanged (CRC32 is affine over GF(2): the change
/// in CRC of a difference pattern does not depend on the data).
pub fn flip_keeping_crc32(data: &mut [u8], at: usize, fix: usize) {
    assert!(fix + 4 <= data.len() && (at < fix || at >= fix + 4));
    let n = data.len();
    let zero = crc32(&vec![0u8; n]);
    // The CRC change a difference pattern causes.
    let effect = |diff: &[u8]| crc32(diff) ^ zero;
    let mut target_diff = vec![0u8; n];
    target_diff[at] = 1;
    let target = effect(&target_diff);
    // Columns: the effect of each of the 32 bits at `fix`.
    let mut columns = [0u32; 32];
    for (bit, column) in columns.iter_mut().enumerate() {
        let mut diff = vec![0u8; n];
        diff[fix + bit / 8] = 1 << (bit % 8);
        *column = effect(&diff);
    }
    // Solve columns · x = target over GF(2) (Gaussian elimination on the
    // augmented rows, one per CRC bit).
    let mut rows: Vec<(u32, bool)> = (0..32)
        .map(|r| {
            let mut row = 0u32;
            for (c, column) in columns.iter().enumerate() {
                if column >> r & 1 == 1 {
                    row |= 1 << c;
                }
            }
            (row, target >> r & 1 == 1)
        })
        .collect();
    let mut pivot_of = [usize::MAX; 32];
    let mut next = 0;
    for (c, pivot) in pivot_of.iter_mut().enumerate() {
        let Some(p) = (next..32).find(|&r| rows[r].0 >> c & 1 == 1) else { continue };
        rows.swap(next, p);
        for r in 0..32 {
            if r != next && rows[r].0 >> c & 1 == 1 {
                rows[r].0 ^= rows[next].0;
                rows[r].1 ^= rows[next].1;
            }
        }
        *pivot = next;
        next += 1;
    }
    let mut x = 0u32;
    for (c, &p) in pivot_of.iter().enumerate() {
        if p != usize::MAX && rows[p].1 {
            x |= 1 << c;
        }
    }
    data[at] ^= 1;
    for (i, byte) in x.to_le_bytes().iter().enumerate() {
        data[fix + i] ^= byte;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flip_keeps_the_crc_and_changes_the_data() {
        for len in [16usize, 4096, 65536] {
            let original: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut changed = original.clone();
            flip_keeping_crc32(&mut changed, 1, len - 4);
            assert_ne!(changed, original);
            assert_eq!(crc32(&changed), crc32(&original), "len {len}");
        }
    }
}
