//! Raft messages between MDMs: JSON over the MDM's own HTTP(S) API
//! (`POST /raft/append`, `/raft/vote`, `/raft/snapshot`), carrying a key
//! derived from the cluster secret every member holds (see
//! [`super::peer_key`]); over TLS when the cluster runs it, with the same
//! cluster CA as every other API, each member presenting its own member
//! certificate and taking answers only from the member it asked (see
//! [`super::peer_auth`]).

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::peer_auth::{accept_answer, Identity};
use super::{Node, NodeId, TypeConfig, PEER_KEY_HEADER};

/// Builds a connection to each peer (sharing one HTTP client).
#[derive(Clone)]
pub struct Network {
    http: reqwest::Client,
    peer_key: String,
}

impl Network {
    pub fn new(peer_key: String) -> Result<Self, reqwest::Error> {
        // `tls_info`: each answer carries the certificate it came with.
        let http = pflex_mdm_client::trust::http_client_builder().tls_info(true).build()?;
        Ok(Self { http, peer_key })
    }
}

/// Messages to one peer.
pub struct Peer {
    target: NodeId,
    url: String,
    http: reqwest::Client,
    peer_key: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Peer {
        Peer {
            target,
            url: node.addr.trim_end_matches('/').to_string(),
            http: self.http.clone(),
            peer_key: self.peer_key.clone(),
        }
    }
}

impl Peer {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let sent = self
            .http
            .post(format!("{}/raft/{path}", self.url))
            .header(PEER_KEY_HEADER, &self.peer_key)
            .timeout(option.hard_ttl())
            .json(request)
            .send()
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let answerer = sent
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .map(|info| info.peer_certificate().and_then(pflex_tls::certificate_name));
        let identity = match &answerer {
            None => Identity::Plain,
            Some(name) => Identity::Tls(name.as_deref()),
        };
        if let Err(refusal) = accept_answer(identity, self.target) {
            let detail = std::io::Error::other(format!("{}: {refusal}", self.url));
            return Err(RPCError::Network(NetworkError::new(&detail)));
        }
        let status = sent.status();
        let body = sent.bytes().await.map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if !status.is_success() {
            let detail = std::io::Error::other(format!(
                "peer answered {status}: {}",
                String::from_utf8_lossy(&body)
            ));
            return Err(RPCError::Network(NetworkError::new(&detail)));
        }
        let answer: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&body).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call("append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call("vote", &rpc, &option).await
    }
}
