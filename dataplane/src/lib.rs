//! Async transport of the pflex binary data plane.
//!
//! The frame format itself (88-byte [`FrameHeader`](pflex_proto::frame::FrameHeader)
//! plus payload) lives in `pflex-proto` and does no IO; this crate moves
//! frames over TCP:
//!
//! - [`client`]: [`DataPlaneClient`], a pooled, pipelined client used by the
//!   SDC (towards a chunk's primary SDS) and by an SDS (towards its
//!   secondary). Many requests are in flight per connection and replies may
//!   return in any order; each reply is matched to its request by id.
//! - [`server`]: what an SDS needs to serve the data plane: [`read_request`]
//!   and a [`ReplyWriter`] that coalesces replies of one connection.
//! - [`runtime`]: the tokio runtime the SDS and SDC run their network on.
//! - [`slots`]: connection caps that evict a connection that never sent
//!   anything (else the longest idle) instead of refusing a new one (the SDS
//!   data plane, the SDC's NBD handshakes).
//!
//! # Conventions callers rely on
//!
//! - The client assigns `request_id`, sets `payload_crc` (and `length` for
//!   ops that carry a request payload: WRITE and AUTH) and seals the MAC;
//!   the caller fills everything else, including `seq`, which must be unique
//!   per token (per sender for replication) because the SDS keeps a replay
//!   window.
//! - AUTH: payload = the encoded signed token, `token_id`/`volume_id` of the
//!   token in the header, header sealed with the token's session key. The SDS
//!   answers `Ok` or the token's rejection status. Data requests referring to
//!   a token the SDS has not seen get `NoToken`: send AUTH, then retry with a
//!   fresh `seq`.
//! - A reply with a non-`Ok` status is still `Ok(Reply)` from
//!   [`DataPlaneClient::call`]; use [`Reply::status`] or [`Reply::into_ok`].

pub mod client;
pub mod runtime;
pub mod server;
pub mod slots;
mod writer;

pub use client::{ClientError, DataPlaneClient, Reply};
pub use server::{read_request, write_frame, FrameReadError, ReplyWriter, WriterClosed};
pub use slots::{Idle, Slot, SlotActivity, Slots};
