//! Throughput of the GPU VM range manager: map and unmap requests per
//! second (prepare + commit) over a VM holding a few thousand mappings.
//!
//! Baseline, measured in the same run: the same stream of keys inserted into
//! and removed from a plain `BTreeMap<u64, u64>`, i.e. the cost of the
//! storage alone, without planning, validation or splitting.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gpu_backend::gpuvm::{GpuVm, MapRequest, MappingBacking, PageArray, ResourceSizes, VaLayout};
use guest_proto::{GpuVa, GuestPhysAddr, PAGE_SIZE, Perms, ResourceId};

const BASE: u64 = 0x1_0000_0000;
/// Pages in the window the requests fall into (256 MiB).
const WINDOW_PAGES: u64 = 1 << 16;
/// Longest request, in pages.
const MAX_PAGES: u64 = 16;
/// Requests per measured iteration.
const BATCH: usize = 1024;
/// Requests in the cyclic stream.
const STREAM: usize = 1 << 16;

struct OneResource;

impl ResourceSizes for OneResource {
    fn resource_size(&self, id: ResourceId) -> Option<u64> {
        (id == ResourceId(1)).then_some(1 << 40)
    }
}

/// A small deterministic generator (xorshift64*), so every run measures the
/// same stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[derive(Clone, Copy)]
struct Request {
    map: bool,
    page: u64,
    pages: u64,
}

fn stream() -> Vec<Request> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    (0..STREAM)
        .map(|_| {
            let page = rng.next() % WINDOW_PAGES;
            let pages = (1 + rng.next() % MAX_PAGES).min(WINDOW_PAGES - page);
            Request {
                map: rng.next().is_multiple_of(2),
                page,
                pages,
            }
        })
        .collect()
}

fn backing(r: &Request, with_pages: bool) -> MappingBacking {
    if with_pages {
        let pages = (0..r.pages)
            .map(|i| GuestPhysAddr((r.page + i) * PAGE_SIZE))
            .collect();
        MappingBacking::Pages(PageArray::new(pages))
    } else {
        MappingBacking::Resource {
            id: ResourceId(1),
            offset: r.page * PAGE_SIZE,
        }
    }
}

fn apply(vm: &mut GpuVm, r: &Request, with_pages: bool) -> usize {
    let va = GpuVa(BASE + r.page * PAGE_SIZE);
    let size = r.pages * PAGE_SIZE;
    let plan = if r.map {
        let req = MapRequest {
            va,
            size,
            backing: backing(r, with_pages),
            perms: Perms::RW,
        };
        vm.prepare_map(req, &OneResource)
    } else {
        vm.prepare_unmap(va, size)
    };
    match plan {
        Ok(plan) => {
            let n = plan.ops().len();
            plan.commit();
            n
        }
        Err(e) => panic!("bench request refused: {e}"),
    }
}

fn bench_gpuvm(c: &mut Criterion) {
    let requests = stream();
    let mut group = c.benchmark_group("gpuvm");
    group.throughput(Throughput::Elements(BATCH as u64));

    for (name, with_pages) in [("map_unmap_resource", false), ("map_unmap_pages", true)] {
        let mut vm = GpuVm::new(VaLayout::protocol_default());
        // Reach the steady state first.
        for r in &requests {
            apply(&mut vm, r, with_pages);
        }
        println!(
            "gpuvm/{name}: steady state {} mappings, {} MiB bound",
            vm.len(),
            vm.bound_bytes() >> 20
        );
        let mut at = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut ops = 0;
                for r in &requests[at..at + BATCH] {
                    ops += apply(&mut vm, r, with_pages);
                }
                at = (at + BATCH) % STREAM;
                black_box(ops)
            })
        });
    }

    let mut baseline: BTreeMap<u64, u64> = BTreeMap::new();
    for r in &requests {
        baseline_apply(&mut baseline, r);
    }
    let mut at = 0;
    group.bench_function("btreemap_insert_remove_baseline", |b| {
        b.iter(|| {
            let mut hits = 0;
            for r in &requests[at..at + BATCH] {
                hits += baseline_apply(&mut baseline, r);
            }
            at = (at + BATCH) % STREAM;
            black_box(hits)
        })
    });
    group.finish();
}

fn baseline_apply(map: &mut BTreeMap<u64, u64>, r: &Request) -> usize {
    if r.map {
        usize::from(map.insert(r.page, r.pages).is_some())
    } else {
        usize::from(map.remove(&r.page).is_some())
    }
}

criterion_group!(benches, bench_gpuvm);
criterion_main!(benches);
