//! Three real MDM processes kept identical by the Raft log, under faults.
//!
//! Clients create, rename, resize, map, unmap, delete and read volumes
//! concurrently (randomised, seeded: `PFLEX_SEED`) while the leader is
//! killed and restarted, frozen (cut off from everyone) and resumed, and a
//! dead member is replaced by a new one (`mdm remove` / `mdm add`). The
//! recorded history must be linearizable against a sequential model of the
//! volume table (see `pflex_testkit::linearizability`, which is tested on
//! known-bad histories).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pflex_mdm_client::{MdmClient, MdmClientError};
use pflex_proto::api::{NodeType, VolumeCreate, VolumeMap, VolumeUnmap};
use pflex_proto::token::AccessMode;
use pflex_testkit::cluster::{fake_request, fake_sds, heartbeat_token_keys};
use pflex_testkit::linearizability::{check, Model, Operation, Verdict};
use pflex_testkit::mdm_cluster::MdmCluster;
use pflex_testkit::wait_for;

const NAMES: [&str; 4] = ["va", "vb", "vc", "vd"];
const MIB8: u64 = 8 << 20;

/// The volume table: name → (size, mapped to the one SDC).
#[derive(Clone, PartialEq, Eq, Hash, Default)]
struct Volumes(BTreeMap<String, (u64, bool)>);

#[derive(Debug, Clone)]
enum VolOp {
    Create { name: String, size: u64 },
    Delete { name: String },
    Rename { from: String, to: String },
    Resize { name: String, size: u64 },
    Map { name: String },
    Unmap { name: String },
    Read { name: String },
}

#[derive(Debug, Clone, PartialEq)]
enum VolOut {
    /// The volume after the operation (for a delete: as it was).
    Volume {
        size: u64,
        mapped: bool,
    },
    Exists,
    NotFound,
    Mapped,
    Refused,
}

impl Model for Volumes {
    type Input = VolOp;
    type Output = VolOut;

    fn step(&self, input: &VolOp) -> (VolOut, Self) {
        let mut next = self.clone();
        let vol = |&(size, mapped): &(u64, bool)| VolOut::Volume { size, mapped };
        let out = match input {
            VolOp::Create { name, size } => {
                if self.0.contains_key(name) {
                    VolOut::Exists
                } else {
                    next.0.insert(name.clone(), (*size, false));
                    VolOut::Volume { size: *size, mapped: false }
                }
            }
            VolOp::Delete { name } => match self.0.get(name) {
                None => VolOut::NotFound,
                Some(&(_, true)) => VolOut::Mapped,
                Some(v) => {
                    next.0.remove(name);
                    vol(v)
                }
            },
            VolOp::Rename { from, to } => match self.0.get(from) {
                None => VolOut::NotFound,
                Some(v) if from == to => vol(v),
                Some(_) if self.0.contains_key(to) => VolOut::Exists,
                Some(v) => {
                    next.0.remove(from);
                    next.0.insert(to.clone(), *v);
                    vol(v)
                }
            },
            VolOp::Resize { name, size } => match self.0.get(name) {
                None => VolOut::NotFound,
                Some(&(current, _)) if *size < current => VolOut::Refused,
                Some(&(_, mapped)) => {
                    next.0.insert(name.clone(), (*size, mapped));
                    VolOut::Volume { size: *size, mapped }
                }
            },
            VolOp::Map { name } => match self.0.get(name) {
                None => VolOut::NotFound,
                Some(&(size, _)) => {
                    next.0.insert(name.clone(), (size, true));
                    VolOut::Volume { size, mapped: true }
                }
            },
            VolOp::Unmap { name } => match self.0.get(name) {
                None | Some(&(_, false)) => VolOut::NotFound,
                Some(&(size, true)) => {
                    next.0.insert(name.clone(), (size, false));
                    VolOut::Volume { size, mapped: false }
                }
            },
            VolOp::Read { name } => match self.0.get(name) {
                None => VolOut::NotFound,
                Some(v) => vol(v),
            },
        };
        (out, next)
    }
}

/// xorshift64*: the seeded randomness of clients and faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn name(&mut self) -> String {
        NAMES[self.below(NAMES.len() as u64) as usize].to_string()
    }
}

fn random_op(rng: &mut Rng) -> VolOp {
    let name = rng.name();
    match rng.below(10) {
        0 | 1 => VolOp::Create { name, size: MIB8 * (1 + rng.below(3)) },
        2 => VolOp::Delete { name },
        3 => VolOp::Rename { from: name, to: rng.name() },
        4 => VolOp::Resize { name, size: MIB8 * (1 + rng.below(4)) },
        5 => VolOp::Map { name },
        6 => VolOp::Unmap { name },
        _ => VolOp::Read { name },
    }
}

/// The answer as the model would give it; `None` when the outcome is unknown
/// (the request may or may not have taken effect).
fn outcome(result: Result<pflex_proto::api::Volume, MdmClientError>) -> Option<VolOut> {
    match result {
        Ok(v) => Some(VolOut::Volume { size: v.size_bytes, mapped: !v.mappings.is_empty() }),
        Err(e) => match e.code() {
            Some("volume_exists") => Some(VolOut::Exists),
            Some("volume_not_found" | "not_mapped") => Some(VolOut::NotFound),
            Some("volume_mapped") => Some(VolOut::Mapped),
            Some("shrink_not_supported") => Some(VolOut::Refused),
            _ => None,
        },
    }
}

async fn run(mdm: &MdmClient, op: &VolOp) -> Result<pflex_proto::api::Volume, MdmClientError> {
    match op {
        VolOp::Create { name, size } => {
            let request =
                VolumeCreate { name: name.clone(), size_bytes: *size, pool: None, thick: false };
            mdm.volume_create(&request).await
        }
        VolOp::Delete { name } => mdm.volume_delete(name).await,
        VolOp::Rename { from, to } => mdm.volume_rename(from, to).await,
        VolOp::Resize { name, size } => mdm.volume_resize(name, *size).await,
        VolOp::Map { name } => {
            let request = VolumeMap {
                volume: name.clone(),
                sdc: "sdc1".into(),
                access_mode: AccessMode::ReadWrite,
            };
            mdm.volume_map(&request).await
        }
        VolOp::Unmap { name } => {
            mdm.volume_unmap(&VolumeUnmap { volume: name.clone(), sdc: "sdc1".into() }).await
        }
        VolOp::Read { name } => mdm.volume_show(name).await,
    }
}

type History = Arc<Mutex<Vec<Operation<VolOp, VolOut>>>>;

async fn record(mdm: &MdmClient, client: usize, op: VolOp, start: Instant, history: &History) {
    let call = start.elapsed().as_nanos() as u64;
    let output = outcome(run(mdm, &op).await);
    let ret = output.as_ref().map(|_| start.elapsed().as_nanos() as u64);
    history.lock().unwrap().push(Operation { client, call, ret, input: op, output });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn volume_history_stays_linearizable_while_leaders_die_and_members_are_replaced() {
    let seed: u64 =
        std::env::var("PFLEX_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20_261_202);
    eprintln!("seed {seed} (PFLEX_SEED)");
    let mut cluster = MdmCluster::start(3).await;
    let admin = cluster.admin();
    let anonymous = MdmClient::new(&cluster.urls(), None).unwrap();
    for (name, fault_set) in [("sds-a", "fs1"), ("sds-b", "fs2"), ("sds-c", "fs3")] {
        anonymous.register(&fake_sds(name, fault_set, "default", 64)).await.unwrap();
    }
    anonymous.register(&fake_request(NodeType::Sdc, "sdc1")).await.unwrap();

    let start = Instant::now();
    let run_for = Duration::from_secs(24);
    let history: History = Arc::default();
    let clients: Vec<_> = (0..3)
        .map(|client| {
            let (mdm, history) = (cluster.admin(), Arc::clone(&history));
            tokio::spawn(async move {
                let mut rng = Rng(seed.wrapping_mul(31).wrapping_add(client as u64 + 1) | 1);
                while start.elapsed() < run_for {
                    let op = random_op(&mut rng);
                    record(&mdm, client, op, start, &history).await;
                }
            })
        })
        .collect();

    // Faults, at seeded times.
    let mut rng = Rng(seed | 1);
    let at = |secs: u64| tokio::time::sleep_until((start + Duration::from_secs(secs)).into());
    let mut faults = Vec::new();
    at(2 + rng.below(2)).await;
    let leader = cluster.wait_for_leader().await;
    cluster.kill(leader);
    faults.push(format!("killed leader mdm{}", cluster.members[leader].id));
    at(6).await;
    cluster.restart(leader);
    at(8 + rng.below(2)).await;
    let leader = cluster.wait_for_leader().await;
    cluster.freeze(leader, true);
    faults.push(format!("froze leader mdm{} for 3 s", cluster.members[leader].id));
    at(12).await;
    cluster.freeze(leader, false);
    // The thawed leader is asked at once: it must not answer from the
    // state it froze with (others wrote meanwhile); a refusal sends the
    // client on to the new leader.
    let thawed = cluster.member_client(leader);
    for name in NAMES {
        record(&thawed, 50, VolOp::Read { name: name.to_string() }, start, &history).await;
    }
    at(14 + rng.below(2)).await;
    let leader = cluster.wait_for_leader().await;
    cluster.kill(leader);
    faults.push(format!("killed leader mdm{}", cluster.members[leader].id));
    // The dead member is replaced: removed, and a new one added.
    let dead = cluster.members[leader].id;
    wait_for("the others to elect a leader", Duration::from_secs(20), || async {
        cluster.leader().await.is_some()
    })
    .await;
    admin.mdm_remove(dead).await.expect("remove the dead member");
    let new = cluster.start_new_member();
    let new_id = cluster.members[new].id;
    admin.mdm_add(new_id, &cluster.members[new].url()).await.expect("add a new member");
    faults.push(format!("replaced mdm{dead} by mdm{new_id}"));
    for client in clients {
        client.await.unwrap();
    }
    // Final reads, after every writer stopped.
    for name in NAMES {
        record(&admin, 99, VolOp::Read { name: name.to_string() }, start, &history).await;
    }

    let history = history.lock().unwrap().clone();
    let unknown = history.iter().filter(|op| op.ret.is_none()).count();
    eprintln!(
        "{} operations ({unknown} with unknown outcome); faults: {}",
        history.len(),
        faults.join(", ")
    );
    assert!(history.len() - unknown > 100, "too few operations completed");
    assert!(unknown < 40, "too many operations with unknown outcome: {unknown}");
    let verdict = check(&Volumes::default(), &history, 20_000_000);
    assert!(
        matches!(verdict, Verdict::Linearizable { .. }),
        "{verdict:?} (seed {seed}); history:\n{history:#?}"
    );

    // The new member holds the same log: it catches up to the leader.
    let status = admin.mdm_status().await.unwrap();
    let voters: Vec<u64> = status.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    assert!(voters.contains(&new_id) && !voters.contains(&dead), "members: {voters:?}");
    wait_for("the new member to catch up", Duration::from_secs(30), || async {
        let leader = admin.mdm_status().await.ok().and_then(|s| s.applied_index);
        let member =
            cluster.member_client(new).mdm_status().await.ok().and_then(|s| s.applied_index);
        leader.is_some() && member >= leader
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restored_on_every_member_starts_a_new_cluster_with_its_volumes() {
    let cluster = MdmCluster::start(3).await;
    let admin = cluster.admin();
    let anonymous = MdmClient::new(&cluster.urls(), None).unwrap();
    let mut cluster_id = String::new();
    for (name, fault_set) in [("sds-a", "fs1"), ("sds-b", "fs2")] {
        let reply = anonymous.register(&fake_sds(name, fault_set, "default", 64)).await.unwrap();
        cluster_id = reply.cluster_id;
    }
    for name in NAMES {
        let request =
            VolumeCreate { name: name.into(), size_bytes: MIB8, pool: None, thick: false };
        admin.volume_create(&request).await.unwrap();
    }
    let backup = admin.mdm_backup().await.unwrap();
    assert!(backup.starts_with(b"SQLite format 3\0"), "not a SQLite file");
    drop(cluster);

    let restored = MdmCluster::start_from(3, Some(&backup)).await;
    let admin = restored.admin();
    // It is the same cluster to the SDS nodes (a new secret, the recorded
    // id): one holding chunks of the backed-up cluster is taken in.
    let anonymous = MdmClient::new(&restored.urls(), None).unwrap();
    let mut holder = fake_sds("sds-c", "fs3", "default", 64);
    holder.data_cluster_id = Some(cluster_id.clone());
    let reply = anonymous.register(&holder).await.expect("the restored cluster takes its nodes");
    assert_eq!(reply.cluster_id, cluster_id);
    let names: Vec<String> =
        admin.volume_list().await.unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(names, NAMES.to_vec());
    // The members started from the same content: new changes apply on all.
    let request = VolumeCreate { name: "after".into(), size_bytes: MIB8, pool: None, thick: false };
    admin.volume_create(&request).await.unwrap();
    wait_for("every member to apply the create", Duration::from_secs(20), || async {
        let mut applied = Vec::new();
        for i in 0..restored.members.len() {
            applied.push(
                restored.member_client(i).mdm_status().await.ok().and_then(|s| s.applied_index),
            );
        }
        applied.iter().all(|a| a.is_some() && *a == applied[0])
    })
    .await;
    let leader = restored.wait_for_leader().await;
    for i in 0..restored.members.len() {
        let conn = rusqlite::Connection::open_with_flags(
            restored.db_path(i),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let count: i64 = conn.query_row("SELECT COUNT(*) FROM volumes", [], |r| r.get(0)).unwrap();
        assert_eq!(count, 5, "member {i} (leader {leader})");
    }
}

/// `pflex cluster rotate` on a replicated MDM: the new admin token, the
/// revoked join key and the new signing key are committed like any change,
/// so the leader elected after the rotating one was killed refuses the old
/// token and the join key, takes the new token, and sends an SDS both token
/// public keys (any leader signs, every SDS verifies, no re-enrollment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_holds_on_the_next_leader() {
    let mut cluster = MdmCluster::start(3).await;
    let old_admin = cluster.admin();
    let anonymous = MdmClient::new(&cluster.urls(), None).unwrap();
    let sds = anonymous.register(&fake_sds("sds-a", "fs1", "default", 64)).await.unwrap();
    let keys_before = sds.sds_keys.as_ref().unwrap().token_public_keys.clone();
    assert_eq!(keys_before.len(), 1);

    let rotated = old_admin.cluster_rotate().await.unwrap();
    assert_eq!(rotated.signing_generation, 1);
    assert!(rotated.join_key_disabled);
    cluster.use_admin_token(&rotated.admin_token);
    let new_admin = cluster.admin();
    assert_eq!(old_admin.sds_list().await.unwrap_err().status(), Some(401));
    assert_eq!(new_admin.sds_list().await.unwrap().len(), 1);

    let leader = cluster.wait_for_leader().await;
    cluster.kill(leader);
    wait_for("another leader", Duration::from_secs(30), || async {
        cluster.leader().await.is_some_and(|l| l != leader)
    })
    .await;

    assert_eq!(old_admin.sds_list().await.unwrap_err().status(), Some(401));
    assert_eq!(new_admin.sds_list().await.unwrap().len(), 1);
    let joined = anonymous.register(&fake_sds("sds-b", "fs2", "default", 64)).await;
    assert_eq!(joined.unwrap_err().status(), Some(401), "the revoked join key registered a node");
    let sds_client =
        MdmClient::new(&cluster.urls(), None).unwrap().with_credential(&sds.credential);
    let keys = heartbeat_token_keys(&sds_client, sds.node_id).await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(keys[0], keys_before[0], "the old key is still accepted");
}
