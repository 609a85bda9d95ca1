//! Fencing by MDM term, against a real SDS: a heartbeat answer given in an
//! older term than one the node has already heard (a deposed leader's
//! answer arriving late) is not acted on. The answers reach the SDS through
//! a relay that stamps the term a replicated MDM would and can deliver an
//! old answer late; the SDS's next heartbeat shows what it applied.

mod common;

use std::time::Duration;

use common::start_cluster;
use pflex_testkit::cluster::NodeOverrides;
use pflex_testkit::term_relay::TermRelay;
use pflex_testkit::wait_for;

fn cursor(message: &serde_json::Value, field: &str) -> Option<u64> {
    message.get(field).and_then(serde_json::Value::as_u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_sds_ignores_a_heartbeat_answer_from_an_older_term() {
    let mut cluster = start_cluster(2).await;
    let relay = TermRelay::start(&cluster.mdm_url()).await;
    relay.set_term(5);
    cluster.add_sds(NodeOverrides { mdm_url: Some(relay.url()), ..NodeOverrides::default() }).await;
    wait_for("two heartbeats answered in term 5", Duration::from_secs(30), || async {
        relay.answers().len() >= 2
    })
    .await;
    let old = relay.answers().last().cloned().unwrap();
    let old_cursor = cursor(&old, "volumes_cursor").expect("answers carry a volumes cursor");

    // A new leader is elected (term 6) and the volumes change under it.
    relay.set_term(6);
    cluster
        .admin()
        .volume_create(&pflex_proto::api::VolumeCreate {
            name: "vol-term-6".into(),
            size_bytes: 64 << 20,
            pool: None,
            thick: false,
        })
        .await
        .unwrap();
    wait_for("the SDS to apply term 6's answer", Duration::from_secs(30), || async {
        relay.requests().iter().any(|r| cursor(r, "volumes_since") > Some(old_cursor))
    })
    .await;
    let new_cursor = relay.requests().iter().filter_map(|r| cursor(r, "volumes_since")).max();
    assert!(
        relay
            .answers()
            .iter()
            .any(|a| a["mdm_term"] == 6 && cursor(a, "volumes_cursor") == new_cursor),
        "the newer cursor came in term 6"
    );

    // The deposed leader's answer (term 5, the old cursor) arrives late.
    let sent_before = relay.requests().len();
    relay.deliver_late(old);
    wait_for("the late answer and one more heartbeat", Duration::from_secs(30), || async {
        relay.late_pending() == 0 && relay.requests().len() >= sent_before + 2
    })
    .await;
    let after_late = relay.requests()[sent_before + 1].clone();
    assert_eq!(
        cursor(&after_late, "volumes_since"),
        new_cursor,
        "the SDS acted on a term-5 answer after hearing term 6 (its volume cursor went back)"
    );
}
