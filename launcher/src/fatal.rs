//! A fatal signal sent to a worker kills it, the first time.
//!
//! Rust's runtime installs SIGSEGV and SIGBUS handlers (to report a stack
//! overflow as such) that, for any fault outside a guard page, reset the
//! signal to its default action and return: for a real fault the faulting
//! instruction runs again and the process dies, but a signal *sent* by
//! `kill -SEGV` (a test, an operator, a watchdog) has no faulting
//! instruction, so the worker just goes on, and only a second one kills it.
//!
//! [`default_for_sent_signals`] puts a handler in front that tells the two
//! apart by `si_code`: a signal sent by a process (`SI_USER`, `SI_TKILL`,
//! `SI_QUEUE`: codes <= 0) gets the default action at once (the process
//! dies with it, and dumps core if the host is set to); a real fault goes
//! to the handler that was there before (Rust's stack-overflow report).

use std::sync::atomic::{AtomicBool, Ordering};

const SIGNALS: [libc::c_int; 2] = [libc::SIGSEGV, libc::SIGBUS];

/// The handlers that were installed before ours, by index in `SIGNALS`.
static mut PREVIOUS: [Option<libc::sigaction>; 2] = [None, None];
static INSTALLED: AtomicBool = AtomicBool::new(false);

fn index_of(sig: libc::c_int) -> Option<usize> {
    SIGNALS.iter().position(|&s| s == sig)
}

/// Back to the default action for `sig`; the signal, blocked while its
/// handler runs, is raised again and delivered when the handler returns.
///
/// # Safety
/// Async-signal-safe: sigaction and raise only.
unsafe fn die_by(sig: libc::c_int) {
    // SAFETY: a zeroed sigaction with SIG_DFL is a valid argument.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
        libc::raise(sig);
    }
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let code = if info.is_null() {
        0
    } else {
        unsafe { (*info).si_code }
    };
    // SAFETY: PREVIOUS is written once, before this handler is installed.
    let previous = index_of(sig).and_then(|i| unsafe { (*std::ptr::addr_of!(PREVIOUS))[i] });
    match previous {
        Some(prev) if code > 0 => {
            let action = prev.sa_sigaction;
            if action == libc::SIG_DFL || action == libc::SIG_IGN {
                // SAFETY: async-signal-safe.
                unsafe { die_by(sig) };
            } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed for this signal
                // with SA_SIGINFO, so it takes these three arguments.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(action) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a handler installed without SA_SIGINFO takes the signal only.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(action) };
                f(sig);
            }
        }
        // SAFETY: async-signal-safe.
        _ => unsafe { die_by(sig) },
    }
}

/// Installs the handler for SIGSEGV and SIGBUS (once per process; call it
/// first thing in `main`, before any thread starts).
pub fn default_for_sent_signals() {
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return;
    }
    for (i, &sig) in SIGNALS.iter().enumerate() {
        // SAFETY: sigaction with valid pointers; PREVIOUS is written before
        // the handler that reads it is installed, and never again.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            (*std::ptr::addr_of_mut!(PREVIOUS))[i] = Some(old);
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = handler as *const () as usize;
            // On the alternate stack Rust set up (a stack overflow leaves
            // no room on the normal one).
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut new.sa_mask);
            libc::sigaction(sig, &new, std::ptr::null_mut());
        }
    }
}
