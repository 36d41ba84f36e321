//! Protocol 1.1 in-process: a user session played by the guest runtime's
//! client, and a guest kernel played by a second client of the same kind
//! whose "session buffer" is the kernel's reply region and fault ring in
//! guest RAM, submitting on ring 63 (native) or with no ring (compat).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gpu_backend::GuestRam;
use gpu_backend::sim::{SimConfig, SimGpu};
use guest_proto::bind::{BindOp, PageList, VmBind};
use guest_proto::capset::{Capset, Features};
use guest_proto::command::{DecodeLimits, Dispatch, Profile};
use guest_proto::fault::{FaultOutcome, FaultRecord, FaultReply, FaultReplyEntry};
use guest_proto::reply::{Reply, ReplyPayload};
use guest_proto::svm::{
    FAULT_RING_STATE_OFFSET, GpaRegion, KERNEL_EVENT_RING, KERNEL_REPLY, KERNEL_RING, SvmAttach,
};
use guest_proto::{
    DispatchStatus, GpuVa, GuestPhysAddr, Kernel, Perms, QueueId, Request, ResourceId, SignalIndex,
    Status,
};
use guest_runtime::client::{Channel, Client, SessionLayout};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use crate::compute::testing::TestGuest;
use crate::compute::{ComputeBackend, ComputeConfig};
use crate::context_backend::{ContextBackend, ContextInit, CtxId, FenceDisposition, FenceRef};

const RAM: u64 = 64 << 20;
const SESSION_BYTES: u64 = 16384;
const USER: SessionLayout = SessionLayout {
    reply_off: 0,
    reply_size: 4096,
    ring_off: 4096,
    ring_capacity: 64,
    signals_off: 8192,
    signal_slots: 64,
};
/// The kernel's view: its reply region at offset 0 and its ring at 4096
/// of a virtual buffer that [`Kernel`] maps onto the two GPA regions.
const KERNEL_RING_RECORDS: u32 = 64;
const KERNEL: SessionLayout = SessionLayout {
    reply_off: 0,
    reply_size: 4096,
    ring_off: 4096,
    ring_capacity: KERNEL_RING_RECORDS,
    signals_off: 4096 + 128 + 32 * KERNEL_RING_RECORDS as u64,
    signal_slots: 0,
};

type Backend = Rc<RefCell<ComputeBackend>>;

/// A channel into guest RAM: `parts` map offsets of the client's buffer
/// to guest-physical ranges; submissions go on `ring` (native) as fenced
/// submits, and the dispositions are recorded.
struct Ram {
    nc: Backend,
    mem: GuestRam,
    ctx: CtxId,
    parts: Vec<(u64, u64, u64)>,
    native: bool,
    next_fence: Rc<Cell<u64>>,
    held: Rc<RefCell<Vec<FenceRef>>>,
}

impl Ram {
    fn at(&self, off: u64, len: usize) -> std::io::Result<GuestAddress> {
        self.parts
            .iter()
            .find(|(o, _, l)| off >= *o && off + len as u64 <= o + l)
            .map(|(o, gpa, _)| GuestAddress(gpa + (off - o)))
            .ok_or_else(|| std::io::ErrorKind::InvalidInput.into())
    }
}

impl Channel for Ram {
    fn submit(&mut self, stream: &[u8], ring: Option<u32>) -> std::io::Result<()> {
        let fence = ring.filter(|_| self.native).map(|r| {
            let id = self.next_fence.get() + 1;
            self.next_fence.set(id);
            FenceRef {
                ctx: self.ctx,
                fence_id: id,
                ring_idx: Some(r as u8),
            }
        });
        let result = self.nc.borrow_mut().submit(self.ctx, stream, fence);
        match result {
            Ok(FenceDisposition::Hold) => {
                if let Some(f) = fence {
                    self.held.borrow_mut().push(f);
                }
                Ok(())
            }
            Ok(FenceDisposition::SignalNow) => Ok(()),
            Err(e) => Err(std::io::Error::other(e)),
        }
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

/// One context: the user's session and, once attached, the kernel.
struct Ctx {
    id: CtxId,
    native: bool,
    session_res: ResourceId,
    user: Client<Ram>,
    ring_gpa: u64,
    reply_gpa: u64,
    kernel: Client<Ram>,
    fences: Rc<Cell<u64>>,
    held: Rc<RefCell<Vec<FenceRef>>>,
}

struct World {
    g: TestGuest,
}

impl World {
    fn new(config: ComputeConfig) -> World {
        let device = SimGpu::new(SimConfig {
            compute_units: 2,
            ..SimConfig::default()
        });
        World {
            g: TestGuest::new(device, config, RAM),
        }
    }

    fn channel(
        &self,
        c: CtxId,
        native: bool,
        parts: Vec<(u64, u64, u64)>,
        fences: &Rc<Cell<u64>>,
        held: &Rc<RefCell<Vec<FenceRef>>>,
    ) -> Ram {
        Ram {
            nc: self.g.backend.clone(),
            mem: self.g.mem.clone(),
            ctx: c,
            parts,
            native,
            next_fence: fences.clone(),
            held: held.clone(),
        }
    }

    /// A context with a started session; the kernel's regions allocated
    /// but not attached.
    fn open(&mut self, id: u32, native: bool) -> Ctx {
        let ctx = CtxId(id);
        let init = ContextInit {
            capset_id: native.then_some(24),
        };
        self.g.nc().create_context(ctx, init, "svm-test").unwrap();
        let session_res = ResourceId(id * 100);
        let session_gpa = self.g.resource(ctx, session_res.0, SESSION_BYTES);
        let fences = Rc::new(Cell::new(0));
        let held = Rc::new(RefCell::new(Vec::new()));
        let limits = DecodeLimits::from_capset(&Capset::default());
        let user_ch = self.channel(
            ctx,
            native,
            vec![(0, session_gpa, SESSION_BYTES)],
            &fences,
            &held,
        );
        let (ring, profile) = if native {
            (Some(0), Profile::Native { event_ring: 1 })
        } else {
            (None, Profile::Compat)
        };
        let mut user = Client::new(user_ch, USER, limits, ring);
        user.start(session_res, profile).expect("SESSION_INIT");
        let ring_gpa = self.g.alloc(16384);
        let reply_gpa = self.g.alloc(4096);
        let ring_bytes = 128 + 32 * u64::from(KERNEL_RING_RECORDS);
        let kernel_ch = self.channel(
            ctx,
            native,
            vec![(0, reply_gpa, 4096), (4096, ring_gpa, ring_bytes)],
            &fences,
            &held,
        );
        let kernel = Client::new(
            kernel_ch,
            KERNEL,
            limits,
            native.then_some(u32::from(KERNEL_RING)),
        )
        .with_reply_flag(KERNEL_REPLY);
        Ctx {
            id: ctx,
            native,
            session_res,
            user,
            ring_gpa,
            reply_gpa,
            kernel,
            fences,
            held,
        }
    }

    fn attach_request(c: &Ctx) -> SvmAttach {
        SvmAttach {
            fault_ring: GpaRegion {
                gpa: GuestPhysAddr(c.ring_gpa),
                size: 128 + 32 * u64::from(KERNEL_RING_RECORDS),
            },
            reply: GpaRegion {
                gpa: GuestPhysAddr(c.reply_gpa),
                size: 4096,
            },
        }
    }

    /// SVM_ATTACH from the kernel; its reply.
    fn attach(&mut self, c: &mut Ctx) -> Reply {
        let a = Self::attach_request(c);
        c.kernel.request(&Request::SvmAttach(a)).unwrap()
    }

    fn u32_at(&self, gpa: u64) -> u32 {
        self.g.u32_at(gpa)
    }

    /// Fences the backend completed since the start.
    fn completed(&self) -> Vec<FenceRef> {
        self.g.fences.0.lock().clone()
    }
}

fn queue(c: &mut Ctx) -> QueueId {
    c.user.create_queue(0).unwrap()
}

fn fill(c: &mut Ctx, q: QueueId, va: u64, count: u64, slot: u32, value: u64, notify: bool) {
    c.user
        .dispatch(Dispatch {
            queue: q,
            kernel: Kernel::Fill {
                dst: GpuVa(va),
                count,
                value: 0xF111_0000 | slot,
            },
            signal: Some(SignalIndex(slot)),
            notify,
            completion_value: value,
        })
        .unwrap();
}

/// Ticks until `n` records can be taken from `client`'s ring.
fn faults(w: &mut World, client: &mut Client<Ram>, n: usize) -> Vec<FaultRecord> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    while out.len() < n {
        w.g.nc().tick();
        out.extend(client.take_faults().unwrap());
        assert!(
            Instant::now() < deadline,
            "only {} of {n} faults",
            out.len()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    out
}

fn wait_signal(c: &mut Ctx, slot: u32, value: u64) -> DispatchStatus {
    c.user
        .wait_signal(slot, value, Duration::from_secs(20), |_| Ok(false))
        .unwrap()
        .status
}

fn bind_pages(client: &mut Client<Ram>, va: u64, pages: &[GuestPhysAddr]) -> Reply {
    let op = [BindOp::MapPages {
        va: GpuVa(va),
        perms: Perms::RW,
        pages: PageList::new(pages),
    }];
    client.request(&Request::VmBind(VmBind::new(&op))).unwrap()
}

fn answer(client: &mut Client<Ram>, f: &FaultRecord, outcome: FaultOutcome) -> Reply {
    let e = [FaultReplyEntry {
        fault_id: f.fault_id,
        outcome,
    }];
    client
        .request(&Request::FaultReply(FaultReply::new(&e)))
        .unwrap()
}

fn query(client: &mut Client<Ram>) -> guest_proto::reply::DeviceQueryReply {
    match client.request(&Request::DeviceQuery).unwrap().payload {
        ReplyPayload::DeviceQuery(q) => q,
        p => panic!("{p:?}"),
    }
}

fn both(f: impl Fn(bool)) {
    f(false);
    f(true);
}

#[test]
fn attach_takes_over_pending_faults_and_detach_gives_the_ring_back() {
    both(|native| {
        let mut w = World::new(ComputeConfig::default());
        let mut c = w.open(1, native);
        let q = queue(&mut c);
        // A fault before the attach: the session's own ring has it.
        fill(&mut c, q, 0x3000_0000, 1024, 1, 11, false);
        let before = faults(&mut w, &mut c.user, 1);
        assert_eq!(before[0].va, GpuVa(0x3000_0000));

        let r = w.attach(&mut c);
        assert_eq!(r.status, Status::Ok, "native={native}");
        assert_eq!(
            r.payload,
            ReplyPayload::SvmAttach(guest_proto::svm::SvmAttachReply {
                fault_ring_capacity: KERNEL_RING_RECORDS
            })
        );
        // The kernel's ring: initialised, ATTACHED, and the pending fault
        // re-posted with its id.
        assert_eq!(w.u32_at(c.ring_gpa + FAULT_RING_STATE_OFFSET), 1);
        assert_eq!(w.u32_at(c.ring_gpa + 8), KERNEL_RING_RECORDS);
        assert_eq!(w.u32_at(c.ring_gpa + 12), 32);
        let reposted = faults(&mut w, &mut c.kernel, 1);
        assert_eq!(reposted[0].fault_id, before[0].fault_id);
        // The kernel resolves it.
        let page = w.g.alloc(4096);
        assert_eq!(
            bind_pages(&mut c.kernel, 0x3000_0000, &[GuestPhysAddr(page)]).status,
            Status::Ok
        );
        assert_eq!(
            answer(&mut c.kernel, &reposted[0], FaultOutcome::Resolved).status,
            Status::Ok
        );
        assert_eq!(wait_signal(&mut c, 1, 11), DispatchStatus::Ok);
        assert_eq!(w.u32_at(page + 4092), 0xF111_0001);
        // Later faults go to the kernel's ring only.
        let user_tail = w.u32_at(user_ring_gpa(&c));
        fill(&mut c, q, 0x4000_0000, 16, 2, 12, false);
        let later = faults(&mut w, &mut c.kernel, 1);
        assert_eq!(later[0].va, GpuVa(0x4000_0000));
        assert_eq!(
            w.u32_at(user_ring_gpa(&c)),
            user_tail,
            "nothing for the user"
        );
        assert!(c.user.take_faults().unwrap().is_empty());

        // Detach with that fault pending: it ends REJECTED.
        let r = c.kernel.request(&Request::SvmDetach).unwrap();
        assert_eq!((r.status, r.payload), (Status::Ok, ReplyPayload::SvmDetach));
        assert_eq!(w.u32_at(c.ring_gpa + FAULT_RING_STATE_OFFSET), 2);
        assert_eq!(wait_signal(&mut c, 2, 12), DispatchStatus::FaultRejected);
        let stats = query(&mut c.user);
        assert_eq!((stats.faults_resolved, stats.faults_rejected), (1, 1));
        assert_eq!(stats.faults_raised, 2, "a re-posted record counts once");
        // Faults go to the session's ring again.
        fill(&mut c, q, 0x5000_0000, 16, 3, 13, false);
        let back = faults(&mut w, &mut c.user, 1);
        assert_eq!(back[0].va, GpuVa(0x5000_0000));
        let kernel_tail = w.u32_at(c.ring_gpa);
        w.g.nc().tick();
        assert_eq!(
            w.u32_at(c.ring_gpa),
            kernel_tail,
            "the kernel ring is not written after detach"
        );
        // A second detach has no attachment (and so no region to answer in).
        let lost = query(&mut c.user).lost_replies;
        let (bytes, _) = c.kernel.encode(&[Request::SvmDetach]).unwrap();
        c.kernel.submit_raw(&bytes, c.native.then_some(63)).unwrap();
        assert_eq!(query(&mut c.user).lost_replies, lost + 1);
        // Attaching again works, with a fresh ring.
        c.kernel = w.open_kernel_again(&c);
        assert_eq!(w.attach(&mut c).status, Status::Ok);
        let again = faults(&mut w, &mut c.kernel, 1);
        assert_eq!(again[0].fault_id, back[0].fault_id);
    });
}

/// Guest-physical address of the session's own fault ring.
fn user_ring_gpa(c: &Ctx) -> u64 {
    c.user.channel().parts[0].1 + USER.ring_off
}

impl World {
    /// A fresh kernel client over the same regions (head back at 0).
    fn open_kernel_again(&self, c: &Ctx) -> Client<Ram> {
        let ring_bytes = 128 + 32 * u64::from(KERNEL_RING_RECORDS);
        let ch = self.channel(
            c.id,
            c.native,
            vec![(0, c.reply_gpa, 4096), (4096, c.ring_gpa, ring_bytes)],
            &c.fences,
            &c.held,
        );
        Client::new(
            ch,
            KERNEL,
            DecodeLimits::from_capset(&Capset::default()),
            c.native.then_some(u32::from(KERNEL_RING)),
        )
        .with_reply_flag(KERNEL_REPLY)
    }
}

#[test]
fn kernel_replies_go_into_the_kernel_region_and_user_ones_cannot_reach_it() {
    both(|native| {
        let mut w = World::new(ComputeConfig::default());
        let mut c = w.open(1, native);
        // Before any attach, a KERNEL_REPLY offset has no place: lost.
        let (bytes, _) = c.kernel.encode(&[Request::DeviceQuery]).unwrap();
        c.kernel.submit_raw(&bytes, native.then_some(63)).unwrap();
        assert_eq!(query(&mut c.user).lost_replies, 1);
        assert_eq!(w.g.read::<16>(c.reply_gpa), [0; 16], "nothing written");

        assert_eq!(w.attach(&mut c).status, Status::Ok);
        // A kernel DEVICE_QUERY answers in the kernel region.
        let q = query(&mut c.kernel);
        assert_eq!(q.lost_replies, 1);
        let user_before = w.g.read::<4096>(c.user.channel().parts[0].1);
        let q = query(&mut c.kernel);
        assert_eq!(q.queues, 0);
        assert_eq!(
            w.g.read::<4096>(c.user.channel().parts[0].1),
            user_before,
            "the user's reply buffer is untouched"
        );
        if native {
            // A user request (ring 0) with a KERNEL_REPLY offset: not
            // executed, lost; the kernel region is untouched.
            let kernel_before = w.g.read::<4096>(c.reply_gpa);
            let mut raw = Vec::new();
            for v in [0x20u32, 24, 99, KERNEL_REPLY | 512, 0, 0] {
                raw.extend_from_slice(&v.to_le_bytes());
            }
            c.user.submit_raw(&raw, Some(0)).unwrap();
            assert_eq!(w.g.read::<4096>(c.reply_gpa), kernel_before);
            let stats = query(&mut c.user);
            assert_eq!(
                (stats.lost_replies, stats.queues),
                (2, 0),
                "no queue created"
            );
        }
        // A kernel reply that does not fit the region: not executed, lost.
        let mut raw = Vec::new();
        for v in [0x20u32, 24, 98, KERNEL_REPLY | 4088, 0, 0] {
            raw.extend_from_slice(&v.to_le_bytes());
        }
        c.kernel.submit_raw(&raw, native.then_some(63)).unwrap();
        let stats = query(&mut c.user);
        assert_eq!(stats.queues, 0);
        assert_eq!(stats.lost_replies, if native { 3 } else { 2 });
    });
}

#[test]
fn native_user_requests_cannot_attach_bind_pages_or_answer_once_mediated() {
    let mut w = World::new(ComputeConfig::default());
    let mut c = w.open(1, true);
    // SVM_ATTACH on ring 0: ERR_PERMISSION in the user's buffer, nothing
    // in the region it proposed.
    let a = World::attach_request(&c);
    let r = c.user.request(&Request::SvmAttach(a)).unwrap();
    assert_eq!(r.status, Status::Permission);
    assert_eq!(w.g.read::<64>(c.reply_gpa), [0; 64]);
    assert_eq!(w.u32_at(c.ring_gpa + FAULT_RING_STATE_OFFSET), 0);
    // ...and with a KERNEL_REPLY offset it is lost, never written there.
    let mut raw = Vec::new();
    Request::SvmAttach(a)
        .encode(5, KERNEL_REPLY, &mut raw)
        .unwrap();
    c.user.submit_raw(&raw, Some(0)).unwrap();
    assert_eq!(w.g.read::<64>(c.reply_gpa), [0; 64]);
    assert_eq!(query(&mut c.user).lost_replies, 1);
    let r = c.user.request(&Request::SvmDetach).unwrap();
    assert_eq!(r.status, Status::Permission);

    // Before the attach the user may still bind pages.
    let page = w.g.alloc(8192);
    assert_eq!(
        bind_pages(&mut c.user, 0x1000_0000, &[GuestPhysAddr(page)]).status,
        Status::Ok
    );
    assert_eq!(w.attach(&mut c).status, Status::Ok);

    // Mediated: a user VM_BIND fails at its MAP_PAGES op, earlier ops stay.
    let buf = w.g.resource(c.id, 7, 4096);
    let pages = [GuestPhysAddr(page + 4096)];
    let ops = [
        BindOp::MapResource {
            va: GpuVa(0x2000_0000),
            size: 4096,
            perms: Perms::RW,
            resource: ResourceId(7),
            offset: 0,
        },
        BindOp::MapPages {
            va: GpuVa(0x2001_0000),
            perms: Perms::RW,
            pages: PageList::new(&pages),
        },
    ];
    let r = c.user.request(&Request::VmBind(VmBind::new(&ops))).unwrap();
    assert_eq!(r.status, Status::Permission);
    let ReplyPayload::VmBind(b) = r.payload else {
        panic!()
    };
    assert_eq!((b.ops_done, b.bound_bytes), (1, 8192));
    // UNMAP stays open to user space.
    let unmap = [BindOp::Unmap {
        va: GpuVa(0x1000_0000),
        size: 4096,
    }];
    let r = c
        .user
        .request(&Request::VmBind(VmBind::new(&unmap)))
        .unwrap();
    assert_eq!(r.status, Status::Ok);
    // A fault the user may not answer; the kernel may.
    let q = queue(&mut c);
    fill(&mut c, q, 0x3000_0000, 16, 1, 21, false);
    let f = faults(&mut w, &mut c.kernel, 1);
    let r = answer(&mut c.user, &f[0], FaultOutcome::Rejected);
    assert_eq!(r.status, Status::Permission);
    assert_eq!(r.payload, ReplyPayload::FaultReply(Default::default()));
    assert_eq!(
        bind_pages(&mut c.kernel, 0x3000_0000, &[GuestPhysAddr(page)]).status,
        Status::Ok
    );
    assert_eq!(
        answer(&mut c.kernel, &f[0], FaultOutcome::Resolved).status,
        Status::Ok
    );
    assert_eq!(wait_signal(&mut c, 1, 21), DispatchStatus::Ok);
    assert_eq!(w.u32_at(buf), 0, "the resource was mapped, not written");

    // The context stays mediated across sessions.
    c.user.destroy().unwrap();
    c.user
        .start(c.session_res, Profile::Native { event_ring: 1 })
        .unwrap();
    let r = bind_pages(&mut c.user, 0x1000_0000, &[GuestPhysAddr(page)]);
    assert_eq!(r.status, Status::Permission);
}

#[test]
fn compat_has_no_device_side_mediation() {
    // The device cannot tell kernel from user submissions in compat: the
    // guest driver filters them (docs/guest-kernel.md 8).
    let mut w = World::new(ComputeConfig::default());
    let mut c = w.open(1, false);
    assert_eq!(w.attach(&mut c).status, Status::Ok);
    let page = w.g.alloc(4096);
    assert_eq!(
        bind_pages(&mut c.user, 0x1000_0000, &[GuestPhysAddr(page)]).status,
        Status::Ok
    );
}

#[test]
fn attach_errors_are_answered_in_the_proposed_region() {
    let mut w = World::new(ComputeConfig::default());
    let mut c = w.open(1, true);
    let good = World::attach_request(&c);
    let try_attach = |c: &mut Ctx, a: SvmAttach| c.kernel.request(&Request::SvmAttach(a)).unwrap();
    // The ring in memory that is not guest RAM.
    let outside = SvmAttach {
        fault_ring: GpaRegion {
            gpa: GuestPhysAddr(RAM),
            ..good.fault_ring
        },
        ..good
    };
    assert_eq!(try_attach(&mut c, outside).status, Status::OutOfRange);
    // The ring overlapping the session's own reply buffer.
    let session_gpa = c.user.channel().parts[0].1;
    let overlapping = SvmAttach {
        fault_ring: GpaRegion {
            gpa: GuestPhysAddr(session_gpa),
            ..good.fault_ring
        },
        ..good
    };
    assert_eq!(
        try_attach(&mut c, overlapping).status,
        Status::InvalidArgument
    );
    // A ring larger than the device allows.
    // (Encoded by hand: the client's encoder refuses it.)
    let big = SvmAttach {
        fault_ring: GpaRegion {
            size: 128 + 32 * (1 << 17),
            ..good.fault_ring
        },
        ..good
    };
    let mut raw = Vec::new();
    Request::SvmAttach(big)
        .encode(76, KERNEL_REPLY, &mut raw)
        .unwrap();
    c.kernel.submit_raw(&raw, Some(63)).unwrap();
    let reply = Reply::decode(&w.g.read::<24>(c.reply_gpa)).unwrap();
    assert_eq!((reply.seqno, reply.status), (76, Status::InvalidArgument));
    assert_eq!(
        w.u32_at(c.ring_gpa + FAULT_RING_STATE_OFFSET),
        0,
        "nothing attached"
    );
    // A malformed request whose reply region is usable still gets its
    // error there.
    let mut raw = Vec::new();
    Request::SvmAttach(good)
        .encode(77, KERNEL_REPLY | 64, &mut raw)
        .unwrap();
    raw[16] = 1; // flags
    c.kernel.submit_raw(&raw, Some(63)).unwrap();
    let reply = Reply::decode(&w.g.read::<24>(c.reply_gpa + 64)).unwrap();
    assert_eq!((reply.seqno, reply.status), (77, Status::Malformed));
    // A kernel request that does not name a KERNEL_REPLY offset: refused
    // in the user buffer.
    let mut raw = Vec::new();
    Request::SvmAttach(good).encode(78, 256, &mut raw).unwrap();
    c.kernel.submit_raw(&raw, Some(63)).unwrap();
    let reply = Reply::decode(&w.g.read::<24>(session_gpa + 256)).unwrap();
    assert_eq!((reply.seqno, reply.status), (78, Status::InvalidArgument));
    // Good, then a second one.
    assert_eq!(try_attach(&mut c, good).status, Status::Ok);
    assert_eq!(try_attach(&mut c, good).status, Status::SessionActive);
}

#[test]
fn without_kernel_svm_attach_is_unsupported_and_the_capset_says_so() {
    let mut w = World::new(ComputeConfig {
        kernel_svm: false,
        ..ComputeConfig::default()
    });
    let caps = w.g.nc().capset(24, 1).unwrap();
    let caps = Capset::decode(&caps).unwrap();
    assert!(!caps.features.contains(Features::KERNEL_SVM));
    let on = World::new(ComputeConfig::default());
    let caps = Capset::decode(&on.g.nc().capset(24, 1).unwrap()).unwrap();
    assert!(caps.features.contains(Features::KERNEL_SVM));
    assert_eq!(caps.version_minor, 1);
    let mut c = w.open(1, false);
    let r = w.attach(&mut c);
    assert_eq!(r.status, Status::Unsupported);
    assert_eq!(w.u32_at(c.ring_gpa + FAULT_RING_STATE_OFFSET), 0);
}

#[test]
fn the_kernel_event_fence_waits_for_the_kernel_ring_only() {
    let mut w = World::new(ComputeConfig::default());
    let mut c = w.open(1, true);
    assert_eq!(w.attach(&mut c).status, Status::Ok);
    let q = queue(&mut c);
    let arm = |c: &mut Ctx, ring: u8| {
        let stream = c.kernel.encode_no_reply(&[Request::EventArm]).unwrap();
        c.kernel.submit_raw(&stream, Some(u32::from(ring))).unwrap();
        c.held.borrow().last().copied()
    };
    // The user's and the kernel's events, both held.
    let user_event = arm(&mut c, 1).expect("user event held");
    let kernel_event = arm(&mut c, KERNEL_EVENT_RING).expect("kernel event held");
    assert_ne!(user_event, kernel_event);
    assert_eq!(kernel_event.ring_idx, Some(KERNEL_EVENT_RING));
    // A second kernel arm completes the first and is held itself.
    let kernel_event2 = arm(&mut c, KERNEL_EVENT_RING).expect("held");
    assert!(w.completed().contains(&kernel_event));
    // A fault: the kernel's event completes, the user's does not.
    fill(&mut c, q, 0x3000_0000, 16, 1, 31, false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !w.completed().contains(&kernel_event2) {
        w.g.nc().tick();
        assert!(
            Instant::now() < deadline,
            "the kernel's event never completed"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    assert!(
        !w.completed().contains(&user_event),
        "user event woken by a kernel fault"
    );
    // With the record unread, a new kernel arm completes at once.
    let before = c.held.borrow().len();
    arm(&mut c, KERNEL_EVENT_RING);
    assert_eq!(
        c.held.borrow().len(),
        before,
        "not held: records are pending"
    );
    // A NOTIFY dispatch completes the user's event.
    let f = faults(&mut w, &mut c.kernel, 1);
    assert_eq!(
        answer(&mut c.kernel, &f[0], FaultOutcome::Rejected).status,
        Status::Ok
    );
    let buf = w.g.resource(c.id, 8, 4096);
    let ops = [BindOp::MapResource {
        va: GpuVa(0x5000_0000),
        size: 4096,
        perms: Perms::RW,
        resource: ResourceId(8),
        offset: 0,
    }];
    assert_eq!(
        c.user
            .request(&Request::VmBind(VmBind::new(&ops)))
            .unwrap()
            .status,
        Status::Ok
    );
    fill(&mut c, q, 0x5000_0000, 16, 2, 32, true);
    assert_eq!(wait_signal(&mut c, 2, 32), DispatchStatus::Ok);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !w.completed().contains(&user_event) {
        w.g.nc().tick();
        assert!(
            Instant::now() < deadline,
            "the user's event never completed"
        );
    }
    assert_eq!(w.u32_at(buf), 0xF111_0002);
    // Detach completes a held kernel event.
    let held = arm(&mut c, KERNEL_EVENT_RING).expect("held with the ring empty");
    assert_eq!(
        c.kernel.request(&Request::SvmDetach).unwrap().status,
        Status::Ok
    );
    assert!(w.completed().contains(&held));
    // Not attached: ring 62 is no kernel event ring, nothing is held.
    let before = c.held.borrow().len();
    arm(&mut c, KERNEL_EVENT_RING);
    assert_eq!(c.held.borrow().len(), before);
}

#[test]
fn ending_the_session_detaches_and_the_kernel_regions_are_never_written_again() {
    both(|native| {
        let mut w = World::new(ComputeConfig::default());
        let mut c = w.open(1, native);
        assert_eq!(w.attach(&mut c).status, Status::Ok);
        let q = queue(&mut c);
        let held = if native {
            let stream = c.kernel.encode_no_reply(&[Request::EventArm]).unwrap();
            c.kernel.submit_raw(&stream, Some(62)).unwrap();
            c.held.borrow().last().copied()
        } else {
            None
        };
        fill(&mut c, q, 0x3000_0000, 16, 1, 41, false);
        faults(&mut w, &mut c.kernel, 1);
        c.user.destroy().unwrap();
        assert_eq!(
            w.u32_at(c.ring_gpa + FAULT_RING_STATE_OFFSET),
            2,
            "DETACHED"
        );
        if let Some(h) = held {
            assert!(w.completed().contains(&h), "the kernel's event completed");
        }
        assert_eq!(wait_signal(&mut c, 1, 41), DispatchStatus::Cancelled);
        // Poison both regions; a new session with faults and kernel
        // requests must not touch them.
        let ring = vec![0xA5u8; 128 + 32 * KERNEL_RING_RECORDS as usize];
        w.g.mem
            .memory()
            .write_slice(&ring, GuestAddress(c.ring_gpa))
            .unwrap();
        w.g.mem
            .memory()
            .write_slice(&[0xA5u8; 4096], GuestAddress(c.reply_gpa))
            .unwrap();
        let profile = if native {
            Profile::Native { event_ring: 1 }
        } else {
            Profile::Compat
        };
        c.user.start(c.session_res, profile).unwrap();
        let q = queue(&mut c);
        fill(&mut c, q, 0x3000_0000, 16, 1, 42, false);
        faults(&mut w, &mut c.user, 1);
        let (bytes, _) = c
            .kernel
            .encode(&[Request::DeviceQuery, Request::SvmDetach])
            .unwrap();
        c.kernel.submit_raw(&bytes, native.then_some(63)).unwrap();
        w.g.nc().tick();
        let mut after = vec![0u8; ring.len()];
        w.g.mem
            .memory()
            .read_slice(&mut after, GuestAddress(c.ring_gpa))
            .unwrap();
        assert_eq!(after, ring);
        assert_eq!(w.g.read::<4096>(c.reply_gpa), [0xA5; 4096]);
        // CTX_DESTROY while attached detaches the same way.
        let mut d = w.open(2, native);
        assert_eq!(w.attach(&mut d).status, Status::Ok);
        w.g.nc().destroy_context(d.id);
        assert_eq!(w.u32_at(d.ring_gpa + FAULT_RING_STATE_OFFSET), 2);
    });
}

#[test]
fn a_submit_with_an_unmap_is_answered_after_the_gpu_stopped_writing() {
    // 16 MiB of GPU VA all backed by one guest page, filled over and over
    // while the kernel unmaps it: once the kernel's SUBMIT_3D with the
    // UNMAP has returned, a canary written into the page must survive.
    both(|native| {
        let mut w = World::new(ComputeConfig::default());
        let mut c = w.open(1, native);
        assert_eq!(w.attach(&mut c).status, Status::Ok);
        let page = w.g.alloc(4096);
        let va = 0x4000_0000u64;
        let size = 16u64 << 20;
        let pages = vec![GuestPhysAddr(page); 512];
        for chunk in 0..size / (2 << 20) {
            assert_eq!(
                bind_pages(&mut c.kernel, va + chunk * (2 << 20), &pages).status,
                Status::Ok
            );
        }
        let q = queue(&mut c);
        for round in 0..4u64 {
            fill(&mut c, q, va, size / 4, 1, 50 + round, false);
            // Let the fill get going.
            let deadline = Instant::now() + Duration::from_secs(20);
            while w.u32_at(page) != 0xF111_0001 {
                assert!(Instant::now() < deadline, "the fill never started");
                std::hint::spin_loop();
            }
            let unmap = [BindOp::Unmap {
                va: GpuVa(va),
                size,
            }];
            let r = c
                .kernel
                .request(&Request::VmBind(VmBind::new(&unmap)))
                .unwrap();
            assert_eq!(r.status, Status::Ok);
            // The response is back: the GPU no longer translates the range.
            w.g.mem
                .memory()
                .write_obj(0xCA11_AB1Eu32, GuestAddress(page))
                .unwrap();
            // The fill now faults; the kernel rejects, the fill ends.
            loop {
                w.g.nc().tick();
                for f in c.kernel.take_faults().unwrap() {
                    answer(&mut c.kernel, &f, FaultOutcome::Rejected);
                }
                if c.user.signal_value(1).unwrap() == 50 + round {
                    break;
                }
                assert!(
                    Instant::now() < deadline + Duration::from_secs(20),
                    "fill never ended"
                );
            }
            assert_eq!(
                c.user.signal(1).unwrap().status,
                DispatchStatus::FaultRejected
            );
            assert_eq!(
                w.u32_at(page),
                0xCA11_AB1E,
                "written after the unmap returned (round {round})"
            );
            for chunk in 0..size / (2 << 20) {
                bind_pages(&mut c.kernel, va + chunk * (2 << 20), &pages);
            }
            w.g.mem
                .memory()
                .write_obj(0u32, GuestAddress(page))
                .unwrap();
        }
    });
}

mod hostile {
    //! Arbitrary SVM requests from either ring: never a panic, never a
    //! write outside the regions a kernel request named, and the device
    //! keeps serving.
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn arbitrary_svm_streams(reqs in prop::collection::vec((any::<bool>(), 0u8..4, prop::array::uniform5(any::<u64>()), any::<u32>()), 1..12)) {
            let mut w = World::new(ComputeConfig::default());
            let mut c = w.open(1, true);
            for (kernel, cmd, words, reply_off) in &reqs {
                let cmd = [0x50u32, 0x51, 0x40, 0x30][*cmd as usize];
                let len: u32 = if cmd == 0x50 { 56 } else { 16 };
                let mut raw = Vec::new();
                for v in [cmd, len, 1, *reply_off] {
                    raw.extend_from_slice(&v.to_le_bytes());
                }
                if cmd == 0x50 {
                    for word in words {
                        // Some values inside guest RAM.
                        raw.extend_from_slice(&(word % (RAM * 2)).to_le_bytes());
                    }
                }
                let ring = if *kernel { 63 } else { 0 };
                let _ = c.kernel.submit_raw(&raw, Some(ring));
            }
            w.g.nc().tick();
            let q = query(&mut c.user);
            prop_assert_eq!(q.queues, 0);
        }
    }
}
