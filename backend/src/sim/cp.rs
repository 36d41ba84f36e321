//! The command processor: one thread that runs every user queue of the
//! simulated GPU (protocol 1.1, 14.11).
//!
//! Like a GPU's CP and SDMA engines it serves many queues: it looks at the
//! queues that are due (ready, or whose doorbell budget says it is time),
//! runs one bounded slice of each, highest priority first and round robin
//! among equals, and sleeps until the next queue is due or somebody kicks
//! it. A slice is at most [`SLICE_PACKETS`] packets or [`SLICE_BYTES`] of
//! copy data, so one long `COPY_LINEAR` never holds the other queues of
//! any VM back.
//!
//! [`SLICE_PACKETS`]: super::user_queue::SLICE_PACKETS
//! [`SLICE_BYTES`]: super::user_queue::SLICE_BYTES

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use super::tlb::Tlb;
use super::user_queue::{self, UserQueue};

/// Asks the kernel to wake this thread within a microsecond of its
/// timeouts: the default timer slack (50 us) would double the hot doorbell
/// period (`doorbell::HOT_PERIOD`). Failure only costs latency.
fn precise_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer and affects only the
    // calling thread's timer expiry; no memory is passed.
    let r = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0) };
    if r != 0 {
        log::debug!(
            "command processor: timer slack unchanged: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[derive(Default)]
struct State {
    queues: Vec<Arc<UserQueue>>,
    /// Rotates the start of each round among queues of equal priority.
    round: usize,
    stop: bool,
}

/// The command processor shared by every VM of a simulated GPU.
pub(crate) struct CommandProcessor {
    state: Mutex<State>,
    wakeup: Condvar,
    epoch: Instant,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for CommandProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandProcessor").finish_non_exhaustive()
    }
}

impl CommandProcessor {
    /// Starts the processor's thread; returns once the thread set itself
    /// up (its timer slack), so that happens before a sandbox goes on.
    pub(crate) fn start() -> Arc<CommandProcessor> {
        let cp = Arc::new(CommandProcessor {
            state: Mutex::new(State::default()),
            wakeup: Condvar::new(),
            epoch: Instant::now(),
            thread: Mutex::new(None),
        });
        let worker = cp.clone();
        let ready = Arc::new(std::sync::Barrier::new(2));
        let started = ready.clone();
        match std::thread::Builder::new()
            .name("sim-cp".into())
            .spawn(move || {
                precise_timers();
                started.wait();
                worker.run();
            }) {
            Ok(handle) => {
                ready.wait();
                *cp.thread.lock() = Some(handle);
            }
            Err(e) => log::error!("cannot start the command processor: {e}"),
        }
        cp
    }

    /// The grid origin of the doorbell budget.
    pub(crate) fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Wakes the thread to look for due queues.
    pub(crate) fn notify(&self) {
        // Under the lock: the thread between its scan and its wait cannot
        // miss this.
        let _state = self.state.lock();
        self.wakeup.notify_one();
    }

    pub(crate) fn register(&self, q: Arc<UserQueue>) {
        self.state.lock().queues.push(q);
        self.wakeup.notify_one();
    }

    pub(crate) fn unregister(&self, q: &Arc<UserQueue>) {
        self.state.lock().queues.retain(|x| !Arc::ptr_eq(x, q));
    }

    /// Stops the thread (the GPU goes away).
    pub(crate) fn shutdown(&self) {
        {
            let mut st = self.state.lock();
            st.stop = true;
            st.queues.clear();
        }
        self.wakeup.notify_all();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }

    fn run(&self) {
        let mut tlb = Tlb::default();
        loop {
            let Some(batch) = self.next_batch() else {
                return;
            };
            for q in batch {
                user_queue::run_slice(&q, &mut tlb);
            }
        }
    }

    /// Waits until queues are due; returns them in service order, or
    /// `None` when the processor stops.
    fn next_batch(&self) -> Option<Vec<Arc<UserQueue>>> {
        let mut st = self.state.lock();
        loop {
            if st.stop {
                return None;
            }
            let now = Instant::now();
            let mut due = Vec::new();
            let mut earliest: Option<Instant> = None;
            let n = st.queues.len();
            let start = if n == 0 { 0 } else { st.round % n };
            for i in 0..n {
                let Some(q) = st.queues.get((start + i) % n) else {
                    continue;
                };
                let mut s = q.sched.lock();
                if s.take_if_due(now) {
                    due.push(q.clone());
                } else if s.state == user_queue::RunState::Idle {
                    earliest = Some(earliest.map_or(s.next_look, |e| e.min(s.next_look)));
                }
            }
            if !due.is_empty() {
                st.round = st.round.wrapping_add(1);
                // Stable: equal priorities keep the rotated order.
                due.sort_by_key(|q| std::cmp::Reverse(q.desc.priority));
                return Some(due);
            }
            match earliest {
                Some(t) => {
                    self.wakeup.wait_until(&mut st, t);
                }
                None => self.wakeup.wait(&mut st),
            }
        }
    }
}
