//! The SDS's HTTP ports.
//!
//! - mgmt (9200+N): `GET /health` ([`ComponentStatus`]), `GET /metrics`
//!   (Prometheus text);
//! - control (9100+N): the same two, plus
//!   `GET /chunk/{volume_id}/{chunk_index}/checksum` ([`ChunkChecksum`]),
//!   used by tests and, later, by scrubbing; `GET /devices` (each device,
//!   its use, and why it failed if it did); `GET /chunks` (every allocated
//!   chunk, `?volume=ID` for one volume's); and, only on an SDS started with
//!   `--fault-injection`, `POST /faults/device` (`{"device": "0" or a path,
//!   "fault": "hang" | "eio" | "slow" (with "delay_ms") | "none"}`);
//!   `GET /scrub` (scrub state and the last pass's report) and `POST
//!   /scrub` (start a pass now).
//!
//! Errors are mapped to [`ApiError`] bodies in one place ([`ErrorReply`]).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pflex_proto::api::{ApiError, ChunkChecksum, ComponentStatus};
use tokio::net::TcpListener;

use super::SdsNode;
use crate::engine::faults::DeviceFault;

/// Serves `router` on `listener` until the process ends (with the limits
/// of `pflex_httpd`; HTTPS only when `tls` is given).
pub async fn serve(listener: TcpListener, router: Router, tls: Option<pflex_httpd::TlsAcceptor>) {
    let limits = pflex_httpd::Limits::default();
    pflex_httpd::serve(listener, router, limits, tls, std::future::pending()).await;
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
        .route("/devices", get(devices))
        .route("/chunks", get(chunks))
        .route("/faults/device", post(set_device_fault))
        .route("/scrub", get(scrub_status).post(scrub_start))
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

async fn scrub_status(State(node): State<Arc<SdsNode>>) -> Json<super::scrub::ScrubStatus> {
    Json(node.scrubber.status())
}

/// Starts a scrub pass now (202), unless one runs (409).
async fn scrub_start(State(node): State<Arc<SdsNode>>) -> Response {
    if super::scrub::Scrubber::start(&node) {
        (StatusCode::ACCEPTED, Json(node.scrubber.status())).into_response()
    } else {
        ErrorReply(StatusCode::CONFLICT, "scrub_running", "a scrub pass is running".into())
            .into_response()
    }
}

/// One device of `GET /devices`.
#[derive(serde::Serialize)]
struct DeviceStatus {
    index: usize,
    path: String,
    capacity_bytes: u64,
    used_bytes: u64,
    /// Why the device failed; absent while it serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    failed: Option<String>,
    /// The injected fault (only with `--fault-injection`).
    #[serde(skip_serializing_if = "Option::is_none")]
    fault: Option<DeviceFault>,
}

async fn devices(State(node): State<Arc<SdsNode>>) -> Json<Vec<DeviceStatus>> {
    let failed: std::collections::HashMap<usize, String> =
        node.store.failed_devices().into_iter().map(|(i, _, why)| (i, why)).collect();
    let faults = node.store.fault_handle().map(|h| h.faults()).unwrap_or_default();
    Json(
        node.store
            .devices()
            .into_iter()
            .enumerate()
            .map(|(index, d)| DeviceStatus {
                index,
                path: d.path,
                capacity_bytes: d.capacity_bytes,
                used_bytes: d.used_bytes,
                failed: failed.get(&index).cloned(),
                fault: faults.get(index).copied(),
            })
            .collect(),
    )
}

#[derive(serde::Deserialize)]
struct ChunksQuery {
    volume: Option<u64>,
}

/// `[[volume_id, chunk_index], ...]` of every allocated chunk.
async fn chunks(
    State(node): State<Arc<SdsNode>>,
    Query(query): Query<ChunksQuery>,
) -> Json<Vec<(u64, u64)>> {
    let mut chunks = node.store.allocated_chunks();
    if let Some(volume) = query.volume {
        chunks.retain(|(v, _)| *v == volume);
    }
    Json(chunks)
}

// (No `deny_unknown_fields`: serde does not support it with `flatten`.)
#[derive(serde::Deserialize)]
struct FaultRequest {
    /// Device index or path.
    device: String,
    #[serde(flatten)]
    fault: DeviceFault,
}

async fn set_device_fault(
    State(node): State<Arc<SdsNode>>,
    body: Result<Json<FaultRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Vec<DeviceFault>>, ErrorReply> {
    let Some(handle) = node.store.fault_handle() else {
        return Err(ErrorReply(
            StatusCode::NOT_FOUND,
            "fault_injection_off",
            "this SDS was not started with --fault-injection".into(),
        ));
    };
    let Json(request) =
        body.map_err(|e| ErrorReply(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let index = request
        .device
        .parse::<usize>()
        .ok()
        .or_else(|| node.store.device_index(std::path::Path::new(&request.device)))
        .ok_or_else(|| {
            ErrorReply(
                StatusCode::NOT_FOUND,
                "no_such_device",
                format!("no device {:?} on this SDS", request.device),
            )
        })?;
    if !handle.set(index, request.fault) {
        return Err(ErrorReply(
            StatusCode::NOT_FOUND,
            "no_such_device",
            format!("no device {index} on this SDS"),
        ));
    }
    tracing::warn!(device = index, fault = ?request.fault, "device fault injected");
    Ok(Json(handle.faults()))
}

/// An HTTP error with its [`ApiError`] body.
pub struct ErrorReply(StatusCode, &'static str, String);

impl IntoResponse for ErrorReply {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1.into(), message: self.2 })).into_response()
    }
}
