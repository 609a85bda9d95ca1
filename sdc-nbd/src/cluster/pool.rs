//! Data-plane clients, one pooled [`DataPlaneClient`] per SDS node.
//!
//! Every volume routed through this SDC shares the same clients, so the
//! number of sockets is `connections × SDS nodes`, independent of the
//! number of volumes and NBD connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::RwLock;
use std::time::Duration;

use pflex_dataplane::DataPlaneClient;
use pflex_proto::placement::SdsEndpoint;

use crate::backend::BackendError;

/// Lazily created data-plane clients keyed by SDS data address.
pub struct SdsPool {
    connections: usize,
    request_timeout: Duration,
    connect_timeout: Duration,
    /// By SDS node id, with the address the client was made for.
    clients: RwLock<HashMap<u64, PooledClient>>,
}

struct PooledClient {
    host: String,
    port: u16,
    client: DataPlaneClient,
}

impl SdsPool {
    pub fn new(connections: usize, request_timeout: Duration, connect_timeout: Duration) -> Self {
        Self {
            connections: connections.max(1),
            request_timeout,
            connect_timeout,
            clients: RwLock::new(HashMap::new()),
        }
    }

    /// The client for `node`'s data port (created on first use).
    pub async fn client(&self, node: &SdsEndpoint) -> Result<DataPlaneClient, BackendError> {
        if let Some(c) = self.clients.read().unwrap_or_else(|p| p.into_inner()).get(&node.id) {
            if c.port == node.data_port && c.host == node.host {
                return Ok(c.client.clone());
            }
        }
        let addr = resolve(&node.host, node.data_port).await?;
        let client = DataPlaneClient::with_timeouts(
            addr,
            self.connections,
            self.request_timeout,
            self.connect_timeout,
        );
        let mut clients = self.clients.write().unwrap_or_else(|p| p.into_inner());
        match clients.get(&node.id) {
            Some(c) if c.port == node.data_port && c.host == node.host => Ok(c.client.clone()),
            _ => {
                // New node, or the node moved: a fresh client for the new address.
                let pooled = PooledClient {
                    host: node.host.clone(),
                    port: node.data_port,
                    client: client.clone(),
                };
                clients.insert(node.id, pooled);
                Ok(client)
            }
        }
    }

    /// Number of SDS addresses with a client.
    pub fn len(&self) -> usize {
        self.clients.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, BackendError> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| BackendError::Io(format!("cannot resolve SDS host {host}: {e}")))?
        .next()
        .ok_or_else(|| BackendError::Io(format!("SDS host {host} has no address")))
}
