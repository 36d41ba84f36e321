//! The simulated GPU, measured against baselines in the same run:
//!
//! - translation with TLB hits vs a plain array lookup;
//! - COPY through the GPU VM (page walk + vm-memory) vs host `memcpy`, by
//!   size, from a written source;
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
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};

/// Largest copy, and the guest buffers' size.
const MAX_COPY: u64 = 64 << 20;
/// Sizes of the bandwidth sweep.
const COPY_SIZES: [u64; 6] = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20];
const COPY_GPA: u64 = 0x100_0000;
const COPY_VA: u64 = 0x1_0000_0000;
const RAM: u64 = COPY_GPA + 2 * MAX_COPY + (64 << 20);

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
    /// `done`, readable without the lock (the polling waiter).
    finished: std::sync::atomic::AtomicU64,
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
        let mut done = self.done.lock();
        *done += 1;
        self.finished
            .store(*done, std::sync::atomic::Ordering::Release);
        drop(done);
        self.wake.notify_all();
    }
}

struct Rig {
    mem: GuestRam,
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
        finished: 0.into(),
        vm: Mutex::new(None),
        gpa_of,
        faults: 0.into(),
    });
    let config = VmConfig {
        memory: mem.clone(),
        max_pending_faults: 4096,
        max_queue_depth: 64,
    };
    let vm = gpu.create_vm(config, events.clone()).unwrap();
    *events.vm.lock() = Some(vm.clone());
    let q = vm.create_queue(QueueDesc { priority: 0 }).unwrap();
    Rig {
        mem,
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
        // A polling waiter, as the guest of the socket benchmark: spins for
        // up to 1 ms before it parks, so the figure is the device's round
        // trip, not this thread's wake-up.
        let spin_until = Instant::now() + Duration::from_millis(1);
        while self
            .events
            .finished
            .load(std::sync::atomic::Ordering::Acquire)
            == before
            && Instant::now() < spin_until
        {
            std::hint::spin_loop();
        }
        let mut done = self.events.done.lock();
        while *done == before {
            self.events.wake.wait(&mut done);
        }
    }
}

/// Copy bandwidth through the GPU VM against host memcpy, by size, with a
/// written source (never the zero page: an anonymous mapping nobody wrote
/// reads as one shared zero page, which caches perfectly and overstates
/// every copy from it) and a touched destination. Interleaved per size:
/// the COPY kernel, a memcpy of the same guest buffers, a memcpy of two
/// heap buffers; medians of the repetitions. Writes
/// `target/bench-results/copy_bandwidth.csv`.
fn copy_bandwidth(c: &mut Criterion) {
    let r = rig(2, |va| va);
    let (src_gpa, dst_gpa) = (COPY_GPA, COPY_GPA + MAX_COPY);
    let pages: Vec<GuestPhysAddr> = (0..2 * MAX_COPY / PAGE_SIZE)
        .map(|i| GuestPhysAddr(COPY_GPA + i * PAGE_SIZE))
        .collect();
    for chunk in pages.chunks(512) {
        let va = COPY_VA + (chunk[0].raw() - COPY_GPA);
        r.vm.map(GpuVa(va), chunk, Perms::RW).unwrap();
    }
    let (src, dst) = (COPY_VA, COPY_VA + MAX_COPY);
    let pattern = |i: u64| (i as u8).wrapping_mul(31) ^ (i >> 12) as u8;
    {
        let mem = r.mem.memory();
        let data: Vec<u8> = (0..MAX_COPY).map(pattern).collect();
        mem.write_slice(&data, GuestAddress(src_gpa)).unwrap();
        mem.write_slice(&vec![1u8; MAX_COPY as usize], GuestAddress(dst_gpa))
            .unwrap();
    }
    let host_src: Vec<u8> = (0..MAX_COPY).map(|i| pattern(i) ^ 0x5A).collect();
    let mut host_dst = vec![1u8; MAX_COPY as usize];

    let mut g = c.benchmark_group("copy_16MiB");
    g.throughput(Throughput::Bytes(16 << 20));
    g.sample_size(20);
    g.bench_function("gpu_vm", |b| {
        b.iter(|| {
            r.run(Kernel::Copy {
                dst: GpuVa(dst),
                src: GpuVa(src),
                size: 16 << 20,
            })
        })
    });
    g.bench_function("host_memcpy", |b| {
        b.iter(|| {
            host_dst[..16 << 20].copy_from_slice(black_box(&host_src[..16 << 20]));
            black_box(&host_dst);
        })
    });
    g.finish();

    println!("copy bandwidth, GB/s (medians; the source was written, not the zero page):");
    let mut rows = Vec::new();
    for size in COPY_SIZES {
        let reps = if size >= 16 << 20 { 9 } else { 31 };
        let inner = (16 << 20) / size.min(16 << 20);
        let (mut gpu, mut guest, mut heap) = (Vec::new(), Vec::new(), Vec::new());
        // What an earlier (larger) copy left must not pass for this one's.
        r.mem
            .memory()
            .write_slice(&vec![1u8; size as usize], GuestAddress(dst_gpa))
            .unwrap();
        for _ in 0..reps {
            let t = Instant::now();
            for _ in 0..inner {
                r.run(Kernel::Copy {
                    dst: GpuVa(dst),
                    src: GpuVa(src),
                    size,
                });
            }
            gpu.push(t.elapsed() / inner as u32);
            if gpu.len() == 1 {
                verify_copy(&r.mem, src_gpa, dst_gpa, size);
            }
            let mem = r.mem.memory();
            let s = mem.get_slice(GuestAddress(src_gpa), size as usize).unwrap();
            let d = mem.get_slice(GuestAddress(dst_gpa), size as usize).unwrap();
            let t = Instant::now();
            for _ in 0..inner {
                s.copy_to_volatile_slice(d);
            }
            guest.push(t.elapsed() / inner as u32);
            let n = size as usize;
            let t = Instant::now();
            for _ in 0..inner {
                host_dst[..n].copy_from_slice(black_box(&host_src[..n]));
                black_box(&host_dst);
            }
            heap.push(t.elapsed() / inner as u32);
        }
        let gbps = |d: Duration| size as f64 / d.as_secs_f64() / 1e9;
        let (gm, sm, hm) = (median(gpu), median(guest), median(heap));
        println!(
            "  {:>8} KiB: COPY through the GPU VM {:6.2}, memcpy of the same guest buffers {:6.2}, \
             heap memcpy {:6.2}; COPY / heap memcpy {:.2}x",
            size >> 10,
            gbps(gm),
            gbps(sm),
            gbps(hm),
            hm.as_secs_f64() / gm.as_secs_f64()
        );
        rows.push(format!(
            "{size},{:.3},{:.3},{:.3}",
            gbps(gm),
            gbps(sm),
            gbps(hm)
        ));
    }
    write_csv(
        "copy_bandwidth",
        "bytes,gpu_copy_gbps,guest_memcpy_gbps,heap_memcpy_gbps",
        &rows,
    );
}

/// The GPU copy moved the right bytes (checked before the memcpy baselines
/// write the same destination).
fn verify_copy(mem: &GuestRam, src_gpa: u64, dst_gpa: u64, size: u64) {
    let mem = mem.memory();
    let mut a = vec![0u8; 4096.min(size as usize)];
    let mut b = a.clone();
    let window = a.len() as u64;
    for off in [0, (size - window) / 2, size - window] {
        mem.read_slice(&mut a, GuestAddress(src_gpa + off)).unwrap();
        mem.read_slice(&mut b, GuestAddress(dst_gpa + off)).unwrap();
        assert_eq!(a, b, "COPY of {size} bytes moved the wrong bytes at {off}");
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Writes `rows` under `header` to `target/bench-results/<name>.csv` (or
/// `$BENCH_RESULTS_DIR`), for `tools/plot`.
fn write_csv(name: &str, header: &str, rows: &[String]) {
    let dir = std::env::var_os("BENCH_RESULTS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-results")
        });
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.csv"));
    let mut text = format!("{header}\n");
    for r in rows {
        text.push_str(r);
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    println!("  (wrote {})", path.display());
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
