//! The simulated GPU through the `Device` trait: kernels compute the right
//! data through the page tables, and every recoverable fault ends exactly
//! once (replay, cancel, teardown), whatever races with it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpu_backend::device::QueueDesc;
use gpu_backend::sim::{SimConfig, SimGpu};
use gpu_backend::{
    Completion, Device, DeviceError, DeviceFault, DeviceVm, FaultAction, GuestRam, KernelLaunch,
    VmConfig, VmEvents,
};
use guest_proto::{
    AccessFlags, DispatchStatus, FaultId, GpuVa, GuestPhysAddr, Kernel, Perms, QueueId,
};
use parking_lot::{Condvar, Mutex};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

const RAM: u64 = 32 << 20;
const P: u64 = 4096;
const SIGNALS_VA: u64 = 0x8000_0000_0000;
const SIGNALS_GPA: u64 = 0x1000;

/// Records everything the device reports.
#[derive(Default)]
struct Recorder {
    faults: Mutex<Vec<DeviceFault>>,
    done: Mutex<HashMap<u64, DispatchStatus>>,
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
            done.insert(tag, status).is_none(),
            "dispatch {tag} ended twice"
        );
        self.wake.notify_all();
    }
}

impl Recorder {
    fn wait_done(&self, tag: u64) -> DispatchStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut done = self.done.lock();
        loop {
            if let Some(s) = done.get(&tag) {
                return *s;
            }
            assert!(
                Instant::now() < deadline,
                "dispatch {tag} never ended; undelivered faults {:?}",
                self.faults.lock()
            );
            self.wake.wait_for(&mut done, Duration::from_millis(10));
        }
    }

    fn wait_faults(&self, n: usize) -> Vec<DeviceFault> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut f = self.faults.lock();
        while f.len() < n {
            assert!(Instant::now() < deadline, "only {} faults", f.len());
            self.wake.wait_for(&mut f, Duration::from_millis(10));
        }
        std::mem::take(&mut *f)
    }
}

struct Rig {
    mem: GuestRam,
    events: Arc<Recorder>,
    vm: Arc<dyn DeviceVm>,
    _gpu: Arc<SimGpu>,
}

fn rig(max_pending_faults: u32) -> Rig {
    let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let mem = GuestMemoryAtomic::new(mmap);
    let gpu = SimGpu::new(SimConfig {
        compute_units: 2,
        ..SimConfig::default()
    });
    let events = Arc::new(Recorder::default());
    let config = VmConfig {
        memory: mem.clone(),
        max_pending_faults,
        max_queue_depth: 64,
    };
    let vm = gpu.create_vm(config, events.clone()).unwrap();
    vm.map(GpuVa(SIGNALS_VA), &[GuestPhysAddr(SIGNALS_GPA)], Perms::RW)
        .unwrap();
    Rig {
        mem,
        events,
        vm,
        _gpu: gpu,
    }
}

impl Rig {
    /// Maps `pages` consecutive guest pages from `gpa` at `va`.
    fn map(&self, va: u64, gpa: u64, pages: u64) {
        let list: Vec<GuestPhysAddr> = (0..pages).map(|i| GuestPhysAddr(gpa + i * P)).collect();
        self.vm.map(GpuVa(va), &list, Perms::RW).unwrap();
    }

    fn run(&self, q: QueueId, kernel: Kernel, tag: u64) -> DispatchStatus {
        self.vm.dispatch(q, self.dispatch(kernel, tag)).unwrap();
        self.events.wait_done(tag)
    }

    fn dispatch(&self, kernel: Kernel, tag: u64) -> KernelLaunch {
        KernelLaunch {
            kernel,
            completion: Some(Completion {
                signal: GpuVa(SIGNALS_VA + (tag % 64) * 32),
                value: tag,
            }),
            tag,
        }
    }

    fn u32(&self, gpa: u64) -> u32 {
        self.mem.memory().read_obj(GuestAddress(gpa)).unwrap()
    }

    fn u64(&self, gpa: u64) -> u64 {
        self.mem.memory().read_obj(GuestAddress(gpa)).unwrap()
    }

    fn put<T: vm_memory::ByteValued>(&self, gpa: u64, v: T) {
        self.mem.memory().write_obj(v, GuestAddress(gpa)).unwrap();
    }

    fn queue(&self) -> QueueId {
        self.vm.create_queue(QueueDesc { priority: 0 }).unwrap()
    }

    /// Resolves every fault by mapping the page identity-offset into RAM.
    fn resolver(&self, base_va: u64, base_gpa: u64) -> std::thread::JoinHandle<usize> {
        let (events, vm) = (self.events.clone(), self.vm.clone());
        std::thread::spawn(move || {
            let mut resolved = 0;
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                let batch = std::mem::take(&mut *events.faults.lock());
                for f in &batch {
                    let gpa = base_gpa + (f.va.raw() - base_va);
                    vm.map(f.va, &[GuestPhysAddr(gpa)], Perms::RW).unwrap();
                    vm.reply_fault(f.id, FaultAction::Replay).unwrap();
                    resolved += 1;
                }
                if batch.is_empty() {
                    if !events.done.lock().is_empty() && events.faults.lock().is_empty() {
                        return resolved;
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            resolved
        })
    }

    fn signal(&self, tag: u64) -> (u64, u32, u64) {
        let at = SIGNALS_GPA + (tag % 64) * 32;
        (self.u64(at), self.u32(at + 8), self.u64(at + 16))
    }
}

#[test]
fn every_kernel_computes_through_the_page_tables() {
    let r = rig(64);
    // Scatter the buffer over non-contiguous guest pages.
    let (x, y, z) = (0x10_0000u64, 0x20_0000u64, 0x30_0000u64);
    for (i, va) in [x, y, z].iter().enumerate() {
        for p in 0..4 {
            r.map(va + p * P, 0x100_0000 + (p * 3 + i as u64) * 0x10_0000, 1);
        }
    }
    let gpa = |va: u64| {
        let (base, i) = if va >= z {
            (z, 2)
        } else if va >= y {
            (y, 1)
        } else {
            (x, 0)
        };
        let p = (va - base) / P;
        0x100_0000 + (p * 3 + i) * 0x10_0000 + (va - base) % P
    };
    let q = r.queue();
    assert_eq!(
        r.run(
            q,
            Kernel::Fill {
                dst: GpuVa(x),
                count: 4096,
                value: 7
            },
            1
        ),
        DispatchStatus::Ok
    );
    assert!((0..4096).all(|i| r.u32(gpa(x + i * 4)) == 7));
    assert_eq!(
        r.signal(1),
        (1, 0, 0),
        "signal written: value, status, error_va"
    );

    for i in 0..4096u64 {
        r.put(gpa(x + i * 4), (i as f32).to_bits());
        r.put(gpa(y + i * 4), 1.0f32.to_bits());
    }
    let k = Kernel::Saxpy {
        x: GpuVa(x),
        y: GpuVa(y),
        count: 4096,
        a: 3.0,
    };
    assert_eq!(r.run(q, k, 2), DispatchStatus::Ok);
    assert!((0..4096u64).all(|i| f32::from_bits(r.u32(gpa(y + i * 4))) == 3.0 * i as f32 + 1.0));

    let k = Kernel::Copy {
        dst: GpuVa(z + 100),
        src: GpuVa(x + 4),
        size: 8000,
    };
    assert_eq!(r.run(q, k, 3), DispatchStatus::Ok);
    assert_eq!(r.u32(gpa(z + 100)), 1.0f32.to_bits());

    for i in 0..1024u64 {
        r.put(gpa(x + i * 4), ((i * 7) % 1024) as u32);
        r.put(gpa(y + i * 4), (i * 10) as u32);
    }
    let k = Kernel::Gather {
        dst: GpuVa(z),
        src: GpuVa(y),
        indices: GpuVa(x),
        count: 1024,
    };
    assert_eq!(r.run(q, k, 4), DispatchStatus::Ok);
    assert!((0..1024u64).all(|i| r.u32(gpa(z + i * 4)) == ((i * 7) % 1024 * 10) as u32));

    for i in 0..4u64 {
        r.put(gpa(z + i * 8), 0u64);
    }
    let k = Kernel::AtomicAdd {
        counters: GpuVa(z),
        num_counters: 4,
        items: 1001,
        addend: 2,
    };
    assert_eq!(r.run(q, k, 5), DispatchStatus::Ok);
    let sums: Vec<u64> = (0..4).map(|i| r.u64(gpa(z + i * 8))).collect();
    assert_eq!(sums, vec![251 * 2, 250 * 2, 250 * 2, 250 * 2]);

    // A list across all twelve pages.
    let nodes: Vec<u64> = (0..12)
        .map(|i| [x, y, z][i % 3] + (i as u64 / 3) * P + 64)
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        let next = nodes.get(i + 1).copied().unwrap_or(0);
        r.put(gpa(*n), next);
        r.put(gpa(*n + 8), i as u64 + 1);
    }
    let k = Kernel::PointerChase {
        head: GpuVa(nodes[0]),
        max_steps: 100,
        result: GpuVa(x + 2048),
    };
    assert_eq!(r.run(q, k, 6), DispatchStatus::Ok);
    assert_eq!((r.u64(gpa(x + 2048)), r.u64(gpa(x + 2056))), (78, 12));
}

#[test]
fn unmapped_memory_faults_and_replays_to_the_exact_result() {
    let r = rig(1024);
    let q = r.queue();
    let (va, gpa) = (0x4000_0000u64, 0x40_0000u64);
    let resolver = r.resolver(va, gpa);
    // Atomic adds stalled and replayed must not double count.
    let k = Kernel::AtomicAdd {
        counters: GpuVa(va),
        num_counters: 2048,
        items: 2048 * 5,
        addend: 1,
    };
    assert_eq!(r.run(q, k, 1), DispatchStatus::Ok);
    let resolved = resolver.join().unwrap();
    assert_eq!(resolved, 4, "one fault per page of counters");
    assert!((0..2048).all(|i| r.u64(gpa + i * 8) == 5));
}

#[test]
fn faults_on_one_page_are_merged_and_a_storm_beyond_the_cap_loses_nothing() {
    let r = rig(4);
    let q = r.queue();
    let (va, gpa) = (0x5000_0000u64, 0x80_0000u64);
    // 64 pages, 4 faults pending at most.
    r.vm.dispatch(
        q,
        r.dispatch(
            Kernel::Fill {
                dst: GpuVa(va),
                count: 64 * 1024,
                value: 9,
            },
            1,
        ),
    )
    .unwrap();
    let first = r.events.wait_faults(4);
    assert_eq!(first.len(), 4, "capped at max_pending_faults");
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        r.events.faults.lock().is_empty(),
        "nothing beyond the cap is raised"
    );
    for f in &first {
        assert_eq!(f.access, AccessFlags::WRITE);
        r.vm.map(f.va, &[GuestPhysAddr(gpa + (f.va.raw() - va))], Perms::RW)
            .unwrap();
        r.vm.reply_fault(f.id, FaultAction::Replay).unwrap();
    }
    let resolver = r.resolver(va, gpa);
    assert_eq!(r.events.wait_done(1), DispatchStatus::Ok);
    assert_eq!(resolver.join().unwrap(), 60);
    assert!((0..64 * 1024).step_by(97).all(|i| r.u32(gpa + i * 4) == 9));
    // Each fault ended once: replying again is an error.
    assert_eq!(
        r.vm.reply_fault(first[0].id, FaultAction::Replay),
        Err(DeviceError::UnknownFault(first[0].id))
    );

    // Many waves on one page: one fault, merged.
    let k = Kernel::Gather {
        dst: GpuVa(va),
        src: GpuVa(0x6000_0000),
        indices: GpuVa(va),
        count: 16 * 1024,
    };
    r.vm.dispatch(q, r.dispatch(k, 2)).unwrap();
    let f = r.events.wait_faults(1);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].va, GpuVa(0x6000_0000));
    r.vm.reply_fault(f[0].id, FaultAction::Cancel(DispatchStatus::FaultRejected))
        .unwrap();
    assert_eq!(r.events.wait_done(2), DispatchStatus::FaultRejected);
    assert_eq!(
        r.signal(2),
        (2, DispatchStatus::FaultRejected as u32, 0x6000_0000)
    );
}

#[test]
fn after_unmap_no_kernel_touches_the_old_pages() {
    let r = rig(16);
    let q = r.queue();
    let (va, old, new) = (0x7000_0000u64, 0x100_0000u64, 0x110_0000u64);
    r.map(va, old, 4);
    assert_eq!(
        r.run(
            q,
            Kernel::Fill {
                dst: GpuVa(va),
                count: 4096,
                value: 1
            },
            1
        ),
        DispatchStatus::Ok
    );
    r.vm.unmap(GpuVa(va), 4 * P).unwrap();
    // Remap at the same VA: the TLBs must not serve the old translation.
    r.map(va, new, 4);
    assert_eq!(
        r.run(
            q,
            Kernel::Fill {
                dst: GpuVa(va),
                count: 4096,
                value: 2
            },
            2
        ),
        DispatchStatus::Ok
    );
    assert!(
        (0..4096).all(|i| r.u32(old + i * 4) == 1),
        "old pages untouched"
    );
    assert!((0..4096).all(|i| r.u32(new + i * 4) == 2));
    // Unmap while a long fill runs, then scribble the old pages: the fill
    // faults instead of writing them.
    r.vm.unmap(GpuVa(va), 4 * P).unwrap();
    r.map(va, old, 4);
    r.vm.dispatch(
        q,
        r.dispatch(
            Kernel::Fill {
                dst: GpuVa(va),
                count: 4096,
                value: 3,
            },
            3,
        ),
    )
    .unwrap();
    r.vm.unmap(GpuVa(va), 4 * P).unwrap();
    for i in 0..4096 {
        r.put(old + i * 4, 0xDEADu32);
    }
    let faults = r.events.wait_faults(0);
    for f in faults {
        r.vm.reply_fault(f.id, FaultAction::Cancel(DispatchStatus::FaultRejected))
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !r.events.done.lock().contains_key(&3) {
        for f in std::mem::take(&mut *r.events.faults.lock()) {
            r.vm.reply_fault(f.id, FaultAction::Cancel(DispatchStatus::FaultRejected))
                .unwrap();
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        (0..4096).all(|i| r.u32(old + i * 4) == 0xDEAD),
        "nothing written after unmap returned"
    );
}

#[test]
fn map_refuses_pages_outside_guest_ram_and_overlaps() {
    let r = rig(16);
    assert_eq!(
        r.vm.map(GpuVa(0x1000_0000), &[GuestPhysAddr(RAM)], Perms::RW),
        Err(DeviceError::NotGuestRam(GuestPhysAddr(RAM)))
    );
    r.map(0x1000_0000, 0x10_0000, 1);
    assert_eq!(
        r.vm.map(
            GpuVa(0x0FFF_F000),
            &[GuestPhysAddr(0x20_0000), GuestPhysAddr(0x21_0000)],
            Perms::RW
        ),
        Err(DeviceError::AlreadyMapped(GpuVa(0x1000_0000)))
    );
    assert!(
        r.vm.map(GpuVa(1 << 48), &[GuestPhysAddr(0x20_0000)], Perms::RW)
            .is_err()
    );
    assert!(
        r.vm.map(GpuVa(0x2000_0010), &[GuestPhysAddr(0x20_0000)], Perms::RW)
            .is_err()
    );
}

#[test]
fn queue_destroy_and_shutdown_end_stalled_work_once() {
    let r = rig(16);
    let (q1, q2) = (r.queue(), r.queue());
    r.vm.dispatch(
        q1,
        r.dispatch(
            Kernel::Fill {
                dst: GpuVa(0x9000_0000),
                count: 1024,
                value: 1,
            },
            1,
        ),
    )
    .unwrap();
    r.vm.dispatch(
        q1,
        r.dispatch(
            Kernel::Fill {
                dst: GpuVa(0x9000_0000),
                count: 1024,
                value: 1,
            },
            2,
        ),
    )
    .unwrap();
    r.vm.dispatch(
        q2,
        r.dispatch(
            Kernel::Fill {
                dst: GpuVa(0xA000_0000),
                count: 1024,
                value: 1,
            },
            3,
        ),
    )
    .unwrap();
    let faults = r.events.wait_faults(2);
    r.vm.destroy_queue(q1).unwrap();
    assert_eq!(r.events.wait_done(1), DispatchStatus::Cancelled);
    assert_eq!(
        r.events.wait_done(2),
        DispatchStatus::Cancelled,
        "queued behind it"
    );
    assert_eq!(r.signal(2).1, DispatchStatus::Cancelled as u32);
    let q1_fault = faults.iter().find(|f| f.queue == q1).unwrap();
    assert_eq!(
        r.vm.reply_fault(q1_fault.id, FaultAction::Replay),
        Err(DeviceError::UnknownFault(q1_fault.id))
    );
    assert_eq!(r.vm.destroy_queue(q1), Err(DeviceError::UnknownQueue(q1)));
    r.vm.shutdown();
    assert_eq!(r.events.wait_done(3), DispatchStatus::Cancelled);
    r.vm.shutdown();
    assert_eq!(
        r.vm.create_queue(QueueDesc { priority: 0 }),
        Err(DeviceError::Shutdown)
    );
    let q2_fault = faults.iter().find(|f| f.queue == q2).unwrap();
    assert!(r.vm.reply_fault(q2_fault.id, FaultAction::Replay).is_err());
    let _ = FaultId(0);
}

#[test]
fn unmaps_racing_faults_and_replays_still_finish_with_exact_data() {
    let r = rig(64);
    let q = r.queue();
    let (va, gpa, pages) = (0xB000_0000u64, 0x100_0000u64, 256u64);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let unmapper = {
        let (vm, stop) = (r.vm.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                vm.unmap(GpuVa(va + (x % pages) * P), P).unwrap();
                n += 1;
                std::thread::yield_now();
            }
            n
        })
    };
    let resolver = {
        let (events, vm, stop) = (r.events.clone(), r.vm.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for f in std::mem::take(&mut *events.faults.lock()) {
                    let page = GuestPhysAddr(gpa + (f.va.raw() - va));
                    // The page may have been mapped by an earlier answer.
                    match vm.map(f.va, &[page], Perms::RW) {
                        Ok(()) | Err(DeviceError::AlreadyMapped(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                    vm.reply_fault(f.id, FaultAction::Replay).unwrap();
                    n += 1;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            n
        })
    };
    let k = Kernel::Fill {
        dst: GpuVa(va),
        count: pages * 1024,
        value: 0xCAFE,
    };
    r.vm.dispatch(q, r.dispatch(k, 1)).unwrap();
    let status = r.events.wait_done(1);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (unmaps, faults) = (unmapper.join().unwrap(), resolver.join().unwrap());
    assert_eq!(status, DispatchStatus::Ok);
    assert!(
        faults >= pages as usize,
        "{faults} faults for {pages} pages ({unmaps} unmaps)"
    );
    assert!((0..pages * 1024).all(|i| r.u32(gpa + i * 4) == 0xCAFE));
}
