//! Binary data-plane framing (SDC → SDS and SDS → SDS).
//!
//! Every message is a fixed 88-byte little-endian [`FrameHeader`] followed
//! by `length` payload bytes (WRITE and AUTH requests, READ replies).
//! Requests and replies share the header layout; a reply echoes the
//! request id, so many requests can be in flight on one connection and
//! replies may come back in any order.
//!
//! ```text
//!  0 magic u32 "PFLX"   4 op u8   5 flags u8   6 status u16 (replies)
//!  8 request_id u64    16 volume_id u64       24 chunk_index u64
//! 32 offset u32 (within the chunk)            36 length u32
//! 40 epoch u64 (placement epoch)              48 token_id u64
//! 56 seq u64 (replay window)                  64 payload_crc u32 (CRC32)
//! 68 reserved u32      72 mac [16]
//! ```
//!
//! Requests are MACed with the token's session key at that SDS (SDC) or the
//! peer key (replication, flag [`flags::REPLICA`]): `mac = BLAKE3-keyed(key,
//! bytes 0..72 || payload)[..16]`, so an on-path change to any header or
//! payload byte is detected (the CRC32 stays for data at rest). A reply to an
//! authenticated request is MACed with the same key over its own bytes 0..72,
//! the request's MAC (which binds it to that one request) and its payload;
//! the client accepts an `Ok` reply only with a valid MAC. Only refusals
//! before the key is known (no token, bad MAC) and PING replies are unsealed,
//! and they are never taken as success. Confidentiality needs TLS.

use crate::token::{SessionKey, MAC_LEN};
use crate::CHUNK_SIZE;

pub const HEADER_LEN: usize = 88;
pub const MAGIC: u32 = u32::from_le_bytes(*b"PFLX");
/// Largest payload of one frame: one whole chunk (and an AUTH token).
pub const MAX_PAYLOAD: u32 = CHUNK_SIZE as u32;
const MAC_OFFSET: usize = 72;

/// Data-plane operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Read = 1,
    Write = 2,
    /// Make every acknowledged write of the volume durable on this SDS (and,
    /// from a primary, on its peers).
    Flush = 3,
    /// Deallocate a range: a whole chunk frees its slot, a partial range
    /// reads back as zeroes.
    Trim = 4,
    WriteZeroes = 5,
    /// Present a signed token (payload); later requests refer to its id.
    /// The reply's payload is the SDS's sequence floor (u64, little endian):
    /// the token's later requests must carry sequence numbers above it.
    Auth = 6,
    /// Liveness probe, no payload, no token.
    Ping = 7,
    /// Which of the chunks `chunk_index .. chunk_index + length` this SDS
    /// holds (read scope). The reply's payload is a bitmap of `length` bits
    /// (`ceil(length / 8)` bytes, chunk `chunk_index + i` is bit `i % 8` of
    /// byte `i / 8`). The SDC asks each chunk's primary, for NBD
    /// BLOCK_STATUS: a chunk never written is a hole. `offset` must be 0.
    Allocation = 8,
    /// Between SDS nodes only (flag `REPLICA`): a primary asks the secondary
    /// of its placement groups in `volume_id` for a lease under `epoch`. No
    /// payload. `Ok` grants it; `StaleEpoch` means the secondary knows a
    /// newer map and will not renew the sender's leases under this one.
    Lease = 9,
    /// Between SDS nodes only (flag `REPLICA`): the primary of placement
    /// group `chunk_index` of `volume_id` asks a copy it is about to resync
    /// which chunks of that PG the copy itself logged as possibly ahead of
    /// the other copy (writes it applied whose forward failed). No payload;
    /// the reply's payload is those chunk indices, 8 bytes little-endian
    /// each, and the primary copies them over too.
    DirtyList = 10,
    /// Between SDS nodes only (flag `REPLICA`): the sender was primary of
    /// placement group `chunk_index` of `volume_id` until a move handed
    /// that role to the receiver under `epoch`, and knows that map, so it
    /// serves the PG no more: the receiver may drop the lease it granted the
    /// sender for that PG instead of waiting it out. Refused unless, in the
    /// receiver's newest map (at least `epoch`), the receiver is that PG's
    /// primary and the sender holds no copy of it. No payload.
    LeaseRelease = 11,
}

/// Most chunks one [`Op::Allocation`] request may cover.
pub const MAX_ALLOCATION_CHUNKS: u32 = 1 << 16;

impl Op {
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::Flush,
            4 => Op::Trim,
            5 => Op::WriteZeroes,
            6 => Op::Auth,
            7 => Op::Ping,
            8 => Op::Allocation,
            9 => Op::Lease,
            10 => Op::DirtyList,
            11 => Op::LeaseRelease,
            _ => return None,
        })
    }
    /// Whether the op changes data (and so needs a read-write token).
    pub fn is_write(self) -> bool {
        matches!(self, Op::Write | Op::Trim | Op::WriteZeroes)
    }
}

/// Request flag bits.
pub mod flags {
    /// Write-through: the data is durable when the reply is sent.
    pub const FUA: u8 = 0x01;
    /// A primary forwarding to its secondary (MAC by the peer key).
    pub const REPLICA: u8 = 0x02;
    pub const ALL: u8 = FUA | REPLICA;
}

/// Reply status codes; each rejection has its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Status {
    Ok = 0,
    IoError = 1,
    /// Range outside the chunk, bad length, bad flags.
    Invalid = 2,
    /// Payload CRC32 does not match the header.
    BadCrc = 3,
    NoSpace = 4,
    UnknownVolume = 5,
    /// Token id not presented on this SDS (send AUTH, then retry).
    NoToken = 10,
    BadSignature = 11,
    Expired = 12,
    WrongVolume = 13,
    ReadOnly = 14,
    Revoked = 15,
    /// The request's placement epoch is older than the SDS's: refetch the map.
    StaleEpoch = 16,
    BadMac = 17,
    Replay = 18,
    /// This SDS is not the chunk's primary.
    NotPrimary = 19,
    /// The local write succeeded but the secondary did not acknowledge.
    ReplicaFailed = 20,
    MalformedToken = 21,
    /// The SDS has no copy of this chunk it may serve (rebuild pending).
    NotAvailable = 22,
    /// A newer write of the same SDC to an overlapping range was applied
    /// first: this one is a late copy (its sender retried or gave up) and
    /// is dropped; a sender still waiting for it sends it again.
    Superseded = 23,
    /// Blocks of this copy do not match their checksums (silent corruption
    /// on its device): read the other copy.
    DataCorrupt = 24,
}

impl Status {
    /// Refusals a server may send before it knows the request's key (so
    /// unsealed). A client takes an unsealed reply only if it is one of
    /// these: each makes it present its token again, refetch or fail, never
    /// count a request as done.
    pub fn may_be_unsealed(self) -> bool {
        use Status::*;
        matches!(self, NoToken | BadSignature | BadMac | MalformedToken | Invalid | NotAvailable)
    }

    pub fn from_u16(v: u16) -> Option<Self> {
        use Status::*;
        Some(match v {
            0 => Ok,
            1 => IoError,
            2 => Invalid,
            3 => BadCrc,
            4 => NoSpace,
            5 => UnknownVolume,
            10 => NoToken,
            11 => BadSignature,
            12 => Expired,
            13 => WrongVolume,
            14 => ReadOnly,
            15 => Revoked,
            16 => StaleEpoch,
            17 => BadMac,
            18 => Replay,
            19 => NotPrimary,
            20 => ReplicaFailed,
            21 => MalformedToken,
            22 => NotAvailable,
            23 => Superseded,
            24 => DataCorrupt,
            _ => return None,
        })
    }
    /// Short stable name, used in metrics labels and error messages.
    pub fn name(self) -> &'static str {
        use Status::*;
        match self {
            Ok => "ok",
            IoError => "io_error",
            Invalid => "invalid",
            BadCrc => "bad_crc",
            NoSpace => "no_space",
            UnknownVolume => "unknown_volume",
            NoToken => "no_token",
            BadSignature => "bad_signature",
            Expired => "expired",
            WrongVolume => "wrong_volume",
            ReadOnly => "read_only",
            Revoked => "revoked",
            StaleEpoch => "stale_epoch",
            BadMac => "bad_mac",
            Replay => "replay",
            NotPrimary => "not_primary",
            ReplicaFailed => "replica_failed",
            MalformedToken => "malformed_token",
            NotAvailable => "not_available",
            Superseded => "superseded",
            DataCorrupt => "data_corrupt",
        }
    }
}

impl From<crate::token::TokenError> for Status {
    fn from(e: crate::token::TokenError) -> Self {
        use crate::token::TokenError as E;
        match e {
            E::Malformed => Status::MalformedToken,
            E::BadSignature => Status::BadSignature,
            E::Expired => Status::Expired,
            E::WrongVolume => Status::WrongVolume,
            E::ReadOnly => Status::ReadOnly,
            E::Revoked => Status::Revoked,
        }
    }
}

/// One decoded header. `op` is kept raw in replies' echo; use [`Op::from_u8`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameHeader {
    pub op: u8,
    pub flags: u8,
    pub status: u16,
    pub request_id: u64,
    pub volume_id: u64,
    pub chunk_index: u64,
    pub offset: u32,
    pub length: u32,
    pub epoch: u64,
    pub token_id: u64,
    pub seq: u64,
    pub payload_crc: u32,
    pub mac: [u8; MAC_LEN],
}

/// Why bytes are not a valid frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {0:#x}")]
    BadMagic(u32),
    #[error("payload length {0} exceeds the maximum")]
    TooLong(u32),
}

/// The payload of an `AUTH` reply: the SDS's sequence floor.
pub fn encode_sequence_floor(floor: u64) -> Vec<u8> {
    floor.to_le_bytes().to_vec()
}

/// The sequence floor an `AUTH` reply carries; `None` if the payload is not one.
pub fn decode_sequence_floor(payload: &[u8]) -> Option<u64> {
    payload.try_into().ok().map(u64::from_le_bytes)
}

impl FrameHeader {
    /// Serializes the header (including the current `mac` field).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = self.op;
        b[5] = self.flags;
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.volume_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.chunk_index.to_le_bytes());
        b[32..36].copy_from_slice(&self.offset.to_le_bytes());
        b[36..40].copy_from_slice(&self.length.to_le_bytes());
        b[40..48].copy_from_slice(&self.epoch.to_le_bytes());
        b[48..56].copy_from_slice(&self.token_id.to_le_bytes());
        b[56..64].copy_from_slice(&self.seq.to_le_bytes());
        b[64..68].copy_from_slice(&self.payload_crc.to_le_bytes());
        b[MAC_OFFSET..].copy_from_slice(&self.mac);
        b
    }

    /// Parses a header. Only framing is checked here (magic, payload bound),
    /// so the reader knows how many payload bytes follow; the meaning of the
    /// fields is checked by [`FrameHeader::validate_request`].
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let length = u32_at(36);
        if length > MAX_PAYLOAD {
            return Err(FrameError::TooLong(length));
        }
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&b[MAC_OFFSET..]);
        Ok(Self {
            op: b[4],
            flags: b[5],
            status: u16::from_le_bytes([b[6], b[7]]),
            request_id: u64_at(8),
            volume_id: u64_at(16),
            chunk_index: u64_at(24),
            offset: u32_at(32),
            length,
            epoch: u64_at(40),
            token_id: u64_at(48),
            seq: u64_at(56),
            payload_crc: u32_at(64),
            mac,
        })
    }

    /// Checks a request's fields for meaning: known op and flags, range
    /// inside one chunk, payload present exactly for WRITE and AUTH.
    pub fn validate_request(&self) -> Result<Op, Status> {
        let op = Op::from_u8(self.op).ok_or(Status::Invalid)?;
        if self.flags & !flags::ALL != 0 {
            return Err(Status::Invalid);
        }
        let end = u64::from(self.offset).checked_add(u64::from(self.length));
        let in_chunk = matches!(end, Some(e) if e <= CHUNK_SIZE);
        match op {
            Op::Allocation if self.offset != 0 || self.length == 0 => Err(Status::Invalid),
            Op::Allocation if self.length > MAX_ALLOCATION_CHUNKS => Err(Status::Invalid),
            Op::Read | Op::Trim | Op::WriteZeroes | Op::Write if !in_chunk => Err(Status::Invalid),
            Op::Read | Op::Trim | Op::WriteZeroes if self.length == 0 => Err(Status::Invalid),
            Op::Write if self.length == 0 => Err(Status::Invalid),
            Op::Lease | Op::DirtyList | Op::LeaseRelease
                if self.flags & flags::REPLICA == 0 || self.length != 0 =>
            {
                Err(Status::Invalid)
            }
            _ => Ok(op),
        }
    }

    /// Number of payload bytes that follow this header on the wire.
    pub fn payload_len(&self, is_reply: bool) -> usize {
        let op = Op::from_u8(self.op);
        let carries = if is_reply {
            matches!(
                op,
                Some(Op::Read) | Some(Op::Allocation) | Some(Op::Auth) | Some(Op::DirtyList)
            ) && self.status == Status::Ok as u16
        } else {
            matches!(op, Some(Op::Write) | Some(Op::Auth))
        };
        if carries {
            self.length as usize
        } else {
            0
        }
    }

    /// Sets `mac` to the MAC of the other header bytes and `payload` under `key`.
    pub fn seal(&mut self, key: &SessionKey, payload: &[u8]) {
        let bytes = self.encode();
        self.mac = key.mac(&[&bytes[..MAC_OFFSET], payload]);
    }

    /// Checks the MAC of an encoded request header and its payload.
    pub fn verify_mac(raw: &[u8; HEADER_LEN], key: &SessionKey, payload: &[u8]) -> bool {
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&raw[MAC_OFFSET..]);
        key.verify(&[&raw[..MAC_OFFSET], payload], &mac)
    }

    /// Seals this reply to the request whose MAC was `request_mac`.
    pub fn seal_reply(&mut self, key: &SessionKey, request_mac: &[u8; MAC_LEN], payload: &[u8]) {
        let bytes = self.encode();
        self.mac = key.mac(&[&bytes[..MAC_OFFSET], request_mac, payload]);
    }

    /// Checks this reply's MAC against the request whose MAC was `request_mac`.
    pub fn verify_reply_mac(
        &self,
        key: &SessionKey,
        request_mac: &[u8; MAC_LEN],
        payload: &[u8],
    ) -> bool {
        let bytes = self.encode();
        key.verify(&[&bytes[..MAC_OFFSET], request_mac, payload], &self.mac)
    }

    /// The MAC field of an encoded header.
    pub fn mac_of(raw: &[u8; HEADER_LEN]) -> [u8; MAC_LEN] {
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&raw[MAC_OFFSET..]);
        mac
    }

    /// A reply header to this request.
    pub fn reply(&self, status: Status, length: u32, payload_crc: u32) -> FrameHeader {
        FrameHeader {
            op: self.op,
            flags: 0,
            status: status as u16,
            request_id: self.request_id,
            volume_id: self.volume_id,
            chunk_index: self.chunk_index,
            offset: self.offset,
            length,
            epoch: self.epoch,
            token_id: 0,
            seq: 0,
            payload_crc,
            mac: [0; MAC_LEN],
        }
    }
}

/// CRC32 (IEEE) of a payload, as carried in `payload_crc`.
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> FrameHeader {
        FrameHeader {
            op: Op::Write as u8,
            flags: flags::FUA,
            status: 0,
            request_id: 42,
            volume_id: 3,
            chunk_index: 17,
            offset: 4096,
            length: 8192,
            epoch: 5,
            token_id: 99,
            seq: 1,
            payload_crc: 0xdead_beef,
            mac: [0; MAC_LEN],
        }
    }

    #[test]
    fn roundtrip_and_mac() {
        let key = SessionKey([7; 32]);
        let payload = vec![5u8; 8192];
        let mut h = sample();
        h.seal(&key, &payload);
        let raw = h.encode();
        assert_eq!(FrameHeader::decode(&raw).unwrap(), h);
        assert!(FrameHeader::verify_mac(&raw, &key, &payload));
        let mut tampered = raw;
        tampered[24] ^= 1; // another chunk
        assert!(!FrameHeader::verify_mac(&tampered, &key, &payload));
        assert!(!FrameHeader::verify_mac(&raw, &SessionKey([8; 32]), &payload));
        let mut flipped = payload.clone();
        flipped[4000] ^= 0x20;
        assert!(!FrameHeader::verify_mac(&raw, &key, &flipped), "the payload is covered");

        // A reply is bound to its request and covers its own payload.
        let request_mac = FrameHeader::mac_of(&raw);
        let mut reply = h.reply(Status::Ok, 4, 0);
        reply.seal_reply(&key, &request_mac, b"data");
        assert!(reply.verify_reply_mac(&key, &request_mac, b"data"));
        assert!(!reply.verify_reply_mac(&key, &request_mac, b"datA"));
        assert!(!reply.verify_reply_mac(&key, &[0; MAC_LEN], b"data"), "another request's reply");
        let mut other_status = reply;
        other_status.status = Status::Superseded as u16;
        assert!(!other_status.verify_reply_mac(&key, &request_mac, b"data"));
    }

    #[test]
    fn validation() {
        let mut h = sample();
        assert_eq!(h.validate_request(), Ok(Op::Write));
        h.offset = (CHUNK_SIZE as u32) - 4096;
        assert_eq!(h.validate_request(), Err(Status::Invalid));
        h.offset = u32::MAX;
        assert_eq!(h.validate_request(), Err(Status::Invalid));
        let mut h = sample();
        h.op = 200;
        assert_eq!(h.validate_request(), Err(Status::Invalid));
        let mut h = sample();
        h.flags = 0x80;
        assert_eq!(h.validate_request(), Err(Status::Invalid));
        let mut raw = sample().encode();
        raw[0] = 0;
        assert!(matches!(FrameHeader::decode(&raw), Err(FrameError::BadMagic(_))));
        let mut h = sample();
        h.length = MAX_PAYLOAD + 1;
        assert_eq!(FrameHeader::decode(&h.encode()), Err(FrameError::TooLong(MAX_PAYLOAD + 1)));
    }

    #[test]
    fn payload_lengths() {
        let h = sample();
        assert_eq!(h.payload_len(false), 8192);
        assert_eq!(h.reply(Status::Ok, 0, 0).payload_len(true), 0);
        let mut r = sample();
        r.op = Op::Read as u8;
        assert_eq!(r.payload_len(false), 0);
        assert_eq!(r.reply(Status::Ok, 8192, 0).payload_len(true), 8192);
        assert_eq!(r.reply(Status::IoError, 8192, 0).payload_len(true), 0);
    }

    proptest! {
        #[test]
        fn random_headers_never_panic(bytes in proptest::array::uniform32(any::<u8>()),
                                      tail in proptest::collection::vec(any::<u8>(), 56)) {
            let mut raw = [0u8; HEADER_LEN];
            raw[..32].copy_from_slice(&bytes);
            raw[32..].copy_from_slice(&tail);
            if let Ok(h) = FrameHeader::decode(&raw) {
                let _ = h.validate_request();
                let _ = h.payload_len(false);
                let _ = h.payload_len(true);
            }
            raw[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            if let Ok(h) = FrameHeader::decode(&raw) {
                prop_assert!(h.length <= MAX_PAYLOAD);
                let _ = h.validate_request();
            }
        }

        #[test]
        fn roundtrip_any(op in any::<u8>(), flags in any::<u8>(), rid in any::<u64>(),
                         vol in any::<u64>(), chunk in any::<u64>(), off in any::<u32>(),
                         len in 0..=MAX_PAYLOAD, seq in any::<u64>()) {
            let h = FrameHeader { op, flags, request_id: rid, volume_id: vol, chunk_index: chunk,
                                  offset: off, length: len, seq, ..Default::default() };
            prop_assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
        }
    }
}
