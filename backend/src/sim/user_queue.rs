//! User-mode queues of one simulated VM (protocol 1.1, section 14).
//!
//! A user queue is a ring in guest memory that the device reads itself.
//! This module holds what the two engines share: the queue (its geometry,
//! its scheduling state, the engine state behind an execution lock), a
//! slice of execution, the status block written when the queue stops, the
//! queue's place in the VM's fault unit, and destruction.
//!
//! # Scheduling
//! A queue with work (or due for a look at its doorbell) is *queued* in
//! the compute units' scheduler (`sched.rs`) like a compute queue: keyed by
//! its VM, id and priority, its slices charged the device time they use,
//! so VMs share the device equally and a queue's priority weighs it
//! against the VM's other queues, user or compute. A slice runs on a
//! compute unit for at most one time slice, 64 packets or 1 MiB of data,
//! then goes back to the scheduler if there is more. A queue with nothing
//! to do is *idle*: the command processor (`cp.rs`) looks at it when the
//! doorbell budget says it is time ([`look`]) and queues it if it has work;
//! a kick queues it at once.
//!
//! # Locks and guarantees
//! - `exec` is held for a whole slice; every access of the queue to guest
//!   memory happens under it. Destroy sets `dead`, ends the queue's faults
//!   and then takes `exec`: when it returns, no slice runs and none will
//!   start, so the guest may free the queue's memory.
//! - `sched` is taken briefly, never while calling [`VmEvents`], pushing
//!   to the scheduler or taking the command processor's lock (the
//!   processor takes `sched` under its own lock while it looks for due
//!   queues). The state machine makes a queue be in the scheduler at most
//!   once and run on at most one compute unit.
//! - Faults: a slice that cannot translate an address ends; the queue is
//!   marked stalled *before* it joins the fault, so a reply that races the
//!   join still wakes it. Replay queues it; cancel records the stop, which
//!   the next slice writes (status block, interrupt).
//!
//! [`VmEvents`]: crate::device::VmEvents

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use guest_proto::uq::{QueueStatusBlock, QueueStopStatus, STATUS_STATE_OFFSET, UserQueueKind};
use guest_proto::{AccessFlags, DispatchStatus, GpuVa, QueueId};
use parking_lot::Mutex;
use vm_memory::{Bytes, GuestAddress};

use super::Pool;
use super::aql::AqlEngine;
use super::cp::CommandProcessor;
use super::doorbell;
use super::gpu_access::{self, Stop};
use super::sched::Key;
use super::sdma::SdmaEngine;
use super::tlb::Tlb;
use super::vm::VmShared;
use crate::device::{Interrupt, UserQueueCounters, UserQueueDesc};
use crate::histogram::LatencyHistogram;

/// Most packets one slice executes.
pub(crate) const SLICE_PACKETS: u32 = 64;
/// Most bytes of copy or fill data one slice moves.
pub(crate) const SLICE_BYTES: u64 = 1 << 20;

/// How a queue stands with the scheduler and the command processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunState {
    /// In the compute units' scheduler: a slice runs as soon as it is
    /// picked.
    Queued,
    /// A slice of it runs on a compute unit.
    Running,
    /// Nothing to do: the command processor queues it at `next_look`.
    Idle,
    /// Stalled on a fault: no look until the fault ends.
    Stalled,
    /// Stopped or destroyed: never again.
    Stopped,
}

/// A stop requested from outside a slice (a fault that ended badly).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StopRequest {
    status: QueueStopStatus,
    page: GpuVa,
    access: AccessFlags,
}

#[derive(Debug)]
pub(crate) struct Sched {
    pub(crate) state: RunState,
    pub(crate) next_look: Instant,
    last_progress: Option<Instant>,
    pending_stop: Option<StopRequest>,
    /// Kicked while running: look again right after the slice.
    kicked: bool,
    /// Its last slice ended waiting on memory (a poll, a barrier): work
    /// elsewhere in the VM may satisfy it.
    waiting: bool,
    /// The last moment the device knew the queue had no new work (a look
    /// that found none, or a later kick), until a packet completes: the
    /// start of the doorbell latency (`DeviceVm::doorbell_latency`).
    no_work_since: Option<Instant>,
}

impl Sched {
    /// Whether an idle queue is due for a look at `now`; if so it becomes
    /// `Running` (the command processor looks at it, see [`look`]).
    pub(crate) fn take_if_due(&mut self, now: Instant) -> bool {
        let due = self.state == RunState::Idle && self.next_look <= now;
        if due {
            self.state = RunState::Running;
            self.kicked = false;
        }
        due
    }
}

/// Everything a stop writes into the status block (14.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StopInfo {
    pub(crate) status: QueueStopStatus,
    pub(crate) fault_va: GpuVa,
    pub(crate) packet: u64,
    pub(crate) access: Option<AccessFlags>,
    pub(crate) detail: u64,
}

impl StopInfo {
    /// A stop for a packet or doorbell problem.
    pub(crate) fn packet(status: QueueStopStatus, packet: u64, detail: u64) -> StopInfo {
        StopInfo {
            status,
            fault_va: GpuVa(0),
            packet,
            access: None,
            detail,
        }
    }
}

/// How a slice ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SliceEnd {
    /// The slice's budget ran out; there may be more work.
    Budget,
    /// The doorbell says there is nothing to do.
    Idle,
    /// A packet waits for memory (a poll, a barrier, an unwritten slot, a
    /// packet the doorbell does not cover yet).
    Waiting,
    /// An access needs a page: a retry fault.
    Fault {
        /// The page.
        page: GpuVa,
        /// The access.
        access: AccessFlags,
    },
    /// The queue stops.
    Stop(StopInfo),
}

impl SliceEnd {
    /// The end for an access that did not happen, at packet `packet`.
    pub(crate) fn from_stop(stop: Stop, packet: u64) -> SliceEnd {
        match stop {
            Stop::Fault { page, access } => SliceEnd::Fault { page, access },
            Stop::Error(va) => SliceEnd::Stop(StopInfo {
                status: QueueStopStatus::DeviceError,
                fault_va: va,
                packet,
                access: None,
                detail: 0,
            }),
        }
    }
}

/// What a slice produced besides memory effects.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    pub(crate) interrupts: Vec<Interrupt>,
    pub(crate) packets: u64,
    pub(crate) copy_bytes: u64,
    pub(crate) doorbell_polls: u64,
    /// When the slice's first packet completed.
    pub(crate) first_done: Option<Instant>,
}

/// What an engine gets for one slice.
pub(crate) struct SliceCtx<'a> {
    pub(crate) vm: &'a VmShared,
    pub(crate) desc: &'a UserQueueDesc,
    pub(crate) queue: QueueId,
    pub(crate) tlb: &'a mut Tlb,
    pub(crate) out: Outbox,
    pub(crate) packets_left: u32,
    pub(crate) bytes_left: u64,
    /// When the VM was created: the device clock's zero.
    pub(crate) created: Instant,
    /// The end of the slice (the scheduler's time slice).
    pub(crate) deadline: Instant,
}

impl SliceCtx<'_> {
    /// Runs one step of memory accesses (see `gpu_access`).
    pub(crate) fn step<R>(&mut self, f: impl FnOnce(&mut super::kernels::Mmu<'_>) -> R) -> R {
        gpu_access::step(self.vm, self.tlb, f)
    }

    /// Loads the doorbell (counted).
    pub(crate) fn load_doorbell(&mut self) -> Result<u64, Stop> {
        self.out.doorbell_polls += 1;
        let va = self.desc.doorbell;
        self.step(|m| gpu_access::load_u64(m, va))
    }

    /// Stores the read pointer (release).
    pub(crate) fn store_rptr(&mut self, value: u64) -> Result<(), Stop> {
        let va = self.desc.rptr;
        self.step(|m| gpu_access::store_u64(m, va, value))
    }

    /// A packet completed.
    pub(crate) fn completed(&mut self) {
        if self.out.packets == 0 {
            self.out.first_done = Some(Instant::now());
        }
        self.out.packets += 1;
        self.packets_left = self.packets_left.saturating_sub(1);
    }

    /// The device clock: nanoseconds since the VM was created.
    pub(crate) fn clock_ns(&self) -> u64 {
        u64::try_from(self.created.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether the slice's budget is spent.
    pub(crate) fn spent(&self) -> bool {
        self.packets_left == 0 || self.bytes_left == 0 || Instant::now() >= self.deadline
    }
}

/// The steps of a packet processor (the SDMA engine, the AQL packet
/// processor), for the loop they share: [`run_packets`].
pub(crate) trait PacketEngine {
    /// A packet and how far it got.
    type Current: Copy;
    /// The packet in progress, if any.
    fn current(&mut self) -> &mut Option<Self::Current>;
    /// Reads the next packet from the ring, or says why there is none.
    fn fetch(&mut self, ctx: &mut SliceCtx<'_>) -> Result<Self::Current, SliceEnd>;
    /// Runs the packet on: `Some` when the slice ends before it finished.
    fn execute(cur: &mut Self::Current, ctx: &mut SliceCtx<'_>) -> Option<SliceEnd>;
    /// The packet finished: moves past it (`Some` if that stops the queue;
    /// the packet then stays current).
    fn retire(&mut self, cur: Self::Current, ctx: &mut SliceCtx<'_>) -> Option<SliceEnd>;
}

/// Runs packets until the slice's budget is spent, the queue is idle, a
/// packet waits, faults or stops the queue.
pub(crate) fn run_packets<E: PacketEngine>(engine: &mut E, ctx: &mut SliceCtx<'_>) -> SliceEnd {
    loop {
        if ctx.spent() {
            return SliceEnd::Budget;
        }
        let mut cur = match *engine.current() {
            Some(c) => c,
            None => match engine.fetch(ctx) {
                Ok(c) => c,
                Err(end) => return end,
            },
        };
        let end = E::execute(&mut cur, ctx);
        *engine.current() = Some(cur);
        if let Some(end) = end {
            return end;
        }
        if let Some(end) = engine.retire(cur, ctx) {
            return end;
        }
        *engine.current() = None;
        ctx.completed();
    }
}

/// The engine of a queue.
#[derive(Debug)]
pub(crate) enum Engine {
    Sdma(SdmaEngine),
    Aql(AqlEngine),
}

impl Engine {
    fn run(&mut self, ctx: &mut SliceCtx<'_>) -> SliceEnd {
        match self {
            Engine::Sdma(e) => e.run(ctx),
            Engine::Aql(e) => e.run(ctx),
        }
    }

    /// Whether a slice would find something to do: loads only (the
    /// doorbell, the awaited value or slot header), no effect. Anything
    /// unusual (a fault, a lying doorbell) counts as work: the slice deals
    /// with it.
    fn has_work(&mut self, ctx: &mut SliceCtx<'_>) -> bool {
        match self {
            Engine::Sdma(e) => e.has_work(ctx),
            Engine::Aql(e) => e.has_work(ctx),
        }
    }

    /// Where the queue is (the status block's `packet`).
    fn position(&self) -> u64 {
        match self {
            Engine::Sdma(e) => e.packet_position(),
            Engine::Aql(e) => e.packet_position(),
        }
    }
}

/// One user queue.
pub(crate) struct UserQueue {
    pub(crate) id: QueueId,
    pub(crate) desc: UserQueueDesc,
    vm_id: u64,
    vm: Weak<VmShared>,
    pub(crate) sched: Mutex<Sched>,
    exec: Mutex<Engine>,
    dead: AtomicBool,
    cp: Arc<CommandProcessor>,
    pool: Arc<Pool>,
}

impl std::fmt::Debug for UserQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserQueue")
            .field("id", &self.id)
            .field("desc", &self.desc)
            .finish_non_exhaustive()
    }
}

impl UserQueue {
    /// Whether the queue was destroyed.
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Whose queue it is, for the scheduler.
    pub(crate) fn key(&self) -> Key {
        Key {
            vm: self.vm_id,
            queue: self.id,
            priority: self.desc.priority,
        }
    }

    /// Puts the queue into the scheduler.
    pub(crate) fn push(self: &Arc<Self>) {
        self.pool.push_queue(self.clone());
    }

    /// The scheduler the queue's slices go to (one per GPU).
    pub(crate) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Queues the queue if it is idle or stalled (`from_stall`), or makes a
    /// running slice look again when it ends.
    fn wake(self: &Arc<Self>, from_stall: bool) {
        let push = {
            let mut s = self.sched.lock();
            match s.state {
                RunState::Idle => {
                    s.state = RunState::Queued;
                    if s.no_work_since.is_some() {
                        s.no_work_since = Some(Instant::now());
                    }
                    true
                }
                RunState::Stalled if from_stall => {
                    s.state = RunState::Queued;
                    true
                }
                RunState::Running => {
                    s.kicked = true;
                    false
                }
                RunState::Queued | RunState::Stalled | RunState::Stopped => false,
            }
        };
        if push {
            self.push();
        }
    }

    /// Makes the queue look at its doorbell at once (unless it is stalled
    /// or stopped).
    pub(crate) fn kick(self: &Arc<Self>) {
        self.wake(false);
    }

    /// The fault the queue stalled on ended with a replay.
    pub(crate) fn fault_replayed(self: &Arc<Self>) {
        self.wake(true);
    }

    /// The fault the queue stalled on ended badly: stop it (the next slice
    /// writes the status block).
    pub(crate) fn fault_cancelled(
        self: &Arc<Self>,
        status: DispatchStatus,
        page: GpuVa,
        access: AccessFlags,
    ) {
        let Some(status) = QueueStopStatus::from_dispatch(status) else {
            // Cancelled: the queue is being destroyed.
            return;
        };
        {
            let mut s = self.sched.lock();
            if s.state == RunState::Stopped {
                return;
            }
            s.pending_stop.get_or_insert(StopRequest {
                status,
                page,
                access,
            });
        }
        self.wake(true);
    }
}

/// The user queues of one VM and their counters.
#[derive(Debug)]
pub(crate) struct VmQueues {
    queues: Mutex<BTreeMap<QueueId, Arc<UserQueue>>>,
    packets: AtomicU64,
    copy_bytes: AtomicU64,
    doorbell_polls: AtomicU64,
    doorbell_latency: Mutex<LatencyHistogram>,
    created: Instant,
}

impl VmQueues {
    pub(crate) fn new() -> VmQueues {
        VmQueues {
            queues: Mutex::new(BTreeMap::new()),
            packets: AtomicU64::new(0),
            copy_bytes: AtomicU64::new(0),
            doorbell_polls: AtomicU64::new(0),
            doorbell_latency: Mutex::new(LatencyHistogram::default()),
            created: Instant::now(),
        }
    }

    /// How many user queues exist.
    pub(crate) fn len(&self) -> usize {
        self.queues.lock().len()
    }

    /// Whether `id` is a user queue.
    pub(crate) fn contains(&self, id: QueueId) -> bool {
        self.queues.lock().contains_key(&id)
    }

    /// The counters.
    pub(crate) fn counters(&self) -> UserQueueCounters {
        UserQueueCounters {
            packets: self.packets.load(Ordering::Relaxed),
            copy_bytes: self.copy_bytes.load(Ordering::Relaxed),
            doorbell_polls: self.doorbell_polls.load(Ordering::Relaxed),
        }
    }

    /// The doorbell-to-first-packet latencies so far.
    pub(crate) fn doorbell_latency(&self) -> LatencyHistogram {
        *self.doorbell_latency.lock()
    }

    /// Makes every queue look at its doorbell now.
    pub(crate) fn kick_all(&self) {
        let queues: Vec<Arc<UserQueue>> = self.queues.lock().values().cloned().collect();
        for q in queues {
            q.kick();
        }
    }

    /// Makes every queue except `except` whose packet waits on memory look
    /// again now: work of the VM just completed and may have written what
    /// it waits for. (Queues idle at their doorbell keep their budget.)
    pub(crate) fn wake_waiters(&self, except: Option<QueueId>) {
        let queues: Vec<Arc<UserQueue>> = self
            .queues
            .lock()
            .values()
            .filter(|q| Some(q.id) != except && q.sched.lock().waiting)
            .cloned()
            .collect();
        for q in queues {
            q.kick();
        }
    }

    /// The ids of every user queue.
    pub(crate) fn ids(&self) -> Vec<QueueId> {
        self.queues.lock().keys().copied().collect()
    }
}

/// Creates user queue `id` of `vm`, hands it to the command processor and
/// queues its first look (the guest may have rung the doorbell before the
/// queue existed).
pub(crate) fn create(
    vm: &Arc<VmShared>,
    cp: &Arc<CommandProcessor>,
    pool: &Arc<Pool>,
    id: QueueId,
    desc: UserQueueDesc,
) -> Arc<UserQueue> {
    let engine = match desc.kind {
        UserQueueKind::Sdma => Engine::Sdma(SdmaEngine::new()),
        UserQueueKind::Aql => Engine::Aql(AqlEngine::new()),
    };
    let now = Instant::now();
    let q = Arc::new(UserQueue {
        id,
        desc,
        vm_id: vm.id,
        vm: Arc::downgrade(vm),
        sched: Mutex::new(Sched {
            state: RunState::Queued,
            next_look: now,
            last_progress: None,
            pending_stop: None,
            kicked: false,
            waiting: false,
            no_work_since: None,
        }),
        exec: Mutex::new(engine),
        dead: AtomicBool::new(false),
        cp: cp.clone(),
        pool: pool.clone(),
    });
    vm.user_queues.queues.lock().insert(id, q.clone());
    cp.register(q.clone());
    q.push();
    q
}

/// Destroys user queue `id`; false if `vm` has no such user queue. Returns
/// when the queue makes no further access.
pub(crate) fn destroy(vm: &VmShared, id: QueueId) -> bool {
    let Some(q) = vm.user_queues.queues.lock().remove(&id) else {
        return false;
    };
    q.dead.store(true, Ordering::Release);
    q.sched.lock().state = RunState::Stopped;
    q.cp.unregister(&q);
    super::vm::forget_user_queue(vm, &q);
    // Waits for a slice in progress; none starts after `dead`.
    drop(q.exec.lock());
    // Its entry goes now, or when a stale one leaves the scheduler.
    q.pool.forget_queue(q.vm_id, q.id);
    true
}

/// A queue the scheduler handed out although it is gone: its scheduler
/// state goes too.
fn forget(q: &UserQueue) {
    q.pool.forget_queue(q.vm_id, q.id);
    if q.vm.strong_count() == 0 {
        q.pool.forget_vm(q.vm_id);
    }
}

/// Runs one slice of `q` on a compute unit, until `deadline` at most.
/// Returns whether the queue has more work and goes back to the scheduler
/// at once (the caller pushes it, with the slice's charge).
pub(crate) fn run_slice(q: &Arc<UserQueue>, tlb: &mut Tlb, deadline: Instant) -> bool {
    let Some(vm) = q.vm.upgrade() else {
        forget(q);
        return false;
    };
    {
        let mut s = q.sched.lock();
        if s.state != RunState::Queued || q.is_dead() {
            drop(s);
            forget(q);
            return false;
        }
        s.state = RunState::Running;
        s.kicked = false;
    }
    let mut ctx = SliceCtx {
        vm: &vm,
        desc: &q.desc,
        queue: q.id,
        tlb,
        out: Outbox::default(),
        packets_left: SLICE_PACKETS,
        bytes_left: SLICE_BYTES,
        created: vm.user_queues.created,
        deadline,
    };
    let end = {
        let mut engine = q.exec.lock();
        if q.is_dead() {
            return false;
        }
        let requested = q.sched.lock().pending_stop.take();
        let end = match requested {
            Some(r) => SliceEnd::Stop(StopInfo {
                status: r.status,
                fault_va: r.page,
                packet: engine.position(),
                access: Some(r.access),
                detail: 0,
            }),
            None => engine.run(&mut ctx),
        };
        if let SliceEnd::Stop(info) = end {
            write_status_block(&mut ctx, info);
            ctx.out.interrupts.push(Interrupt::QueueStopped {
                queue: q.id,
                status: info.status,
            });
        }
        end
    };
    let out = std::mem::take(&mut ctx.out);
    drop(ctx);
    let counters = &vm.user_queues;
    counters.packets.fetch_add(out.packets, Ordering::Relaxed);
    counters
        .copy_bytes
        .fetch_add(out.copy_bytes, Ordering::Relaxed);
    counters
        .doorbell_polls
        .fetch_add(out.doorbell_polls, Ordering::Relaxed);

    let now = Instant::now();
    let mut more = false;
    let mut idle_until = None;
    let mut latency = None;
    let stall = {
        let mut s = q.sched.lock();
        if out.packets > 0 {
            s.last_progress = Some(now);
            if let (Some(since), Some(done)) = (s.no_work_since.take(), out.first_done) {
                latency = Some(done.saturating_duration_since(since));
            }
        }
        let mut stall = None;
        // Destroy may have stopped it meanwhile.
        if s.state != RunState::Stopped {
            match end {
                SliceEnd::Budget => {
                    s.state = RunState::Queued;
                    more = true;
                }
                SliceEnd::Idle | SliceEnd::Waiting => {
                    s.waiting = end == SliceEnd::Waiting;
                    if matches!(end, SliceEnd::Idle) {
                        s.no_work_since = Some(now);
                    }
                    // Kicked (or stopped) during the slice: look again at once.
                    if s.kicked || s.pending_stop.is_some() {
                        s.state = RunState::Queued;
                        more = true;
                    } else {
                        s.state = RunState::Idle;
                        s.next_look = doorbell::next_look(q.cp.epoch(), now, s.last_progress);
                        idle_until = Some(s.next_look);
                    }
                }
                SliceEnd::Fault { page, access } => {
                    s.state = RunState::Stalled;
                    stall = Some((page, access));
                }
                SliceEnd::Stop(_) => s.state = RunState::Stopped,
            }
        }
        stall
    };
    if let Some(t) = idle_until {
        q.cp.notify_if_earlier(t);
    }
    if let Some(l) = latency {
        vm.user_queues.doorbell_latency.lock().observe(l);
    }
    for irq in out.interrupts {
        vm.events.interrupt(irq);
    }
    if out.packets > 0 {
        // A packet completing may satisfy another queue's poll or barrier.
        vm.user_queues.wake_waiters(Some(q.id));
    }
    if let Some((page, access)) = stall {
        super::vm::stall_user_queue(&vm, q, page, access);
    }
    more
}

/// The command processor's look at an idle queue that is due (state
/// `Running`, see [`Sched::take_if_due`]): loads its doorbell, or what its
/// waiting packet waits for, on the processor's own thread and TLB. If
/// there is work the queue becomes `Queued` and `true` says to push it to
/// the scheduler; otherwise it stays idle until its next look. Looking
/// here, rather than in a scheduled slice, keeps idle queues off the
/// compute units: one thread wake-up per budget period for all of them.
pub(crate) fn look(q: &Arc<UserQueue>, tlb: &mut Tlb) -> bool {
    let Some(vm) = q.vm.upgrade() else {
        return false;
    };
    let now = Instant::now();
    let busy = {
        let mut engine = q.exec.lock();
        if q.is_dead() {
            return false;
        }
        let mut ctx = SliceCtx {
            vm: &vm,
            desc: &q.desc,
            queue: q.id,
            tlb,
            out: Outbox::default(),
            packets_left: 0,
            bytes_left: 0,
            created: vm.user_queues.created,
            deadline: now,
        };
        let busy = engine.has_work(&mut ctx);
        vm.user_queues
            .doorbell_polls
            .fetch_add(ctx.out.doorbell_polls, Ordering::Relaxed);
        busy
    };
    let mut s = q.sched.lock();
    if s.state != RunState::Running {
        // Destroyed meanwhile.
        return false;
    }
    if busy || s.kicked || s.pending_stop.is_some() {
        s.state = RunState::Queued;
        true
    } else {
        s.state = RunState::Idle;
        s.next_look = doorbell::next_look(q.cp.epoch(), Instant::now(), s.last_progress);
        false
    }
}

/// Writes the status block (14.6) through the VM, without faulting: bytes
/// 4..64, then `state` with release ordering.
fn write_status_block(ctx: &mut SliceCtx<'_>, info: StopInfo) {
    log::debug!("user queue {:?} stopped: {info:?}", ctx.queue);
    let Some(va) = ctx.desc.status else {
        return;
    };
    let block = QueueStatusBlock {
        status: info.status,
        fault_va: info.fault_va,
        packet: info.packet,
        access: info.access,
        detail: info.detail,
    }
    .encode();
    let written = ctx.step(|m| {
        let at = m.translate(va.raw(), AccessFlags::WRITE).ok()?;
        let body = block.get(4..).unwrap_or_default();
        m.mem.write_slice(body, GuestAddress(at.0 + 4)).ok()?;
        let state = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        m.mem
            .store(
                state,
                GuestAddress(at.0 + STATUS_STATE_OFFSET),
                Ordering::Release,
            )
            .ok()
    });
    if written.is_none() {
        log::warn!(
            "user queue {:?}: status block at {va} is not mapped writable; not written",
            ctx.queue
        );
    }
}
