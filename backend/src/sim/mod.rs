//! The simulated GPU: the daemon's default device.
//!
//! It stands in for hardware we do not have, so it behaves like hardware
//! where the layers above can tell:
//!
//! - every VM has its own four-level page tables ([`page_table`]); every
//!   access goes through a compute unit's TLB ([`tlb`]) or a page walk;
//! - an unmap clears the entries, shoots the TLBs down (a generation bump)
//!   and waits for accesses in flight, so guest pages can be reused as soon
//!   as it returns;
//! - compute queues run the protocol's kernel set on a pool of worker
//!   threads, one per compute unit, in *waves* of work items ([`kernels`]);
//! - waves are time-sliced: fair between VMs, weighted by queue priority
//!   within a VM ([`sched`]), and every dispatch has a watchdog on the
//!   device time it uses ([`vm`]);
//! - a wave that touches an unmapped or under-privileged page stalls and
//!   raises a *retry fault*, like amdgpu with XNACK on or NVIDIA UVM: faults
//!   are deduplicated per page, delivered in batches, and each ends exactly
//!   once, by a replay of the stalled waves or by cancelling their dispatch
//!   ([`vm`]);
//! - user-mode queues (protocol 1.1): a command processor thread (`cp.rs`)
//!   watches their doorbells in guest memory under a CPU budget
//!   ([`doorbell`]); a queue with work is a queue like any other for the
//!   scheduler ([`sched`]), and its slices run a copy engine (`sdma.rs`) or
//!   an AQL packet processor (`aql.rs`) on the compute units, every access
//!   through the VM exactly like a wave's (`gpu_access.rs`), faults
//!   included (`user_queue.rs`).
//!
//! Guest memory is touched only through vm-memory, so an address outside
//! guest RAM fails the work instead of reaching host memory.

mod aql;
mod cp;
pub mod doorbell;
mod gpu_access;
pub mod kernels;
pub mod page_table;
pub mod sched;
mod sdma;
pub mod tlb;
mod user_queue;
pub mod vm;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::device::{Device, DeviceError, DeviceInfo, DeviceVm, VmConfig, VmEvents};
use crate::poll::PollBudget;
use cp::CommandProcessor;
use guest_proto::QueueId;
use guest_proto::kernel::ALL_KERNELS_MASK;
use sched::{Key, Scheduler};
use user_queue::UserQueue;
use vm::{SimVm, Wave};

/// Settings of the simulated GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// Compute units, one worker thread each.
    pub compute_units: usize,
    /// Waves of one dispatch that may be in flight (running or stalled on a
    /// fault) at once.
    pub max_waves_per_dispatch: u32,
    /// Queues one VM may have.
    pub max_queues_per_vm: u32,
    /// Longest a wave runs before it goes back to the scheduler (a step in
    /// progress, at most a page per array, always completes). Default 1 ms:
    /// short against a guest's poll interval and a fault round trip's
    /// budget, long against the cost of a switch (a lock and a queue
    /// operation, well under a microsecond).
    pub time_slice: Duration,
    /// The watchdog: most device time one dispatch may use (see [`vm`] for
    /// what counts); `None` disables it. Default 10 s, amdgpu's job timeout
    /// under SR-IOV and passthrough (`lockup_timeout`), where one tenant's
    /// job must not hold a shared GPU for long; it is also the protocol's
    /// default fault timeout, so the two ways a dispatch can hang end alike.
    /// Every kernel of the protocol finishes far sooner on any buffer a
    /// guest can bind (a 1 GiB `FILL` takes well under a second), so only a
    /// runaway dispatch — typically a `POINTER_CHASE` around a cycle — hits
    /// it.
    pub dispatch_timeout: Option<Duration>,
}

/// [`SimConfig::time_slice`]'s default.
pub const DEFAULT_TIME_SLICE: Duration = Duration::from_millis(1);
/// [`SimConfig::dispatch_timeout`]'s default.
pub const DEFAULT_DISPATCH_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            compute_units: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_waves_per_dispatch: 64,
            max_queues_per_vm: 64,
            time_slice: DEFAULT_TIME_SLICE,
            dispatch_timeout: Some(DEFAULT_DISPATCH_TIMEOUT),
        }
    }
}

/// What a compute unit runs a slice of: a wave of a dispatch, or a user
/// queue (protocol 1.1) that has work. Both are scheduled alike.
pub(crate) enum Work {
    /// A wave.
    Wave(Wave),
    /// A user queue.
    Queue(Arc<UserQueue>),
}

impl Work {
    fn key(&self) -> Key {
        match self {
            Work::Wave(w) => w.key(),
            Work::Queue(q) => q.key(),
        }
    }
}

/// The work ready to run, shared by the compute units.
///
/// A compute unit that runs out of work polls for the next piece for a
/// while before it parks on the condition variable (spin-then-park, with
/// the adaptive budget of [`crate::poll`]): a fault's replay or the next
/// dispatch usually comes within microseconds while a guest is busy, and
/// waking a parked thread costs tens of them. At most one unit polls at a
/// time; the others park. A push wakes a parked unit only when no unit is
/// polling or more work waits than the polling one can take.
pub(crate) struct Pool {
    sched: Mutex<Scheduler<Work>>,
    wakeup: Condvar,
    stop: AtomicBool,
    /// Pieces of work in the scheduler; written under its lock, read
    /// without it by the polling unit.
    queued: AtomicUsize,
    /// A compute unit is polling; written under the scheduler's lock.
    polling: AtomicBool,
}

impl Pool {
    pub(crate) fn push(&self, wave: Wave) {
        self.push_work(Work::Wave(wave));
    }

    /// Makes a user queue's next slice ready.
    pub(crate) fn push_queue(&self, queue: Arc<UserQueue>) {
        self.push_work(Work::Queue(queue));
    }

    /// Makes several user queues' next slices ready under one hold of the
    /// lock (the command processor's tick).
    pub(crate) fn push_queues(&self, queues: Vec<Arc<UserQueue>>) {
        let n = queues.len();
        {
            let mut sched = self.sched.lock();
            for q in queues {
                let work = Work::Queue(q);
                let key = work.key();
                sched.push(key, work);
            }
            self.queued.fetch_add(n, Ordering::AcqRel);
        }
        match n {
            0 => {}
            1 => {
                self.wakeup.notify_one();
            }
            _ => {
                self.wakeup.notify_all();
            }
        }
    }

    fn push_work(&self, work: Work) {
        let key = work.key();
        let wake = {
            let mut sched = self.sched.lock();
            sched.push(key, work);
            let queued = self.queued.fetch_add(1, Ordering::AcqRel) + 1;
            !self.polling.load(Ordering::Acquire) || queued > 1
        };
        if wake {
            self.wakeup.notify_one();
        }
    }

    /// Charges a compute unit's last slice, queues its work again if it
    /// goes on, and takes the next work to run (polling for some within
    /// `poll`'s budget, then waiting), all under one hold of the lock
    /// (released while polling). `None` once the device stops.
    fn next(
        &self,
        charge: Option<(Key, u64)>,
        again: Option<Work>,
        poll: &mut PollBudget,
    ) -> Option<Work> {
        let mut sched = self.sched.lock();
        if let Some((key, ns)) = charge {
            sched.charge(key, ns);
        }
        if let Some(work) = again {
            let key = work.key();
            sched.push(key, work);
            self.queued.fetch_add(1, Ordering::AcqRel);
        }
        let idle_since = Instant::now();
        let mut polled = false;
        loop {
            if self.stop.load(Ordering::Acquire) {
                return None;
            }
            if let Some((_, w)) = sched.pop() {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                poll.observe(idle_since.elapsed());
                return Some(w);
            }
            let budget = poll.budget();
            if !polled && !budget.is_zero() && !self.polling.load(Ordering::Acquire) {
                polled = true;
                self.polling.store(true, Ordering::Release);
                MutexGuard::unlocked(&mut sched, || {
                    let mut round = 0u32;
                    while self.queued.load(Ordering::Acquire) == 0
                        && !self.stop.load(Ordering::Acquire)
                        && idle_since.elapsed() < budget
                    {
                        crate::poll::relax(&mut round);
                    }
                });
                self.polling.store(false, Ordering::Release);
                continue;
            }
            self.wakeup.wait(&mut sched);
        }
    }

    /// Forgets a destroyed queue, which has no wave left.
    pub(crate) fn forget_queue(&self, vm: u64, queue: QueueId) {
        self.sched.lock().forget_queue(vm, queue);
    }

    /// Forgets a released VM, which has no wave left.
    pub(crate) fn forget_vm(&self, vm: u64) {
        self.sched.lock().forget_vm(vm);
    }
}

/// The simulated GPU.
pub struct SimGpu {
    info: DeviceInfo,
    config: SimConfig,
    pool: Arc<Pool>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    next_vm: AtomicU64,
    cp: Arc<CommandProcessor>,
}

impl std::fmt::Debug for SimGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimGpu")
            .field("info", &self.info)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl SimGpu {
    /// Starts the compute units.
    pub fn new(config: SimConfig) -> Arc<SimGpu> {
        let config = SimConfig {
            compute_units: config.compute_units.max(1),
            max_waves_per_dispatch: config.max_waves_per_dispatch.max(1),
            time_slice: config.time_slice.max(Duration::from_micros(10)),
            ..config
        };
        let pool = Arc::new(Pool {
            sched: Mutex::new(Scheduler::new(
                u64::try_from(config.time_slice.as_nanos()).unwrap_or(u64::MAX),
            )),
            wakeup: Condvar::new(),
            stop: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            polling: AtomicBool::new(false),
        });
        let workers = (0..config.compute_units)
            .filter_map(|cu| {
                let pool = pool.clone();
                std::thread::Builder::new()
                    .name(format!("sim-cu{cu}"))
                    .spawn(move || vm::compute_unit(&pool, config))
                    .map_err(|e| log::error!("cannot start compute unit {cu}: {e}"))
                    .ok()
            })
            .collect();
        let info = DeviceInfo {
            name: "vhost-gpu-nc simulated GPU".into(),
            va_bits: page_table::VA_BITS as u8,
            page_sizes: 1 << guest_proto::PAGE_SHIFT,
            compute_units: u32::try_from(config.compute_units).unwrap_or(u32::MAX),
            max_queues_per_vm: config.max_queues_per_vm,
            kernels: ALL_KERNELS_MASK,
            recoverable_faults: true,
            user_queue_kinds: guest_proto::uq::USER_QUEUE_KINDS_ALL,
        };
        Arc::new(SimGpu {
            info,
            config,
            pool,
            workers: Mutex::new(workers),
            next_vm: AtomicU64::new(1),
            cp: CommandProcessor::start(),
        })
    }
}

impl Drop for SimGpu {
    fn drop(&mut self) {
        {
            // Under the lock: a compute unit between its check of `stop` and
            // its wait cannot miss the wakeup.
            let _sched = self.pool.sched.lock();
            self.pool.stop.store(true, Ordering::Release);
        }
        self.pool.wakeup.notify_all();
        for w in self.workers.lock().drain(..) {
            let _ = w.join();
        }
        self.cp.shutdown();
    }
}

impl Device for SimGpu {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn create_vm(
        &self,
        config: VmConfig,
        events: Arc<dyn VmEvents>,
    ) -> Result<Arc<dyn DeviceVm>, DeviceError> {
        let id = self.next_vm.fetch_add(1, Ordering::Relaxed);
        Ok(SimVm::new(
            id,
            config,
            events,
            self.pool.clone(),
            self.config,
            self.cp.clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::device::{DeviceFault, KernelLaunch, QueueDesc};
    use guest_proto::{DispatchStatus, GpuVa, GuestPhysAddr, Kernel, Perms};
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    #[derive(Default)]
    struct Done(Mutex<u64>, Condvar);

    impl VmEvents for Done {
        fn faults(&self, _: &[DeviceFault]) {}

        fn dispatch_done(&self, _: QueueId, _: u64, status: DispatchStatus) {
            assert_eq!(status, DispatchStatus::Ok);
            *self.0.lock() += 1;
            self.1.notify_all();
        }
    }

    /// Compute units poll for work before they park, and a push skips the
    /// wake-up while one polls: dispatches that come at every kind of
    /// distance from the last (within the polling budget, around its end,
    /// long after the units parked) all run, none waits for a wake-up that
    /// never comes.
    #[test]
    fn no_dispatch_is_lost_between_polling_and_parking() {
        let gpu = SimGpu::new(SimConfig {
            compute_units: 2,
            ..SimConfig::default()
        });
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
        );
        let events = Arc::new(Done::default());
        let config = VmConfig {
            memory: mem,
            max_pending_faults: 4,
            max_queue_depth: 4,
        };
        let vm = gpu.create_vm(config, events.clone()).unwrap();
        vm.map(GpuVa(0x10_0000), &[GuestPhysAddr(0x1000)], Perms::RW)
            .unwrap();
        let q = vm.create_queue(QueueDesc { priority: 3 }).unwrap();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for i in 0..3000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // 0 to ~250 us apart, now and then 1 ms: both sides of the
            // 100 us polling cap.
            let gap = if i % 97 == 0 { 1000 } else { x % 250 };
            std::thread::sleep(Duration::from_micros(gap));
            let launch = KernelLaunch {
                kernel: Kernel::Fill {
                    dst: GpuVa(0x10_0000),
                    count: 16,
                    value: 1,
                },
                completion: None,
                tag: i,
            };
            vm.dispatch(q, launch).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let mut done = events.0.lock();
            while *done <= i {
                let timed_out = events.1.wait_until(&mut done, deadline).timed_out();
                assert!(!timed_out, "dispatch {i} never ran (gap {gap} us)");
            }
        }
    }

    /// The scheduler's per-queue and per-VM state goes with the queue and
    /// the VM: a guest creating and destroying queues (and contexts) in a
    /// loop does not grow it.
    #[test]
    fn scheduler_state_goes_with_queues_and_vms() {
        let gpu = SimGpu::new(SimConfig {
            compute_units: 2,
            ..SimConfig::default()
        });
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
        );
        for round in 0..20u64 {
            let events = Arc::new(Done::default());
            let config = VmConfig {
                memory: mem.clone(),
                max_pending_faults: 4,
                max_queue_depth: 4,
            };
            let vm = gpu.create_vm(config, events.clone()).unwrap();
            vm.map(GpuVa(0x10_0000), &[GuestPhysAddr(0x1000)], Perms::RW)
                .unwrap();
            for i in 0..20u64 {
                let q = vm.create_queue(QueueDesc { priority: 3 }).unwrap();
                let launch = KernelLaunch {
                    kernel: Kernel::Fill {
                        dst: GpuVa(0x10_0000),
                        count: 1024,
                        value: 1,
                    },
                    completion: None,
                    tag: i,
                };
                vm.dispatch(q, launch).unwrap();
                let mut done = events.0.lock();
                while *done <= i {
                    events.1.wait(&mut done);
                }
                drop(done);
                vm.destroy_queue(q).unwrap();
                // A queue that never ran anything.
                let idle = vm.create_queue(QueueDesc { priority: 0 }).unwrap();
                vm.destroy_queue(idle).unwrap();
                let (_, queues) = gpu.pool.sched.lock().entities();
                assert_eq!(queues, 0, "round {round}, queue {i}");
            }
            drop(vm);
            // The VM goes when its last wave does, which a compute unit
            // may still hold for a moment.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while gpu.pool.sched.lock().entities() != (0, 0) {
                assert!(std::time::Instant::now() < deadline, "round {round}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
