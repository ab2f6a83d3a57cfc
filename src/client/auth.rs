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

/// A variable holding an access token minted elsewhere (as Terraform and other Google tools
/// take it). Its value is read when the provider is built and never kept in any description.
pub const GOOGLE_OAUTH_ACCESS_TOKEN: &str = "GOOGLE_OAUTH_ACCESS_TOKEN";

/// The variable Google's client libraries read for the metadata server's `host[:port]`.
pub const GCE_METADATA_HOST: &str = "GCE_METADATA_HOST";

/// The metadata server of a GCE VM, when GCE_METADATA_HOST does not name another.
pub const DEFAULT_METADATA_HOST: &str = "metadata.google.internal";

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
    /// A file holding an access token (`--token-file`), re-read when it changes.
    TokenFile,
    /// An access token in GOOGLE_OAUTH_ACCESS_TOKEN.
    AccessTokenVariable,
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
    /// `gcloud_file` is where gcloud keeps application-default user credentials (under
    /// CLOUDSDK_CONFIG, else ~/.config/gcloud); `metadata_host` is GCE_METADATA_HOST's value.
    Search {
        gcloud_file: Option<PathBuf>,
        metadata_host: Option<String>,
    },
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

impl Credentials {
    /// What to do when the server refuses these credentials' token (HTTP 401) even after a
    /// fresh one was asked for: what makes them good again, by where they come from.
    pub fn refused_fix(&self) -> String {
        use CredentialKind as K;
        match (self.kind, &self.source) {
            (K::Anonymous, _) => "The bucket wants credentials: mount without --anonymous \
                 (after `gcloud auth application-default login`), or with --key-file"
                .into(),
            (K::ServiceAccountKey, CredentialSource::File(p)) => format!(
                "The key {} may have been deleted or disabled, or its service account removed: \
                 make a new key (Cloud console: IAM, Service accounts, Keys) and pass it",
                p.display()
            ),
            (K::ServiceAccountKey, _) => "The key may have been deleted or disabled, or its \
                 service account removed: make a new key (Cloud console: IAM, Service \
                 accounts, Keys) and pass it"
                .into(),
            (K::ApplicationDefault | K::GcloudUser, _) => "Sign in again with `gcloud auth \
                 application-default login` (the refresh token was revoked, expired or its \
                 password changed); the mount picks up the new file when remounted"
                .into(),
            (K::MetadataServer, _) => "Check the VM's service account: that it still exists \
                 and is enabled, and that the VM's access scopes include storage \
                 (devstorage.read_only or cloud-platform)"
                .into(),
            (K::GcloudCli, _) => "Sign in again with `gcloud auth login`".into(),
            (K::TokenFile, CredentialSource::File(p)) => format!(
                "Write a current access token into {} (e.g. `gcloud auth print-access-token > \
                 {}`): it is read again on the next request, no remount needed",
                p.display(),
                p.display()
            ),
            (K::TokenFile, _) => "Write a current access token into the --token-file".into(),
            (K::AccessTokenVariable, _) => format!(
                "The token in {GOOGLE_OAUTH_ACCESS_TOKEN} has expired or was revoked, and a \
                 token given in a variable cannot be renewed: remount with a new one, or pass \
                 --token-file FILE, which is read again whenever it changes"
            ),
            (K::Static, _) => "A fixed token cannot be renewed".into(),
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
            K::TokenFile => "access-token file",
            K::AccessTokenVariable => "access token",
            K::Static => "a fixed token",
        };
        f.write_str(kind)?;
        match (&self.source, self.kind) {
            (S::Flag(flag), _) => write!(f, " ({flag})")?,
            // The value is the token: never shown.
            (S::Variable { name, .. }, K::AccessTokenVariable) => write!(f, " from {name}")?,
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
    Gcp(Arc<GcpProvider>),
    User(Arc<AuthorizedUser>),
    File(Arc<TokenFile>),
    Metadata(Arc<MetadataServer>),
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
            source: CredentialSource::Search {
                gcloud_file: None,
                metadata_host: None,
            },
            account: None,
        },
    };

    /// A fixed bearer token (tests, or a token minted elsewhere).
    pub fn fixed(token: impl Into<String>) -> Self {
        TokenSource {
            provider: Provider::Static(token.into()),
            credentials: Credentials {
                kind: CredentialKind::Static,
                source: CredentialSource::Search {
                    gcloud_file: None,
                    metadata_host: None,
                },
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
            (
                K::ApplicationDefault,
                CredentialSource::Search {
                    gcloud_file,
                    metadata_host,
                },
            ) => application_default(gcloud_file.clone(), metadata_host.clone()).await,
            (K::TokenFile, CredentialSource::File(path)) => {
                let file = TokenFile::new(path.clone());
                file.read().map_err(|cause| AuthError {
                    cause,
                    fix: TOKEN_FILE_FIX.into(),
                })?;
                Ok(TokenSource {
                    provider: Provider::File(Arc::new(file)),
                    credentials: credentials.clone(),
                })
            }
            (K::AccessTokenVariable, CredentialSource::Variable { name, .. }) => {
                match std::env::var(name).ok().map(|t| t.trim().to_string()) {
                    Some(t) if !t.is_empty() => Ok(TokenSource {
                        provider: Provider::Static(t),
                        credentials: credentials.clone(),
                    }),
                    _ => Err(AuthError {
                        cause: format!("{name} is empty"),
                        fix: format!(
                            "set {name} to a current access token (`gcloud auth \
                             print-access-token`), or unset it"
                        ),
                    }),
                }
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
            Provider::Gcp(p) => p.token().await.map(Some),
            Provider::User(u) => u.token().await.map(Some),
            Provider::File(f) => f.token().map(Some),
            Provider::Metadata(m) => m.token().await.map(Some),
        }
    }

    /// After the server refused `sent` (HTTP 401): forget it, so the next [`token`] is a
    /// fresh one (a new grant, a gcp_auth provider made anew, the file read again). False
    /// when no other token can come (anonymous, a fixed token, a provider that could not be
    /// made again), so there is no point in asking again.
    ///
    /// [`token`]: TokenSource::token
    pub async fn invalidate(&self, sent: Option<&str>) -> bool {
        match &self.provider {
            Provider::None | Provider::Static(_) => false,
            Provider::Gcp(p) => p.renew(sent).await,
            Provider::User(u) => {
                u.cache.forget(sent).await;
                true
            }
            Provider::Metadata(m) => {
                m.cache.forget(sent).await;
                true
            }
            Provider::File(f) => {
                *f.cached.lock().unwrap() = None;
                true
            }
        }
    }

    /// Whether a refused token can be followed by another ([`invalidate`] can succeed):
    /// false for anonymous requests and fixed tokens.
    ///
    /// [`invalidate`]: TokenSource::invalidate
    pub fn can_refresh(&self) -> bool {
        !matches!(self.provider, Provider::None | Provider::Static(_))
    }

    /// Fills in the account these credentials act as, when the description does not have it
    /// yet: a gcloud user's from the token-info endpoint next to their `token_uri`, the VM's
    /// from its metadata server. Best effort: without an answer the account stays unknown.
    pub async fn identify(&mut self) {
        if self.credentials.account.is_some() {
            return;
        }
        let found = match (&self.provider, self.credentials.kind) {
            (Provider::User(u), _) => match u.token().await {
                Ok(t) => token_info_email(&u.http, &token_info_url(&u.token_uri), &t).await,
                Err(e) => Err(e.to_string()),
            },
            (Provider::Metadata(m), _) => m.get(METADATA_EMAIL).await,
            (_, CredentialKind::MetadataServer) => {
                MetadataServer::new(DEFAULT_METADATA_HOST)
                    .get(METADATA_EMAIL)
                    .await
            }
            _ => return,
        };
        match found {
            Ok(email) if !email.trim().is_empty() => {
                self.credentials.account = Some(email.trim().to_string())
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("the account of {} is unknown: {e}", self.credentials),
        }
    }

    /// The project of the VM these credentials come from (its metadata server's), for
    /// billing when nothing else names one; None for credentials not from a metadata server.
    pub async fn metadata_project(&self) -> Option<String> {
        let answer = match (&self.provider, self.credentials.kind) {
            (Provider::Metadata(m), _) => m.get(METADATA_PROJECT).await,
            (_, CredentialKind::MetadataServer) => {
                MetadataServer::new(DEFAULT_METADATA_HOST)
                    .get(METADATA_PROJECT)
                    .await
            }
            _ => return None,
        };
        match answer {
            Ok(p) if !p.trim().is_empty() => Some(p.trim().to_string()),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!("no project from the metadata server: {e}");
                None
            }
        }
    }
}

/// What to do about an unusable `--token-file`.
const TOKEN_FILE_FIX: &str = "write a current access token into the file (e.g. `gcloud auth \
     print-access-token > FILE`), or use application-default credentials instead \
     (`gcloud auth application-default login`, then mount without --token-file)";

/// `--token-file`: one access token (surrounding white space ignored), read again whenever
/// the file's size, modification time or inode differ from the last read, so a token rotated
/// by whatever writes it is picked up without a remount. A stat per request costs microseconds.
struct TokenFile {
    path: PathBuf,
    cached: std::sync::Mutex<Option<(FileStamp, String)>>,
}

type FileStamp = (Option<std::time::SystemTime>, u64, u64);

impl TokenFile {
    fn new(path: PathBuf) -> Self {
        TokenFile {
            path,
            cached: std::sync::Mutex::new(None),
        }
    }

    /// The token now: the cached one while the file is unchanged.
    fn read(&self) -> Result<String, String> {
        use std::os::unix::fs::MetadataExt;
        let p = self.path.display();
        let meta = std::fs::metadata(&self.path)
            .map_err(|e| format!("cannot read the token file {p}: {e}"))?;
        let stamp = (meta.modified().ok(), meta.len(), meta.ino());
        let mut cached = self.cached.lock().unwrap();
        if let Some((s, t)) = cached.as_ref()
            && *s == stamp
        {
            return Ok(t.clone());
        }
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("cannot read the token file {p}: {e}"))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(format!("the token file {p} is empty"));
        }
        if token.contains(char::is_whitespace) {
            return Err(format!(
                "the token file {p} holds more than one word (it should hold just an access token)"
            ));
        }
        *cached = Some((stamp, token.to_string()));
        Ok(token.to_string())
    }

    fn token(&self) -> Result<String, ClientError> {
        self.read()
            .map_err(|cause| ClientError::Auth(format!("{cause} (hint: {TOKEN_FILE_FIX})")))
    }
}

/// A token kept until five minutes before it expires, shared by the providers that mint them.
#[derive(Default)]
struct TokenCache(tokio::sync::Mutex<Option<(String, std::time::Instant)>>);

impl TokenCache {
    /// The cached token if it is still good, else `fetch`'s (token, lifetime), kept. One
    /// fetch at a time: requests that find the cache empty together share one grant.
    async fn get<F, Fut>(&self, fetch: F) -> Result<String, ClientError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(String, std::time::Duration), ClientError>>,
    {
        let mut cached = self.0.lock().await;
        let now = std::time::Instant::now();
        if let Some((t, expires)) = cached.as_ref()
            && now + REFRESH_MARGIN < *expires
        {
            return Ok(t.clone());
        }
        let (token, lifetime) = fetch().await?;
        *cached = Some((token.clone(), now + lifetime));
        Ok(token)
    }

    /// Forgets the cached token if it is `sent` (or whatever it is, with None); a newer one,
    /// fetched meanwhile by another request, is kept.
    async fn forget(&self, sent: Option<&str>) {
        let mut cached = self.0.lock().await;
        if sent.is_none() || cached.as_ref().map(|(t, _)| t.as_str()) == sent {
            *cached = None;
        }
    }
}

const METADATA_EMAIL: &str = "instance/service-accounts/default/email";
const METADATA_PROJECT: &str = "project/project-id";
const METADATA_TOKEN: &str = "instance/service-accounts/default/token";

/// The GCE metadata server at `host` (GCE_METADATA_HOST, as Google's libraries take it:
/// `host[:port]`, plain HTTP): the VM's service-account token, its email, the project.
struct MetadataServer {
    http: reqwest::Client,
    base: String,
    cache: TokenCache,
}

impl MetadataServer {
    fn new(host: &str) -> Self {
        let host = host.trim().trim_end_matches('/');
        let base = if host.starts_with("http://") || host.starts_with("https://") {
            host.to_string()
        } else {
            format!("http://{host}")
        };
        MetadataServer {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            base: format!("{base}/computeMetadata/v1/"),
            cache: TokenCache::default(),
        }
    }

    /// One value (`path` under computeMetadata/v1/), as text.
    async fn get(&self, path: &str) -> Result<String, String> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .http
            .get(&url)
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .map_err(|e| format!("metadata server {url}: {e}"))?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .map_err(|e| format!("metadata server {url}: {e}"))?;
        if !status.is_success() {
            return Err(format!("metadata server {url}: HTTP {status}"));
        }
        Ok(body)
    }

    async fn token(&self) -> Result<String, ClientError> {
        self.cache
            .get(|| async {
                let path = format!("{METADATA_TOKEN}?scopes={SCOPE_READ_ONLY}");
                let fail = |e: String| {
                    ClientError::Auth(format!(
                        "cannot get the VM's access token: {e} (does the VM have a service \
                         account with the storage read-only scope?)"
                    ))
                };
                let body = self.get(&path).await.map_err(fail)?;
                parse_grant(&body).map_err(fail)
            })
            .await
    }
}

/// An OAuth token answer: `access_token` and `expires_in` (an hour if absent).
fn parse_grant(body: &str) -> Result<(String, std::time::Duration), String> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("bad JSON: {e}"))?;
    let token = v["access_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or("no access_token in the answer")?
        .to_string();
    let lifetime = std::time::Duration::from_secs(v["expires_in"].as_u64().unwrap_or(3600));
    Ok((token, lifetime))
}

/// The token-info endpoint for tokens granted at `token_uri`: `/tokeninfo` at the same origin.
/// Google's `https://oauth2.googleapis.com/token` gives Google's own
/// `https://oauth2.googleapis.com/tokeninfo`; a test's token_uri on the testbed gives the
/// testbed's, so tests never ask Google.
pub fn token_info_url(token_uri: &str) -> String {
    match reqwest::Url::parse(token_uri) {
        Ok(u) => format!("{}/tokeninfo", u.origin().ascii_serialization()),
        Err(_) => "https://oauth2.googleapis.com/tokeninfo".into(),
    }
}

/// The `email` the token-info endpoint gives for `token` (sent in a form body, never in the
/// URL, so no error message or log can carry it).
async fn token_info_email(
    http: &reqwest::Client,
    url: &str,
    token: &str,
) -> Result<String, String> {
    let resp = http
        .post(url)
        .form(&[("access_token", token)])
        .send()
        .await
        .map_err(|e| format!("token info {url}: {}", e.without_url()))?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| e.without_url().to_string())?;
    if !status.is_success() {
        return Err(format!("token info {url}: HTTP {status}"));
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    v["email"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("token info {url}: no email (the token lacks the email scope)"))
}

/// A service-account JSON key (`--key-file`), read once: for the provider and its account.
fn service_account_key(path: &Path, source: CredentialSource) -> Result<TokenSource, AuthError> {
    let fail = |e: &dyn std::fmt::Display| AuthError {
        cause: format!("cannot use key file {}: {e}", path.display()),
        fix: "pass a service-account JSON key (Cloud console: IAM, Service accounts, Keys)".into(),
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(&e))?;
    let made = GcpKind::key(&text).map_err(|e| fail(&e))?;
    let provider = GcpProvider::new(made, GcpKind::Key(text.clone()));
    Ok(TokenSource {
        provider: Provider::Gcp(provider),
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
                account: account_field(v),
            },
        });
    }
    let made = GcpKind::key(&text).map_err(|e| AuthError {
        cause: format!("cannot use {var}: {e}"),
        fix: format!(
            "point {GOOGLE_APPLICATION_CREDENTIALS} at a service-account JSON key, or unset it"
        ),
    })?;
    Ok(TokenSource {
        provider: Provider::Gcp(GcpProvider::new(made, GcpKind::Key(text.clone()))),
        credentials: Credentials {
            kind: CredentialKind::ServiceAccountKey,
            source,
            account: client_email(&text),
        },
    })
}

/// The search after GOOGLE_APPLICATION_CREDENTIALS, in gcp_auth's order (as
/// `gcp_auth::provider` does it), remembering which one answered: gcloud's user file (read
/// here, from CLOUDSDK_CONFIG's directory too, which gcp_auth ignores), the metadata server
/// (GCE_METADATA_HOST's, when set, else gcp_auth's probe of the VM's), the gcloud CLI.
async fn application_default(
    gcloud_file: Option<PathBuf>,
    metadata_host: Option<String>,
) -> Result<TokenSource, AuthError> {
    let found = |provider, kind, source| TokenSource {
        provider,
        credentials: Credentials {
            kind,
            source,
            account: None,
        },
    };
    if let Some(file) = &gcloud_file
        && let Ok(text) = std::fs::read_to_string(file)
    {
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| AuthError {
            cause: format!("cannot use gcloud's credentials {}: {e}", file.display()),
            fix: "run `gcloud auth application-default login` again".into(),
        })?;
        if v["type"] == "authorized_user" {
            let user = AuthorizedUser::from_json(&v).map_err(|e| AuthError {
                cause: format!("cannot use gcloud's credentials {}: {e}", file.display()),
                fix: "run `gcloud auth application-default login` again".into(),
            })?;
            let mut t = found(
                Provider::User(Arc::new(user)),
                CredentialKind::GcloudUser,
                CredentialSource::File(file.clone()),
            );
            t.credentials.account = account_field(&v);
            return Ok(t);
        }
    }
    let user = match GcpKind::GcloudUserFile.make().await {
        Ok(p) => {
            let source = match gcloud_file.clone() {
                Some(f) => CredentialSource::File(f),
                None => CredentialSource::Search {
                    gcloud_file: None,
                    metadata_host: None,
                },
            };
            return Ok(found(
                Provider::Gcp(GcpProvider::new(p, GcpKind::GcloudUserFile)),
                CredentialKind::GcloudUser,
                source,
            ));
        }
        Err(e) => e,
    };
    let search = CredentialSource::Search {
        gcloud_file,
        metadata_host: metadata_host.clone(),
    };
    if let Some(host) = &metadata_host {
        let m = MetadataServer::new(host);
        return match m.token().await {
            Ok(_) => Ok(found(
                Provider::Metadata(Arc::new(m)),
                CredentialKind::MetadataServer,
                search,
            )),
            Err(e) => Err(AuthError {
                cause: format!("no Google credentials found ({GCE_METADATA_HOST}={host}: {e})"),
                fix: format!(
                    "is {GCE_METADATA_HOST} right? Unset it on a GCE VM; elsewhere run `gcloud \
                     auth application-default login`"
                ),
            }),
        };
    }
    let metadata = match GcpKind::MetadataServer.make().await {
        Ok(p) => {
            return Ok(found(
                Provider::Gcp(GcpProvider::new(p, GcpKind::MetadataServer)),
                CredentialKind::MetadataServer,
                search,
            ));
        }
        Err(e) => e,
    };
    let cli = match GcpKind::GcloudCli.make().await {
        Ok(p) => {
            return Ok(found(
                Provider::Gcp(GcpProvider::new(p, GcpKind::GcloudCli)),
                CredentialKind::GcloudCli,
                search,
            ));
        }
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

/// An authorized_user file's `account`, when gcloud wrote one.
fn account_field(v: &serde_json::Value) -> Option<String> {
    v["account"]
        .as_str()
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
}

/// Which gcp_auth provider, with what it is made from.
enum GcpKind {
    /// A service-account key's JSON (`--key-file`, or GOOGLE_APPLICATION_CREDENTIALS).
    Key(String),
    /// gcloud's application-default user credentials (gcp_auth's own search for the file).
    GcloudUserFile,
    /// The GCE VM's metadata server.
    MetadataServer,
    /// `gcloud auth print-access-token`.
    GcloudCli,
}

impl GcpKind {
    fn key(json: &str) -> Result<Arc<dyn gcp_auth::TokenProvider>, gcp_auth::Error> {
        Ok(Arc::new(gcp_auth::CustomServiceAccount::from_json(json)?))
    }

    async fn make(&self) -> Result<Arc<dyn gcp_auth::TokenProvider>, gcp_auth::Error> {
        Ok(match self {
            GcpKind::Key(json) => GcpKind::key(json)?,
            GcpKind::GcloudUserFile => Arc::new(gcp_auth::ConfigDefaultCredentials::new().await?),
            GcpKind::MetadataServer => Arc::new(gcp_auth::MetadataServiceAccount::new().await?),
            GcpKind::GcloudCli => Arc::new(gcp_auth::GCloudAuthorizedUser::new().await?),
        })
    }
}

/// A gcp_auth provider, and how to make it again. gcp_auth keeps each token until shortly
/// before it expires and offers no way to drop one early (its `TokenProvider` has `token` and
/// `project_id` only), so after a 401 the provider is made anew: its cache is empty, and its
/// first token a fresh grant (a newly signed JWT, a new refresh, the metadata server or
/// gcloud asked again).
struct GcpProvider {
    current: std::sync::Mutex<Arc<dyn gcp_auth::TokenProvider>>,
    kind: GcpKind,
    /// One renewal at a time: requests refused together share it.
    renewing: tokio::sync::Mutex<()>,
}

impl GcpProvider {
    fn new(provider: Arc<dyn gcp_auth::TokenProvider>, kind: GcpKind) -> Arc<Self> {
        Arc::new(GcpProvider {
            current: std::sync::Mutex::new(provider),
            kind,
            renewing: tokio::sync::Mutex::new(()),
        })
    }

    async fn token(&self) -> Result<String, ClientError> {
        let provider = self.current.lock().unwrap().clone();
        provider
            .token(&[SCOPE_READ_ONLY])
            .await
            .map(|t| t.as_str().to_string())
            .map_err(|e| ClientError::Auth(format!("cannot obtain an access token: {e}")))
    }

    /// After `sent` was refused: a new provider, unless another request already put one in
    /// place (the current token is not `sent`). False if it cannot be made.
    async fn renew(&self, sent: Option<&str>) -> bool {
        let _one = self.renewing.lock().await;
        if let (Some(sent), Ok(now)) = (sent, self.token().await)
            && now != sent
        {
            return true;
        }
        match self.kind.make().await {
            Ok(p) => {
                *self.current.lock().unwrap() = p;
                true
            }
            Err(e) => {
                tracing::warn!("after HTTP 401, cannot obtain a fresh access token: {e}");
                false
            }
        }
    }
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
    cache: TokenCache,
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
            cache: TokenCache::default(),
        })
    }

    async fn token(&self) -> Result<String, ClientError> {
        self.cache.get(|| self.grant()).await
    }

    /// One refresh-token grant at the token_uri.
    async fn grant(&self) -> Result<(String, std::time::Duration), ClientError> {
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
        parse_grant(&body).map_err(fail)
    }
}

/// A key file's `client_email`, if it has one.
fn client_email(key_json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(key_json).ok()?;
    Some(v.get("client_email")?.as_str()?.to_string())
}

/// A service-account key (JSON) with a throwaway private key made by openssl in `dir`, for
/// tests; `token_uri` is where gcp_auth asks for tokens with it.
#[cfg(test)]
pub(crate) fn test_key_json(dir: &Path, email: &str, token_uri: &str) -> String {
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
        "token_uri": token_uri,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key nothing is ever signed with (its token_uri is Google's, never asked).
    fn key_json(dir: &Path, email: &str) -> String {
        test_key_json(dir, email, "https://oauth2.googleapis.com/token")
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

    fn token_file(path: &Path) -> Credentials {
        Credentials {
            kind: CredentialKind::TokenFile,
            source: CredentialSource::File(path.to_path_buf()),
            account: None,
        }
    }

    /// `--token-file`: read at build (a missing or empty file is refused with the fix), then
    /// again whenever it changes, and again after a 401 even if it did not.
    #[tokio::test]
    async fn a_token_file_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let e = TokenSource::build(&token_file(&path)).await.unwrap_err();
        assert!(
            e.cause.contains("cannot read the token file") && e.cause.contains("token"),
            "{e:?}"
        );
        assert!(e.fix.contains("print-access-token"), "{e:?}");
        std::fs::write(&path, " \n").unwrap();
        let e = TokenSource::build(&token_file(&path)).await.unwrap_err();
        assert!(e.cause.contains("is empty"), "{e:?}");

        std::fs::write(&path, "ya29.first\n").unwrap();
        let t = TokenSource::build(&token_file(&path)).await.unwrap();
        assert_eq!(
            t.credentials().to_string(),
            format!("access-token file {}", path.display())
        );
        assert_eq!(t.token().await.unwrap().as_deref(), Some("ya29.first"));
        // Rotated (another length, so the change shows whatever the clock's granularity).
        std::fs::write(&path, "ya29.second-token").unwrap();
        assert_eq!(
            t.token().await.unwrap().as_deref(),
            Some("ya29.second-token")
        );
        assert!(!format!("{t:?}").contains("ya29"));
        assert!(t.invalidate(Some("ya29.second-token")).await);
        assert_eq!(
            t.token().await.unwrap().as_deref(),
            Some("ya29.second-token")
        );
        // Emptied while mounted: the request fails with the cause and the fix.
        std::fs::write(&path, "").unwrap();
        let e = t.token().await.unwrap_err().to_string();
        assert!(e.contains("is empty") && e.contains("hint:"), "{e}");
    }

    /// GOOGLE_OAUTH_ACCESS_TOKEN: its value is the token, never part of the description.
    #[tokio::test]
    async fn the_token_variable_is_used_and_never_shown() {
        // A name only this test sets, so no other test's environment is touched.
        const VAR: &str = "PHYSIOFS_TEST_ACCESS_TOKEN_VARIABLE";
        let c = Credentials {
            kind: CredentialKind::AccessTokenVariable,
            source: CredentialSource::Variable {
                name: VAR,
                value: String::new(),
            },
            account: None,
        };
        // SAFETY: only this test reads or writes this variable.
        unsafe { std::env::set_var(VAR, "ya29.from-variable\n") };
        let t = TokenSource::build(&c).await.unwrap();
        assert_eq!(
            t.token().await.unwrap().as_deref(),
            Some("ya29.from-variable")
        );
        assert_eq!(
            t.credentials().to_string(),
            format!("access token from {VAR}")
        );
        assert!(!format!("{t:?}").contains("ya29"));
        // A fixed token cannot be refreshed: a 401 is not asked again.
        assert!(!t.invalidate(Some("ya29.from-variable")).await);
        unsafe { std::env::set_var(VAR, "") };
        let e = TokenSource::build(&c).await.unwrap_err();
        assert!(e.cause.contains("is empty"), "{e:?}");
    }

    #[test]
    fn token_info_lives_next_to_the_token_uri() {
        assert_eq!(
            token_info_url("https://oauth2.googleapis.com/token"),
            "https://oauth2.googleapis.com/tokeninfo"
        );
        assert_eq!(
            token_info_url("http://127.0.0.1:4443/token"),
            "http://127.0.0.1:4443/tokeninfo"
        );
    }

    /// A gcloud user's account from the token-info endpoint next to their token_uri; the
    /// VM's from the metadata server GCE_METADATA_HOST names, with its project; a refused
    /// token forgotten, so the next is a new grant. All from the testbed, never Google.
    #[tokio::test]
    async fn identities_come_from_token_info_and_the_metadata_server() {
        let server = crate::testbed::start(
            crate::testbed::TestbedOptions::default(),
            Arc::new(crate::testbed::mem::MemSource::new()),
        )
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("application_default_credentials.json");
        std::fs::write(
            &file,
            serde_json::json!({
                "type": "authorized_user",
                "client_id": "cid",
                "client_secret": "s",
                "refresh_token": "1//r",
                "token_uri": format!("{}/token", server.endpoint()),
            })
            .to_string(),
        )
        .unwrap();
        let search = |gcloud_file: Option<PathBuf>, metadata_host: Option<String>| Credentials {
            kind: CredentialKind::ApplicationDefault,
            source: CredentialSource::Search {
                gcloud_file,
                metadata_host,
            },
            account: None,
        };
        let mut t = TokenSource::build(&search(Some(file.clone()), None))
            .await
            .unwrap();
        assert_eq!(t.credentials().kind, CredentialKind::GcloudUser);
        t.identify().await;
        assert_eq!(
            t.credentials().to_string(),
            format!(
                "gcloud application-default user credentials {} ({})",
                file.display(),
                crate::testbed::TESTBED_USER_EMAIL
            )
        );
        assert_eq!(t.metadata_project().await, None);
        let first = t.token().await.unwrap().unwrap();
        assert!(t.invalidate(Some(&first)).await);
        let second = t.token().await.unwrap().unwrap();
        assert_ne!(first, second, "a refused token is replaced by a new grant");
        // Forgetting a token that was already replaced keeps the newer one.
        assert!(t.invalidate(Some(&first)).await);
        assert_eq!(t.token().await.unwrap().unwrap(), second);

        let host = server.addr().to_string();
        let missing = dir.path().join("none.json");
        let mut t = TokenSource::build(&search(Some(missing), Some(host.clone())))
            .await
            .unwrap();
        assert_eq!(t.credentials().kind, CredentialKind::MetadataServer);
        assert!(t.token().await.unwrap().unwrap().starts_with("tbtok-"));
        t.identify().await;
        assert_eq!(
            t.credentials().account.as_deref(),
            Some(crate::testbed::TESTBED_VM_EMAIL)
        );
        assert_eq!(
            t.metadata_project().await.as_deref(),
            Some(crate::testbed::TESTBED_VM_PROJECT)
        );
        server.shutdown().await;

        // A metadata host that does not answer: the error names the variable.
        let e = TokenSource::build(&search(None, Some(host)))
            .await
            .unwrap_err();
        assert!(e.cause.contains(GCE_METADATA_HOST), "{e:?}");
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
