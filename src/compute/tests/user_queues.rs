//! Protocol 1.1 user queues through the compute layer: the commands, their
//! checks and quotas, faults forwarded to the fault ring and resolved by
//! the guest, interrupts in the ring header and on the held `EVENT_ARM`
//! fence, queue stops, and teardown while a queue is stalled.

use guest_proto::aql::{AqlPacket, BarrierKind, packet_type};
use guest_proto::capset::Features;
use guest_proto::fault::FAULT_RING_INTERRUPTS_OFFSET;
use guest_proto::reply::QueueCreateReply;
use guest_proto::sdma::SdmaPacket;
use guest_proto::uq::{
    QueueCountersReply, QueueStatusBlock, QueueStopStatus, UserQueueCreate, UserQueueDestroy,
    UserQueueKind,
};

use super::*;
use guest_proto::AccessFlags;

const P: u64 = 4096;
/// Where the tests bind the queue's ring and control page, and data.
const RING_VA: u64 = 0x5000_0000;
const CTL_VA: u64 = 0x5100_0000;
const SRC_VA: u64 = 0x6000_0000;
const DST_VA: u64 = 0x7000_0000;

/// A user queue whose ring and control page (rptr at 0, doorbell at 8,
/// status block at 64, signals from 1024) the test binds.
struct Uq {
    id: QueueId,
    ring: u64,
    ctl: u64,
    size: u64,
    wptr: u64,
}

impl TestGuest {
    /// A resource of `bytes` bound at `va`; returns its GPA.
    fn bound(&mut self, c: &mut Client, res: u32, va: u64, bytes: u64) -> u64 {
        let gpa = self.resource(c.ctx, res, bytes);
        let r = self.bind(
            c,
            BindOp::MapResource {
                va: GpuVa(va),
                size: bytes,
                perms: Perms::RW,
                resource: ResourceId(res),
                offset: 0,
            },
        );
        assert_eq!(r.status, Status::Ok);
        gpa
    }

    fn user_queue(&mut self, c: &mut Client, kind: UserQueueKind, ring_size: u64) -> Uq {
        let ring = self.bound(c, 50, RING_VA, ring_size);
        let ctl = self.bound(c, 51, CTL_VA, P);
        if kind == UserQueueKind::Aql {
            for i in 0..ring_size / 64 {
                self.store32(ring + i * 64, u32::from(packet_type::INVALID));
            }
        }
        let r = self.call(c, &Request::UserQueueCreate(create(kind, ring_size)));
        assert_eq!(r.status, Status::Ok);
        let ReplyPayload::UserQueueCreate(QueueCreateReply { queue }) = r.payload else {
            panic!("{r:?}")
        };
        Uq {
            id: queue,
            ring,
            ctl,
            size: ring_size,
            wptr: 0,
        }
    }

    fn store32(&self, gpa: u64, v: u32) {
        self.mem
            .memory()
            .store(v, GuestAddress(gpa), Ordering::Release)
            .unwrap();
    }

    fn store64(&self, gpa: u64, v: u64) {
        self.mem
            .memory()
            .store(v, GuestAddress(gpa), Ordering::Release)
            .unwrap();
    }

    fn u64_at(&self, gpa: u64) -> u64 {
        u64::from_le_bytes(self.read::<8>(gpa))
    }

    fn write_bytes(&self, gpa: u64, bytes: &[u8]) {
        self.mem
            .memory()
            .write_slice(bytes, GuestAddress(gpa))
            .unwrap();
    }

    fn counters(&mut self, c: &mut Client) -> QueueCountersReply {
        let r = self.call(c, &Request::QueueCounters);
        assert_eq!(r.status, Status::Ok);
        let ReplyPayload::QueueCounters(q) = r.payload else {
            panic!()
        };
        q
    }

    /// The fault ring header's `interrupts`.
    fn interrupts(&self, c: &Client) -> u32 {
        self.u32_at(c.session_gpa + LAYOUT.ring_off + FAULT_RING_INTERRUPTS_OFFSET)
    }

    fn wait(&mut self, what: &str, mut cond: impl FnMut(&mut TestGuest) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond(self) {
            self.nc().tick();
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn create(kind: UserQueueKind, ring_size: u64) -> UserQueueCreate {
    UserQueueCreate {
        kind,
        priority: 15,
        ring: GpuVa(RING_VA),
        ring_size,
        rptr: GpuVa(CTL_VA),
        wptr: Some(GpuVa(CTL_VA + 16)),
        doorbell: GpuVa(CTL_VA + 8),
        status: Some(GpuVa(CTL_VA + 64)),
    }
}

impl Uq {
    fn push(&mut self, g: &TestGuest, packets: &[SdmaPacket]) {
        for p in packets {
            for (i, b) in p.encode_bytes().iter().enumerate() {
                let off = (self.wptr + i as u64) % self.size;
                g.write_bytes(self.ring + off, std::slice::from_ref(b));
            }
            self.wptr += u64::from(p.dwords()) * 4;
        }
        g.store64(self.ctl + 8, self.wptr);
    }

    fn rptr(&self, g: &TestGuest) -> u64 {
        g.u64_at(self.ctl)
    }

    fn status(&self, g: &TestGuest) -> Option<QueueStatusBlock> {
        QueueStatusBlock::decode(&g.read::<64>(self.ctl + 64)).unwrap()
    }

    /// Writes AQL packet `index` (header last) and rings the doorbell.
    fn aql(&mut self, g: &TestGuest, packet: [u8; 64]) {
        let slot = self.ring + (self.wptr % (self.size / 64)) * 64;
        g.write_bytes(slot + 4, &packet[4..]);
        g.store32(slot, u32::from_le_bytes(packet[..4].try_into().unwrap()));
        g.store64(self.ctl + 8, self.wptr);
        self.wptr += 1;
    }
}

fn filled(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed ^ (i >> 10) as u8)
        .collect()
}

#[test]
fn the_capset_offers_user_queues_unless_turned_off() {
    let g = Guest::with(ComputeConfig::default());
    let caps = Capset::decode(&g.nc().capset(24, 1).unwrap()).unwrap();
    assert_eq!(caps.version_minor, 1);
    assert!(caps.features.contains(Features::USER_QUEUES));
    assert!(caps.supports_user_queue(UserQueueKind::Sdma));
    assert!(caps.supports_user_queue(UserQueueKind::Aql));
    assert_eq!(caps.max_user_queues, 16);

    let mut g = Guest::with(ComputeConfig {
        max_user_queues: 0,
        ..ComputeConfig::default()
    });
    let caps = Capset::decode(&g.nc().capset(24, 1).unwrap()).unwrap();
    assert!(!caps.features.contains(Features::USER_QUEUES));
    assert_eq!((caps.user_queue_kinds, caps.max_user_queues), (0, 0));
    let mut c = g.open(1, compat(), Profile::Compat);
    for r in [
        Request::UserQueueCreate(create(UserQueueKind::Sdma, P)),
        Request::DoorbellKick,
        Request::QueueCounters,
    ] {
        assert_eq!(g.call(&mut c, &r).status, Status::Unsupported, "{r:?}");
    }
}

#[test]
fn an_sdma_copy_runs_through_the_session() {
    let mut g = Guest::with(ComputeConfig::default());
    let mut c = g.open(1, compat(), Profile::Compat);
    let mut q = g.user_queue(&mut c, UserQueueKind::Sdma, 64 * 1024);
    let bytes = 1 << 20;
    let src = g.bound(&mut c, 2, SRC_VA, bytes);
    let data = filled(bytes as usize, 9);
    g.write_bytes(src, &data);
    let dst = g.bound(&mut c, 3, DST_VA, bytes);
    q.push(
        &g,
        &[
            SdmaPacket::CopyLinear {
                src: GpuVa(SRC_VA),
                dst: GpuVa(DST_VA),
                bytes,
            },
            SdmaPacket::Fence {
                addr: GpuVa(CTL_VA + 1024),
                data: 0xF00D,
            },
        ],
    );
    assert_eq!(g.call(&mut c, &Request::DoorbellKick).status, Status::Ok);
    g.wait("the copy", |g| q.rptr(g) == q.wptr);
    assert_eq!(g.u32_at(q.ctl + 1024), 0xF00D);
    let mut out = vec![0u8; bytes as usize];
    g.mem
        .memory()
        .read_slice(&mut out, GuestAddress(dst))
        .unwrap();
    assert!(out == data, "destination differs from the filled source");
    let counters = g.counters(&mut c);
    assert_eq!(counters.user_queue_packets, 2);
    assert_eq!(counters.copy_bytes, bytes);
    assert!(counters.doorbell_polls >= 1);
    assert_eq!(counters.interrupts, 0);
    let ReplyPayload::DeviceQuery(stats) = g.call(&mut c, &Request::DeviceQuery).payload else {
        panic!()
    };
    assert_eq!(stats.queues, 1, "a user queue is a queue");
    let destroy = Request::UserQueueDestroy(UserQueueDestroy { queue: q.id });
    assert_eq!(g.call(&mut c, &destroy).status, Status::Ok);
    assert_eq!(g.call(&mut c, &destroy).status, Status::UnknownQueue);
    let ReplyPayload::DeviceQuery(stats) = g.call(&mut c, &Request::DeviceQuery).payload else {
        panic!()
    };
    assert_eq!(stats.queues, 0);
}

#[test]
fn user_queue_faults_go_to_the_fault_ring_and_replay() {
    let mut g = Guest::with(ComputeConfig::default());
    let mut c = g.open(1, compat(), Profile::Compat);
    let mut q = g.user_queue(&mut c, UserQueueKind::Sdma, P);
    let bytes = 4 * P;
    let src = g.bound(&mut c, 2, SRC_VA, bytes);
    let data = filled(bytes as usize, 1);
    g.write_bytes(src, &data);
    // The destination is not bound: every page faults.
    q.push(
        &g,
        &[SdmaPacket::CopyLinear {
            src: GpuVa(SRC_VA),
            dst: GpuVa(DST_VA),
            bytes,
        }],
    );
    g.call(&mut c, &Request::DoorbellKick);
    let mut backing = std::collections::BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while q.rptr(&g) != q.wptr {
        for f in g.take_faults(&mut c) {
            let FaultCause::Access { queue, access, .. } = f.cause else {
                panic!("{f:?}")
            };
            assert_eq!(queue, q.id, "the fault names the user queue");
            assert_eq!(access, AccessFlags::WRITE);
            let page = g.alloc(P);
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
        assert!(Instant::now() < deadline, "copy never completed");
        std::thread::sleep(Duration::from_micros(200));
    }
    assert_eq!(backing.len(), 4, "one fault per page");
    for (i, (va, gpa)) in backing.iter().enumerate() {
        assert_eq!(*va, DST_VA + i as u64 * P);
        let at = i * P as usize;
        let mut page = vec![0u8; P as usize];
        g.mem
            .memory()
            .read_slice(&mut page, GuestAddress(*gpa))
            .unwrap();
        assert!(page == data[at..at + P as usize], "page {i}");
    }
    let ReplyPayload::DeviceQuery(stats) = g.call(&mut c, &Request::DeviceQuery).payload else {
        panic!()
    };
    assert_eq!((stats.faults_raised, stats.faults_resolved), (4, 4));
    assert_eq!(q.status(&g), None);
}

#[test]
fn a_rejected_fault_stops_the_queue_and_raises_an_interrupt() {
    let mut g = Guest::with(ComputeConfig::default());
    let mut c = g.open(1, compat(), Profile::Compat);
    let mut q = g.user_queue(&mut c, UserQueueKind::Sdma, P);
    q.push(
        &g,
        &[SdmaPacket::Fence {
            addr: GpuVa(DST_VA + 8),
            data: 1,
        }],
    );
    g.call(&mut c, &Request::DoorbellKick);
    let mut faults = Vec::new();
    g.wait("the fault", |g| {
        faults.extend(g.take_faults(&mut c));
        !faults.is_empty()
    });
    assert_eq!(
        g.answer(&mut c, faults[0].fault_id, FaultOutcome::Rejected)
            .status,
        Status::Ok
    );
    g.wait("the stop", |g| q.status(g).is_some());
    let block = q.status(&g).unwrap();
    assert_eq!(block.status, QueueStopStatus::FaultRejected);
    assert_eq!(block.fault_va, GpuVa(DST_VA));
    assert_eq!(block.access, Some(AccessFlags::WRITE));
    g.wait("the interrupt", |g| g.interrupts(&c) == 1);
    assert_eq!(g.counters(&mut c).interrupts, 1);
}

#[test]
fn traps_and_completion_signals_count_interrupts_and_complete_the_event_fence() {
    let mut g = Guest::with(ComputeConfig::default());
    let init = ContextInit {
        capset_id: Some(guest_proto::capset::VGNC_CAPSET_ID),
    };
    let mut c = g.open(1, init, Profile::Native { event_ring: 1 });
    let mut q = g.user_queue(&mut c, UserQueueKind::Sdma, P);
    let arm = |g: &mut TestGuest, id: u64| {
        let fence = FenceRef {
            ctx: c.ctx,
            fence_id: id,
            ring_idx: Some(1),
        };
        let mut w = RequestWriter::new(0..LAYOUT.reply_size as u32);
        w.push_no_reply(&Request::EventArm).unwrap();
        (g.nc().submit(c.ctx, w.as_bytes(), Some(fence)), fence)
    };
    let (held, fence) = arm(&mut g, 70);
    assert_eq!(held, Ok(FenceDisposition::Hold));
    g.nc().tick();
    assert!(g.fences.0.lock().is_empty());
    // ROCr's tail of a copy: the event id into the mailbox, then a trap.
    q.push(
        &g,
        &[
            SdmaPacket::Fence {
                addr: GpuVa(CTL_VA + 1024),
                data: 42,
            },
            SdmaPacket::Trap { int_ctx: 42 },
        ],
    );
    // No kick: the device watches the doorbell on its own.
    g.wait("the event fence", |g| !g.fences.0.lock().is_empty());
    assert_eq!(g.fences.0.lock().as_slice(), &[fence]);
    assert_eq!(g.u32_at(q.ctl + 1024), 42, "mailbox written before");
    assert_eq!(g.interrupts(&c), 1);
    // Nothing new: the next arm is held.
    let (held, _) = arm(&mut g, 71);
    assert_eq!(held, Ok(FenceDisposition::Hold));
    assert_eq!(g.counters(&mut c).interrupts, 1);
}

#[test]
fn aql_completion_signals_post_events_and_a_kernel_dispatch_stops_the_queue() {
    let mut g = Guest::with(ComputeConfig::default());
    let mut c = g.open(1, compat(), Profile::Compat);
    let mut q = g.user_queue(&mut c, UserQueueKind::Aql, P);
    // An amd_signal_t in the control page at 1024, mailbox at 2048.
    let sig = q.ctl + 1024;
    g.store64(sig, 1);
    g.store64(sig + 8, 3);
    g.store64(sig + 16, CTL_VA + 2048);
    g.store32(sig + 24, 99);
    q.aql(
        &g,
        AqlPacket::barrier(BarrierKind::And, &[], Some(GpuVa(CTL_VA + 1024))),
    );
    g.call(&mut c, &Request::DoorbellKick);
    g.wait("the barrier", |g| g.u64_at(sig + 8) == 2);
    g.wait("the interrupt", |g| g.interrupts(&c) == 1);
    assert_eq!(g.u32_at(q.ctl + 2048), 99);
    assert_eq!(q.rptr(&g), 1);
    let dispatch = AqlPacket::with_type(packet_type::KERNEL_DISPATCH, None);
    q.aql(&g, dispatch);
    g.call(&mut c, &Request::DoorbellKick);
    g.wait("the stop", |g| q.status(g).is_some());
    let block = q.status(&g).unwrap();
    assert_eq!(block.status, QueueStopStatus::UnsupportedPacket);
    assert_eq!(block.packet, 1);
    g.wait("the second interrupt", |g| g.interrupts(&c) == 2);
    let counters = g.counters(&mut c);
    assert_eq!((counters.user_queue_packets, counters.interrupts), (1, 2));
}

#[test]
fn user_queue_requests_are_checked_and_counted_against_both_quotas() {
    let mut g = Guest::with(ComputeConfig {
        max_user_queues: 2,
        max_queues: 4,
        ..ComputeConfig::default()
    });
    let mut c = g.open(1, compat(), Profile::Compat);
    let status = |g: &mut TestGuest, c: &mut Client, q: UserQueueCreate| {
        g.call(c, &Request::UserQueueCreate(q)).status
    };
    let base = create(UserQueueKind::Sdma, P);
    // Addresses outside the aperture: the NULL guard, the reserved range.
    let cases = [
        UserQueueCreate {
            ring: GpuVa(0x1000),
            ..base
        },
        UserQueueCreate {
            doorbell: GpuVa(1 << 47),
            ..base
        },
        UserQueueCreate {
            status: Some(GpuVa(1 << 47)),
            ..base
        },
        UserQueueCreate {
            ring: GpuVa((1 << 47) - P / 2),
            ..base
        },
        UserQueueCreate {
            wptr: Some(GpuVa(8)),
            ..base
        },
    ];
    for q in cases {
        assert_eq!(status(&mut g, &mut c, q), Status::OutOfRange, "{q:?}");
    }
    let kq = g.create_queue(&mut c);
    let a = g.call(&mut c, &Request::UserQueueCreate(base));
    assert_eq!(a.status, Status::Ok);
    let ReplyPayload::UserQueueCreate(QueueCreateReply { queue: a }) = a.payload else {
        panic!()
    };
    assert_ne!(a, kq, "one id space");
    let aql = UserQueueCreate {
        kind: UserQueueKind::Aql,
        ..base
    };
    assert_eq!(status(&mut g, &mut c, aql), Status::Ok);
    assert_eq!(
        status(&mut g, &mut c, base),
        Status::Quota,
        "max_user_queues"
    );
    // A DISPATCH names a kernel queue only.
    let d = Dispatch {
        queue: a,
        kernel: Kernel::Fill {
            dst: GpuVa(DST_VA),
            count: 1,
            value: 1,
        },
        signal: None,
        notify: false,
        completion_value: 0,
    };
    assert_eq!(
        g.call(&mut c, &Request::Dispatch(d)).status,
        Status::InvalidArgument
    );
    // QUEUE_DESTROY destroys a user queue; the freed slot is reusable.
    let destroy = Request::QueueDestroy(guest_proto::command::QueueDestroy { queue: a });
    assert_eq!(g.call(&mut c, &destroy).status, Status::Ok);
    assert_eq!(status(&mut g, &mut c, base), Status::Ok);
    // max_queues counts both kinds: 1 kernel + 2 user queues, one more
    // kernel queue fits, then nothing.
    let more = Request::QueueCreate(guest_proto::command::QueueCreate { priority: 0 });
    assert_eq!(g.call(&mut c, &more).status, Status::Ok);
    assert_eq!(g.call(&mut c, &more).status, Status::Quota);
    let ReplyPayload::DeviceQuery(stats) = g.call(&mut c, &Request::DeviceQuery).payload else {
        panic!()
    };
    assert_eq!(stats.queues, 4);
}

#[test]
fn session_destroy_ends_a_user_queue_stalled_on_a_fault() {
    let mut g = Guest::with(ComputeConfig::default());
    let mut c = g.open(1, compat(), Profile::Compat);
    let mut q = g.user_queue(&mut c, UserQueueKind::Sdma, P);
    q.push(
        &g,
        &[SdmaPacket::Fence {
            addr: GpuVa(DST_VA),
            data: 5,
        }],
    );
    g.call(&mut c, &Request::DoorbellKick);
    let mut faults = Vec::new();
    g.wait("the fault", |g| {
        faults.extend(g.take_faults(&mut c));
        !faults.is_empty()
    });
    assert_eq!(g.call(&mut c, &Request::SessionDestroy).status, Status::Ok);
    // The ring and control page stay the guest's; nothing more is read or
    // written there.
    let rptr = q.rptr(&g);
    g.store64(q.ctl, 0xABCD);
    q.push(
        &g,
        &[SdmaPacket::Fence {
            addr: GpuVa(CTL_VA + 512),
            data: 6,
        }],
    );
    std::thread::sleep(Duration::from_millis(30));
    g.nc().tick();
    assert_eq!(rptr, 0);
    assert_eq!(g.u64_at(q.ctl), 0xABCD);
    assert_eq!(g.u32_at(q.ctl + 512), 0);
    assert_eq!(q.status(&g), None);
    // The context can start a new session.
    c.proto.start(c.session_res, Profile::Compat).unwrap();
}
