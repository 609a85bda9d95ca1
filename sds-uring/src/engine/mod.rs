//! IO engines: how the chunk store reaches its device files.
//!
//! Two engines sit behind one small trait: an io_uring engine (O_DIRECT,
//! one ring per device thread) and a plain `pread`/`pwrite` engine for tests
//! and filesystems without O_DIRECT.

use std::fmt;
use std::str::FromStr;

/// Which IO engine a store uses (`--io-engine uring|sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EngineKind {
    /// io_uring with O_DIRECT files, one ring per device thread.
    #[default]
    Uring,
    /// Plain `pread`/`pwrite` on buffered files.
    Sync,
}

impl FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "uring" | "io_uring" => Ok(Self::Uring),
            "sync" => Ok(Self::Sync),
            other => Err(format!("unknown IO engine {other:?}; expected \"uring\" or \"sync\"")),
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Uring => "uring",
            Self::Sync => "sync",
        })
    }
}
