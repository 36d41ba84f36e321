//! Round trips: what one side encodes, the other side decodes to the same
//! value. Requests go through the guest's `RequestWriter` and the device's
//! `RequestStream`, exactly as they travel.

// Test code: a panic here is a failed test, not a crashed daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use guest_proto::attr::{RangeAttr, RangeAttrs};
use guest_proto::bind::{BindOp, PageList, VmBind};
use guest_proto::capset::Capset;
use guest_proto::command::{
    DecodeLimits, Dispatch, Profile, QueueCreate, QueueDestroy, Region, SessionInit,
};
use guest_proto::fault::{
    FaultCause, FaultOutcome, FaultRecord, FaultReply, FaultReplyEntry, FaultRingHeader,
    FaultRingLayout,
};
use guest_proto::header::{ReplySlot, RequestHeader};
use guest_proto::reply::{
    DeviceQueryReply, FaultReplyAck, QueueCreateReply, Reply, ReplyPayload, SessionInitReply,
    VmBindReply,
};
use guest_proto::signal::SignalSlot;
use guest_proto::stream::RequestStream;
use guest_proto::writer::RequestWriter;
use guest_proto::*;

fn session_init() -> SessionInit {
    let res = ResourceId(1);
    SessionInit::new(
        Profile::Compat,
        Region {
            resource: res,
            offset: 0,
            size: 4096,
        },
        Region {
            resource: res,
            offset: 4096,
            size: FaultRingLayout::new(256).unwrap().size(),
        },
        Region {
            resource: ResourceId(2),
            offset: 0,
            size: 32 * 1024,
        },
    )
}

fn kernels() -> Vec<Kernel> {
    vec![
        Kernel::Fill {
            dst: GpuVa(0x10000),
            count: 1024,
            value: 7,
        },
        Kernel::Copy {
            dst: GpuVa(0x10000),
            src: GpuVa(0x20000),
            size: 0x10000,
        },
        Kernel::AtomicAdd {
            counters: GpuVa(0x30000),
            num_counters: 4,
            items: 1 << 20,
            addend: 1,
        },
        Kernel::Saxpy {
            x: GpuVa(0x40000),
            y: GpuVa(0x50000),
            count: 256,
            a: -0.5,
        },
        Kernel::Gather {
            dst: GpuVa(0x60000),
            src: GpuVa(0x70000),
            indices: GpuVa(0x80000),
            count: 99,
        },
        Kernel::PointerChase {
            head: GpuVa(0),
            max_steps: 0,
            result: GpuVa(0x90000),
        },
    ]
}

#[test]
fn every_request_through_writer_and_stream() {
    let pages_a = [GuestPhysAddr(0x1_0000), GuestPhysAddr(0x3_0000)];
    let pages_b = [GuestPhysAddr(0x7000)];
    let ops = [
        BindOp::MapResource {
            va: GpuVa(0x10000),
            size: 0x4000,
            perms: Perms::RW,
            resource: ResourceId(3),
            offset: 0x1000,
        },
        BindOp::MapPages {
            va: GpuVa(0x7fff_0000_0000),
            perms: Perms::ALL,
            pages: PageList::new(&pages_a),
        },
        BindOp::Unmap {
            va: GpuVa(0x10000),
            size: 0x1000,
        },
        BindOp::MapPages {
            va: GpuVa(0x20000),
            perms: Perms::READ,
            pages: PageList::new(&pages_b),
        },
    ];
    let entries = [
        FaultReplyEntry {
            fault_id: FaultId(1),
            outcome: FaultOutcome::Resolved,
        },
        FaultReplyEntry {
            fault_id: FaultId(u64::MAX),
            outcome: FaultOutcome::Rejected,
        },
    ];
    let mut requests = vec![
        Request::SessionInit(session_init()),
        Request::DeviceQuery,
        Request::VmBind(VmBind::new(&ops)),
        Request::RangeAttr(RangeAttr {
            va: GpuVa(0x10000),
            size: 0x20_0000,
            attrs: RangeAttrs {
                access: Some(Perms::NONE),
                granule_shift: Some(21),
                ..RangeAttrs::default()
            },
        }),
        Request::QueueCreate(QueueCreate { priority: 15 }),
        Request::QueueDestroy(QueueDestroy { queue: QueueId(4) }),
        Request::FaultReply(FaultReply::new(&entries)),
        Request::SessionDestroy,
        Request::EventArm,
    ];
    for (i, kernel) in kernels().into_iter().enumerate() {
        requests.push(Request::Dispatch(Dispatch {
            queue: QueueId(i as u32),
            kernel,
            signal: (i % 2 == 0).then_some(SignalIndex(i as u32)),
            notify: i % 3 == 0,
            completion_value: 1000 + i as u64,
        }));
    }

    let mut writer = RequestWriter::new(64..4096).with_first_seqno(10);
    let tickets: Vec<_> = requests.iter().map(|r| writer.push(r).unwrap()).collect();
    let payload = writer.as_bytes();

    let framed: Vec<_> = RequestStream::new(payload)
        .map(|f| f.expect("framing"))
        .collect();
    assert_eq!(framed.len(), requests.len());
    let mut next_reply = 64;
    for ((f, req), ticket) in framed.iter().zip(&requests).zip(&tickets) {
        assert_eq!(f.decode().as_ref(), Ok(req));
        assert_eq!(f.header.seqno, ticket.seqno);
        assert_eq!(f.header.cmd, req.command().as_u32());
        assert_eq!(ticket.cmd, req.command());
        if req.command() == Command::EventArm {
            assert_eq!(f.header.reply_off, NO_REPLY);
            assert_eq!(ticket.reply_off, None);
        } else {
            assert_eq!(ticket.reply_off, Some(next_reply));
            assert_eq!(f.header.reply_off, next_reply);
            assert_eq!(
                f.header.reply_slot(4096),
                Ok(ReplySlot::At {
                    offset: next_reply,
                    len: ticket.reply_len
                })
            );
            next_reply += ticket.reply_len;
        }
    }
    let seqnos: Vec<u32> = tickets.iter().map(|t| t.seqno).collect();
    assert_eq!(seqnos, (10..10 + requests.len() as u32).collect::<Vec<_>>());
    // Requests follow each other with no gap.
    let mut offset = 0;
    for f in &framed {
        assert_eq!(f.offset, offset);
        offset += f.bytes.len();
    }
    assert_eq!(offset, payload.len());
}

#[test]
fn decoded_vm_bind_re_encodes_to_the_same_bytes() {
    let pages = [GuestPhysAddr(0x2000), GuestPhysAddr(0x4000)];
    let ops = [BindOp::MapPages {
        va: GpuVa(0x10000),
        perms: Perms::RW,
        pages: PageList::new(&pages),
    }];
    let mut first = Vec::new();
    Request::VmBind(VmBind::new(&ops))
        .encode(1, 0, &mut first)
        .unwrap();
    let decoded = Request::decode(&first).unwrap();
    let mut second = Vec::new();
    decoded.encode(1, 0, &mut second).unwrap();
    assert_eq!(first, second);
}

#[test]
fn replies_of_every_command_and_status() {
    let payloads = [
        ReplyPayload::SessionInit(SessionInitReply {
            fault_ring_capacity: 1 << 16,
            signal_slots: 1,
            signals_va: GpuVa(1 << 47),
        }),
        ReplyPayload::SessionDestroy,
        ReplyPayload::DeviceQuery(DeviceQueryReply {
            faults_raised: u64::MAX,
            faults_resolved: 1,
            faults_rejected: 2,
            faults_timed_out: 3,
            faults_cancelled: 4,
            dispatches_done: 5,
            bound_bytes: 6,
            queues: 7,
            lost_replies: u32::MAX,
        }),
        ReplyPayload::VmBind(VmBindReply {
            ops_done: 4095,
            bound_bytes: 1 << 30,
        }),
        ReplyPayload::RangeAttr,
        ReplyPayload::QueueCreate(QueueCreateReply {
            queue: QueueId(u32::MAX),
        }),
        ReplyPayload::QueueDestroy,
        ReplyPayload::Dispatch,
        ReplyPayload::FaultReply(FaultReplyAck {
            accepted: 4096,
            unknown: 0,
        }),
        ReplyPayload::EventArm,
        ReplyPayload::Unknown(0xDEAD),
    ];
    for payload in payloads {
        for raw in 0..=16 {
            let reply = Reply {
                seqno: 0xABCD_0000 + raw,
                status: Status::from_u32(raw).unwrap(),
                payload,
            };
            let enc = reply.encode();
            assert_eq!(enc.len() as u32, payload.reply_len());
            assert_eq!(Reply::decode(enc.as_bytes()), Ok(reply));
            // A reply in a larger buffer decodes the same.
            let mut buf = enc.as_bytes().to_vec();
            buf.extend_from_slice(&[0xFF; 24]);
            assert_eq!(Reply::decode(&buf), Ok(reply));
        }
    }
}

#[test]
fn error_replies_have_the_commands_length_and_a_zero_payload() {
    for (cmd, len) in [
        (0x0001, 32),
        (0x0002, 16),
        (0x0003, 80),
        (0x0010, 32),
        (0x0011, 16),
        (0x0020, 24),
        (0x0021, 16),
        (0x0022, 16),
        (0x0030, 24),
        (0x0040, 16),
        (0x0050, 24),
        (0x0051, 16),
        (0x1234, 16),
    ] {
        let reply = Reply::error(7, cmd, Status::Malformed);
        let enc = reply.encode();
        assert_eq!(enc.len(), len, "cmd {cmd:#x}");
        assert_eq!(guest_proto::opcode::reply_len(cmd), len as u32);
        let header = reply.header();
        assert_eq!((header.cmd, header.len), (cmd, len as u32));
        assert!(enc.as_bytes()[16..].iter().all(|&b| b == 0));
        assert_eq!(Reply::decode(enc.as_bytes()), Ok(reply));
    }
}

#[test]
fn capset_round_trip() {
    let capset = Capset {
        compute_units: 8,
        max_bind_ops: 17,
        ..Capset::default()
    };
    assert_eq!(Capset::decode(&capset.encode()), Ok(capset));
    assert_eq!(Capset::default().kernels, kernel::ALL_KERNELS_MASK);
    let limits = DecodeLimits::from_capset(&capset);
    assert_eq!(limits.max_bind_ops, 17);
    assert_eq!(limits.max_signal_slots, capset.max_signal_slots);
}

#[test]
fn fault_ring_round_trips() {
    for capacity in [16u32, 32, 1 << 16, 1 << 31] {
        let layout = FaultRingLayout::new(capacity).unwrap();
        assert_eq!(
            FaultRingLayout::from_size(layout.size(), u32::MAX),
            Ok(layout)
        );
        let header = FaultRingHeader {
            tail: capacity.wrapping_mul(3),
            head: 5,
            dropped: 9,
            ..FaultRingHeader::initial(layout)
        };
        assert_eq!(FaultRingHeader::decode(&header.encode()), Ok(header));
    }
    let records = [
        FaultRecord {
            fault_id: FaultId(u64::MAX),
            va: GpuVa(0xFFFF_FFFF_FFFF_F000),
            granule_shift: 30,
            cause: FaultCause::Access {
                queue: QueueId(0),
                access: AccessFlags::ALL,
                merged: u32::MAX,
            },
        },
        FaultRecord {
            fault_id: FaultId(0),
            va: GpuVa(0),
            granule_shift: 12,
            cause: FaultCause::Prefault,
        },
    ];
    for r in records {
        assert_eq!(FaultRecord::decode(&r.encode()), Ok(r));
    }
}

#[test]
fn ring_indices_wrap_and_garbage_heads_mean_full() {
    let layout = FaultRingLayout::new(16).unwrap();
    assert_eq!(layout.free_records(0, 0), 16);
    assert_eq!(layout.free_records(3, u32::MAX - 1), 11);
    assert_eq!(layout.free_records(16, 0), 0);
    // head ahead of tail: tail - head wraps to a huge value.
    assert_eq!(layout.free_records(0, 1), 0);
    assert_eq!(layout.free_records(100, 0), 0);
}

#[test]
fn kernel_args_round_trip() {
    for kernel in kernels() {
        let mut args = vec![0u8; kernel.args_len()];
        kernel.write_args(&mut args);
        assert_eq!(Kernel::decode_args(kernel.id(), &args), Ok(kernel));
    }
}

#[test]
fn signal_slots_round_trip() {
    for raw in 0..=6 {
        let slot = SignalSlot {
            value: u64::MAX - u64::from(raw),
            status: DispatchStatus::from_u32(raw).unwrap(),
            error_va: GpuVa(0x1000 * u64::from(raw)),
        };
        assert_eq!(SignalSlot::decode(&slot.encode()), Ok(slot));
    }
}

#[test]
fn request_header_round_trip() {
    let h = RequestHeader {
        cmd: 0xFFFF_FFFF,
        len: 0x8000_0000,
        seqno: 0,
        reply_off: 0x1234_5678,
    };
    assert_eq!(RequestHeader::decode(&h.encode()), Ok(h));
}

#[test]
fn writer_bookkeeping() {
    // Reply area start rounded up to 8; room for exactly two 32-byte replies.
    let mut w = RequestWriter::new(3..72).with_first_seqno(u32::MAX);
    assert_eq!(w.reply_space(), 64);
    let a = w.push(&Request::SessionInit(session_init())).unwrap();
    assert_eq!((a.seqno, a.reply_off), (u32::MAX, Some(8)));
    // Seqno 0 is skipped.
    assert_eq!(w.next_seqno(), 1);
    let b = w.push(&Request::SessionInit(session_init())).unwrap();
    assert_eq!((b.seqno, b.reply_off), (1, Some(40)));
    assert_eq!(w.reply_space(), 0);
    let len_before = w.len();
    assert_eq!(
        w.push(&Request::DeviceQuery),
        Err(EncodeError::ReplyAreaFull {
            needed: 80,
            left: 0
        })
    );
    assert_eq!(w.len(), len_before);
    // Without a reply it still fits.
    let c = w.push_no_reply(&Request::DeviceQuery).unwrap();
    assert_eq!((c.seqno, c.reply_off), (2, None));
    assert_eq!(w.len(), 104 * 2 + 16);

    // An invalid request is refused and leaves nothing behind.
    let bad = Request::QueueCreate(QueueCreate { priority: 16 });
    assert_eq!(
        w.push_no_reply(&bad),
        Err(EncodeError::Invalid(DecodeError::InvalidValue {
            field: "priority",
            value: 16
        }))
    );
    assert_eq!(w.len(), 104 * 2 + 16);
    assert_eq!(w.next_seqno(), 3);

    // Size limit.
    let mut small = RequestWriter::new(0..4096).with_max_bytes(32);
    small.push(&Request::DeviceQuery).unwrap();
    small.push(&Request::SessionDestroy).unwrap();
    assert_eq!(
        small.push(&Request::DeviceQuery),
        Err(EncodeError::TooLarge { len: 48, max: 32 })
    );

    // Device limits.
    let ops = [BindOp::Unmap {
        va: GpuVa(0x10000),
        size: 0x1000,
    }; 3];
    let mut limited = RequestWriter::new(0..4096).with_limits(DecodeLimits {
        max_bind_ops: 2,
        ..DecodeLimits::PROTOCOL
    });
    assert_eq!(
        limited.push(&Request::VmBind(VmBind::new(&ops))),
        Err(EncodeError::Invalid(DecodeError::CountTooLarge {
            field: "op_count",
            count: 3,
            max: 2
        }))
    );
    assert!(limited.is_empty());

    // Reset keeps seqnos increasing.
    w.reset(0..64);
    assert!(w.is_empty());
    assert_eq!(w.push(&Request::SessionDestroy).unwrap().seqno, 3);
    let bytes = w.into_bytes();
    assert_eq!(bytes.len(), 16);
}
