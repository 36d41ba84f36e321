//! Layout tests: every structure built by hand from the offset tables of
//! `docs/protocol.md`, then decoded and compared field by field, and encoded
//! and compared byte by byte. An offset error that the encoder and decoder
//! share would survive a round trip; it cannot survive these.

// Test code: a panic here is a failed test, not a crashed daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::*;
use guest_proto::attr::RangeAttrs;
use guest_proto::bind::{BindOp, PageList};
use guest_proto::capset::{Capset, Features};
use guest_proto::command::{Dispatch, Profile, QueueCreate, QueueDestroy, Region, SessionInit};
use guest_proto::fault::{
    FaultCause, FaultOutcome, FaultRecord, FaultReplyEntry, FaultRingHeader, FaultRingLayout,
};
use guest_proto::reply::{
    DeviceQueryReply, FaultReplyAck, QueueCreateReply, Reply, ReplyPayload, SessionInitReply,
    VmBindReply,
};
use guest_proto::signal::SignalSlot;
use guest_proto::*;

fn encode(req: &Request<'_>, seqno: u32, reply_off: u32) -> Vec<u8> {
    let mut out = Vec::new();
    req.encode(seqno, reply_off, &mut out).unwrap();
    out
}

#[test]
fn capset_payload() {
    let mut b = [0u8; 128];
    w32(&mut b, 0, 0x434E_4756);
    w16(&mut b, 4, 1);
    w16(&mut b, 6, 2);
    w32(&mut b, 8, 128);
    w32(&mut b, 12, 0b1011);
    w8(&mut b, 16, 48);
    w8(&mut b, 17, 12);
    w32(&mut b, 20, 4);
    w64(&mut b, 24, 1 << 12);
    w64(&mut b, 32, 0x1_0000);
    w64(&mut b, 40, 1 << 47);
    w64(&mut b, 48, (1 << 47) + 0x1000);
    w64(&mut b, 56, 1 << 48);
    w64(&mut b, 64, 0x7E);
    w32(&mut b, 72, 16);
    w32(&mut b, 76, 256);
    w32(&mut b, 80, 64);
    w32(&mut b, 84, 4096);
    w64(&mut b, 88, 1 << 30);
    w32(&mut b, 96, 1 << 20);
    w32(&mut b, 100, 4000);
    w32(&mut b, 104, 10_000);
    w32(&mut b, 108, 65_536);
    w32(&mut b, 112, 32_768);
    w32(&mut b, 116, 0b100);
    w32(&mut b, 120, 12);
    assert_eq!(&b[0..4], b"VGNC");

    let expected = Capset {
        version_minor: 2,
        features: Features::RECOVERABLE_FAULTS
            .union(Features::RANGE_ATTRS)
            .union(Features::PREFAULT),
        va_bits: 48,
        page_shift: 12,
        compute_units: 4,
        page_sizes: 1 << 12,
        aperture_start: GpuVa(0x1_0000),
        aperture_end: GpuVa(1 << 47),
        reserved_start: GpuVa((1 << 47) + 0x1000),
        reserved_end: GpuVa(1 << 48),
        kernels: 0x7E,
        max_queues: 16,
        max_queue_depth: 256,
        max_contexts: 64,
        max_pending_faults: 4096,
        max_bound_bytes: 1 << 30,
        max_request_bytes: 1 << 20,
        max_bind_ops: 4000,
        fault_timeout_ms: 10_000,
        max_signal_slots: 65_536,
        max_fault_ring_records: 32_768,
        user_queue_kinds: 1 << 2,
        max_user_queues: 12,
    };
    let capset = Capset::decode(&b).unwrap();
    assert_eq!(capset, expected);
    assert!(!capset.features.contains(Features::BIND_PAGES));
    assert!(capset.supports_kernel(kernel::id::GATHER));
    assert!(!capset.supports_kernel(0));
    // The AQL bit alone is not enough: the USER_QUEUES feature is off.
    assert!(!capset.supports_user_queue(guest_proto::uq::UserQueueKind::Aql));
    let with_feature = Capset {
        features: capset.features.union(Features::USER_QUEUES),
        ..capset
    };
    assert!(with_feature.supports_user_queue(guest_proto::uq::UserQueueKind::Aql));
    assert!(!with_feature.supports_user_queue(guest_proto::uq::UserQueueKind::Sdma));
    assert_eq!(expected.encode(), b);
}

#[test]
fn session_init_request() {
    let mut b = request(0x0001, 104, 0x55, 0x40);
    w16(&mut b, 16, 1);
    w16(&mut b, 18, 3);
    w32(&mut b, 20, 2);
    w32(&mut b, 28, 1);
    region(&mut b, 32, 5, 0, 4096);
    region(&mut b, 56, 5, 4096, 128 + 32 * 32);
    region(&mut b, 80, 6, 64, 32 * 4);

    let expected = SessionInit {
        version_minor: 3,
        profile: Profile::Native { event_ring: 1 },
        reply: Region {
            resource: ResourceId(5),
            offset: 0,
            size: 4096,
        },
        fault_ring: Region {
            resource: ResourceId(5),
            offset: 4096,
            size: 1152,
        },
        signals: Region {
            resource: ResourceId(6),
            offset: 64,
            size: 128,
        },
    };
    let req = Request::decode(&b).unwrap();
    assert_eq!(req, Request::SessionInit(expected));
    assert_eq!(expected.fault_ring_layout().unwrap().capacity(), 32);
    assert_eq!(expected.signal_slots(), Some(4));
    assert_eq!(encode(&req, 0x55, 0x40), b);
}

#[test]
fn header_only_requests() {
    for (cmd, req) in [
        (0x0002, Request::SessionDestroy),
        (0x0003, Request::DeviceQuery),
    ] {
        let b = request(cmd, 16, 9, 0x18);
        assert_eq!(Request::decode(&b).unwrap(), req);
        assert_eq!(encode(&req, 9, 0x18), b);
    }
    let b = request(0x0040, 16, 9, NO_REPLY);
    assert_eq!(Request::decode(&b).unwrap(), Request::EventArm);
    assert_eq!(encode(&Request::EventArm, 9, NO_REPLY), b);
}

#[test]
fn vm_bind_request() {
    // Three ops and three page entries: 24 + 3 * 40 + 3 * 8 = 168 bytes.
    let mut b = vm_bind_bytes(3, 3);
    assert_eq!(b.len(), 168);
    bind_op(&mut b, 24, 2, 3, 0x10000, 0x2000, 0, 1);
    bind_op(&mut b, 64, 1, 5, 0x40000, 0x1000, 9, 0x3000);
    bind_op(&mut b, 104, 3, 0, 0x80000, 0x4000, 0, 0);
    w64(&mut b, 144, 0xA000);
    w64(&mut b, 152, 0xB000);
    w64(&mut b, 160, 0xC000);

    let Request::VmBind(bind) = Request::decode(&b).unwrap() else {
        panic!("not a VM_BIND");
    };
    assert_eq!(bind.op_count(), 3);
    assert_eq!(bind.page_count(), 3);
    let ops: Vec<BindOp<'_>> = bind.ops().map(Result::unwrap).collect();
    let BindOp::MapPages { va, perms, pages } = ops[0] else {
        panic!("op 0 is not MAP_PAGES: {:?}", ops[0]);
    };
    assert_eq!(va, GpuVa(0x10000));
    assert_eq!(perms, Perms::RW);
    assert_eq!(pages.first_index(), Some(1));
    assert_eq!(
        pages.iter().collect::<Vec<_>>(),
        [GuestPhysAddr(0xB000), GuestPhysAddr(0xC000)]
    );
    assert_eq!(ops[0].size(), 0x2000);
    assert_eq!(
        ops[1],
        BindOp::MapResource {
            va: GpuVa(0x40000),
            size: 0x1000,
            perms: Perms::READ.union(Perms::EXEC),
            resource: ResourceId(9),
            offset: 0x3000,
        }
    );
    assert_eq!(
        ops[2],
        BindOp::Unmap {
            va: GpuVa(0x80000),
            size: 0x4000
        }
    );
}

#[test]
fn vm_bind_encoding_lays_out_pages_in_op_order() {
    let first = [GuestPhysAddr(0x5000)];
    let second = [GuestPhysAddr(0x7000), GuestPhysAddr(0x9000)];
    let ops = [
        BindOp::MapPages {
            va: GpuVa(0x10000),
            perms: Perms::READ,
            pages: PageList::new(&first),
        },
        BindOp::Unmap {
            va: GpuVa(0x20000),
            size: 0x1000,
        },
        BindOp::MapPages {
            va: GpuVa(0x30000),
            perms: Perms::RW,
            pages: PageList::new(&second),
        },
    ];
    let mut b = vm_bind_bytes(3, 3);
    bind_op(&mut b, 24, 2, 1, 0x10000, 0x1000, 0, 0);
    bind_op(&mut b, 64, 3, 0, 0x20000, 0x1000, 0, 0);
    bind_op(&mut b, 104, 2, 3, 0x30000, 0x2000, 0, 1);
    w64(&mut b, 144, 0x5000);
    w64(&mut b, 152, 0x7000);
    w64(&mut b, 160, 0x9000);
    assert_eq!(encode(&Request::VmBind(bind::VmBind::new(&ops)), 1, 0), b);
}

#[test]
fn range_attr_request() {
    let mut b = request(0x0011, 40 + 4 * 16, 2, 0);
    w64(&mut b, 16, 0x20000);
    w64(&mut b, 24, 0x10000);
    w32(&mut b, 32, 4);
    // Canonical (type) order, which is what the encoder writes.
    for (i, (t, v)) in [(1u32, 1u64), (2, 1), (3, 16), (4, 1)]
        .into_iter()
        .enumerate()
    {
        w32(&mut b, 40 + 16 * i, t);
        w64(&mut b, 48 + 16 * i, v);
    }
    let expected = attr::RangeAttr {
        va: GpuVa(0x20000),
        size: 0x10000,
        attrs: RangeAttrs {
            access: Some(Perms::READ),
            fault_policy: Some(FaultPolicy::Fatal),
            granule_shift: Some(16),
            prefault: Some(true),
        },
    };
    assert_eq!(Request::decode(&b).unwrap(), Request::RangeAttr(expected));
    assert_eq!(encode(&Request::RangeAttr(expected), 2, 0), b);

    // Any order decodes to the same set.
    let mut shuffled = request(0x0011, 40 + 4 * 16, 2, 0);
    shuffled[16..40].copy_from_slice(&b[16..40]);
    for (i, (t, v)) in [(4u32, 1u64), (3, 16), (1, 1), (2, 1)]
        .into_iter()
        .enumerate()
    {
        w32(&mut shuffled, 40 + 16 * i, t);
        w64(&mut shuffled, 48 + 16 * i, v);
    }
    assert_eq!(
        Request::decode(&shuffled).unwrap(),
        Request::RangeAttr(expected)
    );
}

#[test]
fn queue_requests() {
    let mut b = request(0x0020, 24, 3, 8);
    w32(&mut b, 16, 7);
    let req = Request::QueueCreate(QueueCreate { priority: 7 });
    assert_eq!(Request::decode(&b).unwrap(), req);
    assert_eq!(encode(&req, 3, 8), b);

    let mut b = request(0x0021, 24, 4, 8);
    w32(&mut b, 16, 0x33);
    let req = Request::QueueDestroy(QueueDestroy {
        queue: QueueId(0x33),
    });
    assert_eq!(Request::decode(&b).unwrap(), req);
    assert_eq!(encode(&req, 4, 8), b);
}

#[test]
fn dispatch_request() {
    let mut b = request(0x0022, 72, 5, 16);
    w32(&mut b, 16, 2);
    w32(&mut b, 20, 3);
    w32(&mut b, 24, 9);
    w32(&mut b, 28, 1);
    w64(&mut b, 32, 0x1234_5678_9ABC);
    // ATOMIC_ADD arguments at 40.
    w64(&mut b, 40, 0x20000);
    w64(&mut b, 48, 1000);
    w64(&mut b, 56, 3);
    w32(&mut b, 64, 8);
    let expected = Dispatch {
        queue: QueueId(2),
        kernel: Kernel::AtomicAdd {
            counters: GpuVa(0x20000),
            num_counters: 8,
            items: 1000,
            addend: 3,
        },
        signal: Some(SignalIndex(9)),
        notify: true,
        completion_value: 0x1234_5678_9ABC,
    };
    let req = Request::Dispatch(expected);
    assert_eq!(Request::decode(&b).unwrap(), req);
    assert_eq!(encode(&req, 5, 16), b);

    // No signal: 0xFFFF_FFFF.
    w32(&mut b, 24, 0xFFFF_FFFF);
    w32(&mut b, 28, 0);
    let Request::Dispatch(d) = Request::decode(&b).unwrap() else {
        panic!("not a dispatch");
    };
    assert_eq!(d.signal, None);
    assert!(!d.notify);
}

/// Every kernel's argument block (section 10), by hand.
#[test]
fn kernel_argument_blocks() {
    let mut cases: Vec<(u32, Vec<u8>, Kernel)> = Vec::new();

    let mut a = vec![0u8; 24];
    w64(&mut a, 0, 0x1000);
    w64(&mut a, 8, 64);
    w32(&mut a, 16, 0xDEAD_BEEF);
    cases.push((
        1,
        a,
        Kernel::Fill {
            dst: GpuVa(0x1000),
            count: 64,
            value: 0xDEAD_BEEF,
        },
    ));

    let mut a = vec![0u8; 24];
    w64(&mut a, 0, 0x1000);
    w64(&mut a, 8, 0x9000);
    w64(&mut a, 16, 0x800);
    cases.push((
        2,
        a,
        Kernel::Copy {
            dst: GpuVa(0x1000),
            src: GpuVa(0x9000),
            size: 0x800,
        },
    ));

    let mut a = vec![0u8; 32];
    w64(&mut a, 0, 0x2000);
    w64(&mut a, 8, 10);
    w64(&mut a, 16, 7);
    w32(&mut a, 24, 3);
    cases.push((
        3,
        a,
        Kernel::AtomicAdd {
            counters: GpuVa(0x2000),
            num_counters: 3,
            items: 10,
            addend: 7,
        },
    ));

    let mut a = vec![0u8; 32];
    w64(&mut a, 0, 0x3000);
    w64(&mut a, 8, 0x4000);
    w64(&mut a, 16, 100);
    w32(&mut a, 24, 2.5f32.to_bits());
    cases.push((
        4,
        a,
        Kernel::Saxpy {
            x: GpuVa(0x3000),
            y: GpuVa(0x4000),
            count: 100,
            a: 2.5,
        },
    ));

    let mut a = vec![0u8; 32];
    w64(&mut a, 0, 0x5000);
    w64(&mut a, 8, 0x6000);
    w64(&mut a, 16, 0x7000);
    w64(&mut a, 24, 12);
    cases.push((
        5,
        a,
        Kernel::Gather {
            dst: GpuVa(0x5000),
            src: GpuVa(0x6000),
            indices: GpuVa(0x7000),
            count: 12,
        },
    ));

    let mut a = vec![0u8; 24];
    w64(&mut a, 0, 0x8000);
    w64(&mut a, 8, 50);
    w64(&mut a, 16, 0x9000);
    cases.push((
        6,
        a,
        Kernel::PointerChase {
            head: GpuVa(0x8000),
            max_steps: 50,
            result: GpuVa(0x9000),
        },
    ));

    for (id, bytes, kernel) in cases {
        assert_eq!(kernel.id(), id);
        assert_eq!(kernel.args_len(), bytes.len());
        assert_eq!(kernel::args_len_of(id), Some(bytes.len()));
        assert_eq!(Kernel::decode_args(id, &bytes), Ok(kernel), "kernel {id}");
        let mut out = vec![0xAAu8; bytes.len()];
        kernel.write_args(&mut out);
        assert_eq!(out, bytes, "kernel {id}");
    }
}

#[test]
fn fault_reply_request() {
    let mut b = request(0x0030, 24 + 2 * 16, 6, 24);
    w32(&mut b, 16, 2);
    w64(&mut b, 24, 77);
    w32(&mut b, 32, 1);
    w64(&mut b, 40, 78);
    w32(&mut b, 48, 2);
    let entries = [
        FaultReplyEntry {
            fault_id: FaultId(77),
            outcome: FaultOutcome::Resolved,
        },
        FaultReplyEntry {
            fault_id: FaultId(78),
            outcome: FaultOutcome::Rejected,
        },
    ];
    let req = Request::FaultReply(fault::FaultReply::new(&entries));
    let decoded = Request::decode(&b).unwrap();
    assert_eq!(decoded, req);
    let Request::FaultReply(r) = decoded else {
        panic!("not a FAULT_REPLY")
    };
    assert_eq!(r.entries().collect::<Vec<_>>(), entries);
    assert_eq!(encode(&req, 6, 24), b);
}

fn reply_bytes(seqno: u32, status: u32, len: usize, cmd: u32) -> Vec<u8> {
    let mut b = vec![0u8; len];
    w32(&mut b, 0, seqno);
    w32(&mut b, 4, status);
    w32(&mut b, 8, len as u32);
    w32(&mut b, 12, cmd);
    b
}

fn check_reply(bytes: &[u8], reply: Reply) {
    assert_eq!(Reply::decode(bytes), Ok(reply));
    let enc = reply.encode();
    assert_eq!(enc.as_bytes(), bytes);
    assert_eq!(enc.seqno(), reply.seqno);
    assert_eq!(enc.after_seqno(), &bytes[4..]);
}

#[test]
fn reply_payloads() {
    let mut b = reply_bytes(1, 0, 32, 0x0001);
    w32(&mut b, 16, 64);
    w32(&mut b, 20, 128);
    w64(&mut b, 24, 0x8000_0000_0000);
    check_reply(
        &b,
        Reply {
            seqno: 1,
            status: Status::Ok,
            payload: ReplyPayload::SessionInit(SessionInitReply {
                fault_ring_capacity: 64,
                signal_slots: 128,
                signals_va: GpuVa(0x8000_0000_0000),
            }),
        },
    );

    let mut b = reply_bytes(2, 0, 80, 0x0003);
    for (i, off) in [16, 24, 32, 40, 48, 56, 64].into_iter().enumerate() {
        w64(&mut b, off, 100 + i as u64);
    }
    w32(&mut b, 72, 3);
    w32(&mut b, 76, 4);
    check_reply(
        &b,
        Reply {
            seqno: 2,
            status: Status::Ok,
            payload: ReplyPayload::DeviceQuery(DeviceQueryReply {
                faults_raised: 100,
                faults_resolved: 101,
                faults_rejected: 102,
                faults_timed_out: 103,
                faults_cancelled: 104,
                dispatches_done: 105,
                bound_bytes: 106,
                queues: 3,
                lost_replies: 4,
            }),
        },
    );

    let mut b = reply_bytes(3, 8, 32, 0x0010);
    w32(&mut b, 16, 2);
    w64(&mut b, 24, 0x5000);
    check_reply(
        &b,
        Reply {
            seqno: 3,
            status: Status::OutOfRange,
            payload: ReplyPayload::VmBind(VmBindReply {
                ops_done: 2,
                bound_bytes: 0x5000,
            }),
        },
    );

    let mut b = reply_bytes(4, 0, 24, 0x0020);
    w32(&mut b, 16, 6);
    check_reply(
        &b,
        Reply {
            seqno: 4,
            status: Status::Ok,
            payload: ReplyPayload::QueueCreate(QueueCreateReply { queue: QueueId(6) }),
        },
    );

    let mut b = reply_bytes(5, 11, 24, 0x0030);
    w32(&mut b, 16, 3);
    w32(&mut b, 20, 1);
    check_reply(
        &b,
        Reply {
            seqno: 5,
            status: Status::UnknownFault,
            payload: ReplyPayload::FaultReply(FaultReplyAck {
                accepted: 3,
                unknown: 1,
            }),
        },
    );

    for (cmd, payload) in [
        (0x0002, ReplyPayload::SessionDestroy),
        (0x0011, ReplyPayload::RangeAttr),
        (0x0021, ReplyPayload::QueueDestroy),
        (0x0022, ReplyPayload::Dispatch),
        (0x0040, ReplyPayload::EventArm),
        (0x0777, ReplyPayload::Unknown(0x777)),
    ] {
        check_reply(
            &reply_bytes(6, 3, 16, cmd),
            Reply {
                seqno: 6,
                status: Status::InvalidArgument,
                payload,
            },
        );
    }
}

#[test]
fn fault_ring_header() {
    let mut b = [0u8; 128];
    w32(&mut b, 0, 0x1_0005);
    w32(&mut b, 4, 2);
    w32(&mut b, 8, 64);
    w32(&mut b, 12, 32);
    w32(&mut b, 20, 0xDEAD_0007);
    w32(&mut b, 64, 0x1_0001);
    let header = FaultRingHeader {
        tail: 0x1_0005,
        dropped: 2,
        capacity: 64,
        record_size: 32,
        interrupts: 0xDEAD_0007,
        head: 0x1_0001,
    };
    assert_eq!(FaultRingHeader::decode(&b), Ok(header));
    assert_eq!(header.encode(), b);

    let layout = FaultRingLayout::new(64).unwrap();
    assert_eq!(layout.size(), 128 + 32 * 64);
    assert_eq!(layout.record_offset(0), 128);
    assert_eq!(layout.record_offset(65), 128 + 32);
    assert_eq!(layout.record_offset(u32::MAX), 128 + 32 * 63);
    assert_eq!(layout.free_records(header.tail, header.head), 60);
    let init = FaultRingHeader::initial(layout);
    let mut expected = [0u8; 128];
    w32(&mut expected, 8, 64);
    w32(&mut expected, 12, 32);
    assert_eq!(init.encode(), expected);
}

#[test]
fn fault_record() {
    let mut b = [0u8; 32];
    w64(&mut b, 0, 0x42);
    w64(&mut b, 8, 0x7F00_1234_5000);
    w32(&mut b, 16, 3);
    w8(&mut b, 20, 8 | 1);
    w8(&mut b, 21, 0);
    w8(&mut b, 22, 16);
    w32(&mut b, 24, 5);
    let record = FaultRecord {
        fault_id: FaultId(0x42),
        va: GpuVa(0x7F00_1234_5000),
        granule_shift: 16,
        cause: FaultCause::Access {
            queue: QueueId(3),
            access: AccessFlags::ATOMIC.union(AccessFlags::READ),
            merged: 5,
        },
    };
    assert_eq!(FaultRecord::decode(&b), Ok(record));
    assert_eq!(record.encode(), b);

    let mut p = [0u8; 32];
    w64(&mut p, 0, 0x43);
    w64(&mut p, 8, 0x20000);
    w32(&mut p, 16, 0xFFFF_FFFF);
    w8(&mut p, 21, 1);
    w8(&mut p, 22, 21);
    let prefault = FaultRecord {
        fault_id: FaultId(0x43),
        va: GpuVa(0x20000),
        granule_shift: 21,
        cause: FaultCause::Prefault,
    };
    assert_eq!(FaultRecord::decode(&p), Ok(prefault));
    assert_eq!(prefault.encode(), p);
}

#[test]
fn signal_slot() {
    let mut b = [0u8; 32];
    w64(&mut b, 0, 0x99);
    w32(&mut b, 8, 2);
    w64(&mut b, 16, 0x4000);
    let slot = SignalSlot {
        value: 0x99,
        status: DispatchStatus::FaultTimedOut,
        error_va: GpuVa(0x4000),
    };
    assert_eq!(SignalSlot::decode(&b), Ok(slot));
    assert_eq!(slot.encode(), b);
    assert_eq!(signal::signal_slot_offset(SignalIndex(3)), 96);
}
