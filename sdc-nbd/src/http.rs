//! The SDC's HTTP ports.
//!
//! - mgmt port: `GET /health` (JSON [`ComponentStatus`]) and `GET /metrics`
//!   (Prometheus text: NBD front end, per-volume IO, routing refreshes);
//! - control port: `GET /volumes` (the mapped volumes with their routing
//!   state and NBD URI) and `POST /volumes/refresh` (fetch the mappings from
//!   the MDM now, then answer like `GET /volumes`), so `pflex volume map`
//!   returns once the SDC serves the change instead of a heartbeat later.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use pflex_proto::api::ComponentStatus;
use serde::Serialize;

use crate::agent::NodeState;
use crate::cluster::ClusterBackend;
use crate::metrics::NbdStats;

/// What the HTTP handlers read.
pub struct HttpState {
    pub name: String,
    pub started: Instant,
    pub node: Arc<NodeState>,
    pub backend: Arc<ClusterBackend>,
    pub nbd: Arc<NbdStats>,
    /// `host:port` clients use for NBD URIs.
    pub nbd_address: String,
}

pub fn mgmt_router(state: Arc<HttpState>) -> Router {
    Router::new().route("/health", get(health)).route("/metrics", get(metrics)).with_state(state)
}

pub fn control_router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/volumes", get(volumes))
        .route("/volumes/refresh", axum::routing::post(refresh_volumes))
        .route("/health", get(health))
        .with_state(state)
}

async fn health(State(s): State<Arc<HttpState>>) -> Json<ComponentStatus> {
    let registered = s.node.registered.load(Ordering::Relaxed);
    let node_id = s.node.node_id.load(Ordering::Relaxed);
    Json(ComponentStatus {
        component: "sdc".into(),
        name: s.name.clone(),
        status: if registered { "ok".into() } else { "registering".into() },
        node_id: (node_id != 0).then_some(node_id),
        registered,
        uptime_secs: s.started.elapsed().as_secs(),
    })
}

/// One mapped volume as `GET /volumes` shows it.
#[derive(Debug, Serialize)]
pub struct VolumeView {
    pub volume_id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub access_mode: String,
    pub mapping_gen: u64,
    pub nbd_uri: String,
    /// False until the map and a token have been fetched.
    pub routed: bool,
    pub epoch: Option<u64>,
    pub placement_groups: Option<usize>,
    pub sds_nodes: Vec<String>,
    pub token_id: Option<u64>,
    pub token_expires_at: Option<u64>,
    pub in_flight: i64,
}

/// Fetches the mappings now (the MDM is the authority; at most one fetch
/// runs at a time and repeated calls within [`crate::cluster::MIN_REFRESH`]
/// share the last one), then lists the volumes.
async fn refresh_volumes(
    State(s): State<Arc<HttpState>>,
) -> Result<Json<Vec<VolumeView>>, (axum::http::StatusCode, String)> {
    s.backend.refresh_mappings_soon().await.map_err(|e| {
        (axum::http::StatusCode::BAD_GATEWAY, format!("fetching mappings from the MDM failed: {e}"))
    })?;
    Ok(volumes(State(s)).await)
}

async fn volumes(State(s): State<Arc<HttpState>>) -> Json<Vec<VolumeView>> {
    let views = s
        .backend
        .mappings()
        .into_iter()
        .map(|m| {
            let v = s.backend.volume(m.volume_id);
            let map = v.as_ref().map(|v| v.placement());
            let token = v.as_ref().map(|v| v.token());
            VolumeView {
                volume_id: m.volume_id,
                nbd_uri: format!("nbd://{}/{}", s.nbd_address, m.name),
                name: m.name,
                size_bytes: m.size_bytes,
                access_mode: m.access_mode.as_str().into(),
                mapping_gen: m.mapping_gen,
                routed: v.is_some(),
                epoch: map.as_ref().map(|m| m.epoch),
                placement_groups: map.as_ref().map(|m| m.pgs.len()),
                sds_nodes: map
                    .as_ref()
                    .map(|m| {
                        m.nodes
                            .iter()
                            .map(|n| format!("{}@{}:{}", n.name, n.host, n.data_port))
                            .collect()
                    })
                    .unwrap_or_default(),
                token_id: token.as_ref().map(|t| t.token_id),
                token_expires_at: token.as_ref().map(|t| t.expires_at),
                in_flight: v
                    .as_ref()
                    .map(|v| v.stats.in_flight.load(Ordering::Relaxed))
                    .unwrap_or(0),
            }
        })
        .collect();
    Json(views)
}

async fn metrics(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    let mut out = String::new();
    s.nbd.render(&mut out);
    pflex_httpd::render_metrics("pflex_sdc", &mut out);
    let registered = u8::from(s.node.registered.load(Ordering::Relaxed));
    let _ = writeln!(out, "# TYPE pflex_sdc_registered gauge\npflex_sdc_registered {registered}");
    let _ = writeln!(
        out,
        "# TYPE pflex_sdc_heartbeats_total counter\npflex_sdc_heartbeats_total {}",
        s.node.heartbeats_sent.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# TYPE pflex_sdc_heartbeat_failures_total counter\npflex_sdc_heartbeat_failures_total {}",
        s.node.heartbeats_failed.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# TYPE pflex_sdc_mapped_volumes gauge\npflex_sdc_mapped_volumes {}",
        s.backend.mappings().len()
    );
    let volumes = s.backend.volumes();
    let _ = writeln!(out, "# TYPE pflex_sdc_volume_ops_total counter");
    for v in &volumes {
        for (op, c) in v.stats.by_op() {
            let _ = writeln!(
                out,
                "pflex_sdc_volume_ops_total{{volume=\"{}\",op=\"{op}\"}} {}",
                v.id(),
                c.ops()
            );
        }
    }
    let _ = writeln!(out, "# TYPE pflex_sdc_volume_bytes_total counter");
    for v in &volumes {
        for (op, c) in v.stats.by_op() {
            let _ = writeln!(
                out,
                "pflex_sdc_volume_bytes_total{{volume=\"{}\",op=\"{op}\"}} {}",
                v.id(),
                c.bytes()
            );
        }
    }
    let _ = writeln!(out, "# TYPE pflex_sdc_volume_errors_total counter");
    for v in &volumes {
        for (op, c) in v.stats.by_op() {
            let _ = writeln!(
                out,
                "pflex_sdc_volume_errors_total{{volume=\"{}\",op=\"{op}\"}} {}",
                v.id(),
                c.errors()
            );
        }
    }
    for (name, pick) in [
        ("pflex_sdc_dataplane_retries_total", 0),
        ("pflex_sdc_map_refreshes_total", 1),
        ("pflex_sdc_token_refreshes_total", 2),
        ("pflex_sdc_token_auths_total", 3),
    ] {
        let _ = writeln!(out, "# TYPE {name} counter");
        for v in &volumes {
            let c = match pick {
                0 => &v.stats.retries,
                1 => &v.stats.map_refreshes,
                2 => &v.stats.token_refreshes,
                _ => &v.stats.auths,
            };
            let _ = writeln!(out, "{name}{{volume=\"{}\"}} {}", v.id(), c.load(Ordering::Relaxed));
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
