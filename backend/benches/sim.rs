//! The simulated GPU, measured against baselines in the same run:
//!
//! - translation with TLB hits vs a plain array lookup;
//! - COPY through the GPU VM (page walk + vm-memory) vs host `memcpy`;
//! - the in-process fault round trip (fault -> resolver maps -> replay ->
//!   done), p50/p99, and faults per second when faults come in batches.
//!
//! The round-trip figures are printed (criterion measures means; the goal
//! is a percentile).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gpu_backend::device::QueueDesc;
use gpu_backend::sim::page_table::{PageTable, Pte};
use gpu_backend::sim::tlb::Tlb;
use gpu_backend::sim::{SimConfig, SimGpu};
use gpu_backend::{
    Device, DeviceFault, DeviceVm, FaultAction, GuestRam, KernelLaunch, VmConfig, VmEvents,
};
use guest_proto::{DispatchStatus, GpuVa, GuestPhysAddr, Kernel, PAGE_SIZE, Perms, QueueId};
use parking_lot::{Condvar, Mutex};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

const COPY_BYTES: u64 = 16 << 20;
const RAM: u64 = 128 << 20;

fn translation(c: &mut Criterion) {
    let mut pt = PageTable::default();
    let pages: Vec<u64> = (0..32).map(|i| 0x10_0000 + i * PAGE_SIZE).collect();
    for (i, va) in pages.iter().enumerate() {
        pt.set(
            GpuVa(*va),
            Pte::new(GuestPhysAddr(0x1000 * (i as u64 + 1)), Perms::RW),
        );
    }
    let mut tlb = Tlb::default();
    for va in &pages {
        tlb.insert(1, 1, GpuVa(*va), pt.walk(GpuVa(*va)));
    }
    let array: Vec<u64> = (0..32).map(|i| 0x1000 * (i + 1)).collect();
    let mut g = c.benchmark_group("translate");
    g.throughput(Throughput::Elements(pages.len() as u64));
    g.bench_function("tlb_hit", |b| {
        b.iter(|| {
            for va in &pages {
                black_box(tlb.lookup(1, 1, GpuVa(black_box(*va))));
            }
        })
    });
    g.bench_function("page_walk", |b| {
        b.iter(|| {
            for va in &pages {
                black_box(pt.walk(GpuVa(black_box(*va))));
            }
        })
    });
    g.bench_function("array_baseline", |b| {
        b.iter(|| {
            for va in &pages {
                let i = ((black_box(*va) - 0x10_0000) / PAGE_SIZE) as usize;
                black_box(array[i]);
            }
        })
    });
    g.finish();
}

/// Counts dispatches done and resolves faults inline (identity offset).
struct Events {
    done: Mutex<u64>,
    wake: Condvar,
    vm: Mutex<Option<Arc<dyn DeviceVm>>>,
    gpa_of: fn(u64) -> u64,
    faults: std::sync::atomic::AtomicU64,
}

impl VmEvents for Events {
    fn faults(&self, batch: &[DeviceFault]) {
        let vm = self.vm.lock().clone().unwrap();
        for f in batch {
            let gpa = (self.gpa_of)(f.va.raw());
            let _ = vm.map(f.va, &[GuestPhysAddr(gpa)], Perms::RW);
            vm.reply_fault(f.id, FaultAction::Replay).unwrap();
        }
        self.faults
            .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn dispatch_done(&self, _q: QueueId, _tag: u64, status: DispatchStatus) {
        assert_eq!(status, DispatchStatus::Ok);
        *self.done.lock() += 1;
        self.wake.notify_all();
    }
}

struct Rig {
    vm: Arc<dyn DeviceVm>,
    events: Arc<Events>,
    q: QueueId,
    _gpu: Arc<SimGpu>,
}

fn rig(cus: usize, gpa_of: fn(u64) -> u64) -> Rig {
    let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let mem: GuestRam = GuestMemoryAtomic::new(mmap);
    let gpu = SimGpu::new(SimConfig {
        compute_units: cus,
        ..SimConfig::default()
    });
    let events = Arc::new(Events {
        done: Mutex::new(0),
        wake: Condvar::new(),
        vm: Mutex::new(None),
        gpa_of,
        faults: 0.into(),
    });
    let config = VmConfig {
        memory: mem,
        max_pending_faults: 4096,
        max_queue_depth: 64,
    };
    let vm = gpu.create_vm(config, events.clone()).unwrap();
    *events.vm.lock() = Some(vm.clone());
    let q = vm.create_queue(QueueDesc { priority: 0 }).unwrap();
    Rig {
        vm,
        events,
        q,
        _gpu: gpu,
    }
}

impl Rig {
    fn run(&self, kernel: Kernel) {
        let before = *self.events.done.lock();
        self.vm
            .dispatch(
                self.q,
                KernelLaunch {
                    kernel,
                    completion: None,
                    tag: 1,
                },
            )
            .unwrap();
        let mut done = self.events.done.lock();
        while *done == before {
            self.events.wake.wait(&mut done);
        }
    }
}

fn copy_bandwidth(c: &mut Criterion) {
    let r = rig(2, |va| va);
    let pages: Vec<GuestPhysAddr> = (0..2 * COPY_BYTES / PAGE_SIZE)
        .map(|i| GuestPhysAddr(0x100_0000 + i * PAGE_SIZE))
        .collect();
    r.vm.map(GpuVa(0x1_0000_0000), &pages, Perms::RW).unwrap();
    let (src, dst) = (0x1_0000_0000u64, 0x1_0000_0000 + COPY_BYTES);
    let host_src = vec![7u8; COPY_BYTES as usize];
    let mut host_dst = vec![0u8; COPY_BYTES as usize];
    let mut g = c.benchmark_group("copy_16MiB");
    g.throughput(Throughput::Bytes(COPY_BYTES));
    g.sample_size(20);
    g.bench_function("gpu_vm", |b| {
        b.iter(|| {
            r.run(Kernel::Copy {
                dst: GpuVa(dst),
                src: GpuVa(src),
                size: COPY_BYTES,
            })
        })
    });
    g.bench_function("host_memcpy", |b| {
        b.iter(|| {
            host_dst.copy_from_slice(black_box(&host_src));
            black_box(&host_dst);
        })
    });
    g.finish();

    // The ratio, measured back to back.
    let time = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..10 {
            f();
        }
        start.elapsed()
    };
    let gpu = time(&mut || {
        r.run(Kernel::Copy {
            dst: GpuVa(dst),
            src: GpuVa(src),
            size: COPY_BYTES,
        })
    });
    let host = time(&mut || host_dst.copy_from_slice(black_box(&host_src)));
    let gbps = |d: Duration| 10.0 * COPY_BYTES as f64 / d.as_secs_f64() / 1e9;
    println!(
        "copy through the GPU VM: {:.2} GB/s, host memcpy: {:.2} GB/s, ratio {:.0}%",
        gbps(gpu),
        gbps(host),
        100.0 * host.as_secs_f64() / gpu.as_secs_f64()
    );
}

fn fault_round_trip(c: &mut Criterion) {
    // One page, unmapped before every dispatch: dispatch -> fault ->
    // resolver maps -> replay -> done.
    let r = rig(2, |va| va - 0x2_0000_0000 + 0x200_0000);
    let va = 0x2_0000_0000u64;
    let mut samples = Vec::with_capacity(5000);
    for _ in 0..5000 {
        r.vm.unmap(GpuVa(va), PAGE_SIZE).unwrap();
        let start = Instant::now();
        r.run(Kernel::Fill {
            dst: GpuVa(va),
            count: 1,
            value: 1,
        });
        samples.push(start.elapsed());
    }
    samples.sort();
    let pct = |p: usize| samples[samples.len() * p / 100];
    println!(
        "fault round trip (dispatch -> fault -> map -> replay -> done): p50 {:?}, p99 {:?}",
        pct(50),
        pct(99)
    );
    // Baseline in the same run: the same dispatch with the page mapped.
    let start = Instant::now();
    for _ in 0..5000 {
        r.run(Kernel::Fill {
            dst: GpuVa(va),
            count: 1,
            value: 1,
        });
    }
    println!(
        "baseline dispatch without a fault: mean {:?}",
        start.elapsed() / 5000
    );

    // Batched: a fill over 8192 unmapped pages, 64 waves in flight.
    let r = rig(2, |va| va - 0x3_0000_0000 + 0x100_0000);
    let pages = 8192u64;
    let start = Instant::now();
    r.run(Kernel::Fill {
        dst: GpuVa(0x3_0000_0000),
        count: pages * 1024,
        value: 1,
    });
    let elapsed = start.elapsed();
    let faults = r.events.faults.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "batched faults: {faults} faults in {elapsed:?}: {:.0} faults/s",
        faults as f64 / elapsed.as_secs_f64()
    );
    c.bench_function("fault_round_trip", |b| {
        let r = rig(2, |va| va - 0x2_0000_0000 + 0x200_0000);
        b.iter(|| {
            r.vm.unmap(GpuVa(va), PAGE_SIZE).unwrap();
            r.run(Kernel::Fill {
                dst: GpuVa(va),
                count: 1,
                value: 1,
            });
        })
    });
}

criterion_group!(benches, translation, copy_bandwidth, fault_round_trip);
criterion_main!(benches);
