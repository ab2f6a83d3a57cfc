//! Counters, readable while mounted at `--metrics-addr` (Prometheus text format) and logged
//! at unmount.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use crate::client::gcs::ClientStats;
use crate::fs::Fs;

/// Everything worth counting, in Prometheus text exposition format.
pub fn render(client: &ClientStats, fs: &Fs) -> String {
    let c = fs.cache().stats();
    let f = fs.stats();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP physiofs_{name} {help}");
        let _ = writeln!(out, "# TYPE physiofs_{name} {kind}");
        let _ = writeln!(out, "physiofs_{name} {value}");
    };
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    metric(
        "list_requests_total",
        "counter",
        "Listing requests sent (each a billed Class A operation).",
        n(&client.list_requests),
    );
    metric(
        "stat_requests_total",
        "counter",
        "Object metadata requests sent.",
        n(&client.stat_requests),
    );
    metric(
        "get_requests_total",
        "counter",
        "Ranged media requests sent.",
        n(&client.get_requests),
    );
    metric(
        "retries_total",
        "counter",
        "Requests retried after a transient failure.",
        n(&client.retries),
    );
    metric(
        "resumes_total",
        "counter",
        "Media reads continued from the first missing byte after a broken or stalled body.",
        n(&client.resumes),
    );
    metric(
        "media_connections_tls_own_records_total",
        "counter",
        "Media connections over TLS 1.3 whose records physiofs decrypts in the receive buffer.",
        n(&client.media.tls_own_records),
    );
    metric(
        "media_connections_tls_rustls_total",
        "counter",
        "Media connections over TLS left to rustls (TLS 1.2, or another cipher suite).",
        n(&client.media.tls_rustls),
    );
    metric(
        "media_connections_plain_total",
        "counter",
        "Media connections over plain HTTP.",
        n(&client.media.plain),
    );
    metric(
        "checksum_mismatches_total",
        "counter",
        "Whole-object reads whose CRC32C did not match the listing (each was asked again).",
        n(&client.checksum_mismatches),
    );
    metric(
        "bytes_fetched_total",
        "counter",
        "Body bytes received for media reads.",
        n(&client.bytes_fetched),
    );
    metric(
        "objects_verified_total",
        "counter",
        "Handles that served a whole object whose bytes matched its CRC32C.",
        n(&f.objects_verified),
    );
    metric(
        "verify_failures_total",
        "counter",
        "Whole objects served in pieces whose CRC32C did not match (that read failed with EIO).",
        n(&f.verify_failures),
    );
    metric(
        "passthrough_opens_total",
        "counter",
        "Opens of files complete in the disk cache answered with passthrough (the kernel reads the cached file; no read reaches physiofs).",
        n(&f.passthrough_opens),
    );
    metric(
        "direct_reads_total",
        "counter",
        "Random reads fetched as exactly their range in one request, cached nowhere (the page cache keeps them).",
        n(&f.direct_reads),
    );
    if let Some(d) = fs.reader().disk() {
        let s = d.stats();
        metric(
            "disk_cache_hits_total",
            "counter",
            "Blocks served from the disk cache (each checked against its CRC32C).",
            n(&s.hits),
        );
        metric(
            "disk_cache_bytes_written_total",
            "counter",
            "Bytes written to the disk cache.",
            n(&s.bytes_written),
        );
        metric(
            "disk_cache_corrupt_total",
            "counter",
            "Cached blocks or files found not to match their CRC32C (dropped and fetched again).",
            n(&s.corrupt),
        );
        metric(
            "disk_cache_evicted_objects_total",
            "counter",
            "Object versions evicted from the disk cache to stay within --disk-cache-size.",
            n(&s.evicted_objects),
        );
        metric(
            "disk_cache_bytes",
            "gauge",
            "Bytes of object data in the disk cache.",
            d.summary().bytes,
        );
    }
    metric(
        "files_prefetched_total",
        "counter",
        "Files fetched before they were opened, for readers walking files in key order.",
        n(&f.files_prefetched),
    );
    metric(
        "headers_prefetched_total",
        "counter",
        "Of those, files whose start was fetched for readers scanning headers in key order.",
        n(&f.headers_prefetched),
    );
    metric(
        "read_bytes_total",
        "counter",
        "Bytes returned to readers.",
        n(&f.read_bytes),
    );
    metric(
        "prefetch_bytes_total",
        "counter",
        "Bytes requested by read-ahead.",
        n(&f.prefetch_bytes),
    );
    metric(
        "cache_hits_total",
        "counter",
        "Block cache hits.",
        n(&c.hits),
    );
    metric(
        "cache_misses_total",
        "counter",
        "Block cache misses.",
        n(&c.misses),
    );
    metric(
        "cache_bytes",
        "gauge",
        "Bytes held in the block cache.",
        fs.cache().weighted_size(),
    );
    metric(
        "inodes",
        "gauge",
        "Entries in the inode table.",
        fs.inodes().len() as u64,
    );
    let fetcher = fs.reader().fetcher();
    metric(
        "fetch_bytes_in_flight_peak",
        "gauge",
        "The most bytes media GETs ever had in flight at once (read-ahead and demand; bounded by the read-ahead budget plus the demand budget).",
        fetcher.peak_bytes_in_flight(),
    );
    metric(
        "demand_bytes_in_flight_peak",
        "gauge",
        "The most bytes demand reads and whole small-object fetches ever had in flight at once (bounded by demand_budget_bytes, or one larger request alone).",
        fetcher.demand_budget().gauge().peak(),
    );
    metric(
        "demand_budget_bytes",
        "gauge",
        "Bytes demand reads and whole small-object fetches may have in flight at once; more wait in arrival order.",
        fetcher.demand_budget().total(),
    );
    metric(
        "demand_requests_in_flight_peak",
        "gauge",
        "The most demand GETs (demand reads and whole small-object fetches) ever in flight at once (bounded by demand_budget_requests).",
        fetcher.demand_budget().requests_gauge().peak(),
    );
    metric(
        "demand_budget_requests",
        "gauge",
        "Demand GETs that may be in flight at once; more wait in arrival order.",
        fetcher.demand_budget().requests(),
    );
    metric(
        "demand_fetches_waiting",
        "gauge",
        "Demand fetches waiting for room (bytes or a request slot) in the demand budget now.",
        fetcher.demand_budget().waiting() as u64,
    );
    metric(
        "inodes_dropped_total",
        "counter",
        "Inode table entries dropped after the kernel forgot them (lazily listed directories only; each is listed again when next used).",
        fs.inodes().dropped(),
    );
    metric(
        "readdir_entries_visited_total",
        "counter",
        "Directory children stepped over to answer readdir (each offered to a reply once; a resumed readdir steps over none it already gave).",
        fs.inodes().visited(),
    );
    out
}

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 16;

/// The metrics endpoint's socket, bound but not yet served: bound before the mount, so that a
/// bad or taken `--metrics-addr` fails with nothing mounted, and so that a scraper that waits
/// for the mount to appear finds the port open (connections made before [`Listener::serve`]
/// wait in the kernel's backlog).
pub struct Listener {
    listener: tokio::net::TcpListener,
    /// The address bound (the port filled in when the one asked for was 0).
    pub local: SocketAddr,
}

/// Binds `addr` for the metrics endpoint (warning when it is not a loopback address); an
/// error names the flag, and for a taken port the way out.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<Listener> {
    if !addr.ip().is_loopback() {
        tracing::warn!(
            "--metrics-addr {addr} is not a loopback address: anyone who can reach it reads \
             the counters; use 127.0.0.1:PORT unless it is firewalled"
        );
    }
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            " (another process listens there: pick another port, or 127.0.0.1:0 for any free one)"
        } else {
            ""
        };
        anyhow::anyhow!("--metrics-addr {addr}: {e}{hint}")
    })?;
    let local = listener.local_addr()?;
    Ok(Listener { listener, local })
}

impl Listener {
    /// Serves `GET /metrics` (any path, in fact) until the process ends. Bounded against a
    /// misbehaving scraper: a few connections at once, each given 5 s for its request head
    /// and 30 s in all, and a failing `accept` (out of descriptors) is retried after a pause
    /// instead of in a busy loop.
    pub fn serve(self, client: Arc<ClientStats>, fs: Arc<Fs>) {
        let Listener { listener, .. } = self;
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::debug!("metrics: accept failed: {e}; retrying in 100 ms");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (client, fs) = (client.clone(), fs.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    let svc = hyper::service::service_fn(move |_req| {
                        let body = render(&client, &fs);
                        async move {
                            hyper::Response::builder()
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(http_body_util::Full::new(Bytes::from(body)))
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(std::time::Duration::from_secs(5))
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
                });
            }
        });
    }
}
