//! IO capability tokens, request MACs and replay protection.
//!
//! Who holds which key (the threat model in the architecture notes says what
//! each compromise allows):
//! - The MDM alone holds the 32-byte [`ClusterSecret`]; every other key is
//!   derived from it, so rotating it rotates them all.
//! - Tokens are signed with Ed25519 ([`TokenSigner`], derived from the
//!   secret). SDS nodes hold only the public key ([`TokenPublicKey`]), so a
//!   compromised SDS can verify tokens but never make one.
//! - Each SDS has its own [`NodeKey`] (`HMAC(secret, "pflex-node-v2" || id)`),
//!   handed to that SDS alone at registration. The session key of a token at
//!   one SDS is `HMAC(node key, "pflex-session-v2" || signature)`: the MDM
//!   gives the SDC one per SDS with the token, so a node that sees a token
//!   cannot compute the key another node expects for it.
//! - Every data-plane request carries the token id, a sequence number and a
//!   16-byte MAC of its header under that session key, so a request cannot be
//!   forged or altered without it and cannot be replayed (see [`ReplayWindow`]).
//! - SDS → SDS replication frames use the *peer key* (`HMAC(secret,
//!   "pflex-peer-v1")`), which only storage nodes receive.

use ed25519_dalek::Signer;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Length of an encoded, signed token.
pub const SIGNED_TOKEN_LEN: usize = TOKEN_BODY_LEN + SIGNATURE_LEN;
const TOKEN_BODY_LEN: usize = 1 + 8 + 8 + 8 + 1 + 8 + 8;
const TOKEN_VERSION: u8 = 2;
/// Length of the truncated HMAC carried by every data-plane request.
pub const MAC_LEN: usize = 16;

/// The root secret every key is derived from; only the MDM holds it.
#[derive(Clone)]
pub struct ClusterSecret(pub [u8; 32]);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

fn hmac_32(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    for part in parts {
        m.update(part);
    }
    m.finalize().into_bytes().into()
}

fn decode_32(s: &str) -> Result<[u8; 32], TokenError> {
    let v = hex::decode(s.trim()).map_err(|_| TokenError::Malformed)?;
    v.try_into().map_err(|_| TokenError::Malformed)
}

impl ClusterSecret {
    pub fn generate() -> Self {
        Self(crate::random_bytes())
    }
    pub fn from_hex(s: &str) -> Result<Self, TokenError> {
        Ok(Self(decode_32(s)?))
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    /// The key that signs IO tokens.
    pub fn token_signer(&self) -> TokenSigner {
        let seed = hmac_32(&self.0, &[b"pflex-token-signing-v2"]);
        TokenSigner(ed25519_dalek::SigningKey::from_bytes(&seed))
    }
    /// The token signing key of `generation` (0 is [`Self::token_signer`];
    /// each `pflex cluster rotate` moves to the next).
    pub fn token_signer_at(&self, generation: u32) -> TokenSigner {
        if generation == 0 {
            return self.token_signer();
        }
        let seed = hmac_32(&self.0, &[b"pflex-token-signing-v2", &generation.to_le_bytes()]);
        TokenSigner(ed25519_dalek::SigningKey::from_bytes(&seed))
    }
    /// The key of SDS `sds_id`, from which its session keys are derived.
    pub fn node_key(&self, sds_id: u64) -> NodeKey {
        NodeKey(hmac_32(&self.0, &[b"pflex-node-v2", &sds_id.to_le_bytes()]))
    }
    /// The key SDS nodes use to authenticate replication frames to each other.
    pub fn peer_key(&self) -> SessionKey {
        SessionKey(hmac_32(&self.0, &[b"pflex-peer-v1"]))
    }
    /// The cluster's public name (32 hex digits): the same for every MDM
    /// member (they share the secret), another for an MDM that started
    /// over with a new secret. An SDS tags its store with it, since volume
    /// numbers are unique only within one cluster.
    pub fn cluster_id(&self) -> String {
        hex::encode(&hmac_32(&self.0, &[b"pflex-cluster-id-v1"])[..16])
    }
    /// The secret's public name (32 hex digits). Unlike the cluster id, which
    /// the database keeps, it changes when an MDM is restored from a backup
    /// onto a new secret: an SDS that hears a new one registers again for
    /// the keys derived from it.
    pub fn secret_id(&self) -> String {
        hex::encode(&hmac_32(&self.0, &[b"pflex-secret-id-v1"])[..16])
    }
}

/// The MDM's Ed25519 token signing key.
pub struct TokenSigner(ed25519_dalek::SigningKey);

impl TokenSigner {
    /// A signer from a raw 32-byte Ed25519 seed (key import, and tests that
    /// play a forger holding some other key).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// Signs `token`, producing what the MDM hands to the SDC.
    pub fn sign(&self, token: &IoToken) -> SignedToken {
        let signature = self.0.sign(&token.encode_body()).to_bytes();
        SignedToken { token: token.clone(), signature }
    }
    pub fn public_key(&self) -> TokenPublicKey {
        TokenPublicKey(self.0.verifying_key())
    }
}

/// What verifies token signatures: the public half of a [`TokenSigner`].
#[derive(Clone, PartialEq, Eq)]
pub struct TokenPublicKey(ed25519_dalek::VerifyingKey);

impl std::fmt::Debug for TokenPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenPublicKey({})", self.to_hex())
    }
}

impl TokenPublicKey {
    pub fn from_hex(s: &str) -> Result<Self, TokenError> {
        let bytes = decode_32(s)?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes).map(Self).map_err(|_| TokenError::Malformed)
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.as_bytes())
    }
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
    /// Checks the signature of `signed` (strict Ed25519 verification).
    /// Expiry and scope are the caller's checks, see [`IoToken::check_scope`].
    pub fn verify(&self, signed: &SignedToken) -> Result<(), TokenError> {
        let signature = ed25519_dalek::Signature::from_bytes(&signed.signature);
        self.0
            .verify_strict(&signed.token.encode_body(), &signature)
            .map_err(|_| TokenError::BadSignature)
    }
}

/// The key of one SDS: its session keys derive from it.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeKey(pub [u8; 32]);

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeKey(..)")
    }
}

impl NodeKey {
    pub fn from_hex(s: &str) -> Result<Self, TokenError> {
        Ok(Self(decode_32(s)?))
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    /// The key the SDC MACs its requests to this SDS with, under `signed`.
    pub fn session_key(&self, signed: &SignedToken) -> SessionKey {
        SessionKey(hmac_32(&self.0, &[b"pflex-session-v2", &signed.signature]))
    }
}

/// Key for per-request MACs (a token's session key, or the SDS peer key).
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey(pub [u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    pub fn from_hex(s: &str) -> Result<Self, TokenError> {
        Ok(Self(decode_32(s)?))
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    /// The MAC of `parts` concatenated: keyed BLAKE3, truncated to
    /// [`MAC_LEN`] bytes. BLAKE3 runs at several GB/s on one core (SIMD), so
    /// every payload byte can be covered, not only a checksum of it.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; MAC_LEN] {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        for part in parts {
            hasher.update(part);
        }
        let mut out = [0u8; MAC_LEN];
        hasher.finalize_xof().fill(&mut out);
        out
    }
    /// Constant-time check of a MAC made by [`SessionKey::mac`].
    pub fn verify(&self, parts: &[&[u8]], mac: &[u8; MAC_LEN]) -> bool {
        let expected = self.mac(parts);
        expected.iter().zip(mac).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AccessMode {
    ReadOnly,
    ReadWrite,
}

impl AccessMode {
    fn to_byte(self) -> u8 {
        match self {
            AccessMode::ReadOnly => 1,
            AccessMode::ReadWrite => 2,
        }
    }
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(AccessMode::ReadOnly),
            2 => Some(AccessMode::ReadWrite),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            AccessMode::ReadOnly => "readOnly",
            AccessMode::ReadWrite => "readWrite",
        }
    }
}

/// The capability: who may do what to which volume, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoToken {
    /// Random id; data-plane requests refer to the token by it.
    pub token_id: u64,
    pub volume_id: u64,
    pub sdc_id: u64,
    pub mode: AccessMode,
    /// The volume's mapping generation when issued; map/unmap bumps it, so
    /// unmapping revokes every token issued before.
    pub mapping_gen: u64,
    /// Unix seconds after which the token is refused.
    pub expires_at: u64,
}

impl IoToken {
    fn encode_body(&self) -> [u8; TOKEN_BODY_LEN] {
        let mut b = [0u8; TOKEN_BODY_LEN];
        b[0] = TOKEN_VERSION;
        b[1..9].copy_from_slice(&self.token_id.to_le_bytes());
        b[9..17].copy_from_slice(&self.volume_id.to_le_bytes());
        b[17..25].copy_from_slice(&self.sdc_id.to_le_bytes());
        b[25] = self.mode.to_byte();
        b[26..34].copy_from_slice(&self.mapping_gen.to_le_bytes());
        b[34..42].copy_from_slice(&self.expires_at.to_le_bytes());
        b
    }

    /// Checks expiry, volume, access mode and revocation; the signature must
    /// already have been verified.
    pub fn check_scope(
        &self,
        now: u64,
        volume_id: u64,
        wants_write: bool,
        current_mapping_gen: u64,
    ) -> Result<(), TokenError> {
        if now >= self.expires_at {
            return Err(TokenError::Expired);
        }
        if self.volume_id != volume_id {
            return Err(TokenError::WrongVolume);
        }
        if wants_write && self.mode != AccessMode::ReadWrite {
            return Err(TokenError::ReadOnly);
        }
        if self.mapping_gen < current_mapping_gen {
            return Err(TokenError::Revoked);
        }
        Ok(())
    }
}

/// A token with its signature, as carried on the wire (hex in JSON, raw in
/// the data-plane AUTH frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedToken {
    pub token: IoToken,
    pub signature: [u8; SIGNATURE_LEN],
}

impl SignedToken {
    pub fn encode(&self) -> [u8; SIGNED_TOKEN_LEN] {
        let mut out = [0u8; SIGNED_TOKEN_LEN];
        out[..TOKEN_BODY_LEN].copy_from_slice(&self.token.encode_body());
        out[TOKEN_BODY_LEN..].copy_from_slice(&self.signature);
        out
    }
    pub fn decode(b: &[u8]) -> Result<Self, TokenError> {
        if b.len() != SIGNED_TOKEN_LEN || b[0] != TOKEN_VERSION {
            return Err(TokenError::Malformed);
        }
        let u = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8 bytes"));
        let token = IoToken {
            token_id: u(1..9),
            volume_id: u(9..17),
            sdc_id: u(17..25),
            mode: AccessMode::from_byte(b[25]).ok_or(TokenError::Malformed)?,
            mapping_gen: u(26..34),
            expires_at: u(34..42),
        };
        let mut signature = [0u8; SIGNATURE_LEN];
        signature.copy_from_slice(&b[TOKEN_BODY_LEN..]);
        Ok(Self { token, signature })
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.encode())
    }
    pub fn from_hex(s: &str) -> Result<Self, TokenError> {
        Self::decode(&hex::decode(s.trim()).map_err(|_| TokenError::Malformed)?)
    }
}

/// Why a token or request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token is for another volume")]
    WrongVolume,
    #[error("token is read-only")]
    ReadOnly,
    #[error("token revoked (volume mapping changed)")]
    Revoked,
}

/// Sliding-window replay protection over per-token sequence numbers (the
/// IPsec anti-replay scheme): a sequence number is accepted once, and only
/// if it is within `WINDOW` of the highest one seen. Requests of one token
/// travel over several pooled connections, so they may arrive out of order.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    highest: u64,
    bits: [u64; WINDOW as usize / 64],
}

const WINDOW: u64 = 4096;

impl Default for ReplayWindow {
    fn default() -> Self {
        Self { highest: 0, bits: [0; WINDOW as usize / 64] }
    }
}

impl ReplayWindow {
    /// A window that counts every sequence number up to `floor` as seen
    /// (a token first met by an SDS that restarted at `floor`).
    pub fn after(floor: u64) -> Self {
        Self { highest: floor, bits: [u64::MAX; WINDOW as usize / 64] }
    }

    /// Records `seq`; returns false if it was seen before, is zero, or is
    /// too old to tell.
    pub fn accept(&mut self, seq: u64) -> bool {
        if seq == 0 {
            return false;
        }
        if seq > self.highest {
            let shift = seq - self.highest;
            if shift >= WINDOW {
                self.bits = [0; WINDOW as usize / 64];
            } else {
                for s in self.highest + 1..=seq {
                    self.clear(s);
                }
            }
            self.highest = seq;
            self.set(seq);
            return true;
        }
        if self.highest - seq >= WINDOW {
            return false;
        }
        if self.get(seq) {
            return false;
        }
        self.set(seq);
        true
    }
    fn idx(seq: u64) -> (usize, u64) {
        let i = seq % WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }
    fn get(&self, seq: u64) -> bool {
        let (w, b) = Self::idx(seq);
        self.bits[w] & b != 0
    }
    fn set(&mut self, seq: u64) {
        let (w, b) = Self::idx(seq);
        self.bits[w] |= b;
    }
    fn clear(&mut self, seq: u64) {
        let (w, b) = Self::idx(seq);
        self.bits[w] &= !b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_id_is_one_per_secret_and_reveals_nothing_of_it() {
        let secret = ClusterSecret::generate();
        let same = ClusterSecret::from_hex(&secret.to_hex()).unwrap();
        assert_eq!(secret.cluster_id(), same.cluster_id());
        assert_eq!(secret.cluster_id().len(), 32);
        assert_ne!(secret.cluster_id(), ClusterSecret::generate().cluster_id());
        assert!(!secret.to_hex().contains(&secret.cluster_id()));
        assert_ne!(secret.secret_id(), secret.cluster_id());
        assert_eq!(secret.secret_id(), same.secret_id());
    }

    fn token() -> IoToken {
        IoToken {
            token_id: 7,
            volume_id: 3,
            sdc_id: 9,
            mode: AccessMode::ReadWrite,
            mapping_gen: 2,
            expires_at: 1000,
        }
    }

    #[test]
    fn sign_verify_roundtrip_and_tamper() {
        let s = ClusterSecret::generate();
        let signer = s.token_signer();
        let public = TokenPublicKey::from_hex(&signer.public_key().to_hex()).unwrap();
        let signed = signer.sign(&token());
        let back = SignedToken::from_hex(&signed.to_hex()).unwrap();
        assert_eq!(back, signed);
        public.verify(&back).unwrap();
        let mut forged = back.clone();
        forged.token.mode = AccessMode::ReadWrite;
        forged.token.volume_id = 4;
        assert_eq!(public.verify(&forged), Err(TokenError::BadSignature));
        let other = ClusterSecret::generate().token_signer().public_key();
        assert_eq!(other.verify(&back), Err(TokenError::BadSignature));
    }

    #[test]
    fn node_key_material_cannot_sign_tokens() {
        // What an SDS holds (its node key, the peer key, the public key)
        // used as a signing seed yields signatures the public key refuses.
        let s = ClusterSecret::generate();
        let public = s.token_signer().public_key();
        for seed in [s.node_key(1).0, s.peer_key().0, public.0.to_bytes()] {
            let forger = TokenSigner(ed25519_dalek::SigningKey::from_bytes(&seed));
            assert_eq!(public.verify(&forger.sign(&token())), Err(TokenError::BadSignature));
        }
    }

    #[test]
    fn scope_checks() {
        let t = token();
        assert_eq!(t.check_scope(1000, 3, false, 2), Err(TokenError::Expired));
        assert_eq!(t.check_scope(10, 4, false, 2), Err(TokenError::WrongVolume));
        assert_eq!(t.check_scope(10, 3, true, 3), Err(TokenError::Revoked));
        let mut ro = t.clone();
        ro.mode = AccessMode::ReadOnly;
        assert_eq!(ro.check_scope(10, 3, true, 2), Err(TokenError::ReadOnly));
        assert!(ro.check_scope(10, 3, false, 2).is_ok());
    }

    #[test]
    fn session_key_depends_on_token_and_node() {
        let s = ClusterSecret::generate();
        let signer = s.token_signer();
        let a = s.node_key(1).session_key(&signer.sign(&token()));
        let mut t2 = token();
        t2.token_id = 8;
        let b = s.node_key(1).session_key(&signer.sign(&t2));
        assert_ne!(a, b);
        assert_ne!(a, s.node_key(2).session_key(&signer.sign(&token())));
        let mac = a.mac(&[b"header", b"payload"]);
        assert!(a.verify(&[b"header", b"payload"], &mac));
        assert!(a.verify(&[b"headerpay", b"load"], &mac), "parts are concatenated");
        assert!(!b.verify(&[b"header", b"payload"], &mac));
        assert!(!a.verify(&[b"header", b"paylaod"], &mac));
    }

    #[test]
    fn replay_window() {
        let mut w = ReplayWindow::default();
        assert!(!w.accept(0));
        assert!(w.accept(5));
        assert!(!w.accept(5));
        assert!(w.accept(3));
        assert!(!w.accept(3));
        assert!(w.accept(10_000));
        assert!(!w.accept(5), "too old");
        assert!(w.accept(9_999));
        assert!(!w.accept(9_999));
        assert!(w.accept(10_000 - 4095));
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = SignedToken::decode(&bytes);
        }
    }

    #[test]
    fn a_window_after_a_floor_refuses_everything_up_to_it() {
        let floor = 1_000_000;
        let mut window = ReplayWindow::after(floor);
        for seq in [1, floor - WINDOW, floor - 5, floor - 1, floor] {
            assert!(!window.accept(seq), "seq {seq} at or below the floor was accepted");
        }
        assert!(window.accept(floor + 2));
        assert!(window.accept(floor + 1), "reordered requests above the floor pass");
        assert!(!window.accept(floor + 1));
    }
}
