//! The control plane as a test drives it: volumes created and mapped with
//! the admin token, and components the test plays itself, registered over
//! HTTP exactly as real ones are.

use pflex_mdm_client::MdmClient;
use pflex_proto::api::{
    DeviceInfo, NodeType, RegisterRequest, RegisterResponse, VolumeCreate, VolumeMap,
};
use pflex_proto::token::AccessMode;

use super::{Cluster, JOIN_KEY};

/// A component registered over HTTP by the test itself, as a real one would.
pub struct RegisteredNode {
    pub reply: RegisterResponse,
    /// Signs in with the node's credential.
    pub client: MdmClient,
}

impl RegisteredNode {
    pub fn id(&self) -> u64 {
        self.reply.node_id
    }
}

impl Cluster {
    /// Creates a thin volume; returns its id.
    pub async fn create_volume(&self, name: &str, size: u64) -> u64 {
        let create = VolumeCreate { name: name.into(), size_bytes: size, pool: None, thick: false };
        self.admin.volume_create(&create).await.expect("creating a volume").id
    }

    /// Maps `volume` to the SDC named `sdc`.
    pub async fn map_volume(&self, volume: &str, sdc: &str, access_mode: AccessMode) {
        let map = VolumeMap { volume: volume.into(), sdc: sdc.into(), access_mode };
        self.admin.volume_map(&map).await.expect("mapping a volume");
    }

    /// Creates a thin volume and maps it read-write to the SDC named `sdc`;
    /// returns its id.
    pub async fn create_mapped_volume(&self, name: &str, size: u64, sdc: &str) -> u64 {
        let id = self.create_volume(name, size).await;
        self.map_volume(name, sdc, AccessMode::ReadWrite).await;
        id
    }

    /// Registers a component the test plays itself.
    pub async fn register(&self, request: RegisterRequest) -> RegisteredNode {
        let reply = self.anonymous().register(&request).await.expect("register");
        RegisteredNode { client: self.anonymous().with_credential(reply.credential.clone()), reply }
    }

    /// Registers a fake SDS with one device of `capacity_gib` (a new name, by the join key).
    pub async fn register_sds(
        &self,
        name: &str,
        fault_set: &str,
        pool: &str,
        capacity_gib: u64,
    ) -> RegisteredNode {
        self.register(fake_sds(name, fault_set, pool, capacity_gib)).await
    }

    /// Registers fake SDS `node` again, proving it with its credential.
    pub async fn register_sds_again(
        &self,
        node: &RegisteredNode,
        name: &str,
        fault_set: &str,
        capacity_gib: u64,
    ) -> RegisteredNode {
        let mut request = fake_sds(name, fault_set, "default", capacity_gib);
        request.join_key = String::new();
        request.credential = Some(node.reply.credential.clone());
        self.register(request).await
    }

    /// Registers an SDC the test plays itself (listening nowhere); it never
    /// receives key material.
    pub async fn register_sdc(&self, name: &str) -> RegisteredNode {
        let node = self.register(fake_request(NodeType::Sdc, name)).await;
        assert!(node.reply.sds_keys.is_none(), "an SDC must never receive SDS keys");
        node
    }

    /// Registers a dashboard the test plays itself.
    pub async fn register_mgmt(&self, name: &str) -> RegisteredNode {
        let mut request = fake_request(NodeType::Mgmt, name);
        request.mgmt_port = 5000;
        self.register(request).await
    }
}

/// A registration of a fake SDS with one device of `capacity_gib`.
/// The token public keys the next heartbeat of node `node_id` hears,
/// through `client` (holding that node's credential).
pub async fn heartbeat_token_keys(client: &MdmClient, node_id: u64) -> Vec<String> {
    let request = pflex_proto::api::HeartbeatRequest {
        node_id,
        metrics: Default::default(),
        volumes_since: None,
    };
    client.heartbeat(&request).await.expect("a heartbeat answer").token_public_keys
}

pub fn fake_sds(name: &str, fault_set: &str, pool: &str, capacity_gib: u64) -> RegisterRequest {
    RegisterRequest {
        control_port: 9100,
        mgmt_port: 9200,
        data_port: 9700,
        fault_set: Some(fault_set.into()),
        pool: Some(pool.into()),
        devices: vec![DeviceInfo {
            path: format!("/dev/fake/{name}"),
            capacity_bytes: capacity_gib << 30,
            used_bytes: 0,
        }],
        ..fake_request(NodeType::Sds, name)
    }
}

/// A registration of a fake node of `node_type` without ports or devices.
pub fn fake_request(node_type: NodeType, name: &str) -> RegisterRequest {
    RegisterRequest {
        join_key: JOIN_KEY.into(),
        enrollment_token: None,
        credential: None,
        node_type,
        name: name.into(),
        host: "127.0.0.1".into(),
        control_port: 0,
        mgmt_port: 0,
        data_port: 0,
        fault_set: None,
        pool: None,
        devices: vec![],
        data_cluster_id: None,
    }
}
