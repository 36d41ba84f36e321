//! The context layer's own bounds on guest-driven state.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use gpu_backend::context::{
    BoundBytesQuota, ComputeContext, ContextConfig, ContextError, MAX_ATTR_RANGES,
};
use gpu_backend::gpuvm::{AttrUpdate, VaLayout};
use gpu_backend::sim::{SimConfig, SimGpu};
use guest_proto::{FaultPolicy, GpuVa, Status};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

fn context() -> ComputeContext {
    let mem = GuestMemoryAtomic::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
    );
    let gpu = SimGpu::new(SimConfig {
        compute_units: 1,
        ..SimConfig::default()
    });
    let config = ContextConfig {
        layout: VaLayout::protocol_default(),
        fault_timeout: Duration::from_secs(1),
        max_pending_faults: 16,
        max_queue_depth: 4,
        max_queues: 2,
        max_user_queues: 2,
        bound_quota: Arc::new(BoundBytesQuota::new(1 << 20)),
        waker: None,
    };
    ComputeContext::new(gpu.as_ref(), mem, config).unwrap()
}

#[test]
fn attribute_ranges_and_queues_are_capped() {
    let mut c = context();
    let fatal = AttrUpdate {
        fault_policy: Some(FaultPolicy::Fatal),
        ..AttrUpdate::default()
    };
    // Every other page: no two ranges merge.
    let mut n = 0u64;
    let err = loop {
        match c.set_attrs(GpuVa(0x1000_0000 + n * 0x2000), 0x1000, fatal, false) {
            Ok(()) => n += 1,
            Err(e) => break e,
        }
        assert!(n <= MAX_ATTR_RANGES as u64, "never capped");
    };
    assert_eq!(err, ContextError::AttrQuota(MAX_ATTR_RANGES));
    assert_eq!(err.status(), Status::Quota);
    assert!(c.gpuvm().attr_range_count() <= MAX_ATTR_RANGES);
    assert!(n as usize >= MAX_ATTR_RANGES - 3);

    c.create_queue(0).unwrap();
    c.create_queue(0).unwrap();
    assert_eq!(c.create_queue(0).unwrap_err().status(), Status::Quota);
}
