//! Native-context sessions through the daemon's real socket, in both
//! transport profiles: the guest driver is played by the harness.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::{Duration, Instant};

use guest_proto::bind::{BindOp, PageList, VmBind};
use guest_proto::command::{Dispatch, Profile, QueueCreate, Region, SessionInit};
use guest_proto::fault::{FaultOutcome, FaultRecord, FaultReply, FaultReplyEntry, FaultRingLayout};
use guest_proto::reply::{Reply, ReplyPayload};
use guest_proto::signal::SignalSlot;
use guest_proto::writer::RequestWriter;
use guest_proto::{
    DispatchStatus, GpuVa, GuestPhysAddr, Kernel, Perms, QueueId, Request, ResourceId, SignalIndex,
    Status,
};
use harness::{Daemon, F_BLOB, F_CONTEXT_INIT, F_VIRGL, Vmm, cmd, entries, req};

const SESSION_BYTES: u32 = 16384;
const RING_OFF: u64 = 4096;
const SIGNALS_OFF: u64 = 8192;

/// A guest context with a session, driven through the socket.
struct Client {
    ctx: u32,
    session: u64,
    seq: u32,
    head: u32,
}

fn open(vmm: &mut Vmm, ctx: u32, res: u32, native: bool) -> Client {
    let session = if native {
        assert_eq!(vmm.ctx_create(ctx, 24), cmd::OK_NODATA);
        let gpa = vmm.alloc(u64::from(SESSION_BYTES));
        let mut r = req(cmd::RESOURCE_CREATE_BLOB, ctx, &[res, 1, 1, 1]);
        r.extend_from_slice(&0u64.to_le_bytes());
        r.extend_from_slice(&u64::from(SESSION_BYTES).to_le_bytes());
        r.extend(entries(&[(gpa, SESSION_BYTES)]));
        assert_eq!(vmm.ctrl_type(&r), cmd::OK_NODATA);
        gpa
    } else {
        assert_eq!(vmm.ctx_create(ctx, 0), cmd::OK_NODATA);
        vmm.buffer_3d(res, SESSION_BYTES)
    };
    assert_eq!(vmm.ctx_attach(ctx, res), cmd::OK_NODATA);
    let mut c = Client {
        ctx,
        session,
        seq: 1,
        head: 0,
    };
    let profile = if native {
        Profile::Native { event_ring: 1 }
    } else {
        Profile::Compat
    };
    let rid = ResourceId(res);
    let init = SessionInit::new(
        profile,
        Region {
            resource: rid,
            offset: 0,
            size: 4096,
        },
        Region {
            resource: rid,
            offset: RING_OFF,
            size: FaultRingLayout::new(64).unwrap().size(),
        },
        Region {
            resource: rid,
            offset: SIGNALS_OFF,
            size: 64 * 32,
        },
    );
    assert_eq!(
        call(vmm, &mut c, &Request::SessionInit(init)).status,
        Status::Ok
    );
    c
}

fn call(vmm: &mut Vmm, c: &mut Client, r: &Request<'_>) -> Reply {
    let mut w = RequestWriter::new(0..4096).with_first_seqno(c.seq);
    let t = w.push(r).unwrap();
    c.seq = w.next_seqno();
    assert_eq!(vmm.submit(c.ctx, w.as_bytes()), cmd::OK_NODATA);
    let off = c.session + u64::from(t.reply_off.unwrap());
    Reply::decode(&vmm.ram.read(off, 80)).unwrap()
}

fn queue(vmm: &mut Vmm, c: &mut Client) -> QueueId {
    match call(vmm, c, &Request::QueueCreate(QueueCreate { priority: 1 })).payload {
        ReplyPayload::QueueCreate(q) => q.queue,
        p => panic!("{p:?}"),
    }
}

fn fill(
    vmm: &mut Vmm,
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
            value: 0xF111,
        },
        signal: Some(SignalIndex(slot)),
        notify: true,
        completion_value: value,
    };
    call(vmm, c, &Request::Dispatch(d)).status
}

fn signal(vmm: &Vmm, c: &Client, slot: u32) -> SignalSlot {
    SignalSlot::decode(
        &vmm.ram
            .read(c.session + SIGNALS_OFF + u64::from(slot) * 32, 32),
    )
    .unwrap()
}

fn faults(vmm: &mut Vmm, c: &mut Client) -> Vec<FaultRecord> {
    let ring = c.session + RING_OFF;
    let tail = vmm.ram.u32(ring);
    let layout = FaultRingLayout::new(64).unwrap();
    let mut out = Vec::new();
    while c.head != tail {
        out.push(
            FaultRecord::decode(&vmm.ram.read(ring + layout.record_offset(c.head), 32)).unwrap(),
        );
        c.head = c.head.wrapping_add(1);
    }
    vmm.ram.write(ring + 64, &c.head.to_le_bytes());
    out
}

fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn compat_bind_dispatch_and_forwarded_faults() {
    let d = Daemon::start(&[]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    let mut c = open(&mut vmm, 1, 10, false);
    // Bound buffer.
    let data = vmm.buffer_3d(11, 64 * 1024);
    assert_eq!(vmm.ctx_attach(1, 11), cmd::OK_NODATA);
    let op = [BindOp::MapResource {
        va: GpuVa(0x1000_0000),
        size: 64 * 1024,
        perms: Perms::RW,
        resource: ResourceId(11),
        offset: 0,
    }];
    assert_eq!(
        call(&mut vmm, &mut c, &Request::VmBind(VmBind::new(&op))).status,
        Status::Ok
    );
    let q = queue(&mut vmm, &mut c);
    assert_eq!(
        fill(&mut vmm, &mut c, q, 0x1000_0000, 16 * 1024, 0, 5),
        Status::Ok
    );
    wait_for(|| signal(&vmm, &c, 0).value == 5, "fill");
    assert_eq!(signal(&vmm, &c, 0).status, DispatchStatus::Ok);
    assert_eq!(vmm.ram.u32(data), 0xF111);
    assert_eq!(vmm.ram.u32(data + 64 * 1024 - 4), 0xF111);

    // Unbound: the fault is forwarded, the guest binds a page and answers.
    assert_eq!(
        fill(&mut vmm, &mut c, q, 0x3000_0000, 1024, 1, 6),
        Status::Ok
    );
    let mut page = 0;
    wait_for(
        || {
            for f in faults(&mut vmm, &mut c) {
                assert_eq!(f.va, GpuVa(0x3000_0000));
                page = vmm.alloc(4096);
                let pages = [GuestPhysAddr(page)];
                let op = [BindOp::MapPages {
                    va: f.va,
                    perms: Perms::RW,
                    pages: PageList::new(&pages),
                }];
                assert_eq!(
                    call(&mut vmm, &mut c, &Request::VmBind(VmBind::new(&op))).status,
                    Status::Ok
                );
                let e = [FaultReplyEntry {
                    fault_id: f.fault_id,
                    outcome: FaultOutcome::Resolved,
                }];
                assert_eq!(
                    call(&mut vmm, &mut c, &Request::FaultReply(FaultReply::new(&e))).status,
                    Status::Ok
                );
            }
            signal(&vmm, &c, 1).value == 6
        },
        "faulting fill",
    );
    assert_eq!(signal(&vmm, &c, 1).status, DispatchStatus::Ok);
    assert_eq!(vmm.ram.u32(page + 4092), 0xF111);

    // Rejected.
    assert_eq!(fill(&mut vmm, &mut c, q, 0x5000_0000, 16, 2, 7), Status::Ok);
    wait_for(
        || {
            for f in faults(&mut vmm, &mut c) {
                let e = [FaultReplyEntry {
                    fault_id: f.fault_id,
                    outcome: FaultOutcome::Rejected,
                }];
                call(&mut vmm, &mut c, &Request::FaultReply(FaultReply::new(&e)));
            }
            signal(&vmm, &c, 2).value == 7
        },
        "rejected fill",
    );
    assert_eq!(signal(&vmm, &c, 2).status, DispatchStatus::FaultRejected);
    match call(&mut vmm, &mut c, &Request::DeviceQuery).payload {
        ReplyPayload::DeviceQuery(q) => {
            assert_eq!(
                (q.faults_resolved, q.faults_rejected, q.dispatches_done),
                (1, 1, 3)
            );
            assert_eq!(q.bound_bytes, 64 * 1024 + 4096);
        }
        p => panic!("{p:?}"),
    }
}

#[test]
fn two_contexts_are_isolated() {
    let d = Daemon::start(&[]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    let mut a = open(&mut vmm, 1, 10, false);
    let mut b = open(&mut vmm, 2, 20, false);
    let qa = queue(&mut vmm, &mut a);
    // B names A's session resource and A's queue: unknown to B.
    let op = [BindOp::MapResource {
        va: GpuVa(0x1000_0000),
        size: 4096,
        perms: Perms::RW,
        resource: ResourceId(10),
        offset: 0,
    }];
    assert_eq!(
        call(&mut vmm, &mut b, &Request::VmBind(VmBind::new(&op))).status,
        Status::UnknownResource
    );
    assert_eq!(
        fill(&mut vmm, &mut b, qa, 0x1000_0000, 16, 0, 1),
        Status::UnknownQueue
    );
    // Attaching A's resource to B through virtio is the only way to share.
    assert_eq!(vmm.ctx_attach(2, 10), cmd::OK_NODATA);
    assert_eq!(
        call(&mut vmm, &mut b, &Request::VmBind(VmBind::new(&op))).status,
        Status::Ok
    );
}

#[test]
fn native_profile_holds_the_event_fence_until_a_fault() {
    let d = Daemon::start(&[]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL | F_CONTEXT_INIT | F_BLOB);
    let mut c = open(&mut vmm, 1, 10, true);
    let q = queue(&mut vmm, &mut c);
    let mut w = RequestWriter::new(0..4096);
    w.push_no_reply(&Request::EventArm).unwrap();
    vmm.post_submit(1, w.as_bytes(), Some((100, Some(1))));
    assert!(
        vmm.wait_used(0, Duration::from_millis(300)).is_none(),
        "held while nothing is pending"
    );
    // Another submit on ring 0 is not blocked by the held event fence.
    let mut w = RequestWriter::new(0..4096).with_first_seqno(c.seq);
    w.push(&Request::DeviceQuery).unwrap();
    c.seq = w.next_seqno();
    vmm.post_submit(1, w.as_bytes(), Some((101, Some(0))));
    assert!(
        vmm.wait_used(0, Duration::from_secs(10)).is_some(),
        "ring 0 completes"
    );
    // A dispatch that faults makes the event pending: the fence completes.
    let d = Dispatch {
        queue: q,
        kernel: Kernel::Fill {
            dst: GpuVa(0x7000_0000),
            count: 16,
            value: 1,
        },
        signal: Some(SignalIndex(3)),
        notify: true,
        completion_value: 9,
    };
    let mut w = RequestWriter::new(0..4096).with_first_seqno(c.seq);
    w.push(&Request::Dispatch(d)).unwrap();
    vmm.post_submit(1, w.as_bytes(), Some((102, Some(0))));
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (head, _) = vmm
            .wait_used(0, Duration::from_secs(20))
            .expect("event fence never completed");
        seen.push(head);
    }
    assert_eq!(faults(&mut vmm, &mut c).len(), 1);
}

#[test]
fn a_destroyed_context_with_pending_faults_frees_everything() {
    let mut d = Daemon::start(&["--max-bound-bytes", "65536"]);
    let mut vmm = Vmm::connect(&d.socket, F_VIRGL);
    let mut c = open(&mut vmm, 1, 10, false);
    let q = queue(&mut vmm, &mut c);
    let page = vmm.alloc(65536);
    let pages: Vec<GuestPhysAddr> = (0..16).map(|i| GuestPhysAddr(page + i * 4096)).collect();
    let op = [BindOp::MapPages {
        va: GpuVa(0x1000_0000),
        perms: Perms::RW,
        pages: PageList::new(&pages),
    }];
    assert_eq!(
        call(&mut vmm, &mut c, &Request::VmBind(VmBind::new(&op))).status,
        Status::Ok
    );
    let more = [BindOp::MapPages {
        va: GpuVa(0x2000_0000),
        perms: Perms::RW,
        pages: PageList::new(&pages[..1]),
    }];
    assert_eq!(
        call(&mut vmm, &mut c, &Request::VmBind(VmBind::new(&more))).status,
        Status::Quota
    );
    assert_eq!(
        fill(&mut vmm, &mut c, q, 0x6000_0000, 4096, 0, 1),
        Status::Ok
    );
    wait_for(|| !faults(&mut vmm, &mut c).is_empty(), "a fault");
    assert_eq!(
        vmm.ctrl_type(&req(cmd::CTX_DESTROY, 1, &[])),
        cmd::OK_NODATA
    );
    let s = signal(&vmm, &c, 0);
    assert_eq!((s.value, s.status), (1, DispatchStatus::Cancelled));
    // The guest's quota came back: a new context can bind the same amount.
    let mut c2 = open(&mut vmm, 2, 20, false);
    assert_eq!(
        call(&mut vmm, &mut c2, &Request::VmBind(VmBind::new(&op))).status,
        Status::Ok
    );
    assert!(d.alive());
}
