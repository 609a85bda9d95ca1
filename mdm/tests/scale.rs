//! The MDM's per-request and per-tick work must not grow with the cluster.
//!
//! The work is counted, not timed: SQLite's progress handler counts the
//! virtual-machine instructions every statement of an operation executes,
//! which is deterministic and immune to a busy CI machine. Each operation
//! is measured on a small cluster, then on one with four times the volumes,
//! then with four times the nodes as well; an operation that reads every
//! volume, PG or node again shows up as a ratio near 4 (or 16), where work
//! that does not grow stays near 1.
//!
//! Volume create and the monitor pass look at every SDS of a pool by
//! design (placement chooses among them, liveness is per node), so they
//! are held to "does not grow with volumes" only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pflex_mdm::keys::{KeyTiming, Keys};
use pflex_mdm::service::{self, Caller, Ctx, Replace, Settings};
use pflex_proto::api::{
    DeviceInfo, HeartbeatRequest, NodeType, RegisterRequest, TokenRequest, VolumeCreate, VolumeMap,
};
use pflex_proto::token::{AccessMode, ClusterSecret};
use rusqlite::Connection;

const NOW: u64 = 1_900_000_000;

fn settings() -> Settings {
    Settings {
        heartbeat_interval_secs: 2,
        stale_after_secs: 60,
        failed_after_secs: 120,
        token_ttl_secs: 600,
        probe_on_report: false,
        unreachable_grace_secs: 5,
        resync_window_secs: 120,
    }
}

struct Cluster {
    conn: Connection,
    keys: Keys,
    sightings: pflex_mdm::sightings::Sightings,
    candidates: pflex_mdm::service::CandidateCache,
    sds: Vec<u64>,
    sdc: Vec<u64>,
    volumes: u64,
    /// (volume id, SDC id) of mapped volumes.
    mapped: Vec<(u64, u64)>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let conn = pflex_mdm::db::open(&dir.path().join("powerflex.db")).unwrap();
        let timing = KeyTiming {
            publish_for: std::time::Duration::from_secs(6),
            token_ttl: std::time::Duration::from_secs(600),
        };
        let keys = Keys::new(ClusterSecret::generate(), timing, Vec::new());
        Self {
            conn,
            keys,
            sightings: Default::default(),
            candidates: Default::default(),
            sds: Vec::new(),
            sdc: Vec::new(),
            volumes: 0,
            mapped: Vec::new(),
            _dir: dir,
        }
    }

    /// Runs `f` in a transaction at `now`, committing on success.
    fn run<T>(&mut self, now: u64, f: impl FnOnce(&Connection, &Ctx) -> T) -> T {
        let tx = self.conn.transaction().unwrap();
        let ctx = Ctx {
            settings: settings(),
            keys: &self.keys,
            sightings: &self.sightings,
            candidates: &self.candidates,
            now,
        };
        let value = f(&tx, &ctx);
        tx.commit().unwrap();
        value
    }

    /// The VM instructions (in units of one) `f` executes; its changes are
    /// kept.
    fn cost(&mut self, f: impl FnOnce(&Connection, &Ctx)) -> u64 {
        let steps = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&steps);
        self.conn.progress_handler(
            1,
            Some(move || {
                counter.fetch_add(1, Ordering::Relaxed);
                false
            }),
        );
        self.run(NOW, f);
        self.conn.progress_handler(0, None::<fn() -> bool>);
        steps.load(Ordering::Relaxed)
    }

    fn add_nodes(&mut self, node_type: NodeType, count: usize) {
        for _ in 0..count {
            let (list, prefix) = match node_type {
                NodeType::Sds => (&self.sds, "sds"),
                _ => (&self.sdc, "sdc"),
            };
            let name = format!("{prefix}-{}", list.len());
            let is_sds = node_type == NodeType::Sds;
            let request = RegisterRequest {
                join_key: "k".into(),
                enrollment_token: None,
                credential: None,
                node_type,
                name: name.clone(),
                host: "127.0.0.1".into(),
                control_port: 1,
                mgmt_port: 1,
                data_port: 1,
                fault_set: is_sds.then(|| format!("fs{}", list.len() % 5)),
                pool: None,
                devices: if is_sds {
                    vec![DeviceInfo { path: "/d".into(), capacity_bytes: 1 << 50, used_bytes: 0 }]
                } else {
                    Vec::new()
                },
                data_cluster_id: None,
            };
            let id = self.run(NOW, |conn, ctx| {
                service::register(conn, ctx, &request, true, "test").unwrap().node_id
            });
            match node_type {
                NodeType::Sds => self.sds.push(id),
                _ => self.sdc.push(id),
            }
        }
    }

    fn add_volumes(&mut self, count: u64) {
        for _ in 0..count {
            self.volumes += 1;
            let request = VolumeCreate {
                name: format!("vol-{}", self.volumes),
                size_bytes: 1 << 30,
                pool: None,
                thick: self.volumes.is_multiple_of(3),
            };
            self.run(NOW, |conn, ctx| service::volume_create(conn, ctx, &request).unwrap());
        }
        // One volume in fifty is mapped, to SDCs in turn.
        while (self.mapped.len() as u64) < self.volumes / 50 {
            let volume = self.mapped.len() as u64 * 50 + 1;
            let sdc = self.sdc[self.mapped.len() % self.sdc.len()];
            let request = VolumeMap {
                volume: format!("vol-{volume}"),
                sdc: sdc.to_string(),
                access_mode: AccessMode::ReadWrite,
            };
            let id =
                self.run(NOW, |conn, ctx| service::volume_map(conn, ctx, &request).unwrap().id);
            self.mapped.push((id, sdc));
        }
    }

    /// The cost of each operation, by name.
    fn measure(&mut self) -> Vec<(&'static str, u64)> {
        let (sds, sdc) = (self.sds[self.sds.len() / 2], self.sdc[self.sdc.len() / 2]);
        let (volume, mapped_to) = self.mapped[self.mapped.len() / 2];
        let sds_caller = Caller::Node { id: sds, node_type: NodeType::Sds };
        let sdc_caller = Caller::Node { id: sdc, node_type: NodeType::Sdc };
        let mapped_caller = Caller::Node { id: mapped_to, node_type: NodeType::Sdc };
        // Each node's cursor is current, as after its previous heartbeat.
        let cursor = self.run(NOW, |conn, ctx| {
            let beat =
                HeartbeatRequest { node_id: sds, metrics: Default::default(), volumes_since: None };
            service::heartbeat(conn, ctx, sds_caller, &beat).unwrap().volumes_cursor
        });
        let beat = |node_id| HeartbeatRequest {
            node_id,
            metrics: Default::default(),
            volumes_since: Some(cursor),
        };
        self.volumes += 1;
        let name = format!("vol-{}", self.volumes);
        vec![
            (
                "heartbeat SDS",
                self.cost(|c, x| drop(service::heartbeat(c, x, sds_caller, &beat(sds)).unwrap())),
            ),
            (
                "heartbeat SDC",
                self.cost(|c, x| drop(service::heartbeat(c, x, sdc_caller, &beat(sdc)).unwrap())),
            ),
            (
                "heartbeat SDS, on reader",
                self.cost(|c, x| {
                    let reply = service::heartbeat_on_reader(c, x, sds_caller, &beat(sds)).unwrap();
                    assert!(
                        matches!(reply, Some((_, false))),
                        "a heartbeat just written needs no write"
                    );
                }),
            ),
            (
                "heartbeat SDC, on reader",
                self.cost(|c, x| {
                    let reply = service::heartbeat_on_reader(c, x, sdc_caller, &beat(sdc)).unwrap();
                    assert!(
                        matches!(reply, Some((_, false))),
                        "a heartbeat just written needs no write"
                    );
                }),
            ),
            (
                "placement map",
                self.cost(|c, _| {
                    drop(service::placement_map(c, mapped_caller, &volume.to_string()).unwrap())
                }),
            ),
            (
                "volume show",
                self.cost(|c, _| drop(service::volume_show(c, &volume.to_string()).unwrap())),
            ),
            (
                "volume list page",
                self.cost(|c, _| drop(service::volume_list(c, volume, 100).unwrap())),
            ),
            (
                "token",
                self.cost(|c, x| {
                    let request = TokenRequest { volume_id: volume, mode: AccessMode::ReadWrite };
                    let draft = service::draft_token(c, x, mapped_to, &request).unwrap();
                    assert_eq!(service::record_tokens(c, &[draft.record]).unwrap(), 1);
                }),
            ),
            (
                "volume create",
                self.cost(|c, x| {
                    let request =
                        VolumeCreate { name, size_bytes: 1 << 30, pool: None, thick: false };
                    drop(service::volume_create(c, x, &request).unwrap());
                }),
            ),
            (
                "monitor pass",
                self.cost(|c, x| {
                    let sample = service::metrics_sample(c, x).unwrap();
                    service::monitor_tick(c, x, Replace::EveryFailedNode, Some(sample)).unwrap();
                }),
            ),
        ]
        .into_iter()
        .map(|(op, cost)| (op, cost.max(1)))
        .collect()
    }
}

/// Fails for every operation whose cost grew more than `limit` times from
/// `before` to `after`.
fn check(before: &[(&str, u64)], after: &[(&str, u64)], ops: &[&str], limit: f64, what: &str) {
    let mut grown = Vec::new();
    for ((op, b), (_, a)) in before.iter().zip(after) {
        let ratio = *a as f64 / *b as f64;
        eprintln!("{what}: {op:<24} {b:>7} -> {a:>7} VM steps (x{ratio:.2})");
        if ops.contains(op) && ratio > limit {
            grown.push(format!("{op} x{ratio:.2}"));
        }
    }
    assert!(grown.is_empty(), "work grew with the cluster ({what}): {}", grown.join(", "));
}

#[test]
fn request_and_tick_work_does_not_grow_with_the_cluster() {
    let mut cluster = Cluster::new();
    cluster.add_nodes(NodeType::Sds, 60);
    cluster.add_nodes(NodeType::Sdc, 190);
    cluster.add_volumes(500);
    let small = cluster.measure();

    cluster.add_volumes(1500);
    let more_volumes = cluster.measure();
    let every_op: Vec<&str> = small.iter().map(|(op, _)| *op).collect();
    check(&small, &more_volumes, &every_op, 1.5, "4x volumes");

    cluster.add_nodes(NodeType::Sds, 180);
    cluster.add_nodes(NodeType::Sdc, 570);
    let more_nodes = cluster.measure();
    let per_request = [
        "heartbeat SDS",
        "heartbeat SDC",
        "heartbeat SDS, on reader",
        "heartbeat SDC, on reader",
        "placement map",
        "volume show",
        "volume list page",
        "token",
    ];
    check(&more_volumes, &more_nodes, &per_request, 1.5, "4x nodes");
}

#[test]
fn the_monitor_pass_bounds_the_logs() {
    let mut cluster = Cluster::new();
    cluster.add_nodes(NodeType::Sds, 3);
    cluster.add_nodes(NodeType::Sdc, 2);
    cluster.add_volumes(50);
    let (sdc, volume, mapped_to) = (cluster.sdc[0], cluster.mapped[0].0, cluster.mapped[0].1);
    let caller = Caller::Node { id: sdc, node_type: NodeType::Sdc };
    // Heartbeats for 3 minutes, every 2 s: one log row per node and minute.
    for second in (0..180).step_by(2) {
        cluster.run(NOW + second, |conn, ctx| {
            let beat =
                HeartbeatRequest { node_id: sdc, metrics: Default::default(), volumes_since: None };
            service::heartbeat(conn, ctx, caller, &beat).unwrap();
        });
    }
    cluster.run(NOW, |conn, ctx| {
        let request = TokenRequest { volume_id: volume, mode: AccessMode::ReadWrite };
        let draft = service::draft_token(conn, ctx, mapped_to, &request).unwrap();
        service::record_tokens(conn, &[draft.record]).unwrap();
    });
    let rows = |cluster: &mut Cluster, table: &str| -> u64 {
        cluster.conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0)).unwrap()
    };
    assert!(rows(&mut cluster, "heartbeat_log") <= 4, "one row per node and minute");
    assert_eq!(rows(&mut cluster, "io_tokens"), 1);
    // Two hours later both are pruned by the monitor pass.
    cluster.run(NOW + 7200, |conn, ctx| {
        service::monitor_tick(conn, ctx, Replace::Nothing, None).unwrap()
    });
    assert_eq!(rows(&mut cluster, "heartbeat_log"), 0);
    assert_eq!(rows(&mut cluster, "io_tokens"), 0);
}
