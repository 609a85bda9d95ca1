//! The NBD front end: the wire protocol ([`proto`], pure code) and the
//! server that speaks it over TCP ([`server`]).

pub mod proto;
pub mod server;
