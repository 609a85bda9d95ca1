//! Token verification and the per-request authentication checks.
//!
//! An SDC presents a signed [`IoToken`] once per SDS with `AUTH`; the SDS
//! verifies the signature with the MDM's public key, derives the token's
//! session key from its own node key ([`NodeKeys`]) and keeps both in the
//! [`TokenCache`], so checking a data
//! request afterwards is one hash lookup, one truncated HMAC of 72 bytes and
//! a replay-window update. Replication frames between SDS nodes are
//! authenticated with the peer key instead, with one replay window per
//! sending node ([`PeerReplayWindows`]).
//!
//! The checks here are pure functions of the request and the cached state;
//! the order is: MAC (so nothing unauthenticated influences anything),
//! then token scope (expiry, volume, mode, mapping generation). The
//! caller then checks the placement epoch and the primary, and accepts the
//! sequence number last, so a request refused for another reason does not
//! consume its sequence number.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use pflex_proto::api::SdsKeys;
use pflex_proto::frame::{FrameHeader, Op, Status, HEADER_LEN};
use pflex_proto::token::{
    IoToken, NodeKey, ReplayWindow, SessionKey, SignedToken, TokenError, TokenPublicKey,
    SIGNATURE_LEN,
};

/// What this SDS verifies tokens with: the MDM's public keys (it cannot
/// sign) and its own node key (it derives only its own session keys).
#[derive(Clone, Debug)]
pub struct NodeKeys {
    pub token_keys: Vec<TokenPublicKey>,
    pub node_key: NodeKey,
    pub peer_key: SessionKey,
}

impl NodeKeys {
    /// Parses what the MDM sent at registration.
    pub fn from_api(keys: &SdsKeys) -> Result<Self, TokenError> {
        let token_keys = keys
            .token_public_keys
            .iter()
            .map(|k| TokenPublicKey::from_hex(k))
            .collect::<Result<Vec<_>, _>>()?;
        if token_keys.is_empty() {
            return Err(TokenError::Malformed);
        }
        Ok(Self {
            token_keys,
            node_key: NodeKey::from_hex(&keys.node_key)?,
            peer_key: SessionKey::from_hex(&keys.peer_key)?,
        })
    }

    /// Checks a token's signature against every key the MDM signs with.
    pub fn verify(&self, signed: &SignedToken) -> Result<(), TokenError> {
        if self.token_keys.iter().any(|k| k.verify(signed).is_ok()) {
            Ok(())
        } else {
            Err(TokenError::BadSignature)
        }
    }
}

/// A token whose signature verified, with what checking its requests needs.
pub struct VerifiedToken {
    pub token: IoToken,
    pub signature: [u8; SIGNATURE_LEN],
    pub session_key: SessionKey,
    replay: Mutex<ReplayWindow>,
}

impl VerifiedToken {
    /// Records `seq`; false if it was seen before or is too old.
    pub fn accept_seq(&self, seq: u64) -> bool {
        self.replay.lock().unwrap_or_else(|p| p.into_inner()).accept(seq)
    }
}

/// Verified tokens by token id.
pub struct TokenCache {
    tokens: RwLock<HashMap<u64, Arc<VerifiedToken>>>,
    /// Sequence numbers at or below this are refused for every token met
    /// since this process started (see [`TokenCache::floor`]).
    floor: u64,
}

impl Default for TokenCache {
    /// A cache whose floor is the wall clock in nanoseconds.
    fn default() -> Self {
        Self::with_floor(wall_clock_nanos())
    }
}

fn wall_clock_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        .max(1)
}

impl TokenCache {
    pub fn with_floor(floor: u64) -> Self {
        Self { tokens: RwLock::default(), floor }
    }

    /// The sequence floor, sent in every `AUTH` reply. Replay windows live
    /// in memory, so after a restart this node no longer knows which
    /// sequence numbers a token used. It starts every window at the floor
    /// instead, the wall clock in nanoseconds when the process started:
    /// every request captured before the restart carries a lower number
    /// (an SDC's counter starts at 1 or at an earlier floor and grows by
    /// one per request), so replaying captured `AUTH` and data frames gets
    /// `Replay`. The SDC moves its counter above the floor it is told.
    /// This assumes the wall clock does not step back across a restart by
    /// more than the node's previous uptime, as [`ReplicationSeq`] does.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    pub fn get(&self, token_id: u64) -> Option<Arc<VerifiedToken>> {
        self.tokens.read().unwrap_or_else(|p| p.into_inner()).get(&token_id).cloned()
    }

    /// Caches a verified token. Presenting the same token again keeps its
    /// entry, and so its replay window: re-sending AUTH cannot reopen the
    /// window for captured requests. Returns whether it was new.
    pub fn insert(&self, signed: &SignedToken, session_key: SessionKey) -> bool {
        let mut tokens = self.tokens.write().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = tokens.get(&signed.token.token_id) {
            if existing.signature == signed.signature {
                return false;
            }
        }
        let entry = VerifiedToken {
            token: signed.token.clone(),
            signature: signed.signature,
            session_key,
            replay: Mutex::new(ReplayWindow::after(self.floor)),
        };
        tokens.insert(signed.token.token_id, Arc::new(entry));
        true
    }

    /// Drops tokens that expired more than `grace_secs` before `now`.
    pub fn purge_expired(&self, now: u64, grace_secs: u64) -> usize {
        let mut tokens = self.tokens.write().unwrap_or_else(|p| p.into_inner());
        let before = tokens.len();
        tokens.retain(|_, t| t.token.expires_at.saturating_add(grace_secs) > now);
        before - tokens.len()
    }

    /// Forgets every token (the cluster secret changed).
    pub fn clear(&self) {
        self.tokens.write().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn len(&self) -> usize {
        self.tokens.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Verifies an AUTH request: the payload is a signed token, the header
/// names it and is MACed with its session key. `mapping_gen` is the
/// volume's current mapping generation as far as this SDS knows (0 if
/// unknown), so a revoked token is refused at once.
pub fn verify_auth(
    keys: &NodeKeys,
    header: &FrameHeader,
    raw: &[u8; HEADER_LEN],
    payload: &[u8],
    now: u64,
    mapping_gen: u64,
) -> Result<(SignedToken, SessionKey), Status> {
    let (signed, session_key) = authenticate_auth(keys, header, raw, payload)?;
    check_auth_scope(&signed, now, mapping_gen)?;
    Ok((signed, session_key))
}

/// The part of [`verify_auth`] that depends on nothing but the keys: the
/// token's signature, that the header names it, and the MAC under its
/// session key. Runs first, so nothing unauthenticated makes this node do
/// anything else (such as ask the MDM for a mapping generation).
pub fn authenticate_auth(
    keys: &NodeKeys,
    header: &FrameHeader,
    raw: &[u8; HEADER_LEN],
    payload: &[u8],
) -> Result<(SignedToken, SessionKey), Status> {
    let signed = SignedToken::decode(payload).map_err(Status::from)?;
    keys.verify(&signed).map_err(Status::from)?;
    if header.token_id != signed.token.token_id {
        return Err(Status::Invalid);
    }
    let session_key = keys.node_key.session_key(&signed);
    if !FrameHeader::verify_mac(raw, &session_key, payload) {
        return Err(Status::BadMac);
    }
    Ok((signed, session_key))
}

/// The rest of [`verify_auth`]: expiry and revocation by mapping generation.
pub fn check_auth_scope(signed: &SignedToken, now: u64, mapping_gen: u64) -> Result<(), Status> {
    signed.token.check_scope(now, signed.token.volume_id, false, mapping_gen).map_err(Status::from)
}

/// Checks a client data request against its cached token: MAC, then scope.
pub fn check_client_request(
    token: &VerifiedToken,
    header: &FrameHeader,
    raw: &[u8; HEADER_LEN],
    payload: &[u8],
    op: Op,
    now: u64,
    mapping_gen: u64,
) -> Result<(), Status> {
    if !FrameHeader::verify_mac(raw, &token.session_key, payload) {
        return Err(Status::BadMac);
    }
    token.token.check_scope(now, header.volume_id, op.is_write(), mapping_gen).map_err(Status::from)
}

/// Replay windows of replication frames, one per sending SDS node id.
///
/// Like the token windows, every window starts above a floor, the wall
/// clock in nanoseconds when this process started: a replication frame
/// captured before a restart of this node carries a lower number (senders
/// draw theirs from a counter seeded from their own wall clock, which
/// grows far slower than one per nanosecond), so replaying it gets
/// `Replay`. A `Replay` reply to a replica frame carries the floor in its
/// `seq` field, and the sender moves its counter above it and sends again
/// (see `replication::Peer::call`). This assumes the hosts' clocks agree
/// within the time a restart takes.
pub struct PeerReplayWindows {
    floor: u64,
    windows: Mutex<HashMap<u64, ReplayWindow>>,
}

impl Default for PeerReplayWindows {
    fn default() -> Self {
        Self::with_floor(wall_clock_nanos())
    }
}

impl PeerReplayWindows {
    pub fn with_floor(floor: u64) -> Self {
        Self { floor, windows: Mutex::default() }
    }

    /// Sequence numbers up to this one are refused from every sender.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Records `seq` from `sender`; false if seen before, too old, or not
    /// above the floor.
    pub fn accept(&self, sender: u64, seq: u64) -> bool {
        self.windows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(sender)
            .or_insert_with(|| ReplayWindow::after(self.floor))
            .accept(seq)
    }
}

/// Source of replication sequence numbers (one per peer), seeded from the
/// wall clock in nanoseconds so it keeps growing across restarts: a peer's
/// replay window for this node survives this node's restart.
pub struct ReplicationSeq(std::sync::atomic::AtomicU64);

impl Default for ReplicationSeq {
    fn default() -> Self {
        Self(std::sync::atomic::AtomicU64::new(wall_clock_nanos()))
    }
}

impl ReplicationSeq {
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    }

    /// The receiver restarted with a replay floor of `floor`: later numbers
    /// go above it. A floor further ahead than this node's clock plus a
    /// day is ignored (replies carry no MAC: a forged one must not push the
    /// counter toward its end); false then.
    pub fn raise_above(&self, floor: u64) -> bool {
        let plausible = wall_clock_nanos().saturating_add(86_400_000_000_000);
        if floor >= plausible {
            return false;
        }
        self.0.fetch_max(floor, std::sync::atomic::Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pflex_proto::token::AccessMode;

    #[test]
    fn replica_windows_start_above_the_floor() {
        let windows = PeerReplayWindows::with_floor(1_000);
        assert!(!windows.accept(7, 999), "a frame from before the restart was accepted");
        assert!(!windows.accept(7, 1_000));
        assert!(windows.accept(7, 1_001));
        assert!(!windows.accept(7, 1_001), "accepted twice");
        let seq = ReplicationSeq::default();
        let before = seq.next();
        assert!(seq.raise_above(before + 5_000));
        assert!(seq.next() > before + 5_000);
        assert!(!seq.raise_above(u64::MAX - 1), "an implausible floor was taken");
    }

    use pflex_proto::token::ClusterSecret;

    /// The keys SDS 1 of a cluster with `secret` holds.
    fn node_keys(secret: &ClusterSecret) -> NodeKeys {
        NodeKeys {
            token_keys: vec![secret.token_signer().public_key()],
            node_key: secret.node_key(1),
            peer_key: secret.peer_key(),
        }
    }

    fn token(expires_at: u64, mode: AccessMode) -> IoToken {
        IoToken { token_id: 77, volume_id: 5, sdc_id: 1, mode, mapping_gen: 3, expires_at }
    }

    fn auth_frame(signed: &SignedToken, key: &SessionKey) -> (FrameHeader, [u8; HEADER_LEN]) {
        let mut header = FrameHeader {
            op: Op::Auth as u8,
            token_id: signed.token.token_id,
            volume_id: signed.token.volume_id,
            length: signed.encode().len() as u32,
            ..Default::default()
        };
        header.seal(key, &signed.encode());
        (header, header.encode())
    }

    #[test]
    fn auth_accepts_good_tokens_and_names_each_rejection() {
        let cluster = ClusterSecret::generate();
        let secret = node_keys(&cluster);
        let signed = cluster.token_signer().sign(&token(1000, AccessMode::ReadWrite));
        let key = cluster.node_key(1).session_key(&signed);
        let (h, raw) = auth_frame(&signed, &key);
        let payload = signed.encode();
        assert!(verify_auth(&secret, &h, &raw, &payload, 10, 3).is_ok());
        // Expired, revoked.
        assert_eq!(verify_auth(&secret, &h, &raw, &payload, 1000, 3).err(), Some(Status::Expired));
        assert_eq!(verify_auth(&secret, &h, &raw, &payload, 10, 4).err(), Some(Status::Revoked));
        // Signed by another cluster's key.
        let forged =
            ClusterSecret::generate().token_signer().sign(&token(1000, AccessMode::ReadWrite));
        let (fh, fraw) = auth_frame(&forged, &key);
        let fp = forged.encode();
        assert_eq!(verify_auth(&secret, &fh, &fraw, &fp, 10, 3).err(), Some(Status::BadSignature));
        // Header not MACed with the session key; MACed with another node's.
        let (bh, braw) = auth_frame(&signed, &SessionKey([1; 32]));
        assert_eq!(verify_auth(&secret, &bh, &braw, &payload, 10, 3).err(), Some(Status::BadMac));
        let (oh, oraw) = auth_frame(&signed, &cluster.node_key(2).session_key(&signed));
        assert_eq!(verify_auth(&secret, &oh, &oraw, &payload, 10, 3).err(), Some(Status::BadMac));
        assert_eq!(
            verify_auth(&secret, &h, &raw, &payload[..10], 10, 3).err(),
            Some(Status::MalformedToken)
        );
    }

    #[test]
    fn cache_keeps_the_replay_window_across_repeated_auth() {
        let secret = ClusterSecret::generate();
        let signed = secret.token_signer().sign(&token(1000, AccessMode::ReadOnly));
        let cache = TokenCache::with_floor(5000);
        assert!(cache.insert(&signed, secret.node_key(1).session_key(&signed)));
        let entry = cache.get(77).unwrap();
        assert!(!entry.accept_seq(4999), "a number below the floor was accepted");
        assert!(!entry.accept_seq(5000), "the floor itself was accepted");
        assert!(entry.accept_seq(5001));
        assert!(!cache.insert(&signed, secret.node_key(1).session_key(&signed)));
        assert!(!cache.get(77).unwrap().accept_seq(5001), "window survived the second AUTH");
        assert_eq!(cache.purge_expired(2000, 60), 1);
        assert!(cache.is_empty());
    }

    #[test]
    fn client_request_checks() {
        let secret = ClusterSecret::generate();
        let signed = secret.token_signer().sign(&token(1000, AccessMode::ReadOnly));
        let cache = TokenCache::default();
        cache.insert(&signed, secret.node_key(1).session_key(&signed));
        let entry = cache.get(77).unwrap();
        let mut h = FrameHeader {
            op: Op::Read as u8,
            volume_id: 5,
            token_id: 77,
            seq: 1,
            length: 4096,
            ..Default::default()
        };
        h.seal(&entry.session_key, &[]);
        assert_eq!(check_client_request(&entry, &h, &h.encode(), &[], Op::Read, 10, 3), Ok(()));
        let mut tampered = h.encode();
        tampered[32] ^= 0x10;
        assert_eq!(
            check_client_request(&entry, &h, &tampered, &[], Op::Read, 10, 3),
            Err(Status::BadMac)
        );
        let mut w = h;
        w.op = Op::Write as u8;
        w.seal(&entry.session_key, &[]);
        assert_eq!(
            check_client_request(&entry, &w, &w.encode(), &[], Op::Write, 10, 3),
            Err(Status::ReadOnly)
        );
        let mut other = h;
        other.volume_id = 6;
        other.seal(&entry.session_key, &[]);
        assert_eq!(
            check_client_request(&entry, &other, &other.encode(), &[], Op::Read, 10, 3),
            Err(Status::WrongVolume)
        );
    }

    #[test]
    fn replication_seq_grows_and_peer_windows_are_per_sender() {
        // The receiver started first: the sender's counter, seeded later
        // from the clock, is above its floor.
        let windows = PeerReplayWindows::default();
        let a = ReplicationSeq::default();
        let (x, y) = (a.next(), a.next());
        assert!(y > x && x > 1_000_000_000);
        assert!(windows.accept(1, x));
        assert!(!windows.accept(1, x));
        assert!(windows.accept(2, x));
    }
}
