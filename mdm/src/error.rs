//! The MDM's error type and its single mapping to HTTP statuses.
//!
//! Every failure a handler can produce is an [`MdmError`]; its
//! [`IntoResponse`] is the only place that chooses a status code and writes
//! the JSON [`ApiError`] body. Database failures are the only 500s: bad
//! input is always caught by validation first.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pflex_proto::api::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum MdmError {
    /// Malformed or invalid input (400); `code` is the stable error code.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// Missing or unknown credential, or a wrong join key (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Known caller without the right to do this (403).
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    /// The named thing does not exist (404).
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    /// The request conflicts with current state (409).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// Wrong HTTP method for a known path (405).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// Body not JSON (415).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Body too large (413).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// Not enough free capacity in the pool for a thick reservation (507).
    #[error("{0}")]
    InsufficientCapacity(String),
    /// This MDM is not the leader of the replicated MDM cluster (503); the
    /// leader's address, when known, is in the message and in the
    /// [`pflex_proto::api::MDM_LEADER_HEADER`] header.
    #[error("this MDM is not the leader{}", leader.as_deref().map(|l| format!("; the leader is {l}")).unwrap_or_else(|| ": an election is under way".to_string()))]
    NotLeader { leader: Option<String> },
    /// The change could not be committed by the MDM cluster (503): no
    /// majority was reachable, or leadership was lost while it waited.
    #[error("not committed by the MDM cluster: {0}")]
    Unreplicated(String),
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

impl MdmError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        MdmError::BadRequest { code: "bad_request", message: message.into() }
    }
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        MdmError::BadRequest { code, message: message.into() }
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        MdmError::Forbidden { code: "forbidden", message: message.into() }
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        MdmError::NotFound { code, message: message.into() }
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        MdmError::Conflict { code, message: message.into() }
    }

    /// Status and stable code of this error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            MdmError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            MdmError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            MdmError::Forbidden { code, .. } => (StatusCode::FORBIDDEN, code),
            MdmError::NotFound { code, .. } => (StatusCode::NOT_FOUND, code),
            MdmError::Conflict { code, .. } => (StatusCode::CONFLICT, code),
            MdmError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            MdmError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            MdmError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            MdmError::InsufficientCapacity(_) => {
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient_capacity")
            }
            MdmError::NotLeader { .. } => (StatusCode::SERVICE_UNAVAILABLE, "not_leader"),
            MdmError::Unreplicated(_) => (StatusCode::SERVICE_UNAVAILABLE, "unreplicated"),
            MdmError::Database(_) | MdmError::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        }
    }
}

impl IntoResponse for MdmError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        match &self {
            // A follower's refusal is routine: clients go to the leader.
            MdmError::NotLeader { .. } => {}
            MdmError::Unreplicated(_) => tracing::warn!(error = %self, "request not committed"),
            _ if status.is_server_error() => tracing::error!(error = %self, "request failed"),
            _ => {}
        }
        let mut response =
            (status, Json(ApiError { error: code.to_string(), message: self.to_string() }))
                .into_response();
        if let MdmError::NotLeader { leader: Some(leader) } = &self {
            if let Ok(value) = axum::http::HeaderValue::from_str(leader) {
                response.headers_mut().insert(pflex_proto::api::MDM_LEADER_HEADER, value);
            }
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"pflex-mdm\""),
            );
        }
        response
    }
}
