//! Cluster TLS: a cluster CA, the certificates it issues to nodes and NBD
//! clients, and the rustls configurations pflex's servers and clients use.
//!
//! One CA per cluster (like a Ceph or PowerFlex cluster's own CA; nothing
//! here trusts the system's roots): `pflex up` creates it and issues a
//! certificate to each component it starts and one NBD client certificate.
//! Every certificate chains to the CA directly and is valid for both server
//! and client authentication, so a node can serve TLS and present itself to
//! a peer with the same files.
//!
//! Files (PEM), in the directory given to a component with `--tls-dir`:
//! - a node: `ca-cert.pem`, `cert.pem`, `key.pem`;
//! - an NBD client: `ca-cert.pem`, `client-cert.pem`, `client-key.pem`, the
//!   layout libnbd (`tls-certificates=DIR`) and qemu (`tls-creds-x509,dir=DIR`)
//!   read, so one directory serves `nbdinfo`, `nbdcopy`, `qemu-io` and `fio`;
//! - the CA itself: `ca-cert.pem` and `ca-key.pem` (the only key that can
//!   make new certificates).
//!
//! Every file is written 0600 in a 0700 directory, certificates included
//! (they are not secret, but a data dir holds nothing others can read).
//!
//! The key algorithm is ECDSA P-256 (rcgen's default), accepted by rustls,
//! GnuTLS (libnbd, qemu, nbd-client) and OpenSSL alike.
//!
//! A certificate's common name is its holder's identity. A member of a
//! replicated MDM holds one named [`mdm_member_name`] of its member id: its
//! peers accept Raft messages only from, and answers only by, the member a
//! message claims to be (see the MDM's `raft::peer_auth`).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use rustls;
pub use tokio_rustls::server::TlsStream as ServerTlsStream;
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The CA certificate's file name (in every layout).
pub const CA_CERT: &str = "ca-cert.pem";
/// The CA's private key (only in the CA's own directory).
pub const CA_KEY: &str = "ca-key.pem";
/// A node's certificate and key.
pub const NODE_CERT: &str = "cert.pem";
pub const NODE_KEY: &str = "key.pem";
/// An NBD client's certificate and key (libnbd's and qemu's names).
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

/// The subject of every cluster CA (a reloaded CA is rebuilt from it, so the
/// certificates it issues name the same issuer as the stored CA certificate).
const CA_COMMON_NAME: &str = "pflex cluster CA";
/// Validity of the CA and of issued certificates.
const CA_YEARS: i64 = 10;
const CERT_DAYS: i64 = 825;

/// Why a TLS set-up failed; each keeps the file it was about.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a usable PEM certificate or key: {source}")]
    Pem { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("{path}: no certificate in the file")]
    NoCertificate { path: PathBuf },
    #[error("making a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.to_path_buf(), source }
}

/// Which files a certificate is written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `cert.pem` and `key.pem`: a pflex component.
    Node,
    /// `client-cert.pem` and `client-key.pem`: an NBD client tool.
    NbdClient,
}

impl Layout {
    fn files(self) -> (&'static str, &'static str) {
        match self {
            Layout::Node => (NODE_CERT, NODE_KEY),
            Layout::NbdClient => (CLIENT_CERT, CLIENT_KEY),
        }
    }
}

/// The cluster CA, able to issue certificates.
pub struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

impl ClusterCa {
    /// Creates a new CA in `dir` (0700; key 0600). Fails if one is there.
    pub fn create(dir: &Path) -> Result<ClusterCa, TlsError> {
        private_dir(dir)?;
        let key = KeyPair::generate()?;
        let mut params = ca_params();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365 * CA_YEARS);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        write_new(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&dir.join(CA_CERT), cert_pem.as_bytes(), 0o600)?;
        Ok(ClusterCa { issuer: Issuer::new(ca_params(), key), cert_pem })
    }

    /// Loads the CA kept in `dir` by [`ClusterCa::create`].
    pub fn load(dir: &Path) -> Result<ClusterCa, TlsError> {
        let key_path = dir.join(CA_KEY);
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let cert_path = dir.join(CA_CERT);
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        Ok(ClusterCa { issuer: Issuer::new(ca_params(), key), cert_pem })
    }

    /// Loads the CA in `dir`, creating it first if there is none.
    pub fn open_or_create(dir: &Path) -> Result<ClusterCa, TlsError> {
        if dir.join(CA_KEY).exists() {
            ClusterCa::load(dir)
        } else {
            ClusterCa::create(dir)
        }
    }

    /// The CA certificate (PEM), what every party trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `name`, valid for the host names and IP
    /// addresses in `sans`, and writes it with its key and the CA
    /// certificate into `dir` (0700; key 0600) in `layout`. An existing
    /// certificate there is replaced.
    pub fn issue(
        &self,
        name: &str,
        sans: &[String],
        dir: &Path,
        layout: Layout,
    ) -> Result<(), TlsError> {
        private_dir(dir)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        // qemu's x509 credentials insist on key encipherment as well, even
        // for an ECDSA key that never uses it.
        params.key_usages =
            vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(CERT_DAYS);
        let cert = params.signed_by(&key, &self.issuer)?;
        let (cert_file, key_file) = layout.files();
        write_replacing(&dir.join(key_file), key.serialize_pem().as_bytes(), 0o600)?;
        write_replacing(&dir.join(cert_file), cert.pem().as_bytes(), 0o600)?;
        write_replacing(&dir.join(CA_CERT), self.cert_pem.as_bytes(), 0o600)?;
        Ok(())
    }
}

/// Creates `dir` (and parents) with mode 0700 if missing.
fn private_dir(dir: &Path) -> Result<(), TlsError> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err(dir))
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(io_err(path))
}

/// Writes through a temporary file renamed over `path`, so a reader never
/// sees half a key.
fn write_replacing(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension("pem.tmp");
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, data, mode)?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Pem { path: path.to_path_buf(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_path_buf() });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|source| TlsError::Pem { path: path.to_path_buf(), source })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(dir: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let path = dir.join(CA_CERT);
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(&path)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

/// Whether a server asks its clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Any client (HTTP APIs: requests carry their own bearer tokens).
    None,
    /// Any client; one that presents a certificate must present one issued
    /// by the cluster CA (the MDM's API: its members prove who they are with
    /// theirs, other callers with bearer tokens).
    Optional,
    /// Only clients with a certificate issued by the cluster CA (NBD).
    Required,
}

/// A node's TLS material, as given with `--tls-dir`.
#[derive(Debug, Clone)]
pub struct NodeTls {
    pub dir: PathBuf,
}

impl NodeTls {
    pub fn new(dir: impl Into<PathBuf>) -> NodeTls {
        NodeTls { dir: dir.into() }
    }

    /// The CA certificate's path.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    /// A server configuration presenting this node's certificate. `alpn`
    /// lists the application protocols offered (empty: none).
    pub fn server_config(
        &self,
        client_auth: ClientAuth,
        alpn: &[&[u8]],
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let certs = load_certs(&self.dir.join(NODE_CERT))?;
        let key = load_key(&self.dir.join(NODE_KEY))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(rustls::ALL_VERSIONS)?;
        let builder = match client_auth {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::Required | ClientAuth::Optional => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots(&self.dir)?,
                    provider(),
                );
                let verifier = if client_auth == ClientAuth::Optional {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                builder.with_client_cert_verifier(verifier.build()?)
            }
        };
        let mut config = builder.with_single_cert(certs, key)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// An acceptor for [`NodeTls::server_config`].
    pub fn acceptor(&self, client_auth: ClientAuth) -> Result<TlsAcceptor, TlsError> {
        Ok(TlsAcceptor::from(self.server_config(client_auth, &[])?))
    }
}

/// A client configuration that trusts only the CA in `dir` and presents the
/// certificate found there (a node's or an NBD client's), if any.
pub fn client_config(dir: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(rustls::ALL_VERSIONS)?
        .with_root_certificates(roots(dir)?);
    let pair = [Layout::Node, Layout::NbdClient]
        .into_iter()
        .map(Layout::files)
        .find(|(cert, _)| dir.join(cert).exists());
    let config = match pair {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(&dir.join(cert))?, load_key(&dir.join(key))?)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The common name of a certificate (DER), its holder's identity; None when
/// the certificate cannot be parsed or names nobody.
pub fn certificate_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(name.to_string())
}

/// Prefix of the certificate names of MDM members.
const MDM_MEMBER_PREFIX: &str = "pflex-mdm-";

/// The certificate name of MDM member `id`.
pub fn mdm_member_name(id: u64) -> String {
    format!("{MDM_MEMBER_PREFIX}{id}")
}

/// The MDM member id a certificate name gives, if it names a member.
pub fn mdm_member_of(name: &str) -> Option<u64> {
    let id = name.strip_prefix(MDM_MEMBER_PREFIX)?;
    // Canonical decimal only: "pflex-mdm-01" names nobody.
    if id.starts_with('0') || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    id.parse().ok()
}

/// The CA certificate in `dir`, PEM, for HTTP clients that take one.
pub fn ca_pem(dir: &Path) -> Result<Vec<u8>, TlsError> {
    let path = dir.join(CA_CERT);
    fs::read(&path).map_err(io_err(&path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create(&tmp.path().join("ca")).unwrap();
        ca.issue("n1", &["localhost".into()], &tmp.path().join("n1"), Layout::Node).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&tmp.path().join("ca")), 0o700);
        assert_eq!(mode(&tmp.path().join("ca").join(CA_KEY)), 0o600);
        assert_eq!(mode(&tmp.path().join("n1")), 0o700);
        assert_eq!(mode(&tmp.path().join("n1").join(NODE_KEY)), 0o600);
        assert!(ClusterCa::create(&tmp.path().join("ca")).is_err(), "a CA is never overwritten");
    }

    #[test]
    fn certificate_names_and_member_ids() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = ClusterCa::create(&tmp.path().join("ca")).unwrap();
        ca.issue(&mdm_member_name(3), &[], &tmp.path().join("m"), Layout::Node).unwrap();
        let der = load_certs(&tmp.path().join("m").join(NODE_CERT)).unwrap().remove(0);
        let name = certificate_name(&der).unwrap();
        assert_eq!(name, "pflex-mdm-3");
        assert_eq!(mdm_member_of(&name), Some(3));
        assert_eq!(certificate_name(b"not a certificate"), None);
        for (name, id) in [
            ("pflex-mdm-1", Some(1)),
            ("pflex-mdm-12", Some(12)),
            ("pflex-mdm-01", None),
            ("pflex-mdm-", None),
            ("pflex-mdm-+1", None),
            ("pflex-mdm-1 ", None),
            ("sds1", None),
            ("mdm", None),
        ] {
            assert_eq!(mdm_member_of(name), id, "{name}");
        }
    }

    /// A reloaded CA issues certificates that chain to the stored CA
    /// certificate; a client of another CA is refused.
    #[tokio::test]
    async fn mutual_tls_with_a_reloaded_ca_and_a_stranger_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let ca_dir = tmp.path().join("ca");
        drop(ClusterCa::create(&ca_dir).unwrap());
        let ca = ClusterCa::load(&ca_dir).unwrap();
        let server_dir = tmp.path().join("server");
        ca.issue("sdc1", &["localhost".into(), "127.0.0.1".into()], &server_dir, Layout::Node)
            .unwrap();
        let client_dir = tmp.path().join("client");
        ca.issue("nbd-client", &[], &client_dir, Layout::NbdClient).unwrap();
        let other = ClusterCa::create(&tmp.path().join("other-ca")).unwrap();
        let stranger_dir = tmp.path().join("stranger");
        other.issue("x", &[], &stranger_dir, Layout::NbdClient).unwrap();
        // The stranger trusts our CA, but its certificate is from another.
        fs::copy(ca_dir.join(CA_CERT), stranger_dir.join(CA_CERT)).unwrap();

        let acceptor = NodeTls::new(&server_dir).acceptor(ClientAuth::Required).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                match acceptor.accept(tcp).await {
                    Ok(mut tls) => {
                        let mut b = [0u8; 4];
                        tls.read_exact(&mut b).await.unwrap();
                        tls.write_all(&b).await.unwrap();
                        tls.shutdown().await.unwrap();
                        outcomes.push(true);
                    }
                    Err(_) => outcomes.push(false),
                }
            }
            outcomes
        });
        let connect = |dir: PathBuf| async move {
            let connector = TlsConnector::from(client_config(&dir).unwrap());
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await?;
            tls.write_all(b"ping").await?;
            let mut b = [0u8; 4];
            tls.read_exact(&mut b).await?;
            Ok::<_, std::io::Error>(b)
        };
        assert_eq!(&connect(client_dir).await.unwrap(), b"ping");
        assert!(connect(stranger_dir).await.is_err());
        assert_eq!(server.await.unwrap(), vec![true, false]);
    }
}
