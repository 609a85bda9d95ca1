//! Typed async client of the MDM HTTP API.
//!
//! One method per endpoint of the table in [`pflex_proto::api`]; bodies are
//! the shared API types, so a caller never builds JSON by hand. Every call
//! but [`MdmClient::register`] sends the client's credential as
//! `Authorization: Bearer …` (a component credential returned by
//! registration, or the admin token). A non-2xx reply becomes
//! [`MdmClientError::Api`] carrying the MDM's own error code and message.
//!
//! A replicated MDM is given as a comma-separated list of base URLs: the
//! client sends to the one it believes leads, follows a follower's
//! `503 not_leader` to the leader it names, and moves to the next address
//! when one cannot be connected to, with backoff, for a bounded time
//! ([`FAILOVER_BUDGET`]). Only requests that were certainly not executed
//! are sent again (refused by a follower, or never connected).
//!
//! Volumes are addressed by name or numeric id (anything that implements
//! `Display`: a `&str`, a `String` or a `u64`); the MDM resolves either.

mod enrollment;
pub mod trust;

pub use enrollment::{Enrollment, EnrollmentError, CREDENTIAL_FILE};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pflex_proto::api::{
    AckResponse, ApiError, ClusterSummary, DeviceFailure, DeviceFailureVerdict, EnrollmentRequest,
    EnrollmentResponse, HealthStatus, HeartbeatRequest, HeartbeatResponse, MappedVolume,
    MovementPolicy, MovementStatus, NodeType, RebuildComplete, RebuildJob, RebuildProgress,
    RegisterRequest, RegisterResponse, SdcInfo, SdsInfo, TokenAckBatch, TokenRequest,
    TokenResponse, UnreachableReport, UnreachableVerdict, Volume, VolumeCreate, VolumeMap,
    VolumeRename, VolumeResize, VolumeUnmap,
};
use pflex_proto::placement::PlacementMap;
use pflex_proto::token::AccessMode;
use reqwest::{Method, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Default per-request timeout; control-plane calls are small.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Volumes asked for per page of `GET /vol/list`.
const VOLUME_PAGE: u64 = 1000;
/// How long a request keeps looking for the MDM leader (an election takes
/// a few seconds) before it fails.
pub const FAILOVER_BUDGET: Duration = Duration::from_secs(10);

/// Why a call to the MDM failed.
#[derive(Debug, thiserror::Error)]
pub enum MdmClientError {
    /// The MDM answered with an error status; `error` and `message` are its
    /// JSON [`ApiError`] (or the status text and raw body if it sent none).
    #[error("MDM refused the request ({status} {error}): {message}")]
    Api { status: u16, error: String, message: String },
    /// The MDM could not be reached, or the connection failed mid-request.
    #[error("cannot reach the MDM at {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The MDM answered 2xx with a body that is not the expected type.
    #[error("unexpected reply from the MDM at {url}: {detail}")]
    Decode { url: String, detail: String },
    /// The base URL given to [`MdmClient::new`] is not a usable http URL.
    #[error("invalid MDM URL {url:?}: {detail}")]
    InvalidUrl { url: String, detail: String },
}

/// How one attempt at a request failed.
enum Attempt {
    /// A follower refused it (never executed); `leader` is its hint.
    NotLeader { error: MdmClientError, leader: Option<String> },
    /// No connection was made (never sent).
    NotConnected(MdmClientError),
    /// Anything else: not retried (it may have been executed).
    Failed(MdmClientError),
}

impl Attempt {
    fn into_error(self) -> MdmClientError {
        match self {
            Attempt::NotLeader { error, .. }
            | Attempt::NotConnected(error)
            | Attempt::Failed(error) => error,
        }
    }
}

fn parse_base(text: &str) -> Result<Url, String> {
    let base = Url::parse(text.trim_end_matches('/')).map_err(|e| e.to_string())?;
    if base.scheme() != "http" && base.scheme() != "https" {
        return Err("scheme must be http or https".into());
    }
    if base.cannot_be_a_base() {
        return Err("not a base URL".into());
    }
    Ok(base)
}

/// Points `url` (built on some base) at `base`, keeping path and query.
fn rebase(url: &mut Url, base: &Url) {
    if url.origin() != base.origin() {
        let _ = url.set_scheme(base.scheme());
        let _ = url.set_host(base.host_str());
        let _ = url.set_port(base.port());
    }
}

impl MdmClientError {
    /// HTTP status of an [`MdmClientError::Api`] error.
    pub fn status(&self) -> Option<u16> {
        match self {
            MdmClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
    /// The MDM's error code (`not_found`, `forbidden`, …) of an API error.
    pub fn code(&self) -> Option<&str> {
        match self {
            MdmClientError::Api { error, .. } => Some(error),
            _ => None,
        }
    }
    /// True when the MDM said the caller's credential is missing or unknown
    /// (a component should register again).
    pub fn is_unauthorized(&self) -> bool {
        self.status() == Some(401)
    }
    /// True for 404.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
    /// True when the MDM said the volume existed and was deleted (its
    /// number is never given to another volume).
    pub fn is_volume_deleted(&self) -> bool {
        self.is_not_found() && self.code() == Some("volume_deleted")
    }
}

/// A handle on the MDM (one, or the members of a replicated one); cheap to
/// clone (the connection pool and the leader it believes in are shared).
#[derive(Debug, Clone)]
pub struct MdmClient {
    /// Every address given.
    bases: Arc<[Url]>,
    /// The address requests go to (the leader, as far as this client knows).
    current: Arc<Mutex<Url>>,
    credential: Option<String>,
    http: reqwest::Client,
}

impl MdmClient {
    /// A client for the MDM at `base_url` (e.g. `http://127.0.0.1:8001`, or
    /// `URL,URL,URL` for the members of a replicated MDM), sending
    /// `credential` as bearer token when given.
    pub fn new(base_url: &str, credential: Option<String>) -> Result<Self, MdmClientError> {
        Self::with_timeout(base_url, credential, DEFAULT_TIMEOUT)
    }

    /// Like [`MdmClient::new`] with a per-request timeout.
    pub fn with_timeout(
        base_url: &str,
        credential: Option<String>,
        timeout: Duration,
    ) -> Result<Self, MdmClientError> {
        let invalid =
            |detail: String| MdmClientError::InvalidUrl { url: base_url.to_string(), detail };
        let bases = base_url
            .split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(|part| parse_base(part).map_err(&invalid))
            .collect::<Result<Vec<_>, _>>()?;
        let first = bases.first().cloned().ok_or_else(|| invalid("no URL given".into()))?;
        let http = trust::http_client_builder()
            .timeout(timeout)
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        Ok(Self { bases: bases.into(), current: Arc::new(Mutex::new(first)), credential, http })
    }

    /// The same MDM, another credential (e.g. the one registration returned).
    pub fn with_credential(mut self, credential: impl Into<String>) -> Self {
        self.credential = Some(credential.into());
        self
    }

    /// The credential sent with each request, if any.
    pub fn credential(&self) -> Option<&str> {
        self.credential.as_deref()
    }

    /// The base URL requests go to now (the leader's, once known).
    pub fn base_url(&self) -> String {
        self.current_base().as_str().trim_end_matches('/').to_string()
    }

    /// Every address this client was given.
    pub fn base_urls(&self) -> Vec<String> {
        self.bases.iter().map(|b| b.as_str().trim_end_matches('/').to_string()).collect()
    }

    fn current_base(&self) -> Url {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// After a failure at `failed`: the leader it named, else the next
    /// address of the list.
    fn move_on(&self, failed: &Url, hint: Option<Url>) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if *current != *failed {
            return; // another request moved already
        }
        *current = match hint {
            Some(leader) => leader,
            None => {
                let at = self.bases.iter().position(|b| b == failed);
                let next = at.map_or(0, |i| (i + 1) % self.bases.len());
                self.bases[next].clone()
            }
        };
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.current_base();
        {
            let mut path = url.path_segments_mut().expect("checked in new: base URL");
            path.pop_if_empty();
            for segment in segments {
                path.push(segment);
            }
        }
        url
    }

    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<(String, reqwest::Response), MdmClientError> {
        self.send_url(method, self.url(segments), body).await
    }

    async fn send_url(
        &self,
        method: Method,
        url: Url,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<(String, reqwest::Response), MdmClientError> {
        let deadline = tokio::time::Instant::now() + FAILOVER_BUDGET;
        let mut backoff = Duration::from_millis(50);
        let mut url = url;
        // A follower names the leader it last heard of, which may be the one
        // that just died: that hint is not followed back to it.
        let mut unreachable: Option<Url> = None;
        loop {
            let base = self.current_base();
            rebase(&mut url, &base);
            let error = match self.send_once(method.clone(), url.clone(), body).await {
                Ok(sent) => return Ok(sent),
                Err(error) => error,
            };
            let hint = match &error {
                Attempt::NotLeader { leader, .. } => leader
                    .as_deref()
                    .and_then(|l| parse_base(l).ok())
                    .filter(|l| unreachable.as_ref() != Some(l)),
                _ => None,
            };
            if let Attempt::NotConnected(_) = &error {
                unreachable = Some(base.clone());
            }
            let retry = match &error {
                Attempt::NotLeader { .. } => true,
                Attempt::NotConnected(_) => self.bases.len() > 1,
                Attempt::Failed(_) => false,
            };
            if !retry || tokio::time::Instant::now() + backoff > deadline {
                let error = error.into_error();
                if error.code() == Some("unreplicated") {
                    // Not retried (it may yet be committed), but the next
                    // request goes to another member: this one may have
                    // lost its majority without knowing.
                    self.move_on(&base, None);
                }
                return Err(error);
            }
            self.move_on(&base, hint);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(800));
        }
    }

    async fn send_once(
        &self,
        method: Method,
        url: Url,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<(String, reqwest::Response), Attempt> {
        let mut request = self.http.request(method, url.clone());
        if let Some(credential) = &self.credential {
            request = request.bearer_auth(credential);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let url = url.to_string();
        let response = request.send().await.map_err(|source| {
            let connect = source.is_connect();
            let error = MdmClientError::Transport { url: url.clone(), source };
            if connect {
                Attempt::NotConnected(error)
            } else {
                Attempt::Failed(error)
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok((url, response));
        }
        let leader = response
            .headers()
            .get(pflex_proto::api::MDM_LEADER_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = response.text().await.unwrap_or_default();
        let error = match serde_json::from_str::<ApiError>(&text) {
            Ok(api) => MdmClientError::Api {
                status: status.as_u16(),
                error: api.error,
                message: api.message,
            },
            Err(_) => MdmClientError::Api {
                status: status.as_u16(),
                error: status
                    .canonical_reason()
                    .unwrap_or("error")
                    .to_lowercase()
                    .replace(' ', "_"),
                message: if text.is_empty() { status.to_string() } else { text },
            },
        };
        if error.code() == Some("not_leader") {
            return Err(Attempt::NotLeader { error, leader });
        }
        Err(Attempt::Failed(error))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, MdmClientError> {
        let (url, response) = self.send(method, segments, body).await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|source| MdmClientError::Transport { url: url.clone(), source })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| MdmClientError::Decode { url, detail: e.to_string() })
    }

    async fn get<T: DeserializeOwned>(&self, segments: &[&str]) -> Result<T, MdmClientError> {
        self.call(Method::GET, segments, None::<&()>).await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &(impl Serialize + ?Sized),
    ) -> Result<T, MdmClientError> {
        self.call(Method::POST, segments, Some(body)).await
    }

    /// `POST /discovery/register`: join the cluster with the proofs in
    /// `request` (see [`Enrollment`]). Needs no credential; keep the returned one.
    pub async fn register(
        &self,
        request: &RegisterRequest,
    ) -> Result<RegisterResponse, MdmClientError> {
        self.post(&["discovery", "register"], request).await
    }

    /// `POST /health/heartbeat`; the reply lists every volume's epoch and
    /// mapping generation.
    pub async fn heartbeat(
        &self,
        request: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, MdmClientError> {
        self.post(&["health", "heartbeat"], request).await
    }

    /// `GET /health/status`.
    pub async fn health_status(&self) -> Result<HealthStatus, MdmClientError> {
        self.get(&["health", "status"]).await
    }

    /// `POST /token/request` (SDC): a capability token for one volume.
    pub async fn request_token(
        &self,
        volume_id: u64,
        mode: AccessMode,
    ) -> Result<TokenResponse, MdmClientError> {
        self.post(&["token", "request"], &TokenRequest { volume_id, mode }).await
    }

    /// `POST /token/ack`: batched completion records.
    pub async fn ack_tokens(&self, batch: &TokenAckBatch) -> Result<AckResponse, MdmClientError> {
        self.post(&["token", "ack"], batch).await
    }

    /// `POST /health/unreachable` (SDS, SDC): this caller could not reach
    /// SDS `node_id`; the MDM probes it and fails it at once if it is down.
    pub async fn report_unreachable(
        &self,
        node_id: u64,
    ) -> Result<UnreachableVerdict, MdmClientError> {
        self.post(&["health", "unreachable"], &UnreachableReport { node_id }).await
    }

    /// `POST /sds/device-failed` (SDS): one of the caller's devices failed.
    pub async fn device_failed(
        &self,
        report: &DeviceFailure,
    ) -> Result<DeviceFailureVerdict, MdmClientError> {
        self.post(&["sds", "device-failed"], report).await
    }

    /// `POST /rebuild/complete` (SDS, the job's source).
    pub async fn rebuild_complete(
        &self,
        request: &RebuildComplete,
    ) -> Result<RebuildJob, MdmClientError> {
        self.post(&["rebuild", "complete"], request).await
    }

    /// `POST /rebuild/progress` (the job's source SDS); 409 once the job is
    /// no longer running.
    pub async fn rebuild_progress(
        &self,
        request: &RebuildProgress,
    ) -> Result<RebuildJob, MdmClientError> {
        self.post(&["rebuild", "progress"], request).await
    }

    /// `GET /rebuild/status` (admin, MGMT): all data movement at a glance.
    pub async fn movement_status(&self) -> Result<MovementStatus, MdmClientError> {
        self.get(&["rebuild", "status"]).await
    }

    /// `GET /rebuild/policy`.
    pub async fn movement_policy(&self) -> Result<MovementPolicy, MdmClientError> {
        self.get(&["rebuild", "policy"]).await
    }

    /// `PUT /rebuild/policy` (admin).
    pub async fn set_movement_policy(
        &self,
        policy: &MovementPolicy,
    ) -> Result<MovementPolicy, MdmClientError> {
        self.call(Method::PUT, &["rebuild", "policy"], Some(policy)).await
    }

    /// `POST /sds/{name-or-id}/remove` (admin): drain the SDS, then remove it.
    pub async fn remove_sds(&self, name_or_id: &str) -> Result<SdsInfo, MdmClientError> {
        self.post(&["sds", name_or_id, "remove"], &()).await
    }

    /// `POST /admin/enrollments` (admin): a one-time enrollment token.
    pub async fn create_enrollment(
        &self,
        request: &EnrollmentRequest,
    ) -> Result<EnrollmentResponse, MdmClientError> {
        self.post(&["admin", "enrollments"], request).await
    }

    /// `POST /admin/nodes/reset` (admin): the node's credential stops working
    /// and its name may be enrolled again.
    pub async fn reset_node(
        &self,
        node_type: NodeType,
        name: &str,
    ) -> Result<serde_json::Value, MdmClientError> {
        let body = serde_json::json!({ "node_type": node_type, "name": name });
        self.post(&["admin", "nodes", "reset"], &body).await
    }

    /// `GET /admin/audit` (admin, MGMT): the newest 100 audit rows, newest first.
    pub async fn audit(&self) -> Result<Vec<serde_json::Value>, MdmClientError> {
        self.get(&["admin", "audit"]).await
    }

    /// `GET /rebuild/jobs` (admin, MGMT): every rebuild job, newest first.
    pub async fn rebuild_jobs(&self) -> Result<Vec<RebuildJob>, MdmClientError> {
        self.get(&["rebuild", "jobs"]).await
    }

    /// `GET /vol/{volume}/placement`.
    pub async fn placement(
        &self,
        volume: impl std::fmt::Display,
    ) -> Result<PlacementMap, MdmClientError> {
        self.get(&["vol", &volume.to_string(), "placement"]).await
    }

    /// `GET /sdc/mappings`: the volumes mapped to the calling SDC.
    pub async fn sdc_mappings(&self) -> Result<Vec<MappedVolume>, MdmClientError> {
        self.get(&["sdc", "mappings"]).await
    }

    /// `POST /vol/create`.
    pub async fn volume_create(&self, request: &VolumeCreate) -> Result<Volume, MdmClientError> {
        self.post(&["vol", "create"], request).await
    }

    /// Every volume: `GET /vol/list`, page after page.
    pub async fn volume_list(&self) -> Result<Vec<Volume>, MdmClientError> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let (page, next) = self.volume_page(after, VOLUME_PAGE).await?;
            all.extend(page);
            match next {
                Some(next) if next > after => after = next,
                _ => return Ok(all),
            }
        }
    }

    /// One page of `GET /vol/list`: up to `limit` volumes with ids above
    /// `after`, and the `after` of the next page when there is one.
    pub async fn volume_page(
        &self,
        after: u64,
        limit: u64,
    ) -> Result<(Vec<Volume>, Option<u64>), MdmClientError> {
        let mut url = self.url(&["vol", "list"]);
        url.query_pairs_mut()
            .append_pair("after", &after.to_string())
            .append_pair("limit", &limit.to_string());
        let (url, response) = self.send_url(Method::GET, url, None::<&()>).await?;
        let next = response
            .headers()
            .get(pflex_proto::api::NEXT_PAGE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let bytes = response
            .bytes()
            .await
            .map_err(|source| MdmClientError::Transport { url: url.clone(), source })?;
        let page = serde_json::from_slice(&bytes)
            .map_err(|e| MdmClientError::Decode { url, detail: e.to_string() })?;
        Ok((page, next))
    }

    /// `GET /vol/{volume}`.
    pub async fn volume_show(
        &self,
        volume: impl std::fmt::Display,
    ) -> Result<Volume, MdmClientError> {
        self.get(&["vol", &volume.to_string()]).await
    }

    /// `GET /mdm/status`: the MDM cluster as the member that answers sees it.
    pub async fn mdm_status(&self) -> Result<pflex_proto::api::MdmClusterStatus, MdmClientError> {
        self.get(&["mdm", "status"]).await
    }

    /// `GET /mdm/status` of each address given, in order (an unreachable
    /// member is an error in its place).
    pub async fn mdm_status_each(
        &self,
    ) -> Vec<(String, Result<pflex_proto::api::MdmClusterStatus, MdmClientError>)> {
        let mut out = Vec::new();
        for base in self.bases.iter() {
            let mut url = base.clone();
            url.set_path("/mdm/status");
            let answer = match self.send_once(Method::GET, url.clone(), None::<&()>).await {
                Ok((url, response)) => match response.bytes().await {
                    Ok(bytes) => serde_json::from_slice(&bytes)
                        .map_err(|e| MdmClientError::Decode { url, detail: e.to_string() }),
                    Err(source) => Err(MdmClientError::Transport { url, source }),
                },
                Err(attempt) => Err(attempt.into_error()),
            };
            out.push((base.as_str().trim_end_matches('/').to_string(), answer));
        }
        out
    }

    /// `POST /mdm/add`: a new member joins (learner, then voter).
    pub async fn mdm_add(
        &self,
        id: u64,
        url: &str,
    ) -> Result<pflex_proto::api::MdmClusterStatus, MdmClientError> {
        let change = pflex_proto::api::MdmMemberChange { id, url: Some(url.to_string()) };
        self.post(&["mdm", "add"], &change).await
    }

    /// `POST /mdm/remove`: member `id` leaves.
    pub async fn mdm_remove(
        &self,
        id: u64,
    ) -> Result<pflex_proto::api::MdmClusterStatus, MdmClientError> {
        let change = pflex_proto::api::MdmMemberChange { id, url: None };
        self.post(&["mdm", "remove"], &change).await
    }

    /// `GET /mdm/backup`: a consistent copy of the MDM database.
    pub async fn mdm_backup(&self) -> Result<Vec<u8>, MdmClientError> {
        let (url, response) = self.send(Method::GET, &["mdm", "backup"], None::<&()>).await?;
        let bytes =
            response.bytes().await.map_err(|source| MdmClientError::Transport { url, source })?;
        Ok(bytes.to_vec())
    }

    /// `POST /vol/{volume}/resize` (grow only).
    pub async fn volume_resize(
        &self,
        volume: impl std::fmt::Display,
        size_bytes: u64,
    ) -> Result<Volume, MdmClientError> {
        self.post(&["vol", &volume.to_string(), "resize"], &VolumeResize { size_bytes }).await
    }

    /// `POST /vol/{volume}/rename`.
    pub async fn volume_rename(
        &self,
        volume: impl std::fmt::Display,
        new_name: &str,
    ) -> Result<Volume, MdmClientError> {
        self.post(
            &["vol", &volume.to_string(), "rename"],
            &VolumeRename { new_name: new_name.to_string() },
        )
        .await
    }

    /// `DELETE /vol/{volume}` (refused with 409 while mapped).
    pub async fn volume_delete(
        &self,
        volume: impl std::fmt::Display,
    ) -> Result<Volume, MdmClientError> {
        self.call(Method::DELETE, &["vol", &volume.to_string()], None::<&()>).await
    }

    /// `POST /vol/map`.
    pub async fn volume_map(&self, request: &VolumeMap) -> Result<Volume, MdmClientError> {
        self.post(&["vol", "map"], request).await
    }

    /// `POST /vol/unmap`.
    pub async fn volume_unmap(&self, request: &VolumeUnmap) -> Result<Volume, MdmClientError> {
        self.post(&["vol", "unmap"], request).await
    }

    /// `GET /sds/list`.
    pub async fn sds_list(&self) -> Result<Vec<SdsInfo>, MdmClientError> {
        self.get(&["sds", "list"]).await
    }

    /// `GET /sdc/list`.
    pub async fn sdc_list(&self) -> Result<Vec<SdcInfo>, MdmClientError> {
        self.get(&["sdc", "list"]).await
    }

    /// `GET /cluster/summary`.
    pub async fn cluster_summary(&self) -> Result<ClusterSummary, MdmClientError> {
        self.get(&["cluster", "summary"]).await
    }

    /// `POST /cluster/rotate` (admin): a new token signing key, admin token
    /// and enrollment material (see the MDM's `keys` module).
    pub async fn cluster_rotate(&self) -> Result<pflex_proto::api::RotateResponse, MdmClientError> {
        self.post(&["cluster", "rotate"], &serde_json::json!({})).await
    }

    /// `GET /metrics`: Prometheus text exposition.
    pub async fn metrics_text(&self) -> Result<String, MdmClientError> {
        let (url, response) = self.send(Method::GET, &["metrics"], None::<&()>).await?;
        response.text().await.map_err(|source| MdmClientError::Transport { url, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_join_segments_and_escape() {
        let client = MdmClient::new("http://127.0.0.1:8001/", None).unwrap();
        assert_eq!(client.url(&["vol", "list"]).as_str(), "http://127.0.0.1:8001/vol/list");
        assert_eq!(
            client.url(&["vol", "a b/c", "placement"]).as_str(),
            "http://127.0.0.1:8001/vol/a%20b%2Fc/placement"
        );
        assert_eq!(client.base_url(), "http://127.0.0.1:8001");
        let prefixed = MdmClient::new("http://127.0.0.1:8001/api", None).unwrap();
        assert_eq!(prefixed.url(&["sds", "list"]).as_str(), "http://127.0.0.1:8001/api/sds/list");
    }

    #[test]
    fn rejects_bad_base_urls() {
        assert!(matches!(
            MdmClient::new("not a url", None),
            Err(MdmClientError::InvalidUrl { .. })
        ));
        assert!(matches!(MdmClient::new("ftp://x", None), Err(MdmClientError::InvalidUrl { .. })));
    }

    #[tokio::test]
    async fn unreachable_mdm_is_a_transport_error() {
        // Bind then drop a listener: the port is very likely closed afterwards.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client = MdmClient::new(&format!("http://127.0.0.1:{port}"), Some("x".into())).unwrap();
        let err = client.volume_list().await.unwrap_err();
        assert!(matches!(err, MdmClientError::Transport { .. }), "{err}");
        assert_eq!(err.status(), None);
    }
}

/// Reports of unreachable SDS nodes from one process: at most one per node
/// per interval, however many requests fail, each sent in the background.
#[derive(Debug)]
pub struct UnreachableReports {
    last: std::sync::Mutex<std::collections::HashMap<u64, std::time::Instant>>,
    interval: std::time::Duration,
}

impl UnreachableReports {
    pub fn new(interval: std::time::Duration) -> Self {
        Self { last: std::sync::Mutex::new(std::collections::HashMap::new()), interval }
    }

    /// Tells the MDM that SDS `node_id` could not be reached, unless this
    /// process did so within the interval. The report goes out on its own
    /// task: the MDM's probe may take seconds, and the caller may hold a
    /// chunk's ordering lock or spend a request's retry budget. Needs a
    /// tokio runtime.
    pub fn report(&self, mdm: &MdmClient, node_id: u64) {
        self.report_then(mdm, node_id, || {});
    }

    /// [`Self::report`], calling `on_failed` if the MDM answers that the
    /// node is FAILED (its copies moved: the caller's maps are out of date).
    pub fn report_then(
        &self,
        mdm: &MdmClient,
        node_id: u64,
        on_failed: impl FnOnce() + Send + 'static,
    ) {
        if !self.due(node_id) {
            return;
        }
        let mdm = mdm.clone();
        tokio::spawn(async move {
            match mdm.report_unreachable(node_id).await {
                Ok(verdict) => {
                    tracing::warn!(
                        sds = node_id,
                        status = %verdict.status,
                        copies_moved = verdict.copies_replaced,
                        "reported an unreachable SDS"
                    );
                    if verdict.status == "FAILED" {
                        on_failed();
                    }
                }
                Err(e) => {
                    tracing::debug!(sds = node_id, error = %e, "unreachable report not taken")
                }
            }
        });
    }

    /// Whether a report about `node_id` is due now; if so it is counted as sent.
    fn due(&self, node_id: u64) -> bool {
        let now = std::time::Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last.get(&node_id) {
            Some(at) if now.duration_since(*at) < self.interval => false,
            _ => {
                last.insert(node_id, now);
                true
            }
        }
    }
}

impl Default for UnreachableReports {
    fn default() -> Self {
        Self::new(std::time::Duration::from_secs(1))
    }
}
