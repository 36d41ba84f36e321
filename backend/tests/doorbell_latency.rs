//! The doorbell-to-first-packet latency the simulated GPU records for its
//! user queues (`DeviceVm::doorbell_latency`, the daemon's
//! `vhost_gpu_nc_doorbell_latency_seconds`): one sample per doorbell that
//! brought work after the queue had none, bounded by the watching budget
//! when the doorbell is only polled, short when it is kicked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gpu_backend::sim::doorbell::IDLE_PERIOD;
use gpu_backend::sim::{SimConfig, SimGpu};
use gpu_backend::{Device, DeviceFault, UserQueueDesc, VmConfig, VmEvents};
use guest_proto::sdma::SdmaPacket;
use guest_proto::uq::UserQueueKind;
use guest_proto::{DispatchStatus, GpuVa, GuestPhysAddr, Perms, QueueId};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

struct Quiet;

impl VmEvents for Quiet {
    fn faults(&self, _: &[DeviceFault]) {}
    fn dispatch_done(&self, _: QueueId, _: u64, _: DispatchStatus) {}
}

const RING: u64 = 0x10_0000;
const CTL: u64 = 0x20_0000;
const MARK: u64 = 0x30_0000;
const VA: u64 = 0x10_0000_0000;

fn va(gpa: u64) -> GpuVa {
    GpuVa(VA + gpa)
}

#[test]
fn each_doorbell_after_idle_is_one_sample_polled_or_kicked() {
    let mem = GuestMemoryAtomic::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap(),
    );
    let gpu = SimGpu::new(SimConfig {
        compute_units: 1,
        ..SimConfig::default()
    });
    let vm = gpu
        .create_vm(
            VmConfig {
                memory: mem.clone(),
                max_pending_faults: 16,
                max_queue_depth: 16,
            },
            Arc::new(Quiet),
        )
        .unwrap();
    for gpa in [RING, CTL, MARK] {
        vm.map(va(gpa), &[GuestPhysAddr(gpa)], Perms::RW).unwrap();
    }
    vm.create_user_queue(UserQueueDesc {
        kind: UserQueueKind::Sdma,
        priority: 0,
        ring: va(RING),
        ring_size: 4096,
        rptr: va(CTL),
        doorbell: va(CTL + 8),
        status: None,
    })
    .unwrap();
    let m = mem.memory();
    let mut wptr = 0u64;
    // Returns when the store was made.
    let mut fence = |value: u32, kick: bool| -> Instant {
        let p = SdmaPacket::Fence {
            addr: va(MARK),
            data: value,
        }
        .encode_bytes();
        m.write_slice(&p, GuestAddress(RING + wptr)).unwrap();
        wptr += p.len() as u64;
        let t = Instant::now();
        m.store(wptr, GuestAddress(CTL + 8), Ordering::Release)
            .unwrap();
        if kick {
            vm.kick();
        }
        let deadline = t + Duration::from_secs(10);
        while m
            .load::<u32>(GuestAddress(MARK), Ordering::Acquire)
            .unwrap()
            != value
        {
            assert!(Instant::now() < deadline, "fence {value} never landed");
            std::thread::sleep(Duration::from_micros(20));
        }
        t
    };
    // The queue's first work (whether its first look came before the
    // store depends on timing: a sample or none).
    let first = fence(1, true);
    // Idle long enough to be looked at on the idle period only (and for
    // the first fence's sample, if any, to be recorded).
    std::thread::sleep(IDLE_PERIOD * 3);
    let h0 = vm.doorbell_latency();
    assert!(h0.count <= 1, "{h0:?}");
    // One sample, which starts at a look after the first fence and ends
    // at the second one.
    fence(2, false);
    let deadline = Instant::now() + Duration::from_secs(10);
    let h = loop {
        let h = vm.doorbell_latency();
        if h.count > h0.count {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "no sample for the polled doorbell"
        );
        std::thread::sleep(Duration::from_micros(20));
    };
    assert_eq!(h.count, h0.count + 1, "{h:?}");
    let polled = Duration::from_nanos(h.sum_ns - h0.sum_ns);
    assert!(polled <= first.elapsed(), "{polled:?}");
    // Kicked after the store: the sample starts at the kick, so it is no
    // longer than what the guest measured from its store (it would be,
    // by up to an idle period, if it started at the last look).
    std::thread::sleep(IDLE_PERIOD * 3);
    let stored = fence(3, true);
    // The sample is recorded right after the packet's slice.
    let deadline = Instant::now() + Duration::from_secs(10);
    let h2 = loop {
        let h2 = vm.doorbell_latency();
        if h2.count > h.count {
            break h2;
        }
        assert!(
            Instant::now() < deadline,
            "no sample for the kicked doorbell"
        );
        std::thread::sleep(Duration::from_micros(20));
    };
    let seen = stored.elapsed();
    assert_eq!(h2.count, h.count + 1, "{h2:?}");
    let kicked = Duration::from_nanos(h2.sum_ns - h.sum_ns);
    assert!(
        kicked <= seen,
        "kicked: {kicked:?}, since the store: {seen:?}"
    );
}
