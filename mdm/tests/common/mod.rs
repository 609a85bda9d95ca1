//! What the MDM's tests add to the shared cluster harness
//! ([`pflex_testkit::cluster`]): an MDM alone, whose tests play the SDS and
//! SDC nodes themselves over HTTP; its database read through a second
//! connection; raw requests; a small PRNG.
#![allow(dead_code)]

use pflex_testkit::cluster::{Cluster, ClusterSpec, MdmOptions};

/// Health thresholds of the MDM, in seconds.
pub struct Timing {
    pub heartbeat: u64,
    pub stale: u64,
    pub failed: u64,
}

impl Default for Timing {
    /// Long enough that nothing goes stale during a test.
    fn default() -> Self {
        Timing { heartbeat: 3600, stale: 7200, failed: 14400 }
    }
}

/// An MDM alone, with thresholds no test reaches.
pub async fn start_mdm() -> Cluster {
    start_mdm_with(Timing::default()).await
}

/// An MDM alone, with short thresholds for tests that watch nodes go
/// STALE/FAILED.
pub async fn start_mdm_with(timing: Timing) -> Cluster {
    let mdm = MdmOptions {
        heartbeat_interval_secs: timing.heartbeat,
        stale_after_secs: Some(timing.stale),
        failed_after_secs: Some(timing.failed),
        ..MdmOptions::default()
    };
    Cluster::start(ClusterSpec { mdm, ..ClusterSpec::default() }).await
}

/// Every row of every table, read through a second connection.
/// Every table but the audit log (refusals are audited on purpose), so a
/// test can check that a refused request changed nothing else.
pub fn dump(mdm: &Cluster) -> String {
    let all = dump_all(mdm);
    let start = all.find("== audit_log\n").expect("the audit log table");
    let end = all[start + 1..].find("== ").map_or(all.len(), |i| start + 1 + i);
    format!("{}{}", &all[..start], &all[end..])
}

/// Every table, the audit log included.
pub fn dump_all(mdm: &Cluster) -> String {
    let conn = rusqlite::Connection::open_with_flags(
        mdm.mdm_dir().join("powerflex.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    pflex_mdm::db::dump(&conn).unwrap()
}

/// Tiny deterministic PRNG (xorshift64*) for random topologies.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A raw request: (status, body as JSON or null).
pub async fn raw(
    method: &str,
    url: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let client = reqwest::Client::new();
    let mut request = client.request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), url);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    if let Some(body) = body {
        request = request.body(body.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
}
