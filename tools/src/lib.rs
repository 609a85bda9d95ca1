//! The `pflex` command-line tool.
//!
//! - [`cli`]: operator commands against the MDM (cluster, SDS, SDC and
//!   volume administration), human tables or `--json`;
//! - [`up`]: `pflex up`, a whole local cluster as child processes;
//! - [`mod@bench`]: `pflex bench`, fio against pflex, qemu-nbd, qemu-nbd behind one proxy hop
//!   and the local disk; `pflex bench mdm` ([`mdm_bench`]), the MDM under a large cluster's load;
//! - [`nbd_probe`]: the few NBD handshake steps `up` and `bench` use to wait for a server;
//! - [`verify`]: `pflex verify`, the "no acknowledged write lost" check (write, then check).

pub mod bench;
pub mod chaos;
pub mod cli;
pub mod lab;
pub mod mdm_bench;
pub mod nbd_probe;
pub mod rebuild_bench;
pub mod sdc_wait;
pub mod up;
pub mod verify;
