//! A bounded spin that keeps one CPU awake while FUSE requests keep coming (`--spin-us`).
//!
//! A tree walk is hundreds of thousands of FUSE round trips made one at a time. Each one
//! wakes the mount's FUSE thread, and on a VM whose other vCPU has halted, that wakeup goes
//! through the hypervisor and costs tens of microseconds: on the 2-core bench VM the same
//! remount `find` ran about three times faster with a busy loop on the other core than with
//! the machine idle. KVM hosts that poll before halting (GCE's) hide most of that cost; this
//! hides it where the host does not. While requests arrive less than `window` apart, a
//! thread spins (`std::hint::spin_loop`), so the CPU it runs on never halts; once no request
//! has come for `window`, it parks, so an idle mount uses no CPU. The cost is that CPU for
//! as long as requests keep coming, which `bench/run`'s metadata scenario reports next to
//! the time it saves; it is off by default.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// The spinning thread's shared state: when the last request came, and whether it is parked.
pub struct Spinner {
    epoch: Instant,
    /// Nanoseconds after `epoch` of the latest request.
    last: AtomicU64,
    parked: AtomicBool,
    stopped: AtomicBool,
    window: u64,
    thread: std::thread::Thread,
    /// The spinning thread's kernel id (for its CPU time in /proc).
    tid: std::sync::atomic::AtomicI32,
}

impl Spinner {
    /// Starts the thread (parked until the first request); `None` for a zero window.
    pub fn start(window: Duration) -> std::io::Result<Option<Arc<Spinner>>> {
        if window.is_zero() {
            return Ok(None);
        }
        let (tx, rx) = std::sync::mpsc::channel::<Arc<Spinner>>();
        let handle = std::thread::Builder::new()
            .name("physiofs-spin".into())
            .spawn(move || {
                if let Ok(s) = rx.recv() {
                    s.run();
                }
            })?;
        let s = Arc::new(Spinner {
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            parked: AtomicBool::new(true),
            stopped: AtomicBool::new(false),
            window: window.as_nanos().min(u64::MAX as u128) as u64,
            thread: handle.thread().clone(),
            tid: Default::default(),
        });
        let _ = tx.send(s.clone());
        Ok(Some(s))
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// A request arrived: keep spinning (or start again).
    #[inline]
    pub fn touch(&self) {
        self.last.store(self.now(), Relaxed);
        if self.parked.load(Relaxed) && self.parked.swap(false, Relaxed) {
            self.thread.unpark();
        }
    }

    fn run(&self) {
        // SAFETY: gettid has no preconditions.
        self.tid.store(unsafe { libc::gettid() }, Relaxed);
        while !self.stopped.load(Relaxed) {
            if self.parked.load(Relaxed) {
                std::thread::park();
                continue;
            }
            if self.now().saturating_sub(self.last.load(Relaxed)) > self.window {
                self.parked.store(true, Relaxed);
                // A request between the check and the store finds `parked` set and unparks
                // us (park returns at once if unpark came first); check again for one that
                // came just before the store.
                if self.now().saturating_sub(self.last.load(Relaxed)) <= self.window {
                    self.parked.store(false, Relaxed);
                }
                continue;
            }
            for _ in 0..64 {
                std::hint::spin_loop();
            }
        }
    }

    /// Ends the thread (at unmount).
    pub fn stop(&self) {
        self.stopped.store(true, Relaxed);
        self.thread.unpark();
    }

    /// Whether the thread is parked now (tests).
    pub fn is_parked(&self) -> bool {
        self.parked.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// utime + stime of the spinning thread, in seconds.
    fn cpu_s(s: &Spinner) -> f64 {
        let tid = s.tid.load(Relaxed);
        assert!(tid > 0);
        let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
        // SAFETY: sysconf has no preconditions.
        let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / tck
    }

    #[test]
    fn zero_window_starts_nothing() {
        assert!(Spinner::start(Duration::ZERO).unwrap().is_none());
    }

    #[test]
    fn spins_after_a_request_then_parks_and_uses_no_cpu_when_idle() {
        let s = Spinner::start(Duration::from_millis(20)).unwrap().unwrap();
        assert!(s.is_parked());
        s.touch();
        assert!(!s.is_parked());
        // It parks once no request has come for the window.
        let mut waited = 0;
        while !s.is_parked() {
            std::thread::sleep(Duration::from_millis(5));
            waited += 1;
            assert!(waited < 2000, "the spinner never parked");
        }
        // Parked, it uses no CPU; spinning, it does.
        let c0 = cpu_s(&s);
        std::thread::sleep(Duration::from_millis(500));
        let idle = cpu_s(&s) - c0;
        assert!(idle < 0.05, "{idle} s of CPU while parked");
        let s2 = Spinner::start(Duration::from_secs(3600)).unwrap().unwrap();
        s2.touch();
        while s2.tid.load(Relaxed) == 0 {
            std::thread::yield_now();
        }
        let c0 = cpu_s(&s2);
        while cpu_s(&s2) - c0 < 0.05 {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!s2.is_parked());
        s2.stop();
        s.stop();
        // And a new request wakes it.
        s.touch();
        assert!(!s.is_parked());
    }
}
