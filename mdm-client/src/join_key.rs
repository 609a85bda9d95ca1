//! The join key every component presents at registration: read from
//! `--join-key-file` (preferred: command lines are visible to other local
//! users) or taken from `--join-key` / `PFLEX_JOIN_KEY`, trimmed, never empty.

use std::path::{Path, PathBuf};

/// Why no usable join key was found.
#[derive(Debug, thiserror::Error)]
pub enum JoinKeyError {
    #[error("a join key is required: --join-key-file PATH, --join-key KEY or PFLEX_JOIN_KEY")]
    Missing,
    #[error("reading join key file {}: {source}", path.display())]
    File { path: PathBuf, source: std::io::Error },
}

/// The join key from `file` if given, else from `key`.
pub fn resolve_join_key(file: Option<&Path>, key: Option<&str>) -> Result<String, JoinKeyError> {
    let key = match (file, key) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map_err(|source| JoinKeyError::File { path: path.to_path_buf(), source })?,
        (None, Some(key)) => key.to_string(),
        (None, None) => return Err(JoinKeyError::Missing),
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(JoinKeyError::Missing);
    }
    Ok(key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_first_trimmed_never_empty() {
        let dir = std::env::temp_dir().join(format!("pflex-join-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("join_key");
        std::fs::write(&file, "  from-file\n").unwrap();
        assert_eq!(resolve_join_key(Some(&file), Some("flag")).unwrap(), "from-file");
        assert_eq!(resolve_join_key(None, Some(" flag ")).unwrap(), "flag");
        assert!(matches!(resolve_join_key(None, None), Err(JoinKeyError::Missing)));
        assert!(matches!(resolve_join_key(None, Some("  ")), Err(JoinKeyError::Missing)));
        std::fs::write(&file, "\n").unwrap();
        assert!(matches!(resolve_join_key(Some(&file), None), Err(JoinKeyError::Missing)));
        let missing = dir.join("absent");
        assert!(matches!(resolve_join_key(Some(&missing), None), Err(JoinKeyError::File { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
