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
use harness::session::{SessionRam, Shared, SubmitChannel};
use harness::{Daemon, F_BLOB, F_CONTEXT_INIT, F_VIRGL, Vmm, entries, req};
use vhost_gpu_nc::virtio_gpu::protocol::{
    VIRTIO_GPU_CMD_CTX_DESTROY, VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB, VIRTIO_GPU_RESP_OK_NODATA,
};

const SESSION_BYTES: u32 = 16384;
const LAYOUT: SessionLayout = SessionLayout::COMPACT;

type Client = runtime::Client<SubmitChannel>;

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
    let channel = SubmitChannel {
        ram: SessionRam::contiguous(vmm.clone(), session, u64::from(SESSION_BYTES)),
        ctx,
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

/// Protocol 1.1 through the real socket: an SDMA user queue in compat
/// guest memory copies a filled source, raises an interrupt the guest sees
/// in its fault ring header, and idle queues cost the daemon almost no CPU.
#[test]
fn compat_user_queue_copies_traps_and_idles_cheaply() {
    use guest_proto::fault::FAULT_RING_INTERRUPTS_OFFSET;
    use guest_proto::sdma::SdmaPacket;
    use guest_proto::uq::{UserQueueCreate, UserQueueKind};

    let mut d = Daemon::start(&[]);
    let vmm: Shared = Rc::new(RefCell::new(Vmm::connect(&d.socket, F_VIRGL)));
    let mut c = open(&vmm, 1, 10, false);
    let bind = |c: &mut Client, res: u32, va: u64, bytes: u32| -> u64 {
        let gpa = vmm.borrow_mut().buffer_3d(res, bytes);
        assert_eq!(
            vmm.borrow_mut().ctx_attach(1, res),
            VIRTIO_GPU_RESP_OK_NODATA
        );
        let op = [BindOp::MapResource {
            va: GpuVa(va),
            size: u64::from(bytes),
            perms: Perms::RW,
            resource: ResourceId(res),
            offset: 0,
        }];
        assert_eq!(
            call(c, &Request::VmBind(VmBind::new(&op))).status,
            guest_proto::Status::Ok
        );
        gpa
    };
    // The daemon idle without user queues (its vring worker ticks every
    // millisecond): the baseline of the same run.
    std::thread::sleep(Duration::from_millis(100));
    let window = Duration::from_secs(2);
    let (cpu0, t0) = (thread_cpu_ns(d.pid(), None), Instant::now());
    std::thread::sleep(window);
    let baseline = (thread_cpu_ns(d.pid(), None) - cpu0) as f64 / 1e9 / t0.elapsed().as_secs_f64();
    let queues = 16u64;
    let ring_va = 0x4000_0000u64;
    let ctl_va = 0x4800_0000u64;
    let ring = bind(&mut c, 11, ring_va, 4096 * queues as u32);
    let ctl = bind(&mut c, 12, ctl_va, 4096);
    let bytes = 2u32 << 20;
    let src = bind(&mut c, 13, 0x5000_0000, bytes);
    let dst = bind(&mut c, 14, 0x6000_0000, bytes);
    let data: Vec<u8> = (0..bytes)
        .map(|i| (i as u8).wrapping_mul(7) ^ (i >> 12) as u8)
        .collect();
    vmm.borrow().ram.write(src, &data);
    // Queue i: a 4 KiB ring, rptr at ctl + 128 i, doorbell 8 bytes after.
    let mut ids = Vec::new();
    for i in 0..queues {
        let q = UserQueueCreate {
            kind: UserQueueKind::Sdma,
            priority: 0,
            ring: GpuVa(ring_va + 4096 * i),
            ring_size: 4096,
            rptr: GpuVa(ctl_va + 128 * i),
            wptr: None,
            doorbell: GpuVa(ctl_va + 128 * i + 8),
            status: Some(GpuVa(ctl_va + 128 * i + 64)),
        };
        let r = call(&mut c, &Request::UserQueueCreate(q));
        assert_eq!(r.status, guest_proto::Status::Ok);
        let ReplyPayload::UserQueueCreate(created) = r.payload else {
            panic!()
        };
        ids.push(created.queue);
    }
    // Queue 0: copy, then ROCr's completion tail (mailbox fence, trap).
    let packets = [
        SdmaPacket::CopyLinear {
            src: GpuVa(0x5000_0000),
            dst: GpuVa(0x6000_0000),
            bytes: u64::from(bytes) / 2,
        },
        SdmaPacket::CopyLinear {
            src: GpuVa(0x5000_0000 + u64::from(bytes) / 2),
            dst: GpuVa(0x6000_0000 + u64::from(bytes) / 2),
            bytes: u64::from(bytes) / 2,
        },
        SdmaPacket::Fence {
            addr: GpuVa(ctl_va + 4000),
            data: 7,
        },
        SdmaPacket::Trap { int_ctx: 7 },
    ];
    let stream: Vec<u8> = packets.iter().flat_map(|p| p.encode_bytes()).collect();
    vmm.borrow().ram.write(ring, &stream);
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    vmm.borrow()
        .ram
        .write(ctl + 8, &(stream.len() as u64).to_le_bytes());
    // No kick: the daemon watches the doorbell itself.
    let interrupts = LAYOUT.ring_off + FAULT_RING_INTERRUPTS_OFFSET;
    wait_for(
        || c.channel().load_u32(interrupts).unwrap() == 1,
        "the trap's interrupt",
    );
    assert_eq!(vmm.borrow().ram.u64(ctl), stream.len() as u64, "rptr");
    assert_eq!(vmm.borrow().ram.u32(ctl + 4000), 7);
    assert!(
        vmm.borrow().ram.read(dst, bytes as usize) == data,
        "destination differs from the filled source"
    );
    let r = call(&mut c, &Request::QueueCounters);
    let ReplyPayload::QueueCounters(counters) = r.payload else {
        panic!()
    };
    assert_eq!(counters.user_queue_packets, 4);
    assert_eq!(counters.copy_bytes, u64::from(bytes));
    assert_eq!(counters.interrupts, 1);

    // Sixteen idle queues: the daemon's CPU time over the same window, and
    // the command processor thread's own (schedstat: nanoseconds on CPU).
    std::thread::sleep(Duration::from_millis(100));
    let (cpu0, cp0, wakes0, t0) = (
        thread_cpu_ns(d.pid(), None),
        thread_cpu_ns(d.pid(), Some("sim-cp")),
        thread_switches(d.pid(), "sim-cp"),
        Instant::now(),
    );
    std::thread::sleep(window);
    let elapsed = t0.elapsed().as_secs_f64();
    let share = (thread_cpu_ns(d.pid(), None) - cpu0) as f64 / 1e9 / elapsed;
    let cp_share = (thread_cpu_ns(d.pid(), Some("sim-cp")) - cp0) as f64 / 1e9 / elapsed;
    let wakes = (thread_switches(d.pid(), "sim-cp") - wakes0) as f64 / elapsed;
    eprintln!(
        "16 idle user queues: daemon CPU {:.2}% (baseline without queues {:.2}%), \
         command processor thread {:.3}% of one core, {wakes:.0} wake-ups/s",
        share * 100.0,
        baseline * 100.0,
        cp_share * 100.0
    );
    // All idle queues share one grid of look times: the thread wakes about
    // once per idle period (10 ms), not once per queue.
    assert!(
        wakes < 16.0 * 100.0 / 4.0,
        "the command processor woke {wakes:.0} times/s for 16 idle queues"
    );
    // Near 0: the release build measures about 0.2% (benches/user_queues.rs);
    // this is a debug build (a look costs ~10x), maybe on a loaded machine.
    assert!(
        cp_share < 0.05,
        "idle queues cost {:.2}% CPU",
        cp_share * 100.0
    );
    assert!(
        share < baseline + 0.05,
        "idle daemon {:.1}% CPU against {:.1}% without queues",
        share * 100.0,
        baseline * 100.0
    );
    let r = call(&mut c, &Request::QueueCounters);
    let ReplyPayload::QueueCounters(after) = r.payload else {
        panic!()
    };
    let polls = after.doorbell_polls - counters.doorbell_polls;
    assert!(
        polls < 16 * 2 * 150,
        "{polls} doorbell loads for 16 idle queues in ~2 s"
    );
    for q in ids {
        let r = call(
            &mut c,
            &Request::UserQueueDestroy(guest_proto::uq::UserQueueDestroy { queue: q }),
        );
        assert_eq!(r.status, guest_proto::Status::Ok);
    }
    assert!(d.alive());
}

/// CPU time (ns, schedstat: not quantized to clock ticks) of the daemon's
/// threads named `name`, or of all of them.
fn thread_cpu_ns(pid: i32, name: Option<&str>) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = entry.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if name.is_some_and(|n| comm.trim() != n) {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// Times the daemon's threads named `name` were switched out (schedstat's
/// third field: every wake-up of a thread that then sleeps again is one).
fn thread_switches(pid: i32, name: &str) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = entry.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        total += stat
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// A connected guest with an open session that does nothing costs the
/// daemon no wake-ups (the tick timer runs only while faults are pending;
/// it used to fire every millisecond, about 3% of a core here), and a
/// fault nobody answers still times out on the tick, which stops again
/// once it has.
#[test]
fn an_idle_session_wakes_nothing_and_unanswered_faults_still_time_out() {
    let d = Daemon::start(&["--fault-timeout-ms", "50"]);
    let vmm: Shared = Rc::new(RefCell::new(Vmm::connect(&d.socket, F_VIRGL)));
    let mut c = open(&vmm, 1, 10, false);
    let q = queue(&mut c);
    let idle_switches = |what: &str| {
        std::thread::sleep(Duration::from_millis(200));
        let before = thread_switches(d.pid(), "vring_worker");
        std::thread::sleep(Duration::from_secs(1));
        let n = thread_switches(d.pid(), "vring_worker") - before;
        eprintln!("{what}: the vring worker woke {n} times in 1 s");
        assert!(n < 20, "{what}: {n} wake-ups of the vring worker in 1 s");
    };
    idle_switches("idle session");
    // A fault nobody answers: FAULT_TIMED_OUT after ~50 ms.
    let start = Instant::now();
    assert_eq!(
        fill(&mut c, q, 0x7000_0000, 16, 0, 3),
        guest_proto::Status::Ok
    );
    wait_for(|| signal(&c, 0).value == 3, "the timed-out fill");
    assert_eq!(signal(&c, 0).status, DispatchStatus::FaultTimedOut);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(45) && took < Duration::from_secs(5),
        "timed out after {took:?}"
    );
    assert_eq!(faults(&mut c).len(), 1);
    match call(&mut c, &Request::DeviceQuery).payload {
        ReplyPayload::DeviceQuery(q) => assert_eq!(q.faults_timed_out, 1),
        p => panic!("{p:?}"),
    }
    idle_switches("after the timeout");
}
