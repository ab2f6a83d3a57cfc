//! Where bearer tokens come from.
//!
//! Real use goes through `gcp_auth` (a service-account key file, gcloud's application-default
//! user credentials, or the GCE metadata server), which caches tokens and refreshes them before
//! they expire, so asking for a token on every request is cheap. Emulators run anonymous; tests
//! can pin a static token.

use std::path::Path;
use std::sync::Arc;

use super::ClientError;

/// Read-only scope: physiofs never asks for more than it needs.
pub const SCOPE_READ_ONLY: &str = "https://www.googleapis.com/auth/devstorage.read_only";

#[derive(Clone)]
pub enum TokenSource {
    /// No Authorization header (public buckets, emulators).
    Anonymous,
    /// A fixed bearer token (tests, or a token minted elsewhere).
    Static(String),
    /// A refreshing provider from `gcp_auth`.
    Gcp(Arc<dyn gcp_auth::TokenProvider>),
}

impl std::fmt::Debug for TokenSource {
    // Never print a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Anonymous => f.write_str("Anonymous"),
            TokenSource::Static(_) => f.write_str("Static(<redacted>)"),
            TokenSource::Gcp(_) => f.write_str("Gcp"),
        }
    }
}

impl TokenSource {
    /// Application-default credentials, in gcp_auth's order.
    pub async fn application_default() -> Result<Self, ClientError> {
        // gcp_auth refuses GOOGLE_APPLICATION_CREDENTIALS pointing at an `authorized_user`
        // file (what `gcloud auth application-default login` writes); load those ourselves.
        if let Ok(path) = std::env::var("GOOGLE_APPLICATION_CREDENTIALS")
            && let Ok(text) = std::fs::read_to_string(&path)
            && text.contains("\"authorized_user\"")
        {
            return Err(ClientError::Auth(format!(
                "GOOGLE_APPLICATION_CREDENTIALS={path} holds user credentials, which must live at \
                 ~/.config/gcloud/application_default_credentials.json: unset the variable \
                 (gcloud's default location is found automatically) or pass a service-account key with --key-file"
            )));
        }
        match gcp_auth::provider().await {
            Ok(p) => Ok(TokenSource::Gcp(p)),
            Err(e) => Err(ClientError::Auth(format!(
                "no Google credentials found ({e}). On a workstation run \
                 `gcloud auth application-default login` with the Google account registered on PhysioNet; \
                 on a GCE VM attach a service account; or pass --key-file KEY.json. \
                 For an emulator or public bucket use --anonymous"
            ))),
        }
    }

    /// A service-account JSON key file.
    pub fn key_file(path: &Path) -> Result<Self, ClientError> {
        let sa = gcp_auth::CustomServiceAccount::from_file(path).map_err(|e| {
            ClientError::Auth(format!(
                "cannot use key file {}: {e} (expected a service-account JSON key)",
                path.display()
            ))
        })?;
        Ok(TokenSource::Gcp(Arc::new(sa)))
    }

    /// The bearer token to send now, if any.
    pub async fn token(&self) -> Result<Option<String>, ClientError> {
        match self {
            TokenSource::Anonymous => Ok(None),
            TokenSource::Static(t) => Ok(Some(t.clone())),
            TokenSource::Gcp(p) => p
                .token(&[SCOPE_READ_ONLY])
                .await
                .map(|t| Some(t.as_str().to_string()))
                .map_err(|e| ClientError::Auth(format!("cannot obtain an access token: {e}"))),
        }
    }
}
