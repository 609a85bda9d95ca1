//! Looking at a running cluster: HTTP documents of its nodes, node ids,
//! the volumes an SDC serves, chunk checksums and replica comparison.

use std::time::{Duration, Instant};

use pflex_proto::api::ChunkChecksum;

use super::{Cluster, Component, Node, READY_TIMEOUT};

impl Cluster {
    /// GET a JSON document from a loopback port; `None` unless it answered
    /// 2xx with JSON of that shape.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        port: u16,
        path: &str,
    ) -> Option<T> {
        let reply = self.http.get(format!("http://127.0.0.1:{port}{path}")).send().await.ok()?;
        if !reply.status().is_success() {
            return None;
        }
        reply.json().await.ok()
    }

    /// GET a text document from a loopback port.
    pub async fn get_text(&self, port: u16, path: &str) -> Option<String> {
        let reply = self.http.get(format!("http://127.0.0.1:{port}{path}")).send().await.ok()?;
        reply.text().await.ok()
    }

    /// A node's `/metrics` text (mgmt port).
    pub async fn metrics(&self, node: &Node) -> String {
        self.get_text(node.mgmt_port, "/metrics")
            .await
            .unwrap_or_else(|| panic!("metrics of {}", node.name))
    }

    /// The node id `component` (an SDS or SDC) registered under.
    pub async fn node_id(&self, component: Component) -> u64 {
        let node = self.node_ref(component);
        let status = self.node_status(node.mgmt_port).await;
        status.and_then(|s| s.node_id).unwrap_or_else(|| panic!("{} is registered", node.name))
    }

    /// The index of the running SDS with MDM node id `node_id`.
    pub async fn sds_index(&self, node_id: u64) -> usize {
        for (i, node) in self.sds.iter().enumerate().filter(|(_, n)| n.is_started()) {
            if self.node_status(node.mgmt_port).await.and_then(|s| s.node_id) == Some(node_id) {
                return i;
            }
        }
        panic!("no running SDS with node id {node_id}");
    }

    /// The running SDS with MDM node id `node_id`.
    pub async fn sds_by_node_id(&self, node_id: u64) -> &Node {
        &self.sds[self.sds_index(node_id).await]
    }

    /// The volumes SDC `i` lists on its control port (`GET /volumes`).
    pub async fn sdc_volumes(&self, i: usize) -> Option<Vec<serde_json::Value>> {
        self.get_json(self.sdc[i].control_port, "/volumes").await
    }

    /// Waits until SDC `i` routes every volume in `volumes`.
    pub async fn wait_served(&self, i: usize, volumes: &[&str]) {
        let what = format!("{volumes:?} served by {}", self.sdc[i].name);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let listed = self.sdc_volumes(i).await.unwrap_or_default();
            let routed =
                |name: &&str| listed.iter().any(|v| v["name"] == *name && v["routed"] == true);
            if volumes.iter().all(routed) {
                return;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}\n{}", self.log_tails());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A chunk's checksum as an SDS reports it on its control port.
    pub async fn checksum(&self, node: &Node, volume_id: u64, chunk: u64) -> ChunkChecksum {
        let path = format!("/chunk/{volume_id}/{chunk}/checksum");
        self.get_json(node.control_port, &path).await.unwrap_or_else(|| {
            panic!("checksum of chunk {chunk} of volume {volume_id} from {}", node.name)
        })
    }

    /// Compares both copies of chunks `chunks` of `volume`, through the
    /// control ports the MDM lists; returns how many chunks hold data.
    /// Panics on any difference.
    pub async fn check_replicas(&self, volume: &str, chunks: std::ops::Range<u64>) -> usize {
        let map = self.admin.placement(volume).await.expect("placement");
        let sds = self.admin.sds_list().await.expect("sds list");
        let control_port =
            |id: u64| sds.iter().find(|s| s.id == id).expect("SDS in list").control_port;
        let mut allocated = 0;
        for c in chunks {
            let pg = map.pg_of(c).expect("pg");
            let path = format!("/chunk/{}/{c}/checksum", map.volume_id);
            let a: ChunkChecksum = self
                .get_json(control_port(pg.primary), &path)
                .await
                .unwrap_or_else(|| panic!("checksum of chunk {c} from the primary"));
            let b: ChunkChecksum = self
                .get_json(control_port(pg.secondary), &path)
                .await
                .unwrap_or_else(|| panic!("checksum of chunk {c} from the secondary"));
            assert_eq!(
                (a.allocated, a.crc32),
                (b.allocated, b.crc32),
                "replicas of chunk {c} of {volume} differ (primary {}, secondary {})",
                pg.primary,
                pg.secondary
            );
            allocated += usize::from(a.allocated);
        }
        allocated
    }
}
