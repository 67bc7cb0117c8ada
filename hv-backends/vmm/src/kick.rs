//! Kicking the vCPU thread out of KVM_RUN at a deadline (the paravirtual timer).
//!
//! A helper thread sleeps until the deadline and sends a real-time signal to the vCPU thread;
//! KVM_RUN then returns EINTR. A signal that lands just before KVM_RUN is entered is lost, so
//! the helper repeats the kick every millisecond until the vCPU moves the deadline.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Make [`kick`] interrupt KVM_RUN (a handler, so the signal does not kill the process).
pub fn install() -> std::io::Result<()> {
    register_signal_handler(SIGRTMIN(), noop).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Interrupt `thread`'s KVM_RUN now (async-signal-safe). [`install`] must have run.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: pthread_kill with a valid signal; a thread that has exited is reported, not UB,
    // for threads of this process that are still joinable (the vCPU thread runs the VM).
    unsafe { libc::pthread_kill(thread, SIGRTMIN()) };
}

struct State {
    deadline: Option<Instant>,
    stop: bool,
}

pub struct Kicker {
    state: Arc<(Mutex<State>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Kicker {
    /// A kicker aimed at the calling thread.
    pub fn for_current_thread() -> std::io::Result<Kicker> {
        install()?;
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let state = Arc::new((Mutex::new(State { deadline: None, stop: false }), Condvar::new()));
        let s = state.clone();
        let thread = std::thread::Builder::new().name("previrt-kick".into()).spawn(move || {
            let (m, cv) = &*s;
            let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
            while !g.stop {
                match g.deadline {
                    None => g = cv.wait(g).unwrap_or_else(|e| e.into_inner()),
                    Some(d) => {
                        let now = Instant::now();
                        if d > now {
                            g = cv.wait_timeout(g, d - now).unwrap_or_else(|e| e.into_inner()).0;
                        } else {
                            // The target thread outlives the kicker (joined in Drop).
                            kick(target);
                            g = cv.wait_timeout(g, Duration::from_millis(1)).unwrap_or_else(|e| e.into_inner()).0;
                        }
                    }
                }
            }
        })?;
        Ok(Kicker { state, thread: Some(thread) })
    }

    /// Kick at `deadline` (None: never).
    pub fn set(&self, deadline: Option<Instant>) {
        let (m, cv) = &*self.state;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        if g.deadline != deadline {
            g.deadline = deadline;
            cv.notify_one();
        }
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        {
            let (m, cv) = &*self.state;
            m.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
            cv.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
