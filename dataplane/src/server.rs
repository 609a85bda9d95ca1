//! Server side of the data plane: reading requests and writing replies.
//!
//! [`read_request`] reads one whole request (header, raw header bytes for MAC
//! checking, payload). A framing error (bad magic, oversized length) means
//! the byte stream can no longer be trusted: the server should close the
//! connection. [`ReplyWriter`] is a cloneable handle to the connection's
//! writer task, so request handlers running concurrently can each send
//! their reply when done, in any order.

use pflex_proto::frame::{crc32, FrameError, FrameHeader, Status, HEADER_LEN};
use pflex_proto::token::SessionKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::writer::{run_frame_writer, OutFrame, QUEUE_DEPTH};

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameReadError {
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("connection closed in the middle of a frame")]
    Truncated,
}

/// Reads one request: `Ok(None)` on a clean end of stream between frames.
///
/// Returns the decoded header, the raw header bytes (the MAC covers them
/// exactly as sent) and the payload the op carries.
pub async fn read_request<R>(
    reader: &mut R,
) -> Result<Option<(FrameHeader, [u8; HEADER_LEN], Vec<u8>)>, FrameReadError>
where
    R: AsyncRead + Unpin,
{
    read_frame(reader, false).await
}

/// Reads one reply (used by the client's reader task).
pub(crate) async fn read_reply<R>(
    reader: &mut R,
) -> Result<Option<(FrameHeader, Vec<u8>)>, FrameReadError>
where
    R: AsyncRead + Unpin,
{
    Ok(read_frame(reader, true).await?.map(|(header, _raw, payload)| (header, payload)))
}

/// Reads one header and the payload it announces (requests and replies
/// carry payloads for different ops); `Ok(None)` on a clean end of stream.
async fn read_frame<R>(
    reader: &mut R,
    is_reply: bool,
) -> Result<Option<(FrameHeader, [u8; HEADER_LEN], Vec<u8>)>, FrameReadError>
where
    R: AsyncRead + Unpin,
{
    let mut raw = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        let n = reader.read(&mut raw[filled..]).await?;
        if n == 0 {
            return if filled == 0 { Ok(None) } else { Err(FrameReadError::Truncated) };
        }
        filled += n;
    }
    let header = FrameHeader::decode(&raw)?;
    let mut payload = vec![0u8; header.payload_len(is_reply)];
    read_payload(reader, &mut payload).await?;
    Ok(Some((header, raw, payload)))
}

async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    payload: &mut [u8],
) -> Result<(), FrameReadError> {
    match reader.read_exact(payload).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameReadError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// Writes one frame directly (no queue); for simple peers and tests.
pub async fn write_frame<W>(
    writer: &mut W,
    header: &FrameHeader,
    payload: &[u8],
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    writer.write_all(&header.encode()).await?;
    if !payload.is_empty() {
        writer.write_all(payload).await?;
    }
    writer.flush().await
}

/// The connection's writer task has ended (socket closed or failed).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the connection's writer has closed")]
pub struct WriterClosed;

/// Cloneable handle that queues replies to one connection's writer task.
#[derive(Clone)]
pub struct ReplyWriter {
    frames: mpsc::Sender<OutFrame>,
}

impl ReplyWriter {
    /// Starts the writer task owning `socket`. The task ends when every
    /// handle is dropped (after writing what was queued) or on a socket error.
    pub fn spawn<W>(socket: W) -> (ReplyWriter, JoinHandle<std::io::Result<()>>)
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let task = tokio::spawn(run_frame_writer(socket, rx));
        (ReplyWriter { frames: tx }, task)
    }

    /// Queues a frame exactly as given.
    pub async fn send(&self, header: &FrameHeader, payload: Vec<u8>) -> Result<(), WriterClosed> {
        self.frames
            .send(OutFrame { header: header.encode(), payload: payload.into() })
            .await
            .map_err(|_| WriterClosed)
    }

    /// Queues the reply to `request` with `status`; a payload (READ,
    /// ALLOCATION) sets the reply's `length` and `payload_crc`. With the
    /// request's key (known once its MAC verified) the reply is sealed and
    /// bound to the request.
    pub async fn reply(
        &self,
        request: &FrameHeader,
        status: Status,
        payload: Vec<u8>,
        key: Option<&SessionKey>,
    ) -> Result<(), WriterClosed> {
        let crc = if payload.is_empty() { 0 } else { crc32(&payload) };
        let mut header = request.reply(status, payload.len() as u32, crc);
        if let Some(key) = key {
            header.seal_reply(key, &request.mac, &payload);
        }
        self.send(&header, payload).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pflex_proto::frame::Op;

    fn write_request(len: u32) -> FrameHeader {
        FrameHeader { op: Op::Write as u8, length: len, seq: 1, ..Default::default() }
    }

    #[tokio::test]
    async fn reads_whole_requests_and_clean_eof() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&write_request(3).encode());
        wire.extend_from_slice(&[1, 2, 3]);
        let read = FrameHeader { op: Op::Read as u8, length: 4096, ..Default::default() };
        wire.extend_from_slice(&read.encode());
        let mut reader = &wire[..];
        let (header, raw, payload) = read_request(&mut reader).await.unwrap().unwrap();
        assert_eq!(header, write_request(3));
        assert_eq!(raw, write_request(3).encode());
        assert_eq!(payload, vec![1, 2, 3]);
        let (header, _, payload) = read_request(&mut reader).await.unwrap().unwrap();
        assert_eq!(header, read);
        assert!(payload.is_empty(), "a READ request carries no payload");
        assert!(read_request(&mut reader).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn truncated_and_garbage_frames_are_errors() {
        let mut wire = write_request(10).encode().to_vec();
        wire.extend_from_slice(&[0; 5]);
        for cut in [1, 40, HEADER_LEN - 1, HEADER_LEN + 2] {
            let mut reader = &wire[..cut];
            let outcome = read_request(&mut reader).await;
            assert!(matches!(outcome, Err(FrameReadError::Truncated)), "cut at {cut}: {outcome:?}");
        }
        let garbage = [0xabu8; HEADER_LEN];
        let outcome = read_request(&mut &garbage[..]).await;
        assert!(matches!(outcome, Err(FrameReadError::Frame(FrameError::BadMagic(_)))));
    }

    /// Reads every request from `wire` until the stream ends or breaks.
    fn drain(wire: &[u8]) -> (usize, Option<String>) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let mut reader = wire;
            let mut frames = 0;
            loop {
                match read_request(&mut reader).await {
                    Ok(Some((header, _, payload))) => {
                        assert_eq!(payload.len(), header.payload_len(false));
                        frames += 1;
                    }
                    Ok(None) => return (frames, None),
                    Err(e) => return (frames, Some(e.to_string())),
                }
            }
        })
    }

    proptest::proptest! {
        #[test]
        fn random_streams_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = drain(&bytes);
        }

        #[test]
        fn valid_frames_cut_anywhere_end_in_truncated(len in 0u32..300, cut in 0usize..400) {
            let mut wire = write_request(len).encode().to_vec();
            wire.extend(vec![7u8; len as usize]);
            let whole = wire.len();
            let (frames, error) = drain(&wire[..cut.min(whole)]);
            if cut == 0 {
                proptest::prop_assert_eq!((frames, error), (0, None));
            } else if cut >= whole {
                proptest::prop_assert_eq!((frames, error), (1, None));
            } else {
                proptest::prop_assert_eq!(frames, 0);
                proptest::prop_assert!(error.unwrap().contains("middle of a frame"));
            }
        }
    }

    #[tokio::test]
    async fn reply_writer_sets_length_and_crc() {
        let (client_side, server_side) = tokio::io::duplex(1 << 16);
        let (writer, task) = ReplyWriter::spawn(server_side);
        let request =
            FrameHeader { op: Op::Read as u8, length: 4, request_id: 9, ..Default::default() };
        writer.reply(&request, Status::Ok, vec![1, 2, 3, 4], None).await.unwrap();
        drop(writer);
        task.await.unwrap().unwrap();
        let mut reader = client_side;
        let (reply, payload) = read_reply(&mut reader).await.unwrap().unwrap();
        assert_eq!(reply.request_id, 9);
        assert_eq!(reply.status, Status::Ok as u16);
        assert_eq!(payload, vec![1, 2, 3, 4]);
        assert_eq!(reply.payload_crc, crc32(&payload));
    }
}
