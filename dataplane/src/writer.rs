//! The single writer task of one socket, shared by client and server.
//!
//! Frames are queued to a task that owns the socket's write half, so a
//! frame is always written whole even if the future that queued it is
//! dropped (cancellation cannot leave half a frame on the wire). Frames
//! queued while one is being written are coalesced into one flush.

use bytes::Bytes;
use pflex_proto::frame::HEADER_LEN;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

/// Frames waiting for one socket; bounded so a slow peer pushes back.
pub(crate) const QUEUE_DEPTH: usize = 512;
const WRITE_BUFFER: usize = 256 * 1024;

/// One encoded header and its payload (shared, so a payload sent to a
/// peer and written locally at the same time is not copied).
pub(crate) struct OutFrame {
    pub header: [u8; HEADER_LEN],
    pub payload: Bytes,
}

/// Writes queued frames until every sender is gone or the socket fails.
pub(crate) async fn run_frame_writer<W>(
    socket: W,
    mut frames: mpsc::Receiver<OutFrame>,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, socket);
    while let Some(frame) = frames.recv().await {
        write_one(&mut out, &frame).await?;
        while let Ok(next) = frames.try_recv() {
            write_one(&mut out, &next).await?;
        }
        out.flush().await?;
    }
    out.shutdown().await
}

async fn write_one<W: AsyncWrite + Unpin>(
    out: &mut BufWriter<W>,
    frame: &OutFrame,
) -> std::io::Result<()> {
    out.write_all(&frame.header).await?;
    if !frame.payload.is_empty() {
        out.write_all(&frame.payload).await?;
    }
    Ok(())
}
