//! The MDM's HTTP API: routes, authentication, body parsing, metrics.
//!
//! Each handler authenticates the caller (bearer credential → [`Caller`]),
//! checks the caller's role, parses its body with [`ApiJson`] (which turns
//! every parse failure into a JSON 4xx instead of axum's plain-text
//! rejections), and runs its [`service`] function inside one SQLite
//! transaction via [`AppState::transact`]: committed when the function
//! returns `Ok`, rolled back otherwise. Unknown paths and methods also
//! answer with JSON errors.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::keys::Keys;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pflex_proto::api::{
    DeviceFailure, DeviceFailureVerdict, HeartbeatRequest, NodeType, RebuildComplete,
    RegisterRequest, TokenAckBatch, TokenRequest, UnreachableReport, VolumeCreate, VolumeMap,
    VolumeRename, VolumeResize, VolumeUnmap,
};
use rusqlite::Connection;
use serde::de::DeserializeOwned;

use crate::error::MdmError;
use crate::secrets::{digest, digests_equal};
use crate::service::{self, Caller, Ctx, Settings};

/// Largest request body accepted (a full ack batch fits comfortably).
const MAX_BODY_BYTES: usize = 4 << 20;

/// Counters kept in memory for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub responses_2xx: AtomicU64,
    pub responses_4xx: AtomicU64,
    pub responses_5xx: AtomicU64,
    pub registrations: AtomicU64,
    pub registrations_refused: AtomicU64,
    pub heartbeats: AtomicU64,
    pub tokens_issued: AtomicU64,
    pub tokens_refused: AtomicU64,
    pub acks_recorded: AtomicU64,
    pub copies_replaced: AtomicU64,
}

/// Shared state of every handler.
pub struct AppState {
    db: crate::writer::DbWriter,
    readers: crate::writer::DbReaders,
    /// Batches and requests of the group commit.
    pub writer_stats: Arc<crate::writer::WriterStats>,
    pub settings: Settings,
    pub keys: Arc<Keys>,
    /// When components were last heard from (see [`crate::sightings`]).
    pub sightings: crate::sightings::Sightings,
    /// The facts of each pool's candidate nodes, kept between creates.
    pub candidates: service::CandidateCache,
    /// The admin token and join key (replaced and revoked by `pflex
    /// cluster rotate`, on every member).
    secrets: Arc<crate::secrets::AdminSecrets>,
    /// Where the admin token is kept (rewritten by a rotation).
    admin_token_path: std::path::PathBuf,
    pub counters: Counters,
    pub started_at: std::time::Instant,
    /// The MDM's probes of SDS nodes reported unreachable.
    probes: crate::probe::Probes,
    /// (second, refusals audited in it).
    refusal_audits: Mutex<(u64, u32)>,
    /// This member's handle on the replicated MDM (None: a single MDM).
    pub replication: Option<Arc<crate::raft::Replication>>,
}

/// The secrets an MDM checks callers against, and where its admin token
/// file is.
pub struct Credentials {
    pub secrets: Arc<crate::secrets::AdminSecrets>,
    pub admin_token_path: std::path::PathBuf,
}

impl AppState {
    pub fn new(
        db: Connection,
        readers: crate::writer::DbReaders,
        settings: Settings,
        keys: Arc<Keys>,
        credentials: Credentials,
        replication: Option<Arc<crate::raft::Replication>>,
    ) -> std::io::Result<Self> {
        let writer_stats = Arc::new(crate::writer::WriterStats::default());
        let mode = match &replication {
            None => crate::writer::CommitMode::Local,
            Some(replication) => {
                crate::writer::CommitMode::Replicated(Box::new(crate::raft::ReplicatedCommit {
                    replication: Arc::clone(replication),
                    runtime: replication.runtime(),
                }))
            }
        };
        let Credentials { secrets, admin_token_path } = credentials;
        Ok(Self {
            db: crate::writer::DbWriter::start(db, Arc::clone(&writer_stats), mode)?,
            readers,
            writer_stats,
            settings,
            keys,
            sightings: Default::default(),
            candidates: Default::default(),
            secrets,
            admin_token_path,
            counters: Counters::default(),
            started_at: std::time::Instant::now(),
            probes: crate::probe::Probes::default(),
            refusal_audits: Mutex::new((0, 0)),
            replication,
        })
    }

    /// Ok when this MDM may serve requests: a single MDM always, a member of
    /// a replicated one only as the leader within its lease.
    pub fn check_leader(&self) -> Result<(), MdmError> {
        match &self.replication {
            None => Ok(()),
            Some(replication) => replication.check_leader(),
        }
    }

    /// Reloads the token signing generations from the database (a member
    /// that becomes leader: rotations were applied from the log).
    pub async fn reload_signing_history(self: &Arc<Self>) -> Result<(), MdmError> {
        let history = self.read(|conn, _| service::signing_history(conn)).await?;
        self.keys.replace_history(history);
        Ok(())
    }

    /// The Raft term this MDM answers in (0 for a single MDM).
    pub fn term(&self) -> u64 {
        self.replication.as_ref().map_or(0, |r| r.term())
    }

    /// Runs `work` on the database thread, inside the transaction of its
    /// batch (see [`crate::writer`]): its changes are kept on `Ok` and rolled
    /// back on `Err`, and the result arrives once they are committed.
    pub async fn transact<T, F>(self: &Arc<Self>, work: F) -> Result<T, MdmError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Ctx) -> Result<T, MdmError> + Send + 'static,
    {
        let state = Arc::clone(self);
        self.db.submit(move |conn| work(conn, &state.ctx())).await
    }

    /// Queues `work` for the database thread without waiting for it (see
    /// [`crate::writer::DbWriter::submit_behind`]): for writes nobody is
    /// told about.
    pub fn transact_behind<F>(self: &Arc<Self>, what: &'static str, work: F)
    where
        F: FnOnce(&Connection, &Ctx) -> Result<(), MdmError> + Send + 'static,
    {
        let state = Arc::clone(self);
        self.db.submit_behind(what, move |conn| work(conn, &state.ctx()));
    }

    /// Runs `work`, which only reads, on a reader connection (see
    /// [`crate::writer::DbReaders`]): it sees every acknowledged change and
    /// does not wait behind the writer's batches.
    pub async fn read<T, F>(self: &Arc<Self>, work: F) -> Result<T, MdmError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Ctx) -> Result<T, MdmError> + Send + 'static,
    {
        let state = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let ctx = state.ctx();
            state.readers.read(|conn| work(conn, &ctx))
        })
        .await
        .map_err(|e| MdmError::Internal(format!("database task failed: {e}")))?
    }

    /// What a request runs with besides the database, as of now.
    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            settings: self.settings,
            keys: &self.keys,
            sightings: &self.sightings,
            candidates: &self.candidates,
            now: pflex_proto::unix_now(),
        }
    }

    fn join_key_matches(&self, key: &str) -> bool {
        self.secrets.join_key_matches(key)
    }

    fn is_admin(&self, credential: &str) -> bool {
        self.secrets.is_admin(credential)
    }
}

type Shared = Arc<AppState>;

/// A JSON body whose parse failures are [`MdmError`]s (JSON 4xx).
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = MdmError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> MdmError {
    let text = rejection.body_text();
    match rejection {
        JsonRejection::MissingJsonContentType(_) => MdmError::UnsupportedMediaType(
            "the body must be JSON with Content-Type: application/json".to_string(),
        ),
        JsonRejection::JsonSyntaxError(_) => MdmError::invalid("malformed_json", text),
        JsonRejection::JsonDataError(_) => MdmError::invalid("invalid_body", text),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => MdmError::PayloadTooLarge(text),
        _ => MdmError::bad_request(text),
    }
}

/// A path parameter whose failures are [`MdmError`]s.
pub struct ApiPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ApiPath {
    type Rejection = MdmError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(path_rejection(rejection)),
        }
    }
}

fn path_rejection(rejection: PathRejection) -> MdmError {
    MdmError::bad_request(rejection.body_text())
}

/// The authenticated caller of a request (401 when absent or unknown).
pub struct Auth(pub Caller);

impl FromRequestParts<Shared> for Auth {
    type Rejection = MdmError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Shared,
    ) -> Result<Self, Self::Rejection> {
        let credential = bearer(&parts.headers)?;
        if state.is_admin(&credential) {
            return Ok(Auth(Caller::Admin));
        }
        let found = state.read(move |conn, _| service::authenticate(conn, &credential)).await?;
        found.map(Auth).ok_or_else(|| MdmError::Unauthorized("unknown credential".to_string()))
    }
}

fn bearer(headers: &HeaderMap) -> Result<String, MdmError> {
    let value = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        MdmError::Unauthorized(
            "this endpoint needs a credential: Authorization: Bearer <credential>".into(),
        )
    })?;
    let value = value
        .to_str()
        .map_err(|_| MdmError::Unauthorized("the Authorization header is not ASCII".to_string()))?;
    let (scheme, credential) = value.split_once(' ').ok_or_else(|| {
        MdmError::Unauthorized("the Authorization header must be `Bearer <credential>`".into())
    })?;
    let credential = credential.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || credential.is_empty() {
        return Err(MdmError::Unauthorized(
            "the Authorization header must be `Bearer <credential>`".into(),
        ));
    }
    Ok(credential.to_string())
}

/// Who may call an endpoint.
#[derive(Clone, Copy)]
enum Role {
    Admin,
    Mgmt,
    Sds,
    Sdc,
}

fn allow(caller: Caller, roles: &[Role]) -> Result<(), MdmError> {
    let role = match caller {
        Caller::Admin => Role::Admin,
        Caller::Node { node_type: NodeType::Mgmt, .. } => Role::Mgmt,
        Caller::Node { node_type: NodeType::Sds, .. } => Role::Sds,
        Caller::Node { node_type: NodeType::Sdc, .. } => Role::Sdc,
    };
    if roles.iter().any(|r| std::mem::discriminant(r) == std::mem::discriminant(&role)) {
        Ok(())
    } else {
        Err(MdmError::forbidden(format!("{} may not call this endpoint", caller.describe())))
    }
}

const READERS: &[Role] = &[Role::Admin, Role::Mgmt];
const ANY: &[Role] = &[Role::Admin, Role::Mgmt, Role::Sds, Role::Sdc];

/// The router of the whole API.
pub fn router(state: Shared) -> Router {
    let api = Router::new()
        .route("/discovery/register", post(register))
        .route("/admin/enrollments", post(enrollment_create))
        .route("/admin/nodes/reset", post(node_reset))
        .route("/admin/audit", get(audit_log))
        .route("/cluster/rotate", post(cluster_rotate))
        .route("/health/heartbeat", post(heartbeat))
        .route("/health/status", get(health_status))
        .route("/health/unreachable", post(unreachable_report))
        .route("/token/request", post(token_request))
        .route("/token/ack", post(token_ack))
        .route("/rebuild/complete", post(rebuild_complete))
        .route("/rebuild/jobs", get(rebuild_jobs))
        .route("/rebuild/progress", post(rebuild_progress))
        .route("/rebuild/status", get(movement_status))
        .route("/rebuild/policy", get(movement_policy).put(set_movement_policy))
        .route("/vol/create", post(volume_create))
        .route("/vol/list", get(volume_list))
        .route("/vol/map", post(volume_map))
        .route("/vol/unmap", post(volume_unmap))
        .route("/vol/{volume}", get(volume_show).delete(volume_delete))
        .route("/vol/{volume}/resize", post(volume_resize))
        .route("/vol/{volume}/rename", post(volume_rename))
        .route("/vol/{volume}/placement", get(volume_placement))
        .route("/sdc/mappings", get(sdc_mappings))
        .route("/sds/list", get(sds_list))
        .route("/sds/device-failed", post(device_failed))
        .route("/sds/{sds}/remove", post(sds_remove))
        .route("/sdc/list", get(sdc_list))
        .route("/cluster/summary", get(cluster_summary))
        .route("/metrics", get(metrics))
        .route("/mdm/add", post(mdm_add))
        .route("/mdm/remove", post(mdm_remove))
        .route("/mdm/backup", get(mdm_backup))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), leader_only));
    // Answered by every member: its own view of the MDM cluster, and the
    // Raft messages between members.
    let members = Router::new()
        .route("/mdm/status", get(mdm_status))
        .route("/raft/{message}", post(raft_message))
        .layer(axum::extract::DefaultBodyLimit::max(RAFT_BODY_BYTES));
    api.merge(members)
        .layer(middleware::from_fn_with_state(state.clone(), count_responses))
        .with_state(state)
}

/// Largest Raft message (entries or a snapshot chunk).
const RAFT_BODY_BYTES: usize = 64 << 20;

/// On a replicated MDM only the leader serves the API; a follower answers
/// `503 not_leader` with the leader's address (clients retry there).
async fn leader_only(State(state): State<Shared>, request: Request, next: Next) -> Response {
    match state.check_leader() {
        Ok(()) => next.run(request).await,
        Err(refusal) => refusal.into_response(),
    }
}

async fn count_responses(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let counter = match response.status().as_u16() {
        200..=299 => &state.counters.responses_2xx,
        400..=499 => &state.counters.responses_4xx,
        _ => &state.counters.responses_5xx,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    response
}

async fn not_found(request: Request) -> MdmError {
    MdmError::not_found(
        "no_such_endpoint",
        format!("no endpoint {} {}", request.method(), request.uri().path()),
    )
}

async fn method_not_allowed(request: Request) -> MdmError {
    MdmError::MethodNotAllowed(format!(
        "{} is not allowed on {}",
        request.method(),
        request.uri().path()
    ))
}

/// A registration must bring some proof (an enrollment token, the node's
/// credential or the join key) before its body is even parsed, so a caller
/// with none gets 401 whatever the rest says; the proofs are weighed in
/// [`service::register`] before anything is written. Refusals are audited
/// (at most [`REFUSALS_AUDITED_PER_SEC`] a second, so a flood of bad
/// credentials cannot grow the database).
async fn register(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(body): ApiJson<serde_json::Value>,
) -> Result<Json<pflex_proto::api::RegisterResponse>, MdmError> {
    let text = |field: &str| {
        body.get(field).and_then(|v| v.as_str()).filter(|v| !v.is_empty()).map(str::to_string)
    };
    let join_key = text("join_key");
    let join_key_ok = join_key.as_deref().is_some_and(|k| state.join_key_matches(k));
    let source = peer.ip().to_string();
    if !join_key_ok && text("enrollment_token").is_none() && text("credential").is_none() {
        let why = if join_key.is_some() {
            "wrong join key"
        } else {
            "registration needs an enrollment token (pflex sds add / pflex sdc add), this node's \
             credential, or the join key"
        };
        state.record_refusal(&body, &source, why).await;
        return Err(MdmError::Unauthorized(why.to_string()));
    }
    let request: RegisterRequest = serde_json::from_value(body.clone())
        .map_err(|e| MdmError::invalid("invalid_body", format!("invalid registration: {e}")))?;
    let from = source.clone();
    let result = state
        .transact(move |conn, ctx| service::register(conn, ctx, &request, join_key_ok, &from))
        .await;
    match result {
        Ok(response) => {
            state.counters.registrations.fetch_add(1, Ordering::Relaxed);
            tracing::info!(node_id = response.node_id, "component registered");
            Ok(Json(response))
        }
        Err(
            e @ (MdmError::Unauthorized(_)
            | MdmError::Conflict { code: "name_taken" | "foreign_cluster_data", .. }),
        ) => {
            state.record_refusal(&body, &source, &e.to_string()).await;
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// At most this many refused registrations a second are written to the audit log.
pub const REFUSALS_AUDITED_PER_SEC: u32 = 10;

impl AppState {
    /// Counts, logs and (rate-limited) audits a refused registration.
    async fn record_refusal(self: &Arc<Self>, body: &serde_json::Value, source: &str, why: &str) {
        self.counters.registrations_refused.fetch_add(1, Ordering::Relaxed);
        let kind = body.get("node_type").and_then(|v| v.as_str()).unwrap_or("?");
        let name = body.get("name").and_then(|v| v.as_str()).unwrap_or("?");
        let target: String = format!("{kind} {name}").chars().take(200).collect();
        tracing::warn!(%source, %target, why, "registration refused");
        if self.refusal_audit_allowed() {
            let (source, why) = (source.to_string(), why.to_string());
            let audited = self
                .transact(move |conn, ctx| {
                    service::audit(
                        conn,
                        ctx.now,
                        &target,
                        "node.register",
                        &target,
                        &source,
                        "refused",
                        &why,
                    )
                })
                .await;
            if let Err(e) = audited {
                tracing::warn!(error = %e, "could not audit a refused registration");
            }
        }
    }

    fn refusal_audit_allowed(&self) -> bool {
        let second = pflex_proto::unix_now();
        let mut window = self.refusal_audits.lock().unwrap_or_else(|p| p.into_inner());
        if window.0 != second {
            *window = (second, 0);
        }
        window.1 += 1;
        window.1 <= REFUSALS_AUDITED_PER_SEC
    }
}

async fn enrollment_create(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiJson(request): ApiJson<pflex_proto::api::EnrollmentRequest>,
) -> Result<Json<pflex_proto::api::EnrollmentResponse>, MdmError> {
    allow(caller, &[Role::Admin])?;
    Ok(Json(state.transact(move |conn, ctx| service::mint_enrollment(conn, ctx, &request)).await?))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeReset {
    node_type: NodeType,
    name: String,
}

async fn node_reset(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiJson(request): ApiJson<NodeReset>,
) -> Result<Json<serde_json::Value>, MdmError> {
    allow(caller, &[Role::Admin])?;
    let id = state
        .transact(move |conn, ctx| service::reset_node(conn, ctx, request.node_type, &request.name))
        .await?;
    Ok(Json(serde_json::json!({ "status": "reset", "node_id": id })))
}

/// `pflex cluster rotate`: a new token signing key (published at once,
/// signing after [`crate::keys::KeyTiming::publish_for`], the old one
/// accepted until its tokens expired), a new admin token (the old one stops
/// working now), and every unused enrollment token and the join key, if
/// any, revoked. IO goes on: see [`crate::keys`].
async fn cluster_rotate(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Result<Json<pflex_proto::api::RotateResponse>, MdmError> {
    allow(caller, &[Role::Admin])?;
    let revoked_join_key = state.secrets.join_key();
    let join_key_disabled = revoked_join_key.is_some();
    let source = peer.to_string();
    let admin_token = service::new_credential();
    let new_token = admin_token.clone();
    // The new admin token's digest and the revoked join key are committed
    // with the new signing key: every member adopts all three when it
    // applies the batch (see `secrets`), this one included.
    let (generation, created, revoked) = state
        .transact(move |conn, ctx| {
            let (generation, revoked) =
                service::rotate_keys(conn, ctx, &source, join_key_disabled)?;
            crate::secrets::record_rotation(conn, ctx.now, &new_token, revoked_join_key)?;
            Ok((generation, ctx.now, revoked))
        })
        .await?;
    state.keys.add_generation(generation, created);
    state.secrets.adopt(&crate::secrets::Stored {
        admin_token_sha256: Some(digest(&admin_token)),
        revoked_join_keys: revoked_join_key.into_iter().collect(),
    });
    crate::write_secret(&state.admin_token_path, &admin_token)
        .map_err(|e| MdmError::Internal(format!("writing the new admin token: {e}")))?;
    let timing = state.keys.timing();
    let signs_from = created + timing.publish_for.as_secs();
    tracing::warn!(
        generation,
        "keys rotated: new signing key, admin token and enrollment material"
    );
    Ok(Json(pflex_proto::api::RotateResponse {
        signing_generation: generation,
        signs_from,
        previous_accepted_until: signs_from + timing.token_ttl.as_secs() + 60,
        admin_token_file: state.admin_token_path.display().to_string(),
        admin_token,
        enrollment_tokens_revoked: revoked,
        join_key_disabled,
    }))
}

#[derive(serde::Deserialize)]
struct AuditQuery {
    limit: Option<u64>,
}

async fn audit_log(
    State(state): State<Shared>,
    Auth(caller): Auth,
    Query(query): Query<AuditQuery>,
) -> Result<Json<Vec<serde_json::Value>>, MdmError> {
    allow(caller, &[Role::Admin, Role::Mgmt])?;
    let limit = query.limit.unwrap_or(100);
    Ok(Json(state.read(move |conn, _| service::audit_list(conn, limit)).await?))
}

async fn heartbeat(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiJson(request): ApiJson<HeartbeatRequest>,
) -> Result<Json<pflex_proto::api::HeartbeatResponse>, MdmError> {
    allow(caller, &[Role::Sds, Role::Sdc, Role::Mgmt])?;
    // The term before answering: the answer (read while leading, with the
    // lease checked again once ready, or committed) speaks for this term.
    let term = state.term();
    let request = Arc::new(request);
    let beat = Arc::clone(&request);
    let on_reader =
        move |conn: &Connection, ctx: &Ctx| service::heartbeat_on_reader(conn, ctx, caller, &beat);
    let answered = state.read(on_reader).await?;
    let mut response = match answered {
        // Answered from a reader: still the leader (within its lease) now
        // that the answer is ready, so it speaks for the term it names.
        Some((response, write)) => {
            state.check_leader()?;
            if write {
                state.transact_behind("heartbeat sighting", move |conn, ctx| {
                    service::record_sighting(conn, ctx, caller, &request)
                });
            }
            response
        }
        None => {
            state.transact(move |conn, ctx| service::heartbeat(conn, ctx, caller, &request)).await?
        }
    };
    response.mdm_term = term;
    state.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
    Ok(Json(response))
}

async fn device_failed(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiJson(report): ApiJson<DeviceFailure>,
) -> Result<Json<DeviceFailureVerdict>, MdmError> {
    allow(caller, &[Role::Sds])?;
    Ok(Json(
        state.transact(move |conn, ctx| service::device_failed(conn, ctx, caller, &report)).await?,
    ))
}

async fn unreachable_report(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiJson(report): ApiJson<UnreachableReport>,
) -> Result<Json<pflex_proto::api::UnreachableVerdict>, MdmError> {
    allow(caller, &[Role::Sds, Role::Sdc])?;
    let node_id = report.node_id;
    let (host, port) = state.read(move |conn, _| service::sds_data_address(conn, node_id)).await?;
    let due = state.settings.probe_on_report && state.probes.begin(node_id);
    let probe_started = pflex_proto::unix_now();
    let reachable = if due { Some(crate::probe::probe(&host, port).await) } else { None };
    // Declared FAILED only once the probes have failed for the grace period:
    // a node restarting in place is not a failed node.
    let grace = std::time::Duration::from_secs(state.settings.unreachable_grace_secs);
    let declare = reachable.is_some_and(|ok| state.probes.record(node_id, ok, grace));
    if reachable == Some(false) && !declare && state.probes.start_following(node_id) {
        tokio::spawn(follow_up_probes(state.clone(), node_id, host, port, caller.describe()));
    }
    let verdict = state
        .transact(move |conn, ctx| {
            service::declare_unreachable(conn, ctx, node_id, reachable, declare, probe_started)
        })
        .await?;
    if declare {
        state.counters.copies_replaced.fetch_add(verdict.copies_replaced, Ordering::Relaxed);
        tracing::warn!(
            sds = node_id,
            reported_by = %caller.describe(),
            copies = verdict.copies_replaced,
            "SDS reported unreachable and the MDM's probes failed for the grace period: declared FAILED"
        );
    }
    Ok(Json(verdict))
}

/// After a failed probe, the MDM keeps probing the node itself until it
/// answers or the grace period has passed (then it is declared FAILED), so
/// the verdict does not wait for the next report: a frozen node is reported
/// only once per request timeout.
async fn follow_up_probes(state: Shared, node_id: u64, host: String, port: u16, reporter: String) {
    let grace = std::time::Duration::from_secs(state.settings.unreachable_grace_secs);
    let rounds = grace.as_millis() / crate::probe::PROBE_INTERVAL.as_millis() + 3;
    for _ in 0..rounds {
        tokio::time::sleep(crate::probe::PROBE_INTERVAL).await;
        if !state.probes.begin(node_id) {
            continue;
        }
        let probe_started = pflex_proto::unix_now();
        let reachable = crate::probe::probe(&host, port).await;
        let declare = state.probes.record(node_id, reachable, grace);
        if reachable {
            break;
        }
        if declare {
            let verdict = state
                .transact(move |conn, ctx| {
                    service::declare_unreachable(
                        conn,
                        ctx,
                        node_id,
                        Some(false),
                        true,
                        probe_started,
                    )
                })
                .await;
            if let Ok(verdict) = verdict {
                state
                    .counters
                    .copies_replaced
                    .fetch_add(verdict.copies_replaced, Ordering::Relaxed);
                tracing::warn!(
                    sds = node_id,
                    reported_by = %reporter,
                    copies = verdict.copies_replaced,
                    "SDS reported unreachable and the MDM's probes failed for the grace period: declared FAILED"
                );
            }
            break;
        }
    }
    state.probes.stop_following(node_id);
}

async fn health_status(
    State(state): State<Shared>,
    Auth(caller): Auth,
) -> Result<Json<pflex_proto::api::HealthStatus>, MdmError> {
    allow(caller, ANY)?;
    Ok(Json(state.read(service::health_status).await?))
}

async fn token_request(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiJson(request): ApiJson<TokenRequest>,
) -> Result<Json<pflex_proto::api::TokenResponse>, MdmError> {
    allow(caller, &[Role::Sdc])?;
    let Caller::Node { id, .. } = caller else { unreachable!("allow() admitted only SDCs") };
    let result = issue_token(&state, id, request).await;
    let counter =
        if result.is_ok() { &state.counters.tokens_issued } else { &state.counters.tokens_refused };
    counter.fetch_add(1, Ordering::Relaxed);
    Ok(Json(result?))
}

/// Signs on a reader and answers; the token's row is written behind the
/// answer (see [`service::record_tokens`]), queued before any completion
/// record the SDC can send for it.
async fn issue_token(
    state: &Shared,
    sdc_id: u64,
    request: TokenRequest,
) -> Result<pflex_proto::api::TokenResponse, MdmError> {
    let draft =
        state.read(move |conn, ctx| service::draft_token(conn, ctx, sdc_id, &request)).await?;
    // Still the leader (within its lease) now that the token is signed.
    state.check_leader()?;
    let record = draft.record;
    state.transact_behind("token row", move |conn, _| {
        service::record_tokens(conn, &[record]).map(drop)
    });
    Ok(draft.response)
}

async fn token_ack(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiJson(batch): ApiJson<TokenAckBatch>,
) -> Result<Json<pflex_proto::api::AckResponse>, MdmError> {
    allow(caller, &[Role::Sds, Role::Sdc])?;
    let response =
        state.transact(move |conn, ctx| service::ack_tokens(conn, ctx, caller, &batch)).await?;
    state.counters.acks_recorded.fetch_add(response.recorded, Ordering::Relaxed);
    Ok(Json(response))
}

async fn rebuild_complete(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiJson(request): ApiJson<RebuildComplete>,
) -> Result<Json<pflex_proto::api::RebuildJob>, MdmError> {
    allow(caller, &[Role::Sds])?;
    let released = request.chunks_released;
    let job = state
        .transact(move |conn, ctx| service::rebuild_complete(conn, ctx, caller, &request))
        .await?;
    tracing::info!(
        job = job.job_id,
        volume = job.volume_id,
        pg = job.pg_index,
        target = job.target_sds,
        copied = job.chunks_copied,
        released,
        "rebuild complete"
    );
    Ok(Json(job))
}

async fn rebuild_progress(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiJson(request): ApiJson<pflex_proto::api::RebuildProgress>,
) -> Result<Json<pflex_proto::api::RebuildJob>, MdmError> {
    allow(caller, &[Role::Sds])?;
    Ok(Json(
        state
            .transact(move |conn, ctx| service::rebuild_progress(conn, ctx, caller, &request))
            .await?,
    ))
}

async fn movement_status(
    State(state): State<Shared>,
    Auth(caller): Auth,
) -> Result<Json<pflex_proto::api::MovementStatus>, MdmError> {
    allow(caller, READERS)?;
    Ok(Json(state.read(service::movement_status).await?))
}

async fn movement_policy(
    State(state): State<Shared>,
    Auth(caller): Auth,
) -> Result<Json<pflex_proto::api::MovementPolicy>, MdmError> {
    allow(caller, READERS)?;
    Ok(Json(state.read(|conn, _| service::movement_policy(conn)).await?))
}

async fn set_movement_policy(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiJson(policy): ApiJson<pflex_proto::api::MovementPolicy>,
) -> Result<Json<pflex_proto::api::MovementPolicy>, MdmError> {
    allow(caller, &[Role::Admin])?;
    let policy = state.transact(move |conn, _| service::set_movement_policy(conn, &policy)).await?;
    tracing::info!(
        mb_per_sec = policy.mb_per_sec,
        chunks_in_flight = policy.chunks_in_flight,
        priority = policy.priority.as_str(),
        "data movement policy changed"
    );
    Ok(Json(policy))
}

async fn sds_remove(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiPath(sds): ApiPath,
) -> Result<Json<pflex_proto::api::SdsInfo>, MdmError> {
    allow(caller, &[Role::Admin])?;
    let info = state.transact(move |conn, ctx| service::remove_sds(conn, ctx, &sds)).await?;
    tracing::warn!(sds = %info.name, "draining SDS for removal");
    Ok(Json(info))
}

async fn rebuild_jobs(
    State(state): State<Shared>,
    Auth(caller): Auth,
) -> Result<Json<Vec<pflex_proto::api::RebuildJob>>, MdmError> {
    allow(caller, READERS)?;
    Ok(Json(state.read(|conn, _| service::rebuild_jobs(conn)).await?))
}

type VolumeReply = Result<Json<pflex_proto::api::Volume>, MdmError>;

async fn volume_create(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiJson(request): ApiJson<VolumeCreate>,
) -> VolumeReply {
    allow(caller, &[Role::Admin])?;
    Ok(Json(state.transact(move |conn, ctx| service::volume_create(conn, ctx, &request)).await?))
}

/// `?after=ID&limit=N` of `GET /vol/list`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumePage {
    #[serde(default)]
    after: u64,
    #[serde(default = "default_volume_page")]
    limit: u64,
}

fn default_volume_page() -> u64 {
    service::VOLUME_PAGE_DEFAULT
}

/// One page of volumes; the response header [`pflex_proto::api::NEXT_PAGE_HEADER`] gives the
/// `after` of the next page when there is one.
async fn volume_list(
    State(state): State<Shared>,
    Auth(caller): Auth,
    query: Result<Query<VolumePage>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, MdmError> {
    allow(caller, READERS)?;
    let Query(page) = query.map_err(|e| MdmError::bad_request(e.body_text()))?;
    let (volumes, next) =
        state.read(move |conn, _| service::volume_list(conn, page.after, page.limit)).await?;
    let mut response = Json(volumes).into_response();
    if let Some(next) = next {
        response
            .headers_mut()
            .insert(pflex_proto::api::NEXT_PAGE_HEADER, header::HeaderValue::from(next));
    }
    Ok(response)
}

async fn volume_show(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiPath(volume): ApiPath,
) -> VolumeReply {
    allow(caller, READERS)?;
    Ok(Json(state.read(move |conn, _| service::volume_show(conn, &volume)).await?))
}

async fn volume_delete(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiPath(volume): ApiPath,
) -> VolumeReply {
    allow(caller, &[Role::Admin])?;
    Ok(Json(state.transact(move |conn, _| service::volume_delete(conn, &volume)).await?))
}

async fn volume_resize(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiPath(volume): ApiPath,
    ApiJson(request): ApiJson<VolumeResize>,
) -> VolumeReply {
    allow(caller, &[Role::Admin])?;
    Ok(Json(
        state
            .transact(move |conn, ctx| {
                service::volume_resize(conn, ctx, &volume, request.size_bytes)
            })
            .await?,
    ))
}

async fn volume_rename(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiPath(volume): ApiPath,
    ApiJson(request): ApiJson<VolumeRename>,
) -> VolumeReply {
    allow(caller, &[Role::Admin])?;
    Ok(Json(
        state
            .transact(move |conn, _| service::volume_rename(conn, &volume, &request.new_name))
            .await?,
    ))
}

async fn volume_placement(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiPath(volume): ApiPath,
) -> Result<Json<pflex_proto::placement::PlacementMap>, MdmError> {
    allow(caller, ANY)?;
    Ok(Json(state.read(move |conn, _| service::placement_map(conn, caller, &volume)).await?))
}

async fn volume_map(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiJson(request): ApiJson<VolumeMap>,
) -> VolumeReply {
    allow(caller, &[Role::Admin])?;
    Ok(Json(state.transact(move |conn, ctx| service::volume_map(conn, ctx, &request)).await?))
}

async fn volume_unmap(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiJson(request): ApiJson<VolumeUnmap>,
) -> VolumeReply {
    allow(caller, &[Role::Admin])?;
    Ok(Json(state.transact(move |conn, _| service::volume_unmap(conn, &request)).await?))
}

async fn sdc_mappings(
    State(state): State<Shared>,
    Auth(caller): Auth,
) -> Result<Json<Vec<pflex_proto::api::MappedVolume>>, MdmError> {
    allow(caller, &[Role::Sdc])?;
    let Caller::Node { id, .. } = caller else { unreachable!("allow() admitted only SDCs") };
    Ok(Json(state.read(move |conn, _| service::sdc_mappings(conn, id)).await?))
}

async fn sds_list(
    State(state): State<Shared>,
    Auth(caller): Auth,
) -> Result<Json<Vec<pflex_proto::api::SdsInfo>>, MdmError> {
    allow(caller, READERS)?;
    Ok(Json(state.read(service::sds_list).await?))
}

async fn sdc_list(
    State(state): State<Shared>,
    Auth(caller): Auth,
) -> Result<Json<Vec<pflex_proto::api::SdcInfo>>, MdmError> {
    allow(caller, READERS)?;
    Ok(Json(state.read(service::sdc_list).await?))
}

async fn cluster_summary(
    State(state): State<Shared>,
    Auth(caller): Auth,
) -> Result<Json<pflex_proto::api::ClusterSummary>, MdmError> {
    allow(caller, READERS)?;
    Ok(Json(state.read(service::cluster_summary).await?))
}

async fn metrics(State(state): State<Shared>, Auth(caller): Auth) -> Result<Response, MdmError> {
    allow(caller, ANY)?;
    let (summary, health, movement) = state
        .read(|conn, ctx| {
            Ok((
                service::cluster_summary(conn, ctx)?,
                service::health_status(conn, ctx)?,
                service::movement_status(conn, ctx)?,
            ))
        })
        .await?;
    let text = crate::metrics::render(&state, &summary, &health, &movement);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

async fn mdm_status(
    State(state): State<Shared>,
    Auth(caller): Auth,
) -> Result<Json<pflex_proto::api::MdmClusterStatus>, MdmError> {
    allow(caller, ANY)?;
    Ok(Json(match &state.replication {
        Some(replication) => replication.status(),
        None => pflex_proto::api::MdmClusterStatus {
            replicated: false,
            id: 0,
            role: "Leader".to_string(),
            leader_id: None,
            leader_url: None,
            term: 0,
            last_log_index: None,
            committed_index: None,
            applied_index: None,
            members: Vec::new(),
        },
    }))
}

fn replicated(state: &AppState) -> Result<&Arc<crate::raft::Replication>, MdmError> {
    state.replication.as_ref().ok_or_else(|| {
        MdmError::conflict(
            "not_replicated",
            "this MDM runs alone (started without --mdm-id): it has no members to change",
        )
    })
}

async fn mdm_add(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiJson(change): ApiJson<pflex_proto::api::MdmMemberChange>,
) -> Result<Json<pflex_proto::api::MdmClusterStatus>, MdmError> {
    allow(caller, &[Role::Admin])?;
    let replication = replicated(&state)?;
    let url = change
        .url
        .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
        .ok_or_else(|| MdmError::invalid("invalid_url", "a new member needs its http(s) URL"))?;
    if change.id == 0 {
        return Err(MdmError::invalid("invalid_id", "member ids start at 1"));
    }
    let id = change.id;
    state.read(move |conn, _| service::check_new_mdm_member(conn, id)).await?;
    replication.add_member(change.id, url.trim_end_matches('/').to_string()).await?;
    tracing::warn!(member = change.id, "added an MDM member");
    Ok(Json(replication.status()))
}

async fn mdm_remove(
    State(state): State<Shared>,
    Auth(caller): Auth,
    ApiJson(change): ApiJson<pflex_proto::api::MdmMemberChange>,
) -> Result<Json<pflex_proto::api::MdmClusterStatus>, MdmError> {
    allow(caller, &[Role::Admin])?;
    let replication = replicated(&state)?;
    replication.remove_member(change.id).await?;
    // Committed once it left the membership: until then it still votes.
    let id = change.id;
    state.transact(move |conn, ctx| service::retire_mdm_member(conn, ctx, id)).await?;
    tracing::warn!(member = change.id, "removed an MDM member");
    Ok(Json(replication.status()))
}

/// A consistent copy of the whole database (`pflex mdm backup`).
async fn mdm_backup(State(state): State<Shared>, Auth(caller): Auth) -> Result<Response, MdmError> {
    allow(caller, &[Role::Admin])?;
    let bytes = state
        .read(|conn, _| {
            crate::db::copy_to_bytes(conn).map_err(|e| MdmError::Internal(format!("backup: {e}")))
        })
        .await?;
    Ok(([(header::CONTENT_TYPE, "application/vnd.sqlite3")], bytes).into_response())
}

/// The peer key a Raft message carries, compared in constant time with
/// this member's.
fn presented_peer_key(
    replication: &crate::raft::Replication,
    headers: &HeaderMap,
) -> crate::raft::peer_auth::PeerKey {
    use crate::raft::peer_auth::PeerKey;
    match headers.get(crate::raft::PEER_KEY_HEADER).and_then(|v| v.to_str().ok()) {
        None => PeerKey::Missing,
        Some(presented) if digests_equal(&digest(presented), &digest(&replication.peer_key)) => {
            PeerKey::Matches
        }
        Some(_) => PeerKey::Wrong,
    }
}

/// Whether a Raft message from member `sender` is taken: its peer key and,
/// over TLS, the member certificate of its connection (see
/// [`crate::raft::peer_auth`]).
fn check_peer(
    replication: &crate::raft::Replication,
    key: crate::raft::peer_auth::PeerKey,
    certificate: Option<&pflex_httpd::PeerCertificate>,
    sender: Option<crate::raft::NodeId>,
) -> Result<(), MdmError> {
    use crate::raft::peer_auth::{admit_message, Identity};
    let identity = match certificate {
        None => Identity::Plain,
        Some(pflex_httpd::PeerCertificate(name)) => Identity::Tls(name.as_deref()),
    };
    admit_message(key, identity, sender).map_err(|refusal| {
        tracing::warn!(member = replication.id, %refusal, ?sender, "refused a Raft message");
        MdmError::Unauthorized(refusal.to_string())
    })
}

/// Whether member `sender`, admitted by [`check_peer`], is still heard: a
/// retired member is not. The database is read only for a sender outside
/// the membership this member knows (never on the leader's steady appends).
async fn check_standing(
    state: &Shared,
    replication: &crate::raft::Replication,
    sender: Option<crate::raft::NodeId>,
) -> Result<(), MdmError> {
    use crate::raft::peer_auth::{admit_sender, Standing};
    let Some(sender) = sender else { return Ok(()) };
    let standing = if replication.knows_member(sender) {
        Standing::Member
    } else if state.read(move |conn, _| service::mdm_member_retired(conn, sender)).await? {
        Standing::Retired
    } else {
        Standing::Unknown
    };
    admit_sender(sender, standing).map_err(|refusal| {
        tracing::warn!(member = replication.id, %refusal, "refused a Raft message");
        MdmError::Unauthorized(refusal.to_string())
    })
}

/// `POST /raft/{message}`: a Raft message from another member, answered
/// with openraft's result as JSON.
async fn raft_message(
    State(state): State<Shared>,
    ApiPath(message): ApiPath,
    certificate: Option<axum::Extension<pflex_httpd::PeerCertificate>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, MdmError> {
    fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, MdmError> {
        serde_json::from_slice(body).map_err(|e| MdmError::invalid("invalid_body", e.to_string()))
    }
    let replication = replicated(&state)?;
    let key = presented_peer_key(replication, &headers);
    let certificate = certificate.as_ref().map(|c| &c.0);
    // A message without the key is refused before its body is parsed.
    if key != crate::raft::peer_auth::PeerKey::Matches {
        check_peer(replication, key, certificate, None)?;
    }
    let state = &state;
    let check = |sender| async move {
        check_peer(replication, key, certificate, sender)?;
        check_standing(state, replication, sender).await
    };
    let raft = &replication.raft;
    Ok(match message.as_str() {
        "append" => {
            let request: openraft::raft::AppendEntriesRequest<crate::raft::TypeConfig> =
                parse(&body)?;
            check(request.vote.leader_id().voted_for()).await?;
            Json(raft.append_entries(request).await).into_response()
        }
        "vote" => {
            let request: openraft::raft::VoteRequest<crate::raft::NodeId> = parse(&body)?;
            check(request.vote.leader_id().voted_for()).await?;
            Json(raft.vote(request).await).into_response()
        }
        "snapshot" => {
            let request: openraft::raft::InstallSnapshotRequest<crate::raft::TypeConfig> =
                parse(&body)?;
            check(request.vote.leader_id().voted_for()).await?;
            Json(raft.install_snapshot(request).await).into_response()
        }
        other => {
            return Err(MdmError::not_found(
                "no_such_endpoint",
                format!("no Raft message {other:?}"),
            ))
        }
    })
}
