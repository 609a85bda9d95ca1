//! How a component proves itself when it registers, and where it keeps the
//! credential it is given.
//!
//! - First start: a one-time enrollment token (`--enrollment-token-file`,
//!   minted by `pflex sds add` / `pflex sdc add`; `pflex up` does it for its
//!   children) or the cluster's join key (`--join-key-file`, a bootstrap
//!   secret for scripted installs).
//! - Every later start: the credential the MDM issued, kept in
//!   `DATA_DIR/credential` (0600). A registered name only ever goes back to
//!   the holder of its credential (or after an admin reset of the name).
//!
//! File arguments are preferred to values on the command line, which other
//! local users can read.

use std::io::Write;
use std::path::{Path, PathBuf};

use pflex_proto::api::RegisterRequest;

/// Name of the credential file in a component's data dir.
pub const CREDENTIAL_FILE: &str = "credential";

/// Why no usable proof was found or the credential could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum EnrollmentError {
    #[error(
        "this node has no credential yet ({credential}) and no way to enroll: give \
         --enrollment-token-file PATH (pflex sds add / pflex sdc add print one) or --join-key-file PATH",
        credential = .credential.display()
    )]
    Missing { credential: PathBuf },
    #[error("reading {}: {source}", path.display())]
    File { path: PathBuf, source: std::io::Error },
    #[error("{} is empty", path.display())]
    Empty { path: PathBuf },
}

/// The proofs a component brings to registration.
#[derive(Debug, Clone)]
pub struct Enrollment {
    join_key: Option<String>,
    enrollment_token: Option<String>,
    credential_path: PathBuf,
}

fn read_trimmed(path: &Path) -> Result<String, EnrollmentError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| EnrollmentError::File { path: path.to_path_buf(), source })?;
    let text = text.trim();
    if text.is_empty() {
        return Err(EnrollmentError::Empty { path: path.to_path_buf() });
    }
    Ok(text.to_string())
}

impl Enrollment {
    /// Gathers the proofs of a component whose data dir is `data_dir`. An
    /// enrollment token file that is gone is fine once a credential is kept
    /// (the token was used at the first start).
    pub fn resolve(
        data_dir: &Path,
        enrollment_token_file: Option<&Path>,
        join_key_file: Option<&Path>,
        join_key: Option<&str>,
    ) -> Result<Self, EnrollmentError> {
        let credential_path = data_dir.join(CREDENTIAL_FILE);
        let has_credential = credential_path.exists();
        let join_key = match (join_key_file, join_key) {
            (Some(path), _) => Some(read_trimmed(path)?),
            (None, Some(key)) if !key.trim().is_empty() => Some(key.trim().to_string()),
            _ => None,
        };
        let enrollment_token = match enrollment_token_file {
            Some(path) if path.exists() || !has_credential => Some(read_trimmed(path)?),
            _ => None,
        };
        if !has_credential && join_key.is_none() && enrollment_token.is_none() {
            return Err(EnrollmentError::Missing { credential: credential_path });
        }
        Ok(Self { join_key, enrollment_token, credential_path })
    }

    /// Puts every proof at hand into `request` (the kept credential is read
    /// now, so a credential stored by an earlier registration is used).
    pub fn fill(&self, request: &mut RegisterRequest) {
        request.join_key = self.join_key.clone().unwrap_or_default();
        request.enrollment_token = self.enrollment_token.clone();
        request.credential = read_trimmed(&self.credential_path).ok();
    }

    /// Keeps `credential` (atomically, 0600) before it is used.
    /// [`Enrollment::store`] on the blocking pool (it syncs a file), for
    /// callers on an async thread.
    pub async fn store_off_thread(&self, credential: &str) -> Result<(), EnrollmentError> {
        let (this, credential) = (self.clone(), credential.to_string());
        match tokio::task::spawn_blocking(move || this.store(&credential)).await {
            Ok(stored) => stored,
            Err(e) => Err(EnrollmentError::File {
                path: self.credential_path.clone(),
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    pub fn store(&self, credential: &str) -> Result<(), EnrollmentError> {
        let path = &self.credential_path;
        let failed = |source| EnrollmentError::File { path: path.clone(), source };
        let temporary = path.with_extension("tmp");
        let _ = std::fs::remove_file(&temporary);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&temporary).map_err(failed)?;
        file.write_all(credential.as_bytes()).map_err(failed)?;
        file.sync_all().map_err(failed)?;
        drop(file);
        std::fs::rename(&temporary, path).map_err(failed)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RegisterRequest {
        serde_json::from_value(serde_json::json!({
            "node_type": "SDC", "name": "c1", "host": "127.0.0.1"
        }))
        .unwrap()
    }

    #[test]
    fn proofs_from_files_then_the_kept_credential() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("enroll");
        assert!(matches!(
            Enrollment::resolve(dir.path(), None, None, None),
            Err(EnrollmentError::Missing { .. })
        ));
        assert!(matches!(
            Enrollment::resolve(dir.path(), Some(&token), None, None),
            Err(EnrollmentError::File { .. })
        ));
        std::fs::write(&token, " t1 \n").unwrap();
        let e = Enrollment::resolve(dir.path(), Some(&token), None, Some(" k ")).unwrap();
        let mut r = request();
        e.fill(&mut r);
        assert_eq!((r.enrollment_token.as_deref(), r.join_key.as_str()), (Some("t1"), "k"));
        assert_eq!(r.credential, None);
        e.store("cred").unwrap();
        e.fill(&mut r);
        assert_eq!(r.credential.as_deref(), Some("cred"));
        use std::os::unix::fs::PermissionsExt;
        let mode =
            std::fs::metadata(dir.path().join(CREDENTIAL_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // The token file may go once a credential is kept.
        std::fs::remove_file(&token).unwrap();
        let later = Enrollment::resolve(dir.path(), Some(&token), None, None).unwrap();
        let mut r = request();
        later.fill(&mut r);
        assert_eq!((r.credential.as_deref(), r.enrollment_token), (Some("cred"), None));
    }
}
