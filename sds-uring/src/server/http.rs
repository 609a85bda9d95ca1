//! The SDS's HTTP ports.
//!
//! - mgmt (9200+N): `GET /health` ([`ComponentStatus`]), `GET /metrics`
//!   (Prometheus text);
//! - control (9100+N): the same two, plus
//!   `GET /chunk/{volume_id}/{chunk_index}/checksum` ([`ChunkChecksum`]),
//!   used by tests and, later, by scrubbing.
//!
//! Errors are mapped to [`ApiError`] bodies in one place ([`ErrorReply`]).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use pflex_proto::api::{ApiError, ChunkChecksum, ComponentStatus};
use tokio::net::TcpListener;

use super::SdsNode;

/// Serves `router` on `listener` until the process ends.
pub async fn serve(listener: TcpListener, router: Router) {
    if let Err(e) = axum::serve(listener, router).await {
        tracing::error!(error = %e, "HTTP server stopped");
    }
}

/// Routes of the management port.
pub fn mgmt_router(node: Arc<SdsNode>) -> Router {
    Router::new().route("/health", get(health)).route("/metrics", get(metrics)).with_state(node)
}

/// Routes of the control port.
pub fn control_router(node: Arc<SdsNode>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/chunk/{volume_id}/{chunk_index}/checksum", get(chunk_checksum))
        .with_state(node)
}

async fn health(State(node): State<Arc<SdsNode>>) -> Json<ComponentStatus> {
    let identity = node.identity();
    Json(ComponentStatus {
        component: "sds".into(),
        name: node.config.name.clone(),
        // RECOVERING: registered, but leases this node may have granted
        // before a restart may still run, so it does not serve as a primary
        // yet (see `lease`).
        status: match (&identity, node.leases.as_ref().is_some_and(|l| l.restart_wait_pending())) {
            (None, _) => "REGISTERING",
            (Some(_), true) => "RECOVERING",
            (Some(_), false) => "ACTIVE",
        }
        .into(),
        node_id: identity.as_ref().map(|i| i.node_id),
        registered: identity.is_some(),
        uptime_secs: node.uptime_secs(),
    })
}

async fn metrics(State(node): State<Arc<SdsNode>>) -> Response {
    let text = node.metrics.render(&node.config.name, node.gauges());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn chunk_checksum(
    State(node): State<Arc<SdsNode>>,
    Path((volume_id, chunk_index)): Path<(u64, u64)>,
) -> Result<Json<ChunkChecksum>, ErrorReply> {
    node.store
        .chunk_checksum(volume_id, chunk_index)
        .await
        .map(Json)
        .map_err(|e| ErrorReply(StatusCode::INTERNAL_SERVER_ERROR, "io_error", e.to_string()))
}

/// An HTTP error with its [`ApiError`] body.
pub struct ErrorReply(StatusCode, &'static str, String);

impl IntoResponse for ErrorReply {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1.into(), message: self.2 })).into_response()
    }
}
