//! One simulated GPU VM: page tables, queues, dispatches and retry faults.
//!
//! # Translation and shootdown
//! A wave holds the VM's page-table lock for reading while it translates
//! *and* performs one step of memory accesses (at most a page worth).
//! `unmap` takes the lock for writing: that waits for every step in flight
//! (the drain), clears the entries and bumps the translation generation
//! (the TLB shootdown). When it returns, no access through the old
//! translations can happen any more.
//!
//! # Faults
//! A wave that cannot translate an address stalls and is parked on the
//! fault of that page. One fault per page: later waves hitting the same
//! page join it (access kinds are ORed, `merged` counts them). At most
//! `max_pending_faults` faults exist; waves faulting beyond that wait in an
//! overflow list and run again whenever a fault ends, so nothing is lost.
//! A fault ends exactly once, by [`DeviceVm::reply_fault`] or by queue /
//! VM teardown: replay puts its waves back on the compute units, cancel
//! fails their dispatches.
//!
//! # User queues
//! User-mode queues (`user_queue.rs`, run by the command processor in
//! `cp.rs`) take part in the same fault unit: a queue that cannot translate
//! an address waits on the page's fault next to any waves (one fault per
//! page, whoever faulted first), replay makes it ready again and cancel
//! stops it. Their ids come from the same space as the compute queues'.
//!
//! # Time slices and the watchdog
//! A wave runs for at most [`SimConfig::time_slice`] and then goes back to
//! the scheduler ([`super::sched`]), which shares the compute units fairly
//! between VMs and by priority between the queues of a VM; a step in
//! progress always completes, so a slice ends between steps, where a
//! replay could resume too.
//!
//! Every dispatch has a watchdog ([`SimConfig::dispatch_timeout`]). It
//! counts the dispatch's *device time*: wall-clock time during which at
//! least one of its waves is on a compute unit. Time waiting for a compute
//! unit (other work's slices) does not count, so a busy device never times
//! out a dispatch on behalf of someone else, and neither does time stalled
//! on faults: the guest's fault timeout bounds those. A dispatch past the
//! limit fails with [`DispatchStatus::WatchdogTimeout`]: its waves are
//! killed like a cancel's (waves on the compute units at the end of their
//! slice, stalled ones at once, faults only they waited on end), the
//! queue's next dispatch starts, and every other queue runs on. The
//! watchdog is checked at the end of every slice, so it fires at most one
//! slice late.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use guest_proto::signal::{SIGNAL_ERROR_VA_OFFSET, SIGNAL_STATUS_OFFSET};
use guest_proto::{
    AccessFlags, DispatchStatus, FaultId, GpuVa, GuestPhysAddr, PAGE_SIZE, Perms, QueueId,
};
use parking_lot::{Condvar, Mutex, RwLock};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use super::cp::CommandProcessor;
use super::kernels::{self, StepOutcome, WaveProgress};
use super::page_table::{PageTable, Pte};
use super::sched::{Key, MAX_PRIORITY};
use super::tlb::Tlb;
use super::user_queue::{self, UserQueue, VmQueues};
use super::{Pool, SimConfig, Work};
use crate::device::{
    Completion, DeviceError, DeviceFault, DeviceVm, FaultAction, GuestRam, KernelLaunch, QueueDesc,
    UserQueueCounters, UserQueueDesc, VmConfig, VmEvents,
};

/// How one dispatch is doing.
struct RunState {
    /// Next work item not yet given to a wave.
    next: u64,
    /// Waves running, ready or stalled.
    live: u32,
    /// The first error, with the faulting VA.
    error: Option<(DispatchStatus, GpuVa)>,
    finished: bool,
    /// Waves on a compute unit now.
    running: u32,
    /// Since when at least one wave has been on a compute unit.
    running_since: Option<Instant>,
    /// Device time of the intervals with a wave on a compute unit that
    /// have ended.
    device_time: Duration,
}

impl RunState {
    /// Marks the dispatch finished, once: its status and faulting VA the
    /// first time, `None` after.
    fn finish(&mut self) -> Option<(DispatchStatus, GpuVa)> {
        if std::mem::replace(&mut self.finished, true) {
            return None;
        }
        Some(self.error.unwrap_or((DispatchStatus::Ok, GpuVa(0))))
    }
}

/// A dispatch being executed.
pub(crate) struct DispatchRun {
    queue: QueueId,
    priority: u8,
    dispatch: KernelLaunch,
    total: u64,
    per_wave: u64,
    /// `state.error.is_some()`, readable without the lock (waves look at
    /// every step); set under the lock.
    failed: AtomicBool,
    state: Mutex<RunState>,
    done: Condvar,
}

impl DispatchRun {
    fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Records the dispatch's first error.
    fn set_error(&self, status: DispatchStatus, va: GpuVa) {
        let mut st = self.state.lock();
        if st.error.is_none() {
            st.error = Some((status, va));
            self.failed.store(true, Ordering::Release);
        }
    }

    /// A wave of the dispatch goes on a compute unit at `now`.
    fn slice_begins(&self, now: Instant) {
        let mut st = self.state.lock();
        if st.running == 0 {
            st.running_since = Some(now);
        }
        st.running += 1;
    }

    /// A wave of the dispatch leaves its compute unit at `now`; returns the
    /// dispatch's device time so far and, with `claim`, the next range of
    /// work items for the wave (under the same lock).
    fn slice_ends(&self, now: Instant, claim: bool) -> (Duration, Option<(u64, u64)>) {
        let mut st = self.state.lock();
        st.running = st.running.saturating_sub(1);
        let current = st
            .running_since
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
        let total = st.device_time.saturating_add(current);
        if st.running == 0 {
            st.device_time = total;
            st.running_since = None;
        }
        let next = if claim {
            Self::claim(&mut st, self.total, self.per_wave)
        } else {
            None
        };
        (total, next)
    }

    /// Claims the next range of work items for a wave.
    fn claim(state: &mut RunState, total: u64, per_wave: u64) -> Option<(u64, u64)> {
        if state.error.is_some() || state.next >= total {
            return None;
        }
        let start = state.next;
        let end = start.saturating_add(per_wave).min(total);
        state.next = end;
        Some((start, end))
    }
}

/// A unit of work: a range of a dispatch's work items and how far it got.
pub(crate) struct Wave {
    vm: Arc<VmShared>,
    run: Arc<DispatchRun>,
    progress: WaveProgress,
}

impl Wave {
    /// Whose wave it is, for the scheduler.
    pub(crate) fn key(&self) -> Key {
        Key {
            vm: self.vm.id,
            queue: self.run.queue,
            priority: self.run.priority,
        }
    }
}

/// A user queue stalled on a fault, with the access it needs.
struct UqWaiter {
    queue: Arc<UserQueue>,
    access: AccessFlags,
}

/// A fault and the waves (and user queues) stalled on it.
struct PendingFault {
    id: FaultId,
    access: AccessFlags,
    merged: u32,
    waiters: Vec<Wave>,
    uq_waiters: Vec<UqWaiter>,
}

#[derive(Default)]
struct FaultUnit {
    next_id: u64,
    by_page: HashMap<u64, PendingFault>,
    by_id: HashMap<FaultId, u64>,
    undelivered: Vec<DeviceFault>,
    overflow: Vec<Wave>,
    /// User queues that faulted while `max_pending_faults` were pending.
    uq_overflow: Vec<Arc<UserQueue>>,
}

struct QueueState {
    priority: u8,
    pending: VecDeque<KernelLaunch>,
    running: Option<Arc<DispatchRun>>,
}

#[derive(Default)]
struct Queues {
    map: BTreeMap<QueueId, QueueState>,
    next_id: u32,
}

/// State shared by the VM handle and its waves.
pub(crate) struct VmShared {
    pub(crate) id: u64,
    pub(crate) memory: GuestRam,
    pub(crate) events: Arc<dyn VmEvents>,
    config: VmConfig,
    sim: SimConfig,
    pool: Arc<Pool>,
    pub(crate) pt: RwLock<PageTable>,
    pub(crate) generation: AtomicU64,
    faults: Mutex<FaultUnit>,
    queues: Mutex<Queues>,
    shut_down: AtomicBool,
    /// The VM's user queues (1.1).
    pub(crate) user_queues: VmQueues,
    cp: Arc<CommandProcessor>,
}

/// A simulated GPU VM (the [`DeviceVm`] handle).
pub struct SimVm {
    shared: Arc<VmShared>,
}

impl std::fmt::Debug for SimVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimVm")
            .field("id", &self.shared.id)
            .finish()
    }
}

impl SimVm {
    pub(crate) fn new(
        id: u64,
        config: VmConfig,
        events: Arc<dyn VmEvents>,
        pool: Arc<Pool>,
        sim: SimConfig,
        cp: Arc<CommandProcessor>,
    ) -> Arc<SimVm> {
        Arc::new(SimVm {
            shared: Arc::new(VmShared {
                id,
                memory: config.memory.clone(),
                events,
                config,
                sim,
                pool,
                pt: RwLock::new(PageTable::default()),
                generation: AtomicU64::new(1),
                faults: Mutex::new(FaultUnit {
                    next_id: 1,
                    ..FaultUnit::default()
                }),
                queues: Mutex::new(Queues {
                    next_id: 1,
                    ..Queues::default()
                }),
                shut_down: AtomicBool::new(false),
                user_queues: VmQueues::new(),
                cp,
            }),
        })
    }

    fn check_live(&self) -> Result<(), DeviceError> {
        if self.shared.shut_down.load(Ordering::Acquire) {
            Err(DeviceError::Shutdown)
        } else {
            Ok(())
        }
    }

    /// Pages mapped in the page tables (for tests and statistics).
    pub fn mapped_pages(&self) -> u64 {
        self.shared.pt.read().mapped_pages()
    }
}

fn check_va_range(va: GpuVa, len: u64) -> Result<(), DeviceError> {
    if !va.is_page_aligned() {
        return Err(DeviceError::Misaligned {
            what: "va",
            value: va.raw(),
        });
    }
    if !len.is_multiple_of(PAGE_SIZE) {
        return Err(DeviceError::Misaligned {
            what: "length",
            value: len,
        });
    }
    match va.checked_add(len) {
        Some(end) if PageTable::in_range(GpuVa(end.raw().saturating_sub(1))) || len == 0 => Ok(()),
        _ => Err(DeviceError::VaOutOfRange { va, len }),
    }
}

impl DeviceVm for SimVm {
    fn map(&self, va: GpuVa, pages: &[GuestPhysAddr], perms: Perms) -> Result<(), DeviceError> {
        self.check_live()?;
        let len = (pages.len() as u64).saturating_mul(PAGE_SIZE);
        check_va_range(va, len)?;
        {
            let mem = self.shared.memory.memory();
            for p in pages {
                if !p.is_page_aligned() {
                    return Err(DeviceError::Misaligned {
                        what: "page",
                        value: p.raw(),
                    });
                }
                if !mem.check_range(GuestAddress(p.raw()), PAGE_SIZE as usize) {
                    return Err(DeviceError::NotGuestRam(*p));
                }
            }
        }
        let mut pt = self.shared.pt.write();
        for i in 0..pages.len() as u64 {
            let at = GpuVa(va.raw() + i * PAGE_SIZE);
            if pt.walk(at).is_valid() {
                return Err(DeviceError::AlreadyMapped(at));
            }
        }
        for (i, p) in pages.iter().enumerate() {
            pt.set(GpuVa(va.raw() + i as u64 * PAGE_SIZE), Pte::new(*p, perms));
        }
        Ok(())
    }

    fn unmap(&self, va: GpuVa, len: u64) -> Result<(), DeviceError> {
        self.check_live()?;
        check_va_range(va, len)?;
        // Taking the lock for writing drains every access step in flight.
        let mut pt = self.shared.pt.write();
        if pt.clear_range(va, len) > 0 {
            self.shared.generation.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    fn create_queue(&self, desc: QueueDesc) -> Result<QueueId, DeviceError> {
        self.check_live()?;
        let mut q = self.shared.queues.lock();
        if q.map.len() + self.shared.user_queues.len() >= self.shared.sim.max_queues_per_vm as usize
        {
            return Err(DeviceError::Limit("queues"));
        }
        let id = QueueId(q.next_id);
        q.next_id = q.next_id.wrapping_add(1).max(1);
        q.map.insert(
            id,
            QueueState {
                priority: desc.priority.min(MAX_PRIORITY),
                pending: VecDeque::new(),
                running: None,
            },
        );
        Ok(id)
    }

    fn destroy_queue(&self, queue: QueueId) -> Result<(), DeviceError> {
        self.check_live()?;
        if user_queue::destroy(&self.shared, queue) {
            return Ok(());
        }
        destroy_queue(&self.shared, queue)
    }

    fn dispatch(&self, queue: QueueId, dispatch: KernelLaunch) -> Result<(), DeviceError> {
        self.check_live()?;
        dispatch
            .kernel
            .validate()
            .map_err(|_| DeviceError::InvalidDispatch("kernel arguments"))?;
        if self.shared.user_queues.contains(queue) {
            return Err(DeviceError::WrongQueueKind(queue));
        }
        let start = {
            let mut q = self.shared.queues.lock();
            let state = q
                .map
                .get_mut(&queue)
                .ok_or(DeviceError::UnknownQueue(queue))?;
            let depth = state.pending.len() + usize::from(state.running.is_some());
            if depth >= self.shared.config.max_queue_depth as usize {
                return Err(DeviceError::Limit("queue depth"));
            }
            if state.running.is_none() {
                let run = new_run(queue, state.priority, dispatch);
                state.running = Some(run.clone());
                Some(run)
            } else {
                state.pending.push_back(dispatch);
                None
            }
        };
        if let Some(run) = start {
            start_run(&self.shared, &run);
        }
        Ok(())
    }

    fn reply_fault(&self, fault: FaultId, reply: FaultAction) -> Result<(), DeviceError> {
        let (pending, overflow, uq_overflow) = {
            let mut f = self.shared.faults.lock();
            let page = f
                .by_id
                .remove(&fault)
                .ok_or(DeviceError::UnknownFault(fault))?;
            let pending = f.by_page.remove(&page).map(|p| (page, p));
            if let (Some((page, p)), FaultAction::Cancel(status)) = (&pending, reply) {
                // Fail the dispatches before other waves can look: a wave of
                // theirs stalling after this must end, not raise a new fault
                // nobody will answer.
                for w in &p.waiters {
                    w.run.set_error(status, GpuVa(*page));
                }
            }
            (
                pending,
                std::mem::take(&mut f.overflow),
                std::mem::take(&mut f.uq_overflow),
            )
        };
        if let Some((page, p)) = pending {
            match reply {
                FaultAction::Replay => {
                    p.waiters.into_iter().for_each(|w| self.shared.pool.push(w));
                    p.uq_waiters.iter().for_each(|w| w.queue.fault_replayed());
                }
                FaultAction::Cancel(status) => {
                    for w in p.waiters {
                        fail_wave(w, status, GpuVa(page));
                    }
                    for w in p.uq_waiters {
                        w.queue.fault_cancelled(status, GpuVa(page), w.access);
                    }
                }
            }
        }
        overflow.into_iter().for_each(|w| self.shared.pool.push(w));
        uq_overflow.iter().for_each(|q| q.fault_replayed());
        Ok(())
    }

    fn create_user_queue(&self, desc: UserQueueDesc) -> Result<QueueId, DeviceError> {
        self.check_live()?;
        check_user_queue(&desc)?;
        let mut q = self.shared.queues.lock();
        if q.map.len() + self.shared.user_queues.len() >= self.shared.sim.max_queues_per_vm as usize
        {
            return Err(DeviceError::Limit("queues"));
        }
        let id = QueueId(q.next_id);
        q.next_id = q.next_id.wrapping_add(1).max(1);
        user_queue::create(&self.shared, &self.shared.cp, &self.shared.pool, id, desc);
        Ok(id)
    }

    fn kick(&self) {
        self.shared.user_queues.kick_all();
    }

    fn user_queue_counters(&self) -> UserQueueCounters {
        self.shared.user_queues.counters()
    }

    fn doorbell_latency(&self) -> crate::histogram::LatencyHistogram {
        self.shared.user_queues.doorbell_latency()
    }

    fn shutdown(&self) {
        if self.shared.shut_down.swap(true, Ordering::AcqRel) {
            return;
        }
        for q in self.shared.user_queues.ids() {
            user_queue::destroy(&self.shared, q);
        }
        let queues: Vec<QueueId> = self.shared.queues.lock().map.keys().copied().collect();
        for q in queues {
            let _ = destroy_queue(&self.shared, q);
        }
        let mut pt = self.shared.pt.write();
        pt.clear();
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for SimVm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Drop for VmShared {
    /// The last wave of the VM is gone too (waves hold the VM).
    fn drop(&mut self) {
        self.pool.forget_vm(self.id);
    }
}

fn new_run(queue: QueueId, priority: u8, dispatch: KernelLaunch) -> Arc<DispatchRun> {
    let (total, per_wave) = kernels::work_items(&dispatch.kernel);
    Arc::new(DispatchRun {
        queue,
        priority,
        dispatch,
        total,
        per_wave,
        failed: AtomicBool::new(false),
        state: Mutex::new(RunState {
            next: 0,
            live: 0,
            error: None,
            finished: false,
            running: 0,
            running_since: None,
            device_time: Duration::ZERO,
        }),
        done: Condvar::new(),
    })
}

/// Puts the first waves of a dispatch on the compute units.
///
/// The dispatch may have failed before it started: [`complete_run`] makes
/// the queue's next dispatch the running one and starts it after it let go
/// of the queue lock, and a [`destroy_queue`] in between cancels it. Then
/// no wave can be claimed and none would ever end it, so it completes here
/// (the destroying thread waits for exactly that).
fn start_run(vm: &Arc<VmShared>, run: &Arc<DispatchRun>) {
    let initial = (vm.sim.compute_units as u32 * 2).min(vm.sim.max_waves_per_dispatch);
    let mut waves = Vec::new();
    let ended_unstarted = {
        let mut st = run.state.lock();
        for _ in 0..initial {
            match DispatchRun::claim(&mut st, run.total, run.per_wave) {
                Some((start, end)) => {
                    st.live += 1;
                    waves.push(Wave {
                        vm: vm.clone(),
                        run: run.clone(),
                        progress: WaveProgress::new(&run.dispatch.kernel, start, end),
                    });
                }
                None => break,
            }
        }
        if st.live == 0 { st.finish() } else { None }
    };
    if let Some((status, va)) = ended_unstarted {
        complete_run(vm, run, status, va);
        return;
    }
    waves.into_iter().for_each(|w| vm.pool.push(w));
}

/// How a wave's time slice ended.
enum SliceEnd {
    /// The wave's range is done (or its dispatch failed).
    Finished,
    /// The slice is used up; the wave has more to do.
    Preempted,
    /// An address could not be translated.
    Fault { page: GpuVa, access: AccessFlags },
    /// The dispatch fails.
    Error(DispatchStatus, GpuVa),
}

/// A compute unit: runs waves, one time slice at a time, until the pool
/// stops. The time a slice used is charged, and a wave that goes on is
/// queued again, when the unit next takes the scheduler's lock for its
/// next wave: one lock round per slice.
pub(crate) fn compute_unit(pool: &Pool, config: SimConfig) {
    let mut tlb = Tlb::default();
    let mut charge = None;
    let mut again = None;
    let mut poll = crate::poll::PollBudget::new();
    while let Some(work) = pool.next(charge.take(), again.take(), &mut poll) {
        let mut wave = match work {
            Work::Wave(wave) => wave,
            Work::Queue(q) => {
                // A user queue's slice: scheduled and charged like a wave's.
                let start = Instant::now();
                let more = user_queue::run_slice(&q, &mut tlb, start + config.time_slice);
                let used = start.elapsed();
                charge = Some((q.key(), u64::try_from(used.as_nanos()).unwrap_or(u64::MAX)));
                again = more.then_some(Work::Queue(q));
                continue;
            }
        };
        let start = Instant::now();
        wave.run.slice_begins(start);
        let outcome = run_wave(&mut wave, &mut tlb, start + config.time_slice);
        let end = Instant::now();
        let finished = matches!(outcome, SliceEnd::Finished);
        let (device_time, next_range) = wave.run.slice_ends(end, finished);
        let used = end.saturating_duration_since(start);
        charge = Some((
            wave.key(),
            u64::try_from(used.as_nanos()).unwrap_or(u64::MAX),
        ));
        if config
            .dispatch_timeout
            .is_some_and(|limit| device_time > limit)
        {
            watchdog_expired(&wave, device_time);
        }
        match outcome {
            SliceEnd::Finished => match next_range {
                Some((first, last)) => {
                    wave.progress = WaveProgress::new(&wave.run.dispatch.kernel, first, last);
                    again = Some(Work::Wave(wave));
                }
                None => end_wave(wave),
            },
            SliceEnd::Preempted if wave.run.failed() => end_wave(wave),
            SliceEnd::Preempted => again = Some(Work::Wave(wave)),
            SliceEnd::Fault { page, access } => stall(wave, page, access),
            SliceEnd::Error(status, va) => fail_wave(wave, status, va),
        }
    }
}

/// Fails the wave's dispatch with `WatchdogTimeout` (unless it already
/// failed) and kills its stalled waves; its other waves end when they next
/// leave a compute unit or are picked.
fn watchdog_expired(wave: &Wave, device_time: Duration) {
    let vm = &wave.vm;
    {
        // Under the fault lock, like a cancel (see `stall`).
        let _faults = vm.faults.lock();
        if wave.run.failed() {
            return;
        }
        wave.run
            .set_error(DispatchStatus::WatchdogTimeout, GpuVa(0));
    }
    log::warn!(
        "VM {} queue {:?}: dispatch {} ran for {device_time:?} of device time, past the watchdog limit; killed",
        vm.id,
        wave.run.queue,
        wave.run.dispatch.tag
    );
    let run = wave.run.clone();
    take_stalled_waves(vm, |w| Arc::ptr_eq(&w.run, &run))
        .into_iter()
        .for_each(end_wave);
}

/// Steps between two looks at the clock in [`run_wave`]: reading it costs
/// tens of nanoseconds, a step (a page of each array, or 256 chase nodes)
/// 0.3 to 10 µs.
const STEPS_PER_CLOCK_CHECK: u32 = 8;

/// Runs a wave until it finishes, faults or fails, or `deadline` passes.
fn run_wave(wave: &mut Wave, tlb: &mut Tlb, deadline: Instant) -> SliceEnd {
    let vm = wave.vm.clone();
    let mut steps = 0u32;
    loop {
        if vm.shut_down.load(Ordering::Acquire) {
            return SliceEnd::Error(DispatchStatus::Cancelled, GpuVa(0));
        }
        if wave.run.failed() {
            return SliceEnd::Finished;
        }
        let pt = vm.pt.read();
        let generation = vm.generation.load(Ordering::Acquire);
        let mem = vm.memory.memory();
        let mut mmu = kernels::Mmu {
            vm: vm.id,
            generation,
            pt: &pt,
            tlb,
            mem: &mem,
        };
        match kernels::step(&wave.run.dispatch.kernel, &mut wave.progress, &mut mmu) {
            StepOutcome::Done if wave.progress.finished() => return SliceEnd::Finished,
            StepOutcome::Done => {}
            StepOutcome::Fault { page, access } => return SliceEnd::Fault { page, access },
            StepOutcome::Error(status, va) => return SliceEnd::Error(status, va),
        }
        drop(pt);
        steps = steps.wrapping_add(1);
        if steps.is_multiple_of(STEPS_PER_CLOCK_CHECK) && Instant::now() >= deadline {
            return SliceEnd::Preempted;
        }
    }
}

/// Parks a wave on the fault of `page`.
fn stall(wave: Wave, page: GpuVa, access: AccessFlags) {
    // A wave of a dispatch that already failed is killed, not parked: its
    // fault would never be answered.
    if wave.run.failed() {
        end_wave(wave);
        return;
    }
    let vm = wave.vm.clone();
    spawn_sibling(&wave);
    let mut f = vm.faults.lock();
    // Checked again under the fault lock, which a cancel holds while it
    // fails dispatches.
    if wave.run.failed() {
        drop(f);
        end_wave(wave);
        return;
    }
    // The page may have been mapped since the wave looked: run again.
    if vm.pt.read().walk(page).allows(access) {
        drop(f);
        vm.pool.push(wave);
        return;
    }
    if let Some(p) = f.by_page.get_mut(&page.raw()) {
        p.access = p.access.union(access);
        p.merged = p.merged.saturating_add(1);
        p.waiters.push(wave);
        return;
    }
    if f.by_page.len() >= vm.config.max_pending_faults as usize {
        f.overflow.push(wave);
        return;
    }
    let id = FaultId(f.next_id);
    f.next_id += 1;
    let queue = wave.run.queue;
    f.by_page.insert(
        page.raw(),
        PendingFault {
            id,
            access,
            merged: 1,
            waiters: vec![wave],
            uq_waiters: Vec::new(),
        },
    );
    f.by_id.insert(id, page.raw());
    f.undelivered.push(DeviceFault {
        id,
        queue,
        va: page,
        access,
        merged: 1,
    });
    let batch = std::mem::take(&mut f.undelivered);
    drop(f);
    vm.events.faults(&batch);
}

/// While a wave waits for a fault, another one may start on the next range
/// of the dispatch (a GPU keeps its compute units busy the same way).
fn spawn_sibling(wave: &Wave) {
    let run = &wave.run;
    let claimed = {
        let mut st = run.state.lock();
        if st.live >= wave.vm.sim.max_waves_per_dispatch {
            None
        } else {
            let c = DispatchRun::claim(&mut st, run.total, run.per_wave);
            if c.is_some() {
                st.live += 1;
            }
            c
        }
    };
    if let Some((start, end)) = claimed {
        wave.vm.pool.push(Wave {
            vm: wave.vm.clone(),
            run: run.clone(),
            progress: WaveProgress::new(&run.dispatch.kernel, start, end),
        });
    }
}

/// Fails the wave's dispatch (first error wins) and ends the wave.
fn fail_wave(wave: Wave, status: DispatchStatus, va: GpuVa) {
    wave.run.set_error(status, va);
    end_wave(wave);
}

/// A wave is gone; the last one of a dispatch completes it.
fn end_wave(wave: Wave) {
    let finish = {
        let mut st = wave.run.state.lock();
        st.live = st.live.saturating_sub(1);
        let all_claimed = st.next >= wave.run.total || st.error.is_some();
        if st.live == 0 && all_claimed {
            st.finish()
        } else {
            None
        }
    };
    if let Some((status, va)) = finish {
        complete_run(&wave.vm, &wave.run, status, va);
    }
}

/// Writes the signal, reports the dispatch and starts the queue's next one.
fn complete_run(vm: &Arc<VmShared>, run: &Arc<DispatchRun>, status: DispatchStatus, va: GpuVa) {
    if let Some(c) = run.dispatch.completion {
        write_signal(vm, c, status, va);
    }
    vm.events.dispatch_done(run.queue, run.dispatch.tag, status);
    let next = {
        let mut q = vm.queues.lock();
        match q.map.get_mut(&run.queue) {
            Some(state) if state.running.as_ref().is_some_and(|r| Arc::ptr_eq(r, run)) => {
                state.running = None;
                match state.pending.pop_front() {
                    Some(d) if !vm.shut_down.load(Ordering::Acquire) => {
                        let next = new_run(run.queue, state.priority, d);
                        state.running = Some(next.clone());
                        Some(next)
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    };
    run.done.notify_all();
    if let Some(next) = next {
        start_run(vm, &next);
    }
    // A user queue may poll memory this dispatch wrote.
    vm.user_queues.wake_waiters(None);
}

/// Completes a dispatch that never started.
fn complete_unstarted(vm: &VmShared, queue: QueueId, d: &KernelLaunch, status: DispatchStatus) {
    if let Some(c) = d.completion {
        write_signal(vm, c, status, GpuVa(0));
    }
    vm.events.dispatch_done(queue, d.tag, status);
}

/// Writes a completion signal through the VM's page tables: the payload,
/// then `value` with release ordering.
fn write_signal(vm: &VmShared, c: Completion, status: DispatchStatus, error_va: GpuVa) {
    let pt = vm.pt.read();
    let pte = pt.walk(c.signal);
    if !pte.allows(AccessFlags::WRITE) || !c.signal.raw().is_multiple_of(8) {
        log::warn!("signal at {} is not mapped writable; not written", c.signal);
        return;
    }
    let addr = GuestAddress(pte.frame().raw() + c.signal.page_offset());
    let mem = vm.memory.memory();
    let mut payload = [0u8; 24];
    payload[..4].copy_from_slice(&(status as u32).to_le_bytes());
    let va_at = (SIGNAL_ERROR_VA_OFFSET - SIGNAL_STATUS_OFFSET) as usize;
    payload[va_at..va_at + 8].copy_from_slice(&error_va.raw().to_le_bytes());
    let ok = mem
        .write_slice(&payload, GuestAddress(addr.0 + SIGNAL_STATUS_OFFSET))
        .and_then(|()| mem.store(c.value, addr, Ordering::Release));
    if let Err(e) = ok {
        log::warn!("signal at {}: {e}", c.signal);
    }
}

/// Cancels a queue's work and ends the faults only it waited on; returns
/// when the queue is idle.
fn destroy_queue(vm: &Arc<VmShared>, queue: QueueId) -> Result<(), DeviceError> {
    let state = vm
        .queues
        .lock()
        .map
        .remove(&queue)
        .ok_or(DeviceError::UnknownQueue(queue))?;
    for d in &state.pending {
        complete_unstarted(vm, queue, d, DispatchStatus::Cancelled);
    }
    let Some(run) = state.running else {
        vm.pool.forget_queue(vm.id, queue);
        return Ok(());
    };
    {
        // Under the fault lock, like a cancel (see `stall`).
        let _faults = vm.faults.lock();
        run.set_error(DispatchStatus::Cancelled, GpuVa(0));
    }
    let stalled = take_stalled_waves(vm, |w| w.run.queue == queue);
    stalled.into_iter().for_each(end_wave);
    {
        let mut st = run.state.lock();
        while !st.finished {
            run.done.wait(&mut st);
        }
    }
    // No wave of the queue is left anywhere: the scheduler may forget it.
    vm.pool.forget_queue(vm.id, queue);
    Ok(())
}

/// Removes the waves `mine` selects from every fault (ending faults left
/// with none) and from the overflow list.
fn take_stalled_waves(vm: &VmShared, mine: impl Fn(&Wave) -> bool) -> Vec<Wave> {
    let mut f = vm.faults.lock();
    let mut taken = Vec::new();
    let mut ended = Vec::new();
    for (page, p) in f.by_page.iter_mut() {
        let (mine, others): (Vec<Wave>, Vec<Wave>) = p.waiters.drain(..).partition(&mine);
        p.waiters = others;
        taken.extend(mine);
        if p.waiters.is_empty() && p.uq_waiters.is_empty() {
            ended.push((*page, p.id));
        }
    }
    for (page, id) in ended {
        f.by_page.remove(&page);
        f.by_id.remove(&id);
    }
    let (mine, others): (Vec<Wave>, Vec<Wave>) =
        std::mem::take(&mut f.overflow).into_iter().partition(&mine);
    f.overflow = others;
    taken.extend(mine);
    taken
}

/// Device-side checks of a user queue's geometry (the codec checked the
/// wire form; the context checks the aperture).
fn check_user_queue(desc: &UserQueueDesc) -> Result<(), DeviceError> {
    use guest_proto::uq::{
        MAX_USER_RING_SIZE, MIN_USER_RING_SIZE, QUEUE_POINTER_ALIGN, STATUS_BLOCK_ALIGN,
        STATUS_BLOCK_SIZE, USER_RING_ALIGN,
    };
    let size = desc.ring_size;
    if !size.is_power_of_two() || !(MIN_USER_RING_SIZE..=MAX_USER_RING_SIZE).contains(&size) {
        return Err(DeviceError::InvalidDispatch("user queue ring size"));
    }
    let aligned = [
        ("ring", desc.ring.raw(), USER_RING_ALIGN),
        ("rptr", desc.rptr.raw(), QUEUE_POINTER_ALIGN),
        ("doorbell", desc.doorbell.raw(), QUEUE_POINTER_ALIGN),
        (
            "status",
            desc.status.map_or(0, GpuVa::raw),
            STATUS_BLOCK_ALIGN,
        ),
    ];
    for (what, value, align) in aligned {
        if value % align != 0 {
            return Err(DeviceError::Misaligned { what, value });
        }
    }
    let ranges = [
        (desc.ring, size),
        (desc.rptr, 8),
        (desc.doorbell, 8),
        (desc.status.unwrap_or(GpuVa(0)), STATUS_BLOCK_SIZE),
    ];
    for (va, len) in ranges {
        match va.checked_add(len) {
            Some(end) if PageTable::in_range(GpuVa(end.raw() - 1)) => {}
            _ => return Err(DeviceError::VaOutOfRange { va, len }),
        }
    }
    Ok(())
}

/// Parks user queue `q` on the fault of `page` (it was marked stalled
/// first), or makes it ready again if the page is mapped now.
pub(crate) fn stall_user_queue(
    vm: &Arc<VmShared>,
    q: &Arc<UserQueue>,
    page: GpuVa,
    access: AccessFlags,
) {
    let mut f = vm.faults.lock();
    // Checked under the fault lock, which destroy takes after setting it.
    if q.is_dead() {
        return;
    }
    if vm.pt.read().walk(page).allows(access) {
        drop(f);
        q.fault_replayed();
        return;
    }
    let waiter = UqWaiter {
        queue: q.clone(),
        access,
    };
    if let Some(p) = f.by_page.get_mut(&page.raw()) {
        p.access = p.access.union(access);
        p.merged = p.merged.saturating_add(1);
        p.uq_waiters.push(waiter);
        return;
    }
    if f.by_page.len() >= vm.config.max_pending_faults as usize {
        f.uq_overflow.push(q.clone());
        return;
    }
    let id = FaultId(f.next_id);
    f.next_id += 1;
    f.by_page.insert(
        page.raw(),
        PendingFault {
            id,
            access,
            merged: 1,
            waiters: Vec::new(),
            uq_waiters: vec![waiter],
        },
    );
    f.by_id.insert(id, page.raw());
    f.undelivered.push(DeviceFault {
        id,
        queue: q.id,
        va: page,
        access,
        merged: 1,
    });
    let batch = std::mem::take(&mut f.undelivered);
    drop(f);
    vm.events.faults(&batch);
}

/// Removes user queue `q` from every fault (ending faults left with no
/// waiter) and from the overflow list.
pub(crate) fn forget_user_queue(vm: &VmShared, q: &Arc<UserQueue>) {
    let mut f = vm.faults.lock();
    let mut ended = Vec::new();
    for (page, p) in f.by_page.iter_mut() {
        p.uq_waiters.retain(|w| !Arc::ptr_eq(&w.queue, q));
        if p.waiters.is_empty() && p.uq_waiters.is_empty() {
            ended.push((*page, p.id));
        }
    }
    for (page, id) in ended {
        f.by_page.remove(&page);
        f.by_id.remove(&id);
    }
    f.uq_overflow.retain(|x| !Arc::ptr_eq(x, q));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::sim::SimGpu;
    use guest_proto::{GuestPhysAddr, Kernel, Perms};
    use std::sync::mpsc;
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

    struct Quiet;

    impl VmEvents for Quiet {
        fn faults(&self, _: &[DeviceFault]) {}
        fn dispatch_done(&self, _: QueueId, _: u64, _: DispatchStatus) {}
    }

    /// A queue destroyed between the moment the previous dispatch's end
    /// made the next one the running one and the moment that one starts
    /// (the window in `complete_run`): the destroy used to wait forever for
    /// a dispatch no wave would ever end (the submit_stream fuzz target
    /// found it as a hang of the context's teardown).
    #[test]
    fn a_queue_destroyed_before_its_next_dispatch_starts_is_not_waited_for_forever() {
        let gpu = SimGpu::new(SimConfig {
            compute_units: 1,
            ..SimConfig::default()
        });
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
        );
        let config = VmConfig {
            memory: mem,
            max_pending_faults: 4,
            max_queue_depth: 4,
        };
        let vm = SimVm::new(
            1,
            config,
            Arc::new(Quiet),
            gpu.pool.clone(),
            gpu.config,
            gpu.cp.clone(),
        );
        vm.map(GpuVa(0x10_0000), &[GuestPhysAddr(0x1000)], Perms::RW)
            .unwrap();
        let q = vm.create_queue(QueueDesc { priority: 3 }).unwrap();
        let shared = vm.shared.clone();
        // What `complete_run` does under the queue lock: the next dispatch
        // becomes the running one (not started yet).
        let run = new_run(
            q,
            3,
            KernelLaunch {
                kernel: Kernel::Fill {
                    dst: GpuVa(0x10_0000),
                    count: 16,
                    value: 7,
                },
                completion: Some(Completion {
                    signal: GpuVa(0x10_0800),
                    value: 1,
                }),
                tag: 1,
            },
        );
        shared.queues.lock().map.get_mut(&q).unwrap().running = Some(run.clone());
        // The destroy comes in the window.
        let (tx, rx) = mpsc::channel();
        let destroyer = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                tx.send(destroy_queue(&shared, q)).unwrap();
            })
        };
        while shared.queues.lock().map.contains_key(&q) {
            std::thread::yield_now();
        }
        while !run.failed() {
            std::thread::yield_now();
        }
        // Then `complete_run` starts it.
        start_run(&shared, &run);
        let r = rx.recv_timeout(Duration::from_secs(5));
        assert!(matches!(r, Ok(Ok(()))), "the destroy did not return: {r:?}");
        destroyer.join().unwrap();
        let st = run.state.lock();
        assert!(st.finished);
        assert_eq!(st.error.map(|e| e.0), Some(DispatchStatus::Cancelled));
    }
}
