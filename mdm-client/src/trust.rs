//! The cluster CA this process trusts for HTTPS.
//!
//! A cluster that runs TLS serves every HTTP API over HTTPS with
//! certificates from its own CA (see `pflex-tls`); nothing here trusts the
//! system's roots. A process calls [`trust_cluster_ca`] once at start (from
//! its `--tls-dir`), and every HTTP client it builds with
//! [`http_client_builder`] (the MDM client among them) then verifies servers
//! against that CA alone. Without it clients speak plain HTTP only.

use std::path::Path;
use std::sync::OnceLock;

static CLUSTER_TLS: OnceLock<pflex_tls::rustls::ClientConfig> = OnceLock::new();

/// Trusts the CA certificate in `dir` (and presents the node certificate
/// found there, if any) for every HTTP client built from now on. The first
/// call wins; later calls change nothing.
pub fn trust_cluster_ca(dir: &Path) -> Result<(), pflex_tls::TlsError> {
    let config = pflex_tls::client_config(dir)?;
    let _ = CLUSTER_TLS.set((*config).clone());
    Ok(())
}

/// Whether this process speaks HTTPS to the cluster.
pub fn cluster_tls() -> bool {
    CLUSTER_TLS.get().is_some()
}

/// `http` or `https`, as this process's cluster speaks.
pub fn scheme() -> &'static str {
    if cluster_tls() {
        "https"
    } else {
        "http"
    }
}

/// Longest a pooled connection is reused after its last response: well
/// below the servers' 10 s idle limit.
pub const IDLE_CONNECTION_REUSE: std::time::Duration = std::time::Duration::from_secs(5);

/// A reqwest client builder that trusts the cluster CA when one is set.
pub fn http_client_builder() -> reqwest::ClientBuilder {
    // pflex servers close a connection that sends no request within 10 s
    // (`pflex_httpd::Limits::header_read_timeout`); a client that reused one
    // idle that long could send into a closing socket and fail the request.
    let builder = reqwest::Client::builder().pool_idle_timeout(IDLE_CONNECTION_REUSE);
    match CLUSTER_TLS.get() {
        Some(config) => builder.use_preconfigured_tls(config.clone()),
        None => builder,
    }
}
