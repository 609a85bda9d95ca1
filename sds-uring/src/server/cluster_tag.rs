//! Which cluster the chunks in this node's store belong to.
//!
//! Volume numbers and epochs are unique only within one cluster. An MDM
//! that comes back with empty state (its database and secret lost, or a new
//! one started on the same address) numbers its volumes from 1 again; a node
//! that joined it with the old cluster's chunks in its store would serve the
//! new volume 1 the old volume 1's bytes wherever the new one has not
//! written: another volume's data, maybe another tenant's.
//!
//! So the data directory records the cluster id (`cluster_id`, a public
//! digest of the cluster secret that every MDM member shares) the first time
//! the node registers, and every registration says which cluster the store's
//! chunks belong to ([`data_claim`]). An MDM of another cluster refuses the
//! node (409 `foreign_cluster_data`) and nothing is written there. The node
//! then keeps its data, serves nothing new, and keeps asking (its own MDM may
//! come back at that address); only when started with
//! `--erase-foreign-data` does it erase every chunk and join
//! ([`on_refusal`]), as an operator who means to reuse the node asks.

use std::io::Write;
use std::path::{Path, PathBuf};

/// File in the data directory holding the cluster id, one line.
pub const CLUSTER_ID_FILE: &str = "cluster_id";

/// Which cluster a registration says the store's data belongs to: the
/// recorded one while the store holds any chunk, none for an empty store
/// (it may join any cluster) or one from before ids were recorded.
pub fn data_claim(recorded: Option<&str>, holds_chunks: bool) -> Option<String> {
    recorded.filter(|_| holds_chunks).map(str::to_string)
}

/// What to do when the MDM refuses the node for holding another cluster's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Keep every chunk and the recorded id; serve nothing new; ask again later.
    KeepAndWait,
    /// Erase every chunk, forget the id, and register again.
    EraseAndJoin,
}

/// The decision, from `--erase-foreign-data`.
pub fn on_refusal(erase_foreign_data: bool) -> Refusal {
    if erase_foreign_data {
        Refusal::EraseAndJoin
    } else {
        Refusal::KeepAndWait
    }
}

/// The data directory's record of its cluster.
#[derive(Debug, Clone)]
pub struct ClusterTag {
    path: PathBuf,
}

impl ClusterTag {
    pub fn new(data_dir: &Path) -> Self {
        Self { path: data_dir.join(CLUSTER_ID_FILE) }
    }

    /// The recorded id (`None` if never recorded).
    pub fn read(&self) -> std::io::Result<Option<String>> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => Ok(Some(text.trim().to_string()).filter(|id| !id.is_empty())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Records `id` durably (a temporary file, fsynced, renamed over the
    /// old one, then the directory fsynced) before the node serves its cluster.
    pub fn record(&self, id: &str) -> std::io::Result<()> {
        let temporary = self.path.with_extension("tmp");
        let mut file = std::fs::File::create(&temporary)?;
        writeln!(file, "{id}")?;
        file.sync_all()?;
        std::fs::rename(&temporary, &self.path)?;
        sync_parent(&self.path)
    }

    /// Forgets the record (after the chunks were erased).
    pub fn forget(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => sync_parent(&self.path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_claims_its_cluster_only_while_it_holds_chunks() {
        let table = [
            (None, false, None),
            (None, true, None),
            (Some("a"), false, None),
            (Some("a"), true, Some("a")),
        ];
        for (recorded, holds_chunks, claim) in table {
            assert_eq!(
                data_claim(recorded, holds_chunks).as_deref(),
                claim,
                "recorded {recorded:?}, holds chunks {holds_chunks}"
            );
        }
    }

    #[test]
    fn only_the_operator_flag_erases() {
        assert_eq!(on_refusal(false), Refusal::KeepAndWait);
        assert_eq!(on_refusal(true), Refusal::EraseAndJoin);
    }

    #[test]
    fn the_record_survives_a_reopen_and_can_be_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let tag = ClusterTag::new(dir.path());
        assert_eq!(tag.read().unwrap(), None);
        tag.record("0123abcd").unwrap();
        assert_eq!(ClusterTag::new(dir.path()).read().unwrap().as_deref(), Some("0123abcd"));
        tag.record("ffff").unwrap();
        assert_eq!(tag.read().unwrap().as_deref(), Some("ffff"));
        tag.forget().unwrap();
        assert_eq!(tag.read().unwrap(), None);
        tag.forget().unwrap();
    }
}
