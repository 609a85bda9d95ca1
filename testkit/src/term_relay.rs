//! An HTTP relay between a node and its MDM that plays a replicated MDM's
//! leader changes: it stamps each heartbeat answer with the Raft term the
//! test sets, keeps the answers, and can deliver an old one late, as a
//! deposed leader's answer still on the wire would arrive. What the node
//! sends next shows whether it acted on that answer.
//!
//! Plain HTTP/1.1 with `Content-Length` bodies (what every pflex client
//! sends); requests are forwarded to the real MDM unchanged.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const HEARTBEAT_PATH: &str = "/health/heartbeat";

#[derive(Default)]
struct RelayState {
    term: u64,
    /// Heartbeat answers as delivered (after stamping), oldest first.
    answers: Vec<serde_json::Value>,
    /// Heartbeat requests as received, oldest first.
    requests: Vec<serde_json::Value>,
    /// Answers the next heartbeats get instead of the MDM's.
    late: Vec<serde_json::Value>,
}

/// The relay; stops when dropped.
pub struct TermRelay {
    url: String,
    state: Arc<Mutex<RelayState>>,
    task: tokio::task::JoinHandle<()>,
}

impl TermRelay {
    /// Relays to the MDM at `target` (`http://host:port`), stamping term 1.
    pub async fn start(target: &str) -> TermRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(RelayState { term: 1, ..RelayState::default() }));
        let (target, shared) = (target.trim_end_matches('/').to_string(), state.clone());
        let task = tokio::spawn(async move {
            let client = reqwest::Client::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (client, target, state) = (client.clone(), target.clone(), shared.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, &client, &target, &state).await;
                });
            }
        });
        TermRelay { url, state, task }
    }

    /// The URL a node is given as its MDM.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    fn with<T>(&self, f: impl FnOnce(&mut RelayState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Answers from now on carry `term` (a new leader was elected).
    pub fn set_term(&self, term: u64) {
        self.with(|s| s.term = term);
    }

    /// Heartbeat answers delivered so far.
    pub fn answers(&self) -> Vec<serde_json::Value> {
        self.with(|s| s.answers.clone())
    }

    /// Heartbeat requests received so far.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.with(|s| s.requests.clone())
    }

    /// The next heartbeat is answered with `answer` instead of the MDM's.
    pub fn deliver_late(&self, answer: serde_json::Value) {
        self.with(|s| s.late.push(answer));
    }

    /// Late answers not delivered yet.
    pub fn late_pending(&self) -> usize {
        self.with(|s| s.late.len())
    }
}

impl Drop for TermRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves one connection, request after request.
async fn serve(
    stream: TcpStream,
    client: &reqwest::Client,
    target: &str,
    state: &Mutex<RelayState>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut request_line = String::new();
        if read.read_line(&mut request_line).await? == 0 {
            return Ok(());
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) =
            (parts.next().unwrap_or("GET").to_string(), parts.next().unwrap_or("/").to_string());
        let mut headers = Vec::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            read.read_line(&mut line).await?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_string());
                if name == "content-length" {
                    length = value.parse().unwrap_or(0);
                }
                headers.push((name, value));
            }
        }
        let mut body = vec![0u8; length];
        read.read_exact(&mut body).await?;
        let (status, content_type, answer) =
            relay_one(client, target, state, &method, &path, &headers, body).await;
        let head = format!(
            "HTTP/1.1 {status} Relayed\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
            answer.len()
        );
        write.write_all(head.as_bytes()).await?;
        write.write_all(&answer).await?;
    }
}

async fn relay_one(
    client: &reqwest::Client,
    target: &str,
    state: &Mutex<RelayState>,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> (u16, String, Vec<u8>) {
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let heartbeat = path == HEARTBEAT_PATH;
    if heartbeat {
        if let Ok(request) = serde_json::from_slice(&body) {
            lock().requests.push(request);
        }
        let late = {
            let mut s = lock();
            (!s.late.is_empty()).then(|| s.late.remove(0))
        };
        if let Some(late) = late {
            return (200, "application/json".into(), serde_json::to_vec(&late).unwrap());
        }
    }
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
    let mut forward = client.request(method, format!("{target}{path}")).body(body);
    for (name, value) in headers {
        if matches!(name.as_str(), "authorization" | "content-type" | "accept") {
            forward = forward.header(name.as_str(), value.as_str());
        }
    }
    let Ok(response) = forward.send().await else {
        return (502, "text/plain".into(), b"the MDM cannot be reached".to_vec());
    };
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    let mut answer = response.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
    if heartbeat && status == 200 {
        if let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(&answer) {
            let mut s = lock();
            value["mdm_term"] = s.term.into();
            answer = serde_json::to_vec(&value).unwrap();
            s.answers.push(value);
        }
    }
    (status, content_type, answer)
}
