//! Test fixture: a real `mdm` process on loopback, plus helpers that join
//! fake SDS/SDC nodes over HTTP exactly as real ones do.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pflex_mdm_client::MdmClient;
use pflex_proto::api::{DeviceInfo, NodeType, RegisterRequest, RegisterResponse};

pub const JOIN_KEY: &str = "test-join-key-0123456789";

/// Short health thresholds for tests that watch nodes go STALE/FAILED.
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

/// A running MDM; killed (by PID) when dropped.
pub struct Mdm {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub url: String,
    pub admin_token: String,
    timing: Timing,
}

use pflex_testkit::free_port;

impl Mdm {
    pub fn start() -> Mdm {
        Self::start_with(Timing::default())
    }

    pub fn start_with(timing: Timing) -> Mdm {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("join_key"), format!("{JOIN_KEY}\n")).unwrap();
        let port = free_port();
        let mut mdm = Mdm {
            child: None,
            dir,
            port,
            url: format!("http://127.0.0.1:{port}"),
            admin_token: String::new(),
            timing,
        };
        mdm.spawn();
        mdm
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("mdm")
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("mdm.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mdm"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--join-key-file")
            .arg(self.dir.path().join("join_key"))
            .arg("--heartbeat-interval-secs")
            .arg(self.timing.heartbeat.to_string())
            .arg("--stale-after-secs")
            .arg(self.timing.stale.to_string())
            .arg("--failed-after-secs")
            .arg(self.timing.failed.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn mdm");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let token_path = self.data_dir().join("admin_token");
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("mdm exited early ({status}): {}", self.log());
            }
            if let Ok(token) = std::fs::read_to_string(&token_path) {
                self.admin_token = token.trim().to_string();
                let ok =
                    blocking_get_status(&format!("{}/health/status", self.url), &self.admin_token);
                if ok == Some(200) {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "mdm not ready: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mdm.log")).unwrap_or_default()
    }

    /// Stops the process (SIGKILL) and starts it again on the same data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn admin(&self) -> MdmClient {
        MdmClient::new(&self.url, Some(self.admin_token.clone())).unwrap()
    }

    pub fn anonymous(&self) -> MdmClient {
        MdmClient::new(&self.url, None).unwrap()
    }

    /// Every row of every table, read through a second connection.
    pub fn dump(&self) -> String {
        let conn = rusqlite::Connection::open_with_flags(
            self.data_dir().join("powerflex.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        pflex_mdm::db::dump(&conn).unwrap()
    }

    pub fn cluster_secret(&self) -> pflex_proto::token::ClusterSecret {
        let text = std::fs::read_to_string(self.data_dir().join("cluster_secret")).unwrap();
        pflex_proto::token::ClusterSecret::from_hex(&text).unwrap()
    }

    pub async fn register_sds(
        &self,
        name: &str,
        fault_set: &str,
        pool: &str,
        capacity_gib: u64,
    ) -> Node {
        let request = RegisterRequest {
            join_key: JOIN_KEY.into(),
            node_type: NodeType::Sds,
            name: name.into(),
            host: "127.0.0.1".into(),
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
        };
        self.register(request).await
    }

    pub async fn register_sdc(&self, name: &str) -> Node {
        self.register(RegisterRequest {
            join_key: JOIN_KEY.into(),
            node_type: NodeType::Sdc,
            name: name.into(),
            host: "127.0.0.1".into(),
            control_port: 8003,
            mgmt_port: 8004,
            data_port: 10809,
            fault_set: None,
            pool: None,
            devices: vec![],
        })
        .await
    }

    pub async fn register_mgmt(&self, name: &str) -> Node {
        self.register(RegisterRequest {
            join_key: JOIN_KEY.into(),
            node_type: NodeType::Mgmt,
            name: name.into(),
            host: "127.0.0.1".into(),
            control_port: 0,
            mgmt_port: 5000,
            data_port: 0,
            fault_set: None,
            pool: None,
            devices: vec![],
        })
        .await
    }

    pub async fn register(&self, request: RegisterRequest) -> Node {
        let reply = self.anonymous().register(&request).await.expect("register");
        Node { client: self.anonymous().with_credential(reply.credential.clone()), reply }
    }
}

impl Drop for Mdm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A registered fake component.
pub struct Node {
    pub reply: RegisterResponse,
    pub client: MdmClient,
}

impl Node {
    pub fn id(&self) -> u64 {
        self.reply.node_id
    }
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

/// Status of a GET with a bearer token, over a plain socket (readiness
/// polling from synchronous code); `None` when not reachable yet.
fn blocking_get_status(url: &str, token: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let url = url.strip_prefix("http://")?;
    let (host, path) = url.split_once('/')?;
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
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
