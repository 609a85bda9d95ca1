//! Serving the HTTP APIs (the MDM's, the dashboard's, and the SDS and SDC
//! control and management ports) so that strangers cannot exhaust them.
//!
//! - Connections take slots ([`pflex_dataplane::Slots`]): at
//!   [`Limits::max_connections`] a new one evicts a connection that never
//!   sent a request (oldest first), else the one idle longest, so a flood of
//!   idle sockets cannot keep out heartbeats, probes or an operator.
//! - A request's headers must arrive within [`Limits::header_read_timeout`].
//! - Each request carries the peer address as axum's `ConnectInfo`.
//! - With a TLS acceptor (the node's certificate from the cluster CA) the
//!   listener speaks HTTPS only; the TLS handshake must also finish within
//!   the header-read timeout, and a plain request gets no answer. A client
//!   certificate, when the acceptor asks for one and the client presents
//!   it, names the caller: every request on that connection carries
//!   [`PeerCertificate`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
pub use pflex_tls::TlsAcceptor;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// The limits of one HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_connections: 512, header_read_timeout: Duration::from_secs(10) }
    }
}

/// What this process's HTTP listeners counted (for `/metrics`).
#[derive(Debug, Default)]
pub struct HttpCounters {
    pub connections: AtomicU64,
    /// Connections closed to make room (see [`Limits::max_connections`]).
    pub evicted: AtomicU64,
    /// TLS handshakes that failed or did not finish in time.
    pub tls_failures: AtomicU64,
}

/// The counters of every listener of this process.
pub static COUNTERS: HttpCounters = HttpCounters {
    connections: AtomicU64::new(0),
    evicted: AtomicU64::new(0),
    tls_failures: AtomicU64::new(0),
};

/// Appends the counters in Prometheus text, named `{prefix}_http_...`.
pub fn render_metrics(prefix: &str, out: &mut String) {
    use std::fmt::Write;
    for (name, help, value) in [
        ("connections_total", "HTTP connections accepted.", &COUNTERS.connections),
        (
            "connections_evicted_total",
            "HTTP connections closed to make room for new ones (idle ones first).",
            &COUNTERS.evicted,
        ),
        (
            "tls_failures_total",
            "HTTPS connections whose TLS handshake failed or did not finish in time.",
            &COUNTERS.tls_failures,
        ),
    ] {
        let _ = writeln!(out, "# HELP {prefix}_http_{name} {help}");
        let _ = writeln!(out, "# TYPE {prefix}_http_{name} counter");
        let _ = writeln!(out, "{prefix}_http_{name} {}", value.load(Ordering::Relaxed));
    }
}

/// The name on the client certificate of the HTTPS connection a request
/// came on (verified against the cluster CA in the handshake); None when
/// the client presented none. Absent on plain HTTP connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate(pub Option<String>);

/// The HTTPS acceptor of a node whose TLS files (`ca-cert.pem`, `cert.pem`,
/// `key.pem`) are in `dir`, its `--tls-dir`. Clients are not asked for
/// certificates: every API call carries its own bearer credential.
pub fn tls_acceptor(dir: &std::path::Path) -> Result<TlsAcceptor, pflex_tls::TlsError> {
    pflex_tls::NodeTls::new(dir).acceptor(pflex_tls::ClientAuth::None)
}

/// Like [`tls_acceptor`], but clients may present a certificate from the
/// cluster CA, and its name reaches handlers as [`PeerCertificate`].
pub fn tls_acceptor_naming_clients(
    dir: &std::path::Path,
) -> Result<TlsAcceptor, pflex_tls::TlsError> {
    pflex_tls::NodeTls::new(dir).acceptor(pflex_tls::ClientAuth::Optional)
}

/// Serves `router` on `listener` with `limits` (over TLS when `tls` is
/// given) until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let counters = &COUNTERS;
    let slots = pflex_dataplane::Slots::new(limits.max_connections);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        counters.connections.fetch_add(1, Ordering::Relaxed);
        let mut slot = slots.admit();
        let activity = slot.handle();
        let router = router.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = move |certificate: Option<PeerCertificate>| {
                hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    activity.touch();
                    let mut request = request.map(axum::body::Body::new);
                    request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                    if let Some(certificate) = &certificate {
                        request.extensions_mut().insert(certificate.clone());
                    }
                    let router = router.clone();
                    async move {
                        Ok::<_, Infallible>(
                            router.oneshot(request).await.unwrap_or_else(|e| match e {}),
                        )
                    }
                })
            };
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
            match tls {
                None => {
                    let connection = builder.serve_connection(TokioIo::new(stream), service(None));
                    run_connection(connection, &mut slot.evicted, counters).await;
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
                    let stream = tokio::select! {
                        done = handshake => match done {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                counters.tls_failures.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                counters.tls_failures.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                        },
                        _ = &mut slot.evicted => {
                            counters.evicted.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    };
                    let name = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(|leaf| pflex_tls::certificate_name(leaf));
                    let service = service(Some(PeerCertificate(name)));
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    run_connection(connection, &mut slot.evicted, counters).await;
                }
            }
        });
    }
}

/// Drives one HTTP connection until it ends or its slot is taken (then
/// closes it gracefully, within 5 s).
async fn run_connection<I, S>(
    connection: hyper::server::conn::http1::Connection<I, S>,
    evicted: &mut tokio::sync::oneshot::Receiver<()>,
    counters: &HttpCounters,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = evicted => {
            counters.evicted.fetch_add(1, Ordering::Relaxed);
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
        }
    }
}
