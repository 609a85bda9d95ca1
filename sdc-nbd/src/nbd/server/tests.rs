//! Protocol tests of the server over the in-memory backend: a raw client
//! written here drives every option and command, and the real libnbd and
//! qemu clients check interoperability when they are installed.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::memory::{MemoryBackend, MemoryVolume};
use crate::nbd::proto::{info, reply_type};

const MIB: u64 = 1 << 20;

async fn start(backend: Arc<MemoryBackend>) -> (SocketAddr, Arc<NbdStats>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(NbdStats::default());
    let server = NbdServer::new(backend, ServerConfig::default(), stats.clone());
    tokio::spawn(server.serve(listener));
    (addr, stats)
}

fn backend_with_vol() -> (Arc<MemoryBackend>, Arc<MemoryVolume>) {
    let b = Arc::new(MemoryBackend::new());
    let v = b.add("vol1", 64 * MIB, false);
    b.add("ro", MIB, true);
    (b, v)
}

struct OptionReply {
    option: u32,
    reply_type: u32,
    data: Vec<u8>,
}

/// A deliberately small NBD client.
struct RawClient {
    s: TcpStream,
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> Self {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        s.write_all(&3u32.to_be_bytes()).await.unwrap();
        Self { s }
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).await.unwrap();
    }

    async fn read_option_reply(&mut self) -> OptionReply {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).await.unwrap();
        assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), proto::OPTION_REPLY_MAGIC);
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).await.unwrap();
        OptionReply {
            option: u32::from_be_bytes(h[8..12].try_into().unwrap()),
            reply_type: u32::from_be_bytes(h[12..16].try_into().unwrap()),
            data,
        }
    }

    /// Replies up to and including the final one (ACK or error).
    async fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptionReply> {
        self.send_option(option, data).await;
        let mut out = Vec::new();
        loop {
            let r = self.read_option_reply().await;
            assert_eq!(r.option, option);
            let last = r.reply_type == rep::ACK || r.reply_type & (1 << 31) != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// STRUCTURED_REPLY, SET_META_CONTEXT base:allocation, GO; returns flags and size.
    async fn go(&mut self, export: &str, structured: bool) -> (u64, u16) {
        if structured {
            let r = self.option(opt::STRUCTURED_REPLY, &[]).await;
            assert_eq!(r[0].reply_type, rep::ACK);
            let r =
                self.option(opt::SET_META_CONTEXT, &meta_data(export, &["base:allocation"])).await;
            assert_eq!(r.len(), 2);
            assert_eq!(r[0].reply_type, rep::META_CONTEXT);
            assert_eq!(&r[0].data[..4], &BASE_ALLOCATION_ID.to_be_bytes());
            assert_eq!(&r[0].data[4..], b"base:allocation");
        }
        let r = self.option(opt::GO, &info_data(export, &[info::NAME, info::BLOCK_SIZE])).await;
        assert_eq!(r.last().unwrap().reply_type, rep::ACK, "GO failed");
        let export_info = r
            .iter()
            .find(|x| x.reply_type == rep::INFO && x.data[..2] == info::EXPORT.to_be_bytes())
            .expect("INFO_EXPORT");
        let size = u64::from_be_bytes(export_info.data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(export_info.data[10..12].try_into().unwrap());
        (size, flags)
    }

    async fn send_request(
        &mut self,
        command: Command,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let r = Request { flags, command, cookie, offset, length };
        let mut b = r.encode().to_vec();
        b.extend_from_slice(payload);
        self.s.write_all(&b).await.unwrap();
    }

    /// Reads one simple reply: (cookie, error).
    async fn simple_reply(&mut self) -> (u64, u32) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).await.unwrap();
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), proto::SIMPLE_REPLY_MAGIC);
        (
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
        )
    }

    /// Reads one reply of either kind: (cookie, error, type, payload).
    async fn any_reply(&mut self) -> (u64, u32, u16, Vec<u8>) {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).await.unwrap();
        let magic = u32::from_be_bytes(m);
        if magic == proto::SIMPLE_REPLY_MAGIC {
            let mut rest = [0u8; 12];
            self.s.read_exact(&mut rest).await.unwrap();
            let err = u32::from_be_bytes(rest[0..4].try_into().unwrap());
            return (u64::from_be_bytes(rest[4..12].try_into().unwrap()), err, u16::MAX, vec![]);
        }
        assert_eq!(magic, proto::STRUCTURED_REPLY_MAGIC);
        let mut rest = [0u8; 16];
        self.s.read_exact(&mut rest).await.unwrap();
        let flags = u16::from_be_bytes([rest[0], rest[1]]);
        assert_ne!(flags & proto::reply_flags::DONE, 0, "this server sends single-chunk replies");
        let kind = u16::from_be_bytes([rest[2], rest[3]]);
        let cookie = u64::from_be_bytes(rest[4..12].try_into().unwrap());
        let len = u32::from_be_bytes(rest[12..16].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        self.s.read_exact(&mut payload).await.unwrap();
        let err = if kind == reply_type::ERROR {
            u32::from_be_bytes(payload[0..4].try_into().unwrap())
        } else {
            0
        };
        (cookie, err, kind, payload)
    }

    async fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

#[tokio::test]
async fn options_list_info_unsupported_starttls() {
    let (b, _) = backend_with_vol();
    let (addr, _) = start(b).await;
    let mut c = RawClient::connect(addr).await;
    let list = c.option(opt::LIST, &[]).await;
    let names: Vec<String> = list
        .iter()
        .filter(|r| r.reply_type == rep::SERVER)
        .map(|r| {
            let n = u32::from_be_bytes(r.data[0..4].try_into().unwrap()) as usize;
            String::from_utf8(r.data[4..4 + n].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, vec!["vol1", "ro"]);
    assert_eq!(c.option(opt::STARTTLS, &[]).await[0].reply_type, rep::ERR_POLICY);
    assert_eq!(c.option(999, b"junk").await[0].reply_type, rep::ERR_UNSUP);
    assert_eq!(c.option(opt::LIST, b"x").await[0].reply_type, rep::ERR_INVALID);
    assert_eq!(c.option(opt::INFO, &info_data("nope", &[])).await[0].reply_type, rep::ERR_UNKNOWN);
    assert_eq!(c.option(opt::GO, &[0, 0]).await[0].reply_type, rep::ERR_INVALID);
    // Meta contexts need structured replies first.
    assert_eq!(
        c.option(opt::SET_META_CONTEXT, &meta_data("vol1", &["base:allocation"])).await[0]
            .reply_type,
        rep::ERR_INVALID
    );
    let info = c
        .option(opt::INFO, &info_data("vol1", &[info::NAME, info::DESCRIPTION, info::BLOCK_SIZE]))
        .await;
    let kinds: Vec<u16> = info
        .iter()
        .filter(|r| r.reply_type == rep::INFO)
        .map(|r| u16::from_be_bytes([r.data[0], r.data[1]]))
        .collect();
    assert_eq!(kinds, vec![info::EXPORT, info::NAME, info::DESCRIPTION, info::BLOCK_SIZE]);
    let bs = info
        .iter()
        .find(|r| r.reply_type == rep::INFO && r.data[..2] == info::BLOCK_SIZE.to_be_bytes())
        .unwrap();
    assert_eq!(&bs.data[2..], &[0, 0, 0, 1, 0, 0, 16, 0, 2, 0, 0, 0]);
    // Listing contexts: wildcard and empty query both find base:allocation; others nothing.
    assert_eq!(c.option(opt::STRUCTURED_REPLY, &[]).await[0].reply_type, rep::ACK);
    let l = c.option(opt::LIST_META_CONTEXT, &meta_data("vol1", &["base:"])).await;
    assert_eq!(l.len(), 2);
    assert_eq!(&l[0].data[4..], b"base:allocation");
    let l = c.option(opt::LIST_META_CONTEXT, &meta_data("vol1", &["qemu:dirty-bitmap:a"])).await;
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].reply_type, rep::ACK);
    // Abort gets an ACK and the connection closes.
    assert_eq!(c.option(opt::ABORT, &[]).await[0].reply_type, rep::ACK);
    assert!(c.is_closed().await);
}

#[tokio::test]
async fn flags_for_read_write_and_read_only_exports() {
    let (b, _) = backend_with_vol();
    let (addr, _) = start(b).await;
    let mut c = RawClient::connect(addr).await;
    let (size, flags) = c.go("vol1", true).await;
    assert_eq!(size, 64 * MIB);
    for f in [
        tx_flags::HAS_FLAGS,
        tx_flags::SEND_FLUSH,
        tx_flags::SEND_FUA,
        tx_flags::SEND_TRIM,
        tx_flags::SEND_WRITE_ZEROES,
        tx_flags::SEND_FAST_ZERO,
        tx_flags::SEND_CACHE,
        tx_flags::SEND_DF,
        tx_flags::CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} missing");
    }
    assert_eq!(flags & tx_flags::READ_ONLY, 0);
    let mut c = RawClient::connect(addr).await;
    let (_, flags) = c.go("ro", false).await;
    assert_ne!(flags & tx_flags::READ_ONLY, 0);
    assert_eq!(flags & tx_flags::SEND_DF, 0, "DF needs structured replies");
    c.send_request(Command::Write, 0, 5, 0, 4, b"abcd").await;
    assert_eq!(c.simple_reply().await, (5, Errno::Perm as u32));
}

#[tokio::test]
async fn io_commands_with_structured_replies() {
    let (b, v) = backend_with_vol();
    let (addr, stats) = start(b).await;
    let mut c = RawClient::connect(addr).await;
    c.go("vol1", true).await;
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    c.send_request(Command::Write, cmd_flags::FUA, 1, 1_048_000, 5000, &data).await;
    assert_eq!(c.simple_reply().await, (1, 0));
    c.send_request(Command::Read, cmd_flags::DF, 2, 1_048_000, 5000, &[]).await;
    let (cookie, err, kind, payload) = c.any_reply().await;
    assert_eq!((cookie, err, kind), (2, 0, reply_type::OFFSET_DATA));
    assert_eq!(u64::from_be_bytes(payload[0..8].try_into().unwrap()), 1_048_000);
    assert_eq!(&payload[8..], &data[..]);
    // Out of range read: an ERROR chunk with EINVAL.
    c.send_request(Command::Read, 0, 3, 64 * MIB - 1, 2, &[]).await;
    let (cookie, err, kind, _) = c.any_reply().await;
    assert_eq!((cookie, err, kind), (3, Errno::Inval as u32, reply_type::ERROR));
    // Write beyond the end: ENOSPC; oversized write: EINVAL, payload drained.
    c.send_request(Command::Write, 0, 4, 64 * MIB - 2, 4, b"wxyz").await;
    assert_eq!(c.simple_reply().await, (4, Errno::NoSpc as u32));
    let big = vec![0u8; (proto::BLOCK_SIZES.maximum + 1) as usize];
    c.send_request(Command::Write, 0, 5, 0, big.len() as u32, &big).await;
    assert_eq!(c.simple_reply().await, (5, Errno::Inval as u32));
    // Block status: the written 64 KiB pages are data, the rest holes.
    c.send_request(Command::BlockStatus, 0, 6, 0, 4 * MIB as u32, &[]).await;
    let (cookie, err, kind, payload) = c.any_reply().await;
    assert_eq!((cookie, err, kind), (6, 0, reply_type::BLOCK_STATUS));
    let desc: Vec<(u32, u32)> = payload[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[0..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..8].try_into().unwrap()),
            )
        })
        .collect();
    let page = crate::memory::PAGE_SIZE as u32;
    assert_eq!(desc, vec![(15 * page, 3), (2 * page, 0), (4 * MIB as u32 - 17 * page, 3)]);
    c.send_request(Command::BlockStatus, cmd_flags::REQ_ONE, 7, 0, 4 * MIB as u32, &[]).await;
    let (_, _, _, payload) = c.any_reply().await;
    assert_eq!(payload.len(), 12);
    // Trim whole pages and zeroes: they read back as zeroes.
    c.send_request(Command::Trim, 0, 8, 15 * u64::from(page), page, &[]).await;
    assert_eq!(c.simple_reply().await, (8, 0));
    c.send_request(
        Command::WriteZeroes,
        cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
        9,
        1_048_000,
        100,
        &[],
    )
    .await;
    assert_eq!(c.simple_reply().await, (9, 0));
    c.send_request(Command::Read, 0, 10, 1_048_000, 5000, &[]).await;
    let (_, _, _, payload) = c.any_reply().await;
    assert!(payload[8..8 + 576].iter().all(|&b| b == 0), "trimmed page reads as zeroes");
    assert_eq!(&payload[8 + 576..], &data[576..]);
    c.send_request(Command::Flush, 0, 11, 0, 0, &[]).await;
    assert_eq!(c.simple_reply().await, (11, 0));
    assert_eq!(v.flush_count(), 1);
    c.send_request(Command::Cache, 0, 12, 0, 4096, &[]).await;
    assert_eq!(c.simple_reply().await, (12, 0));
    // Unknown command and bad flags: EINVAL, connection stays.
    c.send_request(Command::Unsupported(42), 0, 13, 0, 0, &[]).await;
    assert_eq!(c.simple_reply().await, (13, Errno::Inval as u32));
    c.send_request(Command::Flush, cmd_flags::NO_HOLE, 14, 0, 0, &[]).await;
    assert_eq!(c.simple_reply().await, (14, Errno::Inval as u32));
    c.send_request(Command::Disc, 0, 15, 0, 0, &[]).await;
    assert!(c.is_closed().await);
    assert!(stats.command(Command::Read).unwrap().ops() >= 3);
    assert_eq!(stats.protocol_errors.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn simple_replies_and_export_name() {
    let (b, _) = backend_with_vol();
    let (addr, _) = start(b).await;
    let mut c = RawClient::connect(addr).await;
    c.send_option(opt::EXPORT_NAME, b"vol1").await;
    let mut r = [0u8; 10];
    c.s.read_exact(&mut r).await.unwrap();
    assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), 64 * MIB);
    c.send_request(Command::Write, 0, 1, 10, 3, b"xyz").await;
    assert_eq!(c.simple_reply().await, (1, 0));
    c.send_request(Command::Read, 0, 2, 9, 5, &[]).await;
    assert_eq!(c.simple_reply().await, (2, 0));
    let mut data = [0u8; 5];
    c.s.read_exact(&mut data).await.unwrap();
    assert_eq!(&data, b"\0xyz\0");
    // Without structured replies, BLOCK_STATUS and DF are invalid.
    c.send_request(Command::BlockStatus, 0, 3, 0, 5, &[]).await;
    assert_eq!(c.simple_reply().await, (3, Errno::Inval as u32));
    // An unknown name with EXPORT_NAME closes the connection.
    let mut c = RawClient::connect(addr).await;
    c.send_option(opt::EXPORT_NAME, b"missing").await;
    assert!(c.is_closed().await);
}

#[tokio::test]
async fn many_requests_in_flight_are_all_answered() {
    let (b, _) = backend_with_vol();
    let (addr, _) = start(b).await;
    let mut c = RawClient::connect(addr).await;
    c.go("vol1", true).await;
    let mut batch = Vec::new();
    for i in 0..500u64 {
        let payload = vec![i as u8; 4096];
        let r = Request {
            flags: 0,
            command: Command::Write,
            cookie: i,
            offset: i * 4096,
            length: 4096,
        };
        batch.extend_from_slice(&r.encode());
        batch.extend_from_slice(&payload);
    }
    c.s.write_all(&batch).await.unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..500 {
        let (cookie, err, _, _) = c.any_reply().await;
        assert_eq!(err, 0);
        assert!(seen.insert(cookie));
    }
    for i in (0..500u64).step_by(97) {
        c.send_request(Command::Read, 0, 10_000 + i, i * 4096, 4096, &[]).await;
        let (_, _, _, payload) = c.any_reply().await;
        assert!(payload[8..].iter().all(|&b| b == i as u8));
    }
}

#[tokio::test]
async fn garbage_closes_only_that_connection() {
    let (b, _) = backend_with_vol();
    let (addr, stats) = start(b).await;
    let mut good = RawClient::connect(addr).await;
    good.go("vol1", true).await;

    // Garbage instead of client flags.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await.unwrap();
    // Truncated handshake: half an option header, then close.
    let mut c = RawClient::connect(addr).await;
    c.s.write_all(&proto::IHAVEOPT.to_be_bytes()[..5]).await.unwrap();
    drop(c);
    // A huge option length closes the connection.
    let mut c = RawClient::connect(addr).await;
    let mut h = proto::IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&opt::GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    c.s.write_all(&h).await.unwrap();
    assert!(c.is_closed().await);
    // Bad request magic in transmission closes that connection.
    let mut c = RawClient::connect(addr).await;
    c.go("vol1", false).await;
    c.s.write_all(&[0xffu8; 28]).await.unwrap();
    assert!(c.is_closed().await);
    // A request truncated mid-payload.
    let mut c = RawClient::connect(addr).await;
    c.go("vol1", false).await;
    let r = Request { flags: 0, command: Command::Write, cookie: 1, offset: 0, length: 4096 };
    c.s.write_all(&r.encode()).await.unwrap();
    c.s.write_all(&[1u8; 100]).await.unwrap();
    drop(c);
    // Random bytes of every length.
    for n in [1usize, 3, 17, 40, 200] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let junk: Vec<u8> = (0..n).map(|i| (i * 31 + 7) as u8).collect();
        let _ = s.write_all(&junk).await;
    }
    // The first connection still works.
    good.send_request(Command::Write, 0, 77, 0, 4, b"live").await;
    assert_eq!(good.simple_reply().await, (77, 0));
    good.send_request(Command::Read, 0, 78, 0, 4, &[]).await;
    let (_, _, _, payload) = good.any_reply().await;
    assert_eq!(&payload[8..], b"live");
    assert!(stats.protocol_errors.load(Ordering::Relaxed) >= 1);
}

/// Runs a real NBD client binary when installed; `None` when it is not.
fn run_tool(program: &str, args: &[&str]) -> Option<std::process::Output> {
    match std::process::Command::new(program).args(args).output() {
        Ok(o) => Some(o),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("{program} not installed; skipping");
            None
        }
        Err(e) => panic!("{program}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_interoperate() {
    let (b, _) = backend_with_vol();
    let (addr, _) = start(b).await;
    let port = addr.port().to_string();
    let uri = format!("nbd://127.0.0.1:{port}/vol1");
    let uri2 = uri.clone();
    let out =
        tokio::task::spawn_blocking(move || run_tool("nbdinfo", &["--json", &uri2])).await.unwrap();
    if let Some(out) = out {
        assert!(out.status.success(), "nbdinfo: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let export = &json["exports"][0];
        assert_eq!(export["export-size"], 64 * MIB);
        for key in [
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_fast_zero",
            "can_cache",
            "can_df",
            "can_multi_conn",
        ] {
            assert_eq!(export[key], true, "{key} in {text}");
        }
        assert_eq!(export["is_read_only"], false);
        assert_eq!(export["block_size_maximum"], 32 * MIB);
    }
    let uri2 = format!("nbd://127.0.0.1:{port}");
    let out =
        tokio::task::spawn_blocking(move || run_tool("nbdinfo", &["--list", "--json", &uri2]))
            .await
            .unwrap();
    if let Some(out) = out {
        assert!(out.status.success(), "nbdinfo --list: {}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let names: Vec<&str> = json["exports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["export-name"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["vol1", "ro"]);
    }
    let uri2 = uri.clone();
    let out = tokio::task::spawn_blocking(move || {
        run_tool(
            "qemu-io",
            &[
                "-f",
                "raw",
                &uri2,
                "-c",
                "write -P 0xab 1048000 5000",
                "-c",
                "read -P 0xab 1048000 5000",
                "-c",
                "write -z 2097000 3000",
                "-c",
                "read -P 0 2097000 3000",
                "-c",
                "write -f -P 0x11 4095 2",
                "-c",
                "discard 3145728 1048576",
                "-c",
                "flush",
                "-c",
                "read -P 0x11 4095 2",
            ],
        )
    })
    .await
    .unwrap();
    if let Some(out) = out {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.contains("Pattern verification failed"),
            "qemu-io: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_replies_stops_being_served() {
    let (b, _) = backend_with_vol();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(NbdStats::default());
    let config = ServerConfig {
        max_in_flight_requests: 4,
        max_in_flight_bytes: 32 << 20,
        ..ServerConfig::default()
    };
    tokio::spawn(NbdServer::new(b, config, stats.clone()).serve(listener));
    let mut c = RawClient::connect(addr).await;
    c.go("vol1", false).await;
    let total = 200u64;
    let mut batch = Vec::new();
    for i in 0..total {
        let r =
            Request { flags: 0, command: Command::Read, cookie: i, offset: 0, length: MIB as u32 };
        batch.extend_from_slice(&r.encode());
    }
    c.s.write_all(&batch).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let served = stats.command(Command::Read).unwrap().ops();
    assert!(
        served < total / 2,
        "{served} of {total} 1 MiB reads served to a client reading nothing"
    );
    for _ in 0..total {
        let (_, err) = c.simple_reply().await;
        assert_eq!(err, 0);
        let mut data = vec![0u8; MIB as usize];
        c.s.read_exact(&mut data).await.unwrap();
    }
    assert_eq!(stats.command(Command::Read).unwrap().ops(), total);
}

/// The spec's TLS rules as a table: (offered, required, active), option,
/// what the server does.
#[test]
fn tls_gate_follows_the_spec() {
    let phase = |offered, required, active| TlsPhase { offered, required, active };
    let export = || ClientOption::ExportName("vol1".into());
    let go = || ClientOption::Go(proto::InfoRequest { export: "vol1".into(), requests: vec![] });
    let tls_reqd = TlsGate::Refuse(rep::ERR_TLS_REQD, "");
    let cases: Vec<(TlsPhase, ClientOption, TlsGate)> = vec![
        // No TLS on this server: STARTTLS is refused, the rest proceeds.
        (phase(false, false, false), ClientOption::StartTls, TlsGate::Refuse(rep::ERR_POLICY, "")),
        (phase(false, false, false), go(), TlsGate::Proceed),
        (phase(false, false, false), export(), TlsGate::Proceed),
        // Offered: both ways work.
        (phase(true, false, false), ClientOption::StartTls, TlsGate::StartTls),
        (phase(true, false, false), go(), TlsGate::Proceed),
        (phase(true, false, false), ClientOption::List, TlsGate::Proceed),
        // Required, before STARTTLS: nothing but STARTTLS and ABORT.
        (phase(true, true, false), ClientOption::StartTls, TlsGate::StartTls),
        (phase(true, true, false), ClientOption::Abort, TlsGate::Proceed),
        (phase(true, true, false), go(), tls_reqd),
        (phase(true, true, false), ClientOption::List, tls_reqd),
        (phase(true, true, false), ClientOption::StructuredReply, tls_reqd),
        (phase(true, true, false), export(), TlsGate::Close),
        // TLS on: everything proceeds, a second STARTTLS is invalid.
        (phase(true, true, true), go(), TlsGate::Proceed),
        (phase(true, true, true), export(), TlsGate::Proceed),
        (phase(true, true, true), ClientOption::StartTls, TlsGate::Refuse(rep::ERR_INVALID, "")),
    ];
    for (phase, option, expected) in cases {
        let got = tls_gate(phase, &option);
        let same = match (got, expected) {
            (TlsGate::Refuse(a, _), TlsGate::Refuse(b, _)) => a == b,
            (a, b) => a == b,
        };
        assert!(same, "{phase:?} {option:?}: got {got:?}, expected {expected:?}");
    }
}
