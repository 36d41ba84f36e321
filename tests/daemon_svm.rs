//! Protocol 1.1, faults resolved by the guest kernel, through the daemon's
//! real socket in both transport profiles. The harness plays the user
//! session with the guest runtime's client and the guest kernel with a
//! second client whose buffer is the kernel's reply region and fault ring
//! (guest-physical, no resource) and whose submissions carry a fence on
//! ring 63 in the native profile, as the patched virtio-gpu driver sends
//! them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::time::{Duration, Instant};

use guest_proto::bind::{BindOp, PageList, VmBind};
use guest_proto::capset::{Capset, Features};
use guest_proto::command::{DecodeLimits, Dispatch, Profile};
use guest_proto::fault::{FaultOutcome, FaultRecord, FaultReply, FaultReplyEntry};
use guest_proto::reply::{Reply, ReplyPayload};
use guest_proto::svm::{
    FAULT_RING_STATE_OFFSET, GpaRegion, KERNEL_EVENT_RING, KERNEL_REPLY, KERNEL_RING, SvmAttach,
    SvmAttachReply,
};
use guest_proto::{
    DispatchStatus, GpuVa, GuestPhysAddr, Kernel, Perms, QueueId, Request, ResourceId, SignalIndex,
    Status,
};
use guest_runtime::client::{self as runtime, Channel, SessionLayout};
use harness::session::{SessionRam, Shared};
use harness::{Daemon, F_BLOB, F_CONTEXT_INIT, F_VIRGL, Vmm, entries, req};
use vhost_gpu_nc::virtio_gpu::protocol::{
    VIRTIO_GPU_CMD_GET_CAPSET, VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB, VIRTIO_GPU_RESP_OK_NODATA,
};

const SESSION_BYTES: u32 = 16384;
const USER: SessionLayout = SessionLayout::COMPACT;
const RING_RECORDS: u32 = 64;
const RING_BYTES: u64 = 128 + 32 * RING_RECORDS as u64;
const KERNEL: SessionLayout = SessionLayout {
    reply_off: 0,
    reply_size: 4096,
    ring_off: 4096,
    ring_capacity: RING_RECORDS,
    signals_off: 4096 + RING_BYTES,
    signal_slots: 0,
};

/// Used-ring heads that came back while nobody waited for them (held event
/// fences that completed).
type Seen = Rc<RefCell<HashSet<u16>>>;

/// Guest RAM seen through `parts` (buffer offset, GPA, length); a submit is
/// a SUBMIT_3D through the socket, fenced on its ring in the native
/// profile, and waits for its own response.
struct Socket {
    vmm: Shared,
    ctx: u32,
    ram: SessionRam,
    native: bool,
    fence: Rc<RefCell<u64>>,
    seen: Seen,
}

/// Posts a SUBMIT_3D (fenced on `ring` if given) and returns its head.
fn post(vmm: &Shared, fence: &Rc<RefCell<u64>>, ctx: u32, stream: &[u8], ring: Option<u8>) -> u16 {
    let f = ring.map(|r| {
        let mut id = fence.borrow_mut();
        *id += 1;
        (*id, Some(r))
    });
    vmm.borrow_mut().post_submit(ctx, stream, f)
}

/// Waits until the used ring has returned `head`.
fn wait_head(vmm: &Shared, seen: &Seen, head: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if seen.borrow_mut().remove(&head) {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match vmm
            .borrow_mut()
            .wait_used(0, left.min(Duration::from_millis(50)))
        {
            Some((h, _)) => {
                seen.borrow_mut().insert(h);
            }
            None => continue,
        }
    }
}

impl Channel for Socket {
    fn submit(&mut self, stream: &[u8], ring: Option<u32>) -> std::io::Result<()> {
        let ring = ring.filter(|_| self.native).map(|r| r as u8);
        let head = post(&self.vmm, &self.fence, self.ctx, stream, ring);
        if wait_head(&self.vmm, &self.seen, head, Duration::from_secs(20)) {
            Ok(())
        } else {
            Err(std::io::Error::other("SUBMIT_3D never answered"))
        }
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.ram.read(off, buf)
    }

    fn write(&self, off: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.ram.write(off, bytes)
    }

    fn load_u32(&self, off: u64) -> std::io::Result<u32> {
        self.ram.load_u32(off)
    }

    fn load_u64(&self, off: u64) -> std::io::Result<u64> {
        self.ram.load_u64(off)
    }

    fn store_u32(&self, off: u64, value: u32) -> std::io::Result<()> {
        self.ram.store_u32(off, value)
    }
}

type Client = runtime::Client<Socket>;

struct Ctx {
    vmm: Shared,
    id: u32,
    user: Client,
    kernel: Client,
    ring_gpa: u64,
    reply_gpa: u64,
    fence: Rc<RefCell<u64>>,
    seen: Seen,
}

fn open(vmm: &Shared, ctx: u32, res: u32, native: bool) -> Ctx {
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
    let (ring_gpa, reply_gpa) = {
        let mut v = vmm.borrow_mut();
        (v.alloc(8192), v.alloc(4096))
    };
    let fence = Rc::new(RefCell::new(0));
    let seen: Seen = Rc::new(RefCell::new(HashSet::new()));
    let channel = |parts| Socket {
        vmm: vmm.clone(),
        ctx,
        ram: SessionRam::new(vmm.clone(), parts),
        native,
        fence: fence.clone(),
        seen: seen.clone(),
    };
    let limits = DecodeLimits::from_capset(&Capset::default());
    let (ring, profile) = if native {
        (Some(0), Profile::Native { event_ring: 1 })
    } else {
        (None, Profile::Compat)
    };
    let mut user = runtime::Client::new(
        channel(vec![(0, session, u64::from(SESSION_BYTES))]),
        USER,
        limits,
        ring,
    );
    user.start(ResourceId(res), profile).expect("SESSION_INIT");
    let kernel = runtime::Client::new(
        channel(vec![(0, reply_gpa, 4096), (4096, ring_gpa, RING_BYTES)]),
        KERNEL,
        limits,
        native.then_some(u32::from(KERNEL_RING)),
    )
    .with_reply_flag(KERNEL_REPLY);
    Ctx {
        vmm: vmm.clone(),
        id: ctx,
        user,
        kernel,
        ring_gpa,
        reply_gpa,
        fence,
        seen,
    }
}

impl Ctx {
    fn attach(&mut self) -> Reply {
        let a = SvmAttach {
            fault_ring: GpaRegion {
                gpa: GuestPhysAddr(self.ring_gpa),
                size: RING_BYTES,
            },
            reply: GpaRegion {
                gpa: GuestPhysAddr(self.reply_gpa),
                size: 4096,
            },
        };
        self.kernel.request(&Request::SvmAttach(a)).unwrap()
    }

    fn u32_at(&self, gpa: u64) -> u32 {
        self.vmm.borrow().ram.u32(gpa)
    }

    /// Posts the kernel's EVENT_ARM on ring 62 without waiting.
    fn arm_kernel_event(&mut self) -> u16 {
        let stream = self.kernel.encode_no_reply(&[Request::EventArm]).unwrap();
        post(
            &self.vmm,
            &self.fence,
            self.id,
            &stream,
            Some(KERNEL_EVENT_RING),
        )
    }

    fn event_done(&self, head: u16, timeout: Duration) -> bool {
        wait_head(&self.vmm, &self.seen, head, timeout)
    }
}

fn queue(c: &mut Client) -> QueueId {
    c.create_queue(0).unwrap()
}

fn fill(c: &mut Client, q: QueueId, va: u64, count: u64, slot: u32, value: u64) {
    c.dispatch(Dispatch {
        queue: q,
        kernel: Kernel::Fill {
            dst: GpuVa(va),
            count,
            value: 0xF111_0000 | slot,
        },
        signal: Some(SignalIndex(slot)),
        notify: false,
        completion_value: value,
    })
    .unwrap();
}

fn faults(c: &mut Client, n: usize) -> Vec<FaultRecord> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    while out.len() < n {
        out.extend(c.take_faults().unwrap());
        assert!(
            Instant::now() < deadline,
            "only {} of {n} faults",
            out.len()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    out
}

fn wait_signal(c: &mut Client, slot: u32, value: u64) -> DispatchStatus {
    c.wait_signal(slot, value, Duration::from_secs(20), |_| Ok(false))
        .unwrap()
        .status
}

/// The kernel's answer to a fault, as the driver sends it: the bind and
/// the FAULT_REPLY in one submission.
fn resolve(k: &mut Client, f: &FaultRecord, page: u64) -> Vec<Reply> {
    let pages = [GuestPhysAddr(page)];
    let ops = [BindOp::MapPages {
        va: f.va,
        perms: Perms::RW,
        pages: PageList::new(&pages),
    }];
    let e = [FaultReplyEntry {
        fault_id: f.fault_id,
        outcome: FaultOutcome::Resolved,
    }];
    k.requests(&[
        Request::VmBind(VmBind::new(&ops)),
        Request::FaultReply(FaultReply::new(&e)),
    ])
    .unwrap()
}

fn capset_features(vmm: &Shared) -> Features {
    let r = req(VIRTIO_GPU_CMD_GET_CAPSET, 0, &[24, 1]);
    let resp = vmm.borrow_mut().ctrl(&r, 24 + 128);
    Capset::decode(&resp[24..]).unwrap().features
}

#[test]
fn the_guest_kernel_takes_over_resolves_and_gives_back_faults_in_both_profiles() {
    for native in [false, true] {
        let d = Daemon::start(&[]);
        let features = if native {
            F_VIRGL | F_CONTEXT_INIT | F_BLOB
        } else {
            F_VIRGL
        };
        let vmm: Shared = Rc::new(RefCell::new(Vmm::connect(&d.socket, features)));
        assert!(capset_features(&vmm).contains(Features::KERNEL_SVM));
        let mut c = open(&vmm, 1, 10, native);
        let q = queue(&mut c.user);
        // A fault pending before the attach is re-posted to the kernel.
        fill(&mut c.user, q, 0x3000_0000, 1024, 1, 11);
        let before = faults(&mut c.user, 1);
        let r = c.attach();
        assert_eq!(r.status, Status::Ok, "native={native}");
        assert_eq!(
            r.payload,
            ReplyPayload::SvmAttach(SvmAttachReply {
                fault_ring_capacity: RING_RECORDS
            })
        );
        assert_eq!(c.u32_at(c.ring_gpa + FAULT_RING_STATE_OFFSET), 1);
        let f = faults(&mut c.kernel, 1);
        assert_eq!(f[0].fault_id, before[0].fault_id);
        let page = vmm.borrow_mut().alloc(4096);
        let replies = resolve(&mut c.kernel, &f[0], page);
        assert!(
            replies.iter().all(|r| r.status == Status::Ok),
            "{replies:?}"
        );
        assert_eq!(wait_signal(&mut c.user, 1, 11), DispatchStatus::Ok);
        assert_eq!(c.u32_at(page + 4092), 0xF111_0001);

        if native {
            // The kernel's event fence is held until its ring has a record;
            // a user MAP_PAGES on ring 0 is refused.
            let event = c.arm_kernel_event();
            assert!(!c.event_done(event, Duration::from_millis(300)), "held");
            let pages = [GuestPhysAddr(page)];
            let ops = [BindOp::MapPages {
                va: GpuVa(0x6000_0000),
                perms: Perms::RW,
                pages: PageList::new(&pages),
            }];
            let r = c.user.request(&Request::VmBind(VmBind::new(&ops))).unwrap();
            assert_eq!(r.status, Status::Permission);
            fill(&mut c.user, q, 0x4000_0000, 16, 2, 12);
            assert!(
                c.event_done(event, Duration::from_secs(20)),
                "a fault completes it"
            );
        } else {
            fill(&mut c.user, q, 0x4000_0000, 16, 2, 12);
        }
        // Detach with that fault pending: REJECTED, ring DETACHED.
        let later = faults(&mut c.kernel, 1);
        assert_eq!(later[0].va, GpuVa(0x4000_0000));
        let r = c.kernel.request(&Request::SvmDetach).unwrap();
        assert_eq!(r.status, Status::Ok);
        assert_eq!(c.u32_at(c.ring_gpa + FAULT_RING_STATE_OFFSET), 2);
        assert_eq!(
            wait_signal(&mut c.user, 2, 12),
            DispatchStatus::FaultRejected
        );
        // The session's own ring gets faults again.
        fill(&mut c.user, q, 0x5000_0000, 16, 3, 13);
        assert_eq!(faults(&mut c.user, 1)[0].va, GpuVa(0x5000_0000));
        let stats = c.user.query().unwrap();
        assert_eq!((stats.faults_resolved, stats.faults_rejected), (1, 1));
    }
}

#[test]
fn without_kernel_svm_the_device_refuses_the_attach() {
    let d = Daemon::start(&["--no-kernel-svm"]);
    let vmm: Shared = Rc::new(RefCell::new(Vmm::connect(
        &d.socket,
        F_VIRGL | F_CONTEXT_INIT | F_BLOB,
    )));
    assert!(!capset_features(&vmm).contains(Features::KERNEL_SVM));
    let mut c = open(&vmm, 1, 10, true);
    assert_eq!(c.attach().status, Status::Unsupported);
    assert_eq!(c.u32_at(c.ring_gpa + FAULT_RING_STATE_OFFSET), 0);
    // Ring 62 is then no kernel event ring: nothing is held.
    let event = c.arm_kernel_event();
    assert!(c.event_done(event, Duration::from_secs(10)));
}

#[test]
fn an_unmap_is_answered_only_after_the_gpu_stopped_writing() {
    for native in [false, true] {
        let d = Daemon::start(&[]);
        let features = if native {
            F_VIRGL | F_CONTEXT_INIT | F_BLOB
        } else {
            F_VIRGL
        };
        let vmm: Shared = Rc::new(RefCell::new(Vmm::connect(&d.socket, features)));
        let mut c = open(&vmm, 1, 10, native);
        assert_eq!(c.attach().status, Status::Ok);
        // 16 MiB of GPU VA on one guest page, filled while the kernel
        // unmaps it.
        let page = vmm.borrow_mut().alloc(4096);
        let pages = vec![GuestPhysAddr(page); 512];
        let (va, size) = (0x4000_0000u64, 16u64 << 20);
        let bind_all = |k: &mut Client| {
            for chunk in 0..size / (2 << 20) {
                let ops = [BindOp::MapPages {
                    va: GpuVa(va + chunk * (2 << 20)),
                    perms: Perms::RW,
                    pages: PageList::new(&pages),
                }];
                assert_eq!(
                    k.request(&Request::VmBind(VmBind::new(&ops)))
                        .unwrap()
                        .status,
                    Status::Ok
                );
            }
        };
        bind_all(&mut c.kernel);
        let q = queue(&mut c.user);
        for round in 0..3u64 {
            fill(&mut c.user, q, va, size / 4, 1, 20 + round);
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.u32_at(page) != 0xF111_0001 {
                assert!(Instant::now() < deadline, "the fill never started");
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
            vmm.borrow().ram.write(page, &0xCA11_AB1Eu32.to_le_bytes());
            loop {
                for f in c.kernel.take_faults().unwrap() {
                    let e = [FaultReplyEntry {
                        fault_id: f.fault_id,
                        outcome: FaultOutcome::Rejected,
                    }];
                    c.kernel
                        .request(&Request::FaultReply(FaultReply::new(&e)))
                        .unwrap();
                }
                if c.user.signal_value(1).unwrap() == 20 + round {
                    break;
                }
                assert!(
                    Instant::now() < deadline + Duration::from_secs(20),
                    "fill never ended"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(
                c.u32_at(page),
                0xCA11_AB1E,
                "native={native} round {round}: the GPU wrote after the unmap was answered"
            );
            bind_all(&mut c.kernel);
            vmm.borrow().ram.write(page, &0u32.to_le_bytes());
        }
    }
}
