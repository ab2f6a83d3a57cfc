//! Errors of the object-store layer. They carry enough to explain a failure to a person
//! (status, the server's own message, the object) and are mapped to errnos in `crate::error`.

use thiserror::Error;

#[derive(Debug, Error, Clone)]
pub enum ClientError {
    /// 404: no such bucket or object (or the pinned generation is gone).
    #[error("not found (HTTP 404): {0}")]
    NotFound(String),
    /// 401 / 403 / requester-pays 400: the credentials or billing project are wrong.
    #[error("access denied (HTTP {status}): {message}")]
    Denied { status: u16, message: String },
    /// Any other HTTP error status.
    #[error("HTTP {status}: {message}")]
    Http { status: u16, message: String },
    /// Could not talk to the server at all (connect, reset, timeout).
    #[error("cannot reach {endpoint}: {cause}")]
    Network { endpoint: String, cause: String },
    /// The server answered something we refuse to trust (bad JSON, wrong range, short body).
    #[error("malformed response: {0}")]
    Malformed(String),
    /// An answer was cut short or stalled: worth asking again (a media read resumes).
    #[error("interrupted transfer: {0}")]
    Interrupted(String),
    /// A whole object arrived with a CRC32C other than the listed one: worth asking again
    /// (the bytes were damaged on the way), but not resumable, and counted on its own.
    #[error("checksum mismatch: {0}")]
    Checksum(String),
    /// The object changed under us: a different generation was served.
    #[error("object changed while reading: {0}")]
    Stale(String),
    /// Credentials could not be obtained.
    #[error("credentials: {0}")]
    Auth(String),
}

impl ClientError {
    /// Worth another try: throttling, server errors, broken connections.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Http { status, .. } => *status == 408 || *status == 429 || *status >= 500,
            ClientError::Network { .. }
            | ClientError::Interrupted(_)
            | ClientError::Checksum(_) => true,
            _ => false,
        }
    }

    /// HTTP status if the server answered one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::NotFound(_) => Some(404),
            ClientError::Denied { status, .. } | ClientError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}
