//! A replicated MDM over TLS: each member proves who it is with its member
//! certificate from the cluster CA, and Raft messages from anyone else, or
//! from a member speaking as another, never reach the consensus engine.
//!
//! The forged message is an append from the leader's id at a much higher
//! term: a member that took it would follow the forger from then on, at
//! that term (which the test would see). A member removed from the cluster
//! is refused the same way, with its own certificate and the right key.

use std::path::Path;
use std::time::Duration;

use openraft::Vote;
use pflex_proto::api::VolumeCreate;
use pflex_testkit::cluster::fake_sds;
use pflex_testkit::mdm_cluster::MdmCluster;
use pflex_testkit::wait_for;

/// An HTTPS client presenting the certificate in `dir` (if it holds one).
fn client_with(dir: &Path) -> reqwest::Client {
    let config = pflex_tls::client_config(dir).unwrap();
    reqwest::Client::builder()
        .use_preconfigured_tls((*config).clone())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// Posts `message` to `url` over a connection presenting the certificate
/// in `dir`, with the peer key when one is given.
async fn post_raft(
    dir: &Path,
    url: &str,
    key: Option<&str>,
    message: &serde_json::Value,
) -> reqwest::Response {
    let request = client_with(dir).post(url).json(message);
    let request = match key {
        Some(key) => request.header(pflex_mdm::raft::PEER_KEY_HEADER, key),
        None => request,
    };
    request.send().await.unwrap()
}

/// Waits until member `member` has applied what member `leader` has.
async fn catch_up(cluster: &MdmCluster, leader: usize, member: usize, what: &str) {
    let leader_applied =
        cluster.member_client(leader).mdm_status().await.unwrap().applied_index.unwrap();
    wait_for(what, Duration::from_secs(30), || async {
        let status = cluster.member_client(member).mdm_status().await;
        status.is_ok_and(|s| s.applied_index.is_some_and(|a| a >= leader_applied))
    })
    .await;
}

/// An empty append (a leader's heartbeat) from `leader` at `term`.
fn append_request(leader: u64, term: u64) -> serde_json::Value {
    let request = openraft::raft::AppendEntriesRequest::<pflex_mdm::raft::TypeConfig> {
        vote: Vote::new_committed(term, leader),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    serde_json::to_value(request).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_members_take_raft_messages_only_from_the_member_they_name() {
    let mut cluster = MdmCluster::start_tls(3).await;
    let admin = cluster.admin();
    let create = |name: &str| VolumeCreate {
        name: name.into(),
        size_bytes: 8 << 20,
        pool: None,
        thick: false,
    };
    let anonymous = pflex_mdm_client::MdmClient::new(&cluster.urls(), None).unwrap();
    for (name, fault_set) in [("sds-a", "fs1"), ("sds-b", "fs2")] {
        anonymous.register(&fake_sds(name, fault_set, "default", 64)).await.unwrap();
    }
    // The members replicate to each other with their certificates.
    admin.volume_create(&create("before")).await.unwrap();

    let leader = cluster.wait_for_leader().await;
    let follower = (0..cluster.members.len()).find(|&i| i != leader).unwrap();
    let other = (0..cluster.members.len()).find(|&i| i != leader && i != follower).unwrap();
    let leader_id = cluster.members[leader].id;
    let url = format!("{}/raft/append", cluster.members[follower].url());
    let key = pflex_mdm::raft::peer_key(&cluster.cluster_secret());
    let term_before = cluster.member_client(follower).mdm_status().await.unwrap().term;
    let forged = append_request(leader_id, term_before + 100);

    let sds = cluster.issue_certificate("sds1").unwrap();
    let other_member =
        cluster.issue_certificate(&pflex_tls::mdm_member_name(cluster.members[other].id)).unwrap();
    let no_certificate = cluster.issue_certificate("unused").unwrap();
    std::fs::remove_file(no_certificate.join(pflex_tls::NODE_CERT)).unwrap();
    std::fs::remove_file(no_certificate.join(pflex_tls::NODE_KEY)).unwrap();
    for (who, dir, reason) in [
        ("an SDS", &sds, "names no MDM member"),
        ("another member", &other_member, "speaks as member"),
        ("a caller without a certificate", &no_certificate, "none was presented"),
    ] {
        let answer = post_raft(dir, &url, Some(&key), &forged).await;
        let status = answer.status();
        let body = answer.text().await.unwrap();
        assert_eq!(status, reqwest::StatusCode::UNAUTHORIZED, "{who}: {body}");
        assert!(body.contains(reason), "{who}: {body}");
    }

    // The member itself, with the right key, is heard (and its stale append
    // answered with the follower's newer term).
    let member = cluster.issue_certificate(&pflex_tls::mdm_member_name(leader_id)).unwrap();
    let stale = append_request(leader_id, 0);
    let answer = post_raft(&member, &url, Some(&key), &stale).await;
    assert!(answer.status().is_success(), "{}", answer.text().await.unwrap());
    let verdict: serde_json::Value = answer.json().await.unwrap();
    assert!(verdict["Ok"]["HigherVote"].is_object(), "{verdict}");
    // ... but not without the key.
    let answer = post_raft(&member, &url, None, &stale).await;
    assert_eq!(answer.status(), reqwest::StatusCode::UNAUTHORIZED);

    let status = cluster.member_client(follower).mdm_status().await.unwrap();
    assert_eq!(status.term, term_before, "a refused message moved the follower's term");
    assert_eq!(status.leader_id, Some(leader_id));

    // A new member, enrolled with its own certificate, joins and catches up.
    let new = cluster.start_new_member();
    let (new_id, new_url) = (cluster.members[new].id, cluster.members[new].url());
    admin.mdm_add(new_id, &new_url).await.unwrap();
    admin.volume_create(&create("after")).await.unwrap();
    catch_up(&cluster, leader, new, "the new member to catch up").await;

    // A removed member is retired: once the follower has applied its
    // removal, a message in its name, with its own certificate and the
    // key, is refused (taken, it would make the follower follow it at its
    // term), and its id is never given again.
    let retired_id = cluster.members[other].id;
    admin.mdm_remove(retired_id).await.unwrap();
    let leader = cluster.wait_for_leader().await;
    let follower = (0..cluster.members.len()).find(|&i| i != leader && i != other).unwrap();
    catch_up(&cluster, leader, follower, "the follower to apply the removal").await;
    let url = format!("{}/raft/append", cluster.members[follower].url());
    let term_before = cluster.member_client(follower).mdm_status().await.unwrap().term;
    let answer =
        post_raft(&other_member, &url, Some(&key), &append_request(retired_id, term_before + 100))
            .await;
    let status = answer.status();
    let body = answer.text().await.unwrap();
    assert_eq!(status, reqwest::StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains(&format!("member {retired_id} was removed")), "{body}");
    let after = cluster.member_client(follower).mdm_status().await.unwrap();
    assert_eq!(after.term, term_before, "a retired member moved the follower's term");
    let again = admin.mdm_add(retired_id, &cluster.members[other].url()).await.unwrap_err();
    assert!(again.to_string().contains("never given again"), "{again}");
}
