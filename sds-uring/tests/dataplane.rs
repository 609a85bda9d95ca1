//! Data-plane acceptance tests: two real `sds` processes and a real `mdm`
//! on loopback, driven by a test-side SDC with real tokens.

mod common;

use common::{metric_sum, model_crc, pattern, sealed, send_raw, start_cluster, VolumeSession};
use pflex_proto::frame::{flags, FrameHeader, Op, Status};
use pflex_proto::token::{AccessMode, ClusterSecret, IoToken, SessionKey};
use pflex_proto::{unix_now, CHUNK_SIZE};
use pflex_testkit::cluster::Cluster;

const VOLUME_SIZE: u64 = 64 << 20;
const CHUNK: usize = CHUNK_SIZE as usize;

/// Starts a cluster with one mapped volume and an authenticated session.
async fn cluster_with_volume() -> (Cluster, VolumeSession, pflex_mdm_client::MdmClient) {
    let cluster = start_cluster(2).await;
    let sdc = cluster.register_sdc("sdc-test").await.client;
    let volume_id = cluster.create_mapped_volume("vol1", VOLUME_SIZE, "sdc-test").await;
    let session = VolumeSession::open(&sdc, volume_id, AccessMode::ReadWrite).await;
    assert_ne!(session.primary_of(0), session.secondary_of(0));
    session.auth_all().await;
    (cluster, session, sdc)
}

/// A 4 KiB replica write at offset 0 of `chunk`, as its primary would
/// forward it to the secondary, numbered `seq` (seal it with the peer key).
fn forward_from_primary(s: &VolumeSession, chunk: u64, seq: u64) -> FrameHeader {
    FrameHeader {
        op: Op::Write as u8,
        flags: flags::REPLICA,
        volume_id: s.volume_id,
        chunk_index: chunk,
        offset: 0,
        length: 4096,
        epoch: s.map.epoch,
        token_id: s.primary_of(chunk),
        seq,
        ..Default::default()
    }
}

/// The wall clock in nanoseconds: at least any replication number sent so far.
fn now_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// Both copies of `chunk` report the model's CRC.
async fn assert_replicas_match(cluster: &Cluster, s: &VolumeSession, chunk: u64, model: &[u8]) {
    let primary = cluster.sds_by_node_id(s.primary_of(chunk)).await;
    let secondary = cluster.sds_by_node_id(s.secondary_of(chunk)).await;
    let on_primary = cluster.checksum(primary, s.volume_id, chunk).await;
    let on_secondary = cluster.checksum(secondary, s.volume_id, chunk).await;
    assert_eq!(on_primary.crc32, model_crc(model), "primary copy of chunk {chunk}");
    assert_eq!(on_secondary.crc32, model_crc(model), "secondary copy of chunk {chunk}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_read_back_from_both_replicas() {
    let (cluster, s, _sdc) = cluster_with_volume().await;
    let mut models = vec![vec![0u8; CHUNK]; 4];
    // Aligned, unaligned, chunk-spanning-within-chunk and whole-chunk writes.
    let writes: [(u64, u32, usize); 6] = [
        (0, 0, 4096),
        (0, 4096 * 3, 65536),
        (1, 511, 10_000),
        (2, 0, CHUNK),
        (3, (CHUNK - 100) as u32, 100),
        (1, 600_000, 4096),
    ];
    for (i, (chunk, offset, len)) in writes.into_iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        assert_eq!(s.write(chunk, offset, &data).await, Status::Ok, "write {i}");
        models[chunk as usize][offset as usize..offset as usize + len].copy_from_slice(&data);
    }
    for (chunk, model) in models.iter().enumerate() {
        let (status, data) = s.read(chunk as u64, 0, CHUNK as u32).await;
        assert_eq!(status, Status::Ok);
        assert!(data == *model, "chunk {chunk} reads back what was written");
        assert_replicas_match(&cluster, &s, chunk as u64, model).await;
    }

    // FUA write, WRITE_ZEROES and TRIM reach both copies too.
    let mut fua = s.header(Op::Write, 0, 8192, 4096);
    fua.flags = flags::FUA;
    let data = pattern(99, 4096);
    assert_eq!(s.call(s.primary_of(0), fua, &data).await.status(), Status::Ok);
    models[0][8192..12288].copy_from_slice(&data);
    let zeroes = s.header(Op::WriteZeroes, 1, 0, 8192);
    assert_eq!(s.call(s.primary_of(1), zeroes, &[]).await.status(), Status::Ok);
    models[1][..8192].fill(0);
    let trim = s.header(Op::Trim, 2, 0, CHUNK as u32);
    assert_eq!(s.call(s.primary_of(2), trim, &[]).await.status(), Status::Ok);
    models[2].fill(0);
    for (chunk, model) in models.iter().enumerate() {
        assert_replicas_match(&cluster, &s, chunk as u64, model).await;
    }

    // FLUSH, addressed to every primary of the volume.
    let mut primaries: Vec<u64> = s.map.pgs.iter().map(|pg| pg.primary).collect();
    primaries.sort();
    primaries.dedup();
    for node in primaries {
        let flush = s.header(Op::Flush, 0, 0, 0);
        assert_eq!(s.call(node, flush, &[]).await.status(), Status::Ok, "flush on {node}");
    }

    // ALLOCATION: chunks 0, 1, 3 hold data (chunk 2 was trimmed whole).
    let alloc = s.header(Op::Allocation, 0, 0, 8);
    let reply = s.call(s.primary_of(0), alloc, &[]).await;
    assert_eq!(reply.status(), Status::Ok);
    assert_eq!(reply.payload.len(), 1);
    let primary0 = s.primary_of(0);
    let mut expected = 0u8;
    for (chunk, model) in models.iter().enumerate() {
        let held_here =
            s.primary_of(chunk as u64) == primary0 || s.secondary_of(chunk as u64) == primary0;
        if held_here && model.iter().any(|b| *b != 0) {
            expected |= 1 << chunk;
        }
    }
    assert_eq!(reply.payload[0] & 0x0f, expected, "allocation bitmap");

    // A chunk's secondary refuses to act as its primary.
    let wrong = s.header(Op::Write, 0, 0, 4096);
    let reply = s.call(s.secondary_of(0), wrong, &pattern(5, 4096)).await;
    assert_eq!(reply.status(), Status::NotPrimary);
    assert_replicas_match(&cluster, &s, 0, &models[0]).await;

    // Off the IO path: heartbeats and batched IO acknowledgements reach the MDM.
    let primary = cluster.sds_by_node_id(s.primary_of(0)).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let sds = cluster.metrics(primary).await;
        let mdm = cluster.admin().metrics_text().await.unwrap_or_default();
        let sent = metric_sum(&sds, "pflex_sds_ack_batches_total");
        let recorded = metric_sum(&mdm, "pflex_mdm_token_acks_total");
        let heartbeats = metric_sum(&sds, "pflex_sds_heartbeats_total");
        if sent >= 1 && recorded >= 1 && heartbeats >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "acks sent {sent}, recorded {recorded}, heartbeats {heartbeats}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_to_overlapping_ranges_leave_identical_replicas() {
    let (cluster, s, _sdc) = cluster_with_volume().await;
    let s = std::sync::Arc::new(s);
    let mut writers = Vec::new();
    for writer in 0..8u64 {
        let s = s.clone();
        writers.push(tokio::spawn(async move {
            let mut x = writer * 7919 + 1;
            for i in 0..60u64 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let chunk = (x >> 60) % 2;
                let offset = ((x >> 20) % (CHUNK as u64 - 70_000)) as u32;
                let offset = if i % 3 == 0 { offset & !4095 } else { offset };
                let len = 1 + ((x >> 8) % 65_536) as usize;
                let data = pattern(writer * 1000 + i, len);
                // Writers share one token, like the NBD connections of one
                // SDC: an overlapping write of theirs that was numbered later
                // but applied first makes this one `Superseded`, and it goes
                // again with a fresh number, as the SDC does.
                let mut status = s.write(chunk, offset, &data).await;
                for _ in 0..100 {
                    if status != Status::Superseded {
                        break;
                    }
                    status = s.write(chunk, offset, &data).await;
                }
                assert_eq!(status, Status::Ok);
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    for chunk in 0..2 {
        let primary = cluster.sds_by_node_id(s.primary_of(chunk)).await;
        let secondary = cluster.sds_by_node_id(s.secondary_of(chunk)).await;
        let a = cluster.checksum(primary, s.volume_id, chunk).await;
        let b = cluster.checksum(secondary, s.volume_id, chunk).await;
        assert!(a.allocated && b.allocated);
        assert_eq!(a.crc32, b.crc32, "chunk {chunk}: replicas differ");
        let (status, data) = s.read(chunk, 0, CHUNK as u32).await;
        assert_eq!(status, Status::Ok);
        assert_eq!(pflex_proto::frame::crc32(&data), a.crc32);
    }
}

/// Signs a token with `secret`'s token key for the test SDC, with its
/// session key at every SDS of the map.
fn token(
    secret: &ClusterSecret,
    s: &VolumeSession,
    volume_id: u64,
    mode: AccessMode,
    expires_at: u64,
) -> (pflex_proto::token::SignedToken, std::collections::HashMap<u64, SessionKey>) {
    let token = IoToken {
        token_id: u64::from_le_bytes(pflex_proto::random_bytes()),
        volume_id,
        sdc_id: s.token.token.sdc_id,
        mode,
        mapping_gen: s.map.mapping_gen,
        expires_at,
    };
    let signed = secret.token_signer().sign(&token);
    let keys =
        s.map.nodes.iter().map(|n| (n.id, secret.node_key(n.id).session_key(&signed))).collect();
    (signed, keys)
}

/// An on-path attacker changes payload bytes while keeping their CRC32 (it
/// is linear): a write so changed is refused and writes nothing, and a read
/// reply so changed is not taken; the MAC covers every payload byte, and
/// replies carry one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payloads_changed_in_transit_are_refused_in_both_directions() {
    use pflex_testkit::tamper::{Tamper, TamperingRelay};
    let (cluster, s, _sdc) = cluster_with_volume().await;
    let chunk = 0;
    let primary_id = s.primary_of(chunk);
    let primary = cluster.sds_by_node_id(primary_id).await;
    let base = pattern(7, 8192);
    assert_eq!(s.write(chunk, 0, &base).await, Status::Ok);
    // The same token, reaching the primary through the attacker.
    let through = |addr: std::net::SocketAddr| {
        let mut map = s.map.clone();
        for node in map.nodes.iter_mut().filter(|n| n.id == primary_id) {
            node.host = addr.ip().to_string();
            node.data_port = addr.port();
        }
        VolumeSession::with_token(map, s.token.clone(), s.keys.clone())
    };

    let relay = TamperingRelay::start(primary.data_addr(), Tamper::WriteRequests).await;
    let victim = through(relay.addr);
    let evil = pattern(8, 8192);
    assert_eq!(victim.write(chunk, 0, &evil).await, Status::BadMac);
    assert_eq!(relay.tampered(), 1, "the relay changed the write");
    let (status, data) = s.read(chunk, 0, 8192).await;
    assert_eq!((status, data == base), (Status::Ok, true), "nothing was written");
    let mut model = vec![0u8; CHUNK];
    model[..8192].copy_from_slice(&base);
    assert_replicas_match(&cluster, &s, chunk, &model).await;

    let relay = TamperingRelay::start(primary.data_addr(), Tamper::ReadReplies).await;
    let reader = through(relay.addr);
    let header = reader.header(Op::Read, chunk, 0, 8192);
    let outcome = reader.client(primary_id).call(header, reader.key(primary_id), &[]).await;
    assert_eq!(relay.tampered(), 1, "the relay changed the reply");
    assert_eq!(
        outcome.map(|r| r.status()),
        Err(pflex_dataplane::ClientError::BadReplyMac(Status::Ok)),
        "a changed read reply was taken"
    );
}

/// Idle connections on a data port (a local user, a port scan) cannot lock
/// out the MDM's probe, peers or clients: past `--max-connections` a
/// connection that never sent a frame is closed to make room. The node may
/// hold fewer files than the flood, so without that rule it would stop
/// accepting.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_cannot_lock_out_the_probe_or_clients() {
    pflex_dataplane::runtime::raise_open_files_limit().unwrap();
    let (cluster, s, _sdc) = cluster_with_volume().await;
    let primary_id = s.primary_of(0);
    let primary = cluster.sds_by_node_id(primary_id).await;
    pflex_testkit::flood::limit_open_files(primary.pid().expect("the SDS runs"), 2048);
    let idle = pflex_testkit::flood::idle_connections(primary.data_addr(), 3000).await;
    assert_eq!(idle.len(), 3000, "the node stopped accepting connections");
    // The MDM's probe: a PING on a fresh connection.
    let probe = pflex_dataplane::DataPlaneClient::new(primary.data_addr(), 1);
    let ping = FrameHeader { op: Op::Ping as u8, ..Default::default() };
    let reply = probe.call(ping, &SessionKey([0; 32]), &[]).await.expect("probe answered");
    assert_eq!(reply.status(), Status::Ok);
    // The client, whose connections were open before the flood, goes on.
    assert_eq!(s.write(0, 0, &pattern(3, 4096)).await, Status::Ok);
    let metrics = cluster.metrics(primary).await;
    let evicted = metric_sum(&metrics, "pflex_sds_connections_evicted_total");
    assert!(evicted >= 3000 - 1024, "only {evicted} idle connections were closed");
    drop(idle);
}

/// A compromised SDS holds its registration keys: the token public key, its
/// own node key and the peer key. With them it can neither make a token
/// another SDS accepts nor use a genuine token it saw (the SDC presents it to
/// every node) against another SDS: session keys are per node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_sds_cannot_forge_tokens_or_session_keys_for_another_sds() {
    let (cluster, s, _sdc) = cluster_with_volume().await;
    let chunk = 0;
    let (primary_id, compromised) = (s.primary_of(chunk), s.secondary_of(chunk));
    let base = pattern(5, 4096);
    assert_eq!(s.write(chunk, 0, &base).await, Status::Ok);
    let evil = pattern(666, 4096);
    // Exactly what the MDM sent the compromised node at registration.
    let secret = cluster.cluster_secret();
    let node_key = secret.node_key(compromised);
    let held = [node_key.0, secret.peer_key().0, secret.token_signer().public_key().to_bytes()];

    // 1. Tokens signed with anything it holds are refused by the primary.
    for seed in held {
        let token = IoToken {
            token_id: u64::from_le_bytes(pflex_proto::random_bytes()),
            volume_id: s.volume_id,
            sdc_id: s.token.token.sdc_id,
            mode: AccessMode::ReadWrite,
            mapping_gen: s.map.mapping_gen,
            expires_at: unix_now() + 600,
        };
        let forged = pflex_proto::token::TokenSigner::from_seed(seed).sign(&token);
        let keys = s.map.nodes.iter().map(|n| (n.id, node_key.session_key(&forged))).collect();
        let session = VolumeSession::with_token(s.map.clone(), forged, keys);
        assert_eq!(session.auth(primary_id).await, Status::BadSignature);
        assert_eq!(session.write(chunk, 0, &evil).await, Status::NoToken);
    }

    // 2. The genuine token it saw, with the session key it can derive.
    let observed = s.token.clone();
    let keys = s.map.nodes.iter().map(|n| (n.id, node_key.session_key(&observed))).collect();
    let thief = VolumeSession::with_token(s.map.clone(), observed, keys);
    assert_eq!(thief.auth(primary_id).await, Status::BadMac, "AUTH under a stolen token");
    assert_eq!(thief.write(chunk, 0, &evil).await, Status::BadMac, "a write under it");
    let (status, data) = s.read(chunk, 0, 4096).await;
    assert_eq!((status, data == base), (Status::Ok, true), "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_forgery_is_refused_and_nothing_is_written() {
    let (cluster, s, sdc) = cluster_with_volume().await;
    let chunk = 0;
    let primary_id = s.primary_of(chunk);
    let primary = cluster.sds_by_node_id(primary_id).await;
    let mut model = vec![0u8; CHUNK];
    let base = pattern(1, 8192);
    assert_eq!(s.write(chunk, 0, &base).await, Status::Ok);
    model[..8192].copy_from_slice(&base);
    let evil = pattern(666, 4096);
    let secret = cluster.cluster_secret();

    // No token: an id never presented.
    let mut header = s.header(Op::Write, chunk, 0, 4096);
    header.token_id ^= 0x5555;
    assert_eq!(s.call(primary_id, header, &evil).await.status(), Status::NoToken);

    // Forged signature: a token signed with another secret.
    let (forged, forged_key) =
        token(&ClusterSecret::generate(), &s, s.volume_id, AccessMode::ReadWrite, unix_now() + 600);
    let forged_session = VolumeSession::with_token(s.map.clone(), forged, forged_key);
    assert_eq!(forged_session.auth(primary_id).await, Status::BadSignature);
    assert_eq!(forged_session.write(chunk, 0, &evil).await, Status::NoToken);

    // Expired token (properly signed): refused at AUTH ...
    let (expired, expired_key) =
        token(&secret, &s, s.volume_id, AccessMode::ReadWrite, unix_now() - 10);
    let expired_session = VolumeSession::with_token(s.map.clone(), expired, expired_key);
    assert_eq!(expired_session.auth(primary_id).await, Status::Expired);
    assert_eq!(expired_session.write(chunk, 0, &evil).await, Status::NoToken);
    // ... and on use once it expires after AUTH.
    let expires_at = unix_now() + 2;
    let (short, short_key) = token(&secret, &s, s.volume_id, AccessMode::ReadWrite, expires_at);
    let short_session = VolumeSession::with_token(s.map.clone(), short, short_key);
    assert_eq!(short_session.auth(primary_id).await, Status::Ok);
    while unix_now() < expires_at {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(short_session.write(chunk, 0, &evil).await, Status::Expired);

    // A real token for another volume, used on this one.
    let other_id = cluster.create_mapped_volume("vol2", VOLUME_SIZE, "sdc-test").await;
    let other = VolumeSession::open(&sdc, other_id, AccessMode::ReadWrite).await;
    other.auth_all().await;
    let mut header = s.header(Op::Write, chunk, 0, 4096);
    header.token_id = other.token.token.token_id;
    let reply = other.client(primary_id).call(header, other.key(primary_id), &evil).await.unwrap();
    assert_eq!(reply.status(), Status::WrongVolume);

    // Read-only token: reads pass, writes, TRIM and WRITE_ZEROES do not.
    let (ro, ro_key) = token(&secret, &s, s.volume_id, AccessMode::ReadOnly, unix_now() + 600);
    let ro_session = VolumeSession::with_token(s.map.clone(), ro, ro_key);
    assert_eq!(ro_session.auth(primary_id).await, Status::Ok);
    assert_eq!(ro_session.write(chunk, 0, &evil).await, Status::ReadOnly);
    let trim = ro_session.header(Op::Trim, chunk, 0, CHUNK as u32);
    assert_eq!(ro_session.call(primary_id, trim, &[]).await.status(), Status::ReadOnly);
    let zero = ro_session.header(Op::WriteZeroes, chunk, 0, 4096);
    assert_eq!(ro_session.call(primary_id, zero, &[]).await.status(), Status::ReadOnly);
    let (status, data) = ro_session.read(chunk, 0, 8192).await;
    assert_eq!((status, data == base), (Status::Ok, true));

    // Tampered header: sealed for offset 0, sent with offset 4096.
    let header = s.header(Op::Write, chunk, 0, 4096);
    let mut raw = sealed(header, s.key(primary_id), &evil);
    raw[32..36].copy_from_slice(&4096u32.to_le_bytes());
    let reply = send_raw(primary.data_addr(), &raw, &evil).await;
    assert_eq!(reply.status, Status::BadMac as u16);
    // A MAC under the wrong key.
    let header = s.header(Op::Write, chunk, 0, 4096);
    let raw = sealed(header, &SessionKey([3; 32]), &evil);
    assert_eq!(send_raw(primary.data_addr(), &raw, &evil).await.status, Status::BadMac as u16);

    // Payload that does not match its CRC.
    let mut header = s.header(Op::Write, chunk, 0, 4096);
    header.request_id = 1;
    header.payload_crc = pflex_proto::frame::crc32(&base[..4096]);
    header.seal(s.key(primary_id), &evil);
    let status = send_raw(primary.data_addr(), &header.encode(), &evil).await.status;
    assert_eq!(status, Status::BadCrc as u16);
    // Sealed over other bytes than those sent: the MAC covers the payload.
    let header = s.header(Op::Write, chunk, 0, 4096);
    let raw = sealed(header, s.key(primary_id), &base[..4096]);
    assert_eq!(send_raw(primary.data_addr(), &raw, &evil).await.status, Status::BadMac as u16);

    // Routed by an older placement epoch; a chunk outside the volume.
    let mut header = s.header(Op::Write, chunk, 0, 4096);
    header.epoch = s.map.epoch.saturating_sub(1);
    if header.epoch < s.map.epoch {
        assert_eq!(s.call(primary_id, header, &evil).await.status(), Status::StaleEpoch);
    }
    let beyond = VOLUME_SIZE / CHUNK_SIZE + s.map.pgs.len() as u64;
    let header = s.header(Op::Write, beyond, 0, 4096);
    let target = s.primary_of(beyond);
    assert_eq!(s.call(target, header, &evil).await.status(), Status::Invalid);

    // A replication frame from someone without the peer key.
    let mut header = s.header(Op::Write, chunk, 0, 4096);
    header.flags = flags::REPLICA;
    header.token_id = s.secondary_of(chunk);
    let secondary = cluster.sds_by_node_id(s.secondary_of(chunk)).await;
    let raw = sealed(header, s.key(primary_id), &evil);
    assert_eq!(send_raw(secondary.data_addr(), &raw, &evil).await.status, Status::BadMac as u16);

    assert_replicas_match(&cluster, &s, chunk, &model).await;

    // Replay: X (seq n) then Y (seq n+1) are applied; X sent again is not.
    let x = pattern(10, 4096);
    let y = pattern(11, 4096);
    let x_raw = sealed(s.header(Op::Write, chunk, 0, 4096), s.key(primary_id), &x);
    let y_raw = sealed(s.header(Op::Write, chunk, 0, 4096), s.key(primary_id), &y);
    assert_eq!(send_raw(primary.data_addr(), &x_raw, &x).await.status, Status::Ok as u16);
    assert_eq!(send_raw(primary.data_addr(), &y_raw, &y).await.status, Status::Ok as u16);
    assert_eq!(send_raw(primary.data_addr(), &x_raw, &x).await.status, Status::Replay as u16);
    model[..4096].copy_from_slice(&y);
    assert_replicas_match(&cluster, &s, chunk, &model).await;

    // Every refusal was counted under its own status.
    let metrics = cluster.metrics(primary).await;
    for status in [
        "no_token",
        "bad_signature",
        "expired",
        "wrong_volume",
        "read_only",
        "bad_mac",
        "bad_crc",
        "replay",
        "invalid",
    ] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("pflex_sds_replies_total")
                    && l.contains(&format!("status=\"{status}\""))
            })
            .unwrap_or_else(|| panic!("no counter for {status}"));
        let count: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(count >= 1, "{status} counter is {count}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unmapping_revokes_tokens_within_a_heartbeat() {
    let (cluster, s, _sdc) = cluster_with_volume().await;
    assert_eq!(s.write(0, 0, &pattern(1, 4096)).await, Status::Ok);
    cluster
        .admin()
        .volume_unmap(&pflex_proto::api::VolumeUnmap {
            volume: "vol1".into(),
            sdc: "sdc-test".into(),
        })
        .await
        .expect("unmap");
    // Heartbeats run every second; poll until the SDS refuses.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let status = s.write(0, 0, &pattern(2, 4096)).await;
        if status == Status::Revoked {
            break;
        }
        assert_eq!(status, Status::Ok, "only Ok or Revoked expected");
        assert!(std::time::Instant::now() < deadline, "token still accepted after unmap");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_closes_only_its_own_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (cluster, s, _sdc) = cluster_with_volume().await;
    let primary = cluster.sds_by_node_id(s.primary_of(0)).await;
    // A connection with requests in flight stays up while another sends garbage.
    assert_eq!(s.write(0, 0, &pattern(1, 4096)).await, Status::Ok);
    let mut bad = tokio::net::TcpStream::connect(primary.data_addr()).await.unwrap();
    bad.write_all(&[0xee; 200]).await.unwrap();
    let mut rest = Vec::new();
    let closed =
        tokio::time::timeout(std::time::Duration::from_secs(10), bad.read_to_end(&mut rest))
            .await
            .expect("the SDS closes a connection that sends garbage");
    // Closed (EOF) or reset: either way nothing was answered.
    drop(closed);
    assert!(rest.is_empty(), "no reply to garbage");
    // A frame claiming an oversized payload is refused the same way.
    let mut huge = s.header(Op::Write, 0, 0, 0);
    huge.length = u32::MAX;
    let mut oversized = tokio::net::TcpStream::connect(primary.data_addr()).await.unwrap();
    oversized.write_all(&huge.encode()).await.unwrap();
    let mut rest = Vec::new();
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(10), oversized.read_to_end(&mut rest))
            .await
            .expect("closed");
    assert!(rest.is_empty());
    // The pooled connections of the session still work.
    let data = pattern(2, 4096);
    assert_eq!(s.write(0, 0, &data).await, Status::Ok);
    let (status, read) = s.read(0, 0, 4096).await;
    assert_eq!((status, read == data), (Status::Ok, true));
    let metrics = cluster.metrics(primary).await;
    assert!(metric_sum(&metrics, "pflex_sds_framing_errors_total") >= 2);
}

/// Write fencing: the first case of a late request. A write is read by the
/// primary but its sender gave up on it (here: it is simply delivered late,
/// on a connection of its own); the sender's retry and a newer write to an
/// overlapping range are acknowledged first. The late original must then be
/// refused as `Superseded` and change neither copy, while a write of the
/// same age to a range nothing newer touched still lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_copy_of_a_write_never_lands_after_a_newer_one() {
    let (cluster, s, _sdc) = cluster_with_volume().await;
    let chunk = 1;
    let primary = cluster.sds_by_node_id(s.primary_of(chunk)).await;
    let original = pattern(20, 8192);
    let newer = pattern(21, 4096);
    let disjoint = pattern(22, 4096);
    // Numbered in the order the SDC sent them.
    let original_header = s.header(Op::Write, chunk, 0, 8192);
    let disjoint_header = s.header(Op::Write, chunk, 65536, 4096);
    let retry_header = s.header(Op::Write, chunk, 0, 8192);
    let newer_header = s.header(Op::Write, chunk, 4096, 4096);

    let send = |header, data: &[u8]| {
        let raw = sealed(header, s.key(s.primary_of(chunk)), data);
        let data = data.to_vec();
        let addr = primary.data_addr();
        async move { send_raw(addr, &raw, &data).await.status }
    };
    assert_eq!(send(retry_header, &original).await, Status::Ok as u16, "the retry");
    assert_eq!(send(newer_header, &newer).await, Status::Ok as u16, "the newer write");
    assert_eq!(
        send(original_header, &original).await,
        Status::Superseded as u16,
        "the late original must not overwrite the newer write"
    );
    assert_eq!(send(disjoint_header, &disjoint).await, Status::Ok as u16, "an unrelated range");

    let mut model = vec![0u8; CHUNK];
    model[..8192].copy_from_slice(&original);
    model[4096..8192].copy_from_slice(&newer);
    model[65536..65536 + 4096].copy_from_slice(&disjoint);
    let (status, data) = s.read(chunk, 0, CHUNK as u32).await;
    assert_eq!(status, Status::Ok);
    assert!(data == model, "the primary holds the acknowledged history");
    assert_replicas_match(&cluster, &s, chunk, &model).await;
    let metrics = cluster.metrics(primary).await;
    assert!(metrics.contains("status=\"superseded\""), "no superseded counter:\n{metrics}");
}

/// Write fencing on the secondary: a forward the primary gave up on (its
/// reply timed out) may reach the secondary after later forwards of the same
/// blocks. Forwards are numbered under the primary's ordering lock, so the
/// secondary refuses one numbered below what it applied to those blocks, and
/// its copy keeps the newer data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_forward_never_lands_on_the_secondary_after_a_newer_one() {
    let (cluster, s, _sdc) = cluster_with_volume().await;
    let chunk = 2;
    let secondary = cluster.sds_by_node_id(s.secondary_of(chunk)).await;
    let peer_key = cluster.cluster_secret().peer_key();
    let forward = |seq: u64| forward_from_primary(&s, chunk, seq);
    // Numbers above anything the real primary used so far (its counter
    // started at its own start, in ns).
    let newer_seq = now_nanos();
    let (newer, late) = (pattern(30, 4096), pattern(31, 4096));
    let send = |seq: u64, data: &[u8]| {
        let raw = sealed(forward(seq), &peer_key, data);
        let (data, addr) = (data.to_vec(), secondary.data_addr());
        async move { send_raw(addr, &raw, &data).await.status }
    };
    assert_eq!(send(newer_seq, &newer).await, Status::Ok as u16, "the newer forward");
    assert_eq!(
        send(newer_seq - 10, &late).await,
        Status::Superseded as u16,
        "a forward numbered earlier, arriving late, must not overwrite the newer one"
    );
    let mut model = vec![0u8; CHUNK];
    model[..4096].copy_from_slice(&newer);
    assert_eq!(cluster.checksum(secondary, s.volume_id, chunk).await.crc32, model_crc(&model));
}

/// A replication frame captured before the secondary restarted is refused
/// when replayed after: the restarted node's windows start above its floor
/// (the wall clock at its start). The real primary, whose counter started
/// before that, learns the floor from the `Replay` reply and sends again
/// above it, so client writes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_frame_replayed_after_the_receiver_restarts_is_refused() {
    let (mut cluster, s, _sdc) = cluster_with_volume().await;
    let chunk = 3;
    let secondary_id = s.secondary_of(chunk);
    // A write first, so the primary's counter for the secondary exists and
    // is below the captured frame's number (which, like every real one, is
    // at most the wall clock when it was sent).
    assert_eq!(s.write(chunk, 8192, &pattern(39, 4096)).await, Status::Ok);
    let peer_key = cluster.cluster_secret().peer_key();
    let captured = forward_from_primary(&s, chunk, now_nanos());
    let old = pattern(40, 4096);
    let raw = sealed(captured, &peer_key, &old);
    let addr = cluster.sds_by_node_id(secondary_id).await.data_addr();
    assert_eq!(send_raw(addr, &raw, &old).await.status, Status::Ok as u16, "the original");

    let index = cluster.sds_index(secondary_id).await;
    cluster.restart(pflex_testkit::cluster::Component::Sds(index)).await;
    let addr = cluster.sds_by_node_id(secondary_id).await.data_addr();
    assert_eq!(
        send_raw(addr, &raw, &old).await.status,
        Status::Replay as u16,
        "a frame captured before the restart must not be accepted again"
    );
    // A client write after the restart: the primary's forward is numbered
    // below the new floor, refused, and sent again above it.
    let newer = pattern(41, 4096);
    assert_eq!(s.write(chunk, 0, &newer).await, Status::Ok, "a write after the restart");
    let mut model = vec![0u8; CHUNK];
    model[..4096].copy_from_slice(&newer);
    model[8192..12288].copy_from_slice(&pattern(39, 4096));
    assert_replicas_match(&cluster, &s, chunk, &model).await;
}
