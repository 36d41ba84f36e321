//! Scattered single-page binds through the whole bind path
//! (`ComputeContext::bind`: GpuVm prepare/commit, quota, the simulated GPU's
//! page tables), at a growing number of existing mappings.
//!
//! For every level (0 = the empty-VM baseline, then 1k, 10k, 100k and 1M
//! existing mappings, all in one run and one VM) it prints the time of the
//! same batch: 4,096 `MAP_PAGES` ops of one page each at VAs no mapping
//! uses, then the 4,096 `UNMAP`s that remove them again (so every level
//! measures exactly the same ops), and the ratio to the baseline. It also
//! prints the host bytes per mapped page, counted by a global allocator
//! (bytes requested from the heap, live, without malloc's own overhead) and,
//! as a cross-check, the growth of the resident set (`/proc/self/statm`).
//!
//! The VAs are scattered like the workload (about 4 KiB of host
//! memory per page: a last-level table each): page `i` lands alone in the
//! 2 MiB span `i`, at a varying offset in it, from 1 TiB on (the measured
//! batch from 32 TiB on). Every bind maps the same guest page, as in the
//! issue. The memory figures at the end add the worst case: pages spread
//! over 64 TiB by a multiplicative bijection, nearly each alone in its
//! 1 GiB span too.
//!
//! `BIND_BENCH_MAX=<n>` stops after the level `n` (building 1M mappings on a
//! VM whose binds are quadratic is not practical); `BIND_BENCH_ROUNDS=<r>`
//! sets the printed rounds per level (default 7) and `BIND_BENCH_QUICK=1`
//! skips the criterion runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use gpu_backend::context::{
    BoundBytesQuota, ComputeContext, ContextConfig, ContextError, ResourceMemory,
};
use gpu_backend::gpuvm::{GpuVm, MapRequest, MappingBacking, PageArray, ResourceSizes, VaLayout};
use gpu_backend::sim::page_table::{PageTable, Pte};
use gpu_backend::sim::{SimConfig, SimGpu};
use guest_proto::bind::{BindOp, PageList};
use guest_proto::{GpuVa, GuestPhysAddr, PAGE_SIZE, Perms, ResourceId};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// Counts the bytes live on the heap.
#[path = "../tests/support/counting_alloc.rs"]
mod counting_alloc;

#[global_allocator]
static ALLOC: counting_alloc::Counting = counting_alloc::Counting;

fn live_bytes() -> isize {
    counting_alloc::live_bytes()
}

fn rss_bytes() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: i64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

const BATCH: u64 = 4096;
const LEVELS: [u64; 5] = [0, 1_000, 10_000, 100_000, 1_000_000];
/// Where the measured batch's pages go: above every population.
const BATCH_BASE: u64 = 1 << 45;
const POPULATION_BASE: u64 = 1 << 40;
const GPA: GuestPhysAddr = GuestPhysAddr(0x1000);

/// Page `i` from `base`: alone in its 2 MiB span.
fn spread_va(base: u64, i: u64) -> GpuVa {
    GpuVa(base + (i << 21) + (i % 512) * PAGE_SIZE)
}

/// Page `i` of the worst case: alone in its 1 GiB span too, mostly.
fn scattered_va(i: u64) -> GpuVa {
    const M: u64 = 0x9E37_79B9_7F4A_7C15 | 1;
    GpuVa((1 << 46) + (i.wrapping_mul(M) & ((1 << 34) - 1)) * PAGE_SIZE)
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

fn context(gpu: &SimGpu) -> ComputeContext {
    let mem = GuestMemoryAtomic::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
    );
    let config = ContextConfig {
        layout: VaLayout::protocol_default(),
        fault_timeout: Duration::from_secs(10),
        max_pending_faults: 64,
        max_queue_depth: 16,
        max_queues: 4,
        max_user_queues: 2,
        bound_quota: Arc::new(BoundBytesQuota::new(u64::MAX)),
        waker: None,
    };
    ComputeContext::new(gpu, mem, config).unwrap()
}

fn map_one(ctx: &mut ComputeContext, va: GpuVa) {
    let pages = [GPA];
    let op = BindOp::MapPages {
        va,
        perms: Perms::RW,
        pages: PageList::new(&pages),
    };
    ctx.bind(&op, &NoResources).unwrap();
}

fn unmap_one(ctx: &mut ComputeContext, va: GpuVa) {
    let op = BindOp::Unmap {
        va,
        size: PAGE_SIZE,
    };
    ctx.bind(&op, &NoResources).unwrap();
}

/// One measured round: the batch's maps, then its unmaps.
fn round(ctx: &mut ComputeContext) -> (Duration, Duration) {
    let start = Instant::now();
    for i in 0..BATCH {
        map_one(ctx, spread_va(BATCH_BASE, i));
    }
    let mapped = start.elapsed();
    let start = Instant::now();
    for i in 0..BATCH {
        unmap_one(ctx, spread_va(BATCH_BASE, i));
    }
    (mapped, start.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn bench_bind(c: &mut Criterion) {
    let env = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    let max = env("BIND_BENCH_MAX").unwrap_or(u64::MAX);
    let rounds_per_level = env("BIND_BENCH_ROUNDS").unwrap_or(7).max(1);
    let quick = env("BIND_BENCH_QUICK").is_some_and(|q| q != 0);
    let gpu = SimGpu::new(SimConfig {
        compute_units: 1,
        ..SimConfig::default()
    });
    let mut ctx = context(&gpu);
    let (heap0, rss0) = (live_bytes(), rss_bytes());
    let mut population = 0u64;
    let mut baseline: Option<(Duration, Duration)> = None;
    let mut group = c.benchmark_group("bind_4096_scattered_map_pages");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for &level in LEVELS.iter().filter(|&&l| l <= max) {
        let start = Instant::now();
        while population < level {
            map_one(&mut ctx, spread_va(POPULATION_BASE, population));
            population += 1;
        }
        let built = start.elapsed();
        assert_eq!(ctx.gpuvm().len() as u64, level);
        let (heap, rss) = (live_bytes() - heap0, rss_bytes() - rss0);
        let rounds: Vec<(Duration, Duration)> =
            (0..rounds_per_level).map(|_| round(&mut ctx)).collect();
        let map_t = median(rounds.iter().map(|r| r.0).collect());
        let unmap_t = median(rounds.iter().map(|r| r.1).collect());
        let (base_map, base_unmap) = *baseline.get_or_insert((map_t, unmap_t));
        let per_page = |b: i64| {
            if level == 0 {
                "-".to_string()
            } else {
                format!("{:.0}", b as f64 / level as f64)
            }
        };
        println!(
            "bind at {level:>9} mappings: 4096 maps {map_t:>10.2?} ({:.2}x baseline), \
             4096 unmaps {unmap_t:>10.2?} ({:.2}x); host bytes/page: heap {} rss {}; \
             built in {built:.1?}",
            map_t.as_secs_f64() / base_map.as_secs_f64(),
            unmap_t.as_secs_f64() / base_unmap.as_secs_f64(),
            per_page(heap as i64),
            per_page(rss),
        );
        if quick {
            continue;
        }
        group.bench_function(format!("{level}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += round(&mut ctx).0;
                }
                total
            })
        });
    }
    group.finish();
    drop(ctx);
    components(max);
}

/// Host heap bytes per page of `n` pages at `va(i)` in bare page tables.
fn table_bytes(n: u64, va: impl Fn(u64) -> GpuVa) -> f64 {
    let heap = live_bytes();
    let mut pt = PageTable::default();
    for i in 0..n {
        pt.set(va(i), Pte::new(GPA, Perms::RW));
    }
    let bytes = live_bytes() - heap;
    drop(black_box(pt));
    bytes as f64 / n as f64
}

/// Where the bytes go: the page tables alone (one page per 2 MiB, the
/// worst case, contiguous pages) and the range manager alone, for 100k
/// pages.
fn components(max: u64) {
    let n = 100_000u64.min(max);
    if n == 0 {
        return;
    }
    let pt_spread = table_bytes(n, |i| spread_va(POPULATION_BASE, i));
    let pt_scattered = table_bytes(n, scattered_va);
    let pt_dense = table_bytes(n, |i| GpuVa((1 << 40) + i * PAGE_SIZE));
    let heap = live_bytes();
    let mut vm = GpuVm::new(VaLayout::protocol_default());
    for i in 0..n {
        let req = MapRequest {
            va: spread_va(POPULATION_BASE, i),
            size: PAGE_SIZE,
            backing: MappingBacking::Pages(PageArray::new(vec![GPA])),
            perms: Perms::RW,
        };
        vm.prepare_map(req, &NoResources).unwrap().commit();
    }
    let gpuvm = live_bytes() - heap;
    drop(black_box(vm));
    let per = |b: isize| b as f64 / n as f64;
    println!(
        "host heap bytes per page at {n} pages: page tables {pt_spread:.0} (one per 2 MiB) / \
         {pt_scattered:.0} (worst case) / {pt_dense:.1} (contiguous); GpuVm {:.0} (a mapping \
         per page)",
        per(gpuvm)
    );
}

criterion_group!(benches, bench_bind);
criterion_main!(benches);
