//! Testbed: a read-only, loopback GCS JSON API server with fault and latency knobs.
//!
//! Serves objects from any [`ObjectSource`] (the MIMIC-CXR dataset model, a local folder via
//! [`DirSource`], or the in-memory [`MemSource`]). See `start` (in-process) and `run` (CLI).
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
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use dir::DirSource;
pub use knobs::{Knobs, KnobsUpdate, parse_bandwidth};
pub use mem::MemSource;
pub use model_source::ModelSource;
pub use overlay::{Overlay, SyntheticSpec, parse_synthetic};
pub use source::{ObjectSource, SourceObject};
pub use stats::StatsSnapshot;

use server::Shared;

/// Which dataset model to serve (built by the integrator from these args).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelKind {
    Dicom,
    Jpg,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not within 0..=1"))
    }
}

fn parse_bw_arg(s: &str) -> Result<u64, String> {
    Ok(parse_bandwidth(s)?.unwrap_or(0))
}

/// Command-line arguments of the testbed server.
#[derive(clap::Args, Clone, Debug)]
pub struct TestbedArgs {
    /// Address to listen on (port 0 = pick a free one).
    #[arg(long, default_value = "127.0.0.1:4443")]
    pub addr: SocketAddr,
    /// Serve a local folder (one sub-folder per bucket) instead of the dataset model.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Dataset model to serve (when --dir is not given).
    #[arg(long, value_enum, default_value = "dicom")]
    pub model: ModelKind,
    /// Also serve this model, in its own bucket, with the same --patients/--seed/--size-scale
    /// (repeatable; e.g. `--model dicom --add-model jpg` serves both buckets).
    #[arg(long, value_enum)]
    pub add_model: Vec<ModelKind>,
    /// Add a pseudo-random object of SIZE bytes: `NAME=SIZE` (in the first model's bucket) or
    /// `gs://BUCKET/NAME=SIZE` (repeatable; e.g. `bench/1g.bin=1GiB`). Costs ~1 MiB of memory
    /// whatever the size; content depends only on the name. Works with --dir too.
    #[arg(long, value_name = "NAME=SIZE", value_parser = parse_synthetic)]
    pub synthetic: Vec<SyntheticSpec>,
    /// Number of patients in the dataset model.
    #[arg(long, default_value_t = 100)]
    pub patients: u64,
    /// Seed for the dataset model and for fault injection (deterministic).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Scale factor for object sizes in the dataset model.
    #[arg(long, default_value_t = 1.0)]
    pub size_scale: f64,
    /// Delay before the response headers of every storage request (e.g. 30ms).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub first_byte_latency: Duration,
    /// Per-connection body rate cap, e.g. 200MB/s (default unlimited).
    #[arg(long, value_parser = parse_bw_arg)]
    pub bandwidth: Option<u64>,
    /// Fraction of storage requests answered 429 or 503.
    #[arg(long, value_parser = parse_rate, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Fraction of media responses whose connection is reset mid-body.
    #[arg(long, value_parser = parse_rate, default_value_t = 0.0)]
    pub reset_rate: f64,
    /// Fraction of media responses that end early (fewer bytes than Content-Length).
    #[arg(long, value_parser = parse_rate, default_value_t = 0.0)]
    pub truncate_rate: f64,
    /// Fraction of media responses that hang mid-body for --stall-duration, then close.
    #[arg(long, value_parser = parse_rate, default_value_t = 0.0)]
    pub stall_rate: f64,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub stall_duration: Duration,
    /// Reject requests without userProject= (400), like a requester-pays bucket.
    #[arg(long)]
    pub requester_pays: bool,
    /// Require `Authorization: Bearer TOKEN` with one of these tokens (repeatable; `tok-*` = prefix).
    #[arg(long = "require-token")]
    pub require_token: Vec<String>,
    /// A token is accepted only for this long after its first use (default: forever).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub token_ttl: Option<Duration>,
    /// Fraction of media bodies with one byte flipped (lengths intact).
    #[arg(long, value_parser = parse_rate, default_value_t = 0.0)]
    pub corrupt_rate: f64,
    /// Extra first-byte latency, uniform in [0, this).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub latency_jitter: Duration,
    /// Malform every answer of one kind (for client tests).
    #[arg(long, value_enum)]
    pub malformed: Option<knobs::Malformed>,
}

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
}

impl TestbedHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
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
    let (stop, mut stop_rx) = watch::channel(false);
    let sh = shared.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, _peer)) => {
                        conns.spawn(server::serve_connection(sh.clone(), stream, addr));
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
    })
}

/// Serve until Ctrl-C / SIGTERM. Prints `testbed listening on http://ADDR` to stdout first.
pub async fn run(args: TestbedArgs, source: Arc<dyn ObjectSource>) -> anyhow::Result<()> {
    // Install the handlers before announcing readiness.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let handle = start(TestbedOptions::from(&args), source).await?;
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
