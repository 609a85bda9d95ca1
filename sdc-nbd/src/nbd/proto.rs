//! The NBD wire protocol (fixed newstyle), as pure code.
//!
//! Follows `doc/proto.md` of the NetworkBlockDevice project. This module
//! turns bytes into typed values and back and does no IO: the server in
//! [`super::server`] reads exactly the byte counts these functions ask for
//! and writes what they produce. Every parser takes a slice of untrusted
//! bytes and returns an error instead of panicking on any input (checked by
//! the proptests below).
//!
//! Layout reminders (all integers big-endian):
//! - greeting: `NBDMAGIC` u64, `IHAVEOPT` u64, handshake flags u16;
//! - client flags: u32;
//! - option request: `IHAVEOPT` u64, option u32, length u32, data;
//! - option reply: [`OPTION_REPLY_MAGIC`] u64, option u32, type u32, length u32, data;
//! - request: [`REQUEST_MAGIC`] u32, flags u16, type u16, cookie u64, offset u64, length u32;
//! - simple reply: [`SIMPLE_REPLY_MAGIC`] u32, error u32, cookie u64 (+ data for READ);
//! - structured reply chunk: [`STRUCTURED_REPLY_MAGIC`] u32, flags u16, type u16,
//!   cookie u64, length u32, payload.

/// `NBDMAGIC`, first word of the server greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, second word of the greeting and magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Length of the server greeting.
pub const GREETING_LEN: usize = 18;
/// Length of an option request header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Header of an OFFSET_DATA chunk: the chunk header plus the u64 offset.
pub const OFFSET_DATA_HEADER_LEN: usize = STRUCTURED_HEADER_LEN + 8;

/// Handshake flags (server → client).
pub mod handshake_flags {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (client → server, after the greeting).
pub mod client_flags {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
    pub const ALL: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Option codes.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const PEEK_EXPORT: u32 = 4;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR + 1;
    pub const ERR_POLICY: u32 = ERR + 2;
    pub const ERR_INVALID: u32 = ERR + 3;
    pub const ERR_PLATFORM: u32 = ERR + 4;
    pub const ERR_TLS_REQD: u32 = ERR + 5;
    pub const ERR_UNKNOWN: u32 = ERR + 6;
    pub const ERR_SHUTDOWN: u32 = ERR + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR + 8;
    pub const ERR_TOO_BIG: u32 = ERR + 9;
}

/// Information types of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (per export).
pub mod tx_flags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command flags.
pub mod cmd_flags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk flags.
pub mod reply_flags {
    pub const DONE: u16 = 1 << 0;
}

/// Structured reply chunk types.
pub mod reply_type {
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = (1 << 15) + 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// Status flags of the `base:allocation` metadata context.
pub mod allocation {
    pub const HOLE: u32 = 1 << 0;
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Longest export name or metadata query accepted (the spec's limit).
pub const MAX_STRING_LEN: usize = 4096;

/// Error values of the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

/// Transmission commands; unknown codes are kept so they can be answered
/// with `EINVAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unsupported(u16),
}

impl Command {
    pub fn from_u16(v: u16) -> Self {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unsupported(other),
        }
    }
    pub fn to_u16(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unsupported(v) => v,
        }
    }
    /// Short stable name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Disc => "disc",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::Cache => "cache",
            Command::WriteZeroes => "write_zeroes",
            Command::BlockStatus => "block_status",
            Command::Unsupported(_) => "unsupported",
        }
    }
    /// The command flags valid for this command (FUA is valid on every
    /// command; it only has an effect on those that write).
    pub fn allowed_flags(self) -> u16 {
        match self {
            Command::Read => cmd_flags::FUA | cmd_flags::DF,
            Command::Write | Command::Trim | Command::Flush | Command::Cache => cmd_flags::FUA,
            Command::WriteZeroes => cmd_flags::FUA | cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
            Command::BlockStatus => cmd_flags::FUA | cmd_flags::REQ_ONE,
            Command::Disc | Command::Unsupported(_) => 0,
        }
    }
}

/// Why bytes could not be understood. Any of these ends the connection,
/// since the stream can no longer be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
}

/// Why an option's data is invalid: answered with `NBD_REP_ERR_INVALID`
/// (or `ERR_TOO_BIG`), and the handshake goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("invalid option data: {0}")]
    Invalid(&'static str),
    #[error("option data too large: {0}")]
    TooBig(&'static str),
}

impl OptionError {
    /// The option reply type that reports this error.
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionError::Invalid(_) => rep::ERR_INVALID,
            OptionError::TooBig(_) => rep::ERR_TOO_BIG,
        }
    }
}

/// The server greeting with the handshake flags this server uses.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(
        &(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES).to_be_bytes(),
    );
    b
}

/// What the client announced after the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Parses the client flags; unknown bits mean the client expects something
/// this server does not offer, and the spec says to disconnect.
pub fn parse_client_flags(b: &[u8]) -> Result<ClientFlags, ProtocolError> {
    let raw = u32::from_be_bytes(take::<4>(b, 0)?);
    if raw & !client_flags::ALL != 0 {
        return Err(ProtocolError::UnknownClientFlags(raw));
    }
    Ok(ClientFlags {
        fixed_newstyle: raw & client_flags::FIXED_NEWSTYLE != 0,
        no_zeroes: raw & client_flags::NO_ZEROES != 0,
    })
}

/// Header of one option request; `length` data bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

pub fn parse_option_header(b: &[u8]) -> Result<OptionHeader, ProtocolError> {
    let magic = u64::from_be_bytes(take::<8>(b, 0)?);
    if magic != IHAVEOPT {
        return Err(ProtocolError::BadMagic(magic));
    }
    Ok(OptionHeader {
        option: u32::from_be_bytes(take::<4>(b, 8)?),
        length: u32::from_be_bytes(take::<4>(b, 12)?),
    })
}

/// Export name and requested information items of `NBD_OPT_INFO`/`GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub export: String,
    pub requests: Vec<u16>,
}

/// Export name and queries of `NBD_OPT_LIST_META_CONTEXT`/`SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// A decoded option request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    /// Known to the spec or not, this server does not implement it.
    Unsupported(u32),
}

/// Decodes an option's data.
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, OptionError> {
    let no_data = |o: ClientOption| {
        if data.is_empty() {
            Ok(o)
        } else {
            Err(OptionError::Invalid("option takes no data"))
        }
    };
    match option {
        opt::EXPORT_NAME => {
            if data.len() > MAX_STRING_LEN {
                return Err(OptionError::TooBig("export name"));
            }
            Ok(ClientOption::ExportName(String::from_utf8_lossy(data).into_owned()))
        }
        opt::ABORT => Ok(ClientOption::Abort),
        opt::LIST => no_data(ClientOption::List),
        opt::STARTTLS => no_data(ClientOption::StartTls),
        opt::STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
        opt::INFO => parse_info_request(data).map(ClientOption::Info),
        opt::GO => parse_info_request(data).map(ClientOption::Go),
        opt::LIST_META_CONTEXT => parse_meta_request(data).map(ClientOption::ListMetaContext),
        opt::SET_META_CONTEXT => parse_meta_request(data).map(ClientOption::SetMetaContext),
        other => Ok(ClientOption::Unsupported(other)),
    }
}

/// A cursor over option data that fails instead of reading past the end.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], OptionError> {
        let end = self.pos.checked_add(n).ok_or(OptionError::Invalid("length overflow"))?;
        let s = self.data.get(self.pos..end).ok_or(OptionError::Invalid("truncated option"))?;
        self.pos = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, OptionError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, OptionError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Result<String, OptionError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_LEN {
            return Err(OptionError::TooBig("string longer than 4096 bytes"));
        }
        let b = self.bytes(len)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| OptionError::Invalid("string is not UTF-8"))
    }
    fn finish(&self) -> Result<(), OptionError> {
        if self.pos == self.data.len() {
            Ok(())
        } else {
            Err(OptionError::Invalid("trailing bytes in option"))
        }
    }
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest, OptionError> {
    let mut c = Cursor::new(data);
    let export = c.string()?;
    let count = c.u16()?;
    let mut requests = Vec::with_capacity(usize::from(count).min(16));
    for _ in 0..count {
        requests.push(c.u16()?);
    }
    c.finish()?;
    Ok(InfoRequest { export, requests })
}

/// Most queries one meta-context option may carry.
const MAX_META_QUERIES: u32 = 128;

fn parse_meta_request(data: &[u8]) -> Result<MetaContextRequest, OptionError> {
    let mut c = Cursor::new(data);
    let export = c.string()?;
    let count = c.u32()?;
    if count > MAX_META_QUERIES {
        return Err(OptionError::TooBig("too many metadata queries"));
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        queries.push(c.string()?);
    }
    c.finish()?;
    Ok(MetaContextRequest { export, queries })
}

/// One option reply: header and data.
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply_type.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// `NBD_REP_SERVER` data for `NBD_OPT_LIST`: name and description.
pub fn rep_server_data(name: &str, description: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len() + description.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(description.as_bytes());
    b
}

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&info::EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`: a type and a string.
pub fn info_string(info_type: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&info_type.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// Size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// The constraints of every pflex export: any byte alignment works
/// (unaligned writes become read-modify-write on the SDS), 4 KiB is the
/// efficient size, and 32 MiB is the largest payload.
pub const BLOCK_SIZES: BlockSizes =
    BlockSizes { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };

pub fn info_block_size(sizes: BlockSizes) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&sizes.minimum.to_be_bytes());
    b.extend_from_slice(&sizes.preferred.to_be_bytes());
    b.extend_from_slice(&sizes.maximum.to_be_bytes());
    b
}

/// `NBD_REP_META_CONTEXT` data: context id and name.
pub fn meta_context_data(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// Reply to `NBD_OPT_EXPORT_NAME`: size, flags and (unless the client
/// negotiated NO_ZEROES) 124 reserved zero bytes.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(10 + 124);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

/// Which metadata contexts a query selects: `base:allocation` for the
/// exact name, and (when listing) for the namespace wildcard `base:`.
/// Queries of other namespaces select nothing, as the spec requires.
pub fn query_selects_base_allocation(query: &str, listing: bool) -> bool {
    query == BASE_ALLOCATION || (listing && query == "base:")
}

/// One transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn has_flag(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
    /// Payload bytes that follow this header on the wire.
    pub fn payload_len(&self) -> usize {
        match self.command {
            Command::Write => self.length as usize,
            _ => 0,
        }
    }
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_u16().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

pub fn parse_request(b: &[u8]) -> Result<Request, ProtocolError> {
    let magic = u32::from_be_bytes(take::<4>(b, 0)?);
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError::BadMagic(u64::from(magic)));
    }
    Ok(Request {
        flags: u16::from_be_bytes(take::<2>(b, 4)?),
        command: Command::from_u16(u16::from_be_bytes(take::<2>(b, 6)?)),
        cookie: u64::from_be_bytes(take::<8>(b, 8)?),
        offset: u64::from_be_bytes(take::<8>(b, 16)?),
        length: u32::from_be_bytes(take::<4>(b, 24)?),
    })
}

/// What the negotiated session allows, for [`validate_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    pub export_size: u64,
    pub read_only: bool,
    pub structured_replies: bool,
    /// `NBD_OPT_SET_META_CONTEXT` selected `base:allocation` for this export.
    pub block_status: bool,
    pub max_payload: u32,
}

/// Checks a request against the session before any IO, giving the error
/// the spec recommends for each misuse.
pub fn validate_request(req: &Request, limits: &SessionLimits) -> Result<(), Errno> {
    if req.flags & !req.command.allowed_flags() != 0 {
        return Err(Errno::Inval);
    }
    let end = req.offset.checked_add(u64::from(req.length));
    let in_bounds = matches!(end, Some(e) if e <= limits.export_size);
    match req.command {
        Command::Unsupported(_) | Command::Disc => Err(Errno::Inval),
        Command::Flush => {
            if limits.read_only {
                // Nothing to flush, but harmless: accept.
                return Ok(());
            }
            Ok(())
        }
        Command::Read => {
            if req.has_flag(cmd_flags::DF) && !limits.structured_replies {
                return Err(Errno::Inval);
            }
            if req.length > limits.max_payload {
                return Err(if req.has_flag(cmd_flags::DF) {
                    Errno::Overflow
                } else {
                    Errno::Inval
                });
            }
            if req.length == 0 || !in_bounds {
                return Err(Errno::Inval);
            }
            Ok(())
        }
        Command::Write => {
            if req.length > limits.max_payload {
                return Err(Errno::Inval);
            }
            if limits.read_only {
                return Err(Errno::Perm);
            }
            if req.length == 0 {
                return Err(Errno::Inval);
            }
            if !in_bounds {
                return Err(Errno::NoSpc);
            }
            Ok(())
        }
        Command::WriteZeroes => {
            if limits.read_only {
                return Err(Errno::Perm);
            }
            if req.length == 0 {
                return Err(Errno::Inval);
            }
            if !in_bounds {
                return Err(Errno::NoSpc);
            }
            Ok(())
        }
        Command::Trim => {
            if limits.read_only {
                return Err(Errno::Perm);
            }
            if req.length == 0 || !in_bounds {
                return Err(Errno::Inval);
            }
            Ok(())
        }
        Command::Cache => {
            if req.length == 0 || !in_bounds {
                return Err(Errno::Inval);
            }
            Ok(())
        }
        Command::BlockStatus => {
            if !limits.structured_replies || !limits.block_status {
                return Err(Errno::Inval);
            }
            if req.length == 0 || !in_bounds {
                return Err(Errno::Inval);
            }
            Ok(())
        }
    }
}

/// A simple reply header (READ data, if any, follows).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header; `length` payload bytes follow.
pub fn structured_header(
    cookie: u64,
    flags: u16,
    chunk_type: u16,
    length: u32,
) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut b = [0u8; STRUCTURED_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// Header of an OFFSET_DATA chunk carrying `data_len` bytes read at `offset`.
pub fn offset_data_header(
    cookie: u64,
    done: bool,
    offset: u64,
    data_len: u32,
) -> [u8; OFFSET_DATA_HEADER_LEN] {
    let mut b = [0u8; OFFSET_DATA_HEADER_LEN];
    let flags = if done { reply_flags::DONE } else { 0 };
    b[..STRUCTURED_HEADER_LEN].copy_from_slice(&structured_header(
        cookie,
        flags,
        reply_type::OFFSET_DATA,
        data_len.saturating_add(8),
    ));
    b[STRUCTURED_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// An OFFSET_HOLE chunk: `length` bytes at `offset` read as zeroes.
pub fn offset_hole(cookie: u64, done: bool, offset: u64, length: u32) -> [u8; 32] {
    let mut b = [0u8; 32];
    let flags = if done { reply_flags::DONE } else { 0 };
    b[..20].copy_from_slice(&structured_header(cookie, flags, reply_type::OFFSET_HOLE, 12));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b[28..32].copy_from_slice(&length.to_be_bytes());
    b
}

/// The final NONE chunk.
pub fn none_chunk(cookie: u64) -> [u8; STRUCTURED_HEADER_LEN] {
    structured_header(cookie, reply_flags::DONE, reply_type::NONE, 0)
}

/// An ERROR chunk with a human-readable message (marked DONE).
pub fn error_chunk(cookie: u64, error: Errno, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(1024)];
    let mut b = Vec::with_capacity(STRUCTURED_HEADER_LEN + 6 + msg.len());
    b.extend_from_slice(&structured_header(
        cookie,
        reply_flags::DONE,
        reply_type::ERROR,
        6 + msg.len() as u32,
    ));
    b.extend_from_slice(&(error as u32).to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// One `base:allocation` extent descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub length: u32,
    pub status: u32,
}

/// A BLOCK_STATUS chunk for one context (marked DONE).
pub fn block_status_chunk(cookie: u64, context_id: u32, descriptors: &[Descriptor]) -> Vec<u8> {
    let len = 4 + 8 * descriptors.len();
    let mut b = Vec::with_capacity(STRUCTURED_HEADER_LEN + len);
    b.extend_from_slice(&structured_header(
        cookie,
        reply_flags::DONE,
        reply_type::BLOCK_STATUS,
        len as u32,
    ));
    b.extend_from_slice(&context_id.to_be_bytes());
    for d in descriptors {
        b.extend_from_slice(&d.length.to_be_bytes());
        b.extend_from_slice(&d.status.to_be_bytes());
    }
    b
}

/// Fixed-size big-endian field at `at`, or a truncation error.
fn take<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], ProtocolError> {
    let end = at + N;
    b.get(at..end)
        .and_then(|s| s.try_into().ok())
        .ok_or(ProtocolError::Truncated { need: end, have: b.len() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    fn limits() -> SessionLimits {
        SessionLimits {
            export_size: 1 << 30,
            read_only: false,
            structured_replies: true,
            block_status: true,
            max_payload: BLOCK_SIZES.maximum,
        }
    }

    #[test]
    fn greeting_bytes() {
        let g = greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            parse_client_flags(&3u32.to_be_bytes()).unwrap(),
            ClientFlags { fixed_newstyle: true, no_zeroes: true }
        );
        assert_eq!(
            parse_client_flags(&4u32.to_be_bytes()),
            Err(ProtocolError::UnknownClientFlags(4))
        );
        assert!(matches!(parse_client_flags(&[0, 0]), Err(ProtocolError::Truncated { .. })));
    }

    #[test]
    fn option_header_and_options() {
        let mut h = Vec::new();
        h.extend_from_slice(&IHAVEOPT.to_be_bytes());
        h.extend_from_slice(&opt::GO.to_be_bytes());
        h.extend_from_slice(&9u32.to_be_bytes());
        assert_eq!(parse_option_header(&h).unwrap(), OptionHeader { option: 7, length: 9 });
        h[0] = 0;
        assert!(matches!(parse_option_header(&h), Err(ProtocolError::BadMagic(_))));

        let go = parse_option(opt::GO, &info_data("vol1", &[info::NAME, info::BLOCK_SIZE]));
        assert_eq!(
            go.unwrap(),
            ClientOption::Go(InfoRequest { export: "vol1".into(), requests: vec![1, 3] })
        );
        let mut truncated = info_data("vol1", &[1, 3]);
        truncated.pop();
        assert!(matches!(parse_option(opt::INFO, &truncated), Err(OptionError::Invalid(_))));
        let mut trailing = info_data("vol1", &[]);
        trailing.push(0);
        assert!(parse_option(opt::GO, &trailing).is_err());
        assert_eq!(parse_option(opt::LIST, &[]).unwrap(), ClientOption::List);
        assert!(parse_option(opt::LIST, &[1]).is_err());
        assert!(parse_option(opt::STRUCTURED_REPLY, &[1]).is_err());
        assert_eq!(parse_option(opt::STARTTLS, &[]).unwrap(), ClientOption::StartTls);
        assert_eq!(parse_option(4242, &[1, 2, 3]).unwrap(), ClientOption::Unsupported(4242));
        assert_eq!(
            parse_option(opt::EXPORT_NAME, b"vol1").unwrap(),
            ClientOption::ExportName("vol1".into())
        );
        let meta = parse_option(opt::SET_META_CONTEXT, &meta_data("v", &["base:allocation"]));
        assert_eq!(
            meta.unwrap(),
            ClientOption::SetMetaContext(MetaContextRequest {
                export: "v".into(),
                queries: vec!["base:allocation".into()]
            })
        );
        let mut huge = meta_data("v", &[]);
        let n = huge.len();
        huge[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(parse_option(opt::LIST_META_CONTEXT, &huge), Err(OptionError::TooBig(_))));
    }

    #[test]
    fn request_roundtrip() {
        let r = Request {
            flags: cmd_flags::FUA,
            command: Command::Write,
            cookie: 0xdead_beef_0102_0304,
            offset: 1_048_000,
            length: 5000,
        };
        assert_eq!(parse_request(&r.encode()).unwrap(), r);
        assert_eq!(r.payload_len(), 5000);
        let mut raw = r.encode();
        raw[0] ^= 0xff;
        assert!(parse_request(&raw).is_err());
        assert_eq!(Command::from_u16(99), Command::Unsupported(99));
    }

    #[test]
    fn validation_follows_the_spec() {
        let l = limits();
        let req =
            |command, flags, offset, length| Request { flags, command, cookie: 1, offset, length };
        assert_eq!(validate_request(&req(Command::Read, 0, 0, 4096), &l), Ok(()));
        assert_eq!(
            validate_request(&req(Command::Read, 0, (1 << 30) - 1, 2), &l),
            Err(Errno::Inval)
        );
        assert_eq!(validate_request(&req(Command::Read, 0, u64::MAX, 2), &l), Err(Errno::Inval));
        assert_eq!(
            validate_request(&req(Command::Read, 0, 0, BLOCK_SIZES.maximum + 1), &l),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate_request(&req(Command::Read, cmd_flags::DF, 0, BLOCK_SIZES.maximum + 1), &l),
            Err(Errno::Overflow)
        );
        assert_eq!(validate_request(&req(Command::Write, 0, 1 << 30, 1), &l), Err(Errno::NoSpc));
        assert_eq!(
            validate_request(&req(Command::Write, cmd_flags::NO_HOLE, 0, 1), &l),
            Err(Errno::Inval)
        );
        assert_eq!(validate_request(&req(Command::WriteZeroes, 0, 0, 1 << 29), &l), Ok(()));
        assert_eq!(validate_request(&req(Command::Trim, 0, 1 << 30, 1), &l), Err(Errno::Inval));
        assert_eq!(validate_request(&req(Command::Unsupported(9), 0, 0, 1), &l), Err(Errno::Inval));
        let ro = SessionLimits { read_only: true, ..l };
        assert_eq!(validate_request(&req(Command::Write, 0, 0, 1), &ro), Err(Errno::Perm));
        assert_eq!(validate_request(&req(Command::Trim, 0, 0, 1), &ro), Err(Errno::Perm));
        assert_eq!(validate_request(&req(Command::Read, 0, 0, 1), &ro), Ok(()));
        let simple = SessionLimits { structured_replies: false, block_status: false, ..l };
        assert_eq!(
            validate_request(&req(Command::BlockStatus, 0, 0, 1), &simple),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate_request(&req(Command::Read, cmd_flags::DF, 0, 1), &simple),
            Err(Errno::Inval)
        );
    }

    #[test]
    fn reply_encodings() {
        let s = simple_reply(7, Errno::Inval as u32);
        assert_eq!(&s[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u32::from_be_bytes(s[4..8].try_into().unwrap()), 22);
        let d = offset_data_header(7, true, 4096, 512);
        assert_eq!(u16::from_be_bytes([d[4], d[5]]), reply_flags::DONE);
        assert_eq!(u16::from_be_bytes([d[6], d[7]]), reply_type::OFFSET_DATA);
        assert_eq!(u32::from_be_bytes(d[16..20].try_into().unwrap()), 520);
        assert_eq!(u64::from_be_bytes(d[20..28].try_into().unwrap()), 4096);
        let e = error_chunk(7, Errno::Io, "boom");
        assert_eq!(e.len(), 20 + 6 + 4);
        assert_eq!(u32::from_be_bytes(e[16..20].try_into().unwrap()), 10);
        let bs = block_status_chunk(7, 1, &[Descriptor { length: 4096, status: 3 }]);
        assert_eq!(bs.len(), 20 + 4 + 8);
        assert_eq!(u32::from_be_bytes(bs[16..20].try_into().unwrap()), 12);
        let r = option_reply(opt::LIST, rep::SERVER, &rep_server_data("vol1", "desc"));
        assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), OPTION_REPLY_MAGIC);
        assert_eq!(u32::from_be_bytes(r[16..20].try_into().unwrap()), 12);
        assert_eq!(export_name_reply(1, 2, false).len(), 134);
        assert_eq!(export_name_reply(1, 2, true).len(), 10);
        assert_eq!(info_block_size(BLOCK_SIZES).len(), 14);
        assert_eq!(info_export(5, 1).len(), 12);
    }

    #[test]
    fn meta_context_queries() {
        assert!(query_selects_base_allocation("base:allocation", false));
        assert!(query_selects_base_allocation("base:", true));
        assert!(!query_selects_base_allocation("base:", false));
        assert!(!query_selects_base_allocation("qemu:dirty-bitmap:x", true));
    }

    proptest! {
        #[test]
        fn random_option_data_never_panics(option in 0u32..16,
                                           data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_option(option, &data);
        }

        #[test]
        fn truncated_valid_options_are_rejected(cut in 0usize..40) {
            let full = meta_data("volume", &["base:allocation", "x:y"]);
            let cut = cut.min(full.len() - 1);
            prop_assert!(parse_option(opt::SET_META_CONTEXT, &full[..cut]).is_err());
            let full = info_data("volume", &[1, 2, 3]);
            let cut = cut.min(full.len() - 1);
            prop_assert!(parse_option(opt::GO, &full[..cut]).is_err());
        }

        #[test]
        fn random_headers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = parse_client_flags(&data);
            let _ = parse_option_header(&data);
            if let Ok(r) = parse_request(&data) {
                let _ = validate_request(&r, &limits());
                let _ = r.payload_len();
            }
        }

        #[test]
        fn request_roundtrip_any(flags in any::<u16>(), cmd in any::<u16>(), cookie in any::<u64>(),
                                 offset in any::<u64>(), length in any::<u32>()) {
            let r = Request { flags, command: Command::from_u16(cmd), cookie, offset, length };
            prop_assert_eq!(parse_request(&r.encode()).unwrap(), r);
            let v = validate_request(&r, &limits());
            if v.is_ok() {
                prop_assert!(offset.checked_add(u64::from(length)).is_some());
            }
        }
    }
}
