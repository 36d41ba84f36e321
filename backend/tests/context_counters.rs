//! The fault counters of `DEVICE_QUERY` agree with each other: every fault
//! counted as ended (resolved, rejected, timed out, cancelled) was counted
//! as raised, also when the guest's ring was too small to take its record.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use gpu_backend::context::{
    BoundBytesQuota, ComputeContext, ContextConfig, DispatchRequest, FaultCounters, FaultRing,
    GuestAnswer,
};
use gpu_backend::gpuvm::VaLayout;
use gpu_backend::sim::{SimConfig, SimGpu};
use guest_proto::fault::FaultRecord;
use guest_proto::{GpuVa, Kernel};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// A ring the guest never consumes.
struct StuckRing {
    records: Vec<FaultRecord>,
    capacity: usize,
    dropped: u32,
}

impl FaultRing for StuckRing {
    fn push(&mut self, record: &FaultRecord) -> bool {
        if self.records.len() >= self.capacity {
            self.dropped += 1;
            return false;
        }
        self.records.push(*record);
        true
    }
}

/// A context and the GPU it runs on (which must outlive its work).
fn context(max_pending_faults: u32, fault_timeout: Duration) -> (Arc<SimGpu>, ComputeContext) {
    let mem = GuestMemoryAtomic::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
    );
    let gpu = SimGpu::new(SimConfig {
        compute_units: 1,
        ..SimConfig::default()
    });
    let config = ContextConfig {
        layout: VaLayout::protocol_default(),
        fault_timeout,
        max_pending_faults,
        max_queue_depth: 4,
        max_queues: 2,
        max_user_queues: 2,
        bound_quota: Arc::new(BoundBytesQuota::new(1 << 20)),
        waker: None,
    };
    let c = ComputeContext::new(gpu.as_ref(), mem, config).unwrap();
    (gpu, c)
}

fn ended(c: &FaultCounters) -> u64 {
    c.resolved + c.rejected + c.timed_out + c.cancelled
}

/// The flood: more faults pending than the ring holds and a guest
/// that answers nothing. All of them time out, and all of them were
/// raised (before, `raised` counted only the records that fit: 4 raised,
/// 16 timed out).
#[test]
fn a_fault_flood_beyond_the_ring_counts_every_fault_raised_and_timed_out() {
    let (_gpu, mut c) = context(16, Duration::from_millis(50));
    let q = c.create_queue(0).unwrap();
    // 16 waves' worth of unmapped pages: one fault per wave.
    c.dispatch(DispatchRequest {
        queue: q,
        kernel: Kernel::Fill {
            dst: GpuVa(0x1000_0000),
            count: 256 * 1024,
            value: 1,
        },
        completion: None,
        notify: false,
    })
    .unwrap();
    let mut ring = StuckRing {
        records: Vec::new(),
        capacity: 4,
        dropped: 0,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.stats().dispatches_done == 0 {
        c.pump(&mut ring, Instant::now());
        let f = c.stats().faults;
        assert!(
            f.raised >= ended(&f),
            "more faults ended than raised: {f:?}"
        );
        assert!(Instant::now() < deadline, "the dispatch never ended: {f:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
    c.pump(&mut ring, Instant::now());
    let f = c.stats().faults;
    assert_eq!(ring.records.len(), 4, "the ring took 4 records");
    assert!(ring.dropped > 0);
    assert_eq!(f.timed_out, 16, "{f:?}");
    assert_eq!(f.raised, 16, "{f:?}");
    assert_eq!(f.raised, ended(&f));
}

/// Raised = ended + pending at every point of an ordinary life: answered,
/// rejected, timed out and torn-down faults, with a ring that fills up.
#[test]
fn counters_add_up_through_answers_timeouts_and_teardown() {
    let (_gpu, mut c) = context(64, Duration::from_millis(200));
    let q = c.create_queue(0).unwrap();
    let mut ring = StuckRing {
        records: Vec::new(),
        capacity: 2,
        dropped: 0,
    };
    for (i, va) in [0x1000_0000u64, 0x2000_0000, 0x3000_0000]
        .iter()
        .enumerate()
    {
        c.dispatch(DispatchRequest {
            queue: q,
            kernel: Kernel::Fill {
                dst: GpuVa(*va),
                count: 1,
                value: i as u32,
            },
            completion: None,
            notify: false,
        })
        .unwrap();
    }
    // Dispatches on one queue run in order: one fault at a time. Answer
    // the first two (reject both: nothing is bound), let the third time out.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answered = 0;
    while c.stats().dispatches_done < 3 {
        c.pump(&mut ring, Instant::now());
        if answered < 2 {
            if let Some(r) = ring.records.pop() {
                assert!(c.answer_fault(r.fault_id, GuestAnswer::Rejected));
                answered += 1;
            }
        }
        let f = c.stats().faults;
        assert!(f.raised >= ended(&f), "{f:?}");
        assert!(Instant::now() < deadline, "{f:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
    let f = c.stats().faults;
    assert_eq!((f.raised, f.rejected, f.timed_out), (3, 2, 1), "{f:?}");
    assert_eq!(f.raised, ended(&f));
}
