//! What the metrics cost on the hot paths, measured in one run: the
//! in-process fault round trip (DISPATCH on an unbound page -> fault ->
//! MAP_PAGES + FAULT_REPLY -> replay -> completion signal) and a
//! VM_BIND map + unmap pair, through the compute backend on the simulated
//! GPU,
//!
//! - without metrics (the baseline),
//! - with metrics enabled and nobody scraping,
//! - with metrics enabled and a scraper rendering the exposition in a loop
//!   (the worst case: a real scraper asks every 15 s or so),
//!
//! interleaved in blocks so that drift hits every variant alike. Prints
//! medians and 99th percentiles.
//!
//!     cargo bench -p vhost-gpu-nc --features testing --bench metrics

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gpu_backend::sim::{SimConfig, SimGpu};
use guest_proto::bind::{BindOp, PageList};
use guest_proto::capset::Capset;
use guest_proto::command::{DecodeLimits, Dispatch, Profile};
use guest_proto::fault::{FaultOutcome, FaultReplyEntry};
use guest_proto::{GpuVa, GuestPhysAddr, Kernel, Perms, QueueId, ResourceId, SignalIndex};
use guest_runtime::client::{self as runtime, Channel, SessionLayout};
use vhost_gpu_nc::compute::ComputeConfig;
use vhost_gpu_nc::compute::testing::TestGuest;
use vhost_gpu_nc::context_backend::{ContextBackend, ContextInit, CtxId};
use vhost_gpu_nc::metrics::Metrics;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

const SESSION_BYTES: u64 = 16384;
const VA: u64 = 0x4000_0000;

/// The runtime's client talking to the backend in-process.
struct InProcess {
    nc: std::rc::Rc<std::cell::RefCell<vhost_gpu_nc::compute::ComputeBackend>>,
    mem: gpu_backend::GuestRam,
    ctx: CtxId,
    base: u64,
}

impl InProcess {
    fn at(&self, off: u64) -> GuestAddress {
        assert!(off < SESSION_BYTES);
        GuestAddress(self.base + off)
    }
}

impl Channel for InProcess {
    fn submit(&mut self, stream: &[u8], _ring: Option<u32>) -> std::io::Result<()> {
        let r = self.nc.borrow_mut().submit(self.ctx, stream, None);
        r.map(|_| ()).map_err(std::io::Error::other)
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.mem
            .memory()
            .read_slice(buf, self.at(off))
            .map_err(std::io::Error::other)
    }

    fn write(&self, off: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.mem
            .memory()
            .write_slice(bytes, self.at(off))
            .map_err(std::io::Error::other)
    }

    fn load_u32(&self, off: u64) -> std::io::Result<u32> {
        self.mem
            .memory()
            .load(self.at(off), Ordering::Acquire)
            .map_err(std::io::Error::other)
    }

    fn load_u64(&self, off: u64) -> std::io::Result<u64> {
        self.mem
            .memory()
            .load(self.at(off), Ordering::Acquire)
            .map_err(std::io::Error::other)
    }

    fn store_u32(&self, off: u64, value: u32) -> std::io::Result<()> {
        self.mem
            .memory()
            .store(value, self.at(off), Ordering::Release)
            .map_err(std::io::Error::other)
    }

    fn idle(&mut self) {
        self.nc.borrow_mut().tick();
    }
}

struct Rig {
    guest: TestGuest,
    client: runtime::Client<InProcess>,
    queue: QueueId,
    page: u64,
    round: u64,
}

fn rig(gpu: Arc<SimGpu>, metrics: Option<&Metrics>) -> Rig {
    let mut guest = TestGuest::new(gpu, ComputeConfig::default(), 64 << 20);
    if let Some(m) = metrics {
        let g = m.new_guest();
        guest.nc().set_metrics(g.clone());
        m.guest_connected(&g);
    }
    let ctx = CtxId(1);
    guest
        .nc()
        .create_context(ctx, ContextInit { capset_id: None }, "bench")
        .unwrap();
    let base = guest.resource(ctx, 100, SESSION_BYTES);
    let channel = InProcess {
        nc: guest.backend.clone(),
        mem: guest.mem.clone(),
        ctx,
        base,
    };
    let limits = DecodeLimits::from_capset(&Capset::default());
    let mut client = runtime::Client::new(channel, SessionLayout::COMPACT, limits, None);
    client.start(ResourceId(100), Profile::Compat).unwrap();
    let queue = client.create_queue(0).unwrap();
    let page = guest.alloc(4096);
    Rig {
        guest,
        client,
        queue,
        page,
        round: 0,
    }
}

impl Rig {
    fn map(&mut self) {
        let pages = [GuestPhysAddr(self.page)];
        let op = [BindOp::MapPages {
            va: GpuVa(VA),
            perms: Perms::RW,
            pages: PageList::new(&pages),
        }];
        self.client.bind(&op).unwrap();
    }

    fn unmap(&mut self) {
        let op = [BindOp::Unmap {
            va: GpuVa(VA),
            size: 4096,
        }];
        self.client.bind(&op).unwrap();
    }

    /// One fault round trip; the page is unbound again afterwards.
    fn fault_round_trip(&mut self) -> Duration {
        self.round += 1;
        let value = self.round;
        self.client.clear_signal(0).unwrap();
        let t = Instant::now();
        self.client
            .dispatch(Dispatch {
                queue: self.queue,
                kernel: Kernel::Fill {
                    dst: GpuVa(VA),
                    count: 1024,
                    value: 7,
                },
                signal: Some(SignalIndex(0)),
                notify: false,
                completion_value: value,
            })
            .unwrap();
        loop {
            self.guest.nc().tick();
            let faults = self.client.take_faults().unwrap();
            if !faults.is_empty() {
                self.map();
                let entries: Vec<FaultReplyEntry> = faults
                    .iter()
                    .map(|f| FaultReplyEntry {
                        fault_id: f.fault_id,
                        outcome: FaultOutcome::Resolved,
                    })
                    .collect();
                self.client.answer(&entries).unwrap();
            }
            if self.client.signal_value(0).unwrap() == value {
                break;
            }
            std::hint::spin_loop();
        }
        let d = t.elapsed();
        self.unmap();
        d
    }

    /// One VM_BIND map and one unmap.
    fn bind_pair(&mut self) -> Duration {
        let t = Instant::now();
        self.map();
        self.unmap();
        t.elapsed()
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn main() {
    let gpu = SimGpu::new(SimConfig {
        compute_units: 2,
        ..SimConfig::default()
    });
    let scraped = Metrics::new();
    let mut rigs = [
        ("no metrics", rig(gpu.clone(), None)),
        (
            "metrics, no scrapes",
            rig(gpu.clone(), Some(&Metrics::new())),
        ),
        (
            "metrics, scraped in a loop",
            rig(gpu.clone(), Some(&scraped)),
        ),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let scrapes = Arc::new(AtomicU64::new(0));
    let scraper = {
        let (stop, scrapes) = (stop.clone(), scrapes.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let text = scraped.render_with(Duration::from_millis(50));
                assert!(text.contains("vhost_gpu_nc_faults_raised_total"));
                scrapes.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let blocks = 20;
    let per_block = 100;
    let mut faults: Vec<Vec<Duration>> = vec![Vec::new(); rigs.len()];
    let mut binds: Vec<Vec<Duration>> = vec![Vec::new(); rigs.len()];
    // Warm up.
    for (_, r) in rigs.iter_mut() {
        for _ in 0..50 {
            r.fault_round_trip();
            r.bind_pair();
        }
    }
    let started = Instant::now();
    for block in 0..blocks {
        // The order rotates, so no variant always runs first or last.
        for k in 0..rigs.len() {
            let i = (block + k) % rigs.len();
            let r = &mut rigs[i].1;
            for _ in 0..per_block {
                faults[i].push(r.fault_round_trip());
            }
            for _ in 0..per_block {
                binds[i].push(r.bind_pair());
            }
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    scraper.join().unwrap();
    println!(
        "{} fault round trips and {} map+unmap pairs per variant, interleaved in {blocks} blocks; \
         {} scrapes during the run ({:.1} s)",
        blocks * per_block,
        blocks * per_block,
        scrapes.load(Ordering::Relaxed),
        elapsed.as_secs_f64()
    );
    let base_f = pct(&mut faults[0].clone(), 0.5);
    let base_b = pct(&mut binds[0].clone(), 0.5);
    for (i, (name, _)) in rigs.iter().enumerate() {
        let (f50, f99) = (pct(&mut faults[i], 0.5), pct(&mut faults[i], 0.99));
        let (b50, b99) = (pct(&mut binds[i], 0.5), pct(&mut binds[i], 0.99));
        let slow = faults[i]
            .iter()
            .filter(|d| **d > Duration::from_millis(1))
            .count();
        println!(
            "{name:>28}: fault round trip p50 {f50:>9.2?} ({:+.1}%) p99 {f99:>9.2?} \
             (>1 ms: {slow}); map+unmap p50 {b50:>9.2?} ({:+.1}%) p99 {b99:>9.2?}",
            (f50.as_secs_f64() / base_f.as_secs_f64() - 1.0) * 100.0,
            (b50.as_secs_f64() / base_b.as_secs_f64() - 1.0) * 100.0,
        );
    }
    render_cost(gpu.clone());
    // What the always-on part costs by itself: the clock read and
    // histogram update of one fault answer.
    let mut h = gpu_backend::context::LatencyHistogram::default();
    let raised = Instant::now();
    let n = 1_000_000u32;
    let t = Instant::now();
    for _ in 0..n {
        h.observe(Instant::now().saturating_duration_since(raised));
    }
    let per = t.elapsed() / n;
    std::hint::black_box(&h);
    println!("per fault answer, clock read + histogram update: {per:.1?}");
}

/// What one scrape costs with `--max-contexts` (64) contexts, each with a
/// session: the publication on the vring worker and the rendering.
fn render_cost(gpu: Arc<SimGpu>) {
    let mut guest = TestGuest::new(gpu, ComputeConfig::default(), 64 << 20);
    let metrics = Metrics::new();
    let g = metrics.new_guest();
    guest.nc().set_metrics(g.clone());
    metrics.guest_connected(&g);
    let limits = DecodeLimits::from_capset(&Capset::default());
    let mut clients = Vec::new();
    for i in 1..=64u32 {
        let ctx = CtxId(i);
        guest
            .nc()
            .create_context(ctx, ContextInit { capset_id: None }, "bench")
            .unwrap();
        let base = guest.resource(ctx, 1000 + i, SESSION_BYTES);
        let channel = InProcess {
            nc: guest.backend.clone(),
            mem: guest.mem.clone(),
            ctx,
            base,
        };
        let mut c = runtime::Client::new(channel, SessionLayout::COMPACT, limits, None);
        c.start(ResourceId(1000 + i), Profile::Compat).unwrap();
        clients.push(c);
    }
    let n = 200u32;
    let mut tick = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        guest.nc().tick();
        tick.push(t.elapsed());
    }
    let mut publish = Vec::new();
    let mut scrape = Vec::new();
    let mut bytes = 0;
    for _ in 0..n {
        // A scrape waits; the worker's next tick publishes.
        let m = metrics.clone();
        let waiter = std::thread::spawn(move || m.render().len());
        while g.publish_wanted().is_none() {
            std::thread::yield_now();
        }
        let t = Instant::now();
        guest.nc().tick();
        publish.push(t.elapsed());
        assert!(waiter.join().unwrap() > 0);
        let t = Instant::now();
        bytes = metrics.render_with(Duration::ZERO).len();
        scrape.push(t.elapsed());
    }
    drop(clients);
    println!(
        "one scrape with 64 contexts (medians): the vring worker's tick {:.1?} with the \
         publication, {:.1?} without; gather + encode {:.1?} (on a metrics thread), {bytes} bytes",
        pct(&mut publish, 0.5),
        pct(&mut tick, 0.5),
        pct(&mut scrape, 0.5)
    );
}
