//! The compute protocol through the daemon's real vhost-user socket, each
//! figure against the same stream in-process (the compute backend called
//! directly, on the same simulated GPU) in the same run, interleaved:
//!
//! - `bind`: VM_BIND throughput, batched (4,096 ops per submit) and one op
//!   per submit (each waiting for its reply), in requests (bind ops) per
//!   second; the stream maps one page at each of 4,096 scattered VAs and
//!   unmaps them again;
//! - `bind_levels`: a 4,096-op map batch and its unmap batch at 0, 10k,
//!   100k and 1M existing mappings, against the empty VM;
//! - `fault`: the fault round trip with a polling guest (dispatch -> fault
//!   record visible -> `VM_BIND` + `FAULT_REPLY` in one submit -> replayed
//!   -> signal), p50/p99, and its two halves;
//! - `batched_faults`: a `FILL` over 8,192 unbound pages resolved in
//!   batches as the records arrive, in faults per second;
//! - `idle`: the daemon's CPU time over 10 s with a session open and
//!   nothing happening, against a daemon nobody is connected to.
//!
//! The guest is the harness of `tests/harness` (a VMM with hand-built split
//! rings, `VIRTIO_RING_F_EVENT_IDX` negotiated and kicks suppressed as a
//! Linux driver does). It polls and never sleeps.
//!
//! Run: `cargo bench --bench socket [-- FILTER...] [--quick]`. Every run
//! writes `target/bench-results/{socket_bind,socket_bind_levels,
//! fault_latency,socket_summary}.csv` for `tools/plot`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

#[path = "../tests/harness/mod.rs"]
mod harness;

mod common;

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Poll, median, pct, print_load, process_cpu, write_csv};
use gpu_backend::sim::{SimConfig, SimGpu};
use guest_proto::bind::{BindOp, PageList, VmBind};
use guest_proto::capset::Capset;
use guest_proto::command::{DecodeLimits, Dispatch, Profile};
use guest_proto::fault::{
    FAULT_RING_TAIL_OFFSET, FaultOutcome, FaultRecord, FaultReply, FaultReplyEntry,
};
use guest_proto::reply::{Reply, ReplyPayload};
use guest_proto::writer::Ticket;
use guest_proto::{
    DispatchStatus, GpuVa, GuestPhysAddr, Kernel, PAGE_SIZE, Perms, QueueId, Request, ResourceId,
    SignalIndex, Status,
};
use guest_runtime::client::{Channel, Client, SessionLayout};
use harness::{Daemon, Desc, F_EVENT_IDX, F_VIRGL, Vmm};
use vhost_gpu_nc::compute::{ComputeBackend, ComputeConfig};
use vhost_gpu_nc::context_backend::{
    ContextBackend, ContextInit, CtxId, FenceCompleter, FenceRef, GuestBacking, ResourceKind,
    ResourceView,
};
use vhost_gpu_nc::virtio_gpu::protocol::{VIRTIO_GPU_CMD_SUBMIT_3D, VIRTIO_GPU_RESP_OK_NODATA};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

/// The session buffer's layout: 4 KiB of replies, 256 fault records.
const LAYOUT: SessionLayout = SessionLayout {
    reply_off: 0,
    reply_size: 4096,
    ring_off: 4096,
    ring_capacity: 256,
    signals_off: 16384,
    signal_slots: 128,
};
const SESSION_BYTES: u64 = 20480;
const SESSION_RES: u32 = 10;
/// Ops per VM_BIND of the batched stream (the capset's `max_bind_ops`).
const BATCH: usize = 4096;
/// The one guest page every bind maps.
const GPA_PAGE: GuestPhysAddr = GuestPhysAddr(0x3F_F000);
/// Submit slots of the socket guest (request + response buffers).
const SLOTS: usize = 16;
const SLOT_BYTES: u64 = 256 << 10;

/// What the benchmarks need from a guest besides the session buffer.
trait Guest: Channel {
    /// Fresh guest memory.
    fn alloc(&mut self, bytes: u64) -> u64;
    /// The aligned `u32` at guest-physical `gpa`.
    fn gpa_u32(&self, gpa: u64) -> u32;
    /// Returns when every submit so far has been processed (the socket
    /// guest reaps its used ring; in-process submits are synchronous).
    fn drain(&mut self);
    /// Kicks sent so far (0 in-process).
    fn kicks(&self) -> u64;
}

// ---------------------------------------------------------------------------
// In-process: the compute backend called from the guest's thread.

struct NoFences;

impl FenceCompleter for NoFences {
    fn complete(&self, _: FenceRef) {}
    fn wake(&self) {}
}

struct Local {
    backend: ComputeBackend,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    base: u64,
    next: u64,
    ram: u64,
    _gpu: Arc<SimGpu>,
}

const CTX: CtxId = CtxId(1);

impl Local {
    fn new(ram: u64) -> Local {
        let gpu = SimGpu::new(SimConfig {
            compute_units: 2,
            ..SimConfig::default()
        });
        let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), ram as usize)]).unwrap();
        let mem = GuestMemoryAtomic::new(mmap);
        let mut backend =
            ComputeBackend::new(gpu.clone(), ComputeConfig::default(), Arc::new(NoFences));
        backend.set_memory(mem.clone());
        backend
            .create_context(CTX, ContextInit { capset_id: None }, "bench")
            .unwrap();
        let mut l = Local {
            backend,
            mem,
            base: 0,
            next: 0x40_0000,
            ram,
            _gpu: gpu,
        };
        l.base = l.alloc(SESSION_BYTES);
        l.attach(SESSION_RES, l.base, SESSION_BYTES);
        l
    }

    fn attach(&mut self, id: u32, gpa: u64, bytes: u64) {
        let view = ResourceView {
            id: ResourceId(id),
            kind: ResourceKind::Buffer3d,
            size: bytes,
            backing: Some(Arc::new(GuestBacking {
                entries: vec![(GuestAddress(gpa), u32::try_from(bytes).unwrap())],
            })),
        };
        self.backend.attach_resource(CTX, &view).unwrap();
    }
}

impl Channel for Local {
    fn submit(&mut self, stream: &[u8], _ring: Option<u32>) -> io::Result<()> {
        self.backend
            .submit(CTX, stream, None)
            .map(|_| ())
            .map_err(|e| io::Error::other(e.to_string()))
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.mem
            .memory()
            .read_slice(buf, GuestAddress(self.base + off))
            .map_err(io::Error::other)
    }

    fn write(&self, off: u64, bytes: &[u8]) -> io::Result<()> {
        self.mem
            .memory()
            .write_slice(bytes, GuestAddress(self.base + off))
            .map_err(io::Error::other)
    }

    fn load_u32(&self, off: u64) -> io::Result<u32> {
        self.mem
            .memory()
            .load(
                GuestAddress(self.base + off),
                std::sync::atomic::Ordering::Acquire,
            )
            .map_err(io::Error::other)
    }

    fn load_u64(&self, off: u64) -> io::Result<u64> {
        self.mem
            .memory()
            .load(
                GuestAddress(self.base + off),
                std::sync::atomic::Ordering::Acquire,
            )
            .map_err(io::Error::other)
    }

    fn store_u32(&self, off: u64, value: u32) -> io::Result<()> {
        self.mem
            .memory()
            .store(
                value,
                GuestAddress(self.base + off),
                std::sync::atomic::Ordering::Release,
            )
            .map_err(io::Error::other)
    }

    /// The guest's thread is the driving thread: pump device events.
    fn idle(&mut self) {
        self.backend.tick();
    }
}

impl Guest for Local {
    fn alloc(&mut self, bytes: u64) -> u64 {
        let gpa = self.next;
        self.next += bytes.next_multiple_of(PAGE_SIZE);
        assert!(self.next <= self.ram);
        gpa
    }

    fn gpa_u32(&self, gpa: u64) -> u32 {
        self.mem
            .memory()
            .load(GuestAddress(gpa), std::sync::atomic::Ordering::Acquire)
            .unwrap()
    }

    fn drain(&mut self) {}

    fn kicks(&self) -> u64 {
        0
    }
}

// ---------------------------------------------------------------------------
// Through the socket: SUBMIT_3D on the control queue of the real daemon.

struct Sock {
    vmm: Vmm,
    ctx: u32,
    base: u64,
    slots: Vec<(u64, u64)>,
    next_slot: usize,
    inflight: VecDeque<usize>,
}

impl Sock {
    fn new(daemon: &Daemon) -> Sock {
        let mut vmm = Vmm::connect(&daemon.socket, F_VIRGL | F_EVENT_IDX);
        assert_ne!(vmm.features & F_EVENT_IDX, 0, "EVENT_IDX negotiated");
        let ctx = 1;
        assert_eq!(vmm.ctx_create(ctx, 0), VIRTIO_GPU_RESP_OK_NODATA);
        let base = vmm.buffer_3d(SESSION_RES, SESSION_BYTES as u32);
        assert_eq!(vmm.ctx_attach(ctx, SESSION_RES), VIRTIO_GPU_RESP_OK_NODATA);
        let slots = (0..SLOTS)
            .map(|_| (vmm.alloc(SLOT_BYTES), vmm.alloc(PAGE_SIZE)))
            .collect();
        // From here on the guest kicks only when the device asks for it.
        vmm.suppress_kicks(true);
        Sock {
            vmm,
            ctx,
            base,
            slots,
            next_slot: 0,
            inflight: VecDeque::new(),
        }
    }

    /// Takes back the used entries the device returned; checks their
    /// responses.
    fn reap(&mut self) {
        while let Some((_, len)) = self.vmm.poll_used(0) {
            let slot = self
                .inflight
                .pop_front()
                .expect("a used entry nobody posted");
            let resp = self.slots[slot].1;
            let ty = self.vmm.ram.u32_acquire(resp);
            assert_eq!(
                (ty, len),
                (VIRTIO_GPU_RESP_OK_NODATA, 24),
                "SUBMIT_3D response"
            );
        }
    }
}

impl Channel for Sock {
    fn submit(&mut self, stream: &[u8], _ring: Option<u32>) -> io::Result<()> {
        let mut poll = Poll::new("a free submit slot");
        loop {
            self.reap();
            if self.inflight.len() < SLOTS {
                break;
            }
            poll.pause();
        }
        let slot = self.next_slot;
        self.next_slot = (slot + 1) % SLOTS;
        let (req, resp) = self.slots[slot];
        assert!(32 + stream.len() as u64 <= SLOT_BYTES);
        let mut hdr = harness::hdr(VIRTIO_GPU_CMD_SUBMIT_3D, 0, 0, self.ctx, 0);
        hdr.extend_from_slice(&(stream.len() as u32).to_le_bytes());
        hdr.extend_from_slice(&0u32.to_le_bytes());
        self.vmm.ram.write(req, &hdr);
        self.vmm.ram.write(req + 32, stream);
        self.vmm.ram.write(resp, &[0u8; 24]);
        self.vmm.post(
            0,
            &[
                Desc {
                    addr: req,
                    len: 32 + stream.len() as u32,
                    write: false,
                },
                Desc {
                    addr: resp,
                    len: 24,
                    write: true,
                },
            ],
        );
        self.inflight.push_back(slot);
        Ok(())
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.copy_from_slice(&self.vmm.ram.read(self.base + off, buf.len()));
        Ok(())
    }

    fn write(&self, off: u64, bytes: &[u8]) -> io::Result<()> {
        self.vmm.ram.write(self.base + off, bytes);
        Ok(())
    }

    fn load_u32(&self, off: u64) -> io::Result<u32> {
        Ok(self.vmm.ram.u32_acquire(self.base + off))
    }

    fn load_u64(&self, off: u64) -> io::Result<u64> {
        Ok(self.vmm.ram.u64_acquire(self.base + off))
    }

    fn store_u32(&self, off: u64, value: u32) -> io::Result<()> {
        self.vmm.ram.set_u32_release(self.base + off, value);
        Ok(())
    }

    fn idle(&mut self) {
        self.reap();
    }
}

impl Guest for Sock {
    fn alloc(&mut self, bytes: u64) -> u64 {
        self.vmm.alloc(bytes)
    }

    fn gpa_u32(&self, gpa: u64) -> u32 {
        self.vmm.ram.u32_acquire(gpa)
    }

    fn drain(&mut self) {
        let mut poll = Poll::new("the used ring");
        while !self.inflight.is_empty() {
            self.reap();
            poll.pause();
        }
    }

    fn kicks(&self) -> u64 {
        self.vmm.kicks
    }
}

// ---------------------------------------------------------------------------
// The protocol, the same for both guests.

fn start<G: Guest>(guest: G) -> Client<G> {
    let limits = DecodeLimits::from_capset(&Capset::default());
    let mut c = Client::new(guest, LAYOUT, limits, None);
    c.start(ResourceId(SESSION_RES), Profile::Compat)
        .expect("SESSION_INIT");
    c
}

/// Waits (polling) for the reply of `t`.
fn wait<G: Guest>(c: &mut Client<G>, t: &Ticket) -> Reply {
    let at = c.layout().reply_off + u64::from(t.reply_off.unwrap());
    let mut poll = Poll::new("a reply");
    while c.channel().load_u32(at).unwrap() != t.seqno {
        c.channel_mut().idle();
        poll.pause();
    }
    c.reply(t).unwrap()
}

/// Sends `requests` in one submit and waits for the reply of the last.
fn call<G: Guest>(c: &mut Client<G>, requests: &[Request<'_>]) -> Reply {
    let (bytes, tickets) = c.encode(requests).unwrap();
    c.submit_raw(&bytes, None).unwrap();
    wait(c, tickets.last().unwrap())
}

/// Page `i` from `base`: alone in its 2 MiB span (a last-level table
/// each), as `backend/benches/bind.rs` scatters them.
fn spread_va(base: u64, i: u64) -> GpuVa {
    GpuVa(base + (i << 21) + (i % 512) * PAGE_SIZE)
}

const PAGES: [GuestPhysAddr; 1] = [GPA_PAGE];

fn map_ops(base: u64, first: u64, n: usize) -> Vec<BindOp<'static>> {
    (0..n as u64)
        .map(|i| BindOp::MapPages {
            va: spread_va(base, first + i),
            perms: Perms::RW,
            pages: PageList::new(&PAGES),
        })
        .collect()
}

fn unmap_ops(base: u64, first: u64, n: usize) -> Vec<BindOp<'static>> {
    (0..n as u64)
        .map(|i| BindOp::Unmap {
            va: spread_va(base, first + i),
            size: PAGE_SIZE,
        })
        .collect()
}

fn check_bind(reply: &Reply, ops: usize) {
    assert_eq!(reply.status, Status::Ok, "VM_BIND");
    match reply.payload {
        ReplyPayload::VmBind(b) => assert_eq!(b.ops_done as usize, ops),
        ref p => panic!("{p:?}"),
    }
}

/// Pre-encoded submits: `(stream, ticket of its reply, ops)`.
type Stream = Vec<(Vec<u8>, Ticket, usize)>;

/// The bind stream: `rounds` x (map 4,096 pages, unmap them), in
/// submits of `per_submit` ops.
fn bind_stream<G: Guest>(c: &mut Client<G>, base: u64, rounds: usize, per_submit: usize) -> Stream {
    let mut out = Vec::new();
    for _ in 0..rounds {
        for ops in [map_ops(base, 0, BATCH), unmap_ops(base, 0, BATCH)] {
            for chunk in ops.chunks(per_submit) {
                let (bytes, tickets) = c.encode(&[Request::VmBind(VmBind::new(chunk))]).unwrap();
                out.push((bytes, tickets[0], chunk.len()));
            }
        }
    }
    out
}

/// Runs a pre-encoded stream, each submit waiting for its reply; returns
/// the elapsed time.
fn run_stream<G: Guest>(c: &mut Client<G>, stream: &Stream) -> Duration {
    let start = Instant::now();
    for (bytes, ticket, _) in stream {
        c.submit_raw(bytes, None).unwrap();
        let r = wait(c, ticket);
        if r.status != Status::Ok {
            check_bind(&r, 0);
        }
    }
    let t = start.elapsed();
    c.channel_mut().drain();
    t
}

fn bind_throughput(sock: &mut Client<Sock>, local: &mut Client<Local>, quick: bool) -> Vec<String> {
    println!(
        "\n== VM_BIND throughput (bind ops per second; 4,096 scattered pages mapped, then unmapped) =="
    );
    let mut rows = Vec::new();
    let reps = if quick { 3 } else { 7 };
    for (name, per_submit, rounds) in [
        (
            "batched (4096 ops per submit)",
            BATCH,
            if quick { 4 } else { 16 },
        ),
        ("64 ops per submit", 64, if quick { 2 } else { 8 }),
        ("one op per submit", 1, if quick { 1 } else { 4 }),
    ] {
        let base = 0x100_0000_0000u64;
        let mut s_rates = Vec::new();
        let mut l_rates = Vec::new();
        let mut kicks = 0;
        let mut submits = 0;
        for _ in 0..reps {
            // Interleaved: socket, then in-process, each on a fresh stream.
            let stream = bind_stream(sock, base, rounds, per_submit);
            let ops: usize = stream.iter().map(|s| s.2).sum();
            let k0 = sock.channel().kicks();
            let t = run_stream(sock, &stream);
            kicks += sock.channel().kicks() - k0;
            submits += stream.len();
            s_rates.push(ops as f64 / t.as_secs_f64());
            let stream = bind_stream(local, base, rounds, per_submit);
            let t = run_stream(local, &stream);
            l_rates.push(ops as f64 / t.as_secs_f64());
        }
        let (s, l) = (median(s_rates), median(l_rates));
        println!(
            "VM_BIND {name}: socket {:.0} k/s, in-process {:.0} k/s (socket/in-process {:.2}); \
             {:.3} kicks per submit",
            s / 1e3,
            l / 1e3,
            s / l,
            kicks as f64 / submits as f64
        );
        rows.push(format!("{per_submit},{s:.0},{l:.0}"));
    }
    rows
}

/// A 4,096-op map batch and its unmap batch (one submit each) at growing
/// numbers of existing mappings.
/// The guests of [`bind_levels`]: one whose VM gets the existing
/// mappings, one whose VM stays empty (the baseline), for each path.
struct LevelGuests<'a> {
    sock: &'a mut Client<Sock>,
    sock_empty: &'a mut Client<Sock>,
    local: &'a mut Client<Local>,
    local_empty: &'a mut Client<Local>,
}

fn bind_levels(g: LevelGuests<'_>, quick: bool) -> Vec<String> {
    println!("\n== VM_BIND of a 4,096-op batch at N existing mappings ==");
    println!(
        "(against the same batch on an empty VM, measured round by round in between: a second \
         daemon for the socket, a second context in-process)"
    );
    const POP: u64 = 1 << 40;
    const AT: u64 = 1 << 45;
    let levels: &[u64] = if quick {
        &[0, 10_000, 100_000]
    } else {
        &[0, 10_000, 100_000, 1_000_000]
    };
    let mut population = 0u64;
    let mut rows = Vec::new();
    for &level in levels {
        let built = Instant::now();
        while population < level {
            let n = (level - population).min(BATCH as u64) as usize;
            let ops = map_ops(POP, population, n);
            check_bind(&call(g.sock, &[Request::VmBind(VmBind::new(&ops))]), n);
            check_bind(&call(g.local, &[Request::VmBind(VmBind::new(&ops))]), n);
            population += n as u64;
        }
        let built = built.elapsed();
        // socket map, unmap, then in-process map, unmap; each at this level
        // and on the empty VM.
        let mut t: [Vec<f64>; 8] = Default::default();
        // 21 rounds, the first (warm-up: poll budgets, caches) dropped.
        let maps = map_ops(AT, 0, BATCH);
        let unmaps = unmap_ops(AT, 0, BATCH);
        for round in 0..22 {
            let pairs = [
                timed_pair(g.sock, &maps, &unmaps),
                timed_pair(g.sock_empty, &maps, &unmaps),
                timed_pair(g.local, &maps, &unmaps),
                timed_pair(g.local_empty, &maps, &unmaps),
            ];
            if round > 0 {
                for (i, (m, u)) in pairs.into_iter().enumerate() {
                    t[2 * i].push(m);
                    t[2 * i + 1].push(u);
                }
            }
        }
        let med: Vec<f64> = t.into_iter().map(median).collect();
        // (populated, empty) pairs: socket map, socket unmap, local map,
        // local unmap.
        let ratio = |i: usize| med[i] / med[i + 2];
        println!(
            "{level:>9} mappings: socket map {:>5.2} ms ({:.2}x of empty), unmap {:>5.2} ms \
             ({:.2}x); in-process map {:>5.2} ms ({:.2}x), unmap {:>5.2} ms ({:.2}x); built in \
             {built:.1?}",
            med[0] * 1e3,
            ratio(0),
            med[1] * 1e3,
            ratio(1),
            med[4] * 1e3,
            ratio(4),
            med[5] * 1e3,
            ratio(5),
        );
        rows.push(format!(
            "{level},{:.0},{:.0},{:.0},{:.0},{:.0},{:.0},{:.0},{:.0}",
            med[0] * 1e9,
            med[1] * 1e9,
            med[4] * 1e9,
            med[5] * 1e9,
            med[2] * 1e9,
            med[3] * 1e9,
            med[6] * 1e9,
            med[7] * 1e9
        ));
    }
    rows
}

fn timed_pair<G: Guest>(
    c: &mut Client<G>,
    maps: &[BindOp<'_>],
    unmaps: &[BindOp<'_>],
) -> (f64, f64) {
    let (m, tm) = c.encode(&[Request::VmBind(VmBind::new(maps))]).unwrap();
    let (u, tu) = c.encode(&[Request::VmBind(VmBind::new(unmaps))]).unwrap();
    let t0 = Instant::now();
    c.submit_raw(&m, None).unwrap();
    check_bind(&wait(c, &tm[0]), maps.len());
    let t1 = Instant::now();
    c.submit_raw(&u, None).unwrap();
    check_bind(&wait(c, &tu[0]), unmaps.len());
    let t2 = Instant::now();
    c.channel_mut().drain();
    ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64())
}

/// Round trips: (dispatch -> done, dispatch -> record visible, record ->
/// done).
struct Trips {
    total: Vec<Duration>,
    visible: Vec<Duration>,
    resolve: Vec<Duration>,
}

struct FaultRig {
    queue: QueueId,
    page: u64,
    tail: u32,
    iter: u64,
}

fn fault_rig<G: Guest>(c: &mut Client<G>) -> FaultRig {
    let queue = c.create_queue(1).unwrap();
    let page = c.channel_mut().alloc(PAGE_SIZE);
    c.clear_signal(0).unwrap();
    // Every record so far was consumed: the ring's tail is our head.
    let tail = c
        .channel()
        .load_u32(LAYOUT.ring_off + FAULT_RING_TAIL_OFFSET)
        .unwrap();
    assert!(c.take_faults().unwrap().is_empty());
    FaultRig {
        queue,
        page,
        tail,
        iter: 0,
    }
}

const FAULT_VA: u64 = 0x2_0000_0000;

/// Polls the fault ring until it has records; returns them.
fn next_faults<G: Guest>(c: &mut Client<G>, tail: &mut u32) -> Vec<FaultRecord> {
    let at = LAYOUT.ring_off + FAULT_RING_TAIL_OFFSET;
    let mut poll = Poll::new("a fault record");
    loop {
        let t = c.channel().load_u32(at).unwrap();
        if t != *tail {
            let recs = c.take_faults().unwrap();
            // `take_faults` may have consumed records published after
            // the load above: the consumer index is where it stopped.
            *tail = tail.wrapping_add(recs.len() as u32);
            if !recs.is_empty() {
                return recs;
            }
        }
        c.channel_mut().idle();
        poll.pause();
    }
}

fn wait_signal<G: Guest>(c: &mut Client<G>, slot: u32, value: u64) {
    let mut poll = Poll::new("a signal");
    while c.signal_value(slot).unwrap() != value {
        c.channel_mut().idle();
        poll.pause();
    }
    let s = c.signal(slot).unwrap();
    assert_eq!(s.status, DispatchStatus::Ok, "dispatch status");
}

/// One fault round trip; the page is unbound again afterwards.
fn round_trip<G: Guest>(c: &mut Client<G>, r: &mut FaultRig, trips: &mut Trips) {
    r.iter += 1;
    let value = r.iter;
    let d = Dispatch {
        queue: r.queue,
        kernel: Kernel::Fill {
            dst: GpuVa(FAULT_VA),
            count: 1,
            value: value as u32,
        },
        signal: Some(SignalIndex(0)),
        notify: false,
        completion_value: value,
    };
    let dispatch = c.encode_no_reply(&[Request::Dispatch(d)]).unwrap();
    let pages = [GuestPhysAddr(r.page)];
    let t0 = Instant::now();
    c.submit_raw(&dispatch, None).unwrap();
    let faults = next_faults(c, &mut r.tail);
    let t1 = Instant::now();
    assert_eq!(faults.len(), 1);
    assert_eq!(faults[0].va, GpuVa(FAULT_VA));
    let op = [BindOp::MapPages {
        va: faults[0].va,
        perms: Perms::RW,
        pages: PageList::new(&pages),
    }];
    let e = [FaultReplyEntry {
        fault_id: faults[0].fault_id,
        outcome: FaultOutcome::Resolved,
    }];
    let resolve = c
        .encode_no_reply(&[
            Request::VmBind(VmBind::new(&op)),
            Request::FaultReply(FaultReply::new(&e)),
        ])
        .unwrap();
    c.submit_raw(&resolve, None).unwrap();
    wait_signal(c, 0, value);
    let t2 = Instant::now();
    assert_eq!(c.channel().gpa_u32(r.page), value as u32, "the fill's data");
    trips.total.push(t2 - t0);
    trips.visible.push(t1 - t0);
    trips.resolve.push(t2 - t1);
    let unmap = [BindOp::Unmap {
        va: GpuVa(FAULT_VA),
        size: PAGE_SIZE,
    }];
    check_bind(&call(c, &[Request::VmBind(VmBind::new(&unmap))]), 1);
    c.channel_mut().drain();
}

fn fault_latency(sock: &mut Client<Sock>, local: &mut Client<Local>, quick: bool) -> Vec<String> {
    println!(
        "\n== Fault round trip, polling guest (dispatch -> record -> bind + reply -> done) =="
    );
    let mut rs = fault_rig(sock);
    let mut rl = fault_rig(local);
    let new = || Trips {
        total: Vec::new(),
        visible: Vec::new(),
        resolve: Vec::new(),
    };
    let (mut ts, mut tl) = (new(), new());
    // Warm-up, then interleaved blocks of 100.
    for _ in 0..200 {
        round_trip(sock, &mut rs, &mut new());
        round_trip(local, &mut rl, &mut new());
    }
    let blocks = if quick { 20 } else { 100 };
    for _ in 0..blocks {
        for _ in 0..100 {
            round_trip(sock, &mut rs, &mut ts);
        }
        for _ in 0..100 {
            round_trip(local, &mut rl, &mut tl);
        }
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mut rows = Vec::new();
    for (name, t) in [("socket", &mut ts), ("in-process", &mut tl)] {
        println!(
            "{name:>10}: round trip p50 {:.1} us, p90 {:.1} us, p99 {:.1} us; dispatch -> visible \
             record p50 {:.1} us, p99 {:.1} us; record -> done (bind + reply) p50 {:.1} us ({} samples)",
            us(pct(&mut t.total, 50.0)),
            us(pct(&mut t.total, 90.0)),
            us(pct(&mut t.total, 99.0)),
            us(pct(&mut t.visible, 50.0)),
            us(pct(&mut t.visible, 99.0)),
            us(pct(&mut t.resolve, 50.0)),
            t.total.len()
        );
        for i in 0..t.total.len() {
            rows.push(format!(
                "{name},{:.3},{:.3},{:.3}",
                us(t.total[i]),
                us(t.visible[i]),
                us(t.resolve[i])
            ));
        }
    }
    rows
}

/// A `FILL` over `pages` unbound pages; every record is resolved as it
/// arrives (all records of a poll in one submit). Returns faults/s.
fn batched_faults<G: Guest>(
    c: &mut Client<G>,
    r: &mut FaultRig,
    pool: u64,
    pages: u64,
    round: u64,
) -> f64 {
    let base = 0x4_0000_0000u64;
    let value = 0xBA7C_0000 | round;
    let d = Dispatch {
        queue: r.queue,
        kernel: Kernel::Fill {
            dst: GpuVa(base),
            count: pages * 1024,
            value: value as u32,
        },
        signal: Some(SignalIndex(1)),
        notify: false,
        completion_value: value,
    };
    let dispatch = c.encode_no_reply(&[Request::Dispatch(d)]).unwrap();
    let start = Instant::now();
    c.submit_raw(&dispatch, None).unwrap();
    let mut faults = 0u64;
    let at = LAYOUT.ring_off + FAULT_RING_TAIL_OFFSET;
    let mut poll = Poll::new("batched faults");
    let mut gpas: Vec<[GuestPhysAddr; 1]> = Vec::new();
    loop {
        let t = c.channel().load_u32(at).unwrap();
        if t != r.tail {
            let recs = c.take_faults().unwrap();
            r.tail = r.tail.wrapping_add(recs.len() as u32);
            if recs.is_empty() {
                poll.pause();
                continue;
            }
            gpas.clear();
            gpas.extend(recs.iter().map(|f| {
                let i = (f.va.raw() - base) / PAGE_SIZE;
                assert!(i < pages);
                [GuestPhysAddr(pool + i * PAGE_SIZE)]
            }));
            let ops: Vec<BindOp<'_>> = recs
                .iter()
                .zip(&gpas)
                .map(|(f, p)| BindOp::MapPages {
                    va: f.va,
                    perms: Perms::RW,
                    pages: PageList::new(p),
                })
                .collect();
            let entries: Vec<FaultReplyEntry> = recs
                .iter()
                .map(|f| FaultReplyEntry {
                    fault_id: f.fault_id,
                    outcome: FaultOutcome::Resolved,
                })
                .collect();
            let s = c
                .encode_no_reply(&[
                    Request::VmBind(VmBind::new(&ops)),
                    Request::FaultReply(FaultReply::new(&entries)),
                ])
                .unwrap();
            c.submit_raw(&s, None).unwrap();
            faults += recs.len() as u64;
            continue;
        }
        if c.signal_value(1).unwrap() == value {
            break;
        }
        c.channel_mut().idle();
        poll.pause();
    }
    let elapsed = start.elapsed();
    assert_eq!(c.signal(1).unwrap().status, DispatchStatus::Ok);
    assert_eq!(faults, pages, "one fault per page");
    for i in [0, pages / 2, pages - 1] {
        assert_eq!(
            c.channel().gpa_u32(pool + i * PAGE_SIZE + 4092),
            value as u32
        );
    }
    let unmap = [BindOp::Unmap {
        va: GpuVa(base),
        size: pages * PAGE_SIZE,
    }];
    check_bind(&call(c, &[Request::VmBind(VmBind::new(&unmap))]), 1);
    c.channel_mut().drain();
    faults as f64 / elapsed.as_secs_f64()
}

fn batched(sock: &mut Client<Sock>, local: &mut Client<Local>, quick: bool) -> (f64, f64) {
    println!(
        "\n== Batched faults: FILL over 8,192 unbound pages, records resolved as they arrive =="
    );
    let pages = 8192u64;
    let mut rs = fault_rig(sock);
    let mut rl = fault_rig(local);
    let ps = sock.channel_mut().alloc(pages * PAGE_SIZE);
    let pl = local.channel_mut().alloc(pages * PAGE_SIZE);
    let (mut s, mut l) = (Vec::new(), Vec::new());
    for round in 0..if quick { 3 } else { 9 } {
        s.push(batched_faults(sock, &mut rs, ps, pages, round));
        l.push(batched_faults(local, &mut rl, pl, pages, round));
    }
    let (s, l) = (median(s), median(l));
    println!(
        "batched faults: socket {:.0} k/s, in-process {:.0} k/s (socket/in-process {:.2})",
        s / 1e3,
        l / 1e3,
        s / l
    );
    (s, l)
}

/// The daemon's CPU over `window` with a session open and nothing
/// happening, against a daemon without a connection, measured at the
/// same time.
fn idle_cost(daemon: &Daemon, window: Duration) -> (f64, f64) {
    println!("\n== Idle cost: a connected guest with an open session, nothing happening ==");
    let lonely = Daemon::start(&[]);
    std::thread::sleep(Duration::from_millis(500));
    let (a0, b0) = (
        process_cpu(daemon.pid() as u32),
        process_cpu(lonely.pid() as u32),
    );
    let t0 = Instant::now();
    std::thread::sleep(window);
    let (a1, b1) = (
        process_cpu(daemon.pid() as u32),
        process_cpu(lonely.pid() as u32),
    );
    let secs = t0.elapsed().as_secs_f64();
    let share = |a: Duration, b: Duration| (b - a).as_secs_f64() / secs * 100.0;
    let (conn, base) = (share(a0.0, a1.0), share(b0.0, b1.0));
    println!(
        "idle daemon CPU over {window:?}: connected with a session {conn:.3}% of one core \
         (/proc/PID/stat: {:.2}%), no connection {base:.3}% (stat {:.2}%)",
        share(a0.1, a1.1),
        share(b0.1, b1.1)
    );
    (conn, base)
}

fn main() {
    if common::under_test() {
        return;
    }
    let quick = common::quick();
    print_load("at start");
    let daemon = Daemon::start(&[]);
    let mut sock = start(Sock::new(&daemon));
    let mut local = start(Local::new(256 << 20));
    let mut summary = Vec::new();
    if common::wanted("bind") {
        let rows = bind_throughput(&mut sock, &mut local, quick);
        write_csv(
            "socket_bind",
            "ops_per_submit,socket_ops_per_s,inprocess_ops_per_s",
            &rows,
        );
        summary.extend(rows.iter().map(|r| format!("bind,{r}")));
    }
    if common::wanted("levels") {
        let empty_daemon = Daemon::start(&[]);
        let mut sock_empty = start(Sock::new(&empty_daemon));
        let mut local_empty = start(Local::new(256 << 20));
        let rows = bind_levels(
            LevelGuests {
                sock: &mut sock,
                sock_empty: &mut sock_empty,
                local: &mut local,
                local_empty: &mut local_empty,
            },
            quick,
        );
        write_csv(
            "socket_bind_levels",
            "mappings,socket_map_ns,socket_unmap_ns,inprocess_map_ns,inprocess_unmap_ns,\
             empty_socket_map_ns,empty_socket_unmap_ns,empty_inprocess_map_ns,empty_inprocess_unmap_ns",
            &rows,
        );
    }
    if common::wanted("fault") {
        let rows = fault_latency(&mut sock, &mut local, quick);
        write_csv(
            "fault_latency",
            "path,round_trip_us,visible_us,resolve_us",
            &rows,
        );
    }
    if common::wanted("batched") {
        let (s, l) = batched(&mut sock, &mut local, quick);
        summary.push(format!("batched_faults,{s:.0},{l:.0}"));
    }
    if common::wanted("idle") {
        let window = if quick {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(10)
        };
        let (c, b) = idle_cost(&daemon, window);
        summary.push(format!("idle_cpu_percent,{c:.4},{b:.4}"));
    }
    write_csv("socket_summary", "what,socket,baseline", &summary);
    print_load("at end");
}
