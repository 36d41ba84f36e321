//! User-mode queues on the simulated GPU (protocol 1.1), measured against
//! baselines in the same run:
//!
//! - SDMA `COPY_LINEAR` of 64 MiB through a GPU VM (ROCr's 4 MiB packets,
//!   filled source) against a host memcpy of the same guest buffers and of
//!   two heap buffers;
//! - the latency from a doorbell store to the first packet's effect: idle
//!   without a kick (the idle budget), idle with a kick, hot (within 2 ms of
//!   the last packet), and while another queue runs a long copy (time
//!   slicing); each against the time to read the clock;
//! - the CPU cost of N idle queues: the command processor thread's CPU time
//!   (schedstat) over a few seconds, N = 0 being the baseline.
//!
//! Run with `cargo bench -p gpu-backend --bench user_queues`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gpu_backend::sim::{SimConfig, SimGpu};
use gpu_backend::{Device, DeviceFault, DeviceVm, GuestRam, UserQueueDesc, VmConfig, VmEvents};
use guest_proto::sdma::SdmaPacket;
use guest_proto::uq::UserQueueKind;
use guest_proto::{DispatchStatus, GpuVa, GuestPhysAddr, Perms, QueueId};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};

const P: u64 = 4096;
const VA_BASE: u64 = 0x10_0000_0000;
const COPY_BYTES: u64 = 64 << 20;
const RAM: u64 = 2 * COPY_BYTES + (16 << 20);

struct NoEvents;

impl VmEvents for NoEvents {
    fn faults(&self, batch: &[DeviceFault]) {
        panic!("unexpected faults {batch:?}");
    }
    fn dispatch_done(&self, _q: QueueId, _tag: u64, _s: DispatchStatus) {}
}

struct Rig {
    mem: GuestRam,
    vm: Arc<dyn DeviceVm>,
    _gpu: Arc<SimGpu>,
    next: u64,
}

fn va(gpa: u64) -> GpuVa {
    GpuVa(VA_BASE + gpa)
}

impl Rig {
    fn new() -> Rig {
        let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let mem = GuestMemoryAtomic::new(mmap);
        let gpu = SimGpu::new(SimConfig {
            compute_units: 1,
            ..SimConfig::default()
        });
        let vm = gpu
            .create_vm(
                VmConfig {
                    memory: mem.clone(),
                    max_pending_faults: 64,
                    max_queue_depth: 16,
                },
                Arc::new(NoEvents),
            )
            .unwrap();
        Rig {
            mem,
            vm,
            _gpu: gpu,
            next: 0x10_0000,
        }
    }

    fn alloc(&mut self, bytes: u64) -> u64 {
        let gpa = self.next;
        self.next += bytes.next_multiple_of(P);
        assert!(self.next <= RAM);
        let pages: Vec<GuestPhysAddr> = (0..bytes.div_ceil(P))
            .map(|i| GuestPhysAddr(gpa + i * P))
            .collect();
        for chunk in pages.chunks(512) {
            let at = chunk[0].raw();
            self.vm.map(va(at), chunk, Perms::RW).unwrap();
        }
        gpa
    }

    fn u32(&self, gpa: u64) -> u32 {
        self.mem
            .memory()
            .load(GuestAddress(gpa), Ordering::Acquire)
            .unwrap()
    }

    fn u64(&self, gpa: u64) -> u64 {
        self.mem
            .memory()
            .load(GuestAddress(gpa), Ordering::Acquire)
            .unwrap()
    }

    fn store_u64(&self, gpa: u64, v: u64) {
        self.mem
            .memory()
            .store(v, GuestAddress(gpa), Ordering::Release)
            .unwrap();
    }

    fn sdma(&mut self, ring_size: u64) -> Sdma {
        let ring = self.alloc(ring_size);
        let ctl = self.alloc(P);
        self.vm
            .create_user_queue(UserQueueDesc {
                kind: UserQueueKind::Sdma,
                priority: 0,
                ring: va(ring),
                ring_size,
                rptr: va(ctl),
                doorbell: va(ctl + 8),
                status: Some(va(ctl + 64)),
            })
            .unwrap();
        Sdma {
            ring,
            ctl,
            size: ring_size,
            wptr: 0,
        }
    }
}

struct Sdma {
    ring: u64,
    ctl: u64,
    size: u64,
    wptr: u64,
}

impl Sdma {
    /// Writes the packets (they must fit before the ring's end, or wrap on
    /// a packet boundary) without ringing the doorbell.
    fn write(&mut self, r: &Rig, packets: &[SdmaPacket]) {
        let mem = r.mem.memory();
        for p in packets {
            let bytes = p.encode_bytes();
            for (i, b) in bytes.iter().enumerate() {
                let off = (self.wptr + i as u64) % self.size;
                mem.write_obj(*b, GuestAddress(self.ring + off)).unwrap();
            }
            self.wptr += bytes.len() as u64;
        }
    }

    fn doorbell(&self, r: &Rig) {
        r.store_u64(self.ctl + 8, self.wptr);
    }

    fn wait_done(&self, r: &Rig) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while r.u64(self.ctl) != self.wptr {
            assert!(Instant::now() < deadline, "queue stuck");
            std::hint::spin_loop();
        }
    }

    /// Waits sleeping, leaving the cores to the engine (a spinning waiter
    /// would take one of the two cores of the machine from it).
    fn wait_done_sleeping(&self, r: &Rig) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while r.u64(self.ctl) != self.wptr {
            assert!(Instant::now() < deadline, "queue stuck");
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

fn copy_bandwidth() {
    let mut r = Rig::new();
    let mut q = r.sdma(1 << 16);
    let src = r.alloc(COPY_BYTES);
    let dst = r.alloc(COPY_BYTES);
    {
        // A written source (not the zero page) and a touched destination.
        let mem = r.mem.memory();
        let data: Vec<u8> = (0..COPY_BYTES)
            .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 12) as u8)
            .collect();
        mem.write_slice(&data, GuestAddress(src)).unwrap();
        mem.write_slice(&vec![1u8; COPY_BYTES as usize], GuestAddress(dst))
            .unwrap();
    }
    // ROCr splits copies into packets of at most 0x3fffe0 bytes.
    let max = 0x3F_FFE0;
    let mut packets = Vec::new();
    let mut done = 0;
    while done < COPY_BYTES {
        let n = (COPY_BYTES - done).min(max);
        packets.push(SdmaPacket::CopyLinear {
            src: va(src + done),
            dst: va(dst + done),
            bytes: n,
        });
        done += n;
    }
    let runs = 15;
    let mut engine = Vec::new();
    let mut guest_memcpy = Vec::new();
    let mut heap_memcpy = Vec::new();
    let host_src: Vec<u8> = (0..COPY_BYTES).map(|i| (i as u8) ^ 0x5A).collect();
    let mut host_dst = vec![0u8; COPY_BYTES as usize];
    for _ in 0..runs {
        // Interleaved, so both see the same machine state.
        q.write(&r, &packets);
        let t = Instant::now();
        q.doorbell(&r);
        r.vm.kick();
        q.wait_done_sleeping(&r);
        engine.push(t.elapsed());

        let mem = r.mem.memory();
        let s = mem
            .get_slice(GuestAddress(src), COPY_BYTES as usize)
            .unwrap();
        let d = mem
            .get_slice(GuestAddress(dst), COPY_BYTES as usize)
            .unwrap();
        let t = Instant::now();
        s.copy_to_volatile_slice(d);
        guest_memcpy.push(t.elapsed());

        let t = Instant::now();
        host_dst.copy_from_slice(std::hint::black_box(&host_src));
        std::hint::black_box(&host_dst);
        heap_memcpy.push(t.elapsed());
    }
    let ok = {
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        let mem = r.mem.memory();
        (0..COPY_BYTES / P).step_by(97).all(|i| {
            mem.read_slice(&mut a, GuestAddress(src + i * P)).unwrap();
            mem.read_slice(&mut b, GuestAddress(dst + i * P)).unwrap();
            a == b
        })
    };
    assert!(ok, "the copies moved the wrong bytes");
    let gbps = |d: Duration| COPY_BYTES as f64 / d.as_secs_f64() / 1e9;
    // Each engine run is followed by a memcpy run: their ratio is robust to
    // the machine's load drifting during the benchmark.
    let mut ratios: Vec<f64> = engine
        .iter()
        .zip(&guest_memcpy)
        .map(|(e, g)| g.as_secs_f64() / e.as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    let pair_ratio = ratios[ratios.len() / 2];
    let (e, g, h) = (median(engine), median(guest_memcpy), median(heap_memcpy));
    println!(
        "SDMA COPY_LINEAR 64 MiB through the GPU VM (16 packets): median {:?} = {:.2} GB/s",
        e,
        gbps(e)
    );
    println!(
        "  baseline memcpy of the same guest buffers: {:?} = {:.2} GB/s; heap memcpy: {:?} = {:.2} GB/s",
        g,
        gbps(g),
        h,
        gbps(h)
    );
    println!(
        "  engine / memcpy of the same buffers: {:.0}% of the medians, {:.0}% median of the {} \
         back-to-back pairs (goal >= 50%)",
        100.0 * g.as_secs_f64() / e.as_secs_f64(),
        100.0 * pair_ratio,
        runs
    );
}

/// Time from the doorbell store to the first packet's effect (a FENCE).
fn first_packet_latency() {
    let mut r = Rig::new();
    let mut q = r.sdma(1 << 16);
    let marker = r.alloc(P);
    let mut big = r.sdma(1 << 16);
    let src = r.alloc(16 << 20);
    let dst = r.alloc(16 << 20);
    let mut seq = 0u32;
    let mut one = |r: &Rig, q: &mut Sdma, kick: bool| -> Duration {
        seq += 1;
        if q.size - q.wptr % q.size < 64 {
            q.write(
                r,
                &[SdmaPacket::Nop {
                    dwords: ((q.size - q.wptr % q.size) / 4) as u32,
                }],
            );
        }
        q.write(
            r,
            &[SdmaPacket::Fence {
                addr: va(marker),
                data: seq,
            }],
        );
        let t = Instant::now();
        q.doorbell(r);
        if kick {
            r.vm.kick();
        }
        while r.u32(marker) != seq {
            std::hint::spin_loop();
        }
        let d = t.elapsed();
        q.wait_done(r);
        d
    };
    let clock = {
        let t = Instant::now();
        for _ in 0..1000 {
            std::hint::black_box(Instant::now());
        }
        t.elapsed() / 1000
    };
    let report = |name: &str, mut v: Vec<Duration>| {
        let mean = v.iter().sum::<Duration>() / v.len() as u32;
        println!(
            "doorbell -> first packet, {name}: p50 {:?}, p99 {:?}, mean {:?} ({} samples)",
            pct(&mut v, 50),
            pct(&mut v, 99),
            mean,
            v.len()
        );
    };
    println!("  baseline: reading the clock costs {clock:?}");

    // Idle: more than the 2 ms hot window since the last packet.
    let mut idle = Vec::new();
    for i in 0..60 {
        std::thread::sleep(Duration::from_millis(3 + (i % 7)));
        idle.push(one(&r, &mut q, false));
    }
    report("idle, no kick (10 ms budget)", idle);
    let mut kicked = Vec::new();
    for i in 0..60 {
        std::thread::sleep(Duration::from_millis(3 + (i % 7)));
        kicked.push(one(&r, &mut q, true));
    }
    report("idle, DOORBELL_KICK", kicked);
    // Hot: the next packet 100 us to 1 ms after the previous one.
    one(&r, &mut q, true);
    let mut hot = Vec::new();
    for i in 0..300 {
        std::thread::sleep(Duration::from_micros(100 + (i % 10) * 90));
        hot.push(one(&r, &mut q, false));
    }
    report("hot (50 us budget), no kick", hot);
    // Busy: another queue copies 16 MiB chunks back to back meanwhile.
    let mut busy = Vec::new();
    for _ in 0..40 {
        big.write(
            &r,
            &[SdmaPacket::CopyLinear {
                src: va(src),
                dst: va(dst),
                bytes: 4 << 20,
            }; 4],
        );
        big.doorbell(&r);
        r.vm.kick();
        std::thread::sleep(Duration::from_micros(300));
        busy.push(one(&r, &mut q, true));
        big.wait_done(&r);
    }
    report("while a queue of the same VM copies 16 MiB, kick", busy);

    // Busy, another context: a second VM's queue copies meanwhile (VMs
    // share the device equally, so the wait is at most about a slice).
    let vm2 = r
        ._gpu
        .create_vm(
            VmConfig {
                memory: r.mem.clone(),
                max_pending_faults: 64,
                max_queue_depth: 16,
            },
            Arc::new(NoEvents),
        )
        .unwrap();
    let ring2 = r.alloc(1 << 16);
    let ctl2 = r.alloc(P);
    for (gpa, bytes) in [
        (ring2, 1 << 16),
        (ctl2, P),
        (src, 16 << 20),
        (dst, 16 << 20),
    ] {
        let pages: Vec<GuestPhysAddr> =
            (0..bytes / P).map(|i| GuestPhysAddr(gpa + i * P)).collect();
        for chunk in pages.chunks(512) {
            vm2.map(va(chunk[0].raw()), chunk, Perms::RW).unwrap();
        }
    }
    vm2.create_user_queue(UserQueueDesc {
        kind: UserQueueKind::Sdma,
        priority: 0,
        ring: va(ring2),
        ring_size: 1 << 16,
        rptr: va(ctl2),
        doorbell: va(ctl2 + 8),
        status: Some(va(ctl2 + 64)),
    })
    .unwrap();
    let mut other = Sdma {
        ring: ring2,
        ctl: ctl2,
        size: 1 << 16,
        wptr: 0,
    };
    let mut busy = Vec::new();
    for _ in 0..40 {
        other.write(
            &r,
            &[SdmaPacket::CopyLinear {
                src: va(src),
                dst: va(dst),
                bytes: 4 << 20,
            }; 4],
        );
        other.doorbell(&r);
        vm2.kick();
        std::thread::sleep(Duration::from_micros(300));
        busy.push(one(&r, &mut q, true));
        other.wait_done(&r);
    }
    report("while another VM's queue copies 16 MiB, kick", busy);
}

/// CPU time (ns, schedstat) of this process's threads named `name`, or
/// of all its threads.
fn threads_cpu_ns(name: Option<&str>) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = entry.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if name.is_some_and(|n| comm.trim() != n) {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

fn idle_cost() {
    let window = Duration::from_secs(3);
    for n in [0usize, 16, 64, 256] {
        // 64 queues per VM (the simulated GPU's limit): more VMs, one GPU.
        let mut r = Rig::new();
        let mut extra = Vec::new();
        let mut queues = Vec::new();
        for i in 0..n {
            if i > 0 && i % 64 == 0 {
                let vm = r
                    ._gpu
                    .create_vm(
                        VmConfig {
                            memory: r.mem.clone(),
                            max_pending_faults: 64,
                            max_queue_depth: 16,
                        },
                        Arc::new(NoEvents),
                    )
                    .unwrap();
                extra.push(std::mem::replace(&mut r.vm, vm));
            }
            queues.push(r.sdma(P));
        }
        let vms: Vec<Arc<dyn DeviceVm>> = extra.iter().cloned().chain([r.vm.clone()]).collect();
        std::thread::sleep(Duration::from_millis(50));
        let polls_of = |vms: &[Arc<dyn DeviceVm>]| {
            vms.iter()
                .map(|v| v.user_queue_counters().doorbell_polls)
                .sum::<u64>()
        };
        let polls0 = polls_of(&vms);
        let (cp0, all0, t0) = (
            threads_cpu_ns(Some("sim-cp")),
            threads_cpu_ns(None),
            Instant::now(),
        );
        std::thread::sleep(window);
        let elapsed = t0.elapsed().as_secs_f64();
        let cp = (threads_cpu_ns(Some("sim-cp")) - cp0) as f64 / 1e9 / elapsed;
        let all = (threads_cpu_ns(None) - all0) as f64 / 1e9 / elapsed;
        let polls = polls_of(&vms) - polls0;
        println!(
            "{n:3} idle queues: command processor {:.3}% of one core, whole process {:.3}%, \
             {:.0} doorbell loads/s ({:.0} per queue)",
            cp * 100.0,
            all * 100.0,
            polls as f64 / elapsed,
            polls as f64 / elapsed / n.max(1) as f64
        );
        drop(queues);
        drop(extra);
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs it too,
    // briefly.
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--test") {
        return;
    }
    // Optional filters: `copy`, `latency`, `idle` (default: all).
    let want = |name: &str| {
        let filters: Vec<&String> = args
            .iter()
            .skip(1)
            .filter(|a| !a.starts_with("--"))
            .collect();
        filters.is_empty() || filters.iter().any(|f| f.as_str() == name)
    };
    if want("copy") {
        copy_bandwidth();
    }
    if want("latency") {
        first_packet_latency();
    }
    if want("idle") {
        idle_cost();
    }
}
