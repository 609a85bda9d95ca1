//! The MDM's key material, all derived from its cluster secret (see
//! `pflex_proto::token` for the scheme): it signs IO tokens, hands each SDS
//! its own keys, and gives an SDC one session key per SDS with every token.
//!
//! The token signing key rotates (`pflex cluster rotate`) without stopping
//! IO, in three steps decided by [`key_schedule`], a pure function of the
//! rotation history and the time:
//! 1. the new key's public half is *published*: every SDS receives it with
//!    its next heartbeat reply, while the MDM still signs with the old key;
//! 2. after [`KeyTiming::publish_for`] (three heartbeat intervals) the MDM
//!    signs new tokens with the new key;
//! 3. the old key stays accepted for [`KeyTiming::token_ttl`] plus a minute
//!    after that, so every token it signed expires before its key is
//!    dropped; SDCs renew at a third of a token's life, so they have moved
//!    to new tokens long before.

use std::sync::RwLock;
use std::time::Duration;

use pflex_proto::api::{NodeSessionKey, SdsKeys};
use pflex_proto::token::{ClusterSecret, IoToken, SignedToken};

/// How long each rotation step lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyTiming {
    /// From publishing a new key to signing with it.
    pub publish_for: Duration,
    /// The longest a token lives.
    pub token_ttl: Duration,
}

/// Margin past the token lifetime before an old key is dropped.
const RETIRE_MARGIN_SECS: u64 = 60;

/// Which key generation signs, and which ones an SDS accepts, at `now`
/// (unix seconds), given every rotation as (generation, created at) in
/// increasing order. Generation 0 exists before any rotation.
pub fn key_schedule(history: &[(u32, u64)], now: u64, timing: KeyTiming) -> (u32, Vec<u32>) {
    let publish = timing.publish_for.as_secs();
    // When each generation starts signing: generation 0 always has.
    let signs_from = |created: u64| created + publish;
    let mut signing = 0u32;
    for &(generation, created) in history {
        if signs_from(created) <= now {
            signing = generation;
        }
    }
    let mut accepted = Vec::new();
    // Older generations: accepted until tokens they signed have expired,
    // counted from when their successor started signing.
    let mut generations: Vec<(u32, Option<u64>)> = Vec::new();
    let mut previous = Some(0u32);
    for &(generation, created) in history {
        if let Some(p) = previous {
            generations.push((p, Some(signs_from(created))));
        }
        previous = Some(generation);
    }
    if let Some(p) = previous {
        generations.push((p, None));
    }
    let keep = timing.token_ttl.as_secs() + RETIRE_MARGIN_SECS;
    for (generation, superseded_at) in generations {
        let keep_it = match superseded_at {
            // The newest generation: published (maybe not signing yet).
            None => true,
            Some(at) if at > now => true, // its successor does not sign yet
            Some(at) => now < at + keep,
        };
        if keep_it || generation == signing {
            accepted.push(generation);
        }
    }
    (signing, accepted)
}

/// The cluster secret and the token signing keys derived from it.
pub struct Keys {
    secret: ClusterSecret,
    /// The id the database records (see [`Keys::cluster_id`]).
    cluster_id: RwLock<String>,
    /// [`ClusterSecret::secret_id`], computed once.
    secret_id: String,
    timing: KeyTiming,
    /// Every rotation: (generation, created at), in order.
    history: RwLock<Vec<(u32, u64)>>,
}

impl Keys {
    pub fn new(secret: ClusterSecret, timing: KeyTiming, history: Vec<(u32, u64)>) -> Self {
        let cluster_id = RwLock::new(secret.cluster_id());
        let secret_id = secret.secret_id();
        Self { secret, cluster_id, secret_id, timing, history: RwLock::new(history) }
    }

    /// The cluster's public id: the one its database recorded when it was
    /// created (from the secret then, see [`ClusterSecret::cluster_id`]),
    /// so an MDM restored from a backup is still the cluster whose chunks
    /// the SDS nodes hold, and one that started over is not.
    pub fn cluster_id(&self) -> String {
        self.cluster_id.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The public name of the secret (see [`ClusterSecret::secret_id`]).
    pub fn secret_id(&self) -> &str {
        &self.secret_id
    }

    /// Takes the id the database records (none: keep the secret's).
    pub fn adopt_cluster_id(&self, recorded: Option<String>) {
        if let Some(id) = recorded {
            *self.cluster_id.write().unwrap_or_else(|p| p.into_inner()) = id;
        }
    }

    fn schedule(&self, now: u64) -> (u32, Vec<u32>) {
        let history = self.history.read().unwrap_or_else(|p| p.into_inner());
        key_schedule(&history, now, self.timing)
    }

    pub fn sign(&self, token: &IoToken) -> SignedToken {
        let (signing, _) = self.schedule(pflex_proto::unix_now());
        self.secret.token_signer_at(signing).sign(token)
    }

    /// The public keys an SDS accepts now, hex.
    pub fn token_public_keys(&self) -> Vec<String> {
        let (_, accepted) = self.schedule(pflex_proto::unix_now());
        accepted.into_iter().map(|g| self.secret.token_signer_at(g).public_key().to_hex()).collect()
    }

    /// The newest generation.
    /// Replaces the generations known (read again from the database).
    pub fn replace_history(&self, history: Vec<(u32, u64)>) {
        *self.history.write().unwrap_or_else(|p| p.into_inner()) = history;
    }

    pub fn newest_generation(&self) -> u32 {
        self.history.read().unwrap_or_else(|p| p.into_inner()).last().map_or(0, |&(g, _)| g)
    }

    /// Records generation `generation` created at `now` (already stored).
    /// Records a new generation (once: a generation already known stays as
    /// it is).
    pub fn add_generation(&self, generation: u32, now: u64) {
        let mut history = self.history.write().unwrap_or_else(|p| p.into_inner());
        if history.iter().all(|&(g, _)| g != generation) {
            history.push((generation, now));
        }
    }

    /// Takes the rotation history as the database records it (a replicated
    /// MDM: every member signs as the one that rotated did).
    pub fn adopt_history(&self, recorded: Vec<(u32, u64)>) {
        let mut history = self.history.write().unwrap_or_else(|p| p.into_inner());
        if *history != recorded {
            *history = recorded;
        }
    }

    pub fn timing(&self) -> KeyTiming {
        self.timing
    }

    /// What SDS `sds_id` receives at registration.
    pub fn sds_keys(&self, sds_id: u64) -> SdsKeys {
        SdsKeys {
            token_public_keys: self.token_public_keys(),
            node_key: self.secret.node_key(sds_id).to_hex(),
            peer_key: self.secret.peer_key().to_hex(),
        }
    }

    /// The session keys of `signed` at each of `sds_ids`.
    pub fn session_keys(&self, signed: &SignedToken, sds_ids: &[u64]) -> Vec<NodeSessionKey> {
        sds_ids
            .iter()
            .map(|&sds_id| NodeSessionKey {
                sds_id,
                key: self.secret.node_key(sds_id).session_key(signed).to_hex(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (history, now) -> (signing generation, accepted generations), with
    /// keys published for 6 s and tokens living 100 s (kept 160 s).
    #[test]
    fn rotation_schedule_table() {
        let t =
            KeyTiming { publish_for: Duration::from_secs(6), token_ttl: Duration::from_secs(100) };
        type Case = (&'static [(u32, u64)], u64, (u32, Vec<u32>));
        let cases: &[Case] = &[
            (&[], 1000, (0, vec![0])),
            // Rotated at 1000: published, not signing yet.
            (&[(1, 1000)], 1000, (0, vec![0, 1])),
            (&[(1, 1000)], 1005, (0, vec![0, 1])),
            // Signing with 1 from 1006; 0 kept until 1006 + 160.
            (&[(1, 1000)], 1006, (1, vec![0, 1])),
            (&[(1, 1000)], 1165, (1, vec![0, 1])),
            (&[(1, 1000)], 1166, (1, vec![1])),
            // Two rotations in a row: every key that may have signed a
            // live token is kept.
            (&[(1, 1000), (2, 1010)], 1010, (1, vec![0, 1, 2])),
            (&[(1, 1000), (2, 1010)], 1016, (2, vec![0, 1, 2])),
            (&[(1, 1000), (2, 1010)], 1166, (2, vec![1, 2])),
            (&[(1, 1000), (2, 1010)], 1176, (2, vec![2])),
            // Rotated again before the previous one signed: the pending
            // one is still accepted until its successor signs plus a life.
            (&[(1, 1000), (2, 1002)], 1003, (0, vec![0, 1, 2])),
            (&[(1, 1000), (2, 1002)], 1008, (2, vec![0, 1, 2])),
        ];
        for (history, now, expected) in cases {
            assert_eq!(&key_schedule(history, *now, t), expected, "{history:?} at {now}");
        }
    }
}
