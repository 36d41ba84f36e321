//! Host memory per bound page through the whole bind path (context, GpuVm,
//! the simulated GPU's page tables), counted by a global allocator: the
//! issue measured 660 MB of host memory for 608 MiB of scattered
//! single-page binds, about 4 KiB per page. This binary holds one test so
//! that nothing else allocates while it counts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use gpu_backend::context::{
    BoundBytesQuota, ComputeContext, ContextConfig, ContextError, ResourceMemory,
};
use gpu_backend::gpuvm::{ResourceSizes, VaLayout};
use gpu_backend::sim::{SimConfig, SimGpu};
use guest_proto::bind::{BindOp, PageList};
use guest_proto::{GpuVa, GuestPhysAddr, PAGE_SIZE, Perms, ResourceId};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

#[global_allocator]
static ALLOC: counting_alloc::Counting = counting_alloc::Counting;

struct NoResources;

impl ResourceSizes for NoResources {
    fn resource_size(&self, _: ResourceId) -> Option<u64> {
        None
    }
}

impl ResourceMemory for NoResources {
    fn pages(
        &self,
        id: ResourceId,
        _: u64,
        _: usize,
        _: &mut Vec<GuestPhysAddr>,
    ) -> Result<(), ContextError> {
        Err(ContextError::UnknownResource(id))
    }
}

fn scattered(i: u64) -> GpuVa {
    const M: u64 = 0x9E37_79B9_7F4A_7C15 | 1;
    GpuVa((1 << 46) + (i.wrapping_mul(M) & ((1 << 34) - 1)) * PAGE_SIZE)
}

#[test]
fn scattered_single_page_binds_cost_host_memory_in_proportion() {
    let gpu = SimGpu::new(SimConfig {
        compute_units: 1,
        ..SimConfig::default()
    });
    let mem = GuestMemoryAtomic::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
    );
    let config = ContextConfig {
        layout: VaLayout::protocol_default(),
        fault_timeout: Duration::from_secs(1),
        max_pending_faults: 16,
        max_queue_depth: 4,
        max_queues: 2,
        max_user_queues: 2,
        bound_quota: Arc::new(BoundBytesQuota::new(u64::MAX)),
        waker: None,
    };
    let mut c = ComputeContext::new(gpu.as_ref(), mem, config).unwrap();
    let n = 20_000u64;
    let page = [GuestPhysAddr(0x1000)];
    let before = counting_alloc::live_bytes();
    for i in 0..n {
        let op = BindOp::MapPages {
            va: scattered(i),
            perms: Perms::RW,
            pages: PageList::new(&page),
        };
        c.bind(&op, &NoResources).unwrap();
    }
    let per_page = (counting_alloc::live_bytes() - before) / isize::try_from(n).unwrap();
    assert_eq!(c.stats().bound_bytes, n * PAGE_SIZE);
    // Range manager (a mapping each) and page tables together.
    assert!(
        per_page <= 400,
        "{per_page} host bytes per scattered bound page"
    );
    for i in 0..n {
        let op = BindOp::Unmap {
            va: scattered(i),
            size: PAGE_SIZE,
        };
        c.bind(&op, &NoResources).unwrap();
    }
    let left = counting_alloc::live_bytes() - before;
    assert!(left < 64 << 10, "{left} bytes still held after unmapping");
}
