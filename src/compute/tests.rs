//! The compute layer without virtqueues: a guest driver played in-process
//! against the simulated GPU and real guest RAM.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gpu_backend::GuestRam;
use gpu_backend::sim::{SimConfig, SimGpu};
use guest_proto::bind::{BindOp, PageList as WirePages, VmBind};
use guest_proto::capset::Capset;
use guest_proto::command::{DecodeLimits, Dispatch, Profile, Region};
use guest_proto::fault::{
    FaultCause, FaultOutcome, FaultRecord as WireFault, FaultReply, FaultReplyEntry,
};
use guest_proto::reply::{Reply, ReplyPayload};
use guest_proto::signal::SignalSlot;
use guest_proto::writer::RequestWriter;
use guest_proto::{
    DispatchStatus, GpuVa, GuestPhysAddr, Kernel, Perms, QueueId, Request, ResourceId, SignalIndex,
    Status,
};
use guest_runtime::client::{self as runtime, Channel, SessionLayout};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};

use super::testing::TestGuest;
use super::{ComputeBackend, ComputeConfig};
use crate::context_backend::{
    ContextBackend, ContextBackendError, ContextInit, CtxId, FenceDisposition, FenceRef,
    GuestBacking, ResourceKind, ResourceView,
};

const RAM: u64 = 64 << 20;
const SESSION_BYTES: u64 = 16384;
const LAYOUT: SessionLayout = SessionLayout::COMPACT;

type Backend = Rc<RefCell<ComputeBackend>>;

/// The guest runtime's client, talking to the backend in-process: a submit
/// is a direct call, the session buffer is read in guest RAM, and waiting
/// ticks the backend.
struct InProcess {
    nc: Backend,
    mem: GuestRam,
    ctx: CtxId,
    base: u64,
}

impl InProcess {
    fn at(&self, off: u64, len: usize) -> std::io::Result<GuestAddress> {
        if off.saturating_add(len as u64) > SESSION_BYTES {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        Ok(GuestAddress(self.base + off))
    }
}

impl Channel for InProcess {
    fn submit(&mut self, stream: &[u8], _ring: Option<u32>) -> std::io::Result<()> {
        let result = self.nc.borrow_mut().submit(self.ctx, stream, None);
        result.map(|_| ()).map_err(std::io::Error::other)
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let at = self.at(off, buf.len())?;
        self.mem
            .memory()
            .read_slice(buf, at)
            .map_err(std::io::Error::other)
    }

    fn write(&self, off: u64, bytes: &[u8]) -> std::io::Result<()> {
        let at = self.at(off, bytes.len())?;
        self.mem
            .memory()
            .write_slice(bytes, at)
            .map_err(std::io::Error::other)
    }

    fn load_u32(&self, off: u64) -> std::io::Result<u32> {
        let at = self.at(off, 4)?;
        self.mem
            .memory()
            .load(at, Ordering::Acquire)
            .map_err(std::io::Error::other)
    }

    fn load_u64(&self, off: u64) -> std::io::Result<u64> {
        let at = self.at(off, 8)?;
        self.mem
            .memory()
            .load(at, Ordering::Acquire)
            .map_err(std::io::Error::other)
    }

    fn store_u32(&self, off: u64, value: u32) -> std::io::Result<()> {
        let at = self.at(off, 4)?;
        self.mem
            .memory()
            .store(value, at, Ordering::Release)
            .map_err(std::io::Error::other)
    }

    fn idle(&mut self) {
        self.nc.borrow_mut().tick();
    }
}

type Guest = TestGuest;

/// One context with a session.
struct Client {
    ctx: CtxId,
    session_res: ResourceId,
    session_gpa: u64,
    proto: runtime::Client<InProcess>,
}

impl TestGuest {
    fn with(config: ComputeConfig) -> TestGuest {
        let device = SimGpu::new(SimConfig {
            compute_units: 2,
            ..SimConfig::default()
        });
        TestGuest::new(device, config, RAM)
    }

    /// A context of `ctx` with its session buffer (not started).
    fn context(&mut self, ctx: u32, init: ContextInit) -> Client {
        let ctx = CtxId(ctx);
        self.nc().create_context(ctx, init, "test").unwrap();
        let session_res = ResourceId(ctx.0 * 100);
        let session_gpa = self.resource(ctx, session_res.0, SESSION_BYTES);
        let channel = InProcess {
            nc: self.backend.clone(),
            mem: self.mem.clone(),
            ctx,
            base: session_gpa,
        };
        let limits = DecodeLimits::from_capset(&Capset::default());
        Client {
            ctx,
            session_res,
            session_gpa,
            proto: runtime::Client::new(channel, LAYOUT, limits, None),
        }
    }

    fn open(&mut self, ctx: u32, init: ContextInit, profile: Profile) -> Client {
        let mut client = self.context(ctx, init);
        client
            .proto
            .start(client.session_res, profile)
            .expect("SESSION_INIT");
        client
    }

    /// Sends one request and returns its reply.
    fn call(&mut self, c: &mut Client, request: &Request<'_>) -> Reply {
        c.proto.request(request).unwrap()
    }

    fn signal(&self, c: &Client, slot: u32) -> SignalSlot {
        c.proto.signal(slot).unwrap()
    }

    /// Ticks the compute layer until the signal reaches `value`.
    fn wait_signal(&mut self, c: &mut Client, slot: u32, value: u64) -> SignalSlot {
        c.proto
            .wait_signal(slot, value, Duration::from_secs(20), |_| Ok(false))
            .unwrap_or_else(|e| panic!("signal {slot} never reached {value}: {e}"))
    }

    /// New fault records since the last call.
    fn take_faults(&mut self, c: &mut Client) -> Vec<WireFault> {
        self.nc().tick();
        c.proto.take_faults().unwrap()
    }

    fn create_queue(&mut self, c: &mut Client) -> QueueId {
        c.proto.create_queue(0).unwrap()
    }

    fn fill(
        &mut self,
        c: &mut Client,
        q: QueueId,
        va: u64,
        count: u64,
        slot: u32,
        value: u64,
    ) -> Status {
        let d = Dispatch {
            queue: q,
            kernel: Kernel::Fill {
                dst: GpuVa(va),
                count,
                value: 0xC0DE_0000 | slot,
            },
            signal: Some(SignalIndex(slot)),
            notify: false,
            completion_value: value,
        };
        c.proto.clear_signal(slot).unwrap();
        self.call(c, &Request::Dispatch(d)).status
    }

    fn bind(&mut self, c: &mut Client, op: BindOp<'_>) -> Reply {
        let ops = [op];
        self.call(c, &Request::VmBind(VmBind::new(&ops)))
    }

    fn answer(&mut self, c: &mut Client, id: guest_proto::FaultId, outcome: FaultOutcome) -> Reply {
        let entries = [FaultReplyEntry {
            fault_id: id,
            outcome,
        }];
        self.call(c, &Request::FaultReply(FaultReply::new(&entries)))
    }
}

fn compat() -> ContextInit {
    ContextInit { capset_id: None }
}

#[test]
fn bind_and_dispatch_write_guest_memory() {
    let mut g = Guest::with(ComputeConfig::default());
    let mut c = g.open(1, compat(), Profile::Compat);
    let data = g.resource(c.ctx, 2, 1 << 20);
    let r = g.bind(
        &mut c,
        BindOp::MapResource {
            va: GpuVa(0x1000_0000),
            size: 1 << 20,
            perms: Perms::RW,
            resource: ResourceId(2),
            offset: 0,
        },
    );
    assert_eq!(r.status, Status::Ok);
    let ReplyPayload::VmBind(b) = r.payload else {
        panic!()
    };
    assert_eq!((b.ops_done, b.bound_bytes), (1, 1 << 20));
    let q = g.create_queue(&mut c);
    assert_eq!(
        g.fill(&mut c, q, 0x1000_0000, (1 << 20) / 4, 3, 7),
        Status::Ok
    );
    let s = g.wait_signal(&mut c, 3, 7);
    assert_eq!(s.status, DispatchStatus::Ok);
    for at in [0u64, 4, 0x8_0000, (1 << 20) - 4] {
        assert_eq!(g.u32_at(data + at), 0xC0DE_0003, "offset {at:#x}");
    }
    assert_eq!(g.u32_at(data + (1 << 20)), 0, "past the buffer");
}

#[test]
fn forwarded_faults_are_resolved_by_binding_pages() {
    let mut g = Guest::with(ComputeConfig::default());
    let mut c = g.open(1, compat(), Profile::Compat);
    let q = g.create_queue(&mut c);
    let va = 0x2000_0000u64;
    assert_eq!(g.fill(&mut c, q, va, 4 * 1024, 1, 11), Status::Ok);
    let mut backing = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while g.signal(&c, 1).value != 11 {
        for f in g.take_faults(&mut c) {
            assert!(matches!(f.cause, FaultCause::Access { .. }));
            let page = g.alloc(4096);
            backing.insert(f.va.raw(), page);
            let pages = [GuestPhysAddr(page)];
            let r = g.bind(
                &mut c,
                BindOp::MapPages {
                    va: f.va,
                    perms: Perms::RW,
                    pages: WirePages::new(&pages),
                },
            );
            assert_eq!(r.status, Status::Ok);
            assert_eq!(
                g.answer(&mut c, f.fault_id, FaultOutcome::Resolved).status,
                Status::Ok
            );
        }
        assert!(Instant::now() < deadline, "fill never completed");
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(g.signal(&c, 1).status, DispatchStatus::Ok);
    assert_eq!(backing.len(), 4, "one fault per page");
    for (page_va, gpa) in &backing {
        assert!(*page_va >= va && *page_va < va + 16384);
        assert_eq!(g.u32_at(*gpa), 0xC0DE_0001);
        assert_eq!(g.u32_at(*gpa + 4092), 0xC0DE_0001);
    }
    let r = g.call(&mut c, &Request::DeviceQuery);
    let ReplyPayload::DeviceQuery(stats) = r.payload else {
        panic!()
    };
    assert_eq!(stats.faults_resolved, 4);
    assert_eq!(stats.faults_raised, 4);
    assert_eq!(stats.bound_bytes, 4 * 4096);
}

#[test]
fn rejected_and_fatal_faults_fail_the_work() {
    let mut g = Guest::with(ComputeConfig::default());
    let mut c = g.open(1, compat(), Profile::Compat);
    let q = g.create_queue(&mut c);
    assert_eq!(g.fill(&mut c, q, 0x3000_0000, 16, 2, 5), Status::Ok);
    let deadline = Instant::now() + Duration::from_secs(20);
    let faults = loop {
        let f = g.take_faults(&mut c);
        if !f.is_empty() {
            break f;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_micros(200));
    };
    assert_eq!(faults[0].va, GpuVa(0x3000_0000));
    g.answer(&mut c, faults[0].fault_id, FaultOutcome::Rejected);
    let s = g.wait_signal(&mut c, 2, 5);
    assert_eq!(s.status, DispatchStatus::FaultRejected);
    assert_eq!(s.error_va, GpuVa(0x3000_0000));
    // A late second answer is unknown.
    let late = g.answer(&mut c, faults[0].fault_id, FaultOutcome::Resolved);
    assert_eq!(late.status, Status::UnknownFault);

    // The NULL guard is never forwarded.
    assert_eq!(g.fill(&mut c, q, 0x1000, 16, 4, 9), Status::Ok);
    let s = g.wait_signal(&mut c, 4, 9);
    assert_eq!(s.status, DispatchStatus::FaultFatal);
    assert!(g.take_faults(&mut c).is_empty());
}

#[test]
fn contexts_cannot_reach_each_other() {
    let mut g = Guest::with(ComputeConfig::default());
    let mut a = g.open(1, compat(), Profile::Compat);
    let mut b = g.open(2, compat(), Profile::Compat);
    g.resource(a.ctx, 7, 1 << 16);
    let qa = g.create_queue(&mut a);
    let r = g.bind(
        &mut b,
        BindOp::MapResource {
            va: GpuVa(0x1000_0000),
            size: 4096,
            perms: Perms::RW,
            resource: ResourceId(7),
            offset: 0,
        },
    );
    assert_eq!(r.status, Status::UnknownResource);
    assert_eq!(
        g.fill(&mut b, qa, 0x1000_0000, 16, 0, 1),
        Status::UnknownQueue
    );
    // A's session memory is A's: B cannot use it as its own region either.
    let stolen = Region {
        resource: a.session_res,
        offset: 0,
        size: 4096,
    };
    assert!(
        g.nc().contexts[&b.ctx]
            .resources
            .backing(stolen.resource)
            .is_none()
    );
}

#[test]
fn native_event_fence_is_held_until_a_fault_is_pending() {
    let mut g = Guest::with(ComputeConfig::default());
    let init = ContextInit {
        capset_id: Some(guest_proto::capset::VGNC_CAPSET_ID),
    };
    let mut c = g.open(1, init, Profile::Native { event_ring: 1 });
    let q = g.create_queue(&mut c);
    let fence = FenceRef {
        ctx: c.ctx,
        fence_id: 40,
        ring_idx: Some(1),
    };
    let mut w = RequestWriter::new(0..LAYOUT.reply_size as u32);
    w.push_no_reply(&Request::EventArm).unwrap();
    assert_eq!(
        g.nc().submit(c.ctx, w.as_bytes(), Some(fence)),
        Ok(FenceDisposition::Hold)
    );
    g.nc().tick();
    assert!(g.fences.0.lock().is_empty(), "nothing pending yet");
    assert_eq!(g.fill(&mut c, q, 0x4000_0000, 16, 0, 1), Status::Ok);
    let deadline = Instant::now() + Duration::from_secs(20);
    while g.fences.0.lock().is_empty() {
        g.nc().tick();
        assert!(Instant::now() < deadline, "event fence never completed");
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(g.fences.0.lock().as_slice(), &[fence]);
    // Unconsumed records: a new arm completes at once.
    let mut w = RequestWriter::new(0..LAYOUT.reply_size as u32);
    w.push_no_reply(&Request::EventArm).unwrap();
    let again = FenceRef {
        fence_id: 41,
        ..fence
    };
    assert_eq!(
        g.nc().submit(c.ctx, w.as_bytes(), Some(again)),
        Ok(FenceDisposition::SignalNow)
    );
}

#[test]
fn compat_sessions_are_refused_the_native_profile_and_events() {
    let mut g = Guest::with(ComputeConfig::default());
    g.nc().create_context(CtxId(5), compat(), "x").unwrap();
    let gpa = g.resource(CtxId(5), 9, SESSION_BYTES);
    let init = LAYOUT
        .session_init(ResourceId(9), Profile::Native { event_ring: 1 })
        .unwrap();
    let mut w = RequestWriter::new(0..LAYOUT.reply_size as u32);
    let t = w.push(&Request::SessionInit(init)).unwrap();
    assert_eq!(
        g.nc().submit(CtxId(5), w.as_bytes(), None),
        Err(ContextBackendError::InvalidParameter)
    );
    let reply = Reply::decode(&g.read::<32>(gpa + u64::from(t.reply_off.unwrap()))).unwrap();
    assert_eq!(reply.status, Status::Version);
}

#[test]
fn malformed_streams_get_errors_and_the_session_survives() {
    let mut g = Guest::with(ComputeConfig::default());
    let mut c = g.open(1, compat(), Profile::Compat);
    // Unknown command, well framed: an error reply, processing goes on.
    let mut raw = Vec::new();
    raw.extend_from_slice(&0x7777u32.to_le_bytes());
    raw.extend_from_slice(&16u32.to_le_bytes());
    raw.extend_from_slice(&900u32.to_le_bytes());
    raw.extend_from_slice(&64u32.to_le_bytes());
    assert_eq!(
        g.nc().submit(c.ctx, &raw, None),
        Ok(FenceDisposition::SignalNow)
    );
    let reply = Reply::decode(&g.read::<16>(c.session_gpa + 64)).unwrap();
    assert_eq!((reply.seqno, reply.status), (900, Status::UnknownCommand));
    // Broken framing fails the submit.
    assert_eq!(
        g.nc().submit(c.ctx, &[1, 2, 3], None),
        Err(ContextBackendError::InvalidParameter)
    );
    // Unknown context.
    assert_eq!(
        g.nc().submit(CtxId(99), &raw, None),
        Err(ContextBackendError::InvalidContext)
    );
    // Still serving.
    let q = g.create_queue(&mut c);
    assert_eq!(g.call(&mut c, &Request::DeviceQuery).status, Status::Ok);
    assert_ne!(q, QueueId(u32::MAX));
}

#[test]
fn destroying_a_context_with_pending_faults_cancels_its_work() {
    let mut g = Guest::with(ComputeConfig::default());
    let mut c = g.open(1, compat(), Profile::Compat);
    let q = g.create_queue(&mut c);
    assert_eq!(g.fill(&mut c, q, 0x5000_0000, 4096, 6, 3), Status::Ok);
    let deadline = Instant::now() + Duration::from_secs(20);
    while g.take_faults(&mut c).is_empty() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_micros(200));
    }
    g.nc().destroy_context(c.ctx);
    let s = g.signal(&c, 6);
    assert_eq!((s.value, s.status), (3, DispatchStatus::Cancelled));
    // The guest's next context works.
    let mut d = g.open(2, compat(), Profile::Compat);
    assert_eq!(g.call(&mut d, &Request::DeviceQuery).status, Status::Ok);
}

#[test]
fn bound_bytes_are_a_per_guest_quota() {
    let config = ComputeConfig {
        max_bound_bytes: 8192,
        ..ComputeConfig::default()
    };
    let mut g = Guest::with(config);
    let mut a = g.open(1, compat(), Profile::Compat);
    let mut b = g.open(2, compat(), Profile::Compat);
    let page = g.alloc(8192);
    let pa = [GuestPhysAddr(page)];
    let pb = [GuestPhysAddr(page + 4096)];
    let map = |va, pages| BindOp::MapPages {
        va: GpuVa(va),
        perms: Perms::RW,
        pages,
    };
    assert_eq!(
        g.bind(&mut a, map(0x1000_0000, WirePages::new(&pa))).status,
        Status::Ok
    );
    assert_eq!(
        g.bind(&mut b, map(0x1000_0000, WirePages::new(&pb))).status,
        Status::Ok
    );
    assert_eq!(
        g.bind(&mut b, map(0x2000_0000, WirePages::new(&pb))).status,
        Status::Quota
    );
    // Remapping in place costs nothing; unmapping gives it back.
    assert_eq!(
        g.bind(&mut a, map(0x1000_0000, WirePages::new(&pb))).status,
        Status::Ok
    );
    let unmap = BindOp::Unmap {
        va: GpuVa(0x1000_0000),
        size: 4096,
    };
    assert_eq!(g.bind(&mut a, unmap).status, Status::Ok);
    assert_eq!(
        g.bind(&mut b, map(0x2000_0000, WirePages::new(&pb))).status,
        Status::Ok
    );
}

#[test]
fn unanswered_faults_time_out_and_late_answers_are_unknown() {
    let config = ComputeConfig {
        fault_timeout: Duration::from_millis(50),
        ..ComputeConfig::default()
    };
    let mut g = Guest::with(config);
    let mut c = g.open(1, compat(), Profile::Compat);
    let q = g.create_queue(&mut c);
    assert_eq!(g.fill(&mut c, q, 0x3000_0000, 16, 1, 4), Status::Ok);
    let s = g.wait_signal(&mut c, 1, 4);
    assert_eq!(
        (s.status, s.error_va),
        (DispatchStatus::FaultTimedOut, GpuVa(0x3000_0000))
    );
    let f = g.take_faults(&mut c);
    assert_eq!(f.len(), 1);
    let late = g.answer(&mut c, f[0].fault_id, FaultOutcome::Resolved);
    assert_eq!(late.status, Status::UnknownFault);
    let ReplyPayload::DeviceQuery(stats) = g.call(&mut c, &Request::DeviceQuery).payload else {
        panic!()
    };
    assert_eq!(stats.faults_timed_out, 1);
}

#[test]
fn range_attributes_make_faults_fatal_or_prefault_granules() {
    use guest_proto::FaultPolicy;
    use guest_proto::attr::{RangeAttr, RangeAttrs};
    let mut g = Guest::with(ComputeConfig::default());
    let mut c = g.open(1, compat(), Profile::Compat);
    let q = g.create_queue(&mut c);
    let attr = |va: u64, size: u64, attrs: RangeAttrs| {
        Request::RangeAttr(RangeAttr {
            va: GpuVa(va),
            size,
            attrs,
        })
    };
    // Fatal policy: never forwarded.
    let fatal = RangeAttrs {
        fault_policy: Some(FaultPolicy::Fatal),
        ..RangeAttrs::default()
    };
    assert_eq!(
        g.call(&mut c, &attr(0x1000_0000, 1 << 20, fatal)).status,
        Status::Ok
    );
    assert_eq!(g.fill(&mut c, q, 0x1000_0000, 16, 1, 1), Status::Ok);
    assert_eq!(
        g.wait_signal(&mut c, 1, 1).status,
        DispatchStatus::FaultFatal
    );
    // Read-only access: a write fault is fatal, a read fault is forwarded.
    let ro = RangeAttrs {
        access: Some(Perms::READ),
        ..RangeAttrs::default()
    };
    assert_eq!(
        g.call(&mut c, &attr(0x2000_0000, 1 << 20, ro)).status,
        Status::Ok
    );
    assert_eq!(g.fill(&mut c, q, 0x2000_0000, 16, 2, 2), Status::Ok);
    assert_eq!(
        g.wait_signal(&mut c, 2, 2).status,
        DispatchStatus::FaultFatal
    );
    assert!(
        g.take_faults(&mut c).is_empty(),
        "fatal faults are never written"
    );
    // Prefault: one record per unbound 64 KiB granule, none where bound.
    let page = g.alloc(4096);
    let pages = [GuestPhysAddr(page)];
    let bound = BindOp::MapPages {
        va: GpuVa(0x4001_0000),
        perms: Perms::RW,
        pages: WirePages::new(&pages),
    };
    assert_eq!(g.bind(&mut c, bound).status, Status::Ok);
    let pf = RangeAttrs {
        granule_shift: Some(16),
        prefault: Some(true),
        ..RangeAttrs::default()
    };
    assert_eq!(
        g.call(&mut c, &attr(0x4000_0000, 4 << 16, pf)).status,
        Status::Ok
    );
    let f = g.take_faults(&mut c);
    let vas: Vec<u64> = f.iter().map(|r| r.va.raw()).collect();
    assert_eq!(
        vas,
        vec![0x4000_0000, 0x4001_1000, 0x4002_0000, 0x4003_0000]
    );
    assert!(
        f.iter()
            .all(|r| r.cause == FaultCause::Prefault && r.granule_shift == 16)
    );
    // Outside the aperture (the reserved range) attributes are refused.
    let reserved = RangeAttrs {
        granule_shift: Some(16),
        ..RangeAttrs::default()
    };
    assert_eq!(
        g.call(&mut c, &attr(1 << 47, 1 << 16, reserved)).status,
        Status::OutOfRange
    );
}

#[test]
fn detaching_session_memory_ends_the_session_and_it_can_start_again() {
    let mut g = Guest::with(ComputeConfig::default());
    let mut c = g.open(1, compat(), Profile::Compat);
    let q = g.create_queue(&mut c);
    assert_eq!(g.fill(&mut c, q, 0x3000_0000, 16, 5, 8), Status::Ok);
    g.nc().detach_resource(c.ctx, c.session_res);
    assert_eq!(
        g.signal(&c, 5).status,
        DispatchStatus::Cancelled,
        "the session's work was cancelled"
    );
    // No session now: requests are refused at the virtio level.
    let mut w = RequestWriter::new(0..LAYOUT.reply_size as u32);
    w.push(&Request::DeviceQuery).unwrap();
    assert_eq!(
        g.nc().submit(c.ctx, w.as_bytes(), None),
        Err(ContextBackendError::InvalidParameter)
    );
    // Re-attach and start again.
    let view = ResourceView {
        id: c.session_res,
        kind: ResourceKind::Buffer3d,
        size: SESSION_BYTES,
        backing: Some(Arc::new(GuestBacking {
            entries: vec![(GuestAddress(c.session_gpa), SESSION_BYTES as u32)],
        })),
    };
    g.nc().attach_resource(c.ctx, &view).unwrap();
    c.proto.start(c.session_res, Profile::Compat).unwrap();
    let init = LAYOUT.session_init(c.session_res, Profile::Compat).unwrap();
    assert_eq!(
        g.call(&mut c, &Request::SessionInit(init)).status,
        Status::SessionActive
    );
    // EVENT_ARM must not ask for a reply; if it does it is refused there.
    let mut raw = Vec::new();
    for v in [0x40u32, 16, 77, 512] {
        raw.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(
        g.nc().submit(c.ctx, &raw, None),
        Ok(FenceDisposition::SignalNow)
    );
    let reply = Reply::decode(&g.read::<16>(c.session_gpa + 512)).unwrap();
    assert_eq!((reply.seqno, reply.status), (77, Status::InvalidArgument));
    assert_eq!(g.call(&mut c, &Request::SessionDestroy).status, Status::Ok);
}

mod hostile {
    //! Arbitrary bytes from the guest: never a panic, and the device keeps
    //! serving.
    use super::*;
    use crate::virtio_gpu::device::{GpuDevice, GpuLimits};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn arbitrary_submit_streams(streams in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..512), 1..8)) {
            let mut g = Guest::with(ComputeConfig::default());
            let mut c = g.open(1, compat(), Profile::Compat);
            for s in &streams {
                let _ = g.nc().submit(c.ctx, s, None);
            }
            // Streams that are valid requests with garbage fields too.
            for s in &streams {
                let mut framed = Vec::new();
                for chunk in s.chunks(48) {
                    let cmd = [0x1u32, 0x2, 0x3, 0x10, 0x11, 0x20, 0x21, 0x22, 0x30, 0x40][chunk.len() % 10];
                    let len = (16 + chunk.len()).next_multiple_of(8) as u32;
                    for v in [cmd, len, 7, 256] {
                        framed.extend_from_slice(&v.to_le_bytes());
                    }
                    framed.extend_from_slice(chunk);
                    framed.resize(framed.len().next_multiple_of(8), 0);
                }
                let _ = g.nc().submit(c.ctx, &framed, None);
            }
            g.nc().tick();
            let r = g.call(&mut c, &Request::DeviceQuery);
            prop_assert!(r.status == Status::Ok || r.status == Status::NoSession);
        }

        #[test]
        fn arbitrary_control_commands(cmds in prop::collection::vec((0usize..30, prop::collection::vec(any::<u8>(), 0..200)), 1..16)) {
            const TYPES: [u32; 30] = [
                0x100, 0x101, 0x102, 0x103, 0x104, 0x105, 0x106, 0x107, 0x108, 0x109, 0x10a, 0x10b,
                0x10c, 0x10d, 0x200, 0x201, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207, 0x208, 0x209,
                0x300, 0x301, 0x0, 0xffff_ffff, 0x1100, 0x1205,
            ];
            let g = Guest::with(ComputeConfig::default());
            let Ok(nc) = Rc::try_unwrap(g.backend) else { panic!("no clients") };
            let nc = nc.into_inner();
            let mut dev = GpuDevice::new(Box::new(nc), GpuLimits::default());
            dev.set_memory(g.mem.clone());
            dev.set_features(0x1f);
            for (t, body) in &cmds {
                let mut req = Vec::new();
                req.extend_from_slice(&TYPES[*t].to_le_bytes());
                req.extend_from_slice(body);
                let resp = dev.process(&req);
                let ty = u32::from_le_bytes(resp.bytes[..4].try_into().unwrap());
                prop_assert!((0x1100..=0x1106).contains(&ty) || (0x1200..=0x1205).contains(&ty), "type {ty:#x}");
                let _ = dev.process_cursor(&req);
            }
            let info = dev.process(&[0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            prop_assert_eq!(u32::from_le_bytes(info.bytes[..4].try_into().unwrap()), 0x1101);
            dev.teardown();
        }
    }
}

#[test]
fn a_reply_guest_memory_no_longer_takes_counts_as_lost() {
    let mut g = Guest::with(ComputeConfig::default());
    let mut c = g.open(1, compat(), Profile::Compat);
    let full = g.mem.memory().clone();
    // The frontend replaces guest RAM by a smaller table: the session
    // buffer is no longer guest RAM, so the reply has nowhere to go.
    let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    g.mem.lock().unwrap().replace(small);
    let (bytes, _) = c.proto.encode(&[Request::DeviceQuery]).unwrap();
    assert_eq!(
        g.nc().submit(c.ctx, &bytes, None),
        Ok(FenceDisposition::SignalNow)
    );
    g.mem.lock().unwrap().replace((*full).clone());
    let ReplyPayload::DeviceQuery(stats) = g.call(&mut c, &Request::DeviceQuery).payload else {
        panic!()
    };
    assert_eq!(stats.lost_replies, 1);
}

mod metrics;
mod user_queues;
