//! The cost of binding, measured as work done rather than wall time (so the
//! bounds hold on a loaded machine): page-table updates visit only the
//! tables on their path whatever the size of the tree, page tables take
//! host memory in proportion to the pages mapped, and the context layer
//! leaves the device alone when a bind changes nothing there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gpu_backend::context::{
    BoundBytesQuota, ComputeContext, ContextConfig, ContextError, ResourceMemory,
};
use gpu_backend::device::QueueDesc;
use gpu_backend::gpuvm::{ResourceSizes, VaLayout};
use gpu_backend::sim::page_table::{LEVELS, PageTable, Pte};
use gpu_backend::sim::{SimConfig, SimGpu};
use gpu_backend::{
    Device, DeviceError, DeviceInfo, DeviceVm, FaultAction, KernelLaunch, VmConfig, VmEvents,
};
use guest_proto::bind::{BindOp, PageList};
use guest_proto::{FaultId, GpuVa, GuestPhysAddr, PAGE_SIZE, Perms, QueueId, ResourceId};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// Page `i` of a scattered sequence: a bijection onto 2^34 pages from
/// 2^46 on, so nearly every page has a last-level table to itself.
fn scattered(i: u64) -> GpuVa {
    const M: u64 = 0x9E37_79B9_7F4A_7C15 | 1;
    GpuVa((1 << 46) + (i.wrapping_mul(M) & ((1 << 34) - 1)) * PAGE_SIZE)
}

fn pte() -> Pte {
    Pte::new(GuestPhysAddr(0x1000), Perms::RW)
}

/// Tables visited by `f` on `pt`.
fn work(pt: &mut PageTable, f: impl FnOnce(&mut PageTable)) -> u64 {
    let before = pt.tables_visited();
    f(pt);
    pt.tables_visited() - before
}

/// The quadratic case: every bind unmapped its range first and the
/// prune walked the whole tree. Now a one-page map or unmap visits at most
/// the four tables of its walk, at 100 mappings as at 20,000.
#[test]
fn page_table_updates_visit_only_their_path() {
    let mut pt = PageTable::default();
    let mut worst = Vec::new();
    let mut mapped = 0u64;
    for target in [100u64, 20_000] {
        while mapped < target {
            pt.set(scattered(mapped), pte());
            mapped += 1;
        }
        let probe = scattered(1 << 33);
        let mut most = 0;
        // Unmap of an unmapped page (what every bind did first), map, unmap.
        most = most.max(work(&mut pt, |pt| {
            assert_eq!(pt.clear_range(probe, PAGE_SIZE), 0);
        }));
        most = most.max(work(&mut pt, |pt| {
            assert!(!pt.set(probe, pte()).is_valid());
        }));
        most = most.max(work(&mut pt, |pt| {
            assert_eq!(pt.clear_range(probe, PAGE_SIZE), 1);
        }));
        // Unmapping a page that shares its upper tables with others.
        let victim = scattered(target / 2);
        most = most.max(work(&mut pt, |pt| {
            assert_eq!(pt.clear_range(victim, PAGE_SIZE), 1);
        }));
        pt.set(victim, pte());
        worst.push(most);
        assert_eq!(pt.mapped_pages(), target);
    }
    assert!(
        worst.iter().all(|&w| w <= u64::from(LEVELS)),
        "tables visited per one-page update at 100 and 20,000 mappings: {worst:?}"
    );
}

/// A range unmap visits the tables inside the range, not the others.
#[test]
fn a_range_unmap_visits_only_the_tables_it_covers() {
    let mut pt = PageTable::default();
    // 4,096 contiguous pages (8 last-level tables) and 10,000 scattered
    // ones elsewhere.
    let base = 0x1000_0000u64;
    for i in 0..4096 {
        pt.set(GpuVa(base + i * PAGE_SIZE), pte());
    }
    for i in 0..10_000 {
        pt.set(scattered(i), pte());
    }
    let visited = work(&mut pt, |pt| {
        assert_eq!(pt.clear_range(GpuVa(base), 4096 * PAGE_SIZE), 4096);
    });
    // Root, one table per upper level, 8 leaves.
    assert!(visited <= 3 + 8, "{visited} tables visited");
    assert_eq!(pt.mapped_pages(), 10_000);
}

/// Page tables cost host memory in proportion to the pages they map: a few
/// dozen bytes per scattered page (a hardware layout would spend a 4 KiB
/// last-level table on each), about 8 per page when pages are contiguous,
/// and nothing once everything is unmapped.
#[test]
fn page_table_memory_is_proportional_to_mapped_pages() {
    let mut pt = PageTable::default();
    let empty = pt.table_bytes();
    let n = 20_000u64;
    for i in 0..n {
        pt.set(scattered(i), pte());
    }
    let scattered_per_page = (pt.table_bytes() - empty) as u64 / n;
    assert!(
        scattered_per_page <= 160,
        "{scattered_per_page} bytes of page table per scattered page"
    );
    assert_eq!(pt.clear_range(GpuVa(0), 1 << 48), n);
    assert_eq!(pt.table_bytes(), empty, "unmapping gives everything back");
    assert_eq!(pt.tables(), 1);

    for i in 0..n {
        pt.set(GpuVa(0x1_0000_0000 + i * PAGE_SIZE), pte());
    }
    let dense_per_page = (pt.table_bytes() - empty) as f64 / n as f64;
    assert!(
        dense_per_page <= 8.5,
        "{dense_per_page} bytes of page table per contiguous page"
    );
}

/// Counts the page-table calls a context makes on its device VM.
#[derive(Default)]
struct Calls {
    maps: AtomicU64,
    unmaps: AtomicU64,
}

struct CountingDevice {
    inner: Arc<SimGpu>,
    calls: Arc<Calls>,
}

struct CountingVm {
    inner: Arc<dyn DeviceVm>,
    calls: Arc<Calls>,
}

impl Device for CountingDevice {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }

    fn create_vm(
        &self,
        config: VmConfig,
        events: Arc<dyn VmEvents>,
    ) -> Result<Arc<dyn DeviceVm>, DeviceError> {
        Ok(Arc::new(CountingVm {
            inner: self.inner.create_vm(config, events)?,
            calls: self.calls.clone(),
        }))
    }
}

impl DeviceVm for CountingVm {
    fn map(&self, va: GpuVa, pages: &[GuestPhysAddr], perms: Perms) -> Result<(), DeviceError> {
        self.calls.maps.fetch_add(1, Ordering::Relaxed);
        self.inner.map(va, pages, perms)
    }

    fn unmap(&self, va: GpuVa, len: u64) -> Result<(), DeviceError> {
        self.calls.unmaps.fetch_add(1, Ordering::Relaxed);
        self.inner.unmap(va, len)
    }

    fn create_queue(&self, desc: QueueDesc) -> Result<QueueId, DeviceError> {
        self.inner.create_queue(desc)
    }

    fn destroy_queue(&self, queue: QueueId) -> Result<(), DeviceError> {
        self.inner.destroy_queue(queue)
    }

    fn dispatch(&self, queue: QueueId, dispatch: KernelLaunch) -> Result<(), DeviceError> {
        self.inner.dispatch(queue, dispatch)
    }

    fn reply_fault(&self, fault: FaultId, reply: FaultAction) -> Result<(), DeviceError> {
        self.inner.reply_fault(fault, reply)
    }

    fn shutdown(&self) {
        self.inner.shutdown();
    }
}

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

/// A bind over a range nothing is mapped in does not unmap on the device
/// first (each such unmap takes the page-table lock for writing, draining
/// running waves), and a bind that is already satisfied does not touch the
/// device at all (tearing its translations down would make running work
/// fault on pages that were fine, see `gpuvm`'s module docs).
#[test]
fn binds_touch_the_device_only_where_something_changes() {
    let calls = Arc::new(Calls::default());
    let device = CountingDevice {
        inner: SimGpu::new(SimConfig {
            compute_units: 1,
            ..SimConfig::default()
        }),
        calls: calls.clone(),
    };
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
        bound_quota: Arc::new(BoundBytesQuota::new(1 << 30)),
        waker: None,
    };
    let mut c = ComputeContext::new(&device, mem, config).unwrap();
    let counts = || {
        (
            calls.maps.load(Ordering::Relaxed),
            calls.unmaps.load(Ordering::Relaxed),
        )
    };
    let pages = [GuestPhysAddr(0x1000), GuestPhysAddr(0x2000)];
    fn map(va: u64, pages: &[GuestPhysAddr]) -> BindOp<'_> {
        BindOp::MapPages {
            va: GpuVa(va),
            perms: Perms::RW,
            pages: PageList::new(pages),
        }
    }
    c.bind(&map(0x10_0000, &pages), &NoResources).unwrap();
    assert_eq!(counts(), (1, 0), "a fresh range: one map, no unmap");
    c.bind(&map(0x10_0000, &pages), &NoResources).unwrap();
    c.bind(&map(0x10_1000, &pages[1..]), &NoResources).unwrap();
    assert_eq!(counts(), (1, 0), "already satisfied: nothing to do");
    let other = [GuestPhysAddr(0x3000)];
    c.bind(&map(0x10_1000, &other), &NoResources).unwrap();
    assert_eq!(counts(), (2, 1), "a replacement unmaps, then maps");
    let unmap = BindOp::Unmap {
        va: GpuVa(0x20_0000),
        size: PAGE_SIZE,
    };
    c.bind(&unmap, &NoResources).unwrap();
    assert_eq!(counts(), (2, 1), "unmapping nothing");
    assert_eq!(c.gpuvm().len(), 2);
    assert_eq!(c.stats().bound_bytes, 2 * PAGE_SIZE);
}
