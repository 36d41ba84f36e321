//! Protocol 1.1 (user-mode queues, `docs/protocol.md` section 14): layout
//! tests built by hand from the offset tables, rejection tables with the
//! exact error and status, and property tests for the packet decoders the
//! device runs on hostile ring contents.

// Test code: a panic here is a failed test, not a crashed daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::*;
use guest_proto::aql::{self, AqlError, AqlPacket, BarrierKind, SignalHandle};
use guest_proto::reply::{QueueCreateReply, Reply, ReplyPayload};
use guest_proto::sdma::{self, AtomicOp, PollFunc, SdmaError, SdmaPacket};
use guest_proto::uq::{
    QueueCountersReply, QueueStatusBlock, QueueStopStatus, UserQueueCreate, UserQueueDestroy,
    UserQueueKind,
};
use guest_proto::writer::RequestWriter;
use guest_proto::*;
use proptest::prelude::*;

fn encode(req: &Request<'_>, seqno: u32, reply_off: u32) -> Vec<u8> {
    let mut out = Vec::new();
    req.encode(seqno, reply_off, &mut out).unwrap();
    out
}

/// A valid `USER_QUEUE_CREATE`, by hand from the table of 14.2.
fn create_bytes() -> Vec<u8> {
    let mut b = request(0x0023, 72, 9, 16);
    w32(&mut b, 16, 1);
    w32(&mut b, 20, 15);
    w64(&mut b, 24, 0x7000_0000);
    w64(&mut b, 32, 1 << 20);
    w64(&mut b, 40, 0x7010_0000);
    w64(&mut b, 48, 0x7010_0040);
    w64(&mut b, 56, 0x7020_0008);
    w64(&mut b, 64, 0x7010_0080);
    b
}

fn created() -> UserQueueCreate {
    UserQueueCreate {
        kind: UserQueueKind::Sdma,
        priority: 15,
        ring: GpuVa(0x7000_0000),
        ring_size: 1 << 20,
        rptr: GpuVa(0x7010_0000),
        wptr: Some(GpuVa(0x7010_0040)),
        doorbell: GpuVa(0x7020_0008),
        status: Some(GpuVa(0x7010_0080)),
    }
}

#[test]
fn command_ids_and_reply_lengths() {
    let table = [
        (0x0004, Command::QueueCounters, 48),
        (0x0023, Command::UserQueueCreate, 24),
        (0x0024, Command::UserQueueDestroy, 16),
        (0x0025, Command::DoorbellKick, 16),
    ];
    for (id, cmd, len) in table {
        assert_eq!(Command::from_u32(id), Some(cmd));
        assert_eq!(cmd.as_u32(), id);
        assert_eq!(cmd.reply_len(), len);
        assert!(cmd.has_reply());
    }
    // The guest-kernel half of 1.1 owns these ids.
    assert_eq!(Command::from_u32(0x0050), Some(Command::SvmAttach));
    assert_eq!(Command::from_u32(0x0051), Some(Command::SvmDetach));
    // DEVICE_QUERY keeps its 1.0 reply length.
    assert_eq!(Command::DeviceQuery.reply_len(), 80);
}

#[test]
fn user_queue_requests_layout() {
    let b = create_bytes();
    let req = Request::UserQueueCreate(created());
    assert_eq!(Request::decode(&b).unwrap(), req);
    assert_eq!(encode(&req, 9, 16), b);

    // wptr and status may be 0 (none).
    let mut b0 = create_bytes();
    w32(&mut b0, 16, 2);
    w64(&mut b0, 48, 0);
    w64(&mut b0, 64, 0);
    let req0 = Request::UserQueueCreate(UserQueueCreate {
        kind: UserQueueKind::Aql,
        wptr: None,
        status: None,
        ..created()
    });
    assert_eq!(Request::decode(&b0).unwrap(), req0);
    assert_eq!(encode(&req0, 9, 16), b0);

    let mut b = request(0x0024, 24, 3, 8);
    w32(&mut b, 16, 0x21);
    let req = Request::UserQueueDestroy(UserQueueDestroy {
        queue: QueueId(0x21),
    });
    assert_eq!(Request::decode(&b).unwrap(), req);
    assert_eq!(encode(&req, 3, 8), b);

    let b = request(0x0025, 16, 4, 0);
    assert_eq!(Request::decode(&b).unwrap(), Request::DoorbellKick);
    assert_eq!(encode(&Request::DoorbellKick, 4, 0), b);
    let b = request(0x0004, 16, 5, 0);
    assert_eq!(Request::decode(&b).unwrap(), Request::QueueCounters);
    assert_eq!(encode(&Request::QueueCounters, 5, 0), b);

    let ranges: Vec<(GpuVa, u64)> = created().ranges().collect();
    assert_eq!(
        ranges,
        vec![
            (GpuVa(0x7000_0000), 1 << 20),
            (GpuVa(0x7010_0000), 8),
            (GpuVa(0x7010_0040), 8),
            (GpuVa(0x7020_0008), 8),
            (GpuVa(0x7010_0080), 64),
        ]
    );
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
    assert_eq!(reply.encode().as_bytes(), bytes);
}

#[test]
fn user_queue_replies_layout() {
    let mut b = reply_bytes(7, 0, 48, 0x0004);
    w64(&mut b, 16, 11);
    w64(&mut b, 24, 0x4000_0000);
    w64(&mut b, 32, 3);
    w64(&mut b, 40, 0x1_0000_0001);
    check_reply(
        &b,
        Reply {
            seqno: 7,
            status: Status::Ok,
            payload: ReplyPayload::QueueCounters(QueueCountersReply {
                user_queue_packets: 11,
                copy_bytes: 0x4000_0000,
                interrupts: 3,
                doorbell_polls: 0x1_0000_0001,
            }),
        },
    );
    let mut b = reply_bytes(8, 0, 24, 0x0023);
    w32(&mut b, 16, 5);
    check_reply(
        &b,
        Reply {
            seqno: 8,
            status: Status::Ok,
            payload: ReplyPayload::UserQueueCreate(QueueCreateReply { queue: QueueId(5) }),
        },
    );
    check_reply(
        &reply_bytes(9, 10, 16, 0x0024),
        Reply {
            seqno: 9,
            status: Status::UnknownQueue,
            payload: ReplyPayload::UserQueueDestroy,
        },
    );
    check_reply(
        &reply_bytes(10, 0, 16, 0x0025),
        Reply {
            seqno: 10,
            status: Status::Ok,
            payload: ReplyPayload::DoorbellKick,
        },
    );
    // An error reply has the command's length and a zero payload.
    let e = Reply::error(3, 0x0023, Status::Quota).encode();
    assert_eq!(e.as_bytes(), reply_bytes(3, 12, 24, 0x0023).as_slice());
    let e = Reply::error(4, 0x0004, Status::Unsupported).encode();
    assert_eq!(e.as_bytes(), reply_bytes(4, 16, 48, 0x0004).as_slice());
    // A reserved field of the USER_QUEUE_CREATE reply must be zero.
    let mut b = reply_bytes(8, 0, 24, 0x0023);
    w32(&mut b, 20, 1);
    assert_eq!(
        Reply::decode(&b),
        Err(DecodeError::ReservedNotZero { field: "reserved" })
    );
}

#[test]
fn status_block_layout() {
    let mut b = [0u8; 64];
    w32(&mut b, 0, 1);
    w32(&mut b, 4, 2);
    w64(&mut b, 8, 0x7777_0000);
    w64(&mut b, 16, 0x1_0040);
    w8(&mut b, 24, 8);
    w64(&mut b, 32, 0xAB);
    let block = QueueStatusBlock {
        status: QueueStopStatus::FaultTimedOut,
        fault_va: GpuVa(0x7777_0000),
        packet: 0x1_0040,
        access: Some(AccessFlags::ATOMIC),
        detail: 0xAB,
    };
    assert_eq!(QueueStatusBlock::decode(&b), Ok(Some(block)));
    assert_eq!(block.encode(), b);
    // Running: state 0, nothing else is read.
    let mut running = b;
    w32(&mut running, 0, 0);
    assert_eq!(QueueStatusBlock::decode(&running), Ok(None));
    // The statuses and their numbers (14.6).
    let numbers = [
        (QueueStopStatus::FaultRejected, 1),
        (QueueStopStatus::FaultTimedOut, 2),
        (QueueStopStatus::FaultFatal, 3),
        (QueueStopStatus::DeviceError, 5),
        (QueueStopStatus::WatchdogTimeout, 6),
        (QueueStopStatus::BadPacket, 16),
        (QueueStopStatus::UnsupportedPacket, 17),
        (QueueStopStatus::BadDoorbell, 18),
    ];
    for (s, n) in numbers {
        assert_eq!(s.as_u32(), n);
        assert_eq!(QueueStopStatus::from_u32(n), Some(s));
    }
    for n in [0, 4, 7, 15, 19, u32::MAX] {
        assert_eq!(QueueStopStatus::from_u32(n), None);
    }
    assert_eq!(
        QueueStopStatus::from_dispatch(DispatchStatus::FaultFatal),
        Some(QueueStopStatus::FaultFatal)
    );
    assert_eq!(
        QueueStopStatus::from_dispatch(DispatchStatus::Cancelled),
        None
    );
}

#[test]
fn status_block_rejections() {
    let good = QueueStatusBlock {
        status: QueueStopStatus::BadPacket,
        fault_va: GpuVa(0),
        packet: 64,
        access: None,
        detail: 0x14,
    }
    .encode();
    let cases: Vec<(&str, Vec<u8>, DecodeError)> = vec![
        (
            "short",
            good[..63].to_vec(),
            DecodeError::TooShort {
                needed: 64,
                actual: 63,
            },
        ),
        (
            "state 2",
            {
                let mut b = good.to_vec();
                w32(&mut b, 0, 2);
                b
            },
            DecodeError::InvalidValue {
                field: "status.state",
                value: 2,
            },
        ),
        (
            "status 4 (CANCELLED never stops a queue)",
            {
                let mut b = good.to_vec();
                w32(&mut b, 4, 4);
                b
            },
            DecodeError::InvalidValue {
                field: "status.status",
                value: 4,
            },
        ),
        (
            "access 16",
            {
                let mut b = good.to_vec();
                w8(&mut b, 24, 16);
                b
            },
            DecodeError::InvalidValue {
                field: "status.access",
                value: 16,
            },
        ),
        (
            "reserved 25",
            {
                let mut b = good.to_vec();
                w8(&mut b, 31, 1);
                b
            },
            DecodeError::ReservedNotZero {
                field: "status.reserved25",
            },
        ),
        (
            "reserved 40",
            {
                let mut b = good.to_vec();
                w8(&mut b, 63, 1);
                b
            },
            DecodeError::ReservedNotZero {
                field: "status.reserved40",
            },
        ),
    ];
    for (name, bytes, error) in cases {
        assert_eq!(QueueStatusBlock::decode(&bytes), Err(error), "case {name}");
    }
}

type Case = (&'static str, Vec<u8>, DecodeError, Status);

fn with(mut b: Vec<u8>, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    f(&mut b);
    b
}

#[test]
fn user_queue_request_rejections() {
    let invalid = |field, value| DecodeError::InvalidValue { field, value };
    let misaligned = |field, value| DecodeError::Misaligned { field, value };
    let top = !255u64;
    let cases: Vec<Case> = vec![
        (
            "create: 64 bytes",
            request(0x0023, 64, 1, 0),
            DecodeError::WrongLength {
                expected: 72,
                actual: 64,
            },
            Status::Malformed,
        ),
        (
            "create: 80 bytes",
            with(create_bytes(), |b| {
                b.resize(80, 0);
                w32(b, 4, 80);
            }),
            DecodeError::WrongLength {
                expected: 72,
                actual: 80,
            },
            Status::Malformed,
        ),
        (
            "create: kind 0",
            with(create_bytes(), |b| w32(b, 16, 0)),
            invalid("kind", 0),
            Status::InvalidArgument,
        ),
        (
            "create: kind 3",
            with(create_bytes(), |b| w32(b, 16, 3)),
            invalid("kind", 3),
            Status::InvalidArgument,
        ),
        (
            "create: priority 16",
            with(create_bytes(), |b| w32(b, 20, 16)),
            invalid("priority", 16),
            Status::InvalidArgument,
        ),
        (
            "create: priority 2^32-1",
            with(create_bytes(), |b| w32(b, 20, u32::MAX)),
            invalid("priority", u64::from(u32::MAX)),
            Status::InvalidArgument,
        ),
        (
            "create: ring 2 KiB",
            with(create_bytes(), |b| w64(b, 32, 2048)),
            invalid("ring_size", 2048),
            Status::InvalidArgument,
        ),
        (
            "create: ring 12 KiB",
            with(create_bytes(), |b| w64(b, 32, 3 * 4096)),
            invalid("ring_size", 3 * 4096),
            Status::InvalidArgument,
        ),
        (
            "create: ring 128 MiB",
            with(create_bytes(), |b| w64(b, 32, 128 << 20)),
            invalid("ring_size", 128 << 20),
            Status::InvalidArgument,
        ),
        (
            "create: ring 0",
            with(create_bytes(), |b| w64(b, 32, 0)),
            invalid("ring_size", 0),
            Status::InvalidArgument,
        ),
        (
            "create: ring_va 128-aligned",
            with(create_bytes(), |b| w64(b, 24, 0x7000_0080)),
            misaligned("ring_va", 0x7000_0080),
            Status::Misaligned,
        ),
        (
            "create: rptr 4-aligned",
            with(create_bytes(), |b| w64(b, 40, 0x7010_0004)),
            misaligned("rptr_va", 0x7010_0004),
            Status::Misaligned,
        ),
        (
            "create: wptr 4-aligned",
            with(create_bytes(), |b| w64(b, 48, 0x7010_0044)),
            misaligned("wptr_va", 0x7010_0044),
            Status::Misaligned,
        ),
        (
            "create: doorbell 4-aligned",
            with(create_bytes(), |b| w64(b, 56, 0x7020_000C)),
            misaligned("doorbell_va", 0x7020_000C),
            Status::Misaligned,
        ),
        (
            "create: status 32-aligned",
            with(create_bytes(), |b| w64(b, 64, 0x7010_00A0)),
            misaligned("status_va", 0x7010_00A0),
            Status::Misaligned,
        ),
        (
            "create: ring wraps",
            with(create_bytes(), |b| w64(b, 24, top)),
            DecodeError::Overflow {
                field: "ring_va+ring_size",
            },
            Status::OutOfRange,
        ),
        (
            "create: rptr wraps",
            with(create_bytes(), |b| w64(b, 40, u64::MAX - 7)),
            DecodeError::Overflow { field: "rptr_va+8" },
            Status::OutOfRange,
        ),
        (
            "create: doorbell wraps",
            with(create_bytes(), |b| w64(b, 56, u64::MAX - 7)),
            DecodeError::Overflow {
                field: "doorbell_va+8",
            },
            Status::OutOfRange,
        ),
        (
            "create: status wraps",
            with(create_bytes(), |b| w64(b, 64, u64::MAX - 63)),
            DecodeError::Overflow {
                field: "status_va+64",
            },
            Status::OutOfRange,
        ),
        (
            "destroy: 16 bytes",
            request(0x0024, 16, 1, 0),
            DecodeError::WrongLength {
                expected: 24,
                actual: 16,
            },
            Status::Malformed,
        ),
        (
            "destroy: reserved",
            with(request(0x0024, 24, 1, 0), |b| w32(b, 20, 1)),
            DecodeError::ReservedNotZero { field: "reserved" },
            Status::Malformed,
        ),
        (
            "kick: 24 bytes",
            request(0x0025, 24, 1, 0),
            DecodeError::WrongLength {
                expected: 16,
                actual: 24,
            },
            Status::Malformed,
        ),
        (
            "counters: 24 bytes",
            request(0x0004, 24, 1, 0),
            DecodeError::WrongLength {
                expected: 16,
                actual: 24,
            },
            Status::Malformed,
        ),
    ];
    for (name, bytes, error, status) in cases {
        assert_eq!(
            Request::decode(&bytes).map(|_| ()),
            Err(error),
            "case {name}"
        );
        assert_eq!(error.status(), status, "status of case {name}");
    }
}

#[test]
fn writer_builds_and_refuses_user_queue_requests() {
    let mut w = RequestWriter::new(0..4096);
    let t = w.push(&Request::UserQueueCreate(created())).unwrap();
    assert_eq!((t.cmd, t.reply_len), (Command::UserQueueCreate, 24));
    let t = w.push(&Request::DoorbellKick).unwrap();
    assert_eq!(t.reply_off, Some(24));
    let before = w.len();
    let bad = UserQueueCreate {
        ring_size: 5000,
        ..created()
    };
    assert_eq!(
        w.push(&Request::UserQueueCreate(bad)),
        Err(EncodeError::Invalid(DecodeError::InvalidValue {
            field: "ring_size",
            value: 5000
        }))
    );
    assert_eq!(w.len(), before, "nothing written for a refused request");
}

fn dwords(v: &[u32]) -> Vec<u32> {
    v.to_vec()
}

/// The packets ROCr 5.2's `BlitSdmaV4` writes, dword by dword as
/// `amd_blit_sdma.cpp` builds them.
#[test]
fn sdma_packets_as_rocr_writes_them() {
    // COPY_LINEAR: count = bytes - 1, parameters 0, src, dst.
    let copy = dwords(&[0x0000_0001, 0x3F_FFDF, 0, 0x1000, 0x7F, 0x2000, 0x7F]);
    assert_eq!(sdma::packet_dwords(copy[0]), Ok(7));
    let p = SdmaPacket::decode(&copy).unwrap();
    assert_eq!(
        p,
        SdmaPacket::CopyLinear {
            src: GpuVa(0x7F_0000_1000),
            dst: GpuVa(0x7F_0000_2000),
            bytes: 0x3F_FFE0,
        }
    );
    assert_eq!(p.encode(), copy);

    // CONST_FILL, DW fill: ROCr writes count = (dwords - 1) * 4.
    let fill = dwords(&[11 | (2 << 30), 0x4000, 0x1, 0xCAFE_F00D, (100 - 1) * 4]);
    let p = SdmaPacket::decode(&fill).unwrap();
    assert_eq!(
        p,
        SdmaPacket::ConstFill {
            dst: GpuVa(0x1_0000_4000),
            data: 0xCAFE_F00D,
            element_shift: 2,
            elements: 100,
        }
    );
    // Linux's form of the same fill (count = bytes - 1) decodes alike.
    let mut linux = fill.clone();
    linux[4] = 400 - 1;
    assert_eq!(SdmaPacket::decode(&linux), Ok(p));
    assert_eq!(p.encode(), linux);

    // POLL_REGMEM on memory: mem_poll, func 3 (equal), mask all ones,
    // interval 4, retry 0xfff.
    let poll = dwords(&[
        8 | (3 << 28) | (1 << 31),
        0x5008,
        0x7F,
        0,
        0xFFFF_FFFF,
        4 | (0xFFF << 16),
    ]);
    let p = SdmaPacket::decode(&poll).unwrap();
    assert_eq!(
        p,
        SdmaPacket::PollMemory {
            addr: GpuVa(0x7F_0000_5008),
            reference: 0,
            mask: 0xFFFF_FFFF,
            func: PollFunc::Equal,
        }
    );
    assert_eq!(p.encode(), poll);
    // ROCr's HDP flush: a register poll.
    let hdp = dwords(&[0x8, 0x0, 0x8000_0000, 0x0, 0x0, 0x0]);
    assert_eq!(SdmaPacket::decode(&hdp), Ok(SdmaPacket::PollRegister));

    // ATOMIC ADD64 of -1 (the completion signal's decrement).
    let atomic = dwords(&[
        10 | (47 << 25),
        0x6008,
        0x7F,
        0xFFFF_FFFF,
        0xFFFF_FFFF,
        0,
        0,
        0,
    ]);
    let p = SdmaPacket::decode(&atomic).unwrap();
    assert_eq!(
        p,
        SdmaPacket::Atomic {
            op: AtomicOp::Add,
            wide: true,
            addr: GpuVa(0x7F_0000_6008),
            src: u64::MAX,
            cmp: 0,
        }
    );
    assert_eq!(p.encode(), atomic);
    assert_eq!(AtomicOp::Add.code(true), sdma::ATOMIC_ADD64);

    // FENCE: event id into the mailbox; TRAP: int_ctx = event id.
    let fence = dwords(&[5, 0x9000, 0x7F, 42]);
    let p = SdmaPacket::decode(&fence).unwrap();
    assert_eq!(
        p,
        SdmaPacket::Fence {
            addr: GpuVa(0x7F_0000_9000),
            data: 42
        }
    );
    assert_eq!(p.encode(), fence);
    let trap = dwords(&[6, 42]);
    let p = SdmaPacket::decode(&trap).unwrap();
    assert_eq!(p, SdmaPacket::Trap { int_ctx: 42 });
    assert_eq!(p.encode(), trap);

    // TIMESTAMP, GET_GLOBAL.
    let ts = dwords(&[13 | (2 << 8), 0xA020, 0x7F]);
    let p = SdmaPacket::decode(&ts).unwrap();
    assert_eq!(
        p,
        SdmaPacket::Timestamp {
            addr: GpuVa(0x7F_0000_A020)
        }
    );
    assert_eq!(p.encode(), ts);

    // NOP: ROCr pads the ring end with zero dwords (1-dword NOPs); a NOP
    // with count n spans n + 1 dwords.
    assert_eq!(sdma::packet_dwords(0), Ok(1));
    assert_eq!(SdmaPacket::decode(&[0]), Ok(SdmaPacket::Nop { dwords: 1 }));
    let nop = dwords(&[3 << 16, 0xFFFF_FFFF, 0xFFFF_FFFF, 0xFFFF_FFFF]);
    assert_eq!(sdma::packet_dwords(nop[0]), Ok(4));
    assert_eq!(SdmaPacket::decode(&nop), Ok(SdmaPacket::Nop { dwords: 4 }));
    assert_eq!(
        SdmaPacket::Nop { dwords: 4 }.encode(),
        vec![3 << 16, 0, 0, 0]
    );
}

#[test]
fn sdma_rejections() {
    let bad = |header| Err(SdmaError::Bad { header });
    let unsupported = |header| Err(SdmaError::Unsupported { header });
    let copy = |f: &dyn Fn(&mut Vec<u32>)| {
        let mut v = vec![1, 0xFFF, 0, 0x1000, 0, 0x2000, 0];
        f(&mut v);
        v
    };
    let cases: Vec<(&str, Vec<u32>, Result<SdmaPacket, SdmaError>)> = vec![
        ("unknown opcode 20", vec![20], bad(20)),
        ("unknown opcode 0xFF", vec![0xFF], bad(0xFF)),
        ("NOP reserved bits 30..32", vec![1 << 30], bad(1 << 30)),
        (
            "COPY unknown sub-op 9",
            vec![1 | (9 << 8); 7],
            bad(1 | (9 << 8)),
        ),
        (
            "COPY_LINEAR_RECT",
            vec![1 | (4 << 8); 13],
            unsupported(1 | (4 << 8)),
        ),
        (
            "COPY count above 22 bits",
            copy(&|v| v[1] = 1 << 22),
            bad(1),
        ),
        (
            "COPY with byte swapping",
            copy(&|v| v[2] = 1 << 16),
            unsupported(1),
        ),
        ("COPY too short", vec![1, 0xFFF, 0], bad(1)),
        ("WRITE", vec![2, 0, 0, 0], unsupported(2)),
        ("INDIRECT", vec![4; 6], unsupported(4)),
        ("SEMAPHORE", vec![3; 3], unsupported(3)),
        ("SRBM_WRITE", vec![7; 3], unsupported(7)),
        ("COND_EXE", vec![9; 5], unsupported(9)),
        ("GEN_PTEPDE", vec![12; 10], unsupported(12)),
        ("GCR", vec![17; 5], unsupported(17)),
        (
            "CONST_FILL fillsize 3",
            vec![11 | (3 << 30), 0, 0, 0, 7],
            bad(11 | (3 << 30)),
        ),
        (
            "CONST_FILL misaligned dword fill",
            vec![11 | (2 << 30), 0x1002, 0, 0, 7],
            bad(11 | (2 << 30)),
        ),
        (
            "CONST_FILL swap",
            vec![11 | (1 << 16), 0, 0, 0, 7],
            unsupported(11 | (1 << 16)),
        ),
        (
            "CONST_FILL count above 22 bits",
            vec![11, 0, 0, 0, 1 << 22],
            bad(11),
        ),
        (
            "POLL_REGMEM func 7",
            vec![8 | (7 << 28) | (1 << 31), 0, 0, 0, 0, 0],
            bad(8 | (7 << 28) | (1 << 31)),
        ),
        (
            "POLL_REGMEM misaligned",
            vec![8 | (3 << 28) | (1 << 31), 0x1002, 0, 0, 0, 0],
            bad(8 | (3 << 28) | (1 << 31)),
        ),
        (
            "ATOMIC loop",
            vec![10 | (1 << 16) | (40 << 25), 0, 0, 0, 0, 0, 0, 0],
            unsupported(10 | (1 << 16) | (40 << 25)),
        ),
        (
            "ATOMIC op 0x1A (a cache op)",
            vec![10 | (0x1A << 25), 0, 0, 0, 0, 0, 0, 0],
            bad(10 | (0x1A << 25)),
        ),
        (
            "ATOMIC op 0x21 (float cmpswap)",
            vec![10 | (0x21 << 25), 0, 0, 0, 0, 0, 0, 0],
            bad(10 | (0x21 << 25)),
        ),
        (
            "ATOMIC 64-bit on a 4-aligned address",
            vec![10 | (47 << 25), 0x1004, 0, 0, 0, 0, 0, 0],
            bad(10 | (47 << 25)),
        ),
        ("FENCE misaligned", vec![5, 0x1001, 0, 0], bad(5)),
        ("TIMESTAMP set local", vec![13, 0, 0, 0], unsupported(13)),
        (
            "TIMESTAMP unknown sub-op",
            vec![13 | (5 << 8), 0, 0],
            bad(13 | (5 << 8)),
        ),
        (
            "TIMESTAMP misaligned",
            vec![13 | (2 << 8), 0x1004, 0],
            bad(13 | (2 << 8)),
        ),
        ("TRAP too long", vec![6, 1, 2], bad(6)),
        ("empty", vec![], bad(0)),
    ];
    for (name, dws, expected) in cases {
        assert_eq!(SdmaPacket::decode(&dws), expected, "case {name}");
        if let Err(e) = expected {
            let status = match e {
                SdmaError::Bad { .. } => QueueStopStatus::BadPacket,
                SdmaError::Unsupported { .. } => QueueStopStatus::UnsupportedPacket,
            };
            assert_eq!(e.stop_status(), status, "case {name}");
        }
    }
    // Bits the engine does not interpret (cache policy, TMZ, trap
    // reserved bits) are ignored.
    let p = SdmaPacket::decode(&[1 | (0xFFFF << 16), 0, 0, 0, 0, 0, 0]);
    assert!(matches!(p, Ok(SdmaPacket::CopyLinear { bytes: 1, .. })));
    assert_eq!(
        SdmaPacket::decode(&[6, 0xF000_0007]),
        Ok(SdmaPacket::Trap { int_ctx: 7 })
    );
}

#[test]
fn atomic_ops_follow_the_tc_encoding() {
    let ops = [
        (AtomicOp::Swap, 0x07),
        (AtomicOp::CmpSwap, 0x08),
        (AtomicOp::Add, 0x0F),
        (AtomicOp::Sub, 0x10),
        (AtomicOp::SMin, 0x11),
        (AtomicOp::UMin, 0x12),
        (AtomicOp::SMax, 0x13),
        (AtomicOp::UMax, 0x14),
        (AtomicOp::And, 0x15),
        (AtomicOp::Or, 0x16),
        (AtomicOp::Xor, 0x17),
        (AtomicOp::Inc, 0x18),
        (AtomicOp::Dec, 0x19),
    ];
    for (op, code32) in ops {
        assert_eq!(op.code(false), code32);
        assert_eq!(op.code(true), code32 + 0x20);
        for (code, wide) in [
            (code32, false),
            (code32 + 0x20, true),
            (code32 + 0x40, false),
            (code32 + 0x60, true),
        ] {
            assert_eq!(AtomicOp::from_code(u32::from(code)), Some((op, wide)));
        }
    }
    for code in [0u32, 6, 9, 0x0E, 0x1A, 0x20, 0x2C, 0x3A, 0x7A, 0x7F, 0x80] {
        assert_eq!(AtomicOp::from_code(code), None, "code {code:#x}");
    }
    let m = u64::MAX;
    let table = [
        (AtomicOp::Add, 5, m, 0, true, 4),
        (AtomicOp::Add, 0xFFFF_FFFF, 1, 0, false, 0),
        (AtomicOp::Sub, 0, 1, 0, true, m),
        (AtomicOp::Swap, 5, 9, 0, true, 9),
        (AtomicOp::CmpSwap, 5, 9, 5, true, 9),
        (AtomicOp::CmpSwap, 5, 9, 4, true, 5),
        (AtomicOp::SMin, 3, m, 0, true, m),
        (AtomicOp::UMin, 3, m, 0, true, 3),
        (AtomicOp::SMax, 3, m, 0, true, 3),
        (AtomicOp::UMax, 3, m, 0, true, m),
        (AtomicOp::SMin, 3, 0xFFFF_FFFF, 0, false, 0xFFFF_FFFF),
        (AtomicOp::And, 0b1100, 0b1010, 0, true, 0b1000),
        (AtomicOp::Or, 0b1100, 0b1010, 0, true, 0b1110),
        (AtomicOp::Xor, 0b1100, 0b1010, 0, true, 0b0110),
        (AtomicOp::Inc, 9, 9, 0, true, 0),
        (AtomicOp::Inc, 8, 9, 0, true, 9),
        (AtomicOp::Dec, 0, 9, 0, true, 9),
        (AtomicOp::Dec, 10, 9, 0, true, 9),
        (AtomicOp::Dec, 5, 9, 0, true, 4),
        // 32-bit forms use the low 32 bits of every operand.
        (AtomicOp::Add, 0x1_0000_0002, 0x1_0000_0003, 0, false, 5),
    ];
    for (op, old, src, cmp, wide, new) in table {
        assert_eq!(
            op.apply(old, src, cmp, wide),
            new,
            "{op:?} {old:#x} {src:#x}"
        );
    }
}

#[test]
fn poll_functions() {
    let table = [
        (PollFunc::Always, 1, 0, true),
        (PollFunc::Less, 1, 2, true),
        (PollFunc::Less, 2, 2, false),
        (PollFunc::LessEqual, 2, 2, true),
        (PollFunc::Equal, 2, 2, true),
        (PollFunc::Equal, 3, 2, false),
        (PollFunc::NotEqual, 3, 2, true),
        (PollFunc::GreaterEqual, 2, 2, true),
        (PollFunc::Greater, 2, 2, false),
        (PollFunc::Greater, 0xFFFF_FFFF, 2, true),
    ];
    for (f, v, r, holds) in table {
        assert_eq!(f.holds(v, r), holds, "{f:?} {v} {r}");
        assert_eq!(PollFunc::from_bits(f as u32), Some(f));
    }
    assert_eq!(PollFunc::from_bits(7), None);
}

/// A barrier packet as ROCr's `hsa_amd_barrier`/`BARRIER_AND` users write
/// it: header (type, barrier bit, fence scopes), dependency signals at
/// 8..48, completion signal at 56.
#[test]
fn aql_packets_layout() {
    let mut b = [0u8; 64];
    // type 3, barrier, acquire and release system scope.
    w16(&mut b, 0, 3 | (1 << 8) | (2 << 9) | (2 << 11));
    w64(&mut b, 8, 0x7F00_0040);
    w64(&mut b, 24, 0x7F00_0080);
    w64(&mut b, 56, 0x7F00_00C0);
    let sig = |v| Some(SignalHandle(GpuVa(v)));
    let expected = AqlPacket::Barrier {
        kind: BarrierKind::And,
        deps: [sig(0x7F00_0040), None, sig(0x7F00_0080), None, None],
        completion: sig(0x7F00_00C0),
    };
    assert_eq!(AqlPacket::decode(&b), Ok(expected));
    // Reserved fields are not interpreted.
    let mut noisy = b;
    w16(&mut noisy, 2, 0xFFFF);
    w64(&mut noisy, 48, 7);
    assert_eq!(AqlPacket::decode(&noisy), Ok(expected));

    let built = AqlPacket::barrier(
        BarrierKind::Or,
        &[GpuVa(0x7F00_0040), GpuVa(0x7F00_0080)],
        None,
    );
    let mut by_hand = [0u8; 64];
    w16(&mut by_hand, 0, 5 | (1 << 8));
    w64(&mut by_hand, 8, 0x7F00_0040);
    w64(&mut by_hand, 16, 0x7F00_0080);
    assert_eq!(built, by_hand);
    assert_eq!(
        AqlPacket::decode(&built),
        Ok(AqlPacket::Barrier {
            kind: BarrierKind::Or,
            deps: [sig(0x7F00_0040), sig(0x7F00_0080), None, None, None],
            completion: None,
        })
    );

    // ROCr's ExecutePM4 on gfx9: type 0, AMD format PM4_IB at offset 2.
    let mut pm4 = [0u8; 64];
    w16(&mut pm4, 2, 1);
    w32(&mut pm4, 20, 0xA);
    assert_eq!(
        AqlPacket::decode(&pm4),
        Ok(AqlPacket::Pm4Ib { completion: None })
    );
    assert_eq!(AqlPacket::pm4_ib(None)[..4], pm4[..4]);

    let mut invalid = b;
    w16(&mut invalid, 0, 1);
    assert_eq!(AqlPacket::decode(&invalid), Ok(AqlPacket::Invalid));

    // The amd_signal_t ABI (amd_hsa_signal.h).
    assert_eq!(
        (
            aql::amd_signal::KIND,
            aql::amd_signal::VALUE,
            aql::amd_signal::EVENT_MAILBOX_PTR,
            aql::amd_signal::EVENT_ID,
            aql::amd_signal::START_TS,
            aql::amd_signal::END_TS,
            aql::amd_signal::SIZE,
        ),
        (0, 8, 16, 24, 32, 40, 64)
    );
    assert_eq!(
        SignalHandle(GpuVa(0x7F00_0040)).value_va(),
        GpuVa(0x7F00_0048)
    );
}

#[test]
fn aql_rejections() {
    let header = |ty: u16| {
        let mut b = [0u8; 64];
        w16(&mut b, 0, ty);
        b
    };
    let cases: Vec<(&str, [u8; 64], AqlError)> = vec![
        (
            "kernel dispatch",
            header(2 | (1 << 8)),
            AqlError::Unsupported {
                header: 2 | (1 << 8),
            },
        ),
        (
            "agent dispatch",
            header(4),
            AqlError::Unsupported { header: 4 },
        ),
        ("type 6", header(6), AqlError::Bad { header: 6 }),
        ("type 0xFF", header(0xFF), AqlError::Bad { header: 0xFF }),
        ("vendor format 0", header(0), AqlError::Bad { header: 0 }),
        (
            "vendor format 2",
            {
                let mut b = header(0);
                w16(&mut b, 2, 2);
                b
            },
            AqlError::Bad { header: 0 },
        ),
        (
            "dependency signal 8-aligned",
            {
                let mut b = header(3);
                w64(&mut b, 16, 0x7F00_0048);
                b
            },
            AqlError::Bad { header: 3 },
        ),
        (
            "completion signal 32-aligned",
            {
                let mut b = header(5);
                w64(&mut b, 56, 0x7F00_0020);
                b
            },
            AqlError::Bad { header: 5 },
        ),
        (
            "completion signal at the top of the address space",
            {
                let mut b = header(3);
                w64(&mut b, 56, !63u64);
                b
            },
            AqlError::Bad { header: 3 },
        ),
    ];
    for (name, bytes, error) in cases {
        assert_eq!(AqlPacket::decode(&bytes), Err(error), "case {name}");
    }
    assert_eq!(
        AqlError::Unsupported { header: 2 }.stop_status(),
        QueueStopStatus::UnsupportedPacket
    );
    assert_eq!(
        AqlError::Bad { header: 6 }.stop_status(),
        QueueStopStatus::BadPacket
    );
}

fn user_queue_create() -> impl Strategy<Value = UserQueueCreate> {
    let va = |align: u64| (0u64..(1 << 47) / align).prop_map(move |v| GpuVa(v * align));
    (
        prop_oneof![Just(UserQueueKind::Sdma), Just(UserQueueKind::Aql)],
        0u8..=15,
        va(256),
        12u32..=26,
        va(8),
        prop::option::of(va(8)),
        va(8),
        prop::option::of(va(64)),
    )
        .prop_map(
            |(kind, priority, ring, shift, rptr, wptr, doorbell, status)| UserQueueCreate {
                kind,
                priority,
                ring,
                ring_size: 1 << shift,
                rptr,
                wptr: wptr.filter(|w| w.raw() != 0),
                doorbell,
                status: status.filter(|s| s.raw() != 0),
            },
        )
}

fn stop_status() -> impl Strategy<Value = QueueStopStatus> {
    prop::sample::select(vec![
        QueueStopStatus::FaultRejected,
        QueueStopStatus::FaultTimedOut,
        QueueStopStatus::FaultFatal,
        QueueStopStatus::DeviceError,
        QueueStopStatus::BadPacket,
        QueueStopStatus::UnsupportedPacket,
        QueueStopStatus::BadDoorbell,
    ])
}

/// Dwords that look like the start of a known packet more often than not.
fn sdma_dwords() -> impl Strategy<Value = Vec<u32>> {
    (
        prop::sample::select(vec![0u32, 1, 5, 6, 8, 10, 11, 13, 2, 17, 0x33]),
        any::<u32>(),
        prop::collection::vec(any::<u32>(), 0..10),
    )
        .prop_map(|(op, high, mut rest)| {
            let header = op | (high & 0xFFFF_FF00);
            let len = sdma::packet_dwords(header).unwrap_or(1) as usize;
            rest.insert(0, header);
            rest.resize(len.min(16), 0);
            rest
        })
}

proptest! {
    #[test]
    fn user_queue_requests_round_trip(q in user_queue_create(), seqno in any::<u32>()) {
        let req = Request::UserQueueCreate(q);
        let bytes = encode(&req, seqno, 8);
        prop_assert_eq!(bytes.len(), 72);
        prop_assert_eq!(Request::decode(&bytes), Ok(req));
    }

    #[test]
    fn user_queue_create_survives_any_payload(payload in prop::array::uniform32(any::<u64>())) {
        let mut b = request(0x0023, 72, 1, 0);
        for (i, v) in payload.iter().take(7).enumerate() {
            w64(&mut b, 16 + 8 * i, *v);
        }
        if let Ok(Request::UserQueueCreate(q)) = Request::decode(&b) {
            // What decodes re-encodes to the same bytes and never wraps.
            prop_assert_eq!(encode(&Request::UserQueueCreate(q), 1, 0), b);
            for (va, len) in q.ranges() {
                prop_assert!(va.checked_add(len).is_some());
            }
        }
    }

    #[test]
    fn sdma_decoder_never_panics_and_round_trips(dws in sdma_dwords()) {
        if let Ok(p) = SdmaPacket::decode(&dws) {
            prop_assert_eq!(p.dwords() as usize, dws.len());
            let enc = p.encode();
            prop_assert_eq!(enc.len(), dws.len());
            prop_assert_eq!(SdmaPacket::decode(&enc), Ok(p));
        }
    }

    #[test]
    fn sdma_decoder_survives_random_dwords(dws in prop::collection::vec(any::<u32>(), 0..20)) {
        let _ = sdma::packet_dwords(dws.first().copied().unwrap_or(0));
        let _ = SdmaPacket::decode(&dws);
    }

    #[test]
    fn aql_decoder_never_panics(bytes in prop::array::uniform32(any::<u8>()), rest in prop::array::uniform32(any::<u8>()), ty in 0u16..8) {
        let mut b = [0u8; 64];
        b[..32].copy_from_slice(&bytes);
        b[32..].copy_from_slice(&rest);
        b[0..2].copy_from_slice(&ty.to_le_bytes());
        match AqlPacket::decode(&b) {
            Ok(AqlPacket::Barrier { deps, completion, .. }) => {
                for s in deps.iter().chain(std::iter::once(&completion)).flatten() {
                    prop_assert_eq!(s.0.raw() % 64, 0);
                }
            }
            Ok(_) => {}
            Err(e) => prop_assert_eq!(u16::from(e.header() as u8), ty),
        }
    }

    #[test]
    fn status_blocks_round_trip(
        status in stop_status(),
        fault_va in any::<u64>(),
        packet in any::<u64>(),
        access in 0u8..16,
        detail in any::<u64>(),
    ) {
        let block = QueueStatusBlock {
            status,
            fault_va: GpuVa(fault_va),
            packet,
            access: AccessFlags::from_bits(access),
            detail,
        };
        prop_assert_eq!(QueueStatusBlock::decode(&block.encode()), Ok(Some(block)));
    }

    #[test]
    fn status_block_decoder_survives_any_bytes(b in prop::collection::vec(any::<u8>(), 0..80), state in 0u32..3) {
        let mut b = b;
        if b.len() >= 4 {
            b[0..4].copy_from_slice(&state.to_le_bytes());
        }
        if let Ok(Some(block)) = QueueStatusBlock::decode(&b) {
            prop_assert_eq!(&block.encode()[..], &b[..64]);
        }
    }
}
