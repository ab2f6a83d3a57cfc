//! Request / byte / fault counters, exposed on `GET /_testbed/stats`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    List,
    GetMeta,
    GetMedia,
    Bucket,
    Other,
    /// `iam/testPermissions`.
    Permissions,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    Fail429,
    Fail503,
    Reset,
    Truncate,
    Stall,
    Corrupt,
    Malformed,
}

pub(crate) struct Stats {
    req: [AtomicU64; 6],
    faults: [AtomicU64; 7],
    bytes_sent: AtomicU64,
    delayed_requests: AtomicU64,
    delayed_micros: AtomicU64,
    throttled_bytes: AtomicU64,
    list_scanned: AtomicU64,
    status: Box<[AtomicU64]>,
    /// Storage requests served over [http/1.1, h2].
    proto: [AtomicU64; 2],
    tls_failed: AtomicU64,
    /// TLS handshakes by negotiated version and suite, and those that resumed a session.
    tls_suites: std::sync::Mutex<BTreeMap<String, u64>>,
    tls_resumed: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            req: Default::default(),
            faults: Default::default(),
            bytes_sent: AtomicU64::new(0),
            delayed_requests: AtomicU64::new(0),
            delayed_micros: AtomicU64::new(0),
            throttled_bytes: AtomicU64::new(0),
            list_scanned: AtomicU64::new(0),
            status: (0..600).map(|_| AtomicU64::new(0)).collect(),
            proto: Default::default(),
            tls_failed: AtomicU64::new(0),
            tls_suites: Default::default(),
            tls_resumed: AtomicU64::new(0),
        }
    }
}

impl Stats {
    pub fn request(&self, k: RequestKind) {
        self.req[k as usize].fetch_add(1, Relaxed);
    }
    pub fn fault(&self, k: FaultKind) {
        self.faults[k as usize].fetch_add(1, Relaxed);
    }
    pub fn protocol(&self, h2: bool) {
        self.proto[h2 as usize].fetch_add(1, Relaxed);
    }
    /// A TLS handshake that completed with `suite` (e.g. `TLSv1_3 TLS13_AES_128_GCM_SHA256`).
    pub fn tls_handshake(&self, suite: String, resumed: bool) {
        *self.tls_suites.lock().unwrap().entry(suite).or_default() += 1;
        if resumed {
            self.tls_resumed.fetch_add(1, Relaxed);
        }
    }
    pub fn tls_handshake_failed(&self) {
        self.tls_failed.fetch_add(1, Relaxed);
    }
    pub fn bytes(&self, n: u64) {
        self.bytes_sent.fetch_add(n, Relaxed);
    }
    /// A request whose answer the latency knobs held back by `d`.
    pub fn delayed(&self, d: std::time::Duration) {
        self.delayed_requests.fetch_add(1, Relaxed);
        self.delayed_micros
            .fetch_add(d.as_micros().try_into().unwrap_or(u64::MAX), Relaxed);
    }
    /// Body bytes that waited for the bandwidth cap before they were sent.
    pub fn throttled(&self, n: u64) {
        self.throttled_bytes.fetch_add(n, Relaxed);
    }
    /// Objects the listing code read from the source to answer one listing.
    pub fn scanned(&self, n: u64) {
        self.list_scanned.fetch_add(n, Relaxed);
    }
    pub fn status(&self, code: u16) {
        if let Some(c) = self.status.get(code as usize) {
            c.fetch_add(1, Relaxed);
        }
    }
    pub fn reset(&self) {
        for c in self
            .req
            .iter()
            .chain(self.faults.iter())
            .chain(self.status.iter())
            .chain(self.proto.iter())
            .chain(std::iter::once(&self.tls_failed))
            .chain([
                &self.bytes_sent,
                &self.delayed_requests,
                &self.delayed_micros,
                &self.throttled_bytes,
                &self.list_scanned,
            ])
        {
            c.store(0, Relaxed);
        }
    }
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |k: RequestKind| self.req[k as usize].load(Relaxed);
        let f = |k: FaultKind| self.faults[k as usize].load(Relaxed);
        StatsSnapshot {
            requests: RequestCounts {
                list: r(RequestKind::List),
                get_meta: r(RequestKind::GetMeta),
                get_media: r(RequestKind::GetMedia),
                bucket: r(RequestKind::Bucket),
                other: r(RequestKind::Other),
                permissions: r(RequestKind::Permissions),
            },
            bytes_sent: self.bytes_sent.load(Relaxed),
            delayed_requests: self.delayed_requests.load(Relaxed),
            delayed_micros: self.delayed_micros.load(Relaxed),
            throttled_bytes: self.throttled_bytes.load(Relaxed),
            list_scanned: self.list_scanned.load(Relaxed),
            faults: FaultCounts {
                fail_429: f(FaultKind::Fail429),
                fail_503: f(FaultKind::Fail503),
                reset: f(FaultKind::Reset),
                truncate: f(FaultKind::Truncate),
                stall: f(FaultKind::Stall),
                corrupt: f(FaultKind::Corrupt),
                malformed: f(FaultKind::Malformed),
            },
            protocols: ProtocolCounts {
                http1: self.proto[0].load(Relaxed),
                http2: self.proto[1].load(Relaxed),
                tls_handshake_failed: self.tls_failed.load(Relaxed),
                tls_suites: self.tls_suites.lock().unwrap().clone(),
                tls_resumed: self.tls_resumed.load(Relaxed),
            },
            responses: self
                .status
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let v = c.load(Relaxed);
                    (v > 0).then(|| (i.to_string(), v))
                })
                .collect(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RequestCounts {
    pub list: u64,
    pub get_meta: u64,
    pub get_media: u64,
    pub bucket: u64,
    pub other: u64,
    #[serde(default)]
    pub permissions: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FaultCounts {
    pub fail_429: u64,
    pub fail_503: u64,
    pub reset: u64,
    pub truncate: u64,
    pub stall: u64,
    #[serde(default)]
    pub corrupt: u64,
    #[serde(default)]
    pub malformed: u64,
}

/// What `GET /_testbed/stats` returns. `responses` maps status code (as a string) to count.
///
/// The knobs that slow answers down count what they did (`delayed_*`, `throttled_bytes`), and
/// listings count what they cost (`list_scanned`), so that tests check them by counts rather
/// than by timing a client, which a loaded machine makes slow and a fast one makes anything.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub requests: RequestCounts,
    pub bytes_sent: u64,
    /// Storage requests whose answer `first_byte_latency` / `latency_jitter` held back.
    #[serde(default)]
    pub delayed_requests: u64,
    /// The delay they were held back by, in all (microseconds).
    #[serde(default)]
    pub delayed_micros: u64,
    /// Media body bytes that waited for the `bandwidth` cap before they were sent.
    #[serde(default)]
    pub throttled_bytes: u64,
    /// Objects the listing code read from the source, over every listing: a page costs about
    /// its own size (plus the objects under the prefixes it collapses), never the bucket's.
    #[serde(default)]
    pub list_scanned: u64,
    pub faults: FaultCounts,
    #[serde(default)]
    pub protocols: ProtocolCounts,
    pub responses: BTreeMap<String, u64>,
}

/// Which HTTP version served the storage requests, and TLS handshakes refused (e.g. by a
/// client that does not trust the certificate).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProtocolCounts {
    pub http1: u64,
    pub http2: u64,
    pub tls_handshake_failed: u64,
    /// Completed handshakes by negotiated version and cipher suite.
    #[serde(default)]
    pub tls_suites: BTreeMap<String, u64>,
    /// Completed handshakes that resumed an earlier session (a ticket the client kept).
    #[serde(default)]
    pub tls_resumed: u64,
}

impl StatsSnapshot {
    pub fn responses_with(&self, code: u16) -> u64 {
        self.responses.get(&code.to_string()).copied().unwrap_or(0)
    }
}
