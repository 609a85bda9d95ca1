//! Polls the MDM and every component's mgmt port, stores samples, and
//! turns what it sees into alerts (raised once, resolved when cleared).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pflex_mdm_client::MdmClient;
use pflex_proto::api::{
    ClusterSummary, HealthStatus, HeartbeatRequest, MovementStatus, NodeType, RebuildJob,
    RegisterRequest, SdcInfo, SdsInfo, Volume,
};

use crate::Shared;

/// The latest picture of the cluster, as the dashboard shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Overview {
    pub polled_at: u64,
    pub mdm_reachable: bool,
    pub health: Option<HealthStatus>,
    pub summary: Option<ClusterSummary>,
    pub volumes: Vec<Volume>,
    pub sds: Vec<SdsInfo>,
    pub sdc: Vec<SdcInfo>,
    /// Rebuild jobs, newest first (at most [`REBUILD_JOBS_SHOWN`]).
    pub rebuilds: Vec<RebuildJob>,
    /// Data movement: policy, outstanding jobs, rate, ETA, drains.
    pub movement: Option<MovementStatus>,
    /// (component name, reachable) for each SDS/SDC mgmt port.
    pub endpoints: Vec<(String, bool)>,
    /// Each MDM address given and what it says of the MDM cluster (None:
    /// unreachable).
    pub mdm_members: Vec<(String, Option<pflex_proto::api::MdmClusterStatus>)>,
}

/// How many rebuild jobs the dashboard lists.
pub const REBUILD_JOBS_SHOWN: usize = 50;

async fn register(
    shared: &Shared,
    enrollment: &pflex_mdm_client::Enrollment,
) -> Option<(MdmClient, u64)> {
    let client = MdmClient::new(&shared.config.mdm, None).ok()?;
    let mut req = RegisterRequest {
        join_key: String::new(),
        enrollment_token: None,
        credential: None,
        node_type: NodeType::Mgmt,
        name: shared.config.name.clone(),
        host: shared.config.listen.ip().to_string(),
        control_port: shared.config.listen.port(),
        mgmt_port: shared.config.listen.port(),
        data_port: 0,
        fault_set: None,
        pool: None,
        devices: Vec::new(),
        data_cluster_id: None,
    };
    enrollment.fill(&mut req);
    match client.register(&req).await {
        Ok(resp) => {
            if req.credential.as_deref() != Some(resp.credential.as_str()) {
                if let Err(e) = enrollment.store_off_thread(&resp.credential).await {
                    tracing::warn!("registered, but the credential cannot be kept: {e}");
                    return None;
                }
            }
            shared.registered.store(true, Ordering::Relaxed);
            tracing::info!(node_id = resp.node_id, "registered with the MDM");
            Some((client.with_credential(resp.credential), resp.node_id))
        }
        Err(e) => {
            tracing::warn!("registration with the MDM failed: {e}");
            None
        }
    }
}

/// Polls forever.
pub async fn run(shared: Arc<Shared>, enrollment: pflex_mdm_client::Enrollment) {
    let http = pflex_mdm_client::trust::http_client_builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("a default HTTP client");
    let mut mdm: Option<(MdmClient, u64)> = None;
    let mut tick =
        tokio::time::interval(Duration::from_secs(shared.config.poll_interval_secs.max(1)));
    loop {
        tick.tick().await;
        if mdm.is_none() {
            mdm = register(&shared, &enrollment).await;
        }
        let overview = match &mdm {
            Some((client, node_id)) => {
                let beat = HeartbeatRequest {
                    node_id: *node_id,
                    metrics: Default::default(),
                    volumes_since: None,
                };
                if let Err(e) = client.heartbeat(&beat).await {
                    tracing::warn!("heartbeat to the MDM failed: {e}");
                }
                poll_once(client, &http).await
            }
            None => Err(None),
        };
        let overview = match overview {
            Ok(o) => o,
            Err(unauthorized) => {
                if unauthorized == Some(true) {
                    mdm = None; // the MDM forgot us: register again next tick
                    shared.registered.store(false, Ordering::Relaxed);
                }
                Overview {
                    polled_at: pflex_proto::unix_now(),
                    mdm_reachable: false,
                    health: None,
                    summary: None,
                    volumes: Vec::new(),
                    sds: Vec::new(),
                    sdc: Vec::new(),
                    rebuilds: Vec::new(),
                    movement: None,
                    endpoints: Vec::new(),
                    mdm_members: Vec::new(),
                }
            }
        };
        if let Err(e) = evaluate(&shared, &overview) {
            tracing::error!("mgmt.db: {e}");
        }
        *shared.last_overview.lock().expect("overview lock") = Some(overview);
    }
}

/// One round of polling; `Err(Some(true))` when the MDM refused our credential.
async fn poll_once(client: &MdmClient, http: &reqwest::Client) -> Result<Overview, Option<bool>> {
    let health = client.health_status().await.map_err(|e| Some(e.is_unauthorized()))?;
    let summary = client.cluster_summary().await.ok();
    let volumes = client.volume_list().await.unwrap_or_default();
    let sds = client.sds_list().await.unwrap_or_default();
    let sdc = client.sdc_list().await.unwrap_or_default();
    let mut rebuilds = client.rebuild_jobs().await.unwrap_or_default();
    rebuilds.truncate(REBUILD_JOBS_SHOWN);
    let movement = client.movement_status().await.ok();
    let mut endpoints = Vec::new();
    let targets = sds
        .iter()
        .map(|s| (s.name.clone(), s.host.clone(), s.mgmt_port))
        .chain(sdc.iter().map(|s| (s.name.clone(), s.host.clone(), s.mgmt_port)));
    for (name, host, port) in targets {
        let ok = http
            .get(format!("{}://{host}:{port}/health", pflex_mdm_client::trust::scheme()))
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        endpoints.push((name, ok));
    }
    let mdm_members =
        client.mdm_status_each().await.into_iter().map(|(url, s)| (url, s.ok())).collect();
    Ok(Overview {
        polled_at: pflex_proto::unix_now(),
        mdm_reachable: true,
        mdm_members,
        health: Some(health),
        summary,
        volumes,
        sds,
        sdc,
        rebuilds,
        movement,
        endpoints,
    })
}

/// The alerts that hold for `o`: (key, severity, component, message).
pub fn conditions(o: &Overview) -> Vec<(String, &'static str, String, String)> {
    let mut out = Vec::new();
    if !o.mdm_reachable {
        out.push((
            "mdm:unreachable".into(),
            "critical",
            "mdm".into(),
            "MDM unreachable: no health data".into(),
        ));
        return out;
    }
    let replicated = o.mdm_members.iter().any(|(_, s)| s.as_ref().is_some_and(|s| s.replicated));
    for (url, status) in &o.mdm_members {
        if replicated && status.is_none() {
            out.push((
                format!("mdm-member:{url}"),
                "warning",
                "mdm".into(),
                format!("MDM member {url} unreachable: the others serve without it"),
            ));
        }
    }
    if let Some(h) = &o.health {
        for c in &h.components {
            if c.status != "ACTIVE" {
                let sev = if c.status == "FAILED" { "critical" } else { "warning" };
                out.push((
                    format!("component:{}:{}:{}", c.node_type.as_str(), c.name, c.status),
                    sev,
                    c.name.clone(),
                    format!(
                        "{} {} is {} (last heartbeat {} s ago)",
                        c.node_type.as_str(),
                        c.name,
                        c.status,
                        o.polled_at.saturating_sub(c.last_seen)
                    ),
                ));
            }
        }
        if h.overall != "HEALTHY" {
            let sev = if h.overall == "CRITICAL" { "critical" } else { "warning" };
            out.push((
                format!("cluster:{}", h.overall),
                sev,
                "cluster".into(),
                format!("cluster is {}", h.overall),
            ));
        }
    }
    if let Some(s) = &o.summary {
        if s.degraded_chunks > 0 {
            out.push((
                "cluster:degraded_chunks".into(),
                "warning",
                "cluster".into(),
                format!("{} chunks have fewer than two live copies", s.degraded_chunks),
            ));
        }
    }
    for s in o.sds.iter().filter(|s| s.draining) {
        out.push((
            format!("sds:{}:draining", s.name),
            "warning",
            s.name.clone(),
            format!("SDS {} is being drained for removal", s.name),
        ));
    }
    for (name, ok) in &o.endpoints {
        if !ok {
            out.push((
                format!("endpoint:{name}"),
                "warning",
                name.clone(),
                format!("{name}: mgmt port does not answer"),
            ));
        }
    }
    out
}

fn evaluate(shared: &Shared, o: &Overview) -> Result<(), crate::db::DbError> {
    let db = shared.db.lock().expect("db lock");
    let conds = conditions(o);
    for (key, sev, comp, msg) in &conds {
        db.raise(key, sev, comp, msg)?;
    }
    let keys: Vec<String> = conds.into_iter().map(|c| c.0).collect();
    db.resolve_all_except(&keys)?;
    if let Some(s) = &o.summary {
        db.record_sample("summary", &serde_json::to_string(s).unwrap_or_default())?;
    }
    for (name, ok) in &o.endpoints {
        let kind = if o.sds.iter().any(|s| &s.name == name) { "SDS" } else { "SDC" };
        db.record_component(name, kind, if *ok { "reachable" } else { "unreachable" }, "")?;
    }
    Ok(())
}
