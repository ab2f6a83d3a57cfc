//! Fault injection as a client decorator: [`FailureClient`] wraps any [`ObjectClient`] and
//! makes chosen calls fail, come back short or corrupt, or wait.
//!
//! Faults live here, outside the clients, so one set of fault hooks serves every client (the
//! in-memory fake under unit and property tests, the real GCS client against a testbed) and
//! the clients themselves stay free of test code. Which call is hit is decided by rules that
//! count calls (the Nth matching call, the first N) or draw from a seeded generator (a
//! fraction of calls), so the same sequence of calls meets the same faults on every run.
//!
//! Short and corrupt answers break the [`ObjectClient::get_range`] contract on purpose (a
//! checked client never returns them): they are for testing what the layer above does when
//! the bytes it gets are wrong.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ClientError, ListPage, ListRequest, ObjectClient, ObjectMeta, ObjectVersion};

/// The kinds of calls of [`ObjectClient`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    List,
    Stat,
    Get,
}

/// Which of the calls a rule matches it hits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum When {
    /// The Nth matching call (1-based), once.
    Nth(u64),
    /// The first N matching calls.
    First(u64),
    /// Each matching call with this probability (from the client's seeded generator).
    Rate(f64),
    /// Every matching call.
    Always,
}

/// What happens to a call that is hit.
#[derive(Clone, Debug)]
pub enum Fault {
    /// The call fails with this error; the wrapped client is not called.
    Fail(ClientError),
    /// A get returns fewer bytes than asked: a prefix of the right ones, at least one short.
    Truncate,
    /// A get returns as many bytes as asked with one of them flipped.
    Corrupt,
    /// The call waits this long, then goes ahead (other rules still apply).
    Delay(Duration),
}

/// One fault rule: which calls (kind, object), when, and what.
#[derive(Clone, Debug)]
pub struct Rule {
    op: Option<Op>,
    object: Option<String>,
    when: When,
    fault: Fault,
    /// Calls this rule matched so far.
    seen: u64,
}

impl Rule {
    /// A rule for calls of kind `op` (None: every call).
    ///
    /// Panics when `fault` cannot apply to `op` (truncating or corrupting anything but a get),
    /// or on a rate outside `0..=1`: both are mistakes in the test that wrote them.
    pub fn new(op: Option<Op>, when: When, fault: Fault) -> Rule {
        if matches!(fault, Fault::Truncate | Fault::Corrupt) {
            assert_eq!(
                op,
                Some(Op::Get),
                "{fault:?} changes a get's bytes: give it Some(Op::Get)"
            );
        }
        if let When::Rate(r) = when {
            assert!((0.0..=1.0).contains(&r), "rate {r} is not within 0..=1");
        }
        Rule {
            op,
            object: None,
            when,
            fault,
            seen: 0,
        }
    }

    /// Only calls about this object (stat and get; listings never match).
    pub fn object(mut self, name: &str) -> Rule {
        self.object = Some(name.to_string());
        self
    }

    fn matches(&self, op: Op, object: Option<&str>) -> bool {
        self.op.is_none_or(|o| o == op)
            && self
                .object
                .as_deref()
                .is_none_or(|want| object == Some(want))
    }
}

/// Faults injected so far, by kind.
#[derive(Debug, Default)]
pub struct FailureStats {
    pub calls: AtomicU64,
    pub failed: AtomicU64,
    pub truncated: AtomicU64,
    pub corrupted: AtomicU64,
    pub delayed: AtomicU64,
}

impl FailureStats {
    /// Calls that were failed, truncated or corrupted (delays are not faults of the answer).
    pub fn injected(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
            + self.truncated.load(Ordering::Relaxed)
            + self.corrupted.load(Ordering::Relaxed)
    }
}

/// What the rules decided for one call.
#[derive(Default)]
struct Decision {
    delay: Duration,
    /// The first fault of the answer that applies: Fail, Truncate or Corrupt.
    fault: Option<Fault>,
}

/// Wraps a client and injects faults into its calls by [`Rule`]s.
pub struct FailureClient<C: ?Sized = dyn ObjectClient> {
    inner: Arc<C>,
    rules: Mutex<Vec<Rule>>,
    rng: Mutex<u64>,
    pub stats: FailureStats,
}

impl<C: ObjectClient + ?Sized> FailureClient<C> {
    /// No rules yet: every call goes through unchanged. `seed` drives [`When::Rate`] rules
    /// and where a truncation cuts or a corruption flips.
    pub fn new(inner: Arc<C>, seed: u64) -> Self {
        FailureClient {
            inner,
            rules: Mutex::new(Vec::new()),
            rng: Mutex::new(seed ^ 0xFA11_0000_5EED_0001),
            stats: FailureStats::default(),
        }
    }

    /// The wrapped client.
    pub fn inner(&self) -> &Arc<C> {
        &self.inner
    }

    /// Adds a rule (rules apply in the order added; see [`FailureClient::push`]).
    pub fn with(self, rule: Rule) -> Self {
        self.push(rule);
        self
    }

    /// Adds a rule at run time. Every rule matching a call counts it; delays add up, and of
    /// the rules that hit the answer (fail, truncate, corrupt) the first one added wins.
    pub fn push(&self, rule: Rule) {
        self.rules.lock().unwrap().push(rule);
    }

    /// Removes every rule: from now on calls go through unchanged.
    pub fn clear(&self) {
        self.rules.lock().unwrap().clear();
    }

    /// Fails the Nth call of kind `op` (1-based, counted from when this rule is added).
    pub fn fail_nth(&self, op: Op, n: u64, err: ClientError) {
        self.push(Rule::new(Some(op), When::Nth(n), Fault::Fail(err)));
    }

    /// Fails this fraction of the calls of kind `op`.
    pub fn fail_rate(&self, op: Op, rate: f64, err: ClientError) {
        self.push(Rule::new(Some(op), When::Rate(rate), Fault::Fail(err)));
    }

    fn unit(&self) -> f64 {
        let mut st = self.rng.lock().unwrap();
        (splitmix64(&mut st) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn decide(&self, op: Op, object: Option<&str>) -> Decision {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let mut d = Decision::default();
        let mut rules = self.rules.lock().unwrap();
        for r in rules.iter_mut().filter(|r| r.matches(op, object)) {
            r.seen += 1;
            let hit = match r.when {
                When::Nth(n) => r.seen == n,
                When::First(n) => r.seen <= n,
                When::Rate(p) => self.unit() < p,
                When::Always => true,
            };
            if !hit {
                continue;
            }
            match &r.fault {
                Fault::Delay(t) => d.delay += *t,
                f if d.fault.is_none() => d.fault = Some(f.clone()),
                _ => {}
            }
        }
        d
    }

    /// Applies `d` to a call of the wrapped client; `Ok` bytes may then be mangled.
    async fn run<T>(
        &self,
        d: Decision,
        call: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        if !d.delay.is_zero() {
            self.stats.delayed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(d.delay).await;
        }
        if let Some(Fault::Fail(e)) = d.fault {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        call.await
    }

    fn mangle(&self, fault: Option<Fault>, data: Bytes) -> Bytes {
        if data.is_empty() {
            return data;
        }
        match fault {
            Some(Fault::Truncate) => {
                self.stats.truncated.fetch_add(1, Ordering::Relaxed);
                let cut = ((data.len() as f64 * self.unit()) as usize).min(data.len() - 1);
                data.slice(..cut)
            }
            Some(Fault::Corrupt) => {
                self.stats.corrupted.fetch_add(1, Ordering::Relaxed);
                let at = ((data.len() as f64 * self.unit()) as usize).min(data.len() - 1);
                let mut v = data.to_vec();
                v[at] ^= 0x5A;
                Bytes::from(v)
            }
            _ => data,
        }
    }
}

#[async_trait]
impl<C: ObjectClient + ?Sized> ObjectClient for FailureClient<C> {
    fn bucket(&self) -> &str {
        self.inner.bucket()
    }

    async fn list_page(&self, req: &ListRequest) -> Result<ListPage, ClientError> {
        let d = self.decide(Op::List, None);
        self.run(d, self.inner.list_page(req)).await
    }

    async fn stat(&self, name: &str) -> Result<ObjectMeta, ClientError> {
        let d = self.decide(Op::Stat, Some(name));
        self.run(d, self.inner.stat(name)).await
    }

    async fn get_range(
        &self,
        obj: ObjectVersion<'_>,
        start: u64,
        end: u64,
    ) -> Result<Bytes, ClientError> {
        let mut d = self.decide(Op::Get, Some(obj.name));
        let mangle = match d.fault {
            Some(Fault::Truncate | Fault::Corrupt) => d.fault.take(),
            _ => None,
        };
        let data = self.run(d, self.inner.get_range(obj, start, end)).await?;
        Ok(self.mangle(mangle, data))
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::fake::FakeClient;

    fn net() -> ClientError {
        ClientError::Network {
            endpoint: "fake".into(),
            cause: "injected reset".into(),
        }
    }

    fn fake(objects: &[(&str, usize)]) -> (Arc<FakeClient>, Vec<ObjectMeta>) {
        let c = Arc::new(FakeClient::new("b"));
        let metas = objects
            .iter()
            .map(|(n, len)| c.put(n, (0..*len).map(|i| (i % 251) as u8).collect::<Vec<_>>()))
            .collect();
        (c, metas)
    }

    fn version(m: &ObjectMeta) -> ObjectVersion<'_> {
        ObjectVersion {
            name: &m.name,
            generation: m.generation,
            size: m.size,
            crc32c: m.crc32c,
        }
    }

    #[tokio::test]
    async fn nth_call_of_a_kind_fails_and_skips_the_inner_client() {
        let (c, m) = fake(&[("a", 100)]);
        let f = FailureClient::new(c.clone(), 1);
        f.fail_nth(Op::Get, 3, net());
        let mut outcomes = Vec::new();
        for _ in 0..5 {
            outcomes.push(f.get_range(version(&m[0]), 0, 10).await.is_ok());
        }
        assert_eq!(outcomes, [true, true, false, true, true]);
        // Other kinds are counted apart: a stat is not the 3rd get.
        f.fail_nth(Op::Stat, 1, ClientError::NotFound("a".into()));
        assert!(matches!(f.stat("a").await, Err(ClientError::NotFound(_))));
        assert!(f.stat("a").await.is_ok());
        assert!(f.list_page(&ListRequest::default()).await.is_ok());
        assert_eq!(c.get_calls.load(Ordering::Relaxed), 4, "failed get sent");
        assert_eq!(c.stat_calls.load(Ordering::Relaxed), 1);
        assert_eq!(f.stats.failed.load(Ordering::Relaxed), 2);
        assert_eq!(f.stats.calls.load(Ordering::Relaxed), 8);
    }

    #[tokio::test]
    async fn first_n_and_object_filter() {
        let (c, m) = fake(&[("a", 10), ("b", 10)]);
        let f = FailureClient::new(c, 1)
            .with(Rule::new(Some(Op::Get), When::First(2), Fault::Fail(net())).object("b"));
        for _ in 0..3 {
            assert!(f.get_range(version(&m[0]), 0, 10).await.is_ok());
        }
        let mut b = Vec::new();
        for _ in 0..4 {
            b.push(f.get_range(version(&m[1]), 0, 10).await.is_ok());
        }
        assert_eq!(b, [false, false, true, true]);
    }

    /// The same seed meets the same faults; the fraction hit is near the rate.
    #[tokio::test]
    async fn rates_are_seeded() {
        let (c, _) = fake(&[]);
        let pattern = |seed| {
            let f = FailureClient::new(c.clone(), seed);
            f.fail_rate(Op::List, 0.25, net());
            async move {
                let mut v = Vec::new();
                for _ in 0..400 {
                    v.push(f.list_page(&ListRequest::default()).await.is_err());
                }
                v
            }
        };
        let (a, b, other) = (pattern(7).await, pattern(7).await, pattern(8).await);
        assert_eq!(a, b);
        assert_ne!(a, other);
        let hits = a.iter().filter(|x| **x).count();
        assert!((60..140).contains(&hits), "{hits} of 400 at rate 0.25");
        let f = FailureClient::new(c.clone(), 1);
        f.fail_rate(Op::List, 0.0, net());
        f.push(Rule::new(
            Some(Op::Stat),
            When::Rate(1.0),
            Fault::Fail(net()),
        ));
        assert!(f.list_page(&ListRequest::default()).await.is_ok());
        assert!(f.stat("x").await.is_err());
    }

    #[tokio::test]
    async fn truncation_is_a_short_prefix_and_corruption_one_flipped_byte() {
        let (c, m) = fake(&[("a", 4096)]);
        let want = c.get_range(version(&m[0]), 0, 4096).await.unwrap();
        let f = FailureClient::new(c, 3)
            .with(Rule::new(Some(Op::Get), When::Nth(1), Fault::Truncate))
            .with(Rule::new(Some(Op::Get), When::Nth(2), Fault::Corrupt));
        let short = f.get_range(version(&m[0]), 0, 4096).await.unwrap();
        assert!(short.len() < 4096);
        assert_eq!(short[..], want[..short.len()]);
        let bad = f.get_range(version(&m[0]), 0, 4096).await.unwrap();
        assert_eq!(bad.len(), 4096);
        let diffs: Vec<usize> = (0..4096).filter(|&i| bad[i] != want[i]).collect();
        assert_eq!(diffs.len(), 1);
        assert_eq!(bad[diffs[0]] ^ want[diffs[0]], 0x5A);
        assert_eq!(f.get_range(version(&m[0]), 0, 4096).await.unwrap(), want);
        assert_eq!(f.stats.truncated.load(Ordering::Relaxed), 1);
        assert_eq!(f.stats.corrupted.load(Ordering::Relaxed), 1);
        assert_eq!(f.stats.injected(), 2);
    }

    /// A failure rule added before a truncation wins; the truncation is not applied too.
    #[tokio::test]
    async fn first_answer_fault_wins_and_clear_stops_all() {
        let (c, m) = fake(&[("a", 100)]);
        let f = FailureClient::new(c, 3)
            .with(Rule::new(Some(Op::Get), When::Always, Fault::Fail(net())))
            .with(Rule::new(Some(Op::Get), When::Always, Fault::Truncate));
        assert!(f.get_range(version(&m[0]), 0, 100).await.is_err());
        assert_eq!(f.stats.truncated.load(Ordering::Relaxed), 0);
        f.clear();
        assert_eq!(
            f.get_range(version(&m[0]), 0, 100).await.unwrap().len(),
            100
        );
    }

    /// A delayed call waits (a call delayed by minutes cannot finish within a second), then
    /// goes ahead to the wrapped client.
    #[tokio::test]
    async fn delays_hold_the_call_then_let_it_through() {
        let (c, _) = fake(&[]);
        let f = FailureClient::new(c.clone(), 1)
            .with(Rule::new(
                Some(Op::List),
                When::Nth(1),
                Fault::Delay(Duration::from_secs(600)),
            ))
            .with(Rule::new(
                None,
                When::Always,
                Fault::Delay(Duration::from_millis(1)),
            ));
        let held =
            tokio::time::timeout(Duration::from_secs(1), f.list_page(&ListRequest::default()))
                .await;
        assert!(held.is_err(), "a 10-minute delay returned early");
        assert_eq!(c.requests(), 0, "sent before the delay was over");
        assert!(f.list_page(&ListRequest::default()).await.is_ok());
        assert!(f.stat("x").await.is_err(), "the fake has no x");
        assert_eq!(c.requests(), 2);
        assert_eq!(f.stats.delayed.load(Ordering::Relaxed), 3);
        assert_eq!(f.stats.injected(), 0);
    }

    /// Wraps a trait object as well as a concrete client.
    #[tokio::test]
    async fn wraps_a_trait_object() {
        let (c, m) = fake(&[("a", 10)]);
        let dynamic: Arc<dyn ObjectClient> = c;
        let f: FailureClient = FailureClient::new(dynamic, 1);
        f.fail_nth(Op::Get, 1, net());
        assert!(f.get_range(version(&m[0]), 0, 10).await.is_err());
        assert!(f.get_range(version(&m[0]), 0, 10).await.is_ok());
        assert_eq!(f.bucket(), "b");
    }

    #[test]
    #[should_panic(expected = "changes a get's bytes")]
    fn truncating_a_listing_is_refused() {
        Rule::new(Some(Op::List), When::Always, Fault::Truncate);
    }
}
