//! A small NBD client for `pflex verify`: fixed-newstyle handshake with
//! `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME` on servers that do
//! not know it), simple replies only, and pipelined `NBD_CMD_READ`,
//! `WRITE`, `FLUSH` and `DISC` on one TCP connection.
//!
//! Requests are sent under a lock, one after the other; a reader task
//! matches replies to requests by handle, so any number may be in flight.
//! When the connection breaks, every request in flight (and every later
//! one) fails with [`NbdError::Disconnected`]; the caller reconnects with a
//! new [`Client`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const INFO_EXPORT: u16 = 0;

/// Transmission flags.
const TFLAG_READ_ONLY: u16 = 1 << 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

/// Longest a connect plus handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `nbd://host[:port]/export` (port 10809 when not given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub host: String,
    pub port: u16,
    pub export: String,
}

impl NbdUri {
    pub fn parse(uri: &str) -> Result<NbdUri> {
        let rest = uri
            .strip_prefix("nbd://")
            .ok_or_else(|| anyhow::anyhow!("{uri:?} is not an nbd://host[:port]/export URI"))?;
        let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| anyhow::anyhow!("{uri:?}: unclosed [ in the host"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            bail!("{uri:?} names no host");
        }
        let port = match port {
            Some(p) => p.parse().with_context(|| format!("{uri:?}: bad port {p:?}"))?,
            None => 10809,
        };
        Ok(NbdUri { host: host.to_string(), port, export: export.to_string() })
    }
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "nbd://[{}]:{}/{}", self.host, self.port, self.export)
        } else {
            write!(f, "nbd://{}:{}/{}", self.host, self.port, self.export)
        }
    }
}

/// Why a request did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdError {
    /// The server answered with this errno: the request is finished.
    Server(u32),
    /// The connection is gone: the request may or may not have been carried out.
    Disconnected(String),
}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdError::Server(errno) => write!(f, "server replied with error {errno}"),
            NbdError::Disconnected(why) => write!(f, "connection lost: {why}"),
        }
    }
}

impl std::error::Error for NbdError {}

struct Pending {
    read_len: usize,
    tx: oneshot::Sender<Result<Vec<u8>, NbdError>>,
}

#[derive(Default)]
struct Table {
    next_handle: u64,
    pending: HashMap<u64, Pending>,
    /// Set once the connection broke; every request fails from then on.
    dead: Option<String>,
}

impl Table {
    fn fail_all(&mut self, why: &str) {
        if self.dead.is_none() {
            self.dead = Some(why.to_string());
        }
        for (_, p) in self.pending.drain() {
            let _ = p.tx.send(Err(NbdError::Disconnected(why.to_string())));
        }
    }
}

/// One NBD connection in the transmission phase.
pub struct Client {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    table: Arc<Mutex<Table>>,
    reader: tokio::task::JoinHandle<()>,
    size: u64,
    flags: u16,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn lock(table: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    // A panic while holding the lock leaves a consistent table.
    table.lock().unwrap_or_else(|e| e.into_inner())
}

impl Client {
    /// Connects to `uri` and negotiates its export.
    pub async fn connect(uri: &NbdUri) -> Result<Client> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, Self::connect_inner(uri))
            .await
            .map_err(|_| anyhow::anyhow!("NBD handshake with {uri} timed out"))?
            .with_context(|| format!("connecting to {uri}"))
    }

    async fn connect_inner(uri: &NbdUri) -> Result<Client> {
        let mut s = TcpStream::connect((uri.host.as_str(), uri.port)).await?;
        s.set_nodelay(true)?;
        let (size, flags) = handshake(&mut s, &uri.export).await?;
        let (rd, wr) = s.into_split();
        let table = Arc::new(Mutex::new(Table::default()));
        let reader =
            tokio::spawn(read_replies(BufReader::with_capacity(1 << 20, rd), table.clone()));
        Ok(Client { writer: tokio::sync::Mutex::new(wr), table, reader, size, flags })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }

    async fn request(
        &self,
        cmd: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, NbdError> {
        let (tx, rx) = oneshot::channel();
        let handle = {
            let mut t = lock(&self.table);
            if let Some(why) = &t.dead {
                return Err(NbdError::Disconnected(why.clone()));
            }
            t.next_handle += 1;
            let handle = t.next_handle;
            let read_len = if cmd == CMD_READ { len as usize } else { 0 };
            t.pending.insert(handle, Pending { read_len, tx });
            handle
        };
        let mut msg = Vec::with_capacity(28 + payload.len());
        msg.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg.extend_from_slice(&0u16.to_be_bytes());
        msg.extend_from_slice(&cmd.to_be_bytes());
        msg.extend_from_slice(&handle.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(payload);
        let sent = self.writer.lock().await.write_all(&msg).await;
        if let Err(e) = sent {
            lock(&self.table).fail_all(&format!("sending a request: {e}"));
        }
        match rx.await {
            Ok(result) => result,
            Err(_) => Err(NbdError::Disconnected("reply reader stopped".into())),
        }
    }

    /// `NBD_CMD_WRITE` of `data` at `offset`.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        let len = u32::try_from(data.len())
            .map_err(|_| NbdError::Disconnected("write larger than 4 GiB".into()))?;
        self.request(CMD_WRITE, offset, len, data).await.map(drop)
    }

    /// `NBD_CMD_READ` of `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        self.request(CMD_READ, offset, len, &[]).await
    }

    /// `NBD_CMD_FLUSH`, if the server takes it (else nothing to do).
    pub async fn flush(&self) -> Result<(), NbdError> {
        if self.flags & TFLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(CMD_FLUSH, 0, 0, &[]).await.map(drop)
    }

    /// `NBD_CMD_DISC` (no reply), then closes the connection.
    pub async fn disconnect(self) {
        let mut msg = Vec::with_capacity(28);
        msg.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg.extend_from_slice(&0u16.to_be_bytes());
        msg.extend_from_slice(&CMD_DISC.to_be_bytes());
        msg.extend_from_slice(&[0u8; 20]);
        let mut w = self.writer.lock().await;
        let _ = w.write_all(&msg).await;
        let _ = w.shutdown().await;
    }
}

/// Reads simple replies until the connection ends, completing requests.
async fn read_replies(mut rd: BufReader<OwnedReadHalf>, table: Arc<Mutex<Table>>) {
    let why = loop {
        let mut head = [0u8; 16];
        if let Err(e) = rd.read_exact(&mut head).await {
            break format!("reading a reply: {e}");
        }
        let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let errno = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        let mut h = [0u8; 8];
        h.copy_from_slice(&head[8..16]);
        let handle = u64::from_be_bytes(h);
        if magic != SIMPLE_REPLY_MAGIC {
            break if magic == STRUCTURED_REPLY_MAGIC {
                "structured reply received though not negotiated".to_string()
            } else {
                format!("bad reply magic {magic:#010x}")
            };
        }
        let Some(p) = lock(&table).pending.remove(&handle) else {
            break format!("reply for unknown handle {handle}");
        };
        // A simple reply to a read carries the data even on error.
        let mut data = vec![0u8; p.read_len];
        if let Err(e) = rd.read_exact(&mut data).await {
            let _ = p.tx.send(Err(NbdError::Disconnected(format!("reading data: {e}"))));
            break format!("reading data: {e}");
        }
        let _ = p.tx.send(if errno == 0 { Ok(data) } else { Err(NbdError::Server(errno)) });
    };
    lock(&table).fail_all(&why);
}

async fn send_option(s: &mut TcpStream, opt: u32, data: &[u8]) -> Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await?;
    Ok(())
}

/// Negotiates `export`; returns its size and transmission flags.
async fn handshake(s: &mut TcpStream, export: &str) -> Result<(u64, u16)> {
    if s.read_u64().await? != NBDMAGIC || s.read_u64().await? != IHAVEOPT {
        bail!("not a newstyle NBD server");
    }
    let server_flags = s.read_u16().await?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        bail!("NBD server is not fixed-newstyle");
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let client_flags = 1 | if no_zeroes { 2 } else { 0 };
    s.write_u32(client_flags).await?;

    let name = export.as_bytes();
    let mut go = Vec::with_capacity(6 + name.len());
    go.extend_from_slice(&(name.len() as u32).to_be_bytes());
    go.extend_from_slice(name);
    go.extend_from_slice(&0u16.to_be_bytes()); // no information requests
    send_option(s, OPT_GO, &go).await?;
    let mut info = None;
    loop {
        if s.read_u64().await? != OPT_REPLY_MAGIC {
            bail!("bad NBD option reply magic");
        }
        let _opt = s.read_u32().await?;
        let kind = s.read_u32().await?;
        let len = s.read_u32().await? as usize;
        if len > 64 << 10 {
            bail!("NBD option reply too long ({len} bytes)");
        }
        let mut data = vec![0u8; len];
        s.read_exact(&mut data).await?;
        match kind {
            REP_INFO if len >= 12 && data[0..2] == INFO_EXPORT.to_be_bytes() => {
                let mut size = [0u8; 8];
                size.copy_from_slice(&data[2..10]);
                info = Some((u64::from_be_bytes(size), u16::from_be_bytes([data[10], data[11]])));
            }
            REP_ACK => {
                return info.ok_or_else(|| anyhow::anyhow!("NBD_OPT_GO ended without export info"));
            }
            REP_ERR_UNSUP => break,
            err if err & 0x8000_0000 != 0 => {
                let msg = String::from_utf8_lossy(&data);
                let what = match err {
                    REP_ERR_UNKNOWN => format!("export {export:?} does not exist"),
                    REP_ERR_POLICY => format!("server refuses export {export:?}"),
                    REP_ERR_TLS_REQD => {
                        "server requires TLS, which pflex verify does not speak".into()
                    }
                    other => format!("NBD_OPT_GO refused (reply {other:#x})"),
                };
                if msg.is_empty() {
                    bail!("{what}");
                }
                bail!("{what}: {msg}");
            }
            _ => {}
        }
    }
    // Old servers: NBD_OPT_EXPORT_NAME, which answers with no option reply.
    send_option(s, OPT_EXPORT_NAME, name).await?;
    let size = s.read_u64().await.context("server closed on NBD_OPT_EXPORT_NAME")?;
    let flags = s.read_u16().await?;
    if !no_zeroes {
        let mut zeroes = [0u8; 124];
        s.read_exact(&mut zeroes).await?;
    }
    Ok((size, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let u = |host: &str, port, export: &str| NbdUri {
            host: host.into(),
            port,
            export: export.into(),
        };
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1:10810/vol1").unwrap(),
            u("127.0.0.1", 10810, "vol1")
        );
        assert_eq!(NbdUri::parse("nbd://host/vol1").unwrap(), u("host", 10809, "vol1"));
        assert_eq!(NbdUri::parse("nbd://host:5").unwrap(), u("host", 5, ""));
        assert_eq!(NbdUri::parse("nbd://[::1]:7/a/b").unwrap(), u("::1", 7, "a/b"));
        assert_eq!(NbdUri::parse("nbd://[::1]/x").unwrap().to_string(), "nbd://[::1]:10809/x");
        for bad in ["http://x/y", "nbd:///y", "nbd://h:port/y", "nbd://[::1/y", "nbd://h:99999/y"] {
            assert!(NbdUri::parse(bad).is_err(), "{bad}");
        }
    }
}
