//! Client tests against a tiny in-test data-plane server.

use super::*;
use crate::server::{read_request, ReplyWriter};
use tokio::net::TcpListener;

const KEY: SessionKey = SessionKey([7; 32]);
/// Reads of this chunk get a reply whose payload does not match its CRC.
const CORRUPT_CHUNK: u64 = u64::MAX;
/// Reads of this chunk are never answered.
const SILENT_CHUNK: u64 = u64::MAX - 1;

fn pattern(chunk: u64, offset: u32, len: u32) -> Vec<u8> {
    (0..len)
        .map(|i| (chunk as u32).wrapping_mul(31).wrapping_add(offset).wrapping_add(i) as u8)
        .collect()
}

/// Serves: READ → `pattern` after a delay that reverses arrival order;
/// WRITE → checks MAC and CRC; TRIM → drops the connection.
async fn spawn_test_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(serve_connection(stream));
        }
    });
    addr
}

async fn serve_connection(stream: TcpStream) {
    let (mut read_half, write_half) = stream.into_split();
    let (replies, writer_task) = ReplyWriter::spawn(write_half);
    let mut handlers = Vec::new();
    while let Ok(Some((header, raw, payload))) = read_request(&mut read_half).await {
        if header.op == Op::Trim as u8 {
            break;
        }
        let replies = replies.clone();
        handlers.push(tokio::spawn(async move {
            if !FrameHeader::verify_mac(&raw, &KEY, &payload) {
                let _ = replies.reply(&header, Status::BadMac, Vec::new(), None).await;
                return;
            }
            match Op::from_u8(header.op) {
                Some(Op::Read) if header.chunk_index == SILENT_CHUNK => {}
                Some(Op::Read) if header.chunk_index == CORRUPT_CHUNK => {
                    let mut reply = header.reply(Status::Ok, header.length, 1);
                    reply.payload_crc = 12345;
                    let data = vec![0; header.length as usize];
                    reply.seal_reply(&KEY, &header.mac, &data);
                    let _ = replies.send(&reply, data).await;
                }
                Some(Op::Read) => {
                    let delay = 20 - (header.request_id % 20);
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    let data = pattern(header.chunk_index, header.offset, header.length);
                    let _ = replies.reply(&header, Status::Ok, data, Some(&KEY)).await;
                }
                Some(Op::Write) => {
                    let status = if crc32(&payload) == header.payload_crc
                        && payload.len() == header.length as usize
                    {
                        Status::Ok
                    } else {
                        Status::BadCrc
                    };
                    let _ = replies.reply(&header, status, Vec::new(), Some(&KEY)).await;
                }
                _ => {
                    let _ = replies.reply(&header, Status::Invalid, Vec::new(), Some(&KEY)).await;
                }
            }
        }));
    }
    for handler in handlers {
        handler.abort();
    }
    writer_task.abort();
}

fn read_header(chunk: u64, offset: u32, length: u32) -> FrameHeader {
    FrameHeader {
        op: Op::Read as u8,
        volume_id: 1,
        chunk_index: chunk,
        offset,
        length,
        seq: 1,
        ..Default::default()
    }
}

#[tokio::test]
async fn many_requests_in_flight_replies_out_of_order() {
    let addr = spawn_test_server().await;
    let client = DataPlaneClient::new(addr, 2);
    let mut calls = Vec::new();
    for i in 0..200u32 {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            let (chunk, offset, len) = (u64::from(i % 7), i * 512, 512 + i);
            let reply = client.call(read_header(chunk, offset, len), &KEY, &[]).await.unwrap();
            assert_eq!(reply.status(), Status::Ok);
            assert_eq!(reply.payload, pattern(chunk, offset, len), "reply {i} mismatched");
        }));
    }
    let started = std::time::Instant::now();
    for call in calls {
        call.await.unwrap();
    }
    // 200 requests each delayed up to 20 ms: only pipelining finishes them quickly.
    assert!(started.elapsed() < Duration::from_secs(2), "requests were serialized");
}

#[tokio::test]
async fn write_sets_length_crc_and_mac() {
    let addr = spawn_test_server().await;
    let client = DataPlaneClient::new(addr, 1);
    let header = FrameHeader { op: Op::Write as u8, volume_id: 1, seq: 1, ..Default::default() };
    let reply = client.call(header, &KEY, &[5u8; 4096]).await.unwrap();
    assert_eq!(reply.status(), Status::Ok);
    let wrong_key = SessionKey([8; 32]);
    let reply = client.call(header, &wrong_key, &[5u8; 4096]).await.unwrap();
    assert_eq!(reply.status(), Status::BadMac);
    assert_eq!(reply.into_ok().unwrap_err(), ClientError::Rejected(Status::BadMac));
    let read_with_payload = client.call(read_header(0, 0, 1), &KEY, &[1]).await;
    assert_eq!(read_with_payload.unwrap_err(), ClientError::UnexpectedPayload(Op::Read as u8));
}

#[tokio::test]
async fn broken_connection_fails_in_flight_and_reconnects() {
    let addr = spawn_test_server().await;
    let client = DataPlaneClient::new(addr, 1);
    let mut stuck = Vec::new();
    for _ in 0..5 {
        let client = client.clone();
        stuck.push(tokio::spawn(async move {
            client.call(read_header(SILENT_CHUNK, 0, 16), &KEY, &[]).await
        }));
    }
    // Make sure the stuck requests are on the wire before breaking it.
    client.call(read_header(1, 0, 16), &KEY, &[]).await.unwrap();
    let trim = FrameHeader { op: Op::Trim as u8, length: 4096, ..Default::default() };
    let broken = client.call(trim, &KEY, &[]).await;
    assert!(matches!(broken, Err(ClientError::Transport(_))), "{broken:?}");
    for call in stuck {
        let outcome = call.await.unwrap();
        assert!(matches!(outcome, Err(ClientError::Transport(_))), "{outcome:?}");
    }
    let reply = client.call(read_header(2, 8, 64), &KEY, &[]).await.unwrap();
    assert_eq!(reply.payload, pattern(2, 8, 64), "reconnected connection serves again");
}

#[tokio::test]
async fn corrupt_read_reply_is_detected() {
    let addr = spawn_test_server().await;
    let client = DataPlaneClient::new(addr, 1);
    let outcome = client.call(read_header(CORRUPT_CHUNK, 0, 4096), &KEY, &[]).await;
    assert_eq!(outcome.unwrap_err(), ClientError::BadReplyCrc);
}

#[tokio::test]
async fn unanswered_request_times_out() {
    let addr = spawn_test_server().await;
    let timeout = Duration::from_millis(200);
    let client = DataPlaneClient::with_timeouts(addr, 1, timeout, timeout);
    let outcome = client.call(read_header(SILENT_CHUNK, 0, 16), &KEY, &[]).await;
    assert_eq!(outcome.unwrap_err(), ClientError::Timeout(timeout));
    // The connection itself is still fine.
    client.call(read_header(3, 0, 16), &KEY, &[]).await.unwrap();
}

#[tokio::test]
async fn connect_failure_is_reported() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = DataPlaneClient::new(addr, 1);
    let outcome = client.call(read_header(0, 0, 16), &KEY, &[]).await;
    assert!(matches!(outcome, Err(ClientError::Connect { .. })), "{outcome:?}");
}
