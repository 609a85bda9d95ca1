//! The `pflex` command-line tool.
//!
//! - [`cli`]: operator commands against the MDM (cluster, SDS, SDC and
//!   volume administration), human tables or `--json`;
//! - [`size`]: human size parsing and printing shared by every command.

pub mod cli;
pub mod size;
