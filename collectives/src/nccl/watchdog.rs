//! The NCCL communicator's watchdog thread, as PyTorch's ProcessGroupNCCL
//! keeps one: the communicator is blocking (each NCCL call returns once its
//! work is enqueued, with no helper thread and no polling), so a call that
//! blocks on a dead or stopped peer (NCCL connects lazily, on first use) can
//! only be ended from another thread. Before each call the communicator
//! arms a deadline; if the call is still in NCCL when it passes, the
//! watchdog aborts the communicator, the call returns an error, and the
//! communicator reports the timeout. Abort happens once, whoever asks first
//! (the watchdog, a failed call, or drop).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

/// What the watchdog does when a deadline passes: abort the communicator.
pub(super) type Abort = Box<dyn FnMut() + Send>;

struct State {
    /// The deadline of the call in flight, and its number.
    armed: Option<(Instant, u64)>,
    calls: u64,
    abort: Option<Abort>,
    /// Set once the communicator is aborted; and by whom.
    aborted: Option<Cause>,
    stop: bool,
}

/// Why the communicator was aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    /// The watchdog: a call outlived its deadline.
    Deadline,
    /// The communicator itself: an error, or drop.
    Owner,
}

pub(super) struct Watchdog {
    shared: Arc<(Mutex<State>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Watchdog {
    /// Starts the watchdog thread of a communicator that `abort` aborts.
    pub(super) fn start(name: String, abort: Abort) -> std::io::Result<Watchdog> {
        let shared = Arc::new((
            Mutex::new(State {
                armed: None,
                calls: 0,
                abort: Some(abort),
                aborted: None,
                stop: false,
            }),
            Condvar::new(),
        ));
        let theirs = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || watch(&theirs))?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    /// Runs `call` (one NCCL call) under `deadline`: the watchdog aborts
    /// the communicator if `call` has not returned by then. Returns what
    /// `call` returned, and whether the watchdog aborted during it.
    pub(super) fn guard<R>(&self, deadline: Instant, call: impl FnOnce() -> R) -> (R, bool) {
        let (m, cv) = &*self.shared;
        let id = {
            let mut s = lock(m);
            s.calls += 1;
            s.armed = Some((deadline, s.calls));
            cv.notify_all();
            s.calls
        };
        let result = call();
        let mut s = lock(m);
        if s.armed.is_some_and(|(_, c)| c == id) {
            s.armed = None;
        }
        (result, s.aborted == Some(Cause::Deadline))
    }

    /// Aborts the communicator now unless it already is; by whom it was.
    pub(super) fn abort(&self) -> Cause {
        let mut s = lock(&self.shared.0);
        abort_once(&mut s, Cause::Owner)
    }

    /// Whether (and by whom) the communicator has been aborted.
    #[cfg(test)]
    pub(super) fn aborted(&self) -> Option<Cause> {
        lock(&self.shared.0).aborted
    }
}

fn abort_once(s: &mut State, cause: Cause) -> Cause {
    if let Some(first) = s.aborted {
        return first;
    }
    if let Some(mut abort) = s.abort.take() {
        abort();
    }
    s.aborted = Some(cause);
    cause
}

fn watch(shared: &(Mutex<State>, Condvar)) {
    let (m, cv) = shared;
    let mut s = lock(m);
    loop {
        if s.stop || s.aborted.is_some() {
            return;
        }
        match s.armed {
            None => s = cv.wait(s).unwrap_or_else(|e| e.into_inner()),
            Some((deadline, _)) => {
                let now = Instant::now();
                if now >= deadline {
                    abort_once(&mut s, Cause::Deadline);
                    s.armed = None;
                } else {
                    s = cv
                        .wait_timeout(s, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        {
            let mut s = lock(&self.shared.0);
            s.stop = true;
            self.shared.1.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    fn counting() -> (Arc<AtomicUsize>, Abort) {
        let n = Arc::new(AtomicUsize::new(0));
        let m = Arc::clone(&n);
        (
            n,
            Box::new(move || {
                m.fetch_add(1, Ordering::SeqCst);
            }),
        )
    }

    #[test]
    fn a_call_that_returns_in_time_is_left_alone() {
        let (aborts, abort) = counting();
        let w = Watchdog::start("test-watchdog".into(), abort).unwrap();
        for _ in 0..100 {
            let (v, timed_out) = w.guard(Instant::now() + Duration::from_secs(5), || 7);
            assert_eq!((v, timed_out), (7, false));
        }
        drop(w);
        assert_eq!(aborts.load(Ordering::SeqCst), 0);
    }

    /// A call stuck past its deadline (a peer that never answers) is ended
    /// by the abort, from the watchdog's thread, and the caller is told.
    #[test]
    fn a_call_stuck_past_its_deadline_is_aborted_once() {
        let (tx, rx) = mpsc::channel::<()>();
        let aborts = Arc::new(AtomicUsize::new(0));
        let a = Arc::clone(&aborts);
        let w = Watchdog::start(
            "test-watchdog".into(),
            Box::new(move || {
                a.fetch_add(1, Ordering::SeqCst);
                let _ = tx.send(()); // what ncclCommAbort does to the stuck call
            }),
        )
        .unwrap();
        let started = Instant::now();
        let (got, timed_out) = w.guard(started + Duration::from_millis(50), || {
            rx.recv_timeout(Duration::from_secs(30))
        });
        assert!(got.is_ok(), "the stuck call was not released: {got:?}");
        assert!(timed_out);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(w.aborted(), Some(Cause::Deadline));
        // The owner's own abort afterwards is not a second ncclCommAbort.
        assert_eq!(w.abort(), Cause::Deadline);
        drop(w);
        assert_eq!(aborts.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_owners_abort_happens_once() {
        let (aborts, abort) = counting();
        let w = Watchdog::start("test-watchdog".into(), abort).unwrap();
        assert_eq!(w.abort(), Cause::Owner);
        assert_eq!(w.abort(), Cause::Owner);
        // A later deadline finds it aborted already.
        let ((), timed_out) = w.guard(Instant::now(), || {
            std::thread::sleep(Duration::from_millis(20))
        });
        assert!(!timed_out);
        drop(w);
        assert_eq!(aborts.load(Ordering::SeqCst), 1);
    }
}
