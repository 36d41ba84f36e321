//! User-mode queues on the simulated GPU (protocol 1.1, section 14),
//! through the `Device` trait: the copy engine and the AQL packet
//! processor compute the right data through the page tables, faults replay
//! with every effect applied once, bad packets and lying doorbells stop
//! only their own queue, and destroy ends everything.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gpu_backend::device::QueueDesc;
use gpu_backend::sim::{SimConfig, SimGpu};
use gpu_backend::{
    Device, DeviceError, DeviceFault, DeviceVm, FaultAction, GuestRam, Interrupt, KernelLaunch,
    UserQueueDesc, VmConfig, VmEvents,
};
use guest_proto::aql::{AqlPacket, BarrierKind, packet_type};
use guest_proto::sdma::{AtomicOp, PollFunc, SdmaPacket};
use guest_proto::uq::{QueueStatusBlock, QueueStopStatus, UserQueueKind};
use guest_proto::{AccessFlags, DispatchStatus, GpuVa, GuestPhysAddr, Kernel, Perms, QueueId};
use parking_lot::{Condvar, Mutex};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

const RAM: u64 = 160 << 20;
const P: u64 = 4096;
/// Guest-physical address `g` is mapped at VA `VA_BASE + g`.
const VA_BASE: u64 = 0x10_0000_0000;
const WAIT: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Recorder {
    faults: Mutex<Vec<DeviceFault>>,
    interrupts: Mutex<Vec<Interrupt>>,
    wake: Condvar,
    /// Read when an interrupt arrives: what the guest would see then.
    probe: Mutex<Option<(GuestRam, u64)>>,
    probed: Mutex<Vec<u32>>,
}

impl VmEvents for Recorder {
    fn faults(&self, batch: &[DeviceFault]) {
        self.faults.lock().extend_from_slice(batch);
        self.wake.notify_all();
    }

    fn dispatch_done(&self, _queue: QueueId, _tag: u64, _status: DispatchStatus) {
        self.wake.notify_all();
    }

    fn interrupt(&self, irq: Interrupt) {
        if let Some((mem, gpa)) = self.probe.lock().as_ref() {
            let v: u32 = mem
                .memory()
                .load(GuestAddress(*gpa), Ordering::Acquire)
                .unwrap();
            self.probed.lock().push(v);
        }
        self.interrupts.lock().push(irq);
        self.wake.notify_all();
    }
}

impl Recorder {
    fn wait_faults(&self, n: usize) -> Vec<DeviceFault> {
        let deadline = Instant::now() + WAIT;
        let mut f = self.faults.lock();
        while f.len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} faults: {:?}",
                f.len(),
                *f
            );
            self.wake.wait_for(&mut f, Duration::from_millis(5));
        }
        std::mem::take(&mut *f)
    }

    fn wait_interrupts(&self, n: usize) -> Vec<Interrupt> {
        let deadline = Instant::now() + WAIT;
        let mut i = self.interrupts.lock();
        while i.len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} interrupts: {:?}",
                i.len(),
                *i
            );
            self.wake.wait_for(&mut i, Duration::from_millis(5));
        }
        i.clone()
    }
}

struct Rig {
    mem: GuestRam,
    events: Arc<Recorder>,
    vm: Arc<dyn DeviceVm>,
    gpu: Arc<SimGpu>,
    next_gpa: u64,
}

fn rig() -> Rig {
    let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let mem = GuestMemoryAtomic::new(mmap);
    let gpu = SimGpu::new(SimConfig {
        compute_units: 1,
        ..SimConfig::default()
    });
    let events = Arc::new(Recorder::default());
    let vm = gpu
        .create_vm(
            VmConfig {
                memory: mem.clone(),
                max_pending_faults: 256,
                max_queue_depth: 16,
            },
            events.clone(),
        )
        .unwrap();
    Rig {
        mem,
        events,
        vm,
        gpu,
        next_gpa: 0x10_0000,
    }
}

fn va(gpa: u64) -> GpuVa {
    GpuVa(VA_BASE + gpa)
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

impl Rig {
    /// Fresh guest memory (page-aligned), not mapped.
    fn alloc(&mut self, bytes: u64) -> u64 {
        let gpa = self.next_gpa;
        self.next_gpa += bytes.next_multiple_of(P);
        assert!(self.next_gpa <= RAM);
        gpa
    }

    /// Fresh guest memory mapped RW at `va(gpa)`.
    fn alloc_mapped(&mut self, bytes: u64) -> u64 {
        let gpa = self.alloc(bytes);
        self.map(gpa, bytes);
        gpa
    }

    fn map(&self, gpa: u64, bytes: u64) {
        let pages: Vec<GuestPhysAddr> = (0..bytes.div_ceil(P))
            .map(|i| GuestPhysAddr(gpa + i * P))
            .collect();
        self.vm.map(va(gpa), &pages, Perms::RW).unwrap();
    }

    fn unmap(&self, gpa: u64, bytes: u64) {
        self.vm.unmap(va(gpa), bytes.next_multiple_of(P)).unwrap();
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        self.mem
            .memory()
            .write_slice(bytes, GuestAddress(gpa))
            .unwrap();
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .memory()
            .read_slice(&mut v, GuestAddress(gpa))
            .unwrap();
        v
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

    fn store_u32(&self, gpa: u64, v: u32) {
        self.mem
            .memory()
            .store(v, GuestAddress(gpa), Ordering::Release)
            .unwrap();
    }

    fn store_u64(&self, gpa: u64, v: u64) {
        self.mem
            .memory()
            .store(v, GuestAddress(gpa), Ordering::Release)
            .unwrap();
    }

    /// Maps every faulted page at its identity GPA and replays it.
    fn resolve(&self, faults: &[DeviceFault]) {
        for f in faults {
            let gpa = f.va.raw() - VA_BASE;
            let _ = self.vm.map(f.va, &[GuestPhysAddr(gpa)], Perms::RW);
            self.vm.reply_fault(f.id, FaultAction::Replay).unwrap();
        }
    }

    /// A filled buffer: every byte depends on its offset and `seed`.
    fn filled(&mut self, bytes: u64, seed: u8, mapped: bool) -> (u64, Vec<u8>) {
        let gpa = if mapped {
            self.alloc_mapped(bytes)
        } else {
            self.alloc(bytes)
        };
        let data: Vec<u8> = (0..bytes)
            .map(|i| {
                (i as u8)
                    .wrapping_mul(31)
                    .wrapping_add(seed ^ (i >> 12) as u8)
            })
            .collect();
        self.write(gpa, &data);
        (gpa, data)
    }
}

/// The control page of a queue: rptr at 0, doorbell at 8, status at 64.
struct Ctl {
    gpa: u64,
}

impl Ctl {
    fn rptr(&self) -> u64 {
        self.gpa
    }
    fn doorbell(&self) -> u64 {
        self.gpa + 8
    }
    fn status(&self) -> u64 {
        self.gpa + 64
    }
}

struct Sdma {
    id: QueueId,
    ring: u64,
    size: u64,
    ctl: Ctl,
    wptr: u64,
}

impl Rig {
    fn sdma(&mut self, ring_size: u64, priority: u8) -> Sdma {
        let ring = self.alloc_mapped(ring_size);
        let ctl = Ctl {
            gpa: self.alloc_mapped(P),
        };
        self.sdma_at(ring, ring_size, ctl, priority)
    }

    fn sdma_at(&mut self, ring: u64, ring_size: u64, ctl: Ctl, priority: u8) -> Sdma {
        let id = self
            .vm
            .create_user_queue(UserQueueDesc {
                kind: UserQueueKind::Sdma,
                priority,
                ring: va(ring),
                ring_size,
                rptr: va(ctl.rptr()),
                doorbell: va(ctl.doorbell()),
                status: Some(va(ctl.status())),
            })
            .unwrap();
        Sdma {
            id,
            ring,
            size: ring_size,
            ctl,
            wptr: 0,
        }
    }
}

impl Sdma {
    fn push_bytes(&mut self, r: &Rig, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let off = (self.wptr + i as u64) % self.size;
            r.write(self.ring + off, std::slice::from_ref(b));
        }
        self.wptr += bytes.len() as u64;
    }

    fn push(&mut self, r: &Rig, p: SdmaPacket) {
        self.push_bytes(r, &p.encode_bytes());
    }

    fn ring_doorbell(&self, r: &Rig) {
        r.store_u64(self.ctl.doorbell(), self.wptr);
    }

    fn submit(&mut self, r: &Rig, packets: &[SdmaPacket]) {
        for p in packets {
            self.push(r, *p);
        }
        self.ring_doorbell(r);
        r.vm.kick();
    }

    fn rptr(&self, r: &Rig) -> u64 {
        r.u64(self.ctl.rptr())
    }

    fn wait_done(&self, r: &Rig) {
        wait_until("the SDMA queue to drain", || self.rptr(r) == self.wptr);
    }

    fn status(&self, r: &Rig) -> Option<QueueStatusBlock> {
        QueueStatusBlock::decode(&r.read(self.ctl.status(), 64)).unwrap()
    }

    fn wait_stopped(&self, r: &Rig) -> QueueStatusBlock {
        let mut block = None;
        wait_until("the queue to stop", || {
            block = self.status(r);
            block.is_some()
        });
        block.unwrap()
    }
}

fn copy(src: u64, dst: u64, bytes: u64) -> SdmaPacket {
    SdmaPacket::CopyLinear {
        src: va(src),
        dst: va(dst),
        bytes,
    }
}

/// `bytes` split into COPY_LINEAR packets of at most 4 MiB, as ROCr does.
fn copies(src: u64, dst: u64, bytes: u64) -> Vec<SdmaPacket> {
    let max = 0x3F_FFE0;
    let mut v = Vec::new();
    let mut done = 0;
    while done < bytes {
        let n = (bytes - done).min(max);
        v.push(copy(src + done, dst + done, n));
        done += n;
    }
    v
}

#[test]
fn sdma_copy_moves_a_filled_source() {
    let mut r = rig();
    let mut q = r.sdma(1 << 16, 8);
    let bytes = 9 << 20;
    let (src, data) = r.filled(bytes, 7, true);
    let dst = r.alloc_mapped(bytes + P);
    r.write(dst + bytes, &[0xEE; 64]);
    let marker = r.alloc_mapped(P);
    let mut packets = copies(src, dst, bytes);
    packets.push(SdmaPacket::Fence {
        addr: va(marker),
        data: 0xD00E,
    });
    q.submit(&r, &packets);
    q.wait_done(&r);
    assert_eq!(r.u32(marker), 0xD00E);
    assert!(r.read(dst, bytes as usize) == data, "destination differs");
    assert_eq!(r.read(dst + bytes, 64), vec![0xEE; 64], "copied too far");
    let c = r.vm.user_queue_counters();
    assert_eq!(c.copy_bytes, bytes);
    assert_eq!(c.packets, packets.len() as u64);
    assert!(c.doorbell_polls >= 1);
    assert_eq!(q.status(&r), None);
}

#[test]
fn copy_over_unbound_pages_faults_once_per_page_and_completes_exactly() {
    let mut r = rig();
    let mut q = r.sdma(1 << 12, 0);
    let bytes = 16 * P + 100;
    // Source: pages 2 and 9 unbound. Destination: pages 0, 5..8 unbound.
    let (src, data) = r.filled(bytes + P, 3, true);
    let dst = r.alloc_mapped(bytes + P);
    r.unmap(src + 2 * P, P);
    r.unmap(src + 9 * P, P);
    r.unmap(dst, P);
    r.unmap(dst + 5 * P, 3 * P);
    // Unaligned ends: 50 bytes into both.
    q.submit(&r, &[copy(src + 50, dst + 50, bytes - 50)]);
    let mut seen = Vec::new();
    while q.rptr(&r) != q.wptr {
        let faults = {
            let mut f = r.events.faults.lock();
            std::mem::take(&mut *f)
        };
        if faults.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        for f in &faults {
            assert_eq!(f.queue, q.id);
            assert_eq!(f.merged, 1);
            seen.push((f.va.raw() - VA_BASE, f.access));
        }
        r.resolve(&faults);
        assert!(seen.len() <= 6, "faults {seen:?}");
    }
    seen.sort_by_key(|(gpa, _)| *gpa);
    let mut expected = vec![
        (src + 2 * P, AccessFlags::READ),
        (src + 9 * P, AccessFlags::READ),
        (dst, AccessFlags::WRITE),
        (dst + 5 * P, AccessFlags::WRITE),
        (dst + 6 * P, AccessFlags::WRITE),
        (dst + 7 * P, AccessFlags::WRITE),
    ];
    expected.sort_by_key(|(gpa, _)| *gpa);
    assert_eq!(seen, expected, "one fault per page, with its access");
    let out = r.read(dst, (bytes + P) as usize);
    assert_eq!(&out[..50], &[0u8; 50][..], "before the copy");
    assert!(
        out[50..bytes as usize] == data[50..bytes as usize],
        "copied data"
    );
    assert!(
        out[bytes as usize..].iter().all(|b| *b == 0),
        "after the copy"
    );
    assert_eq!(r.vm.user_queue_counters().copy_bytes, bytes - 50);
}

#[test]
fn const_fill_writes_elements_as_rocr_and_linux_encode_them() {
    let mut r = rig();
    let mut q = r.sdma(1 << 12, 0);
    let buf = r.alloc_mapped(4 * P);
    r.write(buf, &vec![0x55; (4 * P) as usize]);
    // ROCr's DW fill: count = (dwords - 1) * 4, 2000 dwords over two pages.
    let dw_fill = [
        11 | (2 << 30),
        (va(buf + 8).raw()) as u32,
        (va(buf + 8).raw() >> 32) as u32,
        0xA1B2_C3D4,
        (2000 - 1) * 4,
    ];
    let bytes: Vec<u8> = dw_fill.iter().flat_map(|d| d.to_le_bytes()).collect();
    q.push_bytes(&r, &bytes);
    // A byte fill of 3 bytes at an odd address.
    q.submit(
        &r,
        &[SdmaPacket::ConstFill {
            dst: va(buf + 3 * P + 1),
            data: 0x77,
            element_shift: 0,
            elements: 3,
        }],
    );
    q.wait_done(&r);
    let out = r.read(buf, (4 * P) as usize);
    assert_eq!(&out[..8], &[0x55; 8]);
    for i in 0..2000 {
        let at = 8 + i * 4;
        assert_eq!(
            u32::from_le_bytes(out[at..at + 4].try_into().unwrap()),
            0xA1B2_C3D4,
            "dword {i}"
        );
    }
    assert_eq!(out[8 + 8000], 0x55, "one past the fill");
    let at = (3 * P) as usize;
    assert_eq!(&out[at..at + 5], &[0x55, 0x77, 0x77, 0x77, 0x55]);
    assert_eq!(r.vm.user_queue_counters().copy_bytes, 8000 + 3);
}

#[test]
fn atomic_is_applied_once_across_faults_before_and_after_it() {
    let mut r = rig();
    let ring = r.alloc_mapped(P);
    let counter = r.alloc(P);
    r.store_u64(counter + 8, 100);
    // The read pointer lives on a page that is not bound: retiring the
    // packet faults, after its effect.
    let rptr_page = r.alloc(P);
    let q =
        r.vm.create_user_queue(UserQueueDesc {
            kind: UserQueueKind::Sdma,
            priority: 0,
            ring: va(ring),
            ring_size: P,
            rptr: va(rptr_page),
            doorbell: va(ring + P - 8),
            status: None,
        })
        .unwrap();
    // The doorbell sits in the ring's last dword pair; packets stay below.
    let add = SdmaPacket::Atomic {
        op: AtomicOp::Add,
        wide: true,
        addr: va(counter + 8),
        src: 5,
        cmp: 0,
    };
    let bytes = add.encode_bytes();
    r.write(ring, &bytes);
    r.store_u64(ring + P - 8, bytes.len() as u64);
    r.vm.kick();
    // First fault: the counter (ATOMIC), the effect not yet applied.
    let f = r.events.wait_faults(1);
    assert_eq!(f[0].queue, q);
    assert_eq!(f[0].va, va(counter));
    assert_eq!(f[0].access, AccessFlags::ATOMIC);
    assert_eq!(r.u64(counter + 8), 100);
    r.resolve(&f);
    // Second fault: the read pointer, after the effect.
    let f = r.events.wait_faults(1);
    assert_eq!(f[0].va, va(rptr_page));
    assert_eq!(f[0].access, AccessFlags::WRITE);
    assert_eq!(r.u64(counter + 8), 105);
    // Replayed twice more before it is really resolved: still once.
    r.vm.reply_fault(f[0].id, FaultAction::Replay).unwrap();
    let f = r.events.wait_faults(1);
    assert_eq!(f[0].va, va(rptr_page));
    assert_eq!(r.u64(counter + 8), 105);
    r.resolve(&f);
    wait_until("rptr", || r.u64(rptr_page) == bytes.len() as u64);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(r.u64(counter + 8), 105, "applied exactly once");
    assert_eq!(r.vm.user_queue_counters().packets, 1);
}

#[test]
fn fence_then_trap_raise_one_interrupt_after_the_mailbox_is_written() {
    let mut r = rig();
    let mut q = r.sdma(1 << 12, 0);
    let mailbox = r.alloc_mapped(P);
    *r.events.probe.lock() = Some((r.mem.clone(), mailbox));
    let signal = r.alloc_mapped(P);
    r.store_u64(signal + 8, 1);
    // What ROCr appends to a copy: decrement, FENCE(mailbox, id), TRAP(id).
    q.submit(
        &r,
        &[
            SdmaPacket::Atomic {
                op: AtomicOp::Add,
                wide: true,
                addr: va(signal + 8),
                src: u64::MAX,
                cmp: 0,
            },
            SdmaPacket::Fence {
                addr: va(mailbox),
                data: 42,
            },
            SdmaPacket::Trap { int_ctx: 42 },
        ],
    );
    let irqs = r.events.wait_interrupts(1);
    assert_eq!(
        irqs,
        vec![Interrupt::Trap {
            queue: q.id,
            int_ctx: 42
        }]
    );
    assert_eq!(
        *r.events.probed.lock(),
        vec![42],
        "mailbox before interrupt"
    );
    assert_eq!(r.u64(signal + 8), 0);
    q.wait_done(&r);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(r.events.interrupts.lock().len(), 1, "one interrupt");
}

#[test]
fn timestamps_grow_and_register_polls_complete() {
    let mut r = rig();
    let mut q = r.sdma(1 << 12, 0);
    let out = r.alloc_mapped(P);
    q.submit(
        &r,
        &[
            SdmaPacket::Timestamp { addr: va(out) },
            SdmaPacket::PollRegister,
            SdmaPacket::Nop { dwords: 5 },
            SdmaPacket::Timestamp { addr: va(out + 8) },
        ],
    );
    q.wait_done(&r);
    let (a, b) = (r.u64(out), r.u64(out + 8));
    assert!(a > 0 && b >= a, "timestamps {a} {b}");
}

#[test]
fn poll_regmem_waits_for_memory_then_continues() {
    let mut r = rig();
    let mut q = r.sdma(1 << 12, 0);
    let flag = r.alloc_mapped(P);
    r.store_u32(flag, 7);
    let marker = r.alloc_mapped(P);
    // ROCr's dependency wait: (value & mask) == 0.
    q.submit(
        &r,
        &[
            SdmaPacket::PollMemory {
                addr: va(flag),
                reference: 0,
                mask: 0xFFFF_FFFF,
                func: PollFunc::Equal,
            },
            SdmaPacket::Fence {
                addr: va(marker),
                data: 1,
            },
        ],
    );
    std::thread::sleep(Duration::from_millis(40));
    assert_eq!(r.u32(marker), 0, "the fence waited for the poll");
    assert_eq!(q.rptr(&r), 0, "the poll has not completed");
    // No kick: the budget looks again within 10 ms.
    r.store_u32(flag, 0);
    wait_until("the poll", || r.u32(marker) == 1);
    q.wait_done(&r);
}

#[test]
fn unknown_opcode_stops_only_its_queue() {
    let mut r = rig();
    let mut bad = r.sdma(1 << 12, 0);
    let mut good = r.sdma(1 << 12, 0);
    let marker = r.alloc_mapped(P);
    bad.submit(
        &r,
        &[SdmaPacket::Fence {
            addr: va(marker),
            data: 1,
        }],
    );
    bad.push_bytes(&r, &0x0000_1233u32.to_le_bytes());
    bad.push(
        &r,
        SdmaPacket::Fence {
            addr: va(marker + 4),
            data: 2,
        },
    );
    bad.ring_doorbell(&r);
    let block = bad.wait_stopped(&r);
    assert_eq!(block.status, QueueStopStatus::BadPacket);
    assert_eq!(block.packet, 16, "the packet after the 16-byte fence");
    assert_eq!(block.detail, 0x1233);
    assert_eq!(r.u32(marker), 1);
    assert_eq!(r.u32(marker + 4), 0, "nothing after the bad packet");
    assert_eq!(bad.rptr(&r), 16);
    let irqs = r.events.wait_interrupts(1);
    assert_eq!(
        irqs[0],
        Interrupt::QueueStopped {
            queue: bad.id,
            status: QueueStopStatus::BadPacket
        }
    );
    // The other queue runs on; the stopped one reads nothing more.
    let (src, data) = r.filled(3 * P, 1, true);
    let dst = r.alloc_mapped(3 * P);
    good.submit(&r, &[copy(src, dst, 3 * P)]);
    good.wait_done(&r);
    assert_eq!(r.read(dst, (3 * P) as usize), data);
    bad.push(
        &r,
        SdmaPacket::Fence {
            addr: va(marker + 8),
            data: 3,
        },
    );
    bad.ring_doorbell(&r);
    r.vm.kick();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(r.u32(marker + 8), 0);
    assert_eq!(bad.rptr(&r), 16);
    // An unsupported packet: COPY_LINEAR_RECT.
    let mut rect = r.sdma(1 << 12, 0);
    rect.push_bytes(&r, &[1u32 | (4 << 8); 13].map(u32::to_le_bytes).concat());
    rect.ring_doorbell(&r);
    let block = rect.wait_stopped(&r);
    assert_eq!(block.status, QueueStopStatus::UnsupportedPacket);
    assert_eq!(block.detail, 0x401);
}

#[test]
fn doorbells_that_lie_stop_the_queue_without_a_hang() {
    let mut r = rig();
    for (value, what) in [(P + 16, "beyond the ring"), (6, "not a dword")] {
        let q = r.sdma(P, 0);
        r.store_u64(q.ctl.doorbell(), value);
        r.vm.kick();
        let block = q.wait_stopped(&r);
        assert_eq!(block.status, QueueStopStatus::BadDoorbell, "{what}");
        assert_eq!(block.detail, value, "{what}");
        assert_eq!(block.packet, 0);
    }
    // Backwards: after 16 bytes were consumed, a doorbell of 8.
    let mut q = r.sdma(P, 0);
    let marker = r.alloc_mapped(P);
    q.submit(
        &r,
        &[SdmaPacket::Fence {
            addr: va(marker),
            data: 9,
        }],
    );
    q.wait_done(&r);
    r.store_u64(q.ctl.doorbell(), 8);
    r.vm.kick();
    let block = q.wait_stopped(&r);
    assert_eq!(block.status, QueueStopStatus::BadDoorbell);
    assert_eq!((block.packet, block.detail), (16, 8));
    // A doorbell that covers half a packet is not a lie: the engine waits.
    let mut q = r.sdma(P, 0);
    let fence = SdmaPacket::Fence {
        addr: va(marker + 4),
        data: 5,
    };
    q.push(&r, fence);
    r.store_u64(q.ctl.doorbell(), 8);
    r.vm.kick();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!((r.u32(marker + 4), q.status(&r)), (0, None));
    q.ring_doorbell(&r);
    q.wait_done(&r);
    assert_eq!(r.u32(marker + 4), 5);
}

#[test]
fn packets_wrap_around_the_ring_end() {
    let mut r = rig();
    let mut q = r.sdma(P, 0);
    let marker = r.alloc_mapped(P);
    for round in 0..3u32 {
        // 4096 / 16 fences fill the ring; an odd NOP shifts the phase so
        // the following fences straddle the ring's end.
        let mut packets = vec![SdmaPacket::Nop { dwords: 3 }];
        for i in 0..200u32 {
            packets.push(SdmaPacket::Fence {
                addr: va(marker + 4 * u64::from(i)),
                data: round * 1000 + i,
            });
        }
        for p in &packets {
            let len = u64::from(p.dwords()) * 4;
            if q.wptr + len - q.rptr(&r) > P {
                q.ring_doorbell(&r);
                r.vm.kick();
                wait_until("ring space", || q.wptr + len - q.rptr(&r) <= P);
            }
            q.push(&r, *p);
        }
        q.ring_doorbell(&r);
        r.vm.kick();
        q.wait_done(&r);
        for i in 0..200u32 {
            assert_eq!(r.u32(marker + 4 * u64::from(i)), round * 1000 + i);
        }
    }
    assert!(q.wptr > 2 * P, "the ring wrapped twice");
    assert_eq!(q.status(&r), None);
}

#[test]
fn a_rejected_fault_stops_the_queue_with_the_page_and_access() {
    let mut r = rig();
    let mut q = r.sdma(P, 0);
    let (src, _) = r.filled(2 * P, 9, true);
    let dst = r.alloc(2 * P);
    q.submit(&r, &[copy(src, dst, 2 * P)]);
    let f = r.events.wait_faults(1);
    assert_eq!((f[0].va, f[0].access), (va(dst), AccessFlags::WRITE));
    r.vm.reply_fault(f[0].id, FaultAction::Cancel(DispatchStatus::FaultRejected))
        .unwrap();
    let block = q.wait_stopped(&r);
    assert_eq!(block.status, QueueStopStatus::FaultRejected);
    assert_eq!(block.fault_va, va(dst));
    assert_eq!(block.access, Some(AccessFlags::WRITE));
    assert_eq!(block.packet, 0);
    assert_eq!(
        r.events.wait_interrupts(1)[0],
        Interrupt::QueueStopped {
            queue: q.id,
            status: QueueStopStatus::FaultRejected
        }
    );
    assert_eq!(
        r.vm.reply_fault(f[0].id, FaultAction::Replay),
        Err(DeviceError::UnknownFault(f[0].id)),
        "the fault ended once"
    );
}

#[test]
fn destroy_ends_a_packet_stalled_on_a_fault_and_touches_nothing_after() {
    let mut r = rig();
    let mut q = r.sdma(P, 0);
    let (src, _) = r.filled(4 * P, 2, true);
    let dst = r.alloc_mapped(4 * P);
    r.unmap(dst + 2 * P, P);
    q.submit(&r, &[copy(src, dst, 4 * P)]);
    let f = r.events.wait_faults(1);
    assert_eq!(f[0].va, va(dst + 2 * P));
    r.vm.destroy_queue(q.id).unwrap();
    // The device fault ended with the queue.
    assert_eq!(
        r.vm.reply_fault(f[0].id, FaultAction::Replay),
        Err(DeviceError::UnknownFault(f[0].id))
    );
    // Nothing of the queue is reached any more, even once the page is
    // bound and the doorbell rung again.
    r.write(dst, &vec![0xAB; (4 * P) as usize]);
    r.map(dst + 2 * P, P);
    r.store_u64(q.ctl.rptr(), 0xFEED);
    q.wptr = 0;
    q.submit(&r, &[copy(src, dst, 4 * P)]);
    std::thread::sleep(Duration::from_millis(40));
    assert_eq!(r.read(dst, (4 * P) as usize), vec![0xAB; (4 * P) as usize]);
    assert_eq!(r.u64(q.ctl.rptr()), 0xFEED);
    assert_eq!(q.status(&r), None, "no status block on destroy");
    assert_eq!(
        r.vm.destroy_queue(q.id),
        Err(DeviceError::UnknownQueue(q.id))
    );
    assert!(r.events.interrupts.lock().is_empty());
}

#[test]
fn an_unmap_shoots_down_the_engines_tlb() {
    let mut r = rig();
    let mut q = r.sdma(P, 0);
    let x = r.alloc_mapped(P);
    let flag = r.alloc_mapped(P);
    r.store_u32(flag, 1);
    // The first fence puts X's translation in the engine's TLB; the poll
    // holds the queue until the page is gone.
    q.submit(
        &r,
        &[
            SdmaPacket::Fence {
                addr: va(x),
                data: 1,
            },
            SdmaPacket::PollMemory {
                addr: va(flag),
                reference: 0,
                mask: 0xFFFF_FFFF,
                func: PollFunc::Equal,
            },
            SdmaPacket::Fence {
                addr: va(x),
                data: 2,
            },
        ],
    );
    wait_until("the first fence", || r.u32(x) == 1);
    r.unmap(x, P);
    r.store_u32(x, 0x5A5A);
    r.store_u32(flag, 0);
    r.vm.kick();
    let f = r.events.wait_faults(1);
    assert_eq!((f[0].va, f[0].access), (va(x), AccessFlags::WRITE));
    assert_eq!(r.u32(x), 0x5A5A, "no write through the stale translation");
    // Bind the VA to a new frame: the fence lands there.
    let fresh = r.alloc(P);
    r.vm.map(va(x), &[GuestPhysAddr(fresh)], Perms::RW).unwrap();
    r.vm.reply_fault(f[0].id, FaultAction::Replay).unwrap();
    q.wait_done(&r);
    assert_eq!((r.u32(fresh), r.u32(x)), (2, 0x5A5A));
}

#[test]
fn unmap_during_a_long_copy_never_writes_the_old_frames() {
    let mut r = rig();
    let mut q = r.sdma(P, 0);
    let bytes = 32 << 20;
    let (src, data) = r.filled(bytes, 5, true);
    let dst = r.alloc_mapped(bytes);
    let fresh = r.alloc(bytes);
    q.submit(&r, &copies(src, dst, bytes));
    wait_until("the copy to start", || {
        r.vm.user_queue_counters().copy_bytes > 0
    });
    // Unmap the second half of the destination while the copy runs; from
    // then on its frames are the guest's again.
    let half = bytes / 2;
    r.unmap(dst + half, half);
    r.write(dst + half, &vec![0x5A; half as usize]);
    // Faulted pages get new frames.
    let mut faulted = Vec::new();
    while q.rptr(&r) != q.wptr {
        let faults = std::mem::take(&mut *r.events.faults.lock());
        if faults.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        for f in &faults {
            let off = f.va.raw() - va(dst).raw();
            assert!(off >= half && off < bytes, "fault at {off:#x}");
            r.vm.map(f.va, &[GuestPhysAddr(fresh + off)], Perms::RW)
                .unwrap();
            r.vm.reply_fault(f.id, FaultAction::Replay).unwrap();
            faulted.push(off);
        }
    }
    assert!(
        r.read(dst + half, half as usize).iter().all(|b| *b == 0x5A),
        "an old frame was written after its unmap returned"
    );
    assert!(r.read(dst, half as usize) == data[..half as usize]);
    for off in faulted {
        let (a, b) = (off as usize, (off + P) as usize);
        assert!(
            r.read(fresh + off, P as usize) == data[a..b],
            "page {off:#x}"
        );
    }
}

/// An AQL queue: ring of 64-byte slots, rptr / doorbell / status in a
/// control page, signals in a signal page.
struct Aql {
    id: QueueId,
    ring: u64,
    slots: u64,
    ctl: Ctl,
    next: u64,
}

impl Rig {
    fn aql(&mut self, ring_size: u64) -> Aql {
        let ring = self.alloc_mapped(ring_size);
        // ROCr fills the ring with INVALID headers.
        for i in 0..ring_size / 64 {
            self.store_u32(ring + i * 64, u32::from(packet_type::INVALID));
        }
        let ctl = Ctl {
            gpa: self.alloc_mapped(P),
        };
        let id = self
            .vm
            .create_user_queue(UserQueueDesc {
                kind: UserQueueKind::Aql,
                priority: 0,
                ring: va(ring),
                ring_size,
                rptr: va(ctl.rptr()),
                doorbell: va(ctl.doorbell()),
                status: Some(va(ctl.status())),
            })
            .unwrap();
        Aql {
            id,
            ring,
            slots: ring_size / 64,
            ctl,
            next: 0,
        }
    }

    /// An `amd_signal_t` with `value`, optionally a mailbox and event id.
    fn signal(&mut self, value: i64, mailbox: Option<(u64, u32)>) -> u64 {
        let gpa = self.alloc_mapped(P);
        self.store_u64(gpa, 1);
        self.store_u64(gpa + 8, value as u64);
        if let Some((m, id)) = mailbox {
            self.store_u64(gpa + 16, va(m).raw());
            self.store_u32(gpa + 24, id);
        }
        gpa
    }
}

impl Aql {
    /// Writes a packet (header last, release) and rings the doorbell.
    fn submit(&mut self, r: &Rig, packet: [u8; 64]) -> u64 {
        let index = self.next;
        let slot = self.ring + (index % self.slots) * 64;
        r.write(slot + 4, &packet[4..]);
        r.store_u32(slot, u32::from_le_bytes(packet[..4].try_into().unwrap()));
        r.store_u64(self.ctl.doorbell(), index);
        self.next += 1;
        index
    }

    fn rptr(&self, r: &Rig) -> u64 {
        r.u64(self.ctl.rptr())
    }

    fn status(&self, r: &Rig) -> Option<QueueStatusBlock> {
        QueueStatusBlock::decode(&r.read(self.ctl.status(), 64)).unwrap()
    }

    fn header(&self, r: &Rig, index: u64) -> u16 {
        r.u32(self.ring + (index % self.slots) * 64) as u16
    }
}

#[test]
fn aql_barrier_and_waits_for_every_dependency() {
    let mut r = rig();
    let mut q = r.aql(P);
    let (a, b) = (r.signal(1, None), r.signal(2, None));
    let done = r.signal(1, None);
    let index = q.submit(
        &r,
        AqlPacket::barrier(BarrierKind::And, &[va(a), va(b)], Some(va(done))),
    );
    r.vm.kick();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(r.u64(done + 8), 1, "no dependency is 0");
    r.store_u64(a + 8, 0);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(r.u64(done + 8), 1, "one dependency is still 2");
    assert_eq!(q.rptr(&r), 0);
    r.store_u64(b + 8, 0);
    wait_until("the barrier", || r.u64(done + 8) == 0);
    wait_until("rptr", || q.rptr(&r) == 1);
    assert_eq!(
        q.header(&r, index),
        u16::from(packet_type::INVALID),
        "the slot is free again"
    );
    assert_eq!(q.status(&r), None);
    assert_eq!(r.vm.user_queue_counters().packets, 1);
}

#[test]
fn aql_barrier_or_completes_on_any_dependency_and_chains() {
    let mut r = rig();
    let mut q = r.aql(P);
    let (a, b) = (r.signal(1, None), r.signal(1, None));
    let first = r.signal(1, None);
    let second = r.signal(1, None);
    q.submit(
        &r,
        AqlPacket::barrier(BarrierKind::Or, &[va(a), va(b)], Some(va(first))),
    );
    // The second barrier depends on the first one's completion signal.
    q.submit(
        &r,
        AqlPacket::barrier(BarrierKind::And, &[va(first)], Some(va(second))),
    );
    r.vm.kick();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!((r.u64(first + 8), r.u64(second + 8)), (1, 1));
    r.store_u64(b + 8, 0);
    wait_until("both barriers", || r.u64(second + 8) == 0);
    assert_eq!(r.u64(first + 8), 0);
    assert_eq!(r.u64(a + 8), 1, "dependencies are only read");
    wait_until("rptr", || q.rptr(&r) == 2);
    // No dependency at all: completes at once. A PM4 IB (ROCr's cache
    // invalidation) completes too.
    let third = r.signal(3, None);
    q.submit(
        &r,
        AqlPacket::barrier(BarrierKind::Or, &[], Some(va(third))),
    );
    q.submit(&r, AqlPacket::pm4_ib(None));
    r.vm.kick();
    wait_until("rptr", || q.rptr(&r) == 4);
    assert_eq!(r.u64(third + 8), 2);
}

#[test]
fn aql_completion_signal_decrements_and_posts_its_event() {
    let mut r = rig();
    let mut q = r.aql(P);
    let mailbox = r.alloc_mapped(P);
    *r.events.probe.lock() = Some((r.mem.clone(), mailbox));
    let sig = r.signal(5, Some((mailbox, 77)));
    q.submit(&r, AqlPacket::barrier(BarrierKind::And, &[], Some(va(sig))));
    r.vm.kick();
    let irqs = r.events.wait_interrupts(1);
    assert_eq!(
        irqs,
        vec![Interrupt::Signal {
            queue: q.id,
            event_id: 77
        }]
    );
    assert_eq!(r.u64(sig + 8), 4);
    assert_eq!(*r.events.probed.lock(), vec![77]);
    // A signal that is not a user signal is a bad packet, before any effect.
    let bad = r.signal(5, None);
    r.store_u64(bad, (-1i64) as u64);
    q.submit(&r, AqlPacket::barrier(BarrierKind::And, &[], Some(va(bad))));
    r.vm.kick();
    let mut block = None;
    wait_until("the stop", || {
        block = q.status(&r);
        block.is_some()
    });
    let block = block.unwrap();
    assert_eq!(block.status, QueueStopStatus::BadPacket);
    assert_eq!(block.packet, 1);
    assert_eq!(r.u64(bad + 8), 5);
}

#[test]
fn aql_kernel_dispatch_stops_the_queue_promptly() {
    let mut r = rig();
    let mut q = r.aql(P);
    let sig = r.signal(1, None);
    let start = Instant::now();
    let header = u16::from(packet_type::KERNEL_DISPATCH) | (1 << 8) | (2 << 9) | (2 << 11);
    let mut packet = AqlPacket::with_type(packet_type::KERNEL_DISPATCH, Some(va(sig)));
    packet[..2].copy_from_slice(&header.to_le_bytes());
    q.submit(&r, packet);
    r.vm.kick();
    let mut block = None;
    wait_until("the stop", || {
        block = q.status(&r);
        block.is_some()
    });
    let elapsed = start.elapsed();
    let block = block.unwrap();
    assert_eq!(block.status, QueueStopStatus::UnsupportedPacket);
    assert_eq!(block.packet, 0);
    assert_eq!(block.detail, u64::from(header));
    assert!(elapsed < Duration::from_millis(500), "took {elapsed:?}");
    assert_eq!(r.u64(sig + 8), 1, "the dispatch's signal is not touched");
    assert_eq!(q.rptr(&r), 0);
    assert_eq!(
        r.events.wait_interrupts(1)[0],
        Interrupt::QueueStopped {
            queue: q.id,
            status: QueueStopStatus::UnsupportedPacket
        }
    );
}

#[test]
fn aql_doorbells_out_of_order_are_ignored_and_a_ring_ahead_is_a_lie() {
    let mut r = rig();
    let mut q = r.aql(P);
    let sig = r.signal(2, None);
    q.submit(&r, AqlPacket::barrier(BarrierKind::And, &[], Some(va(sig))));
    q.submit(&r, AqlPacket::barrier(BarrierKind::And, &[], Some(va(sig))));
    // A late producer rings an older index after the newer one.
    r.store_u64(q.ctl.doorbell(), 0);
    r.vm.kick();
    wait_until("both packets", || r.u64(sig + 8) == 0);
    assert_eq!(q.status(&r), None);
    // Now a doorbell a whole ring ahead.
    let lie = q.next + q.slots;
    r.store_u64(q.ctl.doorbell(), lie);
    r.vm.kick();
    let mut block = None;
    wait_until("the stop", || {
        block = q.status(&r);
        block.is_some()
    });
    let block = block.unwrap();
    assert_eq!(block.status, QueueStopStatus::BadDoorbell);
    assert_eq!((block.packet, block.detail), (2, lie));
    // An unwritten slot behind an honest doorbell is waited on, not run.
    let mut q2 = r.aql(P);
    r.store_u64(q2.ctl.doorbell(), 0);
    r.vm.kick();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!((q2.rptr(&r), q2.status(&r)), (0, None));
    let sig2 = r.signal(1, None);
    q2.submit(
        &r,
        AqlPacket::barrier(BarrierKind::And, &[], Some(va(sig2))),
    );
    wait_until("the late packet", || r.u64(sig2 + 8) == 0);
}

#[test]
fn aql_faults_on_ring_and_signals_replay_once() {
    let mut r = rig();
    let mut q = r.aql(P);
    // The completion signal's page is bound only after a fault.
    let sig = r.alloc(P);
    r.store_u64(sig, 1);
    r.store_u64(sig + 8, 10);
    q.submit(&r, AqlPacket::barrier(BarrierKind::And, &[], Some(va(sig))));
    r.vm.kick();
    let f = r.events.wait_faults(1);
    assert_eq!((f[0].va, f[0].access), (va(sig), AccessFlags::READ));
    assert_eq!(f[0].queue, q.id);
    r.resolve(&f);
    wait_until("rptr", || q.rptr(&r) == 1);
    assert_eq!(r.u64(sig + 8), 9, "decremented once");
}

#[test]
fn a_kernel_dispatch_completing_wakes_a_user_queue_polling_its_result() {
    let mut r = rig();
    let mut sdma = r.sdma(P, 0);
    let flag = r.alloc_mapped(P);
    r.store_u32(flag, 1);
    let marker = r.alloc_mapped(P);
    sdma.submit(
        &r,
        &[
            SdmaPacket::PollMemory {
                addr: va(flag),
                reference: 0xC0DE,
                mask: 0xFFFF,
                func: PollFunc::Equal,
            },
            SdmaPacket::Fence {
                addr: va(marker),
                data: 1,
            },
        ],
    );
    let kq = r.vm.create_queue(QueueDesc { priority: 0 }).unwrap();
    r.vm.dispatch(
        kq,
        KernelLaunch {
            kernel: Kernel::Fill {
                dst: va(flag),
                count: 1,
                value: 0xBEEF_C0DE,
            },
            completion: None,
            tag: 1,
        },
    )
    .unwrap();
    wait_until("the poll to see the kernel's store", || r.u32(marker) == 1);
    assert_eq!(
        r.vm.dispatch(
            sdma.id,
            KernelLaunch {
                kernel: Kernel::Fill {
                    dst: va(flag),
                    count: 1,
                    value: 0
                },
                completion: None,
                tag: 2,
            }
        ),
        Err(DeviceError::WrongQueueKind(sdma.id))
    );
}

#[test]
fn a_long_copy_does_not_starve_another_vm() {
    let mut r = rig();
    let mut big = r.sdma(P, 0);
    let bytes = 64 << 20;
    let (src, _) = r.filled(bytes, 4, true);
    let dst = r.alloc_mapped(bytes);
    // A second VM (another guest context) on the same GPU.
    let events = Arc::new(Recorder::default());
    let vm2 = r
        .gpu
        .create_vm(
            VmConfig {
                memory: r.mem.clone(),
                max_pending_faults: 16,
                max_queue_depth: 16,
            },
            events,
        )
        .unwrap();
    let ring = r.alloc(P);
    let ctl = r.alloc(P);
    let marker = r.alloc(P);
    for gpa in [ring, ctl, marker] {
        vm2.map(va(gpa), &[GuestPhysAddr(gpa)], Perms::RW).unwrap();
    }
    let q2 = vm2
        .create_user_queue(UserQueueDesc {
            kind: UserQueueKind::Sdma,
            priority: 0,
            ring: va(ring),
            ring_size: P,
            rptr: va(ctl),
            doorbell: va(ctl + 8),
            status: None,
        })
        .unwrap();
    let _ = q2;
    big.submit(&r, &copies(src, dst, bytes));
    wait_until("the big copy to start", || {
        r.vm.user_queue_counters().copy_bytes > 0
    });
    let fence = SdmaPacket::Fence {
        addr: va(marker),
        data: 1,
    }
    .encode_bytes();
    r.write(ring, &fence);
    r.store_u64(ctl + 8, fence.len() as u64);
    vm2.kick();
    wait_until("the small queue", || r.u32(marker) == 1);
    let copied = r.vm.user_queue_counters().copy_bytes;
    big.wait_done(&r);
    assert!(
        copied < bytes,
        "the small queue waited for the whole 64 MiB copy ({copied} bytes copied)"
    );
}

#[test]
fn idle_queues_are_polled_on_the_idle_budget() {
    let mut r = rig();
    let queues: Vec<Sdma> = (0..16).map(|_| r.sdma(P, 0)).collect();
    // Let the creation looks pass.
    std::thread::sleep(Duration::from_millis(30));
    let before = r.vm.user_queue_counters().doorbell_polls;
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let polls = r.vm.user_queue_counters().doorbell_polls - before;
    let per_queue_per_s = polls as f64 / 16.0 / start.elapsed().as_secs_f64();
    // One look per 10 ms: about 100 per second per queue.
    assert!(
        (30.0..=150.0).contains(&per_queue_per_s),
        "{per_queue_per_s:.0} doorbell loads per idle queue per second"
    );
    drop(queues);
}

#[test]
fn shutdown_with_queues_stalled_and_waiting() {
    let mut r = rig();
    let mut a = r.sdma(P, 0);
    let mut b = r.aql(P);
    let flag = r.alloc_mapped(P);
    r.store_u32(flag, 1);
    let dst = r.alloc(P);
    a.submit(&r, &[copy(flag, dst, 64)]);
    let sig = r.signal(1, None);
    b.submit(&r, AqlPacket::barrier(BarrierKind::And, &[va(sig)], None));
    r.vm.kick();
    let f = r.events.wait_faults(1);
    r.vm.shutdown();
    assert!(r.vm.reply_fault(f[0].id, FaultAction::Replay).is_err());
    assert_eq!(
        r.vm.create_user_queue(UserQueueDesc {
            kind: UserQueueKind::Sdma,
            priority: 0,
            ring: va(flag),
            ring_size: P,
            rptr: va(flag),
            doorbell: va(flag),
            status: None,
        }),
        Err(DeviceError::Shutdown)
    );
}

/// A second VM on the rig's GPU, sharing its guest RAM.
fn second_vm(r: &Rig) -> Arc<dyn DeviceVm> {
    r.gpu
        .create_vm(
            VmConfig {
                memory: r.mem.clone(),
                max_pending_faults: 16,
                max_queue_depth: 16,
            },
            Arc::new(Recorder::default()),
        )
        .unwrap()
}

#[test]
fn user_queue_priority_is_a_scheduling_weight() {
    // One compute unit: two SDMA queues of one VM compete for it.
    let mut r = rig();
    let mut high = r.sdma(P, 15);
    let mut low = r.sdma(P, 0);
    let bytes = 32 << 20;
    let (src, _) = r.filled(bytes, 1, true);
    let dst_high = r.alloc_mapped(bytes);
    let dst_low = r.alloc_mapped(bytes);
    let low_done = r.alloc_mapped(P);
    let mut low_packets = copies(src, dst_low, bytes);
    low_packets.push(SdmaPacket::Fence {
        addr: va(low_done),
        data: 1,
    });
    low.submit(&r, &low_packets);
    high.submit(&r, &copies(src, dst_high, bytes));
    high.wait_done(&r);
    // Weights 16 : 1: when the high queue has copied 32 MiB the low one
    // has copied about 2 MiB; with no weights it would be about 32.
    let total = r.vm.user_queue_counters().copy_bytes;
    let low_copied = total - bytes;
    assert!(
        low_copied < bytes / 3,
        "the priority-0 queue copied {low_copied} bytes while the priority-15 one copied {bytes}"
    );
    assert_eq!(r.u32(low_done), 0);
    low.wait_done(&r);
    assert_eq!(r.u32(low_done), 1, "the low queue was not starved");
}

#[test]
fn a_runaway_kernel_of_another_vm_does_not_starve_a_user_queue() {
    let mut r = rig();
    let vm2 = second_vm(&r);
    // VM 2: a POINTER_CHASE around a one-node cycle holds the compute unit
    // for its whole watchdog limit unless it is time-sliced.
    let node = r.alloc(P);
    vm2.map(va(node), &[GuestPhysAddr(node)], Perms::RW)
        .unwrap();
    r.store_u64(node, va(node).raw());
    let kq = vm2.create_queue(QueueDesc { priority: 15 }).unwrap();
    vm2.dispatch(
        kq,
        KernelLaunch {
            kernel: Kernel::PointerChase {
                head: va(node),
                max_steps: 1 << 36,
                result: va(node + 64),
            },
            completion: None,
            tag: 1,
        },
    )
    .unwrap();
    // VM 1: a user queue copies 16 MiB meanwhile.
    let mut q = r.sdma(P, 0);
    let bytes = 16 << 20;
    let (src, data) = r.filled(bytes, 3, true);
    let dst = r.alloc_mapped(bytes);
    let start = Instant::now();
    q.submit(&r, &copies(src, dst, bytes));
    q.wait_done(&r);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "the copy took {took:?}");
    assert!(r.read(dst, bytes as usize) == data);
    vm2.destroy_queue(kq).unwrap();
}

#[test]
fn a_long_copy_does_not_starve_another_vms_kernels() {
    let mut r = rig();
    let mut big = r.sdma(P, 15);
    let bytes = 64 << 20;
    let (src, _) = r.filled(bytes, 4, true);
    let dst = r.alloc_mapped(bytes);
    big.submit(&r, &copies(src, dst, bytes));
    wait_until("the copy to start", || {
        r.vm.user_queue_counters().copy_bytes > 0
    });
    let vm2 = second_vm(&r);
    let buf = r.alloc(P);
    vm2.map(va(buf), &[GuestPhysAddr(buf)], Perms::RW).unwrap();
    let kq = vm2.create_queue(QueueDesc { priority: 0 }).unwrap();
    vm2.dispatch(
        kq,
        KernelLaunch {
            kernel: Kernel::Fill {
                dst: va(buf),
                count: 1024,
                value: 0xF1F1_F1F1,
            },
            completion: None,
            tag: 1,
        },
    )
    .unwrap();
    wait_until("the other VM's fill", || r.u32(buf + 4092) == 0xF1F1_F1F1);
    let copied = r.vm.user_queue_counters().copy_bytes;
    big.wait_done(&r);
    assert!(
        copied < bytes,
        "the fill waited for the whole copy ({copied} bytes)"
    );
}
