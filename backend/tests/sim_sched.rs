//! Scheduling on the simulated GPU through the `Device` trait: waves are
//! time-sliced, contexts (VMs) share the compute units fairly, queue
//! priority is honoured without starving low priorities, and the watchdog
//! ends a runaway dispatch while everything else runs on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use gpu_backend::device::QueueDesc;
use gpu_backend::sim::{SimConfig, SimGpu};
use gpu_backend::{
    Completion, Device, DeviceError, DeviceFault, DeviceVm, FaultAction, GuestRam, KernelLaunch,
    VmConfig, VmEvents,
};
use guest_proto::{DispatchStatus, GpuVa, GuestPhysAddr, Kernel, Perms, QueueId};
use parking_lot::{Condvar, Mutex};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

const RAM: u64 = 32 << 20;
const P: u64 = 4096;
const SIGNALS_VA: u64 = 0x8000_0000_0000;

/// Records faults and dispatch ends, the latter in the order they came.
#[derive(Default)]
struct Recorder {
    faults: Mutex<Vec<DeviceFault>>,
    done: Mutex<Vec<(u64, DispatchStatus)>>,
    wake: Condvar,
}

impl VmEvents for Recorder {
    fn faults(&self, batch: &[DeviceFault]) {
        self.faults.lock().extend_from_slice(batch);
        self.wake.notify_all();
    }

    fn dispatch_done(&self, _queue: QueueId, tag: u64, status: DispatchStatus) {
        let mut done = self.done.lock();
        assert!(
            done.iter().all(|(t, _)| *t != tag),
            "dispatch {tag} ended twice"
        );
        done.push((tag, status));
        self.wake.notify_all();
    }
}

impl Recorder {
    fn status(&self, tag: u64) -> Option<DispatchStatus> {
        self.done
            .lock()
            .iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, s)| *s)
    }

    fn wait_done(&self, tag: u64, within: Duration) -> DispatchStatus {
        self.try_wait_done(tag, within)
            .unwrap_or_else(|| panic!("dispatch {tag} did not end within {within:?}"))
    }

    fn try_wait_done(&self, tag: u64, within: Duration) -> Option<DispatchStatus> {
        let deadline = Instant::now() + within;
        let mut done = self.done.lock();
        loop {
            if let Some((_, s)) = done.iter().find(|(t, _)| *t == tag) {
                return Some(*s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            self.wake.wait_for(&mut done, Duration::from_millis(5));
        }
    }

    fn wait_faults(&self, n: usize) -> Vec<DeviceFault> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut f = self.faults.lock();
        while f.len() < n {
            assert!(Instant::now() < deadline, "only {} faults", f.len());
            self.wake.wait_for(&mut f, Duration::from_millis(5));
        }
        std::mem::take(&mut *f)
    }
}

fn ram() -> GuestRam {
    GuestMemoryAtomic::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap(),
    )
}

fn gpu(config: SimConfig) -> Arc<SimGpu> {
    SimGpu::new(SimConfig {
        compute_units: 2,
        ..config
    })
}

/// One VM with its own recorder and signal page (at `signals_gpa`).
struct Ctx {
    mem: GuestRam,
    events: Arc<Recorder>,
    vm: Arc<dyn DeviceVm>,
    signals_gpa: u64,
}

fn ctx(gpu: &SimGpu, mem: &GuestRam, signals_gpa: u64, max_queue_depth: u32) -> Ctx {
    let events = Arc::new(Recorder::default());
    let config = VmConfig {
        memory: mem.clone(),
        max_pending_faults: 64,
        max_queue_depth,
    };
    let vm = gpu.create_vm(config, events.clone()).unwrap();
    vm.map(GpuVa(SIGNALS_VA), &[GuestPhysAddr(signals_gpa)], Perms::RW)
        .unwrap();
    Ctx {
        mem: mem.clone(),
        events,
        vm,
        signals_gpa,
    }
}

impl Ctx {
    /// Maps `pages` pages at `va`, onto the guest pages from `gpa` on,
    /// cycling through `distinct` of them.
    fn map(&self, va: u64, gpa: u64, pages: u64, distinct: u64) {
        let list: Vec<GuestPhysAddr> = (0..pages)
            .map(|i| GuestPhysAddr(gpa + (i % distinct) * P))
            .collect();
        self.vm.map(GpuVa(va), &list, Perms::RW).unwrap();
    }

    fn queue(&self, priority: u8) -> QueueId {
        self.vm.create_queue(QueueDesc { priority }).unwrap()
    }

    fn dispatch(&self, q: QueueId, kernel: Kernel, tag: u64) {
        let launch = KernelLaunch {
            kernel,
            completion: Some(Completion {
                signal: GpuVa(SIGNALS_VA + (tag % 128) * 32),
                value: tag,
            }),
            tag,
        };
        self.vm.dispatch(q, launch).unwrap();
    }

    /// A node at `va` (mapped) that points to itself: a chase around it
    /// never ends by itself.
    fn self_loop(&self, va: u64, gpa: u64) {
        self.map(va, gpa, 1, 1);
        let mem = self.mem.memory();
        mem.write_obj(va, GuestAddress(gpa)).unwrap();
        mem.write_obj(1u64, GuestAddress(gpa + 8)).unwrap();
    }

    fn signal(&self, tag: u64) -> (u64, u32, u64) {
        let at = self.signals_gpa + (tag % 128) * 32;
        let mem = self.mem.memory();
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 8)).unwrap(),
            mem.read_obj(GuestAddress(at + 16)).unwrap(),
        )
    }

    fn u32(&self, gpa: u64) -> u32 {
        self.mem.memory().read_obj(GuestAddress(gpa)).unwrap()
    }
}

fn runaway(head: u64, result: u64) -> Kernel {
    Kernel::PointerChase {
        head: GpuVa(head),
        max_steps: 1 << 36,
        result: GpuVa(result),
    }
}

/// The case: a context's two endless `POINTER_CHASE` dispatches,
/// one per compute unit, and another context's 64 KiB `FILL` must still
/// finish at once.
#[test]
fn one_context_cannot_starve_another() {
    let gpu = gpu(SimConfig::default());
    let mem = ram();
    let a = ctx(&gpu, &mem, 0x1000, 16);
    let b = ctx(&gpu, &mem, 0x2000, 16);
    a.self_loop(0x10_0000, 0x10_0000);
    a.map(0x20_0000, 0x20_0000, 1, 1);
    let (qa1, qa2) = (a.queue(15), a.queue(15));
    a.dispatch(qa1, runaway(0x10_0000, 0x20_0000), 1);
    a.dispatch(qa2, runaway(0x10_0000, 0x20_0100), 2);
    // Let both take a compute unit.
    std::thread::sleep(Duration::from_millis(50));

    b.map(0x40_0000, 0x40_0000, 16, 16);
    let qb = b.queue(0);
    let start = Instant::now();
    b.dispatch(
        qb,
        Kernel::Fill {
            dst: GpuVa(0x40_0000),
            count: 16 * 1024,
            value: 0xB0B0,
        },
        7,
    );
    let fill = b.events.try_wait_done(7, Duration::from_secs(2));
    let took = start.elapsed();
    let long_ones = (a.events.status(1), a.events.status(2));
    // Free the compute units before asserting, so that a failure fails
    // instead of hanging in teardown.
    a.vm.shutdown();
    assert_eq!(
        fill,
        Some(DispatchStatus::Ok),
        "the other context's fill did not end within 2 s"
    );
    assert!((0..16 * 1024).all(|i| b.u32(0x40_0000 + i * 4) == 0xB0B0));
    assert_eq!(b.signal(7), (7, 0, 0));
    // The long ones were still running (the watchdog is 10 s away).
    assert_eq!(long_ones, (None, None), "fill took {took:?}");
    assert_eq!(
        a.events.wait_done(1, Duration::from_secs(5)),
        DispatchStatus::Cancelled
    );
    assert_eq!(
        a.events.wait_done(2, Duration::from_secs(5)),
        DispatchStatus::Cancelled
    );
}

/// In one VM, a priority-15 queue gets 16 times the device time of a
/// priority-0 one: the high queues' dispatches finish long before a
/// low-priority flood queued as early, and the low queue still makes
/// progress meanwhile.
#[test]
fn queue_priority_is_honoured_without_starving_low_priorities() {
    let gpu = gpu(SimConfig::default());
    let mem = ram();
    let c = ctx(&gpu, &mem, 0x1000, 128);
    // Two high queues (so that one keeps the compute units busy while the
    // other moves from one dispatch to the next), 4 fills of 16 MiB each
    // (256 waves' worth); one low queue, 64 fills of 512 KiB (8 each).
    // Equal shares would end the low flood when the high queues are a
    // third done; 16:16:1 when they are done, it is an eighth done. The
    // scheduler shares time, so every fill writes the same cached 512 KiB
    // of guest memory over and over, to make all waves take as long.
    let (high_va, high_gpa, high_bytes) = (0x1_0000_0000u64, 0x100_0000u64, 16u64 << 20);
    let (low_va, low_gpa, low_bytes) = (0x2_0000_0000u64, 0x80_0000u64, 512u64 << 10);
    c.map(high_va, high_gpa, high_bytes / P, low_bytes / P);
    c.map(low_va, low_gpa, low_bytes / P, low_bytes / P);
    let (low, high_a, high_b) = (c.queue(0), c.queue(15), c.queue(15));
    let fill = |va: u64, bytes: u64, value: u32| Kernel::Fill {
        dst: GpuVa(va),
        count: bytes / 4,
        value,
    };
    // Each queue starts behind a gate, a dispatch stalled on a fault, so
    // that the low flood gets no head start while the rest is queued.
    let gates = [0x3_0000_0000u64, 0x3_0001_0000, 0x3_0002_0000];
    for (q, (gate, tag)) in [low, high_a, high_b]
        .into_iter()
        .zip(gates.iter().zip(900..))
    {
        c.dispatch(q, fill(*gate, P, 0), tag);
    }
    let gate_faults = c.events.wait_faults(3);
    for i in 0..64 {
        c.dispatch(low, fill(low_va, low_bytes, 2), 1000 + i);
    }
    for i in 0..4 {
        c.dispatch(high_a, fill(high_va, high_bytes, 1), 1 + i);
        c.dispatch(high_b, fill(high_va, high_bytes, 1), 11 + i);
    }
    for (i, gate) in gates.iter().enumerate() {
        c.map(*gate, 0x1_0000 + i as u64 * P, 1, 1);
    }
    for f in &gate_faults {
        c.vm.reply_fault(f.id, FaultAction::Replay).unwrap();
    }
    c.events.wait_done(4, Duration::from_secs(60));
    c.events.wait_done(14, Duration::from_secs(60));
    let low_done_meanwhile = {
        let done = c.events.done.lock();
        let at = |tag: u64| done.iter().position(|(t, _)| *t == tag).unwrap();
        let high_end = at(4).max(at(14));
        done.iter()
            .take(high_end)
            .filter(|(t, _)| *t >= 1000)
            .count()
    };
    // About 8 of the 64 (more on a loaded host: the scheduler is
    // work-conserving, so the low queue also runs whenever no high wave is
    // ready); FIFO ends all 64.
    assert!(
        low_done_meanwhile <= 48,
        "{low_done_meanwhile} low-priority dispatches ended while the high queues ran"
    );
    assert!(
        low_done_meanwhile >= 2,
        "the low-priority queue starved: {low_done_meanwhile} ended"
    );
    c.events.wait_done(1063, Duration::from_secs(60));
    let done = c.events.done.lock();
    assert!(done.iter().all(|(_, s)| *s == DispatchStatus::Ok));
    assert_eq!(done.len(), 75);
    drop(done);
    assert_eq!(c.u32(high_gpa + low_bytes - 4), 1);
    assert_eq!(c.u32(low_gpa + low_bytes - 4), 2);
}

/// A dispatch past the watchdog's limit ends `WATCHDOG_TIMEOUT`; the queue's
/// next dispatch and other queues run on, and time stalled on a fault does
/// not count.
#[test]
fn the_watchdog_ends_a_runaway_dispatch_and_the_rest_runs_on() {
    let limit = Duration::from_millis(300);
    let gpu = gpu(SimConfig {
        dispatch_timeout: Some(limit),
        ..SimConfig::default()
    });
    let mem = ram();
    let c = ctx(&gpu, &mem, 0x1000, 16);
    c.self_loop(0x10_0000, 0x10_0000);
    c.map(0x20_0000, 0x20_0000, 16, 16);
    let (q1, q2, q3) = (c.queue(0), c.queue(0), c.queue(0));
    let start = Instant::now();
    c.dispatch(q1, runaway(0x10_0000, 0x20_0000), 1);
    let fill = |va: u64, value: u32| Kernel::Fill {
        dst: GpuVa(va),
        count: 1024,
        value,
    };
    c.dispatch(q1, fill(0x20_1000, 0x11), 2);
    // A fill that waits on a fault for twice the limit, then completes.
    c.dispatch(q3, fill(0x30_0000, 0x33), 4);
    let fault = c.events.wait_faults(1);
    assert_eq!(fault[0].va, GpuVa(0x30_0000));
    // Meanwhile another queue's work is not held up.
    c.dispatch(q2, fill(0x20_2000, 0x22), 3);
    assert_eq!(
        c.events.wait_done(3, Duration::from_secs(2)),
        DispatchStatus::Ok
    );
    assert_eq!(
        c.events.wait_done(1, Duration::from_secs(10)),
        DispatchStatus::WatchdogTimeout
    );
    let took = start.elapsed();
    assert!(took >= limit, "killed after {took:?}");
    assert_eq!(c.signal(1), (1, DispatchStatus::WatchdogTimeout as u32, 0));
    assert_eq!(
        c.events.wait_done(2, Duration::from_secs(2)),
        DispatchStatus::Ok
    );
    assert_eq!(c.u32(0x20_1000), 0x11);
    std::thread::sleep((limit * 2).saturating_sub(start.elapsed()));
    assert_eq!(c.events.status(4), None, "stalled, not timed out");
    c.map(0x30_0000, 0x30_0000, 1, 1);
    c.vm.reply_fault(fault[0].id, FaultAction::Replay).unwrap();
    assert_eq!(
        c.events.wait_done(4, Duration::from_secs(2)),
        DispatchStatus::Ok
    );
    assert_eq!(c.u32(0x30_0000 + 4092), 0x33);
}

/// When the watchdog fires, the dispatch's waves stalled on faults are
/// killed too, and a fault only they waited on ends (a late reply is
/// refused).
#[test]
fn the_watchdog_kills_stalled_waves_of_the_dispatch() {
    let gpu = gpu(SimConfig {
        dispatch_timeout: Some(Duration::from_millis(5)),
        ..SimConfig::default()
    });
    let mem = ram();
    let c = ctx(&gpu, &mem, 0x1000, 16);
    // 256 MiB of VA over 1 MiB of guest pages, but for one hole early on.
    let (va, pages) = (0x1_0000_0000u64, 65_536u64);
    c.map(va, 0x100_0000, 10, 256);
    c.map(va + 11 * P, 0x100_0000, pages - 11, 256);
    let q = c.queue(0);
    c.dispatch(
        q,
        Kernel::Fill {
            dst: GpuVa(va),
            count: pages * 1024,
            value: 5,
        },
        1,
    );
    let fault = c.events.wait_faults(1);
    assert_eq!(fault[0].va, GpuVa(va + 10 * P));
    assert_eq!(
        c.events.wait_done(1, Duration::from_secs(10)),
        DispatchStatus::WatchdogTimeout,
        "the fault was never answered: only the watchdog can end it"
    );
    assert_eq!(
        c.vm.reply_fault(fault[0].id, FaultAction::Replay),
        Err(DeviceError::UnknownFault(fault[0].id))
    );
    // The queue is usable again.
    c.dispatch(
        q,
        Kernel::Fill {
            dst: GpuVa(va),
            count: 1024,
            value: 6,
        },
        2,
    );
    assert_eq!(
        c.events.wait_done(2, Duration::from_secs(2)),
        DispatchStatus::Ok
    );
    assert_eq!(c.u32(0x100_0000), 6);
}
