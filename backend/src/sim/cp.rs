//! The command processor: the thread that watches the doorbells of every
//! idle user queue of the simulated GPU (protocol 1.1, 14.11).
//!
//! There is no MMIO here, so nothing tells the device that a guest stored
//! to a doorbell. A queue with nothing to do is *idle*; when the doorbell
//! budget ([`doorbell`]) says it is time, this thread *looks* at it (loads
//! the doorbell, or what its waiting packet waits for; no effect) on its
//! own TLB, through the VM's page tables like any access. A queue with
//! work goes to the compute units' scheduler, where its slices compete
//! with every other queue's (`sched.rs`); the rest stay idle. Every idle
//! queue shares one grid of look times, so the thread wakes once per
//! period whatever the number of queues, and idle queues never reach the
//! compute units.
//!
//! [`doorbell`]: super::doorbell

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use super::tlb::Tlb;
use super::user_queue::{self, UserQueue};

#[derive(Default)]
struct State {
    queues: Vec<Arc<UserQueue>>,
    stop: bool,
}

/// [`CommandProcessor::sleep_until`] while the thread is awake or sleeps
/// without a deadline.
const AWAKE: u64 = 0;

/// The command processor shared by every VM of a simulated GPU.
pub(crate) struct CommandProcessor {
    state: Mutex<State>,
    wakeup: Condvar,
    epoch: Instant,
    /// Nanoseconds after `epoch` the thread sleeps until, or [`AWAKE`]:
    /// lets a compute unit skip the lock when a queue it made idle is due
    /// no earlier than the thread looks anyway (the common case: every
    /// idle queue is on the same grid).
    sleep_until: AtomicU64,
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
            sleep_until: AtomicU64::new(AWAKE),
            thread: Mutex::new(None),
        });
        let worker = cp.clone();
        let ready = Arc::new(std::sync::Barrier::new(2));
        let started = ready.clone();
        match std::thread::Builder::new()
            .name("sim-cp".into())
            .spawn(move || {
                // Its timeouts are as precise as the creating thread's
                // timer slack, which this thread inherits: the daemon sets
                // 1 us before it creates the device (the default 50 us
                // would double the hot doorbell period).
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

    fn ns(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// A queue became idle until `t` (its state is already `Idle`): wakes
    /// the thread if it would sleep past that. The thread clears
    /// `sleep_until` before it scans and sets it after, so a queue the scan
    /// missed always sees a value to compare with; the notification itself
    /// is under the lock, so the thread between its scan and its wait
    /// cannot miss it.
    pub(crate) fn notify_if_earlier(&self, t: Instant) {
        let until = self.sleep_until.load(Ordering::SeqCst);
        if until != AWAKE && self.ns(t) >= until {
            return;
        }
        let _state = self.state.lock();
        self.wakeup.notify_one();
    }

    pub(crate) fn register(&self, q: Arc<UserQueue>) {
        self.state.lock().queues.push(q);
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
        while let Some(due) = self.next_due() {
            // Look at each; the ones with work go to the scheduler at once.
            let busy: Vec<Arc<UserQueue>> = due
                .into_iter()
                .filter(|q| user_queue::look(q, &mut tlb))
                .collect();
            if let Some(first) = busy.first() {
                let pool = first.pool().clone();
                pool.push_queues(busy);
            }
        }
    }

    /// Waits until idle queues are due for a look; returns them (now
    /// `Running`: the processor looks at them), or `None` when it stops.
    fn next_due(&self) -> Option<Vec<Arc<UserQueue>>> {
        let mut st = self.state.lock();
        loop {
            if st.stop {
                return None;
            }
            self.sleep_until.store(AWAKE, Ordering::SeqCst);
            let now = Instant::now();
            let mut due = Vec::new();
            let mut earliest: Option<Instant> = None;
            for q in &st.queues {
                let mut s = q.sched.lock();
                if s.take_if_due(now) {
                    due.push(q.clone());
                } else if s.state == user_queue::RunState::Idle {
                    earliest = Some(earliest.map_or(s.next_look, |e| e.min(s.next_look)));
                }
            }
            if !due.is_empty() {
                return Some(due);
            }
            match earliest {
                Some(t) => {
                    self.sleep_until.store(self.ns(t), Ordering::SeqCst);
                    self.wakeup.wait_until(&mut st, t);
                }
                None => self.wakeup.wait(&mut st),
            }
        }
    }
}
