//! Aborting a communicator from another thread.
//!
//! A hung peer blocks a collective until its timeout (minutes). Whoever
//! learns first that a peer is gone (in a job, the coordinator's notice)
//! calls [`AbortHandle::abort`]: the flag it sets is read by the transport's
//! exchange loop on every pass (one load; nothing on the hot path makes a
//! system call for it), and the wakers the transport registered rouse a
//! wait that is blocked (an eventfd in the `poll(2)` set of the pipes, the
//! mailbox's condition variable of the in-process transport). The op in
//! flight fails with [`CommError::Aborted`](crate::CommError::Aborted) and
//! the communicator breaks as after any other error, telling its peers.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Rouses a transport's blocked wait.
type Waker = Box<dyn Fn() + Send + Sync>;

/// The state an [`AbortHandle`] shares with its communicator's transport.
#[derive(Default)]
pub(crate) struct AbortSignal {
    aborted: AtomicBool,
    /// Set once, before `aborted`.
    reason: OnceLock<String>,
    wakers: Mutex<Vec<Waker>>,
}

impl AbortSignal {
    /// Whether the communicator was aborted: one acquire load, for the hot
    /// loop.
    #[inline]
    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    /// The reason, once aborted.
    pub fn reason(&self) -> Option<&str> {
        if self.is_aborted() {
            self.reason.get().map(String::as_str)
        } else {
            None
        }
    }

    /// Registers what rouses the transport's blocked wait. A waker must not
    /// block for long and must be harmless once the transport is gone.
    pub fn on_abort(&self, waker: impl Fn() + Send + Sync + 'static) {
        self.wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(waker));
    }

    fn abort(&self, reason: &str) {
        if self.reason.set(reason.to_owned()).is_err() {
            return;
        }
        self.aborted.store(true, Ordering::Release);
        for wake in self.wakers.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            wake();
        }
    }
}

/// Makes a [`Communicator`](crate::Communicator)'s op in flight, on
/// whatever thread it runs, fail promptly with
/// [`CommError::Aborted`](crate::CommError::Aborted), and every later op
/// too; from [`Communicator::abort_handle`](crate::Communicator::abort_handle).
///
/// For a peer that is known to be gone (a failure notice from the job's
/// coordinator): instead of waiting out the op timeout on it, the
/// communicator breaks at once and tells its peers (those waiting on this
/// rank then fail with `PeerAborted`). It tells them when it notices the
/// abort: in the op in flight, or at the next op if none is.
#[derive(Clone)]
pub struct AbortHandle {
    signal: Arc<AbortSignal>,
}

impl AbortHandle {
    pub(crate) fn new(signal: Arc<AbortSignal>) -> Self {
        AbortHandle { signal }
    }

    /// Aborts the communicator with `reason` (carried by the error of the op
    /// in flight, or of the next one). Idempotent: the first reason stays.
    /// Harmless once the communicator is dropped.
    pub fn abort(&self, reason: &str) {
        self.signal.abort(reason);
    }

    /// Whether [`AbortHandle::abort`] was called.
    pub fn is_aborted(&self) -> bool {
        self.signal.is_aborted()
    }
}

impl fmt::Debug for AbortHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AbortHandle")
            .field("reason", &self.signal.reason())
            .finish()
    }
}
