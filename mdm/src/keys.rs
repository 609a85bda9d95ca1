//! The MDM's key material, all derived from its cluster secret (see
//! `pflex_proto::token` for the scheme): it signs IO tokens, hands each SDS
//! its own keys, and gives an SDC one session key per SDS with every token.

use pflex_proto::api::{NodeSessionKey, SdsKeys};
use pflex_proto::token::{ClusterSecret, IoToken, SignedToken, TokenSigner};

/// The cluster secret and the token signing key derived from it.
pub struct Keys {
    secret: ClusterSecret,
    signer: TokenSigner,
}

impl Keys {
    pub fn new(secret: ClusterSecret) -> Self {
        let signer = secret.token_signer();
        Self { secret, signer }
    }

    pub fn sign(&self, token: &IoToken) -> SignedToken {
        self.signer.sign(token)
    }

    /// What SDS `sds_id` receives at registration.
    pub fn sds_keys(&self, sds_id: u64) -> SdsKeys {
        SdsKeys {
            token_public_keys: vec![self.signer.public_key().to_hex()],
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
