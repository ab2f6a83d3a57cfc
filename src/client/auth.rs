//! Where bearer tokens come from, and where the credentials behind them came from.
//!
//! Which credentials a mount uses is decided first, as data ([`Credentials`]: a kind, a
//! source, an account), without I/O, so it can be tested and shown; [`TokenSource::build`]
//! then makes the live provider and keeps that description, refined by what it found (which
//! of the application-default sources answered, a key file's account), so a mount can say in
//! one line whose credentials it uses. No token is ever part of it.
//!
//! Real use goes through `gcp_auth` (a service-account key file, gcloud's application-default
//! user credentials, the GCE metadata server, or the gcloud CLI), which caches tokens and
//! refreshes them before they expire, so asking for a token on every request is cheap. User
//! credentials named by GOOGLE_APPLICATION_CREDENTIALS (which gcp_auth refuses, though
//! `gcloud auth application-default login` writes them and Google's own libraries take them
//! there) are refreshed here, the same way: one refresh-token grant, kept until near expiry.
//! Emulators run anonymous; tests can pin a static token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::ClientError;

/// Read-only scope: physiofs never asks for more than it needs.
pub const SCOPE_READ_ONLY: &str = "https://www.googleapis.com/auth/devstorage.read_only";

/// The variable naming a service-account key for application-default credentials.
pub const GOOGLE_APPLICATION_CREDENTIALS: &str = "GOOGLE_APPLICATION_CREDENTIALS";

/// What sort of credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialKind {
    /// None: no Authorization header (public buckets, emulators).
    Anonymous,
    /// A service-account JSON key.
    ServiceAccountKey,
    /// Application-default credentials, found when built (gcp_auth's order: the
    /// GOOGLE_APPLICATION_CREDENTIALS key, gcloud's user file, the metadata server, the CLI).
    ApplicationDefault,
    /// gcloud's application-default user credentials (`gcloud auth application-default login`).
    GcloudUser,
    /// The service account of the GCE VM, from its metadata server.
    MetadataServer,
    /// The gcloud CLI's account (`gcloud auth print-access-token`).
    GcloudCli,
    /// A fixed token given in code (tests).
    Static,
}

/// Where credentials come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialSource {
    /// A command-line flag, e.g. `--anonymous`.
    Flag(&'static str),
    /// An environment variable and its value, e.g. `STORAGE_EMULATOR_HOST=localhost:4443`.
    Variable { name: &'static str, value: String },
    /// A file, e.g. `--key-file`'s.
    File(PathBuf),
    /// Nothing the user named: gcp_auth's search, the metadata server, the gcloud CLI, code.
    /// `gcloud_file` is where gcloud keeps application-default user credentials.
    Search { gcloud_file: Option<PathBuf> },
}

/// Which credentials, where from, and whose (never a token or a key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub kind: CredentialKind,
    pub source: CredentialSource,
    /// The account they act as, when known (a key file's `client_email`).
    pub account: Option<String>,
}

impl Credentials {
    pub fn anonymous(source: CredentialSource) -> Self {
        Credentials {
            kind: CredentialKind::Anonymous,
            source,
            account: None,
        }
    }
}

impl std::fmt::Display for Credentials {
    /// One line, e.g. `service-account key /k.json (sa@p.iam.gserviceaccount.com)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use CredentialKind as K;
        use CredentialSource as S;
        let kind = match self.kind {
            K::Anonymous => "anonymous",
            K::ServiceAccountKey => "service-account key",
            K::ApplicationDefault => "application-default credentials",
            K::GcloudUser => "gcloud application-default user credentials",
            K::MetadataServer => "the VM's service account (GCE metadata server)",
            K::GcloudCli => "the gcloud CLI's account (gcloud auth print-access-token)",
            K::Static => "a fixed token",
        };
        f.write_str(kind)?;
        match (&self.source, self.kind) {
            (S::Flag(flag), _) => write!(f, " ({flag})")?,
            (S::Variable { name, value }, K::Anonymous) => write!(f, " ({name}={value})")?,
            (S::Variable { name, value }, _) => write!(f, " from {name}={value}")?,
            (S::File(p), _) => write!(f, " {}", p.display())?,
            (S::Search { .. }, K::ApplicationDefault) => f.write_str(
                " (looked for in GOOGLE_APPLICATION_CREDENTIALS, gcloud's application-default \
                 file, the GCE metadata server, the gcloud CLI)",
            )?,
            (S::Search { .. }, _) => {}
        }
        if let Some(a) = &self.account {
            write!(f, " ({a})")?;
        }
        Ok(())
    }
}

/// Why credentials could not be set up, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{cause}")]
pub struct AuthError {
    pub cause: String,
    pub fix: String,
}

#[derive(Clone)]
enum Provider {
    None,
    Static(String),
    Gcp(Arc<dyn gcp_auth::TokenProvider>),
    User(Arc<AuthorizedUser>),
}

/// Bearer tokens for requests, with the description of the credentials they come from.
#[derive(Clone)]
pub struct TokenSource {
    provider: Provider,
    credentials: Credentials,
}

impl std::fmt::Debug for TokenSource {
    // Never print a token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenSource({})", self.credentials)
    }
}

impl TokenSource {
    /// No Authorization header (public buckets, emulators), for tests and code that need no
    /// description of where that came from.
    #[allow(non_upper_case_globals)]
    pub const Anonymous: TokenSource = TokenSource {
        provider: Provider::None,
        credentials: Credentials {
            kind: CredentialKind::Anonymous,
            source: CredentialSource::Search { gcloud_file: None },
            account: None,
        },
    };

    /// A fixed bearer token (tests, or a token minted elsewhere).
    pub fn fixed(token: impl Into<String>) -> Self {
        TokenSource {
            provider: Provider::Static(token.into()),
            credentials: Credentials {
                kind: CredentialKind::Static,
                source: CredentialSource::Search { gcloud_file: None },
                account: None,
            },
        }
    }

    /// The live provider for `credentials`: reads a key file, or finds application-default
    /// credentials (which may ask the metadata server or run gcloud). The description kept
    /// says which one answered.
    pub async fn build(credentials: &Credentials) -> Result<Self, AuthError> {
        use CredentialKind as K;
        match (credentials.kind, &credentials.source) {
            (K::Anonymous, _) => Ok(TokenSource {
                provider: Provider::None,
                credentials: credentials.clone(),
            }),
            (K::ServiceAccountKey, CredentialSource::File(path)) => {
                service_account_key(path, credentials.source.clone())
            }
            (K::ApplicationDefault, CredentialSource::Variable { value, .. }) => {
                application_default_key(Path::new(value), credentials.source.clone())
            }
            (K::ApplicationDefault, CredentialSource::Search { gcloud_file }) => {
                application_default(gcloud_file.clone()).await
            }
            (kind, source) => Err(AuthError {
                cause: format!("cannot build {kind:?} credentials from {source:?}"),
                fix: "this is a bug in physiofs: please report it".into(),
            }),
        }
    }

    /// Which credentials these tokens come from.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The bearer token to send now, if any.
    pub async fn token(&self) -> Result<Option<String>, ClientError> {
        match &self.provider {
            Provider::None => Ok(None),
            Provider::Static(t) => Ok(Some(t.clone())),
            Provider::Gcp(p) => p
                .token(&[SCOPE_READ_ONLY])
                .await
                .map(|t| Some(t.as_str().to_string()))
                .map_err(|e| ClientError::Auth(format!("cannot obtain an access token: {e}"))),
            Provider::User(u) => u.token().await.map(Some),
        }
    }
}

/// A service-account JSON key (`--key-file`), read once: for the provider and its account.
fn service_account_key(path: &Path, source: CredentialSource) -> Result<TokenSource, AuthError> {
    let fail = |e: &dyn std::fmt::Display| AuthError {
        cause: format!("cannot use key file {}: {e}", path.display()),
        fix: "pass a service-account JSON key (Cloud console: IAM, Service accounts, Keys)".into(),
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(&e))?;
    let sa = gcp_auth::CustomServiceAccount::from_json(&text).map_err(|e| fail(&e))?;
    Ok(TokenSource {
        provider: Provider::Gcp(Arc::new(sa)),
        credentials: Credentials {
            kind: CredentialKind::ServiceAccountKey,
            source,
            account: client_email(&text),
        },
    })
}

/// The file GOOGLE_APPLICATION_CREDENTIALS names: a service-account key (through gcp_auth),
/// or user credentials (`authorized_user`, which gcp_auth refuses there), refreshed here.
fn application_default_key(
    path: &Path,
    source: CredentialSource,
) -> Result<TokenSource, AuthError> {
    let var = format!("{GOOGLE_APPLICATION_CREDENTIALS}={}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| AuthError {
        cause: format!("no Google credentials found ({var}: {e})"),
        fix: format!(
            "point {GOOGLE_APPLICATION_CREDENTIALS} at a service-account key, or unset it \
             (gcloud's default location is found automatically)"
        ),
    })?;
    let parsed: Option<serde_json::Value> = serde_json::from_str(&text).ok();
    if let Some(v) = parsed.as_ref().filter(|v| v["type"] == "authorized_user") {
        let user = AuthorizedUser::from_json(v).map_err(|e| AuthError {
            cause: format!("cannot use the user credentials in {var}: {e}"),
            fix: "run `gcloud auth application-default login` again (it writes a complete \
                  file), or unset the variable"
                .into(),
        })?;
        return Ok(TokenSource {
            provider: Provider::User(Arc::new(user)),
            credentials: Credentials {
                kind: CredentialKind::GcloudUser,
                source,
                account: v["account"].as_str().map(str::to_string),
            },
        });
    }
    let sa = gcp_auth::CustomServiceAccount::from_json(&text).map_err(|e| AuthError {
        cause: format!("cannot use {var}: {e}"),
        fix: format!(
            "point {GOOGLE_APPLICATION_CREDENTIALS} at a service-account JSON key, or unset it"
        ),
    })?;
    Ok(TokenSource {
        provider: Provider::Gcp(Arc::new(sa)),
        credentials: Credentials {
            kind: CredentialKind::ServiceAccountKey,
            source,
            account: client_email(&text),
        },
    })
}

/// gcp_auth's search after GOOGLE_APPLICATION_CREDENTIALS, in its order (as
/// `gcp_auth::provider` does it), remembering which one answered.
async fn application_default(gcloud_file: Option<PathBuf>) -> Result<TokenSource, AuthError> {
    let found = |provider: Arc<dyn gcp_auth::TokenProvider>, kind, source| TokenSource {
        provider: Provider::Gcp(provider),
        credentials: Credentials {
            kind,
            source,
            account: None,
        },
    };
    let user = match gcp_auth::ConfigDefaultCredentials::new().await {
        Ok(p) => {
            let source = match gcloud_file {
                Some(f) => CredentialSource::File(f),
                None => CredentialSource::Search { gcloud_file: None },
            };
            return Ok(found(Arc::new(p), CredentialKind::GcloudUser, source));
        }
        Err(e) => e,
    };
    let search = CredentialSource::Search { gcloud_file };
    let metadata = match gcp_auth::MetadataServiceAccount::new().await {
        Ok(p) => return Ok(found(Arc::new(p), CredentialKind::MetadataServer, search)),
        Err(e) => e,
    };
    let cli = match gcp_auth::GCloudAuthorizedUser::new().await {
        Ok(p) => return Ok(found(Arc::new(p), CredentialKind::GcloudCli, search)),
        Err(e) => e,
    };
    let e = gcp_auth::Error::NoAuthMethod(Box::new(cli), Box::new(metadata), Box::new(user));
    Err(AuthError {
        cause: format!("no Google credentials found ({e})"),
        fix: "on a workstation run `gcloud auth application-default login` with the Google \
              account registered on PhysioNet; on a GCE VM attach a service account; or pass \
              --key-file KEY.json. For an emulator or public bucket use --anonymous"
            .into(),
    })
}

/// User credentials (`"type": "authorized_user"`, what `gcloud auth application-default
/// login` writes): the refresh token is exchanged at the file's `token_uri` for an access
/// token, which is kept until five minutes before it expires.
struct AuthorizedUser {
    http: reqwest::Client,
    token_uri: String,
    client_id: String,
    client_secret: String,
    refresh_token: String,
    cached: tokio::sync::Mutex<Option<(String, std::time::Instant)>>,
}

/// How long before its expiry a token is replaced.
const REFRESH_MARGIN: std::time::Duration = std::time::Duration::from_secs(300);

impl AuthorizedUser {
    fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        let field = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .filter(|x| !x.is_empty())
                .map(str::to_string)
                .ok_or_else(|| format!("it has no {k}"))
        };
        Ok(AuthorizedUser {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .map_err(|e| e.to_string())?,
            token_uri: field("token_uri")
                .unwrap_or_else(|_| "https://oauth2.googleapis.com/token".into()),
            client_id: field("client_id")?,
            client_secret: field("client_secret")?,
            refresh_token: field("refresh_token")?,
            cached: tokio::sync::Mutex::new(None),
        })
    }

    async fn token(&self) -> Result<String, ClientError> {
        let mut cached = self.cached.lock().await;
        let now = std::time::Instant::now();
        if let Some((t, expires)) = cached.as_ref()
            && now + REFRESH_MARGIN < *expires
        {
            return Ok(t.clone());
        }
        let fail = |e: String| {
            ClientError::Auth(format!(
                "cannot refresh the user's access token at {}: {e} (run `gcloud auth \
                 application-default login` again)",
                self.token_uri
            ))
        };
        let resp = self
            .http
            .post(&self.token_uri)
            .form(&[
                ("grant_type", "refresh_token"),
                ("client_id", self.client_id.as_str()),
                ("client_secret", self.client_secret.as_str()),
                ("refresh_token", self.refresh_token.as_str()),
            ])
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| fail(e.to_string()))?;
        if !status.is_success() {
            return Err(fail(format!("HTTP {status}: {body}")));
        }
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| fail(format!("bad JSON: {e}")))?;
        let token = v["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| fail("no access_token in the answer".into()))?
            .to_string();
        let lifetime = std::time::Duration::from_secs(v["expires_in"].as_u64().unwrap_or(3600));
        *cached = Some((token.clone(), now + lifetime));
        Ok(token)
    }
}

/// A key file's `client_email`, if it has one.
fn client_email(key_json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(key_json).ok()?;
    Some(v.get("client_email")?.as_str()?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service-account key with a throwaway private key made by openssl (as the mount test
    /// of key files does); nothing is ever signed with it.
    fn key_json(dir: &Path, email: &str) -> String {
        let pem = dir.join("key.pem");
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&pem)
            .output()
            .expect("openssl (needed to make a test key)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::json!({
            "type": "service_account",
            "project_id": "p",
            "private_key_id": "k",
            "private_key": std::fs::read_to_string(&pem).unwrap(),
            "client_email": email,
            "client_id": "1",
            "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string()
    }

    #[tokio::test]
    async fn a_key_file_is_described_with_its_account_and_never_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sa.json");
        std::fs::write(&path, key_json(dir.path(), "sa@x.iam.gserviceaccount.com")).unwrap();
        let c = Credentials {
            kind: CredentialKind::ServiceAccountKey,
            source: CredentialSource::File(path.clone()),
            account: None,
        };
        let t = TokenSource::build(&c).await.unwrap();
        assert_eq!(
            t.credentials().account.as_deref(),
            Some("sa@x.iam.gserviceaccount.com")
        );
        let line = t.credentials().to_string();
        assert_eq!(
            line,
            format!(
                "service-account key {} (sa@x.iam.gserviceaccount.com)",
                path.display()
            )
        );
        let debug = format!("{t:?}");
        assert!(
            !debug.contains("PRIVATE KEY") && debug.contains("sa@x"),
            "{debug}"
        );
    }

    #[tokio::test]
    async fn unusable_credentials_name_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-key.json");
        let e = TokenSource::build(&Credentials {
            kind: CredentialKind::ServiceAccountKey,
            source: CredentialSource::File(missing.clone()),
            account: None,
        })
        .await
        .unwrap_err();
        assert!(e.cause.contains("no-such-key.json"), "{e:?}");
        assert!(e.fix.contains("service-account JSON key"), "{e:?}");

        let user = dir.path().join("adc.json");
        std::fs::write(&user, r#"{"type": "authorized_user", "client_id": "x"}"#).unwrap();
        let e = TokenSource::build(&adc(&user)).await.unwrap_err();
        assert!(
            e.cause.contains("user credentials") && e.cause.contains("no client_secret"),
            "{e:?}"
        );
        assert!(e.fix.contains("application-default login"), "{e:?}");
    }

    fn adc(path: &Path) -> Credentials {
        Credentials {
            kind: CredentialKind::ApplicationDefault,
            source: CredentialSource::Variable {
                name: GOOGLE_APPLICATION_CREDENTIALS,
                value: path.display().to_string(),
            },
            account: None,
        }
    }

    /// GOOGLE_APPLICATION_CREDENTIALS naming gcloud's user credentials: the refresh token is
    /// exchanged at the file's token_uri (the testbed's), and the token kept, not re-asked.
    #[tokio::test]
    async fn user_credentials_in_the_variable_are_refreshed_at_their_token_uri() {
        let server = crate::testbed::start(
            crate::testbed::TestbedOptions::default(),
            Arc::new(crate::testbed::mem::MemSource::new()),
        )
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adc.json");
        let file = |token_uri: &str| {
            serde_json::json!({
                "type": "authorized_user",
                "client_id": "cid.apps.googleusercontent.com",
                "client_secret": "secret",
                "refresh_token": "1//refresh",
                "account": "me@example.org",
                "token_uri": token_uri,
            })
            .to_string()
        };
        std::fs::write(&path, file(&format!("{}/token", server.endpoint()))).unwrap();
        let t = TokenSource::build(&adc(&path)).await.unwrap();
        assert_eq!(t.credentials().kind, CredentialKind::GcloudUser);
        assert_eq!(
            t.credentials().to_string(),
            format!(
                "gcloud application-default user credentials from \
                 GOOGLE_APPLICATION_CREDENTIALS={} (me@example.org)",
                path.display()
            )
        );
        let first = t.token().await.unwrap().unwrap();
        assert!(first.starts_with("tbtok-"), "{first}");
        assert_eq!(t.token().await.unwrap().unwrap(), first);
        assert!(!format!("{t:?}").contains(&first) && !format!("{t:?}").contains("1//refresh"));

        // A token_uri that refuses: the error says where and what to do.
        std::fs::write(
            &path,
            file(&format!("{}/no-such-endpoint", server.endpoint())),
        )
        .unwrap();
        let t = TokenSource::build(&adc(&path)).await.unwrap();
        let e = t.token().await.unwrap_err().to_string();
        assert!(
            e.contains("cannot refresh") && e.contains("no-such-endpoint") && e.contains("login"),
            "{e}"
        );
        server.shutdown().await;
    }

    #[tokio::test]
    async fn anonymous_sends_no_token_and_says_why() {
        let c = Credentials::anonymous(CredentialSource::Variable {
            name: "STORAGE_EMULATOR_HOST",
            value: "localhost:4443".into(),
        });
        let t = TokenSource::build(&c).await.unwrap();
        assert_eq!(t.token().await.unwrap(), None);
        assert_eq!(
            t.credentials().to_string(),
            "anonymous (STORAGE_EMULATOR_HOST=localhost:4443)"
        );
        let t = TokenSource::fixed("tok-secret");
        assert_eq!(t.token().await.unwrap().as_deref(), Some("tok-secret"));
        assert!(!format!("{t:?}").contains("tok-secret"));
    }
}
