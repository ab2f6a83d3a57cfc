//! Testbed: a read-only, loopback GCS JSON API server with fault and latency knobs.
//!
//! Serves objects from any [`ObjectSource`] (the MIMIC-CXR dataset model, a local folder via
//! [`DirSource`], or the in-memory [`MemSource`]). See `start` (in-process) and `run` (CLI).
//!
//! It also plays the Google services around storage that clients meet at start-up: the
//! OAuth token endpoint (`POST /token`), token info (`/tokeninfo`, whose account is
//! [`TESTBED_USER_EMAIL`]), a GCE metadata server (`/computeMetadata/v1/...`, for
//! GCE_METADATA_HOST: the VM's token, [`TESTBED_VM_EMAIL`], [`TESTBED_VM_PROJECT`]), and
//! `GET /storage/v1/b/B/iam/testPermissions` (what `--deny-list`/`--deny-get` leave).
//!
//! Control endpoints (never subject to faults):
//! - `GET /_testbed/stats`, `POST /_testbed/stats/reset`
//! - `GET /_testbed/faults`, `POST /_testbed/faults` with a JSON [`KnobsUpdate`], e.g.
//!   `{"fail_rate":0.1,"first_byte_latency":"30ms","bandwidth":"200MB/s","unavailable":true}`.

pub mod dir;
pub mod json;
pub mod knobs;
pub mod listing;
pub mod mem;
pub mod model_source;
pub mod overlay;
pub mod server;
pub mod source;
pub mod stats;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use crate::cli::{TestbedArgs, TestbedModel as ModelKind};
pub use dir::DirSource;
pub use knobs::{Knobs, KnobsUpdate, parse_bandwidth};
pub use mem::MemSource;
pub use model_source::ModelSource;
pub use overlay::{Overlay, SyntheticSpec, parse_synthetic};
pub use source::{ObjectSource, SourceObject};
pub use stats::StatsSnapshot;

use server::Shared;

/// The account the testbed's token-info endpoint says every token belongs to.
pub const TESTBED_USER_EMAIL: &str = "physionet-user@example.org";
/// The service account of the VM the testbed's metadata server plays.
pub const TESTBED_VM_EMAIL: &str = "vm-sa@testbed-vm-project.iam.gserviceaccount.com";
/// The project of that VM.
pub const TESTBED_VM_PROJECT: &str = "testbed-vm-project";

/// In-process server options (all knobs; `Default` = no faults, port 0 on 127.0.0.1).
#[derive(Clone, Debug)]
pub struct TestbedOptions {
    pub addr: SocketAddr,
    /// Fault RNG seed.
    pub seed: u64,
    pub first_byte_latency: Duration,
    /// Bytes per second per connection; None = unlimited.
    pub bandwidth: Option<u64>,
    pub fail_rate: f64,
    pub reset_rate: f64,
    pub truncate_rate: f64,
    pub stall_rate: f64,
    pub stall_duration: Duration,
    pub requester_pays: bool,
    pub require_tokens: Vec<String>,
    pub token_ttl: Option<Duration>,
    pub corrupt_rate: f64,
    pub latency_jitter: Duration,
    pub malformed: Option<knobs::Malformed>,
    /// Buckets that grant get but not list, and list but not get.
    pub deny_list: Vec<String>,
    pub deny_get: Vec<String>,
    /// Serve HTTPS with a certificate made at start ([`TestbedHandle::ca_pem`]).
    pub tls: bool,
    /// With `tls`: offer h2 by ALPN (else only http/1.1).
    pub http2: bool,
}

impl Default for TestbedOptions {
    fn default() -> Self {
        TestbedOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            seed: 0,
            first_byte_latency: Duration::ZERO,
            bandwidth: None,
            fail_rate: 0.0,
            reset_rate: 0.0,
            truncate_rate: 0.0,
            stall_rate: 0.0,
            stall_duration: Duration::from_secs(60),
            requester_pays: false,
            require_tokens: Vec::new(),
            token_ttl: None,
            corrupt_rate: 0.0,
            latency_jitter: Duration::ZERO,
            malformed: None,
            deny_list: Vec::new(),
            deny_get: Vec::new(),
            tls: false,
            http2: true,
        }
    }
}

impl TestbedOptions {
    fn knobs(&self) -> Knobs {
        Knobs {
            first_byte_latency: self.first_byte_latency,
            bandwidth: self.bandwidth.filter(|b| *b > 0),
            fail_rate: self.fail_rate,
            reset_rate: self.reset_rate,
            truncate_rate: self.truncate_rate,
            stall_rate: self.stall_rate,
            stall_duration: self.stall_duration,
            requester_pays: self.requester_pays,
            require_tokens: self.require_tokens.clone(),
            token_ttl: self.token_ttl,
            unavailable: false,
            corrupt_rate: self.corrupt_rate,
            latency_jitter: self.latency_jitter,
            malformed: self.malformed,
            deny_list: self.deny_list.clone(),
            deny_get: self.deny_get.clone(),
            revoked_tokens: Vec::new(),
        }
    }
}

impl From<&TestbedArgs> for TestbedOptions {
    fn from(a: &TestbedArgs) -> Self {
        TestbedOptions {
            addr: a.addr,
            seed: a.seed,
            first_byte_latency: a.first_byte_latency,
            bandwidth: a.bandwidth.filter(|b| *b > 0),
            fail_rate: a.fail_rate,
            reset_rate: a.reset_rate,
            truncate_rate: a.truncate_rate,
            stall_rate: a.stall_rate,
            stall_duration: a.stall_duration,
            requester_pays: a.requester_pays,
            require_tokens: a.require_token.clone(),
            token_ttl: a.token_ttl,
            corrupt_rate: a.corrupt_rate,
            latency_jitter: a.latency_jitter,
            malformed: a.malformed,
            deny_list: a.deny_list.clone(),
            deny_get: a.deny_get.clone(),
            tls: a.tls,
            http2: a.http2 == crate::cli::OnOff::On,
        }
    }
}

impl From<TestbedArgs> for TestbedOptions {
    fn from(a: TestbedArgs) -> Self {
        TestbedOptions::from(&a)
    }
}

/// A running in-process testbed. Dropping it without `shutdown` leaves the server running
/// until the runtime ends.
pub struct TestbedHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    ca_pem: Option<String>,
}

impl TestbedHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// `http://127.0.0.1:PORT`, or `https://` with TLS.
    pub fn endpoint(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }
    /// With TLS: the self-signed certificate (PEM) a client must trust.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }
    pub fn reset_stats(&self) {
        self.shared.stats.reset()
    }
    /// The knobs in force.
    pub fn knobs(&self) -> Knobs {
        (**self.shared.knobs.read().unwrap()).clone()
    }
    /// Change knobs at runtime (same as `POST /_testbed/faults`).
    pub fn update_knobs(&self, upd: &KnobsUpdate) -> Result<Knobs, String> {
        let mut g = self.shared.knobs.write().unwrap();
        let mut k = (**g).clone();
        upd.apply(&mut k, &self.shared.initial)?;
        *g = Arc::new(k.clone());
        if upd.forget_tokens {
            self.shared.token_first_use.lock().unwrap().clear();
        }
        Ok(k)
    }
    /// Stop accepting, abort open connections, and wait for the server task.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Start the server in-process; returns once it is listening.
pub async fn start(
    opts: TestbedOptions,
    source: Arc<dyn ObjectSource>,
) -> anyhow::Result<TestbedHandle> {
    let listener = TcpListener::bind(opts.addr).await?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared::new(source, opts.knobs(), opts.seed));
    let tls = if opts.tls {
        Some(server::tls_setup(opts.http2)?)
    } else {
        None
    };
    let ca_pem = tls.as_ref().map(|t| t.ca_pem.clone());
    let acceptor = tls.map(|t| t.acceptor);
    let (stop, mut stop_rx) = watch::channel(false);
    let sh = shared.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, _peer)) => {
                        conns.spawn(server::serve_connection(
                            sh.clone(),
                            stream,
                            addr,
                            acceptor.clone(),
                        ));
                    }
                    Err(e) => {
                        tracing::warn!("testbed accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                _ = stop_rx.changed() => break,
            }
        }
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    });
    Ok(TestbedHandle {
        addr,
        shared,
        stop,
        task,
        ca_pem,
    })
}

/// Serve until Ctrl-C / SIGTERM. Prints `testbed listening on http://ADDR` (`https://` with
/// --tls, after writing --tls-ca-out) to stdout first.
pub async fn run(args: TestbedArgs, source: Arc<dyn ObjectSource>) -> anyhow::Result<()> {
    // Install the handlers before announcing readiness.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let handle = start(TestbedOptions::from(&args), source).await?;
    if let (Some(path), Some(pem)) = (&args.tls_ca_out, handle.ca_pem()) {
        std::fs::write(path, pem)
            .map_err(|e| anyhow::anyhow!("--tls-ca-out {}: {e}", path.display()))?;
    }
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "testbed listening on {}", handle.endpoint())?;
        out.flush()?;
    }
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    handle.shutdown().await;
    Ok(())
}

/// Convenience for the integrator: the source for `--dir` if given (None = build the model).
/// `--synthetic` objects are layered over the folder (each must name its bucket).
pub fn dir_source(args: &TestbedArgs) -> anyhow::Result<Option<Arc<dyn ObjectSource>>> {
    match &args.dir {
        Some(d) => {
            let s = DirSource::new(d).map_err(|e| anyhow::anyhow!("--dir {}: {e}", d.display()))?;
            if args.synthetic.is_empty() {
                return Ok(Some(Arc::new(s)));
            }
            let extra = overlay::synthetic_source(&args.synthetic, None)?;
            Ok(Some(Arc::new(Overlay::new(Arc::new(s), extra))))
        }
        None => Ok(None),
    }
}
