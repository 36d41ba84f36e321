//! Native-context sessions through the daemon's real socket, in both
//! transport profiles: the guest driver is played by the harness.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use guest_proto::bind::{BindOp, PageList, VmBind};
use guest_proto::capset::Capset;
use guest_proto::command::{DecodeLimits, Dispatch, Profile};
use guest_proto::fault::{FaultOutcome, FaultRecord, FaultReply, FaultReplyEntry};
use guest_proto::reply::{Reply, ReplyPayload};
use guest_proto::signal::SignalSlot;
use guest_proto::{
    DispatchStatus, GpuVa, GuestPhysAddr, Kernel, Perms, QueueId, Request, ResourceId, SignalIndex,
};
use guest_runtime::client::{self as runtime, Channel, SessionLayout};
use harness::{Daemon, F_BLOB, F_CONTEXT_INIT, F_VIRGL, Vmm, entries, req};
use vhost_gpu_nc::virtio_gpu::protocol::{
    VIRTIO_GPU_CMD_CTX_DESTROY, VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB, VIRTIO_GPU_RESP_OK_NODATA,
};

const SESSION_BYTES: u32 = 16384;
const LAYOUT: SessionLayout = SessionLayout::COMPACT;

type Shared = Rc<RefCell<Vmm>>;

/// The guest runtime's client over the harness VMM: a submit is a
/// SUBMIT_3D through the real socket, the session buffer is read in the
/// shared guest RAM.
struct Harness {
    vmm: Shared,
    ctx: u32,
    base: u64,
}

impl Harness {
    fn at(&self, off: u64, len: usize) -> std::io::Result<u64> {
        if off.saturating_add(len as u64) > u64::from(SESSION_BYTES) {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        Ok(self.base + off)
    }
}

impl Channel for Harness {
    fn submit(&mut self, stream: &[u8], _ring: Option<u32>) -> std::io::Result<()> {
        match self.vmm.borrow_mut().submit(self.ctx, stream) {
            VIRTIO_GPU_RESP_OK_NODATA => Ok(()),
            other => Err(std::io::Error::other(format!("SUBMIT_3D: {other:#x}"))),
        }
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let gpa = self.at(off, buf.len())?;
        buf.copy_from_slice(&self.vmm.borrow().ram.read(gpa, buf.len()));
        Ok(())
    }

    fn write(&self, off: u64, bytes: &[u8]) -> std::io::Result<()> {
        let gpa = self.at(off, bytes.len())?;
        self.vmm.borrow().ram.write(gpa, bytes);
        Ok(())
    }

    fn load_u32(&self, off: u64) -> std::io::Result<u32> {
        let gpa = self.at(off, 4)?;
        let v = self.vmm.borrow().ram.u32(gpa);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        Ok(v)
    }

    fn load_u64(&self, off: u64) -> std::io::Result<u64> {
        let gpa = self.at(off, 8)?;
        let v = self.vmm.borrow().ram.u64(gpa);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        Ok(v)
    }

    fn store_u32(&self, off: u64, value: u32) -> std::io::Result<()> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.write(off, &value.to_le_bytes())
    }
}

type Client = runtime::Client<Harness>;

fn open(vmm: &Shared, ctx: u32, res: u32, native: bool) -> Client {
    let session = {
        let mut vmm = vmm.borrow_mut();
        let session = if native {
            assert_eq!(vmm.ctx_create(ctx, 24), VIRTIO_GPU_RESP_OK_NODATA);
            let gpa = vmm.alloc(u64::from(SESSION_BYTES));
            let mut r = req(VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB, ctx, &[res, 1, 1, 1]);
            r.extend_from_slice(&0u64.to_le_bytes());
            r.extend_from_slice(&u64::from(SESSION_BYTES).to_le_bytes());
            r.extend(entries(&[(gpa, SESSION_BYTES)]));
            assert_eq!(vmm.ctrl_type(&r), VIRTIO_GPU_RESP_OK_NODATA);
            gpa
        } else {
            assert_eq!(vmm.ctx_create(ctx, 0), VIRTIO_GPU_RESP_OK_NODATA);
            vmm.buffer_3d(res, SESSION_BYTES)
        };
        assert_eq!(vmm.ctx_attach(ctx, res), VIRTIO_GPU_RESP_OK_NODATA);
        session
    };
    let channel = Harness {
        vmm: vmm.clone(),
        ctx,
        base: session,
    };
    let limits = DecodeLimits::from_capset(&Capset::default());
    let (ring, profile) = if native {
        (Some(0), Profile::Native { event_ring: 1 })
    } else {
        (None, Profile::Compat)
    };
    let mut c = runtime::Client::new(channel, LAYOUT, limits, ring);
    c.start(ResourceId(res), profile).expect("SESSION_INIT");
    c
}

fn call(c: &mut Client, r: &Request<'_>) -> Reply {
    c.request(r).unwrap()
}

fn queue(c: &mut Client) -> QueueId {
    c.create_queue(1).unwrap()
}

fn fill(
    c: &mut Client,
    q: QueueId,
    va: u64,
    count: u64,
    slot: u32,
    value: u64,
) -> guest_proto::Status {
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
    c.clear_signal(slot).unwrap();
    call(c, &Request::Dispatch(d)).status
}

fn signal(c: &Client, slot: u32) -> SignalSlot {
    c.signal(slot).unwrap()
}

fn faults(c: &mut Client) -> Vec<FaultRecord> {
    c.take_faults().unwrap()
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
    let vmm: Shared = Rc::new(RefCell::new(Vmm::connect(&d.socket, F_VIRGL)));
    let mut c = open(&vmm, 1, 10, false);
    // Bound buffer.
    let data = vmm.borrow_mut().buffer_3d(11, 64 * 1024);
    assert_eq!(
        vmm.borrow_mut().ctx_attach(1, 11),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    let op = [BindOp::MapResource {
        va: GpuVa(0x1000_0000),
        size: 64 * 1024,
        perms: Perms::RW,
        resource: ResourceId(11),
        offset: 0,
    }];
    assert_eq!(
        call(&mut c, &Request::VmBind(VmBind::new(&op))).status,
        guest_proto::Status::Ok
    );
    let q = queue(&mut c);
    assert_eq!(
        fill(&mut c, q, 0x1000_0000, 16 * 1024, 0, 5),
        guest_proto::Status::Ok
    );
    wait_for(|| signal(&c, 0).value == 5, "fill");
    assert_eq!(signal(&c, 0).status, DispatchStatus::Ok);
    assert_eq!(vmm.borrow().ram.u32(data), 0xF111);
    assert_eq!(vmm.borrow().ram.u32(data + 64 * 1024 - 4), 0xF111);

    // Unbound: the fault is forwarded, the guest binds a page and answers.
    assert_eq!(
        fill(&mut c, q, 0x3000_0000, 1024, 1, 6),
        guest_proto::Status::Ok
    );
    let mut page = 0;
    wait_for(
        || {
            for f in faults(&mut c) {
                assert_eq!(f.va, GpuVa(0x3000_0000));
                page = vmm.borrow_mut().alloc(4096);
                let pages = [GuestPhysAddr(page)];
                let op = [BindOp::MapPages {
                    va: f.va,
                    perms: Perms::RW,
                    pages: PageList::new(&pages),
                }];
                assert_eq!(
                    call(&mut c, &Request::VmBind(VmBind::new(&op))).status,
                    guest_proto::Status::Ok
                );
                let e = [FaultReplyEntry {
                    fault_id: f.fault_id,
                    outcome: FaultOutcome::Resolved,
                }];
                assert_eq!(
                    call(&mut c, &Request::FaultReply(FaultReply::new(&e))).status,
                    guest_proto::Status::Ok
                );
            }
            signal(&c, 1).value == 6
        },
        "faulting fill",
    );
    assert_eq!(signal(&c, 1).status, DispatchStatus::Ok);
    assert_eq!(vmm.borrow().ram.u32(page + 4092), 0xF111);

    // Rejected.
    assert_eq!(
        fill(&mut c, q, 0x5000_0000, 16, 2, 7),
        guest_proto::Status::Ok
    );
    wait_for(
        || {
            for f in faults(&mut c) {
                let e = [FaultReplyEntry {
                    fault_id: f.fault_id,
                    outcome: FaultOutcome::Rejected,
                }];
                call(&mut c, &Request::FaultReply(FaultReply::new(&e)));
            }
            signal(&c, 2).value == 7
        },
        "rejected fill",
    );
    assert_eq!(signal(&c, 2).status, DispatchStatus::FaultRejected);
    match call(&mut c, &Request::DeviceQuery).payload {
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
    let vmm: Shared = Rc::new(RefCell::new(Vmm::connect(&d.socket, F_VIRGL)));
    let mut a = open(&vmm, 1, 10, false);
    let mut b = open(&vmm, 2, 20, false);
    let qa = queue(&mut a);
    // B names A's session resource and A's queue: unknown to B.
    let op = [BindOp::MapResource {
        va: GpuVa(0x1000_0000),
        size: 4096,
        perms: Perms::RW,
        resource: ResourceId(10),
        offset: 0,
    }];
    assert_eq!(
        call(&mut b, &Request::VmBind(VmBind::new(&op))).status,
        guest_proto::Status::UnknownResource
    );
    assert_eq!(
        fill(&mut b, qa, 0x1000_0000, 16, 0, 1),
        guest_proto::Status::UnknownQueue
    );
    // Attaching A's resource to B through virtio is the only way to share.
    assert_eq!(
        vmm.borrow_mut().ctx_attach(2, 10),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    assert_eq!(
        call(&mut b, &Request::VmBind(VmBind::new(&op))).status,
        guest_proto::Status::Ok
    );
}

#[test]
fn native_profile_holds_the_event_fence_until_a_fault() {
    let d = Daemon::start(&[]);
    let vmm: Shared = Rc::new(RefCell::new(Vmm::connect(
        &d.socket,
        F_VIRGL | F_CONTEXT_INIT | F_BLOB,
    )));
    let mut c = open(&vmm, 1, 10, true);
    let q = queue(&mut c);
    let arm = c.encode_no_reply(&[Request::EventArm]).unwrap();
    vmm.borrow_mut().post_submit(1, &arm, Some((100, Some(1))));
    assert!(
        vmm.borrow_mut()
            .wait_used(0, Duration::from_millis(300))
            .is_none(),
        "held while nothing is pending"
    );
    // Another submit on ring 0 is not blocked by the held event fence.
    let (query, _) = c.encode(&[Request::DeviceQuery]).unwrap();
    vmm.borrow_mut()
        .post_submit(1, &query, Some((101, Some(0))));
    assert!(
        vmm.borrow_mut()
            .wait_used(0, Duration::from_secs(10))
            .is_some(),
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
    let (dispatch, _) = c.encode(&[Request::Dispatch(d)]).unwrap();
    vmm.borrow_mut()
        .post_submit(1, &dispatch, Some((102, Some(0))));
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (head, _) = vmm
            .borrow_mut()
            .wait_used(0, Duration::from_secs(20))
            .expect("event fence never completed");
        seen.push(head);
    }
    assert_eq!(faults(&mut c).len(), 1);
}

#[test]
fn a_destroyed_context_with_pending_faults_frees_everything() {
    let mut d = Daemon::start(&["--max-bound-bytes", "65536"]);
    let vmm: Shared = Rc::new(RefCell::new(Vmm::connect(&d.socket, F_VIRGL)));
    let mut c = open(&vmm, 1, 10, false);
    let q = queue(&mut c);
    let page = vmm.borrow_mut().alloc(65536);
    let pages: Vec<GuestPhysAddr> = (0..16).map(|i| GuestPhysAddr(page + i * 4096)).collect();
    let op = [BindOp::MapPages {
        va: GpuVa(0x1000_0000),
        perms: Perms::RW,
        pages: PageList::new(&pages),
    }];
    assert_eq!(
        call(&mut c, &Request::VmBind(VmBind::new(&op))).status,
        guest_proto::Status::Ok
    );
    let more = [BindOp::MapPages {
        va: GpuVa(0x2000_0000),
        perms: Perms::RW,
        pages: PageList::new(&pages[..1]),
    }];
    assert_eq!(
        call(&mut c, &Request::VmBind(VmBind::new(&more))).status,
        guest_proto::Status::Quota
    );
    assert_eq!(
        fill(&mut c, q, 0x6000_0000, 4096, 0, 1),
        guest_proto::Status::Ok
    );
    wait_for(|| !faults(&mut c).is_empty(), "a fault");
    assert_eq!(
        vmm.borrow_mut()
            .ctrl_type(&req(VIRTIO_GPU_CMD_CTX_DESTROY, 1, &[])),
        VIRTIO_GPU_RESP_OK_NODATA
    );
    let s = signal(&c, 0);
    assert_eq!((s.value, s.status), (1, DispatchStatus::Cancelled));
    // The guest's quota came back: a new context can bind the same amount.
    let mut c2 = open(&vmm, 2, 20, false);
    assert_eq!(
        call(&mut c2, &Request::VmBind(VmBind::new(&op))).status,
        guest_proto::Status::Ok
    );
    assert!(d.alive());
}
