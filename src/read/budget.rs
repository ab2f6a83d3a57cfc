//! A byte budget for GETs a reader waits for (demand reads, the rest of a small object), so
//! that many readers bypassing the page cache (`O_DIRECT`, any user under `--allow-other`)
//! queue instead of growing memory. It bounds requests too: each GET also takes one of a fixed
//! number of request slots, so many small reads (one 32 KiB block each) cannot have a
//! budget's worth of tiny GETs, each with its connection and task, in flight at once.
//!
//! A place in the queue is taken synchronously, when the fetch is decided ([`Budget::reserve`],
//! called while the fetcher registers the blocks in flight), not when the fetch is first
//! polled: arrival order is decision order, and a fetch waiting for its turn is already
//! registered, so every other reader of its blocks joins it. The queue is strict FIFO (a big
//! request at the head is not overtaken by small ones behind it, so it cannot starve), and a
//! request larger than the whole budget asks for all of it: it proceeds alone once everything
//! before it has landed, so no request waits forever. A ticket takes its bytes and its slot
//! together, in one step, and a granted GET never asks for another ticket, so no holder waits
//! on anyone and nothing can deadlock. Read-ahead has a budget of its own and
//! never waits (it gives up instead), so it cannot hold demand reads back.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::oneshot;

/// Bytes (or requests) in flight now and the most there ever were.
#[derive(Debug, Default)]
pub struct Gauge {
    now: AtomicU64,
    peak: AtomicU64,
}

impl Gauge {
    /// Counts `bytes` in flight until the guard is dropped.
    pub fn enter(self: &Arc<Self>, bytes: u64) -> Counted {
        let now = self.now.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
        Counted {
            gauge: self.clone(),
            bytes,
        }
    }

    pub fn now(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

/// Bytes counted in a [`Gauge`] until dropped.
#[derive(Debug)]
pub struct Counted {
    gauge: Arc<Gauge>,
    bytes: u64,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.gauge.now.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    want: u64,
    tx: oneshot::Sender<()>,
}

#[derive(Debug)]
struct State {
    free: u64,
    /// Request slots not granted.
    slots: u64,
    next_id: u64,
    queue: VecDeque<Waiter>,
}

#[derive(Debug)]
struct Inner {
    total: u64,
    requests: u64,
    state: Mutex<State>,
    /// Bytes of granted requests (the real size, also of one larger than the budget).
    gauge: Arc<Gauge>,
    /// Granted requests.
    requests_gauge: Arc<Gauge>,
}

impl Inner {
    /// Grants waiters from the head of the queue while their bytes and a request slot fit. A
    /// waiter whose ticket was dropped meanwhile has left the queue already (see
    /// `Ticket::drop`).
    fn grant(&self, st: &mut State) {
        while let Some(w) = st.queue.front() {
            if w.want > st.free || st.slots == 0 {
                return;
            }
            let w = st.queue.pop_front().unwrap();
            st.free -= w.want;
            st.slots -= 1;
            // The ticket's receiver lives as long as the ticket, and a dropped ticket removes
            // itself from the queue under this lock first, so the send cannot fail; if it
            // did, the bytes and the slot would come back here.
            if w.tx.send(()).is_err() {
                st.free += w.want;
                st.slots += 1;
            }
        }
    }

    /// A granted request's bytes and slot come back.
    fn give_back(&self, want: u64) {
        let mut st = self.state.lock().unwrap();
        st.free += want;
        st.slots += 1;
        self.grant(&mut st);
    }
}

/// A fair budget of bytes and requests (see the module docs).
#[derive(Clone, Debug)]
pub struct Budget {
    inner: Arc<Inner>,
}

impl Budget {
    /// A budget of `total` bytes and `requests` requests in flight at once (each at least 1).
    pub fn new(total: u64, requests: u64) -> Self {
        let (total, requests) = (total.max(1), requests.max(1));
        Budget {
            inner: Arc::new(Inner {
                total,
                requests,
                state: Mutex::new(State {
                    free: total,
                    slots: requests,
                    next_id: 0,
                    queue: VecDeque::new(),
                }),
                gauge: Arc::default(),
                requests_gauge: Arc::default(),
            }),
        }
    }

    pub fn total(&self) -> u64 {
        self.inner.total
    }

    /// Requests that may be in flight at once.
    pub fn requests(&self) -> u64 {
        self.inner.requests
    }

    /// Bytes granted and not yet given back, and the most there ever were.
    pub fn gauge(&self) -> &Arc<Gauge> {
        &self.inner.gauge
    }

    /// Requests granted and not yet given back, and the most there ever were.
    pub fn requests_gauge(&self) -> &Arc<Gauge> {
        &self.inner.requests_gauge
    }

    /// Requests waiting for their turn.
    pub fn waiting(&self) -> usize {
        self.inner.state.lock().unwrap().queue.len()
    }

    /// Takes a place in the queue for one request of `bytes` now: granted at once when nobody
    /// waits and they fit (and a request slot is free), else when every request before it has
    /// been granted and they fit. A request larger than the budget asks for all of it. Await
    /// the ticket for the grant.
    pub fn reserve(&self, bytes: u64) -> Ticket {
        let want = bytes.min(self.inner.total);
        let mut st = self.inner.state.lock().unwrap();
        let state = if st.queue.is_empty() && want <= st.free && st.slots > 0 {
            st.free -= want;
            st.slots -= 1;
            TicketState::Granted
        } else {
            let (tx, rx) = oneshot::channel();
            let id = st.next_id;
            st.next_id += 1;
            st.queue.push_back(Waiter { id, want, tx });
            TicketState::Waiting(id, rx)
        };
        Ticket {
            inner: self.inner.clone(),
            want,
            bytes,
            state,
        }
    }
}

#[derive(Debug)]
enum TicketState {
    Waiting(u64, oneshot::Receiver<()>),
    Granted,
    /// Turned into a [`Grant`] (or given back).
    Done,
}

/// A place in a [`Budget`]'s queue; resolves to the [`Grant`]. Dropped before that, it
/// leaves the queue (or gives back the bytes and the slot it was granted).
#[derive(Debug)]
pub struct Ticket {
    inner: Arc<Inner>,
    want: u64,
    bytes: u64,
    state: TicketState,
}

impl Ticket {
    /// Whether the ticket's turn has come (it was granted, not yet awaited).
    pub fn is_granted(&mut self) -> bool {
        if let TicketState::Waiting(_, rx) = &mut self.state
            && rx.try_recv().is_ok()
        {
            self.state = TicketState::Granted;
        }
        matches!(self.state, TicketState::Granted)
    }
}

impl Future for Ticket {
    type Output = Grant;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Grant> {
        if let TicketState::Waiting(_, rx) = &mut self.state {
            // An error would mean the budget is gone; there is nothing left to wait for.
            if Pin::new(rx).poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.state = TicketState::Granted;
        }
        assert!(
            matches!(self.state, TicketState::Granted),
            "ticket polled after its grant"
        );
        self.state = TicketState::Done;
        Poll::Ready(Grant {
            inner: self.inner.clone(),
            want: self.want,
            counted: Some((
                self.inner.gauge.enter(self.bytes),
                self.inner.requests_gauge.enter(1),
            )),
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.state, TicketState::Done) {
            TicketState::Done => {}
            TicketState::Granted => self.inner.give_back(self.want),
            TicketState::Waiting(id, _) => {
                let mut st = self.inner.state.lock().unwrap();
                match st.queue.iter().position(|w| w.id == id) {
                    // Still waiting: leave the queue; whoever was behind may fit now.
                    Some(i) => {
                        st.queue.remove(i);
                        self.inner.grant(&mut st);
                    }
                    // Granted meanwhile: give it back.
                    None => {
                        st.free += self.want;
                        st.slots += 1;
                        self.inner.grant(&mut st);
                    }
                }
            }
        }
    }
}

/// Bytes and a request slot of a budget in use until dropped.
#[derive(Debug)]
pub struct Grant {
    inner: Arc<Inner>,
    want: u64,
    /// Counted in the gauges; `None` once dropped.
    counted: Option<(Counted, Counted)>,
}

impl Drop for Grant {
    fn drop(&mut self) {
        // Out of the gauges before the bytes go back: a request granted with them at once
        // must not be counted beside this one.
        self.counted.take();
        self.inner.give_back(self.want);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn grants_in_arrival_order_and_a_big_request_is_not_overtaken() {
        let b = Budget::new(100, 100);
        let g1 = b.reserve(60).await;
        // 50 does not fit: it waits; 10 would fit, but arrived after it and waits behind it.
        let mut t2 = b.reserve(50);
        let mut t3 = b.reserve(10);
        assert!(!t2.is_granted());
        assert!(!t3.is_granted());
        assert_eq!(b.waiting(), 2);
        drop(g1);
        assert!(t2.is_granted());
        assert!(t3.is_granted());
        let (g2, g3) = (t2.await, t3.await);
        assert_eq!(b.gauge().now(), 60);
        // A later request waits for the ones before it to land, in order.
        let mut t4 = b.reserve(55);
        let mut t5 = b.reserve(5);
        assert!(!t4.is_granted() && !t5.is_granted());
        drop(g3);
        assert!(!t4.is_granted(), "55 does not fit in the 50 left");
        assert!(!t5.is_granted(), "5 would, but came after it");
        drop(g2);
        assert!(t4.is_granted() && t5.is_granted());
        assert_eq!(b.gauge().peak(), 60);
    }

    #[tokio::test]
    async fn a_request_larger_than_the_budget_proceeds_alone() {
        let b = Budget::new(100, 100);
        let small = b.reserve(30).await;
        let mut big = b.reserve(1000);
        let mut after = b.reserve(1);
        assert!(!big.is_granted());
        drop(small);
        assert!(big.is_granted(), "nothing else in flight: the big one goes");
        assert!(!after.is_granted(), "and alone");
        let g = big.await;
        assert_eq!(b.gauge().now(), 1000, "counted at its real size");
        drop(g);
        assert!(after.is_granted());
        drop(after);
        // With nothing in flight, it is granted at once.
        let g = b.reserve(5000).now_or_never().expect("granted at once");
        drop(g);
        assert_eq!(b.gauge().now(), 0);
        assert_eq!(b.gauge().peak(), 5000);
    }

    #[tokio::test]
    async fn a_dropped_ticket_leaves_the_queue_or_gives_its_grant_back() {
        let b = Budget::new(100, 100);
        let g = b.reserve(100).await;
        let t1 = b.reserve(80);
        let mut t2 = b.reserve(20);
        drop(t1);
        assert_eq!(b.waiting(), 1);
        drop(g);
        assert!(t2.is_granted());
        // Granted and never awaited: the bytes come back.
        drop(t2);
        let mut t3 = b.reserve(100);
        assert!(t3.is_granted());
        drop(t3);
        assert_eq!(b.reserve(100).now_or_never().map(|_| ()), Some(()));
    }

    #[tokio::test]
    async fn requests_are_capped_too_in_arrival_order() {
        // Bytes for a thousand one-byte requests, slots for two.
        let b = Budget::new(1000, 2);
        assert_eq!(b.requests(), 2);
        let g1 = b.reserve(1).await;
        let g2 = b.reserve(1).await;
        let mut t3 = b.reserve(1);
        let mut t4 = b.reserve(500);
        assert!(!t3.is_granted() && !t4.is_granted(), "no slot left");
        assert_eq!(b.waiting(), 2);
        assert_eq!(b.requests_gauge().now(), 2);
        drop(g1);
        assert!(t3.is_granted(), "the first in line takes the freed slot");
        assert!(!t4.is_granted(), "one slot freed, one granted");
        drop(g2);
        assert!(t4.is_granted());
        let (g3, g4) = (t3.await, t4.await);
        // A request waiting for bytes keeps its place: a slot freeing does not let the small
        // one behind it pass.
        let mut big = b.reserve(600);
        let mut small = b.reserve(1);
        drop(g3);
        assert!(!big.is_granted(), "600 bytes do not fit beside 500");
        assert!(
            !small.is_granted(),
            "a slot is free, but it came after the big one"
        );
        drop(g4);
        assert!(big.is_granted());
        assert!(small.is_granted(), "a byte and the second slot are left");
        drop((big, small));
        assert_eq!(b.requests_gauge().now(), 0);
        assert_eq!(b.requests_gauge().peak(), 2);
        assert_eq!(b.gauge().now(), 0);
    }

    #[tokio::test]
    async fn a_dropped_ticket_gives_its_slot_back() {
        let b = Budget::new(100, 1);
        let g = b.reserve(10).await;
        let t1 = b.reserve(10);
        let mut t2 = b.reserve(10);
        // Leaves the queue while waiting: the one behind it moves up.
        drop(t1);
        drop(g);
        assert!(t2.is_granted());
        // Granted, never awaited: the slot comes back with the bytes.
        drop(t2);
        assert!(
            b.reserve(100).now_or_never().is_some(),
            "slot and bytes free"
        );
        assert_eq!(b.requests_gauge().now(), 0);
    }

    /// Many tasks, each holding one grant at a time for a while (as a GET does), with sizes
    /// up to past the byte budget: all finish, and neither bytes nor requests ever exceed
    /// their caps (a request larger than the budget alone).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_holders_finish_within_both_caps() {
        let b = Budget::new(1000, 3);
        let tasks: Vec<_> = (0..64u64)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move {
                    for j in 0..20u64 {
                        let bytes = (i * 37 + j * 101) % 1200 + 1;
                        let g = b.reserve(bytes).await;
                        let (now, reqs) = (b.gauge().now(), b.requests_gauge().now());
                        assert!(now <= 1000 || now == bytes, "{now} bytes in flight");
                        assert!(reqs <= 3, "{reqs} requests in flight");
                        tokio::task::yield_now().await;
                        drop(g);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(b.requests_gauge().peak() <= 3);
        assert_eq!(b.requests_gauge().now(), 0);
        assert_eq!(b.gauge().now(), 0);
        assert_eq!(b.waiting(), 0);
    }

    #[tokio::test]
    async fn waiters_wake_when_their_turn_comes() {
        let b = Budget::new(10, 100);
        let g = b.reserve(10).await;
        let waiting: Vec<_> = (0..5)
            .map(|_| {
                let t = b.reserve(4);
                tokio::spawn(async move {
                    let _g = t.await;
                    tokio::task::yield_now().await;
                })
            })
            .collect();
        drop(g);
        for w in waiting {
            w.await.unwrap();
        }
        assert_eq!(b.gauge().now(), 0);
        assert!(b.gauge().peak() <= 10, "{}", b.gauge().peak());
    }
}
